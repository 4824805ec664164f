"""Where a training step's device time goes, read from a jax.profiler trace.

    python experiments/profile_summary.py <run_dir>/profile --steps 5

The trainer writes a trace with `logging.profile_steps: [first, last]` (README, "Reading a
profile"); `train_throughput.py --profile FIRST LAST` does that and adds this summary to its
report. The trace (`<host>.trace.json.gz`) lists every executed op with its duration; summed per
category and divided by the steps traced, it names what caps the MFU: the share of matmuls
(what the peak FLOPs are counted for) against the GSA kernels, the other XLA fusions
(elementwise, norms, softmax, the optimizer) and the collectives.

Which events count as device time:
- GPU / TPU: the events of the `/device:...` processes; on a GPU only the stream lines (a
  trace may also hold derived lines such as "XLA Ops" over the same kernels), on a TPU the "XLA
  Ops" line;
- CPU (no device process): the XLA CPU runtime's op events (those naming an `hlo_op`), summed
  over its threads, so the total can exceed the wall time.

An event is put in the first category whose pattern matches its name or its hlo_op
(`CATEGORIES`), else in "other XLA ops".
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import pathlib
import re
from typing import Iterable, Optional

# first match wins (the GSA kernels are Triton or Mosaic kernels named gla_* / gsa_*)
CATEGORIES = (
    ("GSA kernels (Pallas)", r"\bgla_|\bgsa_|pallas"),
    ("softmax attention (cuDNN)", r"cudnn|fmha|flash_?attn"),
    ("matmuls", r"gemm|cublas|cutlass|xmma|nvjet|wgmma|\bdot(?:_general)?\b|dot\.|matmul|"
                r"convolution"),
    ("collectives", r"nccl|all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute|"
                    r"allreduce|allgather|reducescatter"),
    ("copies and transposes", r"memcpy|memset|\bcopy|transpose"),
)
OTHER = "other XLA ops (elementwise, norms, reductions, optimizer)"


def find_trace(directory) -> pathlib.Path:
    """The newest <host>.trace.json.gz under `directory` (a run's profile folder)."""
    files = sorted(pathlib.Path(directory).glob("**/*.trace.json.gz"),
                   key=lambda p: p.stat().st_mtime)
    if not files:
        raise FileNotFoundError(f"no *.trace.json.gz under {directory}: was the run traced "
                                "(logging.profile_steps) and did it reach the last step?")
    return files[-1]


def load_events(path) -> list:
    with gzip.open(path) as f:
        data = json.load(f)
    return data["traceEvents"] if isinstance(data, dict) else data


def device_events(events: list) -> tuple[list, str]:
    """([(name, hlo_op, dur_us)], source): the op events that are device time (module doc)."""
    process, thread = {}, {}
    for e in events:
        if e.get("ph") == "M" and e.get("name") == "process_name":
            process[e["pid"]] = e["args"]["name"]
        elif e.get("ph") == "M" and e.get("name") == "thread_name":
            thread[(e["pid"], e.get("tid"))] = e["args"]["name"]
    ops = [e for e in events if e.get("ph") == "X" and "dur" in e]
    devices = {pid for pid, name in process.items() if name.startswith("/device:")}
    chosen, source = [], "the CPU's XLA runtime op events, summed over its threads"
    for pid in sorted(devices):
        lines = {tid: thread.get((pid, tid), "") for tid in {e.get("tid") for e in ops
                                                             if e["pid"] == pid}}
        streams = {t for t, n in lines.items() if n.lower().startswith("stream")}
        xla_ops = {t for t, n in lines.items() if n == "XLA Ops"}
        keep = streams or xla_ops or set(lines)
        chosen += [e for e in ops if e["pid"] == pid and e.get("tid") in keep]
        source = f"{process[pid]}: " + ("stream lines" if streams else
                                        "XLA Ops line" if xla_ops else "every line")
    if not devices:
        chosen = [e for e in ops if "hlo_op" in (e.get("args") or {})]
    out = [(e["name"], (e.get("args") or {}).get("hlo_op", ""), float(e["dur"]))
           for e in chosen]
    return out, (source if len(devices) <= 1 else f"{len(devices)} devices, summed")


def category(name: str, hlo_op: str = "") -> str:
    text = f"{name} {hlo_op}".lower()
    for label, pattern in CATEGORIES:
        if re.search(pattern, text):
            return label
    return OTHER


def summarize(ops: Iterable[tuple], steps: int, step_ms: Optional[float] = None,
              top: int = 12) -> dict:
    """Device ms per step per category (and share of the total), the `top` ops by time; with
    the step's wall time, the share of it the device was busy."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    by_cat, by_op, count = collections.Counter(), collections.Counter(), collections.Counter()
    for name, hlo_op, dur in ops:
        by_cat[category(name, hlo_op)] += dur
        by_op[name] += dur
        count[name] += 1
    total = sum(by_cat.values())
    ms = lambda us: us / 1e3 / steps  # noqa: E731
    out = {"steps": steps, "device_ms_per_step": ms(total),
           "categories": [{"category": c, "ms_per_step": ms(t),
                           "share": t / total if total else 0.0}
                          for c, t in by_cat.most_common()],
           "top_ops": [{"op": n, "category": category(n), "ms_per_step": ms(t),
                        "calls_per_step": count[n] / steps}
                       for n, t in by_op.most_common(top)]}
    if step_ms:
        out["step_ms"] = step_ms
        out["device_busy"] = ms(total) / step_ms
    return out


def markdown_lines(summary: dict, source: str = "") -> list[str]:
    s = summary
    head = (f"Device time per step, {s['steps']} traced steps: {s['device_ms_per_step']:.2f} ms"
            + (f" of a {s['step_ms']:.2f} ms step ({100 * s['device_busy']:.0f}% busy)"
               if "step_ms" in s else "") + (f"; from {source}" if source else "") + ".")
    lines = [head, "", "| category | ms / step | share |", "|---|---:|---:|"]
    lines += [f"| {c['category']} | {c['ms_per_step']:.3f} | {100 * c['share']:.1f}% |"
              for c in s["categories"]]
    lines += ["", "| op | category | ms / step | calls / step |", "|---|---|---:|---:|"]
    lines += [f"| `{o['op'][:70]}` | {o['category']} | {o['ms_per_step']:.3f} | "
              f"{o['calls_per_step']:g} |" for o in s["top_ops"]]
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("directory", help="a profile folder (<run_dir>/profile) or a trace's folder")
    p.add_argument("--steps", type=int, required=True, help="train steps the trace covers")
    p.add_argument("--step-ms", type=float, default=None, help="a step's wall time, if known")
    a = p.parse_args(argv)
    ops, source = device_events(load_events(find_trace(a.directory)))
    print("\n".join(markdown_lines(summarize(ops, a.steps, a.step_ms), source)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
