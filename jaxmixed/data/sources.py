"""Where rows come from when they are not a pandas DataFrame in memory: files, Arrow, polars, Dask.

A *source* hands the model's columns to a function batch by batch and adds up what the function
returns (:meth:`Source.map_reduce`); the streamed fit (:mod:`jaxmixed.data.streaming`) makes two
such passes, one for the schema and one for the cross-products. Nothing here knows about models.

- a path, a glob (``"ratings/*.parquet"``) or a list of paths of Parquet, CSV or Arrow IPC
  files, and a ``pyarrow.dataset.Dataset``: read with ``pyarrow.dataset`` in record batches,
  only the requested columns (column projection);
- a ``pyarrow.Table`` or a polars DataFrame (zero-copy to Arrow; a LazyFrame is collected):
  batches of the table;
- a Dask DataFrame: the function runs on each partition where the partition lives (the user's
  ``distributed.Client`` when one is active, Dask's default scheduler otherwise), the partial
  results are added in a tree on the cluster and only the sum comes back. jaxmixed starts no
  cluster and ships no cluster code (as ``xgboost.dask`` and ``lightgbm.dask``).

Each batch reaches the function as a pandas DataFrame: numeric Arrow columns without nulls are
wrapped without a copy, others go through Arrow's pandas conversion (nulls become NaN/None).
"""

from __future__ import annotations

import glob as _glob
import os
from functools import reduce

import numpy as np
import pandas as pd

from jaxmixed.errors import DataError

#: rows per record batch read from files and tables
BATCH_ROWS = 1 << 18
#: record batches Arrow decodes ahead of the one being processed
READAHEAD = 4

_FORMATS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".arrow": "ipc", ".feather": "ipc",
            ".ipc": "ipc"}


def is_source(data) -> bool:
    """Whether ``data`` is something :func:`open_source` reads (anything but a pandas frame)."""
    if isinstance(data, pd.DataFrame):
        return False
    if isinstance(data, (Source, str, os.PathLike)):
        return True
    if isinstance(data, (list, tuple)) and data and all(isinstance(p, (str, os.PathLike)) for p in data):
        return True
    mod = type(data).__module__ or ""
    return mod.split(".")[0] in ("pyarrow", "polars", "dask")


def _arrow():
    try:
        import pyarrow
        import pyarrow.dataset
    except ImportError:  # pragma: no cover - pyarrow is a dependency
        raise DataError("reading files, Arrow tables and polars frames needs pyarrow (pip install pyarrow)") \
            from None
    return pyarrow


def _paths(data) -> list[str]:
    items = [data] if isinstance(data, (str, os.PathLike)) else list(data)
    out: list[str] = []
    for item in items:
        text = os.fspath(item)
        if any(ch in text for ch in "*?["):
            found = sorted(_glob.glob(text))
            if not found:
                raise DataError(f"no file matches {text!r}")
            out.extend(found)
        elif os.path.isdir(text):
            out.append(text)
        elif os.path.exists(text):
            out.append(text)
        else:
            raise DataError(f"data file {text!r} does not exist")
    return out


def _format_of(paths: list[str]) -> str:
    kinds = set()
    for p in paths:
        if os.path.isdir(p):
            kinds.add("parquet")  # a directory: a (possibly partitioned) Parquet dataset
            continue
        ext = os.path.splitext(p)[1].lower()
        if ext not in _FORMATS:
            raise DataError(f"data file {p!r}: unknown format {ext or '(no extension)'!r}; "
                            f"give .parquet, .csv or .arrow/.feather files")
        kinds.add(_FORMATS[ext])
    if len(kinds) > 1:
        raise DataError(f"the data files mix formats ({', '.join(sorted(kinds))}); give files of one format")
    return kinds.pop()


def _frame(batch) -> pd.DataFrame:
    """A record batch as a pandas DataFrame, numeric columns without nulls wrapped without a copy."""
    import pyarrow as pa

    cols = {}
    for name, col in zip(batch.schema.names, batch.columns):
        t = col.type
        if col.null_count == 0 and (pa.types.is_floating(t) or pa.types.is_integer(t)):
            cols[name] = col.to_numpy(zero_copy_only=False)
        else:
            cols[name] = col.to_pandas()
    return pd.DataFrame(cols, copy=False)


