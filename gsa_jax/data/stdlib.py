"""The embedded default corpus: the Python standard library's own source files.

Needs no download: the `*.py` files under `sysconfig.get_paths()["stdlib"]` of the running
interpreter (site-packages excluded), sorted by relative path, byte-tokenized, each file one
document starting with BOS. A file goes to validation when the hash of its relative path falls
below `val_fraction`, so the split is stable across machines and Python versions for the files
they share. The content differs between Python versions: nothing may depend on it exactly.
"""

from __future__ import annotations

import hashlib
import pathlib
import sysconfig
from typing import Optional

import numpy as np

from gsa_jax.data.tokenizer import ByteTokenizer

_EXCLUDED_DIRS = {"site-packages", "dist-packages", "__pycache__"}


def stdlib_root() -> pathlib.Path:
    return pathlib.Path(sysconfig.get_paths()["stdlib"])


def list_source_files(root: Optional[str | pathlib.Path] = None) -> list[str]:
    """Relative POSIX paths of the *.py files under `root` (default: the stdlib), sorted."""
    root = stdlib_root() if root is None else pathlib.Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"source directory {str(root)!r} does not exist")
    files = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if _EXCLUDED_DIRS.isdisjoint(rel.parts[:-1]) and path.is_file():
            files.append(rel.as_posix())
    return sorted(files)


def is_validation(relpath: str, val_fraction: float) -> bool:
    """Deterministic split by file: the first 8 bytes of sha256(path) as a fraction of 2^64."""
    h = int.from_bytes(hashlib.sha256(relpath.encode("utf-8")).digest()[:8], "big")
    return h < val_fraction * 2.0 ** 64


def build_corpus(root: Optional[str | pathlib.Path] = None, val_fraction: float = 0.05,
                 splits: tuple[str, ...] = ("train", "val")
                 ) -> tuple[np.ndarray, np.ndarray, dict]:
    """(train tokens, validation tokens) as uint16 arrays, and an info dict.

    Each document is [BOS, bytes of the file...]; documents are concatenated in path order.
    splits: the splits to read ("train", "val"); the files of the others are not opened and
    their array is empty.
    """
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    root = stdlib_root() if root is None else pathlib.Path(root)
    bos = np.array([ByteTokenizer.bos_id], np.uint16)
    parts: dict[str, list[np.ndarray]] = {"train": [], "val": []}
    counts = {"train": 0, "val": 0}
    for rel in list_source_files(root):
        split = "val" if is_validation(rel, val_fraction) else "train"
        counts[split] += 1
        if split in splits:
            data = np.frombuffer((root / rel).read_bytes(), np.uint8).astype(np.uint16)
            parts[split] += [bos, data]
    if not counts["train"]:
        raise ValueError(f"no training files (*.py) found under {str(root)!r}")
    out = {k: np.concatenate(v) if v else np.zeros((0,), np.uint16) for k, v in parts.items()}
    info = {"root": str(root), "train_files": counts["train"], "val_files": counts["val"],
            "train_tokens": int(out["train"].size), "val_tokens": int(out["val"].size)}
    return out["train"], out["val"], info
