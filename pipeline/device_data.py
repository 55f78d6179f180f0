"""The device data path: a split decoded once into uint8 on the training device, every batch
one gather there, resized with PIL's exact arithmetic (``resize``) when needed (docs:
internals/data-path.md). A split prepared in one run of an `all` or `sweep` serves the next
(``keep_prepared``).
"""
from __future__ import annotations

import contextlib
import gc

import torch
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision import transforms

from . import signals
from .config import DataError
from .resize import SCRATCH_BYTES, pil_resize
from .samplers import global_batches, rank_share

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
    if n * 3 * image_size * image_size + SCRATCH_BYTES <= budget_bytes:
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


def prepare(splits: dict[str, Dataset], keys: dict[str, tuple], image_size: int,
            device: torch.device, workers: int) -> tuple[dict[str, tuple], bool]:
    """Each split as uint8 on ``device`` (``to_device``'s triple): the kept one where its key
    matches (inside ``keep_prepared``), else prepared now. Also returns whether every split
    was kept from an earlier run."""
    ready = _take_kept(keys)  # before measuring what is free: it drops what will not serve
    reused = len(ready) == len(keys)
    # Half of what is free: the network, its activations and the graph pool need the rest.
    budget = _free_bytes(device) // 2 if not reused else 0
    for split, ds in splits.items():
        if split not in ready:
            ready[split] = to_device(ds, image_size, device, workers, budget)
            budget -= ready[split][0].numel()
            _keep(split, keys[split], ready[split])
    return ready, reused
