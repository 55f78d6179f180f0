"""The training loop: the founding notebook's experiment, probed every step, logged to MLflow.

``run(cfg)`` is the one code path behind ``mlflow run .`` and ``python -m pipeline train``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

import mlflow
import numpy as np
import torch
from torch import nn

from . import (checkpoint, code_version, distributed, engine, gradient_flow, health, names, plots,
               query, signals)
from . import data as data_mod
from .config import ALL_LAYERS, AUTO_LAYERS, Config, ConfigError, UserError
from .models import all_layers, build_model, default_layers
from .probes import FLUSH_SECONDS, GradientProbes, check_layers
from .progress import Progress
from . import tracking
from .tracking import Tracker


def mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def resolve_device(name: str) -> torch.device:
    """``auto``: CUDA, then Apple's MPS, then the CPU; an explicit one must be present."""
    available = {"cuda": torch.cuda.is_available(), "mps": mps_available(), "cpu": True}
    if name == "auto":
        return torch.device(next(d for d in ("cuda", "mps", "cpu") if available[d]))
    if not available[name]:
        here = ", ".join(["auto"] + [d for d, ok in available.items() if ok])
        raise ConfigError("device", f"{name} was asked for but no {name.upper()} device is "
                                    f"visible; allowed here: {here}")
    return torch.device(name)


def device_notes(device: torch.device) -> list[str]:
    """What works differently on this device, said once at the start of a run."""
    if device.type != "mps":
        return []
    return ["note: MPS has no float64, so the probes use float32 with scale-by-max (no "
            "underflow; ~1e-7 relative); CUDA graphs, channels_last and the device data path "
            "are CUDA-only; operators MPS lacks run on the CPU (PYTORCH_ENABLE_MPS_FALLBACK=1; "
            "PyTorch names each one in a warning)"]


def resolve_graph(cfg: Config, device: torch.device) -> bool:
    if cfg.graph == "on" and device.type != "cuda":
        raise ConfigError("graph", f"on needs a CUDA device, and this run uses {device.type}; "
                                   "allowed here: auto, off")
    return cfg.graph == "on" or (cfg.graph == "auto" and device.type == "cuda")


def resolve_layers(cfg: Config, model: nn.Module | None = None) -> tuple[str, ...]:
    """The module names to probe: ``layers=auto`` is the model's five default layers,
    ``layers=all`` every Conv2d and Linear its forward pass calls, in call order."""
    if cfg.layers == AUTO_LAYERS:
        return default_layers(cfg.model, batch_norm=cfg.batch_norm)
    if cfg.layers == ALL_LAYERS:
        if model is None:
            model = build_model(cfg.model, skip=cfg.skip, batch_norm=cfg.batch_norm, init=cfg.init)
        return tuple(all_layers(model, cfg.image_size))
    return cfg.layers


def every_step_layers(params: dict, cfg: Config) -> tuple[str, ...]:
    """The probed layers logged as metrics every step: with ``layers=all`` (as logged in
    ``params``) the model's five default layers, else every probed layer."""
    wanted = None
    if str(params.get("layers", "")).strip().lower() == ALL_LAYERS[0]:
        wanted = default_layers(cfg.model, batch_norm=cfg.batch_norm)
    return gradient_flow.every_step_layers(cfg.layers, wanted)


@contextlib.contextmanager
def precision_mode(precision: str, device: torch.device):
    """Yield an autocast factory for the forward pass; restore global flags afterwards.

    ``default`` leaves PyTorch alone, which on Ampere and newer runs fp32 convolutions as
    TF32, as the notebook ran. ``fp32`` turns TF32 off (strict IEEE; ~2.5x slower on H200,
    measurements.md). ``bf16`` autocasts; norms are still reduced in float64.
    cudnn.benchmark stays off: on an H200 it bought nothing here (5.73 against 5.74 ms per
    step, BENCHMARKS.md) and would make the algorithm choice, hence the last bits of every
    norm, vary from run to run.
    """
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    if precision == "fp32":
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield engine.autocast_for(precision, device)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def describe(cfg: Config, source: str) -> str:
    notebooks = cfg.model == "resnet50" and not cfg.batch_norm and cfg.init == "pytorch"
    skip = ("with skip connections" if cfg.skip else "without skip connections"
            + (" (the notebook's run)" if notebooks else ""))
    norm = "with BatchNorm" if cfg.batch_norm else "no BatchNorm"
    return (f"**{cfg.model}** ({norm}, {cfg.init} init) {skip}, trained for {cfg.epochs} "
            f"epoch(s) on {source} at {cfg.image_size}x{cfg.image_size}, batch {cfg.batch_size}, "
            f"{cfg.optimizer} lr {cfg.lr}, seed {cfg.seed}"
            + (f", stopped after {cfg.max_steps} batches" if cfg.max_steps else "") + ".\n\n"
            f"Every batch logs `grad_norm/<layer>`: the float64 L2 norm of dLoss/d(layer output) "
            + (f"for {', '.join(f'`{layer}`' for layer in cfg.layers)}." if len(cfg.layers) <= 10
               else f"for the layers in the `{names.METRIC_LAYERS_TAG}` tag, and every "
                    f"{cfg.metric_every} batches for the rest of the {len(cfg.layers)} probed "
                    f"layers (`{names.LAYERS_RESOLVED_TAG}`)")
            + f" `{names.NORMS_NPZ}` has every probed layer at every batch.")


