"""The harness the sweeps share: one case in a fresh worker process with a time limit, failures
and out-of-memory recorded as rows, the cases of a sweep run one or several at a time, device
memory and wall-time measurements, and --merge/--plot-only with an earlier report.

    # driver: each case in a fresh interpreter (its own peak memory; an OOM is a row, not fatal)
    out = harness.run_worker(__file__, [*argv, "--worker", "gsa:2048"], timeout=480)
    rows = out.payload if out.payload is not None else [{**case_row, **out.failure()}]
    # worker (the same script with --worker): measure, then
    harness.emit(rows)

Only the standard library at import time (like experiments/common.py).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import json
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

from experiments import common

WORKER_PREFIX = "EXPERIMENT_RESULT "


def emit(payload: Any) -> None:
    """A worker's result: one JSON line on stdout, which `run_worker` picks out of the rest."""
    print(WORKER_PREFIX + json.dumps(payload), flush=True)


@dataclasses.dataclass
class WorkerOutcome:
    """What a worker process left: its `emit`ted payload (None when it emitted none), its exit
    code (None: stopped at the time limit) and the tail of its stderr (stdout when empty)."""
    payload: Any
    returncode: Optional[int]
    tail: str
    timeout: Optional[float] = None

    def failure(self) -> dict[str, str]:
        """{"status": "oom" | "error", "reason"} of a worker that emitted nothing."""
        if self.returncode is None:
            return {"status": "error", "reason": f"worker timed out after {self.timeout:.0f} s"}
        return {"status": "oom" if is_oom(self.tail) else "error",
                "reason": f"worker exited with {self.returncode}: {self.tail}"}


def run_worker(script: str, argv: Sequence[str], *, timeout: Optional[float] = None,
               env: Optional[dict[str, str]] = None, tail_chars: int = 600,
               cwd: Optional[str] = None) -> WorkerOutcome:
    """`python <script> <argv>` in a fresh interpreter (its own device memory and peak; an OOM
    or a crash is its own), stopped after `timeout` seconds. env: its environment (default
    this process's); cwd: its working directory (default this process's)."""
    cmd = [sys.executable, os.path.abspath(script), *argv]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                              cwd=cwd)
    except subprocess.TimeoutExpired:
        return WorkerOutcome(None, None, "", timeout)
    for line in proc.stdout.splitlines():
        if line.startswith(WORKER_PREFIX):
            return WorkerOutcome(json.loads(line[len(WORKER_PREFIX):]), proc.returncode, "",
                                 timeout)
    return WorkerOutcome(None, proc.returncode, (proc.stderr or proc.stdout)[-tail_chars:],
                         timeout)


def run_cases(cases: Iterable[Any], execute: Callable[[Any], Any], jobs: int = 1,
              catch: tuple[type[BaseException], ...] = ()) -> Iterator[tuple[Any, Any, Any]]:
    """(case, execute(case), None) for every case as it finishes: one after another in this
    thread with jobs=1 (signal handlers want the main thread), else `jobs` threads at once (each
    case then in a worker process, as a rule). An exception of a `catch` type ends only its own
    case: (case, None, error)."""
    if jobs <= 1:
        for case in cases:
            try:
                yield case, execute(case), None
            except catch as error:
                yield case, None, error
        return
    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        futures = {pool.submit(execute, case): case for case in cases}
        for future in concurrent.futures.as_completed(futures):
            try:
                yield futures[future], future.result(), None
            except catch as error:
                yield futures[future], None, error


@contextlib.contextmanager
def work_dir(path: Optional[str], prefix: str) -> Iterator[pathlib.Path]:
    """A script's run directories: `path` (kept; a second command resumes from it) or, without
    one, a temporary directory removed at the end. jax's persistent compilation cache goes under
    it (`jax_cache`), so that runs repeating a graph (another seed) skip its compile."""
    directory = pathlib.Path(path or tempfile.mkdtemp(prefix=prefix))
    common.enable_compilation_cache(directory / "jax_cache")
    try:
        yield directory
    finally:
        if path is None:
            shutil.rmtree(directory, ignore_errors=True)


