"""The causal LM: decode equals the full forward, packed rows equal separate runs, the config
(presets, parameter counts, YAML, errors), sharding names, remat and dtypes."""

import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml

from gsa_jax.models import CausalLM, ModelConfig, count_params, get_preset, presets

VOCAB_AXES = {"vocab", "embed", "heads", "kv_heads", "mlp", "conv", "norm", "lowrank"}


def _model(name, **overrides):
    # A wider init than 0.02 so that logits differ clearly between positions and models.
    cfg = get_preset(name, initializer_range=0.2, chunk_size=4, **overrides)
    return CausalLM(cfg), cfg


def _tokens(cfg, shape, seed=0):
    return jax.random.randint(jax.random.key(seed), shape, 0, cfg.vocab_size, jnp.int32)


def _init(model, tokens):
    return jax.jit(model.init)(jax.random.key(0), tokens)


@functools.lru_cache(maxsize=None)
def _jit_forward(model):  # one jitted function per model (modules hash by their config)
    return jax.jit(lambda p, t, s: model.apply(p, t, s))


def _forward(model, params, tokens, segment_ids=None):
    return _jit_forward(model)(params, tokens, segment_ids)


# -------------------------------------------------------- decode = full forward
@pytest.mark.parametrize("name, overrides", [
    ("gsa-tiny", dict(gate="none", use_short_conv=True, num_kv_heads=2)),
    ("gsa-hybrid-tiny", {}),  # default GSA layers and an attention layer
    ("gsa-hybrid-tiny", dict(attention_short_conv=True)),  # the conv tails in attention's cache
    ("gla-tiny", {}),
    ("retnet-tiny", {}),
    ("transformer-tiny", {}),
], ids=["gsa-abc-conv-gqa", "hybrid", "hybrid-attention-conv", "gla", "retnet", "transformer"])
def test_prefill_then_decode_equals_full_forward(name, overrides):
    """Logits of prefill(prompt) + one-token decode steps (teacher forcing) equal one forward
    pass over the whole sequence, float32."""
    model, cfg = _model(name, **overrides)
    Bt, T, P = 2, 10, 6
    tokens = _tokens(cfg, (Bt, T))
    params = _init(model, tokens)
    full = np.asarray(_forward(model, params, tokens))
    prefill = jax.jit(lambda p, t: model.apply(p, t, max_len=T, method=CausalLM.prefill))
    decode = jax.jit(lambda p, t, pos, c: model.apply(p, t, pos, c, method=CausalLM.decode))
    logits, cache = prefill(params, tokens[:, :P])
    steps = [np.asarray(logits)]
    for t in range(P, T):
        logits, cache = decode(params, tokens[:, t:t + 1], jnp.full((Bt, 1), t, jnp.int32), cache)
        steps.append(np.asarray(logits))
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, rtol=1e-4,
                               atol=1e-4 * np.abs(full).max())
    assert np.abs(full[:, 1:] - full[:, :-1]).max() > 1e-2  # the positions really differ


# ----------------------------------------------------- packed = separate runs
@pytest.mark.parametrize("name", ["gsa-hybrid-tiny", "retnet-tiny"])
def test_packed_batch_equals_separate_runs(name):
    """Segments packed in one row give the logits of each segment run alone: recurrent states,
    conv tails and attention are cut at the boundaries, RoPE positions restart."""
    model, cfg = _model(name, use_short_conv=True)
    lengths = [6, 4, 6]
    tokens = _tokens(cfg, (1, sum(lengths)), seed=3)
    # Ids only need to differ between neighbours: the first and last segment share id 1.
    segment_ids = jnp.array([[1] * 6 + [2] * 4 + [1] * 6], jnp.int32)
    params = _init(model, tokens)
    packed = np.asarray(_forward(model, params, tokens, segment_ids))[0]
    start = 0
    for n in lengths:
        alone = np.asarray(_forward(model, params, tokens[:, start:start + n]))[0]
        np.testing.assert_allclose(packed[start:start + n], alone, rtol=1e-4,
                                   atol=1e-4 * np.abs(alone).max())
        start += n


