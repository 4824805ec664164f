"""The training loop: data → jitted sharded train step → logging, evaluation, checkpoints.

    state = restore the newest intact checkpoint of run_dir (params, optimizer, step, data
            position) or init                                  (reads only; checks first)
    take the run directory's lock, write config.yaml
    for step in [state.step, config.steps):
        state, metrics = train_step(state, next batch)       (dispatched; runs on the device)
        every logging.every: loss, lr, grad norm, tokens/s, MFU → progress bar + metrics.jsonl,
                             fetched after the next step is dispatched, so that the host never
                             stalls the device; a non-finite loss or grad norm stops the run
        logging.profile_steps [first, last]: a jax.profiler trace of those steps
        every eval.every: validation loss / perplexity
        every checkpoint.every: save (async), after checking that step's metrics are finite
    at the end: save, evaluate, print a sample

Only process 0 prints and writes files; every process runs the steps and the checkpoint saves
(orbax coordinates the writes).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import pathlib
import time
from typing import Any, Iterator, Optional

import jax
import numpy as np

from gsa_jax import run_lock
from gsa_jax import session as session_lib
from gsa_jax import sharding as shd
from gsa_jax import steps
from gsa_jax.config import Config, dump_yaml
from gsa_jax.data import PackedBatches
from gsa_jax.errors import RunError
from gsa_jax.evaluate import evaluate, validation_batches
from gsa_jax.flops import peak_flops, train_flops_per_token
from gsa_jax.generation import sample_text
from gsa_jax.profiling import ProfileWindow

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
    line = f"step {step:6d}  "
    if "loss" in train:
        line += f"train loss {train['loss']:.4f}  "
    line += f"val loss {val['val_loss']:.4f}  val ppl {val['val_ppl']:.2f}"
    if "tokens_per_s" in train:
        line += f"  {train['tokens_per_s']:,.0f} tok/s"
    if "mfu" in train:
        line += f"  MFU {100 * train['mfu']:.1f}%"
    return line


class TrainingDiverged(RunError):
    """The train loss or gradient norm became NaN or infinite."""


def _finite_or_stop(step: int, values: dict, last_saved: Optional[int], ckpt_dir) -> None:
    """TrainingDiverged when step `step`'s loss or gradient norm is not finite."""
    bad = [f"{k} {values[k]}" for k in ("loss", "grad_norm") if not math.isfinite(values[k])]
    if bad:
        kept = (f"the last checkpoint is step {last_saved} in {ckpt_dir}" if last_saved is not None
                else "no checkpoint was saved")
        raise TrainingDiverged(f"step {step}: non-finite {', '.join(bad)}; training stopped "
                               f"without saving this state ({kept}). Lower optim.lr, or check "
                               f"the data and the model config")


def _read_metrics(path: pathlib.Path) -> list[dict]:
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:  # a line cut by a kill: the records around it still count
            continue
    return records


def _check_run_dirs(config: Config) -> None:
    for name, path in (("run_dir", pathlib.Path(config.run_dir)),
                       ("checkpoint.directory", session_lib.checkpoint_dir(config))):
        if path.exists() and not path.is_dir():
            raise ValueError(f"{name} {str(path)!r} exists and is not a directory")


@contextlib.contextmanager
def _run_dir_lock(run_dir: pathlib.Path, main: bool) -> Iterator[None]:
    """Process 0 holds the run directory's lock; every process learns whether it got it."""
    error = None
    with contextlib.ExitStack() as stack:
        if main:
            try:
                stack.enter_context(run_lock.locked(run_dir))
            except run_lock.RunDirLocked as err:
                error = err
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            ok = multihost_utils.broadcast_one_to_all(np.int32(error is None))
            if not ok and error is None:
                error = run_lock.RunDirLocked(f"process 0 could not lock {run_dir}")
        if error is not None:
            raise error
        yield


