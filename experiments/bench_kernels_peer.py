"""The peer of experiments/bench_kernels.py: flash-linear-attention's `fla.ops.gsa.chunk_gsa`
(PyTorch/Triton) timed on our inputs with triton's do_bench, and its memory from
torch.cuda.max_memory_allocated. torch, triton and fla are imported inside the functions.
"""

from __future__ import annotations

import glob
import os
import shutil
import tarfile
import tempfile
import time

import numpy as np


def peer_available():
    """Whether torch with a CUDA device and fla's `chunk_gsa` import (a note when not)."""
    try:
        import torch  # noqa: F401
        from fla.ops.gsa import chunk_gsa  # noqa: F401
        return torch.cuda.is_available()
    except Exception as e:  # noqa: BLE001
        print(f"peer unavailable: {type(e).__name__}: {e}")
        return False


def use_tune_cache(seed_dir=None):
    """Point Triton at a fresh on-disk cache that keeps autotuning results
    (TRITON_CACHE_AUTOTUNING=1), seeded with the `*.autotune.json` files of `seed_dir` (the
    layout Triton writes: <hash>/<kernel>.autotune.json). The peer autotunes every kernel in
    every new process (minutes per shape); a hit skips the timing of that kernel's configs.
    Must run before fla is imported: its autotuners read the setting when they are built.
    Returns the cache directory."""
    cache = tempfile.mkdtemp(prefix="peer_triton_cache_")
    seeded = 0
    if seed_dir and os.path.isdir(seed_dir):
        for f in glob.glob(os.path.join(seed_dir, "*", "*.autotune.json")):
            dest = os.path.join(cache, os.path.relpath(f, seed_dir))
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            shutil.copyfile(f, dest)
            seeded += 1
    os.environ["TRITON_CACHE_DIR"] = cache
    os.environ["TRITON_CACHE_AUTOTUNING"] = "1"
    print(f"peer autotune cache {cache}: {seeded} results seeded from {seed_dir}")
    return cache


def save_tune_cache(cache, dest_tgz):
    """Write the autotuning results of `cache` (and nothing else: the compiled kernels are
    ~18 MB and rebuild fast) to `dest_tgz`, paths relative to the cache; returns their count.
    Unpacked into the seed directory of `use_tune_cache`, they serve the next process."""
    files = sorted(glob.glob(os.path.join(cache, "*", "*.autotune.json")))
    with tarfile.open(dest_tgz, "w:gz") as tar:
        for f in files:
            tar.add(f, arcname=os.path.relpath(f, cache))
    return len(files)


def cu_seqlens_of(segment_ids):
    """fla's cu_seqlens (N + 1 offsets) of the documents in row 0 of [B, T] segment ids."""
    ids = np.asarray(segment_ids[0])
    starts = np.flatnonzero(np.diff(ids, prepend=ids[0] - 1))
    return np.append(starts, ids.shape[0]).astype(np.int32)


def bench_peer(inputs, segment_ids, dtype_name):
    """Forward and forward+backward times (median) and memory of the peer's `chunk_gsa` on the
    same (q, k, v, s, g) as ours (float32 JAX arrays, cast to `dtype_name` in torch); returns
    (its row, its output o as a NumPy array)."""
    import torch
    import triton
    from fla.ops.gsa import chunk_gsa

    args = [torch.from_numpy(np.asarray(x, np.float32)).cuda().to(
        getattr(torch, dtype_name)) for x in inputs]
    for a in args:
        a.requires_grad_(True)
    q, k, v, s, g = args
    do = torch.randn_like(v)
    scale = q.shape[-1] ** -0.5
    kw = {}
    if segment_ids is not None:  # packed documents: the peer takes their offsets (batch 1 only)
        kw["cu_seqlens"] = torch.tensor(cu_seqlens_of(segment_ids), dtype=torch.int32,
                                        device="cuda")

    def fwd():
        return chunk_gsa(q, k, v, s, g, scale=scale, **kw)[0]

    def fwd_bwd():
        o = fwd()
        torch.autograd.grad(o, (q, k, v, s, g), do)

    t0 = time.time()
    fwd_bwd()  # autotunes every kernel for this shape
    torch.cuda.synchronize()
    tune_s = time.time() - t0
    # The forward is timed before and after the forward+backward and the faster median kept
    # (the one that favours the peer): on an H100 the first shape after a long autotune once
    # gave a forward of 4.0 ms against 1.5 ms re-timed (results/bench_kernels_h100d.md).
    t_fwd1 = triton.testing.do_bench(fwd, warmup=100, rep=500, return_mode="median") * 1e-3
    t_fb = triton.testing.do_bench(fwd_bwd, warmup=100, rep=500, return_mode="median") * 1e-3
    t_fwd2 = triton.testing.do_bench(fwd, warmup=100, rep=500, return_mode="median") * 1e-3
    t_fwd = min(t_fwd1, t_fwd2)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fwd_bwd()
    torch.cuda.synchronize()
    mem = torch.cuda.max_memory_allocated()
    o = fwd().detach().float().cpu().numpy()
    return {"fwd_ms": t_fwd * 1e3, "fwd_bwd_ms": t_fb * 1e3, "mem_bytes": int(mem),
            "fwd_ms_both": [round(t_fwd1 * 1e3, 4), round(t_fwd2 * 1e3, 4)],
            "autotune_s": round(tune_s, 1)}, o

