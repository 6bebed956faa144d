"""Where the time of the fused linear policy loss goes on a GPU: warmed-up forward + backward
steps of ``linear_policy_loss`` (Triton backend) for each pair of routes
(``kernel_config.LINEAR_GPU_FORWARD`` / ``_BACKWARD``), each reported as:

- wall time of a step (device synchronised), and the host time spent issuing its forward and
  its backward (no synchronisation: if they add up to the wall time, the host is the bound);
- under ``torch.profiler``, the device's busy time (the sum of its kernels) and its idle time
  between the first and the last kernel, then the kernels and the host-side calls (cudaMalloc,
  cudaFree and synchronisations show up there) summed by name.

    python benchmarks/profile_linear.py --routes tiles/blas,blas-triton-fold/blas-triton-fold
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

import entropy_kernels as ek
from entropy_kernels import kernel_config


def make_step(shape: str, dtype: torch.dtype):
    tokens_n, size, vocab = (int(x) for x in shape.split("x"))
    gen = torch.Generator(device="cuda").manual_seed(1)
    hidden = torch.randn((1, tokens_n, size), generator=gen, device="cuda").to(dtype)
    weight = (torch.randn((vocab, size), generator=gen, device="cuda") * 2 / size**0.5).to(dtype)
    hidden.requires_grad_()
    weight.requires_grad_()
    tokens = torch.randint(0, vocab, (1, tokens_n), generator=gen, device="cuda")
    advantages = torch.randn(1, device="cuda", generator=gen)
    clocks = []

    def step():
        start = time.perf_counter()
        out = ek.linear_policy_loss(hidden, weight, tokens, advantages, backend="triton")
        issued_forward = time.perf_counter()
        grads = torch.autograd.grad(out.loss, (hidden, weight))
        issued_backward = time.perf_counter()
        torch.cuda.synchronize()
        done = time.perf_counter()
        clocks.append((issued_forward - start, issued_backward - issued_forward, done - start))
        return grads

    return step, clocks


def device_activity(prof, top: int = 6) -> tuple[float, float, list[str]]:
    """``(busy ms, idle ms, widest gaps)`` of the device: its kernels' and copies' summed time
    (overlapping ones counted twice), the time between the first kernel's start and the last
    one's end that no kernel covers, and the ``top`` widest uncovered gaps with the kernels on
    either side."""
    spans = sorted(
        (event.time_range.start, event.time_range.end, event.name)
        for event in prof.events()
        if event.device_type == DeviceType.CUDA
    )
    if not spans:
        return 0.0, 0.0, []
    busy = sum(end - start for start, end, _ in spans)
    covered, edge, before, gaps = 0.0, spans[0][0], spans[0][2], []
    for start, end, name in spans:  # the union of the kernels' intervals
        if start > edge:
            gaps.append((start - edge, before, name))
        if end > edge:
            covered += end - max(start, edge)
            edge, before = end, name
    idle = (spans[-1][1] - spans[0][0] - covered) / 1e3
    widest = [
        f"  {gap / 1e3:.3f} ms after {first[:50]} before {second[:50]}"
        for gap, first, second in sorted(gaps, reverse=True)[:top]
    ]
    return busy / 1e3, idle, widest


def profile_routes(forward: str, backward: str, shape: str, dtype, rows: int) -> str:
    for name, route in (("LINEAR_GPU_FORWARD", forward), ("LINEAR_GPU_BACKWARD", backward)):
        if route not in kernel_config.LINEAR_GPU_ROUTES[name]:
            raise ValueError(
                f"--routes: {route!r} is not one of {kernel_config.LINEAR_GPU_ROUTES[name]}"
            )
    kernel_config.LINEAR_GPU_FORWARD, kernel_config.LINEAR_GPU_BACKWARD = forward, backward
    step, clocks = make_step(shape, dtype)
    for _ in range(3):
        step()
    clocks.clear()
    for _ in range(10):
        step()
    host_forward, host_backward, wall = (
        statistics.median(c) * 1e3 for c in zip(*clocks, strict=True)
    )
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
    busy, idle, gaps = device_activity(prof)
    averages = prof.key_averages()
    kernels = averages.table(sort_by="self_device_time_total", row_limit=rows)
    host = averages.table(sort_by="self_cpu_time_total", row_limit=rows)
    return (
        f"linear_policy_loss {dtype} N x H x V = {shape}; routes: forward {forward}, backward "
        f"{backward}\nwall {wall:.2f} ms (median of 10), host issuing forward {host_forward:.2f} "
        f"ms + backward {host_backward:.2f} ms; profiled step: kernel time {busy:.2f} ms, idle "
        f"{idle:.2f} ms between its first and last kernel; the widest gaps:\n"
        + "\n".join(gaps)
        + f"\n{kernels}\n{host}\n"
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="4096x2048x151936", help="NxHxV")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16"))
    parser.add_argument(
        "--routes",
        default=f"{kernel_config.LINEAR_GPU_FORWARD}/{kernel_config.LINEAR_GPU_BACKWARD}",
        help="comma-separated FORWARD/BACKWARD route pairs (default: the configured ones)",
    )
    parser.add_argument("--out", help="text file to append the tables to")
    parser.add_argument("--rows", type=int, default=20)
    args = parser.parse_args(argv)
    for pair in args.routes.split(","):
        forward, backward = pair.split("/")
        text = profile_routes(forward, backward, args.shape, getattr(torch, args.dtype), args.rows)
        print(text, flush=True)
        if args.out:
            with open(args.out, "a") as handle:
                handle.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
