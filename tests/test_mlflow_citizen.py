"""A run is a first-class MLflow citizen (issue 8): the trained model, dataset lineage,
system metrics, what it takes to reproduce the run, the CPU estimate and device choice.

Everything is real: real training of ResNet-50 on tiny synthetic data (32 px, a couple of
batches of 4), a real sqlite MLflow store, real ``python -m pipeline`` subprocesses. Each
training fixture trains once per module and several tests read its result back through
MLflow's own client.
"""
from __future__ import annotations

import contextlib
import copy
import io
import re
import warnings
from pathlib import Path

import mlflow
import mlflow.pytorch
import pytest
import torch
from mlflow.models import Model

import pipeline
from pipeline import data as data_mod
from pipeline import names, plan, query, train
from pipeline.config import Config, ConfigError
from pipeline.models import build_model
from pipeline.progress import Progress, format_duration
from pipeline.devices import resolve_device

from conftest import describe_process, make_image_folder, run_pipeline

# Small enough for ~2-3 s per in-process run on 2 CPU cores.
TINY = dict(dataset="synthetic", image_size=32, synthetic_size=64, synthetic_test_size=16,
            num_workers="0", batch_size=4, max_steps=2, device="cpu")
REGISTERED = "gradient-flow-citizen-test"
# MLflow samples system metrics every 10 s by default; a tiny run would log none. Every
# in-process run of this module samples every 0.5 s, so "no system/* metrics" means the
# switch was off, not that the run ended before the first sample.
SAMPLING = {"MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "0.5",
            "MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING": "1"}


# --- fixtures: one store and a few trained runs, shared by the module ---------------------
@pytest.fixture(scope="module")
def store(module_tracking_store):
    with pytest.MonkeyPatch.context() as mp:
        for key, value in SAMPLING.items():
            mp.setenv(key, value)
        yield module_tracking_store


def _train(store, **overrides) -> tuple[Config, str]:
    cfg = Config(**{**TINY, **overrides})
    return cfg, train.run(cfg)


@pytest.fixture(scope="module")
def model_run(store):
    """log_model=true, registered, system metrics on: the one run that pays for
    torch.export (~10 s). Seed 0, like plain_run, so their data digests must match.
    Returns (config, run ID, what the run wrote to sys.stderr)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        cfg, run_id = _train(store, log_model="true", register_as=REGISTERED,
                             log_system_metrics="true")
    return cfg, run_id, err.getvalue()


@pytest.fixture(scope="module")
def plain_run(store):
    """Defaults for what is recorded, except system metrics explicitly off; seed 0."""
    return _train(store, log_system_metrics="false")


@pytest.fixture(scope="module")
def other_seed_run(store):
    """seed 1, log_system_metrics=auto on a CPU (so: off)."""
    return _train(store, seed=1, log_system_metrics="auto")


@pytest.fixture(scope="module")
def imagefolder_run(store, tmp_path_factory):
    root = tmp_path_factory.mktemp("images") / "tiny_folder"
    make_image_folder(root)  # 10 classes; 2 train and 1 test image each
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = _train(store, dataset="imagefolder", data_dir=str(root))
    return result, root, [str(w.message) for w in caught]


def train_by_hand(cfg: Config) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The untrained and the trained network of ``cfg``'s recipe, trained here, without
    ``pipeline.train`` and without MLflow: the independent reference for the logged model.

    The recipe: seed, build, (fused) Adam on cross-entropy over the seeded data order, ``max_steps``
    batches. (The run's gradient probes only read gradients, so they change no weight.)
    """
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, skip=cfg.skip)
    untrained = copy.deepcopy(model)
    data = data_mod.build(cfg, torch.device("cpu"))
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, fused=True)  # as engine's
    model.train()
    for step, (x, y) in enumerate(data.train):
        if step == cfg.max_steps:
            break
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return untrained.eval(), model.eval()


@pytest.fixture(scope="module")
def reference(model_run):
    cfg = model_run[0]
    return train_by_hand(cfg)


