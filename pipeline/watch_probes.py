"""GradientProbes as ``pipeline.watch`` drives them: unscaled under a GradScaler, a step's
measurements dropped when the scaler skips it, and an identity-op capture for
``torch.compile`` (docs: guide/watch.md, "torch.compile").

``hook`` (eager models) is training's own probes. ``identity`` (compiled models) avoids the
graph break a tensor hook's Python side effect causes: the output is wrapped in
``SquaredNorm``, an identity whose backward returns ||g||^2 (float64) as the gradient of a
dummy leaf per layer, which autograd accumulates by itself and the step reads into the row.
Under a GradScaler the squared norms are divided by scale^2 on the device (exact: a power of
two), with no sync.
"""
from __future__ import annotations

import warnings
from typing import Callable

import torch

from .probes import GradientProbes


class WatchProbes(GradientProbes):
    """``GradientProbes`` plus what a user's loop needs: unscaling and ``discard``."""

    capture = "hook"

    def __init__(self, *args, scale: Callable[[], torch.Tensor | None] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.scale = scale  # the GradScaler's current scale (a device tensor), or None
        # Set per step: the scale still in the weight gradients, when the optimizer unscales
        # inside its own step (GradScaler hands fused Adam ``optimizer.grad_scale``).
        self.weights_scale: torch.Tensor | None = None

    def record(self, loss: torch.Tensor) -> None:
        out_scale = self.scale() if self.scale is not None and self.outputs else None
        weights_scale = self.weights_scale if self.weights else None
        if out_scale is None and weights_scale is None:  # training's record, op for op
            super().record(loss)
            return
        self._reduce_kept()  # every output gradient of the step is in by now
        if out_scale is not None:
            self.cur[:self.loss_col].mul_(_inverse_square(out_scale, self.cur.dtype))
        params = self._params
        if weights_scale is not None:
            # The weights' squares go in now, so that only their columns are unscaled, and
            # the base record must not add them a second time.
            self._keep_weights()
            self._reduce_kept()
            self.cur[self.loss_col + 1:].mul_(_inverse_square(weights_scale, self.cur.dtype))
            self._params = []
        try:
            super().record(loss)
        finally:
            self._params = params

    def discard(self) -> None:
        """Forget what was gathered since the last step (a step GradScaler skipped)."""
        self._kept = []
        self.cur.zero_()


def _inverse_square(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return scale.detach().to(dtype).reciprocal().square()


class SquaredNorm(torch.autograd.Function):
    """Identity forward; backward returns the gradient unchanged and, as the gradient of
    ``leaf``, its squared L2 norm in float64."""

    @staticmethod
    def forward(x, leaf):
        # A copy, not a view: a following in-place op (ReLU(inplace=True)) may not modify a
        # view a custom Function returned. Under inductor the copy is fused away.
        return x.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad):
        return grad, torch.linalg.vector_norm(grad, dtype=torch.float64).square()


class IdentityProbes(WatchProbes):
    """The ``identity`` capture: output gradients through ``SquaredNorm`` and dummy leaves."""

    capture = "identity"

    def __init__(self, model, names, flush_every: int, device: torch.device, **kwargs):
        if device.type == "mps":
            raise ValueError("pipeline.watch: a torch.compile'd model on MPS is not supported "
                             "(MPS has no float64); watch the model before compiling it")
        # One float64 scalar leaf per layer; the optimizer never sees them.
        self.leaves = [torch.zeros((), dtype=torch.float64, device=device, requires_grad=True)
                       for _ in names]
        self._checked = False  # whether the first step's leaves were looked at
        super().__init__(model, names, flush_every, device, **kwargs)

    def _on_forward(self, col: int):
        leaf = self.leaves[col]

        def hook(module, inputs, output):
            out = output[0] if isinstance(output, (tuple, list)) else output
            if not (torch.is_tensor(out) and out.requires_grad):
                return None  # eval / no_grad: leave the output alone
            wrapped = SquaredNorm.apply(out, leaf)
            if isinstance(output, (tuple, list)):
                return type(output)([wrapped, *output[1:]])
            return wrapped
        return hook

    def _gather_leaves(self) -> None:
        grads = [(col, leaf.grad) for col, leaf in enumerate(self.leaves) if leaf.grad is not None]
        if not grads:
            return
        cols = [c for c, _ in grads]
        if cols == list(range(len(cols))):  # the usual case: every layer ran
            self.cur[:len(cols)].add_(torch.stack([g for _, g in grads]))
        else:
            for col, g in grads:
                self.cur[col].add_(g)
        torch._foreach_zero_([g for _, g in grads])

    def record(self, loss: torch.Tensor) -> None:
        if self.outputs and not self._checked:
            self._checked = True
            if all(leaf.grad is None for leaf in self.leaves):  # an attribute read: no sync
                warnings.warn("pipeline.watch: no output gradient reached the probes of the "
                              "compiled model (its compiled code may predate the watch: call "
                              "torch._dynamo.reset() before pipeline.watch); its norms read 0",
                              stacklevel=4)
        self._gather_leaves()
        super().record(loss)

    def discard(self) -> None:
        super().discard()
        for leaf in self.leaves:
            if leaf.grad is not None:
                leaf.grad.zero_()


class FirstStep:
    """Until the layers are known (at the first optimizer step): the order in which the
    forward pass first calls each module, and the float64 squared norm of the output
    gradient of each module that may be chosen, summed over the step's backward passes.

    This lets ``layers`` be resolved from the forward pass the user's loop actually runs
    (no dry run, no input shapes to guess) while the first step is still measured. Eager
    models only: under ``torch.compile`` these hooks would be traced (``selection.call_order``
    resolves those before their first call instead).
    """

    def __init__(self, modules: dict, candidates: set[str]):
        self.order: dict[str, None] = {}
        self.squares: dict[str, torch.Tensor] = {}
        self._handles = [m.register_forward_pre_hook(self._called(n)) for n, m in modules.items()]
        self._handles += [modules[n].register_forward_hook(self._on_forward(n))
                          for n in candidates]

    def _called(self, name: str):
        def hook(module, inputs):
            self.order.setdefault(name)
        return hook

    def _on_forward(self, name: str):
        def hook(module, inputs, output):
            out = output[0] if isinstance(output, (tuple, list)) else output
            if torch.is_tensor(out) and out.requires_grad:
                out.register_hook(lambda g: self._add(name, g))
        return hook

    def _add(self, name: str, grad: torch.Tensor) -> None:
        square = torch.linalg.vector_norm(grad, dtype=torch.float64).square()
        if name in self.squares:
            self.squares[name] += square
        else:
            self.squares[name] = square

    def forget(self) -> None:
        """Drop the gradients gathered so far (a step GradScaler skipped); keep the order."""
        self.squares = {}

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
