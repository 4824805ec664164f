"""The paper's Figure 4 (efficiency of 1.3B models): (a) training throughput and (b) training
memory at a fixed 16K tokens per batch over sequence lengths, (c) batch-1 generation latency
after a 2K-token prefix over generation lengths.

    python experiments/efficiency.py --tag h100                      # the paper's sizes, a GPU
    python experiments/efficiency.py --smoke --tag cpu               # tiny models, a CPU check

On one GPU the whole sweep takes longer than one 10-minute command, mostly in XLA compiles (on an
H100: about 200 s for one 1.3B GSA step in the chunk form). `--compile-only --jobs N
--compile-cache DIR` compiles every train step side by side from shapes (no device memory, no
timing); a timed run with the same --compile-cache then reads the executables. Split the timed
runs with --merge (and --budget-s, which leaves time to write the results), e.g. --parts train;
then --parts decode --merge (see experiments/README.md).

Models (`--models`; the presets of `python -m gsa_jax.models` at `--size`, 1.3b by default):
  gsa                  GSA, the op's default form (impl "auto")
  gsa-recompute        GSA keeping no hidden states for the backward pass (the paper's
                       recomputation): the Pallas kernels' `recompute_states=True`; where the
                       shapes resolve to the chunk form (head dims > 256, or no GPU) the op runs
                       under `jax.checkpoint` instead (ModelConfig.recompute_states=True).
  transformer          Transformer++ (RoPE softmax attention, cuDNN through
                       jax.nn.dot_product_attention on a GPU: `--attn-impl`)
  gla                  GLA
The 1.3B/2.7B GSA presets have 4/5 heads of dim 512: "auto" resolves to the pure-JAX chunk form
there (the kernels' GPU-timed dims end at 256; the row's "form" says which ran), `--gsa-impl
pallas` runs the kernels with the key dim in slices.
`--gsa-num-heads 8` gives head dims 256 at the same width and parameter count (but for the
gate projection), which the kernels take.
  fla-gsa              the peer (flash-linear-attention, PyTorch/Triton): `fla.models`
                       GSAForCausalLM with the same sizes, or, where `fla.models` does not import
                       (it needs `transformers`), the same blocks written in torch around
                       `fla.ops.gsa.chunk_gsa`; checkpoint_level 2 (the peer's default: chunk
                       states recomputed in the backward). fla-gsa-norecompute: level 0.
                       Needs torch with CUDA and fla importable (`--no-peer` leaves it out; the
                       smoke run never tries it).

(a)/(b) one train step = forward + backward + AdamW update (the project's optimizer: clipping,
AdamW with the decay mask) on B = tokens / T rows of one sequence each (no packing, so attention
takes the causal-only path), bf16 compute, f32 parameters and moments. It is compiled first
(compile time and XLA's footprint recorded), then warm-up steps, then the median of timed steps,
each ended by block_until_ready. Peak memory: `peak_bytes_in_use` of the device (GPU; the peer:
torch.cuda.max_memory_allocated): parameters, gradients, optimizer state and activations.
(c) `gsa_jax.generation.generate`, greedy, batch 1, a random `--prefix`-token prompt; latency =
median wall time of the whole call (prefill + N decode steps), compiled once per N first. The
decode cache bytes at each N come from `generation.cache_shapes` (shapes only): GSA's state is
constant, attention's KV cache grows with prefix + N.

Each case (model, T) or (decode, model) runs in a fresh Python process (unless --in-process), so
that its peak memory is its own and an out-of-memory is recorded rather than fatal. Results:
experiments/results/efficiency_<tag>.json / .md / .png (the three panels) and
efficiency_<tag>_{throughput,memory,latency}.png, rewritten after every case (the PNGs at the
end, or with --plot-only from the JSON). `--merge` adds to the report of the same tag (rows of
the cases run again are replaced); `--budget-s` skips (and records) what would start after it.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import functools
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from experiments import common  # noqa: E402  (needs ROOT on sys.path)
from experiments.bench_ops import _compiled_bytes, _peak_bytes  # noqa: E402

GIB = 2 ** 30
NAME = "efficiency"
ROW_PREFIX = "EFFICIENCY_ROW "
JAX_TRAIN = ("gsa", "gsa-recompute", "transformer", "gla")
PEER = ("fla-gsa", "fla-gsa-norecompute")
MODELS = JAX_TRAIN + PEER
DECODE_MODELS = ("gsa", "transformer")
FAMILY = {"gsa": "gsa", "gsa-recompute": "gsa", "transformer": "transformer", "gla": "gla",
          "fla-gsa": "gsa", "fla-gsa-norecompute": "gsa"}

FAST_COMPILE = "--xla_backend_optimization_level=0"
SMOKE = dict(size="tiny", layers=1, tokens=128, seq_lens=[32, 64], prefix=16, gen_lens=[4, 8, 16],
             repeats=2, warmup=1, decode_repeats=1, dtype="float32", decode_dtype="float32",
             peer=False, jobs=2, fast_compile=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tag", default=None, help="results file suffix (default: the backend)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes for a CPU check: " +
                   ", ".join(f"{k}={v}" for k, v in SMOKE.items()))
    p.add_argument("--parts", nargs="+", default=["train", "decode"], choices=["train", "decode"])
    p.add_argument("--size", default="1.3b", help="preset size: 340m | 1.3b | 2.7b | tiny")
    p.add_argument("--models", nargs="+", default=list(JAX_TRAIN) + ["fla-gsa"], choices=MODELS,
                   help="models (the decode part takes gsa and transformer among them)")
    p.add_argument("--no-peer", dest="peer", action="store_false", help="leave out fla-gsa*")
    p.add_argument("--tokens", type=int, default=16384, help="B · T per train step")
    p.add_argument("--seq-lens", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    p.add_argument("--layers", type=int, default=None, help="override the presets' depth L")
    p.add_argument("--dtype", default="bfloat16", help="train compute dtype (params f32)")
    p.add_argument("--remat", action="store_true", help="remat policy 'full' around every block (default 'none')")
    p.add_argument("--gsa-impl", default="auto", help="form of the GSA op (auto | chunk | pallas)")
    p.add_argument("--gsa-num-heads", type=int, default=None,
                   help="override the GSA heads (e.g. 8 for head dims 256, which the Pallas "
                        "kernels take; the 1.3B preset's 4 heads have head dims 512)")
    p.add_argument("--attn-impl", default=None,
                   help="Transformer++ training attention: cudnn | xla | auto (default: cudnn on "
                        "a GPU, else xla); generation always uses auto")
    p.add_argument("--prefix", type=int, default=2048, help="prompt tokens before generating")
    p.add_argument("--gen-lens", type=int, nargs="+", default=[128, 256, 512, 1024, 2048])
    p.add_argument("--decode-dtype", default="bfloat16", help="generation compute and param dtype")
    p.add_argument("--repeats", type=int, default=5, help="timed train steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed train steps after compiling")
    p.add_argument("--decode-repeats", type=int, default=2, help="timed generate calls per N")
    p.add_argument("--peer-warmup", type=int, default=3,
                   help="untimed peer steps (the first autotunes its kernels)")
    p.add_argument("--mem-fraction", default="0.95",
                   help="XLA_PYTHON_CLIENT_MEM_FRACTION of the JAX workers ('' leaves it alone)")
    p.add_argument("--compile-cache", default=None, help="persistent XLA compilation cache dir")
    p.add_argument("--fast-compile", action="store_true",
                   help="workers compile with XLA_FLAGS=" + FAST_COMPILE + " (CPU checks: "
                        "less compile time, slower code)")
    p.add_argument("--worker-timeout", type=float, default=480, help="seconds per case")
    p.add_argument("--budget-s", type=float, default=None,
                   help="start no case after this many seconds (the rest is recorded skipped)")
    p.add_argument("--merge", action="store_true", help="add to the report of the same --tag")
    p.add_argument("--jobs", type=int, default=1,
                   help="cases run at once (CPU checks, or --compile-only: on one GPU timed "
                        "cases would share it)")
    p.add_argument("--compile-only", action="store_true",
                   help="only compile each train step (from shapes, no device memory taken) "
                        "into --compile-cache; with --jobs N the compiles run side by side, so "
                        "that a timed run afterwards with the same cache starts at once")
    p.add_argument("--in-process", action="store_true",
                   help="no subprocess per case (peak memory is then a running maximum)")
    p.add_argument("--plot-only", action="store_true", help="rewrite .md/.png from the JSON")
    p.add_argument("--out-dir", default=str(common.RESULTS_DIR))
    # Internal: the case a worker process runs, "train:<model>:<T>" or "decode:<model>".
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.smoke:
        common.apply_smoke_sizes(p, args, SMOKE)
    if not args.peer:
        args.models = [m for m in args.models if m not in PEER]
    if args.compile_only:
        if not args.compile_cache:
            p.error("--compile-only needs --compile-cache (where the executables go)")
        if args.worker is None and (args.merge or args.plot_only):
            p.error("--compile-only writes no timings: it takes neither --merge nor --plot-only")
        # the JAX train steps only: the peer (torch) and generation have nothing to keep
        args.parts = [part for part in args.parts if part == "train"]
        args.models = [m for m in args.models if m not in PEER]
    return args


# ------------------------------------------------------------------------ model configs
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


# ------------------------------------------------------------------------ measurements
def _is_oom(text: str) -> bool:
    text = text.lower()
    return "resource_exhausted" in text or "out of memory" in text or "outofmemory" in text


def _failure(error: BaseException) -> dict:
    text = f"{type(error).__name__}: {error}"
    return {"status": "oom" if _is_oom(text) else "error", "reason": text[:500]}


def _median_s(fn, repeats: int) -> tuple[float, float]:
    """(median, min) wall seconds of `fn()` (which blocks until its work is done)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), min(times)


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
        row["compiled_bytes"] = _compiled_bytes(compiled)
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
        median, fastest = _median_s(run, args.repeats)
        row.update(step_ms=1e3 * median, min_step_ms=1e3 * fastest,
                   tokens_per_s=B * T / median, loss=float(state[2]),
                   peak_bytes=_peak_bytes(device), status="ok")
    except Exception as error:  # noqa: BLE001 - recorded; the next case goes on
        row.update(_failure(error))
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
        prefill_s, _ = _median_s(lambda: jax.block_until_ready(prefill(params, prompt)),
                                 max(args.decode_repeats, 1))
    except Exception as error:  # noqa: BLE001
        return [{**base, "N": n, **_failure(error)} for n in args.gen_lens]
    for N in args.gen_lens:
        row = {**base, "N": N, "prefill_ms": 1e3 * prefill_s,
               "cache_bytes": generation.tree_bytes(generation.cache_shapes(lm, 1, P, N))}
        try:
            call = lambda: jax.block_until_ready(  # noqa: E731
                generation.generate(lm, params, prompt, max_new_tokens=N))
            start = time.perf_counter()
            out = call()
            row["first_call_s"] = round(time.perf_counter() - start, 2)  # compile + run
            median, fastest = _median_s(call, args.decode_repeats)
            row.update(latency_ms=1e3 * median, min_latency_ms=1e3 * fastest,
                       generated=int(out.lengths[0]),
                       ms_per_token=1e3 * max(median - prefill_s, 0.0) / N,
                       peak_bytes_so_far=_peak_bytes(device), status="ok")
        except Exception as error:  # noqa: BLE001
            row.update(_failure(error))
        rows.append(row)
    return rows


