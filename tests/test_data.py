"""Data pipeline: permutation, packing, segment ids, determinism, resume, corpora, token files
(`gsa-jax prepare`: tests/test_prepare.py).

Each check compares against an independent construction (plain Python loops over the stream),
never against the code's own helpers. The stdlib corpus differs between Python versions: only
its structure is checked, on a generated directory of files and (properties only) the real one.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from gsa_jax.data import (ByteTokenizer, DataConfig, PackedBatches, Permutation, load_datasets,
                          sequential_batches)
from gsa_jax.data import stdlib, tokens as token_files

BOS = 256


def random_stream(n: int, seed: int = 0, bos_every: float = 0.05) -> np.ndarray:
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 256, n).astype(np.uint16)
    ids[rng.random(n) < bos_every] = BOS
    return ids


def reference_window(stream: np.ndarray, w: int, T: int) -> dict:
    """Window w by hand: inputs/targets by slicing, segment ids by a running counter."""
    rows = [int(x) for x in stream[w * T: w * T + T + 1]]
    seg, count = [], 0
    for tok in rows[:-1]:
        count += tok == BOS
        seg.append(count)
    return {"tokens": rows[:-1], "targets": rows[1:], "segment_ids": seg}


# ----------------------------------------------------------------------- permutation
@pytest.mark.parametrize("n", [1, 2, 3, 5, 64, 1000, 4097])
def test_permutation_is_a_bijection(n):
    perm = Permutation(n, (3, 1))
    values = perm(np.arange(n))
    assert sorted(values.tolist()) == list(range(n))
    # Pointwise: evaluating a subset gives the same values as the whole range.
    sub = np.array([0, n - 1, n // 2])
    np.testing.assert_array_equal(perm(sub), values[sub])


def test_permutation_depends_on_the_seed_and_is_not_identity():
    a, b = Permutation(1000, (0, 0))(np.arange(1000)), Permutation(1000, (0, 1))(np.arange(1000))
    assert (a != np.arange(1000)).mean() > 0.9
    assert (a != b).mean() > 0.9
    np.testing.assert_array_equal(a, Permutation(1000, (0, 0))(np.arange(1000)))


# ----------------------------------------------------------------------- packing
def test_batches_match_hand_built_windows_and_cover_each_epoch_once():
    T, B = 16, 4
    stream = random_stream(T * 37 + 5, seed=1)
    loader = PackedBatches(stream, batch_size=B, seq_len=T, seed=7, bos_id=BOS)
    W = loader.num_windows
    assert W == (len(stream) - 1) // T
    seen = []
    for _ in range(-(-2 * W // B)):  # a bit more than two epochs
        start = loader.position
        batch = next(loader)
        windows = loader.window_indices(start, B)
        for row, w in enumerate(windows):
            ref = reference_window(stream, int(w), T)
            for key in ("tokens", "targets", "segment_ids"):
                assert batch[key][row].tolist() == ref[key], key
        assert batch["mask"].dtype == np.float32 and batch["mask"].min() == 1.0
        assert batch["tokens"].dtype == np.int32 and batch["tokens"].shape == (B, T)
        seen += windows.tolist()
    # Epoch e is a permutation of all windows, and epochs differ in order.
    assert sorted(seen[:W]) == list(range(W))
    assert sorted(seen[W:2 * W]) == list(range(W))
    assert seen[:W] != seen[W:2 * W]


def test_segment_ids_change_exactly_at_bos():
    stream = random_stream(4000, seed=2, bos_every=0.1)
    batch = PackedBatches(stream, batch_size=8, seq_len=50, seed=0, bos_id=BOS).batch_at(0)
    changes = np.diff(batch["segment_ids"], axis=1) != 0
    np.testing.assert_array_equal(changes, batch["tokens"][:, 1:] == BOS)


def test_order_is_deterministic_and_seeded():
    stream = random_stream(5000, seed=3)
    make = lambda seed: PackedBatches(stream, batch_size=4, seq_len=20, seed=seed, bos_id=BOS)
    a, b, c = make(0), make(0), make(1)
    for _ in range(5):
        x, y, z = next(a), next(b), next(c)
        np.testing.assert_array_equal(x["tokens"], y["tokens"])
    assert not np.array_equal(x["tokens"], z["tokens"])


def test_resume_continues_with_the_same_batches():
    stream = random_stream(3000, seed=4)
    kw = dict(batch_size=6, seq_len=25, seed=5, bos_id=BOS)
    full = PackedBatches(stream, **kw)
    expected = [next(full)["tokens"] for _ in range(40)]   # crosses epochs (W = 119)
    first = PackedBatches(stream, **kw)
    for _ in range(17):
        next(first)
    state = json.loads(json.dumps(first.state_dict()))       # serialisable
    resumed = PackedBatches(stream, **kw)
    resumed.load_state_dict(state)
    for step in range(17, 40):
        np.testing.assert_array_equal(next(resumed)["tokens"], expected[step])


@pytest.mark.parametrize("change", ["seed", "seq_len", "data"])
def test_resume_refuses_other_data_or_settings(change):
    stream = random_stream(3000, seed=4)
    kw = dict(batch_size=6, seq_len=25, seed=5, bos_id=BOS)
    state = PackedBatches(stream, **kw).state_dict()
    if change == "data":
        stream = stream[:-100]
    else:
        kw[change] += 1
    with pytest.raises(ValueError, match=change if change != "data" else "num_tokens"):
        PackedBatches(stream, **kw).load_state_dict(state)


def test_too_short_stream_is_a_clear_error():
    with pytest.raises(ValueError, match="fewer than one sequence"):
        PackedBatches(random_stream(10), batch_size=1, seq_len=10, seed=0, bos_id=BOS)


def test_sequential_batches_score_every_window_once():
    T, B = 10, 4
    stream = random_stream(T * 13 + 3, seed=6)
    batches = list(sequential_batches(stream, batch_size=B, seq_len=T, bos_id=BOS))
    W = (len(stream) - 1) // T
    assert len(batches) == -(-W // B)
    rows = [(b["tokens"][r], b["mask"][r]) for b in batches for r in range(B)]
    for w, (tokens, mask) in enumerate(rows):
        if w < W:
            assert tokens.tolist() == reference_window(stream, w, T)["tokens"]
            assert mask.min() == 1
        else:
            assert mask.max() == 0            # padding rows do not count
    assert len(list(sequential_batches(stream, batch_size=B, seq_len=T, bos_id=BOS,
                                       max_batches=2))) == 2


# ----------------------------------------------------------------------- corpora
def make_source_tree(root, seed=0):
    """A small tree of *.py files (random bytes, some non-ASCII) and files that must be skipped."""
    rng = np.random.default_rng(seed)
    files = {}
    for i in range(30):
        rel = f"pkg{i % 3}/mod_{i}.py" if i % 2 else f"top_{i}.py"
        files[rel] = bytes(rng.integers(0, 256, int(rng.integers(1, 400))).tolist())
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    (root / "site-packages" / "x").mkdir(parents=True)
    (root / "site-packages" / "x" / "skip.py").write_bytes(b"skipped")
    (root / "notes.txt").write_bytes(b"not python")
    return files


def test_source_corpus_documents_and_split(tmp_path):
    files = make_source_tree(tmp_path)
    train, val, info = stdlib.build_corpus(tmp_path, val_fraction=0.3)
    assert stdlib.list_source_files(tmp_path) == sorted(files)
    # Rebuild both streams by hand: files in path order, each [BOS, bytes...].
    expected = {"train": [], "val": []}
    for rel in sorted(files):
        split = "val" if stdlib.is_validation(rel, 0.3) else "train"
        expected[split] += [BOS] + list(files[rel])
    assert train.tolist() == expected["train"] and val.tolist() == expected["val"]
    assert info["train_files"] + info["val_files"] == len(files)
    assert 0 < info["val_files"] < len(files)
    # The split is a property of the path alone.
    assert stdlib.is_validation("a/b.py", 0.5) == stdlib.is_validation("a/b.py", 0.5)
    assert not stdlib.is_validation("a/b.py", 0.0)


def test_real_stdlib_corpus_structure():
    """The running interpreter's stdlib: structure only (content varies between versions)."""
    ds = load_datasets(DataConfig(source="stdlib", val_fraction=0.05))
    n_files = ds.info["train_files"] + ds.info["val_files"]
    assert n_files > 100 and ds.info["val_files"] > 0
    assert ds.vocab_size == 257 and ds.bos_id == BOS and ds.tokenizer == "bytes"
    for stream, files in ((ds.train, ds.info["train_files"]), (ds.val, ds.info["val_files"])):
        assert stream[0] == BOS and stream.max() <= BOS
        assert int((stream == BOS).sum()) == files     # source files contain no byte 256


