"""One GSA decode step as one Pallas (Triton) kernel: the state read once, updated and written
back in place, both passes and the slot activation in between fused.

Per (batch row b, key/value head h), with G = H / Hkv query heads sharing the state:

    Hk' = Hk ⊙ exp(g)[None, :] + k sᵀ                      [K, M]
    z_j = scale · q_j Hk'                                   [M]     (j < G)
    p_j = act(z_j)                                          (softmax over the M slots, ...)
    Hv' = Hv ⊙ exp(g)[:, None] + s vᵀ                      [M, V]
    o_j = p_j Hv'                                           [V]

This is `gsa_jax.ops.gated_slot_attention_step`'s math (its docstring has the shapes) without
what the XLA step spends beyond the floor of a decode step (reading and writing the float32
state once): the grouped state repeated per query head and reduced again, and the state's
round trips between the two passes' fusions. The kernel is forward-only (decoding does not
differentiate through a step).

Grid (B, Hkv); each program holds one head's Hk and Hv (K·M + M·V floats: 64 KiB at
K = V = 128, M = 64) and its G query rows. q·Hk' and p·Hv' are broadcast-multiply-sums, not
`dot`s: with G query rows (usually 1) the matmuls are far below the tensor cores' minimum tile.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import common as kcommon

DECODE_DIMS = (16, 32, 64, 128, 256)   # K, M, V a power of two (Triton block shapes)


def decode_supports(K: int, M: int, V: int, group: int) -> bool:
    """True where the decode kernel takes these dims: K, M, V in DECODE_DIMS and G query heads
    per kv head in 1, 2, 4, 8 (a power of two for the block, few enough to unroll)."""
    return all(d in DECODE_DIMS for d in (K, M, V)) and group in (1, 2, 4, 8)


def _kernel(q_ref, k_ref, v_ref, s_ref, g_ref, hk_ref, hv_ref, o_ref, hk_out, hv_out, *,
            group: int, scale: float, activation):
    f32 = jnp.float32
    k = k_ref[0, 0, :].astype(f32)            # [K]
    v = v_ref[0, 0, :].astype(f32)            # [V]
    s = s_ref[0, 0, :].astype(f32)            # [M]
    decay = jnp.exp(g_ref[0, 0, :].astype(f32))   # [M]
    hk = hk_ref[0, 0, :, :] * decay[None, :] + k[:, None] * s[None, :]     # [K, M]
    hv = hv_ref[0, 0, :, :] * decay[:, None] + s[:, None] * v[None, :]     # [M, V]
    hk_out[0, 0, :, :] = hk
    hv_out[0, 0, :, :] = hv
    for j in range(group):   # G query heads read the same state (unrolled: G <= 8)
        qj = q_ref[0, 0, j, :].astype(f32)                                   # [K]
        z = jnp.sum(qj[:, None] * hk, axis=0) * scale                        # [M]
        p = activation(z)
        o_ref[0, 0, j, :] = jnp.sum(p[:, None] * hv, axis=0).astype(o_ref.dtype)   # [V]


def gsa_decode_step_pallas(q, k, v, s, g, hk, hv, *, scale: float, slot_activation_fn,
                           interpret: bool = False, num_warps: int = 4):
    """One GSA step for every (row, head) by one kernel.

    Args: q [B, H, K]; k [B, Hkv, K]; v [B, Hkv, V]; s, g [B, Hkv, M]; hk [B, Hkv, K, M] and
    hv [B, Hkv, M, V] float32 (updated in place when the caller donates them);
    slot_activation_fn: z [M] -> p [M], run inside the kernel (given by the ops layer, as
    `gsa_jax.ops.pallas.gsa_pallas` is given it for the sequence kernels).
    Returns (o [B, H, V] in q's dtype, hk', hv' float32). Dims: `decode_supports`.
    """
    B, H, K = q.shape
    Hkv, M, V = k.shape[1], s.shape[2], v.shape[2]
    group = H // Hkv
    if not decode_supports(K, M, V, group):
        raise ValueError(f"gsa_decode_step_pallas: K, M, V must be in {DECODE_DIMS} and "
                         f"H / Hkv in 1, 2, 4, 8; got K={K}, M={M}, V={V}, H / Hkv = {group}")
    q4 = q.reshape(B, Hkv, group, K)   # query head h*G + j reads kv head h
    row = lambda n: pl.BlockSpec((1, 1, n), lambda b, h: (b, h, 0))  # noqa: E731
    square = lambda a, c: pl.BlockSpec((1, 1, a, c), lambda b, h: (b, h, 0, 0))  # noqa: E731
    kernel = functools.partial(_kernel, group=group, scale=float(scale),
                               activation=slot_activation_fn)
    o, hk, hv = pl.pallas_call(
        kernel,
        grid=(B, Hkv),
        in_specs=[square(group, K), row(K), row(V), row(M), row(M), square(K, M),
                  square(M, V)],
        out_specs=[square(group, V), square(K, M), square(M, V)],
        out_shape=[jax.ShapeDtypeStruct((B, Hkv, group, V), q.dtype),
                   jax.ShapeDtypeStruct(hk.shape, jnp.float32),
                   jax.ShapeDtypeStruct(hv.shape, jnp.float32)],
        input_output_aliases={5: 1, 6: 2},
        compiler_params=kcommon.compiler_params(num_warps, 1),
        interpret=interpret, name="gsa_decode_step",
    )(q4, k, v, s, g, hk.astype(jnp.float32), hv.astype(jnp.float32))
    return o.reshape(B, H, V), hk, hv
