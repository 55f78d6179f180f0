"""Shared fixtures: a throw-away MLflow store per test, and real subprocesses.

Every test that touches MLflow gets its own sqlite store in a temporary directory, and
runs with that directory as its working directory, so MLflow's default artifact root
(``./mlruns``) lands there too and nothing is written into the repository.

``require(part, reason)`` is the one policy for a real part a test needs that is missing
(Chromium, PostgreSQL's binaries, playwright): it skips with a printed reason on a
developer's machine and fails under ``CI=true``, so CI never goes green by skipping.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import NoReturn

import numpy as np
import pytest

# One home for the paths and the store type, shared with the compare/query/UI helpers.
from runs_helpers import REPO_ROOT, RUN_VARS, VENV_BIN, Store


# --- real parts a test needs ----------------------------------------------------------------
def under_ci() -> bool:
    """``CI=true`` (or 1/yes), as CI services and ``.ci/run`` set it."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def require(part: str, reason: str) -> NoReturn:
    """Call where a real part the test needs (``part``: "chromium", "playwright",
    "postgresql", ...) is missing; ``reason`` says why and how to install it.

    Under ``CI=true`` the test fails with that one line: a CI that skipped it would be green
    without having checked anything. Elsewhere it skips, and the reason is printed (and
    listed by ``-ra``). A part that is there but does not start is a failure everywhere:
    call ``pytest.fail`` for that, not this.
    """
    line = f"{part} is needed and missing: {reason}"
    if under_ci():
        pytest.fail(f"CI=true: {line}", pytrace=False)
    print(f"SKIPPED: {line}", file=sys.stderr)
    pytest.skip(line)


def pytest_runtest_setup(item: pytest.Item) -> None:
    """A ``gpu`` test skips on a machine without CUDA, saying where it runs; under
    ``GPU_CHECK=1`` (bench/gpu_check.sh, on a GPU machine) a missing GPU fails it instead."""
    if item.get_closest_marker("gpu") is None:
        return
    import torch

    if torch.cuda.is_available():
        return
    if os.environ.get("GPU_CHECK") == "1":
        pytest.fail("GPU_CHECK=1, but torch sees no CUDA device", pytrace=False)
    pytest.skip("needs a CUDA GPU (bench/gpu_check.sh runs it on one)")


def _store_in(directory: Path) -> Store:
    return Store(directory, f"sqlite:///{directory / 'mlflow.db'}")


def _isolate(mp: pytest.MonkeyPatch, store: Store) -> None:
    mp.setenv("MLFLOW_TRACKING_URI", store.uri)
    for var in RUN_VARS:
        mp.delenv(var, raising=False)
    mp.chdir(store.dir)


@pytest.fixture
def tracking_store(tmp_path, monkeypatch) -> Store:
    """A fresh sqlite MLflow store in tmp_path; MLFLOW_TRACKING_URI points at it and the
    working directory is tmp_path (so ./mlruns artifacts land there)."""
    store = _store_in(tmp_path)
    _isolate(monkeypatch, store)
    return store


@pytest.fixture(scope="module")
def module_tracking_store(tmp_path_factory) -> Store:
    """The same as ``tracking_store``, shared by the tests of one module (one slow run,
    several checks of its result)."""
    store = _store_in(tmp_path_factory.mktemp("store"))
    with pytest.MonkeyPatch.context() as mp:
        _isolate(mp, store)
        yield store


def subprocess_env(store: Store | None = None, **extra: str) -> dict[str, str]:
    """The current environment with the venv first on PATH, this checkout importable,
    and (when given) the tracking URI of ``store``."""
    env = dict(os.environ)
    for var in RUN_VARS:
        env.pop(var, None)
    env["PATH"] = VENV_BIN + os.pathsep + env.get("PATH", "")
    env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    if store is not None:
        env["MLFLOW_TRACKING_URI"] = store.uri
    env.update(extra)
    return env


def run_pipeline(args: list[str], cwd: Path, store: Store | None = None, timeout: float = 120,
                 **extra_env: str) -> subprocess.CompletedProcess:
    """``python -m pipeline ARGS`` as a real subprocess, output captured as text."""
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=cwd,
                          env=subprocess_env(store, **extra_env), capture_output=True,
                          text=True, timeout=timeout)


def run_mlflow_project(params: dict[str, str], cwd: Path, store: Store, entry_point: str = "main",
                       timeout: float = 180, **extra_env: str) -> subprocess.CompletedProcess:
    """``mlflow run <repo> --env-manager local -e ENTRY -P k=v ...`` as a real subprocess."""
    cmd = [sys.executable, "-m", "mlflow", "run", str(REPO_ROOT), "--env-manager", "local",
           "-e", entry_point]
    for k, v in params.items():
        cmd += ["-P", f"{k}={v}"]
    return subprocess.run(cmd, cwd=cwd, env=subprocess_env(store, **extra_env),
                          capture_output=True, text=True, timeout=timeout)


def describe_process(proc: subprocess.CompletedProcess) -> str:
    """For assertion messages: the exit code and the tail of both streams."""
    return (f"exit code {proc.returncode}\n--- stdout ---\n{proc.stdout[-3000:]}"
            f"\n--- stderr ---\n{proc.stderr[-5000:]}")


def the_error_line(proc: subprocess.CompletedProcess, starts: str = "error: ") -> str:
    """The process's one ``error:`` line on stderr, which must start with ``starts``
    (other lines may be there: MLflow's own logging, a server's)."""
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(starts), describe_process(proc)
    return errors[0]


def make_image_folder(root: Path, classes: int = 10, per_class: dict[str, int] | None = None,
                      size: tuple[int, int] = (20, 24), seed: int = 0) -> dict[str, list[Path]]:
    """A tiny ``root/<split>/<class>/<image>`` tree of random RGB images, PNG and JPEG mixed.

    Returns the written files by split, in ImageFolder's order (class, then file name).
    """
    from PIL import Image

    per_class = per_class or {"train": 2, "test": 1}
    rng = np.random.default_rng(seed)
    written: dict[str, list[Path]] = {}
    for split, n in per_class.items():
        written[split] = []
        for c in range(classes):
            folder = root / split / f"class_{c:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
                # PNG is lossless (a test can compare pixels); JPEG checks the decoder path.
                path = folder / (f"img_{i:02d}.png" if i % 2 == 0 else f"img_{i:02d}.jpg")
                Image.fromarray(pixels).save(path)
                written[split].append(path)
    return written


def float32_rtol(net, skip: str | None = None) -> float:
    """How far two float32 computations of one gradient norm may differ (one process against
    DDP ranks: different batch shapes and thread counts, so different kernels and orders of
    every float32 sum; each is bitwise reproducible on its own path, neither is exact).

    The norm at the first layer is a chain of dot products through every layer, forward and
    backward, N = sum over layers of (fan_in + fan_out) products in all. Rounding errors of
    independent sign add like a random walk, so one float32 result is within ~lambda *
    sqrt(N) * u of the exact value (u = 2**-24; Higham and Mary, "A new approach to
    probabilistic rounding error analysis", SIAM J. Sci. Comput. 2019), lambda = 3 for a
    margin; two results are within twice that. Modules whose name contains ``skip`` are left
    out (for a network without skips: the downsample convs that never run).
    """
    import math

    from torch import nn

    n = 0
    for name, module in net.named_modules():
        if skip and skip in name:
            continue
        if isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            n += (module.in_channels + module.out_channels) * kh * kw
        elif isinstance(module, nn.Linear):
            n += module.in_features + module.out_features
    return 2 * 3 * math.sqrt(n) * 2.0 ** -24
