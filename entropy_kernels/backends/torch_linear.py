"""Torch backend of the fused linear scoring: BLAS matmul tiles with float32 output and a torch
fold, never an ``[N, V]`` tensor.

Forward: per block of rows, each vocabulary tile's log-sum-exp state (maximum, sum of
exponentials, sum of ``exp(z) z``) merged into the running one by
:func:`entropy_kernels.ops.linear_lse.merge_states`, finished by ``finish_rows``: the split
merge and epilogue (the Triton routes launch their twin, :func:`merge_rows`). Backward, vocabulary
tiles outside and row blocks inside: each tile is recomputed and turned into ``dlogits`` by the
scoring backward's torch fold, then ``dhidden += dlogits @ W``, ``dweight += dlogits^T @ h`` and
``dbias += sum(dlogits)``, accumulated in float32 and rounded once. The GPU
routes of the Triton backend (``kernel_config.LINEAR_GPU_FORWARD`` / ``_BACKWARD``) run the same
tiles with the scoring kernels as the fold (``fold="triton"``). The loss
of :mod:`entropy_kernels.linear_fused_loss` forms ``dlogits`` in the forward
(:mod:`entropy_kernels.backends.torch_linear_fused`).
On CPU the element-wise passes over a tile run in cache-sized row groups
(``torch_scoring.GROUP_BYTES``).

Matmul precision: off the GPU (and for float32 inputs) the tiles are multiplied in float32. On
CUDA, half-precision inputs are multiplied by cuBLAS in their own dtype with float32
accumulation and output (``out_dtype``): the same exact products, never a bfloat16-rounded
logit. The gradient matmuls take float32 ``dlogits``; for half-precision inputs on CUDA they are
split into bfloat16 parts (:data:`DLOGITS_PARTS`), written as such by the Triton fold and split
by :func:`add_grad_matmul` after the torch fold.
"""

from __future__ import annotations

import torch

from .. import kernel_config
from ..ops.linear_lse import finish_rows, merge_rows, merge_states
from ..ops.rows import as_rows, hidden_rows, row_chunks
from ..ops.scoring import (
    ScoringOptions,
    scoring_backward_out,
    split_backward_launcher,
    tile_forward_launcher,
)
from .split_matmuls import (
    DLOGITS_PARTS,
    HALF,
    add_grad_matmul,
    add_split_grad_matmuls,
    operand_parts,
    stacked_rows_parts,
)
from .torch_scoring import (
    _tile_state,
    _torch_chunk_backward,
)

# CPU tile: 1024 rows x 2048 vocabulary entries, 8 MiB of float32 logits, whatever N and V are
# (the backward's fold adds two more temporaries): many rows share each packed weight slice,
# which stays in the cache. Scoring at V = 32000, N = 1024, 1 thread, H = 896, two runs each
# against CCE in the benchmark harness: ours took 1.03x and 0.96x of CCE's time, where 512 x
# 8192 took 1.21x and 0.95x (and 256 x 4096 1.09x in two earlier runs).
TILE_ROWS = 1024
TILE_VOCAB = 2048
# torch.mm / addmm(..., out_dtype=torch.float32) from half-precision operands (torch >= 2.8, CUDA).
HAS_OUT_DTYPE = tuple(int(part) for part in torch.__version__.split(".")[:2]) >= (2, 8)


def tile_shape(device: torch.device) -> tuple[int, int]:
    return kernel_config.LINEAR_GPU_BLAS_TILE if device.type == "cuda" else (TILE_ROWS, TILE_VOCAB)


