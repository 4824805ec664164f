"""The model config: one plain dataclass (str/int/float/bool/list/None fields, YAML-ready) that
flows from the CLI/YAML to the model and the trainer, and the named presets.

Paper sizes (Zhang, Yang et al. 2024, Table 1: 1.3B and 2.7B parameters on 100B SlimPajama
tokens; Table 2 ablations at 340M on 10B tokens) use the architecture of the authors' released
configs (PAPER.md sections 6-7): fla-hub/gsa-1.3B-100B and flame's gsa_1B.json: D=2048, L=24,
4 heads (head dim 512), 64 slots, gate normaliser τ = 8; fla-hub/gsa-2.7B-100B: D=2560, L=32, 5
heads (512), 64 slots, τ = 8; flame's gsa_340M.json: D=1024, L=24, 4 heads (256), 64 slots, τ = 4.
All three: swish features, expand_k = expand_v = 1, no short conv, no scale in the mixer's output
norm (elementwise_affine false), norm eps 1e-6, Mistral's 32000-token vocabulary, SwiGLU MLPs of
width ~8/3·D, untied LM heads at 1.3B/2.7B. 340M embeddings are tied as in fla's 2024 training
configs (legacy/training/configs/gla_340M.json; today's flame unties them).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

from gsa_jax import checks
from gsa_jax.layers import attention as attention_layer
from gsa_jax.layers import common
from gsa_jax.layers import gsa as gsa_layer
from gsa_jax.ops.gla import IMPLS

MIXERS = ("gsa", "gla", "retnet", "attention")
DTYPES = ("float32", "bfloat16", "float16", "float64")
# What a block's rematerialisation keeps for the backward pass (MaxText's names; applied by
# gsa_jax.models.lm.remat_block, which documents each policy).
REMAT_POLICIES = ("none", "full", "save_dots", "minimal")


def remat_policy_name(value: Any) -> Any:
    """The remat policy a config value names: configs and checkpoints written before the named
    policies hold a boolean (true -> "full", false -> "none"); other values pass unchanged
    (validate() names the bad ones)."""
    if isinstance(value, bool):
        return "full" if value else "none"
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return "full" if value.lower() == "true" else "none"
    return value


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A causal LM of L pre-norm blocks [x += mixer(RMSNorm x); x += SwiGLU(RMSNorm x)].

    Fields named as the peer's configs where one exists. `attn_layers` is a tuple inside (hashable,
    so a config can be a static argument) and a list in `to_dict`.
    """
    # Sizes.
    vocab_size: int = 32000            # V
    hidden_size: int = 2048            # D, model width
    num_layers: int = 24               # L, blocks
    # Token mixer of every layer not listed in attn_layers: gsa | gla | retnet | attention.
    mixer: str = "gsa"
    attn_layers: tuple = ()            # indices of the softmax-attention layers (hybrid models)
    num_heads: int = 4                 # H, heads of the gsa/gla/retnet mixer
    num_kv_heads: Optional[int] = None  # Hkv, grouped k/v(/gate) heads; None = H
    expand_k: float = 1.0              # key dim = D · expand_k
    expand_v: float = 1.0              # value dim = D · expand_v
    feature_map: str = "swish"         # φ on q, k: swish | relu | identity
    use_short_conv: bool = False       # causal depthwise conv + SiLU on q/k/v projections
    conv_size: int = 4                 # its width
    elementwise_affine: bool = True    # learned scale of the mixer's output RMSNorm
    output_norm_eps: Optional[float] = None  # eps of the mixer's output RMSNorm; None = norm_eps
    # GSA.
    num_slots: Optional[int] = 64      # M; None = the head key dim
    gate: str = "data_dependent"       # data_dependent | data_independent | none (ABC)
    slot_nonlinearity: str = "softmax"  # softmax | swish | relu | relu2
    gate_logit_normalizer: float = 8.0  # τ: g = logsigmoid(W_f x) / τ (GLA uses 16)
    # GLA.
    gate_low_rank_dim: int = 16        # rank of the GLA gate projection
    use_output_gate: bool = True       # GLA/RetNet: W_o (norm(o) ⊙ swish(W_g x)), else W_o norm(o)
    # Softmax attention (mixer="attention" and the attn_layers of a hybrid).
    attn_num_heads: int = 16
    attn_num_kv_heads: Optional[int] = None
    rope_theta: float = 10000.0
    attn_implementation: str = "auto"  # auto | xla | cudnn (jax.nn.dot_product_attention)
    attention_short_conv: bool = False  # short conv (width conv_size) on attention's q/k/v
    # Channel mixing and norms.
    hidden_ratio: int = 4              # SwiGLU width int(2/3 · ratio · D) rounded up to 256
    intermediate_size: Optional[int] = None  # explicit SwiGLU width
    norm_eps: float = 1e-6
    # Embeddings and initialisation.
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02    # std of every normal-initialised weight
    rescale_prenorm_residual: bool = True  # o_proj/down_proj std / sqrt(2L) (GPT-2, the peer)
    # Numerics and execution.
    dtype: str = "float32"             # compute dtype
    param_dtype: str = "float32"
    remat: str = "none"                # none | full | save_dots | minimal (lm.remat_block);
                                       # true/false of older configs read as full/none
    # One `nn.scan` over the blocks (params stacked under "layers" with a leading [L] axis:
    # one compiled block instead of L) when every layer has the same mixer; a stack with
    # attn_layers falls back to the list of blocks "layer_i" (see `scanned`).
    scan_layers: bool = False
    scan_unroll: int = 1               # layers per iteration of the scanned loop (nn.scan unroll)
    impl: str = "auto"                 # form of the gsa/gla/retnet ops
    chunk_size: int = 64               # C of the chunk form
    recompute_states: bool = False     # GSA: recompute the op's hidden states in the backward

    def __post_init__(self):
        if isinstance(self.attn_layers, list):
            object.__setattr__(self, "attn_layers", tuple(self.attn_layers))
        object.__setattr__(self, "remat", remat_policy_name(self.remat))
        self.validate()

    # ---------------------------------------------------------------- checks
    def validate(self) -> None:
        """Raises ValueError with the offending field(s) and what is allowed."""
        def fail(msg: str):
            raise ValueError(f"ModelConfig: {msg}")

        owner = "ModelConfig"
        for name in ("vocab_size", "hidden_size", "num_layers", "conv_size", "chunk_size",
                     "hidden_ratio", "attn_num_heads", "gate_low_rank_dim", "scan_unroll"):
            # Plain ints only: the config is written to YAML.
            checks.check_positive_int(owner, name, getattr(self, name), numpy_ints=False)
        for name in ("norm_eps", "initializer_range", "gate_logit_normalizer", "rope_theta"):
            checks.check_positive(owner, name, getattr(self, name))
        for name, choices in (("mixer", MIXERS), ("dtype", DTYPES), ("param_dtype", DTYPES),
                              ("impl", IMPLS),
                              ("attn_implementation", tuple(attention_layer.IMPLEMENTATIONS)),
                              ("feature_map", common.FEATURE_MAPS), ("gate", gsa_layer.GATES),
                              ("slot_nonlinearity", gsa_layer.SLOT_NONLINEARITIES),
                              ("remat", REMAT_POLICIES)):
            checks.check_choice(owner, name, getattr(self, name), choices)
        if not isinstance(self.scan_layers, bool):
            fail(f"scan_layers must be true or false, got {self.scan_layers!r}")
        layers = self.attn_layers
        if any(not isinstance(i, int) or isinstance(i, bool) for i in layers):
            fail(f"attn_layers must be layer indices (ints), got {list(layers)}")
        if any(not 0 <= i < self.num_layers for i in layers) or len(set(layers)) != len(layers):
            fail(f"attn_layers {list(layers)} must be distinct indices in [0, {self.num_layers})")
        if self.intermediate_size is not None and self.intermediate_size <= 0:
            fail(f"intermediate_size must be positive or None, got {self.intermediate_size}")
        if self.output_norm_eps is not None and not self.output_norm_eps > 0:
            fail(f"output_norm_eps must be positive or None, got {self.output_norm_eps!r}")
        gsa_layer.check_num_slots(owner, self.num_slots)
        try:
            if self.mixer != "attention" and len(layers) < self.num_layers:
                common.head_dims(f"{self.mixer} mixer", self.hidden_size, self.num_heads,
                                 self.num_kv_heads, self.expand_k, self.expand_v)
            if self.mixer == "attention" or layers:
                common.head_dims("attention", self.hidden_size, self.attn_num_heads,
                                 self.attn_num_kv_heads, 1.0, 1.0)
                checks.check_rope_dim("attention", "head dim hidden_size / attn_num_heads",
                                      self.hidden_size // self.attn_num_heads)
        except ValueError as err:
            fail(str(err))

    def layer_mixer(self, layer: int) -> str:
        """The token mixer of layer `layer`."""
        return "attention" if layer in self.attn_layers else self.mixer

    @property
    def uniform(self) -> bool:
        """Whether every layer has the same mixer (the condition for scanning the layers)."""
        return len({self.layer_mixer(i) for i in range(self.num_layers)}) == 1

    @property
    def scanned(self) -> bool:
        """Whether the model runs its blocks as one `nn.scan` (params under "layers", stacked
        [L, ...]): scan_layers on a uniform stack. A hybrid stack with scan_layers keeps the
        list of blocks (CausalLM logs a note once); its params are "layer_0", "layer_1", ..."""
        return self.scan_layers and self.uniform

    @property
    def mlp_width(self) -> int:
        return common.mlp_intermediate_size(self.hidden_size, self.hidden_ratio,
                                            self.intermediate_size)

    # ------------------------------------------------------- (de)serialising
    def to_dict(self) -> dict[str, Any]:
        """Plain dict (lists, not tuples): `yaml.safe_dump(cfg.to_dict())` round-trips."""
        out = dataclasses.asdict(self)
        out["attn_layers"] = list(self.attn_layers)
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "ModelConfig":
        """Builds a config from a dict; unknown keys raise ValueError (typos must not pass)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"ModelConfig: unknown field(s) {unknown}; known fields: "
                             f"{sorted(known)}")
        return cls(**values)

    def replace(self, **changes) -> "ModelConfig":
        return self.from_dict({**self.to_dict(), **changes})


def _presets() -> dict[str, ModelConfig]:
    gsa = dict(mixer="gsa", num_heads=4, num_slots=64, feature_map="swish",
               gate_logit_normalizer=8.0)
    gla = dict(mixer="gla", num_heads=4, expand_k=0.5, expand_v=1.0, feature_map="identity",
               gate_logit_normalizer=16.0, gate_low_rank_dim=16)
    retnet = dict(mixer="retnet", expand_k=1.0, expand_v=2.0, feature_map="identity",
                  hidden_ratio=2)
    xfmr = dict(mixer="attention")
    s340m = dict(hidden_size=1024, num_layers=24, tie_word_embeddings=True)
    # The paper's GSA models: no norm scale in the mixer; τ = 4 at 340M (flame's gsa_340M.json).
    gsa_paper = dict(elementwise_affine=False)
    gsa340 = {**gsa, **s340m, **gsa_paper, "gate_logit_normalizer": 4.0}
    s1_3b = dict(hidden_size=2048, num_layers=24)
    s2_7b = dict(hidden_size=2560, num_layers=32)
    tiny = dict(vocab_size=256, hidden_size=64, num_layers=2, tie_word_embeddings=False)
    table = {
        # The paper's GSA models.
        "gsa-340m": gsa340,
        "gsa-1.3b": {**gsa, **s1_3b, **gsa_paper},
        "gsa-2.7b": {**gsa, **s2_7b, **gsa_paper, "num_heads": 5},
        # Table 2 ablations (340M): no gate (ABC), data-independent decay, the non-linearity
        # between the passes, the number of slots.
        "gsa-340m-abc": {**gsa340, "gate": "none"},
        "gsa-340m-data-independent": {**gsa340, "gate": "data_independent"},
        "gsa-340m-swish": {**gsa340, "slot_nonlinearity": "swish"},
        "gsa-340m-relu": {**gsa340, "slot_nonlinearity": "relu"},
        "gsa-340m-relu2": {**gsa340, "slot_nonlinearity": "relu2"},
        "gsa-340m-32slots": {**gsa340, "num_slots": 32},
        "gsa-340m-128slots": {**gsa340, "num_slots": 128},
        # Baselines at the same sizes.
        "transformer-340m": {**xfmr, **s340m, "attn_num_heads": 16},
        "transformer-1.3b": {**xfmr, **s1_3b, "attn_num_heads": 32},
        "transformer-2.7b": {**xfmr, **s2_7b, "attn_num_heads": 40},
        "gla-340m": {**gla, **s340m},
        "gla-1.3b": {**gla, **s1_3b},
        "gla-2.7b": {**gla, **s2_7b, "num_heads": 5},
        "retnet-340m": {**retnet, **s340m, "num_heads": 4},
        "retnet-1.3b": {**retnet, **s1_3b, "num_heads": 8},
        "retnet-2.7b": {**retnet, **s2_7b, "num_heads": 10},
        # Small models for tests and demos.
        "gsa-tiny": {**gsa, **tiny, "num_slots": 8},
        "gsa-hybrid-tiny": {**gsa, **tiny, "num_layers": 3, "num_slots": 8,
                            "attn_layers": [1], "attn_num_heads": 4},
        "gla-tiny": {**gla, **tiny},
        "retnet-tiny": {**retnet, **tiny, "num_heads": 2},
        "transformer-tiny": {**xfmr, **tiny, "attn_num_heads": 4},
    }
    # Scanned layers by default for the tiny presets (uniform ones), where compiling dominates
    # a run (tests, demos); the paper-size presets keep the list of blocks: on one H200 the
    # scanned 340M train step ran 26% fewer tokens/s than the unscanned one
    # (experiments/results/compile_time_h200train.md) for a compile 6-13x faster, which a run
    # of thousands of steps never wins back. `scan_layers=True` switches it on for any preset.
    out = {}
    for name, values in table.items():
        config = ModelConfig.from_dict(values)
        scan = config.uniform and name.endswith("-tiny")
        out[name] = config.replace(scan_layers=True) if scan else config
    return out


presets: dict[str, ModelConfig] = _presets()


def get_preset(name: str, **overrides) -> ModelConfig:
    """A named preset, optionally with fields replaced (e.g. dtype="bfloat16", remat="full")."""
    if name not in presets:
        raise ValueError(f"unknown model preset {name!r}; known presets: {sorted(presets)}")
    config = presets[name]
    return config.replace(**overrides) if overrides else config
