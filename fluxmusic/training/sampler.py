"""A deterministic, resumable, sharded batch order: the data position is just (epoch, batch index).

Each epoch's order is a permutation drawn from a generator seeded by (seed, epoch) alone, so it can be
recomputed on resume instead of stored. Like ``DistributedSampler``, the permutation is padded (by
wrapping) to a multiple of the world size and rank r takes every world-th index from r; incomplete final
batches are dropped so every rank runs the same number of steps per epoch (DDP needs equal collectives).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fluxmusic.errors import FluxMusicError


@dataclass
class DataPosition:
    """Where the next batch comes from: epoch and index of the batch within this rank's epoch."""

    epoch: int = 0
    batch: int = 0


class ShardedBatchSampler:
    def __init__(
        self, num_items: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1, shuffle: bool = True
    ) -> None:
        if batch_size < 1:
            raise FluxMusicError(f"batch size {batch_size} must be >= 1")
        per_rank = -(-num_items // world_size)
        if per_rank // batch_size < 1:
            raise FluxMusicError(
                f"the dataset has {num_items} items, fewer than one batch of {batch_size} per process "
                f"({world_size} process(es)); use a smaller --batch-size or more data"
            )
        self.num_items = num_items
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.batches_per_epoch = per_rank // batch_size
        self.position = DataPosition()
        self._epoch_indices: tuple[int, list[int]] | None = None

    def indices(self, epoch: int) -> list[int]:
        """This rank's item indices for ``epoch``."""
        if self._epoch_indices is not None and self._epoch_indices[0] == epoch:
            return self._epoch_indices[1]
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            order = torch.randperm(self.num_items, generator=g).tolist()
        else:
            order = list(range(self.num_items))
        total = -(-self.num_items // self.world_size) * self.world_size
        order = (order * (total // self.num_items + 1))[:total]
        mine = order[self.rank :: self.world_size]
        self._epoch_indices = (epoch, mine)
        return mine

    def next_batch(self) -> list[int]:
        """Indices of the next batch; advances the position (rolling over to the next epoch)."""
        pos = self.position
        if pos.batch >= self.batches_per_epoch:
            pos.epoch, pos.batch = pos.epoch + 1, 0
        idx = self.indices(pos.epoch)[pos.batch * self.batch_size : (pos.batch + 1) * self.batch_size]
        pos.batch += 1
        return idx