def result_table(gradients: dict[str, list[float]]) -> str:
    rows = ["| layer | median | min | max | last | zero steps |", "|---|---:|---:|---:|---:|---:|"]
    for layer, values in gradients.items():
        v = np.asarray(values, dtype=np.float64)
        if not len(v):
            continue
        rows.append(f"| `{layer}` | {np.median(v):.3g} | {v.min():.3g} | {v.max():.3g} | "
                    f"{v[-1]:.3g} | {(v == 0).mean():.0%} |")
    return "\n".join(rows)


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, autocast, comm=None):
    """Mean loss and accuracy on the test split; one host sync at the end. Under DDP each
    rank tests its share (data.build strides the split) and the sums are reduced."""
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    seen = 0
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast():
            out = model(x)
        loss_sum += nn.functional.cross_entropy(out.float(), y, reduction="sum")
        correct += (out.argmax(1) == y).sum()
        seen += y.numel()
    model.train()
    if comm is not None and comm.size > 1:
        seen_t = torch.tensor(seen, dtype=torch.int64, device=device)
        comm.sum_(loss_sum, correct, seen_t)
        seen = int(seen_t.item())
    return loss_sum.item() / max(seen, 1), correct.item() / max(seen, 1)


@dataclasses.dataclass
class Prepared:
    """What ``preflight`` checked and resolved."""

    cfg: Config                    # layers resolved (a resumed run's own configuration)
    params: dict                   # as logged (layers as given)
    device: torch.device
    use_graph: bool
    model: nn.Module
    resume: "ResumePoint | None"


def _check_checkpoint_dir(folder: Path) -> None:
    """The folder, or the nearest part of its path that exists, is a folder this user can
    write: the checkpoint of step 0 is written into it before any step."""
    existing = folder.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError("checkpoint_dir", f"{existing} is a file; allowed: a folder, "
                                            "created if missing")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError("checkpoint_dir", f"{existing} is not writable; allowed: a folder "
                                            "this user can write, created if missing")


def preflight(cfg: Config, world: distributed.World = distributed.World()) -> Prepared:
    """Everything cheap that can refuse the input, before any download, device work or
    process start. Ranks other than 0 skip the MLflow reads."""
    device = distributed.Comm.device_for(world, resolve_device(cfg.device))
    _check_checkpoint_dir(Path(cfg.checkpoint_dir))  # found at the first checkpoint otherwise
    if (cfg.world_size > 1 and device.type == "cuda" and cfg.nnodes == 1
            and torch.cuda.device_count() < cfg.nproc_per_node):
        count = torch.cuda.device_count()
        raise ConfigError("nproc_per_node", f"{cfg.nproc_per_node}, but this machine has {count} "
                                            f"GPU(s); allowed: 1 to {count}, or -P device=cpu")
    # DDP runs eagerly: its gradient all_reduce hooks are not captured (graph=on is refused).
    use_graph = resolve_graph(cfg, device) and cfg.world_size == 1
    if not cfg.resume_id:  # the model and layer checks first: they need no server
        model, resolved = _model_for(cfg)
    resume = None
    if world.main:
        tracking.check_experiment(cfg.experiment)
        resume = find_resume_point(cfg) if cfg.resume_id else None
    elif cfg.resume_id:
        resume = resume_point_from_file(cfg)
    if resume is None:
        # The params stay as given (`mlflow run` has logged `layers=auto` already).
        return Prepared(resolved, cfg.to_params(), device, use_graph, model, None)
    # A resumed run goes on exactly as it was configured: its own network (skip, batch_norm),
    # not this launch's defaults, which `mlflow run -P resume=ID` passes for every param.
    model, resolved = _model_for(resume.cfg)
    return Prepared(resolved, resume.params, device, use_graph, model, resume)


def _model_for(cfg: Config) -> tuple[nn.Module, Config]:
    """The freshly initialised model, and ``cfg`` with its probed layers resolved to the
    concrete names (which the layers.resolved tag records); refuses layers it lacks."""
    torch.manual_seed(cfg.seed)  # the init draws, in the notebook's module order
    model = build_model(cfg.model, skip=cfg.skip, batch_norm=cfg.batch_norm, init=cfg.init)
    layers = resolve_layers(cfg, model)
    check_layers(model, layers, cfg.image_size, weights=cfg.probes_weights)
    return model, dataclasses.replace(cfg, layers=layers)


