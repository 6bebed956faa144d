"""Time each row kernel under alternative launch configurations, to choose the defaults.

    python benchmarks/sweep.py              # CUDA: N = 16384, V = 151936, bfloat16, the full grid
    TRITON_INTERPRET=1 python benchmarks/sweep.py --quick --device cpu   # checks only (tests)

Kernels: ``scoring_fwd`` (``logprobs_and_entropy`` under no_grad; floor: logits read once),
``scoring_bwd`` (its backward alone, through a retained graph; floor: logits read, gradient
written) and ``policy_loss_fused`` (``policy_loss`` forward + backward with old log-probs, the
gradient written in the forward; floor: logits read, gradient written). Each configuration's
outputs are checked against the default configuration's before it is timed; a configuration
that disagrees is reported as wrong, never ranked. Prints a table per kernel (best first) and
writes ``<device>-<date>-sweep.json`` to a new temporary directory, or to ``benchmarks/results/``
with ``--save`` (``--out-dir`` for another).
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import sys

import measure
import torch
from run import add_output_options, csv_of, set_output_dir

import entropy_kernels as ek
from entropy_kernels.kernel_config import KERNELS, KernelConfig, launch_config, override

GRID = {
    "full": {
        "block_v": (1024, 2048, 4096, 8192, 16384),
        "num_warps": (4, 8, 16),
        "num_stages": (None, 1, 2, 4),
    },
    # The interpreter ignores warps and stages: two block widths exercise the loop edges.
    "quick": {"block_v": (64, 256), "num_warps": (8,), "num_stages": (None,)},
}
SHAPES = {"full": {"tokens": 16384, "vocab": 151936}, "quick": {"tokens": 24, "vocab": 300}}
# Logits a thread keeps per block: fewer starves the loads, more spills registers.
LOGITS_PER_THREAD = (4, 64)
# Same function, other summation order: float32 rounding of the outputs only.
CHECK = dict(rtol=1e-4, atol=1e-5)
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shape and grid (CPU checks)")
    parser.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda if available")
    parser.add_argument("--kernels", type=csv_of(str, KERNELS), default=KERNELS)
    parser.add_argument("--tokens", type=int, help="rows N")
    parser.add_argument("--vocab", type=int, help="vocabulary V")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="bfloat16")
    parser.add_argument("--block-v", type=csv_of(int), help="block widths, comma-separated")
    parser.add_argument("--num-warps", type=csv_of(int), help="warp counts, comma-separated")
    parser.add_argument(
        "--num-stages", type=csv_of(int), help="pipeline stages, comma-separated (0: default)"
    )
    add_output_options(parser)
    parser.add_argument("--tag", default="")
    args = parser.parse_args(argv)
    set_output_dir(parser, args)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    size = "quick" if args.quick else "full"
    args.tokens = args.tokens or SHAPES[size]["tokens"]
    args.vocab = args.vocab or SHAPES[size]["vocab"]
    args.block_v = args.block_v or GRID[size]["block_v"]
    args.num_warps = args.num_warps or GRID[size]["num_warps"]
    if args.num_stages is None:
        args.num_stages = GRID[size]["num_stages"]
    else:
        args.num_stages = tuple(stages or None for stages in args.num_stages)
    return args


def configurations(args) -> list[KernelConfig]:
    configs = []
    for block_v, num_warps, num_stages in itertools.product(
        args.block_v, args.num_warps, args.num_stages
    ):
        per_thread = block_v // (32 * num_warps)
        if args.quick or LOGITS_PER_THREAD[0] <= per_thread <= LOGITS_PER_THREAD[1]:
            configs.append(KernelConfig(block_v, num_warps, num_stages))
    return configs


def make_workload(kernel: str, tokens: int, vocab: int, dtype: torch.dtype, device):
    """(run, floor bytes): ``run()`` does the kernel's work and returns the tensors to check."""
    gen = torch.Generator(device=device).manual_seed(0)
    logits = (torch.randn(tokens, vocab, generator=gen, device=device) * 2).to(dtype)
    token_ids = torch.randint(0, vocab, (tokens,), generator=gen, device=device)
    logit_bytes = tokens * vocab * logits.element_size()
    if kernel == "scoring_fwd":

        def run():
            with torch.no_grad():
                return ek.logprobs_and_entropy(logits, token_ids, backend="triton")

        return run, logit_bytes
    logits.requires_grad_()
    if kernel == "scoring_bwd":
        logp, entropy = ek.logprobs_and_entropy(logits, token_ids, backend="triton")
        grads = torch.randn(2, tokens, generator=gen, device=device)

        def run():
            return torch.autograd.grad(
                (logp, entropy), logits, grad_outputs=tuple(grads), retain_graph=True
            )

        return run, 2 * logit_bytes
    advantages = torch.randn(tokens, generator=gen, device=device)
    with torch.no_grad():
        old_logprobs = ek.logprobs_and_entropy(logits, token_ids)[0]
        old_logprobs += 0.1 * torch.randn(tokens, generator=gen, device=device)

    def run():
        out = ek.policy_loss(
            logits, token_ids, advantages, old_logprobs=old_logprobs, backend="triton"
        )
        (grad,) = torch.autograd.grad(out.loss, logits)
        return out.loss.detach(), grad

    return run, 2 * logit_bytes


