"""experiments/profile_summary.py on hand-made traces: which events count as device time (a
GPU's stream lines, not its derived "XLA Ops" line nor the host; a TPU's "XLA Ops" line; the
CPU runtime's op events), the categories and the per-step arithmetic, checked by hand."""

from __future__ import annotations

import gzip
import json
import math

import pytest

from script_util import load_experiment

ps = load_experiment("profile_summary")


def meta(pid, name, tid=None):
    if tid is None:
        return {"ph": "M", "pid": pid, "name": "process_name", "args": {"name": name}}
    return {"ph": "M", "pid": pid, "tid": tid, "name": "thread_name", "args": {"name": name}}


def op(pid, tid, name, dur, **args):
    return {"ph": "X", "pid": pid, "tid": tid, "ts": 0.0, "dur": dur, "name": name,
            "args": args}


def test_gpu_trace_counts_stream_kernels_only(tmp_path):
    events = [meta(1, "/host:CPU"), meta(2, "/device:GPU:0"), meta(2, "Stream #13", tid=7),
              meta(2, "XLA Ops", tid=8),
              op(1, 3, "PjitFunction(train_step)", 9000.0),            # host: not device time
              op(2, 7, "gla_states_fwd", 100.0), op(2, 7, "gla_grads_bwd", 60.0),
              op(2, 7, "nvjet_tst_128x256_64x4_2x1_v_bz_TNN", 300.0),
              op(2, 7, "loop_add_fusion", 100.0), op(2, 7, "ncclDevKernel_AllReduce_Sum", 40.0),
              op(2, 8, "fusion.3", 700.0)]                              # derived line: skipped
    path = tmp_path / "prof" / "plugins" / "profile" / "t" / "vm.trace.json.gz"
    path.parent.mkdir(parents=True)
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events}, f)
    assert ps.find_trace(tmp_path / "prof") == path
    ops, source = ps.device_events(ps.load_events(path))
    assert sorted(n for n, _, _ in ops) == sorted(
        ["gla_states_fwd", "gla_grads_bwd", "nvjet_tst_128x256_64x4_2x1_v_bz_TNN",
         "loop_add_fusion", "ncclDevKernel_AllReduce_Sum"])
    assert "stream" in source
    s = ps.summarize(ops, steps=2, step_ms=0.5)
    cats = {c["category"]: c["ms_per_step"] for c in s["categories"]}
    assert cats == pytest.approx({"GSA kernels (Pallas)": 0.08, "matmuls": 0.15,
                                  ps.OTHER: 0.05, "collectives": 0.02})
    assert s["device_ms_per_step"] == pytest.approx(0.30)
    assert s["device_busy"] == pytest.approx(0.6)
    assert s["categories"][0]["category"] == "matmuls"          # largest first
    assert math.isclose(s["categories"][0]["share"], 0.5)
    assert s["top_ops"][0] == {"op": "nvjet_tst_128x256_64x4_2x1_v_bz_TNN",
                               "category": "matmuls", "ms_per_step": pytest.approx(0.15),
                               "calls_per_step": 0.5}
    assert any("| matmuls | 0.150 | 50.0% |" == line for line in ps.markdown_lines(s))


def test_tpu_trace_uses_the_xla_ops_line():
    events = [meta(5, "/device:TPU:0"), meta(5, "XLA Ops", tid=1), meta(5, "Steps", tid=2),
              op(5, 1, "gla_tpu_forward", 30.0), op(5, 1, "convolution.4", 70.0),
              op(5, 2, "train 3", 500.0)]
    ops, source = ps.device_events(events)
    assert [n for n, _, _ in ops] == ["gla_tpu_forward", "convolution.4"]
    assert "XLA Ops" in source
    cats = {c["category"]: c["share"] for c in ps.summarize(ops, steps=1)["categories"]}
    assert cats == pytest.approx({"GSA kernels (Pallas)": 0.3, "matmuls": 0.7})


def test_cpu_trace_counts_runtime_ops_by_hlo_name():
    events = [meta(9, "/host:CPU"),
              op(9, 1, "$threading.py:295 wait", 1e6),                  # Python: not an op
              op(9, 2, "dot.7", 40.0, hlo_op="dot.7", hlo_module="jit_step"),
              op(9, 3, "wrapped_transpose", 10.0, hlo_op="wrapped_transpose"),
              op(9, 3, "add_exponential_fusion", 50.0, hlo_op="add_exponential_fusion")]
    ops, source = ps.device_events(events)
    assert len(ops) == 3 and "CPU" in source
    cats = {c["category"]: c["ms_per_step"] for c in ps.summarize(ops, steps=1)["categories"]}
    assert cats == pytest.approx({"matmuls": 0.04, "copies and transposes": 0.01,
                                  ps.OTHER: 0.05})
    with pytest.raises(ValueError):
        ps.summarize(ops, steps=0)
