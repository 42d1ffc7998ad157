"""DeepSpeed-Ulysses sequence parallelism: every sequence split over P ranks.

Ranks ``g*P .. g*P + P-1`` form sequence-parallel group ``g``; they read the same batches (the
data loader sees ``world / P`` data-parallel ranks) and each keeps the ``r``-th contiguous
slice of every sequence. Around each attention kernel an all-to-all trades the sequence split
for a head split (``looplm.attention.SequenceParallel``), so the kernel sees whole sequences
with N/P query heads and G/P key/value heads; everything else in the model is per token and
needs no communication.

The loss of a rank is a mean over its own slice's target tokens; the trainer weights it by the
slice's share of the group's tokens and by P, so that DeepSpeed's gradient average over all
``world`` ranks equals the average over the data-parallel groups of whole-sequence gradients.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn

from looplm.losses import IGNORE_INDEX


class UlyssesSequenceParallel:
    """The all-to-alls of one sequence-parallel group (implements
    ``looplm.attention.SequenceParallel``)."""

    def __init__(self, group: dist.ProcessGroup, size: int, rank: int):
        self.group, self.size, self.rank = group, size, rank

    def gather_positions(self, position_ids_BS: torch.Tensor) -> torch.Tensor:
        slices = [torch.empty_like(position_ids_BS) for _ in range(self.size)]
        dist.all_gather(slices, position_ids_BS.contiguous(), group=self.group)
        return torch.cat(slices, dim=1)

    def heads_to_sequence(self, x_BNSD: torch.Tensor) -> torch.Tensor:
        sent = [chunk.contiguous() for chunk in x_BNSD.chunk(self.size, dim=1)]
        received = dist_fn.all_to_all([torch.empty_like(c) for c in sent], sent, group=self.group)
        return torch.cat(received, dim=2)

    def sequence_to_heads(self, out_BSND: torch.Tensor) -> torch.Tensor:
        sent = [chunk.contiguous() for chunk in out_BSND.chunk(self.size, dim=1)]
        received = dist_fn.all_to_all([torch.empty_like(c) for c in sent], sent, group=self.group)
        return torch.cat(received, dim=2)


def sequence_parallel_group(size: int) -> UlyssesSequenceParallel | None:
    """This rank's group among consecutive ranks of ``size`` (None for size 1). Every rank must
    call it: each group is created on all ranks."""
    if size == 1:
        return None
    world, rank = dist.get_world_size(), dist.get_rank()
    mine = None
    for first in range(0, world, size):
        group = dist.new_group(list(range(first, first + size)))
        if first <= rank < first + size:
            mine = group
    return UlyssesSequenceParallel(mine, size, rank % size)


def local_slice(batch: dict[str, torch.Tensor], sp: UlyssesSequenceParallel | None) -> dict:
    """This rank's contiguous slice of every [B, S] tensor of a batch."""
    if sp is None:
        return batch
    return {key: value.chunk(sp.size, dim=1)[sp.rank] for key, value in batch.items()}


def token_share(labels_BS: torch.Tensor, sp: UlyssesSequenceParallel | None) -> float:
    """The weight of this rank's mean loss: P x (its target tokens) / (the group's), so that
    the average over all ranks is the average over data-parallel groups of the whole
    sequences' mean loss. 1.0 without sequence parallelism."""
    if sp is None:
        return 1.0
    counts = torch.tensor([float((labels_BS != IGNORE_INDEX).sum())], dtype=torch.float64)
    total = counts.clone()
    dist.all_reduce(total, group=sp.group)
    return sp.size * counts.item() / max(total.item(), 1.0)
