"""Gradient matmuls of float32 ``dlogits`` at the precision of float32 products: on CUDA,
half-precision operands are multiplied by cuBLAS with float32 output, ``dlogits`` split into
bfloat16 parts (:data:`DLOGITS_PARTS`), each part one matmul."""

from __future__ import annotations

import torch

HALF = (torch.float16, torch.bfloat16)
# bfloat16 parts of float32 dlogits: each rounds what the others leave, so k parts carry dlogits
# to a relative 2^-8k (one, as eager autograd rounds it: 2^-8). Two (2^-16) are too few once
# the gradient is rounded to its half dtype: an element within 2^-16 of a rounding boundary
# lands a unit away from the rounded reference, and on small or cancelling gradients that breaks
# the spec's 2e-4 by norm. Simulated (benchmarks/gradient_precision.py's representations; CPU,
# random N = 7, H = 5, V = 37 heads, 400 seeds, hidden and weight gradients): two parts miss it
# in 9 of 800 bfloat16 gradients (up to 1.3e-3) and 5 of 800 float16 ones, three in none, as
# float32 products do. A float16 operand is two exact bfloat16 parts; the low one meets the
# first LOW_PARTS parts of dlogits (with one, 5 of 800 float16 gradients still miss).
DLOGITS_PARTS = 3
LOW_PARTS = 2


def add_matmul_(acc: torch.Tensor, left: torch.Tensor, right: torch.Tensor, first=False) -> None:
    """``acc += left @ right`` (``acc = left @ right`` when ``first``: whatever ``acc`` held,
    NaN included, is ignored) with float32 products and accumulation: cuBLAS's float32 output
    for half-precision operands on CUDA, float32 operands otherwise."""
    beta = 0.0 if first else 1.0
    if left.is_cuda and left.dtype in HALF and right.dtype == left.dtype:
        torch.addmm(acc, left, right, out_dtype=torch.float32, beta=beta, out=acc)
    else:
        acc.addmm_(left.float(), right.float(), beta=beta)


def add_grad_matmul(acc, grad: torch.Tensor, operand: torch.Tensor, first=False) -> None:
    """``acc += grad @ operand`` (``=`` when ``first``): float32 ``acc`` and ``grad``,
    ``operand`` in the matmul dtype."""
    if operand.dtype == torch.bfloat16:
        for index, part in enumerate(bfloat16_parts(grad, DLOGITS_PARTS)):
            add_matmul_(acc, part, operand, first and index == 0)
    else:  # float32, or float16 (whose range cannot hold the low part): float32 products
        add_matmul_(acc, grad, operand.float(), first)


def bfloat16_parts(operand: torch.Tensor, count: int = 2) -> list[torch.Tensor]:
    """``operand`` as ``count`` bfloat16 parts, each the rounding of what the previous ones
    leave: a bfloat16 operand is its own one part; a float16 one is exactly the sum of two
    (11 significant bits, of which the first rounding keeps 8 and the rest, at most 3 bits
    within bfloat16's range, is exact too); a float32 one (``dlogits``) is within 2^-8 count
    of their sum."""
    if operand.dtype == torch.bfloat16:
        return [operand]
    parts = [operand.to(torch.bfloat16)]
    rest = operand.float()
    for _ in range(count - 1):
        rest = rest - parts[-1].float()
        parts.append(rest.to(torch.bfloat16))
    return parts


def operand_parts(operand: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A half-precision operand's exact bfloat16 ``(high, low)``, low None for bfloat16."""
    high, *low = bfloat16_parts(operand)
    return high, low[0] if low else None


def stacked_rows_parts(rows: torch.Tensor, parts: int):
    """The weight gradient's operands for ``parts`` parts of ``dlogits`` stacked along the rows:
    the rows' bfloat16 high part stacked ``parts`` times and their low part (float16 rows)
    stacked ``min(parts, LOW_PARTS)`` times, or None."""
    high, low = operand_parts(rows)
    if low is not None:
        low = torch.cat([low] * min(parts, LOW_PARTS))
    return torch.cat([high] * parts) if parts > 1 else high, low


def add_split_grad_matmuls(accumulators, parts, weight_parts, rows_parts, first) -> None:
    """Add one tile's gradients from bfloat16 matmuls to ``accumulators`` ``(dhidden rows,
    dweight tile, dbias tile)`` (the weight tile overwritten when ``first``): ``dlogits`` as
    ``parts`` ``[k, rows, width]`` (:data:`DLOGITS_PARTS`; or ``[1, rows, width]``, the rounding
    alone), the weight tile as :func:`operand_parts`, the rows as :func:`stacked_rows_parts`.
    ``dhidden`` takes a matmul per part, and one per part that meets a float16 weight's low
    part; ``dweight`` one over the parts stacked, and one more for float16 rows; ``dbias`` one
    sum. Left out: the products of a float16 operand's low part with ``dlogits``' parts after
    the first :data:`LOW_PARTS` (2^-24 of the result)."""
    grad_rows, grad_weight, grad_bias = accumulators
    (weight_high, weight_low), (rows_stacked, rows_low) = weight_parts, rows_parts
    stacked = parts.view(-1, parts.shape[-1])
    if grad_rows is not None:
        for part in parts:
            add_matmul_(grad_rows, part, weight_high)
        if weight_low is not None:
            for part in parts[:LOW_PARTS]:
                add_matmul_(grad_rows, part, weight_low)
    if grad_weight is not None:
        add_matmul_(grad_weight, stacked.T, rows_stacked, first)
        if rows_low is not None:
            low_stacked = parts[:LOW_PARTS].reshape(-1, parts.shape[-1])
            add_matmul_(grad_weight, low_stacked.T, rows_low)
    if grad_bias is not None:
        grad_bias += stacked.sum(0, dtype=torch.float32)
