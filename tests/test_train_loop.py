"""The training loop end to end on a small generated corpus: loss falls, run files, resume after
an interruption (in-process stop and a real SIGKILL) equals the uninterrupted run, partial
checkpoints are ignored, shape mismatches and bad settings are clear errors, standalone eval
against a hand computation, the CLI's eval and generate, metrics fetched one step behind, the
profiler window."""

from __future__ import annotations

import json
import math
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import yaml

from gsa_jax import cli
from gsa_jax import train as train_module
from gsa_jax.config import Config, load_config
from gsa_jax.evaluate import evaluate_checkpoint
from gsa_jax.train import train

REPO = pathlib.Path(__file__).parent.parent
NAMES = ["alpha", "beta", "gamma", "delta", "value", "items", "count", "total"]


def write_corpus(root: pathlib.Path, n_files: int = 40, seed: int = 0) -> pathlib.Path:
    """Python-like files with a learnable structure (a byte model's loss falls fast)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n_files):
        lines = []
        for j in range(int(rng.integers(5, 30))):
            a, b = rng.choice(NAMES, 2)
            lines.append(f"def {a}_{j}({b}):\n    return {b} + {int(rng.integers(10))}\n")
        (root / f"mod_{i}.py").write_text("".join(lines))
    return root


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"))


def overrides(corpus, run_dir, steps=12, **extra):
    values = {"run_dir": run_dir, "steps": steps, "model.num_layers": 1, "data.seq_len": 32,
              "data.batch_size": 8, "data.stdlib_root": corpus, "data.val_fraction": 0.2,
              "optim.lr": 3e-3, "optim.warmup_steps": 2, "checkpoint.every": 4,
              "checkpoint.keep": 2, "eval.every": 6, "eval.batches": 2, "logging.every": 1,
              "logging.progress": False, "sample.max_new_tokens": 0}
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def config(corpus, run_dir, steps=12, **extra) -> Config:
    return load_config(None, overrides(corpus, run_dir, steps, **extra))


def losses(run_dir) -> dict[int, float]:
    """step -> train loss; a step logged twice (before a kill and after resuming) keeps the
    last value."""
    out = {}
    for line in (pathlib.Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            out[record["step"]] = record["loss"]
    return out


@pytest.fixture(scope="module")
def reference_run(corpus, tmp_path_factory):
    """An uninterrupted 12-step run."""
    run_dir = tmp_path_factory.mktemp("reference")
    result = train(config(corpus, run_dir), quiet=True)
    return run_dir, result


def test_loss_falls_and_run_files(corpus, tmp_path):
    cfg = config(corpus, tmp_path, steps=40, **{"eval.every": 20})
    result = train(cfg, quiet=True)
    curve = losses(tmp_path)
    assert sorted(curve) == list(range(1, 41))
    assert curve[1] == pytest.approx(math.log(264), abs=0.3)   # starts near uniform
    assert np.mean([curve[s] for s in range(36, 41)]) < curve[1] - 2.0
    records = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in evals] == [20, 40] and evals[1]["val_loss"] < evals[0]["val_loss"]
    assert result["val_loss"] == evals[1]["val_loss"]
    assert all("tokens_per_s" in r for r in records if r.get("step", 0) > 1 and "loss" in r)
    # config.yaml reproduces the run's config; only the last `keep` checkpoints remain.
    assert Config.from_dict(yaml.safe_load((tmp_path / "config.yaml").read_text())) == cfg
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()
                  if p.name.isdigit()) == [36, 40]


def test_resume_after_stop_equals_uninterrupted(corpus, tmp_path, reference_run):
    ref_dir, ref = reference_run
    first = train(config(corpus, tmp_path), stop_at=7, quiet=True)   # last checkpoint: step 4
    assert int(first["state"].step) == 7
    second = train(config(corpus, tmp_path), quiet=True)
    assert losses(tmp_path) == pytest.approx(losses(ref_dir), rel=1e-6)
    assert second["val_loss"] == pytest.approx(ref["val_loss"], rel=1e-6)
    for a, b in zip(jax.tree.leaves(second["state"]), jax.tree.leaves(ref["state"])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
    events = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()
              if "event" in l]
    assert [(e["event"], e["step"]) for e in events] == [("start", 0), ("resume", 4)]


@pytest.mark.slow  # over 30 s on a 2-core CPU: CI's second step
def test_resume_after_sigkill_equals_uninterrupted(corpus, tmp_path):
    """A real `gsa-jax train` process killed with SIGKILL mid-run (possibly mid-save), then
    restarted: the loss curve equals an uninterrupted run's."""
    steps, kill_after = 100, 30
    ref_dir = tmp_path / "ref"
    train(config(corpus, ref_dir, steps=steps, **{"checkpoint.every": 10}), quiet=True)
    run_dir = tmp_path / "killed"
    args = [sys.executable, "-m", "gsa_jax.cli", "train", "--quiet"]
    for item in overrides(corpus, run_dir, steps=steps, **{"checkpoint.every": 10}):
        args += ["--set", item]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen(args, env=env, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    metrics = run_dir / "metrics.jsonl"
    while proc.poll() is None:  # pytest-timeout (pyproject) ends a run that never gets there
        if metrics.exists() and max(losses(run_dir) or [0]) >= kill_after:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stdout.read().decode()[-3000:]
    reached = max(losses(run_dir))
    assert kill_after <= reached < steps
    rerun = subprocess.run(args, env=env, cwd=REPO, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    resumed_from = [json.loads(l)["step"] for l in metrics.read_text().splitlines()
                    if '"resume"' in l]
    assert len(resumed_from) == 1 and resumed_from[0] % 10 == 0 and resumed_from[0] <= reached
    assert losses(run_dir) == pytest.approx(losses(ref_dir), rel=1e-6)


def copy_run(src, dst):
    import shutil
    shutil.copytree(src, dst)
    return dst


def test_partial_checkpoint_is_ignored(corpus, tmp_path, reference_run):
    """A save cut short leaves an orbax temporary directory: it is not a checkpoint."""
    run_dir = copy_run(reference_run[0], tmp_path / "run")
    partial = run_dir / "checkpoints" / "16.orbax-checkpoint-tmp-1700000000000000"
    (partial / "state").mkdir(parents=True)
    (partial / "state" / "garbage").write_bytes(b"\x00" * 10)
    result = train(config(corpus, run_dir, steps=14), quiet=True)
    assert int(result["state"].step) == 14
    events = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()
              if "event" in l]
    assert (events[-1]["event"], events[-1]["step"]) == ("resume", 12)
    assert not partial.exists()      # cleaned up when the checkpointer opened the directory


def test_checkpoint_of_another_model_shape_is_a_clear_error(corpus, tmp_path, reference_run):
    run_dir = copy_run(reference_run[0], tmp_path / "run")
    with pytest.raises(ValueError, match=r"(?s)another shape.*hidden_size: checkpoint 64 vs "
                                         r"config 128"):
        train(config(corpus, run_dir, steps=14, **{"model.hidden_size": 128}), quiet=True)


def test_fresh_start_over_old_checkpoints_is_refused(corpus, tmp_path, reference_run):
    run_dir = copy_run(reference_run[0], tmp_path / "run")
    with pytest.raises(ValueError, match="resume is false but .* holds checkpoints"):
        train(config(corpus, run_dir, **{"checkpoint.resume": False}), quiet=True)


def test_standalone_eval_matches_a_hand_computation(corpus, reference_run):
    """evaluate_checkpoint against the model applied by hand to the first validation windows."""
    run_dir, _ = reference_run
    cfg = load_config(run_dir / "config.yaml")
    result = evaluate_checkpoint(cfg, max_batches=2)
    from gsa_jax.data import load_datasets
    from gsa_jax import session as session_lib
    session = session_lib.build(cfg, read_only=True)
    params, _ = session_lib.restore_params(session)
    val = np.asarray(load_datasets(cfg.data).val, np.int64)
    T, n = cfg.data.seq_len, 2 * cfg.data.batch_size
    windows = np.stack([val[w * T: w * T + T + 1] for w in range(n)])
    seg = np.cumsum(windows[:, :-1] == 256, axis=1)
    logits = jax.jit(session.model.apply)({"params": params}, windows[:, :-1], seg)
    logits = np.asarray(logits, np.float64)
    log_z = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    ce = log_z - np.take_along_axis(logits, windows[:, 1:, None], -1)[..., 0]
    assert result["step"] == 12 and result["val_tokens"] == n * T
    assert result["val_loss"] == pytest.approx(ce.mean(), rel=1e-5)
    assert result["val_ppl"] == pytest.approx(math.exp(ce.mean()), rel=1e-5)


def test_cli_eval_and_generate(reference_run, capsys):
    run_dir, ref = reference_run
    assert cli.main(["eval", "--run-dir", str(run_dir), "--batches", "2"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["step"] == 12 and out["val_loss"] == pytest.approx(ref["val_loss"], rel=1e-6)
    assert cli.main(["generate", "--run-dir", str(run_dir), "--prompt", "def alpha",
                     "--max-new-tokens", "12", "--temperature", "0"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("def alpha") and len(text.encode()) > len("def alpha")


@pytest.mark.parametrize("args,match", [
    (["train", "--config", "missing.yaml"], "does not exist"),
    (["train", "--set", "data.source=tokens", "--set", "data.train_path=/no/such/file.bin"],
     "does not exist"),
    (["train", "--set", "mesh.data=3"], "has 3 devices but 1 are available"),
    (["train", "--set", "optim.lr=-1"], "lr must be positive"),
    (["train", "--set", "model.vocab_size=200"], "model.vocab_size = 200 is smaller"),
    (["eval", "--run-dir", "/no/such/run"], "not found"),
])
def test_cli_errors_are_one_line(args, match, capsys, corpus):
    args = args + ["--set", f"data.stdlib_root={corpus}"] if args[0] == "train" else args
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("gsa-jax: error:") and match in err and "Traceback" not in err


@pytest.fixture(scope="module")
def instrumented_run(corpus, tmp_path_factory):
    """8 steps logged every step, a checkpoint at 5, a profiler window over steps 3-4, with the
    order of step dispatches ("d<n>") and metric fetches ("f<n>") recorded."""
    run_dir = tmp_path_factory.mktemp("instrumented")
    events = []
    build = train_module.session_lib.build

    def recording_build(*args, **kwargs):
        session = build(*args, **kwargs)
        step_fn = session.train_step

        def train_step(state, batch):
            out = step_fn(state, batch)
            events.append(f"d{int(out[0].step)}")   # its value: a sync, after the dispatch
            return out
        session.train_step = train_step
        return session

    finite = train_module._finite_or_stop

    def recording_finite(step, *args):
        events.append(f"f{step}")
        return finite(step, *args)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train_module.session_lib, "build", recording_build)
        patch.setattr(train_module, "_finite_or_stop", recording_finite)
        train(config(corpus, run_dir, steps=8, **{"checkpoint.every": 5, "eval.every": 0,
                                                 "logging.profile_steps": "[3,4]"}),
              quiet=True)
    return run_dir, events


def test_metrics_are_fetched_one_step_behind(instrumented_run):
    """The host reads step n's metrics only after dispatching step n + 1, so it never holds the
    device up between steps; only where it must wait anyway (a checkpoint of step n, the end)
    does it read them at once. The order by hand:"""
    run_dir, events = instrumented_run
    assert events == ["d1", "d2", "f1", "d3", "f2", "d4", "f3", "d5", "f4", "f5",
                      "d6", "d7", "f6", "d8", "f7", "f8"]
    assert sorted(losses(run_dir)) == list(range(1, 9))


def test_profile_window_traces_those_steps(instrumented_run):
    """logging.profile_steps=[3, 4]: a trace under <run_dir>/profile whose train-step
    annotations are steps 3 and 4 exactly, and an event in metrics.jsonl."""
    import gzip
    run_dir, _ = instrumented_run
    runs = list((run_dir / "profile" / "plugins" / "profile").iterdir())
    assert len(runs) == 1
    assert list(runs[0].glob("*.xplane.pb")) and (runs[0] / "perfetto_trace.json.gz").is_file()
    trace = json.loads(gzip.open(next(runs[0].glob("*.trace.json.gz"))).read())
    steps = {int(e["args"]["step_num"]) for e in trace["traceEvents"]
             if e.get("name") == "train" and "step_num" in e.get("args", {})}
    assert steps == {3, 4}
    records = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r for r in records if r.get("event") == "profile"] == [
        {"step": 4, "event": "profile", "steps": [3, 4], "directory": str(run_dir / "profile")}]
