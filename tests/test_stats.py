"""Paired seed-by-seed comparisons: interval, p-value and a verdict that follows the interval."""

import math

import pytest
from scipy import stats

from trainer.stats import describe, mean_std, paired


def test_interval_and_p_match_scipy_paired_t():
    row, base = [0.71, 0.74, 0.70, 0.76, 0.73], [0.70, 0.72, 0.69, 0.73, 0.72]
    result = paired(row, base)
    diff = [a - b for a, b in zip(row, base, strict=True)]
    ref = stats.ttest_rel(row, base)
    assert result.p == pytest.approx(ref.pvalue, rel=1e-9)
    low, high = stats.t.interval(0.95, len(diff) - 1, loc=sum(diff) / 5, scale=stats.sem(diff))
    assert (result.low, result.high) == (pytest.approx(low), pytest.approx(high))
    assert result.verdict == "above baseline"


def test_verdict_follows_the_interval_not_the_mean():
    noisy = paired([0.80, 0.60, 0.75], [0.70, 0.70, 0.70])  # mean +0.017 but the interval spans 0
    assert noisy.mean > 0 and noisy.low < 0 < noisy.high
    assert noisy.verdict.startswith("no difference")
    assert paired([0.5, 0.6, 0.55], [0.6, 0.7, 0.66]).verdict == "below baseline"


def test_missing_values_drop_their_seed_and_too_few_pairs_are_undecided():
    result = paired([0.7, None, 0.8], [0.6, 0.6, None])
    assert result.n == 1 and math.isnan(result.low) and result.verdict.startswith("undecided")
    assert mean_std([None, 1.0, 3.0]) == (2.0, pytest.approx(math.sqrt(2)), 2)


def test_one_seed_shows_no_spread_and_no_interval():
    assert math.isnan(mean_std([0.5])[1])  # a std of one value is undefined, never 0
    assert describe([0.5, None], 3) == "0.500 (1 seed)"
    assert describe([None]) == "n/a" and describe([0.5, 0.7], 2) == "0.60 ± 0.14"
    one = paired([0.7], [0.6])
    assert one.interval == "n/a" and one.p_text == "n/a"
    assert paired([0.5, 0.6, 0.55], [0.6, 0.7, 0.66]).interval.startswith("[-0.")
