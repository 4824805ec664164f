"""The lm-evaluation-harness adapter (gsa_jax/lm_eval_adapter.py) against direct computations
from the model's logits: log-likelihoods of batched, padded, sorted and truncated requests equal
those of each request run alone; is_greedy; rolling windows (a worked example and lm_eval's own
window function); generation against a cache-free greedy loop; a checkpoint loaded from a run
directory; and, where lm_eval is installed, a local multiple-choice task run through
`lm_eval.simple_evaluate` with the model registered as "gsa-jax"."""

from __future__ import annotations

import functools
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gsa_jax import lm_eval_adapter
from gsa_jax.data import ByteTokenizer
from gsa_jax.lm_eval_adapter import GSAJaxLM, rolling_windows
from gsa_jax.models import CausalLM, get_preset

BOS = ByteTokenizer.bos_id
MAX_LEN = 24


@functools.lru_cache(maxsize=None)
def _model():
    # Larger init than the default so the next-token distributions are far from uniform; chunk
    # size 8 so that scored sequences span several chunks.
    cfg = get_preset("gsa-tiny", vocab_size=264, num_layers=2, initializer_range=0.3,
                     chunk_size=8)
    model = CausalLM(cfg)
    params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
    return model, params


def _core(**kw) -> GSAJaxLM:
    model, params = _model()
    kw = {"max_length": MAX_LEN, "batch_size": 3, "pad_multiple": 8, **kw}
    return GSAJaxLM(model, params, ByteTokenizer(), **kw)


