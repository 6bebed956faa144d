"""Launch configurations: an override takes effect, keeps results exact, and is undone."""

import os
import subprocess
import sys

import pytest
import torch
from test_policy_loss import GRAD_TOL, VALUE_TOL, make_batch

import entropy_kernels as ek
from entropy_kernels import kernel_config, reference
from entropy_kernels.kernel_config import KernelConfig, override
from entropy_kernels.ops import policy_loss as policy_loss_op
from entropy_kernels.ops import scoring as scoring_op

CPU = torch.device("cpu")


def test_override_is_scoped_and_clipped_to_the_vocabulary():
    default = kernel_config.launch_config("policy_loss_fused", 100_000, CPU)
    with override(policy_loss_fused=KernelConfig(1024, 4, num_stages=2)):
        inside = kernel_config.launch_config("policy_loss_fused", 100_000, CPU)
        # Other kernels keep their default.
        assert kernel_config.launch_config("scoring_fwd", 100_000, CPU) == default
        # The block never exceeds the vocabulary rounded up to a power of two.
        assert kernel_config.launch_config("policy_loss_fused", 300, CPU).block_v == 512
    assert inside == KernelConfig(1024, 4, num_stages=2)
    assert inside.launch_options() == {"num_warps": 4, "num_stages": 2}
    assert kernel_config.launch_config("policy_loss_fused", 100_000, CPU) == default


def test_override_is_undone_when_the_block_raises():
    default = kernel_config.launch_config("scoring_bwd", 5000, CPU)
    with pytest.raises(RuntimeError), override(scoring_bwd=KernelConfig(64, 2)):
        raise RuntimeError
    assert kernel_config.launch_config("scoring_bwd", 5000, CPU) == default


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: KernelConfig(300, 8), "block_v"),
        (lambda: KernelConfig(256, 3), "num_warps"),
        (lambda: KernelConfig(256, 8, num_stages=0), "num_stages"),
        (lambda: override(scoring=KernelConfig(256, 8)).__enter__(), "kernel names"),
        (lambda: override(scoring_fwd=(256, 8)).__enter__(), "scoring_fwd"),
        (lambda: kernel_config.launch_config("scoring", 10, CPU), "kernel must be"),
    ],
)
def test_bad_configurations_raise_value_error(make, message):
    with pytest.raises(ValueError, match=message):
        make()


# 64-wide blocks: the 300-wide vocabulary takes five blocks, the last one partial, in every kernel;
# 1024: one block wider than the row.
@pytest.mark.parametrize("block_v", [64, 1024])
def test_every_kernel_gives_reference_results_under_another_configuration(block_v, monkeypatch):
    """Scoring forward + backward and the fused loss, all three launched with the override."""
    launched = {}

    def recording_launch_config(kernel, vocab_size, device):
        launched[kernel] = kernel_config.launch_config(kernel, vocab_size, device)
        return launched[kernel]

    for module in (scoring_op, policy_loss_op):
        monkeypatch.setattr(module, "launch_config", recording_launch_config)
    logits, tokens, adv, mask, old, _ = make_batch(2, 3, 300, seed=5)
    config = KernelConfig(block_v, 2)
    with override(scoring_fwd=config, scoring_bwd=config, policy_loss_fused=config):
        x = logits.clone().requires_grad_()
        logp, entropy = ek.logprobs_and_entropy(x, tokens, backend="triton")
        (logp.sum() + entropy.sum()).backward()
        y = logits.clone().requires_grad_()
        out = ek.policy_loss(y, tokens, adv, mask, old_logprobs=old, backend="triton")
        out.loss.backward()
    clipped = KernelConfig(min(block_v, 512), 2)
    assert launched == dict.fromkeys(kernel_config.KERNELS, clipped)

    x64 = logits.double().requires_grad_()
    want_logp, want_entropy = reference.logprobs_and_entropy(x64, tokens)
    (want_logp.sum() + want_entropy.sum()).backward()
    torch.testing.assert_close(logp.double(), want_logp, **VALUE_TOL)
    torch.testing.assert_close(entropy.double(), want_entropy, **VALUE_TOL)
    torch.testing.assert_close(x.grad.double(), x64.grad, **GRAD_TOL)

    y64 = logits.double().requires_grad_()
    want = reference.policy_loss(y64, tokens, adv, mask, old_logprobs=old)
    want.loss.backward()
    torch.testing.assert_close(out.loss.double(), want.loss, **VALUE_TOL)
    torch.testing.assert_close(y.grad.double(), y64.grad, **GRAD_TOL)


