"""The read-only paths (eval, generate, the lm-eval adapter, convert/export's run reader) restore
the checkpoint's params only (never the optimizer state) and open only the data they need (eval:
the validation file; the others: no token file at all), with the results of the trained params
themselves."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from gsa_jax import checkpoint as checkpoint_lib
from gsa_jax.config import load_config
from gsa_jax.data import tokens as token_files


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 2-step run of a 1-layer byte model on token files (checkpoint at the end) and its
    final state."""
    from gsa_jax.train import train
    data = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    for name, n in (("train", 4000), ("val", 600)):
        ids = rng.integers(0, 256, n)
        ids[::50] = 256  # document separators
        token_files.write_token_file(data / f"{name}.bin", ids, vocab_size=257, bos_id=256,
                                     tokenizer="bytes")
    run_dir = tmp_path_factory.mktemp("run")
    values = {"run_dir": run_dir, "steps": 2, "model.num_layers": 1, "data.source": "tokens",
              "data.train_path": data / "train.bin", "data.val_path": data / "val.bin",
              "data.seq_len": 16, "data.batch_size": 2, "optim.warmup_steps": 1,
              "checkpoint.every": 0, "eval.every": 0, "eval.batches": 3,
              "logging.progress": False, "sample.max_new_tokens": 0}
    config = load_config(None, [f"{k}={v}" for k, v in values.items()])
    state = train(config, quiet=True)["state"]
    return run_dir, config, jax.tree.map(np.asarray, jax.device_get(state.params))


@pytest.fixture
def spy(monkeypatch):
    """Records every Checkpointer.restore (params_only or not) and every token file read."""
    seen = {"restores": [], "token_files": []}
    restore, read = checkpoint_lib.Checkpointer.restore, token_files.read_token_file

    def spy_restore(self, abstract, step=None, *, params_only=False):
        seen["restores"].append(params_only)
        return restore(self, abstract, step, params_only=params_only)

    def spy_read(path, dtype=None):
        seen["token_files"].append(str(path))
        return read(path, dtype)
    monkeypatch.setattr(checkpoint_lib.Checkpointer, "restore", spy_restore)
    monkeypatch.setattr(token_files, "read_token_file", spy_read)
    return seen


def _equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_eval_reads_params_and_the_validation_file_only(run, spy):
    from gsa_jax import session as session_lib
    from gsa_jax.evaluate import evaluate, evaluate_checkpoint, validation_batches
    run_dir, config, params = run
    result = evaluate_checkpoint(config, max_batches=3)
    assert spy["restores"] == [True]
    assert spy["token_files"] == [config.data.val_path]
    # The same numbers as the trained params on the validation batches of a full session.
    session = session_lib.build(config, read_only=True)
    session.checkpointer.close()
    want = evaluate(session.eval_step, params, validation_batches(session, 3), session.mesh)
    assert result["step"] == 2
    for key in ("val_loss", "val_tokens"):
        assert result[key] == pytest.approx(want[key], rel=1e-6)


def test_generate_reads_params_and_no_token_file(run, spy, capsys):
    from gsa_jax import cli
    from gsa_jax import session as session_lib
    from gsa_jax.config import SampleConfig
    from gsa_jax.train import sample_text
    run_dir, config, params = run
    assert cli.main(["generate", "--run-dir", str(run_dir), "--prompt", "ab",
                     "--max-new-tokens", "6", "--seed", "3"]) == 0
    text = capsys.readouterr().out.rstrip("\n")
    assert spy["restores"] == [True] and spy["token_files"] == []
    session = session_lib.build(config, read_only=True, splits=())
    session.checkpointer.close()
    want = sample_text(session, params, SampleConfig(prompt="ab", max_new_tokens=6, seed=3))
    assert text == want and text.startswith("ab")


def test_lm_eval_adapter_reads_params_and_no_token_file(run, spy):
    from gsa_jax.lm_eval_adapter import GSAJaxLM
    run_dir, config, params = run
    core = GSAJaxLM.from_run_dir(str(run_dir), batch_size=2)
    assert spy["restores"] == [True] and spy["token_files"] == []
    _equal(core.params["params"], params)
    assert core.bos_id == 256 and core.max_length == 16


def test_convert_and_export_read_params_only(run, spy, tmp_path):
    from gsa_jax.convert import restore_run
    from gsa_jax.export import export_run
    run_dir, config, params = run
    model, got, step = restore_run(run_dir)
    assert spy["restores"] == [True] and spy["token_files"] == []
    assert model == config.model and step == 2
    _equal(got, params)
    # Export writes the layers one by one whatever the run's layout (gsa-tiny scans).
    assert config.model.scanned
    result = export_run(run_dir, tmp_path / "fla")
    assert spy["restores"] == [True, True]
    hf = json.loads((tmp_path / "fla" / "config.json").read_text())
    assert hf["num_hidden_layers"] == 1 and result["step"] == 2
    from safetensors.numpy import load_file
    tensors = load_file(str(tmp_path / "fla" / "model.safetensors"))
    np.testing.assert_array_equal(tensors["model.layers.0.attn.q_proj.weight"],
                                  params["layers"]["mixer"]["q_proj"]["kernel"][0].T)