def log_softmax64(logits) -> np.ndarray:
    logits = np.asarray(logits, np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def _logprobs(tokens: list[int]):
    """(log p [T, V], logits [T, V]) of tokens[1:] given their prefixes: one unpadded forward of
    tokens[:-1]."""
    model, params = _model()
    logits = np.asarray(_apply(model)(params, jnp.asarray([tokens[:-1]], jnp.int32))[0])
    return log_softmax64(logits), logits


@functools.lru_cache(maxsize=None)
def _apply(model):
    return jax.jit(model.apply)  # one compile per input length: the tests reuse a few lengths


def reference(context: str, continuation: str, max_length: int = MAX_LEN):
    """(Σ log p(continuation), is_greedy) by hand: BOS + bytes, the window of the last
    max_length + 1 tokens, one forward pass of exactly that window."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    cont = list(continuation.encode())
    full = ([BOS] + list(context.encode()) + cont)[-(max_length + 1):]
    n = min(len(cont), len(full) - 1)
    if n == 0:
        return 0.0, True
    logp, logits = _logprobs(full)
    targets = np.asarray(full[1:])
    rows = np.arange(len(targets))[-n:]
    return (float(logp[rows, targets[rows]].sum()),
            bool(np.all(logits[rows].argmax(-1) == targets[rows])))


def _random_text(rng, low, high) -> str:
    return "".join(rng.choice(list("abcdefgh ,.")) for _ in range(rng.integers(low, high)))


def greedy_tokens(prompt: list[int], n: int, width: int = 32) -> list[int]:
    """n greedy tokens after `prompt`, each from a full forward pass of the sequence so far (no
    cache). The sequence sits at the left of a fixed-width buffer (one compilation): the model
    is causal, so the logits at its last token do not see the filler on the right."""
    model, params = _model()
    seq = list(prompt)
    for _ in range(n):
        buffer = np.zeros((1, width), np.int32)
        buffer[0, :len(seq)] = seq
        logits = _apply(model)(params, jnp.asarray(buffer))
        seq.append(int(jnp.argmax(logits[0, len(seq) - 1])))
    return seq[len(prompt):]


@pytest.mark.slow  # 18 s on the 2-core CI machine: CI's second step
def test_loglikelihood_equals_each_request_alone():
    """Eight requests (batches of 3, the last one padded; lengths padded to multiples of 8;
    longer-than-max_length ones truncated on the left; one with an empty continuation; one whose
    context ends in spaces) score as each one alone, by hand."""
    rng = np.random.default_rng(0)
    requests = []
    for total in (9, 9, 17, 17, 17):  # bytes of context + continuation: few reference shapes
        split = int(rng.integers(0, total))
        text = _random_text(rng, total, total + 1)
        requests.append((text[:split], text[split:]))
    requests += [("x" * 40 + "abc", " defg"), ("hello", ""), ("the cat  ", "sat down")]
    got = _core().loglikelihood(requests)
    for (context, continuation), (logprob, greedy) in zip(requests, got):
        want_logprob, want_greedy = reference(context, continuation)
        assert logprob == pytest.approx(want_logprob, rel=1e-4, abs=1e-4), (context, continuation)
        assert greedy == want_greedy
    assert got[6] == (0.0, True)
    # The moved spaces: "the cat  " + "sat down" is "the cat" + "  sat down".
    assert got[7][0] == pytest.approx(reference("the cat", "  sat down")[0], rel=1e-5)
    assert all(lp < 0 for lp, _ in got[:6] + got[7:])


def test_is_greedy():
    """The model's own greedy continuation is greedy; changing its last byte makes it not."""
    context = "def f"
    tokens = greedy_tokens([BOS] + list(context.encode()), 5)
    other = (tokens[-1] + 1) % 256
    assert all(t < 256 for t in tokens)  # bytes: the continuation decodes to these ids
    core = _core()
    (lp_greedy, is_greedy), (lp_other, is_other) = core.loglikelihood_tokens(
        [([BOS] + list(context.encode()), tokens),
         ([BOS] + list(context.encode()), tokens[:-1] + [other])])
    assert is_greedy and not is_other
    assert lp_greedy > lp_other


def test_rolling_windows_worked_example():
    """lm_eval's documented example: max length 4, tokens 0..9, prefix B."""
    B = -1
    assert rolling_windows(list(range(10)), B, 4) == [
        ([B], [0, 1, 2, 3]), ([3], [4, 5, 6, 7]), ([5, 6, 7], [8, 9])]
    assert rolling_windows([7, 8], B, 4) == [([B], [7, 8])]
    assert rolling_windows([], B, 4) == []


@pytest.mark.reference
def test_rolling_windows_match_lm_eval():
    utils = pytest.importorskip("lm_eval.utils")
    rng = np.random.default_rng(1)
    for length, max_len in [(1, 1), (5, 1), (9, 3), (10, 4), (37, 8), (64, 16), (65, 16)]:
        tokens = rng.integers(0, 100, length).tolist()
        want = [utils.make_disjoint_window(w) for w in utils.get_rolling_token_windows(
            token_list=tokens, prefix_token=-1, max_seq_len=max_len, context_len=1)]
        assert rolling_windows(tokens, -1, max_len) == [tuple(w) for w in want]


def test_loglikelihood_rolling():
    """A text within max_length: log p of all its bytes after BOS. A text of 2.5 windows: the sum
    over the worked-example windows, each scored alone by hand."""
    core = _core()
    short, long = "abc, def", "".join(chr(97 + i % 7) for i in range(MAX_LEN * 2 + 12))
    got = core.loglikelihood_rolling([short, long])
    assert got[0] == pytest.approx(reference("", short)[0], rel=1e-4)
    ids = list(long.encode())
    windows = [(0, MAX_LEN), (MAX_LEN, 2 * MAX_LEN), (2 * MAX_LEN, len(ids))]
    want = 0.0
    for start, end in windows:
        window = ([BOS] + ids)[max(end - MAX_LEN, 0):end + 1]  # the inputs end at end - 1
        logp, _ = _logprobs(window)
        targets = np.asarray(window[1:])
        rows = np.arange(len(targets))[-(end - start):]
        want += logp[rows, targets[rows]].sum()
    assert got[1] == pytest.approx(want, rel=1e-4)


def _text(tokens: list[int]) -> str:
    """What generation returns for these tokens: up to the separator, decoded."""
    if BOS in tokens:
        tokens = tokens[:tokens.index(BOS)]
    return ByteTokenizer().decode(tokens)


def test_generate_until():
    """Greedy generation (batched, left-padded) equals the cache-free greedy loop, cut before the
    first stop string; max_gen_toks is honoured."""
    core = _core(batch_size=2)
    contexts = ["def f", "x = 1\n", "ab"]
    n = 8
    refs = [greedy_tokens([BOS] + list(c.encode()), n) for c in contexts]
    first = _text(refs[0])
    assert len(first) >= 5
    stop = first[3:5]
    got = core.generate_until([(contexts[0], {"until": [stop], "max_gen_toks": n}),
                               (contexts[1], {"until": [], "max_gen_toks": n}),
                               (contexts[2], {"until": "\x00", "max_gen_toks": 3})])
    assert got[0] == first[:first.find(stop)]
    assert got[1] == _text(refs[1])
    assert got[2] == _text(refs[2][:3])


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A 2-step run of a 1-layer byte model (checkpoint at the end) and its final state."""
    from test_train_loop import overrides, write_corpus

    from gsa_jax.config import load_config
    from gsa_jax.train import train
    corpus = write_corpus(tmp_path_factory.mktemp("corpus"), n_files=10)
    run_dir = tmp_path_factory.mktemp("run")
    config = load_config(None, overrides(corpus, run_dir, steps=2, **{
        "checkpoint.every": 0, "eval.every": 0, "data.seq_len": 16, "data.batch_size": 2}))
    result = train(config, quiet=True)
    return run_dir, config, result["state"]


def test_from_run_dir(trained_run):
    """The adapter's checkpoint, tokenizer and max_length come from the run directory: scores
    equal those of the trained parameters applied directly."""
    run_dir, config, state = trained_run
    core = GSAJaxLM.from_run_dir(str(run_dir), batch_size=2)
    assert core.max_length == config.data.seq_len == 16
    assert core.bos_id == BOS
    model = CausalLM(config.model)
    params = {"params": jax.device_get(state.params)}
    requests = [("def alpha", "(beta):"), ("", "return")]
    for (context, continuation), (logprob, _) in zip(requests, core.loglikelihood(requests)):
        full = [BOS] + list((context + continuation).encode())
        logp = log_softmax64(_apply(model)(params, jnp.asarray([full[:-1]]))[0])
        n = len(continuation)
        want = sum(logp[t, full[t + 1]] for t in range(len(full) - 1 - n, len(full) - 1))
        assert logprob == pytest.approx(want, rel=1e-4)


TASK_YAML = """\
task: gsa_jax_toy
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


@pytest.mark.reference
def test_lm_eval_runs_a_local_task(tmp_path, monkeypatch):
    """lm_eval (if installed) finds "gsa-jax" in its registry and runs a local multiple-choice
    task through it; its accuracy equals the one from hand-computed log-likelihoods."""
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.api.registry import get_model
    from lm_eval.tasks import TaskManager
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))

    cls = get_model("gsa-jax")
    assert cls is lm_eval_adapter.GSAJaxEvalLM and get_model("gsa_jax") is cls
    rng = np.random.default_rng(2)
    # Fixed lengths: every request is 1 + 8 + 1 + 4 tokens (one reference shape to compile).
    docs = [{"question": "q" + _random_text(rng, 6, 7) + "?",
             "choices": ["c" + _random_text(rng, 3, 4) for _ in range(3)],
             "answer": int(rng.integers(3))} for _ in range(6)]
    data = tmp_path / "toy.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tmp_path / "toy.yaml").write_text(TASK_YAML.format(data=data))

    results = lm_eval.simple_evaluate(
        model=cls(core=_core()), tasks=["gsa_jax_toy"],
        task_manager=TaskManager(include_path=str(tmp_path)), log_samples=False,
        bootstrap_iters=0)
    acc = results["results"]["gsa_jax_toy"]["acc,none"]
    # lm_eval's multiple_choice: context "question", continuations " choice" (target delimiter).
    correct = [int(np.argmax([reference(d["question"], " " + c)[0] for c in d["choices"]])
                   == d["answer"]) for d in docs]
    assert acc == pytest.approx(np.mean(correct))


def test_lm_eval_missing_is_a_clear_error(monkeypatch):
    """Without lm_eval the command line says how to install it (the core still imports)."""
    import builtins
    real_import = builtins.__import__

    def no_lm_eval(name, *args, **kwargs):
        if name.split(".")[0] == "lm_eval":
            raise ImportError("No module named 'lm_eval'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_lm_eval)
    with pytest.raises(SystemExit, match=r"gsa-jax\[eval\]"):
        lm_eval_adapter.main(["--model", "gsa-jax"])
    assert pathlib.Path(lm_eval_adapter.__file__).name == "lm_eval_adapter.py"
