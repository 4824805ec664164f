"""experiments/train_throughput.py on the tiny config: it trains with the project's trainer and
its recorded summary is what the run's metrics.jsonl says (medians recomputed here with NumPy
from the raw lines), with the machine and command in the files."""

from __future__ import annotations

import json
import math
import os

import numpy as np

import pytest

from script_util import ROOT, load_experiment


@pytest.mark.slow  # over 30 s on a 2-core CPU: CI's second step
def test_tiny_run_summary_matches_its_metrics(tmp_path):
    script = load_experiment("train_throughput")
    run_dir = tmp_path / "run"
    overrides = [f"run_dir={run_dir}", "steps=12", "logging.every=4", "eval.every=0",
                 "eval.batches=2", "checkpoint.every=0", "sample.max_new_tokens=0",
                 "logging.progress=false", "data.batch_size=4", "data.seq_len=64"]
    argv = ["--config", os.path.join(ROOT, "configs", "tiny.yaml"), "--tag", "test",
            "--out-dir", str(tmp_path), "--profile", "9", "11"]
    for item in overrides:
        argv += ["--set", item]
    report = script.main(argv)

    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in lines if "loss" in r and "event" not in r]
    assert [r["step"] for r in train] == [4, 8, 12]
    timed = [r["tokens_per_s"] for r in train if "tokens_per_s" in r]
    assert len(timed) == 3 and all(t > 0 and math.isfinite(t) for t in timed)
    summary = report["summary"]
    assert summary["logged_intervals"] == 3
    assert summary["tokens_per_s_median"] == float(np.median(timed))
    assert summary["tokens_per_s_max"] == max(timed)
    assert (summary["loss_first"], summary["loss_last"]) == (train[0]["loss"], train[-1]["loss"])
    assert summary["loss_curve"] == [[r["step"], r["loss"]] for r in train]
    final_eval = [r for r in lines if "val_loss" in r][-1]
    assert summary["val_loss_last"] == final_eval["val_loss"]
    assert report["params"] == next(r for r in lines if r.get("event") == "start")["params"]

    saved = json.loads((tmp_path / "train_throughput_test.json").read_text())
    assert saved["summary"]["tokens_per_s_median"] == summary["tokens_per_s_median"]
    assert saved["environment"]["device_kind"] and saved["command"].startswith(
        "python experiments/train_throughput.py --config")
    md = (tmp_path / "train_throughput_test.md").read_text()
    assert f"{summary['tokens_per_s_median']:,.0f}" in md and "Machine:" in md
    # --profile 9 11: the trace of those 3 steps, its device time split into categories
    prof = report["profile"]
    assert (prof["first"], prof["last"], prof["summary"]["steps"]) == (9, 11, 3)
    cats = prof["summary"]["categories"]
    assert cats and math.isclose(sum(c["ms_per_step"] for c in cats),
                                 prof["summary"]["device_ms_per_step"], rel_tol=1e-9)
    assert any(c["category"] == "matmuls" and c["ms_per_step"] > 0 for c in cats)
    assert math.isclose(sum(c["share"] for c in cats), 1.0, rel_tol=1e-9)
    assert "## Profile of steps 9-11" in md
