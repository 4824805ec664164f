"""The data section of the config and the datasets it names (train/validation token streams)."""

from __future__ import annotations

import dataclasses
import logging
from typing import Optional

import numpy as np

from gsa_jax import checks
from gsa_jax.data import stdlib, tokens as token_files
from gsa_jax.data.tokenizer import ByteTokenizer

log = logging.getLogger(__name__)

SOURCES = ("stdlib", "tokens")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the tokens come from and how they are batched."""
    source: str = "stdlib"              # stdlib (embedded default, bytes) | tokens (.bin/.npy)
    train_path: Optional[str] = None    # tokens: the training token file
    val_path: Optional[str] = None      # tokens: the validation token file (None: no eval)
    token_dtype: Optional[str] = None   # .bin without a sidecar: uint16 | uint32
    bos_id: Optional[int] = None        # document separator (None: from the sidecar / tokenizer)
    tokenizer: Optional[str] = None     # tokens: tokenizers JSON for generation (None: sidecar)
    stdlib_root: Optional[str] = None   # stdlib: another directory of *.py files (tests)
    val_fraction: float = 0.05          # stdlib: share of files (by path hash) for validation
    seq_len: int = 256                  # T, tokens per sequence
    batch_size: int = 16                # B, sequences per optimizer step (global, all hosts)
    seed: int = 0                       # data order

    def __post_init__(self):
        def fail(msg):
            raise ValueError(f"data: {msg}")
        checks.check_choice("data", "source", self.source, SOURCES)
        for name in ("seq_len", "batch_size"):
            checks.check_positive_int("data", name, getattr(self, name), numpy_ints=False)
        if not isinstance(self.seed, int):
            fail(f"seed must be an int, got {self.seed!r}")
        if not 0 <= self.val_fraction < 1:
            fail(f"val_fraction must be in [0, 1), got {self.val_fraction!r}")
        if self.source == "tokens" and not self.train_path:
            fail("source 'tokens' needs train_path (a .bin/.npy token file from `gsa-jax "
                 "prepare`)")
        if self.token_dtype is not None and self.token_dtype not in token_files.DTYPES:
            fail(f"token_dtype must be one of {token_files.DTYPES}, got {self.token_dtype!r}")


SPLITS = ("train", "validation")


@dataclasses.dataclass
class Datasets:
    train: Optional[np.ndarray]       # [N] token ids (memmap for token files); None: not loaded
    val: Optional[np.ndarray]         # [N'] or None (none, or not loaded)
    bos_id: Optional[int]
    vocab_size: Optional[int]         # ids are < vocab_size (None: unknown)
    tokenizer: Optional[str]          # "bytes" or a tokenizers JSON path (None: unknown)
    info: dict
    max_ids: dict = dataclasses.field(default_factory=dict)  # token file -> its largest id


def load_datasets(config: DataConfig, splits: tuple[str, ...] = SPLITS) -> Datasets:
    """The streams of `splits` ("train", "validation") named by `config` (FileNotFoundError if
    a needed file is missing); the others are None and never opened. With splits=() only the
    metadata (separator, vocabulary, tokenizer) is read: what generation needs."""
    unknown = [s for s in splits if s not in SPLITS]
    if unknown:
        raise ValueError(f"load_datasets: unknown split(s) {unknown}; expected some of {SPLITS}")
    want_train, want_val = "train" in splits, "validation" in splits
    if config.source == "stdlib":
        if config.bos_id not in (None, ByteTokenizer.bos_id):
            raise ValueError(f"data: the stdlib source uses the byte tokenizer, whose separator "
                             f"is {ByteTokenizer.bos_id}; got bos_id={config.bos_id}")
        train = val = None
        info = {}
        if splits:
            names = tuple(n for n, want in (("train", want_train), ("val", want_val)) if want)
            train, val, info = stdlib.build_corpus(config.stdlib_root, config.val_fraction,
                                                   splits=names)
            train = train if want_train else None
            val = val if want_val and val.size else None
        return Datasets(train, val, ByteTokenizer.bos_id, ByteTokenizer.vocab_size, "bytes",
                        info)
    train = val = None
    if want_train:
        train, meta = token_files.read_token_file(config.train_path, config.token_dtype)
    else:
        meta = token_files.read_sidecar(config.train_path)
    if config.val_path:
        if want_val:
            val, val_meta = token_files.read_token_file(config.val_path, config.token_dtype)
        else:
            val_meta = token_files.read_sidecar(config.val_path)
        meta = {**val_meta, **meta}
    bos_id = config.bos_id if config.bos_id is not None else meta.get("bos_id")
    if bos_id is None:
        log.warning("data: no bos_id (config or sidecar): sequences are not split into "
                    "documents (segment_ids all 0)")
    info = {"train_tokens": None if train is None else int(train.size),
            "val_tokens": None if val is None else int(val.size)}
    # Every id is checked against the model's vocabulary (`session.check_compatible`): an id
    # without an embedding row makes the loss NaN, and a sidecar may understate the vocabulary.
    max_ids = {}
    if train is not None:
        max_ids[config.train_path] = token_files.max_token_id(train)
    if val is not None:
        max_ids[config.val_path] = token_files.max_token_id(val)
    return Datasets(train, val, bos_id, meta.get("vocab_size"),
                    config.tokenizer or meta.get("tokenizer"), info, max_ids)
