"""pipeline.watch on a network of the test's own, trained by a plain loop inside
``mlflow.start_run()``: what it logs, against the test's own float64 hooks.

The compiled model is in test_watch_compile.py, the Lightning callback in test_lightning.py.
"""
from __future__ import annotations

import contextlib
import math
import os
import subprocess
import sys

import mlflow
import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from mlflow.tracking import MlflowClient
from torch import nn

import pipeline
from pipeline import names
from pipeline.config import ConfigError
from runs_helpers import free_port
from watch_helpers import LAYERS, Net, Reference, assert_rel_close, batches, history

from conftest import float32_rtol, subprocess_env

STEPS = 6
LOSS = nn.functional.cross_entropy


def _plain_loop(model, optimizer, watch, ref, data) -> None:
    """The user's loop: forward, loss, backward, step. ``watch.loss`` is the one extra line."""
    for x, y in data:
        loss = LOSS(model(x), y)
        watch.loss(loss)
        optimizer.zero_grad()
        loss.backward()
        if ref is not None:
            ref.end_step()
        optimizer.step()


# --- one plain run, checked several ways ------------------------------------------------
@pytest.fixture(scope="module")
def plain_run(module_tracking_store):
    torch.manual_seed(0)
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    ref = Reference(model, LAYERS)
    losses = []
    data = batches(STEPS)
    with mlflow.start_run() as run:
        with pipeline.watch(model, optimizer, layers=LAYERS, num_classes=5) as w:
            for x, y in data:
                loss = LOSS(model(x), y)
                w.loss(loss)
                losses.append(loss.item())
                optimizer.zero_grad()
                loss.backward()
                ref.end_step()
                optimizer.step()
    return run.info.run_id, ref, losses, w


def test_a_plain_loop_logs_each_layer_once_per_step_equal_to_its_own_float64_hooks(plain_run):
    run_id, ref, _, _ = plain_run
    assert len(ref.rows) == STEPS and all(v > 0 for row in ref.rows for v in row.values())
    for layer in LAYERS:
        points = history(run_id, names.grad_norm(layer))
        assert [s for s, _ in points] == list(range(STEPS)), layer  # exactly once per step
        for (step, value), row in zip(points, ref.rows):
            assert_rel_close(value, row[layer], what=f"{layer} at step {step}")
    # nothing else was probed: a norm (and its log10 twin) for the layers asked for, the
    # loss, the end's summary, and no more
    keys = set(MlflowClient().get_run(run_id).data.metrics)
    assert keys == ({names.grad_norm(layer) for layer in LAYERS}
                    | {names.grad_norm_log10(layer) for layer in LAYERS}
                    | {names.TRAIN_LOSS, names.FIRST_LAYER_MEDIAN, names.FIRST_TO_LAST_DECADES})


def test_train_loss_is_the_loss_the_loop_handed_over(plain_run):
    run_id, _, losses, _ = plain_run
    points = history(run_id, names.TRAIN_LOSS)
    assert [s for s, _ in points] == list(range(STEPS))
    np.testing.assert_allclose([v for _, v in points], losses, rtol=1e-7)


def test_the_run_gets_norms_npz_equal_to_the_metrics_the_plots_and_the_diagnosis_tags(plain_run, tmp_path):
    run_id, _, losses, w = plain_run
    client = MlflowClient()
    path = client.download_artifacts(run_id, names.NORMS_NPZ, str(tmp_path))
    with np.load(path) as npz:
        assert list(npz["layers"]) == LAYERS  # in call order, as asked
        assert npz["steps"].tolist() == list(range(STEPS))
        for j, layer in enumerate(LAYERS):  # the same float64 numbers the metrics hold
            assert npz["norms"][:, j].tolist() == [v for _, v in history(run_id, names.grad_norm(layer))]
        np.testing.assert_allclose(npz["loss"], losses, rtol=1e-7)
    artifacts = {a.path for folder in ("plots", "gradients", None)
                 for a in client.list_artifacts(run_id, folder)}
    assert {names.GRADIENT_FLOW_PLOT, names.DEPTH_PROFILE_PLOT, names.GRADIENT_PLOT,
            names.GRADIENTS_JSON, names.NORMS_NPZ, names.REPORT_HTML} <= artifacts
    tags = client.get_run(run_id).data.tags
    assert tags[names.HEALTH_TAG] in ("healthy", "vanishing", "exploding", "dead")
    assert tags[names.FIRST_VANISHING_TAG] in LAYERS + ["none"]
    assert tags[names.AT_CHANCE_TAG] in ("true", "false")  # num_classes was given
    assert tags[names.LAYERS_RESOLVED_TAG] == ",".join(LAYERS)
    assert tags[names.WATCH_STEPS_TAG] == str(STEPS) and tags[names.WATCH_LOSS_TAG] == "logged"
    assert tags[names.WATCH_CAPTURE_TAG] == "hook"
    assert client.get_run(run_id).info.status == "FINISHED"  # the user's run, ended by its block


