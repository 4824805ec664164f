"""flash-linear-attention (fla) GSA and GLA checkpoints in gsa-jax (gsa_jax.hf.fla): loading,
export back to fla, `gsa-jax convert --hf` / `gsa-jax export`, and lm_eval on a loaded model.

The reference is fla itself (flash-linear-attention 0.6.0 with torch, skipped when absent):
tiny fla models with every weight random are saved with `save_pretrained` (one file or
sharded) and their float32 logits, computed by fla on its CPU reference path
(tests/fla_reference.py), compared with ours. Covered: grouped k/v heads, short convs, feature
maps, tied heads, no norm scale, GLA without output gate, the 2024 layout of the paper's
released checkpoints (norm_first: norms inside the mixer/MLP, fused MLP matrix), sharded files.
Export: our random models written with `save_fla` load in fla (AutoModelForCausalLM) with the
same logits, and read back bit for bit. The refusals (config fields we cannot honour, models fla
cannot express) need neither torch nor fla.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from gsa_jax.hf import fla as hf_fla
from gsa_jax.models import CausalLM, ModelConfig
from script_util import load_experiment

# Every parameter random (matrices N(0, 1/fan_in), embeddings N(0, 1), norm scales around 1,
# biases around 0): the GPU parity script's initialisation.
randomize = load_experiment("fla_parity").randomize

# Every test: those needing torch/fla skip without them (a failure in CI's reference tier); the
# refusals need neither and run in both tiers.
pytestmark = pytest.mark.reference

V, T = 128, 40
RTOL = 1e-4  # of the largest logit; float32 on both sides, observed ~1e-6


@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch")


@pytest.fixture(scope="module")
def fla(torch):
    fla = pytest.importorskip("fla")
    import fla_reference
    return fla, fla_reference


def assert_logits_close(got, want):
    got, want = np.asarray(got), np.asarray(want)
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=RTOL * np.abs(want).max())


def fla_model(fla, torch, kind: str, seed: int = 0, **kw):
    """A random fla GSA/GLA causal LM (2 layers, width 64, vocabulary 128)."""
    from fla.models import GLAConfig, GLAForCausalLM, GSAConfig, GSAForCausalLM
    base = dict(hidden_size=64, num_hidden_layers=2, vocab_size=V, num_heads=4)
    if kind == "gsa":
        model = GSAForCausalLM(GSAConfig(**{**base, "num_slots": 8, **kw}))
    else:
        model = GLAForCausalLM(GLAConfig(**{**base, **kw}))
    randomize(torch, model, seed)
    return model.eval()


def fla_logits(fla, torch, model, tokens) -> np.ndarray:
    with fla[1].cpu_reference():
        return model(torch.from_numpy(tokens), use_cache=False).logits.numpy()


def tokens_for(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, V, (2, T))


def our_logits(config: ModelConfig, params, tokens) -> np.ndarray:
    return np.asarray(CausalLM(config).apply({"params": params}, jnp.asarray(tokens)))


# ------------------------------------------------------------------------------------ loading
CASES = {
    "gsa_gqa_conv": ("gsa", dict(num_kv_heads=2, use_short_conv=True)),
    # num_slots null: the head key dim; no norm weights in the mixer; tied LM head.
    "gsa_tied_relu_plain": ("gsa", dict(num_slots=None, feature_map="relu",
                                        elementwise_affine=False, tie_word_embeddings=True,
                                        num_heads=2, gate_logit_normalizer=4)),
    "gla_gqa_conv_swish": ("gla", dict(num_kv_heads=2, use_short_conv=True,
                                       feature_map="swish")),
    "gla_no_output_gate": ("gla", dict(use_output_gate=False, expand_k=1.0, num_heads=2,
                                       norm_eps=1e-5)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_loaded_checkpoint_gives_fla_logits(case, fla, torch, tmp_path):
    kind, kw = CASES[case]
    model = fla_model(fla, torch, kind, seed=len(case), **kw)
    # The GQA cases are stored in shards (model.safetensors.index.json + 3 files or more).
    shard = "40KB" if "gqa" in case else None
    model.save_pretrained(tmp_path, **({"max_shard_size": shard} if shard else {}))
    assert (tmp_path / "model.safetensors.index.json").is_file() == bool(shard)
    tokens = tokens_for(len(case))
    config, params = hf_fla.load_fla(tmp_path)
    assert config.mixer == kind and config.num_layers == 2
    assert_logits_close(our_logits(config, params, tokens), fla_logits(fla, torch, model, tokens))


def _to_2024_layout(torch, model, directory) -> None:
    """The layout of fla before 2025-02 (the paper's released checkpoints): norm_first keeps
    the block norms inside the mixer and the MLP, and the MLP's gate and up projections are one
    matrix gate_proj [2I, D] (gate rows first). The same function as `model`."""
    from safetensors.torch import save_file
    tensors = {}
    for name, p in model.state_dict().items():
        name = name.replace(".attn_norm.", ".attn.norm.").replace(".mlp_norm.", ".mlp.norm.")
        tensors[name] = p.contiguous()
    for i in range(model.config.num_hidden_layers):
        prefix = f"model.layers.{i}.mlp."
        tensors[prefix + "gate_proj.weight"] = torch.cat(
            [tensors[prefix + "gate_proj.weight"], tensors.pop(prefix + "up_proj.weight")])
    directory.mkdir()
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    hf = model.config.to_dict()
    # As the released configs: norm_first, use_rope false, and (flame's) use_output_gate true
    # without gate weights.
    hf.update(norm_first=True, use_rope=False, use_output_gate=True)
    (directory / "config.json").write_text(json.dumps(hf))


def test_2024_layout_of_the_released_checkpoints(fla, torch, tmp_path):
    model = fla_model(fla, torch, "gsa", seed=5, gate_logit_normalizer=8)
    _to_2024_layout(torch, model, tmp_path / "old")
    tokens = tokens_for(5)
    config, params = hf_fla.load_fla(tmp_path / "old")
    assert_logits_close(our_logits(config, params, tokens), fla_logits(fla, torch, model, tokens))


# ------------------------------------------------------------------------------------ export
def random_params(config: ModelConfig, seed: int) -> dict:
    """Our init, with norm scales, gate biases and conv kernels randomised as well."""
    init = jax.jit(lambda key: CausalLM(config).init(key, jnp.zeros((1, 1), jnp.int32)))
    params = jax.tree.map(np.asarray, nn.meta.unbox(init(jax.random.key(seed))["params"]))
    rng = np.random.default_rng(seed)

    def redraw(path, x):
        name = path[-1].key
        if name == "scale":
            return (1 + 0.3 * rng.standard_normal(x.shape)).astype(np.float32)
        if name == "bias":
            return (0.5 * rng.standard_normal(x.shape)).astype(np.float32)
        if name == "embedding":
            return rng.standard_normal(x.shape).astype(np.float32)
        return (rng.standard_normal(x.shape) / np.sqrt(x.shape[0])).astype(np.float32)
    return jax.tree_util.tree_map_with_path(redraw, params)


EXPORTS = {
    # output_norm_eps as fla's GSA layer computes (1e-5): exact parity.
    "gsa": ModelConfig(mixer="gsa", vocab_size=V, hidden_size=64, num_layers=2, num_heads=4,
                       num_kv_heads=2, num_slots=8, use_short_conv=True, norm_eps=1e-5,
                       output_norm_eps=1e-5, gate_logit_normalizer=4.0, impl="parallel"),
    "gla": ModelConfig(mixer="gla", vocab_size=V, hidden_size=64, num_layers=2, num_heads=4,
                       expand_k=0.5, feature_map="identity", gate_logit_normalizer=16.0,
                       tie_word_embeddings=True, impl="parallel"),
}


@pytest.mark.parametrize("kind", sorted(EXPORTS))
def test_exported_model_loads_in_fla_with_the_same_logits(kind, fla, torch, tmp_path):
    from transformers import AutoModelForCausalLM
    config = EXPORTS[kind]
    params = random_params(config, seed=7)
    result = hf_fla.save_fla(tmp_path / "out", config, params, max_shard_bytes=60_000)
    assert len(result["files"]) > 1 and result["notes"] == []
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(model).__name__ == hf_fla.ARCHITECTURES[kind]
    tokens = tokens_for(7)
    assert_logits_close(fla_logits(fla, torch, model, tokens), our_logits(config, params, tokens))
    # And back: the same config (up to its execution fields) and the same arrays, bit for bit.
    again, back = hf_fla.load_fla(tmp_path / "out", impl="parallel")
    assert again.replace(hidden_ratio=config.hidden_ratio, intermediate_size=None) == config
    jax.tree.map(np.testing.assert_array_equal, back, params)


def test_export_and_load_with_scanned_layers(tmp_path):
    """A scanned model exports the same files as its unscanned twin, and loads back stacked
    (scan_layers=True) with the same logits. (No torch needed.)"""
    pytest.importorskip("safetensors")
    from safetensors.numpy import load_file
    from gsa_jax import layer_layout
    plain = EXPORTS["gsa"]
    scanned = plain.replace(scan_layers=True)
    params = random_params(plain, seed=9)
    hf_fla.save_fla(tmp_path / "plain", plain, params)
    hf_fla.save_fla(tmp_path / "scan", scanned, layer_layout.to_scanned(params))
    a = load_file(str(tmp_path / "plain" / hf_fla.SINGLE_FILE))
    b = load_file(str(tmp_path / "scan" / hf_fla.SINGLE_FILE))
    assert sorted(a) == sorted(b)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])
    config, back = hf_fla.load_fla(tmp_path / "scan", scan_layers=True, impl="parallel")
    assert config.scanned and "layers" in back and "layer_0" not in back
    jax.tree.map(np.testing.assert_array_equal, back, layer_layout.to_scanned(params))
    tokens = tokens_for(9)
    np.testing.assert_allclose(our_logits(config, back, tokens),
                               our_logits(plain, params, tokens), rtol=1e-5, atol=1e-5)


def test_export_bfloat16_and_notes(tmp_path):
    """bf16 files hold our params rounded to bf16; a GSA model whose output norm eps is not
    fla's 1e-5 exports with a note saying so. (No torch needed.)"""
    pytest.importorskip("safetensors")
    import ml_dtypes
    config = EXPORTS["gsa"].replace(output_norm_eps=None, norm_eps=1e-6)
    params = random_params(config, seed=8)
    result = hf_fla.save_fla(tmp_path / "bf16", config, params, dtype="bfloat16")
    assert len(result["notes"]) == 1 and "1e-05" in result["notes"][0]
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    _, back = hf_fla.load_fla(tmp_path / "bf16")
    rounded = jax.tree.map(lambda x: x.astype(ml_dtypes.bfloat16).astype(np.float32), params)
    jax.tree.map(np.testing.assert_array_equal, back, rounded)
    with pytest.raises(ValueError, match="not empty"):
        hf_fla.save_fla(tmp_path / "bf16", config, params)


@pytest.mark.parametrize("field, value", [
    ("gate", "none"), ("slot_nonlinearity", "relu"), ("feature_map", "identity"),
    ("expand_v", 2.0), ("attn_layers", [1]), ("mixer", "retnet")])
def test_export_refuses_what_fla_cannot_express(field, value):
    extra = {"attn_num_heads": 4} if field == "attn_layers" else {}
    config = EXPORTS["gsa"].replace(**{field: value, **extra})
    with pytest.raises(ValueError, match=f"export: {field}"):
        hf_fla.fla_config(config)


@pytest.mark.parametrize("field, value", [("gate_low_rank_dim", 8),
                                          ("gate_logit_normalizer", 8.0),
                                          ("output_norm_eps", 1e-5)])
def test_export_refuses_gla_settings_fla_ignores(field, value):
    with pytest.raises(ValueError, match=f"export: {field}"):
        hf_fla.fla_config(EXPORTS["gla"].replace(**{field: value}))


# ------------------------------------------------------------------------------------ refusals
BASE = {"gsa": dict(model_type="gsa", architectures=["GSAForCausalLM"], hidden_size=64,
                    num_hidden_layers=2, num_heads=4, vocab_size=V, num_slots=8),
        "gla": dict(model_type="gla", architectures=["GLAForCausalLM"], hidden_size=64,
                    num_hidden_layers=2, num_heads=4, vocab_size=V)}


def test_config_defaults_are_fla_defaults():
    gsa = hf_fla.model_config_from_fla({k: v for k, v in BASE["gsa"].items()
                                        if k != "num_slots"})
    assert (gsa.num_slots, gsa.gate_logit_normalizer, gsa.feature_map) == (64, 8.0, "swish")
    assert (gsa.expand_k, gsa.expand_v, gsa.norm_eps, gsa.output_norm_eps) == (1, 1, 1e-6, 1e-5)
    assert gsa.mlp_width == 256 and not gsa.tie_word_embeddings  # int(64·4·2/3) up to 256
    gla = hf_fla.model_config_from_fla(BASE["gla"])
    assert (gla.expand_k, gla.feature_map, gla.use_output_gate) == (0.5, "identity", True)
    assert (gla.gate_low_rank_dim, gla.gate_logit_normalizer) == (16, 16.0)
    # GSAConfig's keyword is spelled exapnd_k (sic).
    assert hf_fla.model_config_from_fla({**BASE["gsa"], "exapnd_k": 0.5}).expand_k == 0.5
    # flame's gsa_340M.json as it is (share_conv_kernel without short convs does nothing).
    flame = {**BASE["gsa"], "bos_token_id": 1, "conv_size": 4, "eos_token_id": 2,
             "expand_k": 1, "expand_v": 1, "elementwise_affine": False, "feature_map": "swish",
             "fuse_cross_entropy": True, "fuse_norm": True, "gate_logit_normalizer": 4,
             "hidden_act": "swish", "hidden_ratio": 4, "initializer_range": 0.02,
             "intermediate_size": None, "num_slots": 64, "norm_eps": 1e-06,
             "share_conv_kernel": True, "tie_word_embeddings": False, "use_cache": True,
             "use_norm": True, "use_output_gate": True, "use_rope": False,
             "use_short_conv": False}
    cfg = hf_fla.model_config_from_fla(flame)
    assert (cfg.gate_logit_normalizer, cfg.elementwise_affine, cfg.num_slots) == (4.0, False, 64)


@pytest.mark.parametrize("kind, field, value", [
    ("gsa", "model_type", "mamba"), ("gsa", "architectures", ["GLAForCausalLM"]),
    ("gsa", "unheard_of", 1), ("gsa", "feature_map", "t2r"), ("gsa", "attn", {"layers": [1]}),
    ("gsa", "attnres_block_size", 4), ("gsa", "hidden_act", "powlu"), ("gsa", "use_norm", False),
    ("gsa", "use_rope", True), ("gsa", "expand_v", 2), ("gsa", "exapnd_k", 0.5),
    ("gsa", "gate_logit_normalizer", 0), ("gsa", "num_heads", 3),
    ("gla", "clamp_min", -5.0), ("gla", "share_conv_kernel", True), ("gla", "use_gv", True),
    ("gla", "gate_logit_normalizer", 8),
    ("gla", "feature_map", "gelu")])
def test_config_fields_we_cannot_honour_are_named(kind, field, value):
    hf = {**BASE[kind], field: value}
    if field == "share_conv_kernel":
        hf["use_short_conv"] = True
    if field == "exapnd_k":
        hf["expand_k"] = 1  # disagrees with exapnd_k
    name = {"exapnd_k": "expand_k", "num_heads": "num_heads"}.get(field, field)
    with pytest.raises(ValueError, match=name):
        hf_fla.model_config_from_fla(hf)


def test_checkpoint_with_the_2024_gsa_output_gate_is_refused(tmp_path):
    """A GSA checkpoint holding the output gate's weights (fla before 2024-09-20) is refused;
    so are missing and unused tensors."""
    pytest.importorskip("safetensors")
    config = EXPORTS["gsa"]
    hf_fla.save_fla(tmp_path / "ok", config, random_params(config, 9))
    from safetensors.numpy import load_file, save_file
    tensors = load_file(str(tmp_path / "ok" / "model.safetensors"))
    cases = {"gate": {**tensors, "model.layers.0.attn.g_proj.weight": np.zeros((64, 64),
                                                                               np.float32)},
             "missing": {k: v for k, v in tensors.items() if "f_proj" not in k},
             "unused": {**tensors, "model.layers.0.attn.extra.weight": np.zeros(3, np.float32)}}
    messages = {"gate": "use_output_gate", "missing": "f_proj", "unused": "extra.weight"}
    for case, stored in cases.items():
        (tmp_path / case).mkdir()
        (tmp_path / case / "config.json").write_text((tmp_path / "ok" / "config.json")
                                                     .read_text())
        save_file(stored, str(tmp_path / case / "model.safetensors"))
        with pytest.raises(ValueError, match=messages[case]):
            hf_fla.load_fla(tmp_path / case)


# ------------------------------------------------------------------------------------ CLI
def _restore(directory, config: ModelConfig):
    """(params, meta) of a params checkpoint (gsa-jax convert output), on one device."""
    from gsa_jax import checkpoint as checkpoint_lib
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shapes = nn.meta.unbox(jax.eval_shape(CausalLM(config).init, jax.random.key(0),
                                          jnp.zeros((1, 1), jnp.int32))["params"])
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                            shapes)
    return checkpoint_lib.restore_params(directory, abstract)