def test_byte_tokenizer_roundtrip():
    tok = ByteTokenizer()
    text = "def f(x):\n    return x ** 2  # ünïcödé ✓"
    ids = tok.encode(text)
    assert max(ids) < 256 and len(ids) == len(text.encode("utf-8"))
    assert tok.decode(ids + [BOS]) == text


# ----------------------------------------------------------------------- token files
@pytest.mark.parametrize("suffix,vocab", [(".bin", 300), (".bin", 70000), (".npy", 300)])
def test_token_file_roundtrip(tmp_path, suffix, vocab):
    ids = np.random.default_rng(0).integers(0, vocab, 1000)
    path = tmp_path / f"train{suffix}"
    meta = token_files.write_token_file(path, ids, vocab_size=vocab, bos_id=3)
    back, read_meta = token_files.read_token_file(path)
    np.testing.assert_array_equal(np.asarray(back, np.int64), ids)
    assert back.dtype == (np.uint16 if vocab <= 65536 else np.uint32)
    assert read_meta == meta and meta["bos_id"] == 3


def test_token_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="gsa-jax prepare"):
        token_files.read_token_file(tmp_path / "missing.bin")
    (tmp_path / "odd.bin").write_bytes(b"\x00\x01\x02")
    with pytest.raises(ValueError, match="not a multiple"):
        token_files.read_token_file(tmp_path / "odd.bin", "uint16")
    with pytest.raises(FileNotFoundError):
        load_datasets(DataConfig(source="tokens", train_path=str(tmp_path / "nope.bin")))
    with pytest.raises(ValueError, match="train_path"):
        DataConfig(source="tokens")
