"""Data-parallel training: torchrun starts the ranks, DistributedDataParallel averages the
weight gradients, and ``Comm`` is everything else the training loop needs from the group
(docs: operations/distributed.md).

The maths does not depend on the number of processes: ``batch_size`` is the global batch,
each rank trains on its own share of it, and the probes' squared norms are reduced so the
logged norm is the global batch's (``reduce_probe_row``). The launcher (``launch``) checks the
input, runs torchrun on ``python -m pipeline train`` and waits; rank 0 alone talks to MLflow;
a failing rank writes its reason into the shared ``PIPELINE_DDP_DIR``, so the launcher can
tell the cause from its consequences.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

DIR_ENV = "PIPELINE_DDP_DIR"        # launcher <-> ranks: the run ID and per-rank error files
TAGS_ENV = "PIPELINE_DDP_TAGS"      # tags for the run rank 0 opens (JSON), e.g. its parent
RUN_ID_FILE = "run_id"


# --- where this process stands (torch-free: the CLI asks before importing torch) --------------
@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1

    @property
    def main(self) -> bool:
        """Rank 0: the one process that logs, prints and checkpoints."""
        return self.rank == 0

    @classmethod
    def from_env(cls) -> "World":
        """torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE); one
        process without them."""
        if not launched():
            return cls()
        env = os.environ
        return cls(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env["LOCAL_RANK"]),
                   int(env.get("LOCAL_WORLD_SIZE", env["WORLD_SIZE"])))


def launched() -> bool:
    """True inside a process torchrun started."""
    return all(v in os.environ for v in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))


def follower() -> bool:
    """A rank other than 0: it prints nothing and never touches MLflow."""
    return launched() and os.environ["RANK"] != "0"


# --- the launcher -----------------------------------------------------------------------------
class RankFailed(RuntimeError):
    """A rank failed; ``str()`` is the one line shown, ``exit_code`` the launcher's."""

    def __init__(self, message: str, exit_code: int, printed: bool):
        super().__init__(message)
        self.exit_code = exit_code
        self.printed = printed  # rank 0 printed the line itself already


def train_argv(params: dict[str, str]) -> list[str]:
    """``python -m pipeline train`` with every parameter, as the ranks receive it."""
    argv = [sys.executable, "-m", "pipeline", "train"]
    for name, value in params.items():
        argv += [f"--{name.replace('_', '-')}", value]
    return argv


def torchrun_args(nproc_per_node: int, nnodes: int, rdzv_endpoint: str | None,
                  rdzv_id: str) -> list[str]:
    """torchrun's options: ``--standalone`` on one machine (a local rendezvous on a free
    port), else the c10d rendezvous every node joins at ``rdzv_endpoint``."""
    if nnodes == 1 and rdzv_endpoint is None:
        return ["--standalone", f"--nproc-per-node={nproc_per_node}"]
    return [f"--nnodes={nnodes}", f"--nproc-per-node={nproc_per_node}", "--rdzv-backend=c10d",
            f"--rdzv-endpoint={rdzv_endpoint}", f"--rdzv-id={rdzv_id}"]


