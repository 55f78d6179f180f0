"""The run configuration: the only home of defaults and of the rules for valid values.

Every field is one name end to end: MLproject parameter ``batch_size`` -> CLI option
``--batch-size`` -> ``cfg.batch_size`` -> MLflow param ``batch_size``. Parsing takes the
strings that ``mlflow run -P`` and click hand over, so the same rules apply on every route.
Torch-free on purpose: the CLI validates here before anything heavy is imported.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

# The five layers the founding notebook probed, from the stem to the head: resnet50's
# models.default_layers, which `layers=auto` (the default) stands for.
DEFAULT_LAYERS = ("conv1", "layer1.0.conv1", "layer2.0.conv2", "layer3.5.conv3", "fc")
AUTO_LAYERS = ("auto",)
# `layers=all`: every Conv2d and Linear the forward pass calls (models.all_layers), in call
# order. All go into gradients/norms.npz every step; as metrics, only the five default
# layers every step and the rest every `metric_every` steps (MLflow takes ~10k points/s).
ALL_LAYERS = ("all",)

# Allowed values. models.MODELS must list the same names (a test checks it).
MODELS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "vgg19")
# Models with no skip connections to switch on: skip=true is refused for them.
MODELS_WITHOUT_SKIP = ("vgg19",)
INITS = ("pytorch", "kaiming")
OPTIMIZERS = ("adam", "sgd")
DATASETS = ("cifar10", "synthetic", "imagefolder")
DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("default", "fp32", "bf16")
DATA_PATHS = ("auto", "dataloader", "device")
GRAPH_MODES = ("auto", "on", "off")
ON_NAN = ("stop", "continue")
PROBES = ("output", "weight", "both")
# compare's `quantity`: auto = output when both runs have it, else weight; or one of PROBES.
QUANTITIES = ("auto", *PROBES)

# Where runs go when nothing else says: a named experiment, not MLflow's "Default".
DEFAULT_EXPERIMENT = "gradient-flow"
AUTO = "auto"

# ResNet-50 downsamples by 32 (stride-2 stem, stride-2 max-pool, three stride-2 stages).
# Below this the last stage works on padding alone, so we refuse it.
MIN_IMAGE_SIZE = 32

_TRUE = ("true", "1", "yes")
_FALSE = ("false", "0", "no")


class UserError(Exception):
    """Bad input, missing data or runs: the user's to fix. ``str()`` is the one line shown.

    Defined here, torch-free, so the CLI can catch every kind without importing torch.
    """


class DataError(UserError, RuntimeError):
    """Data that is missing, unreachable or unreadable."""


class ConfigError(UserError, ValueError):
    """A bad parameter value."""

    def __init__(self, param: str, message: str):
        super().__init__(f"{param}: {message}")
        self.param = param


def _param(default: Any, help: str, **rules: Any) -> Any:
    return field(default=default, metadata={"help": help, **rules})


@dataclass(frozen=True)
class Config:
    # --- the experiment: the founding notebook's recipe -----------------------------
    skip: bool = _param(False, "skip connections on (true) or off (false, the notebook's run)")
    model: str = _param("resnet50", "network: resnet18, resnet34, resnet50 (the notebook's), "
                                    "resnet101, resnet152 or vgg19 (no skip connections)",
                        choices=MODELS)
    # BatchNorm2d after every conv, torchvision's way; off is the notebook's network.
    batch_norm: bool = _param(False, "BatchNorm after every conv (true) or none (false, the "
                                     "notebook's)")
    # pytorch: each module's default init (the notebook's); kaiming: torchvision ResNet's.
    init: str = _param("pytorch", "weight init: pytorch (PyTorch's defaults, the notebook's) or "
                                  "kaiming (convs kaiming_normal_ fan_out, as torchvision)",
                       choices=INITS)
    epochs: int = _param(10, "passes over the training set", min=1)
    batch_size: int = _param(16, "images per training step", min=1)
    lr: float = _param(0.001, "learning rate", positive=True)
    optimizer: str = _param("adam", "adam (the notebook's), or sgd with momentum 0.9", choices=OPTIMIZERS)
    image_size: int = _param(224, "px, square; CIFAR's 32 px images are resized to this",
                             min=MIN_IMAGE_SIZE)
    seed: int = _param(0, "seeds weights, data order and synthetic data", min=0)
    layers: tuple[str, ...] = _param(AUTO_LAYERS, "comma-separated module names to probe, "
                                                  "auto = the model's five default layers "
                                                  "(resnet50: " + ",".join(DEFAULT_LAYERS) + "), "
                                                  "or all = every Conv2d and Linear in forward "
                                                  "order", kind="names")
    # Weight-gradient norms join the output gradients' grouped float64 reduction (probes.py),
    # after backward and before the optimizer step: no extra kernels for any number of layers.
    probe: str = _param("output", "what is measured at each probed layer: output (the norm of "
                                  "dLoss/d(layer output), the notebook's), weight (of dLoss/"
                                  "d(the layer's weight and bias): weight_grad_norm/<layer>) or "
                                  "both", choices=PROBES)
    # 54 layers x 31,250 steps (resnet50, 10 CIFAR epochs) is 1.7M points: too many to log
    # as metrics. The dense artifact gradients/norms.npz has every layer at every step.
    metric_every: int = _param(100, "with layers=all: steps between the grad_norm metrics of "
                                    "layers other than the five default ones (1 = every step; "
                                    "gradients/norms.npz has every step regardless)", min=1)

    # --- data ------------------------------------------------------------------------
    dataset: str = _param("cifar10", "cifar10 (torchvision download), synthetic, or imagefolder",
                          choices=DATASETS)
    data_dir: str = _param("data", "where the dataset lives or is downloaded to")
    # 'auto' = one worker per core, at most 8: at 224 px the PIL resize costs ~1 ms per
    # image (17.6 ms per batch of 16 on one core; docs: internals/fast-path.md), so it
    # needs them all.
    num_workers: str = _param("auto", "data loader worker processes: auto or an integer >= 0",
                              kind="auto_or_int")
    data_path: str = _param("auto", "how batches are made: dataloader (CPU workers, PIL per image: "
                                    "the notebook's), device (the split decoded once into uint8 "
                                    "on the training device) or auto (device on CUDA, else "
                                    "dataloader)", choices=DATA_PATHS)
    synthetic_size: int = _param(5000, "training images in the synthetic dataset", min=1)
    synthetic_test_size: int = _param(1000, "test images in the synthetic dataset", min=1)

    # --- run control -----------------------------------------------------------------
    experiment: str = _param(AUTO, "MLflow experiment name (or ID) to log to: auto = "
                                   "MLFLOW_EXPERIMENT_NAME/_ID if set, else gradient-flow; under "
                                   "`mlflow run` the experiment it opened the run in")
    max_steps: int = _param(0, "stop after this many training batches (0 = no limit); the "
                               "test pass then uses a fixed random sample of max_steps x "
                               "batch_size test images, for smoke runs", min=0)
    device: str = _param("auto", "auto (cuda, else Apple's mps, else cpu), cpu, cuda or mps",
                         choices=DEVICES)
    precision: str = _param("default", "default (PyTorch's: TF32 convs on Ampere+), fp32 "
                                       "(strict IEEE) or bf16 (autocast)", choices=PRECISIONS)
    # CUDA graphs: one capture of the whole step, replayed every batch; ~4.6x fewer ms per
    # step on an H200 at batch 16, where the eager step is bound by kernel launches.
    graph: str = _param("auto", "capture the training step as one CUDA graph: auto (on CUDA, "
                                "falling back to eager with the reason logged), on or off",
                        choices=GRAPH_MODES)
    channels_last: str = _param("auto", "NHWC memory layout for the network: auto (on for CUDA), "
                                        "true or false", kind="auto_or_bool")
    # --- more than one process: torchrun + DistributedDataParallel (pipeline/distributed.py)
    # batch_size stays the global batch: each of the nproc_per_node x nnodes ranks trains on
    # batch_size / world_size images of every batch, so the maths does not change.
    nproc_per_node: int = _param(1, "training processes on this machine (one per GPU); above 1 "
                                    "the run is launched through torchrun with DDP", min=1)
    nnodes: int = _param(1, "machines taking part (multi-node: start the same command on each, "
                            "with the same rdzv_endpoint)", min=1)
    rdzv_endpoint: str = _param("none", "host:port where the nodes meet (torchrun's c10d "
                                        "rendezvous; needed when nnodes > 1); none = this "
                                        "machine only (torchrun --standalone)")
    # --- surviving crashes, signals and NaNs ---------------------------------------------
    # A checkpoint reads every weight off the device (a sync) and writes ~285 MB at 224 px
    # (weights + Adam's two moments): once per epoch is cheap next to an epoch's work.
    checkpoint_every: int = _param(0, "steps between checkpoints (0 = at the end of every "
                                      "epoch); one is also written at the end, on SIGINT/"
                                      "SIGTERM and before a NaN stops the run", min=0)
    checkpoint_dir: str = _param("checkpoints", "folder of checkpoints, one subfolder per run ID "
                                                "(deleted once the run is FINISHED)")
    resume: str = _param("none", "a run ID to continue from its last checkpoint, in the same "
                                 "MLflow run (none: start fresh)")
    on_nan: str = _param("stop", "a NaN/Inf loss or norm: stop (checkpoint, then end the run "
                                 "FAILED) or continue (record it and go on)", choices=ON_NAN)
    log_checkpoint: str = _param("auto", "log the final checkpoint as an artifact: auto (on for "
                                         "full runs, off when max_steps is set), true or false",
                                 kind="auto_or_bool")
    # --- what else the run records (the model is ~95 MB at 224 px) ---------------------
    log_model: str = _param("auto", "log the trained model: auto (on for full runs, off when "
                                    "max_steps is set), true or false", kind="auto_or_bool")
    # "none", not "": `mlflow run` would log an empty default as the string "''".
    register_as: str = _param("none", "register the logged model under this name (none: don't)")
    log_system_metrics: str = _param("auto", "record CPU, memory and GPU use: auto (on for GPU "
                                             "runs), true or false", kind="auto_or_bool")
    # Norms wait on the device this many steps before one readback: the copy is the only
    # device->host traffic of the probes, so a larger value means fewer, larger transfers.
    flush_every: int = _param(100, "steps between readbacks of the on-device norm buffer", min=1)

    # ------------------------------------------------------------------------------------
    def __post_init__(self) -> None:
        # The rules across fields; dataclasses.replace checks them too (the `all` variants).
        if self.skip and self.model in MODELS_WITHOUT_SKIP:
            raise no_skip_error(self.model)
        world = self.world_size
        if world > 1:
            if self.batch_size % world:
                raise ConfigError("batch_size", f"{self.batch_size} does not split evenly over "
                                                 f"world_size {world} (nproc_per_node x nnodes); "
                                                 f"allowed: a multiple of {world}")
            if self.graph == "on":
                raise ConfigError("graph", f"on is not available with DDP (world_size {world}): "
                                           "allowed: auto, off")
            if self.device == "mps":
                raise ConfigError("device", "mps has no DDP backend here; allowed with "
                                            "nproc_per_node > 1: auto, cpu, cuda")
        if self.registered_name and not self.wants_model:  # else it would register nothing
            why = (f"auto, which logs it only for full runs, and max_steps is {self.max_steps}"
                   if self.log_model == "auto" else self.log_model)
            raise ConfigError("register_as", f"{self.register_as!r} registers the logged model, "
                                             f"but log_model is {why}; allowed: none, or add "
                                             "-P log_model=true")
        if self.nnodes > 1 and self.rdzv_endpoint_or_none is None:
            raise ConfigError("rdzv_endpoint", f"none, but nnodes is {self.nnodes}: give the "
                                               "host:port every node can reach (the same on each)")

    @property
    def variant(self) -> str:
        return "skip" if self.skip else "noskip"

    @property
    def run_name(self) -> str:
        return f"{self.model}-{self.variant}"

    @property
    def probes_outputs(self) -> bool:
        return self.probe in ("output", "both")

    @property
    def probes_weights(self) -> bool:
        return self.probe in ("weight", "both")

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes

    @property
    def rdzv_endpoint_or_none(self) -> str | None:
        return None if self.rdzv_endpoint.lower() == "none" else self.rdzv_endpoint

    @property
    def resume_id(self) -> str | None:
        return None if self.resume.lower() == "none" else self.resume

    @property
    def wants_checkpoint_artifact(self) -> bool:
        if self.log_checkpoint == "auto":
            return self.max_steps == 0
        return self.log_checkpoint == "true"

    @property
    def registered_name(self) -> str | None:
        return None if self.register_as.lower() == "none" else self.register_as

    @property
    def wants_model(self) -> bool:
        return self.max_steps == 0 if self.log_model == "auto" else self.log_model == "true"

    def wants_channels_last(self, device_type: str) -> bool:
        if self.channels_last == "auto":
            return device_type == "cuda"
        return self.channels_last == "true"

    def wants_system_metrics(self, device_type: str) -> bool:
        if self.log_system_metrics == "auto":
            return device_type == "cuda"
        return self.log_system_metrics == "true"

    def resolved_num_workers(self, cpu_count: int | None) -> int:
        if self.num_workers != "auto":
            return int(self.num_workers)
        return max(1, min(8, cpu_count or 1))

    def to_params(self) -> dict[str, str]:
        """Each field as the string MLflow stores; defaults render as MLproject writes them."""
        return to_params(self)

    @classmethod
    def from_strings(cls, values: Mapping[str, str | None]) -> "Config":
        """Parse strings (from ``-P`` or the CLI); a missing or None value takes the default."""
        return parse(cls, values)


def fields(cls=None) -> tuple[dataclasses.Field, ...]:
    return dataclasses.fields(cls or Config)


def split_list(text: str) -> list[str]:
    """Comma-separated names, stripped, empties dropped, first occurrence kept."""
    return list(dict.fromkeys(p.strip() for p in text.split(",") if p.strip()))


def format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return ",".join(value)
    return str(value)


def no_skip_error(model: str) -> ConfigError:
    """skip=true for a model without skip connections (vgg19), from config and models alike."""
    resnets = ", ".join(m for m in MODELS if m not in MODELS_WITHOUT_SKIP)
    return ConfigError("skip", f"{model} has no skip connections, so skip=true (and the `all` "
                               f"step, which trains both variants) is not allowed; use skip=false, "
                               f"or a model with skips: {resnets}")


def parse_bool(name: str, raw: str) -> bool:
    text = str(raw).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ConfigError(name, f"{raw!r} is not a boolean; allowed: true/false, 1/0, yes/no (any case)")


def parse_field(f: dataclasses.Field, raw: Any) -> Any:
    name, meta, text = f.name, f.metadata, str(raw).strip()
    if f.type == "bool":
        return parse_bool(name, text)
    if f.type == "int":
        lo = meta.get("min")
        try:
            value = int(text)
        except ValueError:
            raise ConfigError(name, f"{raw!r} is not an integer; allowed: integers >= {lo}") from None
        if lo is not None and value < lo:
            raise ConfigError(name, f"{value} is too small; allowed: integers >= {lo}")
        return value
    if f.type == "float":
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or (meta.get("positive") and value <= 0):
            raise ConfigError(name, f"{raw!r} is not allowed; allowed: a finite number > 0")
        return value
    if meta.get("kind") == "names":
        layers = tuple(split_list(text))
        if not layers:
            raise ConfigError(name, "the list is empty; give comma-separated module names, "
                                    f"e.g. {','.join(DEFAULT_LAYERS)}, or auto")
        for word in (AUTO_LAYERS, ALL_LAYERS):
            if any(layer.lower() == word[0] for layer in layers):
                if len(layers) > 1:
                    raise ConfigError(name, f"{text!r}: {word[0]} stands alone; give auto, all "
                                            "or module names, not a mix")
                return word
        return layers
    if meta.get("kind") == "auto_or_bool":
        if text.lower() == "auto":
            return "auto"
        try:
            return format_value(parse_bool(name, text))
        except ConfigError:
            raise ConfigError(name, f"{raw!r} is not allowed; allowed: auto, true, false") from None
    if meta.get("kind") == "auto_or_int":
        if text.lower() == "auto":
            return "auto"
        if not text.isdigit():
            raise ConfigError(name, f"{raw!r} is not allowed; allowed: auto or an integer >= 0")
        return str(int(text))
    choices = meta.get("choices")
    if choices is not None:
        if text.lower() not in choices:
            raise ConfigError(name, f"{raw!r} is not allowed; allowed: {', '.join(choices)}")
        return text.lower()
    if not text:
        raise ConfigError(name, "must not be empty")
    return text


# --- the compare and all steps --------------------------------------------------------------
LATEST, SHARED = "latest", "shared"


@dataclass(frozen=True)
class CompareConfig:
    experiment: str = _param(AUTO, "experiment name or ID to look in; auto = the one training "
                                   "logs to (MLFLOW_EXPERIMENT_NAME/_ID, else gradient-flow)")
    runs: str = _param(LATEST, "two comma-separated run IDs (any two runs with gradient "
                               "norms: training runs, pipeline.watch runs), or latest = the "
                               "newest FINISHED run of each variant (same model)")
    layers: str = _param(SHARED, "comma-separated layers, or shared = every layer both runs "
                                 "probed (runs of different networks, which share none: their "
                                 "layers by position, as many as the shorter has)")
    quantity: str = _param(AUTO, "which gradient norms to compare: output (grad_norm/*), weight "
                                 "(weight_grad_norm/*), both, or auto = output if both runs "
                                 "have it, else weight", choices=QUANTITIES)
    label: str = _param("auto", "how the two runs are named in tables and figures: auto "
                                "(noskip and skip for a skip/noskip pair, else run names), name "
                                "(run names), or a param both runs logged (lr: lr=0.001)")

    @property
    def run_ids(self) -> list[str] | None:
        return None if self.runs == LATEST else split_list(self.runs)

    @property
    def layer_list(self) -> list[str] | None:
        return None if self.layers == SHARED else split_list(self.layers)


@dataclass(frozen=True)
class AllConfig:
    force: bool = _param(False, "retrain even when a FINISHED run with the same parameters "
                                "and code exists")


# --- the sweep ---------------------------------------------------------------------------------
# The sweep's Config fields are its grid; every other training field passes through.
SWEEP_GRID_FIELDS = ("model", "skip", "batch_norm")
# The sweep trains 22 networks by default and its figure needs only the stem's median norm,
# which the first epoch shows (without skips the stem is at ~1e-22 from batch 0): one epoch
# instead of Config's 10 costs a tenth. The sweep's other training defaults are Config's.
SWEEP_TRAIN_DEFAULTS = {"epochs": 1}


@dataclass(frozen=True)
class SweepConfig:
    models: str = _param(",".join(MODELS), "comma-separated models to train: "
                                           + ", ".join(MODELS), kind="grid_models")
    skips: str = _param("false,true", "comma-separated skip values (true/false); a model "
                                      "without skips (vgg19) trains skip=false only",
                        kind="grid_bools")
    batch_norms: str = _param("false,true", "comma-separated batch_norm values (true/false)",
                              kind="grid_bools")
    force: bool = _param(False, "retrain every cell even when a FINISHED run with the same "
                                "parameters and code exists")
    # More than one process at a time only pays with cores or GPUs to spare, and with a
    # tracking server: a local sqlite store serialises every write of every process.
    parallel: int = _param(1, "cells trained at once: 1 = one after another in this process; "
                              "N = up to N `python -m pipeline train` processes (for a "
                              "tracking server)", min=1)

    def __post_init__(self) -> None:
        # Every grid value is checked here, before any run, download or device work.
        for f in dataclasses.fields(self):
            kind = f.metadata.get("kind")
            if kind == "grid_models":
                bad = [m for m in split_list(getattr(self, f.name)) if m.lower() not in MODELS]
                if bad:
                    raise ConfigError(f.name, f"{bad[0]!r} is not allowed; allowed: comma-separated "
                                              f"{', '.join(MODELS)}")
            elif kind == "grid_bools":
                for word in split_list(getattr(self, f.name)):
                    if word.lower() not in _TRUE + _FALSE:
                        raise ConfigError(f.name, f"{word!r} is not a boolean; allowed: "
                                                  "comma-separated true/false, 1/0, yes/no")
            if kind and not split_list(getattr(self, f.name)):
                raise ConfigError(f.name, f"the list is empty; allowed: comma-separated values, "
                                          f"e.g. {format_value(f.default)}")

    @property
    def model_list(self) -> list[str]:
        return list(dict.fromkeys(m.lower() for m in split_list(self.models)))

    @property
    def skip_list(self) -> list[bool]:
        return list(dict.fromkeys(parse_bool("skips", s) for s in split_list(self.skips)))

    @property
    def batch_norm_list(self) -> list[bool]:
        return list(dict.fromkeys(parse_bool("batch_norms", b)
                                  for b in split_list(self.batch_norms)))

    def cells(self, base: Config) -> tuple[list[Config], list[str]]:
        """The grid as training configurations, models outermost, then skip, then batch_norm;
        and the names (``cell_name``) of the cells left out because the model has no skips."""
        if base.resume_id:
            raise ConfigError("resume", "continues one training run; use the main entry point "
                                        "(mlflow run . -P resume=ID), not sweep")
        # The figure compares the first probed layer across architectures: that is the stem
        # only when every model probes its own default (auto) or every layer (all).
        if base.layers not in (AUTO_LAYERS, ALL_LAYERS):
            raise ConfigError("layers", f"{format_value(base.layers)!r}: the sweep compares each "
                                        "model's first layer, so module names (which differ "
                                        "between models) are not allowed; allowed: auto, all")
        if not base.probes_outputs:  # else every cell trains, then the summary finds nothing
            raise ConfigError("probe", f"{base.probe!r}: the sweep's figure is the norm of "
                                       "dLoss/d(first layer output), the grad_norm metrics; "
                                       "allowed: output, both")
        cells, skipped = [], []
        for model in self.model_list:
            for skip in self.skip_list:
                for batch_norm in self.batch_norm_list:
                    if skip and model in MODELS_WITHOUT_SKIP:
                        skipped.append(cell_name(model, skip, batch_norm))
                        continue
                    cells.append(dataclasses.replace(base, model=model, skip=skip,
                                                     batch_norm=batch_norm))
        if not cells:
            raise ConfigError("skips", f"{self.skips!r} leaves no cell to train: "
                                       f"{', '.join(self.model_list)} has no skip connections; "
                                       "allowed: add false, or a model with skips")
        return cells, skipped


def cell_name(model: str, skip: bool, batch_norm: bool) -> str:
    """``resnet50-noskip-nobn``: one cell of the sweep's grid, in tags and tables."""
    return f"{model}-{'skip' if skip else 'noskip'}-{'bn' if batch_norm else 'nobn'}"


def parse(cls, values: Mapping[str, str | None]):
    """``Config.from_strings`` for any of this module's dataclasses."""
    known = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for name, raw in values.items():
        if name not in known:
            raise ConfigError(name, f"unknown parameter; known: {', '.join(known)}")
        if raw is not None:
            kwargs[name] = parse_field(known[name], raw)
    return cls(**kwargs)


def to_params(obj) -> dict[str, str]:
    return {f.name: format_value(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
