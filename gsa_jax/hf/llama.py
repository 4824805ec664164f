"""Hugging Face Llama / Mistral checkpoints (local `config.json` + safetensors) as our
Transformer++ (`ModelConfig(mixer="attention")`, `CausalLM`).

The architectures are the same computation (checked against `transformers` in
tests/test_hf_llama.py):

    x_0 = E[tokens];  x += o_proj(Attn(RoPE q_proj h, RoPE k_proj h, v_proj h)), h = RMSNorm x
    x += down_proj(silu(gate_proj h) ⊙ up_proj h), h = RMSNorm x;  logits = lm_head(RMSNorm x)

- RoPE: HF's Llama rotates pairs (x_i, x_{i+d/2}) ("rotate_half") with inv_freq
  θ^(−2i/d); the checkpoints' q/k rows are already permuted for that layout (Meta's conversion
  script does it), and `gsa_jax.layers.common.apply_rope` is the same rotate-half form, so the
  weights are used as stored: no permutation.
- Linear layers: torch stores W [out, in] and computes x Wᵀ; flax's Dense kernel is [in, out].
  Every projection is transposed; head h of q_proj is rows h·d..(h+1)·d in both layouts.
- RMSNorm: x · rsqrt(mean x² + eps) · w in float32 (HF casts back before the weight; in float32
  the two agree exactly); eps = rms_norm_eps (1e-5 for Mistral/Llama-2, ours defaults to 1e-6).
- Attention scale 1/√d, causal, grouped k/v heads (num_key_value_heads).

What we cannot represent is refused with a ValueError naming the config.json field.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any, Optional

import numpy as np

from gsa_jax.hf import params as hf_params
from gsa_jax.hf.safetensors_io import TensorReader
from gsa_jax.models.config import ModelConfig

MODEL_TYPES = ("llama", "mistral")
ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")

# Tensors some older checkpoints carry that hold no parameters (recomputed from the config).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def read_config(directory: str | pathlib.Path) -> dict[str, Any]:
    """The checkpoint's config.json as a dict (FileNotFoundError when absent)."""
    path = pathlib.Path(directory) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no config.json in {str(directory)!r}: expected a Hugging Face "
                                f"checkpoint directory (config.json + *.safetensors)")
    return json.loads(path.read_text())


def _rope(hf: dict[str, Any]) -> float:
    """θ of plain RoPE; ValueError for scaled / partial variants we do not implement.

    transformers < 5 writes `rope_theta` and `rope_scaling` (null or {"type"/"rope_type": ...});
    transformers >= 5 writes `rope_parameters` {"rope_type", "rope_theta", ...}.
    """
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    for field, values in (("rope_parameters", params), ("rope_scaling", scaling)):
        kind = values.get("rope_type", values.get("type", "default"))
        if kind != "default":
            raise ValueError(f"config.json: {field} has rope_type {kind!r}; only plain RoPE "
                             f"('default') is implemented")
        if values.get("partial_rotary_factor", 1.0) != 1.0:
            raise ValueError(f"config.json: {field}.partial_rotary_factor = "
                             f"{values['partial_rotary_factor']}; only full-width RoPE is "
                             f"implemented")
    if hf.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"config.json: partial_rotary_factor = {hf['partial_rotary_factor']}; "
                         f"only full-width RoPE is implemented")
    return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def model_config_from_hf(hf: dict[str, Any], *, allow_sliding_window: bool = False,
                         **overrides) -> ModelConfig:
    """Our Transformer++ config for a Llama/Mistral config.json dict.

    allow_sliding_window: accept Mistral's `sliding_window` W although our attention is full
      causal attention. The two agree exactly on sequences of at most W tokens (4096 for
      Mistral-7B-v0.1), and the setting is irrelevant when the attention is converted to
      GSA/GLA/RetNet; `gsa_jax.convert` passes True in that case only.
    overrides: further ModelConfig fields (dtype, param_dtype, remat, scan_layers, ...).
    Raises ValueError naming the field for anything we cannot represent.
    """
    def fail(field: str, msg: str):
        raise ValueError(f"config.json: {field} {msg}")

    model_type = hf.get("model_type")
    if model_type not in MODEL_TYPES:
        fail("model_type", f"is {model_type!r}; supported: {MODEL_TYPES}")
    archs = hf.get("architectures") or []
    if any(a not in ARCHITECTURES for a in archs):
        fail("architectures", f"is {archs}; supported: {ARCHITECTURES}")
    for field in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size",
                  "intermediate_size"):
        if not isinstance(hf.get(field), int) or hf[field] <= 0:
            fail(field, f"must be a positive int, got {hf.get(field)!r}")
    act = hf.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        fail("hidden_act", f"is {act!r}; our MLP is SwiGLU (silu)")
    for field in ("attention_bias", "mlp_bias"):
        if hf.get(field, False):
            fail(field, "is true; our projections have no bias")
    D, H = hf["hidden_size"], hf["num_attention_heads"]
    kv = hf.get("num_key_value_heads") or H
    if D % H:
        fail("num_attention_heads", f"({H}) does not divide hidden_size ({D})")
    head_dim = hf.get("head_dim")
    if head_dim is not None and head_dim != D // H:
        fail("head_dim", f"is {head_dim} but hidden_size / num_attention_heads = {D // H}; our "
                         f"attention derives the head dim from them")
    window = hf.get("sliding_window")
    if hf.get("use_sliding_window", True) and window is not None and not allow_sliding_window:
        max_pos = hf.get("max_position_embeddings")
        if max_pos is None or window < max_pos:
            fail("sliding_window", f"is {window}: our attention is full causal attention, equal "
                                   f"to the windowed one only on sequences of at most {window} "
                                   f"tokens; converting to GSA/GLA/RetNet drops it (allowed), "
                                   f"keeping attention needs allow_sliding_window=True "
                                   f"(gsa-jax convert --ignore-sliding-window)")
    values = dict(
        mixer="attention", vocab_size=hf["vocab_size"], hidden_size=D,
        num_layers=hf["num_hidden_layers"], attn_num_heads=H,
        attn_num_kv_heads=None if kv == H else kv, rope_theta=_rope(hf),
        intermediate_size=hf["intermediate_size"], norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        initializer_range=float(hf.get("initializer_range", 0.02)),
        # The mixer fields of a later conversion: the heads of the attention.
        num_heads=H, num_kv_heads=None if kv == H else kv)
    values.update(overrides)
    try:
        return ModelConfig.from_dict(values)
    except ValueError as err:
        raise ValueError(f"config.json maps to an invalid model: {err}") from None


