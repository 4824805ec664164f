"""T2R: a pretrained softmax Transformer converted into GSA (or GLA / RetNet) for finetuning.

Because GSA keeps a softmax (over its memory slots), the attention's projections carry over and
a little finetuning recovers the Transformer's quality (Zhang, Yang et al. 2024, Table 3:
Mistral-7B → GSA on 20B tokens). Per layer, with the source's H query / Hkv key-value heads of
dim d = D/H:

    reused   embeddings, LM head, every RMSNorm scale, the SwiGLU MLPs, and the mixer's
             q_proj [D, H·d], k_proj [D, Hkv·d], v_proj [D, Hkv·d], o_proj [H·d, D]
             (the new mixer gets num_heads = H, num_kv_heads = Hkv, expand_k = expand_v = 1
             so that its projections have exactly these shapes)
    new      what attention does not have, initialised as for training from scratch
             (normal(initializer_range) matrices, unit norm scales, zero biases):
             GSA     f_proj [D, Hkv·M] (forget gate / slot logits), g_norm (output RMSNorm)
             GLA     gk_down [D, 16], gk_up [16, Hkv·d] + bias (low-rank key gate),
                     g_proj [D, H·d] (output gate), g_norm
             RetNet  g_proj [D, H·d] (output gate), g_norm (decays are fixed, RoPE is kept)

One exception to "as from scratch" (our choice; PAPER.md does not describe the paper's T2R
initialisation): GSA's output y = W_o · RMSNorm(silu(o)) has no gate, so a unit norm scale makes
the new mixer write ~5x more into the residual stream than the attention it replaces (whose
output, a convex combination of values, has at most the values' scale). With `match_scale`
(default) the scale of GSA's g_norm starts at the attention's value scale instead, a data-free
estimate from the pretrained weights: for value channel j of the layer,

    scale_j = sqrt(Σ_i (w_i · W_v[i, j])²)     w: attn_norm scale, so that x_i = w_i · n_i with
                                               n of unit RMS gives E[(W_vᵀ x)_j²] = scale_j²
                                               for uncorrelated n_i
repeated over the query heads of each key/value group. In a CPU-sized version of
experiments/t2r_small.py (width 64, 2 layers, 16 slots, 400 pretraining steps; one seed) this
took the converted model's validation perplexity before finetuning from 15.8x the Transformer's
to 1.9x (the model with its attention removed: 3.2x), and after 100 finetuning steps from 1.36x
to 1.20x (GLA 1.27x, RetNet 1.24x, GSA from scratch 2.2x). GLA and RetNet gate their output
with swish(W_g x), which starts near 0: they begin as the model without attention, and keep
unit scales.

The mixers' own defaults stay the paper's: GSA swish feature map, 64 slots, τ = 8; GLA
identity feature map, τ = 16 (its expand_k becomes 1 instead of 0.5 to reuse k_proj); RetNet
value dim D instead of 2D. RoPE is dropped by GSA and GLA (they have no positions) and kept by
RetNet (its q/k are rotated, as the pretrained ones were). Layers listed in the target's
`attn_layers` keep their attention unchanged (a hybrid T2R model). A layer whose mixer is the
same in source and target is copied unchanged (e.g. converting a run into its own kind, or
reading a flash-linear-attention GSA/GLA checkpoint, gsa_jax.hf.fla, into a params checkpoint).
"""

from __future__ import annotations

import functools
import math
import pathlib
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import yaml
from flax import linen as nn

from gsa_jax import checkpoint as checkpoint_lib
from gsa_jax.config import build_model_config
from gsa_jax.models.config import MIXERS, ModelConfig
from gsa_jax import layer_layout
from gsa_jax.models.lm import CausalLM, build_mixer

# The mixers' fields a conversion from attention sets (the paper's / the peer's defaults).
MIXER_DEFAULTS: dict[str, dict[str, Any]] = {
    "gsa": dict(feature_map="swish", num_slots=64, gate="data_dependent",
                slot_nonlinearity="softmax", gate_logit_normalizer=8.0),
    "gla": dict(feature_map="identity", gate_logit_normalizer=16.0, gate_low_rank_dim=16),
    "retnet": dict(feature_map="identity"),
    "attention": {},
}
REUSED_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


