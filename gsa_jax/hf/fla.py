"""flash-linear-attention (fla, the paper's authors' library) GSA and GLA language models as our
`CausalLM`, and our GSA/GLA models written back in fla's format.

The paper's released models (fla-hub/gsa-1.3B-100B, gsa-2.7B-100B, gsa-7B-mistral-20B,
gla-1.3B-100B) are fla `GSAForCausalLM` / `GLAForCausalLM` directories: config.json + one or
sharded safetensors files. fla's model computes what ours does (checked against fla itself in
tests/test_hf_fla.py):

    x_0 = E[tokens];  x += attn(RMSNorm x);  x += down(silu(gate h) ⊙ up h), h = RMSNorm x;
    logits = lm_head(RMSNorm x)          (attn: fla's GatedSlotAttention / GatedLinearAttention)

Tensors of layer i (prefix model.layers.i.; torch Linear weights [out, in], ours transposed):

    attn_norm.weight, mlp_norm.weight        attn_norm, mlp_norm scales
    attn.{q,k,v,o}_proj.weight               mixer q/k/v/o_proj
    attn.f_proj.weight (GSA)                 mixer f_proj (forget gate / slot logits, D -> Hkv·M)
    attn.g_norm.weight (GSA)                 mixer g_norm (output RMSNorm over all heads)
    attn.gk_proj.{0,1}.weight, 1.bias (GLA)  mixer gk_down, gk_up (low-rank key gate)
    attn.g_proj.weight (GLA)                 mixer g_proj (swish output gate)
    attn.g_norm_swish_gate.weight (GLA)      mixer g_norm (per-head RMSNorm; g_norm.weight
                                             without the fused gate)
    attn.{q,k,v}_conv1d.weight [C, 1, W]     mixer {q,k,v}_conv kernel [W, C] (short conv)
    mlp.{gate,up,down}_proj.weight           mlp gate/up/down_proj
  and model.embeddings.weight, model.norm.weight, lm_head.weight (absent when tied).

Two layouts exist, both read (told apart by the tensor names); export writes the current one:
  - fla since 2025-02 (0.6.0): as above.
  - before (the 2024 checkpoints of the paper): with `norm_first: true` the block's two norms
    lived inside the mixer and the MLP (attn.norm.weight, mlp.norm.weight: the same pre-norm
    function under other names), and the MLP's gate and up projections were one matrix
    mlp.gate_proj.weight [2I, D], gate rows first.

Numerics that follow fla rather than config.json:
  - GSA's output norm: fla's layer (since 2024-11, fla 0.6.0) calls rms_norm_linear without an
    eps, so it normalises with 1e-5 whatever norm_eps says (the 2024 layer used norm_eps; the
    two differ by ~eps / mean(silu(o)²), negligible in a trained model): the loaded config has
    output_norm_eps = 1e-5. GSA's scale is 1 (fla's model never passes another).
  - GLA's gate: GLAModel passes neither gate_low_rank_dim nor gate_logit_normalizer, so they are
    the layer's 16 and 16.

Every config.json field that changes the function is mapped or refused with a ValueError naming
it; fields of unknown meaning are refused too (remove them if they are harmless).
"""

from __future__ import annotations

import json
import math
import pathlib
from typing import Any, Optional

import numpy as np

from gsa_jax.hf import params as hf_params
from gsa_jax.hf.llama import read_config
from gsa_jax.hf.params import SAME, TRANSPOSE, Transform
from gsa_jax.hf.safetensors_io import INDEX_FILE, SINGLE_FILE, TensorReader
from gsa_jax.layers.common import mlp_intermediate_size
from gsa_jax.models.config import ModelConfig

MODEL_TYPES = ("gsa", "gla")
ARCHITECTURES = {"gsa": "GSAForCausalLM", "gla": "GLAForCausalLM"}
GSA_OUTPUT_NORM_EPS = 1e-5  # fla's GSA layer: rms_norm_linear(...) with its default eps
GLA_GATE = 16  # fla's GLAModel: gate_low_rank_dim = gate_logit_normalizer = 16 (layer defaults)

