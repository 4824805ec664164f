"""Gated Slot Attention (GSA; Zhang, Yang et al., NeurIPS 2024): two gated linear attention passes.

Per head, with M slots, write weights s_t ∈ R^M and log forget gate g_t ∈ R^M (g ≤ 0):

    pass 1 (key memory Hk ∈ R^{K×M}):    Hk_t = Hk_{t-1} · diag(exp g_t) + k_t s_tᵀ
                                          z_t  = scale · Hk_tᵀ q_t               ∈ R^M
    between the passes:                   p_t  = softmax(z_t)   (or swish/relu/relu² ablations)
    pass 2 (value memory Hv ∈ R^{M×V}):  Hv_t = diag(exp g_t) · Hv_{t-1} + s_t v_tᵀ
                                          o_t  = Hv_tᵀ p_t                        ∈ R^V

Pass 1 is GLA gated on its value axis with (q, k, v) = (q, k, s); pass 2 is GLA gated on its key
axis with (q, k, v) = (p, s, v) and scale 1.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp

from gsa_jax import checks
from gsa_jax.ops import common, pallas
from gsa_jax.ops.gla import IMPLS, kv_heads_for_forms, resolve_impl, run_form
from gsa_jax.ops.recurrent import gla_step

Array = jax.Array
GSAState = tuple[Array, Array]  # (Hk [B, Hkv, K, M], Hv [B, Hkv, M, V])


def _check_state(fn: str, state, B: int, Hkv: int, K: int, M: int, V: int) -> None:
    if state is None:
        return
    if not isinstance(state, (tuple, list)) or len(state) != 2:
        raise ValueError(f"{fn}: the state must be a pair (Hk [B, Hkv, K, M], Hv [B, Hkv, M, V]), "
                         f"got {type(state).__name__}")
    common.check_floating(fn, **{"state[0] (Hk)": state[0], "state[1] (Hv)": state[1]})
    common.check_state(fn, "state[0] (Hk)", state[0], (B, Hkv, K, M))
    common.check_state(fn, "state[1] (Hv)", state[1], (B, Hkv, M, V))


def _check_dims(fn, q, k, v, s, g):
    K = common.check_same_dim(fn, "key dims of q and k", [("q", q.shape, -1), ("k", k.shape, -1)])
    M = common.check_same_dim(fn, "slot counts of s and g", [("s", s.shape, -1),
                                                            ("g", g.shape, -1)])
    return K, M, v.shape[-1]


def gated_slot_attention(
    q: Array, k: Array, v: Array, s: Array, g: Array, *,
    scale: Optional[float] = None,
    initial_state: Optional[GSAState] = None,
    return_final_state: bool = False,
    segment_ids: Optional[Array] = None,
    impl: str = "auto",
    chunk_size: int = 64,
    slot_activation: str = "softmax",
    recompute_states: bool = False,
) -> tuple[Array, Optional[GSAState]]:
    """GSA over a sequence.

    Args:
      q: [B, T, H, K] queries.
      k: [B, T, Hkv, K] keys; H must be a multiple of Hkv (grouped heads share k, v, s, g and
        the state).
      v: [B, T, Hkv, V] values.
      s: [B, T, Hkv, M] slot write weights (the layer uses s = 1 − exp g).
      g: [B, T, Hkv, M] log forget gate, g ≤ 0 (checked on concrete arrays; under jit a
        positive g is not caught and gives undefined results).
      scale: multiplies q·k in pass 1; None means K ** -0.5 (the GSA layer passes 1.0).
      initial_state: (Hk [B, Hkv, K, M], Hv [B, Hkv, M, V]) or None (zeros).
      return_final_state: also return the state after the last step.
      segment_ids: [B, T] integer ids of packed sequences: the state is reset wherever the id
        changes, so each segment equals a separate run; the first starts from `initial_state`.
      impl: "auto" ("pallas" on a GPU or TPU where the kernels support the shapes, else
        "chunk"), "recurrent", "parallel", "chunk" or "pallas" (interpreted, slowly, on a CPU).
      chunk_size: C of the chunked forms. The chunk form takes any positive int and is exact
        for every C (a C that is not a power of two is padded to the next one inside every
        chunk, so 36 computes like 64: a power of two is the efficient choice); impl="pallas"
        takes 16, 32, 64 or 128 and refuses others; impl="auto" uses the kernels only for
        those.
      slot_activation: "softmax" (GSA) or the ablations "swish", "relu", "relu2".
      recompute_states: keep no hidden states between the forward and the backward pass and
        recompute them there (the paper's hidden-state recomputation): the Pallas kernels drop
        their per-chunk states; the other forms run under `jax.checkpoint`.
    Returns:
      (o [B, T, H, V] in q's dtype, final state (Hk, Hv) in float32 — float64 for float64
      inputs — or None). Accumulation is in float32 whatever the input dtype. T = 0 gives an
      empty o and the initial state as the final state.
    """
    fn = "gated_slot_attention"
    checks.check_choice(fn, "impl", impl, IMPLS)
    checks.check_choice(fn, "slot_activation", slot_activation, common.SLOT_ACTIVATIONS)
    checks.check_positive_int(fn, "chunk_size", chunk_size)
    B, T, Hkv, group = common.check_sequence_inputs(fn, q=q, k=k, v=v, s=s, g=g)
    K, M, V = _check_dims(fn, q, k, v, s, g)
    _check_state(fn, initial_state, B, Hkv, K, M, V)
    common.check_segment_ids(fn, segment_ids, B, T)
    common.check_log_gate(fn, g)

    dtype = common.compute_dtype(q, k, v, s, g, *(initial_state or ()))
    impl = resolve_impl(fn, impl, (K, M, V), chunk_size, dtype)
    if scale is None:
        scale = K ** -0.5
    if initial_state is None:
        initial_state = (jnp.zeros((B, Hkv, K, M), dtype), jnp.zeros((B, Hkv, M, V), dtype))
    if T == 0:  # nothing to scan (every form assumes T >= 1): the state passes unchanged
        final_state = tuple(x.astype(dtype) for x in initial_state) if return_final_state else None
        return jnp.zeros((B, 0, q.shape[2], V), q.dtype), final_state
    hk0, hv0 = (common.repeat_heads(x.astype(dtype), group, axis=1) for x in initial_state)
    runs = common.segment_runs(segment_ids)
    activation = functools.partial(common.slot_activation, kind=slot_activation)

    if impl == "pallas":
        o, hk, hv = pallas.gsa_pallas(q, k, v, s, g, hk0, hv0, runs, scale=scale,
                                      chunk_size=chunk_size, slot_activation_fn=activation,
                                      recompute_states=recompute_states)
    else:
        def two_passes(q, k, v, s, g, hk0, hv0, runs):
            k, v, s, g = (kv_heads_for_forms(x, group, dtype) for x in (k, v, s, g))
            z, hk = run_form(impl, q, k, s, g, gate_axis="value", scale=scale,
                             initial_state=hk0, runs=runs, chunk_size=chunk_size)
            o, hv = run_form(impl, activation(z), s, v, g, gate_axis="key", scale=1.0,
                             initial_state=hv0, runs=runs, chunk_size=chunk_size)
            return o, hk, hv

        if recompute_states:  # saves only the inputs; the backward reruns both passes
            two_passes = jax.checkpoint(two_passes)
        o, hk, hv = two_passes(q, k, v, s, g, hk0, hv0, runs)
    final_state = None
    if return_final_state:
        final_state = (common.first_of_group(hk, group), common.first_of_group(hv, group))
    return o.astype(q.dtype), final_state


def gated_slot_attention_step(
    q: Array, k: Array, v: Array, s: Array, g: Array, state: Optional[GSAState] = None, *,
    scale: Optional[float] = None,
    slot_activation: str = "softmax",
    impl: str = "xla",
) -> tuple[Array, GSAState]:
    """One recurrent GSA step, for decoding.

    Args:
      q: [B, H, K]; k: [B, Hkv, K]; v: [B, Hkv, V]; s, g: [B, Hkv, M];
      state: (Hk [B, Hkv, K, M], Hv [B, Hkv, M, V]) or None (zeros).
      impl: "xla" (the two GLA steps, XLA-fused) or "pallas" (`pallas_kernels/gsa_decode.py`:
        one Triton kernel per step, the state read and written once, float32 state; a GPU
        kernel, interpreted on a CPU, refused on a TPU; K, M, V powers of two in 16..256 and
        H / Hkv in 1, 2, 4, 8; not differentiable).
    Returns:
      (o [B, H, V] in q's dtype, new state in float32/float64; "pallas": float32).
    """
    fn = "gated_slot_attention_step"
    checks.check_choice(fn, "slot_activation", slot_activation, common.SLOT_ACTIVATIONS)
    checks.check_choice(fn, "impl", impl, ("xla", "pallas"))
    inputs = {"q": q, "k": k, "v": v, "s": s, "g": g}
    B, _, Hkv, group = common.check_sequence_inputs(fn, time_axis=False, **inputs)
    K, M, V = _check_dims(fn, q, k, v, s, g)
    _check_state(fn, state, B, Hkv, K, M, V)
    common.check_log_gate(fn, g)

    dtype = common.compute_dtype(q, k, v, s, g, *(state or ()))
    if scale is None:
        scale = K ** -0.5
    if state is None:
        state = (jnp.zeros((B, Hkv, K, M), dtype), jnp.zeros((B, Hkv, M, V), dtype))
    if impl == "pallas":
        return _step_pallas(fn, q, k, v, s, g, state, scale, slot_activation, group)
    k, v, s, g = (common.repeat_heads(x.astype(dtype), group, axis=1) for x in (k, v, s, g))
    hk, hv = (common.repeat_heads(x.astype(dtype), group, axis=1) for x in state)
    z, hk = gla_step(q.astype(dtype), k, s, g, hk, gate_axis="value", scale=scale)
    p = common.slot_activation(z, slot_activation)
    o, hv = gla_step(p, s, v, g, hv, gate_axis="key", scale=1.0)
    new_state = (common.first_of_group(hk, group), common.first_of_group(hv, group))
    return o.astype(q.dtype), new_state


def _step_pallas(fn, q, k, v, s, g, state, scale, slot_activation, group):
    """gated_slot_attention_step by the fused decode kernel (checked inputs)."""
    from pallas_kernels.gsa_decode import DECODE_DIMS, decode_supports, gsa_decode_step_pallas
    if pallas.backend() == "tpu":
        raise ValueError(f"{fn}: impl='pallas' is a GPU (Triton) decode kernel; use impl='xla' "
                         "on a TPU")
    K, M, V = q.shape[-1], s.shape[-1], v.shape[-1]
    if not decode_supports(K, M, V, group):
        raise ValueError(f"{fn}: impl='pallas' needs K, M, V in {DECODE_DIMS} and H / Hkv in "
                         f"1, 2, 4, 8; got K={K}, M={M}, V={V}, H / Hkv = {group} "
                         "(impl='xla' takes any)")
    o, hk, hv = gsa_decode_step_pallas(q, k, v, s, g, *state, scale=scale,
                                       slot_activation_fn=functools.partial(
                                           common.slot_activation, kind=slot_activation),
                                       interpret=pallas.backend() != "gpu")
    return o, (hk, hv)
