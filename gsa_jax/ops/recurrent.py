"""Recurrent form of gated linear attention (GLA): the definition, one time step at a time.

Per head, with state S ∈ R^{K×V}, input q_t, k_t ∈ R^K, v_t ∈ R^V and log gate g_t ≤ 0:

    gate on the key axis   (g_t ∈ R^K):  S_t = diag(exp g_t) · S_{t-1} + k_t v_tᵀ
    gate on the value axis (g_t ∈ R^V):  S_t = S_{t-1} · diag(exp g_t) + k_t v_tᵀ
    output:                              o_t = scale · S_tᵀ q_t                     ∈ R^V

GSA is two such passes (see `gsa.py`): pass 1 gates its value axis (the slots), pass 2 its key
axis (the slots again). This module is the reference every other form is checked against, and
`gla_step` is the decode step.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

Array = jax.Array


def gla_step(q_t: Array, k_t: Array, v_t: Array, g_t: Array, state: Array, *,
             gate_axis: str, scale: float) -> tuple[Array, Array]:
    """One step of the recurrence.

    Args:
      q_t, k_t: [B, H, K]; v_t: [B, H, V]; g_t: [B, H, K] (gate_axis="key") or [B, H, V]
        (gate_axis="value"); state: [B, H, K, V].
    Returns:
      (o_t [B, H, V], new state [B, H, K, V]).
    """
    decay = jnp.exp(g_t)
    if gate_axis == "key":
        state = decay[..., :, None] * state
    else:
        state = state * decay[..., None, :]
    state = state + k_t[..., :, None] * v_t[..., None, :]
    o_t = scale * jnp.einsum("bhk,bhkv->bhv", q_t, state)
    return o_t, state


def gla_recurrent(q: Array, k: Array, v: Array, g: Array, *, gate_axis: str, scale: float,
                  initial_state: Array, runs: Optional[Array]) -> tuple[Array, Array]:
    """GLA by `lax.scan` over time.

    Args:
      q, k: [B, T, H, K]; v: [B, T, H, V]; g: [B, T, H, K or V] (per `gate_axis`);
      initial_state: [B, H, K, V]; runs: [B, T] contiguous-segment index or None
        (`common.segment_runs`): the state is zeroed where the run index changes.
    Returns:
      (o [B, T, H, V], final state [B, H, K, V]), in the dtype of the inputs.
    """
    B, T = q.shape[:2]
    if runs is None:
        keep = jnp.ones((T, B), q.dtype)
    else:
        previous = jnp.concatenate([jnp.zeros_like(runs[:, :1]), runs[:, :-1]], axis=1)
        keep = (runs == previous).astype(q.dtype).T  # [T, B]: 0 where a new segment starts

    def step(state, xs):
        q_t, k_t, v_t, g_t, keep_t = xs
        state = state * keep_t[:, None, None, None]
        o_t, state = gla_step(q_t, k_t, v_t, g_t, state, gate_axis=gate_axis, scale=scale)
        return state, o_t

    time_major = [jnp.swapaxes(x, 0, 1) for x in (q, k, v, g)]
    final_state, o = jax.lax.scan(step, initial_state, (*time_major, keep))
    return jnp.swapaxes(o, 0, 1), final_state
