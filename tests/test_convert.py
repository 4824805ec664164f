"""T2R conversion (gsa_jax.convert), params checkpoints and `train --init-from`.

A random Transformer++ (every norm scale random too, so reuse is visible) converts into GSA,
GLA and RetNet: the shared weights are copied exactly, the new ones are fresh from-scratch
initialisations (but GSA's output-norm scale, which starts at the attention's value scale,
recomputed here), the converted models train (loss falls), save and load; the converted
checkpoint starts a run with exactly its weights and a fresh optimizer. Through the CLI, a tiny
`transformers` Llama is converted and finetuned, and converted unchanged (mixer attention) it
still gives transformers' logits. Every refusal is checked.
"""

from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from flax import linen as nn

from gsa_jax import checkpoint as checkpoint_lib
from gsa_jax import cli
from gsa_jax import convert
from gsa_jax import session as session_lib
from gsa_jax.config import Config
from gsa_jax.models import CausalLM, ModelConfig, count_params
from gsa_jax.train import train

SOURCE = ModelConfig(mixer="attention", vocab_size=264, hidden_size=32, num_layers=2,
                     attn_num_heads=4, attn_num_kv_heads=2, intermediate_size=64,
                     norm_eps=1e-5, rope_theta=500.0)
# The parallel form compiles fastest at these lengths (the forms' agreement is tested elsewhere).
TARGETS = {"gsa": {"num_slots": 8, "impl": "parallel"}, "gla": {"impl": "parallel"},
           "retnet": {"impl": "parallel"}}


def flat(tree) -> dict[str, np.ndarray]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(str(k.key) for k in path): np.asarray(x) for path, x in leaves}


def random_params(config: ModelConfig, seed: int = 0) -> dict:
    """Init, then every 1-d parameter (norm scales) randomised around 1."""
    init = jax.jit(lambda key: CausalLM(config).init(key, jnp.zeros((1, 1), jnp.int32)))
    params = nn.meta.unbox(init(jax.random.key(seed))["params"])
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: np.asarray(x) if x.ndim > 1 else
                        (1 + 0.3 * rng.standard_normal(x.shape)).astype(np.float32),
                        jax.tree.map(np.asarray, params))


@pytest.fixture(scope="module")
def source_params():
    return random_params(SOURCE)


def write_corpus(root: pathlib.Path) -> pathlib.Path:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(30):
        lines = [f"def f_{j}(x):\n    return x * {int(rng.integers(10))}\n"
                 for j in range(int(rng.integers(5, 20)))]
        (root / f"mod_{i}.py").write_text("".join(lines))
    return root


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"))


def run_config(model: ModelConfig, corpus, run_dir, steps=8, **extra) -> Config:
    values = {"model": model.to_dict(), "run_dir": str(run_dir), "steps": steps,
              "data": {"stdlib_root": str(corpus), "val_fraction": 0.2, "seq_len": 32,
                       "batch_size": 8},
              "optim": {"lr": 3e-3, "warmup_steps": 1},
              "eval": {"every": 4, "batches": 2}, "checkpoint": {"every": 0},
              "logging": {"every": 1, "progress": False}, "sample": {"max_new_tokens": 0}}
    values.update(extra)
    return Config.from_dict(values)


