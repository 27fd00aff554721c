"""Score statistics: quantiles, histograms, the population stability index, the Kolmogorov–Smirnov
distance, and the comparison of two versions' scores on the same rows.

Pure Python on lists of floats (the adapter has already checked every score is a finite number),
used by version comparison, shadow traffic and score monitoring alike so the three report the same
figures the same way.

Drift, as reported here:

- **PSI** (population stability index) of `actual` against `expected`, over the deciles of
  `expected`: sum over bins of (a - e) * ln(a / e), proportions floored at `PSI_FLOOR` so an
  empty bin counts as rare, not impossible. The usual reading: below 0.1 no real shift, 0.1–0.25
  a moderate one, above 0.25 a major one.
- **KS**: the largest distance between the two empirical distribution functions, 0 to 1.
"""
from __future__ import annotations

import bisect
import math
from typing import Iterable, Optional, Sequence

from adapters.stats import quantile

QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)
PSI_BINS = 10
PSI_FLOOR = 1e-4
DISPLAY_BINS = 20


def quantiles(values: Iterable[float], qs: Sequence[float] = QUANTILES, *, presorted: bool = False) -> dict:
    """`{"p1": …, "p50": …, …}` plus min, max, mean and count; Nones for no values."""
    s = list(values) if presorted else sorted(values)
    out = {"count": len(s), "min": s[0] if s else None, "max": s[-1] if s else None,
           "mean": math.fsum(s) / len(s) if s else None}
    for q in qs:
        out[f"p{q * 100:g}"] = quantile(s, q)
    return out


def decile_edges(sorted_reference: Sequence[float], bins: int = PSI_BINS) -> list[float]:
    """The inner bin edges that split the reference into `bins` parts of equal count (duplicates
    dropped, so a reference with few distinct values gets fewer, wider bins)."""
    edges: list[float] = []
    for i in range(1, bins):
        e = quantile(sorted_reference, i / bins)
        if e is not None and (not edges or e > edges[-1]):
            edges.append(e)
    return edges


def bin_counts(values: Iterable[float], inner_edges: Sequence[float]) -> list[int]:
    """Counts in the len(inner_edges) + 1 bins (-inf, e0], (e0, e1], …, (e_last, inf)."""
    counts = [0] * (len(inner_edges) + 1)
    left = bisect.bisect_left
    for v in values:
        counts[left(inner_edges, v)] += 1
    return counts


def psi_counts(expected: Sequence[int], actual: Sequence[int], floor: float = PSI_FLOOR) -> Optional[float]:
    """PSI of two count vectors over the same bins; None when either side is empty."""
    te, ta = sum(expected), sum(actual)
    if te == 0 or ta == 0:
        return None
    total = 0.0
    for e, a in zip(expected, actual):
        pe, pa = max(e / te, floor), max(a / ta, floor)
        total += (pa - pe) * math.log(pa / pe)
    return total


def psi(expected: Sequence[float], actual: Sequence[float], *, bins: int = PSI_BINS) -> Optional[float]:
    """PSI of `actual` against `expected` over the deciles of `expected`."""
    if not expected or not actual:
        return None
    ref = sorted(expected)
    edges = decile_edges(ref, bins)
    return psi_counts(bin_counts(ref, edges), bin_counts(actual, edges))


def ks(a: Sequence[float], b: Sequence[float], *, presorted: bool = False) -> Optional[float]:
    """Two-sample Kolmogorov–Smirnov distance: max |F_a(x) - F_b(x)|."""
    if not a or not b:
        return None
    sa = a if presorted else sorted(a)
    sb = b if presorted else sorted(b)
    na, nb = len(sa), len(sb)
    i = j = 0
    d = 0.0
    while i < na and j < nb:
        x = sa[i] if sa[i] <= sb[j] else sb[j]
        while i < na and sa[i] <= x:
            i += 1
        while j < nb and sb[j] <= x:
            j += 1
        d = max(d, abs(i / na - j / nb))
    return d


def histogram(values: Sequence[float], *, lo: float, hi: float, bins: int = DISPLAY_BINS) -> list[int]:
    """Counts over `bins` equal-width bins on [lo, hi]; values outside go to the end bins."""
    counts = [0] * bins
    width = (hi - lo) / bins if hi > lo else 0.0
    for v in values:
        k = int((v - lo) / width) if width else 0
        counts[min(max(k, 0), bins - 1)] += 1
    return counts


def display_edges(*series: Sequence[float], bins: int = DISPLAY_BINS) -> list[float]:
    """`bins + 1` equal-width edges covering every value of every series (for overlaid charts)."""
    lo = min((min(s) for s in series if s), default=0.0)
    hi = max((max(s) for s in series if s), default=1.0)
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    return [lo + (hi - lo) * i / bins for i in range(bins + 1)]


def drift(reference: Sequence[float], current: Sequence[float]) -> dict:
    """PSI and KS of `current` against `reference` (None where either is empty)."""
    return {"psi": _round(psi(reference, current)), "ks": _round(ks(reference, current)),
            "reference_count": len(reference), "current_count": len(current)}


