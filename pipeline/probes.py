"""Gradient probes: the L2 norm of dLoss/d(output) of chosen modules, every training step
(docs: internals/probes.md).

The founding notebook's ``grad_output[0].norm()``, with three differences, all on purpose:
the norm is reduced in float64 (the no-skip network's ~1e-21 gradients have squares below
float32's smallest subnormal, so a float32 norm reads 0.0); one grouped
``torch._foreach_norm(dtype=float64)`` per step takes every layer at once (a GPU step at
batch 16 is bound by its kernel count); and the host never waits for it: the squared norms
and the loss go into a row of a device buffer, every op capturable in a CUDA graph, copied
out every ``flush_every`` steps and waited for by a background thread (``Chunk.values``).
With ``weights`` the layers' own weight-gradient norms join the same reduction. On MPS (no
float64) the fallback is float32 with scale-by-max.
"""
from __future__ import annotations

import copy
import difflib
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from .config import ConfigError

# Output gradients kept for one grouped reduction. Bounds the memory they hold (the largest,
# conv1's at 224 px and batch 16, is 51 MB in float32) while the default five layers, and
# most hand-picked lists, still take a single group per step.
GROUP = 16

# The training loop also lets a chunk leave after this many seconds, even if not full: on a
# CPU, where a 224 px step takes seconds, the console and the MLflow UI would otherwise wait
# minutes for the first points. On a GPU flush_every fills first. Reading the host clock
# costs no sync.
FLUSH_SECONDS = 5.0


def check_layers(model: nn.Module, names: tuple[str, ...], image_size: int,
                 weights: bool = False) -> None:
    """Refuse names that are not modules of ``model`` or that its forward pass never calls
    (and, with ``weights``, modules that own no parameters to take a gradient norm of).

    Cheap enough to run before any data work: the liveness check runs the model on the
    meta device, which computes shapes only.
    """
    modules = dict(model.named_modules())
    modules.pop("", None)  # the model itself has no name to probe
    for name in names:
        if name not in modules:
            # The model has dozens to hundreds of modules: name the nearest few, not all.
            close = difflib.get_close_matches(name, modules.keys(), n=5, cutoff=0.5)
            hint = (f"closest: {', '.join(close)}" if close
                    else f"first in the model: {', '.join(list(modules)[:5])}")
            raise ConfigError("layers", f"{name!r} is not a module of this model; allowed: auto, "
                                        f"all, or its module names ({hint})")
    if weights:
        bare = [n for n in names if not list(modules[n].parameters(recurse=False))]
        if bare:
            raise ConfigError("layers", f"{', '.join(bare)} own(s) no parameters, so probe=weight "
                                        "has no weight gradient to measure there; allowed: conv "
                                        "and linear layers (or probe=output)")

    called: set[str] = set()
    # eval: a training-mode BatchNorm refuses batch 1 at 1x1 (32 px); the same modules run.
    meta = copy.deepcopy(model).to("meta").eval()
    meta_modules = dict(meta.named_modules())
    handles = [meta_modules[n].register_forward_hook(lambda m, i, o, n=n: called.add(n)) for n in names]
    try:
        with torch.no_grad():
            meta(torch.empty(1, 3, image_size, image_size, device="meta"))
    finally:
        for h in handles:
            h.remove()
    unused = [n for n in names if n not in called]
    if unused:
        raise ConfigError("layers", f"{', '.join(unused)} never run(s) in this model's forward pass "
                                    "(a downsample conv with skip off, say), so it has no gradient")


@dataclass
class Chunk:
    """Rows ``first_step .. first_step+n-1`` of the buffer, on their way to the host."""

    first_step: int
    host: torch.Tensor                       # (n, layers + 1): squared norms (or norms), then loss
    event: torch.cuda.Event | None           # completes when the copy has landed
    timestamps_ms: list[int] = field(default_factory=list)
    squared: bool = True                     # False: the float32 fallback stores norms
    loss_col: int = -1                       # the loss's column; every other one is a norm

    def values(self) -> np.ndarray:
        """Norms (square-rooted) and loss; blocks the *calling* thread until the copy lands."""
        if self.event is not None:
            self.event.synchronize()
        out = self.host.numpy().astype(np.float64)
        if self.squared:  # every column but the loss's, which may be any sign
            norms = np.arange(out.shape[1]) != self.loss_col % out.shape[1]
            out[:, norms] = np.sqrt(out[:, norms])
        return out


