"""Console progress: tqdm bars on a terminal, a compact line every few seconds otherwise.

The loss shown is the latest one that reached the host through the probe readback, so the
display never forces a device sync of its own.
"""
from __future__ import annotations

import sys
import time

from tqdm.auto import tqdm

LINE_EVERY_S = 10.0  # non-terminal output (CI logs, files): one line per this many seconds
# The CPU estimate times steps ESTIMATE_FROM..ESTIMATE_AT: the first steps pay for worker
# start-up and allocator warm-up and would inflate it.
ESTIMATE_FROM, ESTIMATE_AT = 2, 6
# A run estimated longer than this gets a suggestion for a quicker look; a shorter one is
# already a quick look.
QUICK_LOOK_S = 600.0


def format_duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


class Progress:
    def __init__(self, epochs: int, steps_per_epoch: int, batch_size: int, total_steps: int,
                 stream=None, estimate: bool = False):
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.epochs, self.steps_per_epoch = epochs, steps_per_epoch
        self.batch_size, self.total_steps = batch_size, total_steps
        self.last_loss: float | None = None  # None until the first chunk reaches the host
        self._t_last = self._t0 = time.perf_counter()
        self._steps_since = 0
        self._rate = 0.0
        self._epoch_bar = self._batch_bar = None
        self._estimate = estimate and total_steps > ESTIMATE_AT
        self._t_estimate = None
        if self.tty:
            self._epoch_bar = tqdm(total=epochs, desc="epochs", unit="epoch", file=self.stream)

    def on_values(self, values) -> None:
        """Called from the metric writer thread with each chunk read back from the device."""
        if len(values):
            self.last_loss = float(values[-1, -1])

    @property
    def loss_text(self) -> str:
        return "-" if self.last_loss is None else f"{self.last_loss:.4f}"

    def start_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if self.tty:
            self._batch_bar = tqdm(total=self.steps_per_epoch, desc=f"epoch {epoch + 1}",
                                   unit="batch", leave=False, file=self.stream)

    def step(self, step: int) -> None:
        self._steps_since += 1
        now = time.perf_counter()
        if self._estimate:
            self._maybe_estimate(step, now)
        if self.tty:
            self._batch_bar.update(1)
            if now - self._t_last >= 0.5:
                self._update_rate(now)
                self._batch_bar.set_postfix(loss=self.loss_text,
                                            img_s=f"{self._rate:.0f}", refresh=False)
        elif now - self._t_last >= LINE_EVERY_S:
            self._update_rate(now)
            print(f"epoch {self.epoch + 1}/{self.epochs} step {step + 1}/{self.total_steps} "
                  f"loss {self.loss_text} {self._rate:.0f} img/s "
                  f"elapsed {now - self._t0:.0f}s", file=self.stream, flush=True)

    def _maybe_estimate(self, step: int, now: float) -> None:
        """On a CPU, one line after a few steps: how long the whole run will take."""
        if step == ESTIMATE_FROM:
            self._t_estimate = now
        elif step == ESTIMATE_AT and self._t_estimate is not None:
            per_step = (now - self._t_estimate) / (ESTIMATE_AT - ESTIMATE_FROM)
            total = per_step * self.total_steps
            hint = ("; for a quick look try -P image_size=32 -P epochs=1, or -P max_steps=200"
                    if total > QUICK_LOOK_S else "")
            self.write(f"estimate: {self.total_steps:,} training steps at {per_step:.3g} s/step on "
                       f"this CPU = ~{format_duration(total)} (test passes not included){hint}")
            self._estimate = False

    def write(self, line: str) -> None:
        if self.tty:
            self._epoch_bar.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)

    def _update_rate(self, now: float) -> None:
        self._rate = self._steps_since * self.batch_size / max(now - self._t_last, 1e-9)
        self._t_last, self._steps_since = now, 0

    def end_epoch(self, summary: str) -> None:
        if self.tty:
            self._batch_bar.close()
            self._epoch_bar.update(1)
            self.write(f"epoch {self.epoch + 1}: {summary}")
        else:
            self.write(f"epoch {self.epoch + 1}/{self.epochs}: {summary}")

    def close(self) -> None:
        for bar in (self._batch_bar, self._epoch_bar):
            if bar is not None:
                bar.close()