# ------------------------------------------------------------------------ the peer (torch)
def _torch_gsa_lm(cfg, level: int):
    """The GSA LM of `cfg` in torch around the peer's `chunk_gsa` (when `fla.models` is missing):
    embeddings, L blocks [x += GSA(RMSNorm x); x += SwiGLU(RMSNorm x)], RMSNorm, LM head."""
    import torch
    import torch.nn.functional as F
    from fla.ops.gsa import chunk_gsa

    D, H, M, W = cfg.hidden_size, cfg.num_heads, cfg.num_slots, cfg.mlp_width
    lin = functools.partial(torch.nn.Linear, bias=False)

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn_norm, self.mlp_norm = (torch.nn.RMSNorm(D, eps=cfg.norm_eps)
                                             for _ in range(2))
            self.g_norm = torch.nn.RMSNorm(D, eps=cfg.norm_eps,
                                           elementwise_affine=cfg.elementwise_affine)
            self.q_proj, self.k_proj, self.v_proj, self.o_proj = (lin(D, D) for _ in range(4))
            self.f_proj = lin(D, H * M)
            self.gate_proj, self.up_proj, self.down_proj = lin(D, W), lin(D, W), lin(W, D)

        def forward(self, x):
            B, T, _ = x.shape
            h = self.attn_norm(x)
            q, k = (F.silu(p(h)).view(B, T, H, -1) for p in (self.q_proj, self.k_proj))
            v = F.silu(self.v_proj(h)).view(B, T, H, -1)
            g = F.logsigmoid(self.f_proj(h).float()).view(B, T, H, M) / cfg.gate_logit_normalizer
            s = -torch.expm1(g)
            o, _ = chunk_gsa(q, k, v, s.to(q.dtype), g.to(q.dtype), scale=1.0,
                             checkpoint_level=level)
            x = x + self.o_proj(self.g_norm(F.silu(o.reshape(B, T, D))))
            h = self.mlp_norm(x)
            return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))

    class LM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(cfg.vocab_size, D)
            self.blocks = torch.nn.ModuleList(Block() for _ in range(cfg.num_layers))
            self.norm = torch.nn.RMSNorm(D, eps=cfg.norm_eps)
            self.lm_head = lin(D, cfg.vocab_size)

        def forward(self, input_ids, labels):
            x = self.embed(input_ids)
            for block in self.blocks:
                x = block(x)
            logits = self.lm_head(self.norm(x)).float()
            return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())

    return LM()


