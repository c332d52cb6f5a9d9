"""Where the likelihood programs run: ``device=`` of ``jm.fit`` and ``jm.fit_many``."""

from __future__ import annotations

import jax
import numpy as np

from jaxmixed.errors import ModelError


def host_array(x, dtype=np.float64):
    """``x`` as a JAX array on JAX's default device, uncommitted, as ``jnp.asarray`` gives, but
    without running a program (``jnp.asarray`` of a NumPy array runs a one-operation program per
    shape: 5–15 ms each in a fresh process)."""
    return jax.device_put(np.asarray(x, dtype=dtype))


def resolve_device(device) -> jax.Device | None:
    """A ``jax.Device`` from ``device``: None (JAX's default), a Device, or a string
    ``"cpu"``, ``"gpu"``, ``"cuda"``, ``"rocm"``, ``"tpu"``, optionally with an index
    (``"gpu:1"``). Raises ModelError (a JaxmixedError) when JAX has no such device."""
    if device is None:
        return None
    if isinstance(device, jax.Device):
        return device
    if not isinstance(device, str):
        raise ModelError(f"device must be a jax.Device or a string such as 'cpu' or 'gpu', "
                         f"not {type(device).__name__}")
    text = device.strip().lower()
    platform, _, index = text.partition(":")
    available = ", ".join(f"{d.platform}:{d.id}" for d in jax.devices())
    try:
        idx = int(index) if index else 0
    except ValueError:
        raise ModelError(f"device {device!r}: the index after ':' must be an integer") from None
    try:
        devs = jax.devices(platform)
    except (RuntimeError, ValueError) as exc:
        raise ModelError(f"device {device!r} is not available (JAX sees: {available}); "
                         f"{str(exc).splitlines()[0] if str(exc) else 'unknown backend'}") from None
    if not 0 <= idx < len(devs):
        raise ModelError(f"device {device!r} is not available: JAX has {len(devs)} {platform} "
                         f"device(s) (JAX sees: {available})")
    return devs[idx]


def put(tree, device):
    """``jax.device_put`` onto ``device``; unchanged when no device was chosen or it is JAX's
    default device (where uncommitted arrays already live: the compiled programs are reused)."""
    if device is None or device == jax.devices()[0]:
        return tree
    return jax.device_put(tree, device)
