"""Training FLOPs per token of a model config, and peak FLOP/s of known accelerators (for MFU).

    training FLOPs / token = 3 · forward = 6 · N_matmul + 3 · Σ_layers mixer(T)

N_matmul: parameters used in matrix products (all but the input embedding table; the tied head
counts once). Mixer terms per token, forward, multiply-add = 2 FLOPs, as the recurrence defines
them (the "model FLOPs" of MFU, not what a particular kernel executes):
    gsa:        H · 2·2·M·(dk + dv)    pass 1: Hk update + readout (dk·M each); pass 2: Hv (M·dv)
    gla/retnet: H · 2·2·dk·dv          state update + readout
    attention:  2·2·T·D_attn           QKᵀ and PV over the full T (PaLM's convention, no causal /2)
"""

from __future__ import annotations

from typing import Optional

from gsa_jax.models.config import ModelConfig
from gsa_jax.models.lm import count_params

# Dense bf16 tensor-core peak per device, FLOP/s, matched by substring of device_kind (first
# match wins: more specific names first). Unknown devices (e.g. CPUs): MFU is not reported.
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("H800", 989e12),
    ("GH200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("V100", 125e12),
    ("TPU v4", 275e12),
    ("TPU v5 lite", 197e12),
    ("TPU v5e", 197e12),
    ("TPU v5p", 459e12),
    ("TPU v5", 459e12),
    ("TPU v6 lite", 918e12),
    ("TPU v6e", 918e12),
)


def peak_flops(device_kind: str) -> Optional[float]:
    """Peak bf16 FLOP/s of one device of this kind, or None when unknown."""
    for name, flops in PEAK_BF16_FLOPS:
        if name.lower() in device_kind.lower():
            return flops
    return None


def mixer_forward_flops(config: ModelConfig, layer: int, seq_len: int) -> float:
    """Forward FLOPs per token of the token mixer's state/attention part of one layer."""
    kind = config.layer_mixer(layer)
    D = config.hidden_size
    if kind == "attention":
        return 4.0 * seq_len * D
    H = config.num_heads
    dk = D * config.expand_k / H
    dv = D * config.expand_v / H
    if kind == "gsa":
        M = config.num_slots if config.num_slots is not None else dk
        return 4.0 * H * M * (dk + dv)
    return 4.0 * H * dk * dv


def train_flops_per_token(config: ModelConfig, seq_len: int,
                          num_params: Optional[int] = None) -> float:
    """FLOPs of one training step (forward + backward) per token; see the module docstring."""
    n = count_params(config) if num_params is None else num_params
    embed = config.vocab_size * config.hidden_size
    n_matmul = n - embed + (embed if config.tie_word_embeddings else 0)
    mixers = sum(mixer_forward_flops(config, i, seq_len) for i in range(config.num_layers))
    return 6.0 * n_matmul + 3.0 * mixers