def _peer_model(cfg, level: int):
    """(torch module whose forward(input_ids, labels) gives the loss, description)."""
    import torch
    try:
        import fla.layers.gsa as fla_gsa_layer
        from fla.models import GSAConfig, GSAForCausalLM
    except Exception as error:  # noqa: BLE001 - e.g. no transformers: the same model by hand
        return _torch_gsa_lm(cfg, level), (f"torch blocks around fla.ops.gsa.chunk_gsa "
                                           f"(fla.models unavailable: {type(error).__name__}: "
                                           f"{error})"[:300])
    if level != 2:  # the layer calls chunk_gsa with the default checkpoint_level=2
        fla_gsa_layer.chunk_gsa = functools.partial(fla_gsa_layer.chunk_gsa,
                                                    checkpoint_level=level)
    config = GSAConfig(hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
                       num_heads=cfg.num_heads, num_slots=cfg.num_slots,
                       gate_logit_normalizer=cfg.gate_logit_normalizer,
                       intermediate_size=cfg.mlp_width, norm_eps=cfg.norm_eps,
                       elementwise_affine=cfg.elementwise_affine, vocab_size=cfg.vocab_size,
                       tie_word_embeddings=cfg.tie_word_embeddings, feature_map=cfg.feature_map)
    model = GSAForCausalLM(config)

    class WithLoss(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, input_ids, labels):  # labels are shifted inside the model
            return self.inner(input_ids=input_ids, labels=labels).loss

    return WithLoss(), "fla.models.GSAForCausalLM"


