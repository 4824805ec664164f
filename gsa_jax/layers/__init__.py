"""Flax Linen token mixers and the blocks' shared pieces (all above `gsa_jax.ops`)."""

from gsa_jax.layers.attention import Attention
from gsa_jax.layers.common import Embed, RMSNorm, ShortConv, SwiGLU, apply_rope
from gsa_jax.layers.gla import GatedLinearAttention
from gsa_jax.layers.gsa import GatedSlotAttention, abc_slot_gates
from gsa_jax.layers.retnet import MultiScaleRetention, retention_log_decays

__all__ = [
    "Attention",
    "Embed",
    "GatedLinearAttention",
    "GatedSlotAttention",
    "MultiScaleRetention",
    "RMSNorm",
    "ShortConv",
    "SwiGLU",
    "abc_slot_gates",
    "apply_rope",
    "retention_log_decays",
]
