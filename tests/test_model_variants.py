"""The model variants: ResNet-18/34/50/101/152 and VGG-19, BatchNorm on/off, two inits.

Structure checks (names, shapes, probe points) build on the meta device, which allocates and
initialises nothing, so even VGG-19's 143M parameters cost nothing. Only the one-step
training check computes, at 32 px with batch 2, and each (model, skip, batch_norm) is built
and stepped once for the whole module.
"""
from __future__ import annotations

import functools
import math
from types import SimpleNamespace

import pytest
import torch
import torchvision
from torch import nn

from pipeline import config, models, names, plan, query
from pipeline.config import Config, ConfigError
from pipeline.models import all_layers, build_model, default_layers
from pipeline.probes import check_layers

from conftest import describe_process, run_pipeline
from test_models import NotebookResNet50, assert_state_dicts_identical

IMAGE_SIZE = 32
RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")

# (model, skip, batch_norm) for every allowed combination: vgg19 has no skip connections.
VARIANTS = [(name, skip, bn) for name in config.MODELS for skip in (False, True)
            for bn in (False, True) if not (skip and name in config.MODELS_WITHOUT_SKIP)]
VARIANT_IDS = [f"{n}-{'skip' if s else 'noskip'}-{'bn' if b else 'nobn'}" for n, s, b in VARIANTS]

# The convs that exist but never run with skip off: where a stage changes width or stride.
# BasicBlock keeps layer1's 64 channels (no downsample there); Bottleneck widens it to 256.
BASIC_DOWNSAMPLES = ("layer2.0.downsample", "layer3.0.downsample", "layer4.0.downsample")
BOTTLENECK_DOWNSAMPLES = ("layer1.0.downsample",) + BASIC_DOWNSAMPLES
UNUSED_WITHOUT_SKIP = {
    "resnet18": BASIC_DOWNSAMPLES, "resnet34": BASIC_DOWNSAMPLES,
    "resnet50": BOTTLENECK_DOWNSAMPLES, "resnet101": BOTTLENECK_DOWNSAMPLES,
    "resnet152": BOTTLENECK_DOWNSAMPLES, "vgg19": (),
}

# Conv2d + Linear modules the forward pass calls (skip off, skip on).
PROBE_POINTS = {
    # stem 1 + 8 blocks x 2 convs + fc 1 = 18; with skip the 3 downsample convs run: 21
    "resnet18": (18, 21),
    # stem 1 + (3+4+6+3 = 16 blocks) x 2 + fc 1 = 34; + 3 downsample convs = 37
    "resnet34": (34, 37),
    # stem 1 + 16 blocks x 3 + fc 1 = 50; + 4 downsample convs = 54
    "resnet50": (50, 54),
    # stem 1 + (3+4+23+3 = 33 blocks) x 3 + fc 1 = 101; + 4 = 105
    "resnet101": (101, 105),
    # stem 1 + (3+8+36+3 = 50 blocks) x 3 + fc 1 = 152; + 4 = 156
    "resnet152": (152, 156),
    # 16 convs (2+2+4+4+4) + 3 linear layers = 19; no skip variant
    "vgg19": (19, None),
}

TORCHVISION = {"resnet18": "resnet18", "resnet34": "resnet34", "resnet50": "resnet50",
               "resnet101": "resnet101", "resnet152": "resnet152"}


def meta_model(name: str, skip: bool = False, batch_norm: bool = False) -> nn.Module:
    with torch.device("meta"):
        return build_model(name, skip=skip, batch_norm=batch_norm)


@functools.cache
def stepped(name: str, skip: bool, batch_norm: bool) -> SimpleNamespace:
    """One forward and backward pass in train mode: the output, every parameter's name,
    those left without a gradient, and whether all gradients are finite. (Not the model:
    VGG-19 and its gradients alone are ~1 GB.)"""
    torch.manual_seed(0)
    model = build_model(name, skip=skip, batch_norm=batch_norm).train()
    x = torch.rand(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(1))
    # Without BN the deep stacks' activations and gradients reach float32 subnormals, which
    # CPUs compute ~20x slower; flushing them to 0 changes no "has a gradient" answer.
    torch.set_flush_denormal(True)
    try:
        out = model(x)
        nn.functional.cross_entropy(out, torch.tensor([3, 8])).backward()
    finally:
        torch.set_flush_denormal(False)
    params = dict(model.named_parameters())
    return SimpleNamespace(
        out=out.detach(), params=list(params),
        without_grad={n for n, p in params.items() if p.grad is None},
        grads_finite=all(torch.isfinite(p.grad).all()
                         for p in params.values() if p.grad is not None))


def shapes(state_dict: dict) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state_dict.items()}