# ------------------------------------------------------------ config, counts
def _hand_count(cfg: ModelConfig) -> int:
    """Parameters from the architecture, written out term by term (peer layout)."""
    D, L, V = cfg.hidden_size, cfg.num_layers, cfg.vocab_size
    width = 256 * math.ceil(int(D * cfg.hidden_ratio * 2 / 3) / 256)
    total = V * D + (0 if cfg.tie_word_embeddings else D * V) + D  # embed, head, final norm
    for layer in range(L):
        total += 2 * D + 3 * D * width                           # two block norms, SwiGLU
        if layer in cfg.attn_layers or cfg.mixer == "attention":
            total += 4 * D * D                                   # q, k, v, o (MHA)
            continue
        H = cfg.num_heads
        Hkv = cfg.num_kv_heads or H
        K, Vd = int(D * cfg.expand_k), int(D * cfg.expand_v)
        qkvo = D * K + D * (K // H * Hkv) + D * (Vd // H * Hkv) + Vd * D   # q, k, v, o
        if cfg.mixer == "gsa":
            M = cfg.num_slots
            gate = D * Hkv * M if cfg.gate != "data_independent" else Hkv * M
            total += qkvo + gate + (Vd if cfg.elementwise_affine else 0)
        elif cfg.mixer == "gla":
            r = cfg.gate_low_rank_dim
            total += qkvo + D * r + r * K // H * Hkv + K // H * Hkv + D * Vd + Vd // H
        else:  # retnet
            total += qkvo + D * Vd + Vd // H
    return total


# The paper names sizes by class: 340M (Table 2 ablations), 1.3B and 2.7B (Table 1). Those are
# labels: the 1.3B class of every model family here has 1.35-1.38B parameters, as the authors'
# released GLA 1.3B checkpoint (D=2048, L=24, untied 32K vocab: 1.37B). We keep the released
# architectures and check them against the label within 2% where that holds, within 6% (the
# size class) where the label is known to be nominal, and against released counts where published.
LABELS = {"340m": 340e6, "1.3b": 1.3e9, "2.7b": 2.7e9}
NOMINAL = {"gsa-340m": 0.0218, "gsa-340m-abc": 0.0218, "gsa-340m-swish": 0.0218,
           "gsa-340m-relu": 0.0218, "gsa-340m-relu2": 0.0218, "gsa-340m-128slots": 0.0403,
           "retnet-340m": 0.0218, "gsa-1.3b": 0.0592, "transformer-1.3b": 0.0495,
           "gla-1.3b": 0.0504, "retnet-1.3b": 0.0398}
RELEASED = {"gla-1.3b": 1.37e9}


@pytest.mark.parametrize("name", sorted(n for n in presets if "tiny" not in n))
def test_preset_parameter_counts(name):
    cfg = presets[name]
    n = count_params(cfg)  # jax.eval_shape: no allocation
    assert n == _hand_count(cfg), name
    label = next(v for k, v in LABELS.items() if k in name)
    deviation = n / label - 1
    if name in NOMINAL:
        assert abs(deviation - NOMINAL[name]) < 5e-4 and abs(deviation) < 0.06, (name, n)
    else:
        assert abs(deviation) < 0.02, (name, n)
    if name in RELEASED:
        assert abs(n / RELEASED[name] - 1) < 0.02, (name, n)


def test_paper_configs():
    """The authors' released configs (fla-hub gsa-1.3B-100B, gsa-2.7B-100B; flame's
    gsa_340M.json and gsa_1B.json; PAPER.md sections 6-7): sizes, head dim D/H (256 at 340M,
    512 above), gate normaliser (4 at 340M, 8 above), no norm scale in the mixer."""
    for name, (D, L, H, M, tied, tau) in {"gsa-1.3b": (2048, 24, 4, 64, False, 8.0),
                                          "gsa-2.7b": (2560, 32, 5, 64, False, 8.0),
                                          "gsa-340m": (1024, 24, 4, 64, True, 4.0)}.items():
        cfg = presets[name]
        assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.num_slots,
                cfg.tie_word_embeddings, cfg.vocab_size) == (D, L, H, M, tied, 32000)
        assert (cfg.gate_logit_normalizer, cfg.feature_map, cfg.mlp_width) == (
            tau, "swish", {1024: 2816, 2048: 5632, 2560: 6912}[D])
        assert (cfg.expand_k, cfg.expand_v, cfg.elementwise_affine, cfg.use_short_conv,
                cfg.norm_eps, cfg.output_norm_eps) == (1.0, 1.0, False, False, 1e-6, None)
    for name in (n for n in presets if n.startswith("gsa-340m-")):  # Table 2's rows
        assert presets[name].gate_logit_normalizer == 4.0, name


