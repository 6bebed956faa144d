"""verl adapter: the scoring drop-ins that :func:`entropy_kernels.integrations.verl.install`
puts in place of verl's.

- :func:`logprobs_from_logits` / :func:`entropy_from_logits` (``verl.utils.torch_functional``)
  and the shared pass of the FSDP engine's ``prepare_model_outputs`` (entropy and log-probs of
  the same logits from one fused call).
- :class:`FusedLinearForPPO` / :func:`linear_cross_entropy` (verl's ``use_fused_kernels``
  scoring from the hidden states and the LM head) and Megatron's vocabulary-parallel
  :func:`vocab_parallel_entropy` / :func:`vocab_parallel_entropy_with_chunking` /
  :func:`vocab_parallel_log_probs_from_logits`, with the module attributes they replace.

Part of :mod:`entropy_kernels.integrations.verl`, which re-exports the public names (import
them from there) and applies the patches. Importing this module never imports verl.
"""

from __future__ import annotations

import contextvars

import torch

import entropy_kernels

# ---------------------------------------------------------------------------------------------
# Drop-ins for verl.utils.torch_functional


def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor, inplace_backward=True):
    """Drop-in for ``verl.utils.torch_functional.logprobs_from_logits``: float32 ``log_softmax``
    at ``labels``, shaped like ``labels``, by the fused kernel. ``inplace_backward`` is accepted
    for compatibility; the fused backward stores no ``[..., V]`` float32 tensor either way."""
    return entropy_kernels.logprobs_and_entropy(logits, labels)[0]


def entropy_from_logits(logits: torch.Tensor, chunk_size: int | None = None) -> torch.Tensor:
    """Drop-in for ``entropy_from_logits`` and ``entropy_from_logits_with_chunking`` of
    ``verl.utils.torch_functional``: float32 entropy ``[...]`` of ``softmax(logits)``, by the
    fused kernel (memory-bounded, so ``chunk_size`` is ignored)."""
    tokens = torch.zeros(logits.shape[:-1], dtype=torch.long, device=logits.device)
    return entropy_kernels.logprobs_and_entropy(logits, tokens, validate=False)[1]


# ---------------------------------------------------------------------------------------------
# Fused scoring in the FSDP engine

# The shared pass of the prepare_model_outputs call in progress.
_SHARED_PASS: contextvars.ContextVar[_SharedPass | None] = contextvars.ContextVar(
    "entropy_kernels_verl_shared_pass", default=None
)


class _SharedPass:
    """verl asks for the entropy, then for the log-probs of the same logits: the entropy call
    runs the fused kernel with the labels and keeps the log-probs for the second call."""

    def __init__(self, labels: torch.Tensor | None) -> None:
        self.labels = labels
        self._logits = self._logprobs = None

    def entropy(self, logits: torch.Tensor, chunk_size: int | None = None) -> torch.Tensor:
        if self.labels is None or self.labels.shape != logits.shape[:-1]:
            return entropy_from_logits(logits)
        logprobs, entropy = entropy_kernels.logprobs_and_entropy(logits, self.labels)
        self._logits, self._logprobs = logits, logprobs
        return entropy

    def take_logprobs(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor | None:
        if logits is not self._logits or labels is not self.labels:
            return None
        logprobs, self._logits, self._logprobs = self._logprobs, None, None
        return logprobs


def _logprobs_of_shared_pass(logits, labels, inplace_backward=True):
    shared = _SHARED_PASS.get()
    logprobs = None if shared is None else shared.take_logprobs(logits, labels)
    return logprobs if logprobs is not None else logprobs_from_logits(logits, labels)


# ---------------------------------------------------------------------------------------------
# Fused linear scoring (use_fused_kernels=True) and Megatron vocabulary-parallel scoring


class FusedLinearForPPO(torch.nn.Module):
    """Drop-in for ``verl.utils.experimental.torch_functional.FusedLinearForPPO`` (the
    ``use_fused_kernels`` forward of verl's HF models, ``fused_kernels_backend`` ``"torch"`` or
    ``"liger"``), by :func:`entropy_kernels.linear_logprobs_and_entropy`: log-probs and entropy
    of ``hidden_states @ vocab_weights.T / temperature`` without forming the logits.

    Same constructor and ``forward`` signature; ``chunk_size`` is accepted and unused (the
    kernel's memory does not grow with the tokens). Both outputs are float32 (verl's torch
    implementation returns its entropy in the hidden states' dtype, after computing it in
    float32). ``vocab_weights`` may be an FSDP2 ``DTensor`` (see :mod:`entropy_kernels.weights`).
    """

    def __init__(self, chunk_size: int = 512, impl_backend: str = "torch") -> None:
        super().__init__()
        if impl_backend not in ("torch", "liger"):
            raise ValueError(
                f"Unsupported FusedLinearForPPO backend: {impl_backend}. Choose 'torch' or 'liger'."
            )
        self.chunk_size = chunk_size
        self.impl_backend = impl_backend

    def forward(self, hidden_states, vocab_weights, input_ids, temperature=1.0):
        return entropy_kernels.linear_logprobs_and_entropy(
            hidden_states, vocab_weights, input_ids.long(), temperature=float(temperature)
        )


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 1.0,
    reduction: str = "none",
    dist_process_group=None,
):
    """Drop-in for ``verl.utils.kernel.linear_cross_entropy.linear_cross_entropy`` (the
    ``fused_kernels_backend="triton"`` forward of verl's HF models, and the fused forward of
    its Megatron models): ``(logprobs, entropy)`` of ``hidden @ weight.T / temperature``,
    flattened to ``[N]`` as verl returns them, by the fused linear op.

    ``reduction`` ``"sum"`` / ``"mean"`` reduce the log-probs (the entropy stays per token), as
    verl's kernel does. With ``dist_process_group`` the vocabulary is sharded over the group
    (``weight`` holds this rank's rows) and, as in verl's kernel, ``hidden``'s gradient is this
    shard's part (Megatron's sequence-parallel gather sums the parts in its backward).
    """
    from entropy_kernels.linear_scoring import check_linear_inputs, linear_options
    from entropy_kernels.parallel import linear_score_shard
    from entropy_kernels.weights import plain_linear_weights

    if reduction not in ("none", "sum", "mean"):
        raise ValueError(f"reduction must be 'none', 'sum' or 'mean', got {reduction!r}")
    hidden = hidden.reshape(-1, hidden.shape[-1])
    labels = labels.reshape(-1).long()
    if dist_process_group is None:
        logprobs, entropy = entropy_kernels.linear_logprobs_and_entropy(
            hidden, weight, labels, temperature=float(temperature)
        )
    else:
        weight, _ = plain_linear_weights(hidden, weight, None, dist_process_group)
        labels = check_linear_inputs(hidden, weight, None, labels)
        options = linear_options(
            hidden, weight, labels, float(temperature), -100, True, "auto", dist_process_group
        )
        logprobs, entropy = linear_score_shard(
            hidden, weight, None, labels, options, sum_hidden_grad=False
        )
    if reduction == "sum":
        logprobs = logprobs.sum()
    elif reduction == "mean":
        logprobs = logprobs.mean()
    return logprobs, entropy