class Source:
    """Rows that are streamed: ``columns`` (their names), ``kind`` (for messages and reports),
    ``map_reduce(func, columns, combine)``: Σ func(batch) over batches holding ``columns``."""

    kind = "source"
    columns: tuple = ()
    n_rows: int | None = None

    def check_columns(self, needed) -> None:
        missing = [c for c in needed if c not in self.columns]
        if missing:
            import difflib

            v = missing[0]
            close = difflib.get_close_matches(v, [str(c) for c in self.columns], n=3)
            hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise DataError(f"variable {v!r} is not a column of the data ({self.kind}){hint}")

    def map_reduce(self, func, columns, combine, *, progress: bool = False, desc: str = ""):
        raise NotImplementedError

    def prototype(self, columns) -> pd.DataFrame:
        """A DataFrame with no rows and the pandas types the batches' ``columns`` will have."""
        raise NotImplementedError

    def batches(self, columns, *, progress: bool = False, desc: str = ""):
        """The batches themselves, in order (for writing predictions batch by batch)."""
        raise NotImplementedError


class ArrowSource(Source):
    """A ``pyarrow.dataset.Dataset`` (files, or a Table wrapped as one), read batch by batch."""

    def __init__(self, dataset, kind: str, batch_rows: int | None = None):
        self.dataset = dataset
        self.kind = kind
        self.columns = tuple(dataset.schema.names)
        self.batch_rows = int(batch_rows or BATCH_ROWS)
        self._n_rows = None

    def prototype(self, columns) -> pd.DataFrame:
        import pyarrow as pa

        schema = pa.schema([self.dataset.schema.field(c) for c in columns])
        return schema.empty_table().to_pandas()

    @property
    def n_rows(self) -> int:
        if self._n_rows is None:
            self._n_rows = int(self.dataset.count_rows())
        return self._n_rows

    def batches(self, columns, *, progress: bool = False, desc: str = ""):
        import pyarrow as pa

        bar = _bar(progress, self.n_rows if progress else None, desc)
        try:
            # readahead bounded (Arrow's defaults, 16 batches of 4 files, hold ~1 GB when the
            # batches are consumed more slowly than they are decoded)
            for batch in self.dataset.to_batches(columns=list(columns), batch_size=self.batch_rows,
                                                 batch_readahead=READAHEAD, fragment_readahead=1):
                if batch.num_rows == 0:
                    continue
                yield _frame(batch)
                if bar is not None:
                    bar.update(batch.num_rows)
        except (pa.ArrowInvalid, pa.ArrowTypeError, OSError) as exc:  # (Arrow's reading errors, as ours)
            raise DataError(f"reading the {self.kind}: {str(exc).splitlines()[0]}") from None
        finally:
            if bar is not None:
                bar.close()

    def map_reduce(self, func, columns, combine, *, progress: bool = False, desc: str = ""):
        """Σ func(batch), the batches read by Arrow's own threads and processed by ``threads()``
        threads (numpy's segment sums release the GIL), at most that many in flight (memory: a
        few batches), added in the order of the batches (the result does not depend on timing)."""
        from collections import deque
        from concurrent.futures import ThreadPoolExecutor

        total = None
        workers = threads()

        def take(part):
            nonlocal total
            total = part if total is None else combine(total, part)

        pending: deque = deque()
        with ThreadPoolExecutor(workers, thread_name_prefix="jaxmixed-batch") as pool:
            try:
                for frame in self.batches(columns, progress=progress, desc=desc):
                    pending.append(pool.submit(func, frame))
                    while len(pending) > workers:
                        take(pending.popleft().result())
                while pending:
                    take(pending.popleft().result())
            finally:
                for fut in pending:
                    fut.cancel()
        if total is None:
            raise DataError(f"the {self.kind} has no rows")
        return total


