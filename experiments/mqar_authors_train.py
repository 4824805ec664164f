"""Training for MQAR as the GSA authors ran it (experiments/mqar_authors.py): the fixed data
set, and one cell's runs (lr x seed) stacked and trained at once: the vmapped chunk of
--eval-every steps with early-stop freezing, the stacked initialisation, and the compiled cell.
The loop over chunks (train_cell) is in mqar_authors.py.
"""

from __future__ import annotations

import os
import time
from typing import Any

from experiments.mqar_models import build


def steps_per_epoch(args) -> int:
    """Full batches per pass over the training set (the last partial batch is dropped)."""
    return args.train_examples // args.batch_size


def task(args):
    from gsa_jax.data.mqar import MQARConfig
    return MQARConfig(vocab_size=args.vocab_size, seq_len=args.seq_len,
                      num_kv_pairs=args.kv_pairs, power_a=args.power_a, random_non_queries=False)


# ------------------------------------------------------------------ data
def datasets(args):
    """(training, held-out) `MQARData` of the task, drawn from seeds of args.data_seed."""
    from gsa_jax.data.mqar import generate
    return (generate(task(args), args.train_examples, seed=args.data_seed * 1_000_003),
            held_out_set(args))


def held_out_set(args):
    """The held-out `MQARData` alone (datasets()'s second; no training set drawn)."""
    from gsa_jax.data.mqar import generate
    return generate(task(args), args.test_examples, seed=args.data_seed * 1_000_003 + 1)


def make_data(args) -> dict:
    """Training set x, y [N, T] and the held-out set [n_batches, B, T] (padded to whole batches
    with rows whose labels are all IGNORE), int32 on the device."""
    import jax.numpy as jnp
    import numpy as np
    from gsa_jax.data.mqar import IGNORE

    B = args.batch_size
    train, test = datasets(args)
    pad = -args.test_examples % B
    tx = np.concatenate([test.inputs, np.zeros((pad, args.seq_len), np.int32)])
    ty = np.concatenate([test.labels, np.full((pad, args.seq_len), IGNORE, np.int32)])
    return {"train": (jnp.asarray(train.inputs), jnp.asarray(train.labels)),
            "test": (jnp.asarray(tx.reshape(-1, B, args.seq_len)),
                     jnp.asarray(ty.reshape(-1, B, args.seq_len)))}


