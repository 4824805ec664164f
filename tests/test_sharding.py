"""Runs the multi-device sharding tests (`test_sharding_devices.py`) in a subprocess with 8
simulated CPU devices: XLA_FLAGS must be set before jax initialises, which in this process it
already has."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

HERE = pathlib.Path(__file__).parent


def run_with_devices(test_file: str, devices: int = 8, markers: str = "") -> None:
    """Run a test file in a subprocess with `devices` simulated CPU devices (and only the tests
    matching the -m expression `markers`, if given)."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                        f" --xla_force_host_platform_device_count={devices}").strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), env.get("PYTHONPATH", "")])
    select = ["-m", markers] if markers else []
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                           "-rs", *select, str(HERE / test_file)], env=env, cwd=HERE.parent,
                          capture_output=True, text=True)  # pytest-timeout bounds it
    assert proc.returncode == 0, f"{test_file} failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"
    assert " passed" in proc.stdout and "skipped" not in proc.stdout.split("\n")[-2], proc.stdout


@pytest.mark.slow  # over 30 s on a 2-core CPU: CI's second step
def test_sharded_training_on_8_simulated_devices():
    run_with_devices("test_sharding_devices.py")


@pytest.mark.slow  # a subprocess of 8 simulated devices (24 s for "not slow" on the 2-core CI)
@pytest.mark.parametrize("tier", ["not slow", "slow"])
def test_sharded_step_gathers_no_kernel_operand_on_8_simulated_devices(tier):
    """tests/test_sharded_step_hlo_devices.py: the compiled sharded train step with the (faked)
    GPU kernels has no all-gather of their operands; its slow cases check that the same check
    fails without `per_shard`."""
    run_with_devices("test_sharded_step_hlo_devices.py", markers=tier)
