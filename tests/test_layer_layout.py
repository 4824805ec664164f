"""Scanned layers (`scan_layers`, one nn.scan over the blocks) against the list of blocks with the
same weights (converted by gsa_jax.layer_layout): logits, prefill + decode, gradients in
float32; the layout converter on params and Adam states; checkpoints written in one layout and
restored in the other; the named remat policies; the hybrid fallback."""

from __future__ import annotations

import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gsa_jax import sharding as shd
from gsa_jax import steps
from gsa_jax.checkpoint import CheckpointConfig, Checkpointer
from gsa_jax.config import build_model_config
from gsa_jax.models import CausalLM, get_preset
from gsa_jax import layer_layout

TOL = dict(rtol=2e-5, atol=2e-5)


def _pair(name: str, **overrides):
    """(scanned config, unscanned config) of a preset."""
    scanned = get_preset(name, scan_layers=True, **overrides)
    return scanned, scanned.replace(scan_layers=False)


def _random_params(cfg, seed: int):
    """Unscanned params of `cfg` with every leaf random (norm scales too, so a layer mix-up
    shows)."""
    tokens = jnp.zeros((1, 1), jnp.int32)
    shapes = nn.meta.unbox(jax.eval_shape(CausalLM(cfg).init, jax.random.key(0), tokens))
    leaves, tree = jax.tree.flatten(shapes["params"])
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(tree, [0.1 * jax.random.normal(k, x.shape, jnp.float32)
                                     for k, x in zip(keys, leaves)])


def _close(a, b, **tol):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), **(tol or TOL))


@pytest.mark.slow  # gsa-tiny alone took 46 s on the 2-core CI machine: CI's second step
@pytest.mark.parametrize("name", ["gsa-tiny", "transformer-tiny", "gla-tiny", "retnet-tiny"])
def test_scanned_model_computes_the_unscanned_function(name):
    scanned, plain = _pair(name, use_short_conv=name != "transformer-tiny")
    assert scanned.scanned and not plain.scanned
    p_plain = _random_params(plain, seed=1)
    p_scan = layer_layout.to_scanned(p_plain)
    # The converted tree is exactly the scanned model's layout.
    want = nn.meta.unbox(jax.eval_shape(CausalLM(scanned).init, jax.random.key(0),
                                        jnp.zeros((1, 1), jnp.int32)))["params"]
    assert jax.tree.map(jnp.shape, want) == jax.tree.map(jnp.shape, p_scan)
    B, P, N = 2, 11, 3
    tokens = jax.random.randint(jax.random.key(2), (B, P + N), 0, plain.vocab_size)
    segments = jnp.asarray(np.repeat([[0] * 6 + [1] * (P + N - 6)], B, 0))
    m_scan, m_plain = CausalLM(scanned), CausalLM(plain)

    # Training forward (packed segments) and its gradients.
    def loss(model, params):
        logits = model.apply({"params": params}, tokens, segments)
        return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[..., 0]), logits

    def grads(model):
        return jax.jit(jax.value_and_grad(lambda p: loss(model, p), has_aux=True))

    (l_s, logits_s), g_s = grads(m_scan)(p_scan)
    (l_p, logits_p), g_p = grads(m_plain)(p_plain)
    _close(logits_s, logits_p)
    np.testing.assert_allclose(float(l_s), float(l_p), **TOL)
    _close(layer_layout.to_unscanned(g_s), g_p)

    # Prefill the prompt, then decode the next N tokens one at a time from the cache.
    @jax.jit
    def run(params):
        model = m_scan if "layers" in params else m_plain
        logits, cache = model.apply({"params": params}, tokens[:, :P], max_len=P + N,
                                    method="prefill")
        outs = [logits]
        for t in range(P, P + N):
            pos = jnp.full((B, 1), t, jnp.int32)
            logits, cache = model.apply({"params": params}, tokens[:, t:t + 1], pos, cache,
                                        method="decode")
            outs.append(logits)
        return outs, cache

    outs_s, cache_s = run(p_scan)
    outs_p, cache_p = run(p_plain)
    _close(outs_s, outs_p)
    # The scanned cache is the per-layer caches stacked on a leading [L] axis.
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *cache_p)
    _close(cache_s, stacked)
    # ... and decoding agrees with scoring the whole sequence at once.
    _close(jnp.concatenate(outs_s, 1), logits_p_full(m_plain, p_plain, tokens),
           rtol=1e-4, atol=1e-4)


