"""Pieces shared by the Pallas kernels: matmuls with a fixed operand dtype, chunk masks."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental.pallas import triton as plgpu


def compiler_params(num_warps: int, num_stages: int):
    return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)


@dataclasses.dataclass(frozen=True)
class Dot:
    """2-D matmuls with float32 accumulation.

    Operands are cast to the inputs' dtype: bf16/f16 inputs run on the tensor cores; float32
    inputs use three-pass TF32 on the GPU (close to float32 accuracy) and exact float32 when
    interpreted on the CPU.
    """

    dtype: Any
    interpret: bool = False

    def _dot(self, a, b, contract):
        dtype = jnp.dtype(self.dtype)
        if dtype == jnp.float32:
            precision = (lax.Precision.HIGHEST if self.interpret
                         else lax.DotAlgorithmPreset.TF32_TF32_F32_X3)
        else:
            precision = None
        return lax.dot_general(a.astype(dtype), b.astype(dtype), (contract, ((), ())),
                               precision=precision, preferred_element_type=jnp.float32)

    def nn(self, a, b):  # a @ b
        return self._dot(a, b, ((1,), (0,)))

    def nt(self, a, b):  # a @ bᵀ
        return self._dot(a, b, ((1,), (1,)))

    def tn(self, a, b):  # aᵀ @ b
        return self._dot(a, b, ((0,), (0,)))


def causal_mask(C: int):
    rows = lax.broadcasted_iota(jnp.int32, (C, C), 0)
    cols = lax.broadcasted_iota(jnp.int32, (C, C), 1)
    return rows >= cols


@dataclasses.dataclass
class ChunkMasks:
    """Masks of one chunk. Without segments the vectors are all-ones (Python floats 1.0)."""

    intra: jax.Array  # [C, C] bool: causal and same segment
    from_state: Any  # [C] f32: 1 where the entering state reaches position t
    into: Any  # [C] f32: 1 where position i writes into the leaving state
    survive: Any  # scalar f32: 1 if the entering state survives the whole chunk
    run_last: jax.Array  # scalar int32: segment run of the chunk's last position


def chunk_masks(runs_ref: Optional[Any], rows, run_prev, causal) -> ChunkMasks:
    """Masks of the chunk at `rows`; `run_prev` is the run of the position before it."""
    C = causal.shape[0]
    if runs_ref is None:
        ones = jnp.ones((C,), jnp.float32)
        return ChunkMasks(causal, ones, ones, jnp.float32(1.0), jnp.int32(0))
    r = runs_ref[rows]
    run_last = jnp.max(r)  # runs never decrease along time
    same = r[:, None] == r[None, :]
    return ChunkMasks(
        intra=jnp.logical_and(causal, same),
        from_state=(r == run_prev).astype(jnp.float32),
        into=(r == run_last).astype(jnp.float32),
        survive=(run_last == run_prev).astype(jnp.float32),
        run_last=run_last,
    )
