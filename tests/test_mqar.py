"""The MQAR generator (gsa_jax.data.mqar) against the task's definition, checked independently:
every query is answered by the pair bound earlier in its own sequence, keys and values are
distinct and in their halves of the vocabulary, the layout is Zoology's, the same seed gives the
same data, the query placement follows the power law (first and second draws), and bad
arguments raise ValueError."""

from __future__ import annotations

import numpy as np
import pytest

from gsa_jax.data.mqar import IGNORE, MQARConfig, generate


def _pairs_and_queries(inputs_T, labels_T, context_len):
    """(dict key -> (value, position of the key), [(query position, key, label)]), read from one
    example by walking it: the test's own reading of the layout."""
    bound = {}
    for pos in range(0, context_len, 2):
        bound[int(inputs_T[pos])] = (int(inputs_T[pos + 1]), pos)
    queries = [(int(p), int(inputs_T[p]), int(labels_T[p])) for p in np.flatnonzero(
        labels_T != IGNORE)]
    return bound, queries


@pytest.mark.parametrize("random_non_queries", [True, False])
def test_layout_and_answers(random_non_queries):
    cfg = MQARConfig(vocab_size=40, seq_len=48, num_kv_pairs=6, power_a=0.3,
                     random_non_queries=random_non_queries)
    data = generate(cfg, 300, seed=7)
    N, T, P, C, V = 300, 48, 6, 12, 40
    assert data.inputs.shape == data.labels.shape == (N, T)
    assert data.inputs.dtype == data.labels.dtype == np.int32
    assert data.inputs.min() >= 0 and data.inputs.max() < V
    assert np.all(data.mask.sum(axis=1) == P)
    for n in range(N):
        x, y = data.inputs[n], data.labels[n]
        bound, queries = _pairs_and_queries(x, y, C)
        keys = x[0:C:2]
        values = x[1:C:2]
        # Distinct keys (one answer per query) and values, each in its half of the vocabulary.
        assert len(set(keys.tolist())) == P and len(set(values.tolist())) == P
        assert np.all((keys >= 1) & (keys < V // 2)) and np.all(values >= V // 2)
        assert len(queries) == P
        asked = set()
        for pos, key, label in queries:
            # Queries sit on even offsets of the region after the context ...
            assert pos >= C and (pos - C) % 2 == 0
            # ... ask a key bound earlier in the sequence, and are labelled with its value.
            assert key in bound and bound[key][1] < pos
            assert label == bound[key][0]
            asked.add(key)
        assert asked == set(keys.tolist())   # every key is asked once
        filler = np.ones(T, bool)
        filler[:C] = False
        filler[[q[0] for q in queries]] = False
        if not random_non_queries:
            assert np.all(x[filler] == 0)
    if random_non_queries:
        # Random filler: no longer all 0, and spread over the vocabulary.
        region = data.inputs[:, C:][~data.mask[:, C:]]
        assert len(np.unique(region)) > V // 2


def test_key_order_matches_query_order_by_draw():
    """Zoology binds the i-th drawn gap to the i-th key of the context: with P = S (every gap
    used) and uniform placement each key's query offset is a uniformly random permutation, and
    the query region holds exactly the keys, once each, at every even offset."""
    cfg = MQARConfig(vocab_size=8192, seq_len=256, num_kv_pairs=64, power_a=1.0)
    data = generate(cfg, 20, seed=3)
    C = 128
    assert np.all(data.mask[:, C::2]) and not np.any(data.mask[:, :C])
    assert not np.any(data.mask[:, C + 1::2])
    for n in range(20):
        keys = data.inputs[n, 0:C:2]
        assert sorted(data.inputs[n, C::2].tolist()) == sorted(keys.tolist())


def test_seeded_determinism():
    cfg = MQARConfig(vocab_size=64, seq_len=64, num_kv_pairs=8)
    a, b = generate(cfg, 50, seed=11), generate(cfg, 50, seed=11)
    np.testing.assert_array_equal(a.inputs, b.inputs)
    np.testing.assert_array_equal(a.labels, b.labels)
    c = generate(cfg, 50, seed=12)
    assert not np.array_equal(a.inputs, c.inputs)
    assert not np.array_equal(a.labels, c.labels)


def _power_law(S, alpha):
    w = np.array([(j + 1.0) ** (alpha - 1.0) for j in range(S)])
    return w / w.sum()


def _chi2(counts, probs):
    expected = probs * counts.sum()
    return float(np.sum((counts - expected) ** 2 / expected))


@pytest.mark.parametrize("alpha", [0.01, 0.5, 1.0])
def test_power_law_placement(alpha):
    """The first key's query gap is the first weighted draw: P(j) ∝ (j + 1)^(α − 1); the second
    key's is the second draw without replacement: Σ_{i≠j} p_i p_j / (1 − p_i). Chi-square against
    both, at a bound (df + 6·sqrt(2·df)) that a correct sampler exceeds with negligible
    probability and a wrong law (e.g. α off by 0.2, or no power law) exceeds by far."""
    T, P, N = 64, 4, 20000
    C = 2 * P
    S = (T - C) // 2
    cfg = MQARConfig(vocab_size=64, seq_len=T, num_kv_pairs=P, power_a=alpha,
                     random_non_queries=False)
    data = generate(cfg, N, seed=5)
    gaps = np.empty((N, 2), int)
    for which in range(2):   # gap of key `which` (keys sit at 0, 2, 4, ... of the context)
        key = data.inputs[:, 2 * which]
        hit = (data.inputs[:, C:] == key[:, None]) & data.mask[:, C:]
        assert np.all(hit.sum(axis=1) == 1)
        gaps[:, which] = np.argmax(hit, axis=1) // 2
    p = _power_law(S, alpha)
    second = np.array([sum(p[i] * p[j] / (1 - p[i]) for i in range(S) if i != j)
                       for j in range(S)])
    bound = (S - 1) + 6 * np.sqrt(2 * (S - 1))
    for which, law in ((0, p), (1, second)):
        counts = np.bincount(gaps[:, which], minlength=S)
        assert _chi2(counts, law) < bound, (alpha, which)
    # The statistic has power: the same counts against a law with α shifted by 0.2 fail.
    wrong = _power_law(S, alpha + 0.2 if alpha < 1 else alpha - 0.2)
    assert _chi2(np.bincount(gaps[:, 0], minlength=S), wrong) > 3 * bound


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_kv_pairs=0), "num_kv_pairs"),
    (dict(seq_len=31, num_kv_pairs=8), "too short"),
    (dict(vocab_size=17, num_kv_pairs=8), "vocab_size"),
    (dict(vocab_size=2.5), "vocab_size"),
    (dict(power_a=float("nan")), "power_a"),
    (dict(power_a=True), "power_a"),
])
def test_bad_config_raises(kwargs, match):
    base = dict(vocab_size=64, seq_len=32, num_kv_pairs=4)
    with pytest.raises(ValueError, match=match):
        MQARConfig(**{**base, **kwargs})