# --- what else the loop may do --------------------------------------------------------------
def test_weight_gradient_norms_are_of_each_layers_own_parameters(module_tracking_store):
    torch.manual_seed(0)
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    ref = Reference(model, LAYERS)
    with mlflow.start_run() as run, pipeline.watch(model, optimizer, layers=LAYERS, probe="both") as w:
        _plain_loop(model, optimizer, w, ref, batches(3))
    for layer in LAYERS:
        weights = history(run.info.run_id, names.weight_grad_norm(layer))
        assert [s for s, _ in weights] == [0, 1, 2]
        for (step, value), row in zip(weights, ref.weight_rows):
            assert_rel_close(value, row[layer], what=f"weight {layer} at {step}")
        outputs = history(run.info.run_id, names.grad_norm(layer))
        for (step, value), row in zip(outputs, ref.rows):
            assert_rel_close(value, row[layer], what=f"output {layer} at {step}")
    assert names.WEIGHT_GRADIENT_FLOW_PLOT in {
        a.path for a in MlflowClient().list_artifacts(run.info.run_id, "plots")}


def test_probe_weight_alone_logs_weight_norms_and_leaves_the_health_unknown(module_tracking_store):
    torch.manual_seed(0)
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    ref = Reference(model, LAYERS)
    with mlflow.start_run() as run, pipeline.watch(model, optimizer, layers=LAYERS, probe="weight") as w:
        _plain_loop(model, optimizer, w, ref, batches(2))
    client = MlflowClient()
    data = client.get_run(run.info.run_id).data
    assert not any(k.startswith(names.GRAD_NORM_PREFIX) for k in data.metrics)
    for (step, value), row in zip(history(run.info.run_id, names.weight_grad_norm("head")),
                                  ref.weight_rows):
        assert_rel_close(value, row["head"], what=f"weight head at {step}")
    assert data.tags[names.HEALTH_TAG] == "unknown"  # the rules read output gradients
    plots = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert {names.WEIGHT_GRADIENT_FLOW_PLOT, names.GRADIENT_PLOT} <= plots
    assert names.GRADIENT_FLOW_PLOT not in plots


def test_accumulated_micro_batches_give_one_row_per_step_equal_to_one_big_batch(module_tracking_store):
    """Four micro-batches of 2, loss divided by 4, per optimizer step: the row is the norm a
    batch of 8 gives, the root of the sum of the micro-batches' squares (their outputs are
    the big batch's output, side by side)."""
    micro, steps = 4, 3
    data = batches(steps, batch=8)
    torch.manual_seed(0)
    big = Net()
    big_opt = torch.optim.SGD(big.parameters(), lr=0.05)
    ref = Reference(big, LAYERS)
    big_losses = []
    for x, y in data:  # the reference: one batch of 8 per step, no watch
        big_opt.zero_grad()
        loss = LOSS(big(x), y)
        big_losses.append(loss.item())
        loss.backward()
        ref.end_step()
        big_opt.step()
    torch.manual_seed(0)
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    with mlflow.start_run() as run, pipeline.watch(model, optimizer, layers=LAYERS, probe="both") as w:
        for x, y in data:
            optimizer.zero_grad()
            for xs, ys in zip(x.split(2), y.split(2)):
                loss = LOSS(model(xs), ys)
                w.loss(loss)
                (loss / micro).backward()
            optimizer.step()
    for layer in LAYERS:
        for key, rows in ((names.grad_norm(layer), ref.rows),
                          (names.weight_grad_norm(layer), ref.weight_rows)):
            points = history(run.info.run_id, key)
            assert [s for s, _ in points] == list(range(steps)), key  # one row per step
            for (step, value), row in zip(points, rows):
                # 1e-5: the gradients themselves differ in float32's last bits (sums over
                # 2 images four times, against over 8 at once), and so do the weights after
                # an update; a wrong combination (a mean, the last micro-batch) is off by 2x
                assert_rel_close(value, row[layer], rel=1e-5, what=f"{key} at {step}")
    # train/loss: the mean of the micro-batches' losses, i.e. the big batch's loss
    np.testing.assert_allclose([v for _, v in history(run.info.run_id, names.TRAIN_LOSS)],
                               big_losses, rtol=1e-6)