def compare(a: Sequence[float], b: Sequence[float], *, threshold: Optional[float] = None,
            top: int = 20, row_ids: Optional[Sequence] = None, labels: tuple[str, str] = ("a", "b")) -> dict:
    """Compare two versions' scores on the same rows (row i of `a` and of `b` are the same input).

    Reports the per-row differences (b - a): their quantiles and the `top` largest by size with
    their row numbers; each side's quantiles; PSI of b against a and the KS distance; with a
    `threshold`, the rows whose decision (score >= threshold) differs between the two; and both
    distributions on common bins for an overlaid chart.
    """
    if len(a) != len(b):
        raise ValueError(f"the two versions scored different numbers of rows ({len(a)} and {len(b)})")
    la, lb = labels
    n = len(a)
    ids = list(row_ids) if row_ids is not None else list(range(1, n + 1))
    diffs = [y - x for x, y in zip(a, b)]
    sa, sb = sorted(a), sorted(b)
    abs_sorted = sorted(abs(d) for d in diffs)
    order = sorted(range(n), key=lambda i: abs(diffs[i]), reverse=True)[:max(0, top)]
    report: dict = {
        "rows": n,
        "labels": {"a": la, "b": lb},
        "quantiles": {la: _rounded(quantiles(sa, presorted=True)), lb: _rounded(quantiles(sb, presorted=True))},
        "difference": {
            "mean": _round(math.fsum(diffs) / n) if n else None,
            "mean_abs": _round(math.fsum(abs_sorted) / n) if n else None,
            "max_abs": _round(abs_sorted[-1]) if n else None,
            "p50_abs": _round(quantile(abs_sorted, 0.5)),
            "p95_abs": _round(quantile(abs_sorted, 0.95)),
            "identical_rows": sum(1 for d in diffs if d == 0),
        },
        "drift": {"psi": _round(psi(sa, sb)), "ks": _round(ks(sa, sb, presorted=True))},
        "largest": [{"row": ids[i], la: a[i], lb: b[i], "difference": _round(diffs[i])} for i in order],
    }
    if threshold is not None:
        flips = [i for i in range(n) if (a[i] >= threshold) != (b[i] >= threshold)]
        report["threshold"] = threshold
        report["flips"] = {
            "count": len(flips),
            "share": _round(len(flips) / n) if n else None,
            "to_positive": sum(1 for i in flips if b[i] >= threshold),
            "to_negative": sum(1 for i in flips if b[i] < threshold),
            "rows": [{"row": ids[i], la: a[i], lb: b[i]} for i in flips[:max(0, top) * 5]],
        }
    edges = display_edges(sa, sb)
    report["histogram"] = {"edges": [_round(e) for e in edges],
                           la: histogram(sa, lo=edges[0], hi=edges[-1]),
                           lb: histogram(sb, lo=edges[0], hi=edges[-1])}
    return report


def _round(x: Optional[float], digits: int = 6) -> Optional[float]:
    return None if x is None else round(x, digits)


def _rounded(d: dict) -> dict:
    return {k: (_round(v) if isinstance(v, float) else v) for k, v in d.items()}


# -- input drift: per feature, and references merged from several jobs ---------------------------

def share_psi(expected: dict, actual: dict, floor: float = PSI_FLOOR) -> Optional[float]:
    """PSI over category shares (`{value: share}`; a value one side lacks has share 0 there,
    floored like an empty bin); None when either side is empty."""
    if not expected or not actual:
        return None
    te, ta = math.fsum(expected.values()), math.fsum(actual.values())
    if te <= 0 or ta <= 0:
        return None
    total = 0.0
    for k in set(expected) | set(actual):
        pe, pa = max(expected.get(k, 0) / te, floor), max(actual.get(k, 0) / ta, floor)
        total += (pa - pe) * math.log(pa / pe)
    return total


def merge_points(parts: Sequence[tuple[Sequence[float], int]], n: int = 101) -> list[float]:
    """`n` quantile points of the union of several samples, each given as its quantile points
    and how many values they stand for (a batch reference filled from several jobs)."""
    pairs = sorted((x, count / len(points)) for points, count in parts if points and count > 0 for x in points)
    if not pairs:
        return []
    total = math.fsum(w for _, w in pairs)
    pos, cum = [], 0.0
    for _, w in pairs:
        pos.append((cum + w / 2) / total)
        cum += w
    xs = [x for x, _ in pairs]
    out = []
    for i in range(n):
        q = i / (n - 1)
        k = bisect.bisect_left(pos, q)
        if k <= 0:
            out.append(xs[0])
        elif k >= len(xs):
            out.append(xs[-1])
        else:
            t = (q - pos[k - 1]) / (pos[k] - pos[k - 1]) if pos[k] > pos[k - 1] else 0.0
            out.append(xs[k - 1] + (xs[k] - xs[k - 1]) * t)
    return out


def feature_drift(reference: dict, recent: dict) -> dict:
    """PSI of one feature's recent summary against its reference's (adapters/inputs.py
    summaries: numbers over the reference's deciles, categories over their shares), with what a
    chart needs: the decile bins' shares of a number, the value shares of a category."""
    kind = reference.get("type")
    if kind == "number":
        ref = sorted(reference.get("percentiles") or [])
        cur = sorted(recent.get("percentiles") or [])
        edges = decile_edges(ref)
        out = {"type": "number", "psi": _round(psi(ref, cur)) if ref and cur else None,
               "bins": {"edges": [_round(e) for e in edges],
                        "reference": _share_list(bin_counts(ref, edges)),
                        "recent": _share_list(bin_counts(cur, edges))},
               "reference": {k: _round(quantile(ref, q)) for k, q in (("p5", .05), ("p50", .5), ("p95", .95))},
               "recent": {k: _round(quantile(cur, q)) for k, q in (("p5", .05), ("p50", .5), ("p95", .95))}}
    else:
        ref_s, cur_s = reference.get("shares") or {}, recent.get("shares") or {}
        out = {"type": "category", "psi": _round(share_psi(ref_s, cur_s)),
               "reference": {"shares": dict(ref_s)}, "recent": {"shares": dict(cur_s)}}
    out["reference"]["count"] = int(reference.get("count") or 0)
    out["recent"]["count"] = int(recent.get("count") or 0)
    return out


def _share_list(counts: list[int]) -> list[Optional[float]]:
    total = sum(counts)
    return [round(c / total, 6) if total else None for c in counts]
