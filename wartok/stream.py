"""A resumable, seeded data order: the permutation of epoch e is a function of (seed, e) alone.

`EpochSampler` draws each epoch's permutation from its own generator seeded by (seed, epoch),
so a stage's data order depends on nothing that ran before it, and a resumed stage can start
mid-epoch without replaying the batches it already saw. `BatchStream` cycles a DataLoader
over epochs and counts the batches it handed out (not the ones worker prefetching read
ahead), which is the position a checkpoint stores.
"""
from __future__ import annotations

from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader, Sampler

EPOCH_STRIDE = 1_000_003  # keeps (seed, epoch) pairs apart: seed * stride + epoch


class EpochSampler(Sampler[int]):
    def __init__(self, size: int, seed: int):
        self.size, self.seed = size, seed
        self.epoch, self.start = 0, 0

    def set_position(self, seed: int, epoch: int, start: int) -> None:
        """The next iteration yields epoch `epoch`'s permutation from index `start` on."""
        self.seed, self.epoch, self.start = seed, epoch, start

    def permutation(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * EPOCH_STRIDE + epoch)
        return torch.randperm(self.size, generator=generator)

    def __len__(self) -> int:
        return self.size - self.start

    def __iter__(self) -> Iterator[int]:
        yield from self.permutation(self.epoch)[self.start:].tolist()


class BatchStream:
    """Batches of a loader with an EpochSampler, epoch after epoch, with a resumable position."""

    def __init__(self, loader: DataLoader, seed: int):
        if not isinstance(loader.sampler, EpochSampler):
            raise TypeError("BatchStream needs a DataLoader whose sampler is an EpochSampler")
        self.loader, self.seed = loader, seed
        self.epoch, self.batches = 0, 0
        self._iterator: Iterator | None = None

    def __iter__(self) -> "BatchStream":
        return self

    def __next__(self) -> Any:
        for _ in range(2):  # a fresh epoch must yield; two empty ones in a row mean an empty loader
            if self._iterator is None:
                batch_size = self.loader.batch_size or 1
                self.loader.sampler.set_position(self.seed, self.epoch, self.batches * batch_size)
                self._iterator = iter(self.loader)
            try:
                batch = next(self._iterator)
            except StopIteration:
                self.epoch, self.batches, self._iterator = self.epoch + 1, 0, None
                continue
            self.batches += 1
            return batch
        raise ValueError("the data loader is empty: lower the batch size or enlarge the subset")

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.seed, "epoch": self.epoch, "batches": self.batches}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.seed, self.epoch, self.batches = state["seed"], state["epoch"], state["batches"]
        self._iterator = None
