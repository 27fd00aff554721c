"""control/stats.py against direct computations from the definitions."""
import math
import random

import pytest

from control import stats


def _ecdf(values, x):
    return sum(1 for v in values if v <= x) / len(values)


def _ks_brute(a, b):
    return max(abs(_ecdf(a, x) - _ecdf(b, x)) for x in [*a, *b])


@pytest.mark.parametrize("seed", range(5))
def test_ks_matches_the_definition(seed):
    rng = random.Random(seed)
    a = [round(rng.gauss(0, 1), 1) for _ in range(rng.randint(1, 60))]   # rounded: ties on both sides
    b = [round(rng.gauss(0.3, 1.2), 1) for _ in range(rng.randint(1, 60))]
    assert stats.ks(a, b) == pytest.approx(_ks_brute(a, b))


def test_ks_bounds():
    assert stats.ks([1, 2, 3], [1, 2, 3]) == 0
    assert stats.ks([0, 0.1], [5, 6]) == 1
    assert stats.ks([], [1]) is None


def test_quantiles_interpolate_like_numpy():
    q = stats.quantiles([4, 1, 3, 2])
    assert (q["min"], q["max"], q["count"], q["mean"]) == (1, 4, 4, 2.5)
    assert q["p50"] == 2.5 and q["p25"] == pytest.approx(1.75) and q["p99"] == pytest.approx(3.97)
    assert stats.quantiles([])["p50"] is None


def test_psi_zero_for_the_same_distribution_and_large_for_a_shift():
    rng = random.Random(1)
    ref = [rng.random() for _ in range(5000)]
    same = [rng.random() for _ in range(5000)]
    shifted = [min(1.0, rng.random() + 0.3) for _ in range(5000)]
    assert stats.psi(ref, ref) == pytest.approx(0.0)
    assert stats.psi(ref, same) < 0.02
    assert stats.psi(ref, shifted) > 0.25


def test_psi_by_hand():
    # deciles of 0..9 (ten values): inner edges 0.9, 1.8, … so each value has its own bin
    ref = list(range(10))
    edges = stats.decile_edges(sorted(ref))
    assert stats.bin_counts(ref, edges) == [1] * 10
    actual = [0] * 5 + [9] * 5
    expected = sum((pa - 0.1) * math.log(pa / 0.1) for pa in [0.5, *[1e-4] * 8, 0.5])
    assert stats.psi(ref, actual) == pytest.approx(expected)


def test_compare_reports_flips_differences_and_quantiles():
    a = [0.1, 0.4, 0.6, 0.9, 0.5]
    b = [0.1, 0.55, 0.45, 0.9, 0.5]
    r = stats.compare(a, b, threshold=0.5, top=2, labels=("1.0.0", "1.1.0"))
    assert r["rows"] == 5
    assert r["flips"]["count"] == 2
    assert {f["row"] for f in r["flips"]["rows"]} == {2, 3}
    assert r["flips"]["to_positive"] == 1 and r["flips"]["to_negative"] == 1
    assert [x["row"] for x in r["largest"]] in ([2, 3], [3, 2])
    assert r["largest"][0]["difference"] in (0.15, -0.15)
    assert r["difference"]["identical_rows"] == 3
    assert r["quantiles"]["1.0.0"]["p50"] == 0.5
    assert sum(r["histogram"]["1.0.0"]) == 5 and sum(r["histogram"]["1.1.0"]) == 5
    assert len(r["histogram"]["edges"]) == stats.DISPLAY_BINS + 1


def test_compare_refuses_different_row_counts():
    with pytest.raises(ValueError, match="different numbers of rows"):
        stats.compare([1.0], [1.0, 2.0])


def test_share_psi_over_categories_and_merged_points():
    assert stats.share_psi({"a": 0.5, "b": 0.5}, {"a": 0.5, "b": 0.5}) == 0
    moved = stats.share_psi({"a": 0.7, "b": 0.3}, {"a": 0.2, "b": 0.8})
    assert moved > 0.25
    assert stats.share_psi({"a": 1.0}, {"a": 0.5, "new": 0.5}) > 0.25   # a value never seen counts
    assert stats.share_psi({}, {"a": 1.0}) is None
    # a 20-score job and a 2,000-score job merged: the large one dominates
    merged = stats.merge_points([([0.0] * 101, 20), ([float(i) for i in range(101)], 2000)])
    assert len(merged) == 101 and merged[0] == 0.0 and 45 < merged[50] < 55
