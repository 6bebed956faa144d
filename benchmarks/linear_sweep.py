"""Time the fused linear kernels under alternative tiles, to choose their defaults.

    python benchmarks/linear_sweep.py --out tiles.json      # CUDA: N = 4096, H = 2048, V = 151936
    TRITON_INTERPRET=1 python benchmarks/linear_sweep.py --quick --device cpu   # checks only

Each kernel (``linear_fwd``, ``linear_bwd_hidden``, ``linear_bwd_weight``) is launched alone
through its launcher in :mod:`entropy_kernels.ops.linear`, under
:func:`entropy_kernels.kernel_config.override`; each tile's outputs are checked against the
default tile's (same maths, other summation order: float32 rounding only) before it is timed,
and a tile that disagrees or fails to launch is reported, never ranked. The bfloat16 matmul
rate of ``hidden @ weight.T`` (cuBLAS) is measured in the same run: the floor the issue states
is 3 (or 4) such matmuls for forward + backward. Writes the timings and the best tile of each
kernel as JSON; ``benchmarks/run.py --linear-tiles`` applies such a file.
"""

from __future__ import annotations

import argparse
import json
import sys

import measure
import torch

from entropy_kernels.kernel_config import LINEAR_GPU_DEFAULTS, TileConfig, override, tile_config
from entropy_kernels.linear_scoring import hidden_rows
from entropy_kernels.ops import linear as ops

CANDIDATES = {
    "linear_fwd": [
        (128, 256, 64, 8, 3),
        (128, 128, 64, 8, 3),
        (256, 128, 64, 8, 3),
        (128, 256, 64, 8, 4),
        (256, 256, 64, 16, 3),
        (128, 256, 128, 8, 2),
        (64, 256, 64, 8, 3),
    ],
    "linear_bwd_hidden": [
        (128, 128, 64, 8, 3),
        (64, 128, 64, 8, 3),
        (128, 256, 64, 16, 2),
        (128, 128, 128, 8, 2),
        (128, 128, 64, 8, 4),
        (128, 128, 64, 16, 3),
        (256, 128, 64, 16, 2),
    ],
    "linear_bwd_weight": [
        (128, 128, 64, 8, 3),
        (64, 128, 64, 8, 3),
        (128, 256, 64, 16, 2),
        (128, 128, 128, 8, 2),
        (128, 128, 64, 8, 4),
        (128, 128, 64, 16, 3),
        (256, 128, 64, 16, 2),
    ],
}
QUICK = [(16, 32, 16, 4, None), (32, 16, 16, 4, None)]
CHECK = dict(rtol=1e-3, atol=1e-4)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shape, two tiles (tests)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shape", default="4096x2048x151936", help="NxHxV")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--out", help="JSON file to write")
    parser.add_argument(
        "--routes-only",
        action="store_true",
        help="skip the tiles: time forward + backward of each gradient route only",
    )
    parser.add_argument(
        "--blas-tiles",
        default="",
        help="comma-separated RxV cuBLAS tile shapes: time the default routes with each",
    )
    return parser.parse_args(argv)


def make_problem(shape, dtype, device):
    tokens_n, size, vocab = shape
    gen = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn((tokens_n, size), generator=gen, device=device).to(dtype)
    weight = (torch.randn((vocab, size), generator=gen, device=device) * 2 / size**0.5).to(dtype)
    tokens = torch.randint(0, vocab, (tokens_n,), generator=gen, device=device)
    hidden, tokens, layout, tokens_layout = hidden_rows(hidden, tokens)
    args = (hidden, weight, None, tokens, (layout, tokens_layout))
    logprobs, entropy, normaliser = ops.linear_forward(*args, (1.0, -100))
    grads = (torch.randn_like(logprobs) / tokens_n, torch.randn_like(entropy) / tokens_n)
    return args, (normaliser, entropy), grads


