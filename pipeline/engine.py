"""The training step: forward, loss, backward, probes, optimizer; eager or one CUDA graph
(docs: internals/fast-path.md).

Both kinds run the same Python body (``_body``), so they compute the same maths: the graph
is that body captured once and replayed every batch. At batch 16 the step is bound by the
host (Python, ~300 kernel launches), not the GPU: on an H200 the notebook's loop took 30 ms
per step and the captured one 6.6 ms. ``steps`` is the generator the training loop drives.

Nothing in a step reads a device value on the host: the loss, the probes' norms and the
accuracy counters stay on the device until the probes' chunked readback.
"""
from __future__ import annotations

import collections
import contextlib
from dataclasses import dataclass

import torch
from torch import nn

# Capture needs the lazily created state (Adam's moments, cuDNN's plans, the caching
# allocator's blocks) to exist first; three eager steps on a side stream is PyTorch's
# documented recipe (docs: "CUDA Graphs", whole-network capture).
WARMUP_STEPS = 3


def make_optimizer(name: str, params, lr: float, capturable: bool,
                   fused: bool = True) -> torch.optim.Optimizer:
    """Adam (the notebook's) or SGD with momentum 0.9.

    ``capturable=True`` keeps Adam's step count on the device, which a CUDA graph needs; it
    computes the bias correction there instead of in Python floats (same formula).

    ``fused`` (default) is PyTorch's one-kernel Adam (CPU, CUDA, MPS): the same update as the
    notebook's for-loop/foreach Adam, reading and writing each parameter's four tensors once
    instead of once per elementwise op. Measured on the 2-core CPU for ResNet-50: 4 ATen ops
    per step instead of 497 (for-loop) or 121 (foreach), and 11 ms instead of 74 ms. Its
    rounding differs: it computes the bias correction 1 - beta2**t in float32 (as capturable
    Adam does), so after one step the weights agree to within an ulp plus 1e-5 of the update
    (tests/test_engine.py); over later steps the no-BN network amplifies that as it amplifies
    any rounding change. ``fused=False`` is PyTorch's default Adam (foreach on CUDA, the
    for-loop on a CPU), for the benchmark's comparison.
    """
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    return torch.optim.Adam(params, lr=lr, capturable=capturable, fused=fused or None)


def autocast_for(precision: str, device: torch.device):
    """A factory of autocast contexts for the forward pass.

    bf16 inside a CUDA graph needs ``cache_enabled=False``: the autocast weight cache would
    hand the replay casts made at capture time, i.e. stale weights (PyTorch docs, "CUDA
    Graphs": usage with torch.cuda.amp).
    """
    if precision == "bf16":
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=False)
    return contextlib.nullcontext


# The modules whose weights bf16 autocast casts on every call: the convolutions and linear
# layers of its lower-precision op list (PyTorch docs, "Automatic Mixed Precision package":
# CUDA/CPU ops that can autocast to lower precision). Norm layers keep float32 weights.
AUTOCAST_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
                    nn.ConvTranspose3d, nn.Linear)


def casts_weights_once(precision: str, graph: bool) -> bool:
    """Whether the step casts its bf16 weight copies once (``Bf16Weights``): in bf16 with a
    CUDA graph, where the cast kernels are a large share of the step. Eagerly, the copies'
    swap into the model (``functional_call``) costs host time each step instead, and DDP
    must see its own parameters' gradients, so there autocast casts per op."""
    return precision == "bf16" and graph


