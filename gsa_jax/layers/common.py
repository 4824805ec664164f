"""Pieces shared by the token mixers and the model: initialisers with logical axis names, the
token embedding, RMSNorm, the short causal convolution, rotary position embeddings, the SwiGLU
MLP, segment bookkeeping.

Layout: activations [B, T, D] (batch, time, features); per-head tensors [B, T, H, Dh].
Every parameter carries logical axis names from the project's fixed vocabulary ("vocab", "embed",
"heads", "kv_heads", "mlp", "conv", "norm", "lowrank"); the trainer maps them to mesh axes. Without
a mesh or rules the names are inert, so `init`/`apply` work on one CPU.
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from gsa_jax import checks
from gsa_jax.ops import common as ops_common

Array = jax.Array
Dtype = Any

# Mode of a mixer call. "train": the whole sequence, no cache. "prefill": the whole sequence,
# returning the cache (recurrent state, conv tail, KV cache) that "decode" continues from.
# "decode": continue from a cache (one token per call in the generation loop).
MODES = ("train", "prefill", "decode")


def dense(features: int, axes: tuple[str, str], *, std: float, dtype: Dtype, param_dtype: Dtype,
          name: str, use_bias: bool = False, bias_axes: Optional[tuple[str]] = None) -> nn.Dense:
    """A bias-free (by default) linear map with normal(std) init and logical axis names."""
    kwargs = {}
    if use_bias:
        kwargs["bias_init"] = nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                           bias_axes or (axes[1],))
    return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, name=name,
                    kernel_init=nn.with_logical_partitioning(nn.initializers.normal(std), axes),
                    **kwargs)


class Embed(nn.Embed):
    """nn.Embed whose lookup gathers rows of the table in its parameter dtype (float32) and casts
    them to `dtype` after: out[...] = table[ids[...]].astype(dtype), [..., D].

    Why not nn.Embed: it casts the whole table to `dtype` first, so under bfloat16 the
    gradient's scatter-add accumulates in bfloat16. That is wrong and slow where a token repeats:
    a bfloat16 sum of many updates loses all but ~3 digits, and on a GPU XLA lowers a bfloat16
    scatter-add to compare-and-swap loops that serialise on the repeated row (MQAR's filler token,
    ~60% of 128 x 512 positions: 650 ms of a 660 ms step on an H200). Gathering from the float32
    table makes the scatter-add float32 (native atomics, float32 sums). `attend` (the tied head)
    is nn.Embed's; the parameter ("embedding") is the same, so checkpoints are unchanged.
    """

    def __call__(self, inputs: Array) -> Array:
        if not jnp.issubdtype(inputs.dtype, jnp.integer):
            raise ValueError(f"Embed: token ids must be integers, got {inputs.dtype}")
        rows = jnp.take(self.embedding, inputs, axis=0)
        return rows.astype(self.dtype or self.embedding.dtype)


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x², last axis) + eps) · scale, computed in float32.

    Attributes:
      eps: added to the mean square.
      use_scale: learn the elementwise scale (the peer's `elementwise_affine`), init 1.
      axis_name: logical name of the scale's axis.
      dtype: output dtype (None: the input's).
    """
    eps: float = 1e-6
    use_scale: bool = True
    axis_name: str = "norm"
    dtype: Optional[Dtype] = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        # Squares of bf16 activations lose too much in bf16: normalise in f32.
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + self.eps)
        if self.use_scale:
            scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones_init(),
                                                                     (self.axis_name,)),
                               (x.shape[-1],), self.param_dtype)
            y = y * scale.astype(jnp.float32)
        return y.astype(self.dtype or x.dtype)


