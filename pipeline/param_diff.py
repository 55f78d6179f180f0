"""Which training parameters two compared runs differ in, besides the one the comparison is
about: named on stderr, at the top of the summary and in a tag, never silently mixed in."""
from __future__ import annotations

from typing import Sequence

from . import names, query
from .config import ALL_LAYERS, Config, fields, format_value

VARIANTS = names.VARIANTS


def is_skip_pair(runs) -> bool:
    """The two runs are a skip and a noskip run, in that order (labelled by variant)."""
    return tuple(runs) == VARIANTS


# Training parameters that cannot move the compared norms: they say where a run is logged,
# what it records, how it is kept, or how the same arithmetic is executed. Every other Config
# field counts, fields added later included: a new parameter is reported until someone
# decides here that it is inert.
INERT_PARAMS = frozenset({
    "skip",                                   # the one difference the comparison is about
    "experiment",                             # where the run was logged
    "layers", "probe",                        # what was recorded; compare reads what both hold
    "num_workers", "data_path",               # the same batches in the same order, bit for bit
    "graph",                                  # the same kernels, replayed from one capture
    "channels_last",                          # a memory layout: rounding order at most
    "flush_every",                            # when the norms are read back, not their values
    "checkpoint_every", "checkpoint_dir", "resume", "log_checkpoint",
    "log_model", "register_as", "log_system_metrics",
    # stop vs continue matters only after a NaN, which the nonfinite.* tags report
    "on_nan",
    # DDP: the ranks' count is compared as world_size (the logged param); how they are
    # spread over machines and where they meet does not reach the arithmetic
    "nproc_per_node", "nnodes", "rdzv_endpoint",
})

# Parameters that decide the numbers only beside a value of another: the data folder of an
# image folder (CIFAR-10 is the same MD5-checked files wherever it lives), the synthetic
# set's sizes, and how often the non-default layers of layers=all become metrics (the
# histories compare reads).
ONLY_WITH = {"data_dir": ("dataset", "imagefolder"),
             "synthetic_size": ("dataset", "synthetic"),
             "synthetic_test_size": ("dataset", "synthetic"),
             "metric_every": ("layers", ALL_LAYERS)}

# `device=auto` is resolved when the run starts; the run's tag has what it resolved to.
RESOLVED_BY_TAG = {"device": names.DEVICE_TAG}


def _param_of(run, name: str):
    """The parsed value ``name`` had in ``run``, or None when the run did not log it."""
    tag = RESOLVED_BY_TAG.get(name)
    if tag and run.data.tags.get(tag):
        return run.data.tags[tag].split(":")[0]  # cuda:0 and cuda:1 compute alike
    raw = run.data.params.get(name)
    return None if raw is None else query.param_value(name, raw)


def differing_params(runs: dict[str, object], labelled_by: str | None = None
                     ) -> list[tuple[str, str, str]]:
    """``(param, first run's value, second's)`` for each training parameter the two runs
    differ in (apart from ``skip``, for a skip pair, and the param ``labelled_by``, whose
    difference is the point), in Config's order, then ``world_size``; values compared
    parsed (``1e-3`` is ``0.001``), shown canonical, "not logged" where a run lacks it."""
    inert = INERT_PARAMS if is_skip_pair(runs) else INERT_PARAMS - {"skip"}
    if labelled_by:
        inert = inert | {labelled_by}
    candidates = [f.name for f in fields(Config) if f.name not in inert]
    found = []
    for name in [*candidates, names.WORLD_SIZE_PARAM]:
        if name in ONLY_WITH:
            other, value = ONLY_WITH[name]
            if all(_param_of(run, other) != value for run in runs.values()):
                continue
        values = [_param_of(run, name) for run in runs.values()]
        if values[0] != values[1]:
            found.append((name, *("not logged" if x is None else format_value(x) for x in values)))
    return found


def differences_line(found: list[tuple[str, str, str]], labels: Sequence[str] = VARIANTS) -> str:
    """``the runs differ in batch_norm (noskip true, skip false), image_size (64, 32); ...``"""
    first, second = labels
    listed = ", ".join(f"{name} ({first} {a}, {second} {b})" if i == 0 else f"{name} ({a}, {b})"
                       for i, (name, a, b) in enumerate(found))
    mixed = ("with the skip connections" if tuple(labels) == VARIANTS
             else "in any difference between them")
    return f"the runs differ in {listed}; the comparison mixes these {mixed}"


def params_note(found: list[tuple[str, str, str]], labels: Sequence[str] = VARIANTS) -> str:
    """The summary's line on the runs' training parameters."""
    if not found:
        return ("Training parameters: the same apart from skip." if tuple(labels) == VARIANTS
                else "Training parameters: the same.")
    return f"**Warning**: {differences_line(found, labels)}."
