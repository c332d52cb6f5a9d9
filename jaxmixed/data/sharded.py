"""Cross-products of rows sharded over several JAX devices (``jm.fit(..., devices=...)``).

The rows of a batch are split over the devices of a one-axis mesh (``jax.sharding.Mesh``,
axis "rows"); each device forms the cross-products of its rows with the in-memory path's own
:func:`~jaxmixed.data.crossprod.accumulate` (``xp=jax.numpy``: segment sums), and ``psum``
over the axis adds them (``jax.shard_map``), so every device ends with the total. Rows are
padded with zeros to a bucketed size (a power of two, a multiple of the number of devices):
a padded row has W = 0 and Z = 0 and adds nothing, and one compiled program serves every
batch of a data set. The level codes and pattern blocks are computed on the host (numpy), as
for one device. JAX's own sharding does the placement and the reduction: across the devices of
one host here, and across hosts when the process runs under ``jax.distributed`` with a mesh of
``jax.devices()`` (every process then passes its own rows).
"""

from __future__ import annotations

import numpy as np

from jaxmixed.data.crossprod import BlockIndex, CrossProducts, accumulate
from jaxmixed.errors import ModelError

MIN_ROWS = 1024  # smallest bucket of rows per device


def _bucket(n: int, k: int) -> int:
    per = max(MIN_ROWS, 1 << int(np.ceil(np.log2(max(1, -(-n // k))))))
    return per * k


class ShardedAccumulator:
    """``accumulate`` with the rows sharded over ``devices`` (see the module docstring); called
    with numpy arrays, returns numpy cross-products."""

    def __init__(self, devices):
        import jax

        devices = list(devices)
        if not devices or not all(isinstance(d, jax.Device) for d in devices):
            raise ModelError("devices must be a non-empty list of jax.Device objects, e.g. jax.devices()")
        self.devices = tuple(devices)
        self.mesh = jax.sharding.Mesh(np.array(devices, dtype=object), ("rows",))
        self._programs: dict = {}

    def __reduce__(self):  # (a device list does not travel to Dask workers)
        raise ModelError("devices= shards rows over this process's JAX devices; it cannot be combined with a "
                         "Dask DataFrame (Dask's workers form the partial cross-products)")

    def _program(self, key):
        import jax
        import jax.numpy as jnp
        from jax.sharding import PartitionSpec as P

        if key in self._programs:
            return self._programs[key]
        n_levels, n_a21, n_x22, weighted = key

        def local(W, codes, Z, a21, x22, w):
            cp = accumulate(W, list(codes), list(Z), n_levels, BlockIndex(tuple(a21), tuple(x22), n_a21, n_x22),
                            w if weighted else None, xp=jnp)
            return jax.lax.psum(cp._replace(n=jnp.zeros(())), "rows")

        fn = jax.jit(jax.shard_map(local, mesh=self.mesh, in_specs=P("rows"), out_specs=P()))
        self._programs[key] = fn
        return fn

    def __call__(self, W, codes, Z, n_levels, blocks: BlockIndex, weights=None) -> CrossProducts:
        import jax
        from jax.sharding import NamedSharding, PartitionSpec as P

        n = W.shape[0]
        size = _bucket(n, len(self.devices))

        def pad(a, dtype):
            a = np.asarray(a, dtype=dtype)
            out = np.zeros((size,) + a.shape[1:], dtype=dtype)
            out[:n] = a
            return out

        rows = NamedSharding(self.mesh, P("rows"))
        args = (pad(W, float), tuple(pad(c, np.int64) for c in codes), tuple(pad(z, float) for z in Z),
                tuple(pad(b, np.int64) for b in blocks.a21), tuple(pad(b, np.int64) for b in blocks.x22),
                pad(np.ones(n) if weights is None else weights, float))
        args = jax.device_put(args, rows)
        key = (tuple(int(x) for x in n_levels), tuple(blocks.n_a21), tuple(blocks.n_x22), weights is not None)
        out = jax.device_get(self._program(key)(*args))
        return CrossProducts(*(tuple(np.asarray(x) for x in f) if isinstance(f, tuple) else np.asarray(f)
                               for f in out))._replace(n=n)
