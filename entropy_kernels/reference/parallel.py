"""Reference of the ``tp_group=`` option: the vocabulary shards are all-gathered, so the
unsharded reference runs on the full logits (or LM head) on every rank.

Every rank then computes the same full-vocabulary results; the gradient of a rank's shard is
its slice of the full gradient (no communication in the backward: every rank holds the whole
gradient already). Plain ``torch.distributed`` only, like the rest of the reference package.
"""

from __future__ import annotations

import torch


class _GatherVocab(torch.autograd.Function):
    """``[..., V_r]`` shard -> ``[..., sum_r V_r]`` in rank order (uneven shards allowed)."""

    @staticmethod
    def forward(ctx, shard, group, dim):
        dist = torch.distributed
        world = dist.get_world_size(group)
        size = torch.tensor([shard.shape[dim]], device=shard.device)
        sizes = [torch.empty_like(size) for _ in range(world)]
        dist.all_gather(sizes, size, group=group)
        sizes = [int(s) for s in torch.cat(sizes).tolist()]
        moved = shard.movedim(dim, 0).contiguous()
        padded = moved.new_zeros((max(sizes), *moved.shape[1:]))
        padded[: moved.shape[0]] = moved
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded, group=group)
        full = torch.cat([part[:n] for part, n in zip(parts, sizes, strict=True)])
        rank = dist.get_rank(group)
        ctx.dim, ctx.start, ctx.stop = dim, sum(sizes[:rank]), sum(sizes[: rank + 1])
        return full.movedim(0, dim)

    @staticmethod
    def backward(ctx, grad):
        return grad.narrow(ctx.dim, ctx.start, ctx.stop - ctx.start), None, None


def gather_vocab(shard: torch.Tensor | None, tp_group, dim: int = -1) -> torch.Tensor | None:
    """The full-vocabulary tensor from this rank's shard (``tp_group=None``: the tensor itself).

    Args:
        shard: this rank's logits ``[..., V_r]`` (``dim=-1``), LM head rows ``[V_r, H]`` or bias
            ``[V_r]`` (``dim=0``), or None.
        tp_group: the ``torch.distributed`` process group the vocabulary is sharded over.
    """
    if shard is None or tp_group is None:
        return shard
    return _GatherVocab.apply(shard, tp_group, dim % shard.dim())
