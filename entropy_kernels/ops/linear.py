"""Typed launchers of the fused linear kernels (:mod:`entropy_kernels.kernels.linear_fwd`,
``linear_bwd_hidden``, ``linear_bwd_weight``): they allocate, pick the tiles, the vocabulary
splits and the gradient matmul's precision, and launch. Triton is imported at the first launch.

Arguments come validated by :mod:`entropy_kernels.linear_scoring`: ``layouts`` are the row
layouts of hidden and tokens, ``constants`` is ``(1 / T, ignore_index)``.
"""

from __future__ import annotations

import functools

import torch

from ..kernel_config import TileConfig, is_overridden, tile_config
from .linear_lse import merge_rows

# Programs per SM a launch aims for when it splits the vocabulary between programs.
PROGRAMS_PER_SM = 2
# Under the interpreter: a small target, so that test shapes take several splits.
INTERPRETER_PROGRAMS = 4
# The hidden gradient's splits each hold a float32 [rows, H] part: at most this many, and at most
# this many bytes of parts beyond the first (the gradient's own size), so that neither a few rows
# nor many rows get a large buffer.
MAX_HIDDEN_SPLITS = 8
HIDDEN_SPLIT_BYTES = 256 * 2**20


@functools.cache
def _target_programs(device: torch.device) -> int:
    if device.type != "cuda":
        return INTERPRETER_PROGRAMS
    return PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count