def _layer_map(i: int) -> dict[tuple[str, ...], tuple[str, bool]]:
    """Our param path -> (HF tensor name, transpose) for layer i."""
    hf, ours = f"model.layers.{i}.", f"layer_{i}"
    out = {(ours, "attn_norm", "scale"): (hf + "input_layernorm.weight", False),
           (ours, "mlp_norm", "scale"): (hf + "post_attention_layernorm.weight", False)}
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        out[(ours, "mixer", name, "kernel")] = (hf + f"self_attn.{name}.weight", True)
    for name in ("gate_proj", "up_proj", "down_proj"):
        out[(ours, "mlp", name, "kernel")] = (hf + f"mlp.{name}.weight", True)
    return out


def tensor_map(config: ModelConfig) -> dict[tuple[str, ...], tuple[str, bool]]:
    """Every parameter of our Transformer++ -> (HF tensor name, transpose?)."""
    out = {("embed", "embedding"): ("model.embed_tokens.weight", False),
           ("norm", "scale"): ("model.norm.weight", False)}
    if not config.tie_word_embeddings:
        out[("lm_head", "kernel")] = ("lm_head.weight", True)
    for i in range(config.num_layers):
        out.update(_layer_map(i))
    return out


# Kept for the tests' checkpoint writers (the shapes of every parameter of a config).
_expected_shapes = hf_params.param_shapes


def params_from_hf(reader: TensorReader, config: ModelConfig,
                   dtype: str | np.dtype = "float32") -> dict:
    """The `params` tree of `CausalLM(config)` (NumPy arrays of `dtype`) from the checkpoint.

    Raises ValueError naming a missing tensor, a tensor of the wrong shape, or tensors the
    mapping does not use (a different architecture would otherwise load silently).
    """
    mapping = {path: (name, hf_params.TRANSPOSE if transpose else hf_params.SAME)
               for path, (name, transpose) in tensor_map(config).items()}
    ignored = [n for n in reader.names() if n.endswith(_IGNORED_SUFFIXES)]
    tied = ("lm_head.weight", "model.embed_tokens.weight") if config.tie_word_embeddings \
        else None
    return hf_params.gather_params(reader, mapping, config, dtype, family="Llama/Mistral",
                                   ignored=ignored, tied_head=tied)


def load_llama(directory: str | pathlib.Path, *, allow_sliding_window: bool = False,
               **overrides) -> tuple[ModelConfig, dict]:
    """(config, params) of the Llama/Mistral checkpoint in `directory`.

    params: the `params` collection of `CausalLM(config)` as NumPy arrays of
    config.param_dtype: `model.apply({"params": params}, tokens)` gives HF's logits.
    overrides: ModelConfig fields to replace (e.g. dtype="bfloat16", remat="full",
      scan_layers=True: the params then come stacked under "layers").
    """
    config = model_config_from_hf(read_config(directory),
                                  allow_sliding_window=allow_sliding_window, **overrides)
    with TensorReader(directory) as reader:
        params = params_from_hf(reader, config, config.param_dtype)
    return config, params


def describe(hf: dict[str, Any]) -> dict[str, Any]:
    """The config.json fields a conversion records in its checkpoint's metadata."""
    keys = ("model_type", "architectures", "hidden_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "intermediate_size", "vocab_size",
            "rms_norm_eps", "rope_theta", "rope_parameters", "sliding_window",
            "tie_word_embeddings", "torch_dtype", "dtype")
    return {k: hf[k] for k in keys if k in hf}


def bos_id(hf: dict[str, Any]) -> Optional[int]:
    """The config's bos_token_id (what every pretraining sequence started with), if any."""
    value = hf.get("bos_token_id")
    return int(value) if isinstance(value, int) else None