class ShortConv(nn.Module):
    """Depthwise causal convolution over time followed by SiLU (kernel width W, default 4).

        y_t = silu(Σ_{j=0}^{W-1} w[W-1-j] ⊙ x_{t-j} (+ b))

    Inputs from an earlier segment of a packed row count as zeros, so each segment equals a
    separate run. The cache is the last W-1 inputs of the current segment ([B, W-1, C]); the
    positions it holds belong to the first segment of the next call (as the recurrent state).
    """
    features: int
    kernel_size: int = 4
    axis_name: str = "heads"
    use_bias: bool = False
    std: float = 0.02
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, runs: Optional[Array] = None,
                 cache: Optional[Array] = None) -> tuple[Array, Array]:
        """x: [B, T, C]; runs: [B, T] contiguous-segment index or None; cache: [B, W-1, C] or None.

        Returns (y [B, T, C], new cache [B, W-1, C]).
        """
        W, (B, T, C) = self.kernel_size, x.shape
        kernel = self.param("kernel", nn.with_logical_partitioning(
            nn.initializers.normal(self.std), ("conv", self.axis_name)), (W, C), self.param_dtype)
        kernel = kernel.astype(self.dtype)
        x = x.astype(self.dtype)
        prefix = jnp.zeros((B, W - 1, C), self.dtype) if cache is None else cache.astype(self.dtype)
        xp = jnp.concatenate([prefix, x], axis=1)  # [B, W-1+T, C]
        if runs is not None:
            # The cached prefix belongs to run 0 (the segment the state flows into).
            runs_p = jnp.concatenate([jnp.zeros((B, W - 1), runs.dtype), runs], axis=1)
        y = jnp.zeros((B, T, C), jnp.float32)
        for lag in range(W):
            start = W - 1 - lag
            shifted = xp[:, start:start + T]
            if runs is not None and lag > 0:
                shifted = shifted * (runs_p[:, start:start + T] == runs)[..., None]
            y = y + shifted.astype(jnp.float32) * kernel[W - 1 - lag].astype(jnp.float32)
        if self.use_bias:
            bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                                   (self.axis_name,)),
                              (C,), self.param_dtype)
            y = y + bias.astype(jnp.float32)
        new_cache = xp[:, T:]
        if runs is not None:
            new_cache = new_cache * (runs_p[:, T:] == runs[:, -1:])[..., None]
        return jax.nn.silu(y).astype(self.dtype), new_cache


def short_convs(inputs: dict, runs: Optional[Array], cache: Optional[dict], new_cache: dict,
                kernel_size: int, *, std: float, dtype: Dtype, param_dtype: Dtype) -> list[Array]:
    """A `ShortConv` named "<name>_conv" on each of {name: (x [B, T, C], axis name)}.

    Call inside a compact method (the convs become submodules of the caller). Reads the conv
    tails cache["conv_<name>"] when `cache` is given and writes the new ones into `new_cache`.
    Returns the outputs in the order of `inputs`.
    """
    outputs = []
    for name, (x, axis) in inputs.items():
        conv = ShortConv(x.shape[-1], kernel_size, axis, std=std, dtype=dtype,
                         param_dtype=param_dtype, name=f"{name}_conv")
        y, new_cache[f"conv_{name}"] = conv(x, runs, None if cache is None else cache[f"conv_{name}"])
        outputs.append(y)
    return outputs


def segment_runs(segment_ids: Optional[Array]) -> Optional[Array]:
    """[B, T] index of the contiguous segment of each position (a new one wherever the id changes)."""
    return ops_common.segment_runs(segment_ids)