def unused(name: str, param: str) -> bool:
    return any(param.startswith(prefix + ".") for prefix in UNUSED_WITHOUT_SKIP[name])


# --- training: forward, backward, who gets a gradient ----------------------------------------
@pytest.mark.parametrize("name, skip, batch_norm", VARIANTS, ids=VARIANT_IDS)
def test_every_variant_runs_forward_and_backward_at_32_px(name, skip, batch_norm):
    step = stepped(name, skip, batch_norm)
    assert step.out.shape == (2, 10)
    assert torch.isfinite(step.out).all()
    assert len(step.without_grad) < len(step.params) and step.grads_finite


@pytest.mark.parametrize("name, skip, batch_norm", [v for v in VARIANTS if v[1]],
                         ids=[i for i, v in zip(VARIANT_IDS, VARIANTS) if v[1]])
def test_with_skip_on_every_parameter_receives_a_gradient(name, skip, batch_norm):
    assert stepped(name, skip, batch_norm).without_grad == set()


@pytest.mark.parametrize("name, skip, batch_norm", [v for v in VARIANTS if not v[1]],
                         ids=[i for i, v in zip(VARIANT_IDS, VARIANTS) if not v[1]])
def test_with_skip_off_exactly_the_downsample_convs_receive_no_gradient(name, skip, batch_norm):
    step = stepped(name, skip, batch_norm)
    expected = {n for n in step.params if unused(name, n)}
    assert step.without_grad == expected
    # the exception list is not vacuous: each listed downsample exists, with its BN if any
    per_downsample = 3 if batch_norm else 1  # conv weight (+ BN weight and bias)
    assert len(expected) == per_downsample * len(UNUSED_WITHOUT_SKIP[name])


# --- names and shapes ------------------------------------------------------------------------
@pytest.mark.parametrize("name", RESNETS)
def test_resnets_with_batch_norm_have_torchvisions_parameter_names_and_shapes(name):
    ours = meta_model(name, skip=True, batch_norm=True).state_dict()
    with torch.device("meta"):
        theirs = getattr(torchvision.models, TORCHVISION[name])(num_classes=10).state_dict()
    assert shapes(ours) == shapes(theirs)
    assert list(ours) == list(theirs)  # the same order, too


@pytest.mark.parametrize("batch_norm", [False, True])
def test_vgg19_has_torchvisions_parameter_names_and_shapes_with_10_classes(batch_norm):
    ours = meta_model("vgg19", batch_norm=batch_norm).state_dict()
    factory = torchvision.models.vgg19_bn if batch_norm else torchvision.models.vgg19
    with torch.device("meta"):
        theirs = factory(num_classes=10).state_dict()
    assert list(ours) == list(theirs)
    assert shapes(ours) == shapes(theirs)
    assert ours["classifier.6.weight"].shape == (10, 4096)


@pytest.mark.parametrize("name", config.MODELS)
def test_without_batch_norm_no_model_has_a_normalisation_module(name):
    norms = (nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm, nn.InstanceNorm2d)
    model = meta_model(name)
    assert not [n for n, m in model.named_modules() if isinstance(m, norms)]


@pytest.mark.parametrize("name", config.MODELS)
def test_batch_norm_follows_every_conv(name):
    model = meta_model(name, skip=name not in config.MODELS_WITHOUT_SKIP, batch_norm=True)
    convs = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    bns = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert convs == bns > 0


def test_without_batch_norm_a_downsample_stays_a_bare_conv_and_with_it_becomes_conv_then_bn():
    plain = meta_model("resnet50")
    assert isinstance(plain.layer1[0].downsample, nn.Conv2d)
    normed = meta_model("resnet50", batch_norm=True)
    ds = normed.layer1[0].downsample
    assert isinstance(ds, nn.Sequential)
    assert isinstance(ds[0], nn.Conv2d) and isinstance(ds[1], nn.BatchNorm2d)


@pytest.mark.parametrize("name", config.MODELS)
def test_no_variant_computes_in_place(name):
    for batch_norm in (False, True):
        model = meta_model(name, batch_norm=batch_norm)
        assert [n for n, m in model.named_modules() if getattr(m, "inplace", False)] == []


# --- resnet50 without BN is the notebook's network, unchanged -------------------------------
@pytest.mark.parametrize("skip", [False, True])
def test_resnet50_without_batch_norm_and_with_pytorch_init_is_the_notebooks_network(skip):
    torch.manual_seed(123)
    notebook = NotebookResNet50(skip=skip)
    torch.manual_seed(123)
    ours = build_model("resnet50", skip=skip, num_classes=10, batch_norm=False, init="pytorch")
    assert [n for n, _ in ours.named_modules()] == [n for n, _ in notebook.named_modules()]
    assert_state_dicts_identical(ours.state_dict(), notebook.state_dict())


