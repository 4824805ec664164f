"""Time the recurrent, parallel and chunk forms of `gated_slot_attention`, forward and
forward+backward, over sequence lengths at a fixed token count, on whatever backend JAX has.

    python experiments/bench_ops.py --tag h100                 # the GPU shape (defaults below)
    python experiments/bench_ops.py --smoke --tag cpu          # small, to check it on a CPU

Defaults: B·T = 16384 tokens, T ∈ {512, 1024, 2048, 4096, 8192} (so B = 16384 / T), H = 16,
K = V = 128, M = 64, bfloat16 inputs, chunk size 64: the shape of DESIGN.md's speed anchors
(T = 2048 is B = 8, the peer's 1.15 ms forward / 4.79 ms forward+backward on an H100).

Each (form, T) runs in a fresh Python process (unless --in-process), so that its peak device
memory is its own and an out-of-memory leaves the next one unharmed. In it:
  - inputs as the GSA layer makes them (swish features, g = log σ(x)/8, s = 1 − exp g);
  - forward = jit(o of the op); forward+backward = jit(grad of Σ o · c w.r.t. q, k, v, s, g)
    for a fixed random cotangent c, passed as an argument (its f32 bytes count in the
    compiled footprint);
  - each is compiled ahead of time; XLA's compiled footprint (arguments + outputs + temporaries)
    is recorded, and the run is skipped if that exceeds the memory limit; the parallel form is
    skipped before compiling if its [B, H, T, T, M] float32 decay tensor alone exceeds it;
  - warm-up calls, then the median (and min) of timed calls, each ended by block_until_ready;
  - peak device memory from `device.memory_stats()` where the backend reports it (GPU): read
    after the forward runs (its own peak, inputs included), then after forward+backward (the
    larger of the two, which is forward+backward's in practice);
  - out-of-memory (RESOURCE_EXHAUSTED) is caught and recorded, as is any other error.

Results: experiments/results/bench_ops_<tag>.json (machine, command line, date, config, one
record per (form, T)) and .md (the table, printed at the end too), rewritten after every
(form, T) so that a run cut short keeps what it measured. A sweep can be split over several
shorter runs: `--seq-lens 512 1024 --tag h100`, then `--seq-lens 2048 4096 8192 --tag h100
--merge` (the second keeps the first's rows; the shape settings must match). Needs only jax and numpy;
run from the repository root, installed or with PYTHONPATH=. (the script also finds the package
beside it). Memory limit: --mem-limit-gb if given, else the device's `bytes_limit` where
reported (on a GPU, the share XLA's allocator may take), else half the machine's RAM.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from experiments import common, harness  # noqa: E402

FORMS = ("recurrent", "parallel", "chunk")
GIB = common.GIB

SMOKE = dict(tokens=2048, seq_lens=[128, 256, 512], heads=2, head_dim=32, slots=16, repeats=5,
             warmup=1)


def parse_args(argv=None):
    p = common.argument_parser(__doc__)
    p.add_argument("--smoke", action="store_true",
                   help="small sizes for a CPU check: " + ", ".join(f"{k}={v}" for k, v in
                                                                     SMOKE.items()))
    p.add_argument("--tokens", type=int, default=16384, help="B · T, fixed across T")
    p.add_argument("--seq-lens", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192])
    p.add_argument("--heads", type=int, default=16, help="H (= Hkv)")
    p.add_argument("--head-dim", type=int, default=128, help="K = V")
    p.add_argument("--slots", type=int, default=64, help="M")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--chunk-size", type=int, default=64)
    p.add_argument("--forms", nargs="+", default=list(FORMS), choices=FORMS)
    p.add_argument("--repeats", type=int, default=20, help="timed calls per measurement")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls after compiling")
    p.add_argument("--mem-limit-gb", type=float, default=None,
                   help="skip above this footprint (default: device bytes_limit, else RAM / 2)")
    p.add_argument("--worker-timeout", type=float, default=420,
                   help="seconds per (form, T) before its worker is stopped and recorded")
    p.add_argument("--merge", action="store_true",
                   help="add to the report of the same --tag: its rows for other (form, T) are "
                        "kept (to split a sweep over several shorter runs)")
    p.add_argument("--in-process", action="store_true",
                   help="no subprocess per (form, T); peak memory is then the running maximum")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # "form:T", internal
    args = p.parse_args(argv)
    if args.smoke:
        common.apply_smoke_sizes(p, args, SMOKE)
    return args


# ---------------------------------------------------------------- one (form, T), in a worker
def _memory_limit(args, device) -> tuple[int, str]:
    if args.mem_limit_gb:
        return int(args.mem_limit_gb * GIB), "--mem-limit-gb"
    stats = harness.memory_stats(device)
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"]), "device bytes_limit"
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return ram // 2, "half the RAM"


def make_inputs(B, T, H, D, M, dtype, seed=0):
    """(q, k, v [B, T, H, D], s, g [B, T, H, M]) as the GSA layer makes them."""
    import jax
    import jax.numpy as jnp
    keys = jax.random.split(jax.random.key(seed), 4)
    normal = lambda key, d: jax.random.normal(key, (B, T, H, d), jnp.float32)
    q, k = jax.nn.swish(normal(keys[0], D)), jax.nn.swish(normal(keys[1], D))
    v = jax.nn.silu(normal(keys[2], D))
    g = jax.nn.log_sigmoid(normal(keys[3], M)) / 8.0  # gate_logit_normalizer τ = 8
    s = 1.0 - jnp.exp(g)
    return tuple(x.astype(dtype) for x in (q, k, v, s, g))


def run_one(args, form: str, T: int) -> dict:
    """Forward and forward+backward of one form at one T: the record of the JSON 'rows'."""
    import jax
    import jax.numpy as jnp
    from gsa_jax.ops import gated_slot_attention

    device = jax.devices()[0]
    B, H, D, M = max(1, args.tokens // T), args.heads, args.head_dim, args.slots
    limit, limit_source = _memory_limit(args, device)
    row = {"form": form, "T": T, "B": B, "memory_limit_bytes": limit,
           "memory_limit_source": limit_source, "machine": common.environment()}
    modes = ("fwd", "fwd_bwd")
    if form == "parallel":
        decay_bytes = B * H * T * T * M * 4
        row["parallel_decay_bytes"] = decay_bytes
        if decay_bytes > limit:
            reason = (f"parallel materialises [B,H,T,T,M] f32 = {decay_bytes / GIB:.2f} GiB > "
                      f"limit {limit / GIB:.2f} GiB ({limit_source})")
            row.update({mode: {"status": "skipped", "reason": reason} for mode in modes})
            return row

    dtype = jnp.dtype(args.dtype)
    inputs = make_inputs(B, T, H, D, M, dtype)
    cotangent = jax.random.normal(jax.random.key(1), (B, T, H, D), jnp.float32)

    def forward(q, k, v, s, g):
        return gated_slot_attention(q, k, v, s, g, impl=form, chunk_size=args.chunk_size)[0]

    def loss(q, k, v, s, g, c):
        return jnp.sum(forward(q, k, v, s, g).astype(jnp.float32) * c)

    # The cotangent is an argument, not a closed-over constant: as a constant XLA folds
    # reshapes of it at compile time (seconds per call, and a [B, T, H, V] literal in the program).
    fns = {"fwd": (forward, inputs),
           "fwd_bwd": (jax.grad(loss, argnums=(0, 1, 2, 3, 4)), inputs + (cotangent,))}
    for mode in modes:
        result = row[mode] = {}
        fn, fn_inputs = fns[mode]
        try:
            start = time.perf_counter()
            compiled = jax.jit(fn).lower(*fn_inputs).compile()
            result["compile_s"] = round(time.perf_counter() - start, 2)
            result["compiled_bytes"] = footprint = harness.compiled_bytes(compiled)
            if footprint is not None and footprint > limit:
                result.update(status="skipped", reason=(
                    f"compiled footprint {footprint / GIB:.2f} GiB > limit "
                    f"{limit / GIB:.2f} GiB ({limit_source})"))
                continue
            median, fastest = harness.time_calls(
                lambda: jax.block_until_ready(compiled(*fn_inputs)), args.repeats, args.warmup)
            result["median_ms"], result["min_ms"] = 1e3 * median, 1e3 * fastest
            result["peak_bytes"] = harness.peak_bytes(device)
            result["status"] = "ok"
        except Exception as error:  # noqa: BLE001 - record it, go on with the next one
            result.update(harness.failure(error))
        finally:
            compiled = None  # free the executable before the next mode
    return row


def worker_main(args) -> int:
    form, T = args.worker.split(":")
    row = run_one(args, form, int(T))
    harness.emit(row)
    return 0


# ---------------------------------------------------------------- driver
def run_isolated(argv, form: str, T: int, timeout: float) -> dict:
    """Run one (form, T) in a fresh interpreter with the same arguments."""
    out = harness.run_worker(__file__, [*argv, "--worker", f"{form}:{T}"], timeout=timeout)
    if out.payload is not None:
        return out.payload
    failed = out.failure()
    return {"form": form, "T": T, "fwd": dict(failed), "fwd_bwd": dict(failed)}


def markdown(report: dict) -> str:
    m, c = report["machine"], report["config"]
    lines = [
        f"# bench_ops ({report['tag']})", "",
        f"gated_slot_attention, B·T = {c['tokens']}, H = {c['heads']}, K = V = {c['head_dim']}, "
        f"M = {c['slots']}, {c['dtype']}, chunk size {c['chunk_size']}; median of "
        f"{c['repeats']} calls after {c['warmup']} warm-up. "
        f"{m.get('backend')} ({m.get('device_kind')}), jax {m.get('jax')}, "
        f"jaxlib {m.get('jaxlib')}, Python {m.get('python')}, {report['date']}.", "",
        "Command" + ("s" if len(report["commands"]) > 1 else "") + ": "
        + ", ".join(f"`{c}`" for c in report["commands"]), "",
        "Memory: peak = device peak_bytes_in_use of the run's own process (GPU only); "
        "compiled = XLA's footprint of the jitted function (arguments + outputs + temporaries).",
        "",
        "| T | B | form | fwd ms | fwd+bwd ms | peak fwd GiB | peak fwd+bwd GiB "
        "| compiled fwd+bwd GiB | note |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---|",
    ]
    for row in report["rows"]:
        fwd, bwd = row.get("fwd", {}), row.get("fwd_bwd", {})
        notes = []
        for name, r in (("fwd", fwd), ("fwd+bwd", bwd)):
            if r.get("status") != "ok":
                notes.append(f"{name} {r.get('status')}: {r.get('reason', '')[:160]}")
        if fwd.get("reason") and fwd.get("reason") == bwd.get("reason"):
            notes = [f"{fwd['status']}: {fwd['reason'][:160]}"]
        ms = lambda r: f"{r['median_ms']:.2f}" if r.get("status") == "ok" else r.get("status", "-")
        lines.append(
            f"| {row['T']} | {row.get('B', '-')} | {row['form']} | {ms(fwd)} | {ms(bwd)} | "
            f"{common.fmt_gib(fwd.get('peak_bytes'))} | {common.fmt_gib(bwd.get('peak_bytes'))} | "
            f"{common.fmt_gib(bwd.get('compiled_bytes'))} | {'; '.join(notes).replace('|', '/')} |")
    return "\n".join(lines) + "\n"


SHAPE_KEYS = ("tokens", "heads", "head_dim", "slots", "dtype", "chunk_size")
FORM_ORDER = {form: i for i, form in enumerate(FORMS)}


def build_report(tag, command, config, machine, rows, previous) -> dict:
    """The JSON report; with a previous one (--merge), its rows for other (form, T) are kept."""
    commands = harness.merged_commands(previous, command)
    if previous is not None:
        rows = harness.merge_rows(previous["rows"], rows, lambda r: (r["form"], r["T"]))
        config = {**config, "seq_lens": sorted({r["T"] for r in rows}),
                  "forms": sorted({r["form"] for r in rows}, key=FORM_ORDER.get)}
    rows = sorted(rows, key=lambda r: (r["T"], FORM_ORDER[r["form"]]))
    return {
        "benchmark": "bench_ops",
        "tag": tag,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "commands": commands,
        "machine": machine,
        "config": config,
        "rows": rows,
    }


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.worker:
        return worker_main(args)
    if args.merge and not args.tag:
        raise SystemExit("--merge needs --tag (the report to add to)")

    import jax  # versions only: the driver does not start a backend when isolating
    import jaxlib

    command = common.command_line(argv, __file__)
    config = {key: getattr(args, key) for key in (
        "tokens", "seq_lens", "heads", "head_dim", "slots", "dtype", "chunk_size", "forms",
        "repeats", "warmup", "mem_limit_gb", "in_process")}
    machine = {"jax": jax.__version__, "jaxlib": jaxlib.__version__,
               "python": platform.python_version()}
    previous, paths, rows, report = None, None, [], None
    if args.merge:
        previous = harness.merge_base(args.tag, "bench_ops", args.out_dir,
                                      {k: config[k] for k in SHAPE_KEYS})
    for T in args.seq_lens:
        for form in args.forms:
            start = time.perf_counter()
            if args.in_process:
                row = run_one(args, form, T)
            else:
                row = run_isolated(argv, form, T, args.worker_timeout)
            row["wall_s"] = round(time.perf_counter() - start, 1)
            machine = row.pop("machine", None) or machine
            summary = {m: (row[m].get("median_ms") or row[m].get("status"))
                       for m in ("fwd", "fwd_bwd")}
            print(f"T={T} {form}: {summary} ({row['wall_s']} s)", flush=True)
            rows.append(row)
            # Written after every row: a run cut short (a time limit) keeps what it measured.
            tag = args.tag or machine.get("backend", "unknown")
            report = build_report(tag, command, config, machine, rows, previous)
            # The page names its machine and commands itself (no footer); the driver starts
            # no backend (the device is the workers'): the workers' machine is the record's.
            paths = common.write_results(tag, "bench_ops", {**report, "environment": machine},
                                         markdown(report), out_dir=args.out_dir, footer=False)

    if report is None:
        raise SystemExit("nothing to run: no --seq-lens or --forms")
    print(markdown(report))
    print(f"wrote {paths['json']} and {paths['md']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
