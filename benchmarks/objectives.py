"""Time each policy-loss objective against the plain clip on the same inputs (fwd + bwd).

    python benchmarks/objectives.py                 # CUDA: Triton, N = 16384, V = 151936, bf16
    python benchmarks/objectives.py --device cpu    # torch backend, N = 512, V = 32000, fp32

Implementations run in interleaved rounds (each round times every objective once); the table
gives each median and its ratio to the clip's with the range of the per-round ratios. Token-local
objectives (cispo, sapo, gpg) are fused in the Triton kernel like the clip; GSPO's sequence ratio
and VESPO take the two-pass route.
"""

import argparse
import statistics
import time

import torch

import entropy_kernels as ek
from entropy_kernels.objectives import Objective

OBJECTIVES = {
    "clip": "clip",
    "cispo": "cispo",
    "sapo": "sapo",
    "gpg": "gpg",
    "gspo": Objective(ratio_level="sequence"),
    "vespo": "vespo",
}


def timer(device: str):
    if device == "cuda":
        import triton.testing

        return lambda fn: triton.testing.do_bench(fn, warmup=5, rep=50) / 1e3

    def cpu_time(fn):
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    return cpu_time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    cuda = args.device == "cuda"
    rows, vocab, dtype = (16384, 151936, torch.bfloat16) if cuda else (512, 32000, torch.float32)
    backend = "triton" if cuda else "torch"
    if not cuda:
        torch.set_num_threads(1)
    gen = torch.Generator(device=args.device).manual_seed(0)
    batch = 16
    shape = (batch, rows // batch)
    base = torch.randn(*shape, vocab, device=args.device, generator=gen).mul_(2).to(dtype)
    tokens = torch.randint(0, vocab, shape, device=args.device, generator=gen)
    advantages = torch.randn(shape, device=args.device, generator=gen)
    with torch.no_grad():
        current = torch.log_softmax(base.float(), -1).gather(-1, tokens[..., None])[..., 0]
    old = (current + 0.1 * torch.randn(shape, device=args.device, generator=gen)).clamp(max=0)
    measure = timer(args.device)

    def step(objective):
        logits = base.detach().requires_grad_()

        def call():
            out = ek.policy_loss(
                logits, tokens, advantages, old_logprobs=old, clip_high=0.28,
                objective=objective, backend=backend,
            )  # fmt: skip
            out.loss.backward()
            logits.grad = None

        return call

    calls = {name: step(objective) for name, objective in OBJECTIVES.items()}
    for call in calls.values():
        call()
    times = {name: [] for name in calls}
    names = list(calls)
    for round_index in range(args.rounds):
        order = names[round_index % len(names) :] + names[: round_index % len(names)]
        for name in order:
            times[name].append(measure(calls[name]))
    clip = statistics.median(times["clip"])
    print(f"policy_loss fwd + bwd, {backend}, N = {rows}, V = {vocab}, {dtype}, {args.device}")
    for name, values in times.items():
        ratios = [value / ref for value, ref in zip(values, times["clip"], strict=True)]
        print(
            f"{name:6s} {statistics.median(values) * 1e3:9.2f} ms  x clip "
            f"{statistics.median(values) / clip:5.2f} ({min(ratios):.2f}..{max(ratios):.2f})"
        )


if __name__ == "__main__":
    main()
