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
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import os
import pathlib
import shutil
import subprocess
import sys
import threading
import time
from typing import Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from experiments import common  # noqa: E402  (needs ROOT on sys.path)

NAME = "scaling"
ROW_PREFIX = "SCALING_ROW "
GIB = 2 ** 30
LAYOUTS = ("single", "dp", "fsdp", "fsdp_tp")
DEFAULT_CONFIGS = ["configs/gsa-340m.yaml", "configs/gsa-1.3b.yaml"]
# Max |loss difference| tolerated between layouts at the same global batch (bf16 compute).
# Judged on a CPU (2026-12-02; tiny config, 50 steps of 4 x 128 tokens per device, warm-up 10):
# fsdp over 4 simulated devices vs one device as 4 micro-batches: 9.5e-7 in float32 and 1.0e-3
# in bfloat16; the same run in bfloat16 vs float32: 0.0046 (fsdp 4, 1 device x 4 micro-batches)
# and 0.0099 (1 device, batch 4). A layout may differ from another by what bf16 rounding does
# to one run: twice the largest bf16-vs-f32 gap.
LOSS_TOL = 0.02
SMOKE = dict(configs=["configs/tiny.yaml"], gpus=[1, 2], steps=6, per_gpu_batch=2, seq_len=64,
             warmup=2, resume_at=3, fit_batch=4, fit_steps=3, worker_timeout=300.0,
             fast_compile=True)
FAST_COMPILE = "--xla_backend_optimization_level=0"  # CPU smoke: compile time is all its time
# Overrides of every run: stdlib bytes instead of the configs' SlimPajama files (the token
# paths and Mistral's BOS id cleared), no evaluation, no sample, every step logged.
BASE_OVERRIDES = ("data.source=stdlib", "data.train_path=null", "data.val_path=null",
                  "data.tokenizer=null", "data.bos_id=null", "eval.every=0",
                  "sample.max_new_tokens=0", "logging.every=1", "logging.progress=false",
                  "logging.tensorboard=false", "checkpoint.keep=1")