def target_config(source: ModelConfig, mixer: str, **overrides) -> ModelConfig:
    """The converted model's config: the source's sizes, norms, vocabulary and head layout with
    `mixer` in every layer (except the `attn_layers` an override lists), then `overrides`
    (ModelConfig fields, coerced as in YAML configs: e.g. num_slots=32, dtype="bfloat16")."""
    if mixer not in MIXERS:
        raise ValueError(f"unknown target mixer {mixer!r}; expected one of {MIXERS}")
    values = source.to_dict()
    values.update(mixer=mixer, intermediate_size=source.mlp_width)
    if source.mixer == "attention" and mixer != "attention":
        values.update(num_heads=source.attn_num_heads, num_kv_heads=source.attn_num_kv_heads,
                      expand_k=1.0, expand_v=1.0, attn_layers=[], **MIXER_DEFAULTS[mixer])
    values.update(overrides)
    return build_model_config(values)


@functools.lru_cache(maxsize=8)
def _mixer_init(config: ModelConfig, layer: int):
    """The jitted init of layer `layer`'s mixer; one compilation serves every layer of a kind
    (the mixer's module does not depend on the layer index otherwise)."""
    mixer = build_mixer(config, layer)
    x = jnp.zeros((1, 1, config.hidden_size), jnp.dtype(config.dtype))
    return jax.jit(lambda key: nn.meta.unbox(mixer.init(key, x)["params"]))


def _init_mixer(config: ModelConfig, layer: int, key: jax.Array) -> dict:
    """Fresh (from-scratch) parameters of layer `layer`'s mixer, as NumPy arrays."""
    kind = config.layer_mixer(layer)
    first = next(i for i in range(config.num_layers) if config.layer_mixer(i) == kind)
    return jax.tree.map(np.asarray, _mixer_init(config, first)(key))


def _expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    boxed = jax.eval_shape(CausalLM(config).init, jax.random.key(0),
                           jnp.zeros((1, 1), jnp.int32))["params"]
    return _flat_shapes(nn.meta.unbox(boxed))


def _flat_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(str(k.key) for k in path): tuple(np.shape(x)) for path, x in flat}


def value_scale(layer_params: dict, config: ModelConfig) -> np.ndarray:
    """The data-free RMS estimate of an attention layer's value channels, per query-head
    channel [H·d] (see the module docstring): sqrt(Σ_i (w_i W_v[i, j])²), repeated per group."""
    w = np.asarray(layer_params["attn_norm"]["scale"], np.float64)
    w_v = np.asarray(layer_params["mixer"]["v_proj"]["kernel"], np.float64)  # [D, Hkv·d]
    rms = np.sqrt(np.square(w[:, None] * w_v).sum(axis=0))
    kv = config.attn_num_kv_heads or config.attn_num_heads
    group = config.attn_num_heads // kv
    return np.repeat(rms.reshape(kv, -1), group, axis=0).reshape(-1)


