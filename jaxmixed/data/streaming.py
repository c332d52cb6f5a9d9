"""A design and its cross-products from a streamed source, in two passes over the rows.

A linear mixed model sees its rows only through sums (:mod:`jaxmixed.data.crossprod`), so a
source that does not fit in memory (:mod:`jaxmixed.data.sources`) is read twice, batch by
batch, and never held:

1. the *schema pass* (:func:`scan_batch`): which rows are complete in every variable the model
   reads (the others are dropped and counted, as in memory), the distinct complete
   combinations of the grouping variables with their counts (→ the levels of every grouping
   factor, the group summary and the sparsity pattern of ZᵀZ, :func:`jaxmixed.data.pattern.build_pattern`),
   and the levels of categorical fixed effects with their counts (→ dummy columns and base
   levels, as :func:`jaxmixed.data.design._fixed_columns` chooses them in memory);
2. the *cross-products pass* (:func:`cross_batch`): each batch's X, y, level codes and Z built
   with the in-memory design's own functions and the levels of pass 1, and its cross-products
   formed by the in-memory path's :func:`~jaxmixed.data.crossprod.accumulate` (or its
   device-sharded version, :mod:`jaxmixed.data.sharded`); batches add.

A model with one grouping factor and no categorical fixed effects needs no schema pass: each
batch labels its sums with the levels it sees (:func:`one_pass_batch`), :func:`add_parts` aligns
them when batches are added, and the levels are sorted at the end as in memory.

Then (:func:`finish`) the fixed-effects columns that are collinear are found from the Gram
matrix XᵀX (:func:`jaxmixed.data.design.drop_collinear_gram`), the well-conditioned basis
X̃ = X R₀⁻¹ comes from its Cholesky factor R₀ (the in-memory path's Householder R, up to
rounding), and the cross-products are transformed to it: Z₁ᵀX̃ = (Z₁ᵀX) R₀⁻¹, X̃ᵀX̃ = R₀⁻ᵀ(XᵀX)R₀⁻¹.
Memory is the model's (levels × effects, the pattern's blocks) plus one batch, whatever the
number of rows. Every function a pass runs per batch is a module-level function of picklable
arguments, so that Dask can ship it to its workers.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import partial
from types import SimpleNamespace

import numpy as np
import pandas as pd

from jaxmixed.data import design as dz
from jaxmixed.data.crossprod import CrossProducts, accumulate, add, identical_columns
from jaxmixed.data.pattern import build_pattern
from jaxmixed.errors import DataError, ModelError, warn
from jaxmixed.model.spec import ModelSpec

COUNT = "_jm_n"  # the count column of the distinct grouping combinations
MAX_TYPE3_COLUMNS = 200  # beyond this many fixed-effects columns, no Xᵀ rdX (type III tests) is formed


# ---------------------------------------------------------------------------------------------
# the row-less design


@dataclass(frozen=True)
class StreamedFactor(dz.FactorSchema):
    """A grouping factor of a streamed fit: its levels and observations per level, no rows."""

    counts: np.ndarray = None

    codes = property(lambda self: _no_rows())
    Z = property(lambda self: _no_rows())


def _no_rows():
    raise DataError(_NO_ROWS)


_NO_ROWS = ("this needs the fit's rows, which a fit on a streamed source does not keep in memory: for "
            "predictions pass the source again (r.predict('fitted', data=source, out='predictions.parquet')); "
            "for anything else that reads the rows (the bootstrap, wcorrelation, rank-based df) fit a "
            "pandas DataFrame")


@dataclass(frozen=True)
class StreamedDesign(dz.DesignBase):
    """A :class:`~jaxmixed.data.design.Design` without its rows: everything the engine, the
    report and predictions on new data need. Asking for the rows (``X``, ``y``, ``rows``, a
    factor's ``codes``/``Z``) is a DataError that says how to get them."""

    xnames: tuple
    factors: tuple  # StreamedFactor, engine order
    terms: tuple
    n_theta: int
    group_summary: pd.DataFrame
    n_dropped: int
    omitted: tuple
    response: str
    fixed_levels: dict
    fixed_basis: tuple  # (None, R₀⁻¹, log|R₀|²): X̃ itself is never formed
    theta_scale: np.ndarray
    n_obs: int
    source: str  # what was read, for messages
    fixed_terms: object = None
    fixed_encoder: tuple = None
    column_encoders: dict = field(default_factory=dict)

    @property
    def nobs(self) -> int:
        return self.n_obs

    X = property(lambda self: _no_rows())
    y = property(lambda self: _no_rows())
    rows = property(lambda self: _no_rows())


# ---------------------------------------------------------------------------------------------
# pass 1: the schema


@dataclass
class Scan:
    """Pass 1's sums over a set of rows."""

    n_rows: int
    n_complete: int
    present: dict  # variable -> number of rows where it is not missing
    combos: list  # tables of distinct complete combinations of the grouping variables (COUNT column)
    cat_counts: dict  # categorical fixed-effects variable -> Series of counts per value


def grouping_variables(spec: ModelSpec) -> list[str]:
    out: list[str] = []
    for g in list(dz.groupings(spec)) + [lev.group for lev in spec.levels]:
        for v in g:
            if v not in out:
                out.append(v)
    return out


def _complete(df: pd.DataFrame, variables) -> np.ndarray:
    return np.logical_and.reduce([df[v].notna().to_numpy() for v in variables])


def _complete_rows(spec: ModelSpec, variables, df: pd.DataFrame):
    """(non-missing count per variable, the complete rows of ``variables``), the kept cells
    checked as in memory (:func:`jaxmixed.data.design._check_values`)."""
    masks = {v: df[v].notna().to_numpy() for v in variables}
    ok = np.logical_and.reduce(list(masks.values()))
    full = df if ok.all() else df.loc[ok].reset_index(drop=True)  # (a batch holds the model's columns)
    dz._check_values(spec, full, variables)
    return {v: int(m.sum()) for v, m in masks.items()}, full


def _combos(df: pd.DataFrame, gvars, counts=None) -> pd.DataFrame:
    """The distinct combinations of ``gvars`` in ``df`` with their number of rows (``counts``:
    what each row of ``df`` stands for). Integer columns whose ranges multiply to less than 2⁶²
    are packed into one int64 key (a single hash factorisation; ~4× faster than a groupby on
    several keys); anything else goes through pandas' groupby."""
    if not gvars:
        return pd.DataFrame({COUNT: [len(df) if counts is None else int(np.sum(counts))]})
    cols = [df[v].to_numpy() for v in gvars]
    if len(df) and all(c.dtype.kind == "i" or (c.dtype.kind == "u" and int(c.max()) < 2 ** 62) for c in cols):
        lows = [int(c.min()) for c in cols]
        spans = [int(c.max()) - lo + 1 for c, lo in zip(cols, lows)]
        if float(np.prod([float(x) for x in spans])) < 2.0 ** 62:
            key = np.zeros(len(df), dtype=np.int64)
            for c, lo, sp in zip(cols, lows, spans):
                key = key * sp + (c.astype(np.int64) - lo)
            codes, uniq = pd.factorize(key)
            n = np.bincount(codes, weights=counts, minlength=len(uniq))
            out = {}
            for v, c, lo, sp in reversed(list(zip(gvars, cols, lows, spans))):
                out[v] = (uniq % sp + lo).astype(c.dtype)
                uniq = uniq // sp
            frame = pd.DataFrame({v: out[v] for v in gvars})
            frame[COUNT] = n.astype(np.int64)
            return frame
    if counts is None:
        out = df.groupby(list(gvars), sort=False, observed=True, dropna=False).size()
    else:
        out = pd.Series(counts, index=df.index).groupby([df[v] for v in gvars], sort=False, observed=True,
                                                        dropna=False).sum()
    return out.rename(COUNT).reset_index()


def compact_combos(frames: list) -> pd.DataFrame:
    """One table of distinct combinations from several (their counts added)."""
    if len(frames) == 1:
        return frames[0]
    both = pd.concat(frames, ignore_index=True)
    gvars = [c for c in both.columns if c != COUNT]
    return _combos(both, gvars, both[COUNT].to_numpy(dtype=float))


def scan_batch(spec: ModelSpec, variables: tuple, gvars: tuple, cats: tuple, df: pd.DataFrame) -> Scan:
    """Pass 1 over one batch (see the module docstring)."""
    present, full = _complete_rows(spec, variables, df)
    cat_counts = {v: full[v].value_counts(sort=False) for v in cats}
    return Scan(n_rows=len(df), n_complete=len(full), present=present, combos=[_combos(full, gvars)],
                cat_counts=cat_counts)


def add_scans(a: Scan, b: Scan) -> Scan:
    combos = a.combos + b.combos
    if len(combos) >= 8:  # (compacted now and then, not at every batch)
        combos = [compact_combos(combos)]
    return Scan(n_rows=a.n_rows + b.n_rows, n_complete=a.n_complete + b.n_complete,
                present={v: a.present[v] + b.present[v] for v in a.present}, combos=combos,
                cat_counts={v: a.cat_counts[v].add(b.cat_counts[v], fill_value=0) for v in a.cat_counts})


# ---------------------------------------------------------------------------------------------
# pass 2: the cross-products


@dataclass(frozen=True)
class Plan:
    """What pass 2 needs per batch (picklable: Dask ships it to the workers)."""

    spec: ModelSpec
    variables: tuple
    weights: str | None
    fixed_levels: dict
    names: tuple  # every candidate fixed-effects column, before the collinearity check
    groups: tuple  # per factor, engine order: the grouping variables
    levels: tuple  # per factor: its levels (pd.Index)
    colnames: tuple  # per factor: its random-effects columns
    pattern: object
    accumulate: object = None  # None: crossprod.accumulate in numpy; else a device-sharded version
    overparameterised: bool = False  # also Xᵀ rdX, for type III tests (FixedTerms.rd_basis)
    same: tuple = None  # per factor: each random-effects column's index among X's columns, or -1


@dataclass
class Sums:
    """Pass 2's sums over a set of rows."""

    cp: CrossProducts  # with every candidate column of X, untransformed
    gram: np.ndarray  # unweighted [X y]ᵀ[X y] (with prior weights; else None: cp.WW is it)
    zz: tuple  # per factor: unweighted ZᵀZ
    y_min: float
    y_max: float
    y_first: float
    y_stats: tuple  # (n, mean, M2): the response's mean and centred sum of squares (Chan et al.)
    y_big: float
    sum_log_w: float
    x_rd: np.ndarray = None  # Xᵀ rdX (every candidate column of X; rdX the all-levels design)


def _codes(df: pd.DataFrame, group: tuple, levels: pd.Index) -> np.ndarray:
    if not group:
        return np.zeros(len(df), dtype=np.int64)
    if isinstance(levels, pd.RangeIndex):  # integer levels start, start+1, …: the code is an offset
        v = df[group[0]].to_numpy()
        if v.dtype.kind in "iu":
            codes = v.astype(np.int64) - levels.start
            if codes.size and (codes.min() < 0 or codes.max() >= len(levels)):
                codes = np.where((codes >= 0) & (codes < len(levels)), codes, -1)
            return _checked(df, group, codes)
    if len(group) == 1 and not isinstance(levels, pd.MultiIndex):
        codes = levels.get_indexer(df[group[0]])
    else:
        local, uniq = dz._group_codes(df, group)
        codes = levels.get_indexer(uniq)[local]
    return _checked(df, group, codes)


def _checked(df, group, codes):
    if np.any(codes < 0):
        bad = df.loc[codes < 0, list(group)].iloc[0].tolist()
        raise DataError(f"grouping {':'.join(group)!r} has a level ({', '.join(map(str, bad))}) that the first pass "
                        "over the source did not see: the source changed between the two passes")
    return codes.astype(np.int64)


def cross_batch(plan: Plan, df: pd.DataFrame) -> Sums:
    """Pass 2 over one batch (see the module docstring)."""
    ok = _complete(df, plan.variables)
    if not ok.all():
        df = df.loc[ok].reset_index(drop=True)
    codes = [_codes(df, g, lv) for g, lv in zip(plan.groups, plan.levels)]
    return _sums(plan, df, codes, [len(lv) for lv in plan.levels], plan.pattern.block_index(tuple(codes)))


def _sums(plan: Plan, df: pd.DataFrame, codes, n_levels, blocks) -> Sums:
    """The Sums of complete rows ``df`` whose level codes (engine order) are ``codes``."""
    spec = plan.spec
    y = dz._numeric(df[spec.response], "response")
    cols, names, _ = dz._fixed_columns(spec, df, plan.fixed_levels, as_list=True)
    if tuple(names) != plan.names:
        raise DataError("the fixed-effects columns of a batch differ from the first pass's "
                        f"({', '.join(names)} against {', '.join(plan.names)}): the source changed between passes")
    W = np.empty((len(y), len(cols) + 1), order="F")  # [X y], column-major
    for j, c in enumerate(cols):
        W[:, j] = c
    W[:, -1] = y
    X = W[:, :-1]
    dz._check_magnitude(X, names, "fixed-effect column")
    Z = []
    for cols in plan.colnames:
        Zf = np.array([dz.random_column(spec, df, c) for c in cols]).T  # column-major, as X
        dz._check_magnitude(Zf, list(cols), "random-effects covariate")
        Z.append(Zf)
    w = None
    sum_log_w = 0.0
    if plan.weights is not None:
        w = dz._numeric(df[plan.weights], "weights")
        if np.any(w <= 0):
            raise DataError(f"weights {plan.weights!r} must be positive; {int(np.sum(w <= 0))} are not")
        sum_log_w = float(np.sum(np.log(w)))
    if plan.accumulate is None:
        cp = accumulate(W, codes, Z, n_levels, blocks, w, same=plan.same)
    else:
        cp = plan.accumulate(W, codes, Z, n_levels, blocks, w)
    n = len(y)
    mean = float(np.mean(y)) if n else 0.0
    x_rd = None
    if plan.overparameterised:
        x_rd = X.T @ dz._fixed_columns(spec, df, plan.fixed_levels, all_levels=True)[0]
    return Sums(cp=cp._replace(n=n), gram=None if w is None else W.T @ W, zz=tuple(Zf.T @ Zf for Zf in Z),
                y_min=float(np.min(y)) if n else np.inf, y_max=float(np.max(y)) if n else -np.inf,
                y_first=float(y[0]) if n else np.nan, y_stats=(n, mean, float(np.sum((y - mean) ** 2))),
                y_big=float(np.max(np.abs(y))) if n else 0.0, sum_log_w=sum_log_w, x_rd=x_rd)


def _merge_moments(a, b):
    na, ma, m2a = a
    nb, mb, m2b = b
    n = na + nb
    if n == 0:
        return a
    d = mb - ma
    return n, ma + d * nb / n, m2a + m2b + d * d * na * nb / n


def add_sums(a: Sums, b: Sums) -> Sums:
    return Sums(cp=add(a.cp, b.cp), gram=None if a.gram is None else a.gram + b.gram,
                zz=tuple(x + y for x, y in zip(a.zz, b.zz)), y_min=min(a.y_min, b.y_min),
                y_max=max(a.y_max, b.y_max), y_first=a.y_first if a.y_stats[0] else b.y_first,
                y_stats=_merge_moments(a.y_stats, b.y_stats), y_big=max(a.y_big, b.y_big),
                sum_log_w=a.sum_log_w + b.sum_log_w, x_rd=None if a.x_rd is None else a.x_rd + b.x_rd)


# ---------------------------------------------------------------------------------------------
# one pass, when the schema needs none: one grouping factor, no categorical fixed effects


@dataclass
class Part:
    """One pass's sums over a set of rows: Sums over the levels seen there (``levels``, in the
    order of first appearance), with their counts."""

    sums: Sums
    levels: pd.Index
    counts: np.ndarray
    present: dict
    n_rows: int


def one_pass_batch(plan: Plan, df: pd.DataFrame) -> Part:
    """Pass 1 and 2 at once over one batch (:func:`design_from_source`, one grouping factor and
    no categorical fixed effects: the levels are only needed to label the sums, so each batch
    labels its own and :func:`add_parts` aligns them)."""
    present, full = _complete_rows(plan.spec, plan.variables, df)
    group = plan.groups[0]
    if len(group) == 1 and not isinstance(full[group[0]].dtype, pd.CategoricalDtype):
        codes, uniq = pd.factorize(full[group[0]], sort=False)
        uniq = pd.Index(uniq, name=group[0])
    else:
        codes, uniq = dz._group_codes(full, group)
    codes = codes.astype(np.int64)
    from jaxmixed.data.crossprod import BlockIndex

    sums = _sums(plan, full, [codes], [len(uniq)], BlockIndex((), (), (), ()))
    return Part(sums, uniq, np.bincount(codes, minlength=len(uniq)), present, len(df))


def _placed(sums: Sums, idx, L: int) -> Sums:
    """``sums`` with its per-level arrays placed at rows ``idx`` of ``L`` levels."""
    def put(a):
        out = np.zeros((L,) + a.shape[1:])
        out[idx] = a
        return out

    return replace(sums, cp=sums.cp._replace(D11=put(sums.cp.D11), Z1W=put(sums.cp.Z1W)))


def add_parts(a: Part, b: Part) -> Part:
    """a + b, levels aligned (b's rows added into a's arrays, which are enlarged when b brings
    new levels: ``a`` is an intermediate sum and is updated in place)."""
    new = ~b.levels.isin(a.levels)
    union = a.levels.append(b.levels[new]) if new.any() else a.levels
    L = len(union)
    sa = a.sums if L == len(a.levels) else _placed(a.sums, np.arange(len(a.levels)), L)
    counts = a.counts
    if L > len(counts):
        counts = np.zeros(L, dtype=np.int64)
        counts[:len(a.counts)] = a.counts
    idx = union.get_indexer(b.levels)
    sa.cp.D11[idx] += b.sums.cp.D11  # (idx has no repeats: a fancy-indexed add is exact)
    sa.cp.Z1W[idx] += b.sums.cp.Z1W
    counts[idx] += b.counts
    rest = replace(b.sums, cp=b.sums.cp._replace(D11=0.0, Z1W=0.0))
    total = add_sums(replace(sa, cp=sa.cp._replace(D11=0.0, Z1W=0.0)), rest)
    total = replace(total, cp=total.cp._replace(D11=sa.cp.D11, Z1W=sa.cp.Z1W))
    return Part(total, union, counts, {v: a.present[v] + b.present[v] for v in a.present}, a.n_rows + b.n_rows)


def _one_pass_eligible(spec: ModelSpec, cats) -> bool:
    groups = dz.groupings(spec)
    return (len(groups) == 1 and bool(groups[0]) and not cats
            and all(lev.group == groups[0] for lev in spec.levels))


# ---------------------------------------------------------------------------------------------
# the driver


def _refuse_expressions(spec: ModelSpec) -> None:
    if spec.options.get("fixed_formula") or spec.options.get("random_expressions"):
        raise ModelError("a formula with expressions (I(), poly(), scale(), log(), …) needs the data in memory: "
                         "on a streamed source write the model with plain columns (compute the transformed "
                         "columns when the files are written), or read the data with pandas")


def _fixed_levels(spec: ModelSpec, scan: Scan, proto: pd.DataFrame) -> dict:
    """The categorical fixed effects' levels and base levels as _fixed_columns chooses them."""
    known: dict = {}
    for f in (f for t in spec.fixed for f in t.factors):
        if f.var not in scan.cat_counts or f.var in known:
            continue
        counts = scan.cat_counts[f.var]
        counts = counts[counts > 0]
        levels = dz.levels_of(np.asarray(counts.index, dtype=object), proto[f.var].dtype)
        known[f.var] = levels
        known[("base", f.var)] = dz.base_level(f, levels, lambda lv, c=counts: int(c.get(lv, 0)))
    return known


def _categoricals(spec: ModelSpec, proto: pd.DataFrame) -> tuple:
    return tuple(dict.fromkeys(f.var for t in spec.fixed for f in t.factors if dz._is_categorical(f, proto)))


def scan(spec: ModelSpec, source, variables, cats: tuple, *, progress: bool = False) -> Scan:
    """Pass 1 over ``source`` (a :class:`~jaxmixed.data.sources.Source`); ``cats``: the
    categorical fixed-effects variables (:func:`_categoricals`)."""
    gvars = tuple(grouping_variables(spec))
    func = partial(scan_batch, spec, tuple(variables), gvars, cats)
    return source.map_reduce(func, variables, add_scans, progress=progress, desc="pass 1/2: schema")


def design_from_source(spec: ModelSpec, source, *, weights: str | None = None, accumulate_fn=None,
                       progress: bool = False):
    """(StreamedDesign, Pattern, CrossProducts, ½ Σ log w) of ``spec`` on a streamed ``source``:
    the two passes and :func:`finish`. ``weights``: the name of a prior-weights column."""
    _refuse_expressions(spec)
    if not spec.random:
        raise ModelError("the model has no random-effects term; add one such as (1|g) or || g:")
    if weights is not None and not isinstance(weights, str):
        raise DataError("on a streamed source, weights= must be the name of a column of the source")
    variables = list(dict.fromkeys(list(spec.variables) + list(spec.options.get("aux_variables", ()))
                                   + ([weights] if weights else [])))
    source.check_columns(variables)
    proto = source.prototype(variables)
    cats = _categoricals(spec, proto)
    if _one_pass_eligible(spec, cats) and accumulate_fn is None:
        return _design_in_one_pass(spec, source, variables, weights, proto, progress)
    s1 = scan(spec, source, variables, cats, progress=progress)
    dz.check_present(spec, s1.present, s1.n_complete)
    n_dropped = s1.n_rows - s1.n_complete
    combos = compact_combos(s1.combos)
    groups = dz.groupings(spec)
    codes_of, levels_of = {}, {}
    for g in groups:
        codes_of[g], levels_of[g] = dz._group_codes(combos, g)
        dz.check_grouping(g, len(levels_of[g]))
    cols_of, placed = _term_columns(spec, groups)  # random-effects columns of each factor block
    eng_groups = [groups[k] for k in dz.engine_order([len(levels_of[g]) for g in groups])]
    pseudo = SimpleNamespace(factors=[SimpleNamespace(codes=codes_of[g], n_levels=len(levels_of[g]),
                                                      q=len(cols_of[g])) for g in eng_groups])
    pattern = build_pattern(pseudo)
    fixed_levels = _fixed_levels(spec, s1, proto)
    col_keys: list = []
    _, names, _ = dz._fixed_columns(spec, proto, fixed_levels, keys=col_keys)
    plan = Plan(spec=spec, variables=tuple(variables), weights=weights, fixed_levels=fixed_levels,
                names=tuple(names), groups=tuple(eng_groups), levels=tuple(_as_range(levels_of[g]) for g in eng_groups),
                colnames=tuple(tuple(cols_of[g]) for g in eng_groups), pattern=pattern, accumulate=accumulate_fn,
                overparameterised=bool(col_keys) and bool(cats) and len(names) <= MAX_TYPE3_COLUMNS,
                same=tuple(identical_columns(cols_of[g], names) for g in eng_groups))
    s2 = source.map_reduce(partial(cross_batch, plan), variables, add_sums, progress=progress,
                           desc="pass 2/2: cross-products")
    if s2.y_stats[0] != s1.n_complete:
        raise DataError(f"the source changed between the two passes ({s1.n_complete} complete rows, then "
                        f"{s2.y_stats[0]})")
    index = {g: i for i, g in enumerate(eng_groups)}
    terms, n_theta = dz.place_terms(index, placed)
    counts = [np.bincount(codes_of[g], weights=combos[COUNT].to_numpy(dtype=float),
                          minlength=len(levels_of[g])).astype(np.int64) for g in eng_groups]
    factors = tuple(StreamedFactor(group=g, n_levels=len(levels_of[g]), colnames=tuple(cols_of[g]),
                                   levels=levels_of[g], counts=c) for g, c in zip(eng_groups, counts))
    summary = dz._summary(spec, combos, weights=combos[COUNT].to_numpy(dtype=float))
    design, cp = finish(spec, s2, names, col_keys, fixed_levels, factors, terms, n_theta, summary, n_dropped,
                        proto, source.kind)
    return design, pattern, cp, 0.5 * s2.sum_log_w


def _term_columns(spec: ModelSpec, groups):
    """(each grouping's random-effects columns, (term, first, stop) per term)."""
    cols_of = {g: [] for g in groups}
    placed = []
    for t in spec.random:
        start = len(cols_of[t.group])
        cols_of[t.group].extend(t.columns)
        placed.append((t, start, len(cols_of[t.group])))
    return cols_of, placed


def _design_in_one_pass(spec: ModelSpec, source, variables, weights, proto, progress):
    """design_from_source for one grouping factor and no categorical fixed effects: a single
    pass (:func:`one_pass_batch`), the levels sorted at the end as in memory."""
    (g,) = dz.groupings(spec)
    cols_of, placed = _term_columns(spec, [g])
    col_keys: list = []
    _, names, _ = dz._fixed_columns(spec, proto, {}, keys=col_keys)
    plan = Plan(spec=spec, variables=tuple(variables), weights=weights, fixed_levels={}, names=tuple(names),
                groups=(g,), levels=(None,), colnames=(tuple(cols_of[g]),), pattern=None,
                overparameterised=False, same=(identical_columns(cols_of[g], names),))
    part = source.map_reduce(partial(one_pass_batch, plan), variables, add_parts, progress=progress,
                             desc="one pass: cross-products")
    n = int(part.sums.y_stats[0])
    dz.check_present(spec, part.present, n)
    frame = (part.levels.to_frame(index=False) if isinstance(part.levels, pd.MultiIndex)
             else pd.DataFrame({g[0]: part.levels}))
    pos, levels = dz._group_codes(frame, g)  # pos[i]: the sorted position of level i
    dz.check_grouping(g, len(levels))
    s2 = _placed(part.sums, pos, len(levels))
    counts = np.zeros(len(levels), dtype=np.int64)
    counts[pos] = part.counts
    sorted_frame = frame.iloc[np.argsort(pos)].reset_index(drop=True)
    summary = dz._summary(spec, sorted_frame, weights=counts.astype(float))
    terms, n_theta = dz.place_terms({g: 0}, placed)
    factors = (StreamedFactor(group=g, n_levels=len(levels), colnames=tuple(cols_of[g]), levels=levels,
                              counts=counts),)
    pattern = build_pattern(SimpleNamespace(factors=[SimpleNamespace(codes=np.arange(len(levels)),
                                                                     n_levels=len(levels), q=len(cols_of[g]))]))
    design, cp = finish(spec, s2, names, col_keys, {}, factors, terms, n_theta, summary, part.n_rows - n, proto,
                        source.kind)
    return design, pattern, cp, 0.5 * s2.sum_log_w


def _as_range(levels: pd.Index) -> pd.Index:
    """Integer levels that are consecutive as a RangeIndex (codes by subtraction in pass 2)."""
    if len(levels) and not isinstance(levels, pd.MultiIndex) and levels.dtype.kind in "iu":
        v = levels.to_numpy()
        if v[-1] - v[0] == len(v) - 1 and np.all(np.diff(v) == 1):
            return pd.RangeIndex(int(v[0]), int(v[-1]) + 1, name=levels.name)
    return levels


def finish(spec, s2: Sums, names, col_keys, fixed_levels, factors, terms, n_theta, summary, n_dropped, proto,
           what: str):
    """The StreamedDesign and its cross-products (in the basis X̃) from pass 2's sums."""
    cp = s2.cp
    n = int(s2.y_stats[0])
    p_all = len(names)
    G = cp.WW if s2.gram is None else s2.gram  # unweighted [X y]ᵀ[X y]
    keep, xnames, omitted = dz.drop_collinear_gram(G[:p_all, :p_all], names, n)
    if spec.syntax:
        dz.check_fixed_count(n, n_dropped, xnames, fixed_levels, omitted)
    if omitted:
        warn(f"{', '.join(omitted)} omitted because of collinearity")
    p = len(keep)
    GX = G[np.ix_(keep, keep)]
    try:
        R0 = np.linalg.cholesky(GX).T if p else np.zeros((0, 0))
    except np.linalg.LinAlgError:
        raise DataError(f"the fixed-effects columns ({dz._short(xnames)}) are numerically collinear") from None
    R0_inv = np.linalg.solve(R0, np.eye(p)) if p else np.zeros((0, 0))
    logdet = float(2.0 * np.sum(np.log(np.diag(R0)))) if p else 0.0
    # the response's checks, from its moments and the residual of its projection on X
    m2 = s2.y_stats[2]
    std = np.sqrt(m2 / n) if n else 0.0
    yy = float(G[p_all, p_all])
    r = np.linalg.solve(R0.T, G[keep, p_all]) if p else np.zeros(0)
    resid_rms = np.sqrt(max(yy - float(r @ r), 0.0) / n)
    bad = {"large": not s2.y_big <= dz.MAX_ABS, "constant": s2.y_min == s2.y_max,
           "small": bool(np.sqrt(yy / n) < dz.MIN_RESPONSE_RMS), "exact": False}
    bad["small"] = bad["small"] and not bad["constant"]
    bad["exact"] = bool(0 < p < n and not bad["constant"] and not bad["large"]
                        and resid_rms <= 1e-10 * std + 1e-13 * s2.y_big + 1e-7 * np.sqrt(yy / n))
    if not spec.options.get("glmm"):
        dz.raise_response_problem(bad, spec.response, n, s2.y_first, lambda: float(np.sqrt(yy / n)), s2.y_big,
                                  xnames)
    for t in terms:
        zz = s2.zz[t.factor][t.cols[0]:t.cols[1], t.cols[0]:t.cols[1]]
        dz.check_term_size(t.term, factors[t.factor].n_levels, n)
        _, kept, dependent = dz.drop_collinear_gram(zz, list(t.term.columns), n)
        dz.check_term_columns(t.term, kept, dependent)
    # the cross-products in the basis X̃ = X R₀⁻¹ (columns keep, then y)
    sel = list(keep) + [p_all]
    T = np.zeros((p + 1, p + 1))
    T[:p, :p] = R0_inv
    T[p, p] = 1.0

    def right(a):
        return a[..., sel] @ T

    cpt = CrossProducts(n=float(n), WW=T.T @ cp.WW[np.ix_(sel, sel)] @ T, D11=cp.D11, Z1W=right(cp.Z1W),
                        Z2W=tuple(right(z) for z in cp.Z2W), D22=cp.D22, A21=cp.A21, X22=cp.X22)
    fixed_terms = None
    if col_keys:
        key_of = dict(zip(names, col_keys))
        rd_keys: list = []
        _, rd_names, _ = dz._fixed_columns(spec, proto, fixed_levels, all_levels=True, keys=rd_keys)
        sums = None
        if s2.x_rd is not None:
            sums = (GX, s2.x_rd[keep], rd_keys)
        elif set(rd_names) <= set(names):  # no categorical variable: rdX's columns are X's own
            sums = (GX, G[np.ix_(keep, [names.index(nm) for nm in rd_names])], rd_keys)
        fixed_terms = dz._fixed_terms(spec, proto, None, xnames, [key_of[nm] for nm in xnames], sums)
    mean_sq = [np.diag(z) / n for z in s2.zz]
    scale = dz._theta_scale(terms, lambda t: mean_sq[t.factor][t.cols[0]:t.cols[1]])
    design = StreamedDesign(xnames=tuple(xnames), factors=factors, terms=terms, n_theta=n_theta,
                            group_summary=summary, n_dropped=n_dropped, omitted=omitted, response=spec.response,
                            fixed_levels=fixed_levels, fixed_basis=(None, R0_inv, logdet), theta_scale=scale,
                            n_obs=n, source=what, fixed_terms=fixed_terms)
    return design, cpt


def check_streamable(spec: ModelSpec, residuals=None, dfmethod=None) -> None:
    """What a streamed fit cannot do, as a ModelError that says what to do instead."""
    if residuals is not None and not getattr(residuals, "is_default", False):
        raise ModelError("residual structures (residuals=) need the panels' rows in memory: fit a pandas "
                         "DataFrame (e.g. pd.read_parquet(...)) or a sample of the source")
    if dfmethod in ("residual", "repeated", "anova"):
        raise ModelError(f"dfmethod={dfmethod!r} counts ranks of the rows' design; on a streamed source use "
                         "dfmethod='satterthwaite' or 'kroger' (computed from the cross-products)")