def test_config_yaml_round_trip():
    for name in ("gsa-hybrid-tiny", "gsa-2.7b", "gla-340m"):
        cfg = presets[name].replace(dtype="bfloat16", remat=True)
        text = yaml.safe_dump(cfg.to_dict())
        back = ModelConfig.from_dict(yaml.safe_load(text))
        assert back == cfg and hash(back) == hash(cfg)
        assert all(isinstance(v, (str, int, float, bool, list, type(None)))
                   for v in cfg.to_dict().values())


@pytest.mark.parametrize("changes, message", [
    (dict(hidden_size=100, num_heads=3), "not divisible by num_heads"),
    (dict(feature_map="elu"), "unknown feature_map"),
    (dict(num_kv_heads=3), "must divide num_heads"),
    (dict(mixer="mamba"), "unknown mixer"),
    (dict(gate="learned"), "unknown gate"),
    (dict(slot_nonlinearity="tanh"), "unknown slot_nonlinearity"),
    (dict(attn_layers=[0, 7]), r"attn_layers \[0, 7\] must be distinct indices in \[0, 2\)"),
    (dict(attn_layers=[1], attn_num_heads=5), "attention: .*not divisible"),
    (dict(impl="cuda"), "unknown impl"),
    (dict(dtype="int8"), "unknown dtype"),
    (dict(num_layers=0), "num_layers must be a positive int"),
    (dict(hiden_size=64), r"unknown field\(s\) \['hiden_size'\]"),
])
def test_bad_config_raises(changes, message):
    with pytest.raises(ValueError, match=message):
        get_preset("gsa-tiny", **changes)


def test_unknown_preset_raises():
    with pytest.raises(ValueError, match="unknown model preset 'gsa-9b'"):
        get_preset("gsa-9b")


# ------------------------------------------------ sharding names, init, dtypes
def test_logical_axis_names_and_init():
    model, cfg = CausalLM(presets["gsa-hybrid-tiny"]), presets["gsa-hybrid-tiny"]
    tokens = _tokens(cfg, (2, 5))
    variables = _init(model, tokens)
    specs = nn.get_partition_spec(variables)["params"]
    for path, spec in jax.tree_util.tree_leaves_with_path(
            specs, is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec)):
        assert isinstance(spec, jax.sharding.PartitionSpec) and set(spec) <= VOCAB_AXES, path
    assert specs["embed"]["embedding"] == jax.sharding.PartitionSpec("vocab", "embed")
    mixer0, attn1 = specs["layer_0"]["mixer"], specs["layer_1"]["mixer"]
    assert mixer0["q_proj"]["kernel"] == jax.sharding.PartitionSpec("embed", "heads")
    assert mixer0["f_proj"]["kernel"] == jax.sharding.PartitionSpec("embed", "kv_heads")
    assert mixer0["o_proj"]["kernel"] == jax.sharding.PartitionSpec("heads", "embed")
    assert "f_proj" not in attn1 and "q_proj" in attn1  # layer 1 is softmax attention
    assert specs["layer_0"]["mlp"]["down_proj"]["kernel"] == jax.sharding.PartitionSpec("mlp", "embed")
    # Boxed (as init returns them) and unboxed parameters give the same logits.
    params = nn.meta.unbox(variables)
    np.testing.assert_array_equal(np.asarray(_forward(model, variables, tokens)),
                                  np.asarray(_forward(model, params, tokens)))
    # normal(0.02) init; the residual-writing matrices scaled by 1/sqrt(2L) (GPT-2 / the peer).
    big = nn.meta.unbox(jax.jit(CausalLM(get_preset("gsa-tiny", hidden_size=256)).init)(
        jax.random.key(1), tokens))["params"]
    # (gsa-tiny scans its layers: params stacked [L, ...] under "layers", one draw per layer.)
    q = big["layers"]["mixer"]["q_proj"]["kernel"]
    assert q.shape == (2, 256, 256) and not np.allclose(q[0], q[1])
    assert abs(np.std(q[0]) / 0.02 - 1) < 0.05
    assert abs(np.std(big["layers"]["mlp"]["down_proj"]["kernel"][0]) / (0.02 / 2) - 1) < 0.05
    assert abs(np.std(big["embed"]["embedding"]) / 0.02 - 1) < 0.05


