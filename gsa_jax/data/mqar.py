"""Multi-query associative recall (MQAR), the synthetic in-context recall task of Zoology
(Arora, Eyuboglu et al., "Zoology: Measuring and improving recall in efficient language models",
ICLR 2024; HazyResearch/zoology, `zoology/data/multiquery_ar.py`). Our own NumPy implementation
of that definition, vectorised over examples.

One example of length T with P key-value pairs (C = 2P context tokens):

    position   0   1   2   3  ... C-2  C-1 | C ...                                 T-1
    input      k1  v1  k2  v2 ... kP   vP  | filler, with key k_i at C + 2·gap_i
    label      -100 everywhere, except value v_i at position C + 2·gap_i

so at a query position the model sees the key and must output the value bound to it earlier in
the sequence (the value itself never follows the query in the input).

- Keys are drawn from [1, V/2), values from [V/2, V) (V = vocab_size), each without replacement
  within an example: keys are distinct, so every query has one answer; 0 is never a key or value.
- Query placement follows a power law over the S = (T − C) // 2 even offsets of the query region:
  gaps are drawn without replacement with P(gap = j) ∝ (j + 1)^(α − 1), j = 0..S−1, and the
  i-th drawn gap holds the i-th key of the context. α = 0.01 (Zoology's default) puts most queries
  near the start of the region; α = 1 is uniform. Sequential draws without replacement are done at
  once with the Gumbel top-k trick (the same distribution, ordered by draw).
- Filler positions are 0, or uniform random tokens in [0, V) with `random_non_queries` (Zoology's
  default): noise the model must ignore, and that may repeat a key.

Unlike Zoology this checks its arguments with ValueErrors and does not require T even or V > T:
only what the definition needs (P ≥ 1, 2P + 2P ≤ T so the query region has room for P queries,
and enough distinct keys and values).

Training mixtures (`generate_packed`): Zoology trains on several (T, P) at once (e.g. 100K
sequences of (64, 4) and 20K each of (128, 8), (256, 16), (256, 32), (256, 64)); the easy ones let
a model find the recall mechanism before the hard ones. Here a mixture is packed into rows of one
length L: a row holds L // T sequences of one component (T, P), each its own segment (the model
resets its state / masks attention between segments, so each is a separate run), and the rest of
the row (L mod T positions) is padding with label IGNORE. Rows of all components are shuffled
together, so every batch mixes difficulties while every step has the same shape.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional, Sequence

import numpy as np

from gsa_jax import checks

IGNORE = -100   # label of the positions that are not queries (the loss and accuracy skip them)


@dataclasses.dataclass(frozen=True)
class MQARConfig:
    """The task's parameters (Zoology's names in parentheses)."""
    vocab_size: int = 8192          # V (vocab_size); Zoology's figures use 8192
    seq_len: int = 256              # T, input length (input_seq_len)
    num_kv_pairs: int = 64          # P (num_kv_pairs)
    power_a: float = 0.01           # α of the query placement (power_a): 1 uniform, < 1 early
    random_non_queries: bool = True  # random filler tokens instead of 0 (random_non_queries)

    def __post_init__(self):
        def fail(msg):
            raise ValueError(f"MQAR: {msg}")
        for name in ("vocab_size", "seq_len", "num_kv_pairs"):
            checks.check_positive_int("MQAR", name, getattr(self, name))
        P, T, V = self.num_kv_pairs, self.seq_len, self.vocab_size
        if 4 * P > T:
            fail(f"seq_len {T} is too short for {P} key-value pairs: the context takes 2P = "
                 f"{2 * P} tokens and the P queries need 2P more (need seq_len >= {4 * P})")
        if self.num_keys < P or self.num_values < P:
            fail(f"vocab_size {V} has {self.num_keys} key and {self.num_values} value tokens; "
                 f"{P} distinct ones of each are needed (need vocab_size >= {2 * P + 2})")
        if (not isinstance(self.power_a, (int, float)) or isinstance(self.power_a, bool)
                or not np.isfinite(self.power_a)):
            fail(f"power_a must be a finite number, got {self.power_a!r}")

    @property
    def num_keys(self) -> int:
        """Key tokens are 1 .. V/2 − 1."""
        return self.vocab_size // 2 - 1

    @property
    def num_values(self) -> int:
        """Value tokens are V/2 .. V − 1."""
        return self.vocab_size - self.vocab_size // 2

    @property
    def context_len(self) -> int:
        """C = 2P: the key-value pairs at the start."""
        return 2 * self.num_kv_pairs

    @property
    def num_gaps(self) -> int:
        """S = (T − C) // 2: the possible query offsets (even positions of the query region)."""
        return (self.seq_len - self.context_len) // 2


