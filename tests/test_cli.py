"""The command line, as a user meets it: real ``python -m pipeline`` subprocesses."""
from __future__ import annotations

import pytest
import torch
from mlflow.tracking import MlflowClient

from pipeline import config

from conftest import describe_process, run_pipeline

EXIT_USAGE = 2


def assert_one_line_refusal(proc, *mentions: str) -> str:
    assert proc.returncode == EXIT_USAGE, describe_process(proc)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, describe_process(proc)
    line = lines[0]
    assert line.startswith("error: ") and len(line) > len("error: ") + 5, line
    assert "Traceback" not in proc.stderr + proc.stdout
    for text in mentions:
        assert text in line, f"{text!r} not in {line!r}"
    return line


def assert_no_run_was_created(directory) -> None:
    assert not (directory / "mlflow.db").exists()
    assert not (directory / "mlruns").exists()


# Values refused while parsing, before torch or MLflow is touched.
BAD_VALUES = [
    (["--skip", "maybe"], "skip"),
    (["--epochs", "0"], "epochs"),
    (["--epochs", "-1"], "epochs"),
    (["--batch-size", "0"], "batch_size"),
    (["--lr", "abc"], "lr"),
    (["--lr", "-1"], "lr"),
    (["--dataset", "mnist"], "dataset"),
    (["--model", "resnet9"], "model"),
    (["--on-nan", "ignore"], "on_nan"),
    (["--image-size", "7"], "image_size"),
    (["--layers", ","], "layers"),
    (["--num-workers", "x"], "num_workers"),
]


@pytest.mark.parametrize("args, param", BAD_VALUES, ids=[" ".join(a) for a, _ in BAD_VALUES])
def test_bad_value_exits_2_with_one_error_line_naming_the_parameter_and_creates_no_run(
        args, param, tracking_store):
    proc = run_pipeline(["train", *args], cwd=tracking_store.dir, store=tracking_store)
    line = assert_one_line_refusal(proc)
    assert line.startswith(f"error: {param}: "), line
    assert_no_run_was_created(tracking_store.dir)


def test_unknown_parameter_exits_2_with_one_error_line_naming_it_as_a_parameter(tracking_store):
    proc = run_pipeline(["train", "--foo", "1"], cwd=tracking_store.dir, store=tracking_store)
    line = assert_one_line_refusal(proc)
    assert line.startswith("error: foo: not a parameter"), line
    assert_no_run_was_created(tracking_store.dir)


def test_a_misspelt_parameter_is_refused_with_the_nearest_names(tracking_store):
    proc = run_pipeline(["train", "--batch-sise", "8"], cwd=tracking_store.dir,
                        store=tracking_store)
    line = assert_one_line_refusal(proc)
    assert line.startswith("error: batch_sise: not a parameter") and "batch_size?" in line, line


def test_option_without_a_value_exits_2_with_one_error_line(tracking_store):
    proc = run_pipeline(["train", "--skip"], cwd=tracking_store.dir, store=tracking_store)
    assert_one_line_refusal(proc, "--skip")
    assert_no_run_was_created(tracking_store.dir)


def test_unknown_layer_is_refused_in_one_line_before_any_data_work_or_run(tracking_store):
    # Passes parsing, fails the model check: must still stop before data and MLflow.
    data_dir = tracking_store.dir / "data"
    proc = run_pipeline(["train", "--layers", "conv1,layer1.0.conv", "--dataset", "cifar10",
                         "--data-dir", str(data_dir), "--image-size", "32"],
                        cwd=tracking_store.dir, store=tracking_store)
    assert_one_line_refusal(proc, "layers", "layer1.0.conv1")
    assert_no_run_was_created(tracking_store.dir)
    assert not data_dir.exists()  # no download was attempted


def test_missing_image_folder_is_refused_in_one_line_without_a_run(tracking_store):
    missing = tracking_store.dir / "no-such-folder"
    proc = run_pipeline(["train", "--dataset", "imagefolder", "--data-dir", str(missing),
                         "--image-size", "32"], cwd=tracking_store.dir, store=tracking_store)
    assert_one_line_refusal(proc, "data_dir", str(missing))
    assert_no_run_was_created(tracking_store.dir)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_device_cuda_without_a_gpu_is_refused_in_one_line(tracking_store):
    proc = run_pipeline(["train", "--device", "cuda", "--dataset", "synthetic", "--image-size", "32"],
                        cwd=tracking_store.dir, store=tracking_store)
    assert_one_line_refusal(proc, "device")
    assert_no_run_was_created(tracking_store.dir)


@pytest.mark.parametrize("args, mentions", [
    (["--skip", "maybe"], ("skip", "maybe")),
    (["--foo", "1"], ("foo",)),
    (["--layers", "layer1.0.conv", "--image-size", "32"], ("layers",)),
], ids=["bad-value", "unknown-option", "unknown-layer"])
def test_refusal_under_mlflow_run_ends_the_pending_run_failed_with_an_error_tag(
        args, mentions, tracking_store):
    # What `mlflow run` does before it starts the command: create a RUNNING run and
    # hand its ID over in MLFLOW_RUN_ID.
    client = MlflowClient()
    run_id = client.create_run(experiment_id="0").info.run_id
    assert client.get_run(run_id).info.status == "RUNNING"

    proc = run_pipeline(["train", *args], cwd=tracking_store.dir, store=tracking_store,
                        MLFLOW_RUN_ID=run_id)
    assert_one_line_refusal(proc, *mentions)
    run = client.get_run(run_id)
    assert run.info.status == "FAILED"
    assert run.info.end_time is not None
    error = run.data.tags.get("error", "")
    for text in mentions:
        assert text in error
    assert len(client.search_runs(["0"])) == 1  # no second run