def sweep_kernel(kernel, args, device, copy_gbps) -> list[dict]:
    run, floor_bytes = make_workload(kernel, args.tokens, args.vocab, DTYPES[args.dtype], device)
    default = launch_config(kernel, args.vocab, device)
    expected = [value.float() for value in run()]
    rows = []
    for config in configurations(args):
        row = {"config": config_name(config), "default": False}
        with override(**{kernel: config}):
            row["default"] = launch_config(kernel, args.vocab, device) == default
            try:
                got = [value.float() for value in run()]
            except Exception as err:  # a configuration that fails to compile or launch
                rows.append({**row, "status": "error", "error": f"{type(err).__name__}: {err}"})
                continue
            wrong = [
                index
                for index, (value, want) in enumerate(zip(got, expected, strict=True))
                if not torch.allclose(value, want, **CHECK, equal_nan=True)
            ]
            if wrong:
                rows.append({**row, "status": "wrong", "outputs": wrong})
                continue
            if device.type != "cuda":  # the interpreter: its times say nothing of the kernel
                rows.append({**row, "status": "checked"})
                continue
            time_ms = measure.median_time_ms(run, device)
        gbps = floor_bytes / (time_ms * 1e-3) / 1e9
        rows.append(
            {**row, "status": "ok", "time_ms": time_ms, "gbps": gbps, "of_copy": gbps / copy_gbps}
        )
        if device.type == "cuda":
            torch.cuda.empty_cache()
    rows.sort(key=lambda row: row.get("time_ms", float("inf")))
    return rows


def config_name(config: KernelConfig) -> str:
    stages = "default" if config.num_stages is None else config.num_stages
    return f"block_v={config.block_v} warps={config.num_warps} stages={stages}"


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    if (device.type == "cuda") == interpreted:
        print(
            "CUDA sweeps need TRITON_INTERPRET unset; CPU checks need TRITON_INTERPRET=1",
            file=sys.stderr,
        )
        return 2
    info = measure.device_info(device)
    data = {
        **measure.run_facts(),
        "shape": {"tokens": args.tokens, "vocab": args.vocab, "dtype": args.dtype},
        "device": info,
        "versions": measure.versions(),
        "git": measure.git_state(),
        "timer": measure.timer_description(device),
        "copy_bandwidth": measure.copy_bandwidth(device),
        "notes": ["CPU: the Triton interpreter; configurations are checked, not timed"]
        if device.type == "cpu"
        else [],
        "kernels": {},
    }
    copy_gbps = data["copy_bandwidth"]["gbps"]
    print(f"{info['name']}: copy {copy_gbps:.0f} GB/s; N={args.tokens} V={args.vocab} {args.dtype}")
    failed = False
    for kernel in args.kernels:
        rows = data["kernels"][kernel] = sweep_kernel(kernel, args, device, copy_gbps)
        print(f"\n{kernel}")
        for row in rows:
            mark = "*" if row["default"] else " "
            if row["status"] == "ok":
                figures = f"{row['time_ms']:9.3f} ms {row['gbps']:7.0f} GB/s {row['of_copy']:6.1%}"
            elif row["status"] == "checked":
                figures = "same outputs as the default (not timed)"
            else:
                figures = row["status"].upper() + " " + str(row.get("error", row.get("outputs")))
                failed |= row["status"] == "wrong"
            print(f" {mark} {row['config']:<36} {figures}")
    stem = f"{measure.device_slug(info)}-{datetime.date.today().isoformat()}-sweep"
    if args.quick:
        stem += "-quick"
    if args.tag:
        stem += f"-{args.tag}"
    args.out_dir.mkdir(parents=True, exist_ok=True)
    path = args.out_dir / f"{stem}.json"
    path.write_text(json.dumps(data, indent=1) + "\n")
    print(f"\n* the default configuration\nwrote {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
