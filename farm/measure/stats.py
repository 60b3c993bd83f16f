"""Statistics of the timing protocol: medians, bootstrap intervals, paired ratios (pure)."""

from __future__ import annotations

import numpy as np


def median(values: list[float]) -> float:
    return float(np.median(np.asarray(values, dtype=float)))


def bootstrap_ci(values: list[float], resamples: int = 2000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the median."""
    data = np.asarray(values, dtype=float)
    if data.size == 0:
        return (float("nan"), float("nan"))
    if data.size == 1:
        return (float(data[0]), float(data[0]))
    rng = np.random.default_rng(seed)
    medians = np.median(data[rng.integers(0, data.size, size=(resamples, data.size))], axis=1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(medians, [tail, 100 - tail])
    return (float(low), float(high))


def paired_speedups(reference: list[float], candidate: list[float]) -> list[float]:
    """Per-round reference/candidate time: >1 means the candidate is faster in that round."""
    return [r / c for r, c in zip(reference, candidate) if c > 0]


def overlap(a: tuple[float, float], b: tuple[float, float]) -> bool:
    return a[0] <= b[1] and b[0] <= a[1]


def noise_band(control_speedup_ci: tuple[float, float], control_median: float) -> float:
    """Half-width of the A/A noise around 1.0: how far two compilations of one kernel disagree."""
    return max(abs(control_speedup_ci[1] - 1), abs(1 - control_speedup_ci[0]), abs(control_median - 1))


def geomean(values: list[float]) -> float:
    data = np.asarray([v for v in values if v > 0], dtype=float)
    return float(np.exp(np.mean(np.log(data)))) if data.size else float("nan")


def process_level(groups: list[list[float]], resamples: int = 2000, seed: int = 0,
                  level: float = 0.95) -> tuple[float, tuple[float, float]]:
    """Speedup over processes: the geometric mean of each process's median paired ratio (every
    process one sample of what a user's process gets, whatever its number of rounds), and a
    two-level percentile bootstrap interval (processes drawn with replacement, then the rounds
    of each drawn process). `groups`: one list of paired ratios per process."""
    groups = [np.asarray(g, dtype=float) for g in groups if len(g)]
    if not groups:
        return float("nan"), (float("nan"), float("nan"))
    logs = np.log([np.median(g) for g in groups])
    rng = np.random.default_rng(seed)
    # Each process's bootstrap medians, one per resample (log scale): shape (processes, resamples).
    boot = np.log(np.stack([np.median(g[rng.integers(0, g.size, size=(resamples, g.size))], axis=1) for g in groups]))
    drawn = rng.integers(0, len(groups), size=(resamples, len(groups)))
    means = boot[drawn, np.arange(resamples)[:, None]].mean(axis=1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(np.exp(logs.mean())), (float(np.exp(low)), float(np.exp(high)))
