"""The training loop: data → jitted sharded train step → logging, evaluation, checkpoints.

    state = restore latest checkpoint of run_dir (params, optimizer, step, data position) or init
    for step in [state.step, config.steps):
        state, metrics = train_step(state, next batch)
        every logging.every: loss, lr, grad norm, tokens/s, MFU → progress bar + metrics.jsonl
        every eval.every: validation loss / perplexity
        every checkpoint.every: save (async)
    at the end: save, evaluate, print a sample

Only process 0 prints and writes files; every process runs the steps and the checkpoint saves
(orbax coordinates the writes).
"""

from __future__ import annotations

import json
import logging
import math
import pathlib
import time
from typing import Any, Optional

import jax
import numpy as np

from gsa_jax import session as session_lib
from gsa_jax import sharding as shd
from gsa_jax import steps
from gsa_jax.config import Config, dump_yaml
from gsa_jax.data import PackedBatches, load_tokenizer
from gsa_jax.evaluate import evaluate, validation_batches
from gsa_jax.flops import peak_flops, train_flops_per_token

log = logging.getLogger(__name__)


class MetricsWriter:
    """Appends metric dicts to <run_dir>/metrics.jsonl (and TensorBoard if available)."""

    def __init__(self, run_dir: pathlib.Path, config, enabled: bool):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.tb = None
        if enabled and config.tensorboard:
            try:
                from tensorboardX import SummaryWriter  # optional
                self.tb = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:
                pass
        self.jsonl = enabled and config.jsonl

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        if self.jsonl:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.tb.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _progress(total: int, initial: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)


def _say(bar, message: str) -> None:
    if bar is not None:
        bar.write(message)
    else:
        print(message, flush=True)


def _summary(step: int, train: dict, val: dict) -> str:
    line = (f"step {step:6d}  train loss {train.get('loss', math.nan):.4f}  "
            f"val loss {val['val_loss']:.4f}  val ppl {val['val_ppl']:.2f}")
    if "tokens_per_s" in train:
        line += f"  {train['tokens_per_s']:,.0f} tok/s"
    if "mfu" in train:
        line += f"  MFU {100 * train['mfu']:.1f}%"
    return line


def sample_text(session, params, sample_cfg) -> str:
    """Generates a continuation of `sample_cfg.prompt` with the run's tokenizer (one process)."""
    from gsa_jax.generation import generate
    tok = load_tokenizer(session.data.tokenizer, session.data.bos_id)
    prompt = [tok.bos_id] + tok.encode(sample_cfg.prompt)
    params = session_lib.replicated_params(params, session.mesh)
    out = generate(session.model, {"params": params}, [prompt],
                   max_new_tokens=sample_cfg.max_new_tokens,
                   rng=jax.random.key(sample_cfg.seed), temperature=sample_cfg.temperature,
                   top_k=sample_cfg.top_k, top_p=sample_cfg.top_p, stop_tokens=[tok.bos_id])
    n = int(out.lengths[0])
    return sample_cfg.prompt + tok.decode(np.asarray(out.tokens[0, :n]))


