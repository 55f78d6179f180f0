"""Console progress: tqdm bars on a terminal, a compact line every few seconds otherwise.

The loss shown is the latest one that reached the host through the probe readback, so the
display never forces a device sync of its own.
"""
from __future__ import annotations

import sys
import time

from tqdm.auto import tqdm

LINE_EVERY_S = 10.0  # non-terminal output (CI logs, files): one line per this many seconds


class Progress:
    def __init__(self, epochs: int, steps_per_epoch: int, batch_size: int, total_steps: int,
                 stream=None):
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.epochs, self.steps_per_epoch = epochs, steps_per_epoch
        self.batch_size, self.total_steps = batch_size, total_steps
        self.last_loss: float | None = None  # None until the first chunk reaches the host
        self._t_last = self._t0 = time.perf_counter()
        self._steps_since = 0
        self._rate = 0.0
        self._epoch_bar = self._batch_bar = None
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

    def _update_rate(self, now: float) -> None:
        self._rate = self._steps_since * self.batch_size / max(now - self._t_last, 1e-9)
        self._t_last, self._steps_since = now, 0

    def end_epoch(self, summary: str) -> None:
        if self.tty:
            self._batch_bar.close()
            self._epoch_bar.update(1)
            self._epoch_bar.write(f"epoch {self.epoch + 1}: {summary}")
        else:
            print(f"epoch {self.epoch + 1}/{self.epochs}: {summary}", file=self.stream, flush=True)

    def close(self) -> None:
        for bar in (self._batch_bar, self._epoch_bar):
            if bar is not None:
                bar.close()
