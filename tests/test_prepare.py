"""`gsa-jax prepare` (gsa_jax/data/prepare.py): token streams against ones built by hand (each
document [BOS] + tokenizer.encode(text), in input order, split by the hash of its key), the
same files for any number of worker processes, compressed inputs, the output dtype, memory
that does not grow with the corpus, and the progress bar.
"""

from __future__ import annotations

import gzip
import json
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from gsa_jax.data import load_datasets, DataConfig, tokens as token_files
from gsa_jax.data.prepare import prepare
from gsa_jax.data.stdlib import is_validation
from memory_util import SNIPPET

BOS = 256
ROOT = pathlib.Path(__file__).parent.parent


def write_jsonl(path: pathlib.Path, texts, opener=open) -> pathlib.Path:
    with opener(path, "wt", encoding="utf-8") as f:
        f.write("\n".join(json.dumps({"text": t, "meta": {"n": len(t)}}) for t in texts) + "\n")
    return path


def random_texts(rng, n: int, max_len: int = 400) -> list[str]:
    alphabet = list("abcdefgh ijk\n\tüé✓{}")
    return ["".join(rng.choice(alphabet, int(rng.integers(0, max_len)))) for _ in range(n)]


def expected_streams(files: dict[str, list[str]], val_fraction: float, encode, bos=BOS):
    """{split: ids} by hand: every file in order, every document [bos] + encode(text), to the
    validation split when the hash of "<file name>:<line>" falls below the fraction."""
    out = {"train": [], "val": []}
    for name, texts in files.items():
        for i, text in enumerate(texts):
            key = f"{name}:{i if '.jsonl' in name else 0}"   # .txt: one document
            split = "val" if val_fraction and is_validation(key, val_fraction) else "train"
            out[split] += [bos] + list(encode(text))
    return out


def byte_encode(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def test_prepare_bytes_text_and_jsonl(tmp_path):
    docs = ["first document\n", "zweites Dokument ü", "", "third"]
    (tmp_path / "a.txt").write_text(docs[0])
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs[1:]) + "\n")
    result = prepare([str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl")],
                     str(tmp_path / "out" / "train.bin"))
    assert result["train"]["documents"] == 4
    ids, meta = token_files.read_token_file(tmp_path / "out" / "train.bin")
    expected = []
    for d in docs:
        expected += [BOS] + list(d.encode("utf-8"))
    assert ids.tolist() == expected and meta["bos_id"] == BOS and meta["vocab_size"] == 257
    # The prepared file trains through the same path as any token file.
    ds = load_datasets(DataConfig(source="tokens", train_path=str(tmp_path / "out" / "train.bin")))
    assert ds.bos_id == BOS and ds.vocab_size == 257 and ds.tokenizer == "bytes"


def _bpe_tokenizer(path: pathlib.Path, texts):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, pre_tokenizers, trainers, decoders
    tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(path))
    return tok


