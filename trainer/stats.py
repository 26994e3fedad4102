"""Paired comparisons of runs over seeds, for ablation tables a reader can trust.

Rows of an ablation share their seeds, so a row and the baseline are compared seed by seed: the
difference d_s = row_s - baseline_s, its mean, a 95% Student-t interval (n - 1 degrees of freedom)
and the two-sided paired t-test p-value. The verdict follows the interval, never the mean alone: a
row is "above" or "below" the baseline only when the whole interval is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats

LEVEL = 0.95


@dataclass
class Paired:
    n: int  # seeds with a value in both rows
    mean: float  # mean of row - baseline
    low: float  # 95% interval of the mean difference (nan for n < 2)
    high: float
    p: float  # two-sided paired t-test p-value (nan for n < 2 or zero variance)

    @property
    def interval(self) -> str:
        """ "[low, high]" with signs, or "n/a" where fewer than 2 seeds pair up."""
        return "n/a" if math.isnan(self.low) else f"[{self.low:+.4f}, {self.high:+.4f}]"

    @property
    def p_text(self) -> str:
        return "n/a" if math.isnan(self.p) else f"{self.p:.3g}"

    @property
    def verdict(self) -> str:
        if self.n < 2 or math.isnan(self.low):
            return "undecided (fewer than 2 paired seeds)"
        if self.low > 0:
            return "above baseline"
        if self.high < 0:
            return "below baseline"
        return "no difference shown (interval spans 0)"


def paired(row: list[float | None], baseline: list[float | None]) -> Paired:
    """Compare per-seed values (same seed order; None = missing, that seed is left out)."""
    pairs = [(a, b) for a, b in zip(row, baseline, strict=True) if a is not None and b is not None]
    diff = np.array([a - b for a, b in pairs], dtype=float)
    n = diff.size
    if n < 2:
        mean = float(diff.mean()) if n else math.nan
        return Paired(n, mean, math.nan, math.nan, math.nan)
    mean, sem = float(diff.mean()), float(diff.std(ddof=1) / math.sqrt(n))
    half = float(stats.t.ppf(0.5 + LEVEL / 2, n - 1)) * sem
    p = float(2 * stats.t.sf(abs(mean) / sem, n - 1)) if sem > 0 else (1.0 if mean == 0 else 0.0)
    return Paired(n, mean, mean - half, mean + half, p)


def mean_std(values: list[float | None]) -> tuple[float, float, int]:
    """Mean, std (n - 1) and n of the present values (nan for none; std nan for one: it is undefined)."""
    present = np.array([v for v in values if v is not None], dtype=float)
    if present.size == 0:
        return math.nan, math.nan, 0
    return float(present.mean()), float(present.std(ddof=1)) if present.size > 1 else math.nan, present.size


def describe(values: list[float | None], decimals: int = 4) -> str:
    """ "mean ± std" over seeds; one value reads "x (1 seed)" (no spread to show), none "n/a"."""
    mean, std, n = mean_std(values)
    if n == 0:
        return "n/a"
    if n == 1:
        return f"{mean:.{decimals}f} (1 seed)"
    return f"{mean:.{decimals}f} ± {std:.{decimals}f}"
