"""Hugging Face Llama/Mistral checkpoints in our Transformer++ (gsa_jax.hf).

The reference is `transformers` itself: tiny random Llama/Mistral models (every weight and norm
scale drawn from a seed, large enough that attention is sharp and RoPE matters) are saved with
`save_pretrained` and their float32 logits on random token ids compared with ours. Also: the
sharded form, bf16 files, GQA, tied and untied heads, Mistral's sliding window, the tokenizer,
and every refusal (config fields we cannot represent, broken checkpoint directories; these
build checkpoints with NumPy and safetensors only).
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gsa_jax.hf import (TensorReader, load_hf_tokenizer, load_llama, model_config_from_hf,
                        tensor_map)
from gsa_jax.models import CausalLM

ATOL = 5e-5  # float32 logits of magnitude ~5; observed differences ~1e-5


@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch")


@pytest.fixture(scope="module")
def transformers():
    pytest.importorskip("torch")
    return pytest.importorskip("transformers")


def hf_config(transformers, arch="llama", *, rope_theta=500.0, **kw):
    """A tiny config; rope_theta set the way the installed transformers spells it."""
    values = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
                  max_position_embeddings=64)
    values.update(kw)
    cls = transformers.LlamaConfig if arch == "llama" else transformers.MistralConfig
    if "rope_parameters" in cls().to_dict():  # transformers >= 5
        values["rope_parameters"] = {"rope_type": "default", "rope_theta": rope_theta}
    else:
        values["rope_theta"] = rope_theta
    return cls(**values)


def random_model(torch, transformers, config, seed=0):
    """The model of `config` with every parameter random (norm scales around 1)."""
    torch.manual_seed(seed)
    cls = (transformers.LlamaForCausalLM if config.model_type == "llama"
           else transformers.MistralForCausalLM)
    model = cls(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.15)
    return model


def hf_logits(torch, model, tokens):
    with torch.no_grad():
        return model(input_ids=torch.tensor(tokens)).logits.float().numpy()


def our_logits(config, params, tokens):
    return np.asarray(CausalLM(config).apply({"params": params}, jnp.asarray(tokens)))


def tokens_for(vocab, shape=(2, 33), seed=1):
    return np.random.default_rng(seed).integers(0, vocab, shape)


CASES = {
    "llama-gqa-untied": dict(arch="llama"),
    "llama-mha-tied": dict(arch="llama", num_key_value_heads=4, tie_word_embeddings=True,
                           rope_theta=10000.0),
    "mistral-gqa": dict(arch="mistral", num_key_value_heads=1, sliding_window=None,
                        rope_theta=1e6),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.reference
def test_logits_match_transformers(case, torch, transformers, tmp_path):
    kw = dict(CASES[case])
    config = hf_config(transformers, kw.pop("arch"), **kw)
    model = random_model(torch, transformers, config)
    model.save_pretrained(tmp_path)
    ours, params = load_llama(tmp_path)

    hf = json.loads((tmp_path / "config.json").read_text())
    kv = hf["num_key_value_heads"]
    assert ours.mixer == "attention" and ours.attn_num_heads == 4
    assert ours.attn_num_kv_heads == (None if kv == 4 else kv)
    assert ours.tie_word_embeddings == hf["tie_word_embeddings"]
    assert ("lm_head" in params) != ours.tie_word_embeddings
    assert ours.intermediate_size == 96 and ours.norm_eps == 1e-5
    assert ours.rope_theta == kw.get("rope_theta", 500.0)

    tokens = tokens_for(97)
    ref = hf_logits(torch, model, tokens)
    assert np.abs(ref).max() > 1.0  # the weights are not trivially small
    np.testing.assert_allclose(our_logits(ours, params, tokens), ref, atol=ATOL, rtol=0)


@pytest.mark.reference
def test_sharded_checkpoint_loads(torch, transformers, tmp_path):
    model = random_model(torch, transformers, hf_config(transformers))
    model.save_pretrained(tmp_path / "single")
    model.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    shards = sorted(p.name for p in (tmp_path / "sharded").glob("*.safetensors"))
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert len(shards) > 2, shards
    _, single = load_llama(tmp_path / "single")
    config, sharded = load_llama(tmp_path / "sharded")
    for a, b in zip(jax_leaves(single), jax_leaves(sharded)):
        np.testing.assert_array_equal(a, b)
    tokens = tokens_for(97)
    np.testing.assert_allclose(our_logits(config, sharded, tokens),
                               hf_logits(torch, model, tokens), atol=ATOL, rtol=0)


def jax_leaves(tree):
    import jax
    return jax.tree.leaves(tree)


@pytest.mark.reference
def test_bfloat16_checkpoint(torch, transformers, tmp_path):
    """A bf16 file is upcast exactly: our f32 model equals HF's f32 model of the same weights."""
    model = random_model(torch, transformers, hf_config(transformers))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())  # weights representable in bf16
    # A bf16 state dict (casting the module would also round RoPE's inv_freq buffer in HF).
    model.save_pretrained(tmp_path, state_dict={k: v.to(torch.bfloat16)
                                                for k, v in model.state_dict().items()})
    with TensorReader(tmp_path) as reader:
        assert str(reader.get("model.norm.weight").dtype) == "bfloat16"
    config, params = load_llama(tmp_path)
    assert all(x.dtype == np.float32 for x in jax_leaves(params))
    tokens = tokens_for(97)
    np.testing.assert_allclose(our_logits(config, params, tokens),
                               hf_logits(torch, model, tokens), atol=ATOL, rtol=0)


