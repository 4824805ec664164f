"""What experiments/efficiency.py measures in one case, in JAX: the ModelConfig of a case (the
preset `<family>-<size>` at the run's dtypes), one train step (forward + backward + AdamW) of a
model at one sequence length, and batch-1 generation after a prompt at each generation length.
Each returns its rows; an error (an out-of-memory) is recorded in the row, not raised.
"""

from __future__ import annotations

import time

from experiments import common, harness

FAMILY = {"gsa": "gsa", "gsa-recompute": "gsa", "transformer": "transformer", "gla": "gla",
          "fla-gsa": "gsa", "fla-gsa-norecompute": "gsa"}


def model_config(args, model: str, decode: bool = False):
    """The ModelConfig of a case: the preset `<family>-<size>` at the run's dtypes."""
    from gsa_jax.models import get_preset
    family = FAMILY[model]
    changes = dict(dtype=args.decode_dtype if decode else args.dtype,
                   param_dtype=args.decode_dtype if decode else "float32",
                   remat="full" if args.remat and not decode else "none")
    if args.layers:
        changes["num_layers"] = args.layers
    if family == "gsa":
        changes["impl"] = args.gsa_impl
        changes["recompute_states"] = model == "gsa-recompute"
        if args.gsa_num_heads:
            changes["num_heads"] = args.gsa_num_heads
    if family == "transformer":
        changes["attn_implementation"] = "auto" if decode else attn_impl(args)
    return get_preset(f"{family}-{args.size}", **changes)


def attn_impl(args) -> str:
    if args.attn_impl:
        return args.attn_impl
    import jax
    return "cudnn" if jax.default_backend() == "gpu" else "xla"


def resolved_form(cfg) -> str:
    """The op form the mixer's `impl` resolves to at this config's head dims, on this backend."""
    import jax.numpy as jnp
    from gsa_jax.layers import common as layer_common
    from gsa_jax.ops.gla import resolve_impl
    if cfg.mixer == "attention":
        return f"dot_product_attention[{cfg.attn_implementation}]"
    _, dk, dv, _ = layer_common.head_dims("", cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads,
                                          cfg.expand_k, cfg.expand_v)
    dims = (dk, cfg.num_slots or dk, dv) if cfg.mixer == "gsa" else (dk, dv)
    try:
        return resolve_impl(cfg.mixer, cfg.impl, dims, cfg.chunk_size, jnp.dtype(cfg.dtype))
    except ValueError as err:
        return f"invalid: {err}"


def train_case(args, model: str, T: int) -> dict:
    """One JAX train step of `model` at sequence length T: the record of a "train" row."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import optax
    from gsa_jax.models import CausalLM, count_params
    from gsa_jax.optim import OptimConfig, loss_sums, make_optimizer

    common.enable_compilation_cache(args.compile_cache)
    device = jax.devices()[0]
    B = max(1, args.tokens // T)
    cfg = model_config(args, model)
    row = {"part": "train", "model": model, "preset": f"{FAMILY[model]}-{args.size}", "T": T,
           "B": B, "tokens": B * T, "form": resolved_form(cfg), "dtype": cfg.dtype,
           "remat": cfg.remat, "params": count_params(cfg)}
    try:
        lm = CausalLM(cfg)
        tx, _ = make_optimizer(OptimConfig(warmup_steps=10), total_steps=1000)
        init = jax.jit(lambda key: nn.meta.unbox(
            lm.init(key, jnp.zeros((1, 1), jnp.int32))["params"]))
        if args.compile_only:  # shapes only: no device memory for parameters or data
            params = jax.eval_shape(init, jax.random.key(0))
            opt_state = jax.eval_shape(tx.init, params)
            tokens = jax.ShapeDtypeStruct((B, T + 1), jnp.int32)
        else:
            params = init(jax.random.key(0))
            opt_state = jax.jit(tx.init)(params)
            tokens = jax.random.randint(jax.random.key(1), (B, T + 1), 0, cfg.vocab_size)

        def step(params, opt_state, tokens):
            def loss_fn(p):
                logits = lm.apply({"params": p}, tokens[:, :-1])
                sums = loss_sums(logits, tokens[:, 1:], jnp.ones((B, T), jnp.float32))
                return sums.total / sums.count
            loss, grads = jax.value_and_grad(loss_fn)(params)
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, loss

        start = time.perf_counter()
        compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, opt_state,
                                                               tokens).compile()
        row["compile_s"] = round(time.perf_counter() - start, 2)
        row["compiled_bytes"] = harness.compiled_bytes(compiled)
        if args.compile_only:
            row["status"] = "compiled"
            return row
        state = [params, opt_state, None]
        del params, opt_state

        def run():
            state[:] = compiled(state[0], state[1], tokens)
            jax.block_until_ready(state)

        for _ in range(args.warmup):
            run()
        median, fastest = harness.time_calls(run, args.repeats)
        row.update(step_ms=1e3 * median, min_step_ms=1e3 * fastest,
                   tokens_per_s=B * T / median, loss=float(state[2]),
                   peak_bytes=harness.peak_bytes(device), status="ok")
    except Exception as error:  # noqa: BLE001 - recorded; the next case goes on
        row.update(harness.failure(error))
    if model == "gsa-recompute":
        row["recompute"] = ("pallas recompute_states=True" if row["form"] == "pallas"
                            else f"jax.checkpoint around the {row['form']} form")
    return row


def decode_case(args, model: str) -> list[dict]:
    """Batch-1 generation after a `prefix`-token prompt at each generation length: "decode" rows."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    from gsa_jax import generation
    from gsa_jax.models import CausalLM

    common.enable_compilation_cache(args.compile_cache)
    device = jax.devices()[0]
    cfg = model_config(args, model, decode=True)
    lm = CausalLM(cfg)
    P = args.prefix
    base = {"part": "decode", "model": model, "preset": f"{FAMILY[model]}-{args.size}",
            "prefix": P, "dtype": cfg.dtype, "form": resolved_form(cfg)}
    rows = []
    try:
        init = jax.jit(lm.init)
        params = nn.meta.unbox(init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))
        prompt = jax.random.randint(jax.random.key(1), (1, P), 0, cfg.vocab_size)
        prefill = jax.jit(lambda v, t: lm.apply(v, t, None, None, P, True,
                                                method=CausalLM.prefill)[0])
        jax.block_until_ready(prefill(params, prompt))
        prefill_s, _ = harness.time_calls(lambda: jax.block_until_ready(prefill(params, prompt)),
                                 max(args.decode_repeats, 1))
    except Exception as error:  # noqa: BLE001
        return [{**base, "N": n, **harness.failure(error)} for n in args.gen_lens]
    for N in args.gen_lens:
        row = {**base, "N": N, "prefill_ms": 1e3 * prefill_s,
               "cache_bytes": generation.tree_bytes(generation.cache_shapes(lm, 1, P, N))}
        try:
            call = lambda: jax.block_until_ready(  # noqa: E731
                generation.generate(lm, params, prompt, max_new_tokens=N))
            start = time.perf_counter()
            out = call()
            row["first_call_s"] = round(time.perf_counter() - start, 2)  # compile + run
            median, fastest = harness.time_calls(call, args.decode_repeats)
            row.update(latency_ms=1e3 * median, min_latency_ms=1e3 * fastest,
                       generated=int(out.lengths[0]),
                       ms_per_token=1e3 * max(median - prefill_s, 0.0) / N,
                       peak_bytes_so_far=harness.peak_bytes(device), status="ok")
        except Exception as error:  # noqa: BLE001
            row.update(harness.failure(error))
        rows.append(row)
    return rows
