"""SIGINT and SIGTERM, everywhere the project meets them: the command, the training loop and
the data loader's workers (docs: operations/troubleshooting.md, "Signals").

* The command (``unwind_on_sigterm``): SIGTERM unwinds like Ctrl-C, so a started run ends
  KILLED instead of staying RUNNING; held back until the imports are done.
* The training loop (``stop_on_signals``): the first signal stops it after the current step,
  with a checkpoint; a second one interrupts at once.
* Loader workers (``worker_init``): out of the process group, so group signals reach only the
  main process, which stops after its step and shuts them down.

Torch-free: the command installs its handler before anything heavy is imported.
"""
from __future__ import annotations

import contextlib
import os
import signal
import threading


class Terminated(KeyboardInterrupt):
    """SIGTERM outside the training loop (inside it, the loop stops after its step)."""

    signum = signal.SIGTERM


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM: the run stopped after a step, flushed and checkpointed."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


# --- the command ---------------------------------------------------------------------------
def unwind_on_sigterm() -> None:
    """Let SIGTERM unwind like Ctrl-C. Python's default ends the process on the spot, which
    leaves a started MLflow run RUNNING (say, SIGTERM while the model is exported);
    unwinding ends it KILLED (``Tracker.ending``), and the command exits 143. Not for a
    torchrun rank, whose agent stops the ranks and ends the run (the caller's to check).

    SIGTERM is held back (blocked) until ``let_sigterm_in``: an interrupt inside a C
    extension's import (torch, pandas under MLflow) comes back as an unrelated error (a
    SystemError, or an ImportError of a half-imported module)."""
    if threading.current_thread() is not threading.main_thread():
        return

    def handler(signum, frame):
        raise Terminated("SIGTERM")

    signal.signal(signal.SIGTERM, handler)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})


def let_sigterm_in() -> None:
    """A SIGTERM held back since the start arrives now (as ``Terminated``)."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})


def interrupt_behind(e: BaseException | None) -> KeyboardInterrupt | None:
    """The interrupt in ``e``'s chain of causes, if any: Ctrl-C during an import comes back
    as click's Abort, or as a C extension's SystemError."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, KeyboardInterrupt):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


# --- the training loop ---------------------------------------------------------------------
@contextlib.contextmanager
def stop_on_signals():
    """The first SIGINT/SIGTERM asks the loop to stop after the current step (a host flag,
    checked between steps); a second one interrupts at once. Yields the flag's holder."""
    state = {"signum": None}

    def handler(signum, frame):
        if state["signum"] is not None:
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: stopped at once")
        state["signum"] = signum

    if threading.current_thread() is not threading.main_thread():
        yield state  # signals reach the main thread only
        return
    saved = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield state
    finally:
        for s, h in saved.items():
            signal.signal(s, h)


# --- the data loader's workers ---------------------------------------------------------------
def _sigterm_as_sigint(signum, frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


def worker_init(worker_id: int) -> None:
    """A DataLoader's ``worker_init_fn``. Signals meant for the run reach the main process,
    which stops after its step, checkpoints and ends the run KILLED; a loader worker killed
    by one would fail the run instead ("DataLoader worker ... exited unexpectedly"), and a
    worker that quits on one leaves a test pass or the data preparation without its images.

    So each worker leaves the process group: signals sent to the group (Ctrl-C in a
    terminal, `timeout`, `kill -- -PGID`) no longer reach it, and the main process shuts it
    down as usual. A SIGTERM sent to the worker itself (a scheduler that signals every
    process) ends it quietly, as SIGINT does (PyTorch's worker loop takes KeyboardInterrupt
    to mean "the main process stops too")."""
    os.setpgrp()
    signal.signal(signal.SIGTERM, _sigterm_as_sigint)