class MQARData(NamedTuple):
    inputs: np.ndarray   # [N, T] int32 token ids
    labels: np.ndarray   # [N, T] int32: the value at query positions, IGNORE (-100) elsewhere

    @property
    def mask(self) -> np.ndarray:
        """[N, T] bool, True at the P query positions of each example."""
        return self.labels != IGNORE


def gap_probabilities(num_gaps: int, power_a: float) -> np.ndarray:
    """[S] float64: P(gap = j) ∝ (j + 1)^(α − 1), j = 0..S−1 (sums to 1)."""
    p = np.arange(1, num_gaps + 1, dtype=np.float64) ** (power_a - 1.0)
    return p / p.sum()


def _ordered_sample(rng: np.random.Generator, n: int, n_rows: int, k: int,
                    log_w: Optional[np.ndarray] = None, block_elems: int = 1 << 22
                    ) -> np.ndarray:
    """[n_rows, k] int64: per row, k distinct indices of [0, n) drawn one after another without
    replacement, with probabilities ∝ exp(log_w) (log_w: [n]; None: uniform), in draw order.

    Gumbel top-k: the k largest of log_w + Gumbel noise, sorted descending, have the law of k
    sequential weighted draws without replacement; with equal weights any i.i.d. continuous noise
    will do, so uniform draws use cheaper float32 uniforms (or, when k(k − 1) ≤ n, rejection of
    rows with a repeat: `_distinct_by_rejection`). Rows go in blocks of about
    `block_elems` noise values to bound memory (100k examples with n = 4096 would otherwise hold
    400M floats).
    """
    if log_w is None and k * (k - 1) <= n:
        return _distinct_by_rejection(rng, n, n_rows, k)
    out = np.empty((n_rows, k), np.int64)
    rows_per_block = max(1, block_elems // n)
    for start in range(0, n_rows, rows_per_block):
        rows = min(n_rows, start + rows_per_block) - start
        if log_w is None:
            scores = rng.random((rows, n), dtype=np.float32)
        else:
            scores = log_w[None, :] + rng.gumbel(size=(rows, n))
        if k < n:
            top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        else:
            top = np.broadcast_to(np.arange(n), (rows, n)).copy()
        order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1, kind="stable")
        out[start:start + rows] = np.take_along_axis(top, order, axis=1)
    return out


def _distinct_by_rejection(rng: np.random.Generator, n: int, n_rows: int, k: int) -> np.ndarray:
    """[n_rows, k] int64: per row k distinct uniform indices of [0, n) in random order.

    Rows of k independent uniform draws, redrawn while they hold a repeat: conditioning i.i.d.
    uniform k-tuples on being distinct gives exactly the law of k sequential draws without
    replacement. With k(k − 1) ≤ n a row is accepted with probability ≥ e^(−1/2) ≈ 0.6, so this
    costs O(k) per row instead of the O(n) noise of the top-k path (the keys and values of a
    mixture of millions of sequences at V = 8192).
    """
    out = rng.integers(0, n, size=(n_rows, k), dtype=np.int64)

    def repeats(a):
        a = np.sort(a, axis=1)
        return np.any(a[:, 1:] == a[:, :-1], axis=1)

    todo = np.flatnonzero(repeats(out))
    while len(todo):
        out[todo] = rng.integers(0, n, size=(len(todo), k), dtype=np.int64)
        todo = todo[repeats(out[todo])]
    return out


def generate(config: MQARConfig, num_examples: int, seed: int) -> MQARData:
    """`num_examples` MQAR sequences; the same (config, num_examples, seed) gives the same data.

    Use different seeds for training and held-out sets. Returns MQARData(inputs, labels), both
    [num_examples, seq_len] int32.
    """
    checks.check_positive_int("MQAR", "num_examples", num_examples)
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool):
        raise ValueError(f"MQAR: seed must be an int, got {seed!r}")
    cfg = config
    N, T, P, C = num_examples, cfg.seq_len, cfg.num_kv_pairs, cfg.context_len
    rng = np.random.default_rng(seed)

    # Distinct keys and values per example, uniformly (equal weights), in random order.
    keys = 1 + _ordered_sample(rng, cfg.num_keys, N, P)                                # [N, P]
    values = cfg.vocab_size // 2 + _ordered_sample(rng, cfg.num_values, N, P)         # [N, P]
    # Query offsets: P distinct gaps, power-law weighted; key i is queried at gap i.
    log_p = np.log(gap_probabilities(cfg.num_gaps, cfg.power_a))
    gaps = _ordered_sample(rng, cfg.num_gaps, N, P, log_w=log_p)                       # [N, P]

    inputs = np.zeros((N, T), np.int64)
    inputs[:, 0:C:2] = keys
    inputs[:, 1:C:2] = values
    query_pos = C + 2 * gaps                                                           # [N, P]
    np.put_along_axis(inputs, query_pos, keys, axis=1)
    labels = np.full((N, T), IGNORE, np.int64)
    np.put_along_axis(labels, query_pos, values, axis=1)
    if cfg.random_non_queries:
        filler = inputs == 0   # 0 is neither a key nor a value: exactly the filler positions
        inputs[filler] = rng.integers(0, cfg.vocab_size, size=int(filler.sum()))
    return MQARData(inputs.astype(np.int32), labels.astype(np.int32))