def runner(kernel, args, saved, grads):
    constants = (1.0, -100)
    if kernel == "linear_fwd":
        return lambda: ops.linear_forward(*args, constants)
    if kernel == "linear_bwd_hidden":
        return lambda: (ops.linear_grad_hidden(*args, saved, grads, constants),)
    return lambda: ops.linear_grad_weight(*args, saved, grads, constants, (True, False))[:1]


def sweep(kernel, candidates, problem, device) -> list[dict]:
    run = runner(kernel, *problem)
    baseline = [t.clone() for t in run()]
    rows = []
    for values in candidates:
        tile = TileConfig(*values)
        row = {"tile": list(values)}
        try:
            with override(**{kernel: tile}):
                outputs = run()
                for got, want in zip(outputs, baseline, strict=True):
                    torch.testing.assert_close(got, want, **CHECK)
                row["time_ms"] = measure.median_time_ms(run, device)
        except Exception as err:  # a tile that does not launch or disagrees is reported
            row["error"] = f"{type(err).__name__}: {str(err)[:200]}"
        rows.append(row)
        print(kernel, row, flush=True)
    return rows


ROUTES = (  # name: (forward, backward) of kernel_config.LINEAR_GPU_FORWARD / _BACKWARD
    ("tiles/tiles", "tiles", "tiles"),
    ("tiles/blas", "tiles", "blas"),
    ("tiles/blas-triton-fold", "tiles", "blas-triton-fold"),
    ("blas-triton-fold/blas-triton-fold", "blas-triton-fold", "blas-triton-fold"),
)
# Opt-in routes outside the spec's gradient tolerance: timed, never picked as "best".
ROUNDED_ROUTES = (
    ("tiles/blas-bf16-dlogits", "tiles", "blas-bf16-dlogits"),
    ("blas-triton-fold/blas-bf16-dlogits", "blas-triton-fold", "blas-bf16-dlogits"),
)


def time_routes(shape, dtype, device, blas_tiles=()) -> dict:
    """Milliseconds of ``linear_logprobs_and_entropy`` on the Triton backend by each GPU route:
    the forward alone (``"forward <route>"``) and forward + backward of hidden and weight
    (``"<forward route>/<backward route>"``): tl.dot kernels ("tiles"), cuBLAS tiles with the
    torch fold ("blas") or the scoring kernels as the fold ("blas-triton-fold"); then the torch
    backend ("torch"). The fastest pair within the spec's tolerance goes in ``"best"``; the
    pairs with ``dlogits`` rounded to bfloat16 (``ROUNDED_ROUTES``) are timed beside them.
    With ``blas_tiles`` (``(rows, vocabulary)`` shapes), only the default routes, once per
    cuBLAS tile shape."""
    import entropy_kernels as ek
    from entropy_kernels import kernel_config

    tokens_n, size, vocab = shape
    gen = torch.Generator(device=device).manual_seed(1)
    hidden = torch.randn((tokens_n, size), generator=gen, device=device).to(dtype)
    weight = (torch.randn((vocab, size), generator=gen, device=device) * 2 / size**0.5).to(dtype)
    hidden.requires_grad_()
    weight.requires_grad_()
    tokens = torch.randint(0, vocab, (tokens_n,), generator=gen, device=device)

    def forward(backend="triton"):
        with torch.no_grad():
            return ek.linear_logprobs_and_entropy(hidden, weight, tokens, backend=backend)

    def step(backend="triton"):
        logprobs, entropy = ek.linear_logprobs_and_entropy(hidden, weight, tokens, backend=backend)
        return torch.autograd.grad(logprobs.sum() + 0.01 * entropy.sum(), (hidden, weight))

    routes = {}
    if blas_tiles:  # the default routes with each cuBLAS tile shape, and its peak memory
        saved = kernel_config.LINEAR_GPU_BLAS_TILE
        try:
            for tile in blas_tiles:
                kernel_config.LINEAR_GPU_BLAS_TILE = tile
                peak = None  # the tiles serve CUDA only; elsewhere the call just runs
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                    torch.cuda.reset_peak_memory_stats(device)
                    base = torch.cuda.memory_allocated(device)
                step()  # peak above the inputs, gradients included (alone: no timer buffers)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                    peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
                name = "x".join(map(str, tile))
                routes[f"tile {name}"] = measure.median_time_ms(step, device)
                routes[f"tile {name} peak MiB"] = peak
                print("tile", name, routes[f"tile {name}"], "ms", peak, "MiB", flush=True)
        finally:
            kernel_config.LINEAR_GPU_BLAS_TILE = saved
        routes["best tile"] = min(
            ("x".join(map(str, tile)) for tile in blas_tiles), key=lambda n: routes[f"tile {n}"]
        )
        return routes
    saved = kernel_config.LINEAR_GPU_FORWARD, kernel_config.LINEAR_GPU_BACKWARD
    try:
        for name in kernel_config.LINEAR_GPU_ROUTES["LINEAR_GPU_FORWARD"]:
            kernel_config.LINEAR_GPU_FORWARD = name
            routes[f"forward {name}"] = measure.median_time_ms(forward, device)
            print("route", f"forward {name}", routes[f"forward {name}"], flush=True)
        for name, forward_route, backward_route in ROUTES + ROUNDED_ROUTES:
            kernel_config.LINEAR_GPU_FORWARD = forward_route
            kernel_config.LINEAR_GPU_BACKWARD = backward_route
            routes[name] = measure.median_time_ms(step, device)
            print("route", name, routes[name], flush=True)
    finally:
        kernel_config.LINEAR_GPU_FORWARD, kernel_config.LINEAR_GPU_BACKWARD = saved
    routes["torch"] = measure.median_time_ms(lambda: step("torch"), device)
    routes["best"] = min((name for name, *_ in ROUTES), key=routes.get)
    return routes


