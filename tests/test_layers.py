"""Token-mixer layers against hand-written float64 NumPy references, and their switches.

Each reference below is written from the equations (module docstrings, the paper), not from the
layer code: explicit time loops for the gated recurrences, the direct running-softmax sum for ABC,
a complex-number RoPE, masked softmax for attention.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gsa_jax.layers import (Attention, GatedLinearAttention, GatedSlotAttention,
                            MultiScaleRetention)

B, T, D = 2, 11, 32
STD = 0.3  # larger than the 0.02 of training so that gates, slots and softmaxes are not flat


def _x(seed=0, shape=(B, T, D)):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def _np_params(variables):
    return jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64),
                                  nn.meta.unbox(variables)["params"])


# Jitted init/apply: op-by-op (eager) Flax runs compile every small primitive and are slower
# on this CPU than one compilation of the whole layer.
# Cached per (layer, mode): Flax modules hash by their attributes.
@functools.lru_cache(maxsize=None)
def _jit_init(layer):
    return jax.jit(lambda key, x, arrays: layer.init(key, x, **arrays))


@functools.lru_cache(maxsize=None)
def _jit_apply(layer, mode):
    return jax.jit(lambda v, x, arrays: layer.apply(v, x, mode=mode, **arrays))


def init(layer, x, seed=42, **arrays):
    return _jit_init(layer)(jax.random.key(seed), x, arrays)


def run(layer, variables, x, mode="train", **arrays):
    """layer.apply under jit; `arrays` are keyword inputs such as segment_ids and cache."""
    return _jit_apply(layer, mode)(variables, x, arrays)


def _init_apply(layer, x, **arrays):
    variables = init(layer, x, **arrays)
    y, cache = run(layer, variables, x, **arrays)
    return variables, np.asarray(y, np.float64), cache


# ----------------------------------------------------------------- NumPy pieces
def swish(x):
    return x / (1.0 + np.exp(-x))


def log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def rms_norm(x, scale=None, eps=1e-6):
    y = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)
    return y if scale is None else y * scale


def causal_conv(x, kernel):
    """silu(Σ_j kernel[W-1-j] x_{t-j}), zeros before the start. x [B, T, C], kernel [W, C]."""
    W = kernel.shape[0]
    y = np.zeros_like(x)
    for t in range(x.shape[1]):
        for j in range(min(W, t + 1)):
            y[:, t] += kernel[W - 1 - j] * x[:, t - j]
    return swish(y)


SLOT_ACT = {
    "softmax": lambda z: np.exp(z - z.max()) / np.exp(z - z.max()).sum(),
    "swish": swish,
    "relu": lambda z: np.maximum(z, 0.0),
    "relu2": lambda z: np.maximum(z, 0.0) ** 2,
}
FEATURE = {"swish": swish, "relu": lambda z: np.maximum(z, 0.0), "identity": lambda z: z}


def ref_gsa(p, x, *, H, Hkv, M, gate="data_dependent", nonlin="softmax", fmap="swish",
            tau=8.0, conv=False, affine=True):
    """The GSA layer from the paper's equations, float64, explicit recurrence over time."""
    x = np.asarray(x, np.float64)
    Bx, Tx, _ = x.shape
    q, k, v = (x @ p[f"{n}_proj"]["kernel"] for n in "qkv")
    if conv:
        q, k, v = (causal_conv(a, p[f"{n}_conv"]["kernel"]) for a, n in zip((q, k, v), "qkv"))
    dk, dv = q.shape[-1] // H, v.shape[-1] // Hkv
    q = FEATURE[fmap](q).reshape(Bx, Tx, H, dk)
    k = FEATURE[fmap](k).reshape(Bx, Tx, Hkv, dk)
    v = swish(v).reshape(Bx, Tx, Hkv, dv)
    o = np.zeros((Bx, Tx, H, dv))
    if gate == "none":
        # ABC: Hk_t = Σ_{i≤t} k_i exp(e_i − logsumexp_{j≤t} e_j), Hv_t likewise with v_i.
        e = (x @ p["f_proj"]["kernel"]).reshape(Bx, Tx, Hkv, M)
        for b in range(Bx):
            for h in range(H):
                c = h // (H // Hkv)
                for t in range(Tx):
                    w = np.exp(e[b, :t + 1, c] - np.logaddexp.reduce(e[b, :t + 1, c], axis=0))
                    hk = k[b, :t + 1, c].T @ w                 # [dk, M]
                    hv = w.T @ v[b, :t + 1, c]                 # [M, dv]
                    o[b, t, h] = hv.T @ SLOT_ACT[nonlin](hk.T @ q[b, t, h])
    else:
        if gate == "data_dependent":
            g = log_sigmoid(x @ p["f_proj"]["kernel"]).reshape(Bx, Tx, Hkv, M) / tau
        else:
            g = np.broadcast_to(log_sigmoid(p["f_logits"]).reshape(Hkv, M) / tau,
                                (Bx, Tx, Hkv, M))
        s = 1.0 - np.exp(g)
        for b in range(Bx):
            for h in range(H):
                c = h // (H // Hkv)
                hk, hv = np.zeros((dk, M)), np.zeros((M, dv))
                for t in range(Tx):
                    hk = hk * np.exp(g[b, t, c])[None, :] + np.outer(k[b, t, c], s[b, t, c])
                    prob = SLOT_ACT[nonlin](hk.T @ q[b, t, h])
                    hv = np.exp(g[b, t, c])[:, None] * hv + np.outer(s[b, t, c], v[b, t, c])
                    o[b, t, h] = hv.T @ prob
    o = rms_norm(swish(o).reshape(Bx, Tx, -1), p["g_norm"]["scale"] if affine else None)
    return o @ p["o_proj"]["kernel"]


