"""The Pallas form of GLA and GSA: the kernels of `pallas_kernels`, wired for the ops.

On a TPU backend impl="pallas" runs the TPU (Mosaic) kernels (pallas_kernels/tpu_gla.py), on
every other backend the GPU (Triton) kernels (pallas_kernels/gla.py): compiled on a GPU, in
Pallas' interpreter (slow; for tests) on a CPU. Any gate is safe: each chunk whose accumulated
gate is stronger than the kernels' fast path accepts takes an exact (slower) path inside the
kernel.

Under a device mesh (`jax.set_mesh`, as training traces the model) each device runs the kernels
on its own slice of the batch and of the heads (`per_shard`): XLA cannot split a Pallas kernel,
a custom call, and would otherwise gather the whole batch onto every device.
"""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

KERNEL_DIMS = (16, 32, 64, 128, 256)
KERNEL_CHUNKS = (16, 32, 64, 128)
# The mesh axes of gsa_jax.sharding (checked equal in the tests; ops import nothing above them):
# activations split their batch over BATCH_AXES and their heads over HEAD_AXIS.
BATCH_AXES = ("data", "fsdp")
HEAD_AXIS = "tensor"


def kernel_supports(*dims: int, chunk_size: int, wide: bool = True) -> bool:
    """True where the kernels handle these feature dims and this chunk size: dims in
    KERNEL_DIMS, or with `wide` multiples of 128 too (wider keys run in slices, wider values in
    value blocks). impl="auto" passes wide=True on a GPU only (ops.gla.resolve_impl: timed in a
    1.3B train step there, not yet on a TPU)."""
    return (all(d in KERNEL_DIMS or (wide and d % 128 == 0) for d in dims)
            and chunk_size in KERNEL_CHUNKS)


def backend() -> str:
    """The backend the kernels are chosen for (the one check; tests fake a TPU here)."""
    return jax.default_backend()


def on_gpu() -> bool:
    return backend() == "gpu"


def on_tpu() -> bool:
    return backend() == "tpu"


def per_shard(fn, B: int, Hkv: int, with_runs: bool):
    """fn(q, k, v, g, state[, runs]) -> (o, state), run by every device on its slice of the
    batch (over BATCH_AXES) and heads (over HEAD_AXIS) of the current mesh; fn itself without a
    mesh of several devices. Each (batch, head) is independent, so the slices' results are the
    whole result. An axis that does not divide B (or the kv heads, and with them the query
    heads of each group) is left whole.

    Layouts: q, k, v, g, o [B, T, heads, D]; state [B, H, K, V]; runs [B, T].
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return fn
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
    batch = tuple(a for a in BATCH_AXES if sizes.get(a, 1) > 1)
    if B % math.prod(sizes[a] for a in batch):
        batch = ()
    heads = HEAD_AXIS if sizes.get(HEAD_AXIS, 1) > 1 and Hkv % sizes[HEAD_AXIS] == 0 else None
    if not batch and heads is None:
        return fn
    return shard_mapped(fn, batch, heads, with_runs)


def shard_mapped(fn, batch: tuple[str, ...], heads: Optional[str], with_runs: bool):
    """fn under `jax.shard_map` over the current mesh: the batch dim split over the mesh axes
    `batch` (none: whole), the head dim over `heads` (None: whole). per_shard's construction,
    public so the GPU check (experiments/kernel_shard_check.py) runs the very same wrapper on
    a one-device mesh."""
    b = batch or None
    seq, state = P(b, None, heads, None), P(b, heads, None, None)
    in_specs = (seq, seq, seq, seq, state) + ((P(b, None),) if with_runs else ())
    return jax.shard_map(fn, in_specs=in_specs, out_specs=(seq, state), check_vma=False)


def gla_pallas(q, k, v, g, initial_state, runs: Optional[jax.Array], *, gate_axis: str,
               scale: float, chunk_size: int, out_dtype=None, recompute_states: bool = False,
               interpret: Optional[bool] = None, gates_cumulative: bool = False):
    """GLA by the kernels of this backend. Args as `pallas_kernels.gla.gla_chunk_pallas`
    (initial_state per query head, [B, H, K, V]; gates_cumulative: the GPU kernels only);
    returns (o [B, T, H, V], final state [B, H, K, V] f32). interpret=None: interpreted
    unless jax really runs on the kernels' backend (so a faked TPU runs the TPU kernels in
    TPU interpret mode)."""
    if on_tpu() and gates_cumulative:
        raise ValueError("gates_cumulative: the TPU kernels read the log gates themselves")
    if on_tpu():
        from pallas_kernels.tpu_gla import gla_chunk_pallas_tpu as kernels
        platform = "tpu"
    else:
        from pallas_kernels.gla import gla_chunk_pallas as kernels
        platform = "gpu"
    out_dtype = jnp.dtype(out_dtype or q.dtype)
    if q.shape[1] == 0:  # no chunk to launch: an empty output, the state unchanged
        return (jnp.zeros(q.shape[:3] + v.shape[3:], out_dtype),
                initial_state.astype(jnp.float32))
    if interpret is None:
        interpret = jax.default_backend() != platform

    extra = dict(gates_cumulative=True) if gates_cumulative else {}

    def run(q, k, v, g, state, runs=None):
        return kernels(q, k, v, g, state, runs, key_gated=gate_axis == "key", scale=scale,
                       chunk_size=chunk_size, out_dtype=out_dtype,
                       recompute_states=recompute_states, interpret=interpret, **extra)

    args = (q, k, v, g, initial_state) + (() if runs is None else (runs,))
    o, s = per_shard(run, q.shape[0], k.shape[2], runs is not None)(*args)
    return o.astype(out_dtype), s


def gsa_pallas(q, k, v, s, g, hk0, hv0, runs, *, scale: float, chunk_size: int,
               slot_activation_fn, recompute_states: bool = False,
               interpret: Optional[bool] = None):
    """GSA's two passes by the kernels; states per query head.

    Pass 1 writes z in float32 for the slot activation; p goes to pass 2 in q's dtype.
    (One kernel walk doing both passes was built and measured slower on an H200: forward
    0.695 / 0.827 ms against 0.476 / 0.668 at 8 x 2048 and 4 x 4096, M = 64; the walk
    spilled, experiments/results/bench_kernels_h200fgsa.md; removed after commit bddd0c0.)
    Under the GPU kernels' Tuning.cumulative_gates the log gates are summed inside each chunk
    once here for both passes (pallas_kernels.gla.gla_chunk_pallas, gates_cumulative).
    Returns (o [B, T, H, V] in q's dtype, Hk [B, H, K, M] f32, Hv [B, H, M, V] f32).
    """
    kw = dict(chunk_size=chunk_size, recompute_states=recompute_states, interpret=interpret)
    if not on_tpu():
        from pallas_kernels import chunk_math, gla
        if gla.current_tuning().cumulative_gates:
            g = chunk_math.chunk_cumsum(g, chunk_size)
            kw["gates_cumulative"] = True
    z, hk = gla_pallas(q, k, s, g, hk0, runs, gate_axis="value", scale=scale,
                       out_dtype=jnp.float32, **kw)
    p = slot_activation_fn(z).astype(q.dtype)
    o, hv = gla_pallas(p, s, v, g, hv0, runs, gate_axis="key", scale=1.0, out_dtype=q.dtype,
                       **kw)
    return o, hk, hv