def logged_models_of(run_id: str):
    run = mlflow.get_run(run_id)
    models = mlflow.search_logged_models(experiment_ids=[run.info.experiment_id],
                                         output_format="list")
    return [m for m in models if m.source_run_id == run_id]


def model_outputs_of(run) -> list:
    return list(run.outputs.model_outputs) if run.outputs is not None else []


def fresh_batch(n: int = 3, size: int = 32) -> torch.Tensor:
    # Never seen by the run: not its input example (batch 2), nor a training image.
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(12345))


# --- 1. the trained model -----------------------------------------------------------------
@pytest.mark.parametrize("log_model, max_steps, wanted", [
    ("auto", 0, True), ("auto", 5, False),
    ("true", 0, True), ("true", 5, True),
    ("false", 0, False), ("false", 5, False),
])
def test_wants_model_is_on_for_full_runs_and_off_for_max_steps_runs_unless_told(
        log_model, max_steps, wanted):
    assert Config(log_model=log_model, max_steps=max_steps).wants_model is wanted


def test_log_model_accepts_auto_and_any_boolean_spelling_and_refuses_the_rest():
    assert Config().log_model == "auto"
    assert Config.from_strings({"log_model": "Yes"}).log_model == "true"
    assert Config.from_strings({"log_model": "0"}).log_model == "false"
    assert Config.from_strings({"log_model": "AUTO"}).log_model == "auto"
    with pytest.raises(ConfigError) as e:
        Config.from_strings({"log_model": "maybe"})
    assert e.value.param == "log_model"


@pytest.mark.parametrize("values", [{"max_steps": "2"}, {"log_model": "false"}],
                         ids=["smoke-run-auto", "log-model-false"])
def test_register_as_without_a_logged_model_is_refused_naming_register_as(values):
    with pytest.raises(ConfigError) as excinfo:
        Config.from_strings({"register_as": "gf", **values})
    message = str(excinfo.value)
    assert message.startswith("register_as:") and "log_model=true" in message
    assert "\n" not in message
    # Asking for the model too is what it takes.
    fixed = Config.from_strings({"register_as": "gf", **values, "log_model": "true"})
    assert fixed.registered_name == "gf" and fixed.wants_model


def test_register_as_defaults_to_none_which_means_no_registered_name():
    assert Config().register_as == "none"
    assert Config().registered_name is None
    assert Config(register_as="None").registered_name is None
    assert Config(register_as="my-model").registered_name == "my-model"


def test_a_run_with_log_model_true_has_one_logged_model_in_pt2_with_a_signature(model_run, tmp_path):
    cfg, run_id, _ = model_run
    [logged] = logged_models_of(run_id)
    assert logged.name == names.MODEL
    assert [o.model_id for o in model_outputs_of(mlflow.get_run(run_id))] == [logged.model_id]

    local = Path(mlflow.artifacts.download_artifacts(logged.model_uri, dst_path=str(tmp_path)))
    # pt2 (torch.export), not a pickle: the program file is there, no pickled model is.
    assert (local / "data" / "model.pt2").is_file()
    assert not list(local.rglob("*.pth"))
    meta = Model.load(str(local))
    [spec] = meta.signature.inputs.inputs
    assert tuple(spec.shape) == (-1, 3, cfg.image_size, cfg.image_size)  # batch is dynamic
    [out_spec] = meta.signature.outputs.inputs
    assert tuple(out_spec.shape) == (-1, data_mod.NUM_CLASSES)
    example = meta.load_input_example(str(local))
    assert example is not None and tuple(example.shape)[1:] == (3, cfg.image_size, cfg.image_size)
    # What the program needs to run, and nothing a child process happened to import.
    wanted = {f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}"}
    assert set((local / "requirements.txt").read_text().split()) == wanted


