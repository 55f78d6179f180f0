"""The training loop: the founding notebook's experiment, probed every step, logged to MLflow.

``run(cfg)`` is the one code path behind ``mlflow run .`` and ``python -m pipeline train``:
the run is planned (``plan``), its data built, its MLflow run opened, then the loop runs and
the run's results are logged (``report``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import sys
import time

import mlflow
import torch

from . import (checkpoint, code_version, console, distributed, engine, gradient_flow, names, plan as planning, query,
               report, resume, signals, tracking)
from . import data as data_mod
from .config import Config, UserError
from .devices import device_notes, precision_mode
from .probes import FLUSH_SECONDS, GradientProbes
from .progress import Progress


class NumericalError(UserError, RuntimeError):
    """A NaN or Inf loss or norm stopped the run (on_nan=stop)."""


def run(cfg: Config, tags: dict[str, str] | None = None) -> str | None:
    """Train one variant and log it; returns the MLflow run ID (None on DDP ranks other
    than 0). ``tags`` are added to the run. With ``nproc_per_node`` x ``nnodes`` > 1 this
    process becomes the launcher: torchrun starts the ranks, which come back here."""
    if cfg.world_size > 1 and not distributed.launched():
        planning.resolve(cfg)  # bad input: one line, before any process starts
        return distributed.launch(cfg, cfg.to_params(), tags)
    world = distributed.World.from_env()
    if world.size != cfg.world_size:  # started by hand: `torchrun ... -m pipeline train`
        cfg = dataclasses.replace(cfg, nproc_per_node=world.local_size,
                                  nnodes=world.size // world.local_size)
    comm = None
    try:
        with distributed.guard(world, lambda: comm):
            # --- 1. everything cheap that can refuse the input, before any download ---------
            plan = planning.resolve(cfg, world)
            if world.main:
                for line in device_notes(plan.device):
                    print(line, file=sys.stderr)
            if world.size > 1 and plan.device.type == "cpu":
                # The ranks on one machine share its cores (torchrun would set 1 thread each).
                torch.set_num_threads(max(1, (os.cpu_count() or 1) // world.local_size))
            comm = distributed.Comm(world, plan.device)
            return _run(plan, comm, tags)
    finally:
        if comm is not None:
            comm.close()


def _run(plan: planning.Plan, comm: distributed.Comm, tags: dict[str, str] | None) -> str | None:
    cfg, world = plan.cfg, comm.world
    # --- 2. data (may download: rank 0 first, so the ranks never race on the files) -------
    if not world.main:
        comm.barrier()
    seconds: dict[str, float] = {}  # the run's time/* metrics
    with _timed(seconds, names.TIME_DATA):
        data = data_mod.build(cfg, plan.device, world.rank, world.size, world.local_size)
    if world.main:
        comm.barrier()
    try:
        # --- 3. the MLflow run, then the loop ---------------------------------------------
        with _opened(plan, data, tags, world) as tracker, \
                precision_mode(cfg.precision, plan.device) as autocast:
            if world.main:
                report.log_setup(tracker, plan, data)
            training = Training(plan, data, autocast, tracker, comm, seconds)
            training.run()
            gradients, summary, dense = training.finish()
            if not world.main:
                return None
            # --- 4. what the run leaves behind ------------------------------------------------
            with _timed(seconds, names.TIME_ARTIFACTS):
                report.log_results(cfg, tracker, gradients, summary, data)
                diagnosis = report.log_gradient_flow(tracker, dense, report.title(cfg),
                                                     data.steps_per_epoch)
                report.log_page(tracker, dense, diagnosis, run_name=cfg.run_name,
                                model=cfg.model, skip=cfg.skip, params=plan.params,
                                test_accuracy=summary.get(names.TEST_ACCURACY),
                                steps_per_epoch=data.steps_per_epoch, every_step=plan.every_step)
            with _timed(seconds, names.TIME_MODEL):
                if cfg.wants_model:
                    report.log_model(cfg, tracker, plan.model)
            tracker.log_totals(seconds)
        # --- 5. the answer, and where to see it -------------------------------------------------
        on = console.colour_on(sys.stdout)
        medians, statuses = report.layer_summary(dense, plan.every_step)
        console.say([*console.training_lines(cfg.run_name, tracker.run_id, diagnosis,
                                             plan.every_step, medians, statuses, on),
                     *console.how_to_open(tracking.public_uri(mlflow.get_tracking_uri()),
                                          tracker.experiment_id, tracker.run_id)])
        return tracker.run_id
    finally:
        data.close()


@contextlib.contextmanager
def _opened(plan: planning.Plan, data, tags: dict[str, str] | None, world: distributed.World):
    """The MLflow run (rank 0; ``Silent`` elsewhere), claimed by this process until it has
    ended; a run that ends FINISHED is never resumed, so its checkpoint folder goes."""
    cfg, claim = plan.cfg, None
    try:
        if not world.main:
            with tracking.Silent().ending() as tracker:
                yield tracker
            return
        if plan.resume is not None:  # before the run is reopened: a live holder keeps it as it is
            claim = resume.take(cfg.checkpoint_dir, plan.resume)
        tracker = _open(plan, data, tags, world.size)
        with tracker.ending():
            claim = claim or checkpoint.Claim(cfg.checkpoint_dir, tracker.run_id)  # new: free
            yield tracker
            tracker.set_tags({}, delete=(names.CHECKPOINT_TAG,))  # the file goes below
        checkpoint.drop(cfg.checkpoint_dir, tracker.run_id)
    finally:  # after the run has ended: a resume may take it from here
        if claim is not None:
            claim.release()


def _open(plan: planning.Plan, data, tags: dict[str, str] | None,
          world_size: int) -> tracking.Tracker:
    """Start the MLflow run, or reopen the resumed one, with the tags known before training."""
    cfg, device, point = plan.cfg, plan.device, plan.resume
    experiment_id = tracking.open_experiment(plan.experiment)  # may create it
    tracker = tracking.Tracker.start(
        cfg.run_name, {**plan.params, names.WORLD_SIZE_PARAM: str(world_size)}, {
            names.VARIANT_TAG: cfg.variant, names.MODEL_TAG: cfg.model,
            names.LAYERS_RESOLVED_TAG: ",".join(cfg.layers),
            names.METRIC_LAYERS_TAG: ",".join(plan.every_step),
            names.DEVICE_TAG: str(device), names.STEPS_PER_EPOCH_TAG: str(data.steps_per_epoch),
            names.DATA_PATH_TAG: data.path, names.DATA_RESIZE_TAG: data.resize,
            names.DATA_DROPPED_TAG: str(data.dropped_per_epoch),
            names.DATA_REUSED_TAG: str(data.reused).lower(),
            names.CODE_VERSION_TAG: code_version(), **distributed.launch_tags(),
            **(tags or {}),
        }, experiment_id=experiment_id, system_metrics=cfg.wants_system_metrics(device.type),
        run_id=point.run_id if point else None)
    distributed.announce_run(tracker.run_id)
    print(f"{cfg.run_name}: training in MLflow run {tracker.run_id}", file=sys.stderr, flush=True)
    if point is not None and os.environ.get("MLFLOW_RUN_ID") not in (None, point.run_id):
        tracking.mark_launcher(os.environ["MLFLOW_RUN_ID"], point.run_id)
    tracker.set_note(report.describe(cfg, data.source))
    return tracker


@contextlib.contextmanager
def _timed(seconds: dict[str, float], key: str):
    """Adds the block's wall time to ``seconds[key]`` (a ``time/*`` metric of the run)."""
    started = time.perf_counter()
    try:
        yield
    finally:
        seconds[key] = seconds.get(key, 0.0) + time.perf_counter() - started


