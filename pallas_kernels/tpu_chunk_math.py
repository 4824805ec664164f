"""The per-chunk algebra of gated linear attention for the TPU (Mosaic) kernels.

The math is chunk_math.py's (same equations, same fast/exact split at MAX_CHUNK_DECAY); what
differs is the shape of every value, because Mosaic lowers 2-D tiles well and little else:

- every value is a 2-D tile: per-position masks are columns [C, 1], per-channel decays rows
  [1, D], scalars [1, 1]; nothing is 1-D, so no vector ever changes between the lane and the
  sublane axis;
- Mosaic has no cumulative sum, so the within-chunk cumsum of the gate is a matmul with the
  causal 0/1 matrix (b = L g) and the backward's reverse cumsum its transpose (dg = Lᵀ db), both
  at float32 precision;
- the state's gated axis is always its last (lane) axis, so that the decay is a row: a gate on
  the value axis keeps S [K, V]; a gate on the key axis keeps the transpose Sᵀ [V, K]. Both are
  called W below: [other, gated].

Per chunk of C steps (b = L g, b_C its last row, ρ = b_C / 2, masks from `chunk_masks`):

    gate on the key axis, W = Sᵀ [V, K]:
        o   = scale · (q ⊙ e^{b} · from) Wᵀ + intra
        W'  = W ⊙ (e^{b_C} · survive) + vᵀ (k ⊙ e^{b_C−b} · into)
    gate on the value axis, W = S [K, V]:
        o   = e^{b} ⊙ (scale · (q W) · from) + intra
        W'  = W ⊙ (e^{b_C} · survive) + kᵀ (v ⊙ e^{b_C−b} · into)

The intra-chunk term is chunk_math's (`intra_output_fast`, `intra_grads_fast` and the sub-chunk
tier `intra_output_sub`, `intra_grads_sub` take 2-D gates as they are; Plan.sub sets the tier,
16 at chunk 64); its exact loop for the sharpest gates is re-written here in 2-D tiles. The backward
(gradient formulas derived in gla_bwd.py) is the same algebra with W in place of S.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels import chunk_math, common

f32 = jnp.float32
HIGHEST = lax.Precision.HIGHEST  # float32 matmuls at float32 precision (Mosaic's DEFAULT: bf16)


@dataclasses.dataclass
class Masks:
    """Segment masks of one chunk as 2-D tiles; without segments the factors are Python 1.0."""

    intra: jax.Array  # [C, C] bool: causal (t ≥ i) and same segment
    from_state: Any  # [C, 1] f32: 1 where the entering state reaches position t
    into: Any  # [C, 1] f32: 1 where position i writes into the leaving state
    survive: Any  # [1, 1] f32: 1 if the entering state survives the whole chunk
    rel: Optional[jax.Array] = None  # [C, 1] f32 segment run relative to the entering one


def chunk_masks(C: int, rel_col=None, rel_row=None) -> Masks:
    """Masks of a chunk from its relative segment runs (None without segments).

    rel_col [C, 1] / rel_row [1, C] (float32): the run of each position minus the run of the
    position before the chunk, so 0 where the entering state flows on. Runs never decrease.
    """
    causal = common.causal_mask(C)
    if rel_col is None:
        return Masks(causal, 1.0, 1.0, 1.0)
    last = jnp.max(rel_col, axis=0, keepdims=True)  # [1, 1]: run of the chunk's last position
    return Masks(intra=jnp.logical_and(causal, rel_col == rel_row),
                 from_state=(rel_col == 0.0).astype(f32),
                 into=(rel_col == last).astype(f32),
                 survive=(last == 0.0).astype(f32),
                 rel=rel_col)


def _rows(C: int):
    return lax.broadcasted_iota(jnp.int32, (C, 1), 0)


def pick_row(x, i):
    """[1, D] row i of a tile (a masked sum: Mosaic cannot index a value by a traced i)."""
    return jnp.sum(jnp.where(_rows(x.shape[0]) == i, x, 0.0), axis=0, keepdims=True)


def gates(g, masks: Masks) -> chunk_math.Gates:
    """Decay factors of one chunk (chunk_math.Gates with [1, D] rows)."""
    C = g.shape[0]
    # b_t = Σ_{j ≤ t} g_j. L is 0/1, exact in any dtype, so in g's own dtype every product is
    # exact and the sums accumulate in float32: bf16 gates take one MXU pass.
    dot = common.Dot(g.dtype, f32_precision=HIGHEST)
    b = dot.nn(common.causal_mask(C).astype(g.dtype), g)
    b_last = pick_row(b, C - 1)  # the last row of b itself, so that e^{b_C − b_C} is exactly 1
    return chunk_math.Gates(b=b, b_last=b_last, rho=0.5 * b_last,
                            decay_last=jnp.exp(b_last) * masks.survive,
                            to_end=jnp.exp(b_last - b) * masks.into)


def reverse_cumsum(x):
    """Σ_{t ≥ j} x_t along axis 0 of a float32 tile, as Lᵀ x."""
    return common.Dot(f32, f32_precision=HIGHEST).tn(common.causal_mask(x.shape[0]).astype(f32), x)


def _reach(masks: Masks, i, C):
    """[C, 1] bool: the targets t that source position i reaches (t ≥ i, same segment)."""
    reach = _rows(C) >= i
    if masks.rel is None:
        return reach
    return jnp.logical_and(reach, masks.rel == pick_row(masks.rel, i))


def _pair_decay(gt, masks, i):
    """[C, D] exp(b_t − b_i) for the targets t that position i reaches, 0 elsewhere."""
    reach = _reach(masks, i, gt.b.shape[0])
    return jnp.exp(jnp.where(reach, gt.b - pick_row(gt.b, i), -jnp.inf))


def _intra_output_exact(q, k, v, gt, masks, *, key_gated, scale):
    """The intra-chunk output by a loop over source positions i (any gate strength)."""
    q, k, v = q.astype(f32), k.astype(f32), v.astype(f32)

    def source(i, o):
        k_i, v_i = pick_row(k, i), pick_row(v, i)
        decay = _pair_decay(gt, masks, i)
        if key_gated:
            a = scale * jnp.sum(q * k_i * decay, axis=1, keepdims=True)  # [C, 1]
            return o + a * v_i
        a = scale * jnp.sum(q * k_i, axis=1, keepdims=True)
        return o + a * decay * v_i

    return lax.fori_loop(0, q.shape[0], source, jnp.zeros(v.shape, f32))


def intra_output(q, k, v, gt, masks, *, key_gated, scale, dot, sub=0):
    kw = dict(key_gated=key_gated, scale=scale)
    return chunk_math._strong_gate_path(
        lambda q, k, v: chunk_math.intra_output_fast(q, k, v, gt, masks, dot=dot, **kw),
        lambda q, k, v: chunk_math.intra_output_sub(q, k, v, gt, masks, dot=dot, sub=sub, **kw),
        lambda q, k, v: _intra_output_exact(q, k, v, gt, masks, **kw),
        gt, sub, q.shape[0])(q, k, v)


def output(q, k, v, W, gt, masks, *, key_gated, scale, dot, sub=0):
    """o [C, V] of one chunk from its inputs and the entering state W (layout above)."""
    e_b = jnp.exp(gt.b)
    if key_gated:
        inter = scale * dot.nt(q.astype(f32) * e_b * masks.from_state, W)
    else:
        inter = e_b * dot.nn(q, W) * (scale * masks.from_state)
    return inter + intra_output(q, k, v, gt, masks, key_gated=key_gated, scale=scale, dot=dot,
                                sub=sub)


def _other_and_gated(key_gated, x_key, x_value):
    """(the operand on the state's other axis, the one on its gated axis)."""
    return (x_value, x_key) if key_gated else (x_key, x_value)


def state_update(k, v, W, gt, *, key_gated, dot):
    """The state leaving the chunk: W ⊙ decay_last + otherᵀ (gated ⊙ e^{b_C−b} · into)."""
    other, gated = _other_and_gated(key_gated, k, v)
    return W * gt.decay_last + dot.tn(other, gated.astype(f32) * gt.to_end)


def dstate_update(q, do, dW, gt, masks, *, key_gated, scale, dot):
    """The gradient of the state entering the chunk from dW of the state leaving it:
    dW ⊙ decay_last + scale · otherᵀ (gated ⊙ e^{b} · from), (other, gated) = (do, q) for the
    key gate, (q, do) for the value gate."""
    other, gated = _other_and_gated(key_gated, q, do)
    return dW * gt.decay_last + scale * dot.tn(
        other, gated.astype(f32) * (jnp.exp(gt.b) * masks.from_state))


def _intra_grads_exact(q, k, v, do, gt, masks, *, key_gated, scale):
    """(dq, dk, dv, db) of the intra-chunk term by a loop over source positions i."""
    q, k, v, do = (x.astype(f32) for x in (q, k, v, do))
    C = q.shape[0]
    rows = _rows(C)

    def source(i, carry):
        dq, dk, dv, db = carry
        k_i, v_i = pick_row(k, i), pick_row(v, i)
        decay = _pair_decay(gt, masks, i)
        if key_gated:  # o_t += a_t v_i, a_t = scale Σ_k q_tk k_ik decay_tk
            a = scale * jnp.sum(q * k_i * decay, axis=1, keepdims=True)
            da = scale * jnp.sum(do * v_i, axis=1, keepdims=True)
            pair = da * q * k_i * decay  # the b_t terms, [C, K]
            dq = dq + da * k_i * decay
            dk_i = jnp.sum(da * q * decay, axis=0, keepdims=True)
            dv_i = jnp.sum(a * do, axis=0, keepdims=True)
        else:  # o_t += a_t decay_t v_i, a_t = scale q_t·k_i
            a = scale * jnp.sum(q * k_i, axis=1, keepdims=True)
            through = do * decay * v_i
            da = scale * jnp.sum(through, axis=1, keepdims=True)
            pair = a * through  # [C, V]
            dq = dq + da * k_i
            dk_i = jnp.sum(da * q, axis=0, keepdims=True)
            dv_i = jnp.sum(a * decay * do, axis=0, keepdims=True)
        at_i = rows == i
        dk = dk + jnp.where(at_i, dk_i, 0.0)
        dv = dv + jnp.where(at_i, dv_i, 0.0)
        db = db + pair - jnp.where(at_i, jnp.sum(pair, axis=0, keepdims=True), 0.0)
        return dq, dk, dv, db

    zeros = tuple(jnp.zeros(x.shape, f32) for x in (q, k, v, gt.b))
    return lax.fori_loop(0, C, source, zeros)


def grads(q, k, v, do, W, dW, gt, masks, *, key_gated, scale, dot, sub=0):
    """(dq, dk, dv, db) of one chunk; db is the gradient of b (`reverse_cumsum` gives dg).

    W: state entering the chunk; dW: gradient of the state leaving it (layout above); sub:
    the sub-chunk tier's size (0: none).
    """
    C = q.shape[0]
    kw = dict(key_gated=key_gated, scale=scale)
    dq, dk, dv, db = chunk_math._strong_gate_path(
        lambda q, k, v, do: chunk_math.intra_grads_fast(q, k, v, do, gt, masks, dot=dot, **kw),
        lambda q, k, v, do: chunk_math.intra_grads_sub(q, k, v, do, gt, masks, dot=dot, sub=sub,
                                                       **kw),
        lambda q, k, v, do: _intra_grads_exact(q, k, v, do, gt, masks, **kw),
        gt, sub, C)(q, k, v, do)
    if key_gated:  # q̄ = q e^{b}·from reads W, k̄ = k e^{b_C−b}·into writes it
        e_b = jnp.exp(gt.b) * masks.from_state
        k_bar = k.astype(f32) * gt.to_end
        dq_bar = scale * dot.nn(do, W)  # [C, K]
        dk_bar = dot.nn(v, dW)
        dq = dq + dq_bar * e_b
        dk = dk + dk_bar * gt.to_end
        dv = dv + dot.nt(k_bar, dW)
        db = db + dq_bar * (q.astype(f32) * e_b) - dk_bar * k_bar
        db_last = jnp.sum(dk_bar * k_bar, axis=0, keepdims=True)
    else:  # X = scale (q W)·from is read with e^{b}; v̄ = v e^{b_C−b}·into writes W
        v_bar = v.astype(f32) * gt.to_end
        e_b = jnp.exp(gt.b)
        X = dot.nn(q, W) * (scale * masks.from_state)
        dX = do.astype(f32) * e_b * masks.from_state
        dv_bar = dot.nn(k, dW)  # [C, V]
        dq = dq + scale * dot.nt(dX, W)
        dk = dk + dot.nt(v_bar, dW)
        dv = dv + dv_bar * gt.to_end
        db = db + do.astype(f32) * e_b * X - dv_bar * v_bar
        db_last = jnp.sum(dv_bar * v_bar, axis=0, keepdims=True)
    # the decay of the entering state, W ⊙ e^{b_C}: its gradient lands on b_C (the last row)
    db_last = db_last + gt.decay_last * jnp.sum(W * dW, axis=0, keepdims=True)
    db = db + jnp.where(_rows(C) == C - 1, db_last, 0.0)
    return dq, dk, dv, db
