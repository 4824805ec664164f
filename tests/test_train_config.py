"""Config files and overrides, the learning-rate schedule, weight decay, the loss, FLOPs/MFU."""

from __future__ import annotations

import math
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gsa_jax import flops
from gsa_jax.config import Config, dump_yaml, load_config
from gsa_jax.models import CausalLM, get_preset
from gsa_jax.optim import OptimConfig, loss_sums, make_optimizer, make_schedule

CONFIGS = sorted((pathlib.Path(__file__).parent.parent / "configs").glob("*.yaml"))


# ----------------------------------------------------------------------- config
@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load_and_round_trip(path):
    config = load_config(path)
    assert Config.from_dict(config.to_dict()) == config
    import yaml
    assert Config.from_dict(yaml.safe_load(dump_yaml(config))) == config


def test_configs_exist():
    assert any(p.name == "tiny.yaml" for p in CONFIGS)


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("steps: 50\nmodel: {preset: gsa-tiny, vocab_size: 300}\n"
                    "optim: {lr: 1e-3}\ndata: {seq_len: 64}\n")
    config = load_config(path, ["optim.lr=2e-4", "model.num_layers=3", "mesh.fsdp=2",
                                "data.bos_id=null", "logging.progress=false"])
    assert config.steps == 50 and config.optim.lr == 2e-4 and config.data.seq_len == 64
    assert config.model.vocab_size == 300 and config.model.num_layers == 3
    assert config.model.hidden_size == get_preset("gsa-tiny").hidden_size   # from the preset
    # Without a model section, model fields override the default (tiny) model, not 1.3B.
    small = load_config(None, ["model.num_layers=1"])
    assert small.model == get_preset("gsa-tiny", vocab_size=264, num_layers=1)
    assert config.mesh.fsdp == 2 and config.logging.progress is False
    # A profiler window: [first, last], or one step n as [n, n].
    assert load_config(None, ["logging.profile_steps=[10, 12]"]).logging.profile_steps == [10, 12]
    assert load_config(None, ["logging.profile_steps=7"]).logging.profile_steps == [7, 7]


@pytest.mark.parametrize("override,match", [
    ("optim.lrr=1", "unknown key"),
    ("optim.lr=fast", "cannot read"),
    ("optim.lr=-1", "lr must be positive"),
    ("optim.schedule=step", "unknown schedule"),
    ("data.batch_size=2.5", "expected int"),
    ("data.source=web", "unknown source"),
    ("mesh.data=0", "positive ints or -1"),
    ("model.preset=gsa-9b", "unknown model preset"),
    ("model.num_heads=3", "divisible"),
    ("steps=0", "steps must be"),
    ("training.steps=3", "unknown key"),
    ("optim", "key=value"),
    ("logging.profile_steps=[5,3]", "profile_steps"),
    ("logging.profile_steps=[0,3]", "profile_steps"),
    ("logging.profile_steps=[1,2,3]", "profile_steps"),
    ("logging.profile_steps=soon", "profile_steps"),
])
def test_bad_values_are_clear_errors(override, match):
    with pytest.raises(ValueError, match=match):
        load_config(None, [override])


def test_missing_config_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


# ----------------------------------------------------------------------- schedule
def test_cosine_schedule_closed_form():
    cfg = OptimConfig(lr=1e-3, warmup_steps=10, min_lr_ratio=0.1, schedule="cosine")
    total = 100
    sched = make_schedule(cfg, total)
    for s in [0, 1, 5, 10, 11, 40, 77, 99, 100]:
        if s < 10:
            want = 1e-3 * s / 10
        else:
            frac = (s - 10) / (total - 10)
            want = 1e-4 + (1e-3 - 1e-4) * 0.5 * (1 + math.cos(math.pi * frac))
        assert float(sched(s)) == pytest.approx(want, rel=1e-5, abs=1e-9), s


def test_linear_and_constant_schedules():
    lin = make_schedule(OptimConfig(lr=2.0, warmup_steps=4, min_lr_ratio=0.5,
                                    schedule="linear"), 14)
    assert [float(lin(s)) for s in (0, 2, 4, 9, 14)] == pytest.approx([0, 1, 2, 1.5, 1])
    const = make_schedule(OptimConfig(lr=2.0, warmup_steps=0, schedule="constant"), 14)
    assert float(const(0)) == float(const(13)) == 2.0