def positions_in_segment(segment_ids: Optional[Array], batch: int, length: int) -> Array:
    """Position of each token inside its segment, [B, T] int32 (0 at every segment start)."""
    t = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    if segment_ids is None:
        return t
    starts = jnp.concatenate([jnp.ones((batch, 1), bool),
                              segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    start_index = jax.lax.cummax(jnp.where(starts, t, 0), axis=1)
    return t - start_index


def apply_rope(x: Array, positions: Array, theta: float = 10000.0) -> Array:
    """Rotary embedding on the last axis, rotate-half form (Llama/peer layout).

    x: [B, T, H, D] (D even); positions: [B, T] integer. Pair (x_i, x_{i+D/2}) is rotated by the
    angle positions · theta^(-2i/D).
    """
    d = x.shape[-1]
    checks.check_rope_dim("apply_rope", "head dimension", d)
    half = d // 2
    inv_freq = theta ** (-jnp.arange(half, dtype=jnp.float32) * 2.0 / d)
    angle = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, D/2]
    cos, sin = jnp.cos(angle)[:, :, None, :], jnp.sin(angle)[:, :, None, :]
    xf = x.astype(jnp.float32)
    x1, x2 = xf[..., :half], xf[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def mlp_intermediate_size(hidden_size: int, hidden_ratio: int,
                          intermediate_size: Optional[int] = None) -> int:
    """SwiGLU width: int(2/3 · ratio · D) rounded up to a multiple of 256, unless given.

    Three matrices of D × (2/3 · ratio · D) hold 2 · ratio · D² parameters, as many as a
    two-matrix MLP of width ratio · D (the peer's rule, which the paper's sizes follow).
    """
    if intermediate_size is not None:
        return intermediate_size
    width = int(hidden_size * hidden_ratio * 2 / 3)
    return 256 * ((width + 255) // 256)


class SwiGLU(nn.Module):
    """Channel mixing: y = W_down (silu(W_gate x) ⊙ W_up x). x: [B, T, D] -> [B, T, D]."""
    hidden_size: int
    intermediate_size: int
    std: float = 0.02
    out_std: Optional[float] = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        gate = dense(self.intermediate_size, ("embed", "mlp"), std=self.std, name="gate_proj", **kw)(x)
        up = dense(self.intermediate_size, ("embed", "mlp"), std=self.std, name="up_proj", **kw)(x)
        h = jax.nn.silu(gate) * up
        out_std = self.std if self.out_std is None else self.out_std
        return dense(self.hidden_size, ("mlp", "embed"), std=out_std, name="down_proj", **kw)(h)


FEATURE_MAPS = ("swish", "relu", "identity")


def feature_map(x: Array, kind: str) -> Array:
    if kind == "swish":
        return jax.nn.swish(x)
    if kind == "relu":
        return jax.nn.relu(x)
    if kind == "identity":
        return x
    raise ValueError(f"unknown feature_map {kind!r}; expected one of {FEATURE_MAPS}")


def kv_heads(owner: str, num_heads: int, num_kv_heads: Optional[int]) -> int:
    """Checks grouped heads (GQA); returns Hkv (None = num_heads)."""
    kv = num_heads if num_kv_heads is None else num_kv_heads
    if kv <= 0 or num_heads % kv:
        raise ValueError(f"{owner}: num_kv_heads ({kv}) must divide num_heads ({num_heads})")
    return kv


def head_dims(owner: str, hidden_size: int, num_heads: int, num_kv_heads: Optional[int],
              expand_k: float, expand_v: float) -> tuple[int, int, int, int]:
    """Checks the head configuration; returns (Hkv, head_k_dim, head_v_dim, group)."""
    if hidden_size <= 0 or num_heads <= 0:
        raise ValueError(f"{owner}: hidden_size and num_heads must be positive, got "
                         f"{hidden_size} and {num_heads}")
    kv = kv_heads(owner, num_heads, num_kv_heads)
    dims = []
    for label, expand in (("key", expand_k), ("value", expand_v)):
        total = hidden_size * expand
        if total != int(total) or int(total) <= 0:
            raise ValueError(f"{owner}: hidden_size * expand_{label[0]} = {total} must be a "
                             f"positive integer")
        if int(total) % num_heads:
            raise ValueError(f"{owner}: the {label} dim hidden_size * expand_{label[0]} = "
                             f"{int(total)} is not divisible by num_heads ({num_heads})")
        dims.append(int(total) // num_heads)
    return kv, dims[0], dims[1], num_heads // kv


def check_mode(owner: str, mode: str, cache) -> None:
    checks.check_choice(owner, "mode", mode, MODES)
    if mode == "decode" and cache is None:
        raise ValueError(f"{owner}: mode='decode' needs the cache returned by a prefill")
    if mode == "train" and cache is not None:
        raise ValueError(f"{owner}: mode='train' takes no cache; use 'prefill' or 'decode'")