def records(run_dir) -> list[dict]:
    return [json.loads(line)
            for line in (pathlib.Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


# --------------------------------------------------------------------------- conversion
@pytest.mark.parametrize("mixer", sorted(TARGETS))
def test_conversion_reuses_attention_weights(mixer, source_params):
    target = convert.target_config(SOURCE, mixer, **TARGETS[mixer])
    assert (target.mixer, target.num_heads, target.num_kv_heads) == (mixer, 4, 2)
    assert (target.expand_k, target.expand_v, target.intermediate_size) == (1.0, 1.0, 64)
    assert target.feature_map == convert.MIXER_DEFAULTS[mixer]["feature_map"]
    assert (target.norm_eps, target.rope_theta) == (1e-5, 500.0)
    params, report = convert.convert_params(SOURCE, source_params, target, seed=3)
    src, out = flat(source_params), flat(params)

    for path, value in src.items():
        if "/mixer/" not in path or path.split("/")[-2] in convert.REUSED_PROJECTIONS:
            np.testing.assert_array_equal(out[path], value, err_msg=path)
    new = sorted(set(out) - set(src))
    assert new and sorted(report["new"]) == new
    assert report["reused_params"] + report["new_params"] == count_params(target)
    assert report["new_params"] == sum(out[p].size for p in new)
    for path in new:  # from-scratch initialisation: N(0, 0.02) matrices, unit scales, 0 bias
        x = out[path]
        if path.endswith("scale") and mixer == "gsa":
            # GSA's output norm starts at the attention's value scale: per value channel j,
            # sqrt(Σ_i (w_i W_v[i, j])²), each key/value head's channels used by 2 query heads.
            layer = path.split("/")[0]
            w = source_params[layer]["attn_norm"]["scale"].astype(np.float64)
            w_v = source_params[layer]["mixer"]["v_proj"]["kernel"].astype(np.float64)
            per_kv = np.linalg.norm(w[:, None] * w_v, axis=0).reshape(2, 8)
            np.testing.assert_allclose(x, np.concatenate([per_kv[0], per_kv[0], per_kv[1],
                                                          per_kv[1]]), rtol=1e-6)
        elif path.endswith("scale"):
            np.testing.assert_array_equal(x, 1.0)
        elif path.endswith("bias"):
            np.testing.assert_array_equal(x, 0.0)
        else:
            assert 0.01 < x.std() < 0.03, (path, x.std())
    # Different seeds give different new weights and the same reused ones.
    other, _ = convert.convert_params(SOURCE, source_params, target, seed=4)
    kernel = next(p for p in new if p.endswith("kernel"))
    assert not np.array_equal(flat(other)[kernel], out[kernel])
    plain, _ = convert.convert_params(SOURCE, source_params, target, match_scale=False)
    for path in new:
        if path.endswith("scale"):
            np.testing.assert_array_equal(flat(plain)[path], 1.0)

    tokens = np.random.default_rng(0).integers(0, 264, (2, 40))
    logits = CausalLM(target).apply({"params": params}, jnp.asarray(tokens))
    assert logits.shape == (2, 40, 264) and bool(jnp.isfinite(logits).all())


def test_hybrid_target_keeps_attention_layers(source_params):
    target = convert.target_config(SOURCE, "gsa", num_slots=8, attn_layers=[1])
    params, report = convert.convert_params(SOURCE, source_params, target)
    assert target.layer_mixer(0) == "gsa" and target.layer_mixer(1) == "attention"
    assert jax.tree.all(jax.tree.map(np.array_equal, params["layer_1"],
                                     source_params["layer_1"]))
    assert all(p.startswith("layer_0/") for p in report["new"])


def test_tied_source_unties_exactly():
    """Tied -> untied copies Eᵀ into the head: the model computes the same logits."""
    tied = SOURCE.replace(tie_word_embeddings=True)
    params = random_params(tied)
    target = convert.target_config(tied, "attention", tie_word_embeddings=False)
    converted, report = convert.convert_params(tied, params, target)
    assert report["new_params"] == 0
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 264, (2, 24)))
    np.testing.assert_allclose(CausalLM(target).apply({"params": converted}, tokens),
                               CausalLM(tied).apply({"params": params}, tokens), atol=1e-6)


@pytest.mark.parametrize("mixer,overrides,match", [
    ("gsa", {"num_heads": 2}, "num_heads"),
    ("gla", {"expand_k": 0.5}, "expand_k"),
    ("gsa", {"tie_word_embeddings": True}, "tie_word_embeddings"),
    ("gsa", {"vocab_size": 512}, "vocab_size"),
    ("gsa", {"intermediate_size": 128}, "mlp_width"),
    ("mamba", {}, "unknown target mixer"),
    ("gsa", {"num_slotz": 8}, "unknown key"),
])
def test_conversion_refusals(mixer, overrides, match, source_params):
    with pytest.raises(ValueError, match=match):
        target = convert.target_config(SOURCE, mixer, **overrides)
        convert.convert_params(SOURCE, source_params, target)


def test_only_attention_layers_convert():
    gsa = convert.target_config(SOURCE, "gsa", num_slots=8)
    gla = convert.target_config(gsa, "gla")
    with pytest.raises(ValueError, match="only attention layers convert"):
        convert.convert_params(gsa, random_params(gsa), gla)


# ----------------------------------------------------------- params checkpoints, init-from
@pytest.fixture(scope="module")
def converted(tmp_path_factory, source_params):
    """{mixer: (target config, params, checkpoint directory)}."""
    out = {}
    for mixer, overrides in TARGETS.items():
        target = convert.target_config(SOURCE, mixer, **overrides)
        params, report = convert.convert_params(SOURCE, source_params, target)
        directory = tmp_path_factory.mktemp(f"converted_{mixer}") / "ckpt"
        convert.save_converted(directory, params, target, {"conversion": report})
        out[mixer] = (target, params, directory)
    return out


