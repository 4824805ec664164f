"""The per-chunk algebra of gated linear attention, shared by the forward and backward kernels.

Per chunk of C steps: b = cumsum(g) inside the chunk, b_C its last row, ρ = b_C / 2; S the state
entering the chunk ([K, BV], float32); masks from `common.chunk_masks`.

    gate on the key axis (g ∈ R^K):
        A  = scale · mask ⊙ (q ⊙ e^{b−ρ}) (k ⊙ e^{ρ−b})ᵀ                         [C, C]
        o  = scale · (q ⊙ e^{b} · from) S + A v
        S' = diag(e^{b_C} · survive) S + (k ⊙ e^{b_C−b} · into)ᵀ v
    gate on the value axis (g ∈ R^V):
        A  = scale · mask ⊙ q kᵀ
        o  = e^{b} ⊙ (scale · (q S) · from) + e^{b−ρ} ⊙ (A (v ⊙ e^{ρ−b}))
        S' = S diag(e^{b_C} · survive) + kᵀ (v ⊙ e^{b_C−b} · into)

Why the midpoint ρ: exp(b_t − b_i) for i ≤ t is factored as e^{b_t−ρ} · e^{ρ−b_i} so that the
intra-chunk term is two matmuls. Each factor is at most e^{|b_C|/2}; the caller guarantees
|b_C| ≤ MAX_CHUNK_DECAY, so no factor exceeds e^{60} and nothing overflows in float32 or bf16.
Entries with i > t may overflow inside the matmul; they are discarded by a select, never
multiplied by a mask.

Backward, with dS the gradient of the state *leaving* the chunk (derivation in gla_bwd.py).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

MAX_CHUNK_DECAY = 120.0  # largest |Σ_chunk g| (per gated channel) the factorisation accepts

f32 = jnp.float32


@dataclasses.dataclass
class Gates:
    """Decay factors of one chunk."""

    b: jax.Array  # [C, D] cumulative log gate inside the chunk
    b_last: jax.Array  # [D]
    rho: jax.Array  # [D] the midpoint b_C / 2
    decay_last: jax.Array  # [D] e^{b_C} · survive
    to_end: jax.Array  # [C, D] e^{b_C − b} · into


def gates(g, masks) -> Gates:
    g = g.astype(f32)
    b = jnp.cumsum(g, axis=0)
    b_last = jnp.sum(g, axis=0)
    return Gates(b=b, b_last=b_last, rho=0.5 * b_last,
                 decay_last=jnp.exp(b_last) * masks.survive,
                 to_end=jnp.exp(b_last[None, :] - b) * masks.into[:, None])


def _scores(q, k, gt: Gates, masks, key_gated, scale, dot):
    """A = scale · mask ⊙ (q kᵀ, decayed on the key axis when key_gated). Also q̂, k̂."""
    if key_gated:
        q_hat = q.astype(f32) * jnp.exp(gt.b - gt.rho)
        k_hat = k.astype(f32) * jnp.exp(gt.rho - gt.b)
        raw = dot.nt(q_hat, k_hat)
    else:
        q_hat, k_hat = q, k
        raw = dot.nt(q, k)
    return scale * jnp.where(masks.intra, raw, 0.0), q_hat, k_hat


def output(q, k, v, S, gt: Gates, masks, *, key_gated, scale, dot):
    """o [C, BV] of one chunk from its inputs and the entering state S."""
    A, _, _ = _scores(q, k, gt, masks, key_gated, scale, dot)
    if key_gated:
        q_start = q.astype(f32) * (jnp.exp(gt.b) * masks.from_state[:, None])
        return scale * dot.nn(q_start, S) + dot.nn(A, v)
    inter = dot.nn(q, S) * (scale * masks.from_state[:, None])
    v_hat = v.astype(f32) * jnp.exp(gt.rho - gt.b)
    return jnp.exp(gt.b) * inter + jnp.exp(gt.b - gt.rho) * dot.nn(A, v_hat)


def state_update(k, v, S, gt: Gates, *, key_gated, dot):
    """The state leaving the chunk."""
    if key_gated:
        return gt.decay_last[:, None] * S + dot.tn(k.astype(f32) * gt.to_end, v)
    return S * gt.decay_last[None, :] + dot.tn(k, v.astype(f32) * gt.to_end)


def dstate_update(q, do, dS, gt: Gates, masks, *, key_gated, scale, dot):
    """The gradient of the state entering the chunk, from dS of the state leaving it."""
    if key_gated:
        q_bar = q.astype(f32) * (jnp.exp(gt.b) * masks.from_state[:, None])
        return gt.decay_last[:, None] * dS + scale * dot.tn(q_bar, do)
    dX = do.astype(f32) * (jnp.exp(gt.b) * masks.from_state[:, None])
    return dS * gt.decay_last[None, :] + scale * dot.tn(q, dX)


def grads(q, k, v, do, S, dS, gt: Gates, masks, *, key_gated, scale, dot):
    """(dq, dk, dv, db) of one chunk; db is the gradient of b (the caller reverse-cumsums it).

    S: state entering the chunk; dS: gradient of the state leaving it.
    """
    C = q.shape[0]
    last_row = lax.broadcasted_iota(jnp.int32, (C, 1), 0) == C - 1
    A, q_hat, k_hat = _scores(q, k, gt, masks, key_gated, scale, dot)
    from_ = masks.from_state[:, None]
    if key_gated:
        e_b = jnp.exp(gt.b) * from_
        k_bar = k.astype(f32) * gt.to_end
        dA = scale * jnp.where(masks.intra, dot.nt(do, v), 0.0)
        dv = dot.tn(A, do) + dot.nn(k_bar, dS)
        dq_hat, dk_hat = dot.nn(dA, k_hat), dot.tn(dA, q_hat)
        dq_bar = scale * dot.nt(do, S)
        dk_bar = dot.nt(v, dS)
        dq = dq_hat * jnp.exp(gt.b - gt.rho) + dq_bar * e_b
        dk = dk_hat * jnp.exp(gt.rho - gt.b) + dk_bar * gt.to_end
        db = (dq_hat * q_hat - dk_hat * k_hat + dq_bar * (q.astype(f32) * e_b)
              - dk_bar * k_bar)
        db_last = jnp.sum(dk_bar * k_bar, axis=0) + gt.decay_last * jnp.sum(S * dS, axis=1)
    else:
        v_hat = v.astype(f32) * jnp.exp(gt.rho - gt.b)
        v_bar = v.astype(f32) * gt.to_end
        X = dot.nn(q, S) * (scale * from_)
        o = jnp.exp(gt.b) * X + jnp.exp(gt.b - gt.rho) * dot.nn(A, v_hat)
        dX = do.astype(f32) * jnp.exp(gt.b) * from_
        dY = do.astype(f32) * jnp.exp(gt.b - gt.rho)
        dv_hat = dot.tn(A, dY)
        dA = scale * jnp.where(masks.intra, dot.nt(dY, v_hat), 0.0)
        dv_bar = dot.nn(k, dS)
        dq = dot.nn(dA, k) + scale * dot.nt(dX, S)
        dk = dot.tn(dA, q) + dot.nt(v_bar, dS)
        dv = dv_hat * jnp.exp(gt.rho - gt.b) + dv_bar * gt.to_end
        db = do.astype(f32) * o - dv_hat * v_hat - dv_bar * v_bar
        db_last = jnp.sum(dv_bar * v_bar, axis=0) + gt.decay_last * jnp.sum(S * dS, axis=0)
    db = db + jnp.where(last_row, db_last[None, :], 0.0)
    return dq, dk, dv, db


def reverse_cumsum(x):
    """Σ_{t ≥ j} x_t along axis 0 (Triton has no reverse scan)."""
    return jnp.sum(x, axis=0)[None, :] - jnp.cumsum(x, axis=0) + x
