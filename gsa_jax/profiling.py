"""A profiler window over training steps (`logging.profile_steps: [first, last]`).

    window.start(step)   before dispatching `step`: starts a jax.profiler trace at `first`
    window.step(step)    the trace annotation of one train step (TensorBoard's step view)
    window.stop(step, x) after dispatching `step`: at `last`, waits for x and ends the trace

The trace goes to <directory>/plugins/profile/<time>/: <host>.xplane.pb (TensorBoard's
profile plugin or XProf: `tensorboard --logdir <directory>`), <host>.trace.json.gz and
perfetto_trace.json.gz (drop the file on https://ui.perfetto.dev). Every process traces its
own devices into its own <host> files.
"""

from __future__ import annotations

import contextlib
import pathlib
from typing import Optional, Sequence

import jax


class ProfileWindow:
    def __init__(self, steps: Optional[Sequence[int]], directory: pathlib.Path):
        self.first, self.last = steps if steps else (None, None)
        self.directory = pathlib.Path(directory)
        self.active = False
        self.done = False

    def start(self, step: int) -> None:
        """Starts the trace when `step` is in the window (also when a resumed run starts
        inside it)."""
        if self.first is None or self.active or self.done:
            return
        if self.first <= step <= self.last:
            self.directory.mkdir(parents=True, exist_ok=True)
            jax.profiler.start_trace(str(self.directory), create_perfetto_trace=True)
            self.active = True

    def step(self, step: int):
        if not self.active:
            return contextlib.nullcontext()
        return jax.profiler.StepTraceAnnotation("train", step_num=step)

    def stop(self, step: int, outputs) -> bool:
        """Ends the trace after `step` = last, once `outputs` are computed; True if it did."""
        if not self.active or step < self.last:
            return False
        jax.block_until_ready(outputs)
        self.close()
        return True

    def close(self) -> None:
        """Ends a running trace (the loop stopped inside the window)."""
        if self.active:
            jax.profiler.stop_trace()
            self.active, self.done = False, True
