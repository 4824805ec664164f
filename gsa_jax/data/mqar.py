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
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional

import numpy as np

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
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
                fail(f"{name} must be a positive int, got {value!r}")
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
    will do, so uniform draws use cheaper float32 uniforms. Rows go in blocks of about
    `block_elems` noise values to bound memory (100k examples with n = 4096 would otherwise hold
    400M floats).
    """
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


def generate(config: MQARConfig, num_examples: int, seed: int) -> MQARData:
    """`num_examples` MQAR sequences; the same (config, num_examples, seed) gives the same data.

    Use different seeds for training and held-out sets. Returns MQARData(inputs, labels), both
    [num_examples, seq_len] int32.
    """
    if not isinstance(num_examples, (int, np.integer)) or isinstance(num_examples, bool) \
            or num_examples < 1:
        raise ValueError(f"MQAR: num_examples must be a positive int, got {num_examples!r}")
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
