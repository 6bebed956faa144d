"""Run a check on every rank of a gloo process group on CPU (tests of distributed code).

``run_ranks(check, world, tmp_path, preload)`` starts ``world`` processes (a fork server that
has imported ``preload`` once), initialises gloo in each and calls ``check(rank, world)``, which
returns a list of failure strings: checks collect their failures instead of raising, so that
ranks never desynchronise, and the parent asserts that no rank reported one.
"""

from __future__ import annotations

import datetime

import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank, world, init_file, check, results):
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=120),
    )
    try:
        failures = check(rank, world)
    except Exception as error:  # noqa: BLE001 - reported to the parent process
        failures = [f"rank {rank}: {type(error).__name__}: {error}"]
    finally:
        dist.destroy_process_group()
    results.put((rank, failures))


def run_ranks(check, world, tmp_path, preload) -> None:
    """Run ``check(rank, world) -> list[str]`` on ``world`` gloo ranks; assert no failures."""
    context = mp.get_context("forkserver")
    context.set_forkserver_preload(list(preload))
    results = context.SimpleQueue()
    mp.start_processes(
        _worker,
        args=(world, str(tmp_path / "init"), check, results),
        nprocs=world,
        join=True,
        start_method="forkserver",
    )
    failures = [failure for _ in range(world) for failure in results.get()[1]]
    assert not failures, "\n".join(failures[:20])
