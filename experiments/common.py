"""Helpers shared by the experiment scripts: where results go, the machine/version/command record
that every result carries, markdown tables, and optional matplotlib plots (the sweeps' worker
processes, failures, measurements and --merge: experiments/harness.py).

    record = {"config": ..., "rows": [...]}                 # the script's own results
    paths = write_results("h100", "mqar", record, markdown, fig=fig)
    # -> experiments/results/mqar_h100.{json,md,png}; the JSON gains "environment" and
    #    "command", the markdown a footer with both (footer=False: the page has them already)

Only the standard library at import time: jax and matplotlib are imported inside the functions
that need them, so a script can parse its arguments (and set XLA flags) before jax starts.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import pathlib
import platform
import shlex
import subprocess
import sys
from typing import Any, Iterable, Optional, Sequence

ROOT = pathlib.Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "experiments" / "results"
GIB = 2 ** 30


def ensure_importable() -> None:
    """Lets `python experiments/<script>.py` find the gsa_jax package beside it when it is not
    installed."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))


def argument_parser(doc: str) -> argparse.ArgumentParser:
    """An experiment script's parser: the first line of its docstring `doc` as description (the
    whole under --help), and the options every script has: --tag and --out-dir."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tag", default=None, help="results file suffix (default: the backend)")
    p.add_argument("--out-dir", default=str(RESULTS_DIR),
                   help="results folder (default experiments/results)")
    return p


def command_line(argv: Optional[Sequence[str]] = None, script: Optional[str] = None) -> str:
    """The command that reproduces a run: `python experiments/<script>.py <args>`.

    argv: the script's arguments (default sys.argv[1:]); script: its path (default sys.argv[0]),
    shown relative to the repository root when inside it.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    path = pathlib.Path(script or sys.argv[0]).resolve()
    try:
        shown = str(path.relative_to(ROOT))
    except ValueError:
        shown = str(path)
    return shlex.join(["python", shown, *argv])


