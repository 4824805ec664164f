"""`gsa-jax prepare`: tokenize text / JSON-lines files into token files for training.

Each .txt (or any non-.jsonl) file is one document; each line of a .jsonl file is one document
(its `text_field`). Every document is written as [BOS, ids...]. Documents go to the validation
file when the hash of "<file name>:<document index>" falls below `val_fraction` (stable split).
"""

from __future__ import annotations

import json
import pathlib
from typing import Iterable, Iterator, Optional, Sequence

import numpy as np

from gsa_jax.data import tokens as token_files
from gsa_jax.data.stdlib import is_validation
from gsa_jax.data.tokenizer import load_tokenizer


def iter_documents(paths: Sequence[str], text_field: str = "text") -> Iterator[tuple[str, str]]:
    """(key, text) of every document of the files, in order."""
    for path in paths:
        path = pathlib.Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"prepare: input file {str(path)!r} does not exist")
        if path.suffix == ".jsonl":
            with open(path, encoding="utf-8") as f:
                for i, line in enumerate(f):
                    if not line.strip():
                        continue
                    record = json.loads(line)
                    if text_field not in record:
                        raise ValueError(f"prepare: {path}:{i + 1} has no field {text_field!r}")
                    yield f"{path.name}:{i}", record[text_field]
        else:
            yield f"{path.name}:0", path.read_text(encoding="utf-8", errors="replace")


def prepare(inputs: Sequence[str], output: str, *, tokenizer: Optional[str] = None,
            bos_id: Optional[int] = None, val_output: Optional[str] = None,
            val_fraction: float = 0.0, text_field: str = "text") -> dict:
    """Tokenizes `inputs` into `output` (and `val_output`). Returns {split: metadata}.

    tokenizer: a tokenizers JSON file, or None / "bytes" for the byte tokenizer.
    """
    if val_fraction and not val_output:
        raise ValueError("prepare: val_fraction > 0 needs val_output")
    tok = load_tokenizer(tokenizer, bos_id)
    ids: dict[str, list[np.ndarray]] = {"train": [], "val": []}
    for key, text in iter_documents(inputs, text_field):
        split = "val" if val_fraction and is_validation(key, val_fraction) else "train"
        ids[split].append(np.asarray([tok.bos_id] + tok.encode(text), np.int64))
    spec = "bytes" if tokenizer in (None, "bytes") else str(pathlib.Path(tokenizer).resolve())
    out = {}
    for split, path in (("train", output), ("val", val_output)):
        if path is None:
            continue
        stream = np.concatenate(ids[split]) if ids[split] else np.zeros((0,), np.int64)
        out[split] = token_files.write_token_file(path, stream, vocab_size=tok.vocab_size,
                                                  bos_id=tok.bos_id, tokenizer=spec)
        out[split]["documents"] = len(ids[split])
    return out
