"""The order of every epoch and each rank's share of a batch: what both data paths draw from,
and what a checkpoint saves (the sampler's RNG state) and a resume restores.
"""
from __future__ import annotations

import torch
from torch.utils.data import Dataset

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
