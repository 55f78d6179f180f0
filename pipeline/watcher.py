"""``pipeline.watch``: the float64 gradient probes on your own network and training loop
(docs: guide/watch.md, which has the rules).

    with mlflow.start_run(), pipeline.watch(model, optimizer, layers="auto"):
        for x, y in loader:            # the loop does not change
            ...

It measures at each optimizer step (a step pre-hook: after backward, before the update), one
row per step, built from training's own parts: ``probes.GradientProbes``, the metric writer,
``report``'s artifacts. Gradient accumulation, a GradScaler (unscaled norms), DDP (global-batch
norms, rank 0 logs) and ``torch.compile`` (``watch_probes``) are handled here. The module is
``watcher`` because ``pipeline.watch`` is the function, which a submodule would shadow.
"""
from __future__ import annotations

import warnings
from typing import Iterable

import mlflow
import torch
from torch import nn

from . import config, distributed, gradient_flow, names, query, report, selection, tracking
from .config import ConfigError
from .probes import FLUSH_SECONDS
from .watch_probes import FirstStep, IdentityProbes, WatchProbes

PROBES = ("output", "weight", "both")
CAPTURES = ("auto", "hook", "identity")
# Training's defaults (config.Config is their one home).
FLUSH_EVERY = config.Config.__dataclass_fields__["flush_every"].default
METRIC_EVERY = config.Config.__dataclass_fields__["metric_every"].default


def watch(model: nn.Module, optimizer: torch.optim.Optimizer | None = None, *,
          layers: str | Iterable[str] = "auto", probe: str = "output",
          scaler: "torch.amp.GradScaler | None" = None, capture: str = "auto",
          num_classes: int | None = None, title: str | None = None,
          flush_every: int = FLUSH_EVERY, metric_every: int = METRIC_EVERY,
          run_id: str | None = None) -> "GradientWatch":
    """Attach the probes to ``model`` and the measurement to ``optimizer``'s step; returns the
    ``GradientWatch``, a context manager (or call ``.close()``). Needs an active MLflow run
    (on rank 0 under DDP). Arguments: see ``GradientWatch``."""
    return GradientWatch(model, optimizer, layers=layers, probe=probe, scaler=scaler,
                         capture=capture, num_classes=num_classes, title=title,
                         flush_every=flush_every, metric_every=metric_every,
                         run_id=run_id).attach()


def unwrap(model: nn.Module) -> tuple[nn.Module, bool]:
    """The module whose submodules carry the names (inside DDP and ``torch.compile``'s
    wrapper), and whether a compiled wrapper was found."""
    compiled = False
    while True:
        if getattr(model, "_orig_mod", None) is not None:  # torch.compile's OptimizedModule
            model, compiled = model._orig_mod, True
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model, compiled


