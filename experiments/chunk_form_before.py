"""The pure-JAX chunk form of GLA as it was before issue 15 (commit 02bdcdc), kept only as the
baseline that experiments/chunk_speed.py times the current form against. Not used by the library.

Its intra-chunk terms materialise [.., c, c, D] decay tensors (c = 16) and contract them in
three-operand einsums that XLA lowers to millions of dot products of two K-vectors; its chunk
states come from a `lax.scan` over chunks. Expects inputs already in the compute dtype.

The original docstring follows.

Chunkwise-parallel form of gated linear attention, in pure JAX.

The sequence is cut into chunks of C steps. With b_t the log gate accumulated inside the chunk
(b_t = Σ_{chunk start ≤ j ≤ t} g_j, so b is non-increasing), S_0 the state entering the chunk and
S_C the state leaving it (gate on the key axis shown; on the value axis the decays multiply v
instead of k and q):

    inter-chunk:  o_t ⊇ scale · (q_t ⊙ exp b_t)ᵀ S_0
    state:        S_C = diag(exp b_C) S_0 + Σ_i (k_i ⊙ exp(b_C − b_i)) v_iᵀ
    intra-chunk:  o_t ⊇ scale · Σ_{i≤t} Σ_k q_tk k_ik exp(b_tk − b_ik) · v_i

The per-chunk state contributions are computed in parallel; only the cheap elementwise carry
S ← decay ⊙ S + ΔS runs sequentially (a `lax.scan` over chunks).

Numerical safety: a decay is only ever exponentiated as a difference whose minuend is later in
time (exp(b_C − b_i), exp(b_t − b_i), i ≤ t) or relative to a reference point that lies between
the two positions. The intra-chunk term is split into sub-chunks of c ≤ 16 steps: a pair in the
same sub-chunk takes exp(b_t − b_i) directly from a [c, c, D] tensor; a pair (t, i) with i in an
earlier sub-chunk factors through the reference r = end of the sub-chunk before t's,
exp(b_t − b_i) = exp(b_t − b_r) · exp(b_r − b_i), both factors ≤ 1. Nothing overflows however
strong the gate or long the chunk; a factor that underflows stands for a product that does too.
"""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp

Array = jax.Array

SUB_CHUNK = 16


def _sub_chunk_size(chunk_size: int) -> int:
    """Largest divisor of the chunk size not above SUB_CHUNK."""
    return max(d for d in range(1, min(chunk_size, SUB_CHUNK) + 1) if chunk_size % d == 0)


def _to_chunks(x: Array, num_chunks: int, chunk_size: int) -> Array:
    """[B, T, H, D] -> [B, H, N, C, D], zero-padded at the end of time."""
    B, T, H, D = x.shape
    x = jnp.pad(x, ((0, 0), (0, num_chunks * chunk_size - T), (0, 0), (0, 0)))
    return x.transpose(0, 2, 1, 3).reshape(B, H, num_chunks, chunk_size, D)


def _masked_exp(mask: Array, exponent: Array) -> Array:
    """exp(exponent) where mask, exactly 0 elsewhere; the masked exponent never reaches exp."""
    return jnp.exp(jnp.where(mask, exponent, -jnp.inf))


