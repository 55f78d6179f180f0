"""Metric keys, tags and artifact paths: a public API, built here and nowhere else.

Users query these names (README, "Metric names and artifact paths"), and the compare step
reads them back, so changing one is a breaking change.
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

# Artifacts.
GRADIENTS_JSON = "gradients/gradients.json"     # {layer: [norm per batch, ...]}, the notebook's shape
GRADIENT_PLOT = "plots/gradient_norms.png"
CONFIG_JSON = "config.json"                    # {"params": {...}, "code_version": ...}: rerun input
MODEL = "model"                                 # the logged model's name (mlflow.pytorch, pt2)

# Tags.
VARIANT_TAG = "variant"                        # "skip" | "noskip"
MODEL_TAG = "model"
NOTE_TAG = "mlflow.note.content"               # the run description the UI shows
STEPS_PER_EPOCH_TAG = "steps_per_epoch"        # epoch of a step = step // this
CODE_VERSION_TAG = "code_version"              # pipeline.code_version(): digest of the source
ERROR_TAG = "error"                            # why a run FAILED or was KILLED
DEVICE_TAG = "device.resolved"                 # the device `device=auto` chose
RERUN_OF_TAG = "rerun_of"                      # `rerun`: the run whose config.json this replays
GRAPH_TAG = "engine.graph"                     # "graph" (one CUDA graph per step) | "eager"
GRAPH_REASON_TAG = "engine.graph_reason"       # why: captured, graph=off, capture failed: ...
EAGER_STEPS_TAG = "engine.eager_steps"         # steps run eagerly beside a graph (partial batches)
CHANNELS_LAST_TAG = "engine.channels_last"     # "true" | "false"
DATA_PATH_TAG = "data.path"                    # "dataloader" | "device"
DATA_RESIZE_TAG = "data.resize"                # how images were resized, vs. the notebook's PIL


def grad_norm(layer: str) -> str:
    """``grad_norm/layer1.0.conv1``: L2 norm of dLoss/d(output of that module)."""
    return GRAD_NORM_PREFIX + layer


def layer_of(key: str) -> str:
    return key[len(GRAD_NORM_PREFIX):]
