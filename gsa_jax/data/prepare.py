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
    """(key, text) of every document of the files, in order.

    Raises ValueError naming the file and line of a malformed .jsonl record."""
    for path in paths:
        path = pathlib.Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"prepare: input file {str(path)!r} does not exist")
        if path.suffix == ".jsonl":
            with open(path, encoding="utf-8") as f:
                for i, line in enumerate(f):
                    if not line.strip():
                        continue
                    where = f"prepare: {path}:{i + 1}"
                    try:
                        record = json.loads(line)
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
        else:
            yield f"{path.name}:0", path.read_text(encoding="utf-8", errors="replace")


def prepare(inputs: Sequence[str], output: str, *, tokenizer: Optional[str] = None,
            bos_id: Optional[int] = None, val_output: Optional[str] = None,
            val_fraction: float = 0.0, text_field: str = "text") -> dict:
    """Tokenizes `inputs` into `output` (and `val_output`). Returns {split: metadata}.

    tokenizer: a tokenizers JSON file, or None / "bytes" for the byte tokenizer.
    val_fraction: 0 (no validation file) or in (0, 1) with `val_output`.
    Raises ValueError when a file to be written would hold no document (empty inputs, or a
    split that the fraction leaves empty): training on it could not start.
    """
    if not (val_fraction == 0 or 0 < val_fraction < 1):
        raise ValueError(f"prepare: --val-fraction must be in (0, 1) (or 0: no validation "
                         f"file), got {val_fraction}")
    if val_fraction and not val_output:
        raise ValueError("prepare: --val-fraction > 0 needs --val-output")
    if val_output and not val_fraction:
        raise ValueError("prepare: --val-output needs --val-fraction in (0, 1)")
    tok = load_tokenizer(tokenizer, bos_id)
    ids: dict[str, list[np.ndarray]] = {"train": [], "val": []}
    has_text = False
    for key, text in iter_documents(inputs, text_field):
        split = "val" if val_fraction and is_validation(key, val_fraction) else "train"
        ids[split].append(np.asarray([tok.bos_id] + tok.encode(text), np.int64))
        has_text = has_text or bool(text)
    total = len(ids["train"]) + len(ids["val"])
    if not has_text:
        raise ValueError(f"prepare: no text in {', '.join(map(str, inputs))} ({total} "
                         f"document(s), all empty)")
    for split, path in (("train", output), ("val", val_output)):
        if path is not None and not ids[split]:
            raise ValueError(f"prepare: none of the {total} document(s) went to the {split} file "
                             f"{path} (--val-fraction {val_fraction}); change the fraction or "
                             f"add documents")
    spec = "bytes" if tokenizer in (None, "bytes") else str(pathlib.Path(tokenizer).resolve())
    out = {}
    for split, path in (("train", output), ("val", val_output)):
        if path is None:
            continue
        out[split] = token_files.write_token_file(path, np.concatenate(ids[split]),
                                                  vocab_size=tok.vocab_size,
                                                  bos_id=tok.bos_id, tokenizer=spec)
        out[split]["documents"] = len(ids[split])
    return out
