"""Datasets and batches: CIFAR-10 (torchvision), an ImageFolder tree, or synthetic images.

Every dataset yields PIL images through the notebook's transform, Resize((size, size)) +
ToTensor with no normalisation, so all three feed the network the same kind of input.

Two ways to batch them (``data_path``), with the same order and the same pixels:

* ``dataloader``: CPU worker processes run the PIL transform per image: the notebook's way,
  and the reference. On a GPU it starves the step: 17.6 ms of PIL per batch of 16 against a
  6.6 ms training step (shared/reference/measurements.md).
* ``device``: the split is decoded once into a uint8 tensor on the training device and every
  batch is one gather there. Images are resized on the device by ``pil_resize``, which does
  PIL's own fixed-point bilinear arithmetic, so the pixels equal the notebook's bit for bit:
  once up front when the resized set fits in device memory (CIFAR-10 at 224 px: 7.5 GB +
  1.5 GB), else per batch from the native images (CIFAR: 150 MB). tests/test_engine.py
  checks each case against the ``dataloader`` path.
"""
from __future__ import annotations

import contextlib
import functools
import gc
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision import datasets, transforms

from . import signals
from .config import Config, UserError

NUM_CLASSES = 10


class DataError(UserError, RuntimeError):
    """Data that is missing, unreachable or unreadable."""


def notebook_transform(image_size: int) -> transforms.Compose:
    # Exactly the founding notebook's: bilinear (antialiased) PIL resize, then [0, 1] floats.
    return transforms.Compose([transforms.Resize((image_size, image_size)), transforms.ToTensor()])


class SyntheticCIFAR(Dataset):
    """Deterministic CIFAR-shaped images (32x32 RGB, 10 classes) that a network can learn.

    Each class owns a smooth random colour pattern; an image is its class pattern, shifted
    by a random offset, plus noise. Fully determined by ``seed`` (and ``train``), generated
    once as uint8 so it costs 3 KB per image.
    """

    def __init__(self, size: int, seed: int, train: bool = True, transform=None):
        self.transform = transform
        g = torch.Generator().manual_seed(seed)  # patterns: shared by train and test
        coarse = torch.rand(NUM_CLASSES, 3, 4, 4, generator=g)
        patterns = torch.nn.functional.interpolate(coarse, size=(32, 32), mode="bilinear",
                                                   align_corners=False)
        g.manual_seed(seed * 2 + (0 if train else 1) + 1)  # draws: differ between splits
        self.targets = torch.randint(0, NUM_CLASSES, (size,), generator=g)
        shifts = torch.randint(-4, 5, (size, 2), generator=g)
        noise = torch.randn(size, 3, 32, 32, generator=g) * 0.15
        images = patterns[self.targets] + noise
        images = torch.stack([torch.roll(im, tuple(s.tolist()), dims=(1, 2))
                              for im, s in zip(images, shifts)])
        self.data = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        self.targets = self.targets.tolist()

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        image = Image.fromarray(self.data[i])  # HWC uint8, as torchvision's CIFAR10 stores it
        return (self.transform(image) if self.transform else image), self.targets[i]


@dataclass(frozen=True)
class Lineage:
    """Where one split came from, for the run's dataset record (MLflow ``log_input``)."""

    name: str             # e.g. "cifar10-train"
    digest: str           # changes when the data changes
    source_type: str      # "http" (torchvision download), "local" (a folder) or "code"
    source: str           # the URL or folder; for "code", the generator
    context: str          # "training" or "evaluation"
    rows: int
    details: dict = field(default_factory=dict)


def _digest(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else repr(p).encode())
    return h.hexdigest()[:16]