class Bf16Weights:
    """bf16 copies of the weights that autocast would cast, made in one multi-tensor copy.

    Under bf16 autocast every convolution and linear layer casts its float32 weight to bf16
    on each call, and its backward casts the bf16 weight gradient back to float32: for the
    no-skip ResNet-50, 51 small cast kernels forward and 51 back (PyTorch's profiler), over
    a quarter of the kernels of a captured step, whose cost at batch 16 is mostly per
    kernel (BENCHMARKS.md). Here one ``torch._foreach_copy_`` makes all the copies
    (multi_tensor_apply: a few launches), the model runs on them
    (``torch.func.functional_call``), and a second one copies their gradients into the
    float32 ``.grad``s that the optimizer and the weight probes read.

    The same conversions in the same places (float32 -> bf16 rounds to nearest even, as
    ``Tensor.to`` does; bf16 -> float32 is exact), so the numbers are identical: losses,
    norms and weights, bit for bit (tests/test_engine.py on the CPU; its GPU tests compare
    the captured graph with autocast's eager casts).

    Which weights: the first step runs on autocast's own casts and watches. A weight is
    copied when its module ran exactly once and the weight got a gradient. A module called
    twice (or a weight two modules share) would add its two bf16 gradients in bf16 on one
    copy, where autocast adds them in float32; an unused weight would be copied for nothing
    (the no-skip ResNet-50's four downsample convolutions: 12% of the weights). Any other
    weight keeps autocast's cast, which is exact too, so the choice changes the speed, never
    the numbers. Not seen: a weight used outside its module's forward (``F.conv2d(x,
    m.weight)``); this project's models have none. The copies take the weights' layout
    when they are made, after the first step: change the layout before training.
    """

    def __init__(self, model: nn.Module):
        if isinstance(model, nn.parallel.DistributedDataParallel):
            raise ValueError("Bf16Weights under DDP: DDP must see its own parameters' "
                             "gradients; let autocast cast per op (casts_weights_once)")
        # (module name, module, its own float32 trainable weights by name)
        self._owners = [
            (module_name, module, [(name, p) for name, p in module.named_parameters(recurse=False)
                                   if p.requires_grad and p.dtype == torch.float32])
            for module_name, module in model.named_modules()
            if isinstance(module, AUTOCAST_MODULES)]
        self.params: list[nn.Parameter] | None = None  # chosen after the first step
        self.copies: list[torch.Tensor] = []
        self._by_name: dict[str, torch.Tensor] = {}
        self._calls: collections.Counter = collections.Counter()

    def forward(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.params is None:
            return self._watch(model, x)
        if not self.copies:
            return model(x)
        with torch.no_grad():
            torch._foreach_copy_(self.copies, self.params)
        return torch.func.functional_call(model, self._by_name, (x,))

    def _watch(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The first forward pass, on autocast's casts, counting each module's calls."""
        handles = [module.register_forward_pre_hook(lambda m, args, n=name: self._calls.update((n,)))
                   for name, module, _ in self._owners]
        try:
            return model(x)
        finally:
            for h in handles:
                h.remove()

    def _choose(self) -> None:
        """After the first backward: copy the weights used exactly once (class docstring)."""
        uses: collections.Counter = collections.Counter()
        for module_name, _, weights in self._owners:
            for _, p in weights:
                uses[id(p)] += self._calls[module_name]
        chosen: dict[int, tuple[str, nn.Parameter]] = {}
        for module_name, _, weights in self._owners:
            for name, p in weights:
                if uses[id(p)] == 1 and p.grad is not None and id(p) not in chosen:
                    chosen[id(p)] = (f"{module_name}.{name}" if module_name else name, p)
        self.params = [p for _, p in chosen.values()]
        # Same shapes and strides as the weights (channels_last too): the copy then takes
        # multi_tensor_apply's fast path, and the convolutions see the layout they would.
        self.copies = [torch.empty_like(p, dtype=torch.bfloat16).requires_grad_()
                       for p in self.params]
        self._by_name = {n: c for (n, _), c in zip(chosen.values(), self.copies)}

    @torch.no_grad()
    def grads_back(self) -> None:
        """After backward: the copies' gradients into the weights' float32 ``.grad`` (after
        the first step: the choice of weights)."""
        if self.params is None:
            self._choose()
            return
        pairs = [(p, c.grad) for p, c in zip(self.params, self.copies) if c.grad is not None]
        if not pairs:
            return
        for p, _ in pairs:
            if p.grad is None:  # allocated once per graph capture, or per eager step
                p.grad = torch.empty_like(p)
        torch._foreach_copy_([p.grad for p, _ in pairs], [g for _, g in pairs])

    def zero_grad(self, set_to_none: bool) -> None:
        for c in self.copies:
            if set_to_none:
                c.grad = None
            elif c.grad is not None:
                c.grad.zero_()


@dataclass
class GraphStatus:
    """What the step turned out to be, for the run's tags."""

    mode: str          # "graph" or "eager"
    reason: str        # why (asked for, not CUDA, capture failed: <error>)


class Step:
    """``step(x, y)`` trains on one batch; the loss, accuracy and norms stay on the device.

    ``probes`` may be None (the benchmark's "probes off"). With ``graph=True`` the first
    full batch is used to warm up and capture; the warm-up's effects on the weights, the
    optimizer and the probes are undone, so step 0 is the true step 0. A batch of another
    shape (an epoch's last, partial batch) runs the same body eagerly. ``graph_batch``, when
    given, is the batch size to capture at: a run resumed just before an epoch's partial
    batch must not capture that one and then run every full batch eagerly. ``cast_once``
    runs the model on bf16 weight copies made once per step (``Bf16Weights``; for bf16
    autocast only).
    """

    PENDING = "not captured: no full batch yet"

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, probes,
                 autocast, device: torch.device, graph: bool, channels_last: bool = False,
                 cast_once: bool = False, graph_batch: int | None = None):
        self.model, self.optimizer, self.probes = model, optimizer, probes
        self.cast = Bf16Weights(model) if cast_once else None
        self.autocast, self.device = autocast, device
        self.channels_last = channels_last
        self.criterion = nn.CrossEntropyLoss()
        self.want_graph, self.graph_batch = graph, graph_batch
        self.status = GraphStatus("eager", self.PENDING if graph else
                                  "not asked for (graph=off; graph=auto off CUDA or under DDP)")
        self.eager_batches = 0     # steps run eagerly beside a graph, or before its capture
        self._graph: torch.cuda.CUDAGraph | None = None
        self._static: tuple[torch.Tensor, torch.Tensor] | None = None
        # Training accuracy, summed on the device; read once per epoch.
        self.correct = torch.zeros((), dtype=torch.int64, device=device)
        self.loss = torch.zeros((), dtype=torch.float32, device=device)  # the last step's

    @property
    def capture_pending(self) -> bool:
        """A graph is wanted and no full batch has come yet to capture it."""
        return self.want_graph and self._graph is None and self.status.reason == self.PENDING

    # --- the maths: one body for eager and graph ------------------------------------------
    def _body(self, x: torch.Tensor, y: torch.Tensor) -> None:
        with self.autocast():
            out = self.model(x) if self.cast is None else self.cast.forward(self.model, x)
            loss = self.criterion(out, y)
        loss.backward()  # the probes' hooks add this step's squared norms on the device
        if self.cast is not None:
            self.cast.grads_back()
        # Measure, record, log: the norms are complete; the loss joins them in the device
        # buffer (logging happens later, from the host, in chunks).
        if self.probes is not None:
            self.probes.record(loss)
        self.optimizer.step()
        self.correct += (out.argmax(1) == y).sum()
        self.loss.copy_(loss.detach())

    def _eager(self, x: torch.Tensor, y: torch.Tensor) -> None:
        # set_to_none=False once a graph exists: the graph reads and writes the .grad tensors
        # it captured, so they must stay the same tensors.
        self._zero_grad(set_to_none=self._graph is None)
        self._body(x, y)

    def _zero_grad(self, set_to_none: bool) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)
        if self.cast is not None:
            self.cast.zero_grad(set_to_none)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.capture_pending and (self.graph_batch is None or x.shape[0] == self.graph_batch):
            self._capture(x, y)
        if self._graph is not None and x.shape == self._static[0].shape:
            self._static[0].copy_(x)
            self._static[1].copy_(y)
            self._graph.replay()
            return
        if self._graph is not None or self.capture_pending:
            self.eager_batches += 1
        self._eager(x, y)

    # --- capture --------------------------------------------------------------------------
    def _capture(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if self.device.type != "cuda":
            self.status = GraphStatus("eager", f"CUDA graphs need a CUDA device, not {self.device.type}")
            return
        weights = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        # A resumed run's optimizer has state already; a fresh one has none yet.
        moments = {p: {k: t.clone() for k, t in st.items() if torch.is_tensor(t)}
                   for p, st in self.optimizer.state.items()}
        static = (x.clone(), y.clone())
        stream = torch.cuda.current_stream()
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(WARMUP_STEPS):
                    if self.probes is not None:
                        # Every warm-up step writes row 0: the buffer may have fewer rows
                        # than there are warm-up steps (a run of 2 steps has 2 rows).
                        self.probes.row_t.zero_()
                    self._zero_grad(set_to_none=True)
                    self._body(*static)
            torch.cuda.current_stream().wait_stream(side)
            # Gradients allocated inside the capture live in the graph's private pool; the
            # replay overwrites them (they are not accumulated into).
            self._zero_grad(set_to_none=True)
            graph = torch.cuda.CUDAGraph()
            # thread_local: the metric writer thread may wait on a readback event meanwhile.
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                self._body(*static)
        except RuntimeError as e:  # an op that cannot be captured, say
            # torch.cuda.graph's __exit__ puts the stream back only after capture_end, which
            # raises on an invalidated capture: the eager steps would run on its stream.
            torch.cuda.set_stream(stream)
            self._graph = None
            self.status = GraphStatus("eager", f"capture failed: {str(e).splitlines()[0][:200]}")
            self.cast = None  # eagerly, autocast's own casts (casts_weights_once): same numbers
            self._zero_grad(set_to_none=True)
        else:
            self._graph, self._static = graph, static
            self.status = GraphStatus("graph", "captured")
        self._undo_warmup(weights, moments)

    @torch.no_grad()
    def _undo_warmup(self, weights: dict[str, torch.Tensor], moments: dict) -> None:
        """Put back the weights and the optimizer state, in place (the graph holds their
        addresses). State the warm-up created is zeroed: fresh Adam/SGD state is all zeros,
        which the captured update treats exactly as a first step does (Adam's step count
        0 -> 1; SGD's momentum 0 * 0.9 + g = g)."""
        for k, v in self.model.state_dict().items():
            v.copy_(weights[k])
        for p, state in self.optimizer.state.items():
            for k, t in state.items():
                if torch.is_tensor(t):
                    saved = moments.get(p, {}).get(k)
                    if saved is None:
                        t.zero_()
                    else:
                        t.copy_(saved)
        if self.probes is not None:
            self.probes.reset()
        self.correct.zero_()
        self.loss.zero_()


def steps(step: Step, batches, device: torch.device, probes=None):
    """Train on ``batches`` (an iterable of (x, y)), yielding after each step the chunk the
    probes hand out (or None) and the batch's number of images; the caller decides when to
    stop. Per step the host only launches work: the batch's copy (a no-op when it is
    already on the device), the step, and the probes' row count.
    """
    for x, y in batches:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        step(x, y)
        yield (probes.advance() if probes is not None else None), y.shape[0]  # a shape: no sync


def run_steps(step: Step, batches, device: torch.device, probes=None, submit=None,
              limit: int | None = None) -> tuple[int, int]:
    """``steps`` to the end of ``batches`` (or ``limit`` steps), each chunk to ``submit``;
    returns (steps, images). For benchmarks and tests; the training loop drives ``steps``."""
    done = images = 0
    for chunk, n in steps(step, batches, device, probes):
        if submit is not None:
            submit(chunk)
        done, images = done + 1, images + n
        if limit is not None and done >= limit:
            break
    return done, images


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, autocast, comm=None):
    """Mean loss and accuracy on the test split; one host sync at the end. Under DDP each
    rank tests its share (data.build strides the split) and the sums are reduced."""
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    seen = 0
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast():
            out = model(x)
        loss_sum += nn.functional.cross_entropy(out.float(), y, reduction="sum")
        correct += (out.argmax(1) == y).sum()
        seen += y.numel()
    model.train()
    if comm is not None and comm.size > 1:
        seen_t = torch.tensor(seen, dtype=torch.int64, device=device)
        comm.sum_(loss_sum, correct, seen_t)
        seen = int(seen_t.item())
    return loss_sum.item() / max(seen, 1), correct.item() / max(seen, 1)