class PackedMQAR(NamedTuple):
    inputs: np.ndarray        # [N, L] int32 token ids (0 on padding)
    labels: np.ndarray        # [N, L] int32: values at query positions, IGNORE elsewhere
    segment_ids: np.ndarray   # [N, L] int32: 0, 1, ... per packed sequence; padding its own id
    component: np.ndarray     # [N] int32: index of the mixture component of each row

    @property
    def mask(self) -> np.ndarray:
        """[N, L] bool, True at the query positions."""
        return self.labels != IGNORE


def rows_per_component(shares: Sequence[float], num_rows: int) -> list[int]:
    """Splits `num_rows` by `shares` (largest remainder; every component with a positive share
    gets at least one row when there are enough rows)."""
    w = np.asarray(shares, np.float64)
    if w.ndim != 1 or len(w) == 0 or not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise ValueError(f"MQAR: mixture shares must be non-negative with a positive sum, got "
                         f"{list(shares)}")
    exact = w / w.sum() * num_rows
    counts = np.floor(exact).astype(np.int64)
    for i in np.argsort(-(exact - counts), kind="stable")[:num_rows - counts.sum()]:
        counts[i] += 1
    for i in np.flatnonzero((w > 0) & (counts == 0)):   # no positive share left out
        j = int(np.argmax(counts))
        if counts[j] > 1:
            counts[j] -= 1
            counts[i] += 1
    return counts.tolist()


def generate_packed(configs: Sequence[MQARConfig], shares: Sequence[float], num_rows: int,
                    row_len: int, seed: int) -> PackedMQAR:
    """A training mixture of MQAR tasks packed into `num_rows` rows of length `row_len`.

    Component c (configs[c], seq_len T_c <= row_len) fills round(shares[c] / Σ shares · num_rows)
    rows (`rows_per_component`: the shares are shares of rows, i.e. of tokens), each holding
    row_len // T_c sequences of it as consecutive segments, then padding. Every component draws
    its sequences with `generate` from its own seed (derived from `seed` and the component's
    index), and the rows are shuffled with `seed`. The same arguments give the same data.
    """
    if len(configs) != len(shares) or not configs:
        raise ValueError(f"MQAR: need one share per mixture component, got {len(configs)} "
                         f"components and {len(shares)} shares")
    checks.check_positive_int("MQAR", "num_rows", num_rows)
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool):
        raise ValueError(f"MQAR: seed must be an int, got {seed!r}")
    for cfg in configs:
        if cfg.seq_len > row_len:
            raise ValueError(f"MQAR: a mixture component of seq_len {cfg.seq_len} does not fit "
                             f"rows of length {row_len}")
    counts = rows_per_component(shares, num_rows)
    inputs = np.zeros((num_rows, row_len), np.int32)
    labels = np.full((num_rows, row_len), IGNORE, np.int32)
    segments = np.zeros((num_rows, row_len), np.int32)
    component = np.zeros(num_rows, np.int32)
    row = 0
    for c, (cfg, n) in enumerate(zip(configs, counts)):
        if n == 0:
            continue
        T = cfg.seq_len
        per_row = row_len // T
        data = generate(cfg, n * per_row, seed=int(seed) * 7919 + 104729 * (c + 1))
        used = per_row * T
        inputs[row:row + n, :used] = data.inputs.reshape(n, used)
        labels[row:row + n, :used] = data.labels.reshape(n, used)
        segments[row:row + n, :used] = np.repeat(np.arange(per_row, dtype=np.int32), T)
        segments[row:row + n, used:] = per_row        # padding: a segment of its own
        component[row:row + n] = c
        row += n
    order = np.random.default_rng(seed).permutation(num_rows)
    return PackedMQAR(inputs[order], labels[order], segments[order], component[order])
