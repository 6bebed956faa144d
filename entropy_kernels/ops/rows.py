"""The rows of a ``[..., V]`` tensor: two leading strides, so views are read in place.

A launcher and its torch twin both see the logits as ``[n_outer, n_inner, V]`` with strides
``(outer, inner, 1)`` (:class:`RowLayout`): contiguous logits as well as views such as
``logits[:, :-1]`` need no copy. Computed once per op call by :func:`row_layouts`.
"""

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RowLayout:
    """``[..., V]`` seen as ``[n_outer, n_inner, V]`` with strides ``(outer, inner, 1)``."""

    n_outer: int
    n_inner: int
    stride_outer: int
    stride_inner: int

    @property
    def n_rows(self) -> int:
        return self.n_outer * self.n_inner


def _collapsed_stride(shape: tuple[int, ...], strides: tuple[int, ...]) -> int | None:
    """Stride of ``shape`` collapsed into one dimension, or None if it does not collapse."""
    dims = [(size, stride) for size, stride in zip(shape, strides, strict=True) if size != 1]
    for (_, outer_stride), (inner_size, inner_stride) in zip(dims, dims[1:], strict=False):
        if outer_stride != inner_stride * inner_size:
            return None
    return dims[-1][1] if dims else 0


def _two_level_layouts(tensor: torch.Tensor, lead: int):
    """Every way to split the first ``lead`` dimensions into (outer, inner) collapsible groups."""
    shape, strides = tuple(tensor.shape[:lead]), tuple(tensor.stride()[:lead])
    for split in range(lead + 1):
        outer = _collapsed_stride(shape[:split], strides[:split])
        inner = _collapsed_stride(shape[split:], strides[split:])
        if outer is not None and inner is not None:
            yield split, RowLayout(math.prod(shape[:split]), math.prod(shape[split:]), outer, inner)


def row_layouts(logits: torch.Tensor, tokens: torch.Tensor):
    """Layouts of logits and tokens over the same (outer, inner) split of the leading dims.

    Returns ``(logits, tokens, logits_layout, tokens_layout)``. Tokens are copied to a contiguous
    tensor when no common split exists (a few bytes per row); logits are copied only in the rare
    case that their leading dimensions need more than two strides (documented in the README).
    """
    lead = logits.dim() - 1
    logits_layouts = dict(_two_level_layouts(logits, lead))
    if not logits_layouts:
        return row_layouts(logits.contiguous(), tokens)
    token_layouts = dict(_two_level_layouts(tokens, lead))
    common = [split for split in logits_layouts if split in token_layouts]
    if not common:
        tokens = tokens.contiguous()  # every split of a contiguous tensor collapses
        token_layouts = dict(_two_level_layouts(tokens, lead))
        common = list(logits_layouts)
    return logits, tokens, logits_layouts[common[0]], token_layouts[common[0]]


def as_rows(tensor: torch.Tensor, layout: RowLayout, vocab_size: int | None) -> torch.Tensor:
    """The ``[n_outer, n_inner(, V)]`` strided view of ``tensor`` described by ``layout``."""
    size, stride = (layout.n_outer, layout.n_inner), (layout.stride_outer, layout.stride_inner)
    if vocab_size is not None:
        size, stride = (*size, vocab_size), (*stride, 1)
    return tensor.as_strided(size, stride, tensor.storage_offset())


def row_chunks(layout: RowLayout, rows_per_chunk: int):
    """(outer, inner) index slices covering all rows, each at most ``rows_per_chunk`` rows."""
    if layout.n_inner <= rows_per_chunk:
        step = max(1, rows_per_chunk // max(1, layout.n_inner))
        for outer in range(0, layout.n_outer, step):
            yield slice(outer, outer + step), slice(None)
    else:
        for outer in range(layout.n_outer):
            for inner in range(0, layout.n_inner, rows_per_chunk):
                yield slice(outer, outer + 1), slice(inner, inner + rows_per_chunk)


def output_rows(out: torch.Tensor, layout: RowLayout) -> tuple[torch.Tensor, RowLayout]:
    """Where an op writes its ``[..., V]`` output ``out`` over the rows of ``layout``.

    ``(out, its layout)`` when ``out`` has two leading strides over the same rows (a fresh
    tensor, or the logits themselves for an in-place gradient); otherwise a new contiguous
    tensor that :func:`copy_back` then copies into ``out`` (the rare layouts that needed a copy).
    """
    for _, candidate in _two_level_layouts(out, out.dim() - 1):
        if (candidate.n_outer, candidate.n_inner) == (layout.n_outer, layout.n_inner):
            return out, candidate
    vocab_size = out.shape[-1]
    contiguous = RowLayout(layout.n_outer, layout.n_inner, layout.n_inner * vocab_size, vocab_size)
    return torch.empty(out.shape, dtype=out.dtype, device=out.device), contiguous


def copy_back(out: torch.Tensor, target: torch.Tensor) -> None:
    """Finish an op's write: ``target`` from :func:`output_rows` into ``out``, if not ``out``."""
    if target is not out:
        out.copy_(target)


def launch_rows(vocab_size: int, *layouts: RowLayout) -> tuple[int, ...]:
    """The row arguments of a row kernel: ``n_inner, vocab_size`` and each layout's strides."""
    strides = [
        stride for layout in layouts for stride in (layout.stride_outer, layout.stride_inner)
    ]
    return (layouts[0].n_inner, vocab_size, *strides)


def hidden_rows(hidden: torch.Tensor, tokens: torch.Tensor):
    """``(hidden, tokens, hidden_layout, tokens_layout)`` over a common two-level row split.

    ``hidden`` keeps its strides (``hidden[:, :-1]`` is read in place); only a last dimension
    without unit stride is copied (``row_layouts`` assumes it).
    """
    if hidden.shape[-1] > 1 and hidden.stride(-1) != 1:
        hidden = hidden.contiguous()
    return row_layouts(hidden, tokens)