@pytest.mark.parametrize("fused", [False, True], ids=["sgd", "fused-adam"])
def test_under_a_grad_scaler_the_norms_are_of_the_unscaled_gradient_and_a_skipped_step_is_dropped(
        module_tracking_store, fused):
    """CPU bf16 autocast with a GradScaler (scale 2**12). An inf at step 2 makes the scaler
    skip it: with SGD it never calls optimizer.step, so the step has no row; fused Adam
    takes the scale and skips on the device, so the step keeps its (non-finite) row. Both
    count it in watch.skipped_steps."""
    torch.manual_seed(0)
    model = Net()
    optimizer = (torch.optim.Adam(model.parameters(), lr=1e-3, fused=True) if fused
                 else torch.optim.SGD(model.parameters(), lr=0.05))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    ref = Reference(model, LAYERS, scale=scaler.get_scale)
    with mlflow.start_run() as run, pipeline.watch(model, optimizer, layers=LAYERS, probe="both",
                                                   scaler=scaler) as w:
        scales = []
        data = batches(5)
        for i, (x, y) in enumerate(data):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = LOSS(model(x), y)
            if i == 2:
                loss = loss * float("inf")
            w.loss(loss)
            optimizer.zero_grad()
            scales.append(scaler.get_scale())
            scaler.scale(loss).backward()
            # still scaled here: the reference unscales its weight norms itself
            ref.end_step(keep=i != 2, weight_scale=scales[-1])
            scaler.step(optimizer)
            scaler.update()
    assert scales[0] == 2.0 ** 12 and scales[3] < scales[2]  # the scaler did back off at step 2
    run_id = run.info.run_id
    tags = MlflowClient().get_run(run_id).data.tags
    assert tags[names.WATCH_SKIPPED_TAG] == "1"
    for layer in LAYERS:
        for key, rows in ((names.grad_norm(layer), ref.rows),
                          (names.weight_grad_norm(layer), ref.weight_rows)):
            points = history(run_id, key)
            if fused:  # the skipped step keeps its row: the optimizer ran, and skipped inside
                assert [s for s, _ in points] == [0, 1, 2, 3, 4]
                assert not np.isfinite(points[2][1])
                points = points[:2] + points[3:]
            else:
                assert [s for s, _ in points] == [0, 1, 2, 3]  # four steps taken, four rows
            for (step, value), row in zip(points, rows):
                assert_rel_close(value, row[layer], what=f"{key} at {step}")


# --- which layers -----------------------------------------------------------------------------
def _resolved(layers, **kwargs) -> tuple[str, ...]:
    """The layers a watch resolves for Net on one step."""
    torch.manual_seed(0)
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    with mlflow.start_run(), pipeline.watch(model, optimizer, layers=layers, **kwargs) as w:
        _plain_loop(model, optimizer, w, None, batches(1))
    return w.layers


