"""Shared pieces of the op forms: argument checks, dtypes, segment bookkeeping.

Rules shared with the layers and configs (positive ints, choices) live in `gsa_jax.checks`.
Layout everywhere in `gsa_jax.ops`: [batch B, time T, heads H, feature dim]; recurrent states are
[B, H, key dim, value dim]. Nothing here imports Flax or anything above the ops.
"""

from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp

Array = jax.Array

GATE_AXES = ("key", "value")
SLOT_ACTIVATIONS = ("softmax", "swish", "relu", "relu2")


def compute_dtype(*arrays) -> jnp.dtype:
    """Accumulation dtype: float32, or float64 when an input already is (x64 references)."""
    dtypes = [a.dtype for a in arrays if a is not None]
    if any(d == jnp.float64 for d in dtypes):
        return jnp.dtype(jnp.float64)
    return jnp.dtype(jnp.float32)


def _shape(x) -> tuple:
    return tuple(getattr(x, "shape", ()))


def check_floating(fn: str, **arrays) -> None:
    for name, x in arrays.items():
        if x is None:
            continue
        if not hasattr(x, "dtype") or not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(
                f"{fn}: {name} must be a floating-point array (bf16/f16/f32/f64), "
                f"got dtype {getattr(x, 'dtype', type(x).__name__)}"
            )


def check_rank(fn: str, name: str, x, rank: int, layout: str) -> None:
    if len(_shape(x)) != rank:
        raise ValueError(
            f"{fn}: {name} must have rank {rank} with layout {layout}, got shape {_shape(x)}"
        )


def check_same_dim(fn: str, dim_name: str, named_dims: Sequence[tuple[str, tuple, int]]) -> int:
    """All (name, shape, axis) triples must have the same size on their axis; returns that size."""
    first_name, first_shape, first_axis = named_dims[0]
    size = first_shape[first_axis]
    for name, shape, axis in named_dims[1:]:
        if shape[axis] != size:
            listing = ", ".join(f"{n} {s}" for n, s, _ in named_dims)
            raise ValueError(
                f"{fn}: {dim_name} must agree: {name} has {shape[axis]} (axis {axis}) but "
                f"{first_name} has {size} (axis {first_axis}); shapes: {listing}"
            )
    return size


def check_heads(fn: str, q_heads: int, kv_heads: int, shapes: str) -> int:
    """Grouped heads: q may have a multiple of the heads of k/v/s/g. Returns the group size."""
    if kv_heads <= 0 or q_heads % kv_heads != 0:
        raise ValueError(
            f"{fn}: the heads of q ({q_heads}) must be a multiple of the heads of the other inputs "
            f"({kv_heads}); shapes: {shapes}"
        )
    return q_heads // kv_heads


def check_state(fn: str, name: str, state, expected: tuple) -> None:
    if _shape(state) != tuple(expected):
        raise ValueError(f"{fn}: {name} must have shape {tuple(expected)}, got {_shape(state)}")


def check_log_gate(fn: str, g) -> None:
    """ValueError when a concrete log gate g has an entry > 0 (a forget gate exp g > 1 makes the
    state grow without bound, and the forms' decay factorisations assume g <= 0).

    Only concrete arrays (eager calls) are checked, at the cost of one reduction and a host
    sync; under `jax.jit`, `grad` or `vmap` g is a tracer and nothing can be checked cheaply, so
    a positive g there gives undefined (possibly NaN) results.
    """
    if isinstance(g, jax.core.Tracer) or not hasattr(g, "shape") or not g.size:
        return
    g_max = float(jnp.max(g))
    if g_max > 0:
        raise ValueError(f"{fn}: g is a log forget gate and must be <= 0 everywhere (e.g. "
                         f"logsigmoid(x)), got a maximum of {g_max:g}")


def check_segment_ids(fn: str, segment_ids, batch: int, time: int) -> None:
    if segment_ids is None:
        return
    if not hasattr(segment_ids, "shape"):
        raise ValueError(f"{fn}: segment_ids must be an integer array of shape [B, T] = "
                         f"{(batch, time)}, got {type(segment_ids).__name__}")
    if _shape(segment_ids) != (batch, time):
        raise ValueError(
            f"{fn}: segment_ids must have shape [B, T] = {(batch, time)}, got {_shape(segment_ids)}"
        )
    if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
        raise ValueError(f"{fn}: segment_ids must be integer, got dtype {segment_ids.dtype}")


def segment_runs(segment_ids: Optional[Array]) -> Optional[Array]:
    """Index of the contiguous run each position belongs to, [B, T] int32, starting at 0.

    A new run starts wherever the segment id changes from the previous position, so ids need
    only differ between neighbouring segments. Run 0 is the one the initial state flows into.
    """
    if segment_ids is None:
        return None
    starts = jnp.concatenate(
        [jnp.zeros_like(segment_ids[:, :1], dtype=jnp.int32),
         (segment_ids[:, 1:] != segment_ids[:, :-1]).astype(jnp.int32)],
        axis=1,
    )
    return jnp.cumsum(starts, axis=1)


def repeat_heads(x: Optional[Array], group: int, axis: int) -> Optional[Array]:
    """Repeat grouped (key/value) heads so that head h of the result is head h // group."""
    if x is None or group == 1:
        return x
    return jnp.repeat(x, group, axis=axis)


def first_of_group(x: Optional[Array], group: int, axis: int = 1) -> Optional[Array]:
    """Inverse of `repeat_heads` for quantities that are equal within each group (states)."""
    if x is None or group == 1:
        return x
    shape = x.shape
    x = x.reshape(shape[:axis] + (shape[axis] // group, group) + shape[axis + 1:])
    return jnp.take(x, 0, axis=axis + 1)


def slot_activation(z: Array, kind: str) -> Array:
    """The non-linearity between the two passes, over the slot axis (last)."""
    if kind == "softmax":
        return jax.nn.softmax(z, axis=-1)
    if kind == "swish":
        return jax.nn.swish(z)
    if kind == "relu":
        return jax.nn.relu(z)
    if kind == "relu2":
        return jnp.square(jax.nn.relu(z))
    raise ValueError(f"unknown slot activation {kind!r}; expected one of {SLOT_ACTIVATIONS}")


def check_sequence_inputs(fn: str, *, time_axis: bool = True, **arrays
                          ) -> tuple[int, Optional[int], int, int]:
    """Checks [B, T, H, D] inputs (or [B, H, D] ones with time_axis=False, the decode step): q
    first, then the grouped (key/value-head) ones. Messages show the shapes as passed.

    Returns (B, T, Hkv, group) where group = H // Hkv; T is None without a time axis.
    """
    check_floating(fn, **arrays)
    rank, layout = (4, "[B, T, H, D]") if time_axis else (3, "[B, H, D]")
    for name, x in arrays.items():
        check_rank(fn, name, x, rank, layout)
    named = [(name, x.shape) for name, x in arrays.items()]
    shapes = ", ".join(f"{n} {s}" for n, s in named)
    B = check_same_dim(fn, "batch sizes", [(n, s, 0) for n, s in named])
    T = check_same_dim(fn, "sequence lengths", [(n, s, 1) for n, s in named]) if time_axis else None
    head = rank - 2
    kv_names = ", ".join(n for n, _ in named[1:])
    Hkv = check_same_dim(fn, f"heads of {kv_names}", [(n, s, head) for n, s in named[1:]])
    group = check_heads(fn, named[0][1][head], Hkv, shapes)
    return B, T, Hkv, group
