"""A complete RL loop in plain PyTorch with entropy_kernels' loss modules.

A tiny GRU policy learns a toy task with a verifiable reward: given a prompt digit d, write
6 digits (out of 8) in which d appears at least twice but never twice in a row. Each step
samples a group of completions per prompt, scores them once without gradient (old log-probs
and entropy from one fused pass), shapes advantages and takes a few clipped-surrogate
updates. GTPO, GRPO-S and GRPO run on the same seeds and the same number of samples:

    python examples/rl_loop.py                    # under a minute on CPU
    python examples/rl_loop.py --steps 20 --seeds 1

The three losses differ only in their advantages, and GTPO and GRPO-S run with the library's
defaults (nothing overridden):

- GTPO (``GTPOLoss()``): token-level rewards weighted by the rollout policy's entropy;
  ``normalize="zero-filled"`` whitens each outcome's reward field over all tokens, so success
  tokens stay positive and failure tokens negative. ``--gtpo-normalize separate`` shows the
  public re-implementations' reading, which whitens the two outcome sets apart, erases the
  success/failure sign and does not learn.
- GRPO-S (``GRPOSLoss()``): sequence-level rewards weighted by the mean entropy, z-scored in
  each group (Eq. 9). ``filter_groups=True`` (the default of both) gives groups whose rows all
  failed or all succeeded advantage 0; ``--no-filter-groups`` shows how the z-score's noise
  inside such groups slows learning (early on most groups here fail).
- GRPO: ``grpo_advantages`` (group z-score of the reward) + ``PolicyLoss``, with the same
  clip-higher bound (0.28) as the paper's defaults of the other two.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from dataclasses import dataclass, field

import torch
from torch import nn

import entropy_kernels as ek

DIGITS = 8  # the response vocabulary
LENGTH = 6  # response tokens
MIN_HITS = 2  # the prompt digit must appear at least this often, never twice in a row
ALGORITHMS = ("gtpo", "grpo_s", "grpo")
# The GTPO paper's clipping (DAPO's clip-higher): the default of GTPOLoss / GRPOSLoss, given
# to GRPO too for a fair comparison.
CLIP_LOW, CLIP_HIGH = 0.2, 0.28


class TinyPolicy(nn.Module):
    """GRU language model over the digits; the prompt digit has its own embeddings."""

    def __init__(self, hidden: int = 32):
        super().__init__()
        # Ids 0..DIGITS-1 are response digits, DIGITS..2*DIGITS-1 the prompt digit.
        self.embed = nn.Embedding(2 * DIGITS, hidden)
        self.gru = nn.GRU(hidden, hidden, batch_first=True)
        self.head = nn.Linear(hidden, DIGITS)

    def forward(self, inputs: torch.Tensor, state: torch.Tensor | None = None):
        hidden, state = self.gru(self.embed(inputs), state)
        return self.head(hidden), state


@torch.no_grad()
def sample(policy: TinyPolicy, prompts: torch.Tensor, generator: torch.Generator):
    """Rollouts: `LENGTH` tokens per prompt, sampled from the policy at temperature 1."""
    inputs, state, tokens = (prompts + DIGITS)[:, None], None, []
    for _ in range(LENGTH):
        logits, state = policy(inputs, state)
        probs = torch.softmax(logits[:, -1].float(), dim=-1)
        inputs = torch.multinomial(probs, 1, generator=generator)
        tokens.append(inputs)
    return torch.cat(tokens, dim=1)


def teacher_forced_logits(policy: TinyPolicy, prompts: torch.Tensor, tokens: torch.Tensor):
    """`[B, LENGTH, DIGITS]` logits; position t scores tokens[:, t]."""
    inputs = torch.cat([(prompts + DIGITS)[:, None], tokens[:, :-1]], dim=1)
    return policy(inputs)[0]


def reward(prompts: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """1.0 when the prompt digit appears at least MIN_HITS times and never twice in a row."""
    hits = tokens == prompts[:, None]
    adjacent = (hits[:, 1:] & hits[:, :-1]).any(dim=1)
    return ((hits.sum(dim=1) >= MIN_HITS) & ~adjacent).float()


@dataclass
class RunResult:
    rewards: list[float] = field(default_factory=list)  # batch mean reward per step
    losses: list[float] = field(default_factory=list)  # every update's loss
    parameter_change: float = 0.0  # L2 norm of (final - initial) parameters


def make_loss(algorithm: str, **shaping_options) -> nn.Module:
    """The algorithm's loss module; `shaping_options` override GTPO / GRPO-S defaults."""
    if algorithm == "gtpo":
        return ek.GTPOLoss(**shaping_options)
    if algorithm == "grpo_s":
        return ek.GRPOSLoss(**shaping_options)
    if algorithm == "grpo":
        return ek.PolicyLoss(clip_low=CLIP_LOW, clip_high=CLIP_HIGH)
    raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}")