class GradientProbes:
    """Forward hooks that attach a gradient hook to each probed module's output.

    Use: ``commit`` once per training step, after backward (or ``record`` inside the step and
    ``advance`` outside it, when the step is a CUDA graph); it returns a ``Chunk`` when
    ``flush_every`` rows are full (or FLUSH_SECONDS have passed), and ``drain`` returns the
    partial rest.
    """

    def __init__(self, model: nn.Module, names: tuple[str, ...], flush_every: int,
                 device: torch.device, flush_seconds: float | None = None,
                 dtype: torch.dtype | None = None, reduce=None, outputs: bool = True,
                 weights: bool = False):
        self.names = list(names)
        self.outputs, self.weights = outputs, weights
        # DDP: sums the ranks' squared norms and losses into the global batch's, in place
        # (distributed.Comm.reduce_probes); None with one process.
        self.reduce = reduce
        self.flush_every = flush_every
        self.flush_seconds = flush_seconds  # None: chunks are exactly flush_every rows
        self.device = device
        # float64 wherever the device has it (not MPS): see the module docstring.
        self.dtype = dtype or (torch.float32 if device.type == "mps" else torch.float64)
        self.squared = self.dtype == torch.float64
        # columns: squared output-gradient norm per layer (with outputs), the loss, squared
        # weight-gradient norm per layer (with weights)
        self.loss_col = len(names) if outputs else 0
        width = self.loss_col + 1 + (len(names) if weights else 0)
        self.buf = torch.zeros(flush_every, width, dtype=self.dtype, device=device)
        self.cur = torch.zeros(width, dtype=self.dtype, device=device)
        # The row this step lands in, kept on the device so a replayed CUDA graph advances it;
        # ``row`` mirrors it on the host (the host counts its own steps: reading it back
        # would be a sync).
        self.row_t = torch.zeros(1, dtype=torch.int64, device=device)
        self.row = 0
        self.step = 0               # global step of buf[0] + row
        self._first_step = 0
        self._timestamps: list[int] = []
        self._last_drain = time.monotonic()
        modules = dict(model.named_modules())
        self._handles = [modules[n].register_forward_hook(self._on_forward(i))
                         for i, n in enumerate(names)] if outputs else []
        # Each probed module's own parameters, and the column its norm adds into.
        self._params = [(p, self.loss_col + 1 + i) for i, n in enumerate(names) if weights
                        for p in modules[n].parameters(recurse=False)]
        # (gradient, column) pairs waiting for the grouped reduction (float64 path only).
        self._kept: list[tuple[torch.Tensor, int]] = []
        # Addition plans by layout (``_rounds``), their column indices made on the device
        # once: a layout first seen inside a CUDA capture would need a host-to-device copy
        # there, which capture forbids, but the warm-up steps run the same body first and
        # fill this (engine.Step._capture).
        self._plans: dict[tuple[int, ...], tuple] = {}

    def _on_forward(self, col: int):
        def hook(module, inputs, output):
            out = output[0] if isinstance(output, (tuple, list)) else output
            if torch.is_tensor(out) and out.requires_grad:  # eval / no_grad: nothing to record
                out.register_hook(lambda g: self._record(col, g))
        return hook

    def _record(self, col: int, grad: torch.Tensor) -> None:
        # No .item(): everything stays on the device.
        if self.squared:  # reduced in groups, in float64: see the module docstring
            if len(self._kept) == GROUP:  # full: reduce now, during backward
                self._reduce_kept()
            self._kept.append((grad, col))
            return
        self._add_scaled(col, grad)

    def _add_scaled(self, col: int, grad: torch.Tensor) -> None:
        # float32 fallback (MPS): scale by the largest entry first, so no square underflows;
        # a module's several calls combine with hypot.
        top = grad.detach().abs().amax().float()
        scaled = torch.linalg.vector_norm(grad.float() / torch.where(top > 0, top, 1.0))
        self.cur[col] = torch.hypot(self.cur[col], top * scaled)

    def _reduce_kept(self) -> None:
        """Add the kept gradients' squared norms into ``cur``: one grouped float64 reduction
        (so 1e-30 gradients keep their digits), then ``index_add_`` by column (``_rounds``),
        which also sums a module's several calls; then let the gradients go."""
        if not self._kept:
            return
        # One call per input dtype: CUDA's fused multi-tensor kernel takes one dtype per list
        # and falls back to a kernel per tensor otherwise (bf16 output gradients beside
        # float32 weight gradients, under autocast).
        by_dtype: dict[torch.dtype, list[tuple[torch.Tensor, int]]] = {}
        for grad, col in self._kept:
            by_dtype.setdefault(grad.dtype, []).append((grad, col))
        self._kept = []
        norms, layout = [], []
        for pairs in by_dtype.values():
            norms += torch._foreach_norm([g for g, _ in pairs], 2, dtype=torch.float64)
            layout += [c for _, c in pairs]
        key = tuple(layout)
        plan = self._plans.get(key)
        if plan is None:
            if self.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
                raise RuntimeError("the probes' gradient layout changed during CUDA graph capture")
            plan = self._plans[key] = self._rounds(key)
        order, rounds = plan
        squares = torch.stack([norms[i] for i in order]).square()
        for start, end, cols in rounds:
            self.cur.index_add_(0, cols, squares[start:end])

    def _rounds(self, layout: tuple[int, ...]) -> tuple[list[int], list[tuple]]:
        """``(order, [(start, end, columns), ...])``: the norms in the order to stack them,
        and the ``index_add_`` rounds over slices of that stack, each into distinct columns.

        On CUDA ``index_add_`` adds with atomics, so several additions into one column could
        land in any order and change its last bit from run to run (and graph against eager).
        One addition per column per round fixes the order. A column repeats for a module
        called several times per forward (a shared ReLU) and, with ``weights``, for a layer
        with a bias: usually one or two rounds. Stacking round by round makes each round a
        slice (a view) of the stack, so a round costs one kernel."""
        seen: dict[int, int] = {}
        by_round: list[list[tuple[int, int]]] = []
        for position, col in enumerate(layout):
            r = seen[col] = seen.get(col, -1) + 1
            if r == len(by_round):
                by_round.append([])
            by_round[r].append((position, col))
        order, rounds = [], []
        for pairs in by_round:
            rounds.append((len(order), len(order) + len(pairs),
                           torch.tensor([c for _, c in pairs], dtype=torch.int64,
                                        device=self.device)))
            order += [position for position, _ in pairs]
        return order, rounds

    def record(self, loss: torch.Tensor) -> None:
        """The step's one named moment, on the device: after backward the kept gradients
        are reduced (with the weights' own, when probed), the loss joins the norms, and the
        row is written. Capturable: no host values involved."""
        if self._params:
            self._keep_weights()
        self._reduce_kept()
        self.cur[self.loss_col].copy_(loss.detach())
        if self.reduce is not None:
            # The output norms and the loss only (a prefix of the row): DDP has averaged the
            # weight gradients already, so their norms are global.
            self.reduce(self.cur[:self.loss_col + 1])
        self.buf.index_copy_(0, self.row_t, self.cur.unsqueeze(0))
        self.row_t += 1
        self.cur.zero_()

    def _keep_weights(self) -> None:
        # After backward (and DDP's averaging), before the optimizer step. A parameter
        # without a gradient (never None for a module the forward pass used) is skipped:
        # checking it is a Python attribute read, not a device sync.
        for p, col in self._params:
            if p.grad is None:
                continue
            if self.squared:
                self._kept.append((p.grad, col))
            else:
                self._add_scaled(col, p.grad)

    def advance(self) -> Chunk | None:
        """The host's half of a step: count the row; hand out a chunk when it is time."""
        self._timestamps.append(int(time.time() * 1000))
        self.row += 1
        self.step += 1
        if self.row == self.flush_every or (
                self.flush_seconds is not None
                and time.monotonic() - self._last_drain >= self.flush_seconds):
            return self.drain()
        return None

    def commit(self, loss: torch.Tensor) -> Chunk | None:
        """``record`` then ``advance``: one eager step's probes."""
        self.record(loss)
        return self.advance()

    def start_at(self, step: int) -> None:
        """Number the next committed row ``step`` (a resumed run continues its count)."""
        self.step = self._first_step = self._start = step

    def reset(self) -> None:
        """Forget everything recorded (after a CUDA graph's warm-up steps, say)."""
        self._kept = []
        self.buf.zero_()
        self.cur.zero_()
        self.row_t.zero_()
        start = getattr(self, "_start", 0)
        self.row, self.step, self._first_step, self._timestamps = 0, start, start, []

    def drain(self) -> Chunk | None:
        """Start copying the filled rows to the host and reset the buffer; never syncs."""
        if self.row == 0:
            return None
        n = self.row
        cuda = self.buf.is_cuda
        host = torch.empty((n, self.buf.shape[1]), dtype=self.dtype, pin_memory=cuda)
        host.copy_(self.buf[:n], non_blocking=cuda)
        event = None
        if cuda:
            event = torch.cuda.Event()
            event.record()
        # Stream order makes this safe: the next steps overwrite rows only after the copy
        # has read them.
        self.row_t.zero_()
        chunk = Chunk(self._first_step, host, event, self._timestamps, self.squared, self.loss_col)
        self._first_step, self._timestamps, self.row = self.step, [], 0
        self._last_drain = time.monotonic()
        return chunk

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