# ------------------------------------------------------------------ pure parts (unit-tested)
def layout_mesh(layout: str, n: int) -> Optional[tuple[int, int, int]]:
    """(data, fsdp, tensor) of `layout` on n devices, or None where it does not exist
    (single on n > 1; a multi-device layout on n = 1; fsdp_tp on an odd n)."""
    if layout == "single":
        return (1, 1, 1) if n == 1 else None
    if n < 2:
        return None
    if layout == "dp":
        return (n, 1, 1)
    if layout == "fsdp":
        return (1, n, 1)
    if layout == "fsdp_tp":
        return (1, n // 2, 2) if n % 2 == 0 else None
    raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")


def sweep_runs(configs: Sequence[str], gpus: Sequence[int], device_count: int,
               layouts: Sequence[str] = LAYOUTS, reference: bool = True) -> list[dict]:
    """The weak-scaling runs (and the 1-GPU same-global-batch references) of the sweep:
    dicts {kind, config, layout, n, mesh, accum}; N > device_count is left out. Per config the
    1-GPU runs come first (`single`, then the references), then the layouts by N: with --jobs
    the 1-GPU runs go side by side."""
    ns = [n for n in sorted(set(gpus)) if n <= device_count]
    runs = []
    for config in configs:
        if 1 in ns and "single" in layouts:
            runs.append(dict(kind="sweep", config=config, layout="single", n=1,
                             mesh=(1, 1, 1), accum=1))
        if reference:
            runs += [dict(kind="ref", config=config, layout="single", n=1, mesh=(1, 1, 1),
                          accum=n) for n in ns if n > 1]
        for n in ns:
            for layout in layouts:
                mesh = layout_mesh(layout, n)
                if mesh is not None and n > 1:
                    runs.append(dict(kind="sweep", config=config, layout=layout, n=n,
                                     mesh=mesh, accum=1))
    return runs


def max_loss_diff(curve: Sequence, reference: Sequence) -> Optional[float]:
    """Max |loss - reference loss| over the steps both curves have ([[step, loss], ...]);
    None without a common step, inf where either loss is not finite."""
    ref = {int(s): l for s, l in reference}
    diffs = []
    for step, loss in curve:
        if int(step) in ref:
            a, b = loss, ref[int(step)]
            ok = a is not None and b is not None and math.isfinite(a) and math.isfinite(b)
            diffs.append(abs(a - b) if ok else math.inf)
    return max(diffs) if diffs else None


def scaling_efficiency(tokens_per_s: Optional[float], n: int,
                       single_tokens_per_s: Optional[float]) -> Optional[float]:
    """tokens/s on n devices / (n x tokens/s on one), or None when either is missing."""
    if not tokens_per_s or not single_tokens_per_s or n < 1:
        return None
    return tokens_per_s / (n * single_tokens_per_s)


def _ok(row: Optional[dict]) -> bool:
    return row is not None and row.get("status") == "ok"


def analyse(rows: list[dict], loss_tol: float = LOSS_TOL) -> dict[str, list[dict]]:
    """The derived numbers of a report: per sweep row its efficiency against the config's
    `single` row and its max loss difference against the `ref` row of its N; per resume row
    its differences against the uninterrupted runs of its two layouts."""
    def find(**keys):
        return next((r for r in rows if all(r.get(k) == v for k, v in keys.items())), None)

    scaling, losses, resume = [], [], []
    for r in rows:
        if r["kind"] != "sweep":
            continue
        single = find(kind="sweep", config=r["config"], layout="single", n=1)
        eff = scaling_efficiency(r.get("tokens_per_s"), r["n"],
                                 single.get("tokens_per_s") if _ok(single) else None)
        scaling.append({"config": r["config"], "layout": r["layout"], "n": r["n"],
                        "efficiency": eff if _ok(r) else None})
        if r["n"] > 1:
            ref = find(kind="ref", config=r["config"], n=1, accum=r["n"])
            diff = (max_loss_diff(r["loss_curve"], ref["loss_curve"])
                    if _ok(r) and _ok(ref) else None)
            # The other layouts at this N have the same global batch: free comparisons.
            others = [o for o in rows if o["kind"] == "sweep" and o["config"] == r["config"]
                      and o["n"] == r["n"] and o["layout"] != r["layout"] and _ok(o)]
            spread = [max_loss_diff(r["loss_curve"], o["loss_curve"]) for o in others
                      if _ok(r)]
            spread = [d for d in spread if d is not None]
            losses.append({"config": r["config"], "layout": r["layout"], "n": r["n"],
                           "global_batch": r.get("global_batch"), "max_abs_diff": diff,
                           "within_tol": None if diff is None else diff <= loss_tol,
                           "vs_layouts": max(spread) if spread else None})
    for r in rows:
        if r["kind"] != "resume" or r.get("phase") != "resumed":
            continue
        out = {"config": r["config"], "n": r["n"], "from": r["resume_from"], "to": r["layout"],
               "at": r["resume_at"]}
        for side, layout in (("vs_from", r["resume_from"]), ("vs_to", r["layout"])):
            base = find(kind="sweep", config=r["config"], layout=layout, n=r["n"])
            diff = (max_loss_diff(r["loss_curve"], base["loss_curve"])
                    if _ok(r) and _ok(base) else None)
            out[side] = diff
        out["within_tol"] = (None if out["vs_to"] is None else out["vs_to"] <= loss_tol)
        resume.append(out)
    return {"scaling": scaling, "loss": losses, "resume": resume}


def row_key(row: dict) -> tuple:
    """Identity of a run in a report (a --merge replaces the rows of runs made again)."""
    return (row["kind"], row["config"], row["layout"], row["n"], row.get("accum", 1),
            row.get("phase"))


def missing_runs(runs: list[dict], previous: list[dict]) -> list[dict]:
    """The planned `runs` without those that have an ok row in `previous` (--only-missing).
    A resume check is one unit: both of its phases are made again unless it resumed fine."""
    done = {row_key(r) for r in previous if r.get("status") == "ok"}
    key = lambda run: row_key({**run, "config": config_name(run["config"])})  # noqa: E731
    resumed_ok = any(key(r) in done for r in runs if r.get("phase") == "resumed")
    out = []
    for run in runs:
        if run["kind"] == "resume":
            if resumed_ok:
                continue
        elif key(run) in done:
            continue
        out.append(run)
    # a kept resumed phase waits for its interrupted phase: its index in the kept list
    first = next((i for i, r in enumerate(out) if r.get("phase") == "interrupted"), None)
    return [{**r, "after": first} if r.get("phase") == "resumed" else r for r in out]


def merge_rows(previous: list[dict], rows: list[dict]) -> list[dict]:
    """`previous` without the runs `rows` made again, then `rows`."""
    done = {row_key(r) for r in rows}
    return [r for r in previous if row_key(r) not in done] + rows


# ------------------------------------------------------------------ a run (worker process)
def config_path(name: str) -> str:
    """A config file, given its path or its name in configs/ ("gsa-340m")."""
    for path in (name, os.path.join(ROOT, name), os.path.join(ROOT, "configs", f"{name}.yaml")):
        if os.path.isfile(path):
            return os.path.abspath(path)
    raise SystemExit(f"no config file {name!r} (nor configs/{name}.yaml)")


def config_name(name: str) -> str:
    """'gsa-340m' for configs/gsa-340m.yaml (the rows' config column)."""
    return pathlib.Path(name).stem if name.endswith((".yaml", ".yml")) else name


def run_overrides(args, run: dict, run_dir: str) -> list[str]:
    """The --set overrides of one run (the base ones, then its own, then the user's)."""
    data, fsdp, tensor = run["mesh"]
    batch = run.get("global_batch") or args.per_gpu_batch * (run["n"] * run["accum"])
    out = list(BASE_OVERRIDES) + [
        f"run_dir={run_dir}", f"steps={run['steps'] + 1}", f"data.seq_len={args.seq_len}",
        f"data.batch_size={batch}", f"optim.grad_accum={run['accum']}",
        f"optim.warmup_steps={args.warmup}", f"mesh.data={data}", f"mesh.fsdp={fsdp}",
        f"mesh.tensor={tensor}", f"checkpoint.every={run.get('checkpoint_every', 0)}"]
    if args.profile_steps and run["kind"] == "sweep":
        first, last = args.profile_steps
        out.append(f"logging.profile_steps=[{first}, {last}]")
    return out + list(args.overrides)


def _is_oom(text: str) -> bool:
    text = text.lower()
    return "resource_exhausted" in text or "out of memory" in text or "outofmemory" in text


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
        text = f"{type(err).__name__}: {err}"
        row.update(status="oom" if _is_oom(text) else "error", reason=text[:800])
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
    peaks = []
    for dev in jax.local_devices():
        stats = dev.memory_stats() if hasattr(dev, "memory_stats") else None
        peaks.append((stats or {}).get("peak_bytes_in_use"))
    row["peak_bytes_per_device"] = peaks
    row["peak_bytes_max"] = max((p for p in peaks if p is not None), default=None)
    profiles = [r for r in records if r.get("event") == "profile"]
    if profiles:
        row["profile"] = profiles[-1]["directory"]
    row["device_kind"] = jax.devices()[0].device_kind
    return row


# ------------------------------------------------------------------ the driver
def host_device_ids(count: int) -> list[str]:
    """The ids of the host's `count` devices as CUDA_VISIBLE_DEVICES names them (the ones this
    process was given, else 0..count-1)."""
    given = os.environ.get("CUDA_VISIBLE_DEVICES")
    if given is not None:
        return [x.strip() for x in given.split(",") if x.strip()][:count]
    return [str(i) for i in range(count)]


class DevicePool:
    """Hands out disjoint sets of device ids to runs that may go at once (--jobs), strictly
    in the order the runs asked (a run needing many devices is not overtaken forever by small
    ones)."""

    def __init__(self, ids: Sequence[str]):
        self.free = list(ids)
        self.size = len(self.free)
        self.cond = threading.Condition()
        self.next_ticket = 0
        self.serving = 0

    def acquire(self, n: int) -> list[str]:
        if n > self.size:
            raise ValueError(f"a run needs {n} devices, the host has {self.size}")
        with self.cond:
            ticket = self.next_ticket
            self.next_ticket += 1
            self.cond.wait_for(lambda: self.serving == ticket and len(self.free) >= n)
            taken, self.free = self.free[:n], self.free[n:]
            self.serving += 1
            self.cond.notify_all()
            return taken

    def release(self, ids: Sequence[str]) -> None:
        with self.cond:
            self.free = sorted(self.free + list(ids), key=lambda x: (len(x), x))
            self.cond.notify_all()


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
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)]
    base = base_row(run)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              env=worker_env(args, devices), cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {**base, "status": "timeout", "reason": f"run timed out after {timeout:.0f} s",
                "case_s": round(time.perf_counter() - t0, 1)}
    finally:
        if run.get("cleanup", True):  # checkpoints (GBs at 1.3B); the profile stays
            shutil.rmtree(os.path.join(run_dir, "checkpoints"), ignore_errors=True)
    case_s = round(time.perf_counter() - t0, 1)
    for line in proc.stdout.splitlines():
        if line.startswith(ROW_PREFIX):
            row = json.loads(line[len(ROW_PREFIX):])
            return {**row, "case_s": case_s}
    tail = (proc.stderr or proc.stdout)[-800:]
    return {**base, "status": "oom" if _is_oom(tail) else "error",
            "reason": f"worker exited with {proc.returncode}: {tail}", "case_s": case_s}


