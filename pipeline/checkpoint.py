"""Checkpoints: everything a resumed run needs to continue as if it had never stopped.

A checkpoint holds the model, the optimizer, the global step, the epoch, the position in
that epoch's data order (the data sampler's RNG state at the epoch's start plus the number
of batches done), the process RNG states, and the run's parameters. Resuming from it
replays the same batches into the same weights, so on a CPU a resumed run's weights and
metrics equal an uninterrupted run's bit for bit (tests/test_reliability.py).

Files live in ``<checkpoint_dir>/<run_id>/last.pt``, written atomically (a temporary file,
then a rename), so a crash mid-write leaves the previous checkpoint intact. The folder is
deleted once the run ends FINISHED (``drop``); a KILLED or FAILED run keeps it for its resume.
While a process trains a run it holds the folder's ``lock`` (``Claim``).
"""
from __future__ import annotations

import fcntl
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

FILENAME = "last.pt"
# The optimizer options that choose an implementation, not the maths: a resumed run keeps
# its own (``load``), whatever the checkpoint was written with.
IMPLEMENTATION_OPTIONS = ("capturable", "fused", "foreach")


def path_for(checkpoint_dir: str, run_id: str) -> Path:
    return Path(checkpoint_dir) / run_id / FILENAME


def drop(checkpoint_dir: str, run_id: str) -> None:
    """Delete a FINISHED run's folder. Such a run is reused, never resumed (a resume of it
    is refused), so its checkpoint only fills the disk: ~285 MB per ResNet-50 run (weights
    + Adam's two moments), 1.6 GB per vgg19. With log_checkpoint it stays as the artifact."""
    shutil.rmtree(path_for(checkpoint_dir, run_id).parent, ignore_errors=True)


class Busy(Exception):
    """Another live process holds the run's claim."""

    def __init__(self, pid: str):
        super().__init__(pid)
        self.pid = pid


def _alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)  # signal 0: only asks whether the process exists
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


class Claim:
    """This process trains the run: an exclusive ``flock`` on ``<folder>/lock``, held until
    ``release()`` or the process's end, however it ends (the kernel drops the lock on
    ``kill -9`` too). A resume takes it first, so a run whose process is still alive (still
    flushing after SIGTERM, or started twice) is never trained by two processes at once,
    which would interleave two writers' metrics and end states in one MLflow run."""

    def __init__(self, checkpoint_dir: str, run_id: str, create: bool = True):
        folder = path_for(checkpoint_dir, run_id).parent
        if create:
            folder.mkdir(parents=True, exist_ok=True)
        self._file = open(folder / "lock", "a+")  # a+: never truncates the holder's PID
        # Forked DataLoader workers share this lock: after a kill -9 of the trainer they hold
        # it until they notice, within seconds; a holder that has exited is waited for.
        deadline = time.monotonic() + 15
        while True:
            try:
                fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                self._file.seek(0)
                pid = self._file.read().strip() or "unknown"
                if _alive(pid) or time.monotonic() > deadline:
                    self._file.close()
                    raise Busy(pid) from None
                time.sleep(0.2)
            except OSError:  # a file system without locks (some NFS mounts): unguarded
                break
        self._file.truncate(0)
        self._file.write(str(os.getpid()))
        self._file.flush()

    def release(self) -> None:
        self._file.close()  # closing the file drops the lock


@dataclass
class Position:
    """Where training stands: ``step`` batches done in all; ``batch`` of them in ``epoch``."""

    step: int
    epoch: int
    batch: int
    order_state: torch.Tensor      # the data sampler's generator state at ``epoch``'s start


def save(path: Path, model, optimizer, position: Position, params: dict[str, str],
         extra: dict | None = None) -> Path:
    """Write the checkpoint (a device sync: it reads every weight). Returns the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "position": {"step": position.step, "epoch": position.epoch, "batch": position.batch,
                     "order_state": position.order_state.clone()},
        "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
                "python": random.getstate(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
        "params": params,
        **(extra or {}),
    }
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    return path


def load(path: Path, model, optimizer, device: torch.device) -> tuple[Position, dict]:
    """Restore the model, optimizer and RNG states in place; returns the position and the
    whole checkpoint (for its params)."""
    # weights_only=False: the file holds numpy and Python RNG states, and it is our own
    # file, written by save() above, found by run ID in the user's checkpoint folder.
    state = torch.load(path, map_location=device, weights_only=False)
    model.load_state_dict(state["model"])
    # load_state_dict takes every group option from the file, the implementation ones too: a
    # run checkpointed on the CPU (capturable=False) would resume on a GPU with an Adam that
    # cannot be captured, and silently run eagerly. Keep the resuming optimizer's; the step
    # counts are then placed as it needs them (on the device when capturable or fused).
    saved = state["optimizer"]
    for group, saved_group in zip(optimizer.param_groups, saved["param_groups"]):
        saved_group.update({k: group[k] for k in IMPLEMENTATION_OPTIONS if k in group})
    optimizer.load_state_dict(saved)
    rng = state["rng"]
    torch.set_rng_state(rng["torch"])
    np.random.set_state(rng["numpy"])
    random.setstate(rng["python"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    p = state["position"]
    return Position(p["step"], p["epoch"], p["batch"], p["order_state"]), state


def read_params(path: Path) -> dict[str, str]:
    """The run parameters a checkpoint was written with (loads the file on the CPU)."""
    return torch.load(path, map_location="cpu", weights_only=False)["params"]
