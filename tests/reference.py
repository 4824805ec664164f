"""Independent references in plain NumPy float64: the recurrences of DESIGN.md, one step at a time.

Nothing here imports `gsa_jax`: these loops are what the JAX forms are checked against, written
from the equations, not from the code under test. They are slow (Python loops over batch, heads
and time) and meant for the small shapes of the tests.

Per kv-head, with M slots (grouped heads: q-head h reads kv-head h // (H // Hkv)):

    Hk_t = Hk_{t-1} · diag(exp g_t) + k_t s_tᵀ          Hk ∈ R^{K×M}
    z_t  = scale · Hk_tᵀ q_t,   p_t = act(z_t)           act = softmax | swish | relu | relu²
    Hv_t = diag(exp g_t) · Hv_{t-1} + s_t v_tᵀ          Hv ∈ R^{M×V}
    o_t  = Hv_tᵀ p_t

Segments: the state is reset to zero wherever the segment id differs from the previous position;
the first segment of a row starts from the initial state.
"""

from __future__ import annotations

import numpy as np


def _act(z: np.ndarray, kind: str) -> np.ndarray:
    if kind == "softmax":
        e = np.exp(z - z.max())
        return e / e.sum()
    if kind == "swish":
        return z / (1.0 + np.exp(-z))
    if kind == "relu":
        return np.maximum(z, 0.0)
    if kind == "relu2":
        return np.maximum(z, 0.0) ** 2
    raise ValueError(kind)


def _resets(segment_ids, B: int, T: int) -> np.ndarray:
    """[B, T] bool: True where the state must be zeroed before the step."""
    reset = np.zeros((B, T), dtype=bool)
    if segment_ids is not None:
        ids = np.asarray(segment_ids)
        reset[:, 1:] = ids[:, 1:] != ids[:, :-1]
    return reset


def gsa_reference(q, k, v, s, g, *, scale=None, initial_state=None, segment_ids=None,
                  slot_activation="softmax"):
    """Gated slot attention by its literal recurrence.

    Args:
      q [B, T, H, K]; k [B, T, Hkv, K]; v [B, T, Hkv, V]; s, g [B, T, Hkv, M];
      initial_state: (Hk [B, Hkv, K, M], Hv [B, Hkv, M, V]) or None;
      segment_ids: [B, T] ints or None.
    Returns:
      (o [B, T, H, V], (Hk, Hv) final state), all float64 NumPy.
    """
    q, k, v, s, g = (np.asarray(x, dtype=np.float64) for x in (q, k, v, s, g))
    B, T, H, K = q.shape
    Hkv, V, M = k.shape[2], v.shape[3], s.shape[3]
    group = H // Hkv
    scale = K ** -0.5 if scale is None else scale
    reset = _resets(segment_ids, B, T)
    o = np.zeros((B, T, H, V))
    hk_final = np.zeros((B, Hkv, K, M))
    hv_final = np.zeros((B, Hkv, M, V))
    for b in range(B):
        for j in range(Hkv):
            if initial_state is None:
                hk, hv = np.zeros((K, M)), np.zeros((M, V))
            else:
                hk = np.array(initial_state[0][b, j], dtype=np.float64)
                hv = np.array(initial_state[1][b, j], dtype=np.float64)
            for t in range(T):
                if reset[b, t]:
                    hk, hv = np.zeros((K, M)), np.zeros((M, V))
                decay = np.exp(g[b, t, j])  # [M]
                hk = hk * decay[None, :] + np.outer(k[b, t, j], s[b, t, j])
                hv = decay[:, None] * hv + np.outer(s[b, t, j], v[b, t, j])
                for h in range(j * group, (j + 1) * group):
                    p = _act(scale * hk.T @ q[b, t, h], slot_activation)
                    o[b, t, h] = hv.T @ p
            hk_final[b, j], hv_final[b, j] = hk, hv
    return o, (hk_final, hv_final)


def gla_reference(q, k, v, g, *, gate_axis, scale=None, initial_state=None, segment_ids=None):
    """Gated linear attention by its literal recurrence.

        gate_axis="key":   S_t = diag(exp g_t) S_{t-1} + k_t v_tᵀ
        gate_axis="value": S_t = S_{t-1} diag(exp g_t) + k_t v_tᵀ
        o_t = scale · S_tᵀ q_t

    Args:
      q [B, T, H, K]; k [B, T, Hkv, K]; v [B, T, Hkv, V]; g [B, T, Hkv, K or V];
      initial_state [B, Hkv, K, V] or None; segment_ids [B, T] or None.
    Returns:
      (o [B, T, H, V], final state [B, Hkv, K, V]), float64 NumPy.
    """
    q, k, v, g = (np.asarray(x, dtype=np.float64) for x in (q, k, v, g))
    B, T, H, K = q.shape
    Hkv, V = k.shape[2], v.shape[3]
    group = H // Hkv
    scale = K ** -0.5 if scale is None else scale
    reset = _resets(segment_ids, B, T)
    o = np.zeros((B, T, H, V))
    final = np.zeros((B, Hkv, K, V))
    for b in range(B):
        for j in range(Hkv):
            S = (np.zeros((K, V)) if initial_state is None
                 else np.array(initial_state[b, j], dtype=np.float64))
            for t in range(T):
                if reset[b, t]:
                    S = np.zeros((K, V))
                decay = np.exp(g[b, t, j])
                S = decay[:, None] * S if gate_axis == "key" else S * decay[None, :]
                S = S + np.outer(k[b, t, j], v[b, t, j])
                for h in range(j * group, (j + 1) * group):
                    o[b, t, h] = scale * S.T @ q[b, t, h]
            final[b, j] = S
    return o, final