@dataclass
class Data:
    train: "DataLoader | DeviceBatches"
    test: "DataLoader | DeviceBatches"
    source: str          # where the images came from, for the run's description
    lineage: list[Lineage] = field(default_factory=list)
    order: "EpochOrder | None" = None    # the training order, for checkpoints
    path: str = "dataloader"   # the resolved data_path
    resize: str = "PIL per image, in loader workers (the notebook's)"
    dropped_per_epoch: int = 0  # images of the last, partial batch no rank trains on (DDP)
    reused: bool = False  # the device splits were prepared by an earlier run (keep_prepared)

    @property
    def steps_per_epoch(self) -> int:
        return len(self.train)

    def close(self) -> None:
        """Stop the loaders' persistent worker processes now. Left to the garbage
        collector they outlive the run (the loaders sit in a reference cycle), and when it
        frees them PyTorch waits out a 5 s join timeout per worker: 20 s per run on 2 cores,
        measured in `sweep` and `all`. ``_shutdown_workers`` is what the iterator's own
        ``__del__`` calls."""
        for loader in (self.train, self.test):
            iterator = getattr(loader, "_iterator", None)
            if iterator is not None and hasattr(iterator, "_shutdown_workers"):
                iterator._shutdown_workers()
                loader._iterator = None


def _cifar10(cfg: Config, transform) -> tuple[Dataset, Dataset, str, list[Lineage]]:
    root = Path(cfg.data_dir)
    try:
        # download=True is a no-op when the files are present: torchvision checks every
        # file's MD5 before it unpickles anything, so a tampered batch is refused unread.
        train = datasets.CIFAR10(root, train=True, download=True, transform=transform)
        test = datasets.CIFAR10(root, train=False, download=True, transform=transform)
    except (OSError, RuntimeError) as e:  # URLError is an OSError; torchvision raises RuntimeError
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(
            f"data_dir: CIFAR-10 is not in {root.resolve()}/cifar-10-batches-py and could not "
            f"be downloaded ({reason}); copy it there, or use -P dataset=imagefolder "
            f"-P data_dir=DIR (DIR/train/<class>/*.jpg) or -P dataset=synthetic") from None
    lineage = [
        # torchvision has verified each file against these MD5s, so they identify the data.
        Lineage(f"cifar10-{split}", _digest([md5 for _, md5 in files]), "http", ds.url,
                context, len(ds), {"root": str(root.resolve())})
        for split, files, ds, context in (("train", train.train_list, train, "training"),
                                          ("test", test.test_list, test, "evaluation"))]
    return train, test, f"torchvision CIFAR10 at {root.resolve()}", lineage


def _imagefolder(cfg: Config, transform) -> tuple[Dataset, Dataset, str, list[Lineage]]:
    root = Path(cfg.data_dir)
    splits = []
    for split in ("train", "test"):
        folder = root / split
        try:
            splits.append(datasets.ImageFolder(folder, transform=transform))
        except (FileNotFoundError, OSError) as e:
            raise DataError(f"data_dir: {folder.resolve()} is not an image folder "
                            f"(expected {split}/<class>/<image>): {str(e).splitlines()[0]}") from None
    if splits[0].classes != splits[1].classes:
        raise DataError(f"data_dir: train and test in {root.resolve()} have different classes")
    if len(splits[0].classes) != NUM_CLASSES:
        raise DataError(f"data_dir: {root.resolve()}/train has {len(splits[0].classes)} classes; "
                        f"the network's head has {NUM_CLASSES}")
    lineage = []
    for split, ds, context in (("train", splits[0], "training"), ("test", splits[1], "evaluation")):
        folder = (root / split).resolve()
        # Relative paths, labels and sizes: cheap (one stat per file) and catches any change.
        files = [(os.path.relpath(p, folder), y, os.path.getsize(p)) for p, y in ds.samples]
        lineage.append(Lineage(f"{root.resolve().name}-{split}", _digest(files), "local",
                               str(folder), context, len(ds)))
    return splits[0], splits[1], f"ImageFolder at {root.resolve()}", lineage


