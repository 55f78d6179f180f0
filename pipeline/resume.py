"""Resume: which run goes on, from which checkpoint, with which configuration; refused in one
line when it cannot (docs: operations/resume.md).

A resumed run goes on exactly as it was configured (its own ``config.json``: its network,
its lr), except for what the launch decides: the checkpoint folder and how many processes
train. The process that trains a run holds its ``checkpoint.Claim`` until it exits.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import mlflow

from . import checkpoint, names, query
from .config import Config, ConfigError, UserError


@dataclasses.dataclass(frozen=True)
class ResumePoint:
    run_id: str
    path: Path          # the checkpoint file
    cfg: Config         # the run's own configuration (its config.json), as this launch resumes it
    params: dict        # ... as logged
    stale_tags: dict = dataclasses.field(default_factory=dict)  # its stop's error tags


def find(cfg: Config) -> ResumePoint:
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
    _claim(cfg.checkpoint_dir, run_id).release()
    # Why it stopped no longer describes the run once it goes on (kept as resume.previous_error).
    stale = {k: v for k, v in run.data.tags.items()
             if k in (names.ERROR_TAG, names.DDP_FAILED_RANK_TAG)}
    return ResumePoint(run_id, path, _resumed_config(original, cfg), logged, stale)


def from_file(cfg: Config) -> ResumePoint:
    """A DDP rank other than 0 (which never reads MLflow): the run's parameters from the
    checkpoint file itself."""
    path = checkpoint.path_for(cfg.checkpoint_dir, cfg.resume_id)
    logged = checkpoint.read_params(path)
    return ResumePoint(cfg.resume_id, path, _resumed_config(Config.from_strings(logged), cfg),
                       logged)


def take(checkpoint_dir: str, point: ResumePoint) -> checkpoint.Claim:
    """The run, for this process to train, just before it is reopened: refused while its
    own process lives, and checked again (another resume may have finished it meanwhile)."""
    claim = _claim(checkpoint_dir, point.run_id)
    try:
        _check_resumable(query.get_run(point.run_id), point.path)
    except BaseException:
        claim.release()
        raise
    return claim


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


def _claim(checkpoint_dir: str, run_id: str) -> checkpoint.Claim:
    """Refused while the process that trains the run lives (a RUNNING run may be a dead
    process's, or a live one's still flushing after SIGTERM)."""
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
    folder and how many processes train (the global batches are the same for any number).
    Its layers are resolved with its model (``plan``)."""
    return dataclasses.replace(original, resume=cfg.resume_id, checkpoint_dir=cfg.checkpoint_dir,
                               nproc_per_node=cfg.nproc_per_node, nnodes=cfg.nnodes,
                               rdzv_endpoint=cfg.rdzv_endpoint)
