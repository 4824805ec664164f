"""The runs of an experiments/scaling.py command: the device layouts (mesh of N devices), the
sweep's runs and their 1-GPU references, the resume and fit checks, the config overrides of one
run, --only-missing, and the pool that hands disjoint devices to runs going at once (--jobs).

Only the standard library (the driver plans before any jax starts).
"""

from __future__ import annotations

import os
import pathlib
import threading
from typing import Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYOUTS = ("single", "dp", "fsdp", "fsdp_tp")
# Overrides of every run: stdlib bytes instead of the configs' SlimPajama files (the token
# paths and Mistral's BOS id cleared), no evaluation, no sample, every step logged.
BASE_OVERRIDES = ("data.source=stdlib", "data.train_path=null", "data.val_path=null",
                  "data.tokenizer=null", "data.bos_id=null", "eval.every=0",
                  "sample.max_new_tokens=0", "logging.every=1", "logging.progress=false",
                  "logging.tensorboard=false", "checkpoint.keep=1")


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