def test_init_from_gives_the_converted_weights_and_a_fresh_optimizer(converted, corpus,
                                                                     tmp_path):
    target, params, directory = converted["gsa"]
    assert yaml.safe_load((directory / "model.yaml").read_text())["model"] == target.to_dict()
    session = session_lib.build(run_config(target, corpus, tmp_path / "run", seed=5))
    state = session_lib.init_from_params(session, str(directory))
    fresh = session_lib.restore_or_init(session)[0]  # the same seed, random weights
    assert int(state.step) == 0
    got = flat(state.params)
    for path, value in flat(params).items():
        np.testing.assert_array_equal(got[path], value, err_msg=path)
    for a, b in zip(jax.tree.leaves(state.opt_state), jax.tree.leaves(fresh.opt_state)):
        np.testing.assert_array_equal(a, b)  # zero moments, zero counts
    np.testing.assert_array_equal(state.rng, fresh.rng)
    session.checkpointer.close()


def check_finetune(config: Config, init_from, final_params) -> None:
    """The run started from `init_from` with a step-0 evaluation, its loss fell, and its final
    checkpoint holds `final_params` (loaded by a read-only session)."""
    log = records(config.run_dir)
    assert log[0]["event"] == "start" and log[0]["init_from"] == str(init_from)
    assert log[1]["step"] == 0 and np.isfinite(log[1]["val_loss"])  # before finetuning
    losses = [r["loss"] for r in log if "loss" in r]
    assert len(losses) == config.steps and all(np.isfinite(losses))
    assert np.mean(losses[-2:]) < losses[0] - 0.1, losses
    vals = [r["val_loss"] for r in log if "val_loss" in r]
    assert vals[-1] < vals[0], vals
    reader = session_lib.build(config, read_only=True)
    params, meta = session_lib.restore_params(reader)
    reader.checkpointer.close()
    assert meta["step"] == config.steps
    trained = flat(final_params)
    for path, value in flat(params).items():
        np.testing.assert_array_equal(value, trained[path], err_msg=path)


@pytest.mark.parametrize("mixer", ["gla", "retnet"])  # gsa: through the CLI below
def test_converted_model_finetunes_saves_and_loads(mixer, converted, corpus, tmp_path):
    target, _, directory = converted[mixer]
    config = run_config(target, corpus, tmp_path / "run")
    result = train(config, quiet=True, init_from=str(directory))
    check_finetune(config, directory, result["state"].params)


def test_init_from_refusals(converted, corpus, tmp_path):
    target, _, directory = converted["gla"]
    with pytest.raises(FileNotFoundError, match="no params checkpoint"):
        train(run_config(target, corpus, tmp_path / "a"), init_from=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match=r"(?s)gk_down.*gate_low_rank_dim: checkpoint 16 "
                                         r"vs config 8"):
        train(run_config(target.replace(gate_low_rank_dim=8), corpus, tmp_path / "b"),
              init_from=str(directory))
    with pytest.raises(ValueError, match="already holds a checkpoint"):
        checkpoint_lib.save_params(directory, {"w": np.zeros(2)}, {})


@pytest.fixture(scope="module")
def transformer_run(corpus, tmp_path_factory):
    """A gsa-jax Transformer++ run directory with a checkpoint (step 0, random weights): what
    `convert --run-dir` reads, without the cost of compiling a train step."""
    run_dir = tmp_path_factory.mktemp("xfmr") / "run"
    config = run_config(SOURCE, corpus, run_dir)
    session = session_lib.build(config)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config.to_dict()))
    state, _ = session_lib.restore_or_init(session)
    session.checkpointer.save(0, state, {"step": 0, "data": {}, "config": config.to_dict()})
    session.checkpointer.wait()
    session.checkpointer.close()
    return run_dir, flat(state.params)


def test_convert_a_training_run(transformer_run, corpus, tmp_path):
    """A run converts into GSA with the run's attention weights; a run's checkpoint is not a
    params checkpoint."""
    run_dir, saved = transformer_run
    target, params, meta = convert.convert_run(run_dir, "gsa", num_slots=8)
    assert meta["source"]["step"] == 0 and target.mixer == "gsa"
    out = flat(params)
    for proj in convert.REUSED_PROJECTIONS:
        key = f"layer_1/mixer/{proj}/kernel"
        np.testing.assert_array_equal(out[key], saved[key])
    with pytest.raises(ValueError, match="not a params checkpoint"):
        train(run_config(target, corpus, tmp_path / "d"),
              init_from=str(run_dir / "checkpoints"))
    with pytest.raises(FileNotFoundError, match="training run"):
        convert.convert_run(tmp_path / "nothing", "gsa")


# --------------------------------------------------------------------------- CLI with an HF model
@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=264, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.1) if p.ndim > 1 else p.copy_(1 + 0.2 * torch.randn_like(p))
    directory = tmp_path_factory.mktemp("hf") / "llama"
    model.save_pretrained(directory, max_shard_size="30KB")
    tokens = np.random.default_rng(2).integers(0, 264, (2, 20))
    with torch.no_grad():
        logits = model(input_ids=torch.tensor(tokens)).logits.numpy()
    return directory, tokens, logits


