"""Gated linear attention (GLA): the building block of GSA, with one entry point for every form.

Per head, with state S ∈ R^{K×V}:

    gate_axis="key"   (g ∈ R^K, as in GLA/RetNet):  S_t = diag(exp g_t) S_{t-1} + k_t v_tᵀ
    gate_axis="value" (g ∈ R^V):                    S_t = S_{t-1} diag(exp g_t) + k_t v_tᵀ
    o_t = scale · S_tᵀ q_t

The forms live in `recurrent.py`, `parallel.py` and `chunk.py`; they agree to float tolerance.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from gsa_jax import checks
from gsa_jax.ops import common, pallas
from gsa_jax.ops.chunk import gla_chunk
from gsa_jax.ops.parallel import gla_parallel
from gsa_jax.ops.recurrent import gla_recurrent, gla_step

Array = jax.Array

IMPLS = ("auto", "recurrent", "parallel", "chunk", "pallas")

_FORMS = {"recurrent": gla_recurrent, "parallel": gla_parallel, "chunk": gla_chunk}


def resolve_impl(fn: str, impl: str, dims: tuple, chunk_size: int, dtype) -> str:
    """"auto" -> "pallas" on a GPU or TPU where the kernels support the shapes, else "chunk".

    Wide dims (multiples of 128 outside KERNEL_DIMS: key slices, value blocks) count on a GPU,
    where a whole 1.3B train step (head dim 512) ran 1.23-1.32x faster with the kernels than
    with the chunk form (experiments/results/efficiency_h100pallas.md); on a TPU they have not
    been timed, so only an explicit impl="pallas" takes them there."""
    supported = (pallas.kernel_supports(*dims, chunk_size=chunk_size)
                 and jnp.dtype(dtype) != jnp.float64)
    if impl == "auto":
        measured = pallas.kernel_supports(*dims, chunk_size=chunk_size, wide=pallas.on_gpu())
        on_device = pallas.on_gpu() or pallas.on_tpu()
        return "pallas" if supported and measured and on_device else "chunk"
    if impl == "pallas" and not supported:
        raise ValueError(
            f"{fn}: impl='pallas' needs feature dims in {pallas.KERNEL_DIMS} or multiples of "
            f"128, chunk_size in {pallas.KERNEL_CHUNKS} and no float64 inputs; got dims {dims}, "
            f"chunk_size {chunk_size}, dtype {jnp.dtype(dtype)}. Use impl='chunk' for other "
            f"shapes.")
    return impl


def kv_heads_for_forms(x, group: int, dtype):
    """k/v/g-like input [B, T, Hkv, D] with its heads repeated to the query heads (internal).
    Left in its dtype for `run_form` to cast, unless grouped: the gradient sums the copies,
    and that sum should be in the compute dtype."""
    return common.repeat_heads(x.astype(dtype) if group > 1 else x, group, axis=2)


def run_form(impl: str, q, k, v, g, *, gate_axis, scale, initial_state, runs, chunk_size):
    """Call one pure-JAX form on checked, same-head inputs; it computes in the dtype of
    `initial_state` (internal). The chunk form casts after its chunking: its backward then
    keeps the inputs as given (bf16) instead of float32 copies."""
    kwargs = dict(gate_axis=gate_axis, scale=scale, initial_state=initial_state, runs=runs)
    if impl == "chunk":
        kwargs["chunk_size"] = chunk_size
    else:
        q, k, v, g = (x.astype(initial_state.dtype) for x in (q, k, v, g))
    return _FORMS[impl](q, k, v, g, **kwargs)


def _check_inputs(fn: str, q, k, v, g, gate_axis: str, state_name: str, state, *,
                  time_axis: bool = True):
    """Checks q/k/v/g ([B, T, H|Hkv, D], or [B, H|Hkv, D] for a step) and the state
    [B, Hkv, K, V] (named `state_name` in messages). Returns (B, T, Hkv, group, K, V); T is
    None for a step."""
    common.check_floating(fn, **{state_name: state})
    B, T, Hkv, group = common.check_sequence_inputs(fn, time_axis=time_axis, q=q, k=k, v=v, g=g)
    d = 3 if time_axis else 2
    K = common.check_same_dim(fn, "key dims of q and k", [("q", q.shape, d), ("k", k.shape, d)])
    V = v.shape[d]
    gated = ("k", k.shape, d) if gate_axis == "key" else ("v", v.shape, d)
    common.check_same_dim(fn, f"gate dims (gate_axis={gate_axis!r})", [gated, ("g", g.shape, d)])
    if state is not None:
        common.check_state(fn, state_name, state, (B, Hkv, K, V))
    return B, T, Hkv, group, K, V


def gated_linear_attention(
    q: Array, k: Array, v: Array, g: Array, *,
    gate_axis: str = "key",
    scale: Optional[float] = None,
    initial_state: Optional[Array] = None,
    return_final_state: bool = False,
    segment_ids: Optional[Array] = None,
    impl: str = "auto",
    chunk_size: int = 64,
) -> tuple[Array, Optional[Array]]:
    """Gated linear attention over a sequence.

    Args:
      q: [B, T, H, K] queries.
      k: [B, T, Hkv, K] keys; H must be a multiple of Hkv (grouped heads share k, v, g, state).
      v: [B, T, Hkv, V] values.
      g: [B, T, Hkv, K] (gate_axis="key") or [B, T, Hkv, V] (gate_axis="value"): log forget
        gate, g ≤ 0 (checked on concrete arrays; under jit a positive g is not caught and
        gives undefined results).
      scale: multiplies q·k; None means K ** -0.5.
      initial_state: [B, Hkv, K, V] or None (zeros).
      return_final_state: also return the state after the last step.
      segment_ids: [B, T] integer ids of packed sequences; the state is reset wherever the id
        changes, so each segment equals a separate run (the first one starts from
        `initial_state`).
      impl: "auto" ("pallas" on a GPU or TPU where the kernels support the shapes, else
        "chunk"), "recurrent", "parallel", "chunk" or "pallas" (interpreted, slowly, on a CPU).
      chunk_size: C of the chunked forms: any positive int for the chunk form (exact for
        every C; see `gated_slot_attention`), 16, 32, 64 or 128 for impl="pallas".
    Returns:
      (o [B, T, H, V] in q's dtype, final state [B, Hkv, K, V] in float32 (float64 for float64
      inputs) or None). T = 0 gives an empty o and the initial state as the final state.
    """
    fn = "gated_linear_attention"
    checks.check_choice(fn, "gate_axis", gate_axis, common.GATE_AXES)
    checks.check_choice(fn, "impl", impl, IMPLS)
    checks.check_positive_int(fn, "chunk_size", chunk_size)
    B, T, Hkv, group, K, V = _check_inputs(fn, q, k, v, g, gate_axis, "initial_state",
                                           initial_state)
    common.check_segment_ids(fn, segment_ids, B, T)
    common.check_log_gate(fn, g)

    dtype = common.compute_dtype(q, k, v, g, initial_state)
    impl = resolve_impl(fn, impl, (K, V), chunk_size, dtype)
    if scale is None:
        scale = K ** -0.5
    if initial_state is None:
        initial_state = jnp.zeros((B, Hkv, K, V), dtype)
    if T == 0:  # nothing to scan (every form assumes T >= 1): the state passes unchanged
        final_state = initial_state.astype(dtype) if return_final_state else None
        return jnp.zeros((B, 0, q.shape[2], V), q.dtype), final_state
    runs = common.segment_runs(segment_ids)
    state = common.repeat_heads(initial_state.astype(dtype), group, axis=1)
    if impl == "pallas":
        o, final_state = pallas.gla_pallas(q, k, v, g, state, runs, gate_axis=gate_axis,
                                           scale=scale, chunk_size=chunk_size)
    else:
        k, v, g = (kv_heads_for_forms(x, group, dtype) for x in (k, v, g))
        o, final_state = run_form(impl, q, k, v, g, gate_axis=gate_axis,
                                  scale=scale, initial_state=state, runs=runs,
                                  chunk_size=chunk_size)
    final_state = common.first_of_group(final_state, group) if return_final_state else None
    return o.astype(q.dtype), final_state


def gated_linear_attention_step(
    q: Array, k: Array, v: Array, g: Array, state: Optional[Array] = None, *,
    gate_axis: str = "key",
    scale: Optional[float] = None,
) -> tuple[Array, Array]:
    """One recurrent GLA step with grouped heads, for decoding (computes in float32).

    Args:
      q: [B, H, K]; k: [B, Hkv, K]; v: [B, Hkv, V]; g: [B, Hkv, K] (gate_axis="key") or
        [B, Hkv, V] (gate_axis="value"), log forget gate <= 0;
      state: [B, Hkv, K, V] or None (zeros).
      scale: multiplies q·k; None means K ** -0.5.
    Returns:
      (o [B, H, V] in q's dtype, new state [B, Hkv, K, V] in float32/float64).
    """
    fn = "gated_linear_attention_step"
    checks.check_choice(fn, "gate_axis", gate_axis, common.GATE_AXES)
    B, _, Hkv, group, K, V = _check_inputs(fn, q, k, v, g, gate_axis, "state", state,
                                           time_axis=False)
    common.check_log_gate(fn, g)

    dtype = common.compute_dtype(q, k, v, g, state)
    if scale is None:
        scale = K ** -0.5
    if state is None:
        state = jnp.zeros((B, Hkv, K, V), dtype)
    k, v, g = (common.repeat_heads(x.astype(dtype), group, axis=1) for x in (k, v, g))
    state = common.repeat_heads(state.astype(dtype), group, axis=1)
    o, state = gla_step(q.astype(dtype), k, v, g, state, gate_axis=gate_axis, scale=scale)
    return o.astype(q.dtype), common.first_of_group(state, group)