class DaskSource(Source):
    """A Dask DataFrame: ``func`` runs on every partition (on the cluster), partial results are
    added pairwise on the cluster (a tree of ``combine`` tasks) and the sum is computed."""

    kind = "Dask DataFrame"

    def __init__(self, ddf, batch_rows: int | None = None):
        self.ddf = ddf
        self.columns = tuple(ddf.columns)
        self.batch_rows = int(batch_rows or BATCH_ROWS)

    def map_reduce(self, func, columns, combine, *, progress: bool = False, desc: str = ""):
        import dask

        parts = self.ddf[list(columns)].to_delayed()
        if not parts:
            raise DataError("the Dask DataFrame has no partitions")
        task = dask.delayed(_in_batches, pure=True)
        level = [task(p, func, combine, self.batch_rows) for p in parts]
        add = dask.delayed(_combine_some, pure=True)
        while len(level) > 1:  # a tree of additions, 8 at a time, on the workers
            level = [add(combine, *level[i:i + 8]) for i in range(0, len(level), 8)]
        if progress:
            try:
                from distributed import get_client, progress as dprogress

                fut = get_client().compute(level[0])
                dprogress(fut)
                out = fut.result()
            except (ImportError, ValueError):
                (out,) = dask.compute(level[0])
        else:
            (out,) = dask.compute(level[0])
        if out is None:
            raise DataError("the Dask DataFrame has no rows")
        return out

    def prototype(self, columns) -> pd.DataFrame:
        return self.ddf[list(columns)]._meta.iloc[:0]

    def batches(self, columns, *, progress: bool = False, desc: str = ""):
        for part in self.ddf[list(columns)].to_delayed():
            frame = part.compute()
            for a in range(0, len(frame), self.batch_rows):
                yield frame.iloc[a:a + self.batch_rows].reset_index(drop=True)


def threads() -> int:
    """Threads that process batches of a local source: the machine's cores, at most 4."""
    return max(1, min(4, os.cpu_count() or 1))


class ProcessLocalSource(Source):
    """The rows of one process of a ``jax.distributed`` run (``jm.source(..., process_local=True)``):
    each process reads its own part of the data (its own files) and the partial results of
    every pass are exchanged between the processes (:func:`allgather_objects`: model-sized
    bytes, never rows) and added in process order, so that every
    process ends with the same sums and fits the same model. The collectives are JAX's."""

    def __init__(self, inner: Source):
        self.inner = inner
        self.kind = f"{inner.kind} (process-local)"
        self.columns = inner.columns

    def prototype(self, columns) -> pd.DataFrame:
        return self.inner.prototype(columns)

    def batches(self, columns, *, progress: bool = False, desc: str = ""):
        return self.inner.batches(columns, progress=progress, desc=desc)

    def map_reduce(self, func, columns, combine, *, progress: bool = False, desc: str = ""):
        try:
            local = self.inner.map_reduce(func, columns, combine, progress=progress, desc=desc)
        except DataError as exc:
            if "has no rows" not in str(exc):
                raise
            local = None  # (this process holds no rows: the others may)
        parts = [p for p in allgather_objects(local) if p is not None]
        if not parts:
            raise DataError(f"no process of the jax.distributed run has rows in its {self.inner.kind}")
        return reduce(combine, parts)


def allgather_objects(obj) -> list:
    """Every process's partial result ``obj``, in process order (one process: ``[obj]``):
    encoded without pickle (:mod:`jaxmixed.data.exchange`), exchanged as uint8 arrays by
    ``multihost_utils.process_allgather`` (padded to the longest)."""
    import jax

    if jax.process_count() == 1:
        return [obj]
    from jax.experimental import multihost_utils

    from jaxmixed.data import exchange

    data = np.frombuffer(b"" if obj is None else exchange.encode(obj), dtype=np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.array([data.size], dtype=np.int64))).reshape(-1)
    padded = np.zeros(int(sizes.max()), dtype=np.uint8)
    padded[:data.size] = data
    every = np.asarray(multihost_utils.process_allgather(padded))
    return [exchange.decode(every[k, :int(sizes[k])].tobytes()) if sizes[k] else None for k in range(len(sizes))]