# ----------------------------------------------------------------------- weight decay
def test_weight_decay_hits_matrices_only():
    """With zero gradients AdamW's update is -lr·wd·p on decayed parameters, 0 elsewhere."""
    model = CausalLM(get_preset("gsa-tiny", use_short_conv=True, tie_word_embeddings=False))
    params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    params = nn.meta.unbox(params)
    params = jax.tree.map(lambda p: p + 0.5, params)  # norm scales etc. non-zero and distinct
    cfg = OptimConfig(lr=0.1, warmup_steps=0, schedule="constant", weight_decay=0.3,
                      grad_clip=0.0)
    tx, _ = make_optimizer(cfg, 10)
    updates, _ = jax.jit(tx.update)(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    flat = {jax.tree_util.keystr(k): (p, u) for (k, p), u in
            zip(jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(updates))}
    decayed = set()
    for name, (p, u) in flat.items():
        if np.allclose(u, -0.1 * 0.3 * p, rtol=1e-5):
            decayed.add(name)
        else:
            np.testing.assert_array_equal(u, 0.0)
    for name, (p, _) in flat.items():
        # gsa-tiny scans its layers: their params carry a leading [L] axis.
        ndim = p.ndim - 1 if "'layers'" in name else p.ndim
        is_matrix = ndim >= 2 and "embedding" not in name
        assert (name in decayed) == is_matrix, name
    assert any("lm_head" in n for n in decayed) and any("conv" in n for n in decayed)
    assert not any("scale" in n for n in decayed)
    assert any("'layers'" in n for n in decayed)
    # The same parameters decay in both layer layouts.
    from gsa_jax import layer_layout
    from gsa_jax.optim import weight_decay_mask
    plain = layer_layout.to_unscanned(params)
    assert "layer_1" in plain
    m_plain, m_scan = weight_decay_mask(plain), weight_decay_mask(params)
    for i in range(2):
        assert m_plain[f"layer_{i}"] == m_scan["layers"]
    assert {k: v for k, v in m_plain.items() if not k.startswith("layer_")} == {
        k: v for k, v in m_scan.items() if k != "layers"}


# ----------------------------------------------------------------------- loss
def test_loss_sums_against_numpy():
    rng = np.random.default_rng(0)
    B, T, V = 3, 7, 11
    logits = rng.normal(size=(B, T, V)).astype(np.float32) * 3
    targets = rng.integers(0, V, (B, T))
    mask = (rng.random((B, T)) > 0.3).astype(np.float32)
    out = loss_sums(jnp.asarray(logits, jnp.bfloat16).astype(jnp.float32), jnp.asarray(targets),
                    jnp.asarray(mask), z_loss=1e-2)
    lg = np.asarray(jnp.asarray(logits, jnp.bfloat16).astype(jnp.float32), np.float64)
    log_z = np.log(np.exp(lg - lg.max(-1, keepdims=True)).sum(-1)) + lg.max(-1)
    ce = log_z - np.take_along_axis(lg, targets[..., None], -1)[..., 0]
    assert float(out.ce) == pytest.approx((ce * mask).sum(), rel=1e-5)
    assert float(out.z) == pytest.approx((log_z ** 2 * mask).sum(), rel=1e-5)
    assert float(out.total) == pytest.approx(((ce + 1e-2 * log_z ** 2) * mask).sum(), rel=1e-5)
    assert float(out.count) == mask.sum()
    # optax's own cross-entropy agrees on the unmasked mean
    ref = optax.softmax_cross_entropy_with_integer_labels(jnp.asarray(lg, jnp.float32),
                                                          jnp.asarray(targets))
    assert float(out.ce) == pytest.approx(float((ref * mask).sum()), rel=1e-5)


# ----------------------------------------------------------------------- FLOPs / MFU
def test_flops_per_token_by_hand():
    cfg = get_preset("gsa-tiny", vocab_size=264)        # D=64, L=2, H=4, M=8, untied
    shapes = jax.eval_shape(CausalLM(cfg).init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
    n = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(nn.meta.unbox(shapes)))
    n_matmul = n - 264 * 64                              # the input table is a lookup
    mixer = 4 * 4 * 8 * (16 + 16)                        # H · 2·2 · M · (dk + dv)
    assert flops.train_flops_per_token(cfg, 128) == 6 * n_matmul + 3 * 2 * mixer
    attn = get_preset("transformer-tiny", vocab_size=264)
    # Attention adds 4·T·D forward per layer: the difference between two lengths shows it.
    diff = flops.train_flops_per_token(attn, 256) - flops.train_flops_per_token(attn, 128)
    assert diff == 3 * attn.num_layers * 4 * 128 * attn.hidden_size


def test_peak_flops_table():
    assert flops.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert flops.peak_flops("NVIDIA H100 PCIe") == 756e12
    assert flops.peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert flops.peak_flops("cpu") is None