def test_bad_generate_args_raise():
    cfg = MQARConfig(vocab_size=64, seq_len=32, num_kv_pairs=4)
    with pytest.raises(ValueError, match="num_examples"):
        generate(cfg, 0, seed=0)
    with pytest.raises(ValueError, match="seed"):
        generate(cfg, 4, seed=1.5)


def test_smallest_valid_sizes():
    """The bounds of the checks are tight: 4P = T and V = 2P + 2 work (and use every gap and
    every key)."""
    cfg = MQARConfig(vocab_size=10, seq_len=16, num_kv_pairs=4, random_non_queries=False)
    data = generate(cfg, 30, seed=0)
    assert np.all(data.mask.sum(axis=1) == 4)
    assert np.all(np.sort(data.inputs[:, 0:8:2], axis=1) == np.arange(1, 5))


# ------------------------------------------------------------------ training mixtures
def _mixture(seed=3, num_rows=240, row_len=64):
    from gsa_jax.data.mqar import generate_packed
    configs = [MQARConfig(vocab_size=96, seq_len=16, num_kv_pairs=2),
               MQARConfig(vocab_size=96, seq_len=24, num_kv_pairs=4),   # 64 = 2 x 24 + 16 pad
               MQARConfig(vocab_size=96, seq_len=64, num_kv_pairs=8, power_a=1.0)]
    return configs, generate_packed(configs, [0.5, 0.25, 0.25], num_rows, row_len, seed=seed)