def _world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class GradientWatch:
    """Probes on a user's model, measured at each optimizer step, logged to the active run.

    ``layers``: ``"auto"``, ``"all"``, a module name, a glob, ``"re:<regex>"``, or a list of
    them (``selection`` has the rules). ``probe``: ``output`` (dLoss/d(layer output)),
    ``weight`` (the layer's own parameters) or ``both``. ``scaler``: the ``GradScaler`` the
    loop uses, so that norms are unscaled and skipped steps dropped. ``capture``: ``auto``
    (``identity`` for a ``torch.compile``d model, else ``hook``). ``num_classes``: for the
    ``loss.at_chance`` tag. ``flush_every``: rows per readback; ``metric_every``: with
    ``layers="all"``, steps between the metrics of the layers ``auto`` would not pick.
    ``run_id``: log into this run instead of the active one (the Lightning callback's).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, *,
                 layers: str | Iterable[str] = "auto", probe: str = "output",
                 scaler=None, capture: str = "auto", num_classes: int | None = None,
                 title: str | None = None, flush_every: int = FLUSH_EVERY,
                 metric_every: int = METRIC_EVERY, run_id: str | None = None):
        if probe not in PROBES:
            raise ConfigError("probe", f"{probe!r} is not allowed; allowed: {', '.join(PROBES)}")
        if capture not in CAPTURES:
            raise ConfigError("capture", f"{capture!r} is not allowed; allowed: "
                                         f"{', '.join(CAPTURES)}")
        for name, value in (("flush_every", flush_every), ("metric_every", metric_every)):
            if not isinstance(value, int) or value < 1:
                raise ConfigError(name, f"{value!r}; allowed: an integer >= 1")
        self.model, self.optimizer, self.scaler = model, optimizer, scaler
        self.inner, compiled = unwrap(model)
        if getattr(self.inner, "_compiled_call_impl", None) is not None:
            raise ConfigError("model", "compiled in place (model.compile()), which runs the "
                                       "watch's hooks inside the compiled code; allowed: the "
                                       "eager model, or the module torch.compile(model) returns")
        self.compiled = compiled
        self.capture = ("identity" if compiled else "hook") if capture == "auto" else capture
        self.outputs, self.weights = probe in ("output", "both"), probe in ("weight", "both")
        self.probe, self.num_classes, self.title, self.run_id = probe, num_classes, title, run_id
        self.flush_every, self.metric_every = flush_every, metric_every
        self.modules = {n: m for n, m in self.inner.named_modules() if n}
        self.spec = selection.Spec.parse(layers, self.modules)  # bad names: refused here
        self.rank, self.world = _world()
        self.layers: tuple[str, ...] = ()      # resolved at the first step (identity: call)
        self.every_step: tuple[str, ...] = ()
        self.probes: WatchProbes | None = None
        self.collector: gradient_flow.Collector | None = None
        self.tracker = None
        self.steps = self.skipped = 0
        self.attached = self.streaming = False
        self.has_loss: bool | None = None     # decided at the first step
        self._handles: list = []
        self._first: FirstStep | None = None  # hook capture: records until the first step
        self._hook_steps = 0                  # optimizer pre-hook calls: GradScaler's skips
        self._warned_closure = False
        self._loss_sum = self._no_loss = self._device_skips = None  # on the device, made lazily
        self._loss_count = 0

    # --- attach and detach ---------------------------------------------------------------
    def attach(self) -> "GradientWatch":
        """Hook the model's first forward pass (which resolves the layers), the optimizer's
        step and the scaler. Rank 0 needs an active MLflow run. Idempotent."""
        if self.attached:
            return self
        if self.rank == 0:
            if self.run_id is None:
                run = mlflow.active_run()
                if run is None:
                    raise ConfigError("run", "pipeline.watch logs into the active MLflow run and "
                                             "there is none; allowed: inside `with "
                                             "mlflow.start_run():`, or pass run_id=")
                self.run_id = run.info.run_id
            self.tracker = tracking.Tracker(self.run_id)
        else:
            self.tracker = tracking.Silent()  # only rank 0 talks to MLflow
        if self.compiled:
            self._recompile()
        if self.capture == "identity":
            # Hooks inside compiled code would be traced: the layers are resolved by a dry
            # run just before the first call, from the wrapper's own (eager) pre-hook.
            self._resolver = self.model.register_forward_pre_hook(
                self._before_first_call, with_kwargs=True, prepend=True)
            self._handles.append(self._resolver)
        else:
            self._first = FirstStep(self.modules, self.spec.candidates(self.modules))
        if self.optimizer is not None:
            self._handles.append(self.optimizer.register_step_pre_hook(self._on_optimizer_step))
        if self.scaler is not None:
            self._wrap_scaler()
        self.attached = True
        return self

    def __enter__(self) -> "GradientWatch":
        return self.attach()

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.close(failed=exc is not None)
        return False

    def detach(self) -> None:
        """The same as ``close``: flush, log the artifacts and tags, remove every hook."""
        self.close()

    def close(self, failed: bool = False) -> None:
        """Remove every hook, send the last points, and (unless ``failed``, when the block
        raised) log norms.npz, the plots and the diagnosis tags. Idempotent."""
        if not self.attached:
            return
        self.attached = False
        for h in self._handles:
            h.remove()
        self._handles = []
        if self.scaler is not None:
            self.scaler.__dict__.pop("step", None)  # back to GradScaler.step
        if self._first is not None:
            self._first.remove()
            self._first = None
        if self.probes is not None:
            self.probes.remove()
        if self.probes is None:  # no step was measured
            if self.rank == 0:
                self.tracker.set_tags({names.WATCH_STEPS_TAG: "0"})
                _let_go(self.tracker)
            return
        self._submit(self.probes.drain())
        if self._device_skips is not None:
            self.skipped += int(self._device_skips.item())  # the one sync, at the end
        if self.rank != 0:
            return
        try:
            series: dict = {}
            if self.streaming:
                self.tracker.wait()
                self._send_thinned()
                series = self.tracker.flush()
            self.tracker.set_tags(self.tags)
            if not failed and self.steps:
                self._log_artifacts(series)
        except Exception:
            if not failed:
                raise
            # The block's own error is the one to report.
            warnings.warn("pipeline.watch: could not send the last points after the block failed",
                          stacklevel=2)
        finally:
            _let_go(self.tracker)

    def _recompile(self) -> None:
        """Drop the compiled code of the model's forward, so that its next call compiles
        with the watch's hooks. dynamo does not guard on module hooks
        (``torch._dynamo.config.skip_nnmodule_hook_guards``): code compiled before the watch
        would run without its probes (norms of 0). (After ``close`` the removed hooks'
        leaves can no longer be reached, which does make dynamo recompile: a test checks.)
        The code object is shared by every instance of the class; their next calls
        recompile too."""
        from torch._dynamo.eval_frame import reset_code

        code = getattr(getattr(type(self.inner), "forward", None), "__code__", None)
        if code is not None:
            reset_code(code)

    def _log_artifacts(self, series: dict) -> None:
        """What a training run leaves behind, from the dense record and the points the
        writer handed on (so gradients.json equals the metrics)."""
        dense, title = self.collector.dense(), self.title or f"{type(self.inner).__name__}"
        outputs = "norms" in dense
        key = names.grad_norm if outputs else names.weight_grad_norm
        gradients = {layer: [v for _, v in sorted(series.get(key(layer), []))]
                     for layer in self.every_step}
        report.log_gradients(self.tracker, gradients, f"{title} (pipeline.watch)",
                             outputs=outputs)
        tags = report.log_gradient_flow(self.tracker, dense, title,
                                        num_classes=self.num_classes)
        run_name = query.get_run(self.tracker.run_id).info.run_name or title
        report.log_page(self.tracker, dense, tags, run_name=run_name, model=title, skip=None,
                        every_step=self.every_step)

    @property
    def tags(self) -> dict[str, str]:
        return {names.LAYERS_RESOLVED_TAG: ",".join(self.layers),
                names.METRIC_LAYERS_TAG: ",".join(self.every_step),
                names.WATCH_PROBE_TAG: self.probe, names.WATCH_CAPTURE_TAG: self.capture,
                names.WATCH_STEPS_TAG: str(self.steps),
                names.WATCH_SKIPPED_TAG: str(self.skipped),
                names.WATCH_LOSS_TAG: "logged" if self.has_loss else "not given"}

    # --- which layers: resolved once the call order is known ------------------------------
    def _before_first_call(self, module, args, kwargs):
        if torch.compiler.is_compiling():
            raise RuntimeError("pipeline.watch: the model was compiled after the watch attached, "
                               "so its hooks would run inside the compiled code; pass the module "
                               "torch.compile(model) returns to pipeline.watch instead")
        self._resolver.remove()  # once: the layers are fixed from here on
        device = next((a.device for a in args if torch.is_tensor(a)), None)
        self._resolve(selection.call_order(self.inner, args, kwargs), device)
        return None

    def _resolve(self, order: list[str] | None, device: torch.device | None = None) -> None:
        """Choose the layers from the call order and start the probes; with hook capture,
        the first step's gradients, gathered by ``FirstStep``, go into its row."""
        self.layers = selection.resolve(self.spec, self.modules, order, weights=self.weights)
        if selection.ALL in self.spec.entries:  # as training's layers=all: auto's every step
            auto = set(selection.auto_layers(self.modules, order))
            self.every_step = tuple(n for n in self.layers if n in auto)
        else:
            self.every_step = self.layers
        device = next((p.device for p in self.inner.parameters()), device or torch.device("cpu"))
        kind = IdentityProbes if self.capture == "identity" else WatchProbes
        self.probes = kind(self.inner, self.layers, self.flush_every, device,
                           flush_seconds=FLUSH_SECONDS, outputs=self.outputs,
                           weights=self.weights,
                           reduce=(lambda cur: distributed.reduce_probe_row(cur, self.world))
                           if self.world > 1 else None,
                           scale=self._scale if self.scaler is not None else None)
        self.collector = gradient_flow.Collector(self.layers, self.every_step, self.metric_every,
                                                 outputs=self.outputs, weights=self.weights)
        self._on_device(device)
        first, self._first = self._first, None
        if first is not None:
            first.remove()
            if self.outputs:
                for col, name in enumerate(self.layers):
                    if name in first.squares:
                        self.probes.cur[col] += first.squares[name]

    def _on_device(self, device: torch.device) -> None:
        if self._loss_sum is None:
            self._loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        if self._no_loss is None:
            self._no_loss = torch.full((), float("nan"), dtype=torch.float64, device=device)
            self._device_skips = torch.zeros((), dtype=torch.int64, device=device)

    def _ready(self) -> bool:
        """Resolve the layers now if the loop's forward passes have run (hook capture)."""
        if self.probes is None and self._first is not None and self._first.order:
            self._resolve(list(self._first.order))
        return self.probes is not None

    # --- each step ----------------------------------------------------------------------
    def loss(self, loss: torch.Tensor) -> None:
        """Hand over a micro-batch's loss (before the optimizer step) for ``train/loss``: a
        device-side add, no sync. The step's row holds the mean of those given."""
        self._on_device(loss.device)
        self._loss_sum.add_(loss.detach().to(torch.float64))
        self._loss_count += 1

    def step(self) -> None:
        """Measure one step now (after backward, before the update): for loops without an
        optimizer, or whose optimizer the watch was not given."""
        if self.optimizer is not None:
            raise RuntimeError("pipeline.watch: .step() with an optimizer given measures every "
                               "step twice; the optimizer's step is measured already")
        self._measure()

    def _on_optimizer_step(self, optimizer, args, kwargs) -> None:
        self._hook_steps += 1
        # args[0] is the optimizer itself; a closure comes next, or by keyword.
        closure = args[1] if len(args) > 1 else kwargs.get("closure")
        if closure is not None and not self._warned_closure:
            self._warned_closure = True
            warnings.warn("pipeline.watch: optimizer.step(closure) computes the gradients "
                          "inside the step, after the watch measures; measure by hand instead: "
                          "pipeline.watch(model, None, ...) and .step() after backward",
                          stacklevel=3)
        # GradScaler hands an optimizer that unscales by itself (fused Adam) the scale and
        # the inf flag as attributes, for the step: its gradients are still scaled, and the
        # optimizer skips the update on the device, so the row stays (non-finite), and the
        # skip is counted on the device (read once, at the end).
        grad_scale = getattr(optimizer, "grad_scale", None)
        found_inf = getattr(optimizer, "found_inf", None)
        if torch.is_tensor(found_inf) and self._ready():
            self._device_skips += (found_inf > 0).to(self._device_skips.dtype)
        self._measure(grad_scale if torch.is_tensor(grad_scale) else None)

    def _measure(self, weights_scale: torch.Tensor | None = None) -> None:
        if not self._ready():  # a step before any forward pass: nothing to measure
            return
        if self.has_loss is None:
            self.has_loss = self._loss_count > 0
            self._start_stream()
        loss = self._loss_sum / self._loss_count if self._loss_count else self._no_loss
        self.probes.weights_scale = weights_scale
        self.probes.record(loss)
        self._loss_sum.zero_()
        self._loss_count = 0
        self.steps += 1
        self._submit(self.probes.advance())

    def _start_stream(self) -> None:
        self.collector.with_loss = self.has_loss  # no train/loss unless the loop gives it
        if self.rank == 0:
            self.tracker.stream(self.collector.keys)
            self.streaming = True

    def _submit(self, chunk) -> None:
        if chunk is None or not self.streaming:
            return
        self.tracker.submit(self.collector.wrap(chunk))
        self._send_thinned()

    def _send_thinned(self) -> None:
        for at, ms, metrics in self.collector.take_pending():
            self.tracker.log_epoch(at, metrics, ms)

    # --- GradScaler -----------------------------------------------------------------------
    def _scale(self) -> torch.Tensor | None:
        # The scale backward ran with: GradScaler.update changes it after the step. A
        # device tensor, read without a sync.
        return self.scaler._scale if self.scaler.is_enabled() else None

    def _wrap_scaler(self) -> None:
        """After ``scaler.step(optimizer)``: if the optimizer's step did not run (the scaler
        found inf/NaN), the step's gathered gradients are dropped, and the skip counted."""
        original = self.scaler.step

        def step(optimizer, *args, **kwargs):
            before = self._hook_steps
            out = original(optimizer, *args, **kwargs)
            if optimizer is self.optimizer and self._hook_steps == before:
                self._skip()
            return out
        self.scaler.step = step


    def _skip(self) -> None:
        """The scaler skipped the step: what its backward passes gave is dropped."""
        if self._first is not None:
            self._first.forget()
        if self.probes is not None:
            self.probes.discard()
        if self._loss_sum is not None:
            self._loss_sum.zero_()
        self._loss_count = 0
        self.skipped += 1


def _let_go(tracker) -> None:
    """What ``Tracker.end`` does last, without ending the run (the user's to end): give writes
    still waiting for an unreachable server their time (or leave them in the spool, saying
    so), and remove the temporary folder of staged artifacts."""
    if not isinstance(tracker, tracking.Tracker):
        return
    tracker.let_go()