def peer_case(args, model: str, T: int) -> dict:
    """One train step of the peer's GSA (bf16 autocast, f32 params, fused AdamW)."""
    B = max(1, args.tokens // T)
    row = {"part": "train", "model": model, "preset": f"gsa-{args.size}", "T": T, "B": B,
           "tokens": B * T, "dtype": "bfloat16 (torch.autocast)", "remat": False}
    level = 0 if model.endswith("norecompute") else 2
    try:
        import torch
        if not torch.cuda.is_available():
            raise ImportError("torch has no CUDA device")
        import fla
        from fla.ops.gsa import chunk_gsa  # noqa: F401
    except Exception as error:  # noqa: BLE001 - torch/fla missing: recorded, not fatal
        row.update(status="unavailable", reason=f"{type(error).__name__}: {error}"[:300])
        return row
    cfg = model_config(args, model)
    row.update(form=f"fla chunk_gsa checkpoint_level={level}", torch=torch.__version__,
               fla=getattr(fla, "__version__", None), device=torch.cuda.get_device_name())
    try:
        torch.manual_seed(0)
        net, how = _peer_model(cfg, level)
        net = net.cuda()
        row["implementation"] = how
        row["params"] = sum(p.numel() for p in net.parameters())
        opt = torch.optim.AdamW(net.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.01,
                                fused=True)
        tokens = torch.randint(0, cfg.vocab_size, (B, T), device="cuda")
        torch.cuda.reset_peak_memory_stats()

        def run():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = net(tokens, tokens)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            return loss

        start = time.perf_counter()
        run()  # autotunes the Triton kernels at this shape
        row["compile_s"] = round(time.perf_counter() - start, 2)
        for _ in range(max(args.peer_warmup - 1, 0)):
            run()
        median, fastest = _median_s(run, args.repeats)
        row.update(step_ms=1e3 * median, min_step_ms=1e3 * fastest, tokens_per_s=B * T / median,
                   loss=float(run().item()), peak_bytes=int(torch.cuda.max_memory_allocated()),
                   status="ok")
    except Exception as error:  # noqa: BLE001
        row.update(_failure(error))
    return row


# ------------------------------------------------------------------------ workers and driver
def run_case(args, case: tuple) -> list[dict]:
    part, model, *rest = case
    if part == "decode":
        return decode_case(args, model)
    if model in PEER:
        return [peer_case(args, model, rest[0])]
    return [train_case(args, model, rest[0])]


def worker_main(args) -> int:
    part, model, *rest = args.worker.split(":")
    case = (part, model, *map(int, rest))
    env = None
    if model in PEER:
        os.environ["JAX_PLATFORMS"] = "cpu"  # never let XLA take the GPU from torch
    rows = run_case(args, case)
    if model not in PEER:
        env = common.environment()
    print(ROW_PREFIX + json.dumps({"rows": rows, "environment": env}), flush=True)
    return 0


def _case_id(case: tuple) -> str:
    return ":".join(map(str, case))


def _failed_rows(args, case: tuple, status: str, reason: str) -> list[dict]:
    part, model, *rest = case
    if part == "decode":
        return [{"part": "decode", "model": model, "N": n, "prefix": args.prefix,
                 "status": status, "reason": reason} for n in args.gen_lens]
    return [{"part": "train", "model": model, "T": rest[0], "B": max(1, args.tokens // rest[0]),
             "status": status, "reason": reason}]


def run_isolated(argv, args, case: tuple, timeout: float) -> tuple[list[dict], dict | None]:
    """One case in a fresh interpreter with the same arguments."""
    env = dict(os.environ)
    if args.compile_only:  # several compiling workers share the device: take no memory
        env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    elif args.mem_fraction and case[1] not in PEER:
        env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", args.mem_fraction)
    if args.fast_compile:
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {FAST_COMPILE}".strip()
    cmd = [sys.executable, os.path.abspath(__file__), *argv, "--worker", _case_id(case)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return _failed_rows(args, case, "error", f"worker timed out after {timeout:.0f} s"), None
    for line in proc.stdout.splitlines():
        if line.startswith(ROW_PREFIX):
            record = json.loads(line[len(ROW_PREFIX):])
            return record["rows"], record["environment"]
    tail = (proc.stderr or proc.stdout)[-600:]
    status = "oom" if _is_oom(tail) else "error"
    return _failed_rows(args, case, status, f"worker exited with {proc.returncode}: {tail}"), None


def cases(args) -> list[tuple]:
    out = []
    if "train" in args.parts:
        out += [("train", m, T) for T in args.seq_lens for m in args.models]
    if "decode" in args.parts:
        # gsa-recompute counts as gsa here: generation has no backward to recompute for
        wanted = {FAMILY.get(m, m) for m in args.models}
        out += [("decode", m) for m in DECODE_MODELS if m in wanted]
    return out


def _row_key(row: dict) -> tuple:
    return (row["part"], row["model"], row.get("T", row.get("N")))


def _order(row: dict) -> tuple:
    return (row["part"] != "train", row.get("T", 0), MODELS.index(row["model"]), row.get("N", 0))


CONFIG_KEYS = ("size", "layers", "tokens", "seq_lens", "models", "dtype", "remat", "gsa_impl",
               "gsa_num_heads", "attn_impl", "prefix", "gen_lens", "decode_dtype", "repeats",
               "warmup", "decode_repeats", "in_process", "jobs", "fast_compile")
# Settings that must agree between the runs a --merge puts in one report.
SHAPE_KEYS = ("size", "layers", "tokens", "dtype", "remat", "gsa_impl", "gsa_num_heads",
              "prefix", "decode_dtype")


def build_record(args, argv, rows, environment, previous) -> dict:
    command = common.command_line(argv, __file__)
    commands = [command]
    config = {k: getattr(args, k) for k in CONFIG_KEYS}
    if previous is not None:  # --merge: the other cases' rows are kept, the sweeps united
        done = {_row_key(r) for r in rows}
        rows = [r for r in previous["rows"] if _row_key(r) not in done] + rows
        commands = previous.get("commands", [previous.get("command")]) + commands
        environment = environment or previous.get("environment")
        config.update(
            seq_lens=sorted({r["T"] for r in rows if r["part"] == "train"}),
            models=[m for m in MODELS if any(r["model"] == m for r in rows
                                             if r["part"] == "train")],
            gen_lens=sorted({r["N"] for r in rows if r["part"] == "decode"}))
    # "command" (the results page's footer) names every run a --merge gathered.
    record = {"benchmark": NAME, "tag": args.tag, "command": " ; then ".join(commands),
              "commands": commands,
              "config": config, "rows": sorted(rows, key=_order)}
    # No worker reported its machine (all failed): say so rather than describe the driver's CPU.
    record["environment"] = environment or {"backend": "unknown (no worker reported)"}
    return record


def _gib(x) -> str:
    return common.fmt(None if x is None else x / GIB)


def markdown(record: dict) -> str:
    c = record["config"]
    train = [r for r in record["rows"] if r["part"] == "train"]
    decode = [r for r in record["rows"] if r["part"] == "decode"]
    note = lambda r: "" if r.get("status") == "ok" else (  # noqa: E731
        f"{r.get('status')}: {r.get('reason', '')[:140]}".replace("|", "/").replace("\n", " "))
    lines = [f"# Efficiency ({record['tag']}): the paper's Figure 4 at size {c['size']}", "",
             f"(a, b) one train step (forward + backward + AdamW), {c['tokens']} tokens per "
             f"batch, compute {c['dtype']}, f32 parameters; median of {c['repeats']} steps after "
             f"{c['warmup']} warm-up. Peak = the device's peak bytes in use in the case's own "
             f"process (GPU only); compiled = XLA's footprint of the step.", ""]
    lines.append(common.markdown_table(
        ["T", "B", "model", "form", "step ms", "tokens/s", "peak GiB", "compiled GiB", "note"],
        [[r["T"], r.get("B", "-"), r["model"], r.get("form", "-") + (
            f" ({r['recompute']})" if r.get("recompute") else ""),
          common.fmt(r.get("step_ms"), 1), common.fmt(r.get("tokens_per_s"), 0),
          _gib(r.get("peak_bytes")), _gib(r.get("compiled_bytes")), note(r)] for r in train],
        align="rrllrrrrl"))
    lines += ["", f"(c) greedy generation, batch 1, after a {c['prefix']}-token prompt "
                  f"({c['decode_dtype']} weights); latency = the whole `generate` call (prefill + "
                  f"N steps), median of {c['decode_repeats']}; cache = the decode state's bytes.",
              ""]
    lines.append(common.markdown_table(
        ["model", "N", "latency ms", "ms/token", "prefill ms", "cache MiB", "peak GiB", "note"],
        [[r["model"], r["N"], common.fmt(r.get("latency_ms"), 1),
          common.fmt(r.get("ms_per_token"), 2), common.fmt(r.get("prefill_ms"), 1),
          common.fmt(None if r.get("cache_bytes") is None else r["cache_bytes"] / 2 ** 20, 3),
          _gib(r.get("peak_bytes_so_far")), note(r)] for r in decode], align="lrrrrrrl"))
    lines += common.notes_lines(record)
    return "\n".join(lines) + "\n"


def figure(record: dict, out_base: str | None = None):
    """The three panels of Figure 4 (and, given out_base, each panel as its own PNG)."""
    plt = common.pyplot()
    if plt is None:
        return None
    rows = [r for r in record["rows"] if r.get("status") == "ok"]
    panels = [("throughput", "train", "T", "tokens_per_s", 1e-3,
               "training throughput (K tokens/s)"),
              ("memory", "train", "T", None, 1 / GIB,
               "training memory (GiB; XLA footprint where no device peak)"),
              ("latency", "decode", "N", "latency_ms", 1e-3, "generation latency (s)")]
    # A train-only or decode-only report draws only its own panels (no empty axes).
    parts = {r["part"] for r in record["rows"]} or {"train", "decode"}
    panels = [p for p in panels if p[1] in parts]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.2), squeeze=False)
    axes = axes[0]
    for ax_all, (name, part, x, y, scale, label) in zip(axes, panels):
        targets = [ax_all]
        single = None
        if out_base:
            single = plt.figure(figsize=(5.2, 4.2))
            targets.append(single.gca())
        for model in MODELS:
            mine = sorted((r for r in rows if r["part"] == part and r["model"] == model),
                          key=lambda r: r[x])
            if y is None:  # device peak where reported, else XLA's compiled footprint
                points = [(r[x], r.get("peak_bytes") or r.get("compiled_bytes")) for r in mine]
            else:
                points = [(r[x], r.get(y)) for r in mine]
            points = [(a, b * scale) for a, b in points if b is not None]
            if points:
                for ax in targets:
                    ax.plot(*zip(*points), marker="o", label=model)
        for ax in targets:
            ax.set_xscale("log", base=2)
            ax.set_xlabel("sequence length T" if x == "T" else
                          f"generated tokens N (after {record['config']['prefix']})")
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
            if ax.has_data():
                ax.legend(fontsize=8)
        if single is not None:
            single.savefig(f"{out_base}_{name}.png", dpi=120, bbox_inches="tight")
            plt.close(single)
    fig.suptitle(f"efficiency ({record['tag']}, size {record['config']['size']})")
    fig.tight_layout()
    return fig


def write(record: dict, out_dir: str, plots: bool) -> dict:
    fig = figure(record, os.path.join(out_dir, f"{NAME}_{record['tag']}")) if plots else None
    paths = common.write_results(record["tag"], NAME, record, markdown(record), fig,
                                 out_dir=out_dir, command=record["command"])
    if fig is not None:
        common.pyplot().close(fig)
    return paths


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.worker:
        return worker_main(args)
    if (args.merge or args.plot_only) and not args.tag:
        raise SystemExit("--merge and --plot-only need --tag (the report to read)")
    import jax
    if not args.in_process:
        # The driver only writes files: keep its jax (common.environment) off the accelerator,
        # whose memory belongs to the workers.
        jax.config.update("jax_platforms", "cpu")
    previous = None
    if args.merge or args.plot_only:
        json_path = common.results_paths(args.tag, NAME, args.out_dir)["json"]
        if json_path.exists():
            previous = json.loads(json_path.read_text())
        elif args.plot_only:
            raise SystemExit(f"--plot-only: no {json_path}")
    if args.merge and previous is not None:
        mismatch = common.merge_mismatch(previous["config"],
                                         {k: getattr(args, k) for k in SHAPE_KEYS})
        if mismatch:
            raise SystemExit(f"--merge: {json_path} was run with other settings (old, new): "
                             f"{mismatch}; use another --tag")
    if args.plot_only:
        paths = write(previous, args.out_dir, plots=True)
        print("wrote " + ", ".join(map(str, paths.values())))
        return 0

    start, rows, environment, record = time.perf_counter(), [], None, None

    def execute(case):
        """(rows, environment or None, seconds) of one case; threads run several at once."""
        began = time.perf_counter()
        elapsed = began - start
        env = None
        if args.budget_s is not None and elapsed > args.budget_s:
            found = _failed_rows(args, case, "skipped",
                                 f"time budget {args.budget_s:.0f} s spent; run it with --merge")
        elif args.in_process:
            found, env = run_case(args, case), common.environment()
        else:
            timeout = args.worker_timeout
            if args.budget_s is not None:
                timeout = min(timeout, max(args.budget_s - elapsed, 60.0))
            found, env = run_isolated(argv, args, case, timeout)
        return found, env, round(time.perf_counter() - began, 1)

    jobs = 1 if args.in_process else max(1, args.jobs)
    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        futures = {pool.submit(execute, case): case for case in cases(args)}
        for future in concurrent.futures.as_completed(futures):
            found, env, case_s = future.result()
            environment = environment or env
            # The tag defaults to the backend the first finished case reports.
            args.tag = args.tag or (environment or {}).get("backend") or "unknown"
            for row in found:
                row["case_s"] = case_s
            rows += found
            summary = [(r.get("T") or r.get("N"), r.get("tokens_per_s") or r.get("latency_ms")
                        or r.get("status")) for r in found]
            print(f"{_case_id(futures[future])}: {summary} ({case_s} s)", flush=True)
            record = build_record(args, argv, rows, environment, previous)
            write(record, args.out_dir, plots=False)  # after every case: a cut run keeps rows
    if record is None:
        raise SystemExit("nothing to run: no --parts, --models or --seq-lens")
    paths = write(record, args.out_dir, plots=True)
    print(markdown(record))
    print("wrote " + ", ".join(map(str, paths.values())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
