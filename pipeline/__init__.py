"""Gradient flow in deep networks, tracked in MLflow. See README.md."""
from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path

# On Apple's MPS, let operators it lacks run on the CPU (PyTorch warns once per operator,
# naming it) instead of failing the run. Read by torch when it starts, hence here.
os.environ.setdefault("PYTORCH_ENABLE_MPS_FALLBACK", "1")

__version__ = "0.1.0"


@functools.cache
def code_version() -> str:
    """A digest of this package's source: equal digests mean the same training code.

    ``all`` reuses a finished run only when its ``code_version`` tag equals this, so an edit
    to any module (even uncommitted) retrains instead of reusing a stale result.
    """
    digest = hashlib.sha256()
    root = Path(__file__).parent
    for path in sorted(root.rglob("*.py")):  # subpackages (tracking/) too
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def __getattr__(name: str):
    """``pipeline.watch`` (pipeline/watcher.py), imported on first use: ``import pipeline``
    stays torch-free and fast for the command line."""
    if name == "watch":
        from .watcher import watch

        return watch
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