def _open(session, init_from: Optional[str]):
    """(state, meta, loader): the restored or fresh state and the data position it goes with."""
    cfg = session.config
    state, meta = session_lib.restore_or_init(session, resume=cfg.checkpoint.resume,
                                              init_from=init_from)
    loader = PackedBatches(session.data.train, batch_size=cfg.data.batch_size,
                           seq_len=cfg.data.seq_len, seed=cfg.data.seed,
                           bos_id=session.data.bos_id)
    if meta is not None:
        loader.load_state_dict(meta["data"])
    return state, meta, loader


def train(config: Config, *, stop_at: Optional[int] = None, devices: Optional[list] = None,
          quiet: bool = False, init_from: Optional[str] = None) -> dict[str, Any]:
    """Trains (resuming from the run directory's latest checkpoint) to `config.steps`.

    stop_at: leave the loop after this step without a final save (an interruption, for tests).
    quiet: no progress bar or printed lines (files are still written).
    init_from: a params checkpoint (`gsa-jax convert` output) whose weights start a fresh run
      (step 0, new optimizer state); the run is evaluated once before its first step. Ignored
      when the run directory already has checkpoints (the run resumes).

    Nothing is written to the run directory until the run is known to start (config, data,
    checkpoint and shape checks passed); then process 0 takes the directory's lock
    (`run_lock`: a second trainer is refused) and writes config.yaml. A damaged newest
    checkpoint is skipped for the newest intact one and renamed `<step>.corrupt`. A run already
    trained to `config.steps` only evaluates and says so. A NaN or infinite loss or gradient
    norm stops the run with TrainingDiverged, saving nothing of that state.
    Returns the last train metrics and the final evaluation.
    """
    main = shd.is_main_process()
    if init_from is not None and not pathlib.Path(init_from).is_dir():
        raise FileNotFoundError(f"--init-from: no params checkpoint directory {str(init_from)!r}")
    _check_run_dirs(config)
    session = session_lib.build(config, devices=devices, read_only=True)

    def finished(state) -> bool:
        return int(state.step) >= session.config.steps and stop_at is None

    try:
        state, meta, loader = _open(session, init_from)
        if finished(state):
            return _finished(session, state, quiet)
        with _run_dir_lock(pathlib.Path(config.run_dir), main):
            skipped = list(session.checkpointer.skipped)
            intact = [s for s in session.checkpointer.all_steps() if s not in dict(skipped)]
            if main:
                for step, _ in skipped:  # out of the way of this run's own save of that step
                    moved = session.checkpointer.set_aside(step)
                    log.warning("moved the unreadable checkpoint step %d to %s", step, moved)
            if jax.process_count() > 1:  # the others list the steps after the renames
                from jax.experimental import multihost_utils
                multihost_utils.sync_global_devices("gsa_jax.train: checkpoints set aside")
            session_lib.open_for_writing(session)
            if session.checkpointer.all_steps() != intact:
                # Another trainer saved between our read and our lock: start from its state.
                state, meta, loader = _open(session, init_from)
                if finished(state):
                    return _finished(session, state, quiet)
            return _loop(session, state, meta, loader, stop_at=stop_at, quiet=quiet,
                         init_from=init_from, skipped=skipped)
    finally:
        session.checkpointer.close()  # stop orbax's background threads, also on errors


def _finished(session, state, quiet: bool) -> dict[str, Any]:
    """A run already trained to `steps`: say so, evaluate the final state, write nothing."""
    cfg = session.config
    done = int(state.step)
    records = _read_metrics(pathlib.Path(cfg.run_dir) / "metrics.jsonl")
    last = next((r for r in reversed(records) if "loss" in r), {})
    verbose = shd.is_main_process() and not quiet
    if verbose:
        print(f"{cfg.run_dir} is already trained to step {done} (steps = {cfg.steps}): nothing "
              f"to train; raise `steps` to continue", flush=True)
    final: dict[str, Any] = dict(last)
    if session.data.val is not None:
        result = evaluate(session.eval_step, state.params, validation_batches(session),
                          session.mesh)
        final.update(result)
        if verbose:
            print(_summary(done, {k: last[k] for k in ("loss",) if k in last}, result)
                  + "  (final)", flush=True)
    final.update(state=state, finished=True)
    return final