def rope(x, pos, theta=10000.0):
    """RoPE as complex rotation of the pairs (x_i, x_{i+d/2}). x [B, T, H, d], pos [B, T]."""
    half = x.shape[-1] // 2
    z = x[..., :half] + 1j * x[..., half:]
    freq = theta ** (-2.0 * np.arange(half) / x.shape[-1])
    z = z * np.exp(1j * pos[:, :, None, None] * freq)
    return np.concatenate([z.real, z.imag], axis=-1)


def ref_linear_recurrence(q, k, v, log_decay, scale):
    """S_t = diag(exp α_t) S_{t−1} + k_t v_tᵀ, o_t = scale · S_tᵀ q_t (per head; k heads = q heads)."""
    Bx, Tx, H, dk = q.shape
    o = np.zeros(q.shape[:3] + (v.shape[-1],))
    for b in range(Bx):
        for h in range(H):
            S = np.zeros((dk, v.shape[-1]))
            for t in range(Tx):
                S = np.exp(log_decay[b, t, h])[:, None] * S + np.outer(k[b, t, h], v[b, t, h])
                o[b, t, h] = scale * S.T @ q[b, t, h]
    return o


# ------------------------------------------------------------------------ GSA
GSA_KW = dict(hidden_size=D, num_heads=4, num_slots=6, std=STD, chunk_size=4)


@pytest.mark.parametrize("case", [
    dict(),
    dict(num_kv_heads=2, feature_map="relu", use_short_conv=True),
    dict(gate="data_independent", slot_nonlinearity="relu2", elementwise_affine=False),
    dict(gate="none", feature_map="identity"),
    dict(slot_nonlinearity="swish", num_kv_heads=1),
    dict(slot_nonlinearity="relu"),
], ids=["default", "gqa-relu-conv", "fixed-decay-relu2", "abc", "swish-mqa", "relu"])
def test_gsa_layer_matches_reference(case):
    layer = GatedSlotAttention(**GSA_KW, **case)
    x = _x(1)
    variables, y, cache = _init_apply(layer, x)
    assert cache is None
    want = ref_gsa(_np_params(variables), x, H=4, Hkv=case.get("num_kv_heads", 4), M=6,
                   gate=case.get("gate", "data_dependent"),
                   nonlin=case.get("slot_nonlinearity", "softmax"),
                   fmap=case.get("feature_map", "swish"), conv=case.get("use_short_conv", False),
                   affine=case.get("elementwise_affine", True))
    np.testing.assert_allclose(y, want, rtol=2e-4, atol=2e-4 * np.abs(want).max())


