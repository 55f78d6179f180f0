"""A training run resolved once, before any download, device work or process start: its device,
its probed layers, its resume point and its experiment, or one line saying why not."""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch
from torch import nn

from . import distributed, gradient_flow, resume, tracking
from .config import ALL_LAYERS, AUTO_LAYERS, Config, ConfigError
from .devices import resolve_device, resolve_graph
from .models import all_layers, build_model, default_layers
from .probes import check_layers


@dataclasses.dataclass
class Plan:
    """What a training run is, settled before it opens."""

    cfg: Config                    # layers resolved (a resumed run's own configuration)
    params: dict[str, str]         # as logged (layers as given: `mlflow run` has logged them)
    device: torch.device
    use_graph: bool                # capture the step as a CUDA graph
    model: nn.Module               # freshly initialised; a resume loads its checkpoint into it
    every_step: tuple[str, ...]    # the probed layers logged as metrics every step
    resume: resume.ResumePoint | None
    experiment: tracking.Target | None  # None on DDP ranks other than 0 (they never log)


def resolve(cfg: Config, world: distributed.World = distributed.World()) -> Plan:
    """Everything cheap that can refuse the input. Ranks other than 0 skip the MLflow reads."""
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
    point, experiment = None, None
    if world.main:
        experiment = tracking.resolve_experiment(cfg.experiment)
        point = resume.find(cfg) if cfg.resume_id else None
    elif cfg.resume_id:
        point = resume.from_file(cfg)
    params = cfg.to_params()  # `mlflow run` has logged `layers=auto` already
    if point is not None:
        # A resumed run goes on exactly as it was configured: its own network (skip,
        # batch_norm), not this launch's defaults, which `mlflow run -P resume=ID` passes.
        model, resolved = _model_for(point.cfg)
        params = point.params
    return Plan(resolved, params, device, use_graph, model, every_step_layers(params, resolved),
                point, experiment)


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


def _model_for(cfg: Config) -> tuple[nn.Module, Config]:
    """The freshly initialised model, and ``cfg`` with its probed layers resolved to the
    concrete names (which the layers.resolved tag records); refuses layers it lacks."""
    torch.manual_seed(cfg.seed)  # the init draws, in the notebook's module order
    model = build_model(cfg.model, skip=cfg.skip, batch_norm=cfg.batch_norm, init=cfg.init)
    layers = resolve_layers(cfg, model)
    check_layers(model, layers, cfg.image_size, weights=cfg.probes_weights)
    return model, dataclasses.replace(cfg, layers=layers)


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
