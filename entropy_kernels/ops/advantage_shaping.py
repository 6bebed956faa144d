"""Launchers of the GTPO / GRPO-S advantage-shaping kernels (arXiv 2508.04349, Eq. 3, 5, 6, 8, 9).

Each launcher checks the layout of its tensors, allocates the outputs and picks the grid; the
jit code is in `entropy_kernels/kernels/` (one file per kernel, the shared helpers and the
numerical design in `shaping_common.py`). Triton is imported only when a kernel is launched.
Inputs are the device-side group layout of `entropy_kernels.advantages.GroupLayout`: a
permutation `row_order` [B] listing each group's rows contiguously, and `group_start` /
`group_size` [S] per group slot (unused slots have size 0).
"""

from __future__ import annotations

import torch

# Moments per (group slot, position block, set): active count, mean of s, centred sum of squares.
MOMENT_FIELDS = 3
# Rows per step of the sequence-level kernel's loops.
SEQUENCE_BLOCK_ROWS = 64
# Positions per block of the token-level kernels: at least 16, at most 512.
MIN_BLOCK_T, MAX_BLOCK_T = 16, 512


def _block_t(seq_len: int) -> int:
    """The next power of two of `seq_len`, clamped to [MIN_BLOCK_T, MAX_BLOCK_T]."""
    return min(max(1 << max(seq_len - 1, 0).bit_length(), MIN_BLOCK_T), MAX_BLOCK_T)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _mask_args(mask: torch.Tensor | None) -> tuple[torch.Tensor | None, int, int]:
    if mask is None:
        return None, 0, 0
    if mask.dtype == torch.bool:
        mask = mask.view(torch.uint8)  # same bytes; Triton loads it as integers
    return mask, mask.stride(0), mask.stride(1)


def _check_layout(rewards, row_order, group_start, group_size) -> None:
    batch = rewards.shape[0]
    if rewards.dtype != torch.float32 or rewards.shape != (batch,) or rewards.stride(0) != 1:
        raise ValueError(
            f"rewards must be a contiguous float32 [{batch}], got {rewards.dtype} "
            f"{tuple(rewards.shape)}"
        )
    for name, tensor in (
        ("row_order", row_order),
        ("group_start", group_start),
        ("group_size", group_size),
    ):
        if tensor.dtype != torch.int64 or tensor.dim() != 1 or not tensor.is_contiguous():
            raise ValueError(f"{name} must be a contiguous int64 vector")
        if tensor.device != rewards.device:
            raise ValueError(f"{name} must be on {rewards.device}, got {tensor.device}")
    if row_order.shape[0] != batch or group_start.shape != group_size.shape:
        raise ValueError(
            "row_order must have one entry per row, and group_start / group_size "
            "one entry per group slot"
        )


def _check_token_tensors(entropy: torch.Tensor, mask: torch.Tensor | None, batch: int) -> None:
    if entropy.dim() != 2 or entropy.shape[0] != batch:
        raise ValueError(f"entropy must have shape [{batch}, T], got {tuple(entropy.shape)}")
    if mask is not None and mask.shape != entropy.shape:
        raise ValueError(f"mask must have shape {tuple(entropy.shape)}, got {tuple(mask.shape)}")


