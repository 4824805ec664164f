"""The fused GSA decode kernel (`pallas_kernels/gsa_decode.py`, `gated_slot_attention_step(...,
impl="pallas")`), interpreted on the CPU, against float64 references: one step against the XLA
step, a run of steps against the recurrent form over the whole sequence."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gsa_jax.ops import gated_slot_attention, gated_slot_attention_step
from gsa_jax.ops import pallas as ops_pallas
from ops_util import enable_x64, gsa_inputs, relative_error


def _step(x, t, state, impl, activation="softmax", dtype=np.float32):
    q, k, v, s, g = (jnp.asarray(a[:, t], dtype) for a in x[:5])
    return gated_slot_attention_step(q, k, v, s, g, state, slot_activation=activation,
                                     impl=impl)


@pytest.mark.parametrize("activation", ["softmax", "swish", "relu", "relu2"])
@pytest.mark.parametrize("H,Hkv", [(2, 2), (4, 2), (8, 1)])
def test_one_step_equals_the_float64_xla_step(activation, H, Hkv):
    """o, Hk', Hv' of the kernel (float32) within float32 rounding of the XLA step in float64,
    from a random state, for every slot activation and grouped heads (G = 1, 2, 8)."""
    B, K, V, M = 3, 32, 16, 16
    x = gsa_inputs(11 + H, B, 1, H, Hkv, K, V, M)
    state32 = tuple(jnp.asarray(a, jnp.float32) for a in (x.hk0, x.hv0))
    o, (hk, hv) = _step(x, 0, state32, "pallas", activation)
    assert hk.dtype == hv.dtype == jnp.float32 and o.shape == (B, H, V)
    with enable_x64():
        ref_o, (ref_hk, ref_hv) = _step(x, 0, (jnp.asarray(x.hk0), jnp.asarray(x.hv0)), "xla",
                                        activation, np.float64)
        ref = [np.asarray(a) for a in (ref_o, ref_hk, ref_hv)]
    for name, got, want in zip(("o", "hk", "hv"), (o, hk, hv), ref):
        assert relative_error(got, want) < 1e-5, name


def test_steps_equal_the_recurrent_form_over_the_sequence():
    """Twelve kernel steps from a random state: every output and the final state equal
    gated_slot_attention(impl="recurrent") over the 12 tokens in float64 (an independent
    form); bf16 inputs give bf16 outputs within bf16 rounding of it."""
    B, T, H, Hkv, K, V, M = 2, 12, 4, 2, 16, 32, 16
    x = gsa_inputs(5, B, T, H, Hkv, K, V, M)
    with enable_x64():
        ref_o, (ref_hk, ref_hv) = gated_slot_attention(
            *(jnp.asarray(a) for a in x[:5]), initial_state=(jnp.asarray(x.hk0),
                                                            jnp.asarray(x.hv0)),
            return_final_state=True, impl="recurrent")
        ref_o, ref_hk, ref_hv = (np.asarray(a) for a in (ref_o, ref_hk, ref_hv))
    for dtype, tol in ((np.float32, 1e-5), (jnp.bfloat16, 2e-2)):
        state = tuple(jnp.asarray(a, jnp.float32) for a in (x.hk0, x.hv0))
        outs = []
        step = jax.jit(lambda q, k, v, s, g, st: gated_slot_attention_step(
            q, k, v, s, g, st, impl="pallas"))
        for t in range(T):
            o, state = step(*(jnp.asarray(a[:, t], dtype) for a in x[:5]), state)
            outs.append(o)
        o = jnp.stack(outs, axis=1)
        assert o.dtype == dtype
        assert relative_error(o, ref_o) < tol
        assert relative_error(state[0], ref_hk) < tol and relative_error(state[1], ref_hv) < tol


def test_zero_initial_state_is_the_default():
    """state=None starts from zeros, as the XLA step does."""
    x = gsa_inputs(8, 2, 1, 2, 2, 16, 16, 16)
    q, k, v, s, g = (jnp.asarray(a[:, 0], jnp.float32) for a in x[:5])
    o, st = gated_slot_attention_step(q, k, v, s, g, None, impl="pallas")
    ref_o, ref_st = gated_slot_attention_step(q, k, v, s, g, None, impl="xla")
    assert relative_error(o, ref_o) < 1e-5
    assert relative_error(st[0], ref_st[0]) < 1e-5 and relative_error(st[1], ref_st[1]) < 1e-5


def test_refuses_what_it_cannot_run(monkeypatch):
    """Dims outside the kernel's, a group of 3 query heads and a TPU backend are clear errors
    that name impl='xla'; an unknown impl names the choices."""
    def args(H, Hkv, K, M, V):
        x = gsa_inputs(9, 1, 1, H, Hkv, K, V, M)
        return tuple(jnp.asarray(a[:, 0], jnp.float32) for a in x[:5])
    with pytest.raises(ValueError, match=r"K=48.*impl='xla'"):
        gated_slot_attention_step(*args(2, 2, 48, 16, 16), impl="pallas")
    with pytest.raises(ValueError, match=r"H / Hkv = 3"):
        gated_slot_attention_step(*args(3, 1, 16, 16, 16), impl="pallas")
    with pytest.raises(ValueError, match="impl"):
        gated_slot_attention_step(*args(2, 2, 16, 16, 16), impl="triton")
    monkeypatch.setattr(ops_pallas, "backend", lambda: "tpu")
    with pytest.raises(ValueError, match="TPU"):
        gated_slot_attention_step(*args(2, 2, 16, 16, 16), impl="pallas")
