"""Subprocess side of tests/test_fla_triton.py (each mode needs a fresh interpreter).

    python tests/fla_triton_check.py interpret B T HQ H K V M DTYPE [CU_SEQLENS...]
        TRITON_INTERPRET=1 must be set. fla's kernels run in Triton's interpreter through
        `gsa_jax.ops.fla_triton` (launch="interpret"; with CU_SEQLENS one packed row of those
        sequences); prints one JSON line with the relative errors of o (against the float64
        recurrence of tests/reference.py) and of dq, dk, dv, ds, dg (against the float64
        recurrent form's gradients, which test_ops_gradients.py checks against central
        differences: those would be too slow here), and the dtypes.

    python tests/fla_triton_check.py gpu B T HQ H K V M DTYPE [CU_SEQLENS...]
        The same comparison with the kernels compiled and launched on a GPU through jax_triton
        (launch="jax_triton"); needs a CUDA GPU, jax-triton and fla (the `triton` extra).

    python tests/fla_triton_check.py lower B T H K V M [CU_SEQLENS...]
        The GPU path without a GPU: jaxlib's Triton runtime calls are replaced by recorders, then
        `jax.export` lowers forward + backward for CUDA, which runs jax_triton's own lowering:
        every launch is compiled by Triton for sm_90 with the argument types JAX passes. Prints
        one JSON line per launch (kernel name, grid, warps, shared memory, parameter kinds).
"""

from __future__ import annotations

import json
import os
import sys
import types

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def _inputs(B, T, HQ, H, K, V, M, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, T, HQ, K))
    k = rng.standard_normal((B, T, H, K))
    v = rng.standard_normal((B, T, H, V))
    g = -np.log1p(np.exp(-rng.standard_normal((B, T, H, M)))) / 4   # logsigmoid / 4
    s = 1.0 - np.exp(g)
    return q, k, v, s, g, rng.standard_normal((B, T, HQ, V))


def compare_with_float64(B, T, HQ, H, K, V, M, dtype, cu_seqlens=None, launch="interpret"):
    import jax
    import jax.numpy as jnp
    jax.config.update("jax_enable_x64", True)
    import reference
    from gsa_jax.ops import fla_triton

    q, k, v, s, g, cot = _inputs(B, T, HQ, H, K, V, M)
    args = [jnp.asarray(x, dtype) for x in (q, k, v, s, g)]

    seg = None
    if cu_seqlens is not None:   # the same packing as our segment ids
        seg = np.repeat(np.arange(len(cu_seqlens) - 1), np.diff(cu_seqlens))[None]

    def loss(*a):
        o = fla_triton.chunk_gsa(*a, launch=launch, cu_seqlens=cu_seqlens)
        return jnp.sum(o.astype(jnp.float64) * cot)

    o = fla_triton.chunk_gsa(*args, launch=launch, cu_seqlens=cu_seqlens)
    grads = jax.grad(loss, argnums=(0, 1, 2, 3, 4))(*args)
    ref = reference.gsa_reference(q, k, v, s, g, segment_ids=seg)
    ref = ref[0] if isinstance(ref, tuple) else ref

    def ref_loss(*a):
        from gsa_jax.ops import gated_slot_attention
        return jnp.sum(gated_slot_attention(*a, impl="recurrent", segment_ids=seg)[0] * cot)

    ref_grads = jax.grad(ref_loss, argnums=(0, 1, 2, 3, 4))(*(jnp.asarray(x) for x in
                                                             (q, k, v, s, g)))

    def rel(a, b):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        return float(np.linalg.norm(a - b) / np.linalg.norm(b))

    errs = {"o": rel(o, ref)}
    errs.update({n: rel(a, b) for n, a, b in zip(("dq", "dk", "dv", "ds", "dg"), grads, ref_grads)})
    print(json.dumps({"rel_err": errs, "o_dtype": str(o.dtype),
                      "grad_dtypes": [str(x.dtype) for x in grads]}))


def lower(B, T, H, K, V, M, cu_seqlens=None):
    launches = []

    class Call:
        def __init__(self, kernel, gx, gy, gz, params):
            launches.append({"kernel": kernel.name, "grid": [gx, gy, gz],
                             "num_warps": kernel.num_warps, "shared": kernel.shared,
                             "params": [p[0] for p in params], "ptx": kernel.ptx_ok})

        def to_proto(self, name, metadata):
            return b"recorded"

    def kernel(name, num_warps, num_ctas, shared, binary, ttir, cc):
        ok = isinstance(binary, str) and ".target sm_90" in binary
        return types.SimpleNamespace(name=name, num_warps=num_warps, shared=shared, ptx_ok=ok)

    from jax._src.lib import gpu_triton
    recorders = dict(TritonKernelCall=Call, TritonKernel=kernel,
                     TritonAutotunedKernelCall=None,
                     create_array_parameter=lambda zeroed, align: ("array", zeroed, align),
                     create_scalar_parameter=lambda value, dtype: ("scalar", value, dtype),
                     get_compute_capability=lambda device: 90,
                     get_serialized_metadata=lambda *a: b"")
    for name, value in recorders.items():
        setattr(gpu_triton, name, value)

    import jax
    import jax.numpy as jnp
    from gsa_jax.ops import fla_triton

    def loss(*a):
        o = fla_triton.chunk_gsa(*a, launch="jax_triton", cu_seqlens=cu_seqlens)
        return jnp.sum(o.astype(jnp.float32))

    shapes = [(B, T, H, K), (B, T, H, K), (B, T, H, V), (B, T, H, M), (B, T, H, M)]
    args = [jax.ShapeDtypeStruct(s, jnp.bfloat16) for s in shapes]
    jax.export.export(
        jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4))), platforms=["cuda"],
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("triton_kernel_call")],
    )(*args)
    for launch in launches:
        print(json.dumps(launch))
    print(json.dumps({"TRITON_CACHE_DIR": os.environ.get("TRITON_CACHE_DIR")}))


if __name__ == "__main__":
    mode, *rest = sys.argv[1:]
    if mode in ("interpret", "gpu"):
        dims, dtype, cu = rest[:7], rest[7], rest[8:]
        compare_with_float64(*map(int, dims), dtype, [int(c) for c in cu] if cu else None,
                  launch="interpret" if mode == "interpret" else "jax_triton")
    elif mode == "lower":
        lower(*map(int, rest[:6]), [int(c) for c in rest[6:]] or None)
    else:
        raise SystemExit(f"unknown mode {mode}")
