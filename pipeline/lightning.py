"""``GradientFlow``: the Lightning callback that runs ``pipeline.watch`` inside a Trainer
(docs: guide/watch.md, "Lightning"; needs the ``lightning`` extra).

    trainer = Trainer(logger=MLFlowLogger(...), callbacks=[GradientFlow(layers="auto")])

It logs into the ``MLFlowLogger``'s run (or the active run) what the watch logs. It measures
in ``on_before_optimizer_step``, after all of a step's backward passes (at the optimizer's own
step under a GradScaler), and takes the loss from ``on_before_backward``, undoing Lightning's
division by ``accumulate_grad_batches`` and the scale. One optimizer (the first) is measured.
"""
from __future__ import annotations

import lightning.pytorch as pl
import torch

from .watcher import FLUSH_EVERY, METRIC_EVERY, GradientWatch


class GradientFlow(pl.Callback):
    """Per-layer gradient norms of the LightningModule, logged to MLflow (see the module
    docstring). Arguments as ``pipeline.watch``'s; layer names are relative to the
    LightningModule (``net.0``, ``encoder.layers.3.fc``)."""

    def __init__(self, layers="auto", probe: str = "output", num_classes: int | None = None,
                 title: str | None = None, flush_every: int = FLUSH_EVERY,
                 metric_every: int = METRIC_EVERY):
        self.options = dict(layers=layers, probe=probe, num_classes=num_classes, title=title,
                            flush_every=flush_every, metric_every=metric_every)
        self.watch: GradientWatch | None = None
        self._scaler = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        run_id = None
        if trainer.is_global_zero:
            logger = next((lg for lg in trainer.loggers
                           if type(lg).__name__ == "MLFlowLogger"), None)
            # The logger's run_id property creates its run and points MLflow at its store.
            run_id = logger.run_id if logger is not None else None
        self._scaler = getattr(trainer.precision_plugin, "scaler", None)
        optimizer = trainer.optimizers[0] if self._scaler is not None else None
        self.watch = GradientWatch(pl_module, optimizer, scaler=self._scaler, run_id=run_id,
                                   **self.options).attach()

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           loss: torch.Tensor) -> None:
        if self.watch is None:
            return
        loss = loss.detach() * trainer.accumulate_grad_batches
        if self._scaler is not None and self._scaler.is_enabled():
            loss = loss / self._scaler._scale  # on the device: no sync
        self.watch.loss(loss)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer) -> None:
        # With a scaler the optimizer's own step pre-hook measures (see the module docstring).
        if self.watch is not None and self._scaler is None and optimizer is trainer.optimizers[0]:
            self.watch.step()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Inside the fit loop: before the strategy's teardown and the logger's finalize,
        # which ends the MLflow run.
        self._close(failed=False)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                     exception: BaseException) -> None:
        self._close(failed=True)

    def _close(self, failed: bool) -> None:
        if self.watch is not None:
            watch, self.watch = self.watch, None
            watch.close(failed=failed)
