"""gsa-jax: Gated Slot Attention in JAX/Flax."""

from gsa_jax import _xla_cpu

_xla_cpu.disable_ynn_fusions_if_affected()  # before any backend exists (see _xla_cpu.py)

from gsa_jax.ops import gated_linear_attention, gated_slot_attention, gated_slot_attention_step  # noqa: E402,E501

__version__ = "0.1.0"

__all__ = ["gated_linear_attention", "gated_slot_attention", "gated_slot_attention_step"]