class Training:
    """One run's training: its state, and its epoch loop in named parts."""

    def __init__(self, plan: planning.Plan, data, autocast, tracker, comm: distributed.Comm,
                 seconds: dict[str, float]):
        cfg, model, device = plan.cfg, plan.model, plan.device
        self.cfg, self.model, self.data, self.device = cfg, model, data, device
        self.autocast, self.tracker, self.comm = autocast, tracker, comm
        self.main = comm.world.main
        # The run's time/* metrics; the waits and checkpoints are added up into it.
        self.seconds = seconds
        seconds.update({names.TIME_METRIC_WAIT: 0.0, names.TIME_CHECKPOINT: 0.0})
        self.channels_last = cfg.wants_channels_last(device.type)
        model.to(device).train()
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        self.optimizer = engine.make_optimizer(cfg.optimizer, model.parameters(), cfg.lr,
                                               capturable=plan.use_graph)
        self.steps_per_epoch = data.steps_per_epoch
        total = cfg.epochs * self.steps_per_epoch
        if cfg.max_steps:
            total = min(total, cfg.max_steps)

        # --- where to start: step 0, or a checkpoint ------------------------------------------
        self.ckpt_path = checkpoint.path_for(cfg.checkpoint_dir, tracker.run_id)
        self.fresh = plan.resume is None
        position = checkpoint.Position(0, 0, 0, data.order.start_state)
        history, self.resumed = None, {}
        if plan.resume is not None:
            position, self.resumed = checkpoint.load(plan.resume.path, model, self.optimizer,
                                                     device)
            data.order.resume(position.order_state, position.batch * cfg.batch_size)
            if self.main:
                history = query.metric_histories(tracker.run_id)
            stale = plan.resume.stale_tags
            previous = ({names.RESUMED_ERROR_TAG: stale[names.ERROR_TAG]}
                        if names.ERROR_TAG in stale else {})
            tracker.set_tags({names.RESUMED_AT_TAG: str(position.step), **previous},
                             delete=tuple(stale))
        net = comm.wrap(model, device)  # after loading: every rank starts from the same weights

        # The buffer never needs more rows than the run has steps.
        self.probes = GradientProbes(model, cfg.layers, min(cfg.flush_every, total), device,
                                     flush_seconds=FLUSH_SECONDS, reduce=comm.reduce_probes,
                                     outputs=cfg.probes_outputs, weights=cfg.probes_weights)
        self.probes.start_at(position.step)
        self.step_fn = engine.Step(net, self.optimizer, self.probes, autocast, device,
                                   graph=plan.use_graph, channels_last=self.channels_last,
                                   cast_once=engine.casts_weights_once(cfg.precision,
                                                                       plan.use_graph),
                                   graph_batch=cfg.batch_size)
        self.engine_logged = False  # the engine.* tags, once the step knows what it is
        # The probes measure every layer; the metric writer gets the every-step columns (and
        # the loss), the Collector the full rows: the dense artifact, the thinned metrics of the
        # other layers (with layers=all), the NaN watch and the dead-network warning.
        self.every_step = plan.every_step
        self.progress = Progress(
            cfg.epochs, self.steps_per_epoch, cfg.batch_size, total, estimate=device.type == "cpu",
            stream=None if self.main else open(os.devnull, "w"))  # rank 0 speaks
        self.collector = gradient_flow.Collector(cfg.layers, self.every_step, cfg.metric_every,
                                                 warn=self.progress.write,
                                                 outputs=cfg.probes_outputs,
                                                 weights=cfg.probes_weights)
        self.watch = gradient_flow.NonFiniteWatch(self.collector.all_keys, position.step)
        self.collector.then = self.watch  # the NaN watch names the collector's columns
        tracker.stream(self.collector.keys, on_values=self.progress.on_values, history=history)
        tracker.set_tags({names.CHECKPOINT_TAG: str(self.ckpt_path)})

        self.step, self.epoch, self.in_epoch = position.step, position.epoch, position.batch
        self.summary: dict = {}
        self.t0, self.seen = 0.0, 0  # the open epoch's start time and images
        self.checkpoint_due = False  # acted on between steps
        self.agreed_signum, self.agreed_nan = 0, False  # what every rank knows, after comm.agree

    # --- the loop ---------------------------------------------------------------------------
    def run(self) -> None:
        with signals.stop_on_signals() as self.signals:
            if self.fresh:
                self.save_checkpoint(0, 0, 0)  # the state before any step: always a good one
            try:
                # Checked before each epoch: a resumed run may have reached max_steps already.
                while self.epoch < self.cfg.epochs and not self.reached_max_steps():
                    self.run_epoch()
            finally:
                self.progress.close()
                self.probes.remove()
                self.tracker.set_tags(self.watch.tags)

    def reached_max_steps(self) -> bool:
        return bool(self.cfg.max_steps and self.step >= self.cfg.max_steps)

    def run_epoch(self) -> None:
        """An epoch (or what is left of it), in parts where a checkpoint falls inside it."""
        self.start_epoch()
        while True:
            self.run_steps()
            self.stop_if_agreed()
            if not self.checkpoint_within_epoch():
                break
        self.end_epoch()

    def run_steps(self) -> None:
        """Steps until the epoch ends, max_steps is reached, or a stop or checkpoint is due.
        Per step the host only launches work and reads host flags: no device sync."""
        for chunk, images in engine.steps(self.step_fn, self.data.train, self.device,
                                          self.probes):
            self.submit(chunk)
            if not self.engine_logged and not self.step_fn.capture_pending:
                self.log_engine()
            self.progress.step(self.step)
            self.step, self.in_epoch, self.seen = self.step + 1, self.in_epoch + 1, self.seen + images
            if self.cfg.checkpoint_every and self.step % self.cfg.checkpoint_every == 0:
                self.checkpoint_due = True
            if self.reached_max_steps() or self.stop():
                break

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
            raise self.agreed(signals.Interrupted(
                f"{name} after step {self.step - 1}; checkpoint {self.ckpt_path} "
                f"(resume with {resume.resume_args(self.cfg, self.tracker.run_id)})",
                self.agreed_signum))
        if self.agreed_nan:
            self.stop_for_nonfinite()

    def checkpoint_within_epoch(self) -> bool:
        """Save a checkpoint that fell due before the epoch's end; true if the epoch goes on."""
        epoch_done = self.in_epoch >= self.steps_per_epoch or self.reached_max_steps()
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
        test_loss, test_acc = engine.evaluate(self.model, self.data.test, self.device,
                                              self.autocast, self.comm)
        correct, seen = self.global_counts(self.seen)
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
        """After the loop: the last points sent. Returns the every-step layers' norms (the
        notebook's gradients.json), the last epoch's summary and the dense record."""
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

    # --- metrics on their way ------------------------------------------------------------------
    def submit(self, chunk) -> None:  # host only: the chunk is read back in the writer thread
        self.tracker.submit(self.collector.wrap(chunk))
        self.send_thinned()

    def send_thinned(self) -> bool:
        """The thinned points the writer thread has collected, queued from this thread."""
        pending = self.collector.take_pending()
        for at, ms, metrics in pending:
            self.tracker.log_epoch(at, metrics, ms)  # a batch of points at step ``at``
        return bool(pending)

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

    # --- stops, checkpoints, and what the ranks agree on -------------------------------------
    def stop(self) -> bool:  # host flags only: no device sync
        self.agree()
        return bool(self.agreed_signum or self.agreed_nan or self.checkpoint_due)

    def agree(self) -> None:
        """Under DDP a signal or a NaN seen by one rank (rank 0 alone reads the norms back)
        must stop every rank after the same step, or the others would wait for it forever:
        one gloo all_reduce of two host flags per step (a no-op with one process)."""
        signum, nan = self.comm.agree([self.signals["signum"] or 0,
                                       int(self.cfg.on_nan == "stop"
                                           and self.watch.first is not None)])
        self.agreed_signum, self.agreed_nan = signum, self.agreed_nan or bool(nan)

    def agreed(self, error: BaseException) -> BaseException:
        """Mark a stop every rank makes together (distributed.guard then waits for rank 0)."""
        if self.comm.size > 1:
            error.agreed = True
        return error

    def global_counts(self, seen: int) -> tuple[int, int]:
        """Training accuracy's counts over every rank: one all_reduce and one read (a sync,
        once per epoch or checkpoint)."""
        counts = torch.stack([self.step_fn.correct.detach().clone(),
                              torch.tensor(seen, dtype=torch.int64, device=self.device)])
        self.comm.sum_(counts)
        correct, seen = counts.tolist()
        return int(correct), int(seen)

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
        correct, seen = self.global_counts(seen)
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
        self.submit(self.probes.drain())  # the steps run meanwhile are recorded too
        self.tracker.wait()
        if self.watch.first is None:  # a DDP rank other than 0: rank 0 saw it
            raise self.agreed(NumericalError("on_nan=stop: rank 0 saw a NaN/Inf"))
        step, key, value = self.watch.first
        raise self.agreed(NumericalError(
            # Not "resume": from the last good checkpoint the same settings replay the same
            # batches into the same NaN, and a resume keeps the run's own lr and on_nan.
            f"on_nan=stop: {key} was {value} at step {step}; the last good checkpoint is "
            f"{self.ckpt_path}; start a new run with a lower lr, or with -P on_nan=continue to "
            "record the values and go on"))
