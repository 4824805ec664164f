"""Chunked gated linear attention on the GPU: the forward and backward kernels wired by custom_vjp.

`gla_chunk_pallas` is the kernel path only: it requires every chunk's accumulated gate to stay
within `MAX_CHUNK_DECAY` (see gla_fwd.py). `gsa_jax.ops.pallas` checks that and falls back to the
pure-JAX chunk form otherwise; call that, not this, unless you know your gates.

States for the backward pass: by default the forward kernel stores the state entering every chunk
(float32, [B, H, T/C · K, V]) and the backward kernel reads it. With `recompute_states=True` the
forward keeps nothing but its inputs and the backward runs the forward kernel again to rebuild the
states (the paper's "hidden state recomputation"): less memory held between the forward and the
backward pass, one more forward pass of time.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp

from pallas_kernels.gla_bwd import gla_bwd
from pallas_kernels.gla_fwd import MAX_CHUNK_DECAY, gla_fwd

__all__ = ["KernelConfig", "gla_chunk_pallas", "MAX_CHUNK_DECAY"]


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Static settings of one kernel call (hashable: they select the compiled kernel)."""

    key_gated: bool
    scale: float
    chunk_size: int = 64
    block_v: int = 64
    recompute_states: bool = False
    out_dtype: Any = None  # None: the dtype of q
    interpret: bool = False
    num_warps: int = 4
    num_stages: int = 2

    def launch(self):
        return dict(key_gated=self.key_gated, scale=self.scale, chunk_size=self.chunk_size,
                    block_v=self.block_v, interpret=self.interpret,
                    num_warps=self.num_warps, num_stages=self.num_stages)


def _sum_groups(x, groups: int):
    """[B, T, H, D] per query head -> [B, T, H / groups, D], summing each group."""
    if groups == 1:
        return x
    B, T, H, D = x.shape
    return x.reshape(B, T, H // groups, groups, D).sum(axis=3)


@functools.lru_cache(maxsize=None)
def _kernel_fn(cfg: KernelConfig):
    """The custom_vjp function of padded inputs for one static configuration."""

    def forward(q, k, v, g, s0, runs, save_states):
        out_dtype = cfg.out_dtype or q.dtype
        return gla_fwd(q, k, v, g, s0, runs, save_states=save_states, out_dtype=out_dtype,
                       **cfg.launch())

    @jax.custom_vjp
    def fn(q, k, v, g, s0, runs):
        o, sT = forward(q, k, v, g, s0, runs, save_states=False)
        return o, sT

    def fn_fwd(q, k, v, g, s0, runs):
        if cfg.recompute_states:
            o, sT = forward(q, k, v, g, s0, runs, save_states=False)
            states = None
        else:
            o, sT, states = forward(q, k, v, g, s0, runs, save_states=True)
        return (o, sT), (q, k, v, g, s0, runs, states)

    def fn_bwd(res, cotangents):
        q, k, v, g, s0, runs, states = res
        do, dsT = cotangents
        if states is None:
            _, _, states = forward(q, k, v, g, s0, runs, save_states=True)
        dq, dk, dv, dg, ds0 = gla_bwd(q, k, v, g, runs, states, do, dsT, **cfg.launch())
        groups = q.shape[2] // k.shape[2]
        dq = dq.sum(0)
        dk = _sum_groups(dk.sum(0), groups)
        dv = _sum_groups(dv, groups)
        dg = _sum_groups(dg.sum(0), groups)
        return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dg.astype(g.dtype),
                ds0.astype(s0.dtype), None)

    fn.defvjp(fn_fwd, fn_bwd)
    return fn


def gla_chunk_pallas(q, k, v, g, initial_state, runs: Optional[jax.Array], *, key_gated: bool,
                     scale: float, chunk_size: int = 64, block_v: Optional[int] = None,
                     recompute_states: bool = False, out_dtype=None, interpret: bool = False,
                     num_warps: int = 4, num_stages: int = 2):
    """GLA by the Pallas kernels; differentiable in every array argument.

    Args:
      q: [B, T, H, K]; k: [B, T, Hkv, K]; v: [B, T, Hkv, V]; g: [B, T, Hkv, K] (key_gated) or
        [B, T, Hkv, V]; initial_state: [B, H, K, V] (one per query head); runs: [B, T] int32
        contiguous-segment index (`gsa_jax.ops.common.segment_runs`) or None.
      K, V (and the gated dim) must be powers of two ≥ 16; chunk_size a power of two ≥ 16.
    Returns:
      (o [B, T, H, V] in out_dtype (default q's), final state [B, H, K, V] float32).
    """
    B, T = q.shape[:2]
    C = chunk_size
    Tp = -(-T // C) * C
    if Tp != T:  # zero k, v and g past the end leave the state untouched
        pad = ((0, 0), (0, Tp - T), (0, 0), (0, 0))
        q, k, v, g = (jnp.pad(x, pad) for x in (q, k, v, g))
        if runs is not None:
            runs = jnp.pad(runs, ((0, 0), (0, Tp - T)), mode="edge")
    if runs is not None:
        runs = runs.astype(jnp.int32)
    cfg = KernelConfig(key_gated=key_gated, scale=float(scale), chunk_size=C,
                       block_v=block_v or min(64, v.shape[-1]),
                       recompute_states=recompute_states,
                       out_dtype=None if out_dtype is None else jnp.dtype(out_dtype),
                       interpret=interpret, num_warps=num_warps, num_stages=num_stages)
    o, sT = _kernel_fn(cfg)(q, k, v, g, initial_state.astype(jnp.float32), runs)
    return o[:, :T], sT
