"""Generation: the cached decode loop against recomputing full forward passes, padding of
prompts of different lengths, stop tokens, the samplers, and constant memory per token."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gsa_jax import generation
from gsa_jax.generation import SamplingConfig, generate, sample_logits
from gsa_jax.models import CausalLM, get_preset

PROMPTS = [[5, 17, 3, 200, 9, 41, 7], [12, 4], [99, 1, 250, 8]]


@functools.lru_cache(maxsize=None)
def _model(name):
    cfg = get_preset(name, initializer_range=0.2, chunk_size=4)
    model = CausalLM(cfg)
    params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
    return model, params


def _greedy_by_full_forward(model, params, prompt, n, width=16):
    """Reference: no cache; each step reruns the whole sequence and takes the argmax. The
    sequence sits at the left of a fixed-width buffer (one compilation): the model is causal,
    so the logits at its last token do not see the filler on the right."""
    forward = jax.jit(model.apply)
    seq = list(prompt)
    for _ in range(n):
        buffer = np.zeros((1, width), np.int32)
        buffer[0, :len(seq)] = seq
        logits = forward(params, jnp.asarray(buffer))
        seq.append(int(jnp.argmax(logits[0, len(seq) - 1])))
    return seq[len(prompt):]


def test_greedy_batch_equals_full_forward_per_prompt():
    """Left-padded prompts of lengths 7, 2, 4 decode as each prompt alone with no cache
    (a hybrid: GSA states, and an attention layer's KV cache)."""
    model, params = _model("gsa-hybrid-tiny")
    n = 6
    out = generate(model, params, PROMPTS, max_new_tokens=n)
    assert out.tokens.shape == (3, n) and out.tokens.dtype == jnp.int32
    np.testing.assert_array_equal(out.lengths, [n] * 3)
    for row, prompt in enumerate(PROMPTS):
        assert out.tokens[row].tolist() == _greedy_by_full_forward(model, params, prompt, n), row


def test_left_padded_logits_equal_unpadded_runs():
    """Prefill of the left-padded batch (generation.prompt_layout) and two decode steps give
    each row the logits of its prompt run alone, without padding."""
    model, params = _model("gsa-hybrid-tiny")
    tokens, lengths = generation.left_pad(PROMPTS)
    P, extra = tokens.shape[1], [[31, 64], [2, 250], [77, 5]]
    segment_ids, positions = generation.prompt_layout(jnp.asarray(lengths), P)
    prefill = jax.jit(lambda p, t, s, pos, n: model.apply(p, t, s, pos, n,
                                                          method=CausalLM.prefill),
                      static_argnums=4)
    decode = jax.jit(lambda p, t, pos, c: model.apply(p, t, pos, c, method=CausalLM.decode))
    logits, cache = prefill(params, jnp.asarray(tokens), segment_ids, positions, P + 2)
    rows = [np.asarray(logits)[:, -1]]
    for step in range(2):
        token = jnp.asarray([[e[step]] for e in extra], jnp.int32)
        step_logits, cache = decode(params, token, jnp.asarray(lengths)[:, None] + step, cache)
        rows.append(np.asarray(step_logits)[:, 0])
    forward = jax.jit(model.apply)
    for row, prompt in enumerate(PROMPTS):
        alone = np.asarray(forward(params, jnp.asarray([prompt + extra[row]], jnp.int32)))[0]
        want = alone[len(prompt) - 1:]
        got = np.stack([r[row] for r in rows])
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_stop_tokens_end_rows():
    model, params = _model("gsa-hybrid-tiny")
    free = generate(model, params, PROMPTS, max_new_tokens=6)
    stop = int(free.tokens[0, 2])  # row 0 emits it at step 3 (maybe earlier too)
    first = [row.index(stop) if stop in row else None for row in free.tokens.tolist()]
    out = generate(model, params, PROMPTS, max_new_tokens=6, stop_tokens=[stop], pad_id=255)
    for row, at in enumerate(first):
        got = out.tokens[row].tolist()
        if at is None:
            assert got == free.tokens[row].tolist() and int(out.lengths[row]) == 6
        else:
            assert got[:at + 1] == free.tokens[row].tolist()[:at + 1]
            assert got[at + 1:] == [255] * (5 - at) and int(out.lengths[row]) == at + 1


@pytest.mark.slow  # ~12 s; CI runs it in its second step
def test_array_prompts_with_lengths_and_sampling_is_reproducible():
    model, params = _model("gsa-hybrid-tiny")
    tokens, lengths = generation.left_pad(PROMPTS, pad_id=0)
    a = generate(model, params, tokens, lengths, max_new_tokens=5, temperature=1.0, top_k=20,
                 top_p=0.9, rng=jax.random.key(7))
    b = generate(model, params, PROMPTS, max_new_tokens=5, temperature=1.0, top_k=20,
                 top_p=0.9, rng=jax.random.key(7))
    np.testing.assert_array_equal(a.tokens, b.tokens)
    # top_k = 1 is greedy whatever the temperature.
    g = generate(model, params, PROMPTS, max_new_tokens=5)
    k1 = generate(model, params, PROMPTS, max_new_tokens=5, temperature=3.0, top_k=1,
                  rng=jax.random.key(1))
    np.testing.assert_array_equal(g.tokens, k1.tokens)


# ------------------------------------------------------------------ samplers
def _empirical(logits, config, draws=4000):
    keys = jax.random.split(jax.random.key(0), draws)
    batch = jnp.broadcast_to(logits, (draws, logits.shape[-1]))
    samples = jax.jit(lambda k, l: jax.vmap(
        lambda kk, ll: sample_logits(ll[None], kk, config)[0])(k, l))(keys, batch)
    return np.bincount(np.asarray(samples), minlength=logits.shape[-1]) / draws


def test_sampler_distributions():
    """Frequencies over 4000 draws match the renormalised target within 4 standard errors."""
    logits = jnp.array([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])

    def target(keep, temperature=1.0):
        p = np.exp(np.asarray(logits) / temperature)
        p[~keep] = 0.0
        return p / p.sum()

    all_on = np.ones(6, bool)
    cases = [
        (SamplingConfig(1, temperature=1.0), target(all_on)),
        (SamplingConfig(1, temperature=0.5), target(all_on, 0.5)),
        (SamplingConfig(1, temperature=1.0, top_k=3), target(np.arange(6) < 3)),
    ]
    # top_p: softmax(logits) = [.55, .20, .12, .07, .03, .00]; 0.8 keeps the first three (the
    # mass before the third token, .75, is still below .8).
    p = target(all_on)
    assert p[:2].sum() < 0.8 < p[:3].sum()
    cases.append((SamplingConfig(1, temperature=1.0, top_p=0.8), target(np.arange(6) < 3)))
    for config, want in cases:
        got = _empirical(logits, config)
        se = np.sqrt(want * (1 - want) / 4000) + 1e-9
        assert np.all(np.abs(got - want) <= 4 * se + 1e-3), (config, got, want)
    greedy = sample_logits(logits[None], jax.random.key(0), SamplingConfig(1))
    assert int(greedy[0]) == 0


def test_sampling_config_errors():
    for kwargs, message in [(dict(temperature=-1.0), "temperature"), (dict(top_p=0.0), "top_p"),
                            (dict(top_k=-2), "top_k"), (dict(max_new_tokens=0), "max_new")]:
        with pytest.raises(ValueError, match=message):
            SamplingConfig(**{"max_new_tokens": 3, **kwargs})
    model, params = _model("gsa-hybrid-tiny")
    with pytest.raises(ValueError, match="prompt_lengths must be in"):
        generate(model, params, jnp.ones((2, 3), jnp.int32), [3, 4], max_new_tokens=2)


# ------------------------------------------------------------- memory per token
def test_gsa_cache_does_not_grow_with_generated_tokens():
    """The decode cache of GSA layers has the same shapes and bytes for 10 or 10,000 new tokens
    (only the attention layer's KV cache grows), and one decode step returns a cache of the same
    shapes as it takes."""
    model, _ = _model("gsa-hybrid-tiny")
    short = generation.cache_shapes(model, batch=2, prompt_len=7, max_new_tokens=10)
    long = generation.cache_shapes(model, batch=2, prompt_len=7, max_new_tokens=10_000)
    for layer in range(3):
        mixer = model.config.layer_mixer(layer)
        same = jax.tree_util.tree_map(lambda a, b: a.shape == b.shape and a.dtype == b.dtype,
                                      short[layer], long[layer])
        if mixer == "gsa":
            assert all(jax.tree_util.tree_leaves(same)), layer
            assert generation.tree_bytes(short[layer]) == generation.tree_bytes(long[layer])
            assert set(short[layer]) == {"hk", "hv"}
        else:
            assert generation.tree_bytes(long[layer]) > generation.tree_bytes(short[layer])
    variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((2, 7), jnp.int32))
    step = jax.eval_shape(
        lambda v, c: model.apply(v, jnp.zeros((2, 1), jnp.int32), jnp.zeros((2, 1), jnp.int32),
                                 c, method=CausalLM.decode)[1], variables, short)
    assert jax.tree_util.tree_structure(step) == jax.tree_util.tree_structure(short)
    assert all(jax.tree_util.tree_leaves(jax.tree_util.tree_map(
        lambda a, b: a.shape == b.shape, step, short)))