# Fields with no effect on the function (bookkeeping, kernel choices, training-only switches).
_INERT = {"_name_or_path", "architectures", "model_type", "transformers_version", "dtype",
          "torch_dtype", "bos_token_id", "eos_token_id", "pad_token_id", "use_cache",
          "max_position_embeddings", "initializer_range", "fuse_norm", "fuse_swiglu",
          "fuse_cross_entropy", "fuse_linear_cross_entropy", "use_l2warp", "output_attentions",
          "output_hidden_states", "return_dict", "id2label", "label2id", "problem_type",
          "is_encoder_decoder", "chunk_size_feed_forward", "auto_map", "tokenizer_class",
          "attn_mode",  # GLA: which kernel (chunk | fused_chunk | fused_recurrent)
          }
# Read below, per model type.
_COMMON = {"hidden_size", "num_hidden_layers", "num_heads", "num_kv_heads", "vocab_size",
           "hidden_ratio", "intermediate_size", "expand_k", "expand_v", "exapnd_k", "exapnd_v",
           "norm_eps", "elementwise_affine", "tie_word_embeddings", "use_short_conv",
           "conv_size", "hidden_act", "feature_map", "use_output_gate", "attn",
           "attnres_block_size", "share_conv_kernel"}
_OWN = {"gsa": {"num_slots", "gate_logit_normalizer", "use_norm", "norm_first", "use_rope",
                "clamp_min", "clamp_max", "gate_low_rank_dim"},
        "gla": {"clamp_min", "use_gk", "use_gv", "gate_logit_normalizer", "gate_low_rank_dim"}}


def is_fla_config(hf: dict[str, Any]) -> bool:
    """Whether a config.json dict is one of the fla models this module reads."""
    return hf.get("model_type") in MODEL_TYPES


def _fail(field: str, msg: str):
    raise ValueError(f"config.json: {field} {msg}")


def _expand(hf: dict[str, Any], axis: str, default: float) -> float:
    """expand_k / expand_v; fla's GSAConfig spells its keyword `exapnd_*` (sic)."""
    right, typo = hf.get(f"expand_{axis}"), hf.get(f"exapnd_{axis}")
    if right is not None and typo is not None and right != typo:
        _fail(f"expand_{axis}", f"({right}) and exapnd_{axis} ({typo}) disagree")
    value = right if right is not None else typo
    return default if value is None else float(value)


def _feature_map(kind: str, value) -> str:
    if kind == "gsa":  # fla's GSA: swish | relu | t2r (a learned map we do not have)
        known = {"swish": "swish", "relu": "relu"}
    else:  # fla's GLA: None or a key of its ACT2FN
        known = {None: "identity", "swish": "swish", "silu": "swish", "relu": "relu"}
    if value not in known:
        _fail("feature_map", f"is {value!r}; supported for {kind}: {sorted(map(str, known))}")
    return known[value]