def test_tied_embeddings_use_the_embedding_matrix():
    model, cfg = _model("gsa-tiny", tie_word_embeddings=True)
    tokens = _tokens(cfg, (1, 4))
    params = nn.meta.unbox(_init(model, tokens))
    assert "lm_head" not in params["params"]
    assert count_params(cfg) == count_params(cfg.replace(tie_word_embeddings=False)) - 64 * 256
    # The tied head is the untied one with W_head = Eᵀ.
    untied = CausalLM(cfg.replace(tie_word_embeddings=False))
    with_head = {"params": {**params["params"], "lm_head": {
        "kernel": params["params"]["embed"]["embedding"].T}}}
    np.testing.assert_allclose(np.asarray(_forward(model, params, tokens)),
                               np.asarray(_forward(untied, with_head, tokens)), rtol=1e-6)


@pytest.mark.slow  # over 30 s on a 2-core CPU: CI's second step
def test_remat_and_bfloat16():
    """remat and the GSA layers' recompute_states compute the same function (loss and
    gradients); bf16 compute stays close to f32 and returns float32 logits."""
    model, cfg = _model("gsa-tiny")
    tokens = _tokens(cfg, (2, 8))
    params = nn.meta.unbox(_init(model, tokens))

    def loss(model, p):
        logits = model.apply(p, tokens)
        return -jnp.mean(jax.nn.log_softmax(logits)[..., 0])

    remat = CausalLM(dataclasses.replace(cfg, remat=True))
    l0, g0 = jax.jit(jax.value_and_grad(lambda p: loss(model, p)))(params)
    l1, g1 = jax.jit(jax.value_and_grad(lambda p: loss(remat, p)))(params)
    np.testing.assert_allclose(l0, l1, rtol=1e-6)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                           g0, g1)
    # The GSA layers' hidden-state recomputation: same loss and gradients, a checkpoint inside.
    recompute = CausalLM(dataclasses.replace(cfg, recompute_states=True))
    l2, g2 = jax.jit(jax.value_and_grad(lambda p: loss(recompute, p)))(params)
    np.testing.assert_allclose(l0, l2, rtol=1e-6)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                           g0, g2)
    # Printed whole, sub-jaxprs included: gsa-tiny's blocks run inside an nn.scan.
    program = str(jax.make_jaxpr(jax.grad(lambda p: loss(recompute, p)))(params))
    assert "checkpoint[" in program or "remat2[" in program, program[:2000]
    bf16 = CausalLM(dataclasses.replace(cfg, dtype="bfloat16"))
    logits16 = _forward(bf16, params, tokens)
    logits32 = np.asarray(_forward(model, params, tokens))
    assert logits16.dtype == jnp.float32
    assert np.abs(np.asarray(logits16) - logits32).max() < 0.1 * np.abs(logits32).max()