def is_oom(text: str) -> bool:
    """Whether an error text (an exception, a worker's stderr) says the device ran out of
    memory."""
    text = text.lower()
    return ("resource_exhausted" in text or "out of memory" in text or "outofmemory" in text
            or "oom" in text.split())


def failure(error: BaseException, limit: int = 500) -> dict[str, str]:
    """{"status": "oom" | "error", "reason"} of an exception a case caught, to go on with the
    next case."""
    text = f"{type(error).__name__}: {error}"
    return {"status": "oom" if is_oom(text) else "error", "reason": text[:limit]}


def memory_stats(device) -> Optional[dict[str, Any]]:
    """`device.memory_stats()`, or None where the backend has none (the CPU)."""
    try:
        return device.memory_stats()
    except Exception:  # noqa: BLE001 - backends without it raise or return None
        return None


def peak_bytes(device) -> Optional[int]:
    """The device's peak bytes in use in this process (GPU, TPU), else None."""
    stats = memory_stats(device)
    return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def compiled_bytes(compiled) -> Optional[int]:
    """XLA's footprint of a compiled executable: arguments + outputs + temporaries − aliased."""
    try:
        m = compiled.memory_analysis()
        return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
                   - m.alias_size_in_bytes)
    except Exception:  # noqa: BLE001 - not every backend reports it
        return None


def time_calls(fn: Callable[[], Any], repeats: int, warmup: int = 0) -> tuple[float, float]:
    """(median, min) wall seconds of `fn()` (which waits for its own work) over `repeats`
    calls after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), min(times)


def read_report(tag: str, name: str, out_dir: Optional[str | os.PathLike] = None,
                required_by: Optional[str] = None) -> Optional[dict[str, Any]]:
    """The JSON report `<name>_<tag>` (None when there is none; SystemExit instead when
    `required_by`, the option that needs it, e.g. "--plot-only")."""
    path = common.results_paths(tag, name, out_dir)["json"]
    if not path.exists():
        if required_by:
            raise SystemExit(f"{required_by}: no {path}")
        return None
    return json.loads(path.read_text())


def merge_base(tag: str, name: str, out_dir: Optional[str | os.PathLike],
               settings: dict[str, Any], field: str = "config") -> Optional[dict[str, Any]]:
    """The report a --merge adds to (None when there is none yet). SystemExit when its
    `field` (the settings it ran with) disagrees with `settings` on any key."""
    previous = read_report(tag, name, out_dir)
    if previous is not None:
        mismatch = common.merge_mismatch(previous.get(field) or {}, settings)
        if mismatch:
            path = common.results_paths(tag, name, out_dir)["json"]
            raise SystemExit(f"--merge: {path} was run with other settings (old, new): "
                             f"{mismatch}; use another --tag")
    return previous


def merge_rows(previous_rows: Iterable[dict], rows: list[dict],
               key: Callable[[dict], Any]) -> list[dict]:
    """An earlier report's rows but those measured again (same `key`), then the new rows."""
    done = {key(r) for r in rows}
    return [r for r in previous_rows if key(r) not in done] + rows


def finish_report(record: Optional[dict[str, Any]], write: Callable[..., dict],
                  markdown: Callable[[dict], str], out_dir: str, nothing: str) -> int:
    """A sweep driver's last step: `write(record, out_dir, plots=True)`, then the page and the
    paths written printed; 0 (its exit code). SystemExit("nothing to run: <nothing>") when no
    case ran (record None)."""
    if record is None:
        raise SystemExit(f"nothing to run: {nothing}")
    paths = write(record, out_dir, plots=True)
    print(markdown(record))
    print("wrote " + ", ".join(map(str, paths.values())))
    return 0


def merged_commands(previous: Optional[dict[str, Any]], command: str) -> list[str]:
    """Every command behind a report: the earlier report's (--merge), then this one."""
    if previous is None:
        return [command]
    return list(previous.get("commands") or [previous.get("command")]) + [command]
