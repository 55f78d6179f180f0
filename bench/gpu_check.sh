#!/usr/bin/env bash
# Everything that needs a GPU, in one short run on a bare GPU machine:
#   1. every GPU-only test (pytest -m gpu: graph == eager, no host sync of a probed step or
#      of the captured step, train.run on CUDA, device=auto picks the GPU); GPU_CHECK=1 makes
#      a test that finds no CUDA device fail rather than skip;
#   2. the training-step benchmark (bench/train_step.py), the table BENCHMARKS.md quotes;
#   3. the founding experiment on real images: `all` (both variants + compare) on the
#      CIFAR-10 JPEG copy at 224 px, timed wall-clock including data preparation.
#
# Usage: bench/gpu_check.sh [STEPS...]   STEPS: tests bench experiment (default: all three),
#        run in the order given (on a short lease, the one that matters most first)
# Env:   OUT (results folder, default ./gpu-results), EPOCHS (experiment, default 10),
#        PRECISION (experiment, default "default"), CIFAR_TGZ (the JPEG archive; default
#        .data/cifar10-jpg.tar.gz; the docs' Getting started, "Data", says what it is), BENCH_ARGS
#        (benchmark options, e.g. "--steps 50 --repeats 2" to fit a short device lease), EXTRA
#        (more `all` options, e.g. "--image-size 32 --max-steps 5" for a CPU dry run),
#        EXPERIMENT_TIMEOUT (seconds; the experiment is then stopped with SIGTERM, so a slow
#        path cannot eat a whole lease: its runs end KILLED, and are summarised as they are).
# The machine may have torch and torchvision but no MLflow: wheels in .whl/ (see
# BENCHMARKS.md, "Reproducing the GPU figures") are installed into /tmp/site first.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-results}
EPOCHS=${EPOCHS:-10}
PRECISION=${PRECISION:-default}
CIFAR_TGZ=${CIFAR_TGZ:-.data/cifar10-jpg.tar.gz}
STEPS=${*:-tests bench experiment}
for step in $STEPS; do  # all checked before any runs: a typo must not cost a lease
    case $step in
        tests|bench|experiment) ;;
        *) echo "gpu_check: unknown step '$step' (allowed: tests, bench, experiment)"; exit 2 ;;
    esac
done
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if ! python3 -c "import mlflow" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || { echo "gpu_check: no MLflow and no wheels"; exit 1; }
    export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
{ nvidia-smi; python3 -c "import torch, mlflow; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'mlflow', mlflow.__version__)"; python3 -m pip show typing-extensions anyio protobuf packaging pyarrow 2>/dev/null | grep -E "^(Name|Version)"; } > "$OUT/machine.txt" 2>&1
tail -12 "$OUT/machine.txt"
status=0

tests() {
    echo "== GPU tests"
    mkdir -p "$OUT/diffs"
    # -v: a log cut short by the lease still names every test that finished. Every module is
    # collected (a GPU test is found wherever it lives); one that cannot be imported on this
    # machine is reported and fails the step, and the others' GPU tests still run.
    GPU_CHECK=1 GPU_REPORT_DIR="$OUT/diffs" python3 -m pytest -v -p no:cacheprovider -rs -m gpu \
        --continue-on-collection-errors tests > "$OUT/tests.log" 2>&1 || status=1
    tail -3 "$OUT/tests.log"
}

bench() {
    echo "== benchmark"
    # shellcheck disable=SC2086  # BENCH_ARGS is a list of options
    python3 bench/train_step.py --out "$OUT/bench.json" ${BENCH_ARGS:-} > "$OUT/bench.md" 2> "$OUT/bench.log" || status=1
    cat "$OUT/bench.md"
}

experiment() {
    echo "== experiment: $EPOCHS epochs per variant, precision $PRECISION"
    data=/tmp/cifar10-jpg
    start=$(date +%s.%N)
    mkdir -p "$data" && tar xzf "$CIFAR_TGZ" -C "$data"
    # timeout 0 = none; -k: SIGKILL 30 s after the SIGTERM if the process has not ended
    (cd /tmp && MLFLOW_TRACKING_URI=sqlite:////tmp/exp.db timeout -k 30 "${EXPERIMENT_TIMEOUT:-0}" \
        python3 -m pipeline all \
        --dataset imagefolder --data-dir "$data" --epochs "$EPOCHS" --precision "$PRECISION" \
        ${EXTRA:-}) \
        > "$OUT/experiment.log" 2>&1 || status=1
    end=$(date +%s.%N)
    python3 - "$start" "$end" "$OUT/experiment.json" <<'EOF' || status=1
import json, sys
import mlflow
import mlflow.artifacts
start, end, out = float(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
client = mlflow.MlflowClient("sqlite:////tmp/exp.db")
runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
result = {"wall_seconds_including_data_preparation": end - start, "runs": []}
for r in runs:
    m = {k: v for k, v in r.data.metrics.items() if not k.startswith("system/")}
    epochs = {k: [x.value for x in sorted(client.get_metric_history(r.info.run_id, k),
                                          key=lambda x: x.step)]
              for k in ("epoch_seconds", "test/accuracy", "train/images_per_second")
              if k in r.data.metrics}
    seconds = (r.info.end_time - r.info.start_time) / 1000 if r.info.end_time else None
    result["runs"].append({
        "name": r.info.run_name, "status": r.info.status, "seconds": seconds,
        # Where the wall time went: before this run opened (archive, imports, store), and
        # inside it but outside its epochs (data preparation, capture, model export).
        "opened_after_seconds": r.info.start_time / 1000 - start,
        "seconds_outside_epochs": (seconds - sum(epochs["epoch_seconds"])
                                   if seconds is not None and epochs.get("epoch_seconds") else None),
        "tags": {k: v for k, v in r.data.tags.items() if not k.startswith("mlflow.")},
        "metrics": m, "per_epoch": epochs})
    if r.data.tags.get("compare.runs"):
        path = mlflow.artifacts.download_artifacts(
            run_id=r.info.run_id, artifact_path="comparison/summary.md", dst_path="/tmp",
            tracking_uri="sqlite:////tmp/exp.db")
        result["comparison_summary_md"] = open(path).read()
json.dump(result, open(out, "w"), indent=2)
print(f"experiment: {end - start:.0f} s wall, including data preparation")
EOF
    tail -5 "$OUT/experiment.log"
}

for step in $STEPS; do "$step"; done
exit $status
