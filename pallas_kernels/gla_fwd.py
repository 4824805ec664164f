"""Forward Pallas (Triton) kernel of chunked gated linear attention (GLA).

One program per (batch, head, value block) walks the sequence chunk by chunk, carrying the state
S ∈ R^{K×BV} in float32 registers; inputs are read once and outputs written once. Per chunk of C
steps, with b = cumsum(g) inside the chunk (b_C its last row) and ρ = b_C / 2:

    gate on the key axis (g ∈ R^K):
        A   = scale · mask ⊙ (q ⊙ e^{b−ρ}) (k ⊙ e^{ρ−b})ᵀ                  [C, C]
        o   = scale · (q ⊙ e^{b}) S + A v
        S' ← diag(e^{b_C}) S + (k ⊙ e^{b_C−b})ᵀ v
    gate on the value axis (g ∈ R^V):
        A   = scale · mask ⊙ q kᵀ
        o   = e^{b} ⊙ (scale · q S) + e^{b−ρ} ⊙ (A (v ⊙ e^{ρ−b}))
        S' ← S diag(e^{b_C}) + kᵀ (v ⊙ e^{b_C−b})

`mask` is causal and, with packed segments, same-segment; the state entering a chunk reaches only
positions of its own segment, and only the last segment of the chunk writes the leaving state.

Why the midpoint ρ: exp(b_t − b_i) for i ≤ t is factored as e^{b_t−ρ} · e^{ρ−b_i} so that the
intra-chunk term is two matmuls. Each factor is at most e^{|b_C|/2}; the caller guarantees
|b_C| ≤ `MAX_CHUNK_DECAY` (the wrapper in gsa_jax.ops falls back to the pure-JAX chunk form for
inputs with stronger gates), so no factor exceeds e^{60} and nothing overflows in float32 or
bf16. Entries for i > t may overflow inside the matmul; they are discarded by a select, never
multiplied by a mask.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import common

MAX_CHUNK_DECAY = 120.0  # largest |Σ_chunk g| (per gated channel) the factorisation accepts


def _fwd_kernel(*refs, C, N, key_gated, scale, has_runs, save_states, dot):
    q_ref, k_ref, v_ref, g_ref, *refs = refs
    runs_ref = refs.pop(0) if has_runs else None
    s0_ref, o_ref, sT_ref, *refs = refs
    states_ref = refs.pop(0) if save_states else None
    K = q_ref.shape[-1]
    causal = common.causal_mask(C)

    def body(n, carry):
        S, run_prev = carry
        rows = pl.ds(n * C, C)
        q = q_ref[rows, :].astype(jnp.float32)
        k = k_ref[rows, :].astype(jnp.float32)
        v = v_ref[rows, :].astype(jnp.float32)
        g = g_ref[rows, :].astype(jnp.float32)
        b = jnp.cumsum(g, axis=0)
        b_last = jnp.sum(g, axis=0)
        rho = 0.5 * b_last
        masks = common.chunk_masks(runs_ref, rows, run_prev, causal)
        if save_states:
            states_ref[pl.ds(n * K, K), :] = S

        decay_last = jnp.exp(b_last) * masks.survive
        to_end = jnp.exp(b_last[None, :] - b) * masks.into[:, None]
        if key_gated:
            scores = dot.nt(q * jnp.exp(b - rho), k * jnp.exp(rho - b))
            A = scale * jnp.where(masks.intra, scores, 0.0)
            q_start = q * jnp.exp(b) * masks.from_state[:, None]
            o = scale * dot.nn(q_start, S) + dot.nn(A, v)
            S = decay_last[:, None] * S + dot.tn(k * to_end, v)
        else:
            A = scale * jnp.where(masks.intra, dot.nt(q, k), 0.0)
            inter = scale * dot.nn(q, S) * masks.from_state[:, None]
            o = jnp.exp(b) * inter + jnp.exp(b - rho) * dot.nn(A, v * jnp.exp(rho - b))
            S = S * decay_last[None, :] + dot.tn(k, v * to_end)
        o_ref[rows, :] = o.astype(o_ref.dtype)
        return S, masks.run_last

    S, _ = lax.fori_loop(0, N, body, (s0_ref[...].astype(jnp.float32), jnp.int32(0)))
    sT_ref[...] = S


def gla_fwd(q, k, v, g, s0, runs, *, key_gated: bool, scale: float, chunk_size: int,
            block_v: int, save_states: bool, out_dtype, interpret: bool = False,
            num_warps: int = 4, num_stages: int = 2):
    """Launch the forward kernel on padded inputs.

    Args:
      q: [B, Tp, H, K]; k: [B, Tp, Hkv, K]; v: [B, Tp, Hkv, V]; g: [B, Tp, Hkv, K or V];
      s0: [B, H, K, V] float32; runs: [B, Tp] int32 or None. Tp is a multiple of chunk_size.
    Returns:
      (o [B, Tp, H, V] out_dtype, final state [B, H, K, V] f32,
       entering states [B, H, N·K, V] f32 if save_states).
    """
    B, Tp, H, K = q.shape
    Hkv, V = v.shape[2], v.shape[3]
    group = H // Hkv
    C = chunk_size
    N = Tp // C
    BV = min(block_v, V)
    grid = (B, H, V // BV)

    def seq(width, col):  # a [Tp, width] slab of a [B, Tp, heads, D] array
        return pl.BlockSpec((None, Tp, None, width), col)

    in_specs = [
        seq(K, lambda b, h, j: (b, 0, h, 0)),
        seq(K, lambda b, h, j: (b, 0, h // group, 0)),
        seq(BV, lambda b, h, j: (b, 0, h // group, j)),
        (seq(K, lambda b, h, j: (b, 0, h // group, 0)) if key_gated
         else seq(BV, lambda b, h, j: (b, 0, h // group, j))),
    ]
    args = [q, k, v, g]
    if runs is not None:
        in_specs.append(pl.BlockSpec((None, Tp), lambda b, h, j: (b, 0)))
        args.append(runs)
    state_spec = pl.BlockSpec((None, None, K, BV), lambda b, h, j: (b, h, 0, j))
    in_specs.append(state_spec)
    args.append(s0)

    out_shape = [jax.ShapeDtypeStruct((B, Tp, H, V), out_dtype),
                 jax.ShapeDtypeStruct((B, H, K, V), jnp.float32)]
    out_specs = [seq(BV, lambda b, h, j: (b, 0, h, j)), state_spec]
    if save_states:
        out_shape.append(jax.ShapeDtypeStruct((B, H, N * K, V), jnp.float32))
        out_specs.append(pl.BlockSpec((None, None, N * K, BV), lambda b, h, j: (b, h, 0, j)))

    kernel = functools.partial(
        _fwd_kernel, C=C, N=N, key_gated=key_gated, scale=float(scale),
        has_runs=runs is not None, save_states=save_states,
        dot=common.Dot(q.dtype, interpret))
    return pl.pallas_call(
        kernel, out_shape=out_shape, grid=grid, in_specs=in_specs, out_specs=out_specs,
        compiler_params=common.compiler_params(num_warps, num_stages),
        interpret=interpret, name="gla_chunk_fwd",
    )(*args)
