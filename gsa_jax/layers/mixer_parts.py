"""The parts every token mixer shares: the q/k/v projections (with the optional short conv and
its decode cache) and the output block (norm, output gate, W_o), plus the mixers' cache return.

    q = W_q x ∈ R^{H·dk}   k = W_k x ∈ R^{Hkv·dk}   v = W_v x ∈ R^{Hkv·dv}   (+ ShortConv each)
    y = W_o (RMSNorm(o) [⊙ swish(W_g x)])      RMSNorm per head (dv) or over all heads (H·dv)

Call these inside a mixer's compact `__call__`: the Dense/ShortConv/RMSNorm they create become
submodules of the mixer under fixed names (q_proj, k_proj, v_proj, q_conv, k_conv, v_conv,
g_norm, g_proj, o_proj), which the checkpoints and the fla/llama loaders (gsa_jax/hf) rely on.
A mixer file then says only what is particular to it: feature maps, gates, positions, the op.
"""

from __future__ import annotations

from typing import Any, Optional

import jax

from gsa_jax import checks
from gsa_jax.layers import common

Array = jax.Array
Dtype = Any


def project_qkv(x: Array, *, num_heads: int, num_kv_heads: int, head_k_dim: int,
                head_v_dim: int, std: float, dtype: Dtype, param_dtype: Dtype,
                use_short_conv: bool = False, conv_size: int = 4, runs: Optional[Array] = None,
                cache: Optional[dict] = None, new_cache: Optional[dict] = None
                ) -> tuple[Array, Array, Array]:
    """q, k, v projections of x [B, T, D], each optionally through a causal `ShortConv`.

    With `use_short_conv`, reads the conv tails cache["conv_q/k/v"] ([B, W-1, C]) when `cache`
    is given (decode) and writes the new tails into `new_cache` (prefill and decode); `runs`
    [B, T] (contiguous-segment index or None) keeps the conv inside each packed segment.

    Returns (q [B, T, H·dk], k [B, T, Hkv·dk], v [B, T, Hkv·dv]) in `dtype`, not yet split
    into heads (the mixers reshape, add feature maps or RoPE as their own).
    """
    kw = dict(std=std, dtype=dtype, param_dtype=param_dtype)
    q = common.dense(num_heads * head_k_dim, ("embed", "heads"), name="q_proj", **kw)(x)
    k = common.dense(num_kv_heads * head_k_dim, ("embed", "kv_heads"), name="k_proj", **kw)(x)
    v = common.dense(num_kv_heads * head_v_dim, ("embed", "kv_heads"), name="v_proj", **kw)(x)
    if use_short_conv:
        q, k, v = common.short_convs(
            {"q": (q, "heads"), "k": (k, "kv_heads"), "v": (v, "kv_heads")}, runs, cache,
            {} if new_cache is None else new_cache, conv_size, **kw)
    return q, k, v


def output_projection(o: Array, x: Array, *, hidden_size: int, std: float,
                      out_std: Optional[float], dtype: Dtype, param_dtype: Dtype,
                      norm: Optional[str] = None, norm_eps: float = 1e-6,
                      elementwise_affine: bool = True, output_gate: bool = False) -> Array:
    """y = W_o (RMSNorm(o) [⊙ swish(W_g x)]): the mixers' output block.

    Args:
      o: [B, T, H, dv] the op's output (any pre-norm activation already applied).
      x: [B, T, D] the mixer's input (read by the output gate W_g only).
      norm: None (no norm, softmax attention), "per_head" (RMSNorm over each head's dv values,
        scale axis "norm": GLA, RetNet) or "all_heads" (over all H·dv values, axis "heads": GSA).
      output_gate: multiply by swish(W_g x) after the norm (GLA/RetNet's use_output_gate).
      out_std: init std of W_o (None = std).
    Returns: y [B, T, D].
    """
    B, T, H, dv = o.shape
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    checks.check_choice("output_projection", "norm", norm, (None, "per_head", "all_heads"))
    if norm == "per_head":
        o = common.RMSNorm(norm_eps, elementwise_affine, "norm", name="g_norm", **kw)(o)
    o = o.reshape(B, T, H * dv)
    if norm == "all_heads":
        o = common.RMSNorm(norm_eps, elementwise_affine, "heads", name="g_norm", **kw)(o)
    if output_gate:
        gate = common.dense(H * dv, ("embed", "heads"), std=std, name="g_proj", **kw)(x)
        o = o * jax.nn.swish(gate)
    out_std = std if out_std is None else out_std
    return common.dense(hidden_size, ("heads", "embed"), std=out_std, name="o_proj", **kw)(o)


def mixer_result(y: Array, mode: str, new_cache: dict) -> tuple[Array, Optional[dict]]:
    """(y, None) in mode "train" (nothing to continue from), else (y, new_cache)."""
    return (y, None) if mode == "train" else (y, new_cache)
