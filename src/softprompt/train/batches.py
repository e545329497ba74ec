"""Which rows go into which batch, and how a batch becomes tensors.

The order of an epoch is a pure function of (seed, epoch, rank, world size): a resumed run
rebuilds the order of the epoch it stopped in and skips the batches already done, so it sees
exactly the batches the uninterrupted run saw. No global RNG is involved.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class PaddingCollator:
    """Right-pads a batch to its longest row; labels are the ids, -100 where there is padding.

    Labels are masked by attention, not by id: EOS doubles as pad for many models, and masking
    by id (as `DataCollatorForLanguageModeling` does) would drop the EOS label appended to every text.
    `labelled` holds the (row, column) of every label, found here on the host, so that the
    training step's loss picks its positions on the device without reading a mask back.
    """

    pad_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        ids = torch.full((len(features), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(features), width), dtype=torch.long)
        for i, f in enumerate(features):
            n = len(f["input_ids"])
            ids[i, :n] = torch.as_tensor(f["input_ids"], dtype=torch.long)
            mask[i, :n] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100),
                "labelled": mask.nonzero()}


def steps_per_epoch(num_rows: int, batch_size: int, world_size: int = 1) -> int:
    return math.ceil(math.ceil(num_rows / world_size) / batch_size)


def epoch_order(lengths: list[int], batch_size: int, seed: int, epoch: int, group_by_length: bool) -> list[int]:
    """All row indices in this epoch's order (before sharding over ranks).

    `group_by_length`: Hugging Face's length-grouped order (`LengthGroupedSampler`): a random
    permutation cut into mega-batches of up to 50 batches, each sorted longest first, so a
    batch holds rows of similar length (less compute on padding) while the epoch stays shuffled;
    the longest row of all goes first, so a shortage of memory shows at step 1, not at step 900.
    """
    generator = torch.Generator().manual_seed(seed + epoch)
    order = torch.randperm(len(lengths), generator=generator).tolist()
    if not group_by_length:
        return order
    mega = max(1, min(len(lengths) // (batch_size * 4), 50)) * batch_size
    chunks = [sorted(order[i:i + mega], key=lambda k: -lengths[k]) for i in range(0, len(order), mega)]
    longest = max(range(len(chunks)), key=lambda c: lengths[chunks[c][0]])
    chunks[0][0], chunks[longest][0] = chunks[longest][0], chunks[0][0]
    return [k for chunk in chunks for k in chunk]


def epoch_batches(lengths: list[int], batch_size: int, seed: int, epoch: int, group_by_length: bool,
                  rank: int = 0, world_size: int = 1) -> list[list[int]]:
    """This rank's batches of the epoch: every rank gets the same number of batches.

    As `torch.utils.data.DistributedSampler` does, the order is padded with its own first rows
    to a multiple of the world size and rank r takes every world_size-th row from r on (adjacent
    rows of a length-grouped order have similar lengths, so do the ranks' batches of one step).
    """
    order = epoch_order(lengths, batch_size, seed, epoch, group_by_length)
    if world_size > 1:
        padded = order + order[:(-len(order)) % world_size]
        order = padded[rank::world_size]
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