def gla_chunk(q: Array, k: Array, v: Array, g: Array, *, gate_axis: str, scale: float,
              initial_state: Array, runs: Optional[Array], chunk_size: int = 64
              ) -> tuple[Array, Array]:
    """GLA chunkwise. Args and returns as `recurrent.gla_recurrent`, plus `chunk_size` (C).

    T need not be a multiple of C: the tail is padded with k = v = 0 and g = 0, which leaves the
    state untouched.
    """
    B, T, H, _ = q.shape
    C = chunk_size
    N = math.ceil(T / C)
    c = _sub_chunk_size(C)
    P = C // c
    key_gated = gate_axis == "key"

    q, k, v, g = (_to_chunks(x, N, C) for x in (q, k, v, g))  # [B, H, N, C, D]
    b = jnp.cumsum(g, axis=3)  # [B, H, N, C, Dg], non-increasing along C
    b_last = b[..., -1, :]  # [B, H, N, Dg]

    # Segment masks (all True without segments). Padding joins the last run.
    if runs is None:
        from_state = into_state = state_survives = None
    else:
        runs = jnp.pad(runs, ((0, 0), (0, N * C - T)), mode="edge").reshape(B, 1, N, C)
        run_last = runs[..., -1]  # [B, 1, N]
        run_prev = jnp.concatenate([jnp.zeros_like(run_last[..., :1]), run_last[..., :-1]], -1)
        from_state = runs == run_prev[..., None]  # t sees the state entering its chunk
        into_state = runs == run_last[..., None]  # i writes into the state leaving its chunk
        state_survives = run_last == run_prev  # the entering state survives the chunk

    # ---- chunk states: S_in[n] enters chunk n; the carry is elementwise.
    to_end = jnp.exp(b_last[..., None, :] - b)  # exp(b_C − b_i) ≤ 1
    if into_state is not None:
        to_end = to_end * into_state[..., None]
    if key_gated:
        delta = jnp.einsum("bhnck,bhncv->bhnkv", k * to_end, v)
    else:
        delta = jnp.einsum("bhnck,bhncv->bhnkv", k, v * to_end)
    chunk_decay = jnp.exp(b_last)
    if state_survives is not None:
        chunk_decay = chunk_decay * state_survives[..., None]

    def carry(state, xs):
        decay_n, delta_n = xs
        if key_gated:
            new_state = decay_n[..., :, None] * state + delta_n
        else:
            new_state = state * decay_n[..., None, :] + delta_n
        return new_state, state

    final_state, states_in = jax.lax.scan(
        carry, initial_state, (jnp.moveaxis(chunk_decay, 2, 0), jnp.moveaxis(delta, 2, 0)))
    states_in = jnp.moveaxis(states_in, 0, 2)  # [B, H, N, K, V]

    # ---- inter-chunk output, from the entering state.
    from_start = jnp.exp(b)  # exp(b_t) ≤ 1
    if from_state is not None:
        from_start = from_start * from_state[..., None]
    if key_gated:
        o = jnp.einsum("bhnck,bhnkv->bhncv", q * from_start, states_in)
    else:
        o = from_start * jnp.einsum("bhnck,bhnkv->bhncv", q, states_in)

    # ---- intra-chunk output, by sub-chunks of c steps (P per chunk).
    def subs(x):  # [B, H, N, C, D] -> [B, H, N, P, c, D]
        return x.reshape(x.shape[:3] + (P, c) + x.shape[4:])

    qs, ks, vs, bs = subs(q), subs(k), subs(v), subs(b)
    # Reference of sub-chunk p: the accumulated gate just before it (0 for the first).
    b_ref = jnp.concatenate([jnp.zeros_like(bs[..., :1, 0, :]), bs[..., :-1, -1, :]], axis=3)
    sub_of = jnp.arange(C) // c
    earlier = sub_of[None, :] < jnp.arange(P)[:, None]  # [P, C]: i before sub-chunk p
    to_ref = _masked_exp(earlier[:, :, None],
                         b_ref[..., :, None, :] - b[..., None, :, :])  # [B,H,N,P,C,Dg]
    from_ref = jnp.exp(bs - b_ref[..., None, :])  # [B, H, N, P, c, Dg]
    causal = jnp.tril(jnp.ones((c, c), dtype=bool))
    diag_decay = _masked_exp(causal[:, :, None],
                             bs[..., :, None, :] - bs[..., None, :, :])  # [B,H,N,P,c,c,Dg]

    if runs is not None:
        runs_s = runs.reshape(B, 1, N, P, c)
        rows = runs_s[..., :, None] == runs[:, :, :, None, None, :]  # [B,1,N,P,t,i over C]
        diag_same = runs_s[..., :, None] == runs_s[..., None, :]  # [B,1,N,P,t,i over c]
    else:
        rows = diag_same = None

    if key_gated:
        scores_off = jnp.einsum("bhnptk,bhnpik->bhnpti", qs * from_ref, k[:, :, :, None] * to_ref)
        scores_diag = jnp.einsum("bhnptk,bhnpik,bhnptik->bhnpti", qs, ks, diag_decay)
        if rows is not None:
            scores_off = scores_off * rows
            scores_diag = scores_diag * diag_same
        o_intra = (jnp.einsum("bhnpti,bhniv->bhnptv", scores_off, v)
                   + jnp.einsum("bhnpti,bhnpiv->bhnptv", scores_diag, vs))
    else:
        scores = jnp.einsum("bhnck,bhnik->bhnci", q, k).reshape(B, H, N, P, c, C)
        scores_diag = jnp.einsum("bhnptk,bhnpik->bhnpti", qs, ks)
        if rows is not None:
            scores = scores * rows
            scores_diag = scores_diag * diag_same
        o_intra = (from_ref * jnp.einsum("bhnpti,bhnpiv->bhnptv", scores,
                                         v[:, :, :, None] * to_ref)
                   + jnp.einsum("bhnpti,bhnptiv,bhnpiv->bhnptv", scores_diag, diag_decay, vs))
    o = scale * (o + o_intra.reshape(o.shape))

    o = o.reshape(B, H, N * C, -1)[:, :, :T].transpose(0, 2, 1, 3)
    return o, final_state