def _loop(session, state, meta, loader, *, stop_at, quiet, init_from, skipped) -> dict[str, Any]:
    """The training loop of `train`, under the run directory's lock."""
    main = shd.is_main_process()
    cfg, mesh = session.config, session.mesh
    run_dir = pathlib.Path(cfg.run_dir)
    initialised = init_from is not None and meta is None
    if main:
        (run_dir / "config.yaml").write_text(dump_yaml(cfg))
    start = int(state.step)
    writer = MetricsWriter(run_dir, cfg.logging, main)
    verbose = main and not quiet
    bar = _progress(cfg.steps, start, verbose and cfg.logging.progress)

    num_params = sum(x.size for x in jax.tree.leaves(state.params))
    tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
    flops_per_token = train_flops_per_token(cfg.model, cfg.data.seq_len, num_params)
    peak = peak_flops(jax.devices()[0].device_kind)
    peak_total = None if peak is None else peak * jax.device_count()
    event: dict[str, Any] = {"step": start, "event": "resume" if meta else "start",
                             "params": num_params, "flops_per_token": flops_per_token}
    if initialised:
        event["init_from"] = str(init_from)
    if meta:
        # Steps an interrupted run logged after its last checkpoint are trained and logged again
        # below: say so, so that a reader keeps the later records.
        logged = [r["step"] for r in _read_metrics(writer.path) if "loss" in r]
        if logged and max(logged) > start:
            event["replays_steps"] = [start + 1, max(logged)]
        if skipped:
            event["skipped_checkpoints"] = [{"step": s, "why": why} for s, why in skipped]
    if verbose:
        how = (f"resumed at step {start}" if meta else
               f"initialised from {init_from}" if initialised else "fresh start")
        if "replays_steps" in event:
            how += " (steps {}-{} logged before the interruption are repeated)".format(
                *event["replays_steps"])
        _say(bar, f"model {cfg.model.mixer} D={cfg.model.hidden_size} L={cfg.model.num_layers}: "
                  f"{num_params:,} parameters, {flops_per_token / 1e6:.1f} MFLOPs/token; "
                  f"mesh {dict(mesh.shape)} on {jax.device_count()} "
                  f"{jax.devices()[0].device_kind} device(s); train "
                  f"{loader.stream.size:,} tokens; " + how)
    writer.write(event)

    last_saved = start if meta is not None else None
    checked = {"step": None}   # the last step whose metrics were checked for finiteness

    def check(step: int, metrics) -> dict:
        """Fetches step `step`'s metrics (a device sync) and stops on a non-finite value."""
        values = {k: float(v) for k, v in jax.device_get(metrics).items()}
        _finite_or_stop(step, values, last_saved, session.checkpoint_dir)
        checked["step"] = step
        return values

    def save(step: int, metrics) -> None:
        if checked["step"] != step:
            check(step, metrics)
        session.checkpointer.save(step, state, {"step": step, "data": loader.state_dict(),
                                                "config": cfg.to_dict()})

    def run_eval(step: int) -> dict:
        if session.data.val is None:
            return {}
        result = evaluate(session.eval_step, state.params, validation_batches(session),
                          mesh)
        writer.write({"step": step, **result})
        return result

    try:
        if initialised and cfg.eval.every:
            # The converted model before any finetuning: the start of its validation curve.
            result = run_eval(0)
            if verbose and result:
                _say(bar, f"step      0  val loss {result['val_loss']:.4f}  val ppl "
                          f"{result['val_ppl']:.2f}  (initial weights)")

        last: dict[str, Any] = {}
        metrics = None
        # Timing starts after the first step (it compiles): tokens/s over the steps completed
        # between timer[0] (a time) and a metrics fetch, counted from timer[1] (a step).
        timer: Optional[tuple[float, int]] = None
        # A logged step whose metrics are fetched only after the next step is dispatched, so
        # that the host never waits for the device between steps: (step, metrics, epoch).
        pending: Optional[tuple[int, Any, float]] = None

        def log_pending() -> None:
            nonlocal pending, timer, last
            if pending is None:
                return
            logged, logged_metrics, epoch = pending
            pending = None
            values = check(logged, logged_metrics)
            now = time.perf_counter()
            record = {"step": logged, "loss": values["loss"], "lr": values["lr"],
                      "grad_norm": values["grad_norm"], "epoch": round(epoch, 4)}
            if cfg.optim.z_loss:
                record["z_loss"] = values["z_loss"]
            if timer is not None and logged > timer[1]:
                tok_s = (logged - timer[1]) * tokens_per_step / (now - timer[0])
                record["tokens_per_s"] = tok_s
                if peak_total:
                    record["mfu"] = tok_s * flops_per_token / peak_total
            if timer is not None:
                timer = (now, logged)
            writer.write(record)
            last = record
            if bar is not None:
                post = {"loss": f"{record['loss']:.3f}"}
                if "tokens_per_s" in record:
                    post["tok/s"] = f"{record['tokens_per_s']:,.0f}"
                if "mfu" in record:
                    post["mfu"] = f"{100 * record['mfu']:.1f}%"
                bar.set_postfix(post, refresh=False)

        profile = ProfileWindow(cfg.logging.profile_steps, run_dir / "profile")
        try:
            for step in range(start, cfg.steps):
                done = step + 1
                profile.start(done)
                batch = next(loader)
                with profile.step(done):
                    state, metrics = session.train_step(state, steps.device_batch(batch, mesh))
                if timer is None:
                    jax.block_until_ready(metrics)
                    timer = (time.perf_counter(), done)
                log_pending()   # the previous logged step's metrics, while this step runs
                if done % cfg.logging.every == 0 or done == cfg.steps:
                    pending = (done, metrics, loader.epoch)
                paused = False
                if profile.stop(done, metrics):
                    paused = True
                    if verbose:
                        _say(bar, f"profile of steps {profile.first}-{done} written to "
                                  f"{profile.directory} (see the README: reading a profile)")
                    writer.write({"step": done, "event": "profile",
                                  "steps": [profile.first, done],
                                  "directory": str(profile.directory)})
                if bar is not None:
                    bar.update(1)
                if stop_at is not None and done >= stop_at:
                    break
                if cfg.eval.every and done % cfg.eval.every == 0 and done < cfg.steps:
                    log_pending()
                    if checked["step"] != done:
                        check(done, metrics)
                    result = run_eval(done)
                    if verbose and result:
                        _say(bar, _summary(done, last, result))
                    paused = True
                if cfg.checkpoint.every and done % cfg.checkpoint.every == 0 and done < cfg.steps:
                    log_pending()
                    save(done, metrics)
                    last_saved = done
                    paused = True
                if paused and timer is not None:
                    timer = (time.perf_counter(), done)
            log_pending()
        finally:
            profile.close()

        done = int(state.step)
        final: dict[str, Any] = dict(last)
        if stop_at is None or done >= cfg.steps:
            if last_saved != done:
                save(done, metrics)
            result = run_eval(done)
            final.update(result)
            if verbose and result:
                _say(bar, _summary(done, last, result) + "  (final)")
        session.checkpointer.wait()
    finally:
        if bar is not None:
            bar.close()
        writer.close()
        session.checkpointer.wait()  # a good checkpoint already being written is completed
    if (verbose and cfg.sample.max_new_tokens and (stop_at is None or done >= cfg.steps)
            and jax.process_count() == 1):
        text = sample_text(session, state.params, cfg.sample)
        print(f"--- sample (prompt {cfg.sample.prompt!r}, temperature "
              f"{cfg.sample.temperature}) ---\n{text}\n---", flush=True)
        final["sample"] = text
    final["state"] = state
    return final
