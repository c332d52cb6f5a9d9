"""jaxmixed: linear mixed models with JAX, Stata's and lme4's numbers."""

# XLA's CPU runtime in jaxlib 0.10 can wedge its Eigen thread pool and never return a result
# (seen here in while_loop programs; jax-ml/jax#25861 and others). On those versions only,
# jaxmixed runs Eigen ops on the calling thread (--xla_cpu_multi_thread_eigen=false in XLA_FLAGS,
# said once on the "jaxmixed" logger) unless you set that flag yourself or JAXMIXED_KEEP_XLA_FLAGS=1.
# Must happen before JAX's backend starts: see jaxmixed.settings (which does not import JAX).
from jaxmixed import settings as _settings

_settings.apply_xla_flags()

import jax as _jax  # noqa: E402

# Mixed-model likelihoods need float64: Cholesky factors of nearly singular blocks, log
# determinants and variance ratios spanning many orders of magnitude.
_jax.config.update("jax_enable_x64", True)

# Persistent compilation cache on (JAXMIXED_NO_CACHE=1 to leave it off): see jaxmixed.runtime.
# Nothing else process-wide happens at import (BLAS threads only inside a fit, no exit hook).
from jaxmixed import runtime  # noqa: E402

runtime.configure_from_environment()

__version__ = "0.1.0"

from jaxmixed.data import datasets  # noqa: E402
from jaxmixed.inference.compare import LRTest, lrtest  # noqa: E402
from jaxmixed.errors import DataError, FormulaError, JaxmixedError, JaxmixedWarning, ModelError  # noqa: E402
from jaxmixed.api.fit import fit, fit_spec, mixed, xtmixed  # noqa: E402
from jaxmixed.api.glmm import mecloglog, meglm, melogit, menbreg, meprobit, mepoisson  # noqa: E402
from jaxmixed.syntax.formula import parse_formula  # noqa: E402
from jaxmixed.model.residuals import ar, banded, exchangeable, exponential, independent, ma, toeplitz, unstructured  # noqa: E402
from jaxmixed.results.fitresult import FitResult  # noqa: E402

# Imported at first use (PEP 562), so that ``import jaxmixed`` and a first fit do not pay for them.
_LAZY = {
    "functional": ("functional", None),
    "BootstrapLRTest": ("inference.bootstrap", "BootstrapLRTest"),
    "BootstrapResult": ("inference.bootstrap", "BootstrapResult"),
    "bootstrap_lrtest": ("inference.bootstrap", "bootstrap_lrtest"),
    "ManyResult": ("results.many", "ManyResult"),
    "fit_many": ("api.many", "fit_many"),
    "parse_stata": ("syntax.stata", "parse_stata"),
    "source": ("data.sources", "open_source"),
}


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    module, attr = _LAZY[name]
    value = importlib.import_module(f"{__name__}.{module}")
    value = value if attr is None else getattr(value, attr)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "DataError", "FitResult", "LRTest", "lrtest", "FormulaError", "JaxmixedError", "JaxmixedWarning", "ModelError",
    "ar", "banded", "exchangeable", "exponential", "independent", "ma", "toeplitz", "unstructured",
    "datasets", "fit", "fit_spec", "meglm", "melogit", "meprobit", "mecloglog", "mepoisson", "menbreg", "mixed", "parse_formula", "parse_stata", "xtmixed",
    "BootstrapLRTest", "BootstrapResult", "ManyResult", "bootstrap_lrtest", "fit_many", "functional",
    "source",
]
