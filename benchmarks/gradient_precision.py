"""How precise each way of feeding ``dlogits`` to the gradient matmuls is, in the spec's metrics.

The fused linear backward multiplies a float32 ``dlogits [N, V]`` by the bf16 weight (hidden
gradient) and the bf16 hidden states (weight gradient). Tensor cores take half-precision
operands, so ``dlogits`` must be rounded, and how decides both the cost (matmul units) and the
error. This measures, on the benchmarks' inputs (``linear_peers.make_inputs``: logits of spread
about 2), the norm-relative error (``api.md``: ``2e-4`` for the ``linear_`` functions' gradients)
of each representation against a float64 truth, as float32 and as the spec compares bf16
gradients: rounded to bf16, against the truth rounded to bf16 (the column that decides):

- ``bf16 x3``: three bf16 parts, each the rounding of what the others leave, three matmuls per
  gradient (the default since the sixth session, ``split_matmuls.DLOGITS_PARTS``);
- ``bf16 x2``: ``bf16(d) + bf16(d - bf16(d))``, two matmuls (the default before);
- ``bf16``: ``bf16(d)``, one matmul (the opt-in ``blas-bf16-dlogits`` route; TRL, Liger, verl
  and CCE do this);
- ``fp16``: ``fp16(d * s) / s`` per row (``s`` a power of two), the other operand converted to
  fp16, one matmul;
- ``bf16 + fp8 low``: the x2 split's low part and the other operand in e4m3 with power-of-two
  scales per row of ``d`` and per column of the operand (the row-wise scaling of
  ``torch._scaled_mm``): one bf16 and one FP8 matmul (FP8 runs at twice the bf16 rate);
- ``tf32``: ``d`` rounded to TF32 (10 mantissa bits), the operand exact; TF32 runs at half the
  bf16 rate, so it costs two units like ``bf16 x2``;
- ``float32``: ``d`` itself, float32 products (CUDA cores, no tensor-core unit count): the floor
  that float32 arithmetic of ``d`` leaves, whatever the matmuls.

Every product of two half-precision values is exact in float32, so float32 matmuls of the
rounded operands stand in for the tensor cores (accumulation order aside). Numerics only: it
runs on CPU, and its figures are as valid there as on a GPU.

    python benchmarks/gradient_precision.py --shapes 512x1024x32000,128x2048x151936
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import linear_peers
import torch

import entropy_kernels.reference as ref
from entropy_kernels.backends.split_matmuls import bfloat16_parts

SPEC_RTOL = 2e-4
E4M3_MAX = 448.0


def _power_of_two_scale(amax: torch.Tensor, limit: float) -> torch.Tensor:
    """``2^k`` with ``amax * 2^k`` at most ``limit`` (1 where ``amax`` is 0)."""
    safe = torch.where(amax > 0, amax, torch.ones_like(amax))
    return torch.exp2(torch.floor(torch.log2(limit / safe)))


def _scaled(x: torch.Tensor, dtype: torch.dtype, limit: float, dim: int) -> torch.Tensor:
    """``x`` rounded to ``dtype`` under a power-of-two scale per slice along ``dim`` (``-1``: per
    row, ``0``: per column)."""
    amax = x.abs().amax(dim, keepdim=True)
    scale = _power_of_two_scale(amax, limit)
    return (x * scale).to(dtype).float() / scale


def _tf32(x: torch.Tensor) -> torch.Tensor:
    """Round to nearest even on the 10 mantissa bits TF32 keeps."""
    bits = x.view(torch.int32)
    rounded = (bits + 0xFFF + ((bits >> 13) & 1)) & ~0x1FFF
    return rounded.view(torch.float32)


def representations(dlogits: torch.Tensor):
    """``name -> (units, fn(operand) -> [(dlogits part, operand part), ...])``."""
    high, middle, last = (part.float() for part in bfloat16_parts(dlogits, 3))
    low = dlogits - high
    fp16_rows = _scaled(dlogits, torch.float16, 2.0**15, -1)
    low_fp8 = _scaled(low, torch.float8_e4m3fn, E4M3_MAX, -1)
    tf32 = _tf32(dlogits)
    return {
        "bf16 x3 (default)": (3, lambda op: [(high, op), (middle, op), (last, op)]),
        "bf16 x2": (2, lambda op: [(high, op), (middle, op)]),
        "bf16 (opt-in route, peers)": (1, lambda op: [(high, op)]),
        "fp16, row-scaled": (1, lambda op: [(fp16_rows, op.half().float())]),
        "bf16 + fp8 low": (
            1.5,
            lambda op: [(high, op), (low_fp8, _scaled(op, torch.float8_e4m3fn, E4M3_MAX, 0))],
        ),
        "tf32": (2, lambda op: [(tf32, op)]),
        "float32 (floor)": (None, lambda op: [(dlogits, op)]),
    }


def _sampled(inputs, hidden, weight, seed: int):
    """The tokens drawn from the policy itself (as a rollout draws them) and old log-probs
    ``log p(token) + 0.1 randn``, in place of the benchmarks' uniform tokens."""
    gen = torch.Generator().manual_seed(seed + 1)
    logprobs = torch.log_softmax(hidden.double() @ weight.double().T, -1)
    tokens = torch.multinomial(logprobs.exp(), 1, generator=gen).view(inputs.tokens.shape)
    old = logprobs.gather(-1, tokens.view(-1, 1)).view(tokens.shape).float()
    old += torch.randn(tokens.shape, generator=gen) * linear_peers.peers.OLD_LOGPROB_NOISE
    return tokens, old


