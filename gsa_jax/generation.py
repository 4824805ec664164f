"""Sampling from a `CausalLM`: chunk-form prefill, then a jitted one-token-at-a-time decode loop.

    prefill:  logits, cache = model.prefill(prompt)     (chunk form; every layer's state)
    loop:     token ~ p(· | logits / temperature, top-k, top-p);  logits, cache = model.decode(token)

Prompts of different lengths are left-padded to one length P. The pad positions form their own
segment (segment id 0, the prompt id 1), so the recurrent states restart at each prompt's first
token, attention never sees the pads, and RoPE positions start at 0 on the first real token: each
row decodes exactly as if it ran alone. For GSA/GLA/RetNet layers the cache is a fixed-size state,
so memory per decoded token is constant; only attention layers hold a KV cache of P + N slots.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from gsa_jax import sharding as shd
from gsa_jax.data import load_tokenizer
from gsa_jax.models.lm import CausalLM

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How to pick each token. temperature 0 means greedy (argmax); top_k 0 and top_p 1 are off."""
    max_new_tokens: int
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    stop_tokens: tuple = ()
    pad_id: int = 0

    def __post_init__(self):
        object.__setattr__(self, "stop_tokens", tuple(int(t) for t in self.stop_tokens))
        check_sampling(self.max_new_tokens, self.temperature, self.top_k, self.top_p)


def check_sampling(max_new_tokens: int, temperature: float, top_k: int, top_p: float,
                   min_new_tokens: int = 1, where: str = "") -> None:
    """ValueError (prefixed by `where`) for sampling settings that cannot work."""
    if (not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool)
            or max_new_tokens < min_new_tokens):
        raise ValueError(f"{where}max_new_tokens must be an int >= {min_new_tokens}, got "
                         f"{max_new_tokens!r}")
    if not temperature >= 0:
        raise ValueError(f"{where}temperature must be >= 0 (0 = greedy), got {temperature}")
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 0:
        raise ValueError(f"{where}top_k must be an int >= 0 (0 = off), got {top_k!r}")
    if not 0 < top_p <= 1:
        raise ValueError(f"{where}top_p must be in (0, 1] (1 = off), got {top_p}")


class GenerationOutput(NamedTuple):
    tokens: Array   # [B, N] generated tokens; pad_id after a row's stop token
    lengths: Array  # [B] tokens generated per row, its stop token included


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Token lists -> (tokens [B, P] int32 left-padded with pad_id, lengths [B] int32)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("left_pad: need at least one prompt, and every prompt needs a token")
    width = max(len(p) for p in prompts)
    tokens = np.full((len(prompts), width), pad_id, np.int32)
    for row, prompt in enumerate(prompts):
        tokens[row, width - len(prompt):] = prompt
    return tokens, np.array([len(p) for p in prompts], np.int32)


def prompt_layout(lengths: Array, width: int) -> tuple[Array, Array]:
    """segment_ids (0 on pads, 1 on the prompt) and RoPE positions of left-padded prompts, [B, P]."""
    start = width - lengths[:, None]
    col = jnp.arange(width)[None, :]
    segment_ids = (col >= start).astype(jnp.int32)
    return segment_ids, jnp.maximum(col - start, 0).astype(jnp.int32)