def test_the_logged_model_loads_back_and_gives_the_trained_networks_outputs_on_fresh_batch_3(
        model_run, reference, tmp_path):
    # The reference is the same recipe trained again by hand in this test (train_by_hand),
    # so it is independent of what the run logged. The untrained network's outputs are
    # checked to be far from it: the comparison can tell a trained from an untrained model.
    cfg, run_id, _ = model_run
    untrained, trained = reference
    [logged] = logged_models_of(run_id)
    loaded = mlflow.pytorch.load_model(logged.model_uri)
    local = Path(mlflow.artifacts.download_artifacts(logged.model_uri, dst_path=str(tmp_path)))
    example = torch.as_tensor(Model.load(str(local)).load_input_example(str(local)))

    for x in (fresh_batch(3, cfg.image_size), example):
        with torch.no_grad():
            got, want, before = loaded(x), trained(x), untrained(x)
        assert got.shape == (len(x), data_mod.NUM_CLASSES)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        assert (before - want).abs().max() > 1e-3, "training left the outputs unchanged?"


def test_register_as_puts_a_version_of_that_name_in_the_registry_that_loads(model_run, reference):
    _, run_id, _ = model_run
    client = mlflow.MlflowClient()
    [version] = client.search_model_versions(f"name='{REGISTERED}'")
    assert version.run_id == run_id
    assert version.status == "READY"
    loaded = mlflow.pytorch.load_model(f"models:/{REGISTERED}/{version.version}")
    with torch.no_grad():
        torch.testing.assert_close(loaded(fresh_batch()), reference[1](fresh_batch()),
                                   rtol=1e-4, atol=1e-5)


def test_a_max_steps_run_with_log_model_auto_logs_no_model_and_registers_nothing(plain_run):
    cfg, run_id = plain_run
    assert cfg.log_model == "auto" and cfg.max_steps > 0
    assert model_outputs_of(mlflow.get_run(run_id)) == []
    assert logged_models_of(run_id) == []
    assert all(v.run_id != run_id for v in mlflow.MlflowClient().search_model_versions())


def test_a_run_records_where_its_time_went_besides_the_epochs(model_run, plain_run):
    keys = (names.TIME_DATA, names.TIME_METRIC_WAIT, names.TIME_CHECKPOINT,
            names.TIME_ARTIFACTS, names.TIME_MODEL)
    client = mlflow.MlflowClient()
    for (_, run_id, *_), model in ((model_run, True), (plain_run, False)):
        points = {k: client.get_metric_history(run_id, k) for k in keys}
        assert all([m.step for m in p] == [0] for p in points.values()), points
        seconds = {k: p[0].value for k, p in points.items()}
        # Each part took time (a checkpoint at every epoch's end), except the model's
        # export in a run that logs none.
        assert all(v > 0 for k, v in seconds.items() if k != names.TIME_MODEL), seconds
        assert (seconds[names.TIME_MODEL] > 0.1) is model, seconds
        # The parts inside the run and its epochs fit in the run's wall time (data
        # preparation came before the run opened).
        run = client.get_run(run_id).info
        epochs = sum(m.value for m in client.get_metric_history(run_id, names.EPOCH_SECONDS))
        inside = sum(v for k, v in seconds.items() if k != names.TIME_DATA)
        assert epochs + inside <= (run.end_time - run.start_time) / 1000 + 0.01, seconds


# --- 2. data lineage --------------------------------------------------------------------------
def datasets_by_context(run_id: str) -> dict[str, object]:
    inputs = mlflow.get_run(run_id).inputs.dataset_inputs
    out = {}
    for d in inputs:
        tags = {t.key: t.value for t in d.tags}
        out[tags["mlflow.data.context"]] = d.dataset
    assert len(out) == len(inputs) == 2, [d.dataset.name for d in inputs]
    return out


def test_a_synthetic_run_records_its_training_and_evaluation_sets_with_the_generator_and_seed(
        plain_run):
    cfg, run_id = plain_run
    ds = datasets_by_context(run_id)
    assert set(ds) == {"training", "evaluation"}
    assert ds["training"].name == "synthetic-train"
    assert ds["evaluation"].name == "synthetic-test"
    for d in ds.values():
        assert d.digest
        assert "SyntheticCIFAR" in d.source
        assert f'"seed": {cfg.seed}' in d.source
    assert ds["training"].digest != ds["evaluation"].digest


