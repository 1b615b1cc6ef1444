"""A resumable, seeded data order: the permutation of epoch e is a function of (seed, e) alone.

`EpochSampler` draws each epoch's permutation from its own generator seeded by (seed, epoch),
so a stage's data order depends on nothing that ran before it, and a resumed stage can start
mid-epoch without replaying the batches it already saw. `BatchStream` cycles a DataLoader
over epochs and counts the batches it handed out (not the ones worker prefetching read
ahead), which is the position a checkpoint stores.

Data-parallel runs (wartok/dist.py): `shard` gives rank r of w a loader of batch_size / w whose
sampler yields, of each global batch of the one-process permutation, the r-th contiguous slice.
The ranks' batches are disjoint and together the one-process batch; the position stays counted
in global batches, so a checkpoint resumes with any number of processes.
"""
from __future__ import annotations

from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader, Sampler

EPOCH_STRIDE = 1_000_003  # keeps (seed, epoch) pairs apart: seed * stride + epoch


class EpochSampler(Sampler[int]):
    def __init__(self, size: int, seed: int, rank: int = 0, world: int = 1, batch_size: int = 1):
        """rank/world/batch_size (the global batch): see `shard`; the defaults are one process."""
        self.size, self.seed = size, seed
        self.rank, self.world, self.batch_size = rank, world, batch_size
        self.epoch, self.start = 0, 0

    def set_position(self, seed: int, epoch: int, start: int) -> None:
        """The next iteration yields epoch `epoch`'s permutation from index `start` on."""
        self.seed, self.epoch, self.start = seed, epoch, start

    def permutation(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * EPOCH_STRIDE + epoch)
        return torch.randperm(self.size, generator=generator)

    def __len__(self) -> int:
        if self.world == 1:
            return self.size - self.start
        return (self.size - self.start) // self.batch_size * (self.batch_size // self.world)

    def __iter__(self) -> Iterator[int]:
        order = self.permutation(self.epoch)[self.start:]
        if self.world > 1:  # whole global batches only, so that every rank yields as many
            local = self.batch_size // self.world
            whole = len(order) // self.batch_size * self.batch_size
            order = order[:whole].view(-1, self.world, local)[:, self.rank]  # (batches, local)
        yield from order.reshape(-1).tolist()


def shard(loader: DataLoader, rank: int, world: int) -> DataLoader:
    """The training loader of rank `rank` of `world`: the same data set, order and options, a
    batch of loader.batch_size / world (loader.batch_size stays the global batch)."""
    sampler, batch = loader.sampler, loader.batch_size or 1
    if not isinstance(sampler, EpochSampler) or not loader.drop_last:
        raise TypeError("shard needs a drop_last DataLoader whose sampler is an EpochSampler")
    if batch % world:
        raise ValueError(f"a global batch of {batch} cannot be split over {world} processes")
    return DataLoader(loader.dataset, batch_size=batch // world, drop_last=True,
                      sampler=EpochSampler(sampler.size, sampler.seed, rank, world, batch),
                      num_workers=loader.num_workers, pin_memory=loader.pin_memory,
                      persistent_workers=loader.persistent_workers, worker_init_fn=loader.worker_init_fn)


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
                sampler = self.loader.sampler  # the start counts global batches (world ranks' slices)
                start = self.batches * (self.loader.batch_size or 1) * sampler.world
                sampler.set_position(self.seed, self.epoch, start)
                # a new DataLoader iterator draws its workers' base seed from the global RNG; a
                # resumed stage makes one where an uninterrupted one did not, so keep that draw
                # off the stream that training's random draws (dropout) come from
                with torch.random.fork_rng(devices=[]):
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
