"""A fusion dataset for any PyTorch training loop: an `IterableDataset` of windows and a collator.

`FusionIterableDataset(path)` streams the windows of a fused (or topk) dataset folder, in the codec or
the plain layout, one shard in memory at a time; shards and the windows within a shard are shuffled
from `seed` and the epoch (`set_epoch`), and DataLoader workers split the shards between them.
`collate_fusion` pads a list of windows into the batch the bundled trainer uses (fusedata/train.py):

    input_ids       long  [B, T]       0 where padded
    attention_mask  long  [B, T]
    labels          long  [B, T−1]     labels[:, i] is the token after input_ids[:, i]; −100 where padded
    topk_ids        long  [B, T−1, k]  the target's ids (padding entries: 0 with q = 0)
    topk_q          float [B, T−1, k]  their probabilities
    tail            float [B, T−1]     the probability outside them

Pair it with `fusedata.train.fusion_loss(logits, batch, lam)`: λ·CLM + (1−λ)·the sparse distillation loss.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from fusedata.dataset import open_dataset, read_shard
from fusedata.errors import UsageError
from fusedata.loading import TopKDecoder, rows_of


class FusionIterableDataset(torch.utils.data.IterableDataset):
    """The windows of a fused or topk dataset folder, shuffled per epoch (see the module docstring)."""

    def __init__(self, path: str | Path, *, shuffle: bool = True, seed: int = 0, verify: bool = True) -> None:
        self.path = Path(path)
        manifest = open_dataset(self.path, verify=verify)
        if manifest.kind == "aligned" or manifest.stats.get("of") == "aligned":
            raise UsageError(f"{self.path}: an aligned dataset has no input_ids; train on a fused or topk one")
        if not manifest.shards:
            raise UsageError(f"{self.path}: the manifest lists no shards")
        self.shards = [s.name for s in manifest.shards]
        self.windows = manifest.rows
        self.shuffle, self.seed, self.epoch = shuffle, seed, 0
        self.decoder = TopKDecoder(self.path / self.shards[0])

    def set_epoch(self, epoch: int) -> None:
        """A new shuffle for the next pass (as with DistributedSampler)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.windows

    def __iter__(self) -> Iterator[dict[str, Any]]:
        rng = random.Random(self.seed * 1_000_003 + self.epoch)
        order = list(self.shards)
        if self.shuffle:
            rng.shuffle(order)
        info = torch.utils.data.get_worker_info()
        if info is not None:  # each DataLoader worker reads its own shards
            order = order[info.id :: info.num_workers]
        for shard in order:
            rows = rows_of(read_shard(self.path / shard), self.decoder)
            if self.shuffle:
                rng.shuffle(rows)
            yield from rows


def collate_fusion(rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Pad windows into one batch of tensors (the keys in the module docstring)."""
    from fusedata.train import collate

    b = collate(rows, with_topk=True)
    return {"input_ids": b.input_ids, "attention_mask": b.attention, "labels": b.labels,
            "topk_ids": b.topk_ids, "topk_q": b.topk_q, "tail": b.tail}