def test_data_independent_gate_ignores_x():
    """The decay is the learned constant: the layer equals a hand computation with
    g = logsigmoid(f)/τ for every x, and changing f (not x) changes the output."""
    layer = GatedSlotAttention(**GSA_KW, gate="data_independent")
    x1, x2 = _x(3), 3.0 * _x(4)
    variables = init(layer, x1, 5)
    p = _np_params(variables)
    for x in (x1, x2):
        y = np.asarray(run(layer, variables, x)[0], np.float64)
        want = ref_gsa(p, x, H=4, Hkv=4, M=6, gate="data_independent")
        np.testing.assert_allclose(y, want, rtol=2e-4, atol=2e-4 * np.abs(want).max())
    bumped = jax.tree_util.tree_map(lambda a: a, nn.meta.unbox(variables))
    bumped["params"]["f_logits"] = bumped["params"]["f_logits"] + 2.0
    y_b = np.asarray(run(layer, bumped, x1)[0])
    assert np.abs(y_b - np.asarray(run(layer, variables, x1)[0])).max() > 1e-3
    assert "f_proj" not in variables["params"]  # no projection of x feeds the gate


def test_abc_gate_restarts_per_segment():
    """gate="none": the cumulative normalisation z = logcumsumexp(e) restarts at each packed
    segment, so a packed row equals the segments run separately (short conv included)."""
    layer = GatedSlotAttention(**GSA_KW, gate="none", use_short_conv=True)
    x = _x(6, (1, 12, D))
    cut = 6  # equal halves: the separate runs share one compilation
    seg = jnp.array([[3] * cut + [7] * cut], jnp.int32)
    variables = init(layer, x, 1)
    packed = np.asarray(run(layer, variables, x, segment_ids=seg)[0])
    first = np.asarray(run(layer, variables, x[:, :cut])[0])
    second = np.asarray(run(layer, variables, x[:, cut:])[0])
    np.testing.assert_allclose(packed, np.concatenate([first, second], 1), rtol=1e-4, atol=1e-5)


