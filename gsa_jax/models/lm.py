"""The causal language model: embeddings, L pre-norm blocks, final norm, LM head.

    x_0 = E[tokens]                                       [B, T, D]
    x_l = x_{l−1} + mixer_l(RMSNorm(x_{l−1}))             mixer: GSA | GLA | RetNet | attention
    x_l = x_l + SwiGLU(RMSNorm(x_l))
    logits = RMSNorm(x_L) · W_head  (W_head = Eᵀ when tied)   [B, T, V], float32

Entry points (all through `model.apply(params, ..., method=...)`):
  __call__(tokens, segment_ids=None, positions=None) -> logits          training / scoring
  prefill(tokens, segment_ids=None, positions=None, max_len=T) -> (logits, cache)
  decode(tokens [B, T'], positions [B, T'], cache) -> (logits, cache)  continue from a cache
The cache holds one dict per layer (see each mixer): a list of them, or with scanned layers one
dict whose arrays have a leading [L] axis; only attention layers' caches grow with `max_len`.

Layers: with `config.scanned` (scan_layers on a uniform stack) the L blocks are one `nn.scan`
over a block whose params are stacked under "layers" ([L, ...] leaves: one block is traced and
compiled instead of L); otherwise a list of blocks "layer_0" ... "layer_{L-1}". The two layouts
compute the same function; `gsa_jax.layer_layout` converts params (and optimizer states)
between them.
"""

from __future__ import annotations

import logging
import math
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from gsa_jax.layers import common
from gsa_jax.layers.attention import Attention
from gsa_jax.layers.gla import GatedLinearAttention
from gsa_jax.layers.gsa import GatedSlotAttention
from gsa_jax.layers.retnet import MultiScaleRetention
from gsa_jax.models.config import ModelConfig

log = logging.getLogger(__name__)

Array = jax.Array

ACTIVATION_AXES = ("batch", "length", "embed")
SCANNED_LAYERS = "layers"   # name of the scanned stack (its logical axis name too)
_noted_fallbacks: set = set()


def _out_std(cfg: ModelConfig) -> float:
    """Init std of the matrices writing into the residual stream (o_proj, down_proj)."""
    if cfg.rescale_prenorm_residual:
        return cfg.initializer_range / math.sqrt(2 * cfg.num_layers)
    return cfg.initializer_range


def build_mixer(cfg: ModelConfig, layer: int, name: str = "mixer") -> nn.Module:
    """The token-mixer module of layer `layer` (unbound)."""
    kw = dict(std=cfg.initializer_range, out_std=_out_std(cfg), dtype=jnp.dtype(cfg.dtype),
              param_dtype=jnp.dtype(cfg.param_dtype), name=name)
    kind = cfg.layer_mixer(layer)
    if kind == "attention":
        return Attention(cfg.hidden_size, cfg.attn_num_heads, cfg.attn_num_kv_heads,
                         rope_theta=cfg.rope_theta, implementation=cfg.attn_implementation,
                         use_short_conv=cfg.attention_short_conv, conv_size=cfg.conv_size, **kw)
    shared = dict(num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads,
                  expand_k=cfg.expand_k, expand_v=cfg.expand_v, feature_map=cfg.feature_map,
                  use_short_conv=cfg.use_short_conv, conv_size=cfg.conv_size,
                  elementwise_affine=cfg.elementwise_affine,
                  norm_eps=cfg.norm_eps if cfg.output_norm_eps is None else cfg.output_norm_eps,
                  impl=cfg.impl, chunk_size=cfg.chunk_size, **kw)
    if kind == "gsa":
        return GatedSlotAttention(cfg.hidden_size, num_slots=cfg.num_slots, gate=cfg.gate,
                                  slot_nonlinearity=cfg.slot_nonlinearity,
                                  gate_logit_normalizer=cfg.gate_logit_normalizer,
                                  recompute_states=cfg.recompute_states, **shared)
    if kind == "gla":
        return GatedLinearAttention(cfg.hidden_size,
                                    gate_logit_normalizer=cfg.gate_logit_normalizer,
                                    gate_low_rank_dim=cfg.gate_low_rank_dim,
                                    use_output_gate=cfg.use_output_gate, **shared)
    return MultiScaleRetention(cfg.hidden_size, rope_theta=cfg.rope_theta,
                               use_output_gate=cfg.use_output_gate, **shared)