def probe(args) -> dict:
    """The machine (common.environment) as a run process sees it, with every device visible."""
    env = worker_env(args, host_device_ids(args.max_devices))
    env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"  # look, take no memory
    code = ("import json, sys; sys.path.insert(0, %r); from experiments import common; "
            "print(%r + json.dumps(common.environment()))" % (ROOT, ROW_PREFIX))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, timeout=300)
    for line in proc.stdout.splitlines():
        if line.startswith(ROW_PREFIX):
            return json.loads(line[len(ROW_PREFIX):])
    raise SystemExit(f"could not start jax to count the devices: {proc.stderr[-2000:]}")


def planned_runs(args, device_count: int) -> list[dict]:
    """Every run of this command, in order: sweep (and references), resume, fit."""
    runs = []
    if args.sweep:
        for run in sweep_runs(args.configs, args.gpus, device_count, args.layouts,
                              reference=args.reference):
            steps = args.steps if run["kind"] == "sweep" else args.ref_steps or args.steps
            runs.append({**run, "steps": steps, "stop_at": steps})
    ns = [n for n in args.gpus if 1 < n <= device_count]
    if args.resume_check and ns:
        n, config = max(ns), args.configs[0]
        at = args.resume_at or args.steps // 2
        run_dir = os.path.join(args.work_dir, f"resume-{config_name(config)}-{n}")
        first = dict(kind="resume", config=config, layout=args.resume_from, n=n,
                     mesh=layout_mesh(args.resume_from, n), accum=1, steps=args.steps,
                     phase="interrupted", resume_from=args.resume_from, resume_at=at,
                     # the checkpoint of step `at` is written after step at + 1 is dispatched
                     stop_at=at + 1, checkpoint_every=at, run_dir=run_dir, cleanup=False)
        second = {**first, "layout": args.resume_to, "mesh": layout_mesh(args.resume_to, n),
                  "phase": "resumed", "stop_at": args.steps, "checkpoint_every": 0,
                  "fresh": False, "cleanup": True, "after": len(runs)}
        runs += [first, second]
    if args.fit_check:
        n = max([1] + ns)
        for layout in args.fit_layouts:
            size = 1 if layout == "single" else n
            mesh = layout_mesh(layout, size)
            if mesh is not None:
                runs.append(dict(kind="fit", config=args.fit_check, layout=layout, n=size,
                                 mesh=mesh, accum=1, global_batch=args.fit_batch,
                                 steps=args.fit_steps, stop_at=args.fit_steps))
    return runs