def _megatron_tp_group(tp_group):
    if tp_group is not None:
        return tp_group
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_group()


def vocab_parallel_entropy(vocab_parallel_logits: torch.Tensor, tp_group=None) -> torch.Tensor:
    """Drop-in for ``verl.utils.megatron.tensor_parallel.vocab_parallel_entropy``: float32
    entropy ``[...]`` of logits whose vocabulary is sharded over Megatron's tensor-parallel
    group (or ``tp_group``), by :func:`entropy_kernels.logprobs_and_entropy` with ``tp_group``
    (all-reduces of ``O(N)`` floats). The logits are not modified."""
    logits = vocab_parallel_logits
    tokens = torch.zeros(logits.shape[:-1], dtype=torch.long, device=logits.device)
    group = _megatron_tp_group(tp_group)
    return entropy_kernels.logprobs_and_entropy(logits, tokens, validate=False, tp_group=group)[1]


def vocab_parallel_entropy_with_chunking(
    vocab_parallel_logits: torch.Tensor, chunk_size: int = 2048, tp_group=None
) -> torch.Tensor:
    """Drop-in for ``vocab_parallel_entropy_with_chunking``: :func:`vocab_parallel_entropy` (the
    kernel is memory-bounded, so ``chunk_size`` is ignored)."""
    return vocab_parallel_entropy(vocab_parallel_logits, tp_group)


def vocab_parallel_log_probs_from_logits(logits, labels, tp_group=None) -> torch.Tensor:
    """Drop-in for ``verl.utils.megatron.tensor_parallel.vocab_parallel_log_probs_from_logits``
    (Megatron's ``-vocab_parallel_cross_entropy``): float32 log-probs of the global ``labels``
    under vocabulary-sharded logits, by :func:`entropy_kernels.logprobs_and_entropy`."""
    group = _megatron_tp_group(tp_group)
    return entropy_kernels.logprobs_and_entropy(logits, labels.long(), tp_group=group)[0]


# Module attributes that install() points at the drop-ins above (each module is patched when
# verl imports it; modules that import a function by name are patched too).
_FUSED_LINEAR_PATCHES = {
    "verl.utils.experimental.torch_functional": {"FusedLinearForPPO": FusedLinearForPPO},
    "verl.utils.kernel.linear_cross_entropy": {"linear_cross_entropy": linear_cross_entropy},
    "verl.models.mcore.model_forward_fused": {"linear_cross_entropy": linear_cross_entropy},
    "verl.models.mcore.model_forward_1f1b_overlap": {"linear_cross_entropy": linear_cross_entropy},
}
_MEGATRON_SCORING = {
    "vocab_parallel_entropy": vocab_parallel_entropy,
    "vocab_parallel_entropy_with_chunking": vocab_parallel_entropy_with_chunking,
    "vocab_parallel_log_probs_from_logits": vocab_parallel_log_probs_from_logits,
}
_MEGATRON_PATCHES = {
    "verl.utils.megatron.tensor_parallel": _MEGATRON_SCORING,
    "verl.workers.engine.megatron.transformer_impl": _MEGATRON_SCORING,
}