def _repeat_kv_columns(kernel, kv, group):
    """[D, kv·d] -> [D, kv·group·d]: head h of the result is kv head h // group."""
    d_in, width = kernel.shape
    blocks = kernel.reshape(d_in, kv, width // kv)
    return jnp.repeat(blocks, group, axis=1).reshape(d_in, kv * group * (width // kv))


@pytest.mark.parametrize("gate", ["data_dependent", "none"])
def test_gqa_equals_repeated_kv_heads(gate):
    """num_kv_heads=2 < num_heads=4 equals a full-head layer whose k, v and f projections
    (and k/v convs) repeat each kv head's weights for its group."""
    grouped = GatedSlotAttention(**GSA_KW, num_kv_heads=2, gate=gate, use_short_conv=True)
    full = GatedSlotAttention(**GSA_KW, gate=gate, use_short_conv=True)
    x = _x(7)
    p = nn.meta.unbox(init(grouped, x, 3))["params"]
    q = dict(p)
    for name in ("k_proj", "v_proj", "f_proj"):
        q[name] = {"kernel": _repeat_kv_columns(p[name]["kernel"], 2, 2)}
    for name in ("k_conv", "v_conv"):
        q[name] = {"kernel": _repeat_kv_columns(p[name]["kernel"], 2, 2)}
    y_grouped = np.asarray(run(grouped, {"params": p}, x)[0])
    y_full = np.asarray(run(full, {"params": q}, x)[0])
    np.testing.assert_allclose(y_grouped, y_full, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", [dict(gate="none", use_short_conv=True, num_kv_heads=2)],
                         ids=["abc-conv-gqa"])
def test_gsa_cache_continues_the_sequence(case):
    """prefill(x[:c]) then decode(x[c:]) in one chunk, then one token: equals the full run;
    the cache (state, ABC normaliser z, conv tail) carries everything across calls."""
    layer = GatedSlotAttention(**GSA_KW, **case)
    x = _x(8)
    variables = init(layer, x, 2)
    full = np.asarray(run(layer, variables, x)[0])
    y1, cache = run(layer, variables, x[:, :6], mode="prefill")
    y2, cache = run(layer, variables, x[:, 6:10], mode="decode", cache=cache)
    y3, cache = run(layer, variables, x[:, 10:], mode="decode", cache=cache)
    np.testing.assert_allclose(np.concatenate([y1, y2, y3], 1), full, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------- GLA and RetNet
def test_gla_layer_matches_reference():
    layer = GatedLinearAttention(D, num_heads=4, num_kv_heads=2, std=STD, chunk_size=4)
    x = _x(9)
    variables, y, _ = _init_apply(layer, x)
    p = _np_params(variables)
    xn = np.asarray(x, np.float64)
    dk, dv = D // 2 // 4, D // 4
    q = (xn @ p["q_proj"]["kernel"]).reshape(B, T, 4, dk)
    k = np.repeat((xn @ p["k_proj"]["kernel"]).reshape(B, T, 2, dk), 2, axis=2)
    v = np.repeat((xn @ p["v_proj"]["kernel"]).reshape(B, T, 2, dv), 2, axis=2)
    low = xn @ p["gk_down"]["kernel"]
    gk = log_sigmoid(low @ p["gk_up"]["kernel"] + p["gk_up"]["bias"]) / 16.0
    gk = np.repeat(gk.reshape(B, T, 2, dk), 2, axis=2)
    o = rms_norm(ref_linear_recurrence(q, k, v, gk, dk ** -0.5), p["g_norm"]["scale"])
    o = o.reshape(B, T, -1) * swish(xn @ p["g_proj"]["kernel"])
    want = o @ p["o_proj"]["kernel"]
    np.testing.assert_allclose(y, want, rtol=2e-4, atol=2e-4 * np.abs(want).max())


def test_retnet_layer_matches_reference():
    """Fixed decays γ_h = 1 − 2^(−5−h), RoPE on q and k, positions restarting per segment."""
    H = 2
    layer = MultiScaleRetention(D, num_heads=H, std=STD, chunk_size=4)
    x = _x(10)
    seg = jnp.array([[0] * 4 + [1] * (T - 4), [5] * T], jnp.int32)
    variables, y, _ = _init_apply(layer, x, segment_ids=seg)
    p = _np_params(variables)
    xn = np.asarray(x, np.float64)
    dk, dv = D // H, 2 * D // H
    pos = np.array([list(range(4)) + list(range(T - 4)), list(range(T))], np.float64)
    q = rope((xn @ p["q_proj"]["kernel"]).reshape(B, T, H, dk), pos)
    k = rope((xn @ p["k_proj"]["kernel"]).reshape(B, T, H, dk), pos)
    v = (xn @ p["v_proj"]["kernel"]).reshape(B, T, H, dv)
    gamma = 1.0 - 2.0 ** (-5.0 - np.arange(H))
    decay = np.broadcast_to(np.log(gamma)[None, None, :, None], (B, T, H, dk))
    o = np.zeros((B, T, H, dv))
    for b, parts in ((0, [(0, 4), (4, T)]), (1, [(0, T)])):
        for lo, hi in parts:  # separate runs per segment
            o[b:b + 1, lo:hi] = ref_linear_recurrence(q[b:b + 1, lo:hi], k[b:b + 1, lo:hi],
                                                      v[b:b + 1, lo:hi], decay[b:b + 1, lo:hi],
                                                      dk ** -0.5)
    o = rms_norm(o, p["g_norm"]["scale"]).reshape(B, T, -1) * swish(xn @ p["g_proj"]["kernel"])
    want = o @ p["o_proj"]["kernel"]
    np.testing.assert_allclose(y, want, rtol=2e-4, atol=2e-4 * np.abs(want).max())


def test_attention_layer_matches_reference():
    """GQA softmax attention with RoPE and a segment mask against a masked-softmax loop."""
    H, Hkv = 4, 2
    layer = Attention(D, num_heads=H, num_kv_heads=Hkv, std=STD)
    x = _x(11)
    seg = jnp.array([[1] * 6 + [2] * (T - 6), [1] * T], jnp.int32)
    variables, y, _ = _init_apply(layer, x, segment_ids=seg)
    p = _np_params(variables)
    xn, dh = np.asarray(x, np.float64), D // H
    pos = np.array([list(range(6)) + list(range(T - 6)), list(range(T))], np.float64)
    q = rope((xn @ p["q_proj"]["kernel"]).reshape(B, T, H, dh), pos)
    k = rope((xn @ p["k_proj"]["kernel"]).reshape(B, T, Hkv, dh), pos)
    v = (xn @ p["v_proj"]["kernel"]).reshape(B, T, Hkv, dh)
    segn = np.asarray(seg)
    o = np.zeros((B, T, H, dh))
    for b in range(B):
        for h in range(H):
            for t in range(T):
                keys = [i for i in range(t + 1) if segn[b, i] == segn[b, t]]
                s = np.array([q[b, t, h] @ k[b, i, h // 2] for i in keys]) / np.sqrt(dh)
                w = np.exp(s - s.max())
                o[b, t, h] = (w / w.sum()) @ v[b, keys, h // 2]
    want = o.reshape(B, T, -1) @ p["o_proj"]["kernel"]
    np.testing.assert_allclose(y, want, rtol=2e-4, atol=2e-4 * np.abs(want).max())


def _attention_reference(p, xn, seg, H, Hkv, conv):
    """NumPy GQA attention with RoPE (positions restart per segment) and a segment mask; with
    `conv` a causal conv + SiLU on each projection first, run per segment (zeros before each
    segment's start). x [B, T, D], seg [B, T]. Returns [B, T, D]."""
    Bn, Tn, _ = xn.shape
    dh = p["q_proj"]["kernel"].shape[1] // H
    proj = {n: xn @ p[f"{n}_proj"]["kernel"] for n in "qkv"}
    pos = np.zeros((Bn, Tn))
    for b in range(Bn):
        starts = [0] + [t for t in range(1, Tn) if seg[b, t] != seg[b, t - 1]] + [Tn]
        for lo, hi in zip(starts[:-1], starts[1:]):
            pos[b, lo:hi] = np.arange(hi - lo)
            if conv:
                for n in "qkv":
                    proj[n][b:b + 1, lo:hi] = causal_conv(proj[n][b:b + 1, lo:hi],
                                                          p[f"{n}_conv"]["kernel"])
    q = rope(proj["q"].reshape(Bn, Tn, H, dh), pos)
    k = rope(proj["k"].reshape(Bn, Tn, Hkv, dh), pos)
    v = proj["v"].reshape(Bn, Tn, Hkv, dh)
    o = np.zeros((Bn, Tn, H, dh))
    for b in range(Bn):
        for h in range(H):
            for t in range(Tn):
                keys = [i for i in range(t + 1) if seg[b, i] == seg[b, t]]
                s = np.array([q[b, t, h] @ k[b, i, h // (H // Hkv)] for i in keys]) / np.sqrt(dh)
                w = np.exp(s - s.max())
                o[b, t, h] = (w / w.sum()) @ v[b, keys, h // (H // Hkv)]
    return o.reshape(Bn, Tn, -1) @ p["o_proj"]["kernel"]


ATTN_CONV = dict(hidden_size=D, num_heads=4, num_kv_heads=2, std=STD, use_short_conv=True)


def test_attention_short_conv_matches_reference():
    """use_short_conv: causal depthwise conv + SiLU on q, k, v before RoPE, cut at packed
    segment boundaries, against NumPy."""
    layer = Attention(**ATTN_CONV)
    x = _x(13)
    seg = jnp.array([[1] * 6 + [2] * (T - 6), [1] * T], jnp.int32)
    variables, y, _ = _init_apply(layer, x, segment_ids=seg)
    p = _np_params(variables)
    assert p["q_conv"]["kernel"].shape == (4, D) and p["k_conv"]["kernel"].shape == (4, D // 2)
    want = _attention_reference(p, np.asarray(x, np.float64), np.asarray(seg), 4, 2, conv=True)
    np.testing.assert_allclose(y, want, rtol=2e-4, atol=2e-4 * np.abs(want).max())
    plain = _attention_reference(p, np.asarray(x, np.float64), np.asarray(seg), 4, 2, conv=False)
    assert np.abs(want - plain).max() > 1e-2 * np.abs(want).max()  # the conv really acts


def test_attention_short_conv_cache_continues_the_sequence():
    """prefill(x[:6]) then decode(x[6:10]) in one chunk, then one token at a time: equals the
    full forward; the cache carries the conv tails beside the KV cache."""
    layer = Attention(**ATTN_CONV)
    x = _x(14)
    variables = init(layer, x, 4)
    full = np.asarray(run(layer, variables, x)[0])
    prefill = jax.jit(lambda v, x: layer.apply(v, x, mode="prefill", max_len=T))
    y, cache = prefill(variables, x[:, :6])
    assert cache["conv_q"].shape == (B, 3, D) and cache["conv_v"].shape == (B, 3, D // 2)
    ys = [y]
    for lo, hi in ((6, 10), (10, 11)):
        pos = jnp.broadcast_to(jnp.arange(lo, hi), (B, hi - lo))
        y, cache = run(layer, variables, x[:, lo:hi], mode="decode", cache=cache, positions=pos)
        ys.append(y)
    np.testing.assert_allclose(np.concatenate(ys, 1), full, rtol=1e-4, atol=1e-5)


def test_attention_short_conv_gradients_flow():
    """Every parameter, the conv kernels included, gets a finite, non-zero gradient."""
    layer = Attention(**ATTN_CONV)
    x = _x(15)
    variables = init(layer, x, 5)
    grads = jax.jit(jax.grad(lambda v: jnp.sum(jnp.square(layer.apply(v, x)[0]))))(variables)
    for path, g in jax.tree_util.tree_leaves_with_path(nn.meta.unbox(grads)):
        g = np.asarray(g)
        assert np.all(np.isfinite(g)) and np.abs(g).max() > 0, jax.tree_util.keystr(path)
    assert {"q_conv", "k_conv", "v_conv"} <= set(nn.meta.unbox(grads)["params"])


# ------------------------------------------------------------------ bad configs
@pytest.mark.parametrize("kwargs, message", [
    (dict(hidden_size=30, num_heads=4), "not divisible by num_heads"),
    (dict(hidden_size=32, num_heads=4, feature_map="tanh"), "unknown feature_map"),
    (dict(hidden_size=32, num_heads=4, num_kv_heads=3), "must divide num_heads"),
    (dict(hidden_size=32, num_heads=4, gate="sigmoid"), "unknown gate"),
    (dict(hidden_size=32, num_heads=4, slot_nonlinearity="gelu"), "unknown slot_nonlinearity"),
    (dict(hidden_size=32, num_heads=4, num_slots=0), "num_slots must be positive"),
    (dict(hidden_size=32, num_heads=4, expand_k=0.3), "must be a positive integer"),
])
def test_gsa_bad_config_raises(kwargs, message):
    with pytest.raises(ValueError, match=message):
        jax.eval_shape(GatedSlotAttention(**kwargs).init, jax.random.key(0),
                       jnp.ones((1, 3, kwargs["hidden_size"])))


def test_bad_mode_and_cache_raise():
    layer = GatedSlotAttention(D)
    x = _x(12, (1, 3, D))
    variables = jax.eval_shape(layer.init, jax.random.key(0), x)
    with pytest.raises(ValueError, match="needs the cache"):
        jax.eval_shape(lambda v: layer.apply(v, x, mode="decode"), variables)
    with pytest.raises(ValueError, match="unknown mode"):
        jax.eval_shape(lambda v: layer.apply(v, x, mode="generate"), variables)
