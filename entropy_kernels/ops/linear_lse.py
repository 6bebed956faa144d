"""The epilogue of the fused linear forward: online log-sum-exp states of several vocabulary
ranges merged into one, then the log-prob of the token, the entropy and the log-normaliser of
each row. The torch backend runs the torch functions; the Triton routes launch their twin,
:mod:`entropy_kernels.kernels.linear_merge`, through :func:`merge_rows`.

A state is ``(m, s, w)`` per row: the largest logit seen, ``s = sum exp(z)`` and
``w = sum exp(z) z`` with ``z = (x - m) / T``.
"""

from __future__ import annotations

import torch

NEG_INF = float("-inf")
# Rows per program of the merge kernel on a GPU (under the interpreter: 16, so that test shapes
# take several programs).
MERGE_BLOCK_ROWS = 256


def merge_states(state: torch.Tensor, inv_temperature: float):
    """One ``(m, s, w)`` per row from ``state [splits, 3, rows]`` (``splits`` ranges)."""
    part_max, part_sum, part_sum_z = state.unbind(1)
    row_max = part_max.amax(0)
    shift = row_max.masked_fill(row_max == NEG_INF, 0.0)
    offset = (part_max - shift) * inv_temperature
    rescale = offset.exp()
    recentre = offset.masked_fill(part_max == NEG_INF, 0.0)
    sum_exp = (rescale * part_sum).sum(0)
    sum_exp_z = (rescale * (part_sum_z + recentre * part_sum)).sum(0)
    return row_max, sum_exp, sum_exp_z


def finish_rows(row_max, sum_exp, sum_exp_z, token_logit, ignored, inv_temperature: float):
    """``(logprobs, entropy, normaliser [2, rows])`` of merged states; ignored rows give 0."""
    shift = row_max.masked_fill(row_max == NEG_INF, 0.0)
    log_norm = sum_exp.log()
    entropy = log_norm - sum_exp_z / sum_exp
    logprobs = (token_logit - shift) * inv_temperature - log_norm
    return (
        logprobs.masked_fill_(ignored, 0.0),
        entropy.masked_fill_(ignored, 0.0),
        torch.stack([shift, log_norm]).masked_fill_(ignored, 0.0),
    )


def merge_rows(state, token_logit, tokens, vocab_size, range_width, inv_temperature, ignore_index):
    """:func:`merge_states` + :func:`finish_rows` in one Triton launch: ``(logprobs, entropy,
    normaliser [2, rows])`` from ``state [ranges, 3, rows]`` (contiguous float32) and
    ``token_logit``, ``[rows]`` (each row's token logit) or ``[ranges, rows]`` (read from range
    ``token // range_width``), ``tokens [rows]``."""
    from ..kernels.linear_merge import linear_merge_kernel

    if not state.is_contiguous() or token_logit.stride(-1) != 1:
        raise ValueError("merge_rows needs a contiguous state and token logits along the rows")
    n_ranges, _, n_rows = state.shape
    logprobs = torch.empty(n_rows, device=state.device)
    entropy = torch.empty(n_rows, device=state.device)
    normaliser = torch.empty((2, n_rows), device=state.device)
    if n_rows:
        block = MERGE_BLOCK_ROWS if state.is_cuda else 16
        stride = token_logit.stride(0) if token_logit.dim() == 2 else 0
        linear_merge_kernel[(-(-n_rows // block),)](
            state, token_logit, tokens.contiguous(), logprobs, entropy, normaliser, n_rows,
            n_ranges, vocab_size, range_width, stride, inv_temperature, ignore_index,
            BLOCK_R=block,
        )  # fmt: skip
    return logprobs, entropy, normaliser
