"""Chunkwise-parallel form of gated linear attention, in pure JAX, with its FLOPs in matmuls.

The sequence is cut into chunks of C steps. With b_t the log gate accumulated inside the chunk
(b_t = Σ_{chunk start ≤ j ≤ t} g_j, non-increasing), S the state entering the chunk and S' the
state leaving it (gate on the key axis shown; on the value axis the decays multiply v and o
instead of k and q):

    inter-chunk:  o_t ⊇ scale · (q_t ⊙ exp b_t)ᵀ S
    state:        S'  = diag(exp b_C) S + Σ_i (k_i ⊙ exp(b_C − b_i)) v_iᵀ
    intra-chunk:  o_t ⊇ scale · Σ_{i≤t} Σ_k q_tk k_ik exp(b_tk − b_ik) · v_i

Intra-chunk, exact for any gate. A chunk (padded to a power of two) is cut into diagonal
blocks of c = 8 steps, and for h = c, 2c, …, C/2 into blocks of 2h steps. A pair i ≤ t either
lies in one diagonal block, where exp(b_t − b_i) is taken directly ([c, c, D] products that
only feed sums, which XLA's GPU fusion computes inside the reductions; its CPU fusions store
them), or in exactly one block of 2h steps
with i in the first half and t in the second. There, through the reference r = the first
half's last step (i ≤ r < t), the decay factors into two terms that are both ≤ 1,

    exp(b_t − b_i) = exp(b_t − b_r) · exp(b_r − b_i),

so each level is two batched matmuls per block, [h, K]·[K, h] then [h, h]·[h, V], on
q ⊙ exp(b − b_r) and k ⊙ exp(b_r − b) (value gate: on v, and on the output). No exponent is
ever positive, so nothing overflows however strong the gate; a factor that underflows stands
for a product that does too. No tensor but those summed products exceeds twice the inputs'
size or (by 1/8) the chunk states' (K·V/C per step), which any chunked form keeps.

States, by blocks of chunks instead of a sequential scan (a loop over chunks costs ~13 µs per
iteration on a GPU). With a_n = b_C of chunk n (−inf where a segment starts inside it) and
Δ_w = Σ_i (k_i ⊙ exp(b_C − b_i)) v_iᵀ what chunk w adds, the state entering chunk n of a
block of up to 8 chunks is

    S_n = Σ_{w<n} exp(Σ_{w<x<n} a_x) ⊙ Δ_w + exp(Σ_{x<n} a_x) ⊙ S_block

a matmul over w (batched over the gated dim) with the exponents built from partial sums
(never differences of running sums, which cancel); the blocks' own entering states come from
the same recurrence one level up. Segments (`runs`) mask pairs across a segment start and the
state terms.

Backward: a `jax.custom_vjp` that keeps only the inputs. The backward pass recomputes the
chunk states (a matmul per chunk and the blocked scan) and takes the vjp of each part, whose
transposes are matmuls again. The intra-chunk reference b_r enters only through differences,
so its gradient is exactly zero and is not formed (`stop_gradient`): the gradient of b is then
the GLA identity q ⊙ dq − k ⊙ dk term by term, with no cancelling pair.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

Array = jax.Array

DIAGONAL = 8  # steps per diagonal block, whose pairs take their decays directly
SCAN_BLOCK = 8  # chunks per block of the state scan (its matmuls' contraction)


class _Masks(NamedTuple):
    """Segment masks of the chunked sequence, one row per chunk (see `_masks`)."""

    runs: Array  # [G, C] run index of each step
    from_state: Array  # [G, C] step t sees the state entering its chunk
    into_state: Array  # [G, C] step i writes into the state leaving its chunk
    survives: Array  # [G] the entering state survives the chunk


def _chunked(x: Array, num_chunks: int, chunk_size: int, padded: int) -> Array:
    """[B, T, H, D] -> [G = B·H·N, C', D], one row per chunk: time zero-padded to N·C, each
    chunk to C' steps. (All arrays of the form have rank 5 at most: some rank-7 broadcast
    products crashed jaxlib 0.10's CPU fusion runtime.)"""
    B, T, H, D = x.shape
    x = jnp.pad(x, ((0, 0), (0, num_chunks * chunk_size - T), (0, 0), (0, 0)))
    x = x.reshape(B, num_chunks, chunk_size, H, D)
    x = jnp.pad(x, ((0, 0), (0, 0), (0, padded - chunk_size), (0, 0), (0, 0)))
    return x.transpose(0, 3, 1, 2, 4).reshape(B * H * num_chunks, padded, D)


def _unchunked(y: Array, shape: tuple, chunk_size: int) -> Array:
    """Inverse of `_chunked`: [G, C', D] -> [B, T, H, D] for shape = (B, T, H)."""
    B, T, H = shape
    N = math.ceil(T / chunk_size)
    y = y.reshape((B, H, N) + y.shape[1:])[:, :, :, :chunk_size].transpose(0, 2, 3, 1, 4)
    return y.reshape(B, N * chunk_size, H, -1)[:, :T]


def _masks(runs: Optional[Array], heads: int, chunk_size: int, padded: int
           ) -> Optional[_Masks]:
    """Masks from the run index [B, T] (None: no segments); padding joins the last run (of the
    sequence, of each chunk)."""
    if runs is None:
        return None
    B, T = runs.shape
    N = math.ceil(T / chunk_size)
    runs = jnp.pad(runs, ((0, 0), (0, N * chunk_size - T)), mode="edge")
    runs = jnp.pad(runs.reshape(B, N, chunk_size), ((0, 0), (0, 0), (0, padded - chunk_size)),
                   mode="edge")
    run_last = runs[..., -1]  # [B, N]
    run_prev = jnp.concatenate([jnp.zeros_like(run_last[:, :1]), run_last[:, :-1]], axis=1)

    def rows(x):  # [B, N, ...] -> [G, ...], the same for every head
        x = jnp.broadcast_to(x[:, None], (B, heads) + x.shape[1:])
        return x.reshape((B * heads * N,) + x.shape[3:])

    return _Masks(runs=rows(runs), from_state=rows(runs == run_prev[..., None]),
                  into_state=rows(runs == run_last[..., None]),
                  survives=rows(run_last == run_prev))


def _decay_state(decay: Array, state: Array, key_gated: bool) -> Array:
    """diag(decay) · state (key gate) or state · diag(decay) (value gate); decay [..., Dg]."""
    return decay[..., :, None] * state if key_gated else state * decay[..., None, :]


# ---- intra-chunk: diagonal blocks, then one level of cross terms per block size.

def _halves(x: Array, h: int) -> tuple[Array, Array]:
    """Axis 1 (C steps) into blocks of 2h: the first halves and second halves,
    [G, C, ...] -> 2 × [G, C/2h, h, ...]."""
    x = x.reshape((x.shape[0], x.shape[1] // (2 * h), 2, h) + x.shape[2:])
    return x[:, :, 0], x[:, :, 1]


def _diagonal_size(chunk: int) -> int:
    return min(DIAGONAL, chunk)


def _diagonal_blocks(q, k, v, b, masks: Optional[_Masks], key_gated: bool) -> Array:
    """The pairs i ≤ t inside blocks of c = DIAGONAL steps, with exp(b_t − b_i) taken directly
    (masked pairs get exponent −inf, never a positive one): [G, C, V].

    The [blocks, c, c, D] products below (c times the inputs' size) only ever feed a sum, so
    that XLA can compute each sum in one reduction over the inputs without storing them."""
    c = _diagonal_size(q.shape[1])
    if c == 1:
        return jnp.sum(q * k, axis=-1, keepdims=True) * v
    qb, kb, vb, bb = (x.reshape((-1, c) + x.shape[2:]) for x in (q, k, v, b))  # [.., c, D]
    pairs = jnp.tril(jnp.ones((c, c), dtype=bool))  # [t, i]
    if masks is not None:
        runs = masks.runs.reshape(-1, c)
        pairs = pairs & (runs[:, :, None] == runs[:, None, :])  # [blocks, t, i]
    decay = jnp.exp(jnp.where(pairs[..., None], bb[:, :, None, :] - bb[:, None, :, :],
                              -jnp.inf))  # [blocks, t, i, Dg], ≤ 1
    if key_gated:
        scores = jnp.sum(qb[:, :, None, :] * kb[:, None, :, :] * decay, axis=-1)
        o = jnp.sum(scores[..., None] * vb[:, None, :, :], axis=-2)
    else:
        scores = jnp.sum(qb[:, :, None, :] * kb[:, None, :, :], axis=-1)
        o = jnp.sum(scores[..., None] * decay * vb[:, None, :, :], axis=-2)
    return o.reshape(v.shape)


def _cross_level(q, k, v, b, masks: Optional[_Masks], h: int, key_gated: bool) -> Array:
    """Contributions of first-half sources to second-half targets in blocks of 2h steps,
    placed into the chunk (zeros at the sources' halves): [G, C, V].

    q, k: [G, C, K]; v: [G, C, V]; b: [G, C, Dg].
    """
    (_, q2), (k1, _), (v1, _), (b1, b2) = (_halves(x, h) for x in (q, k, v, b))
    # The reference: the last source step, b_t ≤ b_r ≤ b_i. The output depends on b only
    # through b_t − b_i, so b_r gets no gradient (exactly), and none is formed.
    b_ref = jax.lax.stop_gradient(b1[..., -1:, :])
    to_target = jnp.exp(b2 - b_ref)  # exp(b_t − b_r) ≤ 1
    from_source = jnp.exp(b_ref - b1)  # exp(b_r − b_i) ≤ 1
    if key_gated:
        scores = jnp.einsum("...tk,...ik->...ti", q2 * to_target, k1 * from_source)
    else:
        scores = jnp.einsum("...tk,...ik->...ti", q2, k1)
    if masks is not None:
        r1, r2 = _halves(masks.runs, h)
        scores = jnp.where(r2[..., :, None] == r1[..., None, :], scores, 0.0)
    if key_gated:
        cross = jnp.einsum("...ti,...iv->...tv", scores, v1)
    else:
        cross = to_target * jnp.einsum("...ti,...iv->...tv", scores, v1 * from_source)
    placed = jnp.stack([jnp.zeros_like(cross), cross], axis=2)
    return placed.reshape(v.shape)


def _level_sizes(chunk: int) -> list[int]:
    """Half-block sizes h = c, 2c, …, C/2 of the cross levels (c = the diagonal block)."""
    c = _diagonal_size(chunk)
    return [c << e for e in range((chunk // c).bit_length() - 1)]


def _after(done, operands, keep: bool = False):
    """`operands`, available only once `done` is computed (with keep, both): XLA then runs the
    intra-chunk parts one after the other, and each part's temporaries (a few input-sized
    arrays) are freed before the next part's are made, instead of all being alive at once."""
    done, operands = jax.lax.optimization_barrier((done, operands))
    return (done, operands) if keep else operands


def _add(xs, ys):
    return tuple(x + y for x, y in zip(xs, ys))


def _intra(q, k, v, b, masks: Optional[_Masks], key_gated: bool) -> Array:
    """Σ_{i≤t, same run} (decayed q_t·k_i) v_i within each chunk: [G, C, V]."""
    parts = [_diagonal_blocks(q, k, v, b, masks, key_gated)]
    for h in _level_sizes(q.shape[1]):
        q, k, v, b = _after(parts[-1], (q, k, v, b))
        parts.append(_cross_level(q, k, v, b, masks, h, key_gated))
    return sum(parts)


def _intra_vjp(q, k, v, b, masks: Optional[_Masks], key_gated: bool, do: Array, grads):
    """`grads` (for q, k, v, b) plus those of Σ ⟨do, `_intra`⟩, one part after the other: a
    single set of gradient arrays is alive, not one per part."""
    diagonal = functools.partial(_diagonal_blocks, masks=masks, key_gated=key_gated)
    grads = _add(grads, jax.vjp(diagonal, q, k, v, b)[1](do))
    for h in _level_sizes(q.shape[1]):
        grads, (q, k, v, b, do) = _after(grads, (q, k, v, b, do), keep=True)
        level = functools.partial(_cross_level, masks=masks, h=h, key_gated=key_gated)
        grads = _add(grads, jax.vjp(level, q, k, v, b)[1](do))
    return grads


# ---- chunk states.

def _chunk_delta(k, v, b, masks: Optional[_Masks], key_gated: bool) -> tuple[Array, Array]:
    """What each chunk adds to the state, Δ [G, K, V], and the log decay of the state across
    it, a [G, Dg] (−inf where a segment starts inside the chunk)."""
    b_last = b[:, -1]
    to_end = jnp.exp(b_last[:, None] - b)  # exp(b_C − b_i) ≤ 1
    if masks is not None:
        to_end = jnp.where(masks.into_state[..., None], to_end, 0.0)
    if key_gated:
        delta = jnp.einsum("gck,gcv->gkv", k * to_end, v)
    else:
        delta = jnp.einsum("gck,gcv->gkv", k, v * to_end)
    if masks is not None:
        b_last = jnp.where(masks.survives[:, None], b_last, -jnp.inf)
    return delta, b_last


def _scan(delta: Array, a: Array, s0: Array, key_gated: bool) -> tuple[Array, Array]:
    """States entering each chunk and the final state of S_{n+1} = exp(a_n) ⊙ S_n + Δ_n.

    delta: [G, K, V] and a: [G, Dg] log decays (≤ 0 or −inf), rows in (B, H, N) order;
    s0: [B, H, K, V]. Returns (S_in [G, K, V], S_N [B, H, K, V]).
    """
    rows = s0.shape[0] * s0.shape[1]
    s_in, final = _scan_flat(delta.reshape((rows, -1) + delta.shape[1:]),
                             a.reshape(rows, -1, a.shape[-1]),
                             s0.reshape((rows,) + s0.shape[2:]), key_gated)
    return s_in.reshape(delta.shape), final.reshape(s0.shape)


def _scan_flat(delta: Array, a: Array, s0: Array, key_gated: bool) -> tuple[Array, Array]:
    """`_scan` with the chunks on axis 1: delta [R, N, K, V], a [R, N, Dg], s0 [R, K, V] for
    R = B·H sequences. Within blocks of up to SCAN_BLOCK chunks the states are weighted sums of
    the blocks' Δ (module docstring); the blocks' entering states recurse on the block totals."""
    G, N = delta.shape[:2]
    if N == 1:
        return s0[:, None], _decay_state(jnp.exp(a[:, 0]), s0, key_gated) + delta[:, 0]
    ns = min(N, SCAN_BLOCK)
    nb = -(-N // ns)
    pad = nb * ns - N  # padded chunks add nothing and keep the state (Δ = 0, a = 0)
    delta = jnp.pad(delta, ((0, 0), (0, pad), (0, 0), (0, 0)))
    delta = delta.reshape((G * nb, ns) + delta.shape[2:])  # [G·nb, ns, K, V]
    a = jnp.pad(a, ((0, 0), (0, pad), (0, 0))).reshape(G * nb, ns, -1)

    # P[u, c] = Σ_{c ≤ x < u} a_x for rows u = 0..ns (the state entering chunk u of the block,
    # u = ns leaving it) and columns c = 0..ns (c = 0 the block's entering state, c = w + 1
    # the chunk w's Δ); summed from the terms themselves so nothing cancels.
    x_idx = jnp.arange(ns)[:, None]
    c_idx = jnp.arange(ns + 1)[None, :]
    terms = jnp.where((x_idx >= c_idx)[..., None], a[:, :, None, :], 0.0)  # [G·nb, x, c, Dg]
    partial = jnp.cumsum(terms, axis=1)
    partial = jnp.concatenate([jnp.zeros_like(partial[:, :1]), partial], axis=1)  # [.., u, c, Dg]
    u_idx = jnp.arange(ns + 1)[:, None]
    weights = jnp.exp(jnp.where((c_idx <= u_idx)[..., None], partial, -jnp.inf))  # ≤ 1

    # Σ_c over at most SCAN_BLOCK chunks: a matmul batched over the gated dim. (The same sum
    # as products summed over c, with no transposes, came out wrong in float32 on jaxlib
    # 0.10's CPU fusion runtime, 0.9 relative error.)
    if key_gated:
        local = jnp.einsum("guck,gckv->gukv", weights[:, :, 1:], delta)
    else:
        local = jnp.einsum("gucv,gckv->gukv", weights[:, :, 1:], delta)
    local = local.reshape((G, nb, ns + 1) + local.shape[2:])  # [G, nb, u, K, V]
    block_in, final = _scan_flat(local[:, :, ns], partial[:, ns, 0].reshape(G, nb, -1), s0,
                                 key_gated)
    carry = weights[:, :ns, 0].reshape(G, nb, ns, -1)  # decay from the block's start
    s_in = local[:, :, :ns] + _decay_state(carry, block_in[:, :, None], key_gated)
    return s_in.reshape((G, nb * ns) + s_in.shape[3:])[:, :N], final


def _inter(q, b, s_in, masks: Optional[_Masks], key_gated: bool) -> Array:
    """(q_t ⊙ exp b_t)ᵀ S_in of each chunk (value gate: exp b_t ⊙ q_tᵀ S_in): [G, C, V]."""
    from_start = jnp.exp(b)  # ≤ 1
    if masks is not None:
        from_start = jnp.where(masks.from_state[..., None], from_start, 0.0)
    if key_gated:
        return jnp.einsum("gck,gkv->gcv", q * from_start, s_in)
    return from_start * jnp.einsum("gck,gkv->gcv", q, s_in)


# ---- the chunk form, with its backward.

def _prepare(q, k, v, g, dtype, scale: float, chunk_size: int):
    """Chunked (scale · q, k, v) and b = Σ g inside each chunk, all [G, C', D] in `dtype`, with
    C' = C rounded up to a power of two (the chunk's tail padded like T's: k = v = 0, g = 0).
    Cast after chunking, so that a bf16 input is moved as bf16."""
    C = chunk_size
    N = math.ceil(q.shape[1] / C)
    padded = _padded(C)
    q, k, v, g = (_chunked(x, N, C, padded).astype(dtype) for x in (q, k, v, g))
    return q * scale, k, v, jnp.cumsum(g, axis=1)


def _padded(chunk_size: int) -> int:
    return 1 << (chunk_size - 1).bit_length()


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def _gla_chunk(q, k, v, g, s0, runs, key_gated: bool, scale: float, chunk_size: int):
    """`gla_chunk` on checked arguments; see there."""
    qc, kc, vc, b = _prepare(q, k, v, g, s0.dtype, scale, chunk_size)
    masks = _masks(runs, q.shape[2], chunk_size, _padded(chunk_size))
    delta, a = _chunk_delta(kc, vc, b, masks, key_gated)
    s_in, final = _scan(delta, a, s0, key_gated)
    o = _inter(qc, b, s_in, masks, key_gated) + _intra(qc, kc, vc, b, masks, key_gated)
    return _unchunked(o, q.shape[:3], chunk_size), final


def _gla_chunk_fwd(q, k, v, g, s0, runs, key_gated, scale, chunk_size):
    # Only the inputs are kept (as given: bf16 stays bf16).
    out = _gla_chunk(q, k, v, g, s0, runs, key_gated, scale, chunk_size)
    return out, (q, k, v, g, s0, runs)


def _gla_chunk_bwd(key_gated, scale, chunk_size, residuals, cotangents):
    """Recompute the chunked inputs and the chunk states, then take each part's vjp."""
    # Through a barrier, so that XLA cannot merge the recomputation below with the forward
    # pass's own values (common subexpressions) and keep those alive until here instead.
    q, k, v, g, s0, runs = jax.lax.optimization_barrier(residuals)
    do, ds_final = cotangents
    (qc, kc, vc, b), prepare_vjp = jax.vjp(
        lambda q, k, v, g: _prepare(q, k, v, g, s0.dtype, scale, chunk_size), q, k, v, g)
    masks = _masks(runs, q.shape[2], chunk_size, _padded(chunk_size))
    N = math.ceil(q.shape[1] / chunk_size)
    do = _chunked(do, N, chunk_size, _padded(chunk_size))  # the transpose of `_unchunked`
    (delta, a), delta_vjp = jax.vjp(
        lambda k, v, b: _chunk_delta(k, v, b, masks, key_gated), kc, vc, b)
    (s_in, _), scan_vjp = jax.vjp(lambda d, a, s0: _scan(d, a, s0, key_gated), delta, a, s0)
    _, inter_vjp = jax.vjp(lambda q, b, s: _inter(q, b, s, masks, key_gated), qc, b, s_in)
    dq, db, ds_in = inter_vjp(do)
    d_delta, da, ds0 = scan_vjp((ds_in, ds_final))
    dk, dv, db_state = delta_vjp((d_delta, da))
    grads, (qc, kc, vc, b, do) = _after((dq, dk, dv, db + db_state), (qc, kc, vc, b, do),
                                        keep=True)
    grads = _intra_vjp(qc, kc, vc, b, masks, key_gated, do, grads)
    return prepare_vjp(grads) + (ds0, None)


_gla_chunk.defvjp(_gla_chunk_fwd, _gla_chunk_bwd)


def gla_chunk(q: Array, k: Array, v: Array, g: Array, *, gate_axis: str, scale: float,
              initial_state: Array, runs: Optional[Array], chunk_size: int = 64
              ) -> tuple[Array, Array]:
    """GLA chunkwise. Args and returns as `recurrent.gla_recurrent`, plus `chunk_size` (C);
    computes in the dtype of `initial_state` whatever the inputs' floating dtype.

    T need not be a multiple of C: the tail is padded with k = v = 0 and g = 0, which leaves the
    state untouched. A C that is not a power of two is padded to one inside every chunk the same
    way (so 36 computes like 64: a power of two is the efficient choice).
    """
    return _gla_chunk(q, k, v, g, initial_state, runs, gate_axis == "key", float(scale),
                      int(chunk_size))