def _synthetic(cfg: Config, transform) -> tuple[Dataset, Dataset, str, list[Lineage]]:
    train = SyntheticCIFAR(cfg.synthetic_size, cfg.seed, train=True, transform=transform)
    test = SyntheticCIFAR(cfg.synthetic_test_size, cfg.seed, train=False, transform=transform)
    lineage = [Lineage(f"synthetic-{split}", _digest(ds.data.tobytes(), ds.targets), "code",
                       "pipeline.data.SyntheticCIFAR", context, len(ds),
                       {"seed": cfg.seed, "train": split == "train"})
               for split, ds, context in (("train", train, "training"), ("test", test, "evaluation"))]
    return train, test, f"synthetic CIFAR-shaped data (seed {cfg.seed})", lineage


class EpochOrder(torch.utils.data.Sampler):
    """The seeded shuffle of every epoch (``RandomSampler`` with its own generator), which
    remembers where each epoch's draw started, and can start an epoch part-way through:
    what a checkpoint saves and a resume restores.

    ``start_state`` is the generator state before this epoch's draw; ``resume(state,
    skip)`` makes the next epoch redraw from ``state`` and drop its first ``skip`` indices.
    """

    def __init__(self, dataset: Dataset, seed: int):
        self.sampler = torch.utils.data.RandomSampler(
            dataset, generator=torch.Generator().manual_seed(seed))
        self.start_state = self.sampler.generator.get_state()
        self._skip = 0

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self):
        self.start_state = self.sampler.generator.get_state()
        skip, self._skip = self._skip, 0
        # list(): one draw per epoch, exactly as RandomSampler's own iterator draws it.
        yield from list(self.sampler)[skip:]

    def resume(self, state: torch.Tensor, skip: int) -> None:
        self.sampler.generator.set_state(state)
        self._skip = skip


def global_batches(n: int, batch_size: int, world_size: int = 1):
    """(start, stop) of each global batch of an epoch of ``n`` images that is trained on.

    Every rank takes an equal share of a batch, so with several ranks an epoch's last,
    partial batch is kept only when it splits evenly (CIFAR-10 at batch 16: 50,000 = 3,125
    x 16, nothing is left over); otherwise it is dropped, and the ``data.dropped_per_epoch``
    tag says how many images that is. One process keeps it, as the notebook did.
    """
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        if (stop - start) % world_size == 0:
            yield start, stop


def rank_share(start: int, stop: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rank ``rank``'s contiguous slice of the global batch [start, stop)."""
    share = (stop - start) // world_size
    return start + rank * share, start + (rank + 1) * share


class ShardedBatches(torch.utils.data.Sampler):
    """A DataLoader's batch sampler: the global batches of ``order`` (the seeded epoch order
    every rank draws alike), and this rank's share of each. With one process these are
    exactly the batches of ``DataLoader(sampler=order, batch_size=...)``."""

    def __init__(self, order: EpochOrder, batch_size: int, rank: int = 0, world_size: int = 1):
        self.order, self.batch_size = order, batch_size
        self.rank, self.world_size = rank, world_size

    def __len__(self) -> int:
        return sum(1 for _ in global_batches(len(self.order), self.batch_size, self.world_size))

    def __iter__(self):
        index = list(self.order)  # one draw per epoch (a resumed epoch's is shorter)
        for start, stop in global_batches(len(index), self.batch_size, self.world_size):
            lo, hi = rank_share(start, stop, self.rank, self.world_size)
            yield index[lo:hi]


# The device path's test batches: evaluation has no probes and no optimizer, and 16 images
# per forward would make it host-bound (~2 s per epoch on an H200); the batch size changes
# only the order of the sums.
EVAL_BATCH = 256


class DeviceBatches:
    """Batches gathered from a uint8 split that lives on the device; iterates like a
    DataLoader, in the same order as ``order`` (the CPU path's sampler) when one is given."""

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, batch_size: int,
                 image_size: int, order: torch.utils.data.Sampler | None = None,
                 rank: int = 0, world_size: int = 1):
        self.images, self.targets = images, targets
        self.batch_size, self.image_size, self.order = batch_size, image_size, order
        self.rank, self.world_size = rank, world_size  # this rank's share of each batch
        self.resize_each_batch = images.shape[-1] != image_size or images.shape[-2] != image_size

    def __len__(self) -> int:
        return sum(1 for _ in global_batches(len(self.targets), self.batch_size, self.world_size))

    def __iter__(self):
        device = self.images.device
        if self.order is None:
            index = None
        else:
            # The sampler itself draws the epoch's order, so both paths see the same batches
            # (it also advances its generator exactly as the loader's would). ~3 ms per
            # epoch on the host, then one copy; never inside a step.
            index = torch.as_tensor(list(self.order), dtype=torch.int64)
            if device.type == "cuda":
                index = index.pin_memory()
            index = index.to(device, non_blocking=True)
        n = len(self.targets) if index is None else len(index)  # a resumed epoch is shorter
        for start, stop in global_batches(n, self.batch_size, self.world_size):
            start, stop = rank_share(start, stop, self.rank, self.world_size)
            if index is None:
                x, y = self.images[start:stop], self.targets[start:stop]
            else:
                pick = index[start:stop]
                x, y = self.images.index_select(0, pick), self.targets.index_select(0, pick)
            if self.resize_each_batch:
                x = pil_resize(x, self.image_size)
            # ToTensor's own arithmetic (float, then divide by 255), for identical inputs.
            yield x.float().div_(255), y


