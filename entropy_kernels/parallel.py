"""Vocabulary-parallel (tensor-parallel) scoring: each rank holds a contiguous vocabulary shard.

Rank ``r`` of ``tp_group`` holds the logits of the global columns ``[offset_r, offset_r + V_r)``
(``offset_r``: the sum of ``V`` over lower ranks, learned with one ``all_gather`` of ``V_r``).
The existing local kernels score each shard on its own: per row they return the shard's row max
``m_r`` (logit units), log-normaliser ``l_r = log sum_shard exp((x - m_r) / T)`` and entropy
``H_r``, plus the token's log-prob on the rank that owns the token. With the global row max
``M = max_r m_r`` and ``d_r = l_r + (m_r - M) / T`` (the log of the shard's mass relative to
``exp(M / T)``):

    S = sum_r exp(d_r)        lse = M / T + log S
    H = log S - sum_r exp(d_r) (d_r - H_r) / S
    log p_token = (x_token - M) / T - log S,   where (x_token - M) / T = log p_r + d_r (owner)

So a call communicates one all-reduce (max) of ``N`` floats and one (sum) of ``3 N`` floats,
never a vocabulary-sized tensor. Every rank ends with the full-vocabulary log-probs and
entropy. The backward needs no communication: each rank runs the local backward kernel on its
shard with the global ``(M, log S)`` in place of the local normaliser, the global entropy, and a
token that is outside the shard (no one-hot, row not zeroed) on the rows it does not own.

The same combination serves the fused linear op (``weight`` / ``bias`` rows ``[V_r, H]`` /
``[V_r]``); there the replicated ``hidden`` gets the sum over ranks of each shard's part of its
gradient (one all-reduce of ``[N, H]`` in the backward, as in any column-parallel layer). For
bfloat16 / float16 ``hidden`` the parts are rounded to that dtype before they are summed.
Tokens, and every other argument but the shard, must be the same on every rank (not checked:
that would cost communication).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from .linear_scoring import LinearOptions, gradients_wanted, linear_forward, linear_gradients
from .ops.scoring import (
    ScoringOptions,
    gradient_buffer,
    score,
    scoring_backward_out,
    scoring_forward,
)

# Local token codes: the local kernels treat LOCAL_IGNORE as ignore_index (row not read, zero
# gradient) and NOT_OWNED as an out-of-range token (statistics computed, no one-hot). Neither can
# collide with a local column, which is never negative.
LOCAL_IGNORE = -1
NOT_OWNED = -2


@dataclass(frozen=True)
class VocabShard:
    """This rank's columns ``[offset, offset + size)`` of a vocabulary of ``total`` entries.

    ``group`` is None for an unsharded call (``offset = 0``, ``size = total``).
    """

    group: Any
    offset: int
    size: int
    total: int


def vocab_shard(vocab_size: int, device: torch.device, tp_group) -> VocabShard:
    """This rank's shard of the vocabulary: one ``all_gather`` of the local sizes.

    ``tp_group=None`` is the unsharded case and communicates nothing.
    """
    if tp_group is None:
        return VocabShard(None, 0, vocab_size, vocab_size)
    dist = torch.distributed
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("tp_group needs an initialised torch.distributed process group")
    if not isinstance(tp_group, dist.ProcessGroup):
        raise ValueError(
            f"tp_group must be a torch.distributed ProcessGroup or None, got {type(tp_group)}"
        )
    rank = dist.get_rank(tp_group)
    if rank < 0:
        raise ValueError("tp_group must be a process group that this process belongs to")
    world = dist.get_world_size(tp_group)
    local = torch.tensor([vocab_size], dtype=torch.int64, device=device)
    gathered = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(gathered, local, group=tp_group)
    sizes = [int(size) for size in torch.cat(gathered).tolist()]
    return VocabShard(tp_group, sum(sizes[:rank]), vocab_size, sum(sizes))


def score_shard(
    logits: torch.Tensor, tokens: torch.Tensor, options: ScoringOptions, shard: VocabShard
):
    """Differentiable full-vocabulary ``(logprobs, entropy)`` for validated arguments.

    Without a group this is the local scoring op; with one, the vocabulary-parallel path.
    """
    if shard.group is None:
        return score(logits, tokens, options)
    return _ParallelScoring.apply(_LogitsShard(options), tokens, shard, logits)


def linear_score_shard(hidden, weight, bias, tokens, options: LinearOptions, sum_hidden_grad=True):
    """Vocabulary-parallel ``(logprobs, entropy)`` of ``hidden @ weight.T + bias``.

    ``weight`` / ``bias`` hold this rank's rows; the hidden gradient is summed over the group,
    or (``sum_hidden_grad=False``, for callers whose next layer reduces it, as Megatron's
    sequence-parallel gather does) this shard's part only.
    """
    local = _LinearShard(options, sum_hidden_grad, gradients_wanted(hidden, weight, bias))
    return _ParallelScoring.apply(local, tokens, options.shard, hidden, weight, bias)


@dataclass(frozen=True)
class _LogitsShard:
    """The local scoring op on a ``[..., V_r]`` logits shard."""

    options: ScoringOptions

    def forward(self, tensors, local_tokens):
        (logits,) = tensors
        options = self.options
        return scoring_forward(
            logits,
            local_tokens,
            options.temperature,
            LOCAL_IGNORE,
            options.backend,
            options.inplace_backward,
        )

    def backward(self, tensors, local_tokens, normaliser, entropy, grads, needs, group):
        (logits,) = tensors
        options = self.options
        args = (local_tokens, normaliser, entropy.reshape(-1), *grads)
        consts = (options.temperature, LOCAL_IGNORE, options.backend)
        grad_logits = gradient_buffer(logits, options.inplace_backward)
        scoring_backward_out(logits, *args, *consts, grad_logits)
        return (grad_logits,)


@dataclass(frozen=True)
class _LinearShard:
    """The local linear op on this rank's ``[V_r, H]`` weight (and ``[V_r]`` bias) rows."""

    options: LinearOptions
    sum_hidden_grad: bool = True
    needs_grad: bool = True  # a backward may follow (picks the GPU forward route)

    def _local(self) -> LinearOptions:
        return LinearOptions(self.options.temperature, LOCAL_IGNORE, self.options.backend)

    def forward(self, tensors, local_tokens):
        return linear_forward(*tensors, local_tokens, self._local(), self.needs_grad)

    def backward(self, tensors, local_tokens, normaliser, entropy, grads, needs, group):
        saved = (*tensors, local_tokens, normaliser, entropy)
        grad_hidden, grad_weight, grad_bias = linear_gradients(saved, *grads, needs, self._local())
        if grad_hidden is not None and self.sum_hidden_grad:
            # hidden is replicated: its gradient is the sum of every shard's part.
            torch.distributed.all_reduce(grad_hidden, group=group)
        return grad_hidden, grad_weight, grad_bias