def _in_batches(frame: pd.DataFrame, func, combine, batch_rows: int):
    """func over a partition in pieces of ``batch_rows`` rows (bounded temporaries), added."""
    total = None
    for a in range(0, len(frame), batch_rows):
        part = func(frame.iloc[a:a + batch_rows].reset_index(drop=True))
        total = part if total is None else combine(total, part)
    return total


def _combine_some(combine, *parts):
    """combine over the parts, starting from a copy of the first (``combine`` may update its
    first argument in place, and a Dask task must not change its inputs: it can be rerun)."""
    import copy

    parts = [p for p in parts if p is not None]
    return reduce(combine, parts[1:], copy.deepcopy(parts[0])) if parts else None


def _bar(progress: bool, total, desc: str):
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc or "rows", unit=" rows", unit_scale=True, leave=False, delay=0.5)


def open_source(data, *, batch_rows: int | None = None, process_local: bool = False) -> Source:
    """A :class:`Source` for ``data``: path(s) or glob(s), a pyarrow Dataset or Table, a polars
    DataFrame or LazyFrame, or a Dask DataFrame (``jm.source``). ``batch_rows``: rows per
    record batch (default BATCH_ROWS; a Dask partition is processed in pieces of that many
    rows). ``process_local``: in a ``jax.distributed`` run, ``data`` is this process's own part
    of the rows (:class:`ProcessLocalSource`). Raises DataError for anything else."""
    if process_local:
        inner = open_source(data, batch_rows=batch_rows)
        if isinstance(inner, DaskSource):
            raise DataError("process_local=True is for files and tables each process reads itself; a Dask "
                            "DataFrame is already spread over its cluster")
        return inner if isinstance(inner, ProcessLocalSource) else ProcessLocalSource(inner)
    if isinstance(data, Source):
        return data
    if batch_rows is not None and (not isinstance(batch_rows, (int, np.integer)) or batch_rows < 1):
        raise DataError(f"batch_rows must be a positive integer, not {batch_rows!r}")
    mod = (type(data).__module__ or "").split(".")[0]
    if isinstance(data, (str, os.PathLike)) or isinstance(data, (list, tuple)):
        pa = _arrow()
        paths = _paths(data)
        fmt = _format_of(paths)
        try:
            dataset = pa.dataset.dataset(paths if len(paths) > 1 else paths[0], format=fmt)
        except (pa.ArrowInvalid, OSError) as exc:
            raise DataError(f"cannot read {paths[0]!r}{' …' if len(paths) > 1 else ''} as {fmt}: "
                            f"{str(exc).splitlines()[0]}") from None
        what = f"{fmt} file{'s' if len(paths) > 1 else ''}"
        return ArrowSource(dataset, what, batch_rows)
    if mod == "pyarrow":
        pa = _arrow()
        if isinstance(data, pa.dataset.Dataset):
            return ArrowSource(data, "pyarrow Dataset", batch_rows)
        if isinstance(data, pa.RecordBatch):
            data = pa.Table.from_batches([data])
        if isinstance(data, pa.Table):
            return ArrowSource(pa.dataset.dataset(data), "pyarrow Table", batch_rows)
    if mod == "polars":
        import polars as pl

        if isinstance(data, pl.LazyFrame):
            data = data.collect()
        if isinstance(data, pl.DataFrame):
            pa = _arrow()
            return ArrowSource(pa.dataset.dataset(data.to_arrow()), "polars DataFrame", batch_rows)
    if mod == "dask":
        import dask.dataframe as dd

        if isinstance(data, dd.DataFrame):
            return DaskSource(data, batch_rows)
    raise DataError(f"data must be a pandas DataFrame, a path or glob of Parquet/CSV/Arrow files, a pyarrow "
                    f"Dataset or Table, a polars DataFrame or a Dask DataFrame, not {type(data).__name__}")