class Block(nn.Module):
    """x += mixer(RMSNorm x); x += SwiGLU(RMSNorm x). x: [B, T, D] -> ([B, T, D], cache)."""
    config: ModelConfig
    layer: int

    @nn.compact
    def __call__(self, x, segment_ids, positions, cache, mode: str, max_len: int):
        cfg = self.config
        dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        norm = dict(eps=cfg.norm_eps, axis_name="norm", dtype=dtype, param_dtype=pdtype)
        h = common.RMSNorm(name="attn_norm", **norm)(x)
        h, cache = build_mixer(cfg, self.layer)(h, segment_ids=segment_ids, positions=positions,
                                                cache=cache, mode=mode, max_len=max_len)
        x = x + h
        h = common.RMSNorm(name="mlp_norm", **norm)(x)
        x = x + common.SwiGLU(cfg.hidden_size, cfg.mlp_width, std=cfg.initializer_range,
                              out_std=_out_std(cfg), dtype=dtype, param_dtype=pdtype,
                              name="mlp")(h)
        return nn.with_logical_constraint(x, ACTIVATION_AXES), cache


# static_argnums of Block.__call__ counts self: (x=1, segment_ids=2, positions=3, cache=4,
# mode=5, max_len=6).
_STATIC = (5, 6)


def remat_policy(name: str):
    """The `jax.checkpoint` policy of a remat policy name (what the forward pass keeps for the
    backward pass of each block; everything else is recomputed from the block's input):

      full       nothing (policy None): only the block's input [B, T, D] is kept; the whole
                 block, the mixer's op included, runs again in the backward pass.
      save_dots  every matmul output (jax.checkpoint_policies.checkpoint_dots: every
                 dot_general), i.e. the projections and MLP matmuls and also the batched ones
                 (attention scores, the chunk form's intra-chunk products); norms, activations
                 and custom calls (the Pallas kernels) are recomputed.
      minimal    the matmul outputs without batch dimensions
                 (jax.checkpoint_policies.dots_with_no_batch_dims_saveable, MaxText's
                 "minimal"): the weight matmuls' outputs (q/k/v/f/o projections, the SwiGLU's
                 gate/up/down); the mixer's op (its batched einsums or its Pallas kernels),
                 norms and activations are recomputed.
    """
    return {"full": None, "save_dots": jax.checkpoint_policies.checkpoint_dots,
            "minimal": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}[name]


def remat_block(cfg: ModelConfig):
    """The Block class wrapped as `cfg.remat` says (the class itself for "none")."""
    if cfg.remat == "none":
        return Block
    # prevent_cse=False inside nn.scan: the scan already keeps XLA from merging the
    # recomputation into the forward pass (jax.checkpoint's documentation).
    return nn.remat(Block, static_argnums=_STATIC, policy=remat_policy(cfg.remat),
                    prevent_cse=not cfg.scanned)


def scanned_blocks(cfg: ModelConfig, name: str = SCANNED_LAYERS) -> nn.Module:
    """The L blocks as one `nn.scan` module: call(x, segment_ids, positions, cache, mode,
    max_len) -> (x, cache), with x [B, T, D] the carry, cache (None, or the per-layer caches
    stacked on a leading [L] axis) scanned over, and params stacked [L, ...] (logical axis
    "layers", replicated). cfg.scan_unroll blocks per loop iteration (params and function
    unchanged; a knob to trade compile time for step time)."""
    stack = nn.scan(remat_block(cfg), variable_axes={"params": 0}, split_rngs={"params": True},
                    in_axes=(nn.broadcast, nn.broadcast, 0, nn.broadcast, nn.broadcast),
                    length=cfg.num_layers, unroll=min(cfg.scan_unroll, cfg.num_layers),
                    metadata_params={nn.PARTITION_NAME: SCANNED_LAYERS})
    # Layer index 0: the config is uniform, so every layer builds the same mixer.
    return stack(cfg, 0, name=name)


