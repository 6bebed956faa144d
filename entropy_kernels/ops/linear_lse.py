"""The epilogue of the fused linear forward, shared by the torch backend and the Triton
launcher: online log-sum-exp states of several vocabulary ranges merged into one, then the
log-prob of the token, the entropy and the log-normaliser of each row.

A state is ``(m, s, w)`` per row: the largest logit seen, ``s = sum exp(z)`` and
``w = sum exp(z) z`` with ``z = (x - m) / T``.
"""

from __future__ import annotations

import torch

NEG_INF = float("-inf")


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