@dataclass(frozen=True)
class ShardRows:
    """One shard's per-row statistics from the local forward kernel (rows flattened).

    ``local_tokens``: shard columns where this rank owns the token, else ``LOCAL_IGNORE`` /
    ``NOT_OWNED``; ``normaliser``: ``[2, rows]`` local row max (logit units) and log-normaliser.
    """

    local_tokens: torch.Tensor
    logprobs: torch.Tensor
    entropy: torch.Tensor
    normaliser: torch.Tensor
    owned: torch.Tensor
    ignored: torch.Tensor


def shard_rows(local_op, tensors, tokens, shard: VocabShard) -> ShardRows:
    """Run the local forward (``local_op.forward``) on this shard with shard-local token codes."""
    ignored = tokens == local_op.options.ignore_index
    local = tokens - shard.offset
    owned = (local >= 0) & (local < shard.size) & ~ignored
    codes = torch.where(ignored, LOCAL_IGNORE, NOT_OWNED).to(tokens.dtype)
    local_tokens = torch.where(owned, local, codes)
    logprobs, entropy, normaliser = local_op.forward(tensors, local_tokens)
    return ShardRows(
        local_tokens,
        logprobs.reshape(-1),
        entropy.reshape(-1),
        normaliser,
        owned.reshape(-1),
        ignored.reshape(-1),
    )


