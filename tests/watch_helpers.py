"""The tests' own network and reference norms for ``pipeline.watch`` (test_watch*.py,
test_lightning.py). Nothing here comes from pipeline/models.py or pipeline/probes.py: the
reference is what a user would write, one float64 norm per hook, read with ``.item()``."""
from __future__ import annotations

import math

import torch
from mlflow.tracking import MlflowClient
from torch import nn

# Five conv/linear layers in call order, the last of them defined first.
LAYERS = ["stem", "blocks.0.conv2", "blocks.1.conv1", "blocks.2.conv2", "head"]


class Block(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.act = nn.ReLU(inplace=True)  # in place right after a probed conv

    def forward(self, x):
        return self.act(self.conv2(self.act(self.conv1(x))))


class Net(nn.Module):
    """A small conv net: a stem, three blocks of two convs, a head. The head is defined
    before the body (definition order is not call order), ``unused`` never runs, and
    ``act`` is one module called after the stem and after the pooling (twice a step)."""

    def __init__(self, classes: int = 5):
        super().__init__()
        self.head = nn.Linear(16, classes)
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.act = nn.ReLU()
        self.blocks = nn.ModuleList([Block(8, 8), Block(8, 16), Block(16, 16)])
        self.unused = nn.Linear(4, 4)

    def forward(self, x):
        x = self.act(self.stem(x))
        for block in self.blocks:
            x = block(x)
        return self.head(self.act(x.mean((2, 3))))


def batches(n: int, batch: int = 4, size: int = 8, classes: int = 5, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 3, size, size, generator=g),
             torch.randint(0, classes, (batch,), generator=g)) for _ in range(n)]


class Reference:
    """The norms a user's own hooks give: for each layer, a tensor hook on its output that
    adds ``g.double().pow(2).sum().item()`` (one sync per layer per backward; fine in a
    test), and, at ``end_step``, the weight gradients' squares; one row per step."""

    def __init__(self, model: nn.Module, layers, scale=lambda: 1.0):
        self.layers, self.scale = list(layers), scale
        modules = dict(model.named_modules())
        self.modules = [modules[n] for n in self.layers]
        self.squares = dict.fromkeys(self.layers, 0.0)
        self.rows: list[dict[str, float]] = []
        self.weight_rows: list[dict[str, float]] = []
        self.handles = [m.register_forward_hook(self._hook(n)) for n, m in zip(self.layers, self.modules)]

    def _hook(self, name):
        def forward_hook(module, inputs, output):
            if output.requires_grad:
                output.register_hook(lambda g: self._add(name, g))
        return forward_hook

    def _add(self, name, g):
        self.squares[name] += g.double().pow(2).sum().item() / self.scale() ** 2

    def end_step(self, keep: bool = True, weight_scale: float = 1.0) -> None:
        """After backward, before the optimizer step: close the row (``keep=False``: drop it)."""
        if keep:
            self.rows.append({n: math.sqrt(v) for n, v in self.squares.items()})
            self.weight_rows.append({
                n: math.sqrt(sum(p.grad.double().pow(2).sum().item()
                                 for p in m.parameters(recurse=False))) / weight_scale
                for n, m in zip(self.layers, self.modules)})
        self.squares = dict.fromkeys(self.layers, 0.0)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def history(run_id: str, key: str) -> list[tuple[int, float]]:
    """(step, value) of every point of ``key``, by step."""
    return sorted((m.step, m.value) for m in MlflowClient().get_metric_history(run_id, key))


def assert_rel_close(got: float, expected: float, rel: float = 1e-6, what: str = "") -> None:
    assert expected != 0 and math.isfinite(got), f"{what}: got {got!r}, expected {expected!r}"
    assert abs(got - expected) <= rel * abs(expected), f"{what}: got {got!r}, expected {expected!r}"