@pytest.mark.reference
def test_mistral_sliding_window(torch, transformers, tmp_path):
    """Refused by default; allowed, it is exact up to the window (and HF's window is real)."""
    config = hf_config(transformers, "mistral", sliding_window=4)
    model = random_model(torch, transformers, config)
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="sliding_window"):
        load_llama(tmp_path)
    ours, params = load_llama(tmp_path, allow_sliding_window=True)
    short, long = tokens_for(97, (2, 4)), tokens_for(97, (2, 12))
    np.testing.assert_allclose(our_logits(ours, params, short), hf_logits(torch, model, short),
                               atol=ATOL, rtol=0)
    beyond = np.abs(our_logits(ours, params, long) - hf_logits(torch, model, long))
    assert beyond[:, :4].max() < ATOL and beyond[:, 4:].max() > 1e-3


# --------------------------------------------------------------------------- tokenizer
def _train_tokenizer(path):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, pre_tokenizers, trainers, decoders
    tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = ["def gated_slot_attention(q, k, v):", "    return softmax(q @ k.T) @ v",
            "The slots forget with a learned gate."] * 20
    tok.train_from_iterator(text, trainer)
    tok.save(str(path))
    return tok


@pytest.mark.reference
def test_tokenizer_loads(tmp_path, transformers):
    tok = _train_tokenizer(tmp_path / "tokenizer.json")
    (tmp_path / "config.json").write_text(json.dumps({"bos_token_id": 1}))
    ours = load_hf_tokenizer(tmp_path)
    assert ours.bos_id == 1 == tok.token_to_id("<s>")
    assert ours.vocab_size == tok.get_vocab_size(with_added_tokens=True)
    text = "def gate(q, k):\n    return k  # ünïcode"
    ids = ours.encode(text)
    reference = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(tmp_path / "tokenizer.json"))
    assert ids == reference.encode(text, add_special_tokens=False)
    assert ours.decode(ids) == text
    assert ours.bos_id not in ids  # the data pipeline adds the separator itself


def test_tokenizer_separator_from_tokenizer_config(tmp_path):
    tok = _train_tokenizer(tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": {"content": "</s>"}}))
    assert load_hf_tokenizer(tmp_path).bos_id == tok.token_to_id("</s>")
    assert load_hf_tokenizer(tmp_path, bos_id=0).bos_id == 0


def test_tokenizer_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_hf_tokenizer(tmp_path)


# --------------------------------------------------------------------------- refusals
BASE = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "intermediate_size": 96, "vocab_size": 97, "rms_norm_eps": 1e-5, "rope_theta": 500.0,
        "hidden_act": "silu", "tie_word_embeddings": False, "max_position_embeddings": 64}