def test_dataset_digests_are_equal_for_the_same_seed_and_differ_for_another_seed(
        plain_run, model_run, other_seed_run):
    seed0, again, seed1 = (datasets_by_context(r[1]) for r in
                           (plain_run, model_run, other_seed_run))
    for context in ("training", "evaluation"):
        assert seed0[context].digest == again[context].digest
        assert seed0[context].digest != seed1[context].digest


def test_an_imagefolder_run_records_local_sources_naming_each_split_folder(imagefolder_run):
    (_, run_id), root, _ = imagefolder_run
    ds = datasets_by_context(run_id)
    for context, split in (("training", "train"), ("evaluation", "test")):
        assert ds[context].source_type == "local"
        assert str((root / split).resolve()) in ds[context].source
        assert ds[context].name == f"{root.name}-{split}"
        assert ds[context].digest
    assert ds["training"].digest != ds["evaluation"].digest


def test_recording_an_imagefolder_source_raises_no_warning(imagefolder_run):
    # mlflow's resolve_dataset_source finds two LocalArtifactDatasetSource registrations
    # for a local path and warns "can be interpreted in multiple ways" on every such run.
    _, _, warned = imagefolder_run
    assert not [w for w in warned if "dataset source" in w], warned


# --- 3. system metrics ------------------------------------------------------------------------
def system_metrics_of(run_id: str) -> set[str]:
    return {k for k in mlflow.get_run(run_id).data.metrics if k.startswith("system/")}


def test_psutil_is_a_declared_dependency_and_samples_this_machine_for_mlflow():
    from importlib.metadata import requires

    from mlflow.system_metrics.metrics.cpu_monitor import CPUMonitor

    # A requirement of the package itself, not of an extra: every install samples CPU/memory.
    assert "psutil" in [r.split(";")[0].strip() for r in requires("gradient-flow")
                        if "extra ==" not in r]
    monitor = CPUMonitor()  # MLflow's own sampler, as the system metrics thread runs it
    monitor.collect_metrics()
    sampled = monitor.aggregate_metrics()
    assert 0 < sampled["system_memory_usage_megabytes"]
    assert 0 < sampled["system_memory_usage_percentage"] <= 100


def test_log_system_metrics_true_records_cpu_and_memory_use(model_run):
    assert model_run[0].log_system_metrics == "true"
    logged = system_metrics_of(model_run[1])
    assert "system/cpu_utilization_percentage" in logged, logged
    assert "system/system_memory_usage_megabytes" in logged, logged


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_without_a_gpu_system_metrics_say_so_in_one_notice_line_and_the_run_goes_on(model_run):
    _, run_id, stderr = model_run
    notices = [line for line in stderr.splitlines() if line.startswith("notice:")]
    assert len(notices) == 1 and "GPU" in notices[0], stderr
    assert mlflow.get_run(run_id).info.status == "FINISHED"


def test_log_system_metrics_false_records_none(plain_run):
    assert system_metrics_of(plain_run[1]) == set()


def test_log_system_metrics_auto_is_off_on_a_cpu(other_seed_run):
    cfg, run_id = other_seed_run
    assert cfg.log_system_metrics == "auto"
    assert system_metrics_of(run_id) == set()


@pytest.mark.parametrize("setting, device_type, wanted", [
    ("auto", "cpu", False), ("auto", "cuda", True),
    ("true", "cpu", True), ("false", "cuda", False),
])
def test_wants_system_metrics_defaults_to_gpu_runs_only(setting, device_type, wanted):
    assert Config(log_system_metrics=setting).wants_system_metrics(device_type) is wanted


# --- 4. reproducibility -----------------------------------------------------------------------
def test_the_run_logs_its_resolved_config_and_code_version_as_config_json(plain_run):
    cfg, run_id = plain_run
    logged = mlflow.artifacts.load_dict(f"runs:/{run_id}/{names.CONFIG_JSON}")
    assert logged == {"params": cfg.to_params(), "code_version": pipeline.code_version()}


