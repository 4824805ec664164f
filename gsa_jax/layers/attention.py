"""Causal softmax attention with RoPE (the Transformer++ mixer, and the hybrid models' layers).

    q = RoPE(W_q x), k = RoPE(W_k x), v = W_v x      (H query heads, Hkv key/value heads: GQA)
    o_t = Σ_{i ≤ t, same segment} softmax_i(q_t·k_i / √d) v_i,   y = W_o o

The kernel is `jax.nn.dot_product_attention`: implementation "auto" passes None (JAX's choice:
XLA in jax 0.10/0.11, which may route to cuDNN in later versions), "cudnn" asks for cuDNN flash
attention explicitly, "xla" forces the XLA path. Packed rows add a block-diagonal segment mask.
Decoding keeps a preallocated KV cache of `max_len` slots (the only cache here that grows with
the generated length).

With `use_short_conv`, W_q x, W_k x, W_v x first pass a causal depthwise conv + SiLU (width
`conv_size`) before RoPE, as the linear mixers' option and as Zoology's attention baseline (a
short conv before every mixer); its tails join the decode cache.
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from gsa_jax import checks
from gsa_jax.layers import common, mixer_parts

Array = jax.Array

IMPLEMENTATIONS = {"auto": None, "xla": "xla", "cudnn": "cudnn"}


class Attention(nn.Module):
    """Softmax attention mixer. Call: (x [B, T, D], positions [B, T]) -> (y, cache or None).

    Attributes: hidden_size (D), num_heads (H), num_kv_heads (None = H), head_dim (None = D/H),
    rope_theta, implementation ("auto" | "xla" | "cudnn"), use_short_conv / conv_size (off by
    default), std / out_std, dtype / param_dtype.
    """
    hidden_size: int
    num_heads: int = 16
    num_kv_heads: Optional[int] = None
    head_dim: Optional[int] = None
    rope_theta: float = 10000.0
    implementation: str = "auto"
    use_short_conv: bool = False
    conv_size: int = 4
    std: float = 0.02
    out_std: Optional[float] = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def dims(self) -> tuple[int, int]:
        owner = "Attention"
        checks.check_choice(owner, "implementation", self.implementation, IMPLEMENTATIONS)
        if self.head_dim is None:
            kv, dh, _, _ = common.head_dims(owner, self.hidden_size, self.num_heads,
                                            self.num_kv_heads, 1.0, 1.0)
        else:
            kv = common.kv_heads(owner, self.num_heads, self.num_kv_heads)
            dh = self.head_dim
            checks.check_positive_int(owner, "head_dim", dh)
        checks.check_rope_dim(owner, "head dim", dh)
        if self.use_short_conv:
            checks.check_positive_int(owner, "conv_size", self.conv_size)
        return kv, dh

    @nn.compact
    def __call__(self, x: Array, *, segment_ids: Optional[Array] = None,
                 positions: Optional[Array] = None, cache: Optional[dict] = None,
                 mode: str = "train", max_len: int = 0) -> tuple[Array, Optional[dict]]:
        """x: [B, T, D]; positions: [B, T] (None: position in the segment).

        "prefill" returns the KV cache {"k", "v" [B, max_len, Hkv, d], "valid" [B, max_len]
        (slots of the last segment, which decoding continues), "index" (next free slot),
        "conv_q/k/v" [B, W-1, C] (short conv)};
        "decode" writes T new tokens at "index" and attends to every valid slot up to itself.
        """
        kv, dh = self.dims()
        owner = "Attention"
        common.check_mode(owner, mode, cache)
        B, T, _ = x.shape
        H = self.num_heads
        if positions is None:
            positions = common.positions_in_segment(segment_ids, B, T)
        if cache is not None and segment_ids is not None:
            raise ValueError(f"{owner}: segment_ids cannot be combined with a cache; "
                             "decoding continues the last segment")
        kw = dict(std=self.std, dtype=self.dtype, param_dtype=self.param_dtype)
        runs = common.segment_runs(segment_ids)
        new_cache = {}
        q, k, v = mixer_parts.project_qkv(
            x, num_heads=H, num_kv_heads=kv, head_k_dim=dh, head_v_dim=dh,
            use_short_conv=self.use_short_conv, conv_size=self.conv_size, runs=runs, cache=cache,
            new_cache=new_cache, **kw)
        q = common.apply_rope(q.reshape(B, T, H, dh), positions, self.rope_theta)
        k = common.apply_rope(k.reshape(B, T, kv, dh), positions, self.rope_theta)
        v = v.reshape(B, T, kv, dh)
        impl = IMPLEMENTATIONS[self.implementation]

        if cache is None:
            mask = None
            if runs is not None:
                mask = (runs[:, :, None] == runs[:, None, :])[:, None]  # [B, 1, T, T]
            o = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True,
                                             implementation=impl)
            if mode == "prefill":
                if max_len < T:
                    raise ValueError(f"{owner}: prefill needs max_len >= the prompt length "
                                     f"{T}, got {max_len}")
                pad = ((0, 0), (0, max_len - T), (0, 0), (0, 0))
                valid = jnp.ones((B, T), bool) if runs is None else runs == runs[:, -1:]
                new_cache.update(k=jnp.pad(k, pad), v=jnp.pad(v, pad),
                                 valid=jnp.pad(valid, ((0, 0), (0, max_len - T))),
                                 index=jnp.array(T, jnp.int32))
        else:
            idx = cache["index"]
            k_all = jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype),
                                                 (0, idx, 0, 0))
            v_all = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype),
                                                 (0, idx, 0, 0))
            valid = jax.lax.dynamic_update_slice(cache["valid"], jnp.ones((B, T), bool), (0, idx))
            slots = jnp.arange(k_all.shape[1])
            causal = slots[None, :] <= idx + jnp.arange(T)[:, None]  # [T, S]
            mask = valid[:, None, None, :] & causal[None, None]      # [B, 1, T, S]
            o = jax.nn.dot_product_attention(q, k_all.astype(q.dtype), v_all.astype(q.dtype),
                                             mask=mask, implementation=impl)
            new_cache.update(k=k_all, v=v_all, valid=valid, index=idx + T)
        y = mixer_parts.output_projection(o, x, hidden_size=self.hidden_size,
                                          out_std=self.out_std, **kw)
        return mixer_parts.mixer_result(y, mode, new_cache)