def gtpo_token_rewards(
    entropy: torch.Tensor,
    mask: torch.Tensor | None,
    outcomes: torch.Tensor,
    row_order: torch.Tensor,
    group_start: torch.Tensor,
    group_size: torch.Tensor,
    *,
    base: float,
    alpha2: float,
    eps: float,
    with_moments: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """GTPO shaped token rewards (Eq. 3, 5), or their shaping terms and whitening moments.

    entropy: [B, T] floating (any strides); mask: [B, T] bool / number (nonzero = active) or
    None (all active); outcomes: [B] float32, +1 success, -1 failure, NaN poisons the row,
    0 makes it inactive; base: alpha1 + alpha2.

    Without `with_moments`: returns (r [B, T] float32, None), r = 0 at inactive positions.
    With it: returns (s [B, T] float32, the shaping term r - base), and moments
    [S, cdiv(T, BLOCK_T), 2, 3] float32: (count, mean of s, centred sum of squares of s) of
    each group's failure (index 0) and success (index 1) tokens in each position block.
    """
    _check_layout(outcomes, row_order, group_start, group_size)
    _check_token_tensors(entropy, mask, outcomes.shape[0])
    batch, seq_len = entropy.shape
    slots = group_start.shape[0]
    block_t = _block_t(seq_len)
    t_blocks = _cdiv(seq_len, block_t)
    out = torch.empty((batch, seq_len), dtype=torch.float32, device=entropy.device)
    moments = None
    if with_moments:
        moments = torch.zeros(
            (slots, t_blocks, 2, MOMENT_FIELDS), dtype=torch.float32, device=entropy.device
        )
    if batch == 0 or seq_len == 0:
        return out, moments
    from ..kernels.gtpo_token_rewards import gtpo_token_rewards_kernel

    mask_arg, stride_mask_row, stride_mask_t = _mask_args(mask)
    gtpo_token_rewards_kernel[(slots, t_blocks)](
        entropy,
        mask_arg,
        outcomes,
        row_order,
        group_start,
        group_size,
        out,
        moments if moments is not None else out,
        seq_len,
        entropy.stride(0),
        entropy.stride(1),
        stride_mask_row,
        stride_mask_t,
        out.stride(0),
        moments.stride(0) if moments is not None else 0,
        moments.stride(1) if moments is not None else 0,
        float(base),
        float(alpha2),
        float(eps),
        WITH_MOMENTS=with_moments,
        BLOCK_T=block_t,
    )
    return out, moments


def whiten_rows_(
    values: torch.Tensor,
    mask: torch.Tensor | None,
    row_mean: torch.Tensor,
    row_scale: torch.Tensor,
) -> torch.Tensor:
    """In place: `values[i, t] = (values[i, t] - row_mean[i]) * row_scale[i]` where active, else 0.

    values: [B, T] float32 with unit stride along T; mask: [B, T] or None (all active);
    row_mean / row_scale: contiguous [B] float32. Returns `values`.
    """
    batch, seq_len = values.shape
    if values.dtype != torch.float32 or values.stride(1) != 1:
        raise ValueError("values must be float32 with unit stride along T")
    for name, tensor in (("row_mean", row_mean), ("row_scale", row_scale)):
        if tensor.dtype != torch.float32 or tensor.shape != (batch,) or tensor.stride(0) != 1:
            raise ValueError(f"{name} must be a contiguous float32 [{batch}]")
    _check_token_tensors(values, mask, batch)
    if batch == 0 or seq_len == 0:
        return values
    from ..kernels.whiten_rows import whiten_rows_kernel

    block_t = _block_t(seq_len)
    mask_arg, stride_mask_row, stride_mask_t = _mask_args(mask)
    whiten_rows_kernel[(batch, _cdiv(seq_len, block_t))](
        values,
        mask_arg,
        row_mean,
        row_scale,
        seq_len,
        values.stride(0),
        stride_mask_row,
        stride_mask_t,
        BLOCK_T=block_t,
    )
    return values


def sequence_mean_entropy(entropy: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Eq. 8: mean entropy over each row's active positions; [B] float64, 0 for empty rows."""
    _check_token_tensors(entropy, mask, entropy.shape[0] if entropy.dim() == 2 else -1)
    batch, seq_len = entropy.shape
    out = torch.zeros(batch, dtype=torch.float64, device=entropy.device)
    if batch == 0 or seq_len == 0:
        return out
    from ..kernels.sequence_mean_entropy import sequence_mean_entropy_kernel

    mask_arg, stride_mask_row, stride_mask_t = _mask_args(mask)
    sequence_mean_entropy_kernel[(batch,)](
        entropy,
        mask_arg,
        out,
        seq_len,
        entropy.stride(0),
        entropy.stride(1),
        stride_mask_row,
        stride_mask_t,
        BLOCK_T=_block_t(seq_len),
    )
    return out


def group_sequence_advantages(
    scores: torch.Tensor,
    rewards: torch.Tensor,
    row_order: torch.Tensor,
    group_start: torch.Tensor,
    group_size: torch.Tensor,
    *,
    shape_by_entropy: bool,
    scale_by_std: bool,
    zscore: bool = True,
    base: float = 1.1,
    beta2: float = 0.1,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Per-group z-scores of sequence rewards; [B] float32.

    With `shape_by_entropy` the rewards are GRPO-S's (Eq. 9) built from `scores`, the
    sequence-mean entropies [B] float64 (or float32), and `rewards` holds outcomes (+1 success,
    -1 failure, NaN poisons the row; `base` = beta1 + beta2); otherwise they are `rewards`
    themselves (GRPO) and `scores` is not read. `scale_by_std=False` only centres (Dr. GRPO).
    A group of one row gets 0. `zscore=False` (only with `shape_by_entropy`) returns the Eq. 9
    rewards themselves. The arithmetic runs in float64 (kernels/shaping_common.py).
    """
    _check_layout(rewards, row_order, group_start, group_size)
    batch = rewards.shape[0]
    floating = (torch.float32, torch.float64)
    if scores.dtype not in floating or scores.shape != (batch,) or scores.stride(0) != 1:
        raise ValueError(f"scores must be a contiguous float32 or float64 [{batch}]")
    if not zscore and not shape_by_entropy:
        raise ValueError("zscore=False needs shape_by_entropy=True (the Eq. 9 rewards)")
    out = torch.empty(batch, dtype=torch.float32, device=rewards.device)
    slots = group_start.shape[0]
    if batch == 0:
        return out
    from ..kernels.group_sequence_advantages import group_sequence_advantages_kernel

    group_sequence_advantages_kernel[(slots,)](
        scores,
        rewards,
        row_order,
        group_start,
        group_size,
        out,
        float(base),
        float(beta2),
        float(eps),
        SHAPE_BY_ENTROPY=shape_by_entropy,
        ZSCORE=zscore,
        SCALE_BY_STD=scale_by_std,
        BLOCK_R=SEQUENCE_BLOCK_ROWS,
    )
    return out