def test_query_run_config_returns_params_that_parse_back_to_the_same_config(plain_run):
    cfg, run_id = plain_run
    params = query.run_config(run_id)
    assert params == cfg.to_params()
    assert Config.from_strings(params) == cfg


def test_query_run_config_of_a_run_without_config_json_says_so(store):
    client = mlflow.MlflowClient()
    run = client.create_run(store.project_experiment_id(), run_name="not-a-training-run")
    client.set_terminated(run.info.run_id)
    with pytest.raises(query.QueryError, match=names.CONFIG_JSON):
        query.run_config(run.info.run_id)


def test_the_run_records_the_software_and_numeric_settings_as_env_tags(plain_run):
    import torchvision

    tags = mlflow.get_run(plain_run[1]).data.tags
    assert tags["env.torch"] == torch.__version__
    assert tags["env.torchvision"] == torchvision.__version__
    assert tags["env.mlflow"] == mlflow.__version__
    assert tags["env.cuda"] == str(torch.version.cuda)
    assert tags["env.cudnn"] == str(torch.backends.cudnn.version())
    assert tags["env.gpu"] == "none"  # a CPU run
    assert tags["env.cudnn.allow_tf32"] == str(torch.backends.cudnn.allow_tf32).lower()
    assert tags["env.matmul.allow_tf32"] == str(torch.backends.cuda.matmul.allow_tf32).lower()
    assert tags["env.float32_matmul_precision"] == torch.get_float32_matmul_precision()


CLI_STEPS = 7  # > progress.ESTIMATE_AT, so a CPU run prints its estimate


@pytest.fixture(scope="module")
def cli_run(store):
    """``python -m pipeline train`` as a user runs it: (process, run ID)."""
    args = ["train", "--dataset", "synthetic", "--image-size", "32", "--batch-size", "4",
            "--synthetic-size", "64", "--synthetic-test-size", "16", "--num-workers", "0",
            "--max-steps", str(CLI_STEPS), "--device", "cpu"]
    proc = run_pipeline(args, store.dir, store)
    assert proc.returncode == 0, describe_process(proc)
    match = re.search(r"MLflow run (\w+) ", proc.stdout)
    assert match, describe_process(proc)
    return proc, match.group(1)


def norm_and_loss_histories(run_id: str) -> dict[str, list[tuple[int, float]]]:
    client = mlflow.MlflowClient()
    keys = [k for k in client.get_run(run_id).data.metrics
            if k.startswith(names.GRAD_NORM_PREFIX)] + [names.TRAIN_LOSS]
    return {k: sorted((m.step, m.value) for m in client.get_metric_history(run_id, k))
            for k in keys}


@pytest.mark.slow
def test_rerun_trains_a_new_finished_run_whose_norms_and_losses_are_bitwise_equal(cli_run, store):
    _, original = cli_run
    proc = run_pipeline(["rerun", original], store.dir, store)
    assert proc.returncode == 0, describe_process(proc)

    client = mlflow.MlflowClient()
    reruns = client.search_runs([store.project_experiment_id()],
                                f"tags.`{names.RERUN_OF_TAG}` = '{original}'")
    assert len(reruns) == 1, describe_process(proc)
    new = reruns[0]
    assert new.info.run_id != original
    assert new.info.status == "FINISHED"
    assert new.data.params == client.get_run(original).data.params

    before, after = norm_and_loss_histories(original), norm_and_loss_histories(new.info.run_id)
    assert len(before) == len(plan.resolve_layers(Config())) + 1
    assert set(after) == set(before)
    for key, points in before.items():
        assert [s for s, _ in points] == list(range(CLI_STEPS)), key
        assert after[key] == points, f"{key} differs between the run and its rerun"


@pytest.mark.slow
def test_rerun_of_an_unknown_run_id_exits_2_with_one_error_line(store):
    unknown = "0123456789abcdef0123456789abcdef"
    proc = run_pipeline(["rerun", unknown], store.dir, store)
    assert proc.returncode == 2, describe_process(proc)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), describe_process(proc)
    assert unknown in lines[0]
    assert not mlflow.MlflowClient().search_runs(
        [store.project_experiment_id()], f"tags.`{names.RERUN_OF_TAG}` = '{unknown}'")


