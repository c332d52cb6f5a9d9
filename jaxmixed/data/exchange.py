"""Partial sums as bytes, for the processes of a ``jax.distributed`` run to exchange (no pickle).

A streamed pass's partial result (:class:`~jaxmixed.data.streaming.Scan`, ``Sums``, ``Part``) is
made of numbers, numpy arrays, pandas tables and indexes. :func:`encode` writes it as a JSON
header (the structure, every float as its exact hexadecimal form) followed by the raw bytes of
each array and the Arrow IPC stream of each table; :func:`decode` rebuilds it and constructs
only the classes named in ``_CLASSES``. Nothing is executed and no module is imported on the
strength of the bytes (the package never unpickles, as for its compiled programs).
"""

from __future__ import annotations

import dataclasses
import json
import struct

import numpy as np
import pandas as pd

MAGIC = b"JMX1"


def _classes() -> dict:
    from jaxmixed.data.crossprod import CrossProducts
    from jaxmixed.data.streaming import Part, Scan, Sums

    return {"Scan": Scan, "Sums": Sums, "Part": Part, "CrossProducts": CrossProducts}


def _table_bytes(frame: pd.DataFrame) -> bytes:
    import pyarrow as pa

    table = pa.Table.from_pandas(frame, preserve_index=False)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def _table(data: bytes) -> pd.DataFrame:
    import pyarrow as pa

    return pa.ipc.open_stream(pa.py_buffer(data)).read_all().to_pandas()


def encode(obj) -> bytes:
    buffers: list[bytes] = []

    def put(b: bytes) -> int:
        buffers.append(b)
        return len(buffers) - 1

    def enc(x):
        if x is None or isinstance(x, (bool, str)):
            return x
        if isinstance(x, (int, np.integer)):
            return int(x)
        if isinstance(x, (float, np.floating)):
            return {"f": float(x).hex()}
        if isinstance(x, np.ndarray):
            if x.dtype == object:
                raise TypeError("object arrays are not exchanged")
            a = np.ascontiguousarray(x)
            return {"a": put(a.tobytes()), "dtype": a.dtype.str, "shape": list(a.shape)}
        if isinstance(x, pd.DataFrame):
            return {"df": put(_table_bytes(x.reset_index(drop=True)))}
        if isinstance(x, pd.Series):
            frame = pd.DataFrame({"index": x.index, "value": x.to_numpy()})
            return {"s": put(_table_bytes(frame)), "name": enc(x.name), "index_name": enc(x.index.name)}
        if isinstance(x, pd.Index):
            frame = x.to_frame(index=False)
            frame.columns = [f"c{j}" for j in range(frame.shape[1])]
            return {"i": put(_table_bytes(frame)), "multi": isinstance(x, pd.MultiIndex),
                    "names": [enc(nm) for nm in x.names]}
        if dataclasses.is_dataclass(x) and type(x).__name__ in _classes():
            return {"dc": type(x).__name__, "fields": {f.name: enc(getattr(x, f.name)) for f in dataclasses.fields(x)}}
        if isinstance(x, tuple) and type(x).__name__ == "CrossProducts":
            return {"nt": "CrossProducts", "items": [enc(v) for v in x]}
        if isinstance(x, tuple):
            return {"t": [enc(v) for v in x]}
        if isinstance(x, list):
            return [enc(v) for v in x]
        if isinstance(x, dict):
            return {"d": [[enc(k), enc(v)] for k, v in x.items()]}
        raise TypeError(f"cannot exchange a {type(x).__name__}")

    header = json.dumps(enc(obj)).encode()
    sizes = struct.pack(f"<{len(buffers) + 1}Q", len(header), *(len(b) for b in buffers))
    return MAGIC + struct.pack("<Q", len(buffers)) + sizes + header + b"".join(buffers)


def decode(data: bytes):
    if data[:4] != MAGIC:
        raise ValueError("not an exchanged partial result")
    (k,) = struct.unpack_from("<Q", data, 4)
    sizes = struct.unpack_from(f"<{k + 1}Q", data, 12)
    pos = 12 + 8 * (k + 1)
    header = json.loads(data[pos:pos + sizes[0]])
    pos += sizes[0]
    buffers = []
    for size in sizes[1:]:
        buffers.append(data[pos:pos + size])
        pos += size
    classes = _classes()

    def dec(x):
        if isinstance(x, list):
            return [dec(v) for v in x]
        if not isinstance(x, dict):
            return x
        if "f" in x:
            return float.fromhex(x["f"])
        if "a" in x:
            return np.frombuffer(buffers[x["a"]], dtype=np.dtype(x["dtype"])).reshape(x["shape"]).copy()
        if "df" in x:
            return _table(buffers[x["df"]])
        if "s" in x:
            frame = _table(buffers[x["s"]])
            return pd.Series(frame["value"].to_numpy(), index=pd.Index(frame["index"], name=dec(x["index_name"])),
                             name=dec(x["name"]))
        if "i" in x:
            frame = _table(buffers[x["i"]])
            names = [dec(nm) for nm in x["names"]]
            if x["multi"]:
                return pd.MultiIndex.from_frame(frame, names=names)
            return pd.Index(frame.iloc[:, 0].to_numpy(), name=names[0])
        if "dc" in x:
            return classes[x["dc"]](**{name: dec(v) for name, v in x["fields"].items()})
        if "nt" in x:
            return classes[x["nt"]](*[dec(v) for v in x["items"]])
        if "t" in x:
            return tuple(dec(v) for v in x["t"])
        if "d" in x:
            return {(tuple(k) if isinstance(k, list) else dec(k)): dec(v) for k, v in x["d"]}
        raise ValueError(f"unknown entry in an exchanged partial result: {sorted(x)}")

    return dec(header)