REFUSED = [
    ("model_type", {"model_type": "gpt2"}),
    ("architectures", {"architectures": ["GemmaForCausalLM"]}),
    ("attention_bias", {"attention_bias": True}),
    ("mlp_bias", {"mlp_bias": True}),
    ("hidden_act", {"hidden_act": "gelu"}),
    ("rope_scaling", {"rope_scaling": {"type": "linear", "factor": 2.0}}),
    ("rope_parameters", {"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5}}),
    ("partial_rotary_factor", {"partial_rotary_factor": 0.5}),
    ("head_dim", {"head_dim": 32}),
    ("sliding_window", {"sliding_window": 16}),
    ("num_attention_heads", {"num_attention_heads": 3}),
    ("vocab_size", {"vocab_size": None}),
]


@pytest.mark.parametrize("field,change", REFUSED, ids=[r[0] for r in REFUSED])
def test_unrepresentable_config_is_refused(field, change):
    with pytest.raises(ValueError, match=field):
        model_config_from_hf({**BASE, **change})


def test_config_variants_that_are_accepted():
    assert model_config_from_hf(BASE).rope_theta == 500.0
    v5 = {**BASE, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}
    assert model_config_from_hf(v5).rope_theta == 1e6
    # A window as long as the positions never applies; head_dim = D/H is the default anyway.
    cfg = model_config_from_hf({**BASE, "sliding_window": 64, "head_dim": 16,
                                "rope_scaling": None, "num_key_value_heads": None},
                               dtype="bfloat16")
    assert cfg.attn_num_kv_heads is None and cfg.dtype == "bfloat16"


def write_numpy_checkpoint(directory, hf=BASE, seed=0, drop=(), extra=None, reshape=None):
    """config.json + model.safetensors written with NumPy (no torch)."""
    from safetensors.numpy import save_file
    from gsa_jax.hf.llama import _expected_shapes
    config = model_config_from_hf(hf)
    rng = np.random.default_rng(seed)
    expected = _expected_shapes(config)
    tensors = {}
    for path, (name, transpose) in tensor_map(config).items():
        shape = expected[path][::-1] if transpose else expected[path]
        tensors[name] = rng.standard_normal(shape).astype(np.float32)
    for name in drop:
        tensors.pop(name)
    for name, shape in (reshape or {}).items():
        tensors[name] = rng.standard_normal(shape).astype(np.float32)
    tensors.update(extra or {})
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(hf))
    save_file(tensors, str(directory / "model.safetensors"))
    return tensors


@pytest.fixture
def safetensors():
    return pytest.importorskip("safetensors")


def test_numpy_checkpoint_maps_every_tensor(tmp_path, safetensors):
    tensors = write_numpy_checkpoint(tmp_path)
    config, params = load_llama(tmp_path)
    q = params["layer_1"]["mixer"]["q_proj"]["kernel"]
    np.testing.assert_array_equal(q, tensors["model.layers.1.self_attn.q_proj.weight"].T)
    np.testing.assert_array_equal(params["layer_0"]["mlp_norm"]["scale"],
                                  tensors["model.layers.0.post_attention_layernorm.weight"])
    with TensorReader(tmp_path) as reader:
        assert len(reader.names()) == len(tensors)


def test_numpy_checkpoint_loads_into_scanned_layers(tmp_path, safetensors):
    """scan_layers=True: the same arrays, stacked under "layers" ([L, ...], layer i at i)."""
    from gsa_jax import layer_layout
    tensors = write_numpy_checkpoint(tmp_path, seed=4)
    _, plain = load_llama(tmp_path)
    config, params = load_llama(tmp_path, scan_layers=True)
    assert config.scanned and set(params) == {"embed", "norm", "lm_head", "layers"}
    q = params["layers"]["mixer"]["q_proj"]["kernel"]
    for i in range(config.num_layers):
        np.testing.assert_array_equal(q[i], tensors[f"model.layers.{i}.self_attn.q_proj.weight"].T)
    jax.tree.map(np.testing.assert_array_equal, layer_layout.to_unscanned(params), plain)


def test_missing_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_llama(tmp_path)


def test_no_safetensors_files(tmp_path, safetensors):
    (tmp_path / "config.json").write_text(json.dumps(BASE))
    (tmp_path / "pytorch_model.bin").write_bytes(b"\0")
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_llama(tmp_path)


def test_index_names_a_missing_shard(tmp_path, safetensors):
    (tmp_path / "config.json").write_text(json.dumps(BASE))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"model.norm.weight": "model-00001-of-00002.safetensors"}}))
    with pytest.raises(ValueError, match="model-00001-of-00002.safetensors"):
        load_llama(tmp_path)


def test_missing_tensor(tmp_path, safetensors):
    write_numpy_checkpoint(tmp_path, drop=["model.layers.1.mlp.up_proj.weight"])
    with pytest.raises(ValueError, match="model.layers.1.mlp.up_proj.weight"):
        load_llama(tmp_path)


def test_tensor_of_wrong_shape(tmp_path, safetensors):
    write_numpy_checkpoint(tmp_path, reshape={"model.layers.0.self_attn.k_proj.weight": (64, 64)})
    with pytest.raises(ValueError, match="k_proj.weight.*shape"):
        load_llama(tmp_path)


def test_unused_tensors(tmp_path, safetensors):
    write_numpy_checkpoint(tmp_path, extra={
        "model.layers.0.self_attn.q_norm.weight": np.ones(16, np.float32)})
    with pytest.raises(ValueError, match="q_norm"):
        load_llama(tmp_path)


def test_tied_checkpoint_with_a_stored_head(tmp_path, safetensors):
    tied = {**BASE, "tie_word_embeddings": True}
    tensors = write_numpy_checkpoint(tmp_path / "same", tied)
    emb = tensors["model.embed_tokens.weight"]
    write_numpy_checkpoint(tmp_path / "same", tied, extra={"lm_head.weight": emb})
    config, params = load_llama(tmp_path / "same")
    assert config.tie_word_embeddings and "lm_head" not in params
    write_numpy_checkpoint(tmp_path / "differs", tied, extra={"lm_head.weight": emb + 1})
    with pytest.raises(ValueError, match="tie_word_embeddings"):
        load_llama(tmp_path / "differs")
