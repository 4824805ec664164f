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

The state terms only ever use e^{b} and e^{b_C−b}, both ≤ 1: safe for any gate. The intra-chunk
term needs exp(b_t − b_i) for i ≤ t. The fast path factors it through the midpoint ρ,
e^{b_t−ρ} · e^{ρ−b_i}, so that the term is two matmuls; each factor is at most e^{|b_C|/2}, and
the fast path is taken only where |b_C| ≤ MAX_CHUNK_DECAY (per gated channel of the tile), so
no factor exceeds e^{60} and nothing overflows in float32 or bf16. Entries with i > t may
overflow inside the matmul; they are discarded by a select, never multiplied by a mask. A chunk
with a stronger gate takes the exact path instead (an in-kernel branch): a loop over source
positions i that exponentiates b_t − b_i directly, C times the elementwise work, no overflow.

Sub-chunk tier (`sub` > 0, Tuning.sub_chunk): a tile past the bound whose sub-chunks of
`sub` steps each stay within it takes neither path but a sum of factored terms, all matmuls, one
per target sub-chunk I. With β_I the value of b just before sub-chunk I (β_0 = 0) and the
reference μ_I = (β_I + β_{I+1}) / 2, every pair (t, i ≤ t) with t in sub-chunk I is
    e^{b_t − b_i} = e^{b_t − μ_I} · e^{μ_I − b_i}:
the first factor is ≤ e^{(β_I − β_{I+1}) / 2} ≤ e^{60}; the second likewise for i inside
sub-chunk I, and ≤ 1 for i before it (b falls, so b_i ≥ β_I ≥ μ_I), underflowing only where
the pair's decay is below e^{−27} (the peer's `chunk_gla` factors its off-diagonal sub-chunk
blocks through the target sub-chunk's first gate and loops inside diagonal blocks). Only a
sub-chunk past the bound still takes the exact loop.

Backward, with dS the gradient of the state *leaving* the chunk (derivation in gla_bwd.py).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels import common

MAX_CHUNK_DECAY = 120.0  # largest |Σ_chunk g| (per gated channel) the factorisation accepts
AUTO_SUB_CHUNK = 16   # the sub-chunk tier's default size (the peer's chunk_gla uses 16 too)

f32 = jnp.float32


@dataclasses.dataclass
class Gates:
    """Decay factors of one chunk."""

    b: jax.Array  # [C, D] cumulative log gate inside the chunk
    b_last: jax.Array  # [D] (the TPU kernels: [1, D], likewise rho and decay_last)
    rho: jax.Array  # [D] the midpoint b_C / 2
    decay_last: jax.Array  # [D] e^{b_C} · survive
    to_end: jax.Array  # [C, D] e^{b_C − b} · into


def gates(g, masks) -> Gates:
    """The chunk's Gates from its log gates g [C, D]."""
    g = g.astype(f32)
    return cumulative_gates(jnp.cumsum(g, axis=0), jnp.sum(g, axis=0), masks)


def cumulative_gates(b, b_last, masks) -> Gates:
    """The chunk's Gates from b [C, D], its cumulative log gate, and b's last row b_last [D]
    (Tuning.cumulative_gates: b computed once outside the kernels and b_last loaded as a
    row of its own, so a kernel does no scan or row sum)."""
    b, b_last = b.astype(f32), b_last.astype(f32)
    return Gates(b=b, b_last=b_last, rho=0.5 * b_last,
                 decay_last=jnp.exp(b_last) * masks.survive,
                 to_end=jnp.exp(b_last[None, :] - b) * masks.into[:, None])


