"""Shared pytest set-up: the tests folder on sys.path, an opt-in float64 fixture, and the
reference tier's guard.

float64 is switched on per test (fixture `x64`), never globally, so that test files which want
the default float32 behaviour are not affected by the ones that compare forms in float64.

Tests marked `reference` compare against heavy libraries (torch, transformers, lm-eval, fla) and
skip without them. With GSA_REQUIRE_REFERENCE=1 (CI's second step, which installs them) such a
skip is a failure instead: the reference tier cannot pass by skipping.
"""

from __future__ import annotations

import os
import sys

import pytest

# `import reference` / `import ops_util` from the test files, whatever pytest's import mode.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import ops_util  # noqa: E402


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if (report.skipped and os.environ.get("GSA_REQUIRE_REFERENCE") == "1"
            and item.get_closest_marker("reference") is not None):
        report.outcome = "failed"
        report.longrepr = (f"{item.nodeid}: a reference test skipped with "
                           f"GSA_REQUIRE_REFERENCE=1: {report.longrepr}")
    return report


@pytest.hookimpl(tryfirst=True)   # before the terminal reporter files the report as a skip
def pytest_collectreport(report):
    """A test module that skips as a whole while importing (pytest.importorskip at module level,
    as in test_fla_layers.py) is a failure too under GSA_REQUIRE_REFERENCE=1."""
    if report.skipped and os.environ.get("GSA_REQUIRE_REFERENCE") == "1":
        report.outcome = "failed"
        report.longrepr = (f"{report.nodeid}: a test module skipped with "
                           f"GSA_REQUIRE_REFERENCE=1: {report.longrepr}")


@pytest.fixture
def x64():
    """Run the test with `jax_enable_x64` on (float64 arrays stay float64)."""
    with ops_util.enable_x64():
        yield