def test_batch_norm_draws_no_random_numbers_so_conv_weights_match_the_notebooks_for_a_seed():
    torch.manual_seed(5)
    notebook = NotebookResNet50(skip=True).state_dict()
    torch.manual_seed(5)
    ours = build_model("resnet50", skip=True, batch_norm=True).state_dict()
    ours = {k.replace("downsample.0.", "downsample."): v for k, v in ours.items()}
    for key, value in notebook.items():
        assert torch.equal(ours[key], value), key


# --- init ------------------------------------------------------------------------------------
def test_kaiming_init_gives_conv_weights_the_std_sqrt_2_over_fan_out():
    torch.manual_seed(0)
    model = build_model("resnet50", init="kaiming", batch_norm=True)
    checked = 0
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d) and m.weight.numel() >= 100_000:
            fan_out = m.out_channels * m.kernel_size[0] * m.kernel_size[1]
            expected = math.sqrt(2.0 / fan_out)
            assert m.weight.std().item() == pytest.approx(expected, rel=0.02), name
            assert abs(m.weight.mean().item()) < 0.05 * expected, name
            checked += 1
        if isinstance(m, nn.BatchNorm2d):
            assert torch.equal(m.weight, torch.ones_like(m.weight)), name
            assert torch.equal(m.bias, torch.zeros_like(m.bias)), name
    assert checked > 20


def test_pytorch_init_leaves_convs_at_pytorchs_default_std_and_kaiming_changes_it():
    torch.manual_seed(0)
    default = build_model("resnet18").layer4[1].conv2  # 512 x 512 x 3 x 3
    fan_in = 512 * 9
    # kaiming_uniform_(a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in)), std = bound / sqrt(3)
    assert default.weight.std().item() == pytest.approx(1 / math.sqrt(3 * fan_in), rel=0.02)
    torch.manual_seed(0)
    kaiming = build_model("resnet18", init="kaiming").layer4[1].conv2
    assert kaiming.weight.std().item() == pytest.approx(math.sqrt(2 / (512 * 9)), rel=0.02)


def test_kaiming_init_zeroes_vgg_conv_biases_and_leaves_linear_layers_at_the_default():
    torch.manual_seed(0)
    model = build_model("vgg19", init="kaiming")
    conv = model.features[0]
    assert torch.equal(conv.bias, torch.zeros_like(conv.bias))
    head = model.classifier[6]  # PyTorch's default: U(-1/sqrt(4096), 1/sqrt(4096)), bias too
    assert head.bias.abs().max().item() <= 1 / math.sqrt(4096)
    assert head.bias.abs().max().item() > 0


def test_an_unknown_init_is_refused_naming_init_and_the_allowed_values():
    with pytest.raises(ValueError, match=r"init: .*xavier.*pytorch, kaiming"):
        build_model("resnet18", init="xavier")
    with pytest.raises(ConfigError) as excinfo:
        Config.from_strings({"init": "xavier"})
    assert excinfo.value.param == "init"


# --- probe points ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", config.MODELS)
def test_all_layers_lists_every_conv_and_linear_that_runs_in_forward_order(name):
    off, on = PROBE_POINTS[name]
    for batch_norm in (False, True):
        plain = all_layers(meta_model(name, batch_norm=batch_norm))
        assert len(plain) == off
        assert not any(".downsample" in layer for layer in plain)
        assert plain[-1] in ("fc", "classifier.6")
        if on is not None:
            residual = all_layers(meta_model(name, skip=True, batch_norm=batch_norm))
            assert len(residual) == on
            downsamples = [layer.removesuffix(".0") for layer in residual if ".downsample" in layer]
            assert downsamples == list(UNUSED_WITHOUT_SKIP[name])


def test_all_layers_follows_the_forward_order_of_a_block():
    layers = all_layers(meta_model("resnet50", skip=True))
    assert layers[:6] == ["conv1", "layer1.0.conv1", "layer1.0.conv2", "layer1.0.conv3",
                          "layer1.0.downsample", "layer1.1.conv1"]


def test_all_layers_leaves_a_models_training_mode_as_it_was():
    model = build_model("resnet18", batch_norm=True).train()
    model.layer1.eval()
    all_layers(model)
    assert model.training and not model.layer1.training and not model.layer1[0].bn1.training
    assert model.layer2[0].bn1.training


