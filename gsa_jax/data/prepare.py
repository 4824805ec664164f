"""`gsa-jax prepare`: tokenize text / JSON-lines files into token files for training.

Each .jsonl file holds one document per line (its `text_field`), also compressed as .jsonl.gz
or .jsonl.zst (SlimPajama's format; .zst needs Python 3.14 or the `zstandard` package); any
other file (.txt, ...) is one document. Every document is written as [BOS, ids...]. Documents
go to the validation file when the hash of "<file name>:<document index>" falls below
`val_fraction` (a stable split).

Streaming, so that the corpus may be far larger than memory:

    every input file, in a pool of worker processes (one file per task):
        read documents one by one → tokenize them in batches of about `batch_chars`
        characters (the tokenizer's encode_batch) → append [BOS, ids] to a part file per
        split, already in the output dtype (uint16 for vocabularies up to 65536, else uint32)
    then append the parts, in input order, to the output files (written under .tmp, renamed)

Memory is a batch per worker (and the largest single document), whatever the corpus size;
the output is the same for any number of workers. Disk: the parts take the outputs' size;
each is deleted once appended, so the peak is about the outputs plus one file's part.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import gzip
import io
import json
import multiprocessing
import os
import pathlib
import queue as queue_lib
import shutil
import tempfile
import time
from typing import BinaryIO, Callable, Iterator, Optional, Sequence

import numpy as np

from gsa_jax import checks
from gsa_jax.data import tokens as token_files
from gsa_jax.data.stdlib import is_validation
from gsa_jax.data.tokenizer import load_tokenizer

SPLITS = ("train", "val")
COMPRESSED = (".gz", ".zst")


def _open_zstd(raw: BinaryIO) -> BinaryIO:
    try:
        from compression import zstd  # Python 3.14
        return zstd.ZstdFile(raw)
    except ImportError:
        pass
    try:
        import zstandard
    except ImportError:
        raise ImportError("reading .zst files needs Python 3.14 or the `zstandard` package "
                          "(pip install zstandard); or decompress them first (zstd -d)"
                          ) from None
    return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, closefd=False))


def _is_jsonl(path: pathlib.Path) -> bool:
    suffixes = path.suffixes
    if suffixes and suffixes[-1] in COMPRESSED:
        suffixes = suffixes[:-1]
    return bool(suffixes) and suffixes[-1] == ".jsonl"


def iter_documents(path: str | os.PathLike, text_field: str = "text", *,
                   raw: Optional[BinaryIO] = None) -> Iterator[tuple[str, str]]:
    """(key, text) of every document of one file, in order; key = "<file name>:<index>".

    raw: the file already opened in binary mode (its position tells how much was read).
    Raises ValueError naming the file and line of a malformed .jsonl record."""
    path = pathlib.Path(path)
    with contextlib.nullcontext(raw) if raw is not None else open(path, "rb") as raw:
        stream = raw
        if path.suffix == ".gz":
            stream = gzip.GzipFile(fileobj=raw)
        elif path.suffix == ".zst":
            stream = _open_zstd(raw)
        if not _is_jsonl(path):
            yield f"{path.name}:0", stream.read().decode("utf-8", errors="replace")
            return
        for i, line in enumerate(stream):
            if not line.strip():
                continue
            where = f"prepare: {path}:{i + 1}"
            try:
                record = json.loads(line.decode("utf-8"))
            except UnicodeDecodeError as err:
                raise ValueError(f"{where}: not UTF-8 text ({err.reason} at byte "
                                 f"{err.start})") from None
            except json.JSONDecodeError as err:  # its line/column count the record
                raise ValueError(f"{where}: not a JSON record ({err.msg} at column "
                                 f"{err.pos + 1})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{where}: expected a JSON object with a "
                                 f"{text_field!r} field, got {type(record).__name__}")
            if text_field not in record:
                raise ValueError(f"{where} has no field {text_field!r}")
            text = record[text_field]
            if not isinstance(text, str):
                raise ValueError(f"{where}: field {text_field!r} is not a string "
                                 f"({type(text).__name__})")
            yield f"{path.name}:{i}", text


@dataclasses.dataclass(frozen=True)
class FileJob:
    """One input file's task: tokenize `path` into `<parts>/<index>.<split>.bin`."""
    index: int
    path: str
    parts: str
    tokenizer: Optional[str]
    bos_id: Optional[int]
    val_fraction: float
    text_field: str
    batch_chars: int

    def part(self, split: str) -> pathlib.Path:
        return pathlib.Path(self.parts) / f"{self.index:06d}.{split}.bin"