def launch(cfg, params: dict[str, str], tags: dict[str, str] | None = None) -> str:
    """Run ``cfg`` on ``cfg.world_size`` processes through torchrun; returns the MLflow run
    ID. Raises ``RankFailed`` when a rank fails (after ending the run FAILED)."""
    import mlflow
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run as torchrun

    from . import tracking

    tags = dict(tags or {})
    env = {}
    parent = mlflow.active_run()
    if parent is not None:
        # Inside `all` or `sweep`: the ranks open a child run of it. MLFLOW_RUN_ID (set by
        # `mlflow run` for the parent) must not reach them, or rank 0 would log into the parent.
        tags["mlflow.parentRunId"] = parent.info.run_id
        env["MLFLOW_RUN_ID"] = None
        env["MLFLOW_EXPERIMENT_ID"] = parent.info.experiment_id
    # torchrun would set OMP_NUM_THREADS=1 with a warning; share the cores out instead.
    env.setdefault("OMP_NUM_THREADS", os.environ.get(
        "OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // cfg.nproc_per_node))))
    with tempfile.TemporaryDirectory(prefix="pipeline-ddp-") as shared:
        env.update({DIR_ENV: shared, TAGS_ENV: json.dumps(tags)})
        args = get_args_parser().parse_args(
            torchrun_args(cfg.nproc_per_node, cfg.nnodes, cfg.rdzv_endpoint_or_none,
                          "gradient-flow")
            + ["--max-restarts=0"] + train_argv(params)[1:])
        # torchrun's agent logs each failure and each SIGTERM it sends at WARNING/ERROR;
        # the one line below says the same thing, with the rank's own reason.
        agent_log = logging.getLogger("torch.distributed.elastic")
        saved_level = agent_log.level
        agent_log.setLevel(logging.CRITICAL)
        try:
            with _environ(env):
                torchrun(args)
        except ChildFailedError as e:
            codes = {rank: f.exitcode for rank, f in e.failures.items()}
            raise _failure(Path(shared), codes, tracking) from None
        except SignalException as e:
            # The agent got SIGINT/SIGTERM, passed it on to the ranks (each in its own
            # session, so it arrives once) and waited up to 30 s for them to stop cleanly.
            raise _failure(Path(shared), {}, tracking, int(e.sigval)) from None
        finally:
            agent_log.setLevel(saved_level)
        return _run_id(Path(shared)) or ""


@contextlib.contextmanager
def _environ(changes: dict[str, str | None]):
    saved = {k: os.environ.get(k) for k in changes}
    for k, v in changes.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _run_id(shared: Path) -> str | None:
    path = shared / RUN_ID_FILE
    return path.read_text().strip() if path.exists() else None


def _failure(shared: Path, codes: dict[int, int], tracking, signum: int | None = None) -> RankFailed:
    """What ended a failed launch, as the one line to show. The first failure in time is
    the cause; the peers' errors (lost connections, the agent's SIGTERM) follow from it.
    ``codes``: each failed rank's exit code; ``signum``: a signal the launcher received."""
    from . import names

    reports = []
    for path in shared.glob("rank-*.json"):
        with contextlib.suppress(ValueError, OSError):
            reports.append(json.loads(path.read_text()))
    run_id = os.environ.get("MLFLOW_RUN_ID") or _run_id(shared)
    stopped = {130, 143} | ({128 + signum} if signum else set())
    if not reports and (signum or (codes and all(c in stopped for c in codes.values()))):
        # SIGINT/SIGTERM: the ranks stopped together; rank 0 checkpointed, ended the run
        # KILLED and said so. A rank that did not get that far leaves the run RUNNING.
        code = 128 + signum if signum else max(codes.values())
        if run_id:
            tracking.end_if_running(run_id, "KILLED", f"signal {code - 128} during a DDP run")
        return RankFailed("interrupted", code, printed=True)
    # A rank that reports losing its peers (a collective failed: "Connection closed by
    # peer") is a consequence; so is one the agent ended with SIGTERM after the first death.
    own = [r for r in reports if not r.get("peer")]
    silent = {r: c for r, c in codes.items()
              if c not in (-15, 143) and r not in {p["rank"] for p in reports}}
    if own or (reports and not silent):
        first = min(own or reports, key=lambda r: r["time"])
        rank = first["rank"]
        reason = f"rank {rank}: {first['reason']}"
        user, printed = first["kind"] == "user", rank == 0
    else:
        causes = silent or {r: c for r, c in codes.items() if c not in (-15, 143)} or codes or {0: 1}
        rank, code = min(causes.items())
        how = f"signal {-code}" if code < 0 else f"exit code {code}"
        reason = f"rank {rank} died ({how}) without an error message"
        user, printed = False, False
    if run_id:
        tracking.fail_run(run_id, reason, {names.DDP_FAILED_RANK_TAG: str(rank)})
    where = f"; MLflow run {run_id} ended FAILED" if run_id else ""
    return RankFailed(reason + where, 2 if user else 1, printed)


# --- inside a rank --------------------------------------------------------------------------
class Stopped(Exception):
    """Marks an exception every rank raises together after agreeing to stop (a signal, a
    NaN): the ranks wait for rank 0 to end the run before they exit."""


@contextlib.contextmanager
def guard(world: World, comm: "Callable[[], Comm | None]"):
    """Around a rank's whole run: a failure is written for the launcher. A stop every rank
    makes together (a signal, a NaN) writes none, except rank 0's NaN report, and every
    rank waits here for rank 0 to have ended the run: the agent kills the survivors as soon
    as one rank exits non-zero. ``comm()``: the group, once it exists."""
    try:
        yield
    except BaseException as e:
        if world.size == 1:
            raise
        if getattr(e, "agreed", False):
            if world.main and not isinstance(e, KeyboardInterrupt):
                _write_failure(world, e)
            if comm() is not None:
                comm().barrier()  # rank 0 has ended the run once it gets here
            raise
        if not isinstance(e, (KeyboardInterrupt, SystemExit)):
            _write_failure(world, e)
        raise


def _write_failure(world: World, error: BaseException) -> None:
    from .config import UserError

    folder = os.environ.get(DIR_ENV)
    if not folder:
        return
    kind = "user" if isinstance(error, UserError) else "error"
    text = str(error) if kind == "user" else f"{type(error).__name__}: {error}"
    report = {"rank": world.rank, "kind": kind, "reason": text.splitlines()[0][:2000] if text else
              type(error).__name__, "time": time.time(), "peer": _lost_peer(error)}
    tmp = Path(folder) / f".rank-{world.rank}.tmp"
    tmp.write_text(json.dumps(report))
    os.replace(tmp, Path(folder) / f"rank-{world.rank}.json")


# What a collective raises when another rank has gone: a consequence, not a cause.
_PEER_SIGNS = ("Connection closed by peer", "Connection reset by peer", "Broken pipe",
               "NCCL communicator was aborted", "Socket Timeout")


def _lost_peer(error: BaseException) -> bool:
    import torch.distributed as dist

    return (isinstance(error, getattr(dist, "DistError", ())) or
            any(sign in str(error) for sign in _PEER_SIGNS))


def announce_run(run_id: str) -> None:
    """Rank 0 tells the launcher which run it logs to (for the launcher's failure report)."""
    folder = os.environ.get(DIR_ENV)
    if folder:
        (Path(folder) / RUN_ID_FILE).write_text(run_id)


def launch_tags() -> dict[str, str]:
    raw = os.environ.get(TAGS_ENV)
    return json.loads(raw) if raw else {}


def reduce_probe_row(cur, size: int) -> None:
    """The global batch's squared norms and loss from each of ``size`` ranks' local ones, in
    place: one all_reduce for every layer at once, on the device, no host sync. ``cur``: the
    squared output-gradient norms, then the loss (last).

    Each rank's loss is the mean over its B/W images, and the global loss is the mean of
    the W rank losses, so for an image of rank r, dL/d(out) = (1/W) dL_r/d(out). The
    global squared norm of a layer's output gradient is therefore
    sum_r ||g_r / W||^2 = (sum_r ||g_r||^2) / W^2, and the global loss sum_r L_r / W.
    (``Comm.reduce_probes`` for training; ``pipeline.watch`` on the user's process group.)
    """
    import torch.distributed as dist

    dist.all_reduce(cur)
    cur[:-1].mul_(1.0 / size ** 2)
    cur[-1:].mul_(1.0 / size)


class Comm:
    """The collectives of one training run. With one process every method is a no-op, so
    the training loop has one code path.

    Two groups under DDP: the training backend's (NCCL on CUDA, gloo on the CPU) for device
    tensors, and a gloo group for host flags, so agreeing on a host flag never waits for
    the device (a NCCL collective on a host value would need a device round trip).
    """

    def __init__(self, world: World, device):
        self.world = world
        self.size = world.size
        self._control = None
        if world.size == 1:
            return
        import torch.distributed as dist

        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend)
        self._control = dist.new_group(backend="gloo") if backend != "gloo" else dist.group.WORLD

    @staticmethod
    def device_for(world: World, device):
        """Each rank of a CUDA run drives its own GPU."""
        import torch

        if world.size > 1 and device.type == "cuda":
            torch.cuda.set_device(world.local_rank)
            return torch.device("cuda", world.local_rank)
        return device

    def wrap(self, model, device):
        """DDP around ``model`` (the probes' hooks stay on the inner modules).

        ``static_graph=True``: the set of parameters that get gradients never changes, and
        some never do (the downsample convs of a no-skip ResNet); static_graph lets DDP
        skip them without find_unused_parameters' per-step walk of the autograd graph.
        """
        if self.size == 1:
            return model
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids, static_graph=True)

    def reduce_probes(self, cur) -> None:
        """The global batch's squared norms and loss from each rank's local ones, in place
        (``reduce_probe_row``); a no-op with one process."""
        if self.size == 1:
            return
        reduce_probe_row(cur, self.size)

    def sum_(self, *tensors) -> None:
        """Sum device tensors over the ranks, in place (evaluation's counts)."""
        if self.size == 1:
            return
        import torch.distributed as dist

        for t in tensors:
            dist.all_reduce(t)

    def agree(self, flags: list[int]) -> list[int]:
        """The largest value of each host flag over all ranks. A gloo all_reduce of a few
        host integers (~0.1 ms on one machine): no device work, so no sync."""
        if self.size == 1:
            return flags
        import torch
        import torch.distributed as dist

        t = torch.tensor(flags, dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self._control)
        return t.tolist()

    def barrier(self) -> None:
        if self.size == 1:
            return
        import torch.distributed as dist

        with contextlib.suppress(RuntimeError):  # a peer that is gone cannot be waited for
            dist.barrier(group=self._control)

    def close(self) -> None:
        if self.size == 1:
            return
        import torch.distributed as dist

        with contextlib.suppress(Exception):
            dist.destroy_process_group()

