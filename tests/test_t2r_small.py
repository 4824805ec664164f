"""experiments/t2r_small.py at its --smoke size, in a fresh Python process (it sets jax's
compilation cache): it finishes, and its results are complete: the five runs (pretrained
Transformer, three conversions, GSA from scratch) with finite validation curves, the converted
runs' curves starting at step 0, the same token budget for every finetune and the scratch run,
the claim entries, machine and command, the markdown table, and a plot where matplotlib is
installed."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAVE_PLOT = importlib.util.find_spec("matplotlib") is not None
RUNS = ["transformer", "gsa_t2r", "gla_t2r", "retnet_t2r", "gsa_scratch"]


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


@pytest.mark.slow  # over 30 s on a 2-core CPU: CI's second step
def test_t2r_small_smoke(tmp_path):
    argv = ["--smoke", "--tag", "test", "--out-dir", str(tmp_path), "--work-dir",
            str(tmp_path / "work"), "--no-progress"]
    cmd = [sys.executable, os.path.join(ROOT, "experiments", "t2r_small.py"), *argv]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"

    report = json.loads((tmp_path / "t2r_small_test.json").read_text())
    assert list(report["runs"]) == RUNS
    assert report["command"].endswith(" ".join(argv))
    assert {"backend", "device_kind", "jax", "python"} <= set(report["environment"])
    size = report["size"]
    for name, run in report["runs"].items():
        steps = size["pretrain_steps"] if name == "transformer" else size["finetune_steps"]
        assert run["steps"] == steps and run["params"] > 0
        assert _finite(run["final_val_ppl"]) and _finite(run["final_val_loss"])
        curve = run["curve"]
        assert curve and all(_finite(p["val_ppl"]) and p["val_ppl"] > 1 for p in curve)
        assert curve[-1]["step"] == steps
        assert curve[-1]["tokens"] == steps * report["tokens_per_step"]
        assert math.isclose(curve[-1]["val_ppl"], run["final_val_ppl"])
        # The converted models are evaluated before finetuning; the others start at random.
        assert (curve[0]["step"] == 0) == (run["init"] == "t2r"), name
    runs = report["runs"]
    assert {runs[n]["mixer"] for n in RUNS} == {"attention", "gsa", "gla", "retnet"}
    assert runs["gsa_t2r"]["params"] == runs["gsa_scratch"]["params"]
    assert set(report["claim"]) == {"gsa_t2r_beats_scratch", "gsa_best_conversion",
                                    "gsa_t2r_ppl_ratio_to_transformer"}

    md = (tmp_path / "t2r_small_test.md").read_text()
    for name in RUNS:
        assert f"| {runs[name]['label']} |" in md
    assert report["command"] in md
    assert (tmp_path / "t2r_small_test.png").is_file() == HAVE_PLOT
    for mixer in ("gsa", "gla", "retnet"):  # the conversions went through params checkpoints
        assert (tmp_path / "work" / f"converted_{mixer}" / "model.yaml").is_file()
