"""Metric keys, tags and artifact paths: a public API, built here and nowhere else.

Users query these names (docs: reference/metrics.md, tags.md and artifacts.md, generated
from this file), and the compare step reads them back, so changing one is a breaking change.
"""

GRAD_NORM_PREFIX = "grad_norm/"

# Every training batch, step = global batch index from 0.
TRAIN_LOSS = "train/loss"

# Once per epoch, step = epoch index from 0.
TRAIN_ACCURACY = "train/accuracy"
TEST_ACCURACY = "test/accuracy"
TEST_LOSS = "test/loss"
EPOCH_SECONDS = "epoch_seconds"
IMAGES_PER_SECOND = "train/images_per_second"

# Once, at the run's end, step 0: where its wall time went besides the epochs, in seconds
# (epoch_seconds has the epochs'). Rank 0's clock.
TIME_DATA = "time/data_seconds"                # decoding and resizing the splits, before the run opened
TIME_METRIC_WAIT = "time/metric_wait_seconds"  # at checkpoints and the end: until every point has landed
TIME_CHECKPOINT = "time/checkpoint_seconds"    # writing the checkpoints, uploading the last
TIME_ARTIFACTS = "time/artifacts_seconds"      # gradients.json, norms.npz and the plots
TIME_MODEL = "time/model_seconds"              # exporting and logging the model (0 without one)

# Artifacts.
GRADIENTS_JSON = "gradients/gradients.json"     # {layer: [norm per batch, ...]}, the notebook's shape
GRADIENT_PLOT = "plots/gradient_norms.png"
CONFIG_JSON = "config.json"                    # {"params": {...}, "code_version": ...}: rerun input
REPORT_HTML = "report.html"                    # one self-contained page: answer, figures, tables (report_html.py)
MODEL = "model"                                 # the logged model's name (mlflow.pytorch, pt2)

# Tags.
VARIANT_TAG = "variant"                        # "skip" | "noskip"
VARIANTS = ("noskip", "skip")                  # the variant tag's values, in a skip pair's order
MODEL_TAG = "model"
LAYERS_RESOLVED_TAG = "layers.resolved"        # the probed layers, in order (`layers=auto` resolved)
NOTE_TAG = "mlflow.note.content"               # the run description the UI shows
STEPS_PER_EPOCH_TAG = "steps_per_epoch"        # epoch of a step = step // this
CODE_VERSION_TAG = "code_version"              # pipeline.code_version(): digest of the source
ERROR_TAG = "error"                            # why a run FAILED or was KILLED
DEVICE_TAG = "device.resolved"                 # the device `device=auto` chose
RERUN_OF_TAG = "rerun_of"                      # `rerun`: the run whose config.json this replays
GRAPH_TAG = "engine.graph"                     # "graph" (one CUDA graph per step) | "eager"
GRAPH_REASON_TAG = "engine.graph_reason"       # why: captured, graph=off, capture failed: ...
EAGER_STEPS_TAG = "engine.eager_steps"         # steps run eagerly beside a graph or before its capture (partial batches)
CHANNELS_LAST_TAG = "engine.channels_last"     # "true" | "false"
WEIGHT_CASTS_TAG = "engine.weight_casts"       # bf16: "once" (per step, engine.Bf16Weights) | "per-op"; else "none"
DATA_PATH_TAG = "data.path"                    # "dataloader" | "device"
DATA_RESIZE_TAG = "data.resize"                # how images were resized, vs. the notebook's PIL
DATA_DROPPED_TAG = "data.dropped_per_epoch"    # images of a last batch that does not split over the ranks
DATA_REUSED_TAG = "data.reused"                # "true": the device splits an earlier run of this all/sweep prepared
WORLD_SIZE_PARAM = "world_size"                # param: processes training (nproc_per_node x nnodes)
DDP_FAILED_RANK_TAG = "ddp.failed_rank"        # the rank whose failure ended a DDP run

RESUMED_INTO_TAG = "resume.continued_in"       # on the run `mlflow run -P resume=ID` opened
RESUMED_AT_TAG = "resume.from_step"            # on a resumed run: the checkpoint's step
RESUMED_ERROR_TAG = "resume.previous_error"    # on a resumed run: the error tag its stop left
CHECKPOINT_TAG = "checkpoint.path"             # the run's last checkpoint on local disk
NONFINITE_COUNT_TAG = "nonfinite.count"        # NaN/Inf values among the losses and norms
NONFINITE_FIRST_TAG = "nonfinite.first"        # "<key> at step <n>" of the first one
CHECKPOINT_ARTIFACT = "checkpoints/last.pt"    # the final checkpoint, with log_checkpoint