def train(config: Config, *, stop_at: Optional[int] = None, devices: Optional[list] = None,
          quiet: bool = False, init_from: Optional[str] = None) -> dict[str, Any]:
    """Trains (resuming from the run directory's latest checkpoint) to `config.steps`.

    stop_at: leave the loop after this step without a final save (an interruption, for tests).
    quiet: no progress bar or printed lines (files are still written).
    init_from: a params checkpoint (`gsa-jax convert` output) whose weights start a fresh run
      (step 0, new optimizer state); the run is evaluated once before its first step. Ignored
      when the run directory already has checkpoints (the run resumes).
    Returns the last train metrics and the final evaluation.
    """
    main = shd.is_main_process()
    if init_from is not None and not pathlib.Path(init_from).is_dir():
        raise FileNotFoundError(f"--init-from: no params checkpoint directory {str(init_from)!r}")
    session = session_lib.build(config, devices=devices)
    cfg, mesh = session.config, session.mesh
    run_dir = pathlib.Path(cfg.run_dir)
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(dump_yaml(cfg))
    try:
        state, meta = session_lib.restore_or_init(session, resume=cfg.checkpoint.resume,
                                                  init_from=init_from)
    except Exception:
        session.checkpointer.close()  # stop orbax's background threads before the error exits
        raise
    initialised = init_from is not None and meta is None
    loader = PackedBatches(session.data.train, batch_size=cfg.data.batch_size,
                           seq_len=cfg.data.seq_len, seed=cfg.data.seed,
                           bos_id=session.data.bos_id)
    if meta is not None:
        loader.load_state_dict(meta["data"])
    start = int(state.step)
    writer = MetricsWriter(run_dir, cfg.logging, main)
    verbose = main and not quiet
    bar = _progress(cfg.steps, start, verbose and cfg.logging.progress)

    num_params = sum(x.size for x in jax.tree.leaves(state.params))
    tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
    flops_per_token = train_flops_per_token(cfg.model, cfg.data.seq_len, num_params)
    peak = peak_flops(jax.devices()[0].device_kind)
    peak_total = None if peak is None else peak * jax.device_count()
    if verbose:
        _say(bar, f"model {cfg.model.mixer} D={cfg.model.hidden_size} L={cfg.model.num_layers}: "
                  f"{num_params:,} parameters, {flops_per_token / 1e6:.1f} MFLOPs/token; "
                  f"mesh {dict(mesh.shape)} on {jax.device_count()} "
                  f"{jax.devices()[0].device_kind} device(s); train "
                  f"{loader.stream.size:,} tokens; "
                  + (f"resumed at step {start}" if meta else
                     f"initialised from {init_from}" if initialised else "fresh start"))
    writer.write({"step": start, "event": "resume" if meta else "start",
                  "params": num_params, "flops_per_token": flops_per_token,
                  **({"init_from": str(init_from)} if initialised else {})})

    def save(step: int) -> None:
        session.checkpointer.save(step, state, {"step": step, "data": loader.state_dict(),
                                                "config": cfg.to_dict()})

    def run_eval(step: int) -> dict:
        if session.data.val is None:
            return {}
        result = evaluate(session.eval_step, state.params, validation_batches(session),
                          mesh)
        writer.write({"step": step, **result})
        return result

    if initialised and cfg.eval.every:
        # The converted model before any finetuning: the start of its validation curve.
        result = run_eval(0)
        if verbose and result:
            _say(bar, f"step      0  val loss {result['val_loss']:.4f}  val ppl "
                      f"{result['val_ppl']:.2f}  (initial weights)")

    last: dict[str, Any] = {}
    timer, timed_steps = None, 0
    last_saved = start if meta is not None else None
    for step in range(start, cfg.steps):
        batch = next(loader)
        state, metrics = session.train_step(state, steps.device_batch(batch, mesh))
        done = step + 1
        if timer is None:
            # The first step compiles: start timing after it.
            jax.block_until_ready(metrics)
            timer, timed_steps = time.perf_counter(), 0
        else:
            timed_steps += 1
        if done % cfg.logging.every == 0 or done == cfg.steps:
            values = {k: float(v) for k, v in jax.device_get(metrics).items()}
            now = time.perf_counter()
            record = {"step": done, "loss": values["loss"], "lr": values["lr"],
                      "grad_norm": values["grad_norm"], "epoch": round(loader.epoch, 4)}
            if cfg.optim.z_loss:
                record["z_loss"] = values["z_loss"]
            if timed_steps:
                tok_s = timed_steps * tokens_per_step / (now - timer)
                record["tokens_per_s"] = tok_s
                if peak_total:
                    record["mfu"] = tok_s * flops_per_token / peak_total
            timer, timed_steps = now, 0
            writer.write(record)
            last = record
            if bar is not None:
                post = {"loss": f"{record['loss']:.3f}"}
                if "tokens_per_s" in record:
                    post["tok/s"] = f"{record['tokens_per_s']:,.0f}"
                if "mfu" in record:
                    post["mfu"] = f"{100 * record['mfu']:.1f}%"
                bar.set_postfix(post, refresh=False)
        if bar is not None:
            bar.update(1)
        if stop_at is not None and done >= stop_at:
            break
        paused = False
        if cfg.eval.every and done % cfg.eval.every == 0 and done < cfg.steps:
            result = run_eval(done)
            if verbose and result:
                _say(bar, _summary(done, last, result))
            paused = True
        if cfg.checkpoint.every and done % cfg.checkpoint.every == 0 and done < cfg.steps:
            save(done)
            last_saved = done
            paused = True
        if paused and timer is not None:
            timer, timed_steps = time.perf_counter(), 0

    done = int(state.step)
    final: dict[str, Any] = dict(last)
    if stop_at is None or done >= cfg.steps:
        if last_saved != done:
            save(done)
        result = run_eval(done)
        final.update(result)
        if verbose and result:
            _say(bar, _summary(done, last, result) + "  (final)")
    session.checkpointer.wait()
    if bar is not None:
        bar.close()
    if (verbose and cfg.sample.max_new_tokens and (stop_at is None or done >= cfg.steps)
            and jax.process_count() == 1):
        text = sample_text(session, state.params, cfg.sample)
        print(f"--- sample (prompt {cfg.sample.prompt!r}, temperature "
              f"{cfg.sample.temperature}) ---\n{text}\n---", flush=True)
        final["sample"] = text
    writer.close()
    session.checkpointer.close()
    final["state"] = state
    return final