def convert_params(source: ModelConfig, params: dict, target: ModelConfig, *,
                   seed: int = 0, match_scale: bool = True) -> tuple[dict, dict]:
    """The target model's params from the source model's (see the module docstring).

    params: the source `CausalLM`'s params collection (NumPy or jax arrays; either layer
      layout). The result has the target's layout (stacked under "layers" when
      `target.scanned`); the report's paths name layers as "layer_i".
    seed: initialisation of the new parameters (layer i uses fold_in(key(seed), i)).
    match_scale: start GSA's output-norm scale at the attention's value scale (else 1).
    Returns (params as NumPy arrays of target.param_dtype, report {"reused_params",
    "new_params", "new": [paths of new arrays]}).
    Raises ValueError naming the field when the two configs cannot share weights.
    """
    params = layer_layout.to_unscanned(params)  # per-layer work below; stacked again at the end
    for field in ("vocab_size", "hidden_size", "num_layers", "mlp_width"):
        if getattr(source, field) != getattr(target, field):
            raise ValueError(f"convert: {field} differs (source {getattr(source, field)}, "
                             f"target {getattr(target, field)}); a conversion keeps the sizes")
    if source.tie_word_embeddings and not target.tie_word_embeddings:
        head = {"kernel": np.asarray(params["embed"]["embedding"]).T}  # untie: a copy of Eᵀ
    elif target.tie_word_embeddings and not source.tie_word_embeddings:
        raise ValueError("convert: tie_word_embeddings is true in the target but the source "
                         "has its own LM head; keep tie_word_embeddings false")
    else:
        head = params.get("lm_head")
    out: dict = {"embed": params["embed"], "norm": params["norm"]}
    if head is not None and not target.tie_word_embeddings:
        out["lm_head"] = head
    new: list[str] = []
    base_key = jax.random.key(seed)
    for i in range(target.num_layers):
        name = f"layer_{i}"
        src = params[name]
        layer = {k: src[k] for k in ("attn_norm", "mlp_norm", "mlp")}
        s_kind, t_kind = source.layer_mixer(i), target.layer_mixer(i)
        if s_kind == t_kind:
            layer["mixer"] = src["mixer"]
        elif s_kind == "attention":
            mixer = _init_mixer(target, i, jax.random.fold_in(base_key, i))
            for proj in REUSED_PROJECTIONS:
                have = tuple(np.shape(src["mixer"][proj]["kernel"]))
                want = tuple(mixer[proj]["kernel"].shape)
                if have != want:
                    raise ValueError(
                        f"convert: layer {i} {proj}: the attention's kernel is {have} but the "
                        f"{t_kind} mixer's is {want}; keep num_heads / num_kv_heads equal to "
                        f"the source's attention heads ({source.attn_num_heads} / "
                        f"{source.attn_num_kv_heads}) and expand_k = expand_v = 1.0")
                mixer[proj] = {"kernel": src["mixer"][proj]["kernel"]}
            if match_scale and t_kind == "gsa" and "scale" in mixer.get("g_norm", {}):
                scale = value_scale(src, source)
                if scale.shape == mixer["g_norm"]["scale"].shape:  # else: the shape check below
                    mixer["g_norm"]["scale"] = scale.astype(mixer["g_norm"]["scale"].dtype)
            new += [f"{name}/mixer/{p}" for p in _flat_shapes(mixer)
                    if p.split("/")[0] not in REUSED_PROJECTIONS]
            layer["mixer"] = mixer
        else:
            raise ValueError(f"convert: layer {i} is a {s_kind} layer in the source; only "
                             f"attention layers convert into {t_kind} (or keep their kind)")
        out[name] = layer
    dtype = np.dtype(jnp.dtype(target.param_dtype))
    out = layer_layout.for_config(jax.tree.map(lambda x: np.asarray(x, dtype=dtype), out), target)
    got, want = _flat_shapes(out), _expected_shapes(target)
    if got != want:  # a mapping bug, or a target field without a source counterpart
        diff = [f"{k}: converted {got.get(k)} vs model {want.get(k)}"
                for k in sorted(set(got) | set(want)) if got.get(k) != want.get(k)]
        raise ValueError("convert: the converted params do not fit the target model: "
                         + "; ".join(diff[:8]))
    sizes = {k: math.prod(v) for k, v in got.items()}
    new_params = sum(v for k, v in sizes.items() if any(k.startswith(p) for p in new))
    return out, {"reused_params": sum(sizes.values()) - new_params, "new_params": new_params,
                 "new": new}


def save_converted(output: str | pathlib.Path, params: dict, target: ModelConfig,
                   meta: dict) -> pathlib.Path:
    """Writes the params checkpoint (`gsa-jax train --init-from output`) and, beside it,
    `model.yaml`: the model section a training config needs for these weights."""
    output = pathlib.Path(output)
    checkpoint_lib.save_params(output, params, {**meta, "config": {"model": target.to_dict()}})
    (output / "model.yaml").write_text(yaml.safe_dump({"model": target.to_dict()},
                                                      sort_keys=False))
    return output