def test_prepare_with_a_tokenizers_json(tmp_path):
    texts = [f"def function_{i}(x):\n    return x + {i}\n" for i in range(50)]
    tok = _bpe_tokenizer(tmp_path / "tok.json", texts)
    (tmp_path / "docs.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in texts))
    # batch_chars small: the documents are tokenized in many batches (encode_batch).
    prepare([str(tmp_path / "docs.jsonl")], str(tmp_path / "train.bin"),
            val_output=str(tmp_path / "val.bin"), val_fraction=0.2,
            tokenizer=str(tmp_path / "tok.json"), batch_chars=100)
    eot = tok.token_to_id("<|endoftext|>")
    train, meta = token_files.read_token_file(tmp_path / "train.bin")
    val, _ = token_files.read_token_file(tmp_path / "val.bin")
    assert meta["bos_id"] == eot and meta["vocab_size"] == tok.get_vocab_size()
    # Split the streams at the separator and decode: every text comes back exactly once.
    decoded = []
    for stream in (train, val):
        pieces = np.split(np.asarray(stream), np.flatnonzero(np.asarray(stream) == eot))
        decoded += [tok.decode(p[1:].tolist()) for p in pieces if len(p)]
    assert sorted(decoded) == sorted(texts)
    assert 0 < len(val) < len(train)
    # The batched tokenization gives the ids of one encode call per document.
    expected = expected_streams({"docs.jsonl": texts}, 0.2,
                                lambda t: tok.encode(t, add_special_tokens=False).ids, eot)
    assert train.tolist() == expected["train"] and val.tolist() == expected["val"]


def test_workers_write_the_same_files_and_read_compressed_inputs(tmp_path):
    """Three .jsonl files (one gzip-compressed) and a .txt, a validation split, .bin and .npy
    outputs: in this process and in 2 worker processes, the streams built by hand."""
    rng = np.random.default_rng()
    files = {"a.jsonl": random_texts(rng, 60), "b.txt": random_texts(rng, 1)[0:1],
             "c.jsonl.gz": random_texts(rng, 40), "d.jsonl": random_texts(rng, 50)}
    paths = []
    for name, texts in files.items():
        if name.endswith(".txt"):
            (tmp_path / name).write_text(texts[0], encoding="utf-8")
        else:
            write_jsonl(tmp_path / name, texts, gzip.open if name.endswith(".gz") else open)
        paths.append(str(tmp_path / name))
    expected = expected_streams(files, 0.25, byte_encode)
    for workers in (1, 2):
        out = tmp_path / f"out{workers}"
        result = prepare(paths, str(out / "train.bin"), val_output=str(out / "val.npy"),
                         val_fraction=0.25, workers=workers, batch_chars=500)
        for split, name in (("train", "train.bin"), ("val", "val.npy")):
            ids, meta = token_files.read_token_file(out / name)
            assert ids.dtype == np.uint16 and meta["num_tokens"] == len(expected[split])
            assert ids.tolist() == expected[split], (workers, split)
            assert result[split]["documents"] == expected[split].count(BOS)
        assert sorted(p.name for p in out.iterdir()) == sorted(
            ["train.bin", "train.bin.json", "val.npy", "val.npy.json"])  # no parts left


def test_a_failing_worker_names_the_record_and_leaves_nothing(tmp_path):
    rng = np.random.default_rng()
    good = [str(write_jsonl(tmp_path / f"{i}.jsonl", random_texts(rng, 30))) for i in range(2)]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n' * 7 + '{"text" "b"}\n')
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(ValueError, match=r"bad\.jsonl:8: not a JSON record"):
        prepare(good + [str(bad)], str(tmp_path / "new" / "deeper" / "train.bin"), workers=2)
    assert sorted(tmp_path.rglob("*")) == before   # no output, no parts, no new folders


def test_large_vocabulary_is_written_as_uint32(tmp_path):
    """A word-level vocabulary of 70,000 entries (> 2^16): ids above 65535 survive."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, pre_tokenizers
    vocab = {f"w{i}": i for i in range(70_000)}
    vocab["<|endoftext|>"] = 70_000
    tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "words.json"))
    rng = np.random.default_rng()
    words = rng.integers(0, 70_000, (20, 30))
    texts = [" ".join(f"w{i}" for i in row) for row in words]
    write_jsonl(tmp_path / "docs.jsonl", texts)
    prepare([str(tmp_path / "docs.jsonl")], str(tmp_path / "train.bin"),
            tokenizer=str(tmp_path / "words.json"))
    ids, meta = token_files.read_token_file(tmp_path / "train.bin")
    assert ids.dtype == np.uint32 and meta["dtype"] == "uint32"
    expected = np.concatenate([np.r_[70_000, row] for row in words])
    np.testing.assert_array_equal(ids, expected)
    assert ids.max() > 65535


def test_zstd_compressed_jsonl(tmp_path):
    zstandard = pytest.importorskip("zstandard")
    rng = np.random.default_rng()
    texts = random_texts(rng, 30)
    write_jsonl(tmp_path / "plain.jsonl", texts)
    raw = (tmp_path / "plain.jsonl").read_bytes()
    (tmp_path / "docs.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(raw))
    prepare([str(tmp_path / "docs.jsonl.zst")], str(tmp_path / "train.bin"))
    ids, _ = token_files.read_token_file(tmp_path / "train.bin")
    assert ids.tolist() == expected_streams({"docs.jsonl.zst": texts}, 0, byte_encode)["train"]


def test_progress_bar_counts_tokens(tmp_path, capsys):
    rng = np.random.default_rng()
    texts = random_texts(rng, 40)
    write_jsonl(tmp_path / "docs.jsonl", texts)
    result = prepare([str(tmp_path / "docs.jsonl")], str(tmp_path / "train.bin"),
                     progress=True, batch_chars=1000)
    err = capsys.readouterr().err
    total = result["train"]["num_tokens"]
    assert total == sum(len(t.encode("utf-8")) + 1 for t in texts)
    assert f"{total:,} tok" in err and "tok/s" in err   # the last update: every token counted


MEMORY_SCRIPT = SNIPPET + textwrap.dedent("""
    import json, sys
    from gsa_jax.data.prepare import prepare

    small, big, out = sys.argv[1:4]
    prepare([small], out + "/warm.bin", val_output=out + "/warm_val.bin", val_fraction=0.01,
            workers=1, batch_chars=1 << 18)   # every code path once, before the baseline
    base = peak_rss_mb()
    result = prepare([big], out + "/train.bin", val_output=out + "/val.bin", val_fraction=0.01,
                     workers=1, batch_chars=1 << 18)
    print(json.dumps({"base": base, "peak": peak_rss_mb(), "result": result}))
""")


def test_memory_does_not_grow_with_the_corpus(tmp_path):
    """Peak memory of a prepare over a 64 MB corpus stays within 8 MB of the process's peak
    before it (the whole corpus as int64 ids would be 512 MB; as uint16, 128 MB)."""
    limit_mb, corpus_mb = 8, 64
    rng = np.random.default_rng()
    block = "".join(json.dumps({"text": t}) + "\n" for t in random_texts(rng, 800, 2000))
    block = block.encode("utf-8")
    repeats = corpus_mb * 2 ** 20 // len(block) + 1
    with open(tmp_path / "big.jsonl", "wb") as f:
        for _ in range(repeats):
            f.write(block)
    (tmp_path / "small.jsonl").write_bytes(block)
    proc = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(tmp_path / "small.jsonl"),
                           str(tmp_path / "big.jsonl"), str(tmp_path)], capture_output=True,
                          text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.splitlines()[-1])
    texts = [json.loads(line)["text"] for line in block.decode("utf-8").splitlines()]
    result = report["result"]
    assert sum(r["documents"] for r in result.values()) == len(texts) * repeats
    tokens = sum(len(t.encode("utf-8")) + 1 for t in texts) * repeats
    assert sum(r["num_tokens"] for r in result.values()) == tokens
    ids, _ = token_files.read_token_file(tmp_path / "train.bin")
    assert ids.size == result["train"]["num_tokens"]
    growth = report["peak"] - report["base"]
    assert growth < limit_mb, f"peak memory grew by {growth:.1f} MB over a {corpus_mb} MB corpus"
