"""The Gated Slot Attention layer (Zhang, Yang et al., NeurIPS 2024) around `gsa_jax.ops`.

Per token x_t ∈ R^D, heads h = 1..H sharing key/value heads (Hkv of them) in groups:

    q = φ(W_q x)   k = φ(W_k x)   v = silu(W_v x)        φ = feature_map (swish by default)
    gate="data_dependent":  g = logsigmoid(W_f x) / τ       (τ = gate_logit_normalizer = 8)
    gate="data_independent": g = logsigmoid(f) / τ          (f ∈ R^{Hkv·M} learned, no x)
    gate="none" (ABC):       e = W_f x, z_t = logcumsumexp(e)_t, s = exp(e − z), g_t = z_{t−1} − z_t
    s = 1 − exp(g) (gated forms)
    o = GSA(q, k, v, s, g; scale = 1, slot non-linearity = softmax | swish | relu | relu²)
    y = W_o · RMSNorm(silu(o))                               (RMSNorm over all heads' values)

With `use_short_conv`, W_q x, W_k x, W_v x first pass a causal depthwise conv + SiLU (width 4).
The layout follows the peer's `fla.layers.gsa.GatedSlotAttention`: num_slots defaults to the head
key dim, the gate projection is D → Hkv·M, k/v projections are D → Hkv·head dim.
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

GATES = ("data_dependent", "data_independent", "none")
SLOT_NONLINEARITIES = ops_common.SLOT_ACTIVATIONS  # softmax | swish | relu | relu2


def check_num_slots(owner: str, num_slots: Optional[int]) -> None:
    """M: a positive int, or None (the head key dim)."""
    if num_slots is not None and (not checks.is_int(num_slots) or num_slots <= 0):
        raise ValueError(f"{owner}: num_slots must be positive or None (the head key dim), "
                         f"got {num_slots!r}")


def _segment_starts(runs: Optional[Array], batch: int, length: int) -> Array:
    """[B, T] bool: True where a segment starts (always at t = 0)."""
    first = jnp.ones((batch, 1), bool)
    if runs is None:
        return jnp.concatenate([first, jnp.zeros((batch, length - 1), bool)], axis=1)
    return jnp.concatenate([first, runs[:, 1:] != runs[:, :-1]], axis=1)


def abc_slot_gates(e: Array, runs: Optional[Array] = None,
                   z0: Optional[Array] = None) -> tuple[Array, Array, Array]:
    """Bounded-memory control (ABC, Peng et al. 2022) as GSA's (s, g): no learned forget gate.

    The slot logits are normalised cumulatively over time, restarting at every segment:

        z_t = log Σ_{i ≤ t in the segment} exp(e_i)    s_t = exp(e_t − z_t)    g_t = z_{t−1} − z_t

    so Hk_t = Σ_i k_i exp(e_i − z_t): a running softmax-weighted average per slot. g is 0 at a
    segment start (nothing to decay, as the peer's naive reference), except at t = 0 when `z0`
    continues an earlier call (then z_{−1} = z0).

    Args:
      e: [B, T, Hkv, M] slot logits (float32).
      runs: [B, T] contiguous-segment index or None.
      z0: [B, Hkv, M] z of the last step of the previous call, or None.
    Returns:
      (s, g, z of the last step [B, Hkv, M]), float32.
    """
    B, T = e.shape[:2]
    starts = _segment_starts(runs, B, T)

    def combine(left, right):
        reset_l, a = left
        reset_r, b = right
        return reset_l | reset_r, jnp.where(reset_r, b, jnp.logaddexp(a, b))

    reset = jnp.broadcast_to(starts[:, :, None, None], e.shape)
    _, z = jax.lax.associative_scan(combine, (reset, e), axis=1)
    has_prev = ~starts
    if z0 is not None:
        # Only the first segment continues from the previous call.
        in_first = jnp.ones((B, T), bool) if runs is None else runs == 0
        z = jnp.where(in_first[:, :, None, None], jnp.logaddexp(z0[:, None], z), z)
        has_prev = has_prev.at[:, 0].set(True)
        z_prev = jnp.concatenate([z0[:, None], z[:, :-1]], axis=1)
    else:
        z_prev = jnp.concatenate([z[:, :1], z[:, :-1]], axis=1)
    # z_t = logaddexp(z_{t-1}, e_t), so g_t = z_{t-1} − z_t = −softplus(e_t − z_{t-1}): the same
    # value without the cancellation, and never above 0 (the difference of two scanned sums
    # can be by a rounding error, which the ops refuse as an invalid gate).
    g = jnp.where(has_prev[:, :, None, None], -jax.nn.softplus(e - z_prev), 0.0)
    return jnp.exp(e - z), g, z[:, -1]


class GatedSlotAttention(nn.Module):
    """GSA token mixer. Call: (x [B, T, D]) -> (y [B, T, D], cache or None).

    Attributes (defaults as the paper and the peer):
      hidden_size: D.
      num_heads: H query heads.
      num_kv_heads: Hkv heads of k, v and the gate (grouped like GQA); None = H.
      num_slots: M memory slots per head; None = the head key dim.
      expand_k, expand_v: key dim = D·expand_k, value dim = D·expand_v (split over H heads).
      feature_map: φ on q and k: "swish" | "relu" | "identity".
      gate: "data_dependent" | "data_independent" | "none" (ABC), see the module docstring.
      slot_nonlinearity: between the two passes: "softmax" | "swish" | "relu" | "relu2".
      gate_logit_normalizer: τ.
      use_short_conv, conv_size: causal depthwise conv + SiLU on the q/k/v projections.
      elementwise_affine: learn the output RMSNorm's scale.
      norm_eps: eps of the output RMSNorm.
      scale: multiplies q·k in pass 1 (the paper uses 1).
      impl, chunk_size: the op's form ("auto" | "recurrent" | "parallel" | "chunk" | ...).
      recompute_states: keep no hidden states of the op for the backward pass; recompute them
        (the paper's hidden-state recomputation; see `gated_slot_attention`).
      std, out_std: init std of the projections, and of W_o (None = std).
      dtype, param_dtype: compute and parameter dtypes (the op accumulates in float32).
    """
    hidden_size: int
    num_heads: int = 4
    num_kv_heads: Optional[int] = None
    num_slots: Optional[int] = None
    expand_k: float = 1.0
    expand_v: float = 1.0
    feature_map: str = "swish"
    gate: str = "data_dependent"
    slot_nonlinearity: str = "softmax"
    gate_logit_normalizer: float = 8.0
    use_short_conv: bool = False
    conv_size: int = 4
    elementwise_affine: bool = True
    norm_eps: float = 1e-6
    scale: float = 1.0
    impl: str = "auto"
    chunk_size: int = 64
    recompute_states: bool = False
    std: float = 0.02
    out_std: Optional[float] = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def dims(self) -> tuple[int, int, int, int, int]:
        """Checks the configuration; returns (Hkv, head_k_dim, head_v_dim, group, M)."""
        owner = "GatedSlotAttention"
        kv, dk, dv, group = common.head_dims(owner, self.hidden_size, self.num_heads,
                                             self.num_kv_heads, self.expand_k, self.expand_v)
        checks.check_choice(owner, "feature_map", self.feature_map, common.FEATURE_MAPS)
        checks.check_choice(owner, "gate", self.gate, GATES)
        checks.check_choice(owner, "slot_nonlinearity", self.slot_nonlinearity,
                            SLOT_NONLINEARITIES)
        check_num_slots(owner, self.num_slots)
        slots = dk if self.num_slots is None else self.num_slots
        checks.check_positive(owner, "gate_logit_normalizer", self.gate_logit_normalizer)
        if self.use_short_conv:
            checks.check_positive_int(owner, "conv_size", self.conv_size)
        return kv, dk, dv, group, slots

    def _gates(self, x: Array, runs, cache, kv: int, slots: int):
        """(s, g) [B, T, Hkv, M] float32 and the ABC running normaliser z (or None)."""
        B, T = x.shape[:2]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if self.gate == "data_independent":
            logits = self.param("f_logits", nn.with_logical_partitioning(
                nn.initializers.normal(self.std), ("kv_heads",)), (kv * slots,), self.param_dtype)
            g = jax.nn.log_sigmoid(logits.astype(jnp.float32)) / self.gate_logit_normalizer
            g = jnp.broadcast_to(g.reshape(kv, slots), (B, T, kv, slots))
            return -jnp.expm1(g), g, None
        f = common.dense(kv * slots, ("embed", "kv_heads"), std=self.std, name="f_proj", **kw)(x)
        f = f.astype(jnp.float32).reshape(B, T, kv, slots)
        if self.gate == "data_dependent":
            g = jax.nn.log_sigmoid(f) / self.gate_logit_normalizer
            # 1 − exp(g) loses digits when g ≈ 0; −expm1(g) does not.
            return -jnp.expm1(g), g, None
        z0 = None if cache is None else cache["z"]
        return abc_slot_gates(f, runs, z0)

    @nn.compact
    def __call__(self, x: Array, *, segment_ids: Optional[Array] = None,
                 positions: Optional[Array] = None, cache: Optional[dict] = None,
                 mode: str = "train", max_len: int = 0) -> tuple[Array, Optional[dict]]:
        """x: [B, T, D]; segment_ids: [B, T] packed-sequence ids (state reset where they change).

        mode "train" returns (y, None); "prefill" also returns the cache
        {"hk" [B,Hkv,K,M], "hv" [B,Hkv,M,V], "z" [B,Hkv,M] (gate="none"), "conv_q/k/v"
        [B,W-1,C] (short conv)}; "decode" continues from `cache` (T = 1 uses the one-step
        recurrent form). The cache size does not depend on the sequence length.
        `positions` and `max_len` are unused (GSA has no positions and no growing cache).
        """
        del positions, max_len
        kv, dk, dv, group, slots = self.dims()
        common.check_mode("GatedSlotAttention", mode, cache)
        B, T, _ = x.shape
        H = self.num_heads
        runs = common.segment_runs(segment_ids)
        new_cache = {}
        q, k, v = mixer_parts.project_qkv(
            x, num_heads=H, num_kv_heads=kv, head_k_dim=dk, head_v_dim=dv,
            use_short_conv=self.use_short_conv, conv_size=self.conv_size, runs=runs, cache=cache,
            new_cache=new_cache, std=self.std, dtype=self.dtype, param_dtype=self.param_dtype)
        q = common.feature_map(q.reshape(B, T, H, dk), self.feature_map)
        k = common.feature_map(k.reshape(B, T, kv, dk), self.feature_map)
        v = jax.nn.silu(v.reshape(B, T, kv, dv))
        s, g, z_last = self._gates(x, runs, cache, kv, slots)
        if z_last is not None:
            new_cache["z"] = z_last

        state = None if cache is None else (cache["hk"], cache["hv"])
        if mode == "decode" and T == 1:
            o, state = ops.gated_slot_attention_step(
                q[:, 0], k[:, 0], v[:, 0], s[:, 0], g[:, 0], state, scale=self.scale,
                slot_activation=self.slot_nonlinearity)
            o = o[:, None]
        else:
            o, state = ops.gated_slot_attention(
                q, k, v, s, g, scale=self.scale, initial_state=state,
                return_final_state=mode != "train", segment_ids=segment_ids, impl=self.impl,
                chunk_size=self.chunk_size, slot_activation=self.slot_nonlinearity,
                recompute_states=self.recompute_states and mode == "train")
        # GSA: silu before a norm over all heads' values, no output gate (the paper's layer).
        y = mixer_parts.output_projection(
            jax.nn.silu(o), x, hidden_size=self.hidden_size, std=self.std, out_std=self.out_std,
            norm="all_heads", norm_eps=self.norm_eps, elementwise_affine=self.elementwise_affine,
            dtype=self.dtype, param_dtype=self.param_dtype)
        if mode != "train":
            new_cache["hk"], new_cache["hv"] = state
        return mixer_parts.mixer_result(y, mode, new_cache)
