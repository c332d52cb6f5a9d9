"""jaxmixed: linear mixed models with JAX, Stata's and lme4's numbers."""

import jax as _jax

# Mixed-model likelihoods need float64: Cholesky factors of nearly singular blocks, log
# determinants and variance ratios spanning many orders of magnitude.
_jax.config.update("jax_enable_x64", True)

__version__ = "0.1.0"

from . import datasets  # noqa: E402
from .compare import LRTest, lrtest  # noqa: E402
from .errors import DataError, FormulaError, JaxmixedError, JaxmixedWarning, ModelError  # noqa: E402
from .fitting import fit, fit_spec, mixed, xtmixed  # noqa: E402
from .formula import parse_formula  # noqa: E402
from .results import FitResult  # noqa: E402
from .stata import parse_stata  # noqa: E402

__all__ = [
    "DataError", "FitResult", "LRTest", "lrtest", "FormulaError", "JaxmixedError", "JaxmixedWarning", "ModelError",
    "datasets", "fit", "fit_spec", "mixed", "parse_formula", "parse_stata", "xtmixed",
]