def test_cli_convert_reads_an_fla_checkpoint(fla, torch, tmp_path, capsys):
    """`gsa-jax convert --hf` on an fla GLA directory keeps the model (mixer defaults to the
    checkpoint's own): the params checkpoint gives fla's logits."""
    import yaml
    from gsa_jax import cli
    model = fla_model(fla, torch, "gla", seed=11, num_kv_heads=2)
    model.save_pretrained(tmp_path / "fla")
    assert cli.main(["convert", "--hf", str(tmp_path / "fla"), "--output",
                     str(tmp_path / "out")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["mixer"], summary["new_params"]) == ("gla", 0)
    config = ModelConfig.from_dict(yaml.safe_load((tmp_path / "out" / "model.yaml")
                                                  .read_text())["model"])
    params, meta = _restore(tmp_path / "out", config)
    assert meta["source"]["hf_config"]["model_type"] == "gla"
    tokens = tokens_for(11)
    assert_logits_close(our_logits(config, params, tokens), fla_logits(fla, torch, model, tokens))


@pytest.mark.slow
def test_cli_export_of_a_training_run(fla, torch, tmp_path_factory, capsys):
    """A 2-step GSA run exported with `gsa-jax export` loads in fla with the run's logits."""
    from test_train_loop import overrides, write_corpus
    from transformers import AutoModelForCausalLM

    from gsa_jax import cli
    from gsa_jax.config import load_config
    from gsa_jax.train import train
    corpus = write_corpus(tmp_path_factory.mktemp("corpus"), n_files=10)
    run_dir = tmp_path_factory.mktemp("run")
    config = load_config(None, overrides(corpus, run_dir, steps=2, **{
        "checkpoint.every": 0, "eval.every": 0, "data.seq_len": 16, "data.batch_size": 2,
        "model.num_layers": 2, "model.num_kv_heads": 2, "model.output_norm_eps": 1e-5,
        "model.impl": "parallel"}))
    state = train(config, quiet=True)["state"]
    out = tmp_path_factory.mktemp("export") / "fla"
    assert cli.main(["export", "--run-dir", str(run_dir), "--output", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["step"] == 2 and summary["notes"] == []
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tokens = np.random.default_rng(12).integers(0, config.model.vocab_size, (2, T))
    params = jax.device_get(state.params)
    assert_logits_close(fla_logits(fla, torch, model, tokens),
                        our_logits(config.model, params, tokens))
    assert cli.main(["export", "--run-dir", str(run_dir), "--output", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ lm_eval
@pytest.mark.slow
def test_lm_eval_on_a_loaded_fla_checkpoint(fla, torch, tmp_path, monkeypatch):
    """lm_eval's "gsa-jax" model with model_args hf_dir=<fla directory> scores a local
    multiple-choice task: every log-likelihood equals the one fla's PyTorch model gives (BOS +
    context, continuation split as lm_eval's HF model does)."""
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager
    from test_hf_llama import _train_tokenizer
    from test_lm_eval_adapter import TASK_YAML  # a multiple-choice task "gsa_jax_toy"
    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    directory = tmp_path / "fla"
    tok = _train_tokenizer(tmp_path / "tokenizer.json")  # <unk>, <s>, </s> = 0, 1, 2
    model = fla_model(fla, torch, "gsa", seed=13, vocab_size=tok.get_vocab_size())
    model.save_pretrained(directory)
    (directory / "tokenizer.json").write_text((tmp_path / "tokenizer.json").read_text())
    rng = np.random.default_rng(13)
    words = ["slot", "gate", "learned", "forget", "the", "softmax"]
    docs = [{"question": " ".join(rng.choice(words, 3)) + "?",
             "choices": [str(rng.choice(words)) for _ in range(3)],
             "answer": int(rng.integers(3))} for _ in range(4)]
    (tmp_path / "toy.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tmp_path / "toy.yaml").write_text(TASK_YAML.format(data=tmp_path / "toy.jsonl"))
    results = lm_eval.simple_evaluate(
        model="gsa-jax", model_args=f"hf_dir={directory},max_length=64", tasks=["gsa_jax_toy"],
        task_manager=TaskManager(include_path=str(tmp_path)), log_samples=True,
        bootstrap_iters=0, batch_size=4)

    def reference(context: str, continuation: str) -> float:
        whole = tok.encode(context + continuation, add_special_tokens=False).ids
        n = len(tok.encode(context, add_special_tokens=False).ids)
        ids = np.asarray([[1] + whole])  # BOS = bos_token_id
        logp = torch.log_softmax(torch.from_numpy(fla_logits(fla, torch, model, ids)[0])
                                 .double(), -1).numpy()
        return float(sum(logp[t, ids[0, t + 1]] for t in range(n, len(whole))))

    samples = results["samples"]["gsa_jax_toy"]
    assert len(samples) == len(docs)
    for sample in samples:
        doc = sample["doc"]
        got = [resp[0][0] for resp in sample["resps"]]
        want = [reference(doc["question"], " " + c) for c in doc["choices"]]
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------ GPU script
@pytest.mark.slow
def test_fla_parity_script_runs_on_the_cpu_reference(fla, torch, tmp_path, monkeypatch):
    """experiments/fla_parity.py (the bf16 parity run against fla's Triton kernels on a GPU) at
    a tiny size, with fla on its CPU reference path: every case passes and the report has its
    table and verdict."""
    from script_util import load_experiment
    script = load_experiment("fla_parity")
    monkeypatch.setattr(script, "BASE", dict(hidden_size=64, num_hidden_layers=2,
                                             vocab_size=V))
    for var in ("TRITON_F32_DEFAULT", "XLA_PYTHON_CLIENT_PREALLOCATE"):
        monkeypatch.delenv(var, raising=False)  # the script sets them; undone after the test
    with fla[1].cpu_reference():
        rc = script.main(["--tag", "cpu", "--device", "cpu", "--seq-lens", "24",
                          "--gsa-impls", "chunk", "--cases", "gsa_gqa_conv", "gla",
                          "--out-dir", str(tmp_path)])
    report = json.loads((tmp_path / "fla_parity_cpu.json").read_text())
    assert rc == 0 and [r["ok"] for r in report["rows"]] == [True, True]
    for row in report["rows"]:
        assert row["ours_fp32_vs_fla_fp32"]["rel_max"] < 1e-4
        assert 0 < row["bf16"]["chunk"]["ours_bf16_vs_fla_fp32"]["rel_rms"] < 0.05
    assert "**Verdict: parity** over 2 cases" in (tmp_path / "fla_parity_cpu.md").read_text()