# ------------------------------------------------------------------ training
def make_chunk(model, args):
    """chunk(params, opt_state, frozen, lr, key, step0, horizon, train, test) -> (params,
    opt_state, mean training loss of the chunk, held-out accuracy), for ONE run (unjitted; `vmap`
    it over runs). args.eval_every steps from step0 in a `lax.scan`.

    params/opt_state: one run's pytrees; frozen: bool scalar, True keeps params and opt_state
    (early stop); lr: peak lr (float32 scalar); key: the run's PRNG key (shuffle: fold_in(key,
    epoch); dropout: fold_in(fold_in(key, -1 mod 2^32), step)); step0, horizon: int32 scalars;
    train: (x, y) [N, T]; test: (x, y) [n_batches, B, T]. The lr at step t is
    lr · ½(1 + cos(π min(t, horizon) / horizon)): cosine to 0 at `horizon` (an input, so the
    cell can fit it to its time budget without a recompile)."""
    import jax
    import jax.numpy as jnp
    import optax
    from gsa_jax.data.mqar import IGNORE
    from gsa_jax.optim import loss_sums

    B, S, E = args.batch_size, args.eval_every, steps_per_epoch(args)
    tx = optimizer(args)

    def queries(y_BT):
        """(positions [B, P], labels [B, P], mask [B, P]) of the labelled positions: every MQAR
        row has P = kv_pairs of them (padding rows none: mask False)."""
        mask_BT = y_BT != IGNORE
        where_BP = jnp.argsort(~mask_BT, axis=1, stable=True)[:, :args.kv_pairs]
        y_BP = jnp.take_along_axis(y_BT, where_BP, axis=1)
        return where_BP, jnp.where(y_BP == IGNORE, 0, y_BP), y_BP != IGNORE

    def loss_fn(params, x, y, key):
        where, y, mask = queries(y)
        logits = model.apply({"params": params}, x, train=True, where_BP=where,
                             rngs={"dropout": key})
        sums = loss_sums(logits, y, mask)
        return sums.ce / jnp.maximum(sums.count, 1.0)

    grad_fn = jax.value_and_grad(loss_fn)

    def chunk(params, opt_state, frozen, lr, key, step0, horizon, train, test):
        train_x, train_y = train
        drop_key = jax.random.fold_in(key, 2 ** 32 - 1)
        N = train_x.shape[0]
        epoch0 = step0 // E
        # The chunk spans at most two epochs (eval_every <= E): both orders drawn once here.
        perms = jnp.stack([jax.random.permutation(jax.random.fold_in(key, epoch0 + i), N)
                           for i in range(2)])

        def step(carry, i):
            params, opt_state = carry
            t = step0 + i
            order = perms[t // E - epoch0]
            rows = jax.lax.dynamic_slice_in_dim(order, (t % E) * B, B)
            loss, grads = grad_fn(params, train_x[rows], train_y[rows],
                                  jax.random.fold_in(drop_key, t))
            updates, new_opt = tx.update(grads, opt_state, params)
            frac = jnp.minimum(t, horizon) / horizon
            scale = lr * 0.5 * (1 + jnp.cos(jnp.pi * frac))
            new_params = optax.apply_updates(
                params, jax.tree.map(lambda u: (scale * u).astype(u.dtype), updates))
            keep = lambda old, new: jax.tree.map(lambda a, b: jnp.where(frozen, a, b), old, new)
            return (keep(params, new_params), keep(opt_state, new_opt)), loss

        (params, opt_state), losses = jax.lax.scan(step, (params, opt_state), jnp.arange(S))

        def correct(xy):
            x, y = xy
            where, y, mask = queries(y)
            pred = jnp.argmax(model.apply({"params": params}, x, where_BP=where), axis=-1)
            return jnp.sum((pred == y) & mask), jnp.sum(mask)

        hits, count = jax.lax.map(correct, test)
        return params, opt_state, jnp.mean(losses), jnp.sum(hits) / jnp.maximum(jnp.sum(count), 1)

    return chunk


def optimizer(args):
    """AdamW at lr 1 (torch's defaults, Zoology's weight decay on every parameter, no
    clipping): its update is linear in the lr, so the chunk scales it by each run's lr."""
    import optax
    return optax.adamw(1.0, b1=0.9, b2=0.999, eps=1e-8, weight_decay=args.weight_decay)


def init_runs(model, args, seeds: list[int], runs_seed: list[int]):
    """Parameters and optimizer states of the runs, stacked [R, ...]: run r starts from the
    initialisation of seed runs_seed[r] (all lrs of a seed share it)."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    dummy = jnp.zeros((1, args.seq_len), jnp.int32)
    init = jax.vmap(lambda k: nn.meta.unbox(model.init({"params": k}, dummy)["params"]))
    keys = jax.vmap(jax.random.key)(jnp.asarray(seeds, jnp.uint32))
    by_seed = init(keys)
    index = jnp.asarray([seeds.index(s) for s in runs_seed])
    params = jax.tree.map(lambda a: a[index], by_seed)
    opt_state = jax.vmap(optimizer(args).init)(params)
    return params, opt_state


def seed_range(args) -> list[int]:
    """The seeds of this process's runs: args.first_seed .. args.first_seed + args.seeds - 1 (a
    run depends on its own seed only, so seeds may be trained as separate parts of a cell)."""
    first = getattr(args, "first_seed", 0)
    return list(range(first, first + args.seeds))


def run_grid(args) -> tuple[list[float], list[int]]:
    """(lr, seed) of each run r, seed-major: R = len(lrs) x seeds."""
    pairs = [(lr, s) for s in seed_range(args) for lr in args.lr]
    return [lr for lr, _ in pairs], [s for _, s in pairs]


def prepare_cell(name: str, width: int, args, shapes) -> dict[str, Any]:
    """Builds, initialises (stacked runs) and compiles one cell's vmapped chunk for data of
    `shapes` (make_data's, or ShapeDtypeStructs). Thread-safe: main() prepares the next cell
    while one trains, so compiles overlap training."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    t0 = time.perf_counter()
    model = build(name, width, args)
    lrs, run_seeds = run_grid(args)
    params, opt_state = init_runs(model, args, seed_range(args), run_seeds)
    keys = jax.vmap(lambda s: jax.random.fold_in(jax.random.key(s), 1))(jnp.asarray(run_seeds))
    vchunk = jax.jit(jax.vmap(make_chunk(model, args),
                              in_axes=(0, 0, 0, 0, 0, None, None, None, None)),
                     donate_argnums=(0, 1))
    lr_R = jnp.asarray(lrs, jnp.float32)
    compiled_by_runs = {}
    # one run's argument shapes (the arrays themselves are donated to the first chunk)
    per_run = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype),
                           (params, opt_state, jnp.zeros((1,), bool), lr_R, keys))

    def compile_for(runs: int):
        """The vmapped chunk compiled for `runs` stacked runs (a cell whose early-stopped runs
        are left out runs fewer; compiled once per count, on first use)."""
        if runs not in compiled_by_runs:
            stacked = jax.tree.map(
                lambda a: jax.ShapeDtypeStruct((runs, *a.shape), a.dtype), per_run)
            compiled_by_runs[runs] = vchunk.lower(
                *stacked, jnp.int32(0), jnp.int32(1), *shapes).compile()
        return compiled_by_runs[runs]

    compiled = compile_for(len(lrs))
    return {"name": name, "width": width, "lrs": lrs, "run_seeds": run_seeds, "params": params,
            "opt_state": opt_state, "keys": keys, "lr_R": lr_R, "compiled": compiled,
            "compile_for": compile_for,
            "num_params": sum(int(np.prod(x.shape[1:])) for x in jax.tree.leaves(params)),
            "compile_s": time.perf_counter() - t0}



