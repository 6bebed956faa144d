"""Labels for packed (padding-free) batches: the next-token shift stays inside each sequence."""

from __future__ import annotations

import torch

from ._validation import IGNORE_INDEX


def packed_shift_labels(
    input_ids: torch.Tensor, cu_seqlens: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """Next-token labels of a packed batch, shifted within each sequence.

    A packed batch concatenates sequences along the last dimension; sequence ``s`` occupies
    positions ``[cu_seqlens[s], cu_seqlens[s + 1])``. Position ``i`` of a sequence is labelled
    with the token at ``i + 1`` of the same sequence; the last position of each sequence gets
    ``ignore_index``, never the first token of the next sequence (the shift across the boundary
    is the bug of a plain ``roll``). Positions from ``cu_seqlens[-1]`` on (padding after the
    packed sequences) also get ``ignore_index``.

    Args:
        input_ids: ``[..., L]`` integer tensor (e.g. ``[L]`` or ``[1, L]``); every leading
            index is shifted along the last dimension with the same boundaries.
        cu_seqlens: ``[S + 1]`` integer tensor of cumulative sequence lengths: starts at 0,
            non-decreasing (empty sequences allowed), ``cu_seqlens[-1] <= L``.
        ignore_index: label of the positions with no next token in their sequence (default -100).

    Returns:
        Labels shaped and typed like ``input_ids``; ``labels[..., i]`` is the token that
        position ``i`` predicts.
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() < 1:
        raise ValueError("input_ids must be a tensor of shape [..., L]")
    if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex:
        raise ValueError(f"input_ids must be an integer tensor, got dtype {input_ids.dtype}")
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError("cu_seqlens must be a 1-D tensor [S + 1] of cumulative sequence lengths")
    if cu_seqlens.dtype.is_floating_point or cu_seqlens.dtype.is_complex:
        raise ValueError(f"cu_seqlens must be an integer tensor, got dtype {cu_seqlens.dtype}")
    if cu_seqlens.device != input_ids.device:
        raise ValueError(f"cu_seqlens must be on {input_ids.device}, got {cu_seqlens.device}")
    if not isinstance(ignore_index, int):
        raise ValueError(f"ignore_index must be an int, got {ignore_index!r}")
    length = input_ids.shape[-1]
    bounds = cu_seqlens.long()
    # One host sync for the three checks.
    valid = torch.stack(
        [bounds[0] == 0, (bounds[1:] >= bounds[:-1]).all(), bounds[-1] <= length]
    ).tolist()
    if not all(valid):
        raise ValueError(
            "cu_seqlens must start at 0, never decrease and end at most at input_ids.shape[-1]"
            f" = {length}, got {cu_seqlens.tolist()}"
        )
    labels = torch.full_like(input_ids, ignore_index)
    if length < 2 or bounds.numel() < 2:
        return labels
    position = torch.arange(length - 1, device=input_ids.device)
    # The sequence of position i is the number of boundaries <= i; i + 1 stays inside it when
    # it lies before that sequence's end.
    ends = bounds[1:]
    sequence_end = ends[torch.searchsorted(ends, position, right=True).clamp_max(ends.numel() - 1)]
    inside = position + 1 < sequence_end  # past cu_seqlens[-1], sequence_end <= position
    labels[..., :-1] = torch.where(inside, input_ids[..., 1:], labels[..., :-1])
    return labels