def measure(
    tokens: int, hidden_size: int, vocab: int, seed: int, sharpness=1.0, sampled=False
) -> list[dict]:
    """One row per representation; ``sharpness`` multiplies the logits (the weight, before its
    rounding to bf16), ``sampled`` draws the tokens from the policy (see :func:`_sampled`)."""
    inputs = linear_peers.make_inputs(
        "linear_policy_loss", tokens, hidden_size, vocab, torch.bfloat16, torch.device("cpu"), seed
    )
    hidden = inputs.hidden.detach().reshape(-1, hidden_size).float()
    weight = (inputs.weight.detach().float() * sharpness).bfloat16().float()
    token_ids, old_logprobs = inputs.tokens, inputs.old_logprobs
    if sampled:
        token_ids, old_logprobs = _sampled(inputs, hidden, weight, seed)
    options = {
        "old_logprobs": old_logprobs,
        "clip_low": linear_peers.peers.CLIP_LOW,
        "clip_high": linear_peers.peers.CLIP_HIGH,
    }

    def dlogits_of(dtype):
        logits = (hidden.to(dtype) @ weight.to(dtype).T).view(*token_ids.shape, vocab)
        logits.requires_grad_()
        loss = ref.policy_loss(logits, token_ids, inputs.advantages, inputs.mask, **options)
        (grad,) = torch.autograd.grad(loss.loss, logits)
        return grad.reshape(-1, vocab)

    truth = dlogits_of(torch.float64)
    exact = {"hidden": truth @ weight.double(), "weight": truth.T @ hidden.double()}
    dlogits = dlogits_of(torch.float32)
    del truth
    rows = []
    for name, (units, parts_of) in representations(dlogits).items():
        row = {"representation": name, "units": units, "N": tokens, "H": hidden_size, "V": vocab}
        row["inputs"] = f"{'sampled' if sampled else 'uniform'} tokens, logits x{sharpness:g}"
        for grad, operand, transpose in (("hidden", weight, False), ("weight", hidden, True)):
            total = sum((d.T if transpose else d) @ op for d, op in parts_of(operand))
            error = torch.linalg.vector_norm(total.double() - exact[grad])
            row[grad] = float(error / torch.linalg.vector_norm(exact[grad]))
            truth = exact[grad].to(torch.bfloat16).double()
            error = torch.linalg.vector_norm(total.to(torch.bfloat16).double() - truth)
            row[f"{grad} rounded"] = float(error / torch.linalg.vector_norm(truth))
        rows.append(row)
    return rows


def markdown(rows: list[dict], command: str) -> str:
    lines = [
        f"Command: `{command}`. Norm-relative error of each gradient against float64 (the "
        f"spec's `linear_` gradient tolerance is {SPEC_RTOL:g}), as float32 and as the spec "
        "compares bf16 gradients (both rounded to bf16); units: bf16 N H V matmuls per gradient.",
        "",
        "| N | H | V | inputs | dlogits as | units | hidden, float32 | weight, float32 | "
        "hidden, rounded | weight, rounded | within 2e-4 (rounded) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ok = "yes" if max(r["hidden rounded"], r["weight rounded"]) <= SPEC_RTOL else "no"
        lines.append(
            f"| {r['N']} | {r['H']} | {r['V']} | {r['inputs']} | {r['representation']} | "
            f"{'-' if r['units'] is None else format(r['units'], 'g')} | "
            f"{r['hidden']:.2e} | {r['weight']:.2e} | "
            f"{r['hidden rounded']:.2e} | {r['weight rounded']:.2e} | {ok} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="512x1024x32000", help="NxHxV, comma-separated")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--sharpness",
        default="1",
        help="logit multipliers, comma-separated (1: the benchmarks' spread of about 2)",
    )
    parser.add_argument(
        "--sampled", action="store_true", help="also with tokens drawn from the policy"
    )
    parser.add_argument("--out", type=Path, help="also write the markdown table here")
    args = parser.parse_args(argv)
    rows = []
    for shape in args.shapes.split(","):
        tokens, hidden_size, vocab = (int(x) for x in shape.split("x"))
        for sharpness in (float(x) for x in args.sharpness.split(",")):
            for sampled in (False, True) if args.sampled else (False,):
                rows += measure(tokens, hidden_size, vocab, args.seed, sharpness, sampled)
    table = markdown(rows, "python benchmarks/gradient_precision.py " + " ".join(sys.argv[1:]))
    print(table)
    if args.out:
        args.out.write_text(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
