"""Gated linear attention layer (GLA; Yang et al. 2023), the paper's GLA baseline.

Per token x ∈ R^D, H heads (k, v and the gate grouped over Hkv heads):

    q = φ(W_q x)   k = φ(W_k x)   v = W_v x            φ = feature_map (identity by default)
    α = logsigmoid(W_α2 W_α1 x + b) / τ                  low-rank (16) data-dependent key gate, τ = 16
    S_t = diag(exp α_t) S_{t−1} + k_t v_tᵀ,  o_t = S_tᵀ q_t / √K
    y = W_o (RMSNorm_per_head(o) ⊙ swish(W_g x))        (use_output_gate; else W_o RMSNorm_ph(o))

as the peer's `fla.layers.gla.GatedLinearAttention` (expand_k 0.5, output gate, per-head norm).
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from gsa_jax import checks, ops
from gsa_jax.layers import common, mixer_parts

Array = jax.Array


class GatedLinearAttention(nn.Module):
    """GLA token mixer. Call: (x [B, T, D]) -> (y [B, T, D], cache or None).

    Attributes: hidden_size (D), num_heads (H), num_kv_heads (None = H), expand_k (0.5),
    expand_v (1), feature_map ("identity" | "swish" | "relu"), gate_logit_normalizer (τ = 16),
    gate_low_rank_dim (16), use_output_gate (True), use_short_conv / conv_size,
    elementwise_affine (per-head norm scale), norm_eps, impl / chunk_size (the op's form),
    std / out_std (init), dtype / param_dtype.
    """
    hidden_size: int
    num_heads: int = 4
    num_kv_heads: Optional[int] = None
    expand_k: float = 0.5
    expand_v: float = 1.0
    feature_map: str = "identity"
    gate_logit_normalizer: float = 16.0
    gate_low_rank_dim: int = 16
    use_short_conv: bool = False
    conv_size: int = 4
    use_output_gate: bool = True
    elementwise_affine: bool = True
    norm_eps: float = 1e-6
    impl: str = "auto"
    chunk_size: int = 64
    std: float = 0.02
    out_std: Optional[float] = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def dims(self) -> tuple[int, int, int, int]:
        owner = "GatedLinearAttention"
        dims = common.head_dims(owner, self.hidden_size, self.num_heads, self.num_kv_heads,
                                self.expand_k, self.expand_v)
        checks.check_choice(owner, "feature_map", self.feature_map, common.FEATURE_MAPS)
        checks.check_positive_int(owner, "gate_low_rank_dim", self.gate_low_rank_dim)
        checks.check_positive(owner, "gate_logit_normalizer", self.gate_logit_normalizer)
        if self.use_short_conv:
            checks.check_positive_int(owner, "conv_size", self.conv_size)
        return dims

    @nn.compact
    def __call__(self, x: Array, *, segment_ids: Optional[Array] = None,
                 positions: Optional[Array] = None, cache: Optional[dict] = None,
                 mode: str = "train", max_len: int = 0) -> tuple[Array, Optional[dict]]:
        """x: [B, T, D]. Cache: {"state" [B, Hkv, K, V], "conv_q/k/v" (short conv)}."""
        del positions, max_len
        kv, dk, dv, _ = self.dims()
        common.check_mode("GatedLinearAttention", mode, cache)
        B, T, _ = x.shape
        H = self.num_heads
        kw = dict(std=self.std, dtype=self.dtype, param_dtype=self.param_dtype)
        new_cache = {}
        q, k, v = mixer_parts.project_qkv(
            x, num_heads=H, num_kv_heads=kv, head_k_dim=dk, head_v_dim=dv,
            use_short_conv=self.use_short_conv, conv_size=self.conv_size,
            runs=common.segment_runs(segment_ids), cache=cache, new_cache=new_cache, **kw)
        low = common.dense(self.gate_low_rank_dim, ("embed", "lowrank"), name="gk_down", **kw)(x)
        gk = common.dense(kv * dk, ("lowrank", "kv_heads"), name="gk_up", use_bias=True, **kw)(low)
        gk = jax.nn.log_sigmoid(gk.astype(jnp.float32)) / self.gate_logit_normalizer
        q = common.feature_map(q.reshape(B, T, H, dk), self.feature_map)
        k = common.feature_map(k.reshape(B, T, kv, dk), self.feature_map)
        v = v.reshape(B, T, kv, dv)
        gk = gk.reshape(B, T, kv, dk)

        state = None if cache is None else cache["state"]
        scale = dk ** -0.5
        if mode == "decode" and T == 1:
            o, state = ops.gated_linear_attention_step(q[:, 0], k[:, 0], v[:, 0], gk[:, 0], state,
                                                       gate_axis="key", scale=scale)
            o = o[:, None]
        else:
            o, state = ops.gated_linear_attention(
                q, k, v, gk, gate_axis="key", scale=scale, initial_state=state,
                return_final_state=mode != "train", segment_ids=segment_ids, impl=self.impl,
                chunk_size=self.chunk_size)
        y = mixer_parts.output_projection(
            o, x, hidden_size=self.hidden_size, out_std=self.out_std, norm="per_head",
            norm_eps=self.norm_eps, elementwise_affine=self.elementwise_affine,
            output_gate=self.use_output_gate, **kw)
        new_cache["state"] = state
        return mixer_parts.mixer_result(y, mode, new_cache)