@pytest.mark.reference
def test_cli_convert_unchanged_keeps_transformers_logits(hf_dir, tmp_path, capsys):
    directory, tokens, reference = hf_dir
    out = tmp_path / "xfmr"
    assert cli.main(["convert", "--hf", str(directory), "--mixer", "attention",
                     "--output", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["new_params"] == 0
    model = ModelConfig.from_dict(yaml.safe_load((out / "model.yaml").read_text())["model"])
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shapes = nn.meta.unbox(jax.eval_shape(CausalLM(model).init, jax.random.key(0),
                                          jnp.zeros((1, 1), jnp.int32))["params"])
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                            shapes)
    params, meta = checkpoint_lib.restore_params(out, abstract)
    assert meta["kind"] == "params" and meta["source"]["hf_config"]["model_type"] == "llama"
    logits = CausalLM(model).apply({"params": params}, jnp.asarray(tokens))
    np.testing.assert_allclose(logits, reference, atol=5e-5, rtol=0)


@pytest.mark.slow  # over 30 s on a 2-core CPU: CI's second step
@pytest.mark.reference
def test_cli_convert_then_train_init_from(hf_dir, corpus, tmp_path, capsys):
    directory = hf_dir[0]
    out = tmp_path / "gsa"
    argv = ["convert", "--hf", str(directory), "--mixer", "gsa", "--set", "model.num_slots=8",
            "--output", str(out)]
    assert cli.main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["mixer"] == "gsa" and summary["new_params"] == 2 * 32 * 2 * 8 + 2 * 32
    model = ModelConfig.from_dict(yaml.safe_load((out / "model.yaml").read_text())["model"])
    model = model.replace(impl="parallel")  # faster to compile; the shapes are the same
    config = run_config(model, corpus, tmp_path / "run", steps=8)
    path = tmp_path / "finetune.yaml"
    path.write_text(yaml.safe_dump(config.to_dict()))
    assert cli.main(["train", "--config", str(path), "--init-from", str(out), "--quiet"]) == 0
    final = session_lib.restore_params(session_lib.build(config, read_only=True))[0]
    check_finetune(config, out, final)
    # The same command with more steps resumes the run (--init-from is not used again).
    assert cli.main(["train", "--config", str(path), "--set", "steps=10", "--init-from",
                     str(out), "--quiet"]) == 0
    events = [r.get("event") for r in records(tmp_path / "run") if "event" in r]
    assert events == ["start", "resume"] and records(tmp_path / "run")[-1]["step"] == 10

    # Errors: one line, exit status 2.
    bad = [
        (argv, "already holds a checkpoint"),
        (argv[:-1] + [str(tmp_path / "x"), "--set", "optim.lr=1"], "model fields"),
        (argv[:-1] + [str(tmp_path / "y"), "--step", "3"], "--step goes with --run-dir"),
        (argv[:-1] + [str(tmp_path / "z"), "--set", "model.num_heads=2"], "num_heads"),
        (["train", "--config", str(path), "--set", f"run_dir={tmp_path / 'r2'}",
          "--set", "model.num_slots=4", "--init-from", str(out)], "num_slots: checkpoint 8"),
        (["train", "--config", str(path), "--init-from", str(tmp_path / "none")],
         "no params checkpoint"),
    ]
    for args, message in bad:
        assert cli.main(args) == 2, args
        assert message in capsys.readouterr().err, args


def test_mistral_recipe_config_is_the_conversion():
    """configs/t2r-mistral-7b.yaml's model is what converting Mistral-7B-v0.1's config.json
    gives (up to compute settings), with Mistral's exact parameter count reused."""
    from gsa_jax.config import load_config
    from gsa_jax.hf import model_config_from_hf
    mistral = {"architectures": ["MistralForCausalLM"], "hidden_act": "silu",
               "hidden_size": 4096, "intermediate_size": 14336, "initializer_range": 0.02,
               "max_position_embeddings": 32768, "model_type": "mistral",
               "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
               "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "sliding_window": 4096,
               "tie_word_embeddings": False, "vocab_size": 32000}
    with pytest.raises(ValueError, match="sliding_window"):
        model_config_from_hf(mistral)  # keeping the attention would change it
    source = model_config_from_hf(mistral, allow_sliding_window=True)
    assert count_params(source) == 7_241_732_096  # Mistral-7B-v0.1
    target = convert.target_config(source, "gsa", dtype="bfloat16", remat="full",
                                   scan_layers=False)
    recipe = load_config(pathlib.Path(__file__).parent.parent / "configs" /
                         "t2r-mistral-7b.yaml")
    assert recipe.model == target
    assert recipe.steps * recipe.data.batch_size * recipe.data.seq_len >= 20e9