def may_mask(weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether a logit may be ``-inf`` (a masked vocabulary entry), which the torch fold must
    clamp: a ``-inf`` in the bias, or an infinity in the weight (``-inf`` times a positive
    hidden value, ``+inf`` times a negative one). The weight's extremes are one reduction
    (about 13 ms at V = 32,000, H = 896 on one CPU thread, a fifth of ``isinf(...).any()``)."""
    if bias is not None and bool(torch.isneginf(bias).any()):
        return True
    if not weight.numel():
        return False
    low, high = torch.aminmax(weight)
    return bool((low == float("-inf")) | (high == float("inf")))


def matmul_rows(block: torch.Tensor) -> torch.Tensor:
    """A row block as the tiles' matmul operand: its own dtype where cuBLAS multiplies it with
    float32 output (half precision on CUDA, torch >= 2.8), else float32."""
    return block if HAS_OUT_DTYPE and block.is_cuda and block.dtype in HALF else block.float()


def logit_block(rows, weight_tile, bias, start, stop, out=None):
    """``rows @ weight_tile.T + bias[start:stop]`` in float32, ``[rows, stop - start]``, written
    into ``out`` when given (a buffer reused across blocks is not page-faulted in again)."""
    if not (rows.is_cuda and rows.dtype in HALF):  # exact float32 products instead
        rows, weight_tile = rows.float(), weight_tile.float()
        if bias is None:
            return torch.mm(rows, weight_tile.T, out=out)
        return torch.addmm(bias[start:stop].float(), rows, weight_tile.T, out=out)
    if bias is None:
        return torch.mm(rows, weight_tile.T, out_dtype=torch.float32, out=out)
    return torch.addmm(
        bias[start:stop].float(), rows, weight_tile.T, out_dtype=torch.float32, out=out
    )


def _fold(state, logits, tokens, start: int, masked: bool, inv_temperature: float):
    """``state`` (None before the first tile) with one more vocabulary tile folded in."""
    tile = _tile_state(logits, tokens, start, masked, inv_temperature)
    if state is None:
        return tile
    merged = merge_states(torch.stack([torch.stack(state[:3]), torch.stack(tile[:3])]),
                          inv_temperature)  # fmt: skip
    in_tile = (tokens >= start) & (tokens < start + logits.shape[-1])
    return (*merged, torch.where(in_tile, tile[3], state[3]))


def _tile_buffer(n_rows: int, vocab_size: int, device) -> torch.Tensor:
    """One float32 buffer for every logits tile of a call (a fresh tile above glibc's mmap
    threshold would be page-faulted in each time)."""
    tile_rows, tile_vocab = tile_shape(device)
    return torch.empty(min(n_rows, tile_rows) * min(vocab_size, tile_vocab), device=device)


def _tile_of(buffer: torch.Tensor, rows: int, width: int) -> torch.Tensor:
    """A contiguous ``[rows, width]`` view at the start of ``buffer``."""
    return buffer[: rows * width].view(rows, width)


def _rows_forward(rows, tokens, weight, bias, masked: bool, options, buffer):
    """Online log-sum-exp over vocabulary tiles: ``(logprobs, entropy, normaliser [2, rows])``.

    ``masked``: some logit may be ``-inf`` (:func:`may_mask`), so ``z`` must be clamped;
    ``buffer``: from :func:`_tile_buffer`.
    """
    vocab_size = weight.shape[0]
    tile_vocab = tile_shape(rows.device)[1]
    inv_temperature = 1.0 / options.temperature
    state = None
    for start in range(0, vocab_size, tile_vocab):
        stop = min(start + tile_vocab, vocab_size)
        logits = logit_block(rows, weight[start:stop], bias, start, stop,
                             out=_tile_of(buffer, rows.shape[0], stop - start))  # fmt: skip
        state = _fold(state, logits, tokens, start, masked, inv_temperature)
    ignored = tokens == options.ignore_index
    return finish_rows(*state, ignored, inv_temperature)


def _launcher(cache: dict, make, tile, *args):
    """``make(tile, *args)``, a launcher prepared once per tile shape and kept in ``cache``."""
    if tile.shape not in cache:
        cache[tile.shape] = make(tile, *args)
    return cache[tile.shape]


def _rows_forward_triton(rows, tokens, weight, bias, options, buffer):
    """:func:`_rows_forward` with the scoring forward kernel reducing each tile in one pass.

    Per tile: one matmul and one kernel writing the tile's online state ``(m, s, w)`` and the
    rows' token logits into row ``t`` of ``[tiles, ...]`` buffers; one kernel merges the tiles'
    states at the end (:func:`merge_rows`). Few launches per tile, so the host keeps ahead of
    the device. The per-tile states are 16 bytes per row and tile (1.2 MiB at 4,096 rows and
    V = 151,936 in tiles of 8,192), beside the one logits tile.
    """
    vocab_size, n_rows = weight.shape[0], rows.shape[0]
    tile_vocab = tile_shape(rows.device)[1]
    starts = range(0, vocab_size, tile_vocab)
    state = torch.empty((len(starts), 3, n_rows), device=rows.device)
    token_logit = torch.empty((len(starts), n_rows), device=rows.device)
    # Each token's column in its own tile, used as a placeholder index in every other tile (the
    # merge reads the token's logit from its own tile only); clamped, so that no index is out
    # of bounds, whatever the token.
    local = (tokens - (tokens // tile_vocab).clamp(0, len(starts) - 1) * tile_vocab).clamp(
        0, tile_vocab - 1
    )
    scoring = ScoringOptions(options.temperature, -1)
    launchers = {}  # by tile shape: the last tile may be narrower
    for tile, start in enumerate(starts):
        stop = min(start + tile_vocab, vocab_size)
        logits = logit_block(rows, weight[start:stop], bias, start, stop,
                             out=_tile_of(buffer, n_rows, stop - start))  # fmt: skip
        tile_tokens = local if stop - start == tile_vocab else local.clamp_max(stop - start - 1)
        launch = _launcher(launchers, tile_forward_launcher, logits, tile_tokens, scoring)
        launch(logits, tile_tokens, token_logit[tile], state[tile])
    return merge_rows(state, token_logit, tokens, vocab_size, tile_vocab,
                      1.0 / options.temperature, options.ignore_index)  # fmt: skip


def torch_linear_forward(hidden, weight, bias, tokens, options, fold="torch"):
    """``(logprobs, entropy, normaliser [2, rows])`` of validated arguments; ``fold``: what
    reduces a logits tile, ``"torch"`` (the torch passes) or ``"triton"`` (the scoring forward
    kernel)."""
    hidden, tokens, layout, tokens_layout = hidden_rows(hidden, tokens)
    rows = as_rows(hidden, layout, hidden.shape[-1])
    token_rows = as_rows(tokens, tokens_layout, None)
    shape = (layout.n_outer, layout.n_inner)
    logprobs = torch.empty(shape, device=hidden.device)
    entropy = torch.empty(shape, device=hidden.device)
    normaliser = torch.empty((2, *shape), device=hidden.device)
    # Only the torch fold clamps -inf logits (asking waits for the device).
    masked = fold == "torch" and may_mask(weight, bias)
    buffer = _tile_buffer(layout.n_rows, weight.shape[0], hidden.device)
    for outer, inner in row_chunks(layout, tile_shape(hidden.device)[0]):
        block = rows[outer, inner]
        chunk_shape = block.shape[:-1]
        block_rows = matmul_rows(block.reshape(-1, block.shape[-1]))
        block_tokens = token_rows[outer, inner].reshape(-1)
        if fold == "triton":
            outputs = _rows_forward_triton(block_rows, block_tokens, weight, bias, options, buffer)
        else:
            outputs = _rows_forward(block_rows, block_tokens, weight, bias, masked, options, buffer)
        logprobs[outer, inner] = outputs[0].view(chunk_shape)
        entropy[outer, inner] = outputs[1].view(chunk_shape)
        normaliser[:, outer, inner] = outputs[2].view(2, *chunk_shape)
    return logprobs.view(tokens.shape), entropy.view(tokens.shape), normaliser.view(2, -1)


def _block_operands(rows, tokens, weight_size, grad_weight_wanted, parts, tile_vocab, ignore):
    """One row block's operands for every vocabulary tile: ``(rows, rows_parts, local, parts)``.

    ``rows``: the matmul operand (:func:`matmul_rows`), ignored rows zeroed when the weight
    gradient is wanted (ignored rows take no part in it, even non-finite ones; masked
    unconditionally, since asking whether any row is ignored would wait for the device);
    ``rows_parts``: for a fold writing ``parts`` bfloat16 parts of ``dlogits`` (0: float32
    ``dlogits``), :func:`stacked_rows_parts`; ``local``: ``[tiles, rows]`` tile-local tokens,
    -1 for ignored rows and the tile's width for a token outside the tile; and ``parts``."""
    rows = matmul_rows(rows)
    ignored = tokens == ignore
    if grad_weight_wanted:
        rows = rows.masked_fill(ignored.unsqueeze(-1), 0.0)
    rows_parts = (None, None)
    if parts and grad_weight_wanted:
        rows_parts = stacked_rows_parts(rows, parts)
    starts = torch.arange(0, weight_size, tile_vocab, device=rows.device).unsqueeze(-1)
    widths = (weight_size - starts).clamp_max(tile_vocab)
    local = tokens - starts
    local = torch.where((local >= 0) & (local < widths), local, widths).masked_fill_(ignored, -1)
    return rows, rows_parts, local, parts


def _tile_gradients(block, weights, bias, start, stop, accumulators, scoring, first, launchers):
    """Add one row block's gradients over one vocabulary tile to ``accumulators`` ``(dhidden
    rows, dweight tile, dbias tile)``, float32 (``first``: the weight tile's first block, which
    overwrites it). ``weights``: the weight tile and, for a split fold, its
    :func:`operand_parts` (formed once per tile); ``launchers``: the split fold's launchers by
    tile shape, filled on first use.

    The Triton fold of half-precision rows writes ``dlogits`` as bfloat16 parts (three, or the
    first alone in the rounded mode; :func:`split_backward_launcher`), which bfloat16
    matmuls take as they are (float16 weights and rows split exactly into bfloat16 parts too);
    the torch fold leaves float32 ``dlogits`` that :func:`add_grad_matmul` splits (bfloat16) or
    multiplies in float32 (float16)."""
    (rows, rows_parts, local, n_parts), tile, saved, grads = block
    weight_tile, weight_parts = weights
    grad_rows, grad_weight, grad_bias = accumulators
    tile_tokens = local[tile]
    grad = logit_block(rows, weight_tile, bias, start, stop)
    if n_parts:
        parts = grad.new_empty((n_parts, *grad.shape), dtype=torch.bfloat16)
        launch = _launcher(launchers, split_backward_launcher, grad, tile_tokens, n_parts, scoring)
        launch(grad, tile_tokens, saved, grads, parts)
        add_split_grad_matmuls(accumulators, parts, weight_parts, rows_parts, first)
        return
    if scoring.backend == "triton":  # the scoring backward kernel, in place on the tile
        scoring_backward_out(grad, tile_tokens, *saved, *grads, scoring.temperature, -1,
                             "triton", grad)  # fmt: skip
    else:
        grad = _torch_chunk_backward(grad, tile_tokens, *saved, *grads, scoring, grad)
    if grad_rows is not None:
        add_grad_matmul(grad_rows, grad, weight_tile)
    if grad_weight is not None:
        add_grad_matmul(grad_weight, grad.T, rows, first)
    if grad_bias is not None:
        grad_bias += grad.sum(0)


def torch_linear_backward(
    hidden, weight, bias, tokens, normaliser, entropy, grads, needs, options, fold="torch"
):
    """``(dhidden in hidden's dtype, dweight in weight's dtype, dbias float32)``, None where not
    needed.

    ``fold``: what turns a logits tile into ``dlogits``: ``"torch"`` (the torch twin),
    ``"triton"`` (the scoring backward kernel: in place on a float32 tile, as bfloat16 high +
    low parts for half-precision rows) or ``"triton-rounded"`` (half-precision rows: ``dlogits``
    rounded to bfloat16, the high part alone, as the peers do: outside the spec's gradient
    tolerance, for ``kernel_config.LINEAR_GPU_BACKWARD = "blas-bf16-dlogits"`` only).

    The vocabulary tiles are the outer loop: each weight tile's gradient is accumulated over all
    row blocks in a float32 tile and rounded once into the weight's dtype, so no float32
    ``[V, H]`` accumulator exists (1.2 GiB at V = 151,936, H = 2,048). The hidden gradient is
    accumulated in float32 ``[N, H]`` across the tiles instead (rows, not vocabulary): with
    the rows' operands of one block at a time, the memory that grows with N (twice a half-
    precision hidden gradient)."""
    scoring = ScoringOptions(options.temperature, -1, "torch" if fold == "torch" else "triton")
    hidden, tokens, layout, tokens_layout = hidden_rows(hidden, tokens)
    size, vocab_size = hidden.shape[-1], weight.shape[0]
    rows = as_rows(hidden, layout, size)
    token_rows = as_rows(tokens, tokens_layout, None)
    shape = (layout.n_outer, layout.n_inner)
    device = hidden.device
    tile_rows, tile_vocab = tile_shape(device)
    grad_rows = torch.zeros((*shape, size), device=device) if needs[0] else None
    grad_weight = weight.new_empty(weight.shape) if needs[1] else None
    grad_bias = torch.zeros(vocab_size, device=device) if needs[2] else None
    # The weight tile's float32 accumulator, unless the weight gradient is float32 itself.
    weight_acc = None
    if needs[1] and weight.dtype != torch.float32:
        weight_acc = torch.empty((min(vocab_size, tile_vocab), size), device=device)

    def rows_of(vector, outer, inner):
        return None if vector is None else vector.reshape(shape)[outer, inner].reshape(-1)

    operand_dtype = matmul_rows(hidden[:0]).dtype
    n_parts = 0
    if operand_dtype in HALF:
        n_parts = {"triton": DLOGITS_PARTS, "triton-rounded": 1}.get(fold, 0)
    blocks, launchers = [], {}
    for outer, inner in row_chunks(layout, tile_rows):
        block_rows = rows[outer, inner].reshape(-1, size)
        block_tokens = token_rows[outer, inner].reshape(-1)
        saved = (
            normaliser.view(2, *shape)[:, outer, inner].reshape(2, -1),
            rows_of(entropy, outer, inner),
        )
        block_grads = tuple(rows_of(grad, outer, inner) for grad in grads)
        block_grad_rows = None if grad_rows is None else grad_rows[outer, inner].view(-1, size)
        blocks.append(((block_rows, block_tokens), saved, block_grads, block_grad_rows))

    def operands_of(block_rows, block_tokens):
        return _block_operands(block_rows, block_tokens, vocab_size, needs[1], n_parts,
                               tile_vocab, options.ignore_index)  # fmt: skip

    # One block's operands (its rows in the matmul dtype, masked, and their bfloat16 parts) at a
    # time, so that they never grow with N: kept across the tiles when there is one block, built
    # again for each tile otherwise.
    kept = operands_of(*blocks[0][0]) if len(blocks) == 1 else None
    for tile, start in enumerate(range(0, vocab_size, tile_vocab)):
        stop = min(start + tile_vocab, vocab_size)
        weight_tile = weight[start:stop]
        if operand_dtype == torch.float32:
            weight_tile = weight_tile.float()
        weights = (weight_tile, operand_parts(weight_tile) if n_parts else None)
        tile_grad_weight = None
        if needs[1]:
            tile_grad_weight = (
                grad_weight[start:stop] if weight_acc is None else weight_acc[: stop - start]
            )
        tile_grad_bias = None if grad_bias is None else grad_bias[start:stop]
        for index, (block, saved, block_grads, block_grad_rows) in enumerate(blocks):
            operands = kept if kept is not None else operands_of(*block)
            accumulators = (block_grad_rows, tile_grad_weight, tile_grad_bias)
            _tile_gradients((operands, tile, saved, block_grads), weights, bias, start, stop,
                            accumulators, scoring, index == 0, launchers)  # fmt: skip
        if weight_acc is not None and blocks:
            grad_weight[start:stop] = tile_grad_weight  # rounded once
    if grad_weight is not None and not blocks:
        grad_weight.zero_()
    grad_hidden = None
    if grad_rows is not None:
        grad_hidden = grad_rows.to(hidden.dtype)
    return grad_hidden, grad_weight, grad_bias