class CausalLM(nn.Module):
    """The GSA language model and its baselines, per `ModelConfig` (see the module docstring)."""
    config: ModelConfig

    def setup(self):
        cfg = self.config
        dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        self.embed = common.Embed(
            cfg.vocab_size, cfg.hidden_size, dtype=dtype, param_dtype=pdtype,
            embedding_init=nn.with_logical_partitioning(
                nn.initializers.normal(cfg.initializer_range), ("vocab", "embed")))
        if cfg.scanned:
            self.layers = scanned_blocks(cfg)
        else:
            if cfg.scan_layers and cfg not in _noted_fallbacks:
                _noted_fallbacks.add(cfg)
                log.warning("scan_layers: the layers mix mixers (attn_layers %s), so they run "
                            "as a list of blocks (params layer_0 ... layer_%d), not scanned",
                            list(cfg.attn_layers), cfg.num_layers - 1)
            block = remat_block(cfg)
            self.blocks = [block(cfg, i, name=f"layer_{i}") for i in range(cfg.num_layers)]
        self.norm = common.RMSNorm(cfg.norm_eps, axis_name="norm", dtype=dtype,
                                   param_dtype=pdtype)
        if not cfg.tie_word_embeddings:
            self.lm_head = common.dense(cfg.vocab_size, ("embed", "vocab"),
                                        std=cfg.initializer_range, dtype=dtype,
                                        param_dtype=pdtype, name="lm_head")

    def _run(self, tokens, segment_ids, positions, caches, mode, max_len, last_only=False):
        B, T = tokens.shape
        if segment_ids is not None and segment_ids.shape != (B, T):
            raise ValueError(f"CausalLM: segment_ids must have the tokens' shape {(B, T)}, got "
                             f"{segment_ids.shape}")
        if positions is None:
            positions = common.positions_in_segment(segment_ids, B, T)
        x = nn.with_logical_constraint(self.embed(tokens), ACTIVATION_AXES)
        if self.config.scanned:
            x, new_caches = self.layers(x, segment_ids, positions, caches, mode, max_len)
        else:
            new_caches = []
            for i, block in enumerate(self.blocks):
                x, cache = block(x, segment_ids, positions,
                                 None if caches is None else caches[i], mode, max_len)
                new_caches.append(cache)
        if last_only:
            x = x[:, -1:]
        x = self.norm(x)
        # The head runs in the compute dtype; the softmax/loss downstream wants float32.
        logits = self.embed.attend(x) if self.config.tie_word_embeddings else self.lm_head(x)
        return logits.astype(jnp.float32), new_caches

    def __call__(self, tokens: Array, segment_ids: Optional[Array] = None,
                 positions: Optional[Array] = None) -> Array:
        """tokens: [B, T] int; segment_ids: [B, T] packed-sequence ids (None: one sequence per
        row); positions: [B, T] RoPE positions (None: position within each segment).

        Returns float32 logits [B, T, V]. Tokens of different segments never see each other.
        """
        return self._run(tokens, segment_ids, positions, None, "train", 0)[0]

    def prefill(self, tokens: Array, segment_ids: Optional[Array] = None,
                positions: Optional[Array] = None, max_len: Optional[int] = None,
                last_only: bool = False):
        """The forward pass of `__call__` that also returns every layer's cache.

        max_len: KV-cache capacity of attention layers (prompt + tokens to decode; default T).
        last_only: compute the logits of the last position only ([B, 1, V]; saves the head's
          T·V work when only the next token is needed).
        Returns (logits [B, T, V] float32, cache). Decoding continues the last segment of each row.
        """
        max_len = tokens.shape[1] if max_len is None else max_len
        return self._run(tokens, segment_ids, positions, None, "prefill", max_len, last_only)

    def decode(self, tokens: Array, positions: Array, cache):
        """Continue from `cache`: tokens [B, T'] (T' = 1 in the generation loop; the one-step
        recurrent form), positions [B, T'] their RoPE positions. Returns (logits, cache)."""
        return self._run(tokens, None, positions, cache, "decode", 0)


def count_params(config: ModelConfig) -> int:
    """Number of parameters of the model, from shapes only (jax.eval_shape: nothing allocated).
    A uniform stack is traced scanned (the same parameters, one block traced instead of L)."""
    model = CausalLM(config.replace(scan_layers=True) if config.uniform else config)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
    leaves = jax.tree_util.tree_leaves(nn.meta.unbox(shapes))
    return sum(math.prod(leaf.shape) for leaf in leaves)
