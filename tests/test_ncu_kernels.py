"""experiments/ncu_kernels.py's reading of Nsight Compute's CSV (the GPU run itself needs ncu
and a GPU: experiments/results/ncu_kernels_h200*.md)."""

import json

from experiments import ncu_kernels

HEADER = ('"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream",'
          '"Block Size","Grid Size","Device","CC","Section Name","Metric Name","Metric Unit",'
          '"Metric Value"\n')


def _row(launch, kernel, section, name, unit, value):
    return (f'"{launch}","7","python","h","{kernel}","1","7","(256, 1, 1)","(8, 16, 1)","0",'
            f'"9.0","{section}","{name}","{unit}","{value}"\n')


def _csv():
    return ("==PROF== Connected to process 7\n" + HEADER
            + _row(0, "gla_fused_fwd", "GPU Speed Of Light Throughput", "Duration", "us",
                   "272.5")
            + _row(0, "gla_fused_fwd", "GPU Speed Of Light Throughput", "Memory Throughput",
                   "%", "54.65")
            + _row(0, "gla_fused_fwd", "Memory Workload Analysis", "Memory Throughput",
                   "byte/s", "956,314,917,127.07")
            + _row(0, "gla_fused_fwd", "GPU Speed Of Light Throughput", "DRAM Throughput", "%",
                   "19.88")
            + _row(0, "gla_fused_fwd", "Command line profiler metrics",
                   ncu_kernels.LOCAL_BYTES[0], "byte", "143,130,624")
            + _row(0, "gla_fused_fwd", "Launch Statistics", "Dynamic Shared Memory Per Block",
                   "byte/block", "114,688")
            + _row(1, "gla_grads_bwd", "GPU Speed Of Light Throughput", "Duration", "ms",
                   "2.49")
            + _row(1, "gla_grads_bwd", "Launch Statistics", "Registers Per Thread",
                   "register/thread", "255"))


def test_parse_csv_converts_units_and_keeps_each_launch():
    """Durations to ms, local bytes to MB, shared memory to KB, thousands separators read;
    the percentage and the byte/s reading of the same metric name kept apart; one dict per
    launch in launch order, skipping ncu's log lines before the header."""
    first, second = ncu_kernels.parse_csv(_csv())
    assert (first["id"], first["kernel"], second["kernel"]) == (0, "gla_fused_fwd",
                                                                 "gla_grads_bwd")
    assert abs(first["Duration"] - 0.2725) < 1e-12 and abs(second["Duration"] - 2.49) < 1e-12
    assert first["Memory Throughput %"] == 54.65
    assert first["Memory Throughput"] == 956314917127.07   # byte/s, not the percentage
    assert first["DRAM Throughput %"] == 19.88
    assert abs(first[ncu_kernels.LOCAL_BYTES[0]] - 143.130624) < 1e-9
    assert abs(first["Dynamic Shared Memory Per Block"] - 114.688) < 1e-9
    assert second["Registers Per Thread"] == 255.0 and first["Grid Size"] == "(8, 16, 1)"


def test_parse_mode_writes_a_report_keeping_the_gpu_runs_machine(tmp_path):
    """`--parse` re-reads a CSV into the report; a record of the same tag already in the folder
    (the GPU run's) gives the machine and command, and the table has one row per launch."""
    csv_path = tmp_path / "run.csv"
    csv_path.write_text(_csv())
    gpu_env = {"device_kind": "NVIDIA H200", "backend": "gpu", "device_count": 1}
    (tmp_path / "ncu_kernels_t.json").write_text(json.dumps(
        {"environment": gpu_env, "command": "python experiments/ncu_kernels.py --tag t"}))
    assert ncu_kernels.main(["--tag", "t", "--parse", str(csv_path), "--shapes", "0",
                             "--out-dir", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "ncu_kernels_t.json").read_text())
    assert record["environment"]["device_kind"] == "NVIDIA H200"
    assert record["rows"][0]["shape"] == [8, 2048, 16, 128, 64]
    md = (tmp_path / "ncu_kernels_t.md").read_text()
    assert "NVIDIA H200" in md and "| `gla_grads_bwd` | 2.49 |" in md
    assert "| `gla_fused_fwd` | 0.273 | " in md and " 143 | " in md
