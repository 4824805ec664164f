"""experiments/compile_time.py: its smoke run records a compile time per layout and preset, and
train steps of the scanned and unscanned model from the same weights (so the same losses), with
the machine and command in the files; --kinds picks the parts."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from script_util import load_experiment


@pytest.fixture
def restore_jax_settings(monkeypatch):
    """The script switches the compilation cache off and sets XLA_FLAGS for its own process."""
    monkeypatch.setenv("XLA_FLAGS", __import__("os").environ.get("XLA_FLAGS", ""))
    before = jax.config.jax_enable_compilation_cache
    yield
    jax.config.update("jax_enable_compilation_cache", before)


@pytest.mark.slow  # two train-step compiles per part: ~1 min on a 2-core CPU
def test_smoke_run_records_both_layouts(tmp_path, restore_jax_settings):
    script = load_experiment("compile_time")
    report = script.main(["--tag", "test", "--smoke", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "compile_time_test.json").read_text())
    md = (tmp_path / "compile_time_test.md").read_text()
    rows = saved["rows"]
    comp = [r for r in rows if r["part"] == "compile"]
    train = [r for r in rows if r["part"] == "train"]
    assert [(r["preset"], r["scan"]) for r in comp] == [("gsa-tiny", False), ("gsa-tiny", True)]
    for r in comp:
        assert r["layers"] == 2 and 0 < r["lower_s"] < r["total_s"]
        assert r["total_s"] == pytest.approx(r["lower_s"] + r["compile_s"])
    assert [r["scan"] for r in train] == [False, True]
    for r in train:
        assert len(r["losses"]) == 3 and r["tokens_per_s"] > 0
        assert r["tokens_per_s"] == pytest.approx(2 * 64 / (r["step_ms_median"] / 1e3))
    # Same weights in both layouts: the same losses, step after step.
    np.testing.assert_allclose(train[0]["losses"], train[1]["losses"], rtol=1e-5)
    assert saved["environment"]["backend"] == jax.default_backend()
    assert "experiments/compile_time.py" in saved["command"] and "--smoke" in saved["command"]
    assert "layers scanned" in md and "Machine:" in md and "tokens/s" in md
    assert report["paths"]["md"].endswith("compile_time_test.md")


def test_kinds_pick_the_parts(tmp_path, monkeypatch, restore_jax_settings):
    """--kinds compile runs no train step, --kinds train compiles nothing ahead (the cases
    themselves are stubbed: this checks the dispatch and the report)."""
    script = load_experiment("compile_time")
    calls = []
    monkeypatch.setattr(script, "compile_case", lambda args, preset, scan: calls.append(
        ("compile", preset, scan)) or {"part": "compile", "preset": preset, "layers": 2,
                                       "scan": scan, "params": 1e5, "lower_s": 1.0,
                                       "compile_s": 3.0 if not scan else 1.0,
                                       "total_s": 4.0 if not scan else 2.0})
    monkeypatch.setattr(script, "train_cases", lambda args: calls.append(("train",)) or [])
    report = script.main(["--tag", "a", "--kinds", "compile", "--presets", "gsa-tiny",
                          "--out", str(tmp_path)])
    assert calls == [("compile", "gsa-tiny", False), ("compile", "gsa-tiny", True)]
    md = (tmp_path / "compile_time_a.md").read_text()
    assert "scanned compiles 2.0x faster" in md and "Train steps" not in md
    calls.clear()
    script.main(["--tag", "b", "--kinds", "train", "--out", str(tmp_path)])
    assert calls == [("train",)]
    assert report["config"]["kinds"] == ["compile"]
