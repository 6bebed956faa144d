"""Vocabulary-parallel scoring on CPU over gloo: time per call and bytes communicated.

    python benchmarks/parallel_cpu.py                          # N=2048, V=128000, 1/2/4 ranks
    python benchmarks/parallel_cpu.py --rows 256 --vocab 32000 --worlds 1 2 --repeats 2

Each rank holds ``V / world`` columns (float32) and runs ``logprobs_and_entropy(...,
tp_group=...)`` forward and backward on the torch backend; world 1 is the unsharded call
(no group, no communication). Each rank runs ``--threads-per-rank`` CPU threads (default 1:
several OpenMP threads per process on a shared, oversubscribed machine wait for each other at
every barrier, which made a 2-thread unsharded call 3.5x slower than a 1-thread one here). On a
machine with fewer cores than ranks the ranks compete for cores: the times then show the cost
of the extra steps, not a speed-up. Bytes are counted by wrapping the collectives; the ideal is
three float32 per row (the log-sum-exp, the entropy term and the token's logit, all-reduced).
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def count_collectives(sent: list, timing: list):
    """Wrap all_reduce / all_gather: bytes sent by this rank and seconds spent in them."""
    for name in ("all_reduce", "all_gather"):
        collective = getattr(dist, name)

        def wrapper(first, *args, _collective=collective, _name=name, **kwargs):
            tensor = args[0] if _name == "all_gather" else first
            sent.append(tensor.numel() * tensor.element_size())
            start = time.perf_counter()
            result = _collective(first, *args, **kwargs)
            timing.append(time.perf_counter() - start)
            return result

        setattr(dist, name, wrapper)


def rank_main(rank, world, init_file, args, results):
    import entropy_kernels as ek

    torch.set_num_threads(args.threads_per_rank)
    group = None
    if world > 1:
        dist.init_process_group(
            "gloo",
            init_method=f"file://{init_file}",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=600),
        )
        group = dist.group.WORLD
    sent, timing = [], []
    count_collectives(sent, timing)
    size = args.vocab // world
    generator = torch.Generator().manual_seed(rank)
    logits = torch.randn(args.rows, size, generator=generator).mul_(3.0).requires_grad_()
    tokens = torch.randint(0, args.vocab, (args.rows,), generator=torch.Generator().manual_seed(0))
    times, comm_times = [], []
    for repeat in range(args.repeats + 1):
        sent.clear()
        timing.clear()
        logits.grad = None
        if group is not None:
            dist.barrier(group)
        start = time.perf_counter()
        logp, entropy = ek.logprobs_and_entropy(logits, tokens, backend="torch", tp_group=group)
        (logp.sum() + 0.01 * entropy.sum()).backward()
        elapsed = time.perf_counter() - start
        if repeat:  # the first call warms up
            times.append(elapsed)
            comm_times.append(sum(timing))
    results.put((rank, statistics.median(times), statistics.median(comm_times), sum(sent)))
    if group is not None:
        dist.destroy_process_group()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=128000)
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads-per-rank", type=int, default=1)
    args = parser.parse_args()
    context = mp.get_context("spawn")
    ideal = 3 * 4 * args.rows
    print(
        f"N={args.rows} V={args.vocab} float32, torch backend, forward + backward, "
        f"{args.threads_per_rank} CPU thread(s) per rank on {os.cpu_count()} cores, "
        f"median of {args.repeats} calls"
    )
    print(
        "| ranks | V per rank | time per call (s) | of which in collectives (s) | "
        "bytes sent per rank | / ideal (12 N) |"
    )
    print("|---|---|---|---|---|---|")
    for world in args.worlds:
        results = context.SimpleQueue()
        with tempfile.TemporaryDirectory() as tmp:
            mp.start_processes(
                rank_main,
                args=(world, os.path.join(tmp, "init"), args, results),
                nprocs=world,
                join=True,
                start_method="spawn",
            )
        rows = [results.get() for _ in range(world)]
        slowest = max(row[1] for row in rows)
        comm = max(row[2] for row in rows)
        sent = max(row[3] for row in rows)
        print(
            f"| {world} | {args.vocab // world} | {slowest:.3f} | {comm:.3f} | {sent} | "
            f"{sent / ideal:.3f} |"
        )


if __name__ == "__main__":
    main()