def test_linear_tiles_shrink_until_they_fit(monkeypatch):
    """A fused linear tile the device cannot hold loses a stage, then halves its larger block,
    then its block_h, until it fits; the fitting tile is remembered. An overridden tile is
    launched as given."""
    from triton.runtime.errors import OutOfResources

    from entropy_kernels.kernel_config import TileConfig, override
    from entropy_kernels.ops import linear as ops

    tried = []

    def launch(tile):
        tried.append((tile.block_n, tile.block_v, tile.block_h, tile.num_stages))
        if tile.block_h > 16:
            raise OutOfResources(262144, 232448, "shared memory")
        return "ran"

    monkeypatch.setattr(ops, "_fitted", {})
    hidden = torch.zeros(2, 4)
    monkeypatch.setitem(
        kernel_config.LINEAR_GPU_DEFAULTS, "linear_fwd", TileConfig(64, 32, 64, 4, 3)
    )
    monkeypatch.setattr(kernel_config, "LINEAR_INTERPRETER_DEFAULT", TileConfig(64, 32, 64, 4, 3))
    assert ops._launch_fitting("linear_fwd", hidden, launch) == "ran"
    assert tried == [
        (64, 32, 64, 3),
        (64, 32, 64, 2),
        (32, 32, 64, 2),
        (32, 32, 32, 2),
        (32, 32, 16, 2),
    ]
    tried.clear()
    assert ops._launch_fitting("linear_fwd", hidden, launch) == "ran"
    assert tried == [(32, 32, 16, 2)]
    tried.clear()
    with override(linear_fwd=TileConfig(32, 32, 64, 4, 3)), pytest.raises(OutOfResources):
        ops._launch_fitting("linear_fwd", hidden, launch)
    assert tried == [(32, 32, 64, 3)]
    assert TileConfig(32, 16, 16, 1, 2).smaller() is None


def test_vocabulary_splits_cover_the_vocabulary(monkeypatch):
    """Splits fill the device's programs, cover every vocabulary tile once, and the hidden
    gradient's (one float32 [rows, H] part each) are capped."""
    from entropy_kernels.ops import linear as ops

    monkeypatch.setattr(ops, "_target_programs", lambda device: 264)
    cpu = torch.device("cpu")
    for row_blocks, vocab, most in ((1, 151936, None), (1, 151936, 8), (300, 151936, None)):
        splits, per_split = ops.vocab_splits(row_blocks, vocab, 128, cpu, most)
        tiles = -(-vocab // 128)
        assert (splits - 1) * per_split < tiles <= splits * per_split
        assert splits <= (most or tiles)
    assert ops.vocab_splits(300, 151936, 128, cpu) == (1, 1187)
    assert ops.vocab_splits(1, 151936, 128, cpu)[0] >= 200


@pytest.mark.parametrize(
    "variable, value",
    [
        ("ENTROPY_KERNELS_LINEAR_GPU_BACKWARD", "cublas"),
        ("ENTROPY_KERNELS_LINEAR_GPU_FORWARD", "fast"),
        ("ENTROPY_KERNELS_LINEAR_GPU_BLAS_TILE", "4096"),
        ("ENTROPY_KERNELS_LINEAR_GPU_BLAS_TILE", "0x8192"),
        ("ENTROPY_KERNELS_LINEAR_GPU_BLAS_TILE", "4096x8192x2"),
    ],
)
def test_bad_route_variables_are_named(variable, value):
    """A mistyped GPU route or tile in the environment fails at import, naming the variable."""
    env = {**os.environ, variable: value}
    result = subprocess.run(
        [sys.executable, "-c", "import entropy_kernels.kernel_config"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0
    assert "ValueError" in result.stderr and variable in result.stderr


def test_route_variables_set_the_routes():
    env = {
        **os.environ,
        "ENTROPY_KERNELS_LINEAR_GPU_FORWARD": "tiles",
        "ENTROPY_KERNELS_LINEAR_GPU_BACKWARD": "blas",
        "ENTROPY_KERNELS_LINEAR_GPU_BLAS_TILE": "1024x32768",
    }
    code = (
        "from entropy_kernels import kernel_config as k; "
        "print(k.LINEAR_GPU_FORWARD, k.LINEAR_GPU_BACKWARD, k.LINEAR_GPU_BLAS_TILE)"
    )
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert result.stdout.split("\n")[0] == "tiles blas (1024, 32768)", result.stderr