def chunk_cumsum(g, chunk_size: int):
    """[B, T, H, D] log gates -> b [B, T, H, D] float32, their cumulative sum inside each
    chunk of chunk_size steps (the last chunk may be partial): what `gates` computes per
    chunk."""
    B, T, H, D = g.shape
    Tp = -(-T // chunk_size) * chunk_size
    g = jnp.pad(g.astype(f32), ((0, 0), (0, Tp - T), (0, 0), (0, 0)))
    b = jnp.cumsum(g.reshape(B, Tp // chunk_size, chunk_size, H, D), axis=2)
    return b.reshape(B, Tp, H, D)[:, :T]


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


def is_extreme(gt: Gates):
    """Whether some gated channel of this tile decays beyond the fast path's bound."""
    return is_extreme_last(gt.b_last)


def is_extreme_last(b_last):
    """is_extreme from the chunk's total log gate b_last [D] (or [1, D])."""
    return jnp.max(-b_last) > MAX_CHUNK_DECAY


TILE_STEP = 1024.0   # is_extreme_tile's fixed point: log gates in steps of 1/1024


def is_extreme_tile(g):
    """is_extreme decided from the tile's log gates g [C, D] in integer arithmetic, for
    kernels that split a tile's work between them (Tuning.strong_gates_apart): each must
    classify every tile alike, and a float32 sum's rounding depends on each kernel's
    reduction order. g is floored to steps of 1/TILE_STEP (clamped at -TILE_STEP per step: one
    such step is past the bound anyway) and summed exactly in int32, so the bound moves by
    less than C / TILE_STEP against is_extreme (the fast path's factors stay far from
    overflow)."""
    steps = jnp.floor(jnp.maximum(g.astype(f32), -TILE_STEP) * TILE_STEP).astype(jnp.int32)
    return jnp.max(-jnp.sum(steps, axis=0)) > int(MAX_CHUNK_DECAY * TILE_STEP)


def sub_chunk_for(sub_chunk, chunk_size: int) -> int:
    """The sub-chunk tier's size for a chunk size (0: off). None (auto): AUTO_SUB_CHUNK where it
    divides a larger chunk, else off; an explicit size must divide the chunk (0: off)."""
    if sub_chunk is None:
        auto = AUTO_SUB_CHUNK
        return auto if chunk_size > auto and chunk_size % auto == 0 else 0
    if sub_chunk < 0 or (sub_chunk and chunk_size % sub_chunk):
        raise ValueError(f"Tuning.sub_chunk ({sub_chunk}) must divide the chunk size "
                         f"({chunk_size}), or be 0 (off) or None (auto)")
    return sub_chunk


def _rows_of(gt: Gates):
    return lax.broadcasted_iota(jnp.int32, (gt.b.shape[0], 1), 0)


def _b_at(gt: Gates, *rows):
    """Σ of b's rows at these indices, [1, D] (a masked sum: neither Triton nor Mosaic index
    a tile by a traced row; an index of −1 picks nothing, i.e. b before the chunk, 0)."""
    r = _rows_of(gt)
    hit = functools.reduce(jnp.logical_or, [r == i for i in rows])
    return jnp.sum(jnp.where(hit, gt.b, 0.0), axis=0, keepdims=True)


def is_sub_extreme(gt: Gates, sub: int):
    """Whether some gated channel decays beyond the bound within one sub-chunk of the tile."""
    C = gt.b.shape[0]
    ends = [_b_at(gt, I * sub + sub - 1) for I in range(C // sub)]   # one masked sum each
    starts = [jnp.zeros_like(ends[0])] + ends[:-1]                   # b before the chunk: 0
    decays = [jnp.max(start - end) for start, end in zip(starts, ends)]   # b falls
    return functools.reduce(jnp.maximum, decays) > MAX_CHUNK_DECAY


def _sub_term(gt: Gates, masks, sub: int, I):
    """Target sub-chunk I's factored term (e_t [C, D], e_i [C, D], keep [C, C]): the decay of a
    kept pair (t, i) is e_t[t] · e_i[i] with the reference μ_I (module docstring). I may be
    traced (a loop index); rows of e_t outside sub-chunk I and rows of e_i after it are 0, so
    nothing overflows, and the two factors of a kept pair never exceed e^{60} (i inside
    sub-chunk I) or e^{60} and 1 (i before it). Every value is 2-D (the TPU kernels' rule)."""
    rows = _rows_of(gt)
    start, end = I * sub, I * sub + sub
    in_target = jnp.logical_and(rows >= start, rows < end)   # [C, 1]
    mu = 0.5 * _b_at(gt, start - 1, end - 1)                 # (β_I + β_{I+1}) / 2, [1, D]
    e_t = jnp.exp(jnp.where(in_target, gt.b - mu, -jnp.inf))
    e_i = jnp.exp(jnp.where(rows < end, mu - gt.b, -jnp.inf))
    return e_t, e_i, jnp.logical_and(masks.intra, in_target)


def _over_sub_chunks(body, init, C: int, sub: int):
    """Σ over target sub-chunks as a loop (one term live at a time: an unrolled sum kept every
    term's [C, D] factors live and slowed the kernels' other paths on the GPU)."""
    return lax.fori_loop(0, C // sub, body, init)


def intra_output_sub(q, k, v, gt, masks, *, key_gated, scale, dot, sub):
    """The within-chunk part of o [C, BV] as the sub-chunk tier's sum of factored terms."""
    C = q.shape[0]
    if key_gated:
        q32, k32 = q.astype(f32), k.astype(f32)

        def add_term(I, A):
            e_t, e_i, keep = _sub_term(gt, masks, sub, I)
            return A + jnp.where(keep, dot.nt(q32 * e_t, k32 * e_i), 0.0)

        A = _over_sub_chunks(add_term, jnp.zeros((C, C), f32), C, sub)
        return dot.nn(scale * A, v)
    raw = scale * dot.nt(q, k)
    v32 = v.astype(f32)

    def add_term(I, o):
        e_t, e_i, keep = _sub_term(gt, masks, sub, I)
        return o + e_t * dot.nn(jnp.where(keep, raw, 0.0), v32 * e_i)

    return _over_sub_chunks(add_term, jnp.zeros((C, v.shape[1]), f32), C, sub)


def intra_grads_sub(q, k, v, do, gt, masks, *, key_gated, scale, dot, sub):
    """(dq, dk, dv, db) of the within-chunk part, sub-chunk tier (intra_grads_fast's algebra
    per term: each term is a product through its own reference, so db collects
    dq̂ ⊙ q̂ − dk̂ ⊙ k̂ (key gate) or dY ⊙ (A v̂) − dv̂ ⊙ v̂ (value gate) term by term; the
    reference μ_I cancels within its term, so it is held constant)."""
    C = q.shape[0]
    q32, k32, v32, do32 = (x.astype(f32) for x in (q, k, v, do))
    zeros_k, zeros_v = jnp.zeros(q.shape, f32), jnp.zeros(v.shape, f32)
    if key_gated:
        dA_all = scale * dot.nt(do, v)

        def add_term(I, carry):
            A, dq, dk, db = carry
            e_t, e_i, keep = _sub_term(gt, masks, sub, I)
            q_hat, k_hat = dot.rounded(q32 * e_t), dot.rounded(k32 * e_i)
            A = A + scale * jnp.where(keep, dot.nt(q_hat, k_hat), 0.0)
            dA = jnp.where(keep, dA_all, 0.0)
            dq_hat, dk_hat = dot.nn(dA, k_hat), dot.tn(dA, q_hat)
            return (A, dq + dq_hat * e_t, dk + dk_hat * e_i,
                    db + dq_hat * q_hat - dk_hat * k_hat)

        A, dq, dk, db = _over_sub_chunks(
            add_term, (jnp.zeros((C, C), f32), zeros_k, zeros_k, zeros_k), C, sub)
        return dq, dk, dot.tn(A, do), db
    raw = scale * dot.nt(q, k)

    def add_term(I, carry):
        dA_sum, dv, db = carry
        e_t, e_i, keep = _sub_term(gt, masks, sub, I)
        A = jnp.where(keep, raw, 0.0)
        v_hat, dY = dot.rounded(v32 * e_i), dot.rounded(do32 * e_t)
        dv_hat = dot.tn(A, dY)
        return (dA_sum + jnp.where(keep, dot.nt(dY, v_hat), 0.0), dv + dv_hat * e_i,
                db + dY * dot.nn(A, v_hat) - dv_hat * v_hat)

    dA_sum, dv, db = _over_sub_chunks(
        add_term, (jnp.zeros((C, C), f32), zeros_v, zeros_v), C, sub)
    dA_sum = scale * dA_sum
    return dot.nn(dA_sum, k), dot.tn(dA_sum, q), dv, db


def _strong_path(sub_tier, exact, gt, sub: int, C: int):
    """The branch a tile past the bound takes: the sub-chunk tier where enabled and every
    sub-chunk stays within the bound; else exact."""
    if not sub or sub >= C:
        return exact
    return lambda *a: lax.cond(is_sub_extreme(gt, sub), exact, sub_tier, *a)


def _strong_gate_path(fast, sub_tier, exact, gt, sub: int, C: int):
    """The branch a tile takes: fast unless its gate passes the bound over the chunk; then
    `_strong_path`."""
    strong = _strong_path(sub_tier, exact, gt, sub, C)
    return lambda *a: lax.cond(is_extreme(gt), strong, fast, *a)


def _pair_decay(gt: Gates, masks, i):
    """[C, D] exp(b_t − b_i) for the targets t that position i reaches, 0 elsewhere."""
    b_i = common.pick_row(gt.b, i)
    reach = masks.column(i)[:, None]
    return jnp.exp(jnp.where(reach, gt.b - b_i[None, :], -jnp.inf))


def intra_output_fast(q, k, v, gt, masks, *, key_gated, scale, dot):
    A, _, _ = _scores(q, k, gt, masks, key_gated, scale, dot)
    if key_gated:
        return dot.nn(A, v)
    v_hat = v.astype(f32) * jnp.exp(gt.rho - gt.b)
    return jnp.exp(gt.b - gt.rho) * dot.nn(A, v_hat)


def _intra_output_exact(q, k, v, gt, masks, *, key_gated, scale):
    q, k, v = q.astype(f32), k.astype(f32), v.astype(f32)

    def source(i, o):
        k_i, v_i = common.pick_row(k, i), common.pick_row(v, i)
        decay = _pair_decay(gt, masks, i)
        if key_gated:
            a = scale * jnp.sum(q * k_i[None, :] * decay, axis=1)
            return o + a[:, None] * v_i[None, :]
        a = scale * jnp.sum(q * k_i[None, :], axis=1)
        return o + a[:, None] * decay * v_i[None, :]

    return lax.fori_loop(0, q.shape[0], source, jnp.zeros(v.shape, f32))


def intra_output(q, k, v, gt: Gates, masks, *, key_gated, scale, dot, sub=0, apart=None):
    """The within-chunk part of o [C, BV] (fast, sub-chunk or exact path, chosen per tile).
    apart (None: that branch here): whether the tile is past the bound (is_extreme_tile);
    then the fast path only, 0 for such a tile, whose term `intra_output_strong` computes in
    a kernel of its own (the strong paths' code in the same kernel costs the fast path
    registers, see Tuning.strong_gates_apart)."""
    kw = dict(key_gated=key_gated, scale=scale)
    if apart is not None:
        # the fast path of a tile past the bound may hold inf or nan: selected away
        return jnp.where(apart, 0.0, intra_output_fast(q, k, v, gt, masks, dot=dot, **kw))
    return _strong_gate_path(
        lambda q, k, v: intra_output_fast(q, k, v, gt, masks, dot=dot, **kw),
        lambda q, k, v: intra_output_sub(q, k, v, gt, masks, dot=dot, sub=sub, **kw),
        lambda q, k, v: _intra_output_exact(q, k, v, gt, masks, **kw),
        gt, sub, q.shape[0])(q, k, v)


def intra_output_strong(q, k, v, gt: Gates, masks, *, key_gated, scale, dot, sub=0):
    """The within-chunk part of o [C, BV] of a tile past the bound: the sub-chunk tier, or the
    exact loop where a sub-chunk is past the bound too (or the tier is off)."""
    kw = dict(key_gated=key_gated, scale=scale)
    return _strong_path(
        lambda q, k, v: intra_output_sub(q, k, v, gt, masks, dot=dot, sub=sub, **kw),
        lambda q, k, v: _intra_output_exact(q, k, v, gt, masks, **kw),
        gt, sub, q.shape[0])(q, k, v)


def output(q, k, v, S, gt: Gates, masks, *, key_gated, scale, dot, sub=0, apart=None):
    """o [C, BV] of one chunk from its inputs and the entering state S (sub: the sub-chunk
    tier's size, 0 for none; apart: see intra_output)."""
    if key_gated:
        q_start = q.astype(f32) * (jnp.exp(gt.b) * masks.from_state[:, None])
        inter = scale * dot.nn(q_start, S)
    else:
        inter = jnp.exp(gt.b) * dot.nn(q, S) * (scale * masks.from_state[:, None])
    return inter + intra_output(q, k, v, gt, masks, key_gated=key_gated, scale=scale, dot=dot,
                                sub=sub, apart=apart)


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


def intra_grads_fast(q, k, v, do, gt, masks, *, key_gated, scale, dot):
    A, q_hat, k_hat = _scores(q, k, gt, masks, key_gated, scale, dot)
    if key_gated:
        dA = scale * jnp.where(masks.intra, dot.nt(do, v), 0.0)
        dv = dot.tn(A, do)
        dq_hat, dk_hat = dot.nn(dA, k_hat), dot.tn(dA, q_hat)
        dq = dq_hat * jnp.exp(gt.b - gt.rho)
        dk = dk_hat * jnp.exp(gt.rho - gt.b)
        db = dq_hat * dot.rounded(q_hat) - dk_hat * dot.rounded(k_hat)
        return dq, dk, dv, db
    v_hat = dot.rounded(v.astype(f32) * jnp.exp(gt.rho - gt.b))
    out_factor = jnp.exp(gt.b - gt.rho)
    dY = dot.rounded(do.astype(f32) * out_factor)
    dv_hat = dot.tn(A, dY)
    dA = scale * jnp.where(masks.intra, dot.nt(dY, v_hat), 0.0)
    dq, dk = dot.nn(dA, k), dot.tn(dA, q)
    dv = dv_hat * jnp.exp(gt.rho - gt.b)
    db = dY * dot.nn(A, v_hat) - dv_hat * v_hat  # do ⊙ (intra o) − dv̂ ⊙ v̂
    return dq, dk, dv, db


def _intra_grads_exact(q, k, v, do, gt, masks, *, key_gated, scale):
    q, k, v, do = (x.astype(f32) for x in (q, k, v, do))
    C = q.shape[0]
    rows = lax.broadcasted_iota(jnp.int32, (C, 1), 0)

    def source(i, carry):
        dq, dk, dv, db = carry
        k_i, v_i = common.pick_row(k, i), common.pick_row(v, i)
        decay = _pair_decay(gt, masks, i)
        if key_gated:  # o_t += a_t v_i, a_t = scale Σ_k q_tk k_ik decay_tk
            a = scale * jnp.sum(q * k_i[None, :] * decay, axis=1)
            da = scale * jnp.sum(do * v_i[None, :], axis=1)
            pair = da[:, None] * q * k_i[None, :] * decay  # d(o)/d(b_t) terms, [C, K]
            dq = dq + da[:, None] * k_i[None, :] * decay
            dk_i = jnp.sum(da[:, None] * q * decay, axis=0)
            dv_i = jnp.sum(a[:, None] * do, axis=0)
        else:  # o_t += a_t decay_t v_i, a_t = scale q_t·k_i
            a = scale * jnp.sum(q * k_i[None, :], axis=1)
            through = do * decay * v_i[None, :]
            da = scale * jnp.sum(through, axis=1)
            pair = a[:, None] * through  # [C, BV]
            dq = dq + da[:, None] * k_i[None, :]
            dk_i = jnp.sum(da[:, None] * q, axis=0)
            dv_i = jnp.sum(a[:, None] * decay * do, axis=0)
        at_i = rows == i
        dk = dk + jnp.where(at_i, dk_i[None, :], 0.0)
        dv = dv + jnp.where(at_i, dv_i[None, :], 0.0)
        db = db + pair - jnp.where(at_i, jnp.sum(pair, axis=0)[None, :], 0.0)
        return dq, dk, dv, db

    zeros = (jnp.zeros(q.shape, f32), jnp.zeros(k.shape, f32), jnp.zeros(v.shape, f32),
             jnp.zeros(gt.b.shape, f32))
    return lax.fori_loop(0, C, source, zeros)


def intra_grads_strong(q, k, v, do, gt: Gates, masks, *, key_gated, scale, dot, sub=0):
    """The within-chunk part of (dq, dk, dv, db) of a tile past the bound: the sub-chunk tier,
    or the exact loop where a sub-chunk is past the bound too (or the tier is off)."""
    kw = dict(key_gated=key_gated, scale=scale)
    return _strong_path(
        lambda q, k, v, do: intra_grads_sub(q, k, v, do, gt, masks, dot=dot, sub=sub, **kw),
        lambda q, k, v, do: _intra_grads_exact(q, k, v, do, gt, masks, **kw),
        gt, sub, q.shape[0])(q, k, v, do)


def grads(q, k, v, do, S, dS, gt: Gates, masks, *, key_gated, scale, dot, sub=0, apart=None,
          identity=False):
    """(dq, dk, dv, db) of one chunk; db is the gradient of b (the caller reverse-cumsums it).

    S: state entering the chunk; dS: gradient of the state leaving it; sub: the sub-chunk
    tier's size (0: none); apart (None: the strong-gate branch here): whether the tile is
    past the bound as the strong kernel decides it (is_extreme_tile, on the tile that kernel
    takes: the whole K for the key blocks of a loop); then the within-chunk terms of the
    fast path only, 0 for such a tile (`intra_grads_strong` computes them).
    identity (key gate only; Tuning.key_gate_grad_identity): db from the finished dq and dk,
    db = q ⊙ dq − k ⊙ dk plus the last row's terms, instead of summed term by term.
    """
    C = q.shape[0]
    last_row = lax.broadcasted_iota(jnp.int32, (C, 1), 0) == C - 1
    from_ = masks.from_state[:, None]
    kw = dict(key_gated=key_gated, scale=scale)
    if apart is not None:   # the fast path only; a tile past the bound: 0
        dq, dk, dv, db = (jnp.where(apart, 0.0, x) for x in
                          intra_grads_fast(q, k, v, do, gt, masks, dot=dot, **kw))
    else:
        dq, dk, dv, db = _strong_gate_path(
            lambda q, k, v, do: intra_grads_fast(q, k, v, do, gt, masks, dot=dot, **kw),
            lambda q, k, v, do: intra_grads_sub(q, k, v, do, gt, masks, dot=dot, sub=sub,
                                                **kw),
            lambda q, k, v, do: _intra_grads_exact(q, k, v, do, gt, masks, **kw),
            gt, sub, C)(q, k, v, do)
    if key_gated:  # the state terms: q̄ = q e^{b}·from reads S, k̄ = k e^{b_C−b}·into writes it
        e_b = jnp.exp(gt.b) * from_
        k_bar = k.astype(f32) * gt.to_end
        dq_bar = scale * dot.nt(do, S)
        dk_bar = dot.nt(v, dS)
        dq = dq + dq_bar * e_b
        dk = dk + dk_bar * gt.to_end
        dv = dv + dot.nn(k_bar, dS)
        db = (key_gate_grad(q, k, dq, dk) if identity
              else db + dq_bar * (q.astype(f32) * e_b) - dk_bar * k_bar)
        db_last = jnp.sum(dk_bar * k_bar, axis=0) + gt.decay_last * jnp.sum(S * dS, axis=1)
    else:  # X = scale (q S)·from is read with e^{b}; v̄ = v e^{b_C−b}·into writes the state
        v_bar = v.astype(f32) * gt.to_end
        e_b = jnp.exp(gt.b)
        X = dot.nn(q, S) * (scale * from_)
        dX = do.astype(f32) * e_b * from_
        dv_bar = dot.nn(k, dS)
        dq = dq + scale * dot.nt(dX, S)
        dk = dk + dot.nt(v_bar, dS)
        dv = dv + dv_bar * gt.to_end
        db = db + do.astype(f32) * e_b * X - dv_bar * v_bar
        db_last = jnp.sum(dv_bar * v_bar, axis=0) + gt.decay_last * jnp.sum(S * dS, axis=0)
    db = db + jnp.where(last_row, db_last[None, :], 0.0)
    return dq, dk, dv, db


# The gradients of one chunk in two parts, for two kernels (Tuning.split_grads_bwd): fewer
# values live in each than in `grads`. The query side (dq and its share of db) reads the
# entering state S; the key/value side (dk, dv and the rest of db) reads dS, and S for the
# last row's decay term only. Fast within-chunk path only: a tile past the bound (apart) gets
# its within-chunk terms from intra_grads_strong's kernel. The same algebra as `grads`, its db
# split as db = db_q + db_kv.

def grads_query_side(q, k, v, do, S, gt: Gates, masks, *, key_gated, scale, dot, apart,
                     identity=False):
    """(dq, db_q) of one chunk: dq and the terms of db that pair with it (key gate:
    dq̂ ⊙ q̂ + dq̄ ⊙ q̄; value gate: do ⊙ o, both of o's terms)."""
    from_ = masks.from_state[:, None]
    q32 = q.astype(f32)
    if key_gated:
        q_hat = q32 * jnp.exp(gt.b - gt.rho)
        k_hat = k.astype(f32) * jnp.exp(gt.rho - gt.b)
        dA = scale * jnp.where(masks.intra, dot.nt(do, v), 0.0)
        dq_hat = dot.nn(dA, k_hat)
        dq = jnp.where(apart, 0.0, dq_hat * jnp.exp(gt.b - gt.rho))
        db = jnp.where(apart, 0.0, dq_hat * dot.rounded(q_hat))
        e_b = jnp.exp(gt.b) * from_
        dq_bar = scale * dot.nt(do, S)
        dq = dq + dq_bar * e_b
        return dq, (q32 * dq if identity else db + dq_bar * (q32 * e_b))
    A = scale * jnp.where(masks.intra, dot.nt(q, k), 0.0)
    v_hat = dot.rounded(v.astype(f32) * jnp.exp(gt.rho - gt.b))
    do32 = do.astype(f32)
    dY = dot.rounded(do32 * jnp.exp(gt.b - gt.rho))
    dA = scale * jnp.where(masks.intra, dot.nt(dY, v_hat), 0.0)
    dq = jnp.where(apart, 0.0, dot.nn(dA, k))
    db = jnp.where(apart, 0.0, dY * dot.nn(A, v_hat))
    e_b = jnp.exp(gt.b)
    X = dot.nn(q, S) * (scale * from_)
    dX = do32 * e_b * from_
    return dq + scale * dot.nt(dX, S), db + do32 * e_b * X


def grads_key_value_side(q, k, v, do, S, dS, gt: Gates, masks, *, key_gated, scale, dot,
                         apart, identity=False):
    """(dk, dv, db_kv) of one chunk: dk, dv and the rest of db (key gate: −dk̂ ⊙ k̂ − dk̄ ⊙ k̄;
    value gate: −dv̂ ⊙ v̂ − dv̄ ⊙ v̄; plus the last row's Σ dk̄⊙k̄ (dv̄⊙v̄) + e^{b_C} Σ S⊙dS)."""
    C = q.shape[0]
    last_row = lax.broadcasted_iota(jnp.int32, (C, 1), 0) == C - 1
    A, q_hat, k_hat = _scores(q, k, gt, masks, key_gated, scale, dot)
    if key_gated:
        dA = scale * jnp.where(masks.intra, dot.nt(do, v), 0.0)
        dk_hat = dot.tn(dA, q_hat)
        dk = jnp.where(apart, 0.0, dk_hat * jnp.exp(gt.rho - gt.b))
        dv = jnp.where(apart, 0.0, dot.tn(A, do))
        db = jnp.where(apart, 0.0, -dk_hat * dot.rounded(k_hat))
        k_bar = k.astype(f32) * gt.to_end
        dk_bar = dot.nt(v, dS)
        dk = dk + dk_bar * gt.to_end
        dv = dv + dot.nn(k_bar, dS)
        db = -k.astype(f32) * dk if identity else db - dk_bar * k_bar
        db_last = jnp.sum(dk_bar * k_bar, axis=0) + gt.decay_last * jnp.sum(S * dS, axis=1)
    else:
        v_hat = dot.rounded(v.astype(f32) * jnp.exp(gt.rho - gt.b))
        dY = dot.rounded(do.astype(f32) * jnp.exp(gt.b - gt.rho))
        dv_hat = dot.tn(A, dY)
        dA = scale * jnp.where(masks.intra, dot.nt(dY, v_hat), 0.0)
        dk = jnp.where(apart, 0.0, dot.tn(dA, q))
        dv = jnp.where(apart, 0.0, dv_hat * jnp.exp(gt.rho - gt.b))
        db = jnp.where(apart, 0.0, -dv_hat * v_hat)
        v_bar = v.astype(f32) * gt.to_end
        dv_bar = dot.nn(k, dS)
        dk = dk + dot.nt(v_bar, dS)
        dv = dv + dv_bar * gt.to_end
        db = db - dv_bar * v_bar
        db_last = jnp.sum(dv_bar * v_bar, axis=0) + gt.decay_last * jnp.sum(S * dS, axis=0)
    return dk, dv, db + jnp.where(last_row, db_last[None, :], 0.0)


def key_gate_grad(q, k, dq, dk):
    """db = q ⊙ dq − k ⊙ dk of a key-gated chunk, from its finished dq and dk [C, K] (the
    last row's terms apart). Why it holds: b enters every term as e^{b_t} beside q_t (q̂, q̄)
    or as e^{−b_i} beside k_i (k̂, k̄), so ∂/∂b_t of each term is its q_t (k_t) factor times
    the gradient that reaches q_t (k_t), with the sign of the exponent: the module
    docstring's sum dq̂⊙q̂ + dq̄⊙q̄ − dk̂⊙k̂ − dk̄⊙k̄. Holds for every intra-chunk path (fast,
    sub-chunk, exact), per key channel (so per key block) and per value block (a sum over
    value channels). Computed once from tiles that stay live anyway, it spares the kernel
    the accumulator that the term-by-term sum keeps across its matmuls (kernel_registers,
    Tuning.key_gate_grad_identity)."""
    return q.astype(f32) * dq - k.astype(f32) * dk


def reverse_cumsum(x):
    """Σ_{t ≥ j} x_t along axis 0 (Triton has no reverse scan)."""
    return jnp.sum(x, axis=0)[None, :] - jnp.cumsum(x, axis=0) + x
