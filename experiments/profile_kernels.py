"""Where the time of one gated_slot_attention call goes, kernel by kernel (jax.profiler).

bench_kernels times the whole forward and forward+backward; the targets it misses (the forward
against the peer at few (batch, head) programs, forward+backward against cuDNN attention at
T = 2048, the forward against its memory floor) need to know which kernel or XLA op to work on.
This script traces `calls` calls of the jitted forward and of the forward+backward at each
shape and sums the device time per op per call (experiments/profile_summary: the GPU's stream
lines; on a CPU the XLA runtime's op events, which only checks the script):

    python experiments/profile_kernels.py --tag h200                  # GPU: shapes 0 and 6
    python experiments/profile_kernels.py --tag h200sharp --gate-scale 0.5
    python experiments/profile_kernels.py --smoke --tag cpu           # the script on a CPU

Shapes are bench_kernels.ALL's indices (--shapes); inputs bench_kernels.make_inputs' (layer-like
gates unless --gate-scale). Results: results/profile_kernels_<tag>.{json,md}, per shape and
pass the ms per call of each op (top --top) and of each category.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from experiments import common, profile_summary  # noqa: E402
from experiments.bench_kernels import ALL, document_ids, gsa_fn, loss_grad, make_inputs  # noqa: E402,E501

SMOKE_SHAPE = (1, 128, 2, 16, 16)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tag", default=jax.default_backend())
    p.add_argument("--shapes", type=int, nargs="+", default=[0, 6],
                   help="indices into bench_kernels.ALL: " + ", ".join(
                       f"{i}={s}" for i, s in enumerate(ALL)))
    p.add_argument("--impl", default="pallas", help="gated_slot_attention's impl")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--gate-scale", type=float, default=8.0,
                   help="g = logsigmoid(x) / S (8: layer-like; bench_kernels.make_inputs)")
    p.add_argument("--calls", type=int, default=10, help="calls traced per pass")
    p.add_argument("--top", type=int, default=15, help="ops listed per pass")
    p.add_argument("--smoke", action="store_true",
                   help=f"{SMOKE_SHAPE} with the chunk form unless --impl is given (CPU)")
    p.add_argument("--out-dir", default=str(common.RESULTS_DIR))
    args = p.parse_args(argv)
    if args.calls < 1:
        p.error("--calls must be >= 1")
    bad = [i for i in args.shapes if not 0 <= i < len(ALL)]
    if bad:
        p.error(f"--shapes {bad}: indices into bench_kernels.ALL (0..{len(ALL) - 1})")
    if args.smoke and args.impl == p.get_default("impl"):
        args.impl = "chunk"
    args.shape_list = [SMOKE_SHAPE] if args.smoke else [ALL[i] for i in args.shapes]
    return args


def traced_ops(fn, inputs, calls: int) -> tuple[list, str, float]:
    """(device op events, where they were read, wall ms per call) of `calls` calls of a
    compiled fn, after one untraced call (compile and warm-up)."""
    jax.block_until_ready(fn(*inputs))
    with tempfile.TemporaryDirectory() as trace_dir:
        start = time.perf_counter()
        with jax.profiler.trace(trace_dir):
            for _ in range(calls):
                out = fn(*inputs)
            jax.block_until_ready(out)
        wall_ms = (time.perf_counter() - start) * 1e3 / calls
        events = profile_summary.load_events(profile_summary.find_trace(trace_dir))
    ops, source = profile_summary.device_events(events)
    return ops, source, wall_ms


def profile_shape(shape, args) -> dict:
    dtype = jnp.dtype(args.dtype)
    inputs = make_inputs(shape, dtype, gate_scale=args.gate_scale)
    f = gsa_fn(args.impl, document_ids(shape))
    cot = jax.random.normal(jax.random.PRNGKey(3), shape[:3] + (shape[3],), jnp.float32)
    passes = {}
    for name, fn in (("fwd", jax.jit(f)), ("fwd_bwd", jax.jit(loss_grad(f, cot)))):
        ops, source, wall_ms = traced_ops(fn, inputs, args.calls)
        summary = profile_summary.summarize(ops, args.calls, wall_ms, top=args.top)
        passes[name] = {**summary, "source": source}
        print(f"{shape} {name}: {summary['device_ms_per_step']:.3f} device ms per call, "
              f"{wall_ms:.3f} wall ms", flush=True)
    return {"shape": list(shape), "passes": passes}


def markdown(record: dict) -> str:
    lines = [f"# Device time per op of gated_slot_attention ({record['tag']})", "",
             f"impl {record['impl']}, {record['dtype']}, gates g = logsigmoid(x) / "
             f"{record['gate_scale']:g}; {record['calls']} traced calls per pass, after a "
             f"warm-up call; ms per call ('step' below is one call).", ""]
    for row in record["rows"]:
        for name, s in row["passes"].items():
            lines += [f"## {tuple(row['shape'])} {name}", ""]
            lines += profile_summary.markdown_lines(s, s["source"]) + [""]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    rows = [profile_shape(shape, args) for shape in args.shape_list]
    record = {"tag": args.tag, "impl": args.impl, "dtype": args.dtype,
              "gate_scale": args.gate_scale, "calls": args.calls, "rows": rows}
    common.write_and_print(args.tag, "profile_kernels", record, markdown(record),
                           out_dir=args.out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