def test_layers_auto_takes_the_first_the_quartiles_and_the_last_conv_or_linear_in_call_order(module_tracking_store):
    # Net's conv/linear layers in call order: stem, blocks.0.conv1, blocks.0.conv2,
    # blocks.1.conv1, blocks.1.conv2, blocks.2.conv1, blocks.2.conv2, head (8; unused never
    # runs, head is defined first). Positions 0, 1/4, 1/2, 3/4, 1 of 0..7: 0, 1.75, 3.5,
    # 5.25, 7, rounded half up: 0, 2, 4, 5, 7.
    assert _resolved("auto") == ("stem", "blocks.0.conv2", "blocks.1.conv2", "blocks.2.conv1", "head")


def test_layers_all_probes_every_conv_and_linear_that_runs_and_thins_the_others_metrics(module_tracking_store, tmp_path):
    torch.manual_seed(0)
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    with mlflow.start_run() as run, pipeline.watch(model, optimizer, layers="all", metric_every=2) as w:
        _plain_loop(model, optimizer, w, None, batches(5))
    every = ("stem", "blocks.0.conv2", "blocks.1.conv2", "blocks.2.conv1", "head")  # auto's
    assert w.layers == ("stem", "blocks.0.conv1", "blocks.0.conv2", "blocks.1.conv1",
                        "blocks.1.conv2", "blocks.2.conv1", "blocks.2.conv2", "head")
    tags = MlflowClient().get_run(run.info.run_id).data.tags
    assert tags[names.METRIC_LAYERS_TAG] == ",".join(every)
    assert [s for s, _ in history(run.info.run_id, names.grad_norm("stem"))] == [0, 1, 2, 3, 4]
    assert [s for s, _ in history(run.info.run_id, names.grad_norm("blocks.0.conv1"))] == [0, 2, 4]
    with np.load(MlflowClient().download_artifacts(run.info.run_id, names.NORMS_NPZ,
                                                   str(tmp_path))) as npz:
        assert npz["norms"].shape == (5, 8) and (npz["norms"] > 0).all()  # every layer, every step


def test_a_glob_and_a_regex_choose_modules_by_name_in_call_order(module_tracking_store):
    assert _resolved("blocks.*.conv1") == ("blocks.0.conv1", "blocks.1.conv1", "blocks.2.conv1")
    assert _resolved([r"re:blocks\.[02]\.conv\d", "head"]) == (
        "blocks.0.conv1", "blocks.0.conv2", "blocks.2.conv1", "blocks.2.conv2", "head")
    # A glob may match modules without parameters (the shared ReLU, called twice a step);
    # the unused Linear matches "*" too, but never runs, so it is left out.
    assert _resolved("*act") == ("act", "blocks.0.act", "blocks.1.act", "blocks.2.act")


@pytest.mark.parametrize("layers, starts", [
    (["stem", "blocks.0.conv3"], "layers: 'blocks.0.conv3' is not a module of this model; "
                                 "allowed: auto, all, its module names, globs or re: regexes over "
                                 "them (closest: blocks.0.conv2, blocks.0.conv1"),
    ("re:block\\.\\d", "layers: 're:block\\\\.\\\\d' matches no module"),
    ("re:blocks(", "layers: 're:blocks(' is not a valid regular expression"),
    ("layer*.conv1", "layers: 'layer*.conv1' matches no module"),
    ([], "layers: [] is empty"),
])
def test_a_layer_that_is_not_in_the_model_is_refused_in_one_line_before_any_hook(layers, starts):
    model = Net()
    with pytest.raises(ConfigError) as e:  # checked before the run is looked for
        pipeline.watch(model, torch.optim.SGD(model.parameters(), lr=0.1), layers=layers)
    assert str(e.value).startswith(starts) and "\n" not in str(e.value), str(e.value)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_a_layer_that_never_runs_is_refused_at_the_first_step(module_tracking_store):
    with pytest.raises(ConfigError, match="^layers: unused never runs in this model's forward pass"):
        _resolved(["stem", "unused"])


def test_probe_weight_refuses_a_named_module_without_parameters(module_tracking_store):
    with pytest.raises(ConfigError, match="^layers: act owns no parameters"):
        _resolved(["stem", "act"], probe="weight")


# --- attach, detach, no optimizer, no run ---------------------------------------------------
def _hooks(model, optimizer) -> int:
    return (sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
            + len(optimizer._optimizer_step_pre_hooks))