def test_packed_mixture_answers_only_at_queries():
    """Every packed sequence is a valid MQAR example on its own: labels sit only on its query
    positions, each query asks a key bound earlier in the same segment and is labelled with the
    value bound to it there; padding has no labels; the shares set the rows per component."""
    configs, data = _mixture()
    N, L = 240, 64
    assert data.inputs.shape == data.labels.shape == data.segment_ids.shape == (N, L)
    assert data.inputs.dtype == data.labels.dtype == data.segment_ids.dtype == np.int32
    assert np.bincount(data.component, minlength=3).tolist() == [120, 60, 60]
    for n in range(N):
        cfg = configs[data.component[n]]
        T, P, C = cfg.seq_len, cfg.num_kv_pairs, cfg.context_len
        per_row = L // T
        seg = data.segment_ids[n]
        assert seg.tolist() == np.repeat(np.arange(per_row), T).tolist() + \
            [per_row] * (L - per_row * T)
        assert np.all(data.labels[n, per_row * T:] == IGNORE)      # padding: never a query
        assert np.all(data.inputs[n, per_row * T:] == 0)
        for j in range(per_row):
            x = data.inputs[n, j * T:(j + 1) * T]
            y = data.labels[n, j * T:(j + 1) * T]
            assert np.all(seg[j * T:(j + 1) * T] == j)
            bound, queries = _pairs_and_queries(x, y, C)
            assert len(bound) == P and len(queries) == P
            for pos, key, label in queries:
                assert pos >= C and (pos - C) % 2 == 0
                assert key in bound and bound[key][1] < pos and label == bound[key][0]
            assert {q[1] for q in queries} == set(bound)
    # Rows of the components are shuffled together, not in blocks.
    assert len(set(data.component[:40].tolist())) == 3


def test_packed_mixture_determinism_and_checks():
    from gsa_jax.data.mqar import generate_packed, rows_per_component
    _, a = _mixture(seed=5)
    _, b = _mixture(seed=5)
    _, c = _mixture(seed=6)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a.inputs, c.inputs)
    assert rows_per_component([1, 1, 1], 10) == [4, 3, 3]
    assert rows_per_component([1000, 1], 5) == [4, 1]   # a positive share keeps a row
    assert sum(rows_per_component([0.26, 0.1, 0.21, 0.21, 0.21], 777)) == 777
    cfg = MQARConfig(vocab_size=64, seq_len=32, num_kv_pairs=4)
    with pytest.raises(ValueError, match="does not fit"):
        generate_packed([cfg], [1.0], 4, row_len=16, seed=0)
    with pytest.raises(ValueError, match="one share"):
        generate_packed([cfg], [1.0, 2.0], 4, row_len=32, seed=0)
    with pytest.raises(ValueError, match="shares"):
        generate_packed([cfg], [0.0], 4, row_len=32, seed=0)
    with pytest.raises(ValueError, match="num_rows"):
        generate_packed([cfg], [1.0], 0, row_len=32, seed=0)


def test_keys_and_values_uniform_without_replacement():
    """The keys and values (the rejection path when P(P − 1) ≤ the number of tokens): each
    position of the context is uniform over its half of the vocabulary, and the order is random
    (the first key is the smaller one half of the time)."""
    cfg = MQARConfig(vocab_size=64, seq_len=16, num_kv_pairs=4, random_non_queries=False)
    data = generate(cfg, 30000, seed=9)
    first_key, first_value = data.inputs[:, 0], data.inputs[:, 1]
    n_keys, n_values = cfg.num_keys, cfg.num_values        # 31 and 32 (P(P-1) = 12 <= both)
    for counts, n in ((np.bincount(first_key - 1, minlength=n_keys), n_keys),
                      (np.bincount(first_value - 32, minlength=n_values), n_values)):
        assert len(counts) == n
        bound = (n - 1) + 6 * np.sqrt(2 * (n - 1))
        assert _chi2(counts, np.full(n, 1.0 / n)) < bound
    share = np.mean(data.inputs[:, 0] < data.inputs[:, 2])
    assert abs(share - 0.5) < 0.02
