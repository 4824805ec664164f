"""lm-evaluation-harness adapter: a gsa-jax checkpoint as an `lm_eval` model named "gsa-jax".

    python -m gsa_jax.lm_eval_adapter --model gsa-jax --model_args run_dir=runs/gsa-1.3b \\
        --tasks wikitext,lambada_openai,piqa,hellaswag,winogrande,arc_easy,arc_challenge \\
        --batch_size 16 --output_path results/
    # the same as `lm_eval ...` (any of its arguments), with "gsa-jax" registered first; or
    import gsa_jax.lm_eval_adapter, lm_eval
    lm_eval.simple_evaluate(model="gsa-jax", model_args="run_dir=runs/gsa-1.3b", tasks=[...])

`lm_eval` is an optional dependency (pip install 'gsa-jax[eval]'): the scoring core, `GSAJaxLM`,
needs only the model, its parameters and a tokenizer; the lm_eval class around it is defined
when lm_eval imports. model_args: run_dir (a `gsa-jax train` run), step (default: latest),
max_length (default: the run's data.seq_len), max_gen_toks (256), tokenizer (a tokenizers JSON,
default: the run's); or hf_dir (a flash-linear-attention GSA/GLA or Llama/Mistral directory, e.g.
the paper's released models, with its tokenizer.json; max_length 2048) and dtype (bfloat16 on a
GPU); the batch size is lm_eval's --batch_size ("auto" means 16).

Conventions: every text starts with the tokenizer's document separator (BOS: what the model saw
at the start of every training document; lm_eval's HuggingFace model adds it to empty contexts
only). The rest as lm_eval's HuggingFace model: trailing spaces of a context move to the
continuation, which is tokenized jointly with the context; inputs longer than max_length keep
their last max_length tokens; rolling log-likelihoods (perplexity) split a document into windows
that predict each token once with the most context that fits (lm_eval's
get_rolling_token_windows with context_len 1).

    loglikelihood(context, continuation) = Σ_{t ∈ continuation} log p(x_t | x_<t)     (float32)
    is_greedy = every continuation token is the argmax of its distribution
"""

from __future__ import annotations

import functools
import sys
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from gsa_jax import generation
from gsa_jax.models.lm import CausalLM

Pair = tuple[list[int], list[int]]  # (context tokens, continuation tokens)


