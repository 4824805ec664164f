"""gsa_jax.ops.fla_triton: the peer's (fla 0.6.0) chunked GSA Triton kernels launched from JAX.

On a CPU two things can be checked, each in a fresh subprocess (tests/fla_triton_check.py):
- the wiring, by running fla's kernels in Triton's interpreter: forward and gradients against
  the float64 recurrence, at shapes that exercise the partial last chunk, grouped query heads,
  several key blocks (K = 128: the gradient kernel's block sums) and several slot blocks
  (M = 128), in float32 and float16 (mixed precision: fla keeps some buffers in float32);
- the GPU path, by lowering forward + backward for CUDA through jax_triton with jaxlib's
  runtime calls recorded: every launch must compile for sm_90.
On a CUDA GPU (skipped elsewhere) the launched kernels are checked against the float64
recurrence too, bfloat16 included (GPU_CASES); experiments/bench_kernels.py (`--impls ...
peer_jt`) times them and checks them against the f32 chunk form. The interpreter mishandles
bfloat16 blocks in tl.dot (Triton 3.9: it multiplies their raw bit patterns), so bfloat16 is
checked on the GPU only.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import jax.numpy as jnp
import pytest

from gsa_jax.ops import fla_triton

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _run(args, interpret: bool, timeout: int = 900, env=None, platform="cpu") -> list[dict]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]),
               **(env or {}))
    env.pop("TRITON_INTERPRET", None)
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    env["JAX_PLATFORMS"] = platform
    done = subprocess.run([sys.executable, os.path.join(HERE, "fla_triton_check.py"), *args],
                          env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-4000:]
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def _need(*modules):
    # find_spec, not importorskip: jax_triton's import raises ImportError without a GPU jaxlib.
    for m in modules:
        if importlib.util.find_spec(m) is None:
            pytest.skip(f"{m} is not installed (the `reference` extra has it)")


@pytest.mark.slow
@pytest.mark.reference
@pytest.mark.parametrize("dims,dtype,tol", [
    ((1, 100, 4, 2, 32, 16, 16), "float32", 1e-5),    # partial last chunk, grouped heads
    ((1, 70, 2, 2, 128, 32, 128), "float32", 1e-5),   # two key blocks, two slot blocks
    ((1, 100, 2, 2, 32, 32, 16), "float16", 3e-3),
    ((1, 150, 2, 2, 32, 16, 16, 0, 30, 101, 150), "float32", 1e-5),  # packed: 3 sequences
])
def test_interpreted_fla_kernels_match_the_float64_recurrence(dims, dtype, tol):
    _need("torch", "triton", "fla")
    dims, cu_seqlens = dims[:7], dims[7:]
    (result,) = _run(["interpret", *map(str, dims), dtype, *map(str, cu_seqlens)],
                     interpret=True)
    for name, err in result["rel_err"].items():
        assert err < tol, (name, result)
    assert result["o_dtype"] == dtype
    assert result["grad_dtypes"] == [dtype] * 5


# Tolerances about 2.5x the errors measured on an H100 (results/fla_triton_gpu_h100.md:
# fp32 <= 1.6e-3, the dots run in tf32; bf16 <= 5.3e-3).
GPU_CASES = [
    ((2, 1000, 4, 2, 128, 128, 64), "float32", 4e-3),
    ((2, 1000, 4, 2, 128, 128, 64), "bfloat16", 1.3e-2),
    ((1, 700, 2, 2, 64, 64, 128), "bfloat16", 1.3e-2),    # two slot blocks
    ((1, 2048, 2, 2, 128, 128, 64, 0, 500, 1300, 2048), "bfloat16", 1.3e-2),  # packed row
]


@pytest.mark.parametrize("dims,dtype,tol", GPU_CASES)
def test_fla_kernels_launched_on_the_gpu_match_the_float64_recurrence(dims, dtype, tol):
    """The launch path CI cannot run: jax_triton compiles and launches fla's kernels on a GPU."""
    import jax
    if jax.default_backend() != "gpu":
        pytest.skip("needs a CUDA GPU")
    _need("torch", "triton", "fla", "jax_triton")
    dims, cu_seqlens = dims[:7], dims[7:]
    (result,) = _run(["gpu", *map(str, dims), dtype, *map(str, cu_seqlens)],
                     interpret=False, platform="cuda")
    for name, err in result["rel_err"].items():
        assert err < tol, (name, result)
    assert result["grad_dtypes"] == [dtype] * 5


