"""GPU kernel time vs gate strength: the kernels' paths for tiles past the chunk bound.

The Pallas kernels factor the intra-chunk decay through the chunk's midpoint while every gated
channel of a tile decays by at most MAX_CHUNK_DECAY (120, natural log) over the chunk; past it a
tile takes the sub-chunk tier (factored through each 16-step sub-chunk's midpoint, the default)
or, with Tuning.sub_chunk = 0 or a sub-chunk past the bound too, a loop over the chunk's
positions (pallas_kernels/chunk_math.py). Benchmarks draw mild
gates (g = logsigmoid(x) / 8: no tile past the bound); trained models do not (the MQAR GLA at
D = 64: 27-100% of tiles, results/gate_extremes_h200e64_gla64.md). Here the same compiled
forward and forward+backward of `gated_slot_attention` are timed on inputs whose gates are
g = logsigmoid(x) / s for a range of s, next to the share of (row, head, chunk) tiles past the
bound (experiments/gate_extremes.chunk_decays, the kernels' own predicate):

    python experiments/bench_gate_strength.py --tag h200            # GPU: pallas and chunk
    python experiments/bench_gate_strength.py --tag h200sub --impls pallas --sub-chunk 0 16 32
        # the kernels without (0: the exact loop) and with the sub-chunk tier (Tuning.sub_chunk;
        # the default, "auto", is 16 at chunk 64), same process
    python experiments/bench_gate_strength.py --smoke --tag cpu     # the script on a CPU

Medians of 7 rounds of 20 calls (bench_kernels.time_jax); ratios against the mildest gate of
the same impl in the same run.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from experiments import common  # noqa: E402
from experiments.bench_kernels import check, gsa_fn, loss_grad, make_inputs, time_jax  # noqa: E402
from experiments.gate_extremes import chunk_decays  # noqa: E402
from pallas_kernels.chunk_math import MAX_CHUNK_DECAY  # noqa: E402

SCALES = [8.0, 0.6, 0.55, 0.5, 0.25]   # g = logsigmoid(x) / s: mild ... every tile past
SHAPES = [(8, 2048, 16, 128, 64), (1, 16384, 16, 128, 64)]   # (B, T, H, K = V, M)


def _sub_chunk_arg(text: str):
    return None if text == "auto" else int(text)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tag", default=jax.default_backend())
    p.add_argument("--impls", nargs="+", default=["pallas", "chunk"])
    p.add_argument("--scales", type=float, nargs="+", default=SCALES)
    p.add_argument("--shapes", type=int, nargs="+", default=list(range(len(SHAPES))),
                   help="indices into SHAPES")
    p.add_argument("--chunk-size", type=int, default=64)
    p.add_argument("--sub-chunk", type=_sub_chunk_arg, nargs="+", default=[None],
                   help="Tuning.sub_chunk values to time the pallas kernels with (0: off, the "
                        "exact loop for tiles past the bound; auto: the default)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--check", type=float, nargs="*", default=None, metavar="SCALE",
                   help="also check the pallas kernels (each --sub-chunk) against the f32 chunk "
                        "form at these gate scales (bench_kernels.check; default 0.5 0.25)")
    p.add_argument("--smoke", action="store_true",
                   help="a tiny shape, the chunk form unless --impls is given (CPU)")
    p.add_argument("--out-dir", default=str(common.RESULTS_DIR))
    args = p.parse_args(argv)
    if args.check is not None and not args.check:
        args.check = [0.5, 0.25]
    args.shape_list = ([(1, 128, 2, 16, 16)] if args.smoke
                       else [SHAPES[i] for i in args.shapes])
    if args.smoke and args.impls == p.get_default("impls"):
        args.impls = ["chunk"]   # (--impls pallas: the kernels interpreted, slow)
    return args


def extreme_share(g, chunk: int) -> float:
    """Share of (row, chunk, head) tiles whose strongest slot decays past the bound."""
    return float(np.mean(np.asarray(chunk_decays(g.astype(jnp.float32), chunk))
                         > MAX_CHUNK_DECAY))


def bench(shape, impl, scales, dtype, chunk_size, reps, rounds, sub_chunk=None) -> list[dict]:
    """Rows (one per gate scale) of forward and forward+backward medians for one impl (the
    pallas kernels with Tuning.sub_chunk = sub_chunk, read when the jitted functions trace)."""
    from pallas_kernels import gla as pgla
    with pgla.tuning(sub_chunk=sub_chunk):
        return _bench(shape, impl, scales, dtype, chunk_size, reps, rounds,
                      pgla.sub_chunk_for(sub_chunk, chunk_size) if impl == "pallas" else 0)


def _bench(shape, impl, scales, dtype, chunk_size, reps, rounds, sub_chunk):
    f = gsa_fn(impl, chunk_size=chunk_size)
    fwd = jax.jit(f)
    inputs0 = make_inputs(shape, dtype)
    cot = jax.random.normal(jax.random.PRNGKey(9), f(*inputs0).shape, jnp.float32)
    fwd_bwd = jax.jit(loss_grad(f, cot))
    rows = []
    for s in scales:
        inputs = make_inputs(shape, dtype, gate_scale=s)
        g = inputs[4]
        t_f = time_jax(fwd, inputs, reps, rounds)
        t_fb = time_jax(fwd_bwd, inputs, reps, rounds)
        rows.append({"shape": list(shape), "impl": impl, "sub_chunk": sub_chunk,
                     "gate_scale": s,
                     "g_mean": float(jnp.mean(g.astype(jnp.float32))),
                     "extreme_tiles": extreme_share(g, chunk_size),
                     "fwd_ms": 1e3 * t_f, "fwd_bwd_ms": 1e3 * t_fb})
        print(f"  {shape} {impl} sub={sub_chunk} s={s:g}: extreme "
              f"{100 * rows[-1]['extreme_tiles']:.0f}%, "
              f"fwd {1e3 * t_f:.3f} ms, fwd+bwd {1e3 * t_fb:.3f} ms", flush=True)
    base = rows[0]
    for r in rows:
        r["fwd_ratio"] = r["fwd_ms"] / base["fwd_ms"]
        r["fwd_bwd_ratio"] = r["fwd_bwd_ms"] / base["fwd_bwd_ms"]
    return rows


def checked(shape, dtype, sub_chunk, scales) -> list[dict]:
    """bench_kernels.check (pallas vs the f32 chunk form, output and gradients) with
    Tuning.sub_chunk = sub_chunk at each gate scale, each with its share of tiles past the
    bound."""
    from pallas_kernels import gla as pgla
    with pgla.tuning(sub_chunk=sub_chunk):
        out = []
        for s in scales:
            g = make_inputs(shape, dtype, seed=1, gate_scale=s)[4]
            out.append({**check(shape, dtype, s), "gate_scale": s,
                        "sub_chunk": pgla.sub_chunk_for(sub_chunk, 64),   # check's chunk
                        "extreme_tiles": extreme_share(g, 64)})
        return out


def markdown(record: dict) -> str:
    lines = [f"# Kernel time vs gate strength ({record['tag']})", "",
             f"gated_slot_attention, {record['dtype']}, chunk {record['chunk_size']}; gates "
             f"g = logsigmoid(x) / s, x ~ N(0, 1); 'past the bound': share of (row, chunk, "
             f"head) tiles whose strongest slot decays by more than {MAX_CHUNK_DECAY:g} over the "
             f"chunk (no midpoint factoring: the kernels' sub-chunk tier, or with sub-chunk '-' "
             f"their exact loop). Ratios against the mildest gate, same impl, "
             f"same run.", "",
             "| B × T, H, K, M | impl | sub-chunk | s | mean g | past the bound | fwd ms | "
             "fwd+bwd ms | fwd / mild | fwd+bwd / mild |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in record["rows"]:
        B, T, H, K, M = r["shape"]
        sub = r.get("sub_chunk", 0) if r["impl"] == "pallas" else None
        lines.append(f"| {B} × {T}, {H}, {K}, {M} | {r['impl']} | "
                     f"{'-' if not sub else sub} | {r['gate_scale']:g} | "
                     f"{r['g_mean']:.2f} | {100 * r['extreme_tiles']:.0f}% | {r['fwd_ms']:.3f} | "
                     f"{r['fwd_bwd_ms']:.3f} | {r['fwd_ratio']:.2f}x | "
                     f"{r['fwd_bwd_ratio']:.2f}x |")
    if record.get("checks"):
        lines += ["", "Pallas against the float32 chunk form at sharp gates (relative errors; "
                  "bench_kernels.check):", "",
                  "| B × T, H, K, M | sub-chunk | s | past the bound | o | dq | dk | dv | ds | "
                  "dg | finite |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for c in record["checks"]:
            B, T, H, K, M = c["shape"][:5]
            err = c.get("rel_err")
            cells = (" | ".join(f"{err[n]:.1e}" for n in ("o", "dq", "dk", "dv", "ds", "dg"))
                     if err else f"{c.get('error')} | | | | |")
            lines.append(f"| {B} × {T}, {H}, {K}, {M} | {c['sub_chunk'] or '-'} | "
                         f"{c['gate_scale']:g} | {100 * c['extreme_tiles']:.0f}% | {cells} | "
                         f"{c.get('finite')} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    reps, rounds = (2, 2) if args.smoke else (20, 7)
    rows, checks = [], []
    for shape in args.shape_list:
        for impl in args.impls:
            for sub in (args.sub_chunk if impl == "pallas" else [None]):
                if impl == "pallas" and args.check:
                    checks += checked(shape, jnp.dtype(args.dtype), sub, args.check)
                rows += bench(shape, impl, args.scales, jnp.dtype(args.dtype), args.chunk_size,
                              reps, rounds, sub_chunk=sub)
    record = {"tag": args.tag, "dtype": args.dtype, "chunk_size": args.chunk_size,
              "rows": rows, "checks": checks, "elapsed_s": time.perf_counter() - t0}
    common.write_and_print(args.tag, "bench_gate_strength", record, markdown(record),
                           out_dir=args.out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
