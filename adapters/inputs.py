"""Uniform samples and per-feature summaries of a model's inputs, for drift monitoring.

- `Reservoir` keeps a uniform sample of a stream of unknown length in bounded memory (Li's
  "Algorithm L": it draws how many items to skip, so a chunk costs one slice while nothing is
  kept). Every item is equally likely to be kept wherever it is in the stream: data written in
  repeating blocks cannot line up with the sample the way taking every k-th item does.
- `summarize_file` is a batch job's `score_summary.inputs`: per feature, the percentiles of a
  uniform sample of rows for numbers, the shares of each value for strings and booleans. It
  reads the dataset once more in 1 MiB chunks (beside the model's run), keeps `INPUT_SAMPLE`
  rows and parses only those. Bounded: at most `MAX_FEATURES` features, `MAX_CATEGORIES`
  values per feature (the rest counted as `OTHER`), each value cut to `MAX_VALUE_CHARS`.
- `feature_kinds` and `value_of` say how a feature is summarized and what one of its values
  counts as; the control service's score monitor uses the same two on realtime requests, so a
  realtime version and a batch version summarize their inputs the same way.
"""
from __future__ import annotations

import csv
import io
import logging
import math
import random
from pathlib import Path
from typing import Any, Iterable, Optional

from .stats import quantile

log = logging.getLogger(__name__)

INPUT_SAMPLE = 4096       # rows of a batch dataset kept (a uniform reservoir) for its input summary
INPUT_SEED = 21
MAX_FEATURES = 64         # features summarized (the manifest's first ones)
MAX_CATEGORIES = 50       # values kept per string/boolean feature; the rest are counted as OTHER
MAX_VALUE_CHARS = 100
MAX_LINE = 1 << 16        # a sampled line longer than this is not kept (no real row of features is)
OTHER = "(other)"
MISSING = "(missing)"
CHUNK = 1 << 20


class Reservoir:
    """A uniform sample of at most `k` of the items given to `add`, in bounded memory."""

    def __init__(self, k: int, seed: int = INPUT_SEED) -> None:
        self.k = k
        self.items: list = []
        self.seen = 0
        self._rng = random.Random(seed)
        self._w = 1.0
        self._next = 0   # index (in the stream) of the next item that replaces one kept

    def _draw(self) -> None:
        rnd = self._rng.random
        self._w *= math.exp(math.log(1.0 - rnd()) / self.k)
        gap = math.log(1.0 - rnd()) / math.log(1.0 - self._w) if self._w < 1.0 else 0.0
        self._next += int(math.floor(gap)) + 1

    def add(self, values: Iterable) -> None:
        values = values if isinstance(values, list) else list(values)
        start, n = self.seen, len(values)
        i = 0
        if len(self.items) < self.k:
            i = min(self.k - len(self.items), n)
            self.items.extend(values[:i])
            if len(self.items) == self.k:
                self._next = self.k - 1
                self._draw()
        if len(self.items) == self.k and self._next < start + n:
            items, k, end = self.items, self.k, start + n
            rnd, log, exp = self._rng.random, math.log, math.exp
            w, nxt = self._w, self._next
            while nxt < end:   # the draws of `_draw`, inlined: this loop is the reservoir's cost
                items[int(rnd() * k)] = values[nxt - start]
                w *= exp(log(1.0 - rnd()) / k)
                nxt += int(log(1.0 - rnd()) / log(1.0 - w)) + 1 if w < 1.0 else 1
            self._w, self._next = w, nxt
        self.seen = start + n


# -- what a feature's values count as ---------------------------------------------------------

def feature_kinds(features: Any) -> dict[str, str]:
    """`{name: "number" | "category"}` of a manifest's features (a list of dicts or of Feature
    objects), at most MAX_FEATURES; numbers and integers are numbers, strings and booleans categories."""
    out: dict[str, str] = {}
    for f in features or []:
        name = f.get("name") if isinstance(f, dict) else getattr(f, "name", None)
        ftype = f.get("type") if isinstance(f, dict) else getattr(f, "type", None)
        if not isinstance(name, str) or len(out) >= MAX_FEATURES:
            continue
        out[name] = "number" if ftype in ("number", "integer") else "category"
    return out


