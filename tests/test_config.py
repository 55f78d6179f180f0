"""Parameters: parsing from strings, one-line errors, and agreement with MLproject."""
from __future__ import annotations

import dataclasses
import re
import shlex

import pytest
import yaml

from pipeline import config
from pipeline.config import Config, ConfigError, format_value

from conftest import REPO_ROOT

FIELD_NAMES = [f.name for f in config.fields()]


@pytest.fixture(scope="module")
def mlproject() -> dict:
    with open(REPO_ROOT / "MLproject") as fh:
        return yaml.safe_load(fh)


# --- parsing --------------------------------------------------------------------------------
def test_every_field_type_is_parsed_from_strings():
    cfg = Config.from_strings({
        "skip": "Yes", "model": "ResNet50", "epochs": " 3 ", "batch_size": "4", "lr": "1e-4",
        "optimizer": "SGD", "image_size": "64", "seed": "7",
        "layers": " conv1 , fc,,conv1 ,layer1.0.conv1", "dataset": "Synthetic",
        "data_dir": "some/where", "num_workers": "02", "synthetic_size": "10",
        "synthetic_test_size": "5", "max_steps": "20", "device": "CPU", "precision": "BF16",
        "flush_every": "9",
    })
    assert cfg == Config(
        skip=True, model="resnet50", epochs=3, batch_size=4, lr=1e-4, optimizer="sgd",
        image_size=64, seed=7, layers=("conv1", "fc", "layer1.0.conv1"), dataset="synthetic",
        data_dir="some/where", num_workers="2", synthetic_size=10, synthetic_test_size=5,
        max_steps=20, device="cpu", precision="bf16", flush_every=9)
    assert type(cfg.skip) is bool and type(cfg.epochs) is int and type(cfg.lr) is float
    assert isinstance(cfg.layers, tuple)


def test_absent_and_none_values_take_the_defaults():
    assert Config.from_strings({}) == Config()
    assert Config.from_strings({name: None for name in FIELD_NAMES}) == Config()
    assert Config.from_strings({"epochs": None, "lr": "0.5"}) == Config(lr=0.5)


def test_num_workers_accepts_auto_in_any_case_and_zero():
    assert Config.from_strings({"num_workers": "AUTO"}).num_workers == "auto"
    assert Config.from_strings({"num_workers": "0"}).num_workers == "0"


def test_auto_num_workers_resolves_to_one_per_core_between_1_and_8():
    auto = Config()
    assert [auto.resolved_num_workers(n) for n in (None, 1, 2, 8, 64)] == [1, 1, 2, 8, 8]
    assert Config(num_workers="3").resolved_num_workers(64) == 3
    assert Config(num_workers="0").resolved_num_workers(2) == 0


@pytest.mark.parametrize("raw, expected", [
    ("true", True), ("TRUE", True), ("True", True), ("1", True), ("yes", True), ("YeS", True),
    (" true ", True),
    ("false", False), ("FALSE", False), ("False", False), ("0", False), ("no", False), ("NO", False),
])
def test_skip_accepts_true_false_1_0_yes_no_in_any_case(raw, expected):
    cfg = Config.from_strings({"skip": raw})
    assert cfg.skip is expected
    assert cfg.variant == ("skip" if expected else "noskip")
    assert cfg.run_name == f"resnet50-{cfg.variant}"


def test_skip_maybe_is_refused_naming_skip_and_every_allowed_value():
    with pytest.raises(ConfigError) as excinfo:
        Config.from_strings({"skip": "maybe"})
    message = str(excinfo.value)
    assert excinfo.value.param == "skip"
    assert message.startswith("skip:")
    assert "maybe" in message
    for allowed in ("true", "false", "1", "0", "yes", "no"):
        assert re.search(rf"\b{allowed}\b", message), allowed
    assert "\n" not in message


@pytest.mark.parametrize("param, raw", [
    ("skip", "maybe"), ("skip", ""), ("skip", "2"),
    ("epochs", "0"), ("epochs", "-1"), ("epochs", "abc"), ("epochs", "1.5"),
    ("batch_size", "0"),
    ("lr", "-1"), ("lr", "abc"), ("lr", "0"), ("lr", "nan"), ("lr", "inf"), ("lr", ""),
    ("image_size", "7"), ("image_size", "31"),
    ("seed", "-1"),
    ("model", "alexnet"), ("model", ""),
    ("dataset", "mnist"),
    ("optimizer", "rmsprop"),
    ("device", "tpu"),
    ("precision", "fp16"),
    ("layers", ""), ("layers", ","), ("layers", " , ,"),
    ("num_workers", "x"), ("num_workers", "-1"), ("num_workers", "1.5"),
    ("synthetic_size", "0"), ("synthetic_test_size", "0"),
    ("max_steps", "-1"),
    ("flush_every", "0"),
    ("data_dir", ""), ("data_dir", "   "),
])
def test_bad_value_raises_a_one_line_config_error_starting_with_the_parameter_name(param, raw):
    with pytest.raises(ConfigError) as excinfo:
        Config.from_strings({param: raw})
    message = str(excinfo.value)
    assert excinfo.value.param == param
    assert message.startswith(f"{param}: ")
    assert "\n" not in message
    assert len(message) > len(param) + 10  # says what is wrong, not just the name