def data_shapes(args) -> tuple:
    """ShapeDtypeStructs of make_data's (train, test), to compile before the data exist."""
    import jax
    import jax.numpy as jnp
    B, T = args.batch_size, args.seq_len
    row = jax.ShapeDtypeStruct((args.train_examples, T), jnp.int32)
    test = jax.ShapeDtypeStruct((-(-args.test_examples // B), B, T), jnp.int32)
    return (row, row), (test, test)


# ------------------------------------------------------------------ pause / resume
def state_files(prefix: str) -> list[str]:
    """The parts of a saved cell state, in order (prefix.state.000, .001, ...)."""
    import glob
    return sorted(glob.glob(glob.escape(prefix) + ".state.[0-9][0-9][0-9]"))


def save_cell_state(prefix: str, meta: dict, leaves: list, part_mb: float) -> list[str]:
    """Writes `leaves` (arrays) and `meta` (JSON-able) as one .npz split into parts of at most
    part_mb MiB: prefix.state.000, ... (a part is written under a temporary name, then renamed;
    parts of an earlier, longer state are removed). Returns the paths."""
    import io
    import json as json_
    import numpy as np
    buf = io.BytesIO()
    np.savez(buf, meta=np.frombuffer(json_.dumps(meta).encode(), np.uint8),
             **{f"leaf{i:05d}": np.asarray(x) for i, x in enumerate(leaves)})
    data, size = buf.getvalue(), max(1, int(part_mb * 2 ** 20))
    os.makedirs(os.path.dirname(prefix) or ".", exist_ok=True)
    paths = []
    for i, start in enumerate(range(0, len(data), size)):
        path = f"{prefix}.state.{i:03d}"
        with open(path + ".tmp", "wb") as f:
            f.write(data[start:start + size])
        os.replace(path + ".tmp", path)
        paths.append(path)
    for stale in state_files(prefix)[len(paths):]:
        os.remove(stale)
    return paths


def load_cell_state(prefix: str):
    """(meta, leaves) of a state save_cell_state wrote, or None when there is none."""
    import io
    import json as json_
    import numpy as np
    paths = state_files(prefix)
    if not paths:
        return None
    data = b"".join(open(p, "rb").read() for p in paths)
    with np.load(io.BytesIO(data)) as z:
        meta = json_.loads(bytes(z["meta"]).decode())
        leaves = [z[f"leaf{i:05d}"] for i in range(len(z.files) - 1)]
    return meta, leaves

