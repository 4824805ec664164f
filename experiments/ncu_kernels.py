"""Hardware counters of the GSA Pallas kernels (Nsight Compute), one row per kernel launch.

profile_kernels says which kernel takes the time; this says why: for each Pallas kernel of one
jitted forward+backward (or forward) it reads ncu's duration, SM and memory throughput (% of
peak), DRAM bandwidth, achieved vs theoretical occupancy, registers per thread, local-memory
(spill) traffic and the warps' cycles per issued instruction. A kernel near the memory peak wants
fewer bytes; one at low throughput on both with few warps per SM wants more parallelism or less
latency per step; local-memory bytes confirm or refute the CPU spill reading
(kernel_registers.py).

    python experiments/ncu_kernels.py --tag h200 --shapes 0 5 --out-dir $OUT     # GPU, ncu
    python experiments/ncu_kernels.py --tag x --parse a.csv --shapes 0           # re-read a CSV

The script runs ncu on itself (`--target`): the first call of the jitted function launches each
Pallas kernel once after compilation (compiling launches none of them), so ncu profiles the
first `--launch-count` launches whose name starts with `gla_`/`gsa_` (kernel replay: each launch
is re-run once per counter pass, the device's memory restored between passes). Clocks are left
alone (`--clock-control none`), as the device notes ask. Results:
results/ncu_kernels_<tag>.{json,md} and the raw CSV per shape.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import shutil
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments import common  # noqa: E402

SECTIONS = ("SpeedOfLight", "LaunchStats", "Occupancy", "MemoryWorkloadAnalysis",
            "WarpStateStats")
LOCAL_BYTES = ("l1tex__t_bytes_pipe_lsu_mem_local_op_ld.sum",
               "l1tex__t_bytes_pipe_lsu_mem_local_op_st.sum")
KERNEL_REGEX = "regex:(gla_|gsa_)"

# (column, ncu metric name as the details page prints it): the table's columns
COLUMNS = (
    ("ms", "Duration"),
    ("SM %", "Compute (SM) Throughput"),
    ("mem %", "Memory Throughput %"),
    ("DRAM %", "DRAM Throughput %"),
    ("waves/SM", "Waves Per SM"),
    ("occ. achieved %", "Achieved Occupancy"),
    ("occ. theor. %", "Theoretical Occupancy"),
    ("regs", "Registers Per Thread"),
    ("smem KB", "Dynamic Shared Memory Per Block"),
    ("grid", "Grid Size"),
    ("warp cyc/issue", "Warp Cycles Per Issued Instruction"),
    ("local ld MB", LOCAL_BYTES[0]),
    ("local st MB", LOCAL_BYTES[1]),
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tag", default="gpu")
    p.add_argument("--shapes", type=int, nargs="+", default=[0, 5],
                   help="indices into bench_kernels.ALL")
    p.add_argument("--pass", dest="which", choices=("fwd", "fwd_bwd"), default="fwd_bwd")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--gate-scale", type=float, default=8.0)
    p.add_argument("--launch-count", type=int, default=12,
                   help="Pallas kernel launches profiled per shape (one call's worth)")
    p.add_argument("--ncu", default="ncu", help="the Nsight Compute command")
    p.add_argument("--parse", nargs="+", metavar="CSV",
                   help="only read these ncu CSV files (details page) into the report")
    p.add_argument("--note", action="append", default=[],
                   help="a line for the report (how the run was made); repeatable")
    p.add_argument("--target", type=int, metavar="SHAPE", help=argparse.SUPPRESS)
    p.add_argument("--out-dir", default=str(common.RESULTS_DIR))
    return p.parse_args(argv)


def run_target(args) -> int:
    """The profiled program: one call of the jitted pass (its kernels' first launches)."""
    import jax
    import jax.numpy as jnp

    from experiments.bench_kernels import ALL, document_ids, gsa_fn, loss_grad, make_inputs

    shape = ALL[args.target]
    inputs = make_inputs(shape, jnp.dtype(args.dtype), gate_scale=args.gate_scale)
    f = gsa_fn("pallas", document_ids(shape))
    if args.which == "fwd_bwd":
        cot = jax.random.normal(jax.random.PRNGKey(3), shape[:3] + (shape[3],), jnp.float32)
        f = loss_grad(f, cot)
    fn = jax.jit(f).lower(*inputs).compile()
    jax.block_until_ready(fn(*inputs))
    return 0


def number(text: str):
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return text


def parse_csv(text: str) -> list[dict]:
    """ncu `--csv --page details` rows -> one dict per launch: kernel, id and metric values,
    durations in ms, local bytes in MB, shared memory in KB (whatever unit ncu printed)."""
    start = text.find('"ID"')
    launches: dict[int, dict] = {}
    for row in csv.DictReader(io.StringIO(text[start:] if start >= 0 else "")):
        launch = launches.setdefault(int(row["ID"]), {
            "id": int(row["ID"]), "kernel": row["Kernel Name"], "Grid Size": row["Grid Size"],
            "Block Size": row["Block Size"]})
        name, unit, value = row["Metric Name"], row.get("Metric Unit", ""), number(
            row["Metric Value"])
        if isinstance(value, float):
            scale = {"ns": 1e-6, "us": 1e-3, "usecond": 1e-3, "ms": 1.0, "msecond": 1.0,
                     "nsecond": 1e-6, "s": 1e3, "second": 1e3}
            if name == "Duration" and unit in scale:
                value *= scale[unit]
            elif name in LOCAL_BYTES:
                value *= {"byte": 1e-6, "Kbyte": 1e-3, "Mbyte": 1.0, "Gbyte": 1e3}.get(unit, 1e-6)
            elif name in ("DRAM Throughput", "Memory Throughput") and unit == "%":
                name += " %"   # both also come as byte/s in another section
            elif name == "Dynamic Shared Memory Per Block":
                value *= {"byte": 1e-3, "Kbyte": 1.0, "Mbyte": 1e3}.get(unit.split("/")[0], 1.0)
        launch.setdefault(name, value)
    return [launches[i] for i in sorted(launches)]


def markdown(record: dict) -> str:
    lines = [f"# Hardware counters of the GSA kernels ({record['tag']})", "",
             f"Nsight Compute, one launch per row (the first call after compilation), "
             f"{record['dtype']}, gates g = logsigmoid(x) / {record['gate_scale']:g}, pass "
             f"{record['which']}; clocks not locked (--clock-control none). 'mem %' is the "
             f"busiest memory unit's share of its peak, 'SM %' the busiest SM pipe's; "
             f"'local' is spill traffic (local memory).", ""]
    if record.get("tuning_env"):
        lines += [f"Launch tuning: $GSA_PALLAS_TUNING = `{record['tuning_env']}`", ""]
    if record.get("notes"):
        lines += [f"Note: {note}" for note in record["notes"]] + [""]
    if record.get("parsed_from_csv"):
        lines += ["Read by `--parse` from ncu's CSV, written on the GPU machine: "
                  + ", ".join(f"`{r.get('csv')}`" for r in record["rows"])
                  + (" (machine and command: the GPU run's record)." if
                     record.get("environment") else
                     " (the footer's machine is the one that read it)."), ""]
    for row in record["rows"]:
        lines += [f"## {tuple(row['shape'])}", ""]
        if row.get("error"):
            lines += [f"ncu failed: {row['error']}", ""]
            continue
        body = []
        for launch in row["launches"]:
            cells = [f"`{launch['kernel'].split('(')[0][:40]}`"]
            for _, metric in COLUMNS:
                value = launch.get(metric, "")
                cells.append(f"{value:.3g}" if isinstance(value, float) else str(value))
            body.append(cells)
        lines += [common.markdown_table(["kernel"] + [c for c, _ in COLUMNS], body), ""]
    return "\n".join(lines)


def profile(args, index: int) -> dict:
    from experiments.bench_kernels import ALL

    shape = ALL[index]
    csv_path = os.path.join(args.out_dir, f"ncu_kernels_{args.tag}_shape{index}.csv")
    cmd = [args.ncu, "--clock-control", "none", "--target-processes", "all",
           "--kernel-name", KERNEL_REGEX, "--launch-count", str(args.launch_count),
           "--metrics", ",".join(LOCAL_BYTES), "--csv", "--page", "details"]
    for section in SECTIONS:
        cmd += ["--section", section]
    cmd += [sys.executable, os.path.abspath(__file__), "--target", str(index), "--pass",
            args.which, "--dtype", args.dtype, "--gate-scale", str(args.gate_scale)]
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
    print(" ".join(cmd), flush=True)
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    with open(csv_path, "w") as fh:
        fh.write(done.stdout)
    launches = parse_csv(done.stdout)
    row = {"shape": list(shape), "index": index, "csv": os.path.basename(csv_path),
           "launches": launches}
    if done.returncode != 0 or not launches:
        row["error"] = f"exit {done.returncode}: " + (done.stderr or done.stdout)[-800:]
    print(f"{shape}: {len(launches)} launches profiled", flush=True)
    return row


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.target is not None:
        return run_target(args)
    os.makedirs(args.out_dir, exist_ok=True)
    extra = {}
    if args.parse:   # a CSV written on the GPU machine: label rows with --shapes, in order
        # the GPU run's own record (same tag and folder), if here, keeps its machine and command
        previous = common.results_paths(args.tag, "ncu_kernels", args.out_dir)["json"]
        if previous.exists():
            kept = json.loads(previous.read_text())
            extra = {k: kept[k] for k in ("environment", "command", "tuning_env") if k in kept}
        from experiments.bench_kernels import ALL
        rows = []
        for i, path in enumerate(args.parse):
            shape = list(ALL[args.shapes[i]]) if i < len(args.shapes) else [path]
            with open(path) as fh:
                rows.append({"shape": shape, "csv": os.path.basename(path),
                             "launches": parse_csv(fh.read())})
    else:
        if shutil.which(args.ncu) is None:
            print(f"{args.ncu} not found: this script needs Nsight Compute", file=sys.stderr)
            return 2
        rows = [profile(args, i) for i in args.shapes]
    record = {"tag": args.tag, "dtype": args.dtype, "gate_scale": args.gate_scale,
              "which": args.which, "rows": rows, "parsed_from_csv": bool(args.parse),
              "command": common.command_line(argv), "notes": args.note,
              "tuning_env": os.environ.get("GSA_PALLAS_TUNING", ""), **extra}
    common.write_and_print(args.tag, "ncu_kernels", record, markdown(record),
                           out_dir=args.out_dir)
    return 0 if all(not r.get("error") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
