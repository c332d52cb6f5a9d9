"""The ``jaxmixed`` command line.

    jaxmixed tour [--out DIR]
    jaxmixed fit DATA.csv "FORMULA" [--ml] [--stata] [--variance] [--level 95] [--nolog] [--json]
    jaxmixed fit data/*.parquet "FORMULA" [...] [--no-progress]

``fit`` reads a CSV (or streams Parquet/Arrow files in two passes, with a progress bar), fits an lme4-style formula (``--stata``: a Stata ``xtmixed``/``mixed``
command) and prints the Stata-style report, or with ``--json`` a JSON object of the estimates
(NaN written as null). Errors of the input (bad formula, unusable data, missing file) are one
line on stderr prefixed ``jaxmixed: error:`` and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import warnings

import numpy as np
import pandas as pd

from jaxmixed.errors import JaxmixedError, JaxmixedWarning

PROG = "jaxmixed"
EXIT_ERROR = 2


class CliError(Exception):
    """A failure that is reported as one line on stderr (exit status 2)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Linear mixed models with JAX (Stata xtmixed / lme4 syntax).")
    from jaxmixed import __version__

    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    tour = sub.add_parser("tour", help="run the guided tour (writes its files to --out)",
                          description="Run the guided tour and print its text.")
    tour.add_argument("--out", default="jaxmixed_tour", metavar="DIR",
                      help="folder for the tour's output files (default: %(default)s)")

    fit = sub.add_parser("fit", help="fit a model to a CSV file or Parquet/Arrow files",
                         description="Fit a linear mixed model to a CSV file, or to Parquet/Arrow files streamed "
                                     "in two passes (memory bounded by the model, not the rows), and print the report.",
                         epilog='examples:\n  jaxmixed fit pig.csv "weight ~ week + (1|id)"\n'
                                '  jaxmixed fit pig.csv --stata "weight week || id:"\n'
                                '  jaxmixed fit data/*.parquet "y ~ x1 + (1 + x1 | g)"',
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    fit.add_argument("data", metavar="DATA", nargs="+",
                     help="a CSV file (with a header row), or Parquet/Arrow files, a glob or a folder of them "
                          "(streamed)")
    fit.add_argument("formula", metavar="FORMULA",
                     help='lme4 formula, e.g. "y ~ x + (1 + x | g)"; with --stata a Stata command')
    fit.add_argument("--ml", action="store_true", help="maximum likelihood instead of REML")
    fit.add_argument("--stata", action="store_true",
                     help="FORMULA is Stata xtmixed/mixed syntax (its options, e.g. mle, apply)")
    fit.add_argument("--variance", action="store_true",
                     help="report variances and covariances instead of sds and correlations")
    fit.add_argument("--level", type=float, default=None, metavar="PCT",
                     help="confidence level in percent (default 95, or the Stata command's level())")
    fit.add_argument("--nolog", action="store_true", help="leave the iteration log out of the report")
    fit.add_argument("--json", action="store_true", help="print the estimates as a JSON object")
    fit.add_argument("--family", default=None, metavar="NAME",
                     help="a GLMM: binomial, poisson, negbinomial, gamma or gaussian (with --link)")
    fit.add_argument("--link", default=None, metavar="NAME", help="the GLMM's link (default: the canonical one)")
    fit.add_argument("--nagq", type=int, default=1, metavar="K",
                     help="adaptive Gauss-Hermite points per random effect (1: Laplace)")
    fit.add_argument("--dfmethod", default=None, metavar="NAME",
                     help="small-sample df for the fixed effects: satterthwaite, kroger, residual, repeated, anova")
    fit.add_argument("--no-progress", action="store_true",
                     help="no progress bar for the passes over streamed files")
    return parser


# --------------------------------------------------------------------------------------- fit


def read_csv(path: str) -> pd.DataFrame:
    try:
        return pd.read_csv(path)
    except FileNotFoundError:
        raise CliError(f"cannot read {path!r}: no such file") from None
    except IsADirectoryError:
        raise CliError(f"cannot read {path!r}: it is a folder") from None
    except pd.errors.EmptyDataError:
        raise CliError(f"cannot read {path!r}: the file is empty") from None
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, ValueError) as e:
        raise CliError(f"cannot read {path!r} as CSV: {e}") from None


def read_data(args):
    """A single CSV file: read with pandas (in memory); anything else (Parquet/Arrow files, a glob,
    several files, a folder): a streamed source."""
    paths = list(args.data)
    if len(paths) == 1 and paths[0].lower().endswith(".csv") and not any(ch in paths[0] for ch in "*?["):
        return read_csv(paths[0])
    import jaxmixed as jm

    return jm.source(paths if len(paths) > 1 else paths[0])