def model_config_from_fla(hf: dict[str, Any], **overrides) -> ModelConfig:
    """Our config for an fla GSA/GLA config.json dict; `overrides`: further ModelConfig fields
    (dtype, param_dtype, remat, scan_layers, impl, ...). Raises ValueError naming the field for
    anything we cannot represent or whose meaning we do not know."""
    kind = hf.get("model_type")
    if kind not in MODEL_TYPES:
        _fail("model_type", f"is {kind!r}; the fla loader reads {MODEL_TYPES}")
    archs = hf.get("architectures") or []
    if any(a != ARCHITECTURES[kind] for a in archs):
        _fail("architectures", f"is {archs}; supported: [{ARCHITECTURES[kind]!r}]")
    unknown = sorted(set(hf) - _INERT - _COMMON - _OWN[kind])
    if unknown:
        raise ValueError(f"config.json: unknown field(s) {unknown} for an fla {kind} model; "
                         f"gsa-jax cannot tell whether they change the function (remove them "
                         f"from config.json if they do not)")
    for field in ("hidden_size", "num_hidden_layers", "num_heads", "vocab_size"):
        if not isinstance(hf.get(field), int) or hf[field] <= 0:
            _fail(field, f"must be a positive int, got {hf.get(field)!r}")
    for field in ("attn", "attnres_block_size"):
        if hf.get(field) is not None:
            _fail(field, f"is {hf[field]!r}; hybrid attention layers and attention residuals "
                         f"are not implemented by the fla loader")
    if hf.get("use_short_conv") and hf.get("share_conv_kernel"):
        # fla before 2024-07: one conv on the input shared by q/k/v (flame's configs still
        # carry the field; without short convs it does nothing).
        _fail("share_conv_kernel", "is true with use_short_conv: a shared conv kernel (fla "
                                   "before 2024-07) is not implemented")
    if hf.get("hidden_act", "swish") != "swish":
        _fail("hidden_act", f"is {hf['hidden_act']!r}; our MLP is SwiGLU (swish)")
    D = hf["hidden_size"]
    ratio = hf.get("hidden_ratio") or 4
    values = dict(
        mixer=kind, vocab_size=hf["vocab_size"], hidden_size=D,
        num_layers=hf["num_hidden_layers"], num_heads=hf["num_heads"],
        num_kv_heads=hf.get("num_kv_heads"),
        # fla's defaults: GSAConfig expand_k 1, GLAConfig 0.5; expand_v 1.
        expand_k=_expand(hf, "k", 1.0 if kind == "gsa" else 0.5), expand_v=_expand(hf, "v", 1.0),
        # fla's GatedMLP rule when intermediate_size is null (ours, for a float ratio too).
        intermediate_size=hf.get("intermediate_size") or mlp_intermediate_size(D, ratio),
        norm_eps=float(hf.get("norm_eps", 1e-6)),
        # fla's RMSNorm(elementwise_affine=None) has no weight, as False.
        elementwise_affine=bool(hf.get("elementwise_affine", True)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        use_short_conv=bool(hf.get("use_short_conv", False)),
        conv_size=int(hf.get("conv_size", 4)),
        initializer_range=float(hf.get("initializer_range", 0.02)))
    if isinstance(ratio, int):
        values["hidden_ratio"] = ratio
    if kind == "gsa":
        values.update(_gsa_fields(hf))
    else:
        values.update(_gla_fields(hf))
    values.update(overrides)
    try:
        return ModelConfig.from_dict(values)
    except ValueError as err:
        raise ValueError(f"config.json maps to an invalid model: {err}") from None


def _gsa_fields(hf: dict[str, Any]) -> dict[str, Any]:
    tau = hf.get("gate_logit_normalizer", 8)
    if not isinstance(tau, (int, float)) or isinstance(tau, bool) or tau <= 0:
        _fail("gate_logit_normalizer", f"must be a positive number, got {tau!r}")
    if hf.get("use_norm", True) is not True:
        _fail("use_norm", "is false: fla's GSA layer before 2024-09 then left out its output "
                          "norm (today's ignores the field); not implemented")
    if _expand(hf, "v", 1.0) != 1.0:
        _fail("expand_v", f"is {_expand(hf, 'v', 1.0)}: fla's GSA normalises its output with "
                          f"hidden_size weights, so its models have expand_v 1 only")
    if hf.get("use_rope", False):
        _fail("use_rope", "is true: RoPE on GSA's q/k (fla before 2024-09) is not implemented")
    # use_output_gate: no effect since fla a46c9f25 (2024-09-20); a checkpoint that has the
    # gate's weights (attn.g_proj) is refused when its tensors are read. norm_first: a layout
    # (see the module docstring), told from the tensor names. clamp_min/clamp_max and
    # gate_low_rank_dim: never read by fla's GSA layer or model.
    return dict(num_slots=hf.get("num_slots", 64), gate_logit_normalizer=float(tau),
                feature_map=_feature_map("gsa", hf.get("feature_map", "swish")),
                gate="data_dependent", slot_nonlinearity="softmax",
                output_norm_eps=GSA_OUTPUT_NORM_EPS)


def _gla_fields(hf: dict[str, Any]) -> dict[str, Any]:
    if hf.get("clamp_min") is not None:
        _fail("clamp_min", f"is {hf['clamp_min']}; a clamped GLA gate is not implemented")
    if hf.get("use_gk", True) is not True or hf.get("use_gv", False) is not False:
        _fail("use_gk/use_gv", "differ from true/false: fla's GLA layer has a key gate only")
    for field in ("gate_low_rank_dim", "gate_logit_normalizer"):
        if hf.get(field, GLA_GATE) != GLA_GATE:
            _fail(field, f"is {hf[field]}, but fla's GLAModel ignores it and builds its layers "
                         f"with {GLA_GATE}: which one the weights were trained with is unclear")
    return dict(feature_map=_feature_map("gla", hf.get("feature_map")),
                use_output_gate=bool(hf.get("use_output_gate", True)),
                gate_low_rank_dim=GLA_GATE, gate_logit_normalizer=float(GLA_GATE))


# ------------------------------------------------------------------ tensor names
CONV = Transform(lambda x: x[:, 0, :].T, lambda x: x.T[:, None, :])  # [C, 1, W] <-> [W, C]


def mixer_map(kind: str, *, use_output_gate: bool = True, elementwise_affine: bool = True,
              use_short_conv: bool = False, fused_gate_norm: bool = True,
              prefix: str = "") -> hf_params.Mapping:
    """{our path inside the mixer: (fla tensor name, Transform)} of one fla token mixer:
    "gsa" (GatedSlotAttention), "gla" (GatedLinearAttention) or "retnet"
    (MultiScaleRetention), built with the given options (use_output_gate: GLA/RetNet only).
    fused_gate_norm: GLA/RetNet's norm is fla's FusedRMSNormGated (`g_norm_swish_gate`, the
    default) rather than RMSNorm + gate (`g_norm`). prefix: prepended to the names (e.g.
    "model.layers.3.attn.")."""
    projections = ["q_proj", "k_proj", "v_proj", "o_proj"]
    out: hf_params.Mapping = {}
    if kind == "gsa":
        projections.append("f_proj")
        norm = "g_norm"
    elif kind in ("gla", "retnet"):
        if use_output_gate:
            projections.append("g_proj")
        norm = "g_norm_swish_gate" if use_output_gate and fused_gate_norm else "g_norm"
        if kind == "gla":
            out[("gk_down", "kernel")] = (prefix + "gk_proj.0.weight", TRANSPOSE)
            out[("gk_up", "kernel")] = (prefix + "gk_proj.1.weight", TRANSPOSE)
            out[("gk_up", "bias")] = (prefix + "gk_proj.1.bias", SAME)
    else:
        raise ValueError(f"no fla tensor names for mixer {kind!r}")
    for name in projections:
        out[(name, "kernel")] = (prefix + f"{name}.weight", TRANSPOSE)
    if elementwise_affine:
        out[("g_norm", "scale")] = (prefix + f"{norm}.weight", SAME)
    if use_short_conv:
        for name in ("q", "k", "v"):
            out[(f"{name}_conv", "kernel")] = (prefix + f"{name}_conv1d.weight", CONV)
    return out


def tensor_map(config: ModelConfig, *, norms_inside: bool = False, fused_mlp: bool = False,
               fused_gate_norm: bool = True) -> hf_params.Mapping:
    """Every parameter of our GSA/GLA `CausalLM` -> (fla tensor name, Transform).

    norms_inside, fused_mlp: the 2024 layout (see the module docstring); fused_gate_norm: as
    `mixer_map`."""
    out: hf_params.Mapping = {("embed", "embedding"): ("model.embeddings.weight", SAME),
                              ("norm", "scale"): ("model.norm.weight", SAME)}
    if not config.tie_word_embeddings:
        out[("lm_head", "kernel")] = ("lm_head.weight", TRANSPOSE)
    width = config.mlp_width
    options = dict(use_output_gate=config.use_output_gate, use_short_conv=config.use_short_conv,
                   elementwise_affine=config.elementwise_affine, fused_gate_norm=fused_gate_norm)
    for i in range(config.num_layers):
        fla, ours = f"model.layers.{i}.", f"layer_{i}"
        out[(ours, "attn_norm", "scale")] = (fla + ("attn.norm" if norms_inside
                                                     else "attn_norm") + ".weight", SAME)
        out[(ours, "mlp_norm", "scale")] = (fla + ("mlp.norm" if norms_inside
                                                    else "mlp_norm") + ".weight", SAME)
        for path, entry in mixer_map(config.layer_mixer(i), **options,
                                     prefix=fla + "attn.").items():
            out[(ours, "mixer", *path)] = entry
        if fused_mlp:  # gate, up = chunk(gate_proj(x), 2)
            name = fla + "mlp.gate_proj.weight"
            out[(ours, "mlp", "gate_proj", "kernel")] = (
                name, Transform(lambda x: x[:width].T, None))
            out[(ours, "mlp", "up_proj", "kernel")] = (
                name, Transform(lambda x: x[width:].T, None))
        else:
            for name in ("gate_proj", "up_proj"):
                out[(ours, "mlp", name, "kernel")] = (fla + f"mlp.{name}.weight", TRANSPOSE)
        out[(ours, "mlp", "down_proj", "kernel")] = (fla + "mlp.down_proj.weight", TRANSPOSE)
    return out


def _layout(reader: TensorReader, config: ModelConfig) -> dict[str, bool]:
    """tensor_map's layout switches, from the names in the checkpoint (layer 0)."""
    names = set(reader.names())
    attn = "model.layers.0.attn."
    if config.mixer == "gsa" and attn + "g_proj.weight" in names:
        _fail("use_output_gate", "is set and the checkpoint has the gate's weights "
                                 "(attn.g_proj): fla's GSA output gate of 2024-09 is not "
                                 "implemented")
    return dict(norms_inside=attn + "norm.weight" in names,
                fused_mlp="model.layers.0.mlp.up_proj.weight" not in names,
                fused_gate_norm=attn + "g_norm.weight" not in names)


def params_from_fla(reader: TensorReader, config: ModelConfig,
                    dtype: str | np.dtype = "float32") -> dict:
    """The `params` tree of `CausalLM(config)` (NumPy, `dtype`) from an fla checkpoint.
    Raises ValueError naming a missing, misshapen or unused tensor."""
    mapping = tensor_map(config, **_layout(reader, config))
    tied = ("lm_head.weight", "model.embeddings.weight") if config.tie_word_embeddings else None
    return hf_params.gather_params(reader, mapping, config, dtype,
                                   family=f"fla {config.mixer.upper()}", tied_head=tied)


def load_fla(directory: str | pathlib.Path, **overrides) -> tuple[ModelConfig, dict]:
    """(config, params) of the fla GSA/GLA checkpoint in `directory`: `CausalLM(config)
    .apply({"params": params}, tokens)` gives fla's logits. overrides: ModelConfig fields
    (e.g. dtype="bfloat16", impl="pallas")."""
    config = model_config_from_fla(read_config(directory), **overrides)
    with TensorReader(directory) as reader:
        params = params_from_fla(reader, config, config.param_dtype)
    return config, params


def describe(hf: dict[str, Any]) -> dict[str, Any]:
    """The config.json fields a conversion records in its checkpoint's metadata: the ones that
    change the function, the model type and the stored dtype."""
    keep = {"model_type", "dtype", "torch_dtype"}
    return {k: v for k, v in hf.items() if k not in _INERT or k in keep}


# ------------------------------------------------------------------ export
def fla_config(config: ModelConfig) -> tuple[dict[str, Any], list[str]]:
    """(config.json dict in fla's format, notes) for our GSA/GLA `config`.

    Raises ValueError naming the field for what fla's GSAConfig/GLAConfig cannot express.
    notes: differences fla will compute with (GSA's output-norm eps, see the module docstring).
    """
    def refuse(field: str, msg: str):
        raise ValueError(f"export: {field} {msg}")

    kind = config.mixer
    if kind not in MODEL_TYPES:
        refuse("mixer", f"is {kind!r}; fla's format is written for {MODEL_TYPES}")
    if config.attn_layers:
        refuse("attn_layers", "is set; hybrid attention layers are not exported")
    notes = []
    out: dict[str, Any] = dict(
        model_type=kind, architectures=[ARCHITECTURES[kind]], hidden_size=config.hidden_size,
        num_hidden_layers=config.num_layers, num_heads=config.num_heads,
        num_kv_heads=config.num_kv_heads, vocab_size=config.vocab_size,
        hidden_ratio=config.hidden_ratio, intermediate_size=config.mlp_width,
        expand_k=config.expand_k, expand_v=config.expand_v, norm_eps=config.norm_eps,
        elementwise_affine=config.elementwise_affine,
        tie_word_embeddings=config.tie_word_embeddings,
        use_short_conv=config.use_short_conv, conv_size=config.conv_size, hidden_act="swish",
        initializer_range=config.initializer_range, attn=None, fuse_norm=True,
        fuse_swiglu=True, fuse_cross_entropy=True, use_cache=True)
    eps = config.norm_eps if config.output_norm_eps is None else config.output_norm_eps
    if kind == "gsa":
        for field, want in (("gate", "data_dependent"), ("slot_nonlinearity", "softmax")):
            if getattr(config, field) != want:
                refuse(field, f"is {getattr(config, field)!r}; fla's GSA has {want!r} only")
        if config.expand_v != 1.0:
            refuse("expand_v", f"is {config.expand_v}; fla's GSA output norm has hidden_size "
                               f"weights, so it runs with expand_v 1 only")
        if config.feature_map not in ("swish", "relu"):
            refuse("feature_map", f"is {config.feature_map!r}; fla's GSA has swish | relu")
        out.update(num_slots=config.num_slots, gate_logit_normalizer=config.gate_logit_normalizer,
                   feature_map=config.feature_map, use_output_gate=False, use_norm=True,
                   clamp_min=None, clamp_max=None)
        if eps != GSA_OUTPUT_NORM_EPS:
            notes.append(f"fla's GSA layer normalises its output with eps {GSA_OUTPUT_NORM_EPS}; "
                         f"this model used {eps} (logits differ by about eps / mean(silu(o)²))")
    else:
        for field in ("gate_low_rank_dim", "gate_logit_normalizer"):
            if getattr(config, field) != GLA_GATE:
                refuse(field, f"is {getattr(config, field)}; fla's GLAModel always uses "
                              f"{GLA_GATE}")
        if eps != config.norm_eps:
            refuse("output_norm_eps", f"is {eps}; fla's GLA norms its output with norm_eps "
                                      f"({config.norm_eps})")
        out.update(feature_map=None if config.feature_map == "identity" else config.feature_map,
                   use_output_gate=config.use_output_gate, clamp_min=None, use_gk=True,
                   use_gv=False, attn_mode="chunk")
    return out, notes


def _numpy_dtype(dtype: str) -> np.dtype:
    import ml_dtypes  # bfloat16 for NumPy (a jax dependency)
    return np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)


