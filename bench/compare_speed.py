"""Benchmark: the compare step on two full-size default runs (2 x 156,250 grad-norm points).

Builds a throwaway SQLite store with two runs shaped like a default 10-epoch training run
(5 layers x 31,250 steps, the notebook's 1e-21-style no-skip norms and healthy skip norms,
per-epoch metrics), then times ``compare.compare`` end to end: reading both histories
through ``MlflowClient.get_metric_history``, the statistics, both figures and the uploads.

    python bench/compare_speed.py [--steps 31250] [--out result.json]

Setting up the store takes ~30 s (MLflow's SQLite store ingests ~10k points/s); only the
compare itself is timed.

It also times the difference heatmap of two full ``layers=all`` runs (``norms.npz`` of
31,250 steps x 54 layers each, as tests/test_compare_heatmap.py builds them): the matrix,
the figure and its PNG, which compare draws when both runs have the dense artifact.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

import numpy as np


def build_runs(steps: int, steps_per_epoch: int) -> list[str]:
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.tracking import MlflowClient

    from pipeline import names
    from pipeline.config import DEFAULT_LAYERS

    client = MlflowClient()
    exp = client.create_experiment("compare-bench")
    rng = np.random.default_rng(0)
    ids = []
    for variant, scales in (("noskip", [2e-21, 4e-21, 3e-17, 4e-6, 0.24]),
                            ("skip", [5e-4, 1e-4, 2e-3, 7e-3, 0.24])):
        run = client.create_run(exp, run_name=f"resnet50-{variant}")
        rid = run.info.run_id
        client.log_batch(rid, params=[Param("model", "resnet50"), Param("layers", ",".join(DEFAULT_LAYERS))],
                         tags=[RunTag(names.VARIANT_TAG, variant),
                               RunTag(names.STEPS_PER_EPOCH_TAG, str(steps_per_epoch))])
        metrics = []
        for layer, scale in zip(DEFAULT_LAYERS, scales):
            values = scale * np.exp(rng.normal(0, 0.3, steps))
            metrics += [Metric(names.grad_norm(layer), float(v), 0, i) for i, v in enumerate(values)]
        epochs = max(1, steps // steps_per_epoch)
        for key in (names.TRAIN_ACCURACY, names.TEST_ACCURACY, names.TEST_LOSS):
            metrics += [Metric(key, 0.1, 0, e) for e in range(epochs)]
        metrics.append(Metric(names.TRAIN_LOSS, 2.3026, 0, steps - 1))
        for i in range(0, len(metrics), 1000):
            client.log_batch(rid, metrics=metrics[i:i + 1000])
        client.set_terminated(rid, "FINISHED")
        ids.append(rid)
    return ids


def time_heatmap(folder: str, steps: int = 31_250, layers: int = 54) -> float:
    """Seconds for plots.difference_matrix + difference_heatmap + savefig on a full pair."""
    from pipeline import plots

    rng = np.random.default_rng(2)
    names_ = np.array([f"layer{i}" for i in range(layers)], dtype=str)
    pair = []
    for low in (-22, -3):
        norms = 10.0 ** rng.uniform(low, 0, (steps, layers))
        pair.append({"steps": np.arange(steps, dtype=np.int64), "layers": names_,
                     "norms": norms, "loss": np.full(steps, 2.3)})
    pair[1]["norms"][20_000:, 0] = 0.0
    t = time.perf_counter()
    d = plots.difference_matrix(*pair)
    fig = plots.difference_heatmap(d, "resnet50", batches_per_epoch=3_125)
    fig.savefig(os.path.join(folder, "difference.png"))
    plots.close(fig)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=31_250, help="steps per run (default: 10 epochs x 3,125)")
    ap.add_argument("--steps-per-epoch", type=int, default=3_125)
    ap.add_argument("--out", help="write the result as JSON here")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp}/mlflow.db"
        import mlflow

        from pipeline import compare, query

        mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
        t = time.perf_counter()
        ids = build_runs(args.steps, args.steps_per_epoch)
        setup_s = time.perf_counter() - t

        t = time.perf_counter()
        for rid in ids:
            query.gradient_history(rid)
        read_s = time.perf_counter() - t

        t = time.perf_counter()
        compare.compare(run_ids=ids)
        compare_s = time.perf_counter() - t

        heatmap_s = time_heatmap(tmp)

    result = {
        "benchmark": "compare_speed", "points_per_run": 5 * args.steps,
        "setup_seconds": round(setup_s, 2), "read_histories_seconds": round(read_s, 2),
        "compare_seconds": round(compare_s, 2), "heatmap_31250x54_seconds": round(heatmap_s, 2),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores", "python": platform.python_version(),
        "mlflow": mlflow.__version__, "date": time.strftime("%Y-%m-%d"),
    }
    print(f"compare of 2 x {5 * args.steps:,} points: {compare_s:.1f} s "
          f"(of which reading both histories ~{read_s:.1f} s); store set-up {setup_s:.0f} s")
    print(f"difference heatmap of 2 x 31,250 steps x 54 layers: {heatmap_s:.1f} s")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
