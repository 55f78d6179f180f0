"""Delivers a run's writes in order, and keeps them in the spool while the server is away."""
from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

from .credentials import is_unreachable, public_uri, short
from .spool import Spool, apply, spool_root

RETRY_SECONDS = 5.0  # the longest pause between two delivery attempts


def say(line: str) -> None:
    """One line on stderr, above any progress bar."""
    from tqdm.auto import tqdm

    tqdm.write(line, file=sys.stderr)


class Outbox:
    """Delivers a run's writes in order. A write the server cannot take (``is_unreachable``)
    goes to a ``Spool``, and so does every later one while it holds anything, so the order
    holds; a thread retries the oldest every few seconds (1, 2, 4, then every 5 s) and, once
    one gets through, delivers the rest, oldest first, then removes the spool."""

    def __init__(self, run_id: str, client: MlflowClient, experiment_id: str | None = None):
        self.run_id, self.client, self.experiment_id = run_id, client, experiment_id
        self.uri = mlflow.get_tracking_uri()
        self.lock = threading.Condition(threading.RLock())
        self.spool: Spool | None = None
        self.error: BaseException | None = None  # the server refused a replayed write
        self.spooled = [0, 0]                    # points, other writes: ever spooled
        self.first_failure: str | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()

    def _new_folder(self) -> Path:
        """``<spool root>/<run ID>``; ``<run ID>-2``, ... when an earlier process of the same
        run (a resumed one) left its spool there, which `sync` delivers in name order."""
        root, n = spool_root(), 1
        while (root / (self.run_id if n == 1 else f"{self.run_id}-{n}")).exists():
            n += 1
        return root / (self.run_id if n == 1 else f"{self.run_id}-{n}")

    def send(self, record: dict) -> None:
        """Deliver ``record`` now, or keep it in the spool (then it is delivered later)."""
        with self.lock:
            if self.spool is None:
                try:
                    apply(self.client, self.run_id, record)
                    return
                except Exception as e:
                    if not is_unreachable(e):
                        raise
                    self._open(e)
            self._keep(record)

    def keep(self, record: dict, error: BaseException | None = None) -> None:
        """Put ``record`` in the spool without trying the server (``error``: it just failed)."""
        with self.lock:
            if self.spool is None:
                self._open(error)
            self._keep(record)

    @property
    def waiting(self) -> bool:
        with self.lock:
            return self.spool is not None

    def _keep(self, record: dict) -> None:
        self.spool.add(record)
        if record["op"] == "metrics":
            self.spooled[0] += len(record["metrics"])
        else:
            self.spooled[1] += 1
        self.lock.notify_all()

    def _open(self, error: BaseException | None) -> None:
        self.spool = Spool.create(self._new_folder(), self.run_id, self.experiment_id, self.uri)
        if self.first_failure is None:
            self.first_failure = time.strftime("%Y-%m-%d %H:%M:%S")
        why = f" ({short(error)})" if error is not None else ""
        say(f"notice: the tracking server at {public_uri(self.uri)} is unreachable{why}; "
             f"training goes on, writes wait in {self.spool.folder} and are retried every "
             f"{RETRY_SECONDS:.0f} s")
        self._stop.clear()
        self._thread = threading.Thread(target=self._retry, name="mlflow-spool-retry",
                                        daemon=True)
        self._thread.start()

    def _retry(self) -> None:
        delay = 1.0
        while not self._stop.is_set():
            self._wake.wait(delay)
            self._wake.clear()
            if self._stop.is_set() or self._replay() or self.error is not None:
                return
            delay = min(2 * delay, RETRY_SECONDS)

    def _replay(self) -> bool:
        """Deliver the spool, oldest first; True once it is empty (and removed)."""
        present: dict[str, set[int]] = {}
        delivered = [0, 0]
        with self.lock:
            spool = self.spool
        while spool is not None and not self._stop.is_set():
            with self.lock:
                if not spool.records:
                    self.spool = None
                    spool.remove()
                    say(f"notice: the tracking server at {public_uri(self.uri)} is back; "
                         f"{delivered[0]} points and {delivered[1]} other writes that waited "
                         "were delivered")
                    self.lock.notify_all()
                    return True
                record = spool.records[0]
            try:
                apply(self.client, self.run_id, record, spool.folder, present)
            except Exception as e:  # noqa: BLE001 - an outage: retried; else: kept, reported
                if is_unreachable(e):
                    return False
                with self.lock:
                    self.error = e
                    self.lock.notify_all()
                return False
            with self.lock:
                spool.delivered(record)
                if record["op"] == "metrics":
                    delivered[0] += len(record["metrics"])
                else:
                    delivered[1] += 1
        return False

    def drain(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s for the spool to be delivered; True when nothing waits."""
        deadline = time.monotonic() + timeout
        self._wake.set()  # try now, not at the next tick
        with self.lock:
            while self.spool is not None and self.error is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.lock.wait(min(left, 0.5))
            return self.spool is None

    def abandon(self) -> Spool | None:
        """Stop retrying; what still waits stays in the spool folder, for `sync`."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        with self.lock:
            spool, self.spool = self.spool, None
        if spool is not None:
            spool.close()
        return spool