@dataclasses.dataclass
class FileResult:
    documents: dict          # {split: documents}
    tokens: dict             # {split: tokens}
    has_text: bool


class Cancelled(Exception):
    """Another file failed: this one stops early."""


def tokenize_file(job: FileJob, report: Callable[[int, int], None] = lambda b, t: None,
                  cancelled: Callable[[], bool] = lambda: False) -> FileResult:
    """Tokenizes one file into its part files; report(bytes read, tokens written) per batch."""
    tok = load_tokenizer(job.tokenizer, job.bos_id)
    writers = {split: token_files.TokenWriter(job.part(split), tok.vocab_size)
               for split in SPLITS}
    result = FileResult({s: 0 for s in SPLITS}, {s: 0 for s in SPLITS}, False)
    batch: list[tuple[str, str]] = []
    chars = 0
    read = 0

    def flush(raw: BinaryIO) -> None:
        nonlocal batch, chars, read
        if cancelled():
            raise Cancelled(job.path)
        ids = tok.encode_batch([text for _, text in batch])
        pieces = {s: [] for s in SPLITS}
        bos = np.array([tok.bos_id], np.uint32)
        for (key, text), doc in zip(batch, ids):
            split = ("val" if job.val_fraction and is_validation(key, job.val_fraction)
                     else "train")
            pieces[split] += [bos, np.asarray(doc, np.uint32)]
            result.documents[split] += 1
            result.has_text = result.has_text or bool(text)
        written = 0
        for split, arrays in pieces.items():
            if arrays:
                before = writers[split].num_tokens
                writers[split].write(np.concatenate(arrays))
                written += writers[split].num_tokens - before
        position = raw.tell()
        report(position - read, written)
        read, batch, chars = position, [], 0

    try:
        with open(job.path, "rb") as raw:
            for key, text in iter_documents(job.path, job.text_field, raw=raw):
                batch.append((key, text))
                chars += len(text) + 1
                if chars >= job.batch_chars:
                    flush(raw)
            flush(raw)
        for split, writer in writers.items():
            writer.finish()
            result.tokens[split] = writer.num_tokens
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    return result


# -- worker processes: the progress queue and the cancel flag, set once per process
_worker: dict = {}


def _init_worker(progress, cancel) -> None:
    _worker.update(progress=progress, cancel=cancel)


def _tokenize_in_worker(job: FileJob) -> FileResult:
    return tokenize_file(job, report=lambda b, t: _worker["progress"].put((b, t)),
                         cancelled=_worker["cancel"].is_set)


def _progress_bar(total_bytes: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024,
                desc="prepare", dynamic_ncols=True)


class _Progress:
    """The bar advances by input bytes (hence its ETA); its postfix counts tokens and tokens/s."""

    def __init__(self, total_bytes: int, enabled: bool):
        self.bar = _progress_bar(total_bytes, enabled)
        self.tokens = 0
        self.start = time.perf_counter()

    def __call__(self, nbytes: int, ntokens: int) -> None:
        self.tokens += ntokens
        if self.bar is not None:
            rate = self.tokens / max(time.perf_counter() - self.start, 1e-9)
            self.bar.set_postfix_str(f"{self.tokens:,} tok, {rate:,.0f} tok/s", refresh=False)
            self.bar.update(nbytes)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _run_jobs(jobs: list[FileJob], workers: int, progress: _Progress) -> list[FileResult]:
    """Every job's result, in order; the first failure (in input order) is raised after the
    other workers have stopped."""
    if workers <= 1 or len(jobs) == 1:
        return [tokenize_file(job, progress) for job in jobs]
    ctx = multiprocessing.get_context("spawn")  # the parent may hold jax's threads: no fork
    updates, cancel = ctx.Queue(), ctx.Event()

    def drain() -> None:
        while True:
            try:
                progress(*updates.get_nowait())
            except queue_lib.Empty:
                return

    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx,
                                                initializer=_init_worker,
                                                initargs=(updates, cancel)) as pool:
        futures = [pool.submit(_tokenize_in_worker, job) for job in jobs]
        pending = set(futures)
        while pending:
            done, pending = concurrent.futures.wait(
                pending, timeout=0.2, return_when=concurrent.futures.FIRST_EXCEPTION)
            drain()
            if any(f.exception() is not None for f in done):
                cancel.set()
                for f in pending:
                    f.cancel()
                concurrent.futures.wait(pending)
                break
        drain()
    errors = [f.exception() for f in futures if not f.cancelled() and f.exception() is not None]
    first = next((e for e in errors if not isinstance(e, Cancelled)), None)
    if first is not None:
        raise first
    return [f.result() for f in futures]


