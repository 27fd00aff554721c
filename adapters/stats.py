"""The one quantile the adapter and the control service both compute (a batch job's score summary,
every comparison and drift figure): linear between closest ranks, numpy's default. Here, not in
control/stats.py, because the adapter imports nothing from control."""
from __future__ import annotations

import math
from typing import Optional, Sequence


def quantile(sorted_values: Sequence[float], q: float) -> Optional[float]:
    """The q-quantile of already sorted values; None for none."""
    n = len(sorted_values)
    if n == 0:
        return None
    pos = q * (n - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, n - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)
