"""Paired comparison of a row's per-seed results with its baseline's (the report's paired Δacc).

Trials of one seed share data order and augmentation across cells, so a KD row's gain is taken seed by seed
against the student alone of that seed, and the seeds' gains give the interval. The interval is the two-sided 95%
Student-t interval over the per-seed gains, mean ± t(0.975, n-1) · sd / √n (sample sd, ddof=1), for every n ≥ 2:
no bootstrap, whose percentiles would be coarse with the few seeds a sweep runs.
"""
from __future__ import annotations

import math
import statistics
from collections.abc import Mapping
from dataclasses import dataclass

from scipy.stats import t as student_t

CONFIDENCE = 0.95


@dataclass(frozen=True)
class PairedGain:
    """The gain of a row over its baseline on the seeds both have. `mean` is None without a common seed; `low`
    and `high` (the interval) are None with fewer than two, since one seed's gain has no spread to measure."""

    seeds: tuple[int, ...]
    mean: float | None
    low: float | None
    high: float | None

    @property
    def n(self) -> int:
        return len(self.seeds)

    @property
    def has_interval(self) -> bool:
        return self.low is not None

    @property
    def established(self) -> bool:
        """The interval excludes 0 (either side); never without an interval."""
        return self.has_interval and (self.low > 0 or self.high < 0)


def paired_gain(row: Mapping[int, float], baseline: Mapping[int, float]) -> PairedGain:
    """row[seed] - baseline[seed] over the seeds present in both; a seed only one of them has is left out."""
    seeds = tuple(sorted(set(row) & set(baseline)))
    gains = [row[seed] - baseline[seed] for seed in seeds]
    if not gains:
        return PairedGain(seeds, None, None, None)
    mean = statistics.fmean(gains)
    if len(gains) == 1:
        return PairedGain(seeds, mean, None, None)
    half_width = float(student_t.ppf((1 + CONFIDENCE) / 2, len(gains) - 1)) * statistics.stdev(gains) / math.sqrt(len(gains))
    return PairedGain(seeds, mean, mean - half_width, mean + half_width)
