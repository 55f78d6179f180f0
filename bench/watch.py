"""pipeline.watch's overhead: a plain training loop with and without it, on this machine.

    python bench/watch.py [--steps 20] [--repeats 9] [--batch-size 16] [--image-size 32]
                          [--threads 1] [--compile] [--out result.json]

The network is the benchmark's own small CNN (a stem, six 3x3 convs in three widths, a
linear head: 8 conv/linear layers), trained by a plain loop (forward, cross-entropy,
backward, Adam step) on random tensors, inside an MLflow run of a throwaway SQLite store.
Rows:

  no watch        the loop alone (the run open, nothing logged)
  watch auto      pipeline.watch(model, optimizer, layers="auto"): 5 layers, the loss
  watch all       layers="all": 8 layers, every step (metric_every=1)
  watch both      layers="auto", probe="both": output and weight gradients
  (--compile)     the same model under torch.compile (inductor), without and with the watch

Each figure is the median over ``--repeats`` windows of ``--steps`` steps, after 3 warm-up
steps; the rows take turns within each repeat, so a neighbour's load falls on all of them.
Two clocks: wall time, and this process's CPU time (all its threads, the metric writer's
included), which other processes' load disturbs far less on a shared machine. With
``--threads 1`` (the default) torch computes on one thread, so CPU time is compute plus the
watch's host work plus the writer thread, not idle spinning. The block's exit (the last
readback, norms.npz, four plots, the tags) is timed apart, once per row and repeat.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import pipeline  # noqa: E402

WARMUP = 3


class BenchNet(nn.Module):
    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, padding=1)
        widths = [32, 32, 64, 64, 128, 128]
        self.convs = nn.ModuleList(nn.Conv2d(a, b, 3, padding=1, stride=2 if b != a else 1)
                                   for a, b in zip([32] + widths[:-1], widths))
        self.head = nn.Linear(128, classes)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        for conv in self.convs:
            x = torch.relu(conv(x))
        return self.head(x.mean((2, 3)))


ROWS = {
    "no watch": None,
    "watch auto": dict(layers="auto"),
    "watch all": dict(layers="all", metric_every=1),
    "watch both": dict(layers="auto", probe="both"),
}


def _window(row: dict | None, args, compiled: bool) -> tuple[float, float, float]:
    """Wall and CPU seconds per step over one window, and the seconds the block's exit took."""
    import mlflow

    torch.manual_seed(0)
    model = BenchNet()
    net = torch.compile(model) if compiled else model
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=g)
    y = torch.randint(0, 10, (args.batch_size,), generator=g)
    with mlflow.start_run():
        watch = pipeline.watch(net, optimizer, **row) if row is not None else None
        for i in range(WARMUP + args.steps):
            if i == WARMUP:
                started, cpu = time.perf_counter(), time.process_time()
            loss = nn.functional.cross_entropy(net(x), y)
            if watch is not None:
                watch.loss(loss)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        per_step = (time.perf_counter() - started) / args.steps
        cpu_per_step = (time.process_time() - cpu) / args.steps
        ended = time.perf_counter()
        if watch is not None:
            watch.close()
        return per_step, cpu_per_step, time.perf_counter() - ended


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=1, help="torch's intra-op threads")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--compile", action="store_true",
                        help="also the torch.compile'd model (inductor; compiles take minutes on 2 cores)")
    parser.add_argument("--out", help="write the result as JSON here")
    args = parser.parse_args()

    import mlflow

    torch.set_num_threads(args.threads)
    rows = [(name, spec, False) for name, spec in ROWS.items()]
    if args.compile:
        rows += [("compiled, no watch", None, True), ("compiled, watch auto", ROWS["watch auto"], True)]
    times: dict[str, list[float]] = {name: [] for name, _, _ in rows}
    cpus: dict[str, list[float]] = {name: [] for name, _, _ in rows}
    exits: dict[str, list[float]] = {name: [] for name, _, _ in rows}
    with tempfile.TemporaryDirectory(prefix="bench-watch-") as tmp:
        os.chdir(tmp)  # the store's artifacts (./mlruns) land in tmp too
        mlflow.set_tracking_uri(f"sqlite:///{tmp}/mlflow.db")
        for repeat in range(args.repeats):
            for name, spec, compiled in rows:
                per_step, cpu_step, exit_s = _window(spec, args, compiled)
                times[name].append(per_step)
                cpus[name].append(cpu_step)
                exits[name].append(exit_s)
                print(f"repeat {repeat + 1}/{args.repeats} {name:22s} {per_step * 1e3:7.2f} ms/step "
                      f"wall, {cpu_step * 1e3:7.2f} CPU", file=sys.stderr, flush=True)
    medians = {name: statistics.median(v) for name, v in times.items()}
    cpu_medians = {name: statistics.median(v) for name, v in cpus.items()}
    result = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
                   f"{torch.get_num_threads()} threads",
        "args": vars(args),
        "rows": {name: {"wall_ms_per_step": medians[name] * 1e3,
                        "cpu_ms_per_step": cpu_medians[name] * 1e3,
                        "all_wall_ms": [t * 1e3 for t in times[name]],
                        "all_cpu_ms": [t * 1e3 for t in cpus[name]],
                        "exit_s": statistics.median(exits[name])} for name in times},
    }

    def against(values: dict[str, float], name: str, compiled: bool) -> str:
        base = values["compiled, no watch" if compiled else "no watch"]
        return "" if name in ("no watch", "compiled, no watch") else (
            f"{(values[name] - base) * 1e3:+.2f} ms ({(values[name] - base) / base:+.1%})")

    print(f"| row | CPU ms/step | vs no watch | wall ms/step (range) | vs no watch | block exit |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, _, compiled in rows:
        lo, hi = min(times[name]) * 1e3, max(times[name]) * 1e3
        print(f"| {name} | {cpu_medians[name] * 1e3:.2f} | {against(cpu_medians, name, compiled)} | "
              f"{medians[name] * 1e3:.2f} ({lo:.0f}-{hi:.0f}) | {against(medians, name, compiled)} | "
              f"{result['rows'][name]['exit_s']:.2f} s |")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