def test_unknown_parameter_name_is_refused():
    with pytest.raises(ConfigError) as excinfo:
        Config.from_strings({"foo": "1"})
    assert str(excinfo.value).startswith("foo:")


def test_config_is_immutable():
    with pytest.raises(dataclasses.FrozenInstanceError):
        Config().epochs = 3  # type: ignore[misc]


# --- rendering ------------------------------------------------------------------------------
def test_to_params_has_every_field_as_a_string_and_round_trips():
    cfg = Config.from_strings({"skip": "yes", "lr": "0.01", "layers": "fc,conv1", "epochs": "2"})
    params = cfg.to_params()
    assert list(params) == FIELD_NAMES
    assert all(type(v) is str for v in params.values())
    assert params["skip"] == "true" and params["layers"] == "fc,conv1"
    assert Config.from_strings(params) == cfg
    assert Config.from_strings(Config().to_params()) == Config()


def test_format_value_renders_booleans_lowercase_and_tuples_comma_joined():
    assert format_value(True) == "true" and format_value(False) == "false"
    assert format_value(("a", "b.c")) == "a,b.c"
    assert format_value(16) == "16" and format_value(0.001) == "0.001"


def mlflow_logged_default(yaml_default) -> str:
    # What `mlflow run` logs for a parameter left at its default: shlex.quote(str(default))
    # (mlflow.projects._project_spec.EntryPoint._sanitize_value_dict).
    return shlex.quote(str(yaml_default))


def test_to_params_renders_defaults_exactly_as_mlflow_logs_the_mlproject_defaults(mlproject):
    declared = mlproject["entry_points"]["main"]["parameters"]
    defaults = Config().to_params()
    for name in FIELD_NAMES:
        assert defaults[name] == mlflow_logged_default(declared[name]["default"]), name


# --- MLproject ---------------------------------------------------------------------------------
def test_the_committed_mlproject_is_what_the_generator_writes_from_config():
    from pipeline import mlproject

    committed = (REPO_ROOT / "MLproject").read_text()
    assert committed == mlproject.render(), "stale MLproject: run python -m pipeline.mlproject"


ENTRY_POINTS = {"main": None, "with_skip": "true", "without_skip": "false"}  # fixed --skip


def test_mlproject_has_the_three_entry_points(mlproject):
    assert set(ENTRY_POINTS) <= set(mlproject["entry_points"])


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_mlproject_entry_point_declares_exactly_the_config_fields(entry, mlproject):
    declared = mlproject["entry_points"][entry]["parameters"]
    expected = set(FIELD_NAMES) if ENTRY_POINTS[entry] is None else set(FIELD_NAMES) - {"skip"}
    assert set(declared) == expected


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_mlproject_defaults_and_types_equal_the_config_defaults(entry, mlproject):
    declared = mlproject["entry_points"][entry]["parameters"]
    by_name = {f.name: f for f in config.fields()}
    yaml_type = {"int": "int", "float": "float"}
    for name, spec in declared.items():
        f = by_name[name]
        # str() is how MLflow turns a default into a parameter; a bare YAML `false` would
        # become "False" here, which parses, but is logged differently from what we log.
        assert str(spec["default"]) == format_value(f.default), name
        assert spec.get("type", "string") == yaml_type.get(f.type, "string"), name


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_mlproject_command_passes_every_declared_parameter_as_its_option(entry, mlproject):
    ep = mlproject["entry_points"][entry]
    command = " ".join(ep["command"].split())
    assert command.startswith("python -m pipeline train ")
    for name in ep["parameters"]:
        option = f"--{name.replace('_', '-')} {{{name}}}"
        assert command.count(option) == 1, f"{entry}: {option!r} missing or repeated"
    options = re.findall(r"--([a-z0-9-]+)", command)
    assert sorted(options) == sorted(n.replace("_", "-") for n in FIELD_NAMES)
    fixed = ENTRY_POINTS[entry]
    if fixed is None:
        assert "--skip {skip}" in command
    else:
        assert f"--skip {fixed} " in command + " "
        assert "{skip}" not in command
    # every placeholder is a declared parameter, so str.format cannot fail at run time
    assert set(re.findall(r"\{(\w+)\}", command)) == set(ep["parameters"])


def test_mlproject_options_are_options_of_the_cli(mlproject):
    from pipeline.cli import train
    cli_options = {opt for p in train.params for opt in p.opts}
    command = mlproject["entry_points"]["main"]["command"]
    for option in re.findall(r"--[a-z0-9-]+", command):
        assert option in cli_options