def save_fla(directory: str | pathlib.Path, config: ModelConfig, params: dict, *,
             dtype: str = "float32", max_shard_bytes: Optional[int] = None) -> dict[str, Any]:
    """Writes our GSA/GLA model as an fla checkpoint directory: config.json and
    model.safetensors (or, above `max_shard_bytes`, model-0000i-of-0000n.safetensors with
    model.safetensors.index.json), loadable with fla's AutoModelForCausalLM.from_pretrained.

    params: the `params` tree of `CausalLM(config)`; dtype: "float32" | "bfloat16" | ...
    Returns {"directory", "files", "notes"}. Refuses (ValueError) a non-empty directory and
    configs fla cannot express."""
    from safetensors.numpy import save_file
    hf, notes = fla_config(config)
    directory = pathlib.Path(directory)
    if directory.exists() and any(directory.iterdir()):
        raise ValueError(f"export: {str(directory)!r} is not empty; write into a new directory")
    tensors = hf_params.scatter_params(params, tensor_map(config), _numpy_dtype(dtype))
    hf["dtype"] = hf["torch_dtype"] = dtype
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name in sorted(tensors):
        if max_shard_bytes and size and size + tensors[name].nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensors[name]
        size += tensors[name].nbytes
    meta = {"format": "pt"}  # transformers refuses safetensors files without it
    if len(shards) == 1:
        files = [SINGLE_FILE]
        save_file(shards[0], str(directory / SINGLE_FILE), metadata=meta)
    else:
        files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                 for i in range(len(shards))]
        for file, shard in zip(files, shards):
            save_file(shard, str(directory / file), metadata=meta)
        index = {"metadata": {"total_size": int(sum(t.nbytes for t in tensors.values()))},
                 "weight_map": {n: f for f, s in zip(files, shards) for n in s}}
        (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return {"directory": str(directory), "files": files, "notes": notes,
            "parameters": int(sum(math.prod(t.shape) for t in tensors.values()))}