def _gib(x) -> str:
    return common.fmt(None if x is None else x / GIB, 1)


def _reason(r: dict) -> str:
    if r.get("status") == "ok":
        return ""
    return f"{r.get('status')}: {r.get('reason', '')[:160]}".replace("|", "/").replace("\n", " ")


def markdown(record: dict) -> str:
    c, derived = record["config"], record["derived"]
    rows = record["rows"]
    eff = {(s["config"], s["layout"], s["n"]): s["efficiency"] for s in derived["scaling"]}
    dloss = {(s["config"], s["layout"], s["n"]): s["max_abs_diff"] for s in derived["loss"]}
    dlay = {(s["config"], s["layout"], s["n"]): s["vs_layouts"] for s in derived["loss"]}
    lines = [f"# Scaling ({record['tag']}): training over device meshes", "",
             f"{c['steps']} steps of {c['per_gpu_batch']} sequences x {c['seq_len']} tokens per "
             f"GPU (weak scaling), the embedded stdlib corpus, warm-up {c['warmup']} steps; "
             f"overrides {c['overrides'] or 'none'}. tokens/s and MFU: medians of the per-step "
             f"records (the compiling first step untimed). Efficiency = tokens/s on N / (N x "
             f"tokens/s on one GPU). Δloss vs 1 GPU = max |loss - loss of one GPU at the same "
             f"global batch (N x per-GPU batch as N micro-batches, the `ref` rows)| over the "
             f"steps both ran; Δloss vs layouts = the largest such difference against the other "
             f"layouts of the same N (same global batch); tolerance {c['loss_tol']} (bf16 "
             f"compute).", ""]
    sweep = [r for r in rows if r["kind"] in ("sweep", "ref")]
    lines.append(common.markdown_table(
        ["config", "layout", "N", "mesh (d,f,t)", "global batch", "tokens/s", "tokens/s/GPU",
         "MFU", "peak GiB/GPU", "efficiency", "Δloss vs 1 GPU", "Δloss vs layouts", "note"],
        [[r["config"], r["layout"] + (f" (ref, accum {r['accum']})" if r["kind"] == "ref"
                                      else ""), r["n"], "x".join(map(str, r["mesh"])),
          r.get("global_batch", "-"), common.fmt(r.get("tokens_per_s"), 0),
          common.fmt(r.get("tokens_per_s_per_device"), 0),
          "-" if r.get("mfu") is None else f"{100 * r['mfu']:.1f}%",
          _gib(r.get("peak_bytes_max")),
          "-" if eff.get((r["config"], r["layout"], r["n"])) is None or r["kind"] != "sweep"
          else f"{100 * eff[(r['config'], r['layout'], r['n'])]:.1f}%",
          common.fmt(dloss.get((r["config"], r["layout"], r["n"])) if r["kind"] == "sweep"
                     else None, 4),
          common.fmt(dlay.get((r["config"], r["layout"], r["n"])) if r["kind"] == "sweep"
                     else None, 4), _reason(r)] for r in sweep],
        align="llrrrrrrrrrrl"))
    resumed = derived["resume"]
    if resumed or any(r["kind"] == "resume" for r in rows):
        lines += ["", "## Resume under another layout", "",
                  "A run under `from` saved a checkpoint at step `at` and stopped; the run "
                  "directory resumed under `to`. Δloss over the steps after `at`, against the "
                  "uninterrupted runs of either layout.", ""]
        lines.append(common.markdown_table(
            ["config", "N", "from", "to", "at", "Δloss vs from", "Δloss vs to", "within tol"],
            [[x["config"], x["n"], x["from"], x["to"], x["at"], common.fmt(x["vs_from"], 4),
              common.fmt(x["vs_to"], 4), x["within_tol"]] for x in resumed]))
        for r in rows:
            if r["kind"] == "resume" and r.get("status") != "ok":
                lines.append(f"\n{r['phase']}: {_reason(r)}")
    fits = [r for r in rows if r["kind"] == "fit"]
    if fits:
        lines += ["", "## Fit check", "", f"Global batch {c.get('fit_batch')} sequences, "
                  f"{c.get('fit_steps')} steps.", ""]
        lines.append(common.markdown_table(
            ["config", "layout", "N", "mesh", "status", "peak GiB/GPU", "tokens/s/GPU", "MFU",
             "note"],
            [[r["config"], r["layout"], r["n"], "x".join(map(str, r["mesh"])), r["status"],
              _gib(r.get("peak_bytes_max")), common.fmt(r.get("tokens_per_s_per_device"), 0),
              "-" if r.get("mfu") is None else f"{100 * r['mfu']:.1f}%", _reason(r)]
             for r in fits], align="llrllrrrl"))
    profiles = [r for r in rows if r.get("profile")]
    if profiles:
        lines += ["", "Profiles: " + "; ".join(f"{r['config']} {r['layout']} N={r['n']}: "
                                               f"`{r['profile']}`" for r in profiles)]
    lines += common.notes_lines(record)
    return "\n".join(lines) + "\n"