def prepare(inputs: Sequence[str], output: str, *, tokenizer: Optional[str] = None,
            bos_id: Optional[int] = None, val_output: Optional[str] = None,
            val_fraction: float = 0.0, text_field: str = "text", workers: Optional[int] = None,
            batch_chars: int = 1 << 20, progress: bool = False) -> dict:
    """Tokenizes `inputs` into `output` (and `val_output`). Returns {split: metadata}.

    tokenizer: a tokenizers JSON file, or None / "bytes" for the byte tokenizer.
    val_fraction: 0 (no validation file) or in (0, 1) with `val_output`.
    workers: processes tokenizing files in parallel (default: one per CPU, at most one per
      file; 1: in this process).
    batch_chars: characters of text tokenized at once (memory per worker scales with it).
    progress: a progress bar on stderr (input bytes, tokens, tokens/s).
    Raises ValueError when a file to be written would hold no document (empty inputs, or a
    split that the fraction leaves empty): training on it could not start. Nothing is left in
    the output's directory on an error.
    """
    if not (val_fraction == 0 or 0 < val_fraction < 1):
        raise ValueError(f"prepare: --val-fraction must be in (0, 1) (or 0: no validation "
                         f"file), got {val_fraction}")
    if val_fraction and not val_output:
        raise ValueError("prepare: --val-fraction > 0 needs --val-output")
    if val_output and not val_fraction:
        raise ValueError("prepare: --val-output needs --val-fraction in (0, 1)")
    if workers is not None:
        checks.check_positive_int("prepare", "--workers", workers, numpy_ints=False)
    checks.check_positive_int("prepare", "batch_chars", batch_chars, numpy_ints=False)
    for path in inputs:
        if not pathlib.Path(path).is_file():
            raise FileNotFoundError(f"prepare: input file {str(path)!r} does not exist")
    tok = load_tokenizer(tokenizer, bos_id)  # its errors before any work
    spec = "bytes" if tokenizer in (None, "bytes") else str(pathlib.Path(tokenizer).resolve())
    outputs = {"train": pathlib.Path(output),
               "val": None if val_output is None else pathlib.Path(val_output)}

    made = [d for p in outputs.values() if p is not None for d in _missing_dirs(p.parent)]
    outputs["train"].parent.mkdir(parents=True, exist_ok=True)
    parts = pathlib.Path(tempfile.mkdtemp(prefix=f".{outputs['train'].name}.parts.",
                                          dir=outputs["train"].parent))
    bar = _Progress(sum(pathlib.Path(p).stat().st_size for p in inputs), progress)
    finished = False
    try:
        jobs = [FileJob(i, str(path), str(parts), tokenizer, tok.bos_id, val_fraction,
                        text_field, batch_chars) for i, path in enumerate(inputs)]
        results = _run_jobs(jobs, workers or min(len(jobs), os.cpu_count() or 1), bar)
        bar.close()
        documents = {s: sum(r.documents[s] for r in results) for s in SPLITS}
        total = sum(documents.values())
        if not any(r.has_text for r in results):
            raise ValueError(f"prepare: no text in {', '.join(map(str, inputs))} ({total} "
                             f"document(s), all empty)")
        for split, path in outputs.items():
            if path is not None and not documents[split]:
                raise ValueError(f"prepare: none of the {total} document(s) went to the {split} "
                                 f"file {path} (--val-fraction {val_fraction}); change the "
                                 f"fraction or add documents")
        out = {}
        for split, path in outputs.items():
            if path is None:
                continue
            writer = token_files.TokenWriter(path, tok.vocab_size)
            try:
                for job in jobs:
                    with open(job.part(split), "rb") as f:
                        writer.append_raw(f)
                    job.part(split).unlink()  # free the disk as the output grows
            except BaseException:
                writer.abort()
                raise
            out[split] = writer.close(bos_id=tok.bos_id, tokenizer=spec)
            out[split]["documents"] = documents[split]
        finished = True
        return out
    finally:
        bar.close()
        shutil.rmtree(parts, ignore_errors=True)
        if not finished:
            for directory in made:  # the output folders this call created, deepest first
                with contextlib.suppress(OSError):
                    directory.rmdir()


def _missing_dirs(directory: pathlib.Path) -> list[pathlib.Path]:
    """`directory` and its ancestors that do not exist yet, deepest first."""
    missing = []
    while not directory.exists() and directory != directory.parent:
        missing.append(directory)
        directory = directory.parent
    return missing