@pytest.mark.slow
@pytest.mark.reference
def test_gpu_path_lowers_and_every_launch_compiles_for_sm90():
    _need("torch", "triton", "fla", "jax_triton")
    B, T, H, K, V, M = 2, 192, 4, 128, 128, 64
    lines = _run(["lower", *map(str, (B, T, H, K, V, M))], interpret=False,
                 env={"TRITON_CACHE_DIR": "/tmp/gsa-triton-cache"})
    launches = [x for x in lines if "kernel" in x]
    # jax_triton clears TRITON_CACHE_DIR when imported; ours puts it back for other users
    assert lines[-1] == {"TRITON_CACHE_DIR": "/tmp/gsa-triton-cache"}
    names = [x["kernel"] for x in launches]
    # Forward: cumsum, states, inter, intra, softmax, states, A (2), output; backward: the rest.
    for kernel in ("cumsum", "fwd_h", "gsa_fwd_inter", "gsa_fwd_intra", "softmax_fwd",
                   "gla_A_inter", "gla_A_intra", "gla_o", "bwd_dh", "gla_bwd_dv",
                   "gla_bwd_dA", "gla_bwd_intra", "gla_bwd_inter", "softmax_bwd",
                   "gsa_bwd_dA", "gsa_bwd_dqkvg", "gsa_bwd_intra_dvg"):
        assert kernel in names, (kernel, names)
    assert all(x["ptx"] for x in launches), [x["kernel"] for x in launches if not x["ptx"]]
    assert all(x["shared"] <= 227 * 1024 for x in launches)
    NT = -(-T // 64)
    by_name = {x["kernel"]: x for x in launches}
    # Grids as fla's Python code sets them (B*H programs along y for the chunk kernels).
    assert by_name["softmax_fwd"]["grid"] == [B * T * H, 1, 1]
    assert by_name["gsa_fwd_inter"]["grid"] == [NT, B * H, 1]          # M = 64: one BV block
    assert by_name["gla_A_inter"]["grid"] == [NT, 16, B * H]
    assert by_name["gsa_bwd_dqkvg"]["grid"] == [2 * NT, B * H, 1]      # K = 128: two BK blocks
    # q, k, h, g and the two packed-row index arrays, then the scalars (scale, T), then o, A.
    inter = by_name["gsa_fwd_inter"]["params"]
    assert inter == ["array"] * 6 + ["scalar"] * 2 + ["array"] * 2, inter


@pytest.mark.slow
@pytest.mark.reference
def test_gpu_path_of_packed_rows_lowers_with_chunks_counted_per_sequence():
    _need("torch", "triton", "fla", "jax_triton")
    T, H, K, V, M = 300, 2, 64, 64, 32
    cu = [0, 100, 130, 300]            # chunks: 2 + 1 + 3 = 6, where one row of 300 has 5
    launches = _run(["lower", "1", *map(str, (T, H, K, V, M)), *map(str, cu)], interpret=False)
    launches = [x for x in launches if "kernel" in x]
    by_name = {x["kernel"]: x for x in launches}
    assert all(x["ptx"] for x in launches)
    assert by_name["gsa_fwd_inter"]["grid"] == [6, H, 1]
    assert by_name["gla_A_intra"]["grid"] == [6, 4, H]
    assert by_name["fwd_h"]["grid"] == [3 * H, 1, 1]     # one state walk per sequence and head


def _args(B=1, T=8, HQ=2, H=2, K=4, V=4, M=4):
    def z(*s):
        return jnp.zeros(s, jnp.float32)
    return z(B, T, HQ, K), z(B, T, H, K), z(B, T, H, V), z(B, T, H, M), z(B, T, H, M)


@pytest.mark.parametrize("change,match", [
    (lambda a: (a[0][..., :3],) + a[1:], "inconsistent shapes"),
    (lambda a: a[:3] + (a[3][:, :4],) + a[4:], "inconsistent shapes"),
    (lambda a: (a[0][0],) + a[1:], r"must be \[B, T, H, D\]"),
    (lambda a: _args(HQ=3, H=2), "not a multiple"),
    (lambda a: _args(M=512), "M = 512 > 256"),
    (lambda a: _args(T=0), "T = 0"),
])
def test_bad_inputs_are_refused_before_any_kernel(change, match):
    with pytest.raises(ValueError, match=match):
        fla_triton.chunk_gsa(*change(_args()), launch="interpret")


@pytest.mark.parametrize("B,cu,match", [
    (2, [0, 3, 8], "need B = 1"),
    (1, [0, 3, 7], "from 0 to T = 8"),
    (1, [0, 5, 5, 8], "rise strictly"),
    (1, [[0, 8]], "N \\+ 1 >= 2 integers"),
    (1, [0.0, 8.0], "N \\+ 1 >= 2 integers"),
])
def test_bad_cu_seqlens_are_refused(B, cu, match):
    with pytest.raises(ValueError, match=match):
        fla_triton.chunk_gsa(*_args(B=B), cu_seqlens=cu, launch="interpret")


def test_bad_launch_and_config_sites_are_refused():
    with pytest.raises(ValueError, match="launch must be"):
        fla_triton.chunk_gsa(*_args(), launch="cuda")
    with pytest.raises(ValueError, match="unknown launch sites"):
        fla_triton.chunk_gsa(*_args(), launch="interpret", configs={"gla_out": {"BV": 32}})


def test_interpret_launch_without_the_interpreter_says_how(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        fla_triton.launch_interpret(None, (1,), [jnp.zeros(2)], [jnp.zeros(2)])


def test_available_says_why_not_on_a_cpu():
    ok, why = fla_triton.available()
    assert not ok and "GPU" in why


@pytest.mark.reference
def test_tuned_configs_reads_each_sites_pick_from_flas_autotuner_caches():
    """Plant one pick per site in fla's autotuner caches under the key fla's code would build
    there (its key values, then dtypes), plus a decoy at another head dim; each site must get
    its own pick back and no decoy."""
    _need("torch", "triton", "fla")
    import importlib

    import triton
    from triton.runtime.autotuner import Autotuner, Heuristics

    B, H, K, V, M = 2, 4, 128, 96, 64
    sites = fla_triton._autotune_sites(B, H, K, V, M)
    planted, saved = {}, {}
    try:
        for i, (site, (module, name, want)) in enumerate(sites.items()):
            tuner = getattr(importlib.import_module(module), name)
            while isinstance(tuner, Heuristics):
                tuner = tuner.fn
            assert isinstance(tuner, Autotuner), site
            saved.setdefault(id(tuner), (tuner, dict(tuner.cache)))
            key = tuple(want[k] for k in tuner.keys) + ("torch.bfloat16",)
            decoy = tuple((v + 1 if isinstance(v, int) and not isinstance(v, bool) else v)
                          for v in key)
            tuner.cache[decoy] = triton.Config({"BK": 16}, num_warps=1, num_stages=1)
            picked = triton.Config({"BK": 32 << i % 2}, num_warps=2 + i % 3,
                                   num_stages=2 + i % 2)
            tuner.cache[key] = picked
            planted[site] = picked
        got = fla_triton.tuned_configs(B, H, K, V, M)
    finally:
        for tuner, cache in saved.values():
            tuner.cache.clear()
            tuner.cache.update(cache)
    assert set(got) == set(sites)
    for site, config in planted.items():
        assert got[site]["num_warps"] == config.num_warps, site
        assert got[site]["num_stages"] == config.num_stages, site
        assert got[site].get("BK") == config.kwargs.get("BK"), site