def run(cfg: Config, tags: dict[str, str] | None = None) -> str | None:
    """Train one variant and log it; returns the MLflow run ID (None on DDP ranks other
    than 0). ``tags`` are added to the run. With ``nproc_per_node`` x ``nnodes`` > 1 this
    process becomes the launcher: torchrun starts the ranks, which come back here."""
    if cfg.world_size > 1 and not distributed.launched():
        preflight(cfg)  # bad input: one line, before any process starts
        return distributed.launch(cfg, cfg.to_params(), tags)
    world = distributed.World.from_env()
    if world.size != cfg.world_size:  # started by hand: `torchrun ... -m pipeline train`
        cfg = dataclasses.replace(cfg, nproc_per_node=world.local_size,
                                  nnodes=world.size // world.local_size)
    comm = None
    try:
        with distributed.guard(world, lambda: comm):
            # --- 1. check everything cheap before any download or device work -----------
            prep = preflight(cfg, world)
            cfg, params, device, model = prep.cfg, prep.params, prep.device, prep.model
            if world.main:
                for line in device_notes(device):
                    print(line, file=sys.stderr)
            if world.size > 1 and device.type == "cpu":
                # The ranks on one machine share its cores (torchrun would set 1 thread each).
                torch.set_num_threads(max(1, (os.cpu_count() or 1) // world.local_size))
            comm = distributed.Comm(world, device)
            return _run(prep, comm, tags)
    finally:
        if comm is not None:
            comm.close()


def _run(prep: Prepared, comm: distributed.Comm, tags: dict[str, str] | None) -> str | None:
    cfg, params, device, model, resume = prep.cfg, prep.params, prep.device, prep.model, prep.resume
    world = comm.world
    # --- 2. data (may download: rank 0 first, so the ranks never race on the files) -------
    if not world.main:
        comm.barrier()
    seconds: dict[str, float] = {}  # the run's time/* metrics
    with _timed(seconds, names.TIME_DATA):
        data = data_mod.build(cfg, device, world.rank, world.size, world.local_size)
    if world.main:
        comm.barrier()
    try:
        return _run_with_data(prep, comm, tags, data, seconds)
    finally:
        data.close()


def _run_with_data(prep: Prepared, comm: distributed.Comm, tags, data,
                   seconds: dict[str, float]) -> str | None:
    cfg, params, device, model, resume = prep.cfg, prep.params, prep.device, prep.model, prep.resume
    world = comm.world

    # --- 3. the MLflow run (rank 0 only), claimed by this process until it has ended ----
    claim = None
    try:
        if world.main:
            if resume is not None:  # before the run is reopened: a live holder keeps it as it is
                claim = claim_run(cfg.checkpoint_dir, resume.run_id)
                # Another resume may have finished it since preflight looked.
                _check_resumable(query.get_run(resume.run_id), resume.path)
            tracker = _open_run(prep, data, tags, world.size)
        else:
            tracker = tracking.Silent()
        with tracker.ending(), precision_mode(cfg.precision, device) as autocast:
            if world.main:
                claim = claim or checkpoint.Claim(cfg.checkpoint_dir, tracker.run_id)  # new: free
                # What reproduces this run: the resolved configuration and the software it ran on.
                tracker.log_dict({"params": params, "code_version": code_version()},
                                 names.CONFIG_JSON)
                tracker.set_tags(environment(device))
                tracker.log_datasets(data.lineage)
            gradients, summary, dense = _train(
                cfg, model, data, device, autocast, tracker, prep.use_graph, resume,
                every_step_layers(params, cfg), comm, seconds)
            if not world.main:
                return None
            with _timed(seconds, names.TIME_ARTIFACTS):
                _log_artifacts(cfg, tracker, gradients, summary, data)
                _log_gradient_flow(cfg, tracker, dense, data)
            with _timed(seconds, names.TIME_MODEL):
                if cfg.wants_model:
                    _log_model(cfg, tracker, model, device)
            tracker.log_totals(seconds)
            tracker.set_tags({}, delete=(names.CHECKPOINT_TAG,))  # the file goes below
        checkpoint.drop(cfg.checkpoint_dir, tracker.run_id)  # ended FINISHED: never resumed
    finally:  # after the run has ended: a resume may take it from here
        if claim is not None:
            claim.release()
    return tracker.run_id


def _open_run(prep: Prepared, data, tags, world_size: int) -> Tracker:
    """Start the MLflow run, or reopen the resumed one, with the tags known before training."""
    cfg, params, device, resume = prep.cfg, prep.params, prep.device, prep.resume
    experiment_id = tracking.use_experiment(cfg.experiment)  # may create it
    tracker = Tracker.start(cfg.run_name, {**params, names.WORLD_SIZE_PARAM: str(world_size)}, {
        names.VARIANT_TAG: cfg.variant, names.MODEL_TAG: cfg.model,
        names.LAYERS_RESOLVED_TAG: ",".join(cfg.layers),
        names.METRIC_LAYERS_TAG: ",".join(every_step_layers(params, cfg)),
        names.DEVICE_TAG: str(device), names.STEPS_PER_EPOCH_TAG: str(data.steps_per_epoch),
        names.DATA_PATH_TAG: data.path, names.DATA_RESIZE_TAG: data.resize,
        names.DATA_DROPPED_TAG: str(data.dropped_per_epoch),
        names.DATA_REUSED_TAG: str(data.reused).lower(),
        names.CODE_VERSION_TAG: code_version(), **distributed.launch_tags(), **(tags or {}),
    }, experiment_id=experiment_id, system_metrics=cfg.wants_system_metrics(device.type),
        run_id=resume.run_id if resume else None)
    distributed.announce_run(tracker.run_id)
    if resume is not None and os.environ.get("MLFLOW_RUN_ID") not in (None, resume.run_id):
        tracking.mark_launcher(os.environ["MLFLOW_RUN_ID"], resume.run_id)
    tracker.set_note(describe(cfg, data.source))
    return tracker


@dataclasses.dataclass(frozen=True)
class ResumePoint:
    run_id: str
    path: object        # the checkpoint file
    cfg: Config         # the run's own configuration (its config.json), layers resolved
    params: dict        # ... as logged
    stale_tags: dict = dataclasses.field(default_factory=dict)  # its stop's error tags


def find_resume_point(cfg: Config) -> ResumePoint:
    """The checkpoint of run ``cfg.resume``, checked before any data or device work: the
    run exists, has steps left to train, and left a checkpoint here."""
    run_id = cfg.resume_id
    try:
        logged = query.run_config(run_id)
    except UserError as e:
        uri = mlflow.get_tracking_uri()
        where = "" if uri in str(e) else f" in {uri}"  # said once
        raise ConfigError("resume", f"{run_id!r} is not a training run of this project{where} "
                                    f"({e}); allowed: the ID of a run this project trained, "
                                    "or none") from None
    original, run = Config.from_strings(logged), query.get_run(run_id)
    path = checkpoint.path_for(cfg.checkpoint_dir, run_id)
    _check_resumable(run, path, original.checkpoint_dir)
    # Checked here, before any data work; taken for good just before the run is reopened
    # (a DDP launcher checks, and its rank 0 takes it).
    claim_run(cfg.checkpoint_dir, run_id).release()
    # Why it stopped no longer describes the run once it goes on (kept as resume.previous_error).
    stale = {k: v for k, v in run.data.tags.items()
             if k in (names.ERROR_TAG, names.DDP_FAILED_RANK_TAG)}
    return ResumePoint(run_id, path, _resumed_config(original, cfg), logged, stale)


def resume_args(cfg: Config, run_id: str) -> str:
    """What resumes the run: its ID, and its checkpoint folder where that is not the default."""
    default = Config.__dataclass_fields__["checkpoint_dir"].default
    where = "" if cfg.checkpoint_dir == default else f" -P checkpoint_dir={cfg.checkpoint_dir}"
    return f"-P resume={run_id}{where}"


def _check_resumable(run, path: Path, trained_in: str | None = None) -> None:
    run_id = run.info.run_id
    if run.info.status == "FINISHED":
        # It trained every step and logged its artifacts: going on would replace them with
        # those of the zero steps left (an empty dense record, blank plots).
        raise ConfigError("resume", f"run {run_id} is FINISHED: it trained all its steps, so "
                                    "there is nothing to resume; allowed: a run that ended "
                                    "KILLED or FAILED, or is still RUNNING after its process died")
    if not path.exists():
        said = f" (its params say {trained_in})" if trained_in else ""
        raise ConfigError("resume", f"run {run_id} has no checkpoint at {path}; allowed: the "
                                    f"checkpoint_dir it was trained with{said}, as "
                                    "-P checkpoint_dir=DIR")


def claim_run(checkpoint_dir: str, run_id: str) -> checkpoint.Claim:
    """The run, for this process to resume; refused while the process that trains it lives
    (a RUNNING run may be a dead process's, or a live one's still flushing after SIGTERM)."""
    try:
        return checkpoint.Claim(checkpoint_dir, run_id, create=False)
    except FileNotFoundError:  # deleted since it was looked at: another resume finished it
        raise ConfigError("resume", f"run {run_id} has no checkpoint folder in "
                                    f"{checkpoint_dir} any more; allowed: a run that ended "
                                    "KILLED or FAILED") from None
    except checkpoint.Busy as e:
        raise ConfigError("resume", f"run {run_id} is still being trained by process {e.pid} "
                                    "on this machine; allowed: a run whose training process "
                                    f"has ended (kill -TERM {e.pid} stops it after its current "
                                    "step, with a checkpoint)") from None


def _resumed_config(original: Config, cfg: Config) -> Config:
    """The run's own configuration, except where this launch decides: the checkpoint
    folder and how many processes train (the global batches are the same for any number)."""
    return dataclasses.replace(original, resume=cfg.resume_id, checkpoint_dir=cfg.checkpoint_dir,
                               nproc_per_node=cfg.nproc_per_node, nnodes=cfg.nnodes,
                               rdzv_endpoint=cfg.rdzv_endpoint, layers=resolve_layers(original))


def resume_point_from_file(cfg: Config) -> ResumePoint:
    """A DDP rank other than 0 (which never reads MLflow): the run's parameters from the
    checkpoint file itself."""
    path = checkpoint.path_for(cfg.checkpoint_dir, cfg.resume_id)
    logged = checkpoint.read_params(path)
    return ResumePoint(cfg.resume_id, path, _resumed_config(Config.from_strings(logged), cfg), logged)


def environment(device: torch.device) -> dict[str, str]:
    """Versions and numeric settings that can change results, as ``env.*`` tags."""
    import mlflow
    import torchvision

    cuda = device.type == "cuda"
    return {
        "env.torch": torch.__version__, "env.torchvision": torchvision.__version__,
        "env.mlflow": mlflow.__version__, "env.cuda": str(torch.version.cuda),
        "env.cudnn": str(torch.backends.cudnn.version()),
        "env.gpu": torch.cuda.get_device_name(device) if cuda else "none",
        "env.cudnn.allow_tf32": str(torch.backends.cudnn.allow_tf32).lower(),
        "env.matmul.allow_tf32": str(torch.backends.cuda.matmul.allow_tf32).lower(),
        "env.float32_matmul_precision": torch.get_float32_matmul_precision(),
        "env.cpu_threads": str(torch.get_num_threads()),
    }


def _log_model(cfg: Config, tracker: Tracker, model: nn.Module, device: torch.device) -> None:
    # Exported on the CPU in the default layout: torch.export traces with the input
    # example, which MLflow turns into CPU tensors, and a loaded model should run anywhere.
    # The run is over, so moving the trained model costs nothing else.
    model = model.to("cpu", memory_format=torch.contiguous_format).eval()
    # A fixed, seeded example of batch 2 (see tracking.log_model for why not 1).
    example = torch.rand(2, 3, cfg.image_size, cfg.image_size,
                         generator=torch.Generator().manual_seed(cfg.seed))
    with torch.no_grad():
        output = model(example)
    tracker.log_model(model, example.numpy(), output.numpy(), cfg.registered_name)


class NumericalError(UserError, RuntimeError):
    """A NaN or Inf loss or norm stopped the run (on_nan=stop)."""


class NonFiniteWatch:
    """Counts NaN/Inf losses and norms as chunks reach the host (in the writer thread, so
    the training loop never waits); remembers the first."""

    def __init__(self, keys: list[str], first_step: int, then):
        self.keys, self.next_step, self.then = keys, first_step, then
        self.count = 0
        self.first: tuple[int, str, float] | None = None

    def __call__(self, values: np.ndarray) -> None:
        bad = ~np.isfinite(values)
        if bad.any():
            self.count += int(bad.sum())
            if self.first is None:
                r, c = np.argwhere(bad)[0]
                self.first = (self.next_step + int(r), self.keys[c], float(values[r, c]))
        self.next_step += len(values)
        self.then(values)

    @property
    def tags(self) -> dict[str, str]:
        if self.first is None:
            return {names.NONFINITE_COUNT_TAG: "0"}
        step, key, value = self.first
        return {names.NONFINITE_COUNT_TAG: str(self.count),
                names.NONFINITE_FIRST_TAG: f"{key}={value} at step {step}"}


@contextlib.contextmanager
def _timed(seconds: dict[str, float], key: str):
    """Adds the block's wall time to ``seconds[key]`` (a ``time/*`` metric of the run)."""
    started = time.perf_counter()
    try:
        yield
    finally:
        seconds[key] = seconds.get(key, 0.0) + time.perf_counter() - started


def _train(cfg, model, data, device, autocast, tracker, use_graph, resume=None, every_step=None,
           comm: distributed.Comm | None = None, seconds: dict[str, float] | None = None):
    training = Training(cfg, model, data, device, autocast, tracker, use_graph, resume, every_step,
                        comm or distributed.Comm(distributed.World(), device),
                        {} if seconds is None else seconds)
    training.run()
    return training.finish()


class Training:
    """One ``_train`` call: the run's state, and its epoch loop in named parts."""

    def __init__(self, cfg, model, data, device, autocast, tracker, use_graph, resume,
                 every_step, comm: distributed.Comm, seconds: dict[str, float]):
        self.cfg, self.model, self.data, self.device = cfg, model, data, device
        self.autocast, self.tracker, self.resume, self.comm = autocast, tracker, resume, comm
        self.main = comm.world.main
        # The run's time/* metrics; the waits and checkpoints are added up into it.
        self.seconds = seconds
        seconds.update({names.TIME_METRIC_WAIT: 0.0, names.TIME_CHECKPOINT: 0.0})
        self.channels_last = cfg.wants_channels_last(device.type)
        model.to(device).train()
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        self.optimizer = engine.make_optimizer(cfg.optimizer, model.parameters(), cfg.lr,
                                               capturable=use_graph)
        self.steps_per_epoch = data.steps_per_epoch
        total = cfg.epochs * self.steps_per_epoch
        if cfg.max_steps:
            total = min(total, cfg.max_steps)

        # --- where to start: step 0, or a checkpoint ------------------------------------------
        self.ckpt_path = checkpoint.path_for(cfg.checkpoint_dir, tracker.run_id)
        self.position = checkpoint.Position(0, 0, 0, data.order.start_state)
        history, self.resumed = None, {}
        if resume is not None:
            self.position, self.resumed = checkpoint.load(resume.path, model, self.optimizer,
                                                          device)
            data.order.resume(self.position.order_state, self.position.batch * cfg.batch_size)
            if self.main:
                history = query.metric_histories(tracker.run_id)
            previous = {names.RESUMED_ERROR_TAG: resume.stale_tags[names.ERROR_TAG]
                        } if names.ERROR_TAG in resume.stale_tags else {}
            tracker.set_tags({names.RESUMED_AT_TAG: str(self.position.step), **previous},
                             delete=tuple(resume.stale_tags))
        net = comm.wrap(model, device)  # after loading: every rank starts from the same weights

        # The buffer never needs more rows than the run has steps.
        self.probes = GradientProbes(model, cfg.layers, min(cfg.flush_every, total), device,
                                     flush_seconds=FLUSH_SECONDS, reduce=comm.reduce_probes,
                                     outputs=cfg.probes_outputs, weights=cfg.probes_weights)
        self.probes.start_at(self.position.step)
        self.step_fn = engine.Step(net, self.optimizer, self.probes, autocast, device,
                                   graph=use_graph, channels_last=self.channels_last,
                                   cast_once=engine.casts_weights_once(cfg.precision, use_graph),
                                   graph_batch=cfg.batch_size)
        self.engine_logged = False  # the engine.* tags, once the step knows what it is
        # The probes measure every layer; the metric writer gets the every-step columns (and
        # the loss), the Collector the full rows: the dense artifact, the thinned metrics of the
        # other layers (with layers=all), the NaN watch and the dead-network warning.
        self.every_step = tuple(cfg.layers) if every_step is None else tuple(every_step)
        self.progress = Progress(
            cfg.epochs, self.steps_per_epoch, cfg.batch_size, total, estimate=device.type == "cpu",
            stream=None if self.main else open(os.devnull, "w"))  # rank 0 speaks
        self.collector = gradient_flow.Collector(cfg.layers, self.every_step, cfg.metric_every,
                                                 warn=self.progress.write,
                                                 outputs=cfg.probes_outputs,
                                                 weights=cfg.probes_weights)
        self.watch = NonFiniteWatch(self.collector.all_keys, self.position.step,
                                    lambda values: None)
        self.collector.then = self.watch  # the NaN watch names the collector's columns
        tracker.stream(self.collector.keys, on_values=self.progress.on_values, history=history)
        tracker.set_tags({names.CHECKPOINT_TAG: str(self.ckpt_path)})

        self.step, self.epoch = self.position.step, self.position.epoch
        self.in_epoch = self.position.batch
        self.summary: dict = {}
        self.t0, self.seen = 0.0, 0  # the open epoch's start time and images
        self.checkpoint_due = False  # set by on_step; acted on between steps
        self.agreed_signum, self.agreed_nan = 0, False  # what every rank knows, after comm.agree

    # --- the loop ---------------------------------------------------------------------------
    def run(self) -> None:
        with signals.stop_on_signals() as self.signals:
            if self.resume is None:
                self.save_checkpoint(0, 0, 0)  # the state before any step: always a good one
            try:
                # Checked before each epoch: a resumed run may have reached max_steps already.
                while self.epoch < self.cfg.epochs and not (
                        self.cfg.max_steps and self.step >= self.cfg.max_steps):
                    self.run_epoch()
            finally:
                self.progress.close()
                self.probes.remove()
                self.tracker.set_tags(self.watch.tags)

    def run_epoch(self) -> None:
        """An epoch (or what is left of it), in parts where a checkpoint falls inside it."""
        self.start_epoch()
        while True:
            limit = self.cfg.max_steps - self.step if self.cfg.max_steps else None
            done, images = engine.run_steps(self.step_fn, self.data.train, self.device,
                                            self.probes, self.submit, self.on_step, limit,
                                            self.stop)
            self.step, self.in_epoch, self.seen = (self.step + done, self.in_epoch + done,
                                                   self.seen + images)
            self.stop_if_agreed()
            if not self.checkpoint_within_epoch():
                break
        self.end_epoch()

    def start_epoch(self) -> None:
        self.progress.start_epoch(self.epoch)
        self.t0 = time.perf_counter()
        # A resumed epoch carries on the counts of its first part (global
        # counts: under DDP rank 0 carries them, the others start from 0).
        carried = bool(self.in_epoch and self.main)
        self.step_fn.correct.fill_(self.resumed.get("correct", 0) if carried else 0)
        self.seen = self.resumed.get("seen", 0) if carried else 0

    def stop_if_agreed(self) -> None:
        """Raise for a signal or a NaN/Inf (on_nan=stop) any rank saw."""
        self.agree()  # the loop may have ended without asking stop() (an epoch's end)
        if self.agreed_signum:
            self.save_checkpoint(self.epoch, self.in_epoch, self.seen)
            name = signal.Signals(self.agreed_signum).name
            raise _agreed(self.comm, signals.Interrupted(
                f"{name} after step {self.step - 1}; checkpoint {self.ckpt_path} "
                f"(resume with {resume_args(self.cfg, self.tracker.run_id)})",
                self.agreed_signum))
        if self.agreed_nan:
            self.stop_for_nonfinite()

    def checkpoint_within_epoch(self) -> bool:
        """Save a checkpoint that fell due before the epoch's end; true if the epoch goes on."""
        epoch_done = (self.in_epoch >= self.steps_per_epoch
                      or bool(self.cfg.max_steps and self.step >= self.cfg.max_steps))
        if not self.checkpoint_due:
            return False
        self.checkpoint_due = False
        if epoch_done:
            return False
        if not self.save_checkpoint(self.epoch, self.in_epoch, self.seen):
            self.stop_for_nonfinite()
        # the rest of the epoch: the same order, from where it stopped
        self.data.order.resume(self.data.order.start_state, self.in_epoch * self.cfg.batch_size)
        return True

    def end_epoch(self) -> None:
        """The epoch is over (or max_steps is reached): its metrics, the test split, and a
        checkpoint."""
        self.submit(self.probes.drain())
        if self.device.type == "cuda":
            torch.cuda.synchronize()  # once per epoch, so the timing below is honest
        train_seconds = time.perf_counter() - self.t0
        test_loss, test_acc = evaluate(self.model, self.data.test, self.device, self.autocast,
                                       self.comm)
        correct, seen = _global_counts(self.comm, self.step_fn.correct, self.seen, self.device)
        self.summary = {
            names.TRAIN_ACCURACY: correct / max(seen, 1),
            names.TEST_ACCURACY: test_acc,
            names.TEST_LOSS: test_loss,
            names.EPOCH_SECONDS: time.perf_counter() - self.t0,
            names.IMAGES_PER_SECOND: seen / max(train_seconds, 1e-9),
        }
        self.tracker.log_epoch(self.epoch, self.summary, int(time.time() * 1000))
        self.progress.end_epoch(
            f"loss {self.progress.loss_text} "
            f"train acc {self.summary[names.TRAIN_ACCURACY]:.3f} "
            f"test acc {test_acc:.3f} test loss {test_loss:.4f} "
            f"({self.summary[names.IMAGES_PER_SECOND]:.0f} img/s)")
        self.epoch, self.in_epoch = self.epoch + 1, 0
        if not self.save_checkpoint(self.epoch, 0, 0):  # every epoch's end, and the run's
            self.stop_for_nonfinite()

    def finish(self):
        """After the loop: the last points sent; returns what ``_train`` returns."""
        tracker = self.tracker
        if not self.engine_logged:  # no full batch came: the graph was never captured
            self.log_engine()
        tracker.set_tags({names.EAGER_STEPS_TAG: str(self.step_fn.eager_batches)})
        with _timed(self.seconds, names.TIME_METRIC_WAIT):
            tracker.wait()
            self.send_thinned()
            series = tracker.flush()
        # gradients.json and its plot: the output-gradient norms (the notebook's), or with
        # probe=weight the weight-gradient norms.
        key = names.grad_norm if self.cfg.probes_outputs else names.weight_grad_norm
        gradients = {layer: [v for _, v in sorted(series.get(key(layer), []))]
                     for layer in self.every_step}
        self.summary["steps"] = self.step
        if self.cfg.wants_checkpoint_artifact and self.main:
            with _timed(self.seconds, names.TIME_CHECKPOINT):
                tracker.log_artifact(self.ckpt_path, names.CHECKPOINT_ARTIFACT)
        return gradients, self.summary, self.collector.dense()

    # --- what engine.run_steps calls back --------------------------------------------------
    def submit(self, chunk) -> None:  # host only: the chunk is read back in the writer thread
        self.tracker.submit(self.collector.wrap(chunk))
        self.send_thinned()

    def send_thinned(self) -> bool:
        """The thinned points the writer thread has collected, queued from this thread."""
        pending = self.collector.take_pending()
        for at, ms, metrics in pending:
            self.tracker.log_epoch(at, metrics, ms)  # a batch of points at step ``at``
        return bool(pending)

    def on_step(self, i) -> None:  # i counts from 0 within this call; ``step`` is read at call time
        if not self.engine_logged and not self.step_fn.capture_pending:
            self.log_engine()
        self.progress.step(self.step + i)
        if self.cfg.checkpoint_every and (self.step + i + 1) % self.cfg.checkpoint_every == 0:
            self.checkpoint_due = True

    def log_engine(self) -> None:
        """What the step turned out to be (captured, or eager and why); said once."""
        step_fn, status = self.step_fn, self.step_fn.status
        self.tracker.set_tags({
            names.GRAPH_TAG: status.mode, names.GRAPH_REASON_TAG: status.reason,
            names.CHANNELS_LAST_TAG: str(self.channels_last).lower(),
            names.WEIGHT_CASTS_TAG: "none" if self.cfg.precision != "bf16" else
            "once" if step_fn.cast is not None else "per-op"})
        if status.mode == "eager" and step_fn.want_graph:
            self.progress.write(f"note: CUDA graph not used ({status.reason}); training eagerly")
        self.engine_logged = True

    def stop(self) -> bool:  # host flags only: no device sync
        self.agree()
        return bool(self.agreed_signum or self.agreed_nan or self.checkpoint_due)

    # --- checkpoints, and what the ranks agree on -----------------------------------------
    def agree(self) -> None:
        """Under DDP a signal or a NaN seen by one rank (rank 0 alone reads the norms back)
        must stop every rank after the same step, or the others would wait for it forever:
        one gloo all_reduce of two host flags per step (a no-op with one process)."""
        signum, nan = self.comm.agree([self.signals["signum"] or 0,
                                       int(self.cfg.on_nan == "stop"
                                           and self.watch.first is not None)])
        self.agreed_signum, self.agreed_nan = signum, self.agreed_nan or bool(nan)

    def save_checkpoint(self, at_epoch: int, at_batch: int, seen: int) -> bool:
        """Points before ``step`` land first: a resume never redoes them. Refused once a
        NaN/Inf was seen with on_nan=stop, so the last checkpoint stays the last good one.
        Under DDP every rank comes here at the same step; rank 0 writes the file."""
        with _timed(self.seconds, names.TIME_METRIC_WAIT):
            self.submit(self.probes.drain())
            self.tracker.wait()
            if self.send_thinned():
                self.tracker.wait()
        # The ranks agree, as rank 0 alone reads the norms back.
        bad, = self.comm.agree([int(self.watch.first is not None and self.cfg.on_nan == "stop")])
        self.agreed_nan = self.agreed_nan or bool(bad)
        if bad:
            return False
        correct, seen = _global_counts(self.comm, self.step_fn.correct, seen, self.device)
        if not self.main:
            return True
        # Mid-epoch: this epoch's order is redrawn from its start state; at an epoch's end
        # the generator has already moved on to the next epoch's state.
        order_state = (self.data.order.start_state if at_batch
                       else self.data.order.sampler.generator.get_state())
        with _timed(self.seconds, names.TIME_CHECKPOINT):
            checkpoint.save(self.ckpt_path, self.model, self.optimizer,
                            checkpoint.Position(self.step, at_epoch, at_batch, order_state),
                            self.cfg.to_params(), {"run_id": self.tracker.run_id,
                                                   "correct": correct, "seen": seen})
        return True

    def stop_for_nonfinite(self) -> None:
        _stop_for_nonfinite(self.watch, self.ckpt_path, self.tracker, self.probes, self.submit,
                            self.comm)


def _stop_for_nonfinite(watch: NonFiniteWatch, ckpt_path, tracker: Tracker, probes,
                        submit=None, comm: distributed.Comm | None = None) -> None:
    (submit or tracker.submit)(probes.drain())  # the steps run meanwhile are recorded too
    tracker.wait()
    if watch.first is None:  # a DDP rank other than 0: rank 0 saw it
        raise _agreed(comm, NumericalError("on_nan=stop: rank 0 saw a NaN/Inf"))
    step, key, value = watch.first
    raise _agreed(comm, NumericalError(
        # Not "resume": from the last good checkpoint the same settings replay the same
        # batches into the same NaN, and a resume keeps the run's own lr and on_nan.
        f"on_nan=stop: {key} was {value} at step {step}; the last good checkpoint is "
        f"{ckpt_path}; start a new run with a lower lr, or with -P on_nan=continue to "
        "record the values and go on"))


def _agreed(comm: distributed.Comm | None, error: BaseException) -> BaseException:
    """Mark a stop every rank makes together (distributed.guard then waits for rank 0)."""
    if comm is not None and comm.size > 1:
        error.agreed = True
    return error


def _global_counts(comm: distributed.Comm, correct: torch.Tensor, seen: int,
                   device: torch.device) -> tuple[int, int]:
    """Training accuracy's counts over every rank: one all_reduce and one read (a sync, once
    per epoch or checkpoint)."""
    counts = torch.stack([correct.detach().clone(),
                          torch.tensor(seen, dtype=torch.int64, device=device)])
    comm.sum_(counts)
    correct, seen = counts.tolist()
    return int(correct), int(seen)


def _log_artifacts(cfg, tracker, gradients, summary, data) -> None:
    tracker.log_dict(gradients, names.GRADIENTS_JSON)
    variant = "with skip connections" if cfg.skip else "without skip connections"
    fig = plots.gradient_norms(
        gradients, f"Gradient norms - {cfg.model} ({variant}), {cfg.dataset} "
                   f"{cfg.image_size}px, {cfg.optimizer} lr {cfg.lr}",
        batches_per_epoch=data.steps_per_epoch,
        quantity="dLoss/d(layer output)" if cfg.probes_outputs else "dLoss/d(layer weights)")
    try:
        tracker.log_figure(fig, names.GRADIENT_PLOT)
    finally:
        plots.close(fig)
    acc = summary.get(names.TEST_ACCURACY, math.nan)
    tracker.set_note(describe(cfg, data.source) + "\n\n"
                     f"**Result** after {summary['steps']} batches: test accuracy {acc:.3f}.\n\n"
                     + result_table(gradients), (names.GRADIENTS_JSON, names.NORMS_NPZ))


def _log_gradient_flow(cfg, tracker, dense, data) -> None:
    """gradients/norms.npz, the heatmap and depth profile, and the diagnosis tags, all from
    the dense record (every probed layer at every step this process trained)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, os.path.basename(names.NORMS_NPZ))
        gradient_flow.save_npz(path, dense)
        tracker.log_artifact(path, names.NORMS_NPZ)  # sent (or spooled) before it returns
    variant = "with skip connections" if cfg.skip else "without skip connections"
    title = f"{cfg.model} ({variant}), {cfg.dataset} {cfg.image_size}px"
    figures = []
    if "norms" in dense:
        figures += [(plots.gradient_flow, names.GRADIENT_FLOW_PLOT, "norms", "dLoss/d(output)"),
                    (plots.depth_profile_at_steps, names.DEPTH_PROFILE_PLOT, "norms",
                     "dLoss/d(layer output)")]
    if "weight_norms" in dense:
        figures += [(plots.gradient_flow, names.WEIGHT_GRADIENT_FLOW_PLOT, "weight_norms",
                     "dLoss/d(layer weights)"),
                    (plots.depth_profile_at_steps, names.WEIGHT_DEPTH_PROFILE_PLOT,
                     "weight_norms", "dLoss/d(layer weights)")]
    for make, path, column, quantity in figures:
        fig = make(dense["steps"], list(dense["layers"]), dense[column], title,
                   batches_per_epoch=data.steps_per_epoch, quantity=quantity)
        try:
            tracker.log_figure(fig, path)
        finally:
            plots.close(fig)
    if "norms" in dense:  # the rules read output-gradient norms (README)
        tracker.set_tags(health.diagnose(dense["steps"], list(dense["layers"]),
                                                dense["norms"], dense["loss"], data_mod.NUM_CLASSES))
    else:
        tracker.set_tags({names.HEALTH_TAG: "unknown"})