# PIL's bilinear resize (Pillow src/libImaging/Resample.c), which torchvision's Resize
# runs on PIL images: per axis, weights in double, rounded to integers scaled by 2^22
# (PRECISION_BITS = 32 - 8 - 2); each output is (2^21 + sum(pixel * k)) >> 22, clipped to
# 0..255; horizontal pass first, its result stored as uint8, then vertical.
_PRECISION_BITS = 22
_SCRATCH_BYTES = 256 << 20  # float64 working memory per chunk of images


@functools.lru_cache(maxsize=64)
def _pil_coefficients(in_size: int, out_size: int) -> np.ndarray:
    """Resample.c's integer weights as a dense (out_size, in_size) int64 matrix."""
    # precompute_coeffs() with the bilinear filter (support 1), the same double operations
    # in the same order, then normalize_coeffs_8bpc(). int() truncates like C's (int).
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 1.0 * filterscale
    ss = 1.0 / filterscale
    k = np.zeros((out_size, in_size), dtype=np.int64)
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), in_size) - xmin
        w = [max(0.0, 1.0 - abs((x + xmin - center + 0.5) * ss)) for x in range(xmax)]
        ww = 0.0
        for v in w:  # summed in order: the normalisation must round like C's
            ww += v
        if ww != 0.0:
            w = [v / ww for v in w]
        k[xx, xmin:xmin + xmax] = [int((0.5 if v >= 0 else -0.5) + v * (1 << _PRECISION_BITS))
                                   for v in w]
    return k


@functools.lru_cache(maxsize=64)
def _pil_weights(in_size: int, out_size: int, device: torch.device) -> torch.Tensor:
    """(in_size, out_size) float64 on ``device``: k / 2^22. Cached, so a per-batch resize
    copies nothing from the host (no sync)."""
    k = torch.from_numpy(_pil_coefficients(in_size, out_size)).to(torch.float64)
    return k.mul_(2.0 ** -_PRECISION_BITS).t().contiguous().to(device)