def split_whitespace(context: str, continuation: str) -> tuple[str, str]:
    """Trailing spaces of the context belong to the continuation (" Paris", not "Paris")."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        return context[:-spaces], context[-spaces:] + continuation
    return context, continuation


def rolling_windows(tokens: Sequence[int], prefix: int, max_length: int) -> list[Pair]:
    """Disjoint (context, continuation) windows predicting every token of `tokens` once.

    The first window predicts the first max_length tokens after `prefix`; each later one the next
    max_length (or the rest), with the max_length − n tokens before them as extra context, so
    every input is as long as fits. Example, max_length 4, tokens 0..9, prefix B:
    ([B], [0 1 2 3]), ([0 1 2 3], [4 5 6 7])... see tests/test_lm_eval_adapter.py.
    """
    tokens = list(tokens)
    if not tokens:
        return []
    first = min(max_length, len(tokens))
    windows = [([prefix], tokens[:first])]
    done = first
    while done < len(tokens):
        end = done + min(len(tokens) - done, max_length)
        windows.append((tokens[max(end - max_length - 1, 0):done], tokens[done:end]))
        done = end
    return windows


def _until_cut(text: str, until: Sequence[str]) -> str:
    """`text` up to the first occurrence of any stop string."""
    cut = len(text)
    for stop in until:
        if stop:
            at = text.find(stop)
            if at != -1:
                cut = min(cut, at)
    return text[:cut]


class GSAJaxLM:
    """Scores and samples a `CausalLM` for lm_eval's three request types (no lm_eval needed).

    Args:
      model, params: the model and its variables ({"params": ...}).
      tokenizer: encode(str) -> ids, decode(ids) -> str, bos_id (gsa_jax.data tokenizers).
      max_length: the longest input scored at once (tokens).
      batch_size: sequences per device call.
      pad_multiple: the shortest padded length (lengths are padded to powers of two, so only a
        few shapes are compiled).
      max_gen_toks: default generation length of generate_until.
      progress: show a progress bar over the batches (tqdm).
    """

    def __init__(self, model: CausalLM, params: Any, tokenizer, *, max_length: int = 2048,
                 batch_size: int = 16, pad_multiple: int = 64, max_gen_toks: int = 256,
                 progress: bool = False):
        if max_length < 1 or batch_size < 1 or pad_multiple < 1:
            raise ValueError(f"GSAJaxLM: max_length ({max_length}), batch_size ({batch_size}) "
                             f"and pad_multiple ({pad_multiple}) must be positive")
        self.model, self.params, self.tokenizer = model, params, tokenizer
        self.max_length, self.batch_size = int(max_length), int(batch_size)
        self.pad_multiple, self.max_gen_toks = int(pad_multiple), int(max_gen_toks)
        self.bos_id = int(tokenizer.bos_id)
        self.progress = progress
        self._score = jax.jit(functools.partial(_score_batch, model))

    @classmethod
    def from_run_dir(cls, run_dir: str, step: Optional[int] = None,
                     tokenizer: Optional[str] = None, max_length: Optional[int] = None,
                     **kwargs) -> "GSAJaxLM":
        """The checkpoint of a `gsa-jax train` run (default: its latest step) with the run's
        tokenizer; max_length defaults to the run's training sequence length."""
        import pathlib

        from gsa_jax import session as session_lib
        from gsa_jax.config import load_config
        from gsa_jax.data import load_tokenizer

        path = pathlib.Path(run_dir) / "config.yaml"
        if not path.is_file():
            raise FileNotFoundError(f"{str(path)!r} not found: is {run_dir!r} a training run "
                                    f"directory?")
        config = load_config(path, [f"run_dir={run_dir}"])
        # The tokenizer and the checkpoint's params only: no dataset, no optimizer state.
        session = session_lib.build(config, read_only=True, splits=())
        params, _ = session_lib.restore_params(session, step)
        params = session_lib.replicated_params(params, session.mesh)
        tok = load_tokenizer(tokenizer or session.data.tokenizer, session.data.bos_id)
        return cls(session.model, {"params": params}, tok,
                   max_length=max_length or config.data.seq_len, **kwargs)

    @classmethod
    def from_hf(cls, directory: str, tokenizer: Optional[str] = None,
                max_length: Optional[int] = None, dtype: Optional[str] = None,
                **kwargs) -> "GSAJaxLM":
        """A Hugging Face-format checkpoint directory: a flash-linear-attention GSA/GLA model
        (the paper's released ones, gsa_jax.hf.fla) or a Llama/Mistral one, with the
        directory's tokenizer.json (or `tokenizer`, a tokenizers JSON file; its separator is
        the config's bos_token_id). max_length defaults to 2048 (the paper's training length);
        dtype: the compute dtype (e.g. "bfloat16" on a GPU; default float32)."""
        from gsa_jax.hf import fla as hf_fla
        from gsa_jax.hf import llama as hf_llama
        from gsa_jax.hf import load_hf_tokenizer

        hf = hf_llama.read_config(directory)
        overrides = {} if dtype is None else {"dtype": dtype}
        load = hf_fla.load_fla if hf_fla.is_fla_config(hf) else hf_llama.load_llama
        config, params = load(directory, **overrides)
        if tokenizer:
            from gsa_jax.data.tokenizer import HFTokenizer
            tok = HFTokenizer(tokenizer, hf.get("bos_token_id"))
        else:
            tok = load_hf_tokenizer(directory)
        return cls(CausalLM(config), {"params": params}, tok, max_length=max_length or 2048,
                   **kwargs)

    # -------------------------------------------------------------- tokens
    def encode_pair(self, context: str, continuation: str) -> Pair:
        """(BOS + context tokens, continuation tokens): the joint encoding split after as many
        tokens as the context alone has (as lm_eval's HuggingFace model does)."""
        context, continuation = split_whitespace(context, continuation)
        whole = self.tokenizer.encode(context + continuation)
        n = len(self.tokenizer.encode(context))
        return [self.bos_id] + whole[:n], whole[n:]

    def _batches(self, count: int, what: str) -> range:
        starts = range(0, count, self.batch_size)
        if not self.progress:
            return starts
        from tqdm.auto import tqdm
        return tqdm(starts, desc=f"gsa-jax {what}", unit="batch")

    def _bucket(self, length: int) -> int:
        """Padded length: a power of two, at least pad_multiple, at most max_length (a few
        shapes to compile however the request lengths vary)."""
        return min(self.max_length, max(self.pad_multiple, 1 << max(length - 1, 0).bit_length()))

    # -------------------------------------------------------------- scoring
    def loglikelihood_tokens(self, pairs: Sequence[Pair]) -> list[tuple[float, bool]]:
        """(Σ log p(continuation | context), is_greedy) of token pairs; the context must be
        non-empty (it starts with BOS). Longest first, batched, right-padded."""
        rows = []
        for i, (ctx, cont) in enumerate(pairs):
            if not ctx:
                raise ValueError("loglikelihood_tokens: empty context (start it with BOS)")
            full = (list(ctx) + list(cont))[-(self.max_length + 1):]
            rows.append((i, full, min(len(cont), len(full) - 1)))
        results: list = [(0.0, True)] * len(pairs)
        rows = [r for r in rows if r[2] > 0]  # an empty continuation has log p = 0, greedy
        rows.sort(key=lambda r: -len(r[1]))
        B = self.batch_size
        for start in self._batches(len(rows), "loglikelihood"):
            batch = rows[start:start + B]
            L = self._bucket(len(batch[0][1]) - 1)
            tokens = np.zeros((B, L), np.int32)
            targets = np.zeros((B, L), np.int32)
            mask = np.zeros((B, L), np.float32)
            for b, (_, full, n) in enumerate(batch):
                T = len(full) - 1
                tokens[b, :T], targets[b, :T] = full[:-1], full[1:]
                mask[b, T - n:T] = 1.0
            logprob, greedy = jax.device_get(self._score(self.params, tokens, targets, mask))
            for b, (i, _, _) in enumerate(batch):
                results[i] = (float(logprob[b]), bool(greedy[b]))
        return results

    def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[tuple[float, bool]]:
        """lm_eval's loglikelihood on (context, continuation) strings."""
        return self.loglikelihood_tokens([self.encode_pair(c, x) for c, x in requests])

    def loglikelihood_rolling(self, texts: Sequence[str]) -> list[float]:
        """Σ log p of every token of each text (after BOS), in max_length windows."""
        windows, owner = [], []
        for i, text in enumerate(texts):
            for pair in rolling_windows(self.tokenizer.encode(text), self.bos_id,
                                        self.max_length):
                windows.append(pair)
                owner.append(i)
        totals = [0.0] * len(texts)
        for i, (logprob, _) in zip(owner, self.loglikelihood_tokens(windows)):
            totals[i] += logprob
        return totals

    # -------------------------------------------------------------- generation
    def generate_until(self, requests: Sequence[tuple[str, dict]]) -> list[str]:
        """lm_eval's generate_until on (context, gen_kwargs): greedy unless do_sample (then
        temperature, default 1), up to max_gen_toks tokens or the separator, cut before the
        first `until` string."""
        groups: dict = {}
        for i, (context, kwargs) in enumerate(requests):
            kwargs = dict(kwargs or {})
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            n = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
            sample = bool(kwargs.pop("do_sample", False))  # greedy unless sampling is asked
            temperature = float(kwargs.pop("temperature", 1.0) or 0.0) if sample else 0.0
            prompt = ([self.bos_id] + self.tokenizer.encode(context))
            prompt = prompt[-max(self.max_length - n, 1):]
            groups.setdefault((n, temperature), []).append((i, prompt, until))
        out: list = [""] * len(requests)
        for (n, temperature), items in groups.items():
            items.sort(key=lambda item: -len(item[1]))
            for start in self._batches(len(items), "generate_until"):
                batch = items[start:start + self.batch_size]
                prompts = [p for _, p, _ in batch]
                prompts += [[self.bos_id]] * (self.batch_size - len(prompts))  # static shape
                width = self._bucket(len(prompts[0]))
                tokens, lengths = generation.left_pad(prompts)
                tokens = np.pad(tokens, ((0, 0), (width - tokens.shape[1], 0)))
                result = generation.generate(
                    self.model, self.params, tokens, lengths, max_new_tokens=n,
                    temperature=temperature, stop_tokens=[self.bos_id],
                    rng=jax.random.key(start))
                generated = np.asarray(result.tokens)
                for b, (i, _, until) in enumerate(batch):
                    ids = [int(t) for t in generated[b, :int(result.lengths[b])]
                           if int(t) != self.bos_id]
                    out[i] = _until_cut(self.tokenizer.decode(ids), until)
        return out