@pytest.mark.parametrize("name", config.MODELS)
def test_default_layers_are_five_valid_probe_points_for_every_variant(name):
    for batch_norm in (False, True):
        layers = default_layers(name, batch_norm=batch_norm)
        assert len(layers) == 5
        for skip in (False, True) if name not in config.MODELS_WITHOUT_SKIP else (False,):
            model = meta_model(name, skip=skip, batch_norm=batch_norm)
            check_layers(model, layers, IMAGE_SIZE)  # raises ConfigError if not
            order = all_layers(model)
            assert list(layers) == sorted(layers, key=order.index)  # stem first, head last


def test_default_layers_of_resnet50_are_the_notebooks_five():
    assert default_layers("resnet50") == config.DEFAULT_LAYERS
    assert default_layers("resnet50", batch_norm=True) == config.DEFAULT_LAYERS
    assert default_layers("resnet18")[3] == "layer3.1.conv2"
    assert default_layers("resnet152")[3] == "layer3.35.conv3"
    assert default_layers("vgg19") == ("features.0", "features.2", "features.10", "features.25",
                                       "classifier.6")


# --- layers=auto ------------------------------------------------------------------------------
def test_layers_auto_is_the_default_and_is_logged_as_auto():
    assert Config().layers == config.AUTO_LAYERS
    assert Config().to_params()["layers"] == "auto"
    assert Config.from_strings({"layers": " AUTO "}).layers == config.AUTO_LAYERS


def test_layers_auto_mixed_with_names_is_refused_in_one_line():
    with pytest.raises(ConfigError) as excinfo:
        Config.from_strings({"layers": "auto,fc"})
    assert excinfo.value.param == "layers" and "\n" not in str(excinfo.value)


def test_train_resolves_layers_auto_to_the_models_defaults_and_keeps_explicit_names():
    assert plan.resolve_layers(Config()) == config.DEFAULT_LAYERS
    vgg = Config(model="vgg19", batch_norm=True)
    assert plan.resolve_layers(vgg) == default_layers("vgg19", batch_norm=True)
    assert plan.resolve_layers(Config(layers=("fc", "conv1"))) == ("fc", "conv1")


def test_probed_layers_of_an_auto_run_follow_the_resolved_tag_input_side_first():
    layers = default_layers("resnet18")
    run = SimpleNamespace(
        info=SimpleNamespace(run_id="r"),
        data=SimpleNamespace(metrics={names.grad_norm(layer): 1.0 for layer in layers},
                             params={"layers": "auto"},
                             tags={names.LAYERS_RESOLVED_TAG: ",".join(layers)}))
    assert query.probed_layers(run) == list(layers)  # fc last: the compare's reference


# --- vgg19 and skip ---------------------------------------------------------------------------
def test_vgg19_with_skip_is_refused_by_the_config_and_by_build_model_naming_skip():
    with pytest.raises(ConfigError) as excinfo:
        Config.from_strings({"model": "vgg19", "skip": "true"})
    assert excinfo.value.param == "skip" and "vgg19" in str(excinfo.value)
    assert Config.from_strings({"model": "vgg19", "skip": "false"}).run_name == "vgg19-noskip"
    with pytest.raises(ConfigError) as excinfo:
        meta_model("vgg19", skip=True)
    assert excinfo.value.param == "skip"


def assert_one_line_skip_refusal(proc) -> None:
    assert proc.returncode == 2, describe_process(proc)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, describe_process(proc)
    assert lines[0].startswith("error: skip: ") and "vgg19" in lines[0], lines[0]
    assert "Traceback" not in proc.stderr + proc.stdout


def test_training_vgg19_with_skip_exits_2_with_one_line_before_any_data_work(tracking_store):
    data_dir = tracking_store.dir / "data"
    proc = run_pipeline(["train", "--model", "vgg19", "--skip", "true", "--dataset", "cifar10",
                         "--data-dir", str(data_dir), "--image-size", "32"],
                        cwd=tracking_store.dir, store=tracking_store)
    assert_one_line_skip_refusal(proc)
    assert not data_dir.exists()  # no download was attempted
    assert not (tracking_store.dir / "mlflow.db").exists()  # no run either


def test_the_all_step_with_vgg19_exits_2_with_one_line_before_any_run(tracking_store):
    data_dir = tracking_store.dir / "data"
    proc = run_pipeline(["all", "--model", "vgg19", "--dataset", "cifar10",
                         "--data-dir", str(data_dir), "--image-size", "32"],
                        cwd=tracking_store.dir, store=tracking_store)
    assert_one_line_skip_refusal(proc)
    assert not data_dir.exists()
    assert not (tracking_store.dir / "mlflow.db").exists()


def test_config_and_registry_list_the_six_models():
    assert config.MODELS == ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "vgg19")
    assert tuple(models.MODELS) == config.MODELS
