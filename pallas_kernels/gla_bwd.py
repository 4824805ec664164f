"""Backward Pallas (Triton) kernel of chunked gated linear attention.

One program per (batch, head, value block) walks the chunks in reverse, carrying dS (the gradient
of the state leaving the chunk) in float32. The state entering each chunk comes from the forward
kernel (stored, or recomputed by running it again). Notation as in `gla_fwd.py`; b = cumsum(g)
in the chunk, ρ = b_C / 2, `into`/`from`/`survive` the segment masks.

Gate on the key axis, with q̂ = q e^{b−ρ}, k̂ = k e^{ρ−b}, q̄ = q e^{b}·from, k̄ = k e^{b_C−b}·into:
    dA   = scale · mask ⊙ (do vᵀ)            dv = Aᵀ do + k̄ dS
    dq̂  = dA k̂,  dk̂ = dAᵀ q̂,  dq̄ = scale · do Sᵀ,  dk̄ = v dSᵀ
    dq   = dq̂ e^{b−ρ} + dq̄ e^{b}·from,       dk = dk̂ e^{ρ−b} + dk̄ e^{b_C−b}·into
    db   = dq̂⊙q̂ − dk̂⊙k̂ + dq̄⊙q̄ − dk̄⊙k̄,   plus, on the last row, Σ_i dk̄⊙k̄ + e^{b_C} Σ_v S⊙dS
    dS  ← diag(e^{b_C}) dS · survive + scale · q̄ᵀ do
Gate on the value axis, with X = scale · (q S)·from, v̂ = v e^{ρ−b}, v̄ = v e^{b_C−b}·into:
    dX = do e^{b},  dY = do e^{b−ρ},  dv̂ = Aᵀ dY,  dA = scale · mask ⊙ (dY v̂ᵀ),  dv̄ = k dS
    dq = dA k + scale · (dX·from) Sᵀ,  dk = dAᵀ q + v̄ dSᵀ,  dv = dv̂ e^{ρ−b} + dv̄ e^{b_C−b}·into
    db = do⊙o − dv̂⊙v̂ − dv̄⊙v̄,   plus, on the last row, Σ_i dv̄⊙v̄ + e^{b_C} Σ_k S⊙dS
    dS ← dS diag(e^{b_C}) · survive + scale · qᵀ (dX·from)
The ρ terms cancel exactly (A does not depend on ρ) and are left out. dg is the reverse cumulative
sum of db inside the chunk, since b_t = Σ_{j≤t} g_j.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import common


def _reverse_cumsum(x):
    return jnp.sum(x, axis=0)[None, :] - jnp.cumsum(x, axis=0) + x


def _bwd_kernel(*refs, C, N, key_gated, scale, has_runs, dot):
    q_ref, k_ref, v_ref, g_ref, *refs = refs
    runs_ref = refs.pop(0) if has_runs else None
    states_ref, do_ref, dsT_ref, dq_ref, dk_ref, dv_ref, dg_ref, ds0_ref = refs
    K = q_ref.shape[-1]
    causal = common.causal_mask(C)
    last_row = lax.broadcasted_iota(jnp.int32, (C, 1), 0) == C - 1

    def body(i, dS):
        n = N - 1 - i
        rows = pl.ds(n * C, C)
        q = q_ref[rows, :].astype(jnp.float32)
        k = k_ref[rows, :].astype(jnp.float32)
        v = v_ref[rows, :].astype(jnp.float32)
        g = g_ref[rows, :].astype(jnp.float32)
        do = do_ref[rows, :].astype(jnp.float32)
        S = states_ref[pl.ds(n * K, K), :]
        b = jnp.cumsum(g, axis=0)
        b_last = jnp.sum(g, axis=0)
        rho = 0.5 * b_last
        if has_runs:
            before = runs_ref[pl.ds(jnp.maximum(n * C - 1, 0), 1)]
            run_prev = jnp.where(n == 0, 0, jnp.sum(before))
        else:
            run_prev = jnp.int32(0)
        masks = common.chunk_masks(runs_ref, rows, run_prev, causal)
        decay_last = jnp.exp(b_last) * masks.survive
        to_end = jnp.exp(b_last[None, :] - b) * masks.into[:, None]

        if key_gated:
            q_hat, k_hat = q * jnp.exp(b - rho), k * jnp.exp(rho - b)
            A = scale * jnp.where(masks.intra, dot.nt(q_hat, k_hat), 0.0)
            q_bar = q * jnp.exp(b) * masks.from_state[:, None]
            k_bar = k * to_end
            dA = scale * jnp.where(masks.intra, dot.nt(do, v), 0.0)
            dv = dot.tn(A, do) + dot.nn(k_bar, dS)
            dq_hat, dk_hat = dot.nn(dA, k_hat), dot.tn(dA, q_hat)
            dq_bar = scale * dot.nt(do, S)
            dk_bar = dot.nt(v, dS)
            dq = dq_hat * jnp.exp(b - rho) + dq_bar * jnp.exp(b) * masks.from_state[:, None]
            dk = dk_hat * jnp.exp(rho - b) + dk_bar * to_end
            db = dq_hat * q_hat - dk_hat * k_hat + dq_bar * q_bar - dk_bar * k_bar
            db_last = jnp.sum(dk_bar * k_bar, axis=0) + decay_last * jnp.sum(S * dS, axis=1)
            dS_prev = decay_last[:, None] * dS + scale * dot.tn(q_bar, do)
        else:
            A = scale * jnp.where(masks.intra, dot.nt(q, k), 0.0)
            v_hat = v * jnp.exp(rho - b)
            v_bar = v * to_end
            X = scale * dot.nn(q, S) * masks.from_state[:, None]
            o = jnp.exp(b) * X + jnp.exp(b - rho) * dot.nn(A, v_hat)
            dX = do * jnp.exp(b) * masks.from_state[:, None]
            dY = do * jnp.exp(b - rho)
            dv_hat = dot.tn(A, dY)
            dA = scale * jnp.where(masks.intra, dot.nt(dY, v_hat), 0.0)
            dv_bar = dot.nn(k, dS)
            dq = dot.nn(dA, k) + scale * dot.nt(dX, S)
            dk = dot.tn(dA, q) + dot.nt(v_bar, dS)
            dv = dv_hat * jnp.exp(rho - b) + dv_bar * to_end
            db = do * o - dv_hat * v_hat - dv_bar * v_bar
            db_last = jnp.sum(dv_bar * v_bar, axis=0) + decay_last * jnp.sum(S * dS, axis=0)
            dS_prev = dS * decay_last[None, :] + scale * dot.tn(q, dX)

        db = db + jnp.where(last_row, db_last[None, :], 0.0)
        dq_ref[rows, :] = dq.astype(dq_ref.dtype)
        dk_ref[rows, :] = dk.astype(dk_ref.dtype)
        dv_ref[rows, :] = dv.astype(dv_ref.dtype)
        dg_ref[rows, :] = _reverse_cumsum(db).astype(dg_ref.dtype)
        return dS_prev

    ds0_ref[...] = lax.fori_loop(0, N, body, dsT_ref[...].astype(jnp.float32))


def gla_bwd(q, k, v, g, runs, states, do, dsT, *, key_gated: bool, scale: float,
            chunk_size: int, block_v: int, interpret: bool = False, num_warps: int = 4,
            num_stages: int = 2):
    """Launch the backward kernel on padded inputs (shapes as `gla_fwd`).

    Args:
      states: [B, H, N·K, V] f32 states entering each chunk; do: [B, Tp, H, V];
      dsT: [B, H, K, V] gradient of the final state.
    Returns, per query head (the caller sums grouped heads and value blocks):
      dq [NV, B, Tp, H, K], dk [NV, B, Tp, H, K], dv [B, Tp, H, V],
      dg [NV, B, Tp, H, K] (key gate) or [1, B, Tp, H, V] (value gate), ds0 [B, H, K, V];
      all float32.
    """
    B, Tp, H, K = q.shape
    Hkv, V = v.shape[2], v.shape[3]
    group = H // Hkv
    C = chunk_size
    N = Tp // C
    BV = min(block_v, V)
    NV = V // BV
    grid = (B, H, NV)
    f32 = jnp.float32

    def seq(width, col):
        return pl.BlockSpec((None, Tp, None, width), col)

    def per_block(width):  # an [NV, B, Tp, H, width] output, block j of the value axis
        return pl.BlockSpec((None, None, Tp, None, width), lambda b, h, j: (j, b, 0, h, 0))

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
    in_specs += [pl.BlockSpec((None, None, N * K, BV), lambda b, h, j: (b, h, 0, j)),
                 seq(BV, lambda b, h, j: (b, 0, h, j)),
                 state_spec]
    args += [states, do, dsT]

    out_shape = [jax.ShapeDtypeStruct((NV, B, Tp, H, K), f32),
                 jax.ShapeDtypeStruct((NV, B, Tp, H, K), f32),
                 jax.ShapeDtypeStruct((B, Tp, H, V), f32)]
    out_specs = [per_block(K), per_block(K), seq(BV, lambda b, h, j: (b, 0, h, j))]
    if key_gated:
        out_shape.append(jax.ShapeDtypeStruct((NV, B, Tp, H, K), f32))
        out_specs.append(per_block(K))
    else:
        out_shape.append(jax.ShapeDtypeStruct((1, B, Tp, H, V), f32))
        out_specs.append(pl.BlockSpec((None, None, Tp, None, BV),
                                      lambda b, h, j: (0, b, 0, h, j)))
    out_shape.append(jax.ShapeDtypeStruct((B, H, K, V), f32))
    out_specs.append(state_spec)

    kernel = functools.partial(
        _bwd_kernel, C=C, N=N, key_gated=key_gated, scale=float(scale),
        has_runs=runs is not None, dot=common.Dot(q.dtype, interpret))
    return pl.pallas_call(
        kernel, out_shape=out_shape, grid=grid, in_specs=in_specs, out_specs=out_specs,
        compiler_params=common.compiler_params(num_warps, num_stages),
        interpret=interpret, name="gla_chunk_bwd",
    )(*args)
