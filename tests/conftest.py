"""Shared pytest set-up: the tests folder on sys.path and an opt-in float64 fixture.

float64 is switched on per test (fixture `x64`), never globally, so that test files which want
the default float32 behaviour are not affected by the ones that compare forms in float64.
"""

from __future__ import annotations

import os
import sys

import pytest

# `import reference` / `import ops_util` from the test files, whatever pytest's import mode.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import ops_util  # noqa: E402


@pytest.fixture
def x64():
    """Run the test with `jax_enable_x64` on (float64 arrays stay float64)."""
    with ops_util.enable_x64():
        yield