def test_help_lists_every_config_field_as_an_option_with_its_default(tracking_store):
    proc = run_pipeline(["train", "--help"], cwd=tracking_store.dir)
    assert proc.returncode == 0, describe_process(proc)
    text = " ".join(proc.stdout.split())  # undo click's line wrapping
    for f in config.fields():
        assert f"--{f.name.replace('_', '-')} " in text, f.name
    for value in ("[default: false]", "[default: resnet50]", "[default: 0.001]", "[default: auto]"):
        assert value in text
    assert_no_run_was_created(tracking_store.dir)


def test_top_level_help_lists_exactly_the_commands_with_their_summaries(tracking_store):
    proc = run_pipeline(["--help"], cwd=tracking_store.dir)
    assert proc.returncode == 0, describe_process(proc)
    assert proc.stdout.startswith("Usage: python -m pipeline [OPTIONS] COMMAND [ARGS]..."), proc.stdout
    listed = proc.stdout.split("\nCommands:\n", 1)[1].splitlines()
    commands = dict(line.split(None, 1) for line in listed if line.strip())
    # The README's commands (train, compare, all, sweep, rerun, sync), each with its summary.
    assert sorted(commands) == ["all", "compare", "rerun", "sweep", "sync", "train"], commands
    assert commands["train"].startswith("Train one variant"), commands["train"]
    # compare takes any two runs with gradient norms, a skip pair being the usual one.
    assert commands["compare"].startswith("Compare two runs"), commands["compare"]
    assert_no_run_was_created(tracking_store.dir)


@pytest.mark.parametrize("interrupt, line, code", [
    (KeyboardInterrupt(), "interrupted: Ctrl-C;", 130),
    ("terminated", "interrupted: SIGTERM;", 143)])
def test_an_interrupt_before_any_run_names_its_signal_and_exits_with_the_shells_code(
        monkeypatch, capsys, interrupt, line, code):
    from pipeline import cli, signals
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    error = signals.Terminated("SIGTERM") if interrupt == "terminated" else interrupt  # as raised
    with pytest.raises(SystemExit) as excinfo:
        cli._interrupted(error)
    assert excinfo.value.code == code
    (printed,) = capsys.readouterr().err.splitlines()
    assert printed.startswith(line), printed


# Refused before any data work: cifar10 in a folder that does not exist would otherwise
# try a download into it.
NO_DATA = ["--dataset", "cifar10", "--data-dir", "nowhere"]


def test_a_deleted_experiment_is_refused_in_one_line_with_how_to_restore_it(tracking_store):
    client = tracking_store.client
    client.delete_experiment(client.create_experiment("gone"))
    proc = run_pipeline(["train", "--experiment", "gone", *NO_DATA], cwd=tracking_store.dir,
                        store=tracking_store)
    assert_one_line_refusal(proc, "error: experiment:", "deleted", "mlflow experiments restore")
    assert not (tracking_store.dir / "nowhere").exists()


def test_an_experiment_id_in_the_environment_that_names_none_is_refused_not_created(
        tracking_store):
    tracking_store.client.search_experiments()  # the store exists (MLflow logs its creation)
    proc = run_pipeline(["train", *NO_DATA], cwd=tracking_store.dir, store=tracking_store,
                        MLFLOW_EXPERIMENT_ID="999")
    assert_one_line_refusal(proc, "error: experiment:", "MLFLOW_EXPERIMENT_ID=999")
    assert tracking_store.client.get_experiment_by_name("999") is None


def test_mlflows_refused_file_store_is_one_line_naming_the_tracking_uri(tmp_path):
    proc = run_pipeline(["train", *NO_DATA], cwd=tmp_path,
                        MLFLOW_TRACKING_URI=(tmp_path / "mlruns").as_uri())
    assert_one_line_refusal(proc, "error: tracking:", "file store", "sqlite:///mlflow.db")
    assert not (tmp_path / "nowhere").exists()


# Below a file, the folder can never be made: found before any run opens, not at step 0.
@pytest.mark.parametrize("given", ["afile", "afile/sub/dir"])
def test_a_checkpoint_dir_that_is_or_lies_below_a_file_is_refused_in_one_line(tracking_store,
                                                                            given):
    (tracking_store.dir / "afile").write_text("")
    proc = run_pipeline(["train", "--checkpoint-dir", given, *NO_DATA],
                        cwd=tracking_store.dir, store=tracking_store)
    line = assert_one_line_refusal(proc, "error: checkpoint_dir:", "is a file", "allowed:")
    assert str(tracking_store.dir / "afile") in line
    assert not (tracking_store.dir / "nowhere").exists()