def grad_norm(layer: str) -> str:
    """``grad_norm/layer1.0.conv1``: L2 norm of dLoss/d(output of that module)."""
    return GRAD_NORM_PREFIX + layer


def layer_of(key: str, prefix: str = GRAD_NORM_PREFIX) -> str:
    return key[len(prefix):]


WEIGHT_GRAD_NORM_PREFIX = "weight_grad_norm/"


def weight_grad_norm(layer: str) -> str:
    """``weight_grad_norm/conv1``: L2 norm of dLoss/d(that module's own weight and bias)."""
    return WEIGHT_GRAD_NORM_PREFIX + layer


# The log10 twin of every norm metric, logged with it (same steps, same writer): MLflow's
# charts have a linear y axis and no log-scale default (mlflow#5331), where 1e-21 and 1e-8
# both read 0; in log10 the decades are the axis. A norm below 10**LOG10_FLOOR, an exact
# zero included, is logged as LOG10_FLOOR (no nonzero norm seen here comes near it).
GRAD_NORM_LOG10_PREFIX = "grad_norm_log10/"
WEIGHT_GRAD_NORM_LOG10_PREFIX = "weight_grad_norm_log10/"
LOG10_FLOOR = -40.0


def grad_norm_log10(layer: str) -> str:
    """``grad_norm_log10/conv1``: log10 of ``grad_norm/conv1`` (LOG10_FLOOR for a zero)."""
    return GRAD_NORM_LOG10_PREFIX + layer


def weight_grad_norm_log10(layer: str) -> str:
    """``weight_grad_norm_log10/conv1``: log10 of ``weight_grad_norm/conv1``."""
    return WEIGHT_GRAD_NORM_LOG10_PREFIX + layer


def log10_key(key: str) -> str:
    """The log10 twin of a norm metric's key: ``grad_norm/x`` -> ``grad_norm_log10/x``."""
    for prefix, twin in ((GRAD_NORM_PREFIX, GRAD_NORM_LOG10_PREFIX),
                         (WEIGHT_GRAD_NORM_PREFIX, WEIGHT_GRAD_NORM_LOG10_PREFIX)):
        if key.startswith(prefix):
            return twin + key[len(prefix):]
    raise ValueError(f"{key!r} is not a gradient-norm metric")


# What each probe measures, by training's `probe` value (also compare's `quantity`): its
# metric prefix, metric key builder and array in gradients/norms.npz. Readers look a
# quantity up here instead of spelling "grad_norm/" or "norms" themselves.
OUTPUT, WEIGHT = "output", "weight"
METRIC_PREFIX = {OUTPUT: GRAD_NORM_PREFIX, WEIGHT: WEIGHT_GRAD_NORM_PREFIX}
METRIC_KEY = {OUTPUT: grad_norm, WEIGHT: weight_grad_norm}
NPZ_ARRAY = {OUTPUT: "norms", WEIGHT: "weight_norms"}

# Tracking outages (pipeline/tracking/).
OUTAGE_TAG = "tracking.outage"                 # how many writes waited for the server, since when

# Every probed layer at every step (docs: guide/run-logs.md has the schema):
# steps int64 [S], layers str [L] (forward order), norms float64 [S, L], loss float64 [S].
NORMS_NPZ = "gradients/norms.npz"
GRADIENT_FLOW_PLOT = "plots/gradient_flow.png"  # heatmap: log10(norm), layer (depth) x step
DEPTH_PROFILE_PLOT = "plots/depth_profile.png"  # norm against depth at a few steps
# probe=weight|both: the same two figures for the weight-gradient norms.
WEIGHT_GRADIENT_FLOW_PLOT = "plots/weight_gradient_flow.png"
WEIGHT_DEPTH_PROFILE_PLOT = "plots/weight_depth_profile.png"

# The compare step's heatmap of log10(skip norm) - log10(noskip norm), layer x step, from
# both runs' norms.npz; the tag says "logged" or why it was skipped.
DIFFERENCE_PLOT = "comparison/gradient_flow_difference.png"
DIFFERENCE_TAG = "compare.difference_heatmap"
PANEL_LAYERS_TAG = "compare.panel_layers"       # the layers drawn in comparison/gradient_norms.png
# compare quantity=weight|both: the same heatmap from both runs' weight_norms, and its tag.
WEIGHT_DIFFERENCE_PLOT = "comparison/weight_gradient_flow_difference.png"
WEIGHT_DIFFERENCE_TAG = "compare.weight_difference_heatmap"
COMPARE_RUNS_TAG = "compare.runs"                # the two runs, first then second
COMPARE_LABELS_TAG = "compare.labels"            # their labels: noskip,skip, or names/params
COMPARE_LAYERS_TAG = "compare.layers"            # the compared layers ("a vs b": by position)
# A skip pair's runs also have compare.noskip_run and compare.skip_run.
QUANTITY_TAG = "compare.quantity"               # what was compared: output | weight | both
DIFFERING_PARAMS_TAG = "compare.differing_params"  # training params the two runs differ in, or "none"

