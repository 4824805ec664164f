"""Chunked gated linear attention on a TPU: the Pallas (Mosaic) kernels wired by custom_vjp.

Same semantics as the GPU kernels (pallas_kernels/gla.py): initial and final state, packed
segments, grouped heads, `recompute_states`, bf16/f32 inputs with float32 state and
accumulation, any gate strength (chunks past MAX_CHUNK_DECAY take the exact in-kernel path).

Kernels per call: the forward walks the chunks once (tpu_gla_fwd.py), writing the outputs and,
when a gradient will be wanted, the state entering every chunk ([B, H, N·W0, W1] in the
inputs' dtype); the backward walks them once in reverse (tpu_gla_bwd.py). With
`recompute_states=True` the forward keeps nothing but its inputs and the backward first reruns
the state-only walk (one matmul per chunk). Layouts, VMEM budget and cost: tpu_plan.py.

Verified: numerics in TPU interpret mode on the CPU and the Pallas-to-Mosaic lowering
(`jax.export` for platform "tpu"), tests/test_pallas_tpu.py. Not verified: Mosaic's own
compilation on a TPU and the speed there.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp

from pallas_kernels import chunk_math, common
from pallas_kernels.gla import sum_groups
from pallas_kernels.tpu_gla_bwd import backward as backward_kernel
from pallas_kernels.tpu_gla_fwd import forward
from pallas_kernels.tpu_plan import SCOPED_VMEM_BYTES, Plan

__all__ = ["gla_chunk_pallas_tpu", "make_plan", "relative_runs"]

f32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class _Config:
    """Static settings of one kernel call (hashable: they select the traced kernels)."""

    plan: Plan
    scale: float
    recompute_states: bool
    out_dtype: Any
    interpret: Any  # bool or pltpu.InterpretParams (tpu_gla_fwd.interpret_params)


def relative_runs(runs, C: int):
    """Segment runs [B, Tp] int -> (rel_col [B, Tp, 1], rel_row [B, N, 1, C]) float32: the run
    of each position minus the run of the position before its chunk (run 0, the initial
    state's, before the first chunk), so 0 exactly where the entering state flows on. Two
    layouts of the same values, so that the kernel reads a column and a row without a
    transpose."""
    B, Tp = runs.shape
    r = runs.reshape(B, Tp // C, C)
    before = jnp.concatenate([jnp.zeros((B, 1), r.dtype), r[:, :-1, -1]], axis=1)
    rel = (r - before[..., None]).astype(f32)
    return rel.reshape(B, Tp, 1), rel.reshape(B, Tp // C, 1, C)


@functools.lru_cache(maxsize=None)
def _kernel_fn(cfg: _Config):
    """The custom_vjp function of padded [B, Tp, heads, D] inputs, s0 in the state layout."""
    plan = cfg.plan
    kw = dict(scale=cfg.scale, interpret=cfg.interpret)

    def run_forward(q, k, v, g, s0, rel, keep_states):
        """(o, final state, chunk states or None)."""
        o, states, sT = forward(plan, *(plan.to_kernel(x) for x in (q, k, v, g)), s0, rel,
                                keep_states=keep_states, out_dtype=cfg.out_dtype, **kw)
        return plan.from_kernel(o, plan.V), sT, states

    def states(q, k, v, g, s0, rel):
        _, chunk_states, _ = forward(plan, None, *(plan.to_kernel(x) for x in (k, v, g)), s0,
                                     rel, with_output=False, keep_states=True, **kw)
        return chunk_states

    def backward(args, chunk_states, cotangents):
        q, k, v, g, s0, rel = args
        do, dsT = cotangents
        dq, dk, dv, dg, ds0 = backward_kernel(
            plan, *(plan.to_kernel(x) for x in (q, k, v, g)), rel, chunk_states,
            plan.to_kernel(do), dsT, **kw)
        dq, dk, dv, dg = (plan.from_kernel(x, x_in.shape[-1])
                          for x, x_in in zip((dq, dk, dv, dg), (q, k, v, g)))
        dk, dv, dg = (sum_groups(x, plan.group) for x in (dk, dv, dg))
        return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dg.astype(g.dtype),
                ds0, None)

    return common.keep_or_recompute_vjp(run_forward, states, backward,
                                        recompute_states=cfg.recompute_states)


def make_plan(q, k, v, *, key_gated: bool, chunk_size: int, out_dtype=None,
              sub_chunk=None) -> Plan:
    """The block plan of a call on [B, T, heads, D] inputs (T padded to the chunk size);
    sub_chunk: the sub-chunk tier's size (chunk_math.sub_chunk_for; None: 16 where it divides)."""
    B, T, H, K = q.shape
    C = chunk_size
    return Plan(B=B, Tp=-(-T // C) * C, H=H, Hkv=k.shape[2], K=K, V=v.shape[3], C=C,
                key_gated=key_gated, itemsize=jnp.dtype(q.dtype).itemsize,
                out_itemsize=jnp.dtype(out_dtype or q.dtype).itemsize,
                sub=chunk_math.sub_chunk_for(sub_chunk, C))


def gla_chunk_pallas_tpu(q, k, v, g, initial_state, runs: Optional[jax.Array], *,
                         key_gated: bool, scale: float, chunk_size: int = 64,
                         recompute_states: bool = False, out_dtype=None, interpret=False,
                         sub_chunk=None):
    """GLA by the TPU kernels; differentiable in every array argument.

    Args:
      q: [B, T, H, K]; k: [B, T, Hkv, K]; v: [B, T, Hkv, V]; g: [B, T, Hkv, K] (key_gated) or
        [B, T, Hkv, V]; initial_state: [B, H, K, V] (one per query head); runs: [B, T] int
        contiguous-segment index (`gsa_jax.ops.common.segment_runs`) or None.
      chunk_size: a multiple of 16 (bf16 tiling). K and V: multiples of 16, within the VMEM
        budget (tpu_plan.SCOPED_VMEM_BYTES).
      interpret: True runs the kernels in TPU interpret mode (on a CPU; tests), also a
        `pltpu.InterpretParams` (`tpu_gla_fwd.interpret_params`).
      sub_chunk: the sub-chunk tier's size for chunks whose gate decays a channel by more
        than chunk_math.MAX_CHUNK_DECAY (None: 16 where it divides the chunk; 0: the exact
        loop; chunk_math.sub_chunk_for).
    Returns:
      (o [B, T, H, V] in out_dtype (default q's), final state [B, H, K, V] float32).
    """
    plan = make_plan(q, k, v, key_gated=key_gated, chunk_size=chunk_size, out_dtype=out_dtype,
                     sub_chunk=sub_chunk)
    for name, size in (("chunk_size", plan.C), ("K", plan.K), ("V", plan.V)):
        if size % 16:
            raise ValueError(f"gla_chunk_pallas_tpu: {name} must be a multiple of 16 (TPU "
                             f"tiling of bf16 blocks), got {size}")
    need = plan.vmem_bytes("backward", segments=runs is not None)
    if need > SCOPED_VMEM_BYTES:
        raise ValueError(
            f"gla_chunk_pallas_tpu: a grid step would need about {need / 2**20:.1f} MiB of "
            f"VMEM (K={plan.K}, V={plan.V}, chunk_size={plan.C}), more than the "
            f"{SCOPED_VMEM_BYTES / 2**20:.0f} MiB default scoped limit of v4/v5e; use a "
            f"smaller chunk_size or impl='chunk'")
    T = q.shape[1]
    q, k, v, g, runs = common.pad_to_chunks(q, k, v, g, runs, plan.C)
    rel = None if runs is None else relative_runs(runs, plan.C)
    s0 = initial_state.astype(f32)
    if key_gated:  # the kernels keep the gated axis last: Sᵀ [V, K]
        s0 = s0.swapaxes(-1, -2)
    cfg = _Config(plan=plan, scale=float(scale), recompute_states=recompute_states,
                  out_dtype=None if out_dtype is None else jnp.dtype(out_dtype),
                  interpret=interpret)
    o, sT = _kernel_fn(cfg)(q, k, v, g, s0, rel)
    if key_gated:
        sT = sT.swapaxes(-1, -2)
    return o[:, :T], sT