def shard_peak(rows: ShardRows) -> torch.Tensor:
    """This shard's candidate for the global row max ``M`` (reduced with max over ranks)."""
    row_max, log_norm = rows.normaliser
    # A shard whose row is all -inf holds no mass there: its row max must not count.
    return torch.where(log_norm == -math.inf, -math.inf, row_max)


def finite_peak(peak: torch.Tensor) -> torch.Tensor:
    """The reduced max, 0 on rows that are -inf everywhere (as the local kernels centre them)."""
    return torch.where(peak == -math.inf, 0.0, peak)


def shard_sums(rows: ShardRows, peak: torch.Tensor, options) -> torch.Tensor:
    """``[3, rows]``: this shard's ``exp(d_r)``, ``exp(d_r) (d_r - H_r)`` and owned token term.

    Summed over ranks they give ``S``, ``S (log S - H)`` and ``(x_token - M) / T``.
    """
    row_max, log_norm = rows.normaliser
    shard_log_mass = log_norm + (row_max - peak) * (1.0 / options.temperature)
    mass = shard_log_mass.exp()
    # An empty shard (mass 0) has a NaN entropy (0 / 0) that must not count; NaN mass propagates.
    spread = torch.where(mass == 0.0, 0.0, mass * (shard_log_mass - rows.entropy))
    token_term = torch.where(rows.owned, rows.logprobs + shard_log_mass, 0.0)
    return torch.stack([mass, spread, token_term])


def global_rows(sums, peak, tokens, rows: ShardRows, shard: VocabShard):
    """Full-vocabulary ``(logprobs, entropy)`` shaped like ``tokens``, and the global normaliser
    ``[2, rows]`` ``(M, log S)`` that the local backward kernel reads in place of its own."""
    total_mass, total_spread, token_logit = sums
    log_total = total_mass.log()
    entropy = log_total - total_spread / total_mass
    # A token outside [0, V_total) (only with validate=False) has no owner: NaN.
    flat_tokens = tokens.reshape(-1)
    in_range = (flat_tokens >= 0) & (flat_tokens < shard.total)
    logprobs = torch.where(in_range, token_logit - log_total, math.nan)
    logprobs = logprobs.masked_fill_(rows.ignored, 0.0).view(tokens.shape)
    entropy = entropy.masked_fill_(rows.ignored, 0.0).view(tokens.shape)
    return logprobs, entropy, torch.stack([peak, log_total])


class _ParallelScoring(torch.autograd.Function):
    """Vocabulary-parallel ``(logprobs, entropy)`` around a local op (``_LogitsShard`` or
    ``_LinearShard``): each rank's tensors get their gradient, the sharded ones their shard's."""

    @staticmethod
    def forward(ctx, local_op, tokens, shard: VocabShard, *tensors):
        dist = torch.distributed
        rows = shard_rows(local_op, tensors, tokens, shard)
        peak = shard_peak(rows)
        dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=shard.group)
        peak = finite_peak(peak)
        sums = shard_sums(rows, peak, local_op.options)
        dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=shard.group)
        logprobs, entropy, normaliser = global_rows(sums, peak, tokens, rows, shard)
        ctx.save_for_backward(*tensors, rows.local_tokens, normaliser, entropy)
        ctx.local_op, ctx.group = local_op, shard.group
        ctx.set_materialize_grads(False)
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy):
        needs = tuple(ctx.needs_input_grad[3:])
        if not any(needs) or (grad_logprobs is None and grad_entropy is None):
            return (None,) * (3 + len(needs))
        *tensors, local_tokens, normaliser, entropy = ctx.saved_tensors
        grads = ctx.local_op.backward(
            tensors,
            local_tokens,
            normaliser,
            entropy,
            (grad_logprobs, grad_entropy),
            needs,
            ctx.group,
        )
        return (None, None, None, *grads)