def logits_p_full(model, params, tokens):
    return jax.jit(lambda p: model.apply({"params": p}, tokens))(params)


def test_layout_conversion_of_params_and_adam_state_round_trips():
    _, plain = _pair("gsa-tiny", num_layers=3)
    params = _random_params(plain, seed=3)
    tx = optax.adamw(1e-3)
    opt = tx.init(params)
    # Moments that differ from the params and from each other.
    _, opt = tx.update(jax.tree.map(lambda x: 0.5 * x + 1, params), opt, params)
    state = steps.TrainState(step=jnp.int32(1), params=params, opt_state=opt,
                             rng=jnp.zeros((2,), jnp.uint32))
    scanned = layer_layout.to_scanned(state)
    assert layer_layout.is_scanned(scanned) is True and layer_layout.is_scanned(state) is False
    # Every layer's array sits at its index of the stacked leaf, in params and in moments.
    for tree_s, tree_p in ((scanned.params, params), (scanned.opt_state[0].mu, opt[0].mu),
                           (scanned.opt_state[0].nu, opt[0].nu)):
        assert "layer_0" not in tree_s and set(tree_s) - {"layers"} == set(tree_p) - {
            "layer_0", "layer_1", "layer_2"}
        for i in range(3):
            for a, b in zip(jax.tree.leaves(tree_s["layers"]),
                            jax.tree.leaves(tree_p[f"layer_{i}"])):
                np.testing.assert_array_equal(np.asarray(a[i]), np.asarray(b))
    # The scanned state has the structure the optimizer gives a scanned model's params.
    assert jax.tree.structure(scanned.opt_state) == jax.tree.structure(
        tx.init(scanned.params))
    back = layer_layout.to_unscanned(scanned)
    assert jax.tree.structure(back) == jax.tree.structure(state)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # NumPy leaves stay NumPy; an already-converted tree passes unchanged.
    host = jax.tree.map(np.asarray, params)
    assert isinstance(jax.tree.leaves(layer_layout.to_scanned(host))[0], np.ndarray)
    assert layer_layout.to_scanned(scanned) is not None
    assert jax.tree.structure(layer_layout.to_scanned(scanned)) == jax.tree.structure(scanned)


