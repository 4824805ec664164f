"""The reference tier's guard (tests/conftest.py): with GSA_REQUIRE_REFERENCE=1 a `reference`
test that skips, or a test module that skips while importing, fails instead, in one process and
under pytest-xdist's workers (`-n 2`, as the README's and CI's commands run); without the
variable both skip. Run as a separate pytest process on a copy of our conftest."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

MODULE_SKIP = 'import pytest\nnope = pytest.importorskip("no_such_module_for_the_guard")\n'
TEST_SKIP = ('import pytest\n\n@pytest.mark.reference\ndef test_skips():\n'
             '    pytest.importorskip("no_such_module_for_the_guard")\n\n'
             'def test_passes():\n    assert 1 + 1 == 2\n')


def _run(tmp_path, workers, require):
    tmp_path.mkdir()
    here = os.path.dirname(os.path.abspath(__file__))
    for name in ("conftest.py", "ops_util.py"):
        shutil.copy(os.path.join(here, name), tmp_path / name)
    (tmp_path / "test_module_skip.py").write_text(MODULE_SKIP)
    (tmp_path / "test_one_skip.py").write_text(TEST_SKIP)
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    reference: reference\n")
    env = dict(os.environ)
    env.pop("GSA_REQUIRE_REFERENCE", None)
    if require:
        env["GSA_REQUIRE_REFERENCE"] = "1"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "-n", str(workers), str(tmp_path)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    return proc.returncode, proc.stdout + proc.stderr


@pytest.mark.parametrize("workers", [0, 2])
def test_skips_fail_only_when_the_reference_tier_is_required(tmp_path, workers):
    rc, out = _run(tmp_path / "required", workers, True)
    assert rc == 1, out                      # test failures, not an internal error (rc 3)
    assert "INTERNALERROR" not in out, out
    assert "1 failed, 1 passed, 1 error" in out, out
    assert "a test module skipped with GSA_REQUIRE_REFERENCE=1" in out, out

    rc, out = _run(tmp_path / "free", workers, False)
    assert rc == 0, out
    assert "1 passed, 2 skipped" in out, out