def figure(record: dict):
    """Per config: tokens/s per GPU vs N per layout; the loss curves at the largest N; their
    differences from the 1-GPU run at the same global batch."""
    plt = common.pyplot()
    if plt is None:
        return None
    rows = [r for r in record["rows"] if r.get("status") == "ok"]
    configs = sorted({r["config"] for r in rows if r["kind"] in ("sweep", "ref")})
    if not configs:
        return None
    fig, axes = plt.subplots(3, len(configs), figsize=(5.5 * len(configs), 11), squeeze=False)
    for col, config in enumerate(configs):
        mine = [r for r in rows if r["config"] == config and r["kind"] == "sweep"]
        ax = axes[0][col]
        single = [r for r in mine if r["layout"] == "single"]
        for layout in LAYOUTS[1:]:
            pts = sorted((r["n"], r["tokens_per_s_per_device"]) for r in mine + single
                         if r["layout"] in (layout, "single") and r.get("tokens_per_s_per_device"))
            if len(pts) > 1 or any(r["layout"] == layout for r in mine):
                ax.plot(*zip(*pts), marker="o", label=layout)
        ax.set_xscale("log", base=2)
        ns = sorted({r["n"] for r in mine})
        ax.set_xticks(ns, [str(n) for n in ns])
        ax.set_xlabel("GPUs N")
        ax.set_ylabel("tokens/s per GPU")
        ax.set_title(config)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # labelled lines only (not the zero line)
            ax.legend(fontsize=8)
        ax = axes[1][col]
        n_max = max((r["n"] for r in mine), default=1)
        for r in [r for r in rows if r["config"] == config
                  and ((r["kind"] == "sweep" and r["n"] == n_max)
                       or (r["kind"] == "ref" and r["accum"] == n_max))]:
            if r["loss_curve"]:
                label = (f"{r['layout']} N={r['n']}" if r["kind"] == "sweep"
                         else f"1 GPU, accum {r['accum']}")
                ax.plot(*zip(*r["loss_curve"]), label=label, lw=1)
        ax.set_xlabel("step")
        ax.set_ylabel(f"train loss (global batch of N={n_max})")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # labelled lines only (not the zero line)
            ax.legend(fontsize=8)
        # The differences against the 1-GPU reference: what "equal to bf16 noise" means.
        ax = axes[2][col]
        ref = next((r for r in rows if r["config"] == config and r["kind"] == "ref"
                    and r["accum"] == n_max), None)
        for r in [r for r in mine if r["n"] == n_max] if ref else []:
            base = {s: l for s, l in ref["loss_curve"]}
            pts = [(s, l - base[s]) for s, l in r["loss_curve"] if s in base]
            if pts:
                ax.plot(*zip(*pts), label=f"{r['layout']} N={r['n']}", lw=1)
        ax.axhline(0, color="k", lw=0.5)
        ax.set_xlabel("step")
        ax.set_ylabel("loss - loss of 1 GPU (same global batch)")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # labelled lines only (not the zero line)
            ax.legend(fontsize=8)
    fig.suptitle(f"scaling ({record['tag']})")
    fig.tight_layout()
    return fig