def vocab_splits(
    n_row_blocks: int, vocab_size: int, block_v: int, device, most: int | None = None
) -> tuple[int, int]:
    """``(splits, tiles_per_split)``: enough vocabulary ranges that ``n_row_blocks * splits``
    programs fill the device (one range when the row blocks alone do), at most ``most``."""
    tiles = -(-vocab_size // block_v)
    wanted = max(1, min(tiles, -(-_target_programs(device) // max(n_row_blocks, 1))))
    if most is not None:
        wanted = min(wanted, most)
    tiles_per_split = -(-tiles // wanted)
    return -(-tiles // tiles_per_split), tiles_per_split


def _dot_mode(dtype: torch.dtype, device: torch.device) -> int:
    from ..kernels.linear_tiles import DOT_BF16X3, DOT_IEEE, DOT_TF32X3

    if dtype == torch.bfloat16:
        return DOT_BF16X3
    return DOT_TF32X3 if device.type == "cuda" else DOT_IEEE


def _hidden_unit(hidden: torch.Tensor, layout) -> int:
    """8 when the base pointer and both row strides allow 16-byte vector loads, else 1."""
    aligned = (
        hidden.data_ptr() % 16 == 0 and layout.stride_outer % 8 == layout.stride_inner % 8 == 0
    )
    return 8 if aligned else 1


def _prepare(hidden, weight, bias, tokens, layouts, constants):
    """``(inputs, args, flags)`` every fused linear kernel takes: the ``(hidden, weight, bias,
    tokens)`` pointers (a weight with unit last stride, a dense bias: the kernels read
    ``bias_ptr + v``), the arguments from ``n_rows`` to ``ignore_index``, and the flags."""
    layout, tokens_layout = layouts
    weight = weight if weight.stride(-1) == 1 else weight.contiguous()
    bias = None if bias is None else bias.contiguous()
    unit = _hidden_unit(hidden, layout)
    args = (
        layout.n_rows,
        layout.n_inner,
        weight.shape[0],
        weight.shape[1],
        layout.stride_outer // unit,
        layout.stride_inner // unit,
        weight.stride(0),
        tokens_layout.stride_outer,
        tokens_layout.stride_inner,
        *constants,
    )
    flags = {
        "HAS_BIAS": bias is not None,
        "CAST_F32": hidden.dtype != torch.float32 and hidden.device.type != "cuda",
        "HIDDEN_UNIT": unit,
    }
    return (hidden, weight, bias, tokens), args, flags


def _gradient_inputs(hidden, saved, grads):
    """``(pointers, flags)`` of the two gradient kernels: the saved row statistics and the
    incoming gradients (None where unused), and the gradient matmul's precision."""
    normaliser, entropy = saved
    pointers = (normaliser[0], normaliser[1], entropy, grads[0], grads[1])
    flags = {
        "DOT": _dot_mode(hidden.dtype, hidden.device),
        "HAS_GRAD_LOGP": grads[0] is not None,
        "HAS_GRAD_ENTROPY": grads[1] is not None,
    }
    return pointers, flags


# The tile each (kernel, device, dtype) was found to fit in, after a launch ran out of resources.
_fitted: dict[tuple, TileConfig] = {}


def _launch_fitting(kernel: str, hidden: torch.Tensor, launch):
    """``launch(tile)`` with the kernel's tile for hidden's device, shrunk by
    :meth:`TileConfig.smaller` while the device lacks the shared memory or registers for it: the
    defaults are sized for an H100 / H200, and float32 operands take twice the space. A tile
    set by :func:`entropy_kernels.kernel_config.override` is launched as given."""
    from triton.runtime.errors import OutOfResources

    if is_overridden(kernel):
        return launch(tile_config(kernel, hidden.device))
    key = (kernel, hidden.device, hidden.dtype)
    tile = _fitted.get(key) or tile_config(kernel, hidden.device)
    while True:
        try:
            return launch(tile)
        except OutOfResources:
            smaller = tile.smaller()
            if smaller is None:
                raise
            _fitted[key] = tile = smaller


def linear_forward(hidden, weight, bias, tokens, layouts, constants):
    """``(logprobs [rows], entropy [rows], normaliser [2, rows])`` of validated arguments."""
    from ..kernels.linear_fwd import linear_fwd_kernel

    n_rows = layouts[0].n_rows
    inv_temperature, ignore_index = constants
    inputs, args, flags = _prepare(hidden, weight, bias, tokens, layouts, constants)

    def launch(tile: TileConfig):
        n_row_blocks = -(-n_rows // tile.block_n)
        splits, tiles_per_split = vocab_splits(
            n_row_blocks, weight.shape[0], tile.block_v, hidden.device
        )
        state = torch.empty((splits, 3, n_rows), dtype=torch.float32, device=hidden.device)
        token_logit = torch.full((n_rows,), float("nan"), device=hidden.device)
        if n_rows > 0:
            linear_fwd_kernel[(n_row_blocks, splits)](
                *inputs,
                state,
                token_logit,
                *args,
                tiles_per_split,
                **flags,
                **tile.launch_options(),
            )
        return state, token_logit

    state, token_logit = _launch_fitting("linear_fwd", hidden, launch)
    vocab_size = weight.shape[0]
    return merge_rows(state, token_logit, tokens.reshape(-1), vocab_size, vocab_size,
                      inv_temperature, ignore_index)  # fmt: skip


def linear_grad_hidden(hidden, weight, bias, tokens, layouts, saved, grads, constants):
    """``dhidden`` as a float32 ``[rows, H]`` tensor (rows in the layout's order)."""
    from ..kernels.linear_bwd_hidden import linear_bwd_hidden_kernel

    n_rows, size, vocab_size = layouts[0].n_rows, hidden.shape[-1], weight.shape[0]
    inputs, args, flags = _prepare(hidden, weight, bias, tokens, layouts, constants)
    pointers, gradient_flags = _gradient_inputs(hidden, saved, grads)

    def launch(tile: TileConfig):
        n_row_blocks = -(-n_rows // tile.block_n)
        most = min(MAX_HIDDEN_SPLITS, 1 + HIDDEN_SPLIT_BYTES // max(4 * n_rows * size, 1))
        splits, tiles_per_split = vocab_splits(
            n_row_blocks, vocab_size, tile.block_v, hidden.device, most
        )
        partial = torch.zeros((splits, n_rows, size), dtype=torch.float32, device=hidden.device)
        if n_rows > 0:
            linear_bwd_hidden_kernel[(n_row_blocks, splits)](
                partial,
                *inputs,
                *pointers,
                *args,
                tiles_per_split,
                **flags,
                **gradient_flags,
                **tile.launch_options(),
            )
        return partial

    partial = _launch_fitting("linear_bwd_hidden", hidden, launch)
    # The splits' parts summed in a fixed order: deterministic.
    return partial[0] if partial.shape[0] == 1 else partial.sum(0)


def linear_grad_weight(hidden, weight, bias, tokens, layouts, saved, grads, constants, needs):
    """``(dweight [V, H], dbias [V])`` in float32; each None unless ``needs`` asks for it."""
    from ..kernels.linear_bwd_weight import linear_bwd_weight_kernel

    needs_weight, needs_bias = needs
    vocab_size = weight.shape[0]
    inputs, args, flags = _prepare(hidden, weight, bias, tokens, layouts, constants)
    pointers, gradient_flags = _gradient_inputs(hidden, saved, grads)

    def launch(tile: TileConfig):
        grad_weight = grad_bias = None
        if needs_weight:
            grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        if needs_bias:
            grad_bias = torch.empty(vocab_size, dtype=torch.float32, device=weight.device)
        linear_bwd_weight_kernel[(-(-vocab_size // tile.block_v),)](
            grad_weight,
            grad_bias,
            *inputs,
            *pointers,
            *args,
            NEEDS_WEIGHT=needs_weight,
            NEEDS_BIAS=needs_bias,
            **flags,
            **gradient_flags,
            **tile.launch_options(),
        )
        return grad_weight, grad_bias

    return _launch_fitting("linear_bwd_weight", hidden, launch)