def _score_batch(model: CausalLM, params, tokens, targets, mask):
    """(Σ mask · log p(target) [B], all masked targets are the argmax [B]) in float32."""
    logits = model.apply(params, tokens).astype(jnp.float32)           # [B, L, V]
    logp = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    hits = jnp.argmax(logits, axis=-1) == targets
    return jnp.sum(picked * mask, axis=1), jnp.all(hits | (mask == 0), axis=1)


# ------------------------------------------------------------------ lm_eval registration
try:
    from lm_eval.api.model import LM as _LMBase
except ImportError:  # lm_eval is optional: the core above works without it
    _LMBase = None

if _LMBase is not None:
    class GSAJaxEvalLM(_LMBase):
        """lm_eval's model "gsa-jax". model_args: run_dir (a gsa-jax run) and step, or hf_dir
        (a Hugging Face-format directory: fla GSA/GLA or Llama/Mistral) and dtype; max_length,
        max_gen_toks, tokenizer (or core=GSAJaxLM(...) from Python); batch_size from lm_eval's
        --batch_size."""

        def __init__(self, run_dir: Optional[str] = None, step: Optional[int] = None,
                     max_length: Optional[int] = None, batch_size: Any = 16,
                     max_gen_toks: int = 256, tokenizer: Optional[str] = None,
                     core: Optional[GSAJaxLM] = None, hf_dir: Optional[str] = None,
                     dtype: Optional[str] = None, **unused):  # device, max_batch_size
            super().__init__()
            if core is None:
                if bool(run_dir) == bool(hf_dir):
                    raise ValueError("gsa-jax: model_args needs run_dir=<a gsa-jax run "
                                     "directory> or hf_dir=<a Hugging Face-format checkpoint "
                                     "directory>, not both")
                size = 16 if str(batch_size).startswith("auto") else int(batch_size)
                common = dict(batch_size=size, max_gen_toks=int(max_gen_toks), progress=True)
                max_length = None if max_length in (None, "") else int(max_length)
                if hf_dir:
                    core = GSAJaxLM.from_hf(hf_dir, tokenizer, max_length, dtype or None,
                                            **common)
                else:
                    core = GSAJaxLM.from_run_dir(
                        run_dir, None if step in (None, "") else int(step), tokenizer,
                        max_length, **common)
            self.core = core

        @property
        def tokenizer_name(self) -> str:
            return str(getattr(self.core.tokenizer, "name", "gsa-jax"))

        def loglikelihood(self, requests):
            return self.core.loglikelihood([req.args for req in requests])

        def loglikelihood_rolling(self, requests):
            return self.core.loglikelihood_rolling([req.args[0] for req in requests])

        def generate_until(self, requests):
            return self.core.generate_until([req.args for req in requests])

    # lm_eval fills its registry with its own models only while it is empty: fill it first.
    import lm_eval.models  # noqa: E402,F401  (lazy placeholders, cheap)
    from lm_eval.api.registry import model_registry

    # A lazy placeholder naming this module (not __main__): registering it again, from another
    # import of this file, is not a collision, and the registry loads this one class.
    for _alias in ("gsa-jax", "gsa_jax"):
        try:
            model_registry.register(_alias, target="gsa_jax.lm_eval_adapter:GSAJaxEvalLM")
        except ValueError:  # already resolved to the class (this file imported again)
            pass


def main(argv: Optional[Sequence[str]] = None) -> None:
    """lm_eval's command line with "gsa-jax" registered (arguments as `lm_eval`'s)."""
    try:
        from lm_eval.__main__ import cli_evaluate
        import gsa_jax.lm_eval_adapter  # noqa: F401  (registers "gsa-jax" from the package)
    except ImportError as err:
        raise SystemExit(f"gsa-jax: lm_eval is not installed ({err}): pip install "
                         f"'gsa-jax[eval]'") from None
    sys.argv = ["lm_eval", *(sys.argv[1:] if argv is None else argv)]
    cli_evaluate()


if __name__ == "__main__":
    main()
