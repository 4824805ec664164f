"""Pure JAX ops (no Flax): gated linear attention and gated slot attention in every form."""

from gsa_jax.ops.gla import gated_linear_attention, gated_linear_attention_step
from gsa_jax.ops.gsa import GSAState, gated_slot_attention, gated_slot_attention_step
from gsa_jax.ops.recurrent import gla_step

__all__ = [
    "GSAState",
    "gated_linear_attention",
    "gated_linear_attention_step",
    "gated_slot_attention",
    "gated_slot_attention_step",
    "gla_step",
]
