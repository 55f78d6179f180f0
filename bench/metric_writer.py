"""Benchmark: what the log10 twins cost the metric writer (BENCHMARKS.md, "The log10 twins").

Streams the probe chunks of a default run's five layers through the real writer
(``Collector`` -> ``Tracker.stream``/``submit`` -> ``log_batch`` into a throwaway SQLite
store, the default store) twice: as training logs them now (each norm and its
``grad_norm_log10`` twin, and the loss: 11 keys) and without the twins (6 keys). Reports the
writer's points per second and its seconds per 1,000 training steps. The writer is a
background thread: the training step waits for it only if it falls behind.

    python bench/metric_writer.py [--steps 3000] [--repeats 3] [--out result.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time

import numpy as np
import torch


def one_pass(steps: int, twins: bool, rows_per_chunk: int = 100) -> tuple[float, int]:
    """Seconds from the first submit to the last point in the store, and the points sent."""
    from mlflow.tracking import MlflowClient

    from pipeline import names
    from pipeline.config import DEFAULT_LAYERS
    from pipeline.gradient_flow import Collector
    from pipeline.probes import Chunk
    from pipeline.tracking import Tracker

    client = MlflowClient()
    run_id = client.create_run(client.create_experiment(f"writer-{time.time_ns()}")).info.run_id
    tracker = Tracker(run_id)
    collector = Collector(DEFAULT_LAYERS, DEFAULT_LAYERS, metric_every=100)
    if not twins:  # what the writer sent before the twins: the norms, then the loss
        collector._norm_keys = [names.grad_norm(layer) for layer in DEFAULT_LAYERS]
        collector.metric_values = lambda full: full[:, list(range(len(DEFAULT_LAYERS) + 1))]
    rng = np.random.default_rng(0)
    chunks = []
    for first in range(0, steps, rows_per_chunk):
        rows = torch.from_numpy(rng.random((rows_per_chunk, len(DEFAULT_LAYERS) + 1)) ** 2)
        chunks.append(Chunk(first, rows, None, [0] * rows_per_chunk, True, len(DEFAULT_LAYERS)))
    tracker.stream(collector.keys)
    started = time.perf_counter()
    for chunk in chunks:
        tracker.submit(collector.wrap(chunk))
    series = tracker.flush()
    seconds = time.perf_counter() - started
    client.set_terminated(run_id)
    return seconds, sum(len(v) for v in series.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp}/mlflow.db"
        os.chdir(tmp)
        results = {}
        for twins in (False, True):
            runs = [one_pass(args.steps, twins) for _ in range(args.repeats)]
            seconds = statistics.median(s for s, _ in runs)
            points = runs[0][1]
            results["with twins" if twins else "without twins"] = {
                "points": points, "seconds": round(seconds, 3),
                "points_per_second": round(points / seconds),
                "seconds_per_1000_steps": round(seconds * 1000 / args.steps, 3)}
    print(f"{'':16} {'points':>8} {'s':>7} {'points/s':>9} {'s/1000 steps':>13}")
    for name, r in results.items():
        print(f"{name:16} {r['points']:>8} {r['seconds']:>7} {r['points_per_second']:>9} "
              f"{r['seconds_per_1000_steps']:>13}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"machine": platform.processor() or platform.machine(),
                       "cpus": os.cpu_count(), "steps": args.steps, "results": results}, f,
                      indent=2)


if __name__ == "__main__":
    main()
