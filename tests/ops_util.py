"""Helpers of the ops tests: fresh random inputs (fixed seeds) and jitted, cached op calls.

Every op call goes through `jax.jit` of a function cached per static configuration, so that a
shape that several tests share is compiled once per process (eager op-by-op dispatch of the
chunk form is several times slower than compiling it on this CPU).
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import jax
import numpy as np

from gsa_jax.ops import gated_linear_attention, gated_slot_attention, gated_slot_attention_step

FORMS = ("recurrent", "parallel", "chunk")
SLOT_ACTIVATIONS = ("softmax", "swish", "relu", "relu2")


class GSAInputs(NamedTuple):
    q: np.ndarray    # [B, T, H, K]
    k: np.ndarray    # [B, T, Hkv, K]
    v: np.ndarray    # [B, T, Hkv, V]
    s: np.ndarray    # [B, T, Hkv, M]
    g: np.ndarray    # [B, T, Hkv, M], < 0
    hk0: Optional[np.ndarray]  # [B, Hkv, K, M]
    hv0: Optional[np.ndarray]  # [B, Hkv, M, V]

    @property
    def state(self):
        return None if self.hk0 is None else (self.hk0, self.hv0)


def log_gate(rng: np.random.Generator, shape) -> np.ndarray:
    """log sigmoid(x) with x ~ N(2, 1.5²): mostly mild decays (≈ −0.13), some strong ones."""
    x = 2.0 + 1.5 * rng.standard_normal(shape)
    return -np.logaddexp(0.0, -x)


def gsa_inputs(seed: int, B: int, T: int, H: int, Hkv: int, K: int, V: int, M: int, *,
               state: bool = True, dtype=np.float64) -> GSAInputs:
    """Random GSA inputs; s is a general random write weight (the layer's 1 − exp g is a
    special case), the initial state random too, so nothing the forms add is ever zero."""
    rng = np.random.default_rng(seed)
    normal = lambda *shape: rng.standard_normal(shape).astype(dtype)
    q, k, v = normal(B, T, H, K), normal(B, T, Hkv, K), normal(B, T, Hkv, V)
    s = normal(B, T, Hkv, M)
    g = log_gate(rng, (B, T, Hkv, M)).astype(dtype)
    hk0 = normal(B, Hkv, K, M) if state else None
    hv0 = normal(B, Hkv, M, V) if state else None
    return GSAInputs(q, k, v, s, g, hk0, hv0)


def gla_inputs(seed: int, B: int, T: int, H: int, Hkv: int, K: int, V: int, *, gate_axis: str,
               dtype=np.float64):
    """Random GLA inputs (q, k, v, g, initial state); g on the `gate_axis` dim, < 0."""
    rng = np.random.default_rng(seed)
    normal = lambda *shape: rng.standard_normal(shape).astype(dtype)
    q, k, v = normal(B, T, H, K), normal(B, T, Hkv, K), normal(B, T, Hkv, V)
    g = log_gate(rng, (B, T, Hkv, K if gate_axis == "key" else V)).astype(dtype)
    return q, k, v, g, normal(B, Hkv, K, V)


@functools.lru_cache(maxsize=None)
def gsa_fn(impl: str, chunk_size: int = 16, slot_activation: str = "softmax",
           scale: Optional[float] = None):
    """jit of (q, k, v, s, g, initial_state, segment_ids) -> (o, (Hk, Hv))."""
    def fn(q, k, v, s, g, initial_state=None, segment_ids=None):
        return gated_slot_attention(
            q, k, v, s, g, scale=scale, initial_state=initial_state, return_final_state=True,
            segment_ids=segment_ids, impl=impl, chunk_size=chunk_size,
            slot_activation=slot_activation)
    return jax.jit(fn)


@functools.lru_cache(maxsize=None)
def gla_fn(impl: str, gate_axis: str, chunk_size: int = 16):
    """jit of (q, k, v, g, initial_state, segment_ids) -> (o, S)."""
    def fn(q, k, v, g, initial_state=None, segment_ids=None):
        return gated_linear_attention(
            q, k, v, g, gate_axis=gate_axis, initial_state=initial_state,
            return_final_state=True, segment_ids=segment_ids, impl=impl, chunk_size=chunk_size)
    return jax.jit(fn)


@functools.lru_cache(maxsize=None)
def step_fn(slot_activation: str = "softmax", scale: Optional[float] = None):
    """jit of the one-step decode (q, k, v, s, g, state) -> (o, state)."""
    return jax.jit(functools.partial(gated_slot_attention_step, scale=scale,
                                     slot_activation=slot_activation))


def enable_x64():
    """Context manager: `jax_enable_x64` on inside (float64 arrays stay float64)."""
    if hasattr(jax, "enable_x64"):  # jax >= 0.8
        return jax.enable_x64(True)
    from jax.experimental import enable_x64 as legacy  # older jax
    return legacy()


def assert_close(actual, expected, *, rtol: float, atol: float, what: str = "") -> None:
    np.testing.assert_allclose(np.asarray(actual, dtype=np.float64),
                               np.asarray(expected, dtype=np.float64),
                               rtol=rtol, atol=atol, err_msg=what)


def relative_error(actual, expected) -> float:
    """‖actual − expected‖ / ‖expected‖ (Frobenius), in float64."""
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    return float(np.linalg.norm(a - e) / np.linalg.norm(e))
