"""Epilogue of the fused linear forward on the Triton routes: the online log-sum-exp states of
several vocabulary ranges merged into one per row, then the token's log-prob, the entropy and
the log-normaliser, in one launch (its torch twin, :func:`entropy_kernels.ops.linear_lse.
merge_states` + ``finish_rows``, is about 25 small operations, each of which costs the host
more than the device).

A state is ``(m, s, w)`` per row and range: the largest logit, ``s = sum exp(z)`` and
``w = sum exp(z) z`` with ``z = (x - m) / T``; an empty range (every logit ``-inf``) has
``m = -inf`` and ``s = w = 0``. The token's logit is read from range ``token // range_width``
(clamped) of ``token_logit``, whose stride between ranges may be 0 (one logit per row).
"""

import triton
import triton.language as tl


@triton.jit(do_not_specialize=["n_rows", "n_ranges", "ignore_index"])
def linear_merge_kernel(
    state_ptr,
    token_logit_ptr,
    tokens_ptr,
    logprobs_ptr,
    entropy_ptr,
    normaliser_ptr,
    n_rows,
    n_ranges,
    vocab_size,
    range_width,
    token_logit_stride,
    inv_temperature,
    ignore_index,
    BLOCK_R: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    in_rows = rows < n_rows
    range_stride = tl.full([], 3, tl.int64) * n_rows  # int64: ranges x rows may pass 2^31
    row_max = tl.full([BLOCK_R], float("-inf"), tl.float32)
    for part in range(n_ranges):
        part_max = tl.load(state_ptr + part * range_stride + rows, mask=in_rows)
        row_max = tl.maximum(row_max, part_max)
    shift = tl.where(row_max == float("-inf"), 0.0, row_max)
    sum_exp = tl.zeros([BLOCK_R], tl.float32)
    sum_exp_z = tl.zeros([BLOCK_R], tl.float32)
    for part in range(n_ranges):
        base = state_ptr + part * range_stride + rows
        part_max = tl.load(base, mask=in_rows, other=0.0)
        part_sum = tl.load(base + n_rows, mask=in_rows, other=0.0)
        part_sum_z = tl.load(base + 2 * n_rows, mask=in_rows, other=0.0)
        offset = (part_max - shift) * inv_temperature
        rescale = tl.exp(offset)
        recentre = tl.where(part_max == float("-inf"), 0.0, offset)
        sum_exp += rescale * part_sum
        sum_exp_z += rescale * (part_sum_z + recentre * part_sum)
    token = tl.load(tokens_ptr + rows, mask=in_rows, other=0).to(tl.int64)
    token_range = tl.minimum(tl.maximum(token // range_width, 0), n_ranges - 1)
    logit = tl.load(token_logit_ptr + token_range * token_logit_stride + rows, mask=in_rows)
    # A token outside the vocabulary (unvalidated) gets NaN, not a neighbour's log-prob.
    logit = tl.where((token < 0) | (token >= vocab_size), float("nan"), logit)
    log_norm = tl.log(sum_exp)
    entropy = log_norm - sum_exp_z / sum_exp
    logprob = (logit - shift) * inv_temperature - log_norm
    ignored = token == ignore_index
    tl.store(logprobs_ptr + rows, tl.where(ignored, 0.0, logprob), mask=in_rows)
    tl.store(entropy_ptr + rows, tl.where(ignored, 0.0, entropy), mask=in_rows)
    tl.store(normaliser_ptr + rows, tl.where(ignored, 0.0, shift), mask=in_rows)
    tl.store(normaliser_ptr + n_rows + rows, tl.where(ignored, 0.0, log_norm), mask=in_rows)