# --- 5. the CPU estimate ----------------------------------------------------------------------
@pytest.mark.slow
def test_a_cpu_training_run_prints_one_estimate_line_with_its_steps(cli_run):
    proc, _ = cli_run
    lines = [line for line in proc.stderr.splitlines() if line.startswith("estimate:")]
    assert len(lines) == 1, describe_process(proc)
    assert f"{CLI_STEPS} training steps" in lines[0]
    assert "quick look" not in lines[0]  # 7 steps are a quick look already
    assert "estimate:" not in proc.stdout


def drive(progress: Progress, steps: int, pause: float = 0.0) -> None:
    import time

    progress.start_epoch(0)
    for i in range(steps):
        if pause:
            time.sleep(pause)
        progress.step(i)
    progress.close()


def test_progress_without_estimate_prints_no_estimate():
    out = io.StringIO()
    drive(Progress(1, 10, 4, 10, stream=out, estimate=False), 10)
    assert "estimate" not in out.getvalue()


def test_progress_with_estimate_prints_exactly_one_estimate_line():
    out = io.StringIO()
    drive(Progress(1, 10, 4, 10, stream=out, estimate=True), 10)
    lines = [line for line in out.getvalue().splitlines() if line.startswith("estimate:")]
    assert len(lines) == 1, out.getvalue()
    assert "10 training steps" in lines[0]


@pytest.mark.parametrize("total_steps, suggests", [(10, False), (1_000_000, True)])
def test_the_estimate_suggests_a_quicker_look_only_for_a_long_run(total_steps, suggests):
    out = io.StringIO()
    # 10 ms a step: 10 steps take 0.1 s, a million ~3 h (over progress.QUICK_LOOK_S)
    drive(Progress(1, total_steps, 4, total_steps, stream=out, estimate=True), 10, pause=0.01)
    (line,) = [line for line in out.getvalue().splitlines() if line.startswith("estimate:")]
    assert ("for a quick look try -P image_size=32" in line) is suggests, line


def test_progress_prints_no_estimate_for_a_run_too_short_to_time():
    out = io.StringIO()
    drive(Progress(1, 6, 4, 6, stream=out, estimate=True), 6)
    assert "estimate" not in out.getvalue()


def test_the_estimate_scales_the_measured_step_time_to_the_whole_run():
    # 1,000,000 steps at >= 20 ms each is >= 5.6 h; the line must say hours, not less.
    out = io.StringIO()
    drive(Progress(1, 10, 4, 1_000_000, stream=out, estimate=True), 8, pause=0.02)
    [line] = [x for x in out.getvalue().splitlines() if x.startswith("estimate:")]
    assert "1,000,000 training steps" in line
    per_step = float(re.search(r"at ([\d.]+) s/step", line).group(1))
    hours = float(re.search(r"~([\d.]+) h", line).group(1))
    assert per_step >= 0.02
    assert hours >= 5.5
    assert hours == pytest.approx(per_step * 1_000_000 / 3600, rel=0.25)


@pytest.mark.parametrize("seconds, text", [
    (0, "0 s"), (5, "5 s"), (89, "89 s"), (600, "10 min"), (3600, "60 min"),
    (7200, "2.0 h"), (86400, "24.0 h"),
])
def test_format_duration_picks_seconds_minutes_or_hours(seconds, text):
    assert format_duration(seconds) == text


# --- 6. device selection ----------------------------------------------------------------------
def test_device_cpu_is_always_the_cpu():
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_cuda_is_a_config_error_naming_device():
    with pytest.raises(ConfigError) as e:
        resolve_device("cuda")
    assert e.value.param == "device"
    assert str(e.value).startswith("device:")


def test_a_cpu_run_records_the_device_it_resolved_to(plain_run):
    assert mlflow.get_run(plain_run[1]).data.tags[names.DEVICE_TAG] == "cpu"
