"""Where the time of the fused linear policy loss goes on a GPU: one warmed-up forward + backward
of ``linear_policy_loss`` (Triton backend, the routes of ``kernel_config`` or of the
``ENTROPY_KERNELS_LINEAR_GPU_*`` variables) under ``torch.profiler``, its kernels summed by name.

    python benchmarks/profile_linear.py --shape 4096x2048x151936 --out profile.txt
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

import entropy_kernels as ek
from entropy_kernels import kernel_config


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="4096x2048x151936", help="NxHxV")
    parser.add_argument("--out", help="text file to write the table to")
    parser.add_argument("--rows", type=int, default=25)
    args = parser.parse_args(argv)
    tokens_n, size, vocab = (int(x) for x in args.shape.split("x"))
    gen = torch.Generator(device="cuda").manual_seed(1)
    hidden = torch.randn((1, tokens_n, size), generator=gen, device="cuda").bfloat16()
    weight = (torch.randn((vocab, size), generator=gen, device="cuda") * 2 / size**0.5).bfloat16()
    hidden.requires_grad_()
    weight.requires_grad_()
    tokens = torch.randint(0, vocab, (1, tokens_n), generator=gen, device="cuda")
    advantages = torch.randn(1, device="cuda", generator=gen)

    def step():
        out = ek.linear_policy_loss(hidden, weight, tokens, advantages, backend="triton")
        return torch.autograd.grad(out.loss, (hidden, weight))

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    config = kernel_config
    routes = f"forward {config.LINEAR_GPU_FORWARD}, backward {config.LINEAR_GPU_BACKWARD}"
    table = prof.key_averages().table(sort_by="self_device_time_total", row_limit=args.rows)
    text = f"linear_policy_loss bf16 N x H x V = {args.shape}; routes: {routes}\n{table}\n"
    print(text)
    if args.out:
        with open(args.out, "a") as handle:
            handle.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