def convert_hf(directory: str | pathlib.Path, mixer: Optional[str] = None, *, seed: int = 0,
               ignore_sliding_window: bool = False, match_scale: bool = True,
               **overrides) -> tuple[ModelConfig, dict, dict]:
    """(target config, params, meta) of a Hugging Face checkpoint directory: Llama/Mistral
    (converted, T2R; mixer None = "gsa") or flash-linear-attention GSA/GLA (gsa_jax.hf.fla;
    mixer None = the checkpoint's own, its weights unchanged).

    Mistral's sliding window is accepted when no attention layer survives the conversion (the
    new mixers replace it), else only with `ignore_sliding_window` (see gsa_jax.hf.llama).
    """
    from gsa_jax.hf import fla as hf_fla
    from gsa_jax.hf import llama as hf_llama
    hf = hf_llama.read_config(directory)
    if hf_fla.is_fla_config(hf):
        source, params = hf_fla.load_fla(directory)
        describe = hf_fla.describe
    else:
        mixer = mixer or "gsa"
        keeps_attention = mixer == "attention" or bool(overrides.get("attn_layers"))
        source, params = hf_llama.load_llama(
            directory, allow_sliding_window=ignore_sliding_window or not keeps_attention)
        describe = hf_llama.describe
    mixer = mixer or source.mixer
    target = target_config(source, mixer, **overrides)
    params, report = convert_params(source, params, target, seed=seed, match_scale=match_scale)
    meta = {"source": {"hf_directory": str(pathlib.Path(directory).absolute()),
                       "hf_config": describe(hf), "model": source.to_dict()},
            "conversion": {"mixer": mixer, "seed": seed, "match_scale": match_scale,
                           **report}}
    return target, params, meta


def restore_run(run_dir: str | pathlib.Path,
                step: Optional[int] = None) -> tuple[ModelConfig, dict, int]:
    """(model config, params as NumPy arrays, step) of a gsa-jax training run's checkpoint
    (latest or `step`). Reads only the checkpoint's params (not the optimizer state, not the
    run's data), on a mesh of the local devices; params in the layout of the run's config."""
    from gsa_jax import sharding as shd
    from gsa_jax import steps
    from gsa_jax.checkpoint import Checkpointer
    from gsa_jax.config import load_config
    from gsa_jax.optim import make_optimizer
    from gsa_jax.session import checkpoint_dir
    run_dir = pathlib.Path(run_dir)
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} not found: is {str(run_dir)!r} a training run "
                                f"directory?")
    config = load_config(path, [f"run_dir={run_dir}"])
    tx, _ = make_optimizer(config.optim, config.steps)
    layout = steps.state_layout(CausalLM(config.model), tx, shd.make_mesh(shd.MeshConfig()))
    reader = Checkpointer(checkpoint_dir(config), read_only=True)
    try:  # the params alone: the optimizer moments are neither read nor allocated
        params, meta = reader.restore(layout.abstract.params, step, params_only=True)
    finally:
        reader.close()
    return config.model, jax.tree.map(np.asarray, jax.device_get(params)), int(meta["step"])


def convert_run(run_dir: str | pathlib.Path, mixer: Optional[str] = None, *,
                step: Optional[int] = None, seed: int = 0, match_scale: bool = True,
                **overrides) -> tuple[ModelConfig, dict, dict]:
    """(target config, params, meta) of a gsa-jax training run's checkpoint (latest or `step`);
    mixer None = "gsa"."""
    mixer = mixer or "gsa"
    source, params, restored = restore_run(run_dir, step)
    target = target_config(source, mixer, **overrides)
    params, report = convert_params(source, params, target, seed=seed, match_scale=match_scale)
    meta = {"source": {"run_dir": str(pathlib.Path(run_dir).absolute()), "step": restored,
                       "model": source.to_dict()},
            "conversion": {"mixer": mixer, "seed": seed, "match_scale": match_scale,
                           **report}}
    return target, params, meta
