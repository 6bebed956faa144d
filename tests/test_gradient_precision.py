"""``benchmarks/gradient_precision.py``: the rounding of ``dlogits`` it simulates is the one it
names, and its spec verdicts come out as the analysis says they must."""

import importlib
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def precision():
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        return importlib.import_module("gradient_precision")
    finally:
        sys.path.pop(0)


def test_tf32_rounding_is_round_to_nearest_even_on_ten_bits(precision):
    x = torch.randn(4096, dtype=torch.float64).float() * 3
    # Ties: 1 + 2^-11 + 2^-23 * k lies halfway between TF32 neighbours only for k = 0.
    ties = torch.tensor([1 + 2**-11, 1 + 3 * 2**-11, -(1 + 2**-11)], dtype=torch.float32)
    rounded = precision._tf32(torch.cat([x, ties]))
    assert torch.equal(
        rounded.view(torch.int32) & 0x1FFF, torch.zeros_like(rounded, dtype=torch.int32)
    )
    ulp = torch.exp2(torch.floor(torch.log2(x.abs().double())) - 10)
    assert bool(((rounded[: x.numel()].double() - x.double()).abs() <= ulp / 2).all())
    assert rounded[-3:].tolist() == [1.0, 1 + 4 * 2**-11, -1.0]


def test_power_of_two_scales_fit_the_format(precision):
    x = torch.randn(64, 300) * torch.logspace(-6, 3, 64).unsqueeze(-1)
    x[3] = 0.0
    scaled = precision._scaled(x, torch.float8_e4m3fn, precision.E4M3_MAX, -1)
    assert torch.isfinite(scaled).all() and bool((scaled[3] == 0).all())
    # e4m3 keeps 3 mantissa bits: within 2^-4 of each row's normal-range values.
    big = x.abs() >= x.abs().amax(-1, keepdim=True) / 8
    assert bool(((scaled - x).abs() <= 2**-4 * x.abs() + 1e-30)[big].all())


@pytest.mark.parametrize("sampled", [False, True])
def test_each_representation_lands_where_the_analysis_puts_it(precision, sampled):
    """In float32, more bf16 parts are closer (three as close as float32 products of the
    float32 ``dlogits``), an fp8 low part lies between two and one.
    Rounded to bf16 (the spec's comparison) an error of e in float32 becomes about
    sqrt(e * 2^-8), as elements near a rounding boundary flip: the fp8 low part then misses
    2e-4, and two parts sit well above three (on small gradients above 2e-4 too: see
    test_linear_rounding)."""
    rows = precision.measure(256, 96, 3001, 0, 1.0, sampled)
    fp32 = {r["representation"]: max(r["hidden"], r["weight"]) for r in rows}
    rounded = {r["representation"]: max(r["hidden rounded"], r["weight rounded"]) for r in rows}
    three, two, one = "bf16 x3 (default)", "bf16 x2", "bf16 (opt-in route, peers)"
    assert fp32[three] < fp32[two] < fp32["bf16 + fp8 low"] < precision.SPEC_RTOL < fp32[one]
    floor = "float32 (floor)"
    assert fp32[three] < 1.1 * fp32[floor]  # three parts leave float32's own error
    assert rounded[three] < precision.SPEC_RTOL / 4
    assert rounded[two] > 2 * max(rounded[three], rounded[floor])
    assert rounded["bf16 + fp8 low"] > precision.SPEC_RTOL
