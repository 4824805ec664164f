"""gsa_jax.checkpoint: the params-only restore (orbax's partial restore) used by the read-only
paths (eval, generate, convert, lm-eval): the saved params come back, from the newest intact
checkpoint, shape-checked, and the optimizer moments are never allocated (peak memory below the
size of the whole state, where a full restore is above it)."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gsa_jax.checkpoint import CheckpointConfig, Checkpointer, CheckpointShapeError
from gsa_jax.steps import TrainState
from memory_util import SNIPPET

ROOT = pathlib.Path(__file__).parent.parent


def _state(rng, shape, step: int) -> TrainState:
    """A train state: params {"w"}, Adam-like moments twice their size, step, RNG."""
    def w():
        return jnp.asarray(rng.standard_normal(shape, np.float32))
    return TrainState(step=jnp.int32(step), params={"layer": {"w": w()}, "b": w()[0]},
                      opt_state={"mu": {"layer": {"w": w()}, "b": w()[0]},
                                 "nu": {"layer": {"w": w()}, "b": w()[0]}},
                      rng=jnp.asarray(rng.integers(0, 2 ** 31, 2), jnp.uint32))


def _abstract(tree):
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def _save(directory, states: dict) -> None:
    checkpointer = Checkpointer(directory, CheckpointConfig(keep=5, async_save=False))
    for step, state in states.items():
        checkpointer.save(step, state, {"step": step})
    checkpointer.wait()
    checkpointer.close()


def test_params_only_restore_returns_the_saved_params(tmp_path):
    rng = np.random.default_rng()
    states = {1: _state(rng, (8, 12), 1), 2: _state(rng, (8, 12), 2)}
    _save(tmp_path, states)
    reader = Checkpointer(tmp_path, read_only=True)
    abstract = _abstract(states[1].params)
    for step, want in ((None, states[2]), (1, states[1])):
        params, meta = reader.restore(abstract, step, params_only=True)
        assert jax.tree.structure(params) == jax.tree.structure(want.params)
        for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(want.params)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert meta["step"] == (step or 2)
    # The newest checkpoint damaged: the params of the newest intact one, the skip recorded.
    (tmp_path / "2" / "state" / "_METADATA").unlink()
    params, meta = reader.restore(abstract, params_only=True)
    np.testing.assert_array_equal(np.asarray(params["b"]), np.asarray(states[1].params["b"]))
    assert meta["step"] == 1 and [s for s, _ in reader.skipped] == [2]
    reader.close()


def test_params_only_restore_checks_the_param_shapes_only(tmp_path):
    rng = np.random.default_rng()
    state = _state(rng, (8, 12), 3)
    # Moments of another layout (an optimizer change) do not matter to a params-only reader.
    state = state.replace(opt_state={"other": jnp.ones((5,), jnp.float32)})
    _save(tmp_path, {3: state})
    reader = Checkpointer(tmp_path, read_only=True)
    params, _ = reader.restore(_abstract(state.params), params_only=True)
    np.testing.assert_array_equal(np.asarray(params["layer"]["w"]),
                                  np.asarray(state.params["layer"]["w"]))
    wrong = _abstract({"layer": {"w": jnp.zeros((8, 13))}, "b": state.params["b"]})
    with pytest.raises(CheckpointShapeError, match=r"params/layer/w: checkpoint \(8, 12\) vs "
                                                   r"model \(8, 13\)"):
        reader.restore(wrong, params_only=True)
    reader.close()


MEMORY_SCRIPT = SNIPPET + textwrap.dedent("""
    import json, sys
    import jax, jax.numpy as jnp
    from gsa_jax.checkpoint import Checkpointer
    from gsa_jax.steps import TrainState

    directory, mode, rows, cols = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    sd = lambda shape, dtype=jnp.float32: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
    params = {"layer": {"w": sd((rows, cols))}, "b": sd((cols,))}
    reader = Checkpointer(directory, read_only=True)
    reader.restore_meta()
    base = peak_rss_mb()
    if mode == "full":
        abstract = TrainState(step=sd((), jnp.int32), params=params,
                              opt_state={"mu": params, "nu": params}, rng=sd((2,), jnp.uint32))
        out, _ = reader.restore(abstract)
    else:
        out, _ = reader.restore(params, params_only=True)
    jax.block_until_ready(out)
    print(json.dumps({"growth_mb": peak_rss_mb() - base}))
""")


def test_params_only_restore_never_allocates_the_optimizer_state(tmp_path):
    """32 MB of params and 64 MB of moments: a full restore must hold all 96 MB at once; the
    params-only restore peaks below that (separate processes, peak RSS)."""
    rows, cols = 2048, 4096
    _save(tmp_path, {7: _state(np.random.default_rng(), (rows, cols), 7)})
    state_mb = 3 * rows * cols * 4 / 2 ** 20
    growth = {}
    for mode in ("full", "params"):
        proc = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(tmp_path), mode,
                               str(rows), str(cols)], capture_output=True, text=True, cwd=ROOT)
        assert proc.returncode == 0, proc.stderr[-3000:]
        growth[mode] = json.loads(proc.stdout.splitlines()[-1])["growth_mb"]
    assert growth["full"] >= state_mb, growth        # the measurement sees the whole state
    assert growth["params"] < state_mb, growth       # ... and no moments here


def test_late_read_noise_is_dropped_and_nothing_else(monkeypatch):
    """After a damaged read, orbax's abandoned reads report through sys.unraisablehook,
    sys.excepthook and asyncio's logger from other threads: those (errors raised in orbax's
    coroutines, 'Event loop is closed') are dropped; an error of any other origin still reaches
    the original hook."""
    import logging
    import sys
    import types
    from gsa_jax import checkpoint as ck
    seen = []
    monkeypatch.setattr(sys, "unraisablehook", lambda info: seen.append(("unraisable", info)))
    monkeypatch.setattr(sys, "excepthook", lambda *a: seen.append(("except", a[1])))
    asyncio_logger = logging.getLogger("asyncio")
    monkeypatch.setattr(asyncio_logger, "filters", list(asyncio_logger.filters))
    ck._quiet_late_read_callbacks()

    namespace = {}
    exec(compile("async def read():\n    raise OSError('short read')\n",
                 "/site-packages/orbax/checkpoint/serialization.py", "exec"), namespace)
    orbax_read = namespace["read"]()

    async def ours():
        return None

    other = ours()
    info = lambda exc, obj: types.SimpleNamespace(exc_type=type(exc), exc_value=exc,
                                                  exc_traceback=None, err_msg=None, object=obj)
    sys.unraisablehook(info(OSError("short read"), orbax_read))
    sys.unraisablehook(info(RuntimeError("Event loop is closed"), None))
    sys.excepthook(RuntimeError, RuntimeError("Event loop is closed"), None)
    sys.unraisablehook(info(ValueError("ours"), other))
    sys.excepthook(ValueError, ValueError("ours too"), None)
    orbax_read.close()
    other.close()
    assert [(kind, str(getattr(x, "exc_value", x))) for kind, x in seen] == [
        ("unraisable", "ours"), ("except", "ours too")]
    try:
        exec(compile("raise OSError('short read')", "/site-packages/orbax/x.py", "exec"))
    except OSError as err:
        record = logging.LogRecord("asyncio", logging.ERROR, "", 0, "Task exception was never "
                                   "retrieved", None, (OSError, err, err.__traceback__))
    assert not all(f.filter(record) for f in asyncio_logger.filters)
    record.exc_info = None
    assert all(f.filter(record) for f in asyncio_logger.filters)