@pytest.mark.slow   # ~23 s each; the fast tier keeps the conversion round trip (above)
@pytest.mark.parametrize("write_scanned", [False, True])
def test_checkpoint_restores_into_the_other_layout(tmp_path, write_scanned):
    """A checkpoint of one layout resumes (whole state, and params only) in the other."""
    scanned, plain = _pair("gsa-tiny")
    mesh = shd.make_mesh(shd.MeshConfig())
    tx = optax.adamw(1e-3)
    writer_cfg, reader_cfg = (scanned, plain) if write_scanned else (plain, scanned)
    w_model, r_model = CausalLM(writer_cfg), CausalLM(reader_cfg)
    w_layout = steps.state_layout(w_model, tx, mesh)
    state = steps.init_state(w_model, tx, 7, w_layout, mesh)
    # Non-zero moments: one real update.
    grads = jax.tree.map(lambda x: jnp.cos(x) + 0.1, state.params)
    _, opt = tx.update(grads, state.opt_state, state.params)
    state = state.replace(opt_state=opt, step=jnp.int32(5))
    ckpt = Checkpointer(tmp_path, CheckpointConfig(async_save=False))
    ckpt.save(5, state, {"step": 5})
    ckpt.wait()
    ckpt.close()

    r_layout = steps.state_layout(r_model, tx, mesh)
    reader = Checkpointer(tmp_path, read_only=True)
    restored, meta = reader.restore(r_layout.abstract)
    params_only, _ = reader.restore(r_layout.abstract.params, params_only=True)
    reader.close()
    want = layer_layout.to_layout(jax.tree.map(np.asarray, state), not write_scanned)
    assert meta["step"] == 5
    assert jax.tree.structure(restored) == jax.tree.structure(r_layout.abstract)
    for a, b, s in zip(jax.tree.leaves(restored), jax.tree.leaves(want),
                       jax.tree.leaves(r_layout.shardings)):
        np.testing.assert_array_equal(np.asarray(a), b)
        assert a.sharding == s
    for a, b in zip(jax.tree.leaves(params_only), jax.tree.leaves(want.params)):
        np.testing.assert_array_equal(np.asarray(a), b)
    # The restored state trains on: one step of the reader's model runs.
    step = steps.make_train_step(r_model, tx, lambda s: 1e-3, r_layout, mesh)
    T = 8
    tok = np.random.default_rng(0).integers(0, reader_cfg.vocab_size, (2, T))
    batch = {"tokens": tok, "targets": np.roll(tok, -1, 1), "segment_ids": np.zeros_like(tok),
             "mask": np.ones_like(tok, np.float32)}
    new, metrics = step(restored, steps.device_batch(batch, mesh))
    assert np.isfinite(float(metrics["loss"])) and int(new.step) == 6


# one policy's gradient compiles in ~15 s (25 s for one policy and the reference on the
# 2-core CI machine): CI's second step
@pytest.mark.slow
@pytest.mark.parametrize("scan, compared", [
    (True, ("save_dots",)), (True, ("full", "minimal")), (False, ("full", "save_dots", "minimal"))])
def test_remat_policies_keep_the_gradients(scan, compared):
    """Every policy puts its jax.checkpoint policy in the program (none: no rematerialisation
    at all), and the `compared` ones compute the gradients of the model without remat."""
    base = get_preset("gsa-tiny", scan_layers=scan, remat="none")
    params = layer_layout.for_config(_random_params(base.replace(scan_layers=False), 4), base)
    tokens = jax.random.randint(jax.random.key(5), (2, 16), 0, base.vocab_size)

    def grad_fn(cfg):
        model = CausalLM(cfg)
        return jax.grad(lambda p: jnp.mean(model.apply({"params": p}, tokens) ** 2))

    g0 = jax.jit(grad_fn(base))(params)
    policies = {"none": None, "full": "policy=None",
                "save_dots": "DotsSaveable(only_if_no_batch_dims=False)",
                "minimal": "DotsSaveable(only_if_no_batch_dims=True)"}
    for policy, marker in policies.items():
        cfg = base.replace(remat=policy)
        jaxpr = str(jax.make_jaxpr(grad_fn(cfg))(params))
        has_remat = "checkpoint[" in jaxpr or "remat2[" in jaxpr
        assert has_remat == (policy != "none"), policy
        if marker is not None and policy != "full":
            assert marker in jaxpr, policy
        if policy in compared:
            _close(jax.jit(grad_fn(cfg))(params), g0)


def test_remat_reads_old_booleans_and_names_bad_policies(tmp_path):
    for old, new in ((True, "full"), (False, "none"), ("true", "full"), ("false", "none")):
        assert build_model_config({"preset": "gsa-tiny", "remat": old}).remat == new
    from gsa_jax.config import load_config
    path = tmp_path / "c.yaml"
    path.write_text("model: {preset: gsa-tiny, remat: true}\n")
    assert load_config(path).model.remat == "full"
    assert load_config(path, ["model.remat=minimal"]).model.remat == "minimal"
    with pytest.raises(ValueError, match="remat.*save_dots"):
        get_preset("gsa-tiny", remat="everything")


