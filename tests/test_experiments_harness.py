"""experiments/harness.py, the sweeps' shared harness, without jax: a worker's emitted result, its
crash (an out-of-memory named as such) and its time limit; the cases run one or several at a
time with one case's failure kept to itself; --merge's earlier report, its rows and commands;
the run directories."""

from __future__ import annotations

import json
import sys

import pytest

from script_util import ROOT

if ROOT not in sys.path:   # `experiments` is not an installed package
    sys.path.insert(0, ROOT)

from experiments import common, harness  # noqa: E402


def _script(tmp_path, body: str) -> str:
    path = tmp_path / "worker.py"
    path.write_text("import sys\nsys.path.insert(0, %r)\nfrom experiments import harness\n%s"
                    % (ROOT, body))
    return str(path)


def test_worker_result_crash_and_time_limit(tmp_path):
    out = harness.run_worker(_script(tmp_path, "print('noise')\nharness.emit({'rows': [1]})\n"),
                             [])
    assert out.payload == {"rows": [1]} and out.returncode == 0

    crash = "sys.stderr.write('RESOURCE_EXHAUSTED: out of memory allocating')\nsys.exit(3)\n"
    out = harness.run_worker(_script(tmp_path, crash), [])
    assert out.payload is None
    assert out.failure() == {"status": "oom", "reason": "worker exited with 3: RESOURCE_EXHAUSTED: "
                                                        "out of memory allocating"}

    out = harness.run_worker(_script(tmp_path, "import time\ntime.sleep(30)\n"), [], timeout=1)
    assert out.payload is None and out.returncode is None
    assert out.failure() == {"status": "error", "reason": "worker timed out after 1 s"}


@pytest.mark.parametrize("jobs", [1, 2])
def test_run_cases_keeps_a_failure_to_its_case(jobs):
    def execute(case):
        if case == "bad":
            raise RuntimeError("bad case")
        return case.upper()

    found = {case: (result, error) for case, result, error in
             harness.run_cases(["a", "bad", "b"], execute, jobs, catch=(RuntimeError,))}
    assert {c: r for c, (r, _) in found.items()} == {"a": "A", "bad": None, "b": "B"}
    assert str(found["bad"][1]) == "bad case"
    with pytest.raises(RuntimeError):   # not caught: the sweep ends
        list(harness.run_cases(["bad"], execute, jobs))


def test_failure_names_an_out_of_memory():
    assert harness.failure(MemoryError("RESOURCE_EXHAUSTED: 2 GiB"))["status"] == "oom"
    assert harness.failure(ValueError("bad shape")) == {"status": "error",
                                                        "reason": "ValueError: bad shape"}


def test_merge_base_rows_and_commands(tmp_path):
    assert harness.merge_base("t", "exp", tmp_path, {"size": 1}) is None
    previous = {"config": {"size": 1, "steps": 5}, "command": "python a",
                "rows": [{"k": 1, "v": "old"}, {"k": 2, "v": "old"}]}
    common.results_paths("t", "exp", tmp_path)["json"].write_text(json.dumps(previous))
    assert harness.merge_base("t", "exp", tmp_path, {"size": 1}) == previous
    with pytest.raises(SystemExit, match=r"other settings \(old, new\): \{'size': \(1, 2\)\}"):
        harness.merge_base("t", "exp", tmp_path, {"size": 2})
    rows = harness.merge_rows(previous["rows"], [{"k": 2, "v": "new"}], lambda r: r["k"])
    assert rows == [{"k": 1, "v": "old"}, {"k": 2, "v": "new"}]
    assert harness.merged_commands(previous, "python b") == ["python a", "python b"]
    assert harness.merged_commands(None, "python b") == ["python b"]
    with pytest.raises(SystemExit, match="--plot-only: no "):
        harness.read_report("other", "exp", tmp_path, "--plot-only")


def test_work_dir_is_temporary_unless_given(tmp_path, monkeypatch):
    caches = []
    monkeypatch.setattr(common, "enable_compilation_cache", caches.append)
    with harness.work_dir(None, "gsa_test_") as temporary:
        assert temporary.is_dir()
    assert not temporary.exists()
    with harness.work_dir(str(tmp_path / "runs"), "gsa_test_") as given:
        (given / "kept").mkdir(parents=True)
    assert (tmp_path / "runs" / "kept").is_dir()
    assert caches == [temporary / "jax_cache", given / "jax_cache"]
