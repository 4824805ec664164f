"""Model config (plain data, presets) and the causal LM built from it."""

from gsa_jax.models.config import MIXERS, ModelConfig, get_preset, presets
from gsa_jax.models.lm import Block, CausalLM, build_mixer, count_params

__all__ = ["MIXERS", "Block", "CausalLM", "ModelConfig", "build_mixer", "count_params",
           "get_preset", "presets"]
