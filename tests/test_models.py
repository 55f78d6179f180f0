"""Model fidelity: build_model("resnet50", ...) is the founding notebook's network.

The notebook's classes are transcribed below, as the founding notebook wrote them (only
renamed, and ``.cuda()`` left out), so the checks compare against an independent
implementation rather than against the pipeline's own code.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from pipeline import config, models
from pipeline.models import build_model

IMAGE_SIZE = 32


# --- the founding notebook's model, transcribed -----------------------------------------
class NotebookBottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_planes, planes, stride=1, skip=False):
        super(NotebookBottleneck, self).__init__()
        self.skip = skip
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=1, bias=False)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.conv3 = nn.Conv2d(planes, self.expansion * planes, kernel_size=1, bias=False)
        self.relu = nn.ReLU(inplace=False)
        self.downsample = None
        if stride != 1 or in_planes != self.expansion * planes:
            self.downsample = nn.Conv2d(in_planes, self.expansion * planes, kernel_size=1, stride=stride, bias=False)

    def forward(self, x):
        identity = x
        out = self.relu(self.conv1(x))
        out = self.relu(self.conv2(out))
        out = self.conv3(out)
        if self.skip:
            if self.downsample is not None:
                identity = self.downsample(identity)
            out = out + identity
        return self.relu(out)


class NotebookResNet50(nn.Module):  # the notebook's CustomResNet50
    def __init__(self, skip=False):
        super(NotebookResNet50, self).__init__()
        self.in_planes = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(64, 3, skip)
        self.layer2 = self._make_layer(128, 4, skip, stride=2)
        self.layer3 = self._make_layer(256, 6, skip, stride=2)
        self.layer4 = self._make_layer(512, 3, skip, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * NotebookBottleneck.expansion, 10)

    def _make_layer(self, planes, blocks, skip, stride=1):
        layers = [NotebookBottleneck(self.in_planes, planes, stride, skip)]
        self.in_planes = planes * NotebookBottleneck.expansion
        for _ in range(1, blocks):
            layers.append(NotebookBottleneck(self.in_planes, planes, skip=skip))
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.conv1(x)
        x = self.maxpool(x)
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)
        x = self.avgpool(x).view(x.size(0), -1)
        x = self.fc(x)
        return x


# --- helpers ---------------------------------------------------------------------------
def he_initialised_notebook_model(skip: bool, seed: int) -> NotebookResNet50:
    """The notebook's model with He-scaled conv weights.

    With PyTorch's default init, activations of the 50-layer plain stack shrink to ~0 and
    the output is almost exactly the fc bias, so equal outputs would prove little. He
    scaling keeps activations O(1): the output then depends on every layer's maths.
    """
    torch.manual_seed(seed)
    net = NotebookResNet50(skip=skip)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.Conv2d):
                fan_in = m.in_channels * m.kernel_size[0] * m.kernel_size[1]
                m.weight.normal_(0.0, math.sqrt(2.0 / fan_in))
                if skip:  # keep the residual sum from growing block by block
                    m.weight.mul_(0.5)
    return net


def assert_state_dicts_identical(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for key in a:
        assert a[key].shape == b[key].shape, key
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key], b[key]), f"{key} differs"


# --- names and shapes ---------------------------------------------------------------------
@pytest.mark.parametrize("skip", [False, True])
def test_resnet50_has_the_notebooks_module_names_in_the_notebooks_order(skip):
    ours = [name for name, _ in build_model("resnet50", skip=skip).named_modules()]
    notebook = [name for name, _ in NotebookResNet50(skip=skip).named_modules()]
    assert ours == notebook
    for name in config.DEFAULT_LAYERS:
        assert name in ours


@pytest.mark.parametrize("skip", [False, True])
def test_resnet50_has_the_notebooks_parameter_names_and_shapes(skip):
    ours = {k: tuple(v.shape) for k, v in build_model("resnet50", skip=skip).state_dict().items()}
    notebook = {k: tuple(v.shape) for k, v in NotebookResNet50(skip=skip).state_dict().items()}
    assert ours == notebook


def test_resnet50_architecture_is_the_documented_one_without_batchnorm():
    model = build_model("resnet50", skip=False)
    stem = model.conv1
    assert isinstance(stem, nn.Conv2d)
    assert (stem.in_channels, stem.out_channels) == (3, 64)
    assert stem.kernel_size == (7, 7) and stem.stride == (2, 2) and stem.padding == (3, 3)
    assert stem.bias is None
    assert isinstance(model.maxpool, nn.MaxPool2d)
    assert [len(getattr(model, f"layer{i}")) for i in range(1, 5)] == [3, 4, 6, 3]
    assert isinstance(model.avgpool, nn.AdaptiveAvgPool2d)
    assert (model.fc.in_features, model.fc.out_features) == (2048, 10)
    norms = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm, nn.LayerNorm,
             nn.InstanceNorm2d, nn.SyncBatchNorm)
    assert not [n for n, m in model.named_modules() if isinstance(m, norms)]
    total = sum(p.numel() for p in model.parameters())
    assert total == sum(p.numel() for p in NotebookResNet50(skip=False).parameters())


@pytest.mark.parametrize("skip", [False, True])
def test_no_module_computes_in_place(skip):
    model = build_model("resnet50", skip=skip)
    in_place = [name for name, m in model.named_modules() if getattr(m, "inplace", False)]
    assert in_place == []
    relus = [m for m in model.modules() if isinstance(m, nn.ReLU)]
    assert relus, "the network must have ReLUs"


def test_downsample_convs_exist_even_with_skip_off_exactly_where_the_notebook_has_them():
    ours = build_model("resnet50", skip=False)
    notebook = NotebookResNet50(skip=False)
    ours_ds = {n: tuple(m.weight.shape) for n, m in ours.named_modules() if n.endswith("downsample")}
    nb_ds = {n: tuple(m.weight.shape) for n, m in notebook.named_modules() if n.endswith("downsample")}
    assert ours_ds == nb_ds
    assert set(ours_ds) == {"layer1.0.downsample", "layer2.0.downsample",
                            "layer3.0.downsample", "layer4.0.downsample"}
    assert ours.layer1[1].downsample is None
    assert ours_ds["layer2.0.downsample"] == (512, 256, 1, 1)
    assert ours.layer2[0].downsample.stride == (2, 2)


# --- loading and forward maths -------------------------------------------------------------
@pytest.mark.parametrize("skip", [False, True])
def test_notebook_state_dict_loads_strictly_and_gives_identical_outputs(skip):
    notebook = he_initialised_notebook_model(skip, seed=1).eval()
    ours = build_model("resnet50", skip=skip).eval()
    ours.load_state_dict(notebook.state_dict(), strict=True)

    x = torch.rand(3, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected, got = notebook(x), ours(x)
    assert got.shape == (3, 10)
    assert torch.isfinite(expected).all()
    # The comparison means something only if the output depends on the input.
    assert not torch.allclose(expected[0], expected[1], rtol=1e-3, atol=0)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("skip", [False, True])
def test_our_state_dict_loads_strictly_into_the_notebook_class_with_identical_outputs(skip):
    torch.manual_seed(3)
    ours = build_model("resnet50", skip=skip).eval()
    # He-scale our weights too, so the output is not just the fc bias.
    donor = he_initialised_notebook_model(skip, seed=4)
    ours.load_state_dict(donor.state_dict(), strict=True)
    notebook = NotebookResNet50(skip=skip).eval()
    notebook.load_state_dict(ours.state_dict(), strict=True)

    x = torch.rand(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(ours(x), notebook(x))


@pytest.mark.parametrize("skip", [False, True])
def test_training_gradients_are_identical_to_the_notebooks(skip):
    notebook = he_initialised_notebook_model(skip, seed=6).train()
    ours = build_model("resnet50", skip=skip).train()
    ours.load_state_dict(notebook.state_dict(), strict=True)
    x = torch.rand(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(7))
    y = torch.tensor([3, 8])
    for net in (notebook, ours):
        nn.functional.cross_entropy(net(x), y).backward()
    nb_grads = dict(notebook.named_parameters())
    for name, p in ours.named_parameters():
        expected = nb_grads[name].grad
        if expected is None:  # downsample convs with skip off are never used, in both
            assert p.grad is None, name
        else:
            assert torch.equal(p.grad, expected), name
    assert ours.conv1.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("skip", [False, True])
def test_same_seed_gives_the_notebooks_initial_weights_exactly(skip):
    torch.manual_seed(123)
    notebook = NotebookResNet50(skip=skip)
    torch.manual_seed(123)
    ours = build_model("resnet50", skip=skip)
    assert_state_dicts_identical(ours.state_dict(), notebook.state_dict())


def test_different_seeds_give_different_initial_weights():
    torch.manual_seed(0)
    a = build_model("resnet50").conv1.weight
    torch.manual_seed(1)
    b = build_model("resnet50").conv1.weight
    assert not torch.equal(a, b)


def test_skip_switch_changes_the_forward_computation():
    donor = he_initialised_notebook_model(skip=False, seed=8).state_dict()
    plain, residual = build_model("resnet50", skip=False), build_model("resnet50", skip=True)
    plain.load_state_dict(donor)
    residual.load_state_dict(donor)
    x = torch.rand(1, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        assert not torch.equal(plain.eval()(x), residual.eval()(x))


# --- the registry ------------------------------------------------------------------------------
def test_unknown_model_name_raises_an_error_naming_the_allowed_models():
    with pytest.raises(ValueError) as excinfo:
        build_model("alexnet", skip=False)
    assert "alexnet" in str(excinfo.value)
    assert "resnet50" in str(excinfo.value)


def test_config_lists_exactly_the_models_the_registry_builds():
    assert tuple(config.MODELS) == tuple(models.MODELS)
    for name in config.MODELS:
        assert isinstance(build_model(name), nn.Module)