@pytest.mark.slow  # ~15 s; CI runs it in its second step
def test_hybrid_stack_falls_back_to_the_list_of_blocks(caplog):
    """scan_layers on a stack that mixes mixers: the unscanned blocks (same params and logits as
    scan_layers off), with a note."""
    hybrid = get_preset("gsa-hybrid-tiny")
    assert not hybrid.scan_layers and not hybrid.uniform
    forced = hybrid.replace(scan_layers=True, num_layers=4)
    assert not forced.scanned
    tokens = jax.random.randint(jax.random.key(6), (2, 9), 0, hybrid.vocab_size)
    params = _random_params(forced.replace(scan_layers=False), 7)
    assert "layer_1" in params and "layers" not in params
    with caplog.at_level(logging.WARNING, logger="gsa_jax.models.lm"):
        a = CausalLM(forced).apply({"params": params}, tokens)
    assert "not scanned" in caplog.text
    b = CausalLM(forced.replace(scan_layers=False)).apply({"params": params}, tokens)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # The uniform tiny presets scan by default; the hybrid one and the paper-size presets
    # (where the scanned step measured slower on a GPU) do not, and their YAML configs agree.
    from gsa_jax.models import presets
    for name, cfg in presets.items():
        assert cfg.scan_layers == (cfg.uniform and name.endswith("-tiny")), name
    import pathlib
    import yaml
    for path in sorted((pathlib.Path(__file__).parents[1] / "configs").glob("*.yaml")):
        model = yaml.safe_load(path.read_text()).get("model", {})
        if "scan_layers" in model:
            # A config without a preset is a full paper-size model (the T2R 7B): unscanned.
            expected = presets[model["preset"]].scan_layers if "preset" in model else False
            assert model["scan_layers"] == expected, path.name


def test_params_checkpoint_of_unscanned_layers_initialises_a_scanned_model(tmp_path):
    """`gsa-jax convert` writes unscanned params checkpoints; `train --init-from` into a scanned
    model reads them stacked (checkpoint.restore_params, as session.init_from_params calls it)."""
    from gsa_jax import checkpoint as checkpoint_lib
    scanned, plain = _pair("gsa-tiny", num_layers=3)
    params = jax.tree.map(np.asarray, _random_params(plain, seed=8))
    checkpoint_lib.save_params(tmp_path / "p", params, {"config": {"model": plain.to_dict()}})
    mesh = shd.make_mesh(shd.MeshConfig())
    layout = steps.state_layout(CausalLM(scanned), optax.adamw(1e-3), mesh)
    got, meta = checkpoint_lib.restore_params(tmp_path / "p", layout.abstract.params)
    assert meta["kind"] == "params"
    want = layer_layout.to_scanned(params)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(a), b)


@pytest.mark.slow  # ~20 s; CI runs it in its second step
def test_scan_unroll_keeps_the_function():
    """model.scan_unroll (blocks per loop iteration; 2 leaves a remainder at L = 3, 5 exceeds L)
    gives the logits and gradients of the rolled loop; 0 is refused."""
    rolled = get_preset("gsa-tiny", num_layers=3, scan_layers=True)
    params = layer_layout.to_scanned(_random_params(rolled.replace(scan_layers=False), 3))
    tokens = jax.random.randint(jax.random.key(4), (2, 9), 0, rolled.vocab_size)

    def logits_and_grads(cfg):
        model = CausalLM(cfg)
        def loss(p):
            logits = model.apply({"params": p}, tokens)
            return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[..., 1]), logits
        return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)

    (_, want_logits), want_grads = logits_and_grads(rolled)
    for unroll in (2, 5):
        (_, logits), grads = logits_and_grads(rolled.replace(scan_unroll=unroll))
        _close(logits, want_logits)
        _close(grads, want_grads)
    with pytest.raises(ValueError, match="scan_unroll"):
        rolled.replace(scan_unroll=0)
