"""Packing a token stream into fixed-length training sequences, in a seeded order, resumable.

The stream (documents concatenated, each starting with `bos_id`) is cut into W = (N-1) // T
windows of T+1 tokens, window w = stream[w·T : w·T + T + 1]; inputs are its first T tokens,
targets its last T. A row may hold several documents: `segment_ids` [B, T] counts the BOS tokens
seen so far in the row, so it changes exactly where a document starts, and the model keeps
documents apart. The BOS input itself starts the new document (it predicts the first token), and
the last token of a document predicts BOS (the end of the document): every target is valid.

Training order: epoch e visits the windows in a pseudo-random permutation seeded by (seed, e)
(a Feistel network with cycle walking: O(1) memory for any W). The position in the data is one
integer (windows consumed since the start), so the state saved with a checkpoint is tiny and a
resumed run continues with exactly the batches the uninterrupted run would have seen.
"""

from __future__ import annotations

from typing import Iterator, Optional

import numpy as np

Batch = dict  # {"tokens", "targets", "segment_ids": [B, T] int32, "mask": [B, T] float32}

_MUL = np.uint64(0x9E3779B97F4A7C15)


class Permutation:
    """A seeded bijection of [0, n) computed pointwise (4-round Feistel + cycle walking)."""

    def __init__(self, n: int, seed: tuple[int, ...]):
        if n < 1:
            raise ValueError(f"Permutation: n must be >= 1, got {n}")
        self.n = n
        bits = max(2, (n - 1).bit_length())
        bits += bits % 2                       # two equal halves; the domain 2^bits < 4n
        self.half = np.uint64(bits // 2)
        self.mask = np.uint64((1 << (bits // 2)) - 1)
        self.keys = np.random.default_rng(list(seed)).integers(0, 2 ** 63, size=4,
                                                               dtype=np.uint64)

    def _round_fn(self, x: np.ndarray, key: np.uint64) -> np.ndarray:
        x = (x ^ key) * _MUL                   # uint64 arithmetic wraps: that is the mixing
        x ^= x >> np.uint64(31)
        x = x * _MUL
        x ^= x >> np.uint64(29)
        return x & self.mask

    def _feistel(self, x: np.ndarray) -> np.ndarray:
        left, right = x >> self.half, x & self.mask
        for key in self.keys:
            left, right = right, left ^ self._round_fn(right, key)
        return (left << self.half) | right

    def __call__(self, index: np.ndarray) -> np.ndarray:
        index = np.asarray(index, np.uint64)
        if index.size and int(index.max()) >= self.n:
            raise ValueError(f"Permutation: index >= n = {self.n}")
        y = self._feistel(index)
        # Cycle walking: re-apply until the value lands in [0, n); a bijection of [0, n) results.
        while True:
            outside = y >= np.uint64(self.n)
            if not outside.any():
                return y.astype(np.int64)
            y[outside] = self._feistel(y[outside])


def segment_ids(inputs: np.ndarray, bos_id: Optional[int]) -> np.ndarray:
    """[B, T] int32: the number of BOS tokens at or before each position of the row."""
    if bos_id is None:
        return np.zeros(inputs.shape, np.int32)
    return np.cumsum(inputs == bos_id, axis=1, dtype=np.int32)


def gather_windows(stream: np.ndarray, windows: np.ndarray, seq_len: int,
                   bos_id: Optional[int]) -> Batch:
    """The batch made of windows `windows` [B] (-1 = a padding row, mask 0) of the stream."""
    windows = np.asarray(windows, np.int64)
    valid = windows >= 0
    starts = np.where(valid, windows, 0) * seq_len
    rows = np.asarray(stream[starts[:, None] + np.arange(seq_len + 1)], np.int32)  # [B, T+1]
    inputs, targets = rows[:, :-1], rows[:, 1:]
    return {"tokens": inputs, "targets": targets, "segment_ids": segment_ids(inputs, bos_id),
            "mask": np.broadcast_to(valid[:, None], inputs.shape).astype(np.float32)}


def num_windows(num_tokens: int, seq_len: int) -> int:
    return max((num_tokens - 1) // seq_len, 0)


class PackedBatches:
    """Training batches [B, T] of randomly ordered windows; infinite (epochs follow each other).

    state_dict() / load_state_dict() save and restore the position (and check that the data,
    the sequence length and the seed are the ones the position refers to).
    """

    def __init__(self, stream: np.ndarray, *, batch_size: int, seq_len: int, seed: int,
                 bos_id: Optional[int], shuffle: bool = True):
        self.stream, self.batch_size, self.seq_len = stream, batch_size, seq_len
        self.seed, self.bos_id, self.shuffle = seed, bos_id, shuffle
        self.num_windows = num_windows(len(stream), seq_len)
        if self.num_windows < 1:
            raise ValueError(f"the training data has {len(stream)} tokens, fewer than one "
                             f"sequence of seq_len + 1 = {seq_len + 1}")
        self.position = 0            # windows consumed so far
        self._perm: tuple[int, Permutation] | None = None

    def _permutation(self, epoch: int) -> Permutation:
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, Permutation(self.num_windows, (self.seed, epoch)))
        return self._perm[1]

    def window_indices(self, position: int, count: int) -> np.ndarray:
        """Window ids of samples position .. position+count-1 (crossing epochs as needed)."""
        samples = np.arange(position, position + count, dtype=np.int64)
        epochs, offsets = np.divmod(samples, self.num_windows)
        if not self.shuffle:
            return offsets
        out = np.empty_like(offsets)
        for epoch in np.unique(epochs):
            sel = epochs == epoch
            out[sel] = self._permutation(int(epoch))(offsets[sel])
        return out

    def batch_at(self, position: int) -> Batch:
        return gather_windows(self.stream, self.window_indices(position, self.batch_size),
                              self.seq_len, self.bos_id)

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        batch = self.batch_at(self.position)
        self.position += self.batch_size
        return batch

    @property
    def epoch(self) -> float:
        return self.position / self.num_windows

    def state_dict(self) -> dict:
        return {"position": int(self.position), "seed": int(self.seed),
                "seq_len": int(self.seq_len), "num_tokens": int(len(self.stream))}

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        for key in ("num_tokens", "seq_len", "seed"):
            if state.get(key) != mine[key]:
                raise ValueError(f"data state: the checkpoint's {key} is {state.get(key)!r} but "
                                 f"this run's is {mine[key]!r}; the position in the data would "
                                 f"not mean the same batches (different data or settings)")
        self.position = int(state["position"])


class SequentialBatches:
    """Evaluation batches: windows 0, 1, 2, ... in order; the last batch is padded (mask 0).

    Every window is scored once (the < T tokens after the last full window are not).
    `len()` is the number of batches (at most `max_batches`); each iteration starts over."""

    def __init__(self, stream: np.ndarray, *, batch_size: int, seq_len: int,
                 bos_id: Optional[int], max_batches: Optional[int] = None):
        self.stream, self.batch_size, self.seq_len, self.bos_id = (stream, batch_size, seq_len,
                                                                   bos_id)
        self.total = num_windows(len(stream), seq_len)
        self.count = -(-self.total // batch_size)
        if max_batches is not None:
            self.count = min(self.count, max_batches)

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[Batch]:
        for b in range(self.count):
            windows = np.arange(b * self.batch_size, (b + 1) * self.batch_size)
            yield gather_windows(self.stream, np.where(windows < self.total, windows, -1),
                                 self.seq_len, self.bos_id)


def sequential_batches(stream: np.ndarray, *, batch_size: int, seq_len: int,
                       bos_id: Optional[int], max_batches: Optional[int] = None
                       ) -> SequentialBatches:
    """The evaluation batches of `stream` (see SequentialBatches)."""
    return SequentialBatches(stream, batch_size=batch_size, seq_len=seq_len, bos_id=bos_id,
                             max_batches=max_batches)
