"""gsa-jax: Gated Slot Attention in JAX/Flax."""

from gsa_jax.ops import gated_linear_attention, gated_slot_attention, gated_slot_attention_step

__version__ = "0.1.0"

__all__ = ["gated_linear_attention", "gated_slot_attention", "gated_slot_attention_step"]