def value_of(kind: str, value: Any) -> Any:
    """A number feature's value as a finite float (None when missing or not a number); a
    category's as a short string (booleans and their CSV spellings as "true"/"false")."""
    if value is None or value == "":
        return None
    if kind == "number":
        if isinstance(value, bool):
            return None
        try:
            x = float(value)
        except (TypeError, ValueError):
            return None
        return x if math.isfinite(x) else None
    if isinstance(value, bool):
        return "true" if value else "false"
    text = str(value).strip()
    if text.lower() in ("true", "false"):
        return text.lower()
    return text[:MAX_VALUE_CHARS]


def summarize_values(kind: str, values: list) -> dict:
    """One feature's summary of its values (already through `value_of`): a number's count,
    missing and 101 percentiles; a category's count, missing and value shares (bounded)."""
    present = [v for v in values if v is not None]
    missing = len(values) - len(present)
    if kind == "number":
        s = sorted(present)
        return {"type": "number", "count": len(s), "missing": missing,
                "percentiles": [quantile(s, i / 100) for i in range(101)] if s else []}
    counts: dict[str, int] = {}
    for v in present:
        counts[v] = counts.get(v, 0) + 1
    return {"type": "category", "count": len(present), "missing": missing,
            "shares": category_shares(counts)}


def category_shares(counts: dict[str, int]) -> dict[str, float]:
    """Shares of each value, the MAX_CATEGORIES most common kept and the rest summed as OTHER."""
    total = sum(counts.values())
    if not total:
        return {}
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    kept = ranked[:MAX_CATEGORIES]
    out = {k: round(n / total, 6) for k, n in kept}
    rest = sum(n for _, n in ranked[MAX_CATEGORIES:])
    if rest:
        out[OTHER] = round(out.get(OTHER, 0) + rest / total, 6)
    return out


def summarize_rows(kinds: dict[str, str], rows: list[dict]) -> dict:
    """`{feature: summary}` of rows given as dicts (missing keys count as missing values)."""
    return {name: summarize_values(kind, [value_of(kind, r.get(name)) for r in rows])
            for name, kind in kinds.items()}


# -- a batch dataset --------------------------------------------------------------------------

def _sample_lines(path: Path) -> tuple[Optional[bytes], list[bytes], int, bool]:
    """(header line, a uniform sample of the data lines, data lines, whether the csv module must
    read the file instead: quotes can hold newlines)."""
    res = Reservoir(INPUT_SAMPLE)
    header: Optional[bytes] = None
    carry = b""
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            if b'"' in chunk:
                return None, [], 0, True
            block = carry + chunk
            cut = block.rfind(b"\n") + 1
            block, carry = block[:cut], block[cut:]
            if not block:
                if len(carry) > 64 * MAX_LINE:
                    carry = carry[-MAX_LINE:]   # one absurd line: never a kept row
                continue
            lines = block.split(b"\n")
            lines.pop()   # after the last newline
            if header is None:
                header = lines.pop(0)
            res.add([ln for ln in lines if ln.strip()])
    if carry.strip():
        if header is None:
            header = carry
        else:
            res.add([carry])
    return header, res.items, res.seen, False


def summarize_file(features: Any, path: Path) -> Optional[dict]:
    """A CSV dataset's input summary: `{"rows", "sampled", "features": {name: summary}}`; None
    (and a warning logged) when it cannot be read: a job never fails for its summary."""
    try:
        kinds = feature_kinds(features)
        header_line, lines, seen, quoted = _sample_lines(path)
        if quoted:
            res = Reservoir(INPUT_SAMPLE)
            with open(path, newline="", encoding="utf-8-sig") as f:
                reader = csv.reader(f)
                header = next(reader, None) or []
                batch: list = []
                for rec in reader:
                    if rec and any(rec):
                        batch.append(rec)
                        if len(batch) >= 10_000:
                            res.add(batch)
                            batch = []
                res.add(batch)
            records, seen = res.items, res.seen
        else:
            if header_line is None:
                return None
            header = next(csv.reader([header_line.decode("utf-8-sig").rstrip("\r")]), [])
            text = "\n".join(ln.decode("utf-8").rstrip("\r") for ln in lines if len(ln) <= MAX_LINE)
            records = list(csv.reader(io.StringIO(text))) if text else []
        columns = {h.strip(): i for i, h in enumerate(header)}
        out: dict = {}
        for name, kind in kinds.items():
            i = columns.get(name)
            values = [value_of(kind, rec[i] if i is not None and i < len(rec) else None) for rec in records]
            out[name] = summarize_values(kind, values)
        return {"rows": seen, "sampled": len(records), "features": out}
    except (OSError, ValueError, UnicodeDecodeError, csv.Error) as e:
        log.warning("the inputs' summary could not be computed: %s", e)
        return None
