"""Spread of interleaved timings, ratios against ours, and the "noisy" flags of the table.

The harness times the implementations of a cell in rounds (one call of each per round, see
``measure.interleaved_samples``), so round ``r`` of every implementation ran under the same
conditions and the per-round ratio ``time[r] / ours[r]`` cancels slow drifts of the machine.
A figure is flagged when its spread is too wide to rank on:

- an implementation whose slowest round took more than :data:`NOISY_SPREAD` times its
  fastest (its median can be off by that much);
- a ratio against ours whose per-round values lie on both sides of 1 (ours was faster in
  some rounds and slower in others: the two cannot be ranked).

Pure functions of the samples: tests inject outliers here directly.
"""

from __future__ import annotations

import statistics

NOISY_SPREAD = 1.5


def summarize(samples: dict[str, list[float]], ours: str | None) -> dict[str, dict]:
    """Per implementation: median, min and max milliseconds, and against `ours` the ratio of
    medians with the min..max of per-round ratios; ``noise`` lists why a figure is flagged.

    `samples` maps each implementation to its per-round times (ms), all of equal length, round
    ``r`` of each taken in the same round.
    """
    lengths = {len(times) for times in samples.values()}
    if len(lengths) > 1 or 0 in lengths:
        raise ValueError(f"samples: every implementation needs the same rounds, got {lengths}")
    summary = {}
    for impl, times in samples.items():
        low, high = min(times), max(times)
        entry = {
            "time_ms": statistics.median(times),
            "time_min_ms": low,
            "time_max_ms": high,
            "rounds": len(times),
            "noise": [],
        }
        if high > NOISY_SPREAD * low:
            entry["noise"].append(
                f"times vary {low:.3g}..{high:.3g} ms over {len(times)} rounds "
                f"(max/min {high / low:.2f} > {NOISY_SPREAD})"
            )
        summary[impl] = entry
    if ours not in summary:
        return summary
    for impl, entry in summary.items():
        if impl == ours:
            continue
        per_round = [t / o for t, o in zip(samples[impl], samples[ours], strict=True)]
        entry["time_over_ours"] = entry["time_ms"] / summary[ours]["time_ms"]
        entry["ratio_min"], entry["ratio_max"] = min(per_round), max(per_round)
        if entry["ratio_min"] <= 1.0 <= entry["ratio_max"]:
            entry["noise"].append(
                f"cannot rank against ours: per-round ratio {entry['ratio_min']:.2f}.."
                f"{entry['ratio_max']:.2f} lies on both sides of 1"
            )
    return summary


def peak_ratio(peak: int | None, ours_peak: int | None) -> float | None:
    """Peak memory over ours' peak; None where either is unknown or ours' is zero."""
    if peak is None or not ours_peak:
        return None
    return peak / ours_peak


RULE = (
    f"noisy: an implementation whose slowest round took over {NOISY_SPREAD}x its fastest, or a "
    "ratio against ours whose per-round values lie on both sides of 1 (cannot rank)"
)