# The diagnosis of the dense record, at the end of a run (docs: guide/run-logs.md).
HEALTH_TAG = "gradient.health"                          # healthy | vanishing | exploding | dead
FIRST_VANISHING_TAG = "gradient.first_vanishing_layer"  # from the head down; "none"
FIRST_TO_LAST_TAG = "gradient.first_to_last_ratio"      # median first-layer / last-layer norm
ZERO_STEP_FRACTION_TAG = "gradient.zero_step_fraction"  # steps with every layer below the head 0
AT_CHANCE_TAG = "loss.at_chance"                        # "true" | "false"
# The same diagnosis as metrics (step 0, at the run's end), so the runs table and the chart
# view can show and plot them across runs (sweep cells included).
FIRST_LAYER_MEDIAN = "summary/first_layer_median"       # median norm of the first probed layer
FIRST_TO_LAST_DECADES = "summary/first_to_last_decades"  # log10 of gradient.first_to_last_ratio
METRIC_LAYERS_TAG = "layers.every_step"                 # layers logged as metrics every step

# pipeline.watch and the Lightning callback (pipeline/watcher.py), on the user's own run.
WATCH_PROBE_TAG = "watch.probe"                # output | weight | both
WATCH_CAPTURE_TAG = "watch.capture"            # hook (eager) | identity (torch.compile)
WATCH_STEPS_TAG = "watch.steps"                # optimizer steps measured (rows of norms.npz)
WATCH_SKIPPED_TAG = "watch.skipped_steps"      # steps GradScaler skipped (inf/NaN): no row
WATCH_LOSS_TAG = "watch.loss"                  # "logged" | "not given" (train/loss)

# Sweep (pipeline/sweep.py): a grid of models x skip x batch_norm as child runs of one parent
# run, summarised as the first probed layer's median norm against depth. A cell is named
# <model>-<skip|noskip>-<bn|nobn> (config.cell_name).
STEP_TAG = "pipeline.step"                     # on a parent run: "all" | "sweep"
SWEEP_FIGURE = "sweep/first_layer_vs_depth.png"  # median first-layer norm against depth, log y
SWEEP_SUMMARY_MD = "sweep/summary.md"          # the table, also the parent run's description
SWEEP_SUMMARY_CSV = "sweep/summary.csv"        # one row per cell
SWEEP_SUMMARY_JSON = "sweep/summary.json"      # {"cells": [row, ...], "skipped": [cell, ...]}
SWEEP_CELLS_TAG = "sweep.cells"                # the cells, in grid order, comma-separated
SWEEP_RUNS_TAG = "sweep.runs"                  # their run IDs, in the same order
SWEEP_SKIPPED_TAG = "sweep.skipped"            # cells left out (vgg19 has no skips), or "none"
SWEEP_REUSED_TAG = "sweep.reused"              # "<reused>/<cells>": FINISHED runs reused
SWEEP_CELL_TAG = "sweep.cell"                  # on each run the sweep trains: its cell


def compare_decades(layer: str) -> str:
    """``compare/decades/conv1``: log10(second run's median / first's) at a compared layer
    (skip over noskip for a skip pair), on the compare run (and an `all` run), step 0."""
    return f"compare/decades/{layer}"


def compare_weight_decades(layer: str) -> str:
    """``compare/weight_decades/conv1``: the same for the weight-gradient norms."""
    return f"compare/weight_decades/{layer}"


COMPARE_DECADES = {OUTPUT: compare_decades, WEIGHT: compare_weight_decades}


def compare_test_accuracy(label: str) -> str:
    """``compare/test_accuracy/skip``: a compared run's final test accuracy (by its label),
    on the compare run (and an `all` run), step 0."""
    return f"compare/test_accuracy/{label}"


def sweep_run_tag(cell: str) -> str:
    """``sweep.resnet50-noskip-nobn.run``: on the parent, that cell's run ID."""
    return f"sweep.{cell}.run"


def sweep_reused_tag(cell: str) -> str:
    """``sweep.resnet50-noskip-nobn.reused``: "true" when the cell reused a FINISHED run."""
    return f"sweep.{cell}.reused"