def train(
    algorithm: str,
    seed: int,
    steps: int,
    *,
    prompts_per_step: int = 8,
    group_size: int = 8,
    updates_per_step: int = 2,
    lr: float = 1e-2,
    device: str = "cpu",
    **shaping_options,
) -> RunResult:
    """One run: `steps` of (sample, score, shape advantages, `updates_per_step` updates).

    `shaping_options` (e.g. `normalize="separate"`, `filter_groups=False`) override the
    library's defaults of GTPO / GRPO-S; none are given by default.
    """
    torch.manual_seed(seed)
    generator = torch.Generator(device=device).manual_seed(seed)
    policy = TinyPolicy().to(device)
    initial = [p.detach().clone() for p in policy.parameters()]
    optimizer = torch.optim.Adam(policy.parameters(), lr=lr)
    loss_fn = make_loss(algorithm, **shaping_options)
    result = RunResult()

    for _ in range(steps):
        # Rollouts: each prompt digit is answered group_size times (consecutive rows).
        prompt_digits = torch.randint(
            0, DIGITS, (prompts_per_step,), generator=generator, device=device
        )
        prompts = prompt_digits.repeat_interleave(group_size)
        tokens = sample(policy, prompts, generator)
        rewards = reward(prompts, tokens)
        mask = torch.ones_like(tokens, dtype=torch.bool)
        result.rewards.append(rewards.mean().item())

        # Scoring: the rollout policy's log-probs and entropy in one pass, no gradient.
        with torch.no_grad():
            old_logprobs, old_entropy = ek.logprobs_and_entropy(
                teacher_forced_logits(policy, prompts, tokens), tokens
            )
        if algorithm == "grpo":
            advantages = ek.grpo_advantages(rewards, group_size)

        for _ in range(updates_per_step):
            logits = teacher_forced_logits(policy, prompts, tokens)
            if algorithm == "grpo":
                out = loss_fn(logits, tokens, advantages, mask, old_logprobs=old_logprobs)
            else:
                out = loss_fn(
                    logits,
                    tokens,
                    rewards,
                    mask,
                    group_size,
                    old_logprobs=old_logprobs,
                    old_entropy=old_entropy,
                )
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            optimizer.step()
            result.losses.append(out.loss.item())

    result.parameter_change = math.sqrt(
        sum(
            float((p.detach() - p0).square().sum())
            for p, p0 in zip(policy.parameters(), initial, strict=True)
        )
    )
    return result


def window_mean(values: list[float], start: int, stop: int) -> float:
    return statistics.fmean(values[start:stop])


def main(argv: list[str] | None = None) -> dict[str, list[RunResult]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=100, help="rollout steps per run")
    parser.add_argument("--seeds", type=int, default=4, help="runs per algorithm (seeds 0..n-1)")
    parser.add_argument(
        "--algorithms", default=",".join(ALGORITHMS), help=f"comma-separated, of {ALGORITHMS}"
    )
    parser.add_argument(
        "--gtpo-normalize",
        default=None,
        choices=("zero-filled", "separate", "joint", "none"),
        help="override GTPO's advantage normalisation (default: the library's, zero-filled)",
    )
    parser.add_argument(
        "--no-filter-groups",
        action="store_true",
        help="keep groups whose rows all succeeded or all failed (GTPO / GRPO-S)",
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args(argv)
    algorithms = [name for name in args.algorithms.split(",") if name]
    for name in algorithms:
        if name not in ALGORITHMS:
            parser.error(f"unknown algorithm {name!r}; choose from {ALGORITHMS}")
    torch.set_num_threads(args.threads)

    print(
        f"task: write {LENGTH} digits of {DIGITS} containing the prompt digit at least "
        f"{MIN_HITS} times, never twice in a row (reward 1 or 0)"
    )
    results: dict[str, list[RunResult]] = {}
    for name in algorithms:
        options = {}
        if args.no_filter_groups and name != "grpo":
            options["filter_groups"] = False
        if args.gtpo_normalize is not None and name == "gtpo":
            options["normalize"] = args.gtpo_normalize
        started = time.perf_counter()
        results[name] = [
            train(name, seed, args.steps, device=args.device, **options)
            for seed in range(args.seeds)
        ]
        elapsed = time.perf_counter() - started
        print(f"{name}: {args.seeds} seed(s) x {args.steps} steps in {elapsed:.1f} s")

    # Learning curves: mean reward over seeds, in windows of steps.
    window = max(1, args.steps // 10)
    print(f"\nmean reward per {window}-step window (average over seeds)")
    print("steps      " + "".join(f"{name:>9}" for name in algorithms))
    for start in range(0, args.steps, window):
        stop = min(start + window, args.steps)
        row = [
            statistics.fmean(window_mean(run.rewards, start, stop) for run in results[name])
            for name in algorithms
        ]
        print(f"{start:>4}-{stop - 1:<5} " + "".join(f"{value:9.3f}" for value in row))

    print(f"\n{'algorithm':<10}{'start':>8}{'end':>8}   (mean reward, first / last {window} steps)")
    for name in algorithms:
        runs = results[name]
        start = statistics.fmean(window_mean(run.rewards, 0, window) for run in runs)
        end = statistics.fmean(
            window_mean(run.rewards, args.steps - window, args.steps) for run in runs
        )
        print(f"{name:<10}{start:8.3f}{end:8.3f}")
    return results


if __name__ == "__main__":
    main()
