"""Multi-scale retention (RetNet; Sun et al. 2023), the paper's RetNet baseline.

Per token x ∈ R^D and head h = 0..H−1, a fixed (data-independent) decay γ_h = 1 − 2^(−5−h):

    q = RoPE(W_q x)   k = RoPE(W_k x)   v = W_v x
    S_t = γ_h S_{t−1} + k_t v_tᵀ,   o_t = S_tᵀ q_t / √K           (GLA with g = log γ_h on every key)
    y = W_o (RMSNorm_per_head(o) ⊙ swish(W_g x))        (use_output_gate; else W_o RMSNorm_ph(o))

as the peer's `fla.layers.multiscale_retention.MultiScaleRetention` (expand_k 1, expand_v 2,
output gate) with its `chunk_retention` decays. Grouped k/v heads are repeated to H heads before
the op, so every query head keeps its own decay (and its own state).
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from gsa_jax import checks, ops
from gsa_jax.layers import common, mixer_parts
from gsa_jax.ops import common as ops_common

Array = jax.Array


def retention_log_decays(num_heads: int) -> Array:
    """log γ_h = log(1 − 2^(−5−h)) for h = 0..H−1, float32 [H]."""
    h = jnp.arange(num_heads, dtype=jnp.float32)
    return jnp.log1p(-jnp.exp2(-5.0 - h))


class MultiScaleRetention(nn.Module):
    """RetNet token mixer. Call: (x [B, T, D], positions [B, T]) -> (y [B, T, D], cache or None).

    Attributes: hidden_size (D), num_heads (H, 8 in RetNet), num_kv_heads (None = H), expand_k
    (1), expand_v (2), feature_map ("identity"), use_output_gate (True), use_short_conv /
    conv_size, elementwise_affine, norm_eps, rope_theta, impl / chunk_size, std / out_std,
    dtype / param_dtype.
    """
    hidden_size: int
    num_heads: int = 8
    num_kv_heads: Optional[int] = None
    expand_k: float = 1.0
    expand_v: float = 2.0
    feature_map: str = "identity"
    use_short_conv: bool = False
    conv_size: int = 4
    use_output_gate: bool = True
    elementwise_affine: bool = True
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    impl: str = "auto"
    chunk_size: int = 64
    std: float = 0.02
    out_std: Optional[float] = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def dims(self) -> tuple[int, int, int, int]:
        owner = "MultiScaleRetention"
        dims = common.head_dims(owner, self.hidden_size, self.num_heads, self.num_kv_heads,
                                self.expand_k, self.expand_v)
        checks.check_choice(owner, "feature_map", self.feature_map, common.FEATURE_MAPS)
        checks.check_rope_dim(owner, "head key dim", dims[1])
        if self.use_short_conv:
            checks.check_positive_int(owner, "conv_size", self.conv_size)
        return dims

    @nn.compact
    def __call__(self, x: Array, *, segment_ids: Optional[Array] = None,
                 positions: Optional[Array] = None, cache: Optional[dict] = None,
                 mode: str = "train", max_len: int = 0) -> tuple[Array, Optional[dict]]:
        """x: [B, T, D]; positions: [B, T] RoPE positions (None: position in the segment).

        Cache: {"state" [B, H, K, V], "conv_q/k/v" (short conv)}.
        """
        del max_len
        kv, dk, dv, group = self.dims()
        common.check_mode("MultiScaleRetention", mode, cache)
        B, T, _ = x.shape
        H = self.num_heads
        if positions is None:
            positions = common.positions_in_segment(segment_ids, B, T)
        kw = dict(std=self.std, dtype=self.dtype, param_dtype=self.param_dtype)
        new_cache = {}
        q, k, v = mixer_parts.project_qkv(
            x, num_heads=H, num_kv_heads=kv, head_k_dim=dk, head_v_dim=dv,
            use_short_conv=self.use_short_conv, conv_size=self.conv_size,
            runs=common.segment_runs(segment_ids), cache=cache, new_cache=new_cache, **kw)
        q = common.feature_map(q.reshape(B, T, H, dk), self.feature_map)
        k = common.feature_map(k.reshape(B, T, kv, dk), self.feature_map)
        q = common.apply_rope(q, positions, self.rope_theta)
        k = common.apply_rope(k, positions, self.rope_theta)
        # Each query head has its own decay, so grouped k/v are shared by repetition.
        k = ops_common.repeat_heads(k, group, axis=2)
        v = ops_common.repeat_heads(v.reshape(B, T, kv, dv), group, axis=2)
        g = jnp.broadcast_to(retention_log_decays(H)[:, None], (B, T, H, dk))

        state = None if cache is None else cache["state"]
        scale = dk ** -0.5
        if mode == "decode" and T == 1:
            o, state = ops.gated_linear_attention_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], state,
                                                       gate_axis="key", scale=scale)
            o = o[:, None]
        else:
            o, state = ops.gated_linear_attention(
                q, k, v, g, gate_axis="key", scale=scale, initial_state=state,
                return_final_state=mode != "train", segment_ids=segment_ids, impl=self.impl,
                chunk_size=self.chunk_size)
        y = mixer_parts.output_projection(
            o, x, hidden_size=self.hidden_size, out_std=self.out_std, norm="per_head",
            norm_eps=self.norm_eps, elementwise_affine=self.elementwise_affine,
            output_gate=self.use_output_gate, **kw)
        new_cache["state"] = state
        return mixer_parts.mixer_result(y, mode, new_cache)