CONFIG_KEYS = ("configs", "gpus", "layouts", "steps", "ref_steps", "per_gpu_batch", "seq_len",
               "warmup", "overrides", "loss_tol", "fit_batch", "fit_steps", "fit_layouts",
               "resume_from",
               "resume_to", "resume_at", "mem_fraction", "jobs")
# Settings that must agree between the runs a --merge puts in one report.
SHAPE_KEYS = ("steps", "per_gpu_batch", "seq_len", "warmup", "overrides")


def build_record(args, argv, rows, environment, previous) -> dict:
    command = common.command_line(argv, __file__)
    commands = [command]
    config = {k: getattr(args, k) for k in CONFIG_KEYS}
    if previous is not None:
        rows = merge_rows(previous["rows"], rows)
        commands = previous.get("commands", [previous.get("command")]) + commands
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


def write(record: dict, out_dir: str, plots: bool) -> dict:
    fig = figure(record) if plots else None
    paths = common.write_results(record["tag"], NAME, record, markdown(record), fig,
                                 out_dir=out_dir, command=record["command"])
    if fig is not None:
        common.pyplot().close(fig)
    return paths


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
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tag", default=None, help="results file suffix (default: the backend)")
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
    p.add_argument("--out-dir", default=str(common.RESULTS_DIR))
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
        row = worker_main(json.loads(args.worker))
        print(ROW_PREFIX + json.dumps(common._json_safe(row)), flush=True)
        return 0
    if (args.merge or args.plot_only) and not args.tag:
        raise SystemExit("--merge and --plot-only need --tag (the report to read)")
    import jax
    # The driver only writes files: its jax stays off the accelerators, which the runs use.
    jax.config.update("jax_platforms", "cpu")
    previous = None
    json_path = common.results_paths(args.tag or "x", NAME, args.out_dir)["json"]
    if args.merge or args.plot_only:
        if json_path.exists():
            previous = json.loads(json_path.read_text())
        elif args.plot_only:
            raise SystemExit(f"--plot-only: no {json_path}")
    if args.merge and previous is not None:
        mismatch = common.merge_mismatch(previous["config"],
                                         {k: getattr(args, k) for k in SHAPE_KEYS})
        if mismatch:
            raise SystemExit(f"--merge: {json_path} was run with other settings (old, new): "
                             f"{mismatch}; use another --tag")
    if args.plot_only:  # the derived numbers recomputed: this version's, from the rows
        previous["derived"] = analyse(previous["rows"], previous["config"]["loss_tol"])
        paths = write(previous, args.out_dir, plots=True)
        print("wrote " + ", ".join(map(str, paths.values())))
        return 0

    start = time.perf_counter()  # --budget-s counts from here (the probe included)
    environment = probe(args)
    args.tag = args.tag or environment.get("backend") or "unknown"
    count = environment["device_count"]
    runs = planned_runs(args, count)
    if args.only_missing and previous is not None:
        runs = missing_runs(runs, previous["rows"])
        if not runs:
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

    with concurrent.futures.ThreadPoolExecutor(max(1, args.jobs)) as executor:
        futures = [executor.submit(execute, i) for i in range(len(runs))]
        for future in concurrent.futures.as_completed(futures):
            row = future.result()
            rows.append(row)
            extra = f", {100 * row['mfu']:.1f}% MFU" if row.get("mfu") is not None else ""
            print(f"{row['kind']} {row['config']} {row['layout']} N={row['n']} accum "
                  f"{row.get('accum', 1)}{' ' + row['phase'] if row.get('phase') else ''}: "
                  f"{row['status']}, {common.fmt(row.get('tokens_per_s'), 0)} tokens/s{extra}, "
                  f"peak {_gib(row.get('peak_bytes_max'))} GiB/device ({row.get('case_s')} s)"
                  + (f" {row.get('reason', '')[:300]}" if row["status"] != "ok" else ""),
                  flush=True)
            record = build_record(args, argv, rows, environment, previous)
            write(record, args.out_dir, plots=False)  # after every run: a cut command keeps rows
    if record is None:
        raise SystemExit("nothing to run: no config, N or check selected")
    paths = write(record, args.out_dir, plots=True)
    print(markdown(record))
    print("wrote " + ", ".join(map(str, paths.values())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
