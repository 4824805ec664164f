"""Parallel (quadratic) form of gated linear attention: every pairwise decay materialised.

With G_t = Σ_{j≤t} g_j (cumulative log gate, per gated dimension) and S_0 the initial state:

    gate on the key axis:   o_t = scale · Σ_{i≤t} Σ_k q_tk k_ik exp(G_tk − G_ik) · v_i
                                 + scale · (q_t ⊙ exp G_t)ᵀ S_0
    gate on the value axis: o_t = scale · Σ_{i≤t} (q_t·k_i) · exp(G_t − G_i) ⊙ v_i
                                 + scale · exp G_t ⊙ (S_0ᵀ q_t)

Memory is O(T² · D) per head: the reference for short sequences, not for training. The decays
are only exponentiated for i ≤ t (a masked exponent is −inf before `exp`), so they never
overflow; differences of large cumulative sums lose float32 precision over long strong-gated
sequences, which is what the chunk form is for.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

Array = jax.Array


def gla_parallel(q: Array, k: Array, v: Array, g: Array, *, gate_axis: str, scale: float,
                 initial_state: Array, runs: Optional[Array]) -> tuple[Array, Array]:
    """GLA with a materialised [T, T, D] decay tensor per head.

    Args and returns as `recurrent.gla_recurrent`.
    """
    T = q.shape[1]
    G = jnp.cumsum(g, axis=1)  # [B, T, H, D]
    causal = jnp.tril(jnp.ones((T, T), dtype=bool))  # [t, i]
    if runs is None:
        same_run = causal[None]  # [1, t, i]
        from_initial = jnp.ones(q.shape[:2], dtype=bool)  # [B, T]
        into_final = jnp.ones(q.shape[:2], dtype=bool)
        initial_survives = jnp.ones(q.shape[:1], dtype=bool)  # [B]
    else:
        same_run = causal[None] & (runs[:, :, None] == runs[:, None, :])
        from_initial = runs == 0
        into_final = runs == runs[:, -1:]
        initial_survives = runs[:, -1] == 0

    # exp(G_t − G_i) for i ≤ t in the same run, 0 elsewhere: [B, H, t, i, D].
    diff = G[:, :, None] - G[:, None, :]  # [B, t, i, H, D]
    mask = same_run[:, :, :, None, None]
    decay = jnp.exp(jnp.where(mask, diff, -jnp.inf))
    decay_from_start = jnp.exp(G) * from_initial[:, :, None, None]  # [B, T, H, D]

    if gate_axis == "key":
        scores = jnp.einsum("btHk,biHk,btiHk->bHti", q, k, decay)
        o = jnp.einsum("bHti,biHv->btHv", scores, v)
        o = o + jnp.einsum("btHk,bHkv->btHv", q * decay_from_start, initial_state)
    else:
        scores = jnp.einsum("btHk,biHk->bHti", q, k)
        o = jnp.einsum("bHti,btiHv,biHv->btHv", scores, decay, v)
        o = o + decay_from_start * jnp.einsum("btHk,bHkv->btHv", q, initial_state)
    o = scale * o

    # Final state: S_T = exp(G_T) ∘ S_0 + Σ_i k_i v_iᵀ decayed by exp(G_T − G_i), current run only.
    to_end = jnp.exp(jnp.where(into_final[:, :, None, None], G[:, -1:] - G, -jnp.inf))
    survive = jnp.exp(G[:, -1]) * initial_survives[:, None, None]  # [B, H, D]
    if gate_axis == "key":
        final_state = survive[..., :, None] * initial_state
        final_state = final_state + jnp.einsum("btHk,btHv->bHkv", k * to_end, v)
    else:
        final_state = initial_state * survive[..., None, :]
        final_state = final_state + jnp.einsum("btHk,btHv->bHkv", k, v * to_end)
    return o, final_state
