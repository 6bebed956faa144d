"""Log-probs and entropy in one pass over the vocabulary, with a fused backward: the public
function. Its op (Triton launchers and custom ops) is :mod:`entropy_kernels.ops.scoring`, the
torch backend :mod:`entropy_kernels.backends.torch_scoring`.

Two backends compute the same thing:

- ``"triton"``: :mod:`entropy_kernels.kernels.scoring_fwd` / ``scoring_bwd``, one program per
  token row; only ``[rows]`` float32 vectors (log-prob, entropy, row max, log-normaliser)
  are stored.
- ``"torch"``: the same maths in chunks of rows, so the float32 temporaries are bounded by the
  chunk, never ``[..., V]``.

Both read the logits through two leading strides (:class:`~entropy_kernels.ops.rows.RowLayout`),
so views such as ``logits[:, :-1]`` are used in place.
"""

import torch

from ._validation import (
    IGNORE_INDEX,
    check_ignore_index,
    check_logits_and_tokens,
    check_positive_float,
    check_values,
    resolve_backend,
)
from .ops.scoring import ScoringOptions
from .parallel import score_shard, vocab_shard


def logprobs_and_entropy(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = IGNORE_INDEX,
    validate: bool = True,
    backend: str = "auto",
    tp_group=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token log-probabilities and full-vocabulary entropy in one pass over the logits.

    Args:
        logits: ``[..., V]`` float16 / bfloat16 / float32. The last dimension must have unit
            stride; leading dimensions may have any strides (``logits[:, :-1]`` is read in place).
        tokens: integer tensor shaped ``logits.shape[:-1]``.
        temperature: the logits are divided by it (``> 0``, default 1.0), inside the kernel.
        ignore_index: tokens equal to it get 0 for both outputs and zero gradient (default -100).
        validate: check that tokens lie in ``[0, V)`` or equal ``ignore_index`` (one host sync).
            With ``validate=False`` an out-of-range token yields NaN; nothing is read out of bounds.
        backend: ``"auto"`` (Triton on CUDA, chunked PyTorch otherwise), ``"triton"``, ``"torch"``.
        tp_group: a ``torch.distributed`` process group over which the vocabulary is sharded in
            rank order (``logits`` is this rank's ``[..., V_r]`` shard, ``tokens`` the same
            global ids on every rank); every rank gets the full-vocabulary results and its
            shard's gradient (:mod:`entropy_kernels.parallel`). None (default): not sharded.

    Returns:
        ``(logprobs, entropy)``, float32 tensors shaped like ``tokens``:
        ``log_softmax(logits / temperature)[token]`` and ``-sum p log p``. Both are differentiable
        with respect to ``logits``; the backward recomputes the probabilities from the saved
        log-sum-exp, so no ``[..., V]`` float32 tensor is ever stored. ``-inf`` logits are masked
        vocabulary entries (probability 0, no NaN); NaN or +inf logits give NaN.
    """
    check_ignore_index(ignore_index)
    tokens = check_logits_and_tokens(logits, tokens, ignore_index)
    check_positive_float("temperature", temperature)
    backend = resolve_backend(backend, logits.device)
    shard = vocab_shard(logits.shape[-1], logits.device, tp_group)
    if validate:
        check_values(tokens, shard.total, ignore_index)
    options = ScoringOptions(float(temperature), ignore_index, backend)
    return score_shard(logits, tokens, options, shard)
