"""Plain reference of :func:`entropy_kernels.packed_shift_labels`: one sequence at a time."""

from __future__ import annotations

import torch


def packed_shift_labels(input_ids, cu_seqlens, ignore_index=-100):
    """Each packed sequence shifted on its own; its last position and the tail get ignore_index."""
    labels = torch.full_like(input_ids, ignore_index)
    bounds = [int(bound) for bound in cu_seqlens]
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        for position in range(start, end - 1):
            labels[..., position] = input_ids[..., position + 1]
    return labels
