"""Datasets and their batches: CIFAR-10 (torchvision), an ImageFolder tree, or synthetic
images, through the notebook's transform (Resize + ToTensor, no normalisation).

``build`` batches them one of two ways (``data_path``), with the same order and the same
pixels: ``dataloader`` (CPU workers run PIL per image: the notebook's way, the reference)
or ``device`` (``device_data``: decoded once on the training device, resized there with
PIL's exact arithmetic). Docs: getting-started/data.md, internals/data-path.md.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision import datasets, transforms

from . import device_data, signals
from .config import Config, DataError
from .device_data import EVAL_BATCH, RESIZE_NOTES, DeviceBatches
from .samplers import EpochOrder, ShardedBatches, global_batches

NUM_CLASSES = 10


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


def _index_digest(dataset: Dataset) -> str | None:
    """Which images of the underlying split ``dataset`` holds, in order (None: all)."""
    indices = None
    while isinstance(dataset, Subset):
        outer = range(len(dataset)) if indices is None else indices
        indices = [dataset.indices[i] for i in outer]
        dataset = dataset.dataset
    return None if indices is None else _digest(np.asarray(indices, dtype=np.int64).tobytes())


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
        ready, reused = device_data.prepare(splits, keys, cfg.image_size, device, workers)
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
