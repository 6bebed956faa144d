"""The row kernels' prologue: which row a program scores, and its token.

Row ``r`` of the ``[D0 * D1, V]`` problem lives at ``(r // D1) * stride_outer + (r % D1) *
stride_inner`` (:class:`entropy_kernels.ops.rows.RowLayout` on the host side).
"""

import triton
import triton.language as tl


@triton.jit
def row_coordinates(n_inner):
    """This program's row and its ``(outer, inner)`` coordinates (int64)."""
    row = tl.program_id(0).to(tl.int64)
    outer = row // n_inner
    inner = row - outer * n_inner
    return row, outer, inner


@triton.jit
def load_token(tokens_ptr, outer, inner, stride_outer, stride_inner):
    """The row's token (int64), read through the tokens' two leading strides."""
    token = tl.load(tokens_ptr + outer * stride_outer + inner * stride_inner)
    return token.to(tl.int64)
