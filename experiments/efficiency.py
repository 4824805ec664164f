"""The paper's Figure 4 (efficiency of 1.3B models): (a) training throughput and (b) training
memory at a fixed 16K tokens per batch over sequence lengths, (c) batch-1 generation latency
after a 2K-token prefix over generation lengths.

    python experiments/efficiency.py --tag h100                      # the paper's sizes, a GPU
    python experiments/efficiency.py --smoke --tag cpu               # tiny models, a CPU check

On one GPU the whole sweep takes longer than one 10-minute command, mostly in XLA compiles (on an
H100: about 200 s for one 1.3B GSA step in the chunk form). `--compile-only --jobs N
--compile-cache DIR` compiles every train step side by side from shapes (no device memory, no
timing); a timed run with the same --compile-cache then reads the executables. Split the timed
runs with --merge (and --budget-s, which leaves time to write the results), e.g. --parts train;
then --parts decode --merge (see experiments/README.md).

Models (`--models`; the presets of `python -m gsa_jax.models` at `--size`, 1.3b by default):
  gsa                  GSA, the op's default form (impl "auto")
  gsa-recompute        GSA keeping no hidden states for the backward pass (the paper's
                       recomputation): the Pallas kernels' `recompute_states=True`; where the
                       shapes resolve to the chunk form (head dims > 256, or no GPU) the op runs
                       under `jax.checkpoint` instead (ModelConfig.recompute_states=True).
  transformer          Transformer++ (RoPE softmax attention, cuDNN through
                       jax.nn.dot_product_attention on a GPU: `--attn-impl`)
  gla                  GLA
The 1.3B/2.7B GSA presets have 4/5 heads of dim 512: "auto" resolves to the pure-JAX chunk form
there (the kernels' GPU-timed dims end at 256; the row's "form" says which ran), `--gsa-impl
pallas` runs the kernels with the key dim in slices.
`--gsa-num-heads 8` gives head dims 256 at the same width and parameter count (but for the
gate projection), which the kernels take.
  fla-gsa              the peer (flash-linear-attention, PyTorch/Triton): `fla.models`
                       GSAForCausalLM with the same sizes, or, where `fla.models` does not import
                       (it needs `transformers`), the same blocks written in torch around
                       `fla.ops.gsa.chunk_gsa`; checkpoint_level 2 (the peer's default: chunk
                       states recomputed in the backward). fla-gsa-norecompute: level 0.
                       Needs torch with CUDA and fla importable (`--no-peer` leaves it out; the
                       smoke run never tries it).

(a)/(b) one train step = forward + backward + AdamW update (the project's optimizer: clipping,
AdamW with the decay mask) on B = tokens / T rows of one sequence each (no packing, so attention
takes the causal-only path), bf16 compute, f32 parameters and moments. It is compiled first
(compile time and XLA's footprint recorded), then warm-up steps, then the median of timed steps,
each ended by block_until_ready. Peak memory: `peak_bytes_in_use` of the device (GPU; the peer:
torch.cuda.max_memory_allocated): parameters, gradients, optimizer state and activations.
(c) `gsa_jax.generation.generate`, greedy, batch 1, a random `--prefix`-token prompt; latency =
median wall time of the whole call (prefill + N decode steps), compiled once per N first. The
decode cache bytes at each N come from `generation.cache_shapes` (shapes only): GSA's state is
constant, attention's KV cache grows with prefix + N.

Each case (model, T) or (decode, model) runs in a fresh Python process (unless --in-process), so
that its peak memory is its own and an out-of-memory is recorded rather than fatal. Results:
experiments/results/efficiency_<tag>.json / .md / .png (the three panels) and
efficiency_<tag>_{throughput,memory,latency}.png, rewritten after every case (the PNGs at the
end, or with --plot-only from the JSON). `--merge` adds to the report of the same tag (rows of
the cases run again are replaced); `--budget-s` skips (and records) what would start after it.

This file: the options, the cases of a sweep and the driver. The JAX cases (train step, decode):
efficiency_cases.py; the peer's (torch): efficiency_peer.py; the page and figure:
efficiency_report.py; the worker processes and --merge: harness.py.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from experiments import common, harness  # noqa: E402  (needs ROOT on sys.path)
from experiments.efficiency_cases import (FAMILY, decode_case, model_config,  # noqa: E402,F401
                                          train_case)
from experiments.efficiency_peer import peer_case  # noqa: E402
from experiments.efficiency_report import NAME, figure, markdown, write  # noqa: E402,F401

JAX_TRAIN = ("gsa", "gsa-recompute", "transformer", "gla")
PEER = ("fla-gsa", "fla-gsa-norecompute")
MODELS = JAX_TRAIN + PEER
DECODE_MODELS = ("gsa", "transformer")

FAST_COMPILE = "--xla_backend_optimization_level=0"
SMOKE = dict(size="tiny", layers=1, tokens=128, seq_lens=[32], prefix=16, gen_lens=[4, 8],
             repeats=2, warmup=1, decode_repeats=1, dtype="float32", decode_dtype="float32",
             peer=False, jobs=2, fast_compile=True)


def parse_args(argv=None):
    p = common.argument_parser(__doc__)
    p.add_argument("--smoke", action="store_true", help="tiny sizes for a CPU check: " +
                   ", ".join(f"{k}={v}" for k, v in SMOKE.items()))
    p.add_argument("--parts", nargs="+", default=["train", "decode"], choices=["train", "decode"])
    p.add_argument("--size", default="1.3b", help="preset size: 340m | 1.3b | 2.7b | tiny")
    p.add_argument("--models", nargs="+", default=list(JAX_TRAIN) + ["fla-gsa"], choices=MODELS,
                   help="models (the decode part takes gsa and transformer among them)")
    p.add_argument("--no-peer", dest="peer", action="store_false", help="leave out fla-gsa*")
    p.add_argument("--tokens", type=int, default=16384, help="B · T per train step")
    p.add_argument("--seq-lens", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    p.add_argument("--layers", type=int, default=None, help="override the presets' depth L")
    p.add_argument("--dtype", default="bfloat16", help="train compute dtype (params f32)")
    p.add_argument("--remat", action="store_true", help="remat policy 'full' around every block (default 'none')")
    p.add_argument("--gsa-impl", default="auto", help="form of the GSA op (auto | chunk | pallas)")
    p.add_argument("--gsa-num-heads", type=int, default=None,
                   help="override the GSA heads (e.g. 8 for head dims 256, which the Pallas "
                        "kernels take; the 1.3B preset's 4 heads have head dims 512)")
    p.add_argument("--attn-impl", default=None,
                   help="Transformer++ training attention: cudnn | xla | auto (default: cudnn on "
                        "a GPU, else xla); generation always uses auto")
    p.add_argument("--prefix", type=int, default=2048, help="prompt tokens before generating")
    p.add_argument("--gen-lens", type=int, nargs="+", default=[128, 256, 512, 1024, 2048])
    p.add_argument("--decode-dtype", default="bfloat16", help="generation compute and param dtype")
    p.add_argument("--repeats", type=int, default=5, help="timed train steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed train steps after compiling")
    p.add_argument("--decode-repeats", type=int, default=2, help="timed generate calls per N")
    p.add_argument("--peer-warmup", type=int, default=3,
                   help="untimed peer steps (the first autotunes its kernels)")
    p.add_argument("--mem-fraction", default="0.95",
                   help="XLA_PYTHON_CLIENT_MEM_FRACTION of the JAX workers ('' leaves it alone)")
    p.add_argument("--compile-cache", default=None, help="persistent XLA compilation cache dir")
    p.add_argument("--fast-compile", action="store_true",
                   help="workers compile with XLA_FLAGS=" + FAST_COMPILE + " (CPU checks: "
                        "less compile time, slower code)")
    p.add_argument("--worker-timeout", type=float, default=480, help="seconds per case")
    p.add_argument("--budget-s", type=float, default=None,
                   help="start no case after this many seconds (the rest is recorded skipped)")
    p.add_argument("--merge", action="store_true", help="add to the report of the same --tag")
    p.add_argument("--jobs", type=int, default=1,
                   help="cases run at once (CPU checks, or --compile-only: on one GPU timed "
                        "cases would share it)")
    p.add_argument("--compile-only", action="store_true",
                   help="only compile each train step (from shapes, no device memory taken) "
                        "into --compile-cache; with --jobs N the compiles run side by side, so "
                        "that a timed run afterwards with the same cache starts at once")
    p.add_argument("--in-process", action="store_true",
                   help="no subprocess per case (peak memory is then a running maximum)")
    p.add_argument("--plot-only", action="store_true", help="rewrite .md/.png from the JSON")
    # Internal: the case a worker process runs, "train:<model>:<T>" or "decode:<model>".
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.smoke:
        common.apply_smoke_sizes(p, args, SMOKE)
    if not args.peer:
        args.models = [m for m in args.models if m not in PEER]
    if args.compile_only:
        if not args.compile_cache:
            p.error("--compile-only needs --compile-cache (where the executables go)")
        if args.worker is None and (args.merge or args.plot_only):
            p.error("--compile-only writes no timings: it takes neither --merge nor --plot-only")
        # the JAX train steps only: the peer (torch) and generation have nothing to keep
        args.parts = [part for part in args.parts if part == "train"]
        args.models = [m for m in args.models if m not in PEER]
    return args


# ------------------------------------------------------------------------ workers and driver
def run_case(args, case: tuple) -> list[dict]:
    part, model, *rest = case
    if part == "decode":
        return decode_case(args, model)
    if model in PEER:
        return [peer_case(args, model, rest[0])]
    return [train_case(args, model, rest[0])]


def worker_main(args) -> int:
    part, model, *rest = args.worker.split(":")
    if model in PEER:
        os.environ["JAX_PLATFORMS"] = "cpu"  # never let XLA take the GPU from torch
    rows = run_case(args, (part, model, *map(int, rest)))
    harness.emit({"rows": rows, "environment": None if model in PEER else common.environment()})
    return 0


def _case_id(case: tuple) -> str:
    return ":".join(map(str, case))


def _failed_rows(args, case: tuple, status: str, reason: str) -> list[dict]:
    part, model, *rest = case
    if part == "decode":
        return [{"part": "decode", "model": model, "N": n, "prefix": args.prefix,
                 "status": status, "reason": reason} for n in args.gen_lens]
    return [{"part": "train", "model": model, "T": rest[0], "B": max(1, args.tokens // rest[0]),
             "status": status, "reason": reason}]


def run_isolated(argv, args, case: tuple, timeout: float) -> tuple[list[dict], dict | None]:
    """One case in a fresh interpreter with the same arguments: (rows, its environment)."""
    env = dict(os.environ)
    if args.compile_only:  # several compiling workers share the device: take no memory
        env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    elif args.mem_fraction and case[1] not in PEER:
        env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", args.mem_fraction)
    if args.fast_compile:
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {FAST_COMPILE}".strip()
    out = harness.run_worker(__file__, [*argv, "--worker", _case_id(case)], timeout=timeout,
                             env=env)
    if out.payload is None:
        failed = out.failure()
        return _failed_rows(args, case, failed["status"], failed["reason"]), None
    return out.payload["rows"], out.payload["environment"]


def cases(args) -> list[tuple]:
    out = []
    if "train" in args.parts:
        out += [("train", m, T) for T in args.seq_lens for m in args.models]
    if "decode" in args.parts:
        # gsa-recompute counts as gsa here: generation has no backward to recompute for
        wanted = {FAMILY.get(m, m) for m in args.models}
        out += [("decode", m) for m in DECODE_MODELS if m in wanted]
    return out


def _row_key(row: dict) -> tuple:
    return (row["part"], row["model"], row.get("T", row.get("N")))


def _order(row: dict) -> tuple:
    return (row["part"] != "train", row.get("T", 0), MODELS.index(row["model"]), row.get("N", 0))


CONFIG_KEYS = ("size", "layers", "tokens", "seq_lens", "models", "dtype", "remat", "gsa_impl",
               "gsa_num_heads", "attn_impl", "prefix", "gen_lens", "decode_dtype", "repeats",
               "warmup", "decode_repeats", "in_process", "jobs", "fast_compile")
# Settings that must agree between the runs a --merge puts in one report.
SHAPE_KEYS = ("size", "layers", "tokens", "dtype", "remat", "gsa_impl", "gsa_num_heads",
              "prefix", "decode_dtype")


def build_record(args, argv, rows, environment, previous) -> dict:
    commands = harness.merged_commands(previous, common.command_line(argv, __file__))
    config = {k: getattr(args, k) for k in CONFIG_KEYS}
    if previous is not None:  # --merge: the other cases' rows are kept, the sweeps united
        rows = harness.merge_rows(previous["rows"], rows, _row_key)
        environment = environment or previous.get("environment")
        config.update(
            seq_lens=sorted({r["T"] for r in rows if r["part"] == "train"}),
            models=[m for m in MODELS if any(r["model"] == m for r in rows
                                             if r["part"] == "train")],
            gen_lens=sorted({r["N"] for r in rows if r["part"] == "decode"}))
    # "command" (the results page's footer) names every run a --merge gathered.
    record = {"benchmark": NAME, "tag": args.tag, "command": " ; then ".join(commands),
              "commands": commands,
              "config": config, "rows": sorted(rows, key=_order)}
    # No worker reported its machine (all failed): say so rather than describe the driver's CPU.
    record["environment"] = environment or {"backend": "unknown (no worker reported)"}
    return record


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.worker:
        return worker_main(args)
    if (args.merge or args.plot_only) and not args.tag:
        raise SystemExit("--merge and --plot-only need --tag (the report to read)")
    import jax
    if not args.in_process:
        # The driver only writes files: keep its jax (common.environment) off the accelerator,
        # whose memory belongs to the workers.
        jax.config.update("jax_platforms", "cpu")
    if args.plot_only:
        paths = write(harness.read_report(args.tag, NAME, args.out_dir, "--plot-only"),
                      args.out_dir, plots=True)
        print("wrote " + ", ".join(map(str, paths.values())))
        return 0
    previous = None
    if args.merge:
        previous = harness.merge_base(args.tag, NAME, args.out_dir,
                                      {k: getattr(args, k) for k in SHAPE_KEYS})

    start, rows, environment, record = time.perf_counter(), [], None, None

    def execute(case):
        """(rows, environment or None, seconds) of one case; threads run several at once."""
        began = time.perf_counter()
        elapsed = began - start
        env = None
        if args.budget_s is not None and elapsed > args.budget_s:
            found = _failed_rows(args, case, "skipped",
                                 f"time budget {args.budget_s:.0f} s spent; run it with --merge")
        elif args.in_process:
            found, env = run_case(args, case), common.environment()
        else:
            timeout = args.worker_timeout
            if args.budget_s is not None:
                timeout = min(timeout, max(args.budget_s - elapsed, 60.0))
            found, env = run_isolated(argv, args, case, timeout)
        return found, env, round(time.perf_counter() - began, 1)

    jobs = 1 if args.in_process else args.jobs
    for case, (found, env, case_s), _ in harness.run_cases(cases(args), execute, jobs):
        environment = environment or env
        # The tag defaults to the backend the first finished case reports.
        args.tag = args.tag or (environment or {}).get("backend") or "unknown"
        for row in found:
            row["case_s"] = case_s
        rows += found
        summary = [(r.get("T") or r.get("N"), r.get("tokens_per_s") or r.get("latency_ms")
                    or r.get("status")) for r in found]
        print(f"{_case_id(case)}: {summary} ({case_s} s)", flush=True)
        record = build_record(args, argv, rows, environment, previous)
        write(record, args.out_dir, plots=False)  # after every case: a cut run keeps rows
    return harness.finish_report(record, write, markdown, args.out_dir,
                                 "no --parts, --models or --seq-lens")


if __name__ == "__main__":
    sys.exit(main())