def fit_model(args, data):
    import jaxmixed as jm

    stream = {} if isinstance(data, pd.DataFrame) else {"progress": not args.no_progress}
    if args.stata:
        spec = jm.parse_stata(args.formula)  # only to see the command word
        cmd = spec.options.get("command")
        from jaxmixed.syntax.stata import ME_COMMANDS

        if cmd in ME_COMMANDS:
            return getattr(jm, cmd)(args.formula, data, variance=True if args.variance else None, level=args.level,
                                    dfmethod=args.dfmethod)
        fn = jm.mixed if cmd == "mixed" else jm.xtmixed
        return fn(args.formula, data, method="ml" if args.ml else None,
                  variance=True if args.variance else None, level=args.level, dfmethod=args.dfmethod, **stream)
    level = 95.0 if args.level is None else args.level
    if args.family or args.link:
        return jm.fit(args.formula, data, variance=args.variance, level=level, family=args.family or "gaussian",
                      link=args.link, nagq=args.nagq, dfmethod=args.dfmethod)
    return jm.fit(args.formula, data, method="ml" if args.ml else "reml", variance=args.variance, level=level,
                  dfmethod=args.dfmethod, **stream)


def _clean(x):
    """JSON-ready: numpy scalars to Python, NaN/inf to None, containers recursively."""
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, np.ndarray):
        return [_clean(v) for v in x.tolist()]
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        x = float(x)
        return x if math.isfinite(x) else None
    if x is None or isinstance(x, str):
        return x
    if pd.isna(x):
        return None
    return str(x)


def result_dict(r) -> dict:
    """The estimates of a FitResult as plain data (NaN left as NaN; ``_clean`` makes it JSON)."""
    cols = [c for c in ("coef", "se", "z", "t", "df", "p", "ci_lower", "ci_upper") if c in r.fixed.columns]
    fixed = {str(name): {c: row[c] for c in cols}
             for name, row in r.fixed.iterrows()}
    random = [{"group": (None if pd.isna(row["group"]) or row["group"] == "" else row["group"]),
               "name": row["name"],
               **{c: row[c] for c in ("estimate", "se", "ci_lower", "ci_upper")}}
              for row in r.random.to_dict("records")]
    chi2, df, p = r.wald
    stat, lr_df, lr_p, kind = r.lr_vs_linear
    groups = {str(lev): {"n_groups": int(row["n_groups"]), "min": int(row["min"]), "mean": float(row["mean"]),
                         "max": int(row["max"])} for lev, row in r.groups.iterrows()}
    out = {
        "formula": r.spec.text, "syntax": r.spec.syntax,
        "loglik": r.loglik, "method": r.method, "nobs": r.nobs, "converged": r.converged, "singular": r.singular,
        "level": r.level, "variance": r.variance, "aic": r.aic, "bic": r.bic,
        "fixed": fixed, "random": random,
        "wald": {"chi2": chi2, "df": df, "p": p},
        "lr_vs_linear": {"stat": stat, "df": lr_df, "p": lr_p, "kind": kind},
        "groups": groups, "notes": list(r.notes),
    }
    if getattr(r, "dfmethod", None) is not None:
        ft = r.f_test
        out["dfmethod"] = r.dfmethod
        out["f_test"] = None if ft is None else {"F": ft.stat, "df1": ft.df1, "df2": ft.df2, "p": ft.p}
    return out


def to_json(r) -> str:
    return json.dumps(_clean(result_dict(r)), indent=2, allow_nan=False)


def cmd_fit(args) -> int:
    data = read_data(args)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = fit_model(args, data)
    for w in caught:  # the fit's notes are printed under its tables; anything else is said once here
        if str(w.message) not in r.notes:
            print(f"{PROG}: warning: {w.message}", file=sys.stderr)
    if args.json:
        print(to_json(r))
    else:
        print(r.summary(log=False) if args.nolog else str(r))
    return 0


# -------------------------------------------------------------------------------------- tour


def cmd_tour(args) -> int:
    try:
        from jaxmixed.app.tour import run
    except ModuleNotFoundError as e:
        if e.name in ("jaxmixed.app.tour",):
            raise CliError("the tour is not available in this installation (no jaxmixed.app.tour)") from None
        raise
    with warnings.catch_warnings():  # each fit's notes are printed under its tables, as Stata does
        warnings.simplefilter("ignore", JaxmixedWarning)
        text = run(args.out)
    print(text)
    return 0


# -------------------------------------------------------------------------------------- main


def main(argv=None) -> int:
    """Run the command line; returns the exit status (0 ok, 2 usage or input error).

    Also registers the exit hook that skips the collector's passes at shutdown (``gc.freeze()``,
    see :mod:`jaxmixed.runtime`; ``JAXMIXED_EXIT_GC=1`` leaves shutdown alone): the command's
    process ends when it returns, unlike a program that imports jaxmixed."""
    from jaxmixed import runtime

    runtime.freeze_gc_at_exit()
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, usage errors (argparse printed the message)
        return e.code if isinstance(e.code, int) else (0 if e.code is None else EXIT_ERROR)
    handlers = {"fit": cmd_fit, "tour": cmd_tour}
    try:
        return handlers[args.command](args)
    except (JaxmixedError, CliError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
