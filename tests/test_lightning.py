"""The Lightning callback (pipeline.lightning.GradientFlow) in a real ``lightning.Trainer``
with its ``MLFlowLogger``, on the CPU: several optimizer steps of two accumulated
micro-batches each, the metrics read back from the store."""
from __future__ import annotations

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.plugins import MixedPrecision
from mlflow.tracking import MlflowClient
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from pipeline import names
from pipeline.lightning import GradientFlow
from watch_helpers import LAYERS, Net, Reference, assert_rel_close, batches, history

STEPS, ACCUMULATE = 4, 2
PROBED = [f"net.{layer}" for layer in LAYERS]  # names inside the LightningModule


class LitNet(pl.LightningModule):
    """The tests' Net as a LightningModule, with the test's own reference hooks."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = Net()
        self.ref = Reference(self, PROBED)
        self.losses: list[float] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.losses.append(loss.item())
        return loss

    def on_before_optimizer_step(self, optimizer):  # after the callback's, the same gradients
        self.ref.end_step()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def _fit(module: LitNet, uri: str, **trainer_args) -> str:
    """Fit ``module`` for STEPS optimizer steps of ACCUMULATE micro-batches; the run ID."""
    data = batches(STEPS * ACCUMULATE)
    loader = DataLoader(TensorDataset(torch.cat([x for x, _ in data]), torch.cat([y for _, y in data])),
                        batch_size=len(data[0][1]), shuffle=False)
    logger = MLFlowLogger(experiment_name="lightning", tracking_uri=uri)
    trainer = pl.Trainer(max_steps=STEPS, accumulate_grad_batches=ACCUMULATE, logger=logger,
                         callbacks=[GradientFlow(layers=PROBED, num_classes=5)],
                         accelerator="cpu", devices=1, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, log_every_n_steps=1, **trainer_args)
    trainer.fit(module, loader)
    assert trainer.global_step == STEPS and len(module.ref.rows) == STEPS
    return logger.run_id


def test_the_callback_logs_each_optimizer_step_into_the_mlflow_loggers_run(module_tracking_store):
    module = LitNet()
    run_id = _fit(module, module_tracking_store.uri)
    for layer in PROBED:
        points = history(run_id, names.grad_norm(layer))
        assert [s for s, _ in points] == list(range(STEPS)), layer  # once per optimizer step
        for (step, value), row in zip(points, module.ref.rows):
            assert_rel_close(value, row[layer], what=f"{layer} at {step}")
    # train/loss: the mean of each step's two micro-batch losses (Lightning's /2 undone)
    expected = np.asarray(module.losses).reshape(STEPS, ACCUMULATE).mean(axis=1)
    np.testing.assert_allclose([v for _, v in history(run_id, names.TRAIN_LOSS)], expected,
                               rtol=1e-6)
    client = MlflowClient()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"  # the logger ended it, after the callback's last writes
    assert run.data.tags[names.LAYERS_RESOLVED_TAG] == ",".join(PROBED)
    assert run.data.tags[names.HEALTH_TAG] in ("healthy", "vanishing", "exploding", "dead")
    artifacts = {a.path for folder in ("plots", "gradients") for a in client.list_artifacts(run_id, folder)}
    assert {names.NORMS_NPZ, names.GRADIENT_FLOW_PLOT, names.DEPTH_PROFILE_PLOT,
            names.GRADIENT_PLOT} <= artifacts
    # the callback let go of every hook
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in module.net.modules()
                   if m not in module.ref.modules)


def test_under_16_mixed_the_callback_logs_the_unscaled_norms_and_loss(module_tracking_store):
    """Lightning's fp16 AMP with its GradScaler (given as a plugin: Lightning turns
    precision="16-mixed" into bf16 on a CPU, without a scaler). The callback then measures at
    the optimizer's own step, which the scaler calls, and divides out the scale (2**10)."""
    module = LitNet()
    module.ref.scale = lambda: module.trainer.precision_plugin.scaler.get_scale()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    run_id = _fit(module, module_tracking_store.uri,
                  plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    for layer in PROBED:
        points = history(run_id, names.grad_norm(layer))
        assert [s for s, _ in points] == list(range(STEPS)), layer
        for (step, value), row in zip(points, module.ref.rows):
            assert_rel_close(value, row[layer], what=f"{layer} at {step}")
    expected = np.asarray(module.losses).reshape(STEPS, ACCUMULATE).mean(axis=1)
    np.testing.assert_allclose([v for _, v in history(run_id, names.TRAIN_LOSS)], expected,
                               rtol=1e-6)
