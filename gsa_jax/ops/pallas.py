"""The Pallas form of GLA and GSA: the GPU kernels of `pallas_kernels`, wired for the ops.

Any gate is safe: each chunk whose accumulated gate is stronger than the kernels' fast path
accepts takes an exact (slower) path inside the kernel. On a backend without a GPU the kernels run
in Pallas' interpreter (slow; for tests).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

KERNEL_DIMS = (16, 32, 64, 128, 256)
KERNEL_CHUNKS = (16, 32, 64, 128)


def kernel_supports(*dims: int, chunk_size: int, wide: bool = True) -> bool:
    """True where the kernels handle these feature dims and this chunk size: dims in
    KERNEL_DIMS, or with `wide` multiples of 128 too (wider keys run in slices, wider values in
    value blocks). impl="auto" passes wide=False: the wide dims are checked in interpret mode
    but have not been timed on a GPU yet, so only an explicit impl="pallas" takes them."""
    return (all(d in KERNEL_DIMS or (wide and d % 128 == 0) for d in dims)
            and chunk_size in KERNEL_CHUNKS)


def on_gpu() -> bool:
    return jax.default_backend() == "gpu"


def gla_pallas(q, k, v, g, initial_state, runs: Optional[jax.Array], *, gate_axis: str,
               scale: float, chunk_size: int, out_dtype=None, recompute_states: bool = False,
               interpret: Optional[bool] = None):
    """GLA by the kernels. Args as `pallas_kernels.gla.gla_chunk_pallas` (initial_state per
    query head, [B, H, K, V]); returns (o [B, T, H, V], final state [B, H, K, V] f32)."""
    from pallas_kernels.gla import gla_chunk_pallas

    out_dtype = jnp.dtype(out_dtype or q.dtype)
    if q.shape[1] == 0:  # no chunk to launch: an empty output, the state unchanged
        return (jnp.zeros(q.shape[:3] + v.shape[3:], out_dtype),
                initial_state.astype(jnp.float32))
    if interpret is None:
        interpret = not on_gpu()
    o, s = gla_chunk_pallas(q, k, v, g, initial_state, runs, key_gated=gate_axis == "key",
                            scale=scale, chunk_size=chunk_size, out_dtype=out_dtype,
                            recompute_states=recompute_states, interpret=interpret)
    return o.astype(out_dtype), s


def gsa_pallas(q, k, v, s, g, hk0, hv0, runs, *, scale: float, chunk_size: int,
               slot_activation_fn, recompute_states: bool = False,
               interpret: Optional[bool] = None):
    """GSA's two passes by the kernels; states per query head.

    Pass 1 writes z in float32 for the slot activation; p goes to pass 2 in q's dtype.
    Returns (o [B, T, H, V] in q's dtype, Hk [B, H, K, M] f32, Hv [B, H, M, V] f32).
    """
    kw = dict(chunk_size=chunk_size, recompute_states=recompute_states, interpret=interpret)
    z, hk = gla_pallas(q, k, s, g, hk0, runs, gate_axis="value", scale=scale,
                       out_dtype=jnp.float32, **kw)
    p = slot_activation_fn(z).astype(q.dtype)
    o, hv = gla_pallas(p, s, v, g, hv0, runs, gate_axis="key", scale=1.0, out_dtype=q.dtype,
                       **kw)
    return o, hk, hv