def _pil_pass(x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    # float64 is exact: the weights (k / 2^22, k >= 0) sum to ~1, so every partial sum is a
    # multiple of 2^-22 below 2^9, 31 significant bits of float64's 53, in any summation
    # order (a GPU's GEMM too). + 0.5 then floor is Resample.c's (2^21 + sum) >> 22.
    return (x @ weights).add_(0.5).floor_().clamp_(0, 255)


def pil_resize(images: torch.Tensor, size: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 (N, C, H, W) -> uint8 (N, C, size, size), bit for bit PIL's
    ``Image.resize((size, size), BILINEAR)`` of each image, on the images' device.

    Chunked so that the float64 scratch stays near 256 MB; ``out`` (uint8, on the same
    device) receives the result when given.
    """
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError(f"pil_resize takes uint8 (N, C, H, W) images, not {images.dtype} "
                         f"{tuple(images.shape)}")
    n, c, h, w = images.shape
    if out is None:
        out = torch.empty((n, c, size, size), dtype=torch.uint8, device=images.device)
    elif out.shape != (n, c, size, size) or out.device != images.device or out.dtype != torch.uint8:
        raise ValueError(f"pil_resize: out must be uint8 {(n, c, size, size)} on {images.device}")
    if (h, w) == (size, size):  # Image.resize returns a copy
        return out.copy_(images)
    scratch = 8 * c * (h * w + 2 * h * size + size * size)  # input, pass 1 (+ copy), pass 2
    chunk = max(1, _SCRATCH_BYTES // scratch)
    # ImagingResampleInner skips the pass of an axis whose size does not change.
    wx = _pil_weights(w, size, images.device) if w != size else None
    wy = _pil_weights(h, size, images.device) if h != size else None
    for start in range(0, n, chunk):
        x = images[start:start + chunk].to(torch.float64)
        if wx is not None:
            x = _pil_pass(x, wx)
        if wy is not None:
            x = _pil_pass(x.transpose(-1, -2), wy).transpose(-1, -2)
        out[start:start + chunk].copy_(x)  # integral 0..255: the cast is exact
    return out


def _free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        # An earlier run of this process (`all`, `sweep`) may have left its memory in the
        # caching allocator, where the driver counts it as used, or in reference cycles
        # (a CUDA graph and its private pool). Free both first: ~0.1 s, once per run.
        gc.collect()
        torch.cuda.empty_cache()
        return torch.cuda.mem_get_info(device)[0]
    import psutil
    return psutil.virtual_memory().available


def _decoded_batches(dataset: Dataset, workers: int):
    """(groups, labels) per loader batch, in order: the images decoded at their native size
    as uint8, stacked per run of consecutive images of one size. Workers run the dataset's
    own loading code and nothing else."""
    return DataLoader(_Native(dataset), batch_size=512, num_workers=workers,
                      collate_fn=_stack_by_size, worker_init_fn=signals.worker_init)


def _decode(dataset: Dataset, workers: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Every image of ``dataset`` at its native size as uint8 (N, 3, H, W), and the labels;
    None when the images differ in size."""
    images, labels = [], []
    for groups, y in _decoded_batches(dataset, workers):
        if len(groups) != 1:
            return None
        images.append(groups[0])
        labels.append(y)
    if not images or len({tuple(x.shape[1:]) for x in images}) != 1:
        return None
    return torch.cat(images), torch.cat(labels)


class _Native(Dataset):
    """The wrapped dataset's images as uint8 CHW tensors, without its transform."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        image, label = _untransformed(self.dataset, i)
        return transforms.functional.pil_to_tensor(image.convert("RGB")), label


def _untransformed(dataset: Dataset, i: int):
    if isinstance(dataset, Subset):
        return _untransformed(dataset.dataset, dataset.indices[i])
    saved = dataset.transform
    dataset.transform = None  # only inside a loader worker's copy, or our own process
    try:
        return dataset[i]
    finally:
        dataset.transform = saved


def _stack_by_size(batch):
    groups, run = [], []
    for x, _ in batch:
        if run and x.shape != run[0].shape:
            groups.append(torch.stack(run))
            run = []
        run.append(x)
    if run:
        groups.append(torch.stack(run))
    return groups, torch.tensor([y for _, y in batch], dtype=torch.int64)


def to_device(dataset: Dataset, image_size: int, device: torch.device, workers: int,
              budget_bytes: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    """The split as uint8 on ``device``, and how it got there (a ``RESIZE_NOTES`` key).

    Loader workers only decode: the native images cross their shared memory (CIFAR-10:
    150 MB), not resized ones (7.5 GB at 224 px). When the resized split fits in
    ``budget_bytes``, each decoded batch is resized on the device as it arrives, so neither
    the host nor the device ever holds the whole native split beside it. Otherwise the
    native split stays on the device, to be resized per batch, which needs one image size;
    DataError when that does not hold or does not fit either.
    """
    n = len(dataset)
    if n * 3 * image_size * image_size + _SCRATCH_BYTES <= budget_bytes:
        out = torch.empty((n, 3, image_size, image_size), dtype=torch.uint8, device=device)
        labels = torch.empty(n, dtype=torch.int64)
        start, resized = 0, False
        for groups, y in _decoded_batches(dataset, workers):
            labels[start:start + len(y)] = y
            for x in groups:
                resized |= tuple(x.shape[-2:]) != (image_size, image_size)
                pil_resize(x.to(device), image_size, out=out[start:start + len(x)])
                start += len(x)
        return out, labels.to(device), "device-once" if resized else "native"
    native = _decode(dataset, workers)
    if native is None:
        raise DataError(f"data_path: the images differ in size, and resized to {image_size} px "
                        f"they do not fit on {device}; use -P data_path=dataloader")
    images, labels = native
    if images.numel() > budget_bytes:
        raise DataError(f"data_path: the images do not fit on {device}, resized to "
                        f"{image_size} px or at their own size; use -P data_path=dataloader")
    return images.to(device), labels.to(device), "device-batch"


RESIZE_NOTES = {
    "native": "decoded once and kept on the device, already at the model's size, so not "
              "resized (bit-exact)",
    "device-once": "decoded once, resized once on the device with PIL's fixed-point bilinear "
                   "arithmetic (bit-exact)",
    "device-batch": "decoded once, kept at native size on the device, each batch resized there "
                    "with PIL's fixed-point bilinear arithmetic (bit-exact)",
}


# The device splits kept between the runs of one `all` or `sweep` (``keep_prepared``):
# split name -> (key, (images, labels, how)). None outside keep_prepared: a run started on
# its own frees its splits when it ends.
_kept: dict | None = None


@contextlib.contextmanager
def keep_prepared():
    """Inside, a split prepared on the device is kept, and a later run with the same images
    (the lineage digest, the same subset), image size and device takes it instead of
    decoding and resizing again: `all` prepares CIFAR-10 once for both variants, `sweep`
    once for all its cells. In the last H200 run, before the resize moved to the device,
    it took ~13 s per variant (BENCHMARKS.md) of an experiment whose target is 6 minutes.
    A kept split is the same tensor every run reads (batches gather copies; nothing writes
    into it), so the pixels are those a fresh preparation gives. One split of each kind is kept: a run with other data drops the
    kept one before preparing its own, so device memory never holds two. Nests."""
    global _kept
    outer = _kept
    if outer is None:
        _kept = {}
    try:
        yield
    finally:
        if outer is None:
            _kept = None


def _index_digest(dataset: Dataset) -> str | None:
    """Which images of the underlying split ``dataset`` holds, in order (None: all)."""
    indices = None
    while isinstance(dataset, Subset):
        outer = range(len(dataset)) if indices is None else indices
        indices = [dataset.indices[i] for i in outer]
        dataset = dataset.dataset
    return None if indices is None else _digest(np.asarray(indices, dtype=np.int64).tobytes())


def _take_kept(keys: dict) -> dict:
    """The kept splits whose keys match; the others are dropped."""
    if _kept is None:
        return {}
    for split in [s for s, (key, _) in _kept.items() if keys.get(s) != key]:
        del _kept[split]
    return {split: _kept[split][1] for split in keys if split in _kept}


def _keep(split: str, key: tuple, prepared: tuple) -> None:
    if _kept is not None:
        _kept[split] = (key, prepared)


def resolve_data_path(cfg: Config, device: torch.device) -> str:
    if cfg.data_path == "auto":
        return "device" if device.type == "cuda" else "dataloader"
    return cfg.data_path


def build(cfg: Config, device: torch.device, rank: int = 0, world_size: int = 1,
          local_size: int = 1) -> Data:
    """Datasets and loaders for ``cfg``; raises DataError with one line when data is missing.

    Under DDP (``world_size`` > 1) the training batches are this rank's shares of the global
    batches, and the test split is strided over the ranks (evaluation sums over all of them).
    """
    transform = notebook_transform(cfg.image_size)
    make = {"cifar10": _cifar10, "imagefolder": _imagefolder, "synthetic": _synthetic}[cfg.dataset]
    train, test, source, lineage = make(cfg, transform)

    if cfg.max_steps and len(test) > cfg.max_steps * cfg.batch_size:
        # A smoke run tests on a fixed random sample, not the first images: test sets are
        # often sorted by class (ImageFolder always is), and a prefix would score a
        # constant prediction as if it had learnt.
        pick = torch.randperm(len(test), generator=torch.Generator().manual_seed(cfg.seed))
        test = Subset(test, pick[:cfg.max_steps * cfg.batch_size].sort().values.tolist())

    if world_size > 1:  # every rank tests its own 1/W of the images; the sums are reduced
        test = Subset(test, list(range(rank, len(test), world_size)))
    # The ranks on one machine share its cores.
    workers = cfg.resolved_num_workers(max(1, (os.cpu_count() or 1) // local_size))
    # The order of every epoch follows from the seed alone (the notebook shuffled too). The
    # sampler owns its generator: a DataLoader's own generator also seeds worker processes,
    # once per epoch without persistent workers and once per run with them, so the order
    # would depend on num_workers.
    order = EpochOrder(train, cfg.seed)
    dropped = len(train) - sum(b - a for a, b in global_batches(len(train), cfg.batch_size,
                                                                world_size))
    if resolve_data_path(cfg, device) == "device":
        splits = {"train": train, "test": test}  # in the order of their lineage entries
        keys = {split: (entry.digest, _index_digest(ds), cfg.image_size, str(device))
                for (split, ds), entry in zip(splits.items(), lineage, strict=True)}
        ready = _take_kept(keys)  # before measuring what is free: it drops what will not serve
        reused = len(ready) == len(keys)
        # Half of what is free: the network, its activations and the graph pool need the rest.
        budget = _free_bytes(device) // 2 if not reused else 0
        for split, ds in splits.items():
            if split not in ready:
                ready[split] = to_device(ds, cfg.image_size, device, workers, budget)
                budget -= ready[split][0].numel()
                _keep(split, keys[split], ready[split])
        (x_train, y_train, how), (x_test, y_test, _) = ready["train"], ready["test"]
        return Data(
            train=DeviceBatches(x_train, y_train, cfg.batch_size, cfg.image_size, order,
                                rank, world_size),
            test=DeviceBatches(x_test, y_test, max(cfg.batch_size, EVAL_BATCH), cfg.image_size),
            source=source, lineage=lineage, path="device", resize=RESIZE_NOTES[how], order=order,
            dropped_per_epoch=dropped, reused=reused)
    common = dict(batch_size=cfg.batch_size, num_workers=workers,
                  pin_memory=device.type == "cuda",  # lets the host->device copy run async
                  persistent_workers=workers > 0, worker_init_fn=signals.worker_init)
    return Data(
        train=DataLoader(train, batch_sampler=ShardedBatches(order, cfg.batch_size, rank, world_size),
                         **{k: v for k, v in common.items() if k != "batch_size"}),
        test=DataLoader(test, shuffle=False, **common),
        source=source,
        lineage=lineage,
        order=order,
        dropped_per_epoch=dropped,
    )
