"""What the steps print when they end: the answer, and where to see it (docs:
guide/run-logs.md, "The terminal"). Plain text off a terminal (CI logs, pipes) or with
NO_COLOR set; the statuses in colour on one.

Printed to stdout, each line whole, so the answer is what a pipe or a log keeps; progress
and notices stay on stderr.
"""
from __future__ import annotations

import math
import os
import sys
import urllib.parse
from typing import Sequence, TextIO

from . import health, names

# ANSI colours of the statuses (SGR codes); none off a terminal.
_COLOURS = {"Healthy": "32", "healthy": "32", "Weak": "33", "Tiny": "33", "Vanishing": "31",
            "vanishing": "31", "Dead": "31", "dead": "31", "Exploding": "35",
            "exploding": "35"}
DEFAULT_UI = "http://127.0.0.1:5000"  # where `mlflow ui` serves by default


def colour_on(stream: TextIO) -> bool:
    """Colour only on a terminal, and never with NO_COLOR (no-color.org) set."""
    return bool(getattr(stream, "isatty", lambda: False)()) and not os.environ.get("NO_COLOR")


def paint(text: str, status: str, on: bool) -> str:
    code = _COLOURS.get(status)
    return f"\033[{code}m{text}\033[0m" if on and code else text


def g(x) -> str:
    """3 significant digits, as the summaries write numbers; a dash for none."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.3g}"


def table(headers: Sequence[str], rows: Sequence[Sequence], statuses: Sequence[int] = (),
          on: bool = False) -> list[str]:
    """Aligned text columns, numbers to the right; the cells of the ``statuses`` columns
    are painted by their value. Padding is computed on the plain text."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    numeric = [bool(cells) and all(_numberish(r[i]) for r in cells) for i in range(len(headers))]

    def line(row, paint_it):
        out = []
        for i, cell in enumerate(row):
            padded = cell.rjust(widths[i]) if numeric[i] else cell.ljust(widths[i])
            out.append(paint(padded, cell, on) if paint_it and i in statuses else padded)
        return "  " + "  ".join(out).rstrip()

    return [line(headers, False)] + [line(r, True) for r in cells]


def _numberish(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return text in ("-", "inf", "-inf", "nan")


def run_url(base: str, experiment_id: str, run_id: str) -> str:
    """The run's page in the UI's model-training view."""
    return (f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
            "?workflowType=machine_learning")


def how_to_open(tracking_uri: str, experiment_id: str, run_id: str) -> list[str]:
    """A server's URL for the run; for a local store, the `mlflow ui` command that serves
    it, then the URL; then where its report.html is. ``tracking_uri`` is shown as given, so
    pass it without credentials."""
    scheme = urllib.parse.urlsplit(tracking_uri).scheme
    report = f"  report: {names.REPORT_HTML} in the run's Artifacts tab (the answer on one page)"
    if scheme in ("http", "https"):
        return [f"  open: {run_url(tracking_uri, experiment_id, run_id)}", report]
    return [f"  open: mlflow ui --backend-store-uri {tracking_uri}",
            f"        then {run_url(DEFAULT_UI, experiment_id, run_id)}", report]


def say(lines: Sequence[str], stream: TextIO | None = None) -> None:
    stream = stream or sys.stdout
    stream.write("".join(f"{line}\n" for line in lines))
    stream.flush()


# --- the three summaries ------------------------------------------------------------------------
def training_lines(name: str, run_id: str, tags: dict[str, str], layers: Sequence[str],
                   medians: Sequence[float], statuses: Sequence[str], on: bool) -> list[str]:
    """``train``'s end: the run's health, its first vanishing layer, each layer's median."""
    verdict = tags.get("gradient.health", "unknown")
    first = tags.get("gradient.first_vanishing_layer", "none")
    head = (f"{name} ({run_id}): gradient {paint(verdict, verdict, on)}"
            + (f"; first vanishing layer (from the head down): {first}" if first != "none" else ""))
    rows = [(layer, g(m), s) for layer, m, s in zip(layers, medians, statuses)]
    return [head, *table(("layer", "median norm", "status"), rows, statuses=(2,), on=on)]


def compare_lines(labels: Sequence[str], diagnosis: Sequence[str], layers: Sequence[str],
                  medians: dict[str, Sequence[float]], statuses: dict[str, Sequence[str]],
                  on: bool) -> list[str]:
    """``compare``'s end: the diagnosis, then per layer each run's median and status, and
    how many decades the second sits above the first."""
    a, b = labels
    rows = []
    for i, layer in enumerate(layers):
        apart = health.decades(medians[b][i], medians[a][i])
        rows.append((layer, g(medians[a][i]), statuses[a][i], g(medians[b][i]),
                     statuses[b][i], "-" if math.isnan(apart) else f"{apart:+.1f}".replace("-0.0", "0.0").replace("+0.0", "0.0")))
    headers = ("layer", f"{a} median", "status", f"{b} median", "status", f"decades {b}/{a}")
    return [*(line.replace("`", "") for line in diagnosis),
            *table(headers, rows, statuses=(2, 4), on=on)]


def sweep_lines(rows: Sequence[dict], on: bool) -> list[str]:
    """``sweep``'s end: each cell's first-layer median against its depth."""
    cells = [(r["cell"], str(r["depth"]), r["layer"], g(r["median"]), r["health"] or "-")
             for r in rows]
    return ["first-layer gradient against depth:",
            *table(("cell", "depth", "first layer", "median norm", "health"), cells,
                   statuses=(4,), on=on)]