def matmul_ms(problem, device) -> float:
    hidden, weight = problem[0][0], problem[0][1]
    return measure.median_time_ms(lambda: hidden @ weight.T, device)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    shape = (24, 40, 301) if args.quick else tuple(int(x) for x in args.shape.split("x"))
    problem = make_problem(shape, getattr(torch, args.dtype), device)
    result = {
        **measure.run_facts(),
        "shape_nhv": shape,
        "dtype": args.dtype,
        "device": measure.device_info(device),
        "versions": measure.versions(),
        "git": measure.git_state(),
        "kernels": {},
    }
    if device.type == "cuda":
        result["defaults"] = {k: list(vars(v).values()) for k, v in LINEAR_GPU_DEFAULTS.items()}
    result["matmul_ms"] = matmul_ms(problem, device)
    n, h, v = shape
    result["matmul_tflops"] = 2 * n * h * v / (result["matmul_ms"] * 1e-3) / 1e12
    if args.routes_only or args.blas_tiles:
        tiles = [tuple(int(n) for n in t.split("x")) for t in args.blas_tiles.split(",") if t]
        result["routes_ms"] = time_routes(shape, getattr(torch, args.dtype), device, tiles)
        print(json.dumps({k: result[k] for k in ("matmul_ms", "routes_ms")}))
        if args.out:
            with open(args.out, "w") as handle:
                json.dump(result, handle, indent=1)
        return 0
    best = {}
    for kernel, candidates in CANDIDATES.items():
        rows = sweep(kernel, QUICK if args.quick else candidates, problem, device)
        result["kernels"][kernel] = rows
        timed = [row for row in rows if "time_ms" in row]
        if timed:
            best[kernel] = min(timed, key=lambda row: row["time_ms"])["tile"]
        default = vars(tile_config(kernel, device))
        print(f"{kernel}: default {default}, best {best.get(kernel)}", flush=True)
    result["best"] = best
    print(json.dumps({k: result[k] for k in ("matmul_ms", "matmul_tflops", "best")}))
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(result, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