def test_attach_and_detach_without_a_block_log_every_step_and_leave_no_hook_behind(module_tracking_store):
    torch.manual_seed(0)
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    ref = Reference(model, ["stem"])
    with mlflow.start_run() as run:
        w = pipeline.watch(model, optimizer, layers=["stem"])
        assert w.attached and _hooks(model, optimizer) > 1  # 1: the reference's own hook
        _plain_loop(model, optimizer, w, ref, batches(3))
        w.detach()
        assert _hooks(model, optimizer) == 1
        # after detach the loop goes on unwatched
        x, y = batches(1)[0]
        LOSS(model(x), y).backward()
        optimizer.step()
    points = history(run.info.run_id, names.grad_norm("stem"))
    assert [s for s, _ in points] == [0, 1, 2]
    for (step, value), row in zip(points, ref.rows):
        assert_rel_close(value, row["stem"], what=f"stem at {step}")
    w.close()  # again: nothing happens


def test_without_an_optimizer_the_loop_measures_each_step_with_step(module_tracking_store):
    torch.manual_seed(0)
    model = Net()
    ref = Reference(model, ["head"])
    with mlflow.start_run() as run, pipeline.watch(model, layers=["head"]) as w:
        for x, y in batches(3):
            model.zero_grad()
            LOSS(model(x), y).backward()
            ref.end_step()
            w.step()  # after backward, before the update
            with torch.no_grad():
                for p in model.parameters():
                    if p.grad is not None:
                        p -= 0.05 * p.grad
    points = history(run.info.run_id, names.grad_norm("head"))
    assert [s for s, _ in points] == [0, 1, 2]
    for (step, value), row in zip(points, ref.rows):
        assert_rel_close(value, row["head"], what=f"head at {step}")
    tags = MlflowClient().get_run(run.info.run_id).data.tags
    assert tags[names.WATCH_LOSS_TAG] == "not given"  # and so no train/loss
    assert names.TRAIN_LOSS not in MlflowClient().get_run(run.info.run_id).data.metrics


