"""MQAR as the GSA authors ran it (their Zoology fork; ../shared/PAPER.md section 4), with many
runs of one (model, width) cell trained at once: `jax.vmap` over (learning rate x seed).

    python experiments/mqar.py --authors --tag h200 ...     # (or this file directly)
    python experiments/mqar_authors.py --smoke --tag cpu     # tiny, a CPU check

Task: MQAR (`gsa_jax.data.mqar`), T = 512 with P = 64 key-value pairs, V = 8192, power law
α = 0.01, filler tokens 0 (random_non_queries False); 100,000 training and 3,000 held-out
sequences (other seeds), one fixed data set for every run.

Model (Zoology's `LanguageModel`, `zoology/model.py`), L = 4 blocks at width D:
    r = Dropout_0.1(E[x] (+ P[t], attention only))                      [B, T, D]
    per block:  r = r + mixer(LayerNorm1(r));  r = r + LayerNorm2(r)
    logits = LayerNorm_f(r) Eᵀ                                          tied head, [B, T, V]
The second line is Zoology's TransformerBlock with state_mixer = Identity (no MLP): the block
returns LayerNorm2(residual) as its hidden state, and the next block (or the final norm) adds it
to the residual. Initialisation as Zoology's `_init_weights`, which overwrites the layers' own:
every linear normal(0.02) with zero bias, embeddings normal(0.02), norms 1; `out_proj`
(attention only: fla's layers name it `o_proj`) normal(0.02 / sqrt(2L)).

Mixers as the authors instantiated fla's layers (our layers equal fla's, tests/test_fla_layers.py):
    gsa        GatedSlotAttention(num_heads=4, num_slots=D/4, gate_logit_normalizer=16,
               scale=None → head_k_dim^-1/2); swish features, no short conv, no output gate
    gla        GatedLinearAttention(num_heads=2, expand_k=1); fla defaults: identity features,
               low-rank gate 16, normaliser 16, swish output gate, per-head norm
    retnet     MultiScaleRetention(num_heads=2); expand_k 1, expand_v 2, output gate
    attention  Zoology's MHA(num_heads=1, dropout=0.1): fused qkv and out projections with bias,
               softmax scale D^-1/2, dropout 0.1 on the attention weights, learned positions
fla's layers use norm eps 1e-5 (their default); Zoology's LayerNorms 1e-5.

Training (Zoology's Trainer): AdamW (β 0.9/0.999, eps 1e-8, weight decay 0.1 on every
parameter, no clipping, no warmup), cosine from the peak lr to 0 over the run (Zoology steps it
once per epoch over max_epochs; here per step over max_epochs epochs, so a short run still ends
at 0), the training set reshuffled each epoch (per run), cross-entropy over the query positions,
early stop of a run once its held-out accuracy exceeds 0.99; the best lr per (model, width) by
mean accuracy over seeds.

Speed: all runs of a cell train at once: parameters and optimizer states stacked [R, ...]
(R = lrs x seeds; runs of one seed share the initialisation, as Zoology's seeded runs), the lr an
array [R] into the schedule; a run past 0.99 stops, and the next chunks run the other runs
only (compiled once per run count: a chunk's cost grows with its runs; GSA at D = 64 on an
H200 took 10.3 ms per step with 2 runs, results/logs/mqar_step_profile_h200_after_fix.txt,
and 16 ms with 4, mqar_authors_h200a.md). --no-compact-stopped keeps stopped runs in the
chunk, their updates masked (the same results for the others, to float rounding).
--eval-every steps run as one jitted `lax.scan` followed by the held-out accuracy of every
run. A cell stops when every run is
frozen, at --max-epochs, or when another chunk would pass --cell-seconds of training; the
report records the epochs done and why, per cell.

Results: results/mqar_authors_<tag>.{json,md,png}; --merge adds cells to an existing tag (split
the sweep over GPU calls by --models/--widths). A cell may also be trained in parts, by lr (--lr)
or by seed (--seeds 1 --first-seed S): every run depends on its own (lr, seed) only, and the
report joins a cell's parts (mqar_report.join_cell).

A cell longer than one call (the authors' 64 epochs: ~50K steps, 10+ minutes on an H200) pauses
and resumes: with --state-dir DIR and --pause-seconds S a cell stops after S seconds of training
in this call, keeping its cosine horizon (the epoch cap: unlike --cell-seconds, nothing is cut),
and writes its runs (parameters, optimizer states, curves, step) to DIR/<model>_D<width>.state.*;
the same command again (with --merge) resumes it where it stopped, exactly: every batch, dropout
mask and lr is a function of the step. The state is written in parts of at most
--state-part-mb MiB (a device call returns files of at most 16 MiB); a cell's state is about
12 x (parameters per run) x runs bytes (float32 parameters and two AdamW moments).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments import common, harness  # noqa: E402
# The parts of this setup: the model (mqar_models.py), the data and the compiled runs of a cell
# (mqar_authors_train.py), the report (mqar_report.py); build, init_runs, make_chunk, run_grid,
# fmt_cell and summarise also as mqar_authors.<name>, which the tests use.
from experiments.mqar_authors_train import (  # noqa: E402,F401
    data_shapes, init_runs, load_cell_state, make_chunk, make_data, prepare_cell, run_grid,
    save_cell_state, steps_per_epoch, task)
from experiments.mqar_models import build, state_size  # noqa: E402,F401
from experiments.mqar_report import (  # noqa: E402,F401
    AUTHORS_LABELS as LABELS, AUTHORS_MODELS as MODELS, GSA_LRS, STOP_ACCURACY,
    authors_markdown as markdown, authors_plot as plot, finish, fmt_cell, merge, summarise)

NAME = "mqar_authors"

# The report's notes (issue 21, items 1 and 4): what was checked beside the sweep.
NOTES = [
    "Initialisation (the GLA question): our layers initialise every projection normal(0.02) "
    "with zero biases, o_proj 0.02 here (no residual rescale: Zoology's `_init_weights` "
    "rescales only modules named out_proj/fc2). That is the authors' effective init: Zoology's "
    "LanguageModel re-initialises every nn.Linear of the model after construction (normal "
    "0.02, bias 0), fla layers included, overwriting fla's own init. Measured per tensor "
    "(std, built on CPU): fla 0.6.0's GatedLinearAttention standalone has torch's default "
    "Linear init, q/k/v/g/o 0.072 at D = 64 and 0.0255 at D = 512, gate up-projection 0.145, "
    "gate bias U(±1/4) (std 0.14); fla's 2024 layers' xavier_uniform(gain 2^-2.5) gives "
    "0.022 / 0.0078 (D = 64 / 512) and 0.028 / 0.011 for the gate; ours 0.020 for all. In "
    "every variant the gate logits start centred on 0, so GLA's decay starts at "
    "exp(log σ(0) / 16) = 0.958 per token (half-life 16 tokens): the init is not what made "
    "our GLA fail.",
    "What made GLA fail: no bug found. The layer equals fla's (tests/test_fla_layers.py) and "
    "its init is the authors' effective one (above). CPU analogues in this setup (4 blocks, no "
    "MLP, V = 256, T = 64, 8 pairs, D = 64, batch 32, lr 5e-3, one seed; plateau ln 128 = "
    "4.85): the authors' GLA (2 heads, expand_k 1) after 1000 steps loss 4.79, 1.2%; the "
    "second setup's GLA heads (4 heads, expand_k 0.5: head key dim D/8, a quarter of the "
    "state) after 1200 steps 4.855, 0.7% (never moved); the authors' GLA with its gate bias "
    "initialised to +4 (decay 0.9989 instead of 0.958 per token: no forgetting prior) after 900 "
    "steps 4.79, 1.0%: the forgetting prior is not it; GSA after 300 steps 3.30, 12.6%. At "
    "V = 128, T = 32, 4 pairs, D = 32 (1600 steps) the authors' GLA did leave the plateau, "
    "slowly: loss 3.17, 9.5% (GSA 27.1%, attention 23.5%). So GLA with identity feature maps "
    "is slow to start here (q·k starts zero-mean; ReLU features lifted it from 1% to 41% in "
    "shared/PAPER.md §10's analogue), and more so with the second setup's small heads; the "
    "authors trained up to 64 epochs (~50K steps), which a cut run cannot match: a GLA "
    "'plateau' cell here is a statement about this budget. Given data and steps it does "
    "learn: at V = 8192, T = 64, 8 pairs, D = 64, 100k rows, batch 64, lr 3e-3, cosine over 8 "
    "epochs (CPU, one seed, 2026-12-03) the authors' GLA stayed at 0-1% for 1.7 epochs "
    "(2,600 steps), then reached 6% at epoch 2, 21% at 3 and 25% at 4.67 (7,300 steps; the "
    "run was stopped there), while attention in the same setup passed 99% at epoch 3.3 "
    "(5,210 steps) and GSA sat at 9-12% (about 1/P, one of the in-context values) through "
    "epoch 1.33 (stopped there): GLA is the slowest learner here, not a broken one. The full "
    "GPU cells settle it (64 epochs, lr 2e-3): GLA ends at 7.3% (7.1-7.5) at D = 64 and at "
    "98.7% (98.3-99.0) at D = 128, where its two runs' losses left the plateau at epochs 10-11 "
    "(0.5B training tokens), their accuracies rose from epochs 17-18 and passed 90% by epochs "
    "21 and 26 "
    "(results/mqar_authors_h100e128d.md, logs/mqar_authors_h100e128d_call1.txt). The second "
    "setup's GLA (0.0-0.4% at every width) trained on 0.2B tokens (6000 steps x 64 rows of "
    "512) with a quarter of the state per head: it stopped before GLA starts to learn.",
    "ABC vs GSA (second setup: ABC 30-75 points above GSA at small widths): ABC's cumulative "
    "normaliser is causal (tests/test_mqar_authors.py::test_abc_cumulative_normaliser_is_causal: "
    "perturbing tokens after t leaves every output <= t exactly unchanged), so it is not a "
    "leak. It is GSA's forgetting prior: at init f ≈ 0, g = log σ(0) / τ, −0.087 per token "
    "with the second setup's τ = 8 (a memory of ~12 tokens), while ABC averages the whole "
    "prefix; at T = 512 with 64 pairs most queries sit 100+ tokens after their key. A CPU "
    "analogue with τ = 64 lifted GSA from 9.6% to 62% (shared/PAPER.md §10). The authors' "
    "MQAR GSA uses τ = 16 (used here); ABC is not in the authors' runs and not in this setup.",
    "The harness is not it either: an independent PyTorch build of Zoology's attention model "
    "and recipe (experiments/mqar_torch_parity.py) from our initial parameters gives logits "
    "within 3.6e-7, loss 9.0168953 vs 9.0168972, gradients within ~1e-8 and one AdamW step "
    "within 4.6e-7 (V = 8192, T = 64, 8 pairs, D = 64); trained from its own init on the same "
    "data (CPU) its curves equal ours: both 13-14% after 3120 steps at 20k rows, lr 1e-3; "
    "with 100k rows and lr 3e-3 both sit at ~11% (one of the P in-context values, guessed) "
    "and jump to ~99% between steps 2500 and 3650 (results/mqar_authors_cpu{A,B}.md, "
    "results/logs/mqar_torch_t64_*.txt). So the near-chance cells are a "
    "plateau that a longer run at a higher lr leaves: the authors' 64 epochs and the top of "
    "their lr grid (2e-3 to 1e-2) are what these cut cells lack.",
    "Speed drift, found (h200e64, results/logs/mqar_authors_h200e64_call*.txt): the same "
    "compiled chunk got slower as a cell's runs learned: GSA D = 64 from 12.0 s per epoch "
    "(epochs 1-16) to 20.7 s (epoch 64), GLA D = 64 from 7.3 s to 13.4-15.5 s, while RetNet "
    "(fixed decays) held 17.3 s per epoch from its plateau to 13% (side by side with GLA). "
    "The cause is the kernels' exact intra-chunk path (pallas_kernels/chunk_math.py): a tile "
    "whose gate decays a channel by more than 120 (natural log) over a 64-step chunk loops "
    "over the chunk's positions instead of two matmuls. At init no tile does; in the trained "
    "GLA D = 64 (epoch 64) the lr 2e-3 runs send 27-100% of their tiles down it in layers "
    "0-2 (min g -8 per token), the plateaued lr 5e-3 runs none, and a vmapped cell pays for "
    "its slowest run (results/gate_extremes_h200e64_gla64.md, experiments/gate_extremes.py). "
    "Not clocks: nvidia-smi during call 5 read 1980 MHz, ~500 W of 700 W, no throttle reason "
    "(results/logs/mqar_authors_h200e64_call5_smi.csv). GLA and RetNet ran as two processes "
    "on one GPU in calls 4-6, so their s/step are about twice their solo ones (GLA ran "
    "15.5 s per epoch once RetNet had finished).",
    "Runs of one seed share the initialisation, the data order and the dropout masks across "
    "lrs (as Zoology's seeded runs); every run sees the same data set (data seed 0).",
    "Left as differences from the authors: the cosine is stepped per step, not per epoch; the "
    "last partial batch of an epoch is dropped (781 steps of 128); the compute dtype is "
    "recorded in the config (the authors trained in float32).",
]

AUTHORS = dict(vocab_size=8192, seq_len=512, kv_pairs=64, train_examples=100_000,
               test_examples=3_000, batch_size=128, widths=[64, 128, 256, 512], lr=GSA_LRS,
               seeds=2, max_epochs=64, cell_seconds=None, eval_every=None)
SMOKE = dict(vocab_size=64, seq_len=32, kv_pairs=4, train_examples=256, test_examples=48,
             batch_size=16, widths=[16], lr=[1e-3, 1e-2], seeds=2, max_epochs=2,
             cell_seconds=None, eval_every=None)


# ------------------------------------------------------------------ arguments
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tag", default=None, help="results: mqar_authors_<tag>.* (default backend)")
    p.add_argument("--smoke", action="store_true", help="CPU-sized run: " + str(SMOKE))
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--widths", type=int, nargs="+", help="model widths D (authors: 64..512)")
    p.add_argument("--lr", type=float, nargs="+",
                   help="peak lr grid of every cell (default the authors' GSA grid "
                        f"{GSA_LRS}); one vmapped run per lr and seed")
    p.add_argument("--seeds", type=int, help="seeds per lr (initialisation, shuffle, dropout)")
    p.add_argument("--first-seed", type=int, default=0,
                   help="the seeds are FIRST_SEED .. FIRST_SEED + SEEDS - 1: a part of a cell "
                        "by seeds (e.g. --seeds 1 --first-seed 1 trains seed 1's runs, equal "
                        "to those of the cell trained whole; the report joins the parts)")
    p.add_argument("--max-epochs", type=int, help="epoch cap and cosine horizon (authors: 64)")
    p.add_argument("--cell-seconds", type=float,
                   help="training wall-clock budget per cell (compile excluded): no chunk is "
                        "started that would end past it (default: none)")
    p.add_argument("--state-dir", default=None,
                   help="pause/resume: where each cell's runs are saved when paused (or done) "
                        "and resumed from by the same command")
    p.add_argument("--pause-seconds", type=float, default=None,
                   help="with --state-dir: training seconds per cell in this call; then the "
                        "cell is saved and reported as paused (its cosine horizon unchanged)")
    p.add_argument("--call-seconds", type=float, default=None,
                   help="with --state-dir: wall-clock seconds for this whole process (from its "
                        "start, compiles included): a cell pauses before a chunk that would end "
                        "past it and later cells wait for the next call; leave ~30 s under the "
                        "call's limit for saving and the report")
    p.add_argument("--state-part-mb", type=float, default=15.0,
                   help="largest file of a saved state, MiB")
    p.add_argument("--eval-every", type=int,
                   help="steps per jitted chunk; held-out accuracy and early stop after each "
                        "(default: one epoch, as Zoology)")
    p.add_argument("--vocab-size", type=int)
    p.add_argument("--seq-len", type=int)
    p.add_argument("--kv-pairs", type=int)
    p.add_argument("--train-examples", type=int)
    p.add_argument("--test-examples", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--power-a", type=float, default=0.01)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--embed-dropout", type=float, default=0.1)
    p.add_argument("--attn-dropout", type=float, default=0.1, help="attention model only")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="compute dtype (parameters float32)")
    p.add_argument("--impl", default="auto", help="form of the linear-attention ops")
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--merge", action="store_true", help="add cells to this tag's results")
    p.add_argument("--merge-files", nargs="+", default=[], metavar="JSON",
                   help="reports of other calls (their mqar_authors_<tag>.json) merged into this "
                        "one (cells redone here replace theirs)")
    p.add_argument("--merge-only", action="store_true",
                   help="train nothing: only merge --merge-files (and --merge) into this tag")
    p.add_argument("--out-dir", default=str(common.RESULTS_DIR))
    p.add_argument("--compile-cache", default=None)
    p.add_argument("--no-compact-stopped", dest="compact_stopped", action="store_false",
                   help="keep early-stopped runs in the vmapped chunk (masked) instead of "
                        "leaving them out (same results for the other runs; a check)")
    p.add_argument("--compile-ahead", type=int, default=2,
                   help="cells prepared (init + compile) in threads while one trains")
    args = p.parse_args(argv)
    for key, value in (SMOKE if args.smoke else AUTHORS).items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.seeds < 1 or args.max_epochs < 1 or any(not lr > 0 for lr in args.lr):
        p.error("--seeds, --max-epochs and --lr must be positive")
    if args.first_seed < 0:
        p.error("--first-seed must be >= 0")
    if len(set(args.lr)) != len(args.lr):
        p.error(f"--lr lists an lr twice: {args.lr}")
    if args.pause_seconds is not None and (args.state_dir is None or args.pause_seconds < 0):
        p.error("--pause-seconds needs --state-dir and a value >= 0")
    if args.call_seconds is not None and (args.state_dir is None or args.call_seconds <= 0):
        p.error("--call-seconds needs --state-dir and a positive value")
    # --pause-seconds counts each cell's training alone; a call that trains several cells
    # also needs the whole process's deadline (a cell killed by the call's limit loses its
    # chunks since the last save).
    args.call_deadline = (None if args.call_seconds is None
                          else time.perf_counter() + args.call_seconds)
    if args.state_dir is not None and args.cell_seconds is not None:
        p.error("--state-dir (pause, resume later) and --cell-seconds (cut the cosine to a "
                "budget) exclude each other")
    if args.train_examples < args.batch_size:
        p.error("--train-examples must be at least --batch-size")
    if args.eval_every is None:
        args.eval_every = steps_per_epoch(args)
    if not 1 <= args.eval_every <= steps_per_epoch(args):
        p.error(f"--eval-every must be in [1, steps per epoch = {steps_per_epoch(args)}]")
    task(args)   # a valid MQAR task (raises ValueError otherwise)
    return args


def task_config(args) -> dict[str, Any]:
    """The settings every merged cell must share (lrs, seeds and epochs may differ per cell)."""
    keys = ("vocab_size", "seq_len", "kv_pairs", "power_a", "train_examples", "test_examples",
            "batch_size", "weight_decay", "num_layers", "embed_dropout", "attn_dropout",
            "dtype", "impl", "data_seed")
    return {k: getattr(args, k) for k in keys} | {"random_non_queries": False}


# ------------------------------------------------------------------ training
def train_cell(name: str, width: int, args, data: dict, log=print,
               prepared: Optional[dict] = None) -> dict[str, Any]:
    """Trains every (lr, seed) run of one (model, width) cell at once (vmapped) until all are
    frozen past STOP_ACCURACY, args.max_epochs, or args.cell_seconds; a frozen run is left out
    of the next chunks (args.compact_stopped; else masked in them). With a time budget the
    cosine horizon is fitted to it after the first chunk: min(max_epochs, the chunks that fit)
    (the first chunk ran on the max_epochs horizon). With args.state_dir the cell resumes from
    its saved state, if any, and is saved when it stops; with args.pause_seconds it stops
    ("paused") after that much training in this call, or before a chunk that would end past
    args.call_deadline (time.perf_counter() seconds; at least one chunk either way). Returns
    the cell: its runs (lr, seed, curve of {step, epoch, loss, accuracy}, stopped_epoch), epochs
    done, the stop reason, the schedule horizon, compile and training seconds, step time and
    tokens/s."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    prep = prepared or prepare_cell(name, width, args, (data["train"], data["test"]))
    params, opt_state = prep["params"], prep["opt_state"]
    prep["params"] = prep["opt_state"] = None
    lrs, run_seeds, R = prep["lrs"], prep["run_seeds"], len(prep["lrs"])
    E, S = steps_per_epoch(args), args.eval_every
    total = horizon = args.max_epochs * E
    frozen = jnp.zeros((R,), bool)
    curves = [[] for _ in range(R)]
    stopped = [None] * R
    step, train_s, chunk_s, reason = 0, 0.0, 0.0, "max epochs"
    # Seconds per chunk, kept across pauses: on the H200 a cell's epochs got up to 1.8x slower as
    # its runs learned (same program, same machine), so the report records the drift.
    chunk_times: list[float] = []
    run_steps = 0   # steps trained summed over runs (a stopped run left out trains none)
    devices: list[str] = []   # the GPUs (device kinds) that trained the cell, call by call
    prefix, calls = None, 1
    if args.state_dir is not None:
        prefix = os.path.join(args.state_dir, f"{name}_D{width}")
        identity = state_identity(name, width, args, lrs, run_seeds)
        saved = load_cell_state(prefix)
        if saved is not None:
            (params, opt_state), step, train_s, curves, stopped, calls, chunk_times = \
                restore_cell(prefix, saved, identity, (params, opt_state))
            # (states saved before run_steps was kept: every run ran every step)
            run_steps = saved[0].get("run_steps") or step * R
            devices = list(saved[0].get("devices", []))
            calls += 1
            frozen = jnp.asarray([s is not None for s in stopped])
            log(f"  {LABELS[name]} D={width}: resumed at epoch {step / E:.2f} (call {calls})")
    if jax.devices()[0].device_kind not in devices:   # a cell may resume on another machine
        devices.append(jax.devices()[0].device_kind)
    resumed_at, call_s = step, 0.0
    # a chunk's losses and accuracies for the log ("-": a stopped run, left out of the chunk)
    shown = lambda xs: " ".join(f"{x:.2f}" if np.isfinite(x) else "-" for x in xs)  # noqa: E731
    while True:
        if step >= total:
            break
        if all(s is not None for s in stopped):   # (a resumed cell that had finished)
            reason = "all runs early-stopped"
            break
        if args.cell_seconds is not None and train_s + chunk_s > args.cell_seconds:
            reason = "time budget"
            break
        active = [r for r in range(R) if stopped[r] is None]
        if len(active) < R and args.compact_stopped:
            # a compile, once per run count: not training time, but before the call's
            # deadline is checked, which it counts against
            compiled_part = prep["compile_for"](len(active))
        if step > resumed_at and (
                (args.pause_seconds is not None and call_s + chunk_s > args.pause_seconds)
                or (args.call_deadline is not None
                    and time.perf_counter() + chunk_s > args.call_deadline)):
            reason = "paused (resumes from --state-dir)"
            break
        start = time.perf_counter()
        if len(active) == R or not args.compact_stopped:
            params, opt_state, loss, acc = prep["compiled"](
                params, opt_state, frozen, prep["lr_R"], prep["keys"], jnp.int32(step),
                jnp.int32(horizon), data["train"], data["test"])
            loss, acc = np.asarray(loss), np.asarray(acc)   # waits for the chunk
        else:
            # Early-stopped runs left out: the chunk runs the others only (its cost is about
            # linear in the runs), then they go back into the stacked state.
            idx = jnp.asarray(active)
            part = compiled_part(
                jax.tree.map(lambda a: a[idx], params), jax.tree.map(lambda a: a[idx], opt_state),
                jnp.zeros((len(active),), bool), prep["lr_R"][idx], prep["keys"][idx],
                jnp.int32(step), jnp.int32(horizon), data["train"], data["test"])
            params, opt_state = (jax.tree.map(lambda a, b: a.at[idx].set(b), full, sub)
                                 for full, sub in zip((params, opt_state), part[:2]))
            loss, acc = np.full(R, np.nan), np.full(R, np.nan)
            loss[active], acc[active] = np.asarray(part[2]), np.asarray(part[3])
        chunk_s = time.perf_counter() - start
        train_s += chunk_s
        call_s += chunk_s
        chunk_times.append(round(chunk_s, 3))
        run_steps += S * len(active)
        step += S
        if step == S and args.cell_seconds is not None:
            # The chunks that fit the budget, at this chunk's speed, set the cosine horizon.
            fit = step + S * max(0, int((args.cell_seconds - train_s) // chunk_s))
            total = horizon = max(step, min(total, fit))
        for r in range(R):
            if stopped[r] is None:   # a frozen run's accuracy stays that of its stop
                curves[r].append({"step": step, "epoch": round(step / E, 3),
                                  "loss": float(loss[r]), "accuracy": float(acc[r])})
                if acc[r] > STOP_ACCURACY:
                    stopped[r] = round(step / E, 3)
        frozen = jnp.asarray([s is not None for s in stopped])
        log(f"  {LABELS[name]} D={width} epoch {step / E:.2f}: loss {shown(loss)} | acc "
            f"{shown(acc)}  ({chunk_s:.1f} s)")
        if all(s is not None for s in stopped):
            reason = "all runs early-stopped"
            break
    if reason == "max epochs" and total < args.max_epochs * E:
        reason = "time budget"   # the horizon was cut to fit the budget
    if prefix is not None:
        meta = {"identity": identity, "step": step, "train_s": train_s, "curves": curves,
                "stopped": stopped, "calls": calls, "chunk_times": chunk_times,
                "run_steps": run_steps, "devices": devices}
        save_cell_state(prefix, meta, jax.tree.leaves((params, opt_state)), args.state_part_mb)
    per_step = train_s / step if step else None   # the step of every run still training
    # tokens per second over the runs that trained (a stopped run is left out of the chunks)
    tokens = run_steps / max(step, 1) * args.batch_size * args.seq_len
    return {"model": name, "width": width, "params": prep["num_params"],
            "state_size": state_size(name, width, args.seq_len), "lrs": list(args.lr),
            "seeds": args.seeds, "seed_ids": sorted(set(run_seeds)),
            "max_epochs": args.max_epochs, "epochs_done": round(step / E, 3),
            "steps_done": step, "schedule_epochs": round(horizon / E, 3), "stop_reason": reason,
            "cell_seconds": args.cell_seconds, "calls": calls, "devices": devices,
            "kernel_tuning": kernel_tuning_changes(),
            "stopped_runs_left_out": args.compact_stopped,
            "compile_s": round(prep["compile_s"], 2),
            "train_s": round(train_s, 2),
            "step_s": None if per_step is None else round(per_step, 5),
            "chunk_seconds": chunk_times,
            "tokens_per_s": None if not per_step else round(tokens / per_step),
            "runs": [{"lr": lrs[r], "seed": run_seeds[r], "stopped_epoch": stopped[r],
                      "curve": curves[r]} for r in range(R)]}


def state_identity(name, width, args, lrs, run_seeds) -> dict:
    """What a saved cell must share with the command that resumes it."""
    return {"model": name, "width": width, "task": task_config(args), "lrs": list(lrs),
            "run_seeds": list(run_seeds), "max_epochs": args.max_epochs,
            "eval_every": args.eval_every}


def restore_cell(prefix, saved, identity, template):
    """(params, opt_state), step, train_s, curves, stopped, calls, chunk times of a saved cell
    (states saved before chunk times were kept: []); raises
    ValueError when it was saved by another setup (a silent restart would mix two runs)."""
    import jax
    import jax.numpy as jnp
    meta, leaves = saved
    identity = json.loads(json.dumps(identity))   # as saved: tuples become lists
    if meta["identity"] != identity:
        diff = sorted(k for k in identity if meta["identity"].get(k) != identity[k])
        raise ValueError(f"{prefix}.state.*: saved by another setup (differs in {diff}); "
                         "remove it or use another --state-dir")
    want = jax.tree.leaves(template)
    if len(leaves) != len(want) or any(a.shape != b.shape or a.dtype != b.dtype
                                       for a, b in zip(leaves, want)):
        raise ValueError(f"{prefix}.state.*: its arrays do not match this cell's runs")
    state = jax.tree.unflatten(jax.tree.structure(template), [jnp.asarray(x) for x in leaves])
    return (state, meta["step"], meta["train_s"], meta["curves"], meta["stopped"],
            meta["calls"], meta.get("chunk_times", []))


def kernel_tuning_changes() -> dict[str, Any]:
    """The GPU kernels' launch parameters that differ from their defaults in this process
    ($GSA_PALLAS_TUNING): speed only, the math is the same, so cells of other tunings merge."""
    import dataclasses
    from pallas_kernels import gla as kernels
    now, default = (dataclasses.asdict(t) for t in (kernels.current_tuning(), kernels.Tuning()))
    return {k: v for k, v in now.items() if v != default[k]}


# ------------------------------------------------------------------ main
def main(argv=None) -> int:
    import concurrent.futures
    args = parse_args(argv)
    common.enable_compilation_cache(args.compile_cache)
    import jax
    tag = args.tag or jax.default_backend()
    record = {"tag": tag, "config": task_config(args), "cells": [],
              "commands": [common.command_line(argv, __file__)], "notes": NOTES}
    reports = [json.loads(open(path).read()) for path in args.merge_files]
    if args.merge_only and reports:   # the settings are those of the reports merged, and so
        record["config"] = reports[0]["config"]   # is the machine
        if "environment" in reports[0]:
            record["environment"] = reports[0]["environment"]
    for report in reversed(reports):   # reports of other calls (other GPU calls' $OUT);
        record = merge(report, record)   # later files win
    previous = harness.read_report(tag, NAME, args.out_dir) if args.merge else None
    if previous is not None:
        record = merge(previous, record)
    cells = [] if args.merge_only else [(m, D) for D in args.widths for m in args.models]
    R = len(args.lr) * args.seeds
    seeds = (f"{args.seeds}" if not args.first_seed else
             f"{args.seeds} (from seed {args.first_seed})")
    print(f"MQAR, authors' setup: {len(cells)} cells x {R} runs (lrs {args.lr} x {seeds} "
          f"seeds), {steps_per_epoch(args)} steps/epoch, cap {args.max_epochs} epochs, cell "
          f"budget {args.cell_seconds} s, on {jax.devices()[0].device_kind}", flush=True)
    start = time.perf_counter()
    # Workers prepare (init and compile) the next cells while the current one trains: on a
    # GPU a compile (~20-45 s) is about a cell's training time.
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, args.compile_ahead))
    shapes = data_shapes(args)
    pending = {i: pool.submit(prepare_cell, m, D, args, shapes)
               for i, (m, D) in enumerate(cells[:max(1, args.compile_ahead)])}
    try:
        data = make_data(args) if cells else None
        print(f"data: {time.perf_counter() - start:.1f} s", flush=True)
        for i, (m, D) in enumerate(cells):
            prepared = pending.pop(i).result()
            if args.call_deadline is not None and time.perf_counter() >= args.call_deadline:
                left = ", ".join(f"{LABELS[n].strip()} D={w}" for n, w in cells[i:])
                print(f"--call-seconds spent: not started in this call: {left}", flush=True)
                break
            nxt = i + max(1, args.compile_ahead)
            if nxt < len(cells) and nxt not in pending:
                pending[nxt] = pool.submit(prepare_cell, *cells[nxt], args, shapes)
            cell = train_cell(m, D, args, data, prepared=prepared)
            s = summarise(cell, args.vocab_size)
            print(f"{LABELS[m]:>9} D={D:<4} {fmt_cell(s):>18} % (lr {s['lr']})  "
                  f"{cell['epochs_done']:g} epochs ({cell['stop_reason']}); init + compile "
                  f"{cell['compile_s']:.1f} s (overlapping), train {cell['train_s']:.1f} s, "
                  f"{cell['step_s']} s/step, {cell['tokens_per_s']} tokens/s (the runs training)",
                  flush=True)
            record["cells"] = [c for c in record["cells"] if (c["model"], c["width"]) != (m, D)]
            record["cells"].append(cell)
            record["elapsed_s"] = round(time.perf_counter() - start, 1)
            finish(record)
            common.write_results(tag, NAME, record, markdown(record), out_dir=args.out_dir,
                                 command=record["commands"][-1])
    finally:
        for future in pending.values():
            future.cancel()
        pool.shutdown(wait=True)
    finish(record)
    common.write_and_print(tag, NAME, record, markdown(record), fig=plot(record),
                           command=record["commands"][-1], out_dir=args.out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