def sample_logits(logits: Array, rng: Array, config: SamplingConfig) -> Array:
    """Next tokens [B] int32 from logits [B, V]: greedy, or temperature + top-k + top-p sampling."""
    logits = logits.astype(jnp.float32)
    if config.temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / config.temperature
    neg_inf = jnp.finfo(jnp.float32).min
    if config.top_k:
        kth = jax.lax.top_k(logits, min(config.top_k, logits.shape[-1]))[0][:, -1:]
        logits = jnp.where(logits < kth, neg_inf, logits)
    if config.top_p < 1:
        # Keep the smallest set of most likely tokens whose probability reaches top_p: a token is
        # kept when the mass strictly before it (in descending order) is below top_p.
        ordered = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(ordered, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs
        kept = jnp.sum(before < config.top_p, axis=-1, keepdims=True)
        cutoff = jnp.take_along_axis(ordered, kept - 1, axis=-1)
        logits = jnp.where(logits < cutoff, neg_inf, logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _generate(model: CausalLM, config: SamplingConfig, params, tokens: Array, lengths: Array,
              rng: Array) -> GenerationOutput:
    B, P = tokens.shape
    N = config.max_new_tokens
    segment_ids, positions = prompt_layout(lengths, P)
    logits, cache = model.apply(params, tokens, segment_ids, positions, P + N, True,
                                method=CausalLM.prefill)
    stops = jnp.asarray(config.stop_tokens or (-1,), jnp.int32)
    rng, key = jax.random.split(rng)
    first = sample_logits(logits[:, -1], key, config)
    out = jnp.full((B, N), config.pad_id, jnp.int32).at[:, 0].set(first)
    done = jnp.isin(first, stops)
    carry = (jnp.array(1), first, lengths.astype(jnp.int32), cache, rng, out, done,
             jnp.ones((B,), jnp.int32))

    def cond(carry):
        step, *_, done, _ = carry
        return (step < N) & ~jnp.all(done)

    def body(carry):
        step, token, pos, cache, rng, out, done, count = carry
        logits, cache = model.apply(params, token[:, None], pos[:, None], cache,
                                    method=CausalLM.decode)
        rng, key = jax.random.split(rng)
        nxt = jnp.where(done, config.pad_id, sample_logits(logits[:, 0], key, config))
        out = jax.lax.dynamic_update_slice(out, nxt[:, None], (0, step))
        count = count + (~done).astype(jnp.int32)
        done = done | jnp.isin(nxt, stops)
        return step + 1, nxt, pos + 1, cache, rng, out, done, count

    carry = jax.lax.while_loop(cond, body, carry)
    return GenerationOutput(tokens=carry[5], lengths=carry[7])


def generate(model: CausalLM, params, prompts, prompt_lengths: Optional[Array] = None, *,
             max_new_tokens: int, rng: Optional[Array] = None, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, stop_tokens: Sequence[int] = (),
             pad_id: int = 0) -> GenerationOutput:
    """Generate up to `max_new_tokens` tokens after each prompt.

    Args:
      model, params: a `CausalLM` and its variables.
      prompts: a list of token lists (left-padded here), or an int array [B, P] left-padded,
        whose real tokens are the last `prompt_lengths[b]` of row b (None: all P).
      max_new_tokens: N; the loop stops earlier once every row has emitted a stop token.
      rng: PRNG key for sampling (unused when greedy; default key 0).
      temperature, top_k, top_p: see `SamplingConfig`.
      stop_tokens: ids that end a row (the stop token is kept in the output).
      pad_id: fills the prompt padding and each row's output after its stop token.
    Returns:
      GenerationOutput(tokens [B, N] int32, lengths [B] int32).
    """
    if isinstance(prompts, (list, tuple)):
        if prompt_lengths is not None:
            raise ValueError("generate: prompt_lengths goes with an array of prompts, not lists")
        prompts, prompt_lengths = left_pad(prompts, pad_id)
    tokens = jnp.asarray(prompts, jnp.int32)
    if tokens.ndim != 2:
        raise ValueError(f"generate: prompts must be [B, P], got shape {tokens.shape}")
    B, P = tokens.shape
    # Lengths are checked on the host: call `generate` outside jit (it jits its own loop).
    lengths = np.full((B,), P, np.int32) if prompt_lengths is None else np.asarray(prompt_lengths)
    if lengths.shape != (B,):
        raise ValueError(f"generate: prompt_lengths must have shape {(B,)}, got {lengths.shape}")
    if lengths.min() < 1 or lengths.max() > P:
        raise ValueError(f"generate: prompt_lengths must be in [1, {P}], got {lengths.tolist()}")
    config = SamplingConfig(max_new_tokens, temperature, top_k, top_p, tuple(stop_tokens), pad_id)
    return _generate(model, config, params, tokens, jnp.asarray(lengths, jnp.int32),
                     jax.random.key(0) if rng is None else rng)


def cache_shapes(model: CausalLM, batch: int, prompt_len: int, max_new_tokens: int):
    """Shapes/dtypes of the decode cache (jax.eval_shape: nothing is allocated or computed)."""
    tokens = jax.ShapeDtypeStruct((batch, prompt_len), jnp.int32)
    variables = jax.eval_shape(model.init, jax.random.key(0), tokens)

    def prefill(variables, tokens):
        return model.apply(variables, tokens, None, None, prompt_len + max_new_tokens, True,
                           method=CausalLM.prefill)[1]

    return jax.eval_shape(prefill, variables, tokens)


def tree_bytes(tree) -> int:
    """Total bytes of the arrays (or ShapeDtypeStructs) of a pytree."""
    return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize
               for x in jax.tree_util.tree_leaves(tree))


def sample_text(session, params, sample_cfg) -> str:
    """Generates a continuation of `sample_cfg.prompt` with the run's tokenizer (one process).

    Args:
      session: the run's model and data, as a `gsa_jax.session.Session`: `.model` (CausalLM),
        `.mesh` (the params are replicated over it) and `.data.tokenizer` / `.data.bos_id`.
      params: the model's parameters (the "params" collection).
      sample_cfg: prompt (text), max_new_tokens, seed, temperature, top_k, top_p (the
        config's `sample` section).
    Returns: the prompt followed by the decoded continuation (stops at the BOS token).
    """
    tok = load_tokenizer(session.data.tokenizer, session.data.bos_id)
    prompt = [tok.bos_id] + tok.encode(sample_cfg.prompt)
    params = jax.device_put(params, shd.replicated(session.mesh))
    out = generate(session.model, {"params": params}, [prompt],
                   max_new_tokens=sample_cfg.max_new_tokens,
                   rng=jax.random.key(sample_cfg.seed), temperature=sample_cfg.temperature,
                   top_k=sample_cfg.top_k, top_p=sample_cfg.top_p, stop_tokens=[tok.bos_id])
    n = int(out.lengths[0])
    return sample_cfg.prompt + tok.decode(np.asarray(out.tokens[0, :n]))
