"""Every ValueError of the public ops: raised before any computation, naming the function, the
offending argument and the shapes (or value) involved."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gsa_jax.ops import (gated_linear_attention, gated_linear_attention_step,
                         gated_slot_attention, gated_slot_attention_step)

B, T, H, HKV, K, V, M = 2, 5, 4, 2, 3, 6, 7


def _arr(*shape, dtype=jnp.float32):
    # Values never matter here: every check is on shapes and dtypes, before any arithmetic.
    return jnp.asarray(np.random.default_rng(sum(shape)).standard_normal(shape), dtype)


def _gsa_args():
    return dict(q=_arr(B, T, H, K), k=_arr(B, T, HKV, K), v=_arr(B, T, HKV, V),
                s=_arr(B, T, HKV, M), g=-jnp.abs(_arr(B, T, HKV, M)))


def _raises(fn, kwargs, *fragments):
    """fn(**kwargs) raises ValueError whose message contains every fragment (literally)."""
    pattern = "".join(f"(?=[\\s\\S]*{re.escape(f)})" for f in fragments)
    with pytest.raises(ValueError, match=pattern):
        fn(**kwargs)


def test_valid_arguments_pass():
    """The baseline every case below breaks in one place."""
    run = jax.jit(lambda args, ids: gated_slot_attention(**args, return_final_state=True,
                                                         segment_ids=ids))
    o, (hk, hv) = run(_gsa_args(), jnp.zeros((B, T), jnp.int32))
    assert o.shape == (B, T, H, V) and hk.shape == (B, HKV, K, M) and hv.shape == (B, HKV, M, V)


# (name, argument to replace, new value, fragments the message must contain)
GSA_CASES = [
    ("rank", "q", _arr(B, T, H * K), ["gated_slot_attention", "q", "rank 4", str((B, T, H * K))]),
    ("rank_g", "g", _arr(B, T, HKV, M, 1), ["g", "rank 4", str((B, T, HKV, M, 1))]),
    ("batch", "k", _arr(B + 1, T, HKV, K),
     ["batch sizes", "k has 3", "q has 2", str((B + 1, T, HKV, K)), str((B, T, H, K))]),
    ("time", "v", _arr(B, T + 1, HKV, V),
     ["sequence lengths", "v has 6", str((B, T + 1, HKV, V)), str((B, T, H, K))]),
    ("kv_heads", "s", _arr(B, T, HKV + 1, M), ["heads of k, v, s, g", "s has 3",
                                                str((B, T, HKV + 1, M))]),
    ("heads_multiple", "q", _arr(B, T, 3, K), ["heads of q (3)", "multiple", "(2)",
                                               str((B, T, 3, K)), str((B, T, HKV, K))]),
    ("key_dim", "k", _arr(B, T, HKV, K + 1), ["key dims of q and k", "k has 4", "q has 3",
                                               str((B, T, HKV, K + 1)), str((B, T, H, K))]),
    ("slots", "g", _arr(B, T, HKV, M + 1), ["slot counts of s and g", "g has 8", "s has 7",
                                             str((B, T, HKV, M + 1)), str((B, T, HKV, M))]),
    ("dtype", "v", jnp.ones((B, T, HKV, V), jnp.int32), ["v", "floating-point", "int32"]),
]


@pytest.mark.parametrize("name,arg,value,fragments", GSA_CASES, ids=[c[0] for c in GSA_CASES])
def test_gsa_input_errors(name, arg, value, fragments):
    _raises(gated_slot_attention, {**_gsa_args(), arg: value}, *fragments)


STATE_CASES = [
    ("hk_shape", (_arr(B, HKV, K, M + 1), _arr(B, HKV, M, V)),
     ["state[0] (Hk)", str((B, HKV, K, M)), str((B, HKV, K, M + 1))]),
    ("hv_shape", (_arr(B, HKV, K, M), _arr(B, H, M, V)),
     ["state[1] (Hv)", str((B, HKV, M, V)), str((B, H, M, V))]),
    ("not_a_pair", _arr(B, HKV, K, M), ["state must be a pair", "Hk [B, Hkv, K, M]"]),
    ("triple", (_arr(B, HKV, K, M),) * 3, ["state must be a pair", "tuple"]),
    ("int_state", (jnp.ones((B, HKV, K, M), jnp.int32), _arr(B, HKV, M, V)),
     ["state[0] (Hk)", "floating-point", "int32"]),
]


@pytest.mark.parametrize("name,state,fragments", STATE_CASES, ids=[c[0] for c in STATE_CASES])
def test_gsa_state_errors(name, state, fragments):
    _raises(gated_slot_attention, {**_gsa_args(), "initial_state": state}, *fragments)


@pytest.mark.parametrize("name,kwargs,fragments", [
    ("impl", dict(impl="pallas_typo"), ["impl", "'pallas_typo'", "'chunk'"]),
    ("slot_activation", dict(slot_activation="gelu"), ["slot_activation", "'gelu'", "'relu2'"]),
    ("chunk_zero", dict(chunk_size=0), ["chunk_size", "positive", "0"]),
    ("chunk_negative", dict(chunk_size=-16), ["chunk_size", "positive", "-16"]),
    ("chunk_float", dict(chunk_size=16.0), ["chunk_size", "positive int", "16.0"]),
    ("chunk_bool", dict(chunk_size=True), ["chunk_size", "positive int", "True"]),
    ("segments_shape", dict(segment_ids=jnp.zeros((B, T + 1), jnp.int32)),
     ["segment_ids", str((B, T)), str((B, T + 1))]),
    ("segments_rank", dict(segment_ids=jnp.zeros((B * T,), jnp.int32)),
     ["segment_ids", str((B, T)), str((B * T,))]),
    ("segments_float", dict(segment_ids=jnp.zeros((B, T), jnp.float32)),
     ["segment_ids", "integer", "float32"]),
    ("segments_list", dict(segment_ids=[[0] * T] * B), ["segment_ids", str((B, T)), "list"]),
    ("pallas_chunk", dict(impl="pallas", chunk_size=5), ["impl='pallas'", "chunk_size 5",
                                                          "(16, 32, 64, 128)", "impl='chunk'"]),
], ids=lambda c: c if isinstance(c, str) else None)
def test_gsa_option_errors(name, kwargs, fragments):
    _raises(gated_slot_attention, {**_gsa_args(), **kwargs}, *fragments)


def test_chunk_size_numpy_integer_accepted(x64):
    """A chunk size read from a config as a NumPy integer is a valid chunk size, and the same
    as the Python int."""
    args = {name: np.asarray(a, np.float64) for name, a in _gsa_args().items()}
    def run(chunk_size):  # a fresh jit each: 2 and np.int64(2) must not share a trace
        return jax.jit(lambda a: gated_slot_attention(**a, chunk_size=chunk_size,
                                                      impl="chunk")[0])(args)
    o_np, o_int = run(np.int64(2)), run(2)
    np.testing.assert_array_equal(o_np, o_int)


# ---- the GLA primitive
def _gla_args(gate_axis="key"):
    return dict(q=_arr(B, T, H, K), k=_arr(B, T, HKV, K), v=_arr(B, T, HKV, V),
                g=-jnp.abs(_arr(B, T, HKV, K if gate_axis == "key" else V)), gate_axis=gate_axis)


@pytest.mark.parametrize("name,kwargs,fragments", [
    ("gate_axis", dict(gate_axis="slot"), ["gate_axis", "'slot'", "'value'"]),
    ("gate_dim_key", dict(g=_arr(B, T, HKV, V)), ["gate dims (gate_axis='key')", "g has 6",
                                                  "k has 3", str((B, T, HKV, V))]),
    ("gate_dim_value", dict(gate_axis="value", g=_arr(B, T, HKV, K)),
     ["gate dims (gate_axis='value')", "g has 3", "v has 6", str((B, T, HKV, K))]),
    ("key_dim", dict(q=_arr(B, T, H, K + 2)), ["key dims of q and k", str((B, T, H, K + 2))]),
    ("batch", dict(v=_arr(B + 1, T, HKV, V)), ["batch sizes", str((B + 1, T, HKV, V))]),
    ("rank", dict(k=_arr(T, HKV, K)), ["k", "rank 4", str((T, HKV, K))]),
    ("state_shape", dict(initial_state=_arr(B, H, K, V)),
     ["initial_state", str((B, HKV, K, V)), str((B, H, K, V))]),
    ("impl", dict(impl="fast"), ["impl", "'fast'"]),
    ("chunk_size", dict(chunk_size=-1), ["chunk_size", "-1"]),
    ("segments", dict(segment_ids=jnp.zeros((T, B), jnp.int32)),
     ["segment_ids", str((B, T)), str((T, B))]),
], ids=lambda c: c if isinstance(c, str) else None)
def test_gla_errors(name, kwargs, fragments):
    args = _gla_args()
    _raises(gated_linear_attention, {**args, **kwargs}, "gated_linear_attention", *fragments)


# ---- the one-step decode: its inputs have no time axis, and its messages show the shapes as
# passed ([B, H, D]), not the internal [B, 1, H, D] view.
def _step_args():
    return dict(q=_arr(B, H, K), k=_arr(B, HKV, K), v=_arr(B, HKV, V), s=_arr(B, HKV, M),
                g=-jnp.abs(_arr(B, HKV, M)))


@pytest.mark.parametrize("name,kwargs,fragments", [
    ("rank", dict(q=_arr(B, 1, H, K)), ["q", "rank 3", "[B, H, D]", str((B, 1, H, K))]),
    ("batch", dict(s=_arr(B + 1, HKV, M)),
     ["batch sizes", "s has 3", str((B + 1, HKV, M)), str((B, H, K))]),
    ("kv_heads", dict(v=_arr(B, HKV + 1, V)), ["heads of k, v, s, g", str((B, HKV + 1, V))]),
    ("heads_multiple", dict(q=_arr(B, 3, K)), ["heads of q (3)", str((B, 3, K))]),
    ("key_dim", dict(k=_arr(B, HKV, K + 1)), ["key dims of q and k", str((B, HKV, K + 1))]),
    ("slots", dict(s=_arr(B, HKV, M - 1)), ["slot counts of s and g", str((B, HKV, M - 1))]),
    ("state_hv", dict(state=(_arr(B, HKV, K, M), _arr(B, HKV, V, M))),
     ["state[1] (Hv)", str((B, HKV, M, V)), str((B, HKV, V, M))]),
    ("state_single", dict(state=_arr(B, HKV, K, M)), ["state must be a pair"]),
    ("slot_activation", dict(slot_activation="tanh"), ["slot_activation", "'tanh'"]),
], ids=lambda c: c if isinstance(c, str) else None)
def test_step_errors(name, kwargs, fragments):
    _raises(gated_slot_attention_step, {**_step_args(), **kwargs}, "gated_slot_attention_step",
            *fragments)


def test_step_shapes_in_messages_are_the_callers():
    """No internal [B, 1, H, D] view leaks into the message."""
    with pytest.raises(ValueError) as info:
        gated_slot_attention_step(**{**_step_args(), "k": _arr(B + 1, HKV, K)})
    assert str((B, 1, H, K)) not in str(info.value)


def _gla_step_args():
    return dict(q=_arr(B, H, K), k=_arr(B, HKV, K), v=_arr(B, HKV, V),
                g=-jnp.abs(_arr(B, HKV, K)))


@pytest.mark.parametrize("name,kwargs,fragments", [
    ("rank", dict(q=_arr(B, 1, H, K)), ["q", "rank 3", "[B, H, D]", str((B, 1, H, K))]),
    ("kv_heads", dict(v=_arr(B, HKV + 1, V)), ["heads of k, v, g", str((B, HKV + 1, V))]),
    ("key_dim", dict(k=_arr(B, HKV, K + 1)), ["key dims of q and k", str((B, HKV, K + 1))]),
    ("gate_dim", dict(g=-jnp.abs(_arr(B, HKV, V))), ["gate dims", "'key'", str((B, HKV, V))]),
    ("state", dict(state=_arr(B, HKV, V, K)), ["state", str((B, HKV, K, V)),
                                               str((B, HKV, V, K))]),
    ("gate_axis", dict(gate_axis="slot"), ["gate_axis", "'slot'"]),
    ("positive_gate", dict(g=jnp.abs(_arr(B, HKV, K)) + 0.5), ["g is a log forget gate"]),
], ids=lambda c: c if isinstance(c, str) else None)
def test_gla_step_errors(name, kwargs, fragments):
    _raises(gated_linear_attention_step, {**_gla_step_args(), **kwargs},
            "gated_linear_attention_step", *fragments)


# ---- the log gate: g > 0 is refused where it is concrete (eager calls)
def _with_one_positive(g, rng):
    """g with one random entry set to a fresh positive value; returns (g, that value)."""
    g = np.array(g)
    index = tuple(rng.integers(0, n) for n in g.shape)
    g[index] = rng.uniform(0.01, 2.0)
    return jnp.asarray(g), float(np.asarray(g, np.float32)[index])


@pytest.mark.parametrize("op", ["gsa", "gla_key", "gla_value", "step"])
def test_positive_log_gate_is_refused_eagerly(op):
    rng = np.random.default_rng()
    fn, args = {"gsa": (gated_slot_attention, _gsa_args()),
                "gla_key": (gated_linear_attention, _gla_args("key")),
                "gla_value": (gated_linear_attention, _gla_args("value")),
                "step": (gated_slot_attention_step, _step_args())}[op]
    args["g"], bad = _with_one_positive(args["g"], rng)
    _raises(fn, args, fn.__name__, "g is a log forget gate", "<= 0", f"{bad:g}")
    args["g"] = jnp.minimum(args["g"], 0.0)   # g = 0 (no decay) is a valid gate
    if op != "step":   # the check precedes the form; the recurrent one runs eagerly in ~1 s
        args["impl"] = "recurrent"   # (the chunk form's ops one by one: ~10 s on 2 cores)
    fn(**args)


# ---- T = 0: an empty output and the initial state, unchanged, in every form
@pytest.mark.parametrize("impl", ["recurrent", "parallel", "chunk", "pallas", "auto"])
def test_empty_sequence_returns_the_initial_state(impl):
    rng = np.random.default_rng()
    Kp = Vp = Mp = 16                 # dims the kernels take, so impl="pallas" is valid
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.bfloat16)
    q, k, v, s = normal(B, 0, H, Kp), normal(B, 0, HKV, Kp), normal(B, 0, HKV, Vp), \
        normal(B, 0, HKV, Mp)
    g = -jnp.abs(normal(B, 0, HKV, Mp))
    hk0, hv0 = normal(B, HKV, Kp, Mp), normal(B, HKV, Mp, Vp)
    o, (hk, hv) = gated_slot_attention(q, k, v, s, g, initial_state=(hk0, hv0),
                                       return_final_state=True, impl=impl, chunk_size=16)
    assert o.shape == (B, 0, H, Vp) and o.dtype == q.dtype
    assert hk.dtype == hv.dtype == jnp.float32
    np.testing.assert_array_equal(hk, np.asarray(hk0, np.float32))
    np.testing.assert_array_equal(hv, np.asarray(hv0, np.float32))
    for gate_axis, gated in (("key", k), ("value", v)):
        S0 = normal(B, HKV, Kp, Vp)
        o, S = gated_linear_attention(q, k, v, -jnp.abs(gated),
                                      gate_axis=gate_axis, initial_state=S0,
                                      return_final_state=True, impl=impl, chunk_size=16)
        assert o.shape == (B, 0, H, Vp) and o.dtype == q.dtype
        np.testing.assert_array_equal(S, np.asarray(S0, np.float32))
    # Without an initial state the final state is the zero state of the right shape.
    _, (hk, hv) = gated_slot_attention(q, k, v, s, g, return_final_state=True, impl=impl,
                                       chunk_size=16)
    assert hk.shape == (B, HKV, Kp, Mp) and hv.shape == (B, HKV, Mp, Vp)
    assert not np.any(hk) and not np.any(hv)