def test_watch_without_an_active_run_is_refused_in_one_line():
    model = Net()
    with pytest.raises(ConfigError, match=r"^run: pipeline.watch logs into the active MLflow run "
                                          r"and there is none"):
        pipeline.watch(model, layers="auto")
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_import_pipeline_stays_torch_free_and_pipeline_watch_loads_on_first_use():
    code = ("import sys, pipeline; assert 'torch' not in sys.modules, 'torch at import'; "
            "w = pipeline.watch; import pipeline.watcher; "
            "assert pipeline.watch is w and callable(w) and 'torch' in sys.modules; print('ok')")
    proc = subprocess.run([sys.executable, "-c", code], env=subprocess_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


# --- DDP ----------------------------------------------------------------------------------------
DDP_STEPS, DDP_BATCH = 3, 8


def _ddp_rank(rank: int, world: int, port: int, uri: str, out: str) -> None:
    """One gloo rank: its half of each global batch, a watch on every rank, a run on rank 0."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    mlflow.set_tracking_uri(uri)
    torch.manual_seed(0)
    model = Net()
    net = DistributedDataParallel(model, find_unused_parameters=True)  # `unused` never runs
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    run = mlflow.start_run() if rank == 0 else contextlib.nullcontext()
    with run as active, pipeline.watch(net, optimizer, layers=LAYERS, probe="both") as w:
        for x, y in batches(DDP_STEPS, batch=DDP_BATCH):
            share = slice(rank * DDP_BATCH // world, (rank + 1) * DDP_BATCH // world)
            loss = LOSS(net(x[share]), y[share])
            w.loss(loss)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    if rank == 0:
        with open(out, "w") as f:
            f.write(active.info.run_id)
    dist.destroy_process_group()


def _all_runs() -> set[str]:
    client = MlflowClient()
    return {r.info.run_id for r in client.search_runs(
        [e.experiment_id for e in client.search_experiments()])}


def test_two_gloo_ranks_log_the_global_batch_norms_once_from_rank_0(module_tracking_store, tmp_path):
    torch.manual_seed(0)
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    ref = Reference(model, LAYERS)
    losses = []
    for x, y in batches(DDP_STEPS, batch=DDP_BATCH):  # one process, the whole batch
        optimizer.zero_grad()
        loss = LOSS(model(x), y)
        losses.append(loss.item())
        loss.backward()
        ref.end_step()
        optimizer.step()
    out = tmp_path / "run_id"
    before = _all_runs()
    mp.spawn(_ddp_rank, args=(2, free_port(), module_tracking_store.uri, str(out)), nprocs=2,
             join=True)
    run_id = out.read_text()
    assert _all_runs() - before == {run_id}  # rank 1 opened no run
    # Close, not equal: one process and two ranks run different float32 kernels (batch 8 on
    # this process's threads against 4 per rank on 1), so every sum is rounded differently;
    # conftest.float32_rtol bounds that (1.4e-5 for this net; CI's AVX2 kernels once gave
    # 2.0e-6 at a weight gradient). A wrong reduction (a missing 1/W^2) is a factor 2.
    rtol = float32_rtol(model)
    for layer in LAYERS:
        for key, rows in ((names.grad_norm(layer), ref.rows),
                          (names.weight_grad_norm(layer), ref.weight_rows)):
            points = history(run_id, key)
            assert [s for s, _ in points] == list(range(DDP_STEPS)), key  # once: rank 0's
            for (step, value), row in zip(points, rows):
                assert_rel_close(value, row[layer], rel=rtol, what=f"{key} at {step}")
    np.testing.assert_allclose([v for _, v in history(run_id, names.TRAIN_LOSS)], losses, rtol=rtol)


# --- compare: two watched runs of different networks ----------------------------------------
class Wide(nn.Module):
    """Another network of the user's own: an MLP whose layers share no name with Net's."""

    def __init__(self, classes: int = 5):
        super().__init__()
        self.inp = nn.Linear(3 * 8 * 8, 32)
        self.hidden = nn.Sequential(nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh())
        self.out = nn.Linear(32, classes)

    def forward(self, x):
        return self.out(self.hidden(torch.tanh(self.inp(x.flatten(1)))))


def test_compare_of_two_watched_runs_of_different_networks_has_a_skip_pairs_artifacts(
        plain_run, tmp_path):
    from pipeline import compare

    torch.manual_seed(1)
    model = Wide()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    with mlflow.start_run(run_name="wide-mlp") as run:
        with pipeline.watch(model, optimizer, layers="auto") as w:
            _plain_loop(model, optimizer, w, None, batches(STEPS))
    client = MlflowClient()
    first = plain_run[0]
    client.set_tag(first, "mlflow.runName", "small-cnn")
    compare_id = compare.compare(run_ids=[first, run.info.run_id])

    listed = {a.path for folder in (None, "comparison") for a in client.list_artifacts(
        compare_id, folder)}
    assert {compare.NORMS_PLOT, compare.DEPTH_PLOT, compare.DIFFERENCE_PLOT, compare.SUMMARY_MD,
            compare.SUMMARY_CSV, compare.SUMMARY_JSON, compare.EPOCHS_CSV,
            names.REPORT_HTML} <= listed
    tags = client.get_run(compare_id).data.tags
    assert tags[names.COMPARE_LABELS_TAG] == "small-cnn,wide-mlp"
    assert tags[names.DIFFERENCE_TAG] == "logged"
    # By position, input side to head: Net's stem with the MLP's first layer, head with head.
    layers = tags[names.COMPARE_LAYERS_TAG].split(",")
    assert layers[0] == "stem vs inp" and layers[-1] == "head vs out"
    assert len(layers) == min(len(LAYERS), len(w.layers))
    # Chartable: the decades at each layer pair; no test accuracy (neither run logged one),
    # left out rather than a NaN in the runs table.
    metrics = client.get_run(compare_id).data.metrics
    assert {k for k in metrics if k.startswith("compare/")} == {
        names.compare_decades(layer) for layer in layers}
    assert all(math.isfinite(metrics[names.compare_decades(layer)]) for layer in layers)