def _git(*args: str) -> Optional[str]:
    """Output of a read-only git command in the repository, or None (no git, not a checkout)."""
    try:
        out = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def environment() -> dict[str, Any]:
    """Machine and software of this run: backend, device kind and count, jax/jaxlib/flax/optax
    versions, Python, OS, CPU count, UTC date, git commit (with "-dirty" when the checkout has
    uncommitted changes). The keys `backend, device_kind, device_count, jax, jaxlib, python, os,
    cpu_count` are those of experiments/bench_ops.py's `machine`."""
    import jax
    import jaxlib
    info: dict[str, Any] = {}
    devices = jax.devices()
    info.update(backend=jax.default_backend(), device_kind=devices[0].device_kind,
                device_count=len(devices), jax=jax.__version__, jaxlib=jaxlib.__version__)
    for name in ("flax", "optax"):
        try:
            info[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001 - optional in scripts that do not use them
            info[name] = None
    info.update(python=platform.python_version(), os=f"{platform.system()} {platform.machine()}",
                cpu_count=os.cpu_count(),
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    commit = _git("rev-parse", "--short=12", "HEAD")
    if commit is not None and _git("status", "--porcelain", "--untracked-files=no"):
        commit += "-dirty"
    info["git_commit"] = commit
    return info


def describe_environment(env: dict[str, Any]) -> str:
    """One line for a results page: 'NVIDIA H100 80GB HBM3 (gpu) x1, jax 0.11.2, ...'."""
    parts = [f"{env.get('device_kind')} ({env.get('backend')}) x{env.get('device_count')}",
             f"jax {env.get('jax')}", f"jaxlib {env.get('jaxlib')}"]
    parts += [f"{name} {env[name]}" for name in ("flax", "optax") if env.get(name)]
    parts += [f"Python {env.get('python')}", f"{env.get('os')}, {env.get('cpu_count')} CPUs",
              f"commit {env.get('git_commit')}", str(env.get("date"))]
    return ", ".join(parts)


def _json_safe(value: Any) -> Any:
    """NaN/inf -> None (strict JSON); NumPy scalars and arrays -> Python numbers and lists."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        return _json_safe(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def results_paths(tag: str, name: str, out_dir: Optional[str | os.PathLike] = None
                  ) -> dict[str, pathlib.Path]:
    """{json, md, png}: `<out_dir>/<name>_<tag>.<ext>` (out_dir default experiments/results)."""
    if not tag or any(c in tag for c in "/\\ "):
        raise ValueError(f"results tag must be a non-empty name without slashes or spaces, "
                         f"got {tag!r}")
    base = pathlib.Path(out_dir) if out_dir is not None else RESULTS_DIR
    return {ext: base / f"{name}_{tag}.{ext}" for ext in ("json", "md", "png")}


def write_results(tag: str, name: str, record: dict[str, Any], markdown: str, fig=None, *,
                  out_dir: Optional[str | os.PathLike] = None,
                  command: Optional[str] = None, footer: bool = True) -> dict[str, pathlib.Path]:
    """Writes `<name>_<tag>.json` (the record plus "environment" and "command", NaN as null),
    `.md` (the markdown plus a footer with the command, or every command of the record's
    "commands" list when it holds several, and the machine; footer=False: the markdown as it
    is, for a page that names them itself) and, given a matplotlib figure, `.png`. Returns the
    paths written. Keys already in the record are kept (so a script that merges runs, or whose
    driver leaves the device to its workers, can pass its own "command"/"environment")."""
    paths = results_paths(tag, name, out_dir)
    paths["json"].parent.mkdir(parents=True, exist_ok=True)
    record = dict(record)
    if "environment" not in record:  # not setdefault: environment() starts jax's backend
        record["environment"] = environment()
    if "command" not in record:
        record["command"] = command or command_line()
    paths["json"].write_text(json.dumps(_json_safe(record), indent=1) + "\n")
    commands = record.get("commands") or [record["command"]]
    if len(commands) > 1:   # results merged from several commands (a split sweep)
        shown = "Commands:\n\n" + "\n".join(f"- `{c}`" for c in commands)
    else:
        shown = f"Command: `{commands[0]}`"
    if footer:
        markdown = (f"{markdown.rstrip()}\n\n{shown}\n\n"
                    f"Machine: {describe_environment(record['environment'])}\n")
    paths["md"].write_text(markdown)
    written = {"json": paths["json"], "md": paths["md"]}
    if fig is not None:
        fig.savefig(paths["png"], dpi=120, bbox_inches="tight")
        written["png"] = paths["png"]
    return written


def apply_smoke_sizes(parser, args, sizes: dict[str, Any]) -> None:
    """--smoke: set each option of `sizes` to its small value unless given on the command line
    (an option still at its parser default counts as not given)."""
    defaults = {a.dest: a.default for a in parser._actions}
    for key, value in sizes.items():
        if getattr(args, key) == defaults[key]:
            setattr(args, key, value)


def merge_mismatch(previous: dict[str, Any], current: dict[str, Any]) -> dict[str, Any]:
    """{key: (old, new)} for each setting of `current` that the report a --merge adds to was
    run with differently (empty when they agree)."""
    return {k: (previous.get(k), v) for k, v in current.items() if previous.get(k) != v}


def write_and_print(tag: str, name: str, record: dict[str, Any], markdown: str, fig=None,
                    **kwargs) -> dict[str, pathlib.Path]:
    """`write_results`, then print the table and the paths written (a script's last step)."""
    written = write_results(tag, name, record, markdown, fig, **kwargs)
    print(markdown)
    print("wrote " + ", ".join(str(p) for p in written.values()), flush=True)
    return written


def pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend, or None (with a printed note) when
    matplotlib is not installed (`pip install -e '.[plot]'`)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed: no plot (pip install -e '.[plot]')",
              flush=True)
        return None
    return plt


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]],
                   align: Optional[str] = None) -> str:
    """A GitHub markdown table. align: one character per column, 'l' or 'r' (default: the first
    column left, the rest right)."""
    align = align or "l" + "r" * (len(headers) - 1)
    if len(align) != len(headers):
        raise ValueError(f"align {align!r} has {len(align)} columns, headers {len(headers)}")
    lines = ["| " + " | ".join(map(str, headers)) + " |",
             "|" + "|".join("---" if a == "l" else "---:" for a in align) + "|"]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in rows]
    return "\n".join(lines)


def notes_lines(record: dict[str, Any]) -> list[str]:
    """Markdown lines for a report's `record["notes"]` (how the run was made, added by whoever
    merged it); none without notes."""
    notes = record.get("notes") or []
    return ["", "Notes:", ""] + [f"- {n}" for n in notes] if notes else []


def fmt(value: Optional[float], digits: int = 2) -> str:
    """A number for a table; '-' for None/NaN."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.{digits}f}"


def fmt_gib(nbytes: Optional[float], digits: int = 2) -> str:
    """A byte count in GiB for a table; '-' for None/NaN."""
    return fmt(None if nbytes is None else nbytes / GIB, digits)


def enable_compilation_cache(directory: Optional[str | os.PathLike]) -> None:
    """Persist XLA executables under `directory` (None: leave jax's setting alone), so that runs
    repeating a graph (another seed, a re-run) skip the compile. Every executable is cached,
    however quickly it compiled."""
    if directory is None:
        return
    import jax
    from jax.experimental.compilation_cache import compilation_cache
    pathlib.Path(directory).mkdir(parents=True, exist_ok=True)
    if jax.config.jax_compilation_cache_dir != str(directory):
        # jax opens its cache once per process, at the first compile: without a reset, a second
        # directory in one process (in-process runs, the tests) would still be written to the first.
        compilation_cache.reset_cache()
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def fast_cpu_compile() -> None:
    """For smoke runs whose time is compiling, not running: skip LLVM's optimisation of the CPU
    code (about a third less compile time, but several times slower code: only for runs of a
    few steps). Only where XLA_FLAGS sets no optimisation level already, and only before jax
    starts its backend (it reads the flags then)."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_backend_optimization_level" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_backend_optimization_level=0".strip()

