"""Training throughput and loss curves of the project's trainer over device meshes (issue 20):
one GPU, data parallel, FSDP and FSDP x tensor parallel on N GPUs of one host.

    python experiments/scaling.py --tag h200x4 --configs configs/gsa-340m.yaml --gpus 1 2 4
    python experiments/scaling.py --tag h200x4 --configs configs/gsa-1.3b.yaml --merge
    python experiments/scaling.py --tag h200x4 --resume-check --no-sweep --merge
    python experiments/scaling.py --tag h200x4 --fit-check configs/gsa-2.7b.yaml --no-sweep --merge
    python experiments/scaling.py --smoke --tag cpu     # tiny model, simulated CPU devices

Runs (each one `gsa_jax.train.train` in its own Python process, with the devices it may see
limited by CUDA_VISIBLE_DEVICES on a GPU host and by --xla_force_host_platform_device_count on
a CPU; a crash, an out-of-memory or a time-out is a row with its reason; --jobs J runs up to J
of them at once on disjoint devices, first come first served):

  sweep      for every config and N of --gpus (those > the host's device count are left out):
             N = 1: `single` (mesh 1x1x1); N > 1: `dp` (data N), `fsdp` (fsdp N), `fsdp_tp`
             (fsdp N/2 x tensor 2). Every run has the same per-GPU batch (--per-gpu-batch
             sequences of --seq-len): weak scaling, so scaling efficiency = tokens/s on N /
             (N x tokens/s of `single`).
  reference  the loss-curve check at the SAME GLOBAL batch: the N-GPU runs of one N all have the
             global batch N x per-GPU batch; `ref` is one GPU at that global batch as N
             micro-batches (optim.grad_accum = N, the per-device micro-batch of the N-GPU runs,
             so it fits wherever they do; the loss and the update are the full batch's). Each
             N-GPU row reports max |loss - ref loss| over the first --steps steps.
  resume     (--resume-check) a run under --resume-from (default fsdp over the largest N) saves
             a checkpoint at step --resume-at and is stopped; the same run directory is resumed
             under --resume-to (default fsdp_tp); its losses after the checkpoint are compared
             with the uninterrupted runs of both layouts at that N.
  fit        (--fit-check CONFIG) that config at global batch --fit-batch on one GPU (an
             out-of-memory expected, recorded as such) and under FSDP over the largest N
             (--fit-layouts; with dp too, the per-GPU memory FSDP saves at that batch).

Every run trains on the embedded corpus (the Python standard library, byte tokens: no download,
as configs/gsa-340m-stdlib.yaml) with the config's model and optimizer, but a warm-up of
--warmup steps (the paper's 1,907-step warm-up would keep the lr near 0 for 50 steps: flat loss
curves compare nothing), no evaluation, no sample, no final checkpoint (steps = --steps + 1 and
the run stops after --steps), and every step logged. tokens/s and MFU are the medians of the
trainer's per-step records (experiments/train_throughput.summarize; the compiling first step is
never timed); MFU is the trainer's: tokens/s x FLOPs per token / (N x the device's bf16 peak).
Peak memory: `peak_bytes_in_use` of every device of the run.

Results: experiments/results/scaling_<tag>.{json,md,png}, rewritten after every run (a cut run
keeps its rows); `--merge` adds to the report of the same tag (rows of runs made again are
replaced), so a sweep splits into commands of < 10 minutes (experiments/README.md).

This file: the options, a run's worker process and the driver. The runs and layouts:
scaling_runs.py; the derived numbers, page and figure: scaling_report.py; the worker processes
and --merge: harness.py.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import threading
import time
from typing import Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from experiments import common, harness  # noqa: E402  (needs ROOT on sys.path)
from experiments.scaling_report import (LOSS_TOL, NAME, analyse,  # noqa: E402,F401
                                        markdown, max_loss_diff, merge_rows,
                                        scaling_efficiency, write)
from experiments.scaling_runs import (LAYOUTS, DevicePool, config_name,  # noqa: E402,F401
                                      config_path, host_device_ids, layout_mesh, missing_runs,
                                      planned_runs, run_overrides, sweep_runs)

DEFAULT_CONFIGS = ["configs/gsa-340m.yaml", "configs/gsa-1.3b.yaml"]
SMOKE = dict(configs=["configs/tiny.yaml"], gpus=[1, 2], steps=6, per_gpu_batch=2, seq_len=64,
             warmup=2, resume_at=3, fit_batch=4, fit_steps=3, worker_timeout=300.0,
             fast_compile=True)
FAST_COMPILE = "--xla_backend_optimization_level=0"  # CPU smoke: compile time is all its time


# ------------------------------------------------------------------ a run (worker process)
def _segment(records: list[dict]) -> list[dict]:
    """The records of the last process that wrote metrics.jsonl (after its start/resume)."""
    starts = [i for i, r in enumerate(records) if r.get("event") in ("start", "resume")]
    return records[starts[-1]:] if starts else records


def worker_main(spec: dict) -> dict:
    """Trains one run as `spec` says (in this process) and returns its row."""
    import jax

    from experiments.train_throughput import summarize
    from gsa_jax.config import load_config
    from gsa_jax.train import train

    row = {k: spec[k] for k in ("kind", "config", "layout", "n", "accum", "phase",
                                "resume_from", "resume_at") if k in spec}
    row.update(mesh=list(spec["mesh"]), status="ok")
    common.enable_compilation_cache(spec.get("compile_cache"))
    config = load_config(spec["config_path"], spec["overrides"])
    row.update(global_batch=config.data.batch_size, seq_len=config.data.seq_len,
               per_device_batch=config.data.batch_size // (spec["n"] * spec["accum"]),
               steps=spec["stop_at"])
    if jax.device_count() != spec["n"]:
        raise RuntimeError(f"the run sees {jax.device_count()} devices, expected {spec['n']}")
    t0 = time.perf_counter()
    try:
        train(config, stop_at=spec["stop_at"], quiet=True)
    except Exception as err:  # noqa: BLE001 - the row says what failed
        row.update(harness.failure(err, limit=800))
    row["wall_s"] = round(time.perf_counter() - t0, 1)
    path = pathlib.Path(config.run_dir) / "metrics.jsonl"
    records = [json.loads(x) for x in path.read_text().splitlines()] if path.is_file() else []
    records = _segment(records)
    summary = summarize(records)
    start = records[0] if records and "event" in records[0] else {}
    row.update(params=start.get("params"), flops_per_token=start.get("flops_per_token"),
               tokens_per_s=summary.get("tokens_per_s_median"),
               mfu=summary.get("mfu_median"), loss_curve=summary.get("loss_curve", []))
    if row["tokens_per_s"]:
        row["tokens_per_s_per_device"] = row["tokens_per_s"] / spec["n"]
    peaks = [harness.peak_bytes(dev) for dev in jax.local_devices()]
    row["peak_bytes_per_device"] = peaks
    row["peak_bytes_max"] = max((p for p in peaks if p is not None), default=None)
    profiles = [r for r in records if r.get("event") == "profile"]
    if profiles:
        row["profile"] = profiles[-1]["directory"]
    row["device_kind"] = jax.devices()[0].device_kind
    return row


# ------------------------------------------------------------------ the driver
def worker_env(args, devices: Sequence[str]) -> dict:
    """The environment of a run on `devices` (ids of host_device_ids)."""
    n = len(devices)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["CUDA_VISIBLE_DEVICES"] = ",".join(devices)
    # On a CPU the run gets n simulated devices; on a GPU host this flag changes nothing.
    flags = [f for f in env.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    flags.append(f"--xla_force_host_platform_device_count={n}")
    if args.fast_compile:
        flags.append(FAST_COMPILE)
    env["XLA_FLAGS"] = " ".join(flags)
    if args.mem_fraction:
        env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", args.mem_fraction)
    return env


def base_row(run: dict) -> dict:
    """The identity of a run's row (what a failed or skipped run's row holds)."""
    row = {k: run[k] for k in ("kind", "layout", "n", "accum")}
    row.update({k: run[k] for k in ("phase", "resume_from", "resume_at") if k in run},
               config=config_name(run["config"]), mesh=list(run["mesh"]))
    return row


def run_isolated(args, run: dict, timeout: float, devices: Sequence[str]) -> dict:
    """One run in a fresh interpreter on `devices`; its row, or a failed row with the
    reason."""
    name = "-".join([run["kind"], config_name(run["config"]), run["layout"], str(run["n"]),
                     f"a{run['accum']}"] + ([run["phase"]] if run.get("phase") else []))
    run_dir = run.get("run_dir") or os.path.join(args.work_dir, name)
    if run.get("fresh", True) and os.path.exists(run_dir):
        shutil.rmtree(run_dir)
    spec = {**run, "config": config_name(run["config"]), "config_path": config_path(run["config"]),
            "overrides": run_overrides(args, run, run_dir), "stop_at": run["stop_at"],
            "compile_cache": args.compile_cache}
    t0 = time.perf_counter()
    try:
        out = harness.run_worker(__file__, ["--worker", json.dumps(spec)], timeout=timeout,
                                 env=worker_env(args, devices), cwd=ROOT, tail_chars=800)
    finally:
        if run.get("cleanup", True):  # checkpoints (GBs at 1.3B); the profile stays
            shutil.rmtree(os.path.join(run_dir, "checkpoints"), ignore_errors=True)
    case_s = round(time.perf_counter() - t0, 1)
    if out.payload is not None:
        return {**out.payload, "case_s": case_s}
    if out.returncode is None:
        failed = {"status": "timeout", "reason": f"run timed out after {timeout:.0f} s"}
    else:
        failed = out.failure()
    return {**base_row(run), **failed, "case_s": case_s}


def probe(args) -> dict:
    """The machine (common.environment) as a run process sees it, with every device visible."""
    env = worker_env(args, host_device_ids(args.max_devices))
    env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"  # look, take no memory
    code = ("import sys; sys.path.insert(0, %r); from experiments import common, harness; "
            "harness.emit(common.environment())" % ROOT)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, timeout=300)
    for line in proc.stdout.splitlines():
        if line.startswith(harness.WORKER_PREFIX):
            return json.loads(line[len(harness.WORKER_PREFIX):])
    raise SystemExit(f"could not start jax to count the devices: {proc.stderr[-2000:]}")


CONFIG_KEYS = ("configs", "gpus", "layouts", "steps", "ref_steps", "per_gpu_batch", "seq_len",
               "warmup", "overrides", "loss_tol", "fit_batch", "fit_steps", "fit_layouts",
               "resume_from",
               "resume_to", "resume_at", "mem_fraction", "jobs")
# Settings that must agree between the runs a --merge puts in one report.
SHAPE_KEYS = ("steps", "per_gpu_batch", "seq_len", "warmup", "overrides")


def build_record(args, argv, rows, environment, previous) -> dict:
    commands = harness.merged_commands(previous, common.command_line(argv, __file__))
    config = {k: getattr(args, k) for k in CONFIG_KEYS}
    if previous is not None:
        rows = merge_rows(previous["rows"], rows)
        environment = environment or previous.get("environment")
        # The report's configs and N: those of all its rows.
        config["configs"] = sorted({r["config"] for r in rows if r["kind"] in ("sweep", "ref")})
        config["gpus"] = sorted({r["n"] for r in rows if r["kind"] == "sweep"})
        for key in ("fit_batch", "fit_steps", "fit_layouts"):  # a fit check keeps its own
            if not args.fit_check:
                config[key] = previous["config"].get(key)
    return {"benchmark": NAME, "tag": args.tag, "command": " ; then ".join(commands),
            "commands": commands, "config": config, "rows": rows,
            "derived": analyse(rows, args.loss_tol),
            "environment": environment or {"backend": "unknown (no run reported)"}}


def parse_steps_window(text: str) -> list[int]:
    """'10:12' -> [10, 12]; '10' -> [10, 10]."""
    first, _, last = text.partition(":")
    try:
        window = [int(first), int(last or first)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a:b (e.g. 10:12), got {text!r}") from None
    if not 1 <= window[0] <= window[1]:
        raise argparse.ArgumentTypeError(f"expected 1 <= a <= b, got {text!r}")
    return window


def parse_args(argv=None):
    p = common.argument_parser(__doc__)
    p.add_argument("--smoke", action="store_true", help="tiny sizes on simulated CPU devices: "
                   + ", ".join(f"{k}={v}" for k, v in SMOKE.items()))
    p.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS,
                   help="config files or names in configs/ (gsa-340m, gsa-1.3b)")
    p.add_argument("--gpus", type=int, nargs="+", default=[1, 2, 4, 8],
                   help="device counts N (those above the host's are left out)")
    p.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=LAYOUTS)
    p.add_argument("--no-sweep", dest="sweep", action="store_false",
                   help="no sweep runs (only --resume-check / --fit-check)")
    p.add_argument("--no-reference", dest="reference", action="store_false",
                   help="no 1-GPU same-global-batch runs (no Δloss)")
    p.add_argument("--steps", type=int, default=50, help="train steps per run")
    p.add_argument("--ref-steps", type=int, default=None,
                   help="steps of the reference runs (default --steps; they take N x longer)")
    p.add_argument("--per-gpu-batch", type=int, default=16, help="sequences per GPU per step")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--warmup", type=int, default=10, help="lr warm-up steps of every run")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="KEY=VALUE", help="config override of every run, e.g. "
                   "model.impl=pallas")
    p.add_argument("--loss-tol", type=float, default=LOSS_TOL)
    p.add_argument("--resume-check", action="store_true")
    p.add_argument("--resume-from", default="fsdp", choices=LAYOUTS[1:])
    p.add_argument("--resume-to", default="fsdp_tp", choices=LAYOUTS[1:])
    p.add_argument("--resume-at", type=int, default=None, help="checkpoint step (--steps // 2)")
    p.add_argument("--fit-check", default=None, metavar="CONFIG",
                   help="that config on one GPU and under FSDP over the largest N")
    p.add_argument("--fit-batch", type=int, default=128, help="global batch of the fit check")
    p.add_argument("--fit-steps", type=int, default=3)
    p.add_argument("--fit-layouts", nargs="+", default=["single", "fsdp"], choices=LAYOUTS,
                   help="layouts of the fit check (add dp: the same batch with replicated "
                        "parameters and Adam moments, what FSDP saves per GPU)")
    p.add_argument("--profile-steps", type=parse_steps_window, default=None, metavar="A:B",
                   help="a jax.profiler trace of steps A..B of the sweep runs "
                        "(logging.profile_steps; in <work-dir>/<run>/profile)")
    p.add_argument("--work-dir", default="/tmp/gsa_scaling", help="the runs' directories")
    p.add_argument("--compile-cache", default=None, help="persistent XLA compilation cache dir")
    p.add_argument("--mem-fraction", default="0.95",
                   help="XLA_PYTHON_CLIENT_MEM_FRACTION of the runs ('' leaves it alone)")
    p.add_argument("--fast-compile", action="store_true",
                   help="runs compile with XLA_FLAGS=" + FAST_COMPILE + " (CPU checks)")
    p.add_argument("--max-devices", type=int, default=8,
                   help="devices to look for (the CPU simulates this many)")
    p.add_argument("--worker-timeout", type=float, default=540.0, help="seconds per run")
    p.add_argument("--jobs", type=int, default=1,
                   help="runs at once, each on its own devices (e.g. 4 on a 4-GPU host: the "
                        "1-GPU runs and their compiles side by side; rows say which devices)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="start no run after this many seconds (the rest is recorded skipped)")
    p.add_argument("--merge", action="store_true", help="add to the report of the same --tag")
    p.add_argument("--only-missing", action="store_true",
                   help="with --merge: leave out the runs the report already has ok rows of "
                        "(continue a command that its budget cut short)")
    p.add_argument("--plot-only", action="store_true", help="rewrite .md/.png from the JSON")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # a run's JSON spec
    args = p.parse_args(argv)
    if args.smoke:
        common.apply_smoke_sizes(p, args, SMOKE)
    if args.only_missing and not args.merge:
        p.error("--only-missing needs --merge (the report whose rows count as made)")
    if args.resume_from == args.resume_to:
        p.error("--resume-from and --resume-to must differ")
    at = args.resume_at or args.steps // 2
    if args.resume_check and not 1 <= at < args.steps - 1:
        p.error(f"--resume-at {at} must leave steps after it (--steps {args.steps})")
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.worker:
        harness.emit(common._json_safe(worker_main(json.loads(args.worker))))
        return 0
    if (args.merge or args.plot_only) and not args.tag:
        raise SystemExit("--merge and --plot-only need --tag (the report to read)")
    import jax
    # The driver only writes files: its jax stays off the accelerators, which the runs use.
    jax.config.update("jax_platforms", "cpu")
    if args.plot_only:  # the derived numbers recomputed: this version's, from the rows
        previous = harness.read_report(args.tag, NAME, args.out_dir, "--plot-only")
        previous["derived"] = analyse(previous["rows"], previous["config"]["loss_tol"])
        paths = write(previous, args.out_dir, plots=True)
        print("wrote " + ", ".join(map(str, paths.values())))
        return 0
    previous = None
    if args.merge:
        previous = harness.merge_base(args.tag, NAME, args.out_dir,
                                      {k: getattr(args, k) for k in SHAPE_KEYS})

    start = time.perf_counter()  # --budget-s counts from here (the probe included)
    environment = probe(args)
    args.tag = args.tag or environment.get("backend") or "unknown"
    count = environment["device_count"]
    runs = planned_runs(args, count)
    if args.only_missing and previous is not None:
        runs = missing_runs(runs, previous["rows"])
        if not runs:
            json_path = common.results_paths(args.tag, NAME, args.out_dir)["json"]
            print(f"{json_path} has ok rows of every run of this command: nothing to run")
            return 0
    print(f"{count} {environment['device_kind']} device(s); {len(runs)} runs", flush=True)
    pool = DevicePool(host_device_ids(count))
    rows, record = [], None
    done_events = [threading.Event() for _ in runs]

    def execute(i: int) -> dict:
        """The row of runs[i], after the run it resumes (if any) has finished."""
        run = runs[i]
        try:
            if run.get("after") is not None:
                done_events[run["after"]].wait()
            devices = pool.acquire(run["n"])
            try:
                elapsed = time.perf_counter() - start
                if args.budget_s is not None and elapsed > args.budget_s:
                    return {**base_row(run), "status": "skipped",
                            "reason": f"time budget {args.budget_s:.0f} s spent; run it "
                                      f"with --merge"}
                timeout = args.worker_timeout
                if args.budget_s is not None:
                    timeout = min(timeout, max(args.budget_s - elapsed, 60.0))
                try:
                    row = run_isolated(args, run, timeout, devices)
                except Exception as err:  # noqa: BLE001 - a row, not a lost sweep
                    row = {**base_row(run), "status": "error",
                           "reason": f"{type(err).__name__}: {err}"}
                row["devices"] = list(devices)
                return row
            finally:
                pool.release(devices)
        finally:
            done_events[i].set()

    for _, row, _ in harness.run_cases(range(len(runs)), execute, max(1, args.jobs)):
        rows.append(row)
        extra = f", {100 * row['mfu']:.1f}% MFU" if row.get("mfu") is not None else ""
        print(f"{row['kind']} {row['config']} {row['layout']} N={row['n']} accum "
              f"{row.get('accum', 1)}{' ' + row['phase'] if row.get('phase') else ''}: "
              f"{row['status']}, {common.fmt(row.get('tokens_per_s'), 0)} tokens/s{extra}, "
              f"peak {common.fmt_gib(row.get('peak_bytes_max'), 1)} GiB/device "
              f"({row.get('case_s')} s)"
              + (f" {row.get('reason', '')[:300]}" if row["status"] != "ok" else ""),
              flush=True)
        record = build_record(args, argv, rows, environment, previous)
        write(record, args.out_dir, plots=False)  # after every run: a cut command keeps rows
    return harness.finish_report(record, write, markdown, args.out_dir,
                                 "no config, N or check selected")


if __name__ == "__main__":
    sys.exit(main())
