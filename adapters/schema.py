"""Checking rows against a manifest's features, and a model's answer against its rows.

The adapter runs every request through `RowValidator` before the model sees it, so a model
only ever receives rows of the declared columns with values of the declared types.
"""
from __future__ import annotations

import math
from collections import deque
from typing import TYPE_CHECKING, Any, Callable, Iterable, Optional

if TYPE_CHECKING:  # the realtime adapter serves without importing pydantic (see adapters/served.py)
    from .manifest import Feature, Manifest

MAX_REPORTED_PROBLEMS = 100
FAST_PATH_ROWS = 8  # from this many rows a request is checked a column at a time (see RowValidator)
_INT64_MIN, _INT64_MAX = -2**63, 2**63 - 1
_TRUE = {"true", "t", "yes", "y", "1"}
_FALSE = {"false", "f", "no", "n", "0"}


class RowProblem(dict):
    """`{"row": i, "field": name, "error": what}`: one bad value, JSON-ready."""

    def __init__(self, row: Optional[int], field: Optional[str], error: str):
        super().__init__(row=row, field=field, error=error)


class RowsInvalid(ValueError):
    def __init__(self, problems: list[RowProblem], total: int):
        self.problems = problems
        self.total = total
        super().__init__(f"{total} problem(s) in the rows")

    def to_json(self) -> dict:
        body: dict[str, Any] = {"error": f"{self.total} invalid value(s) in the request", "problems": self.problems}
        if self.total > len(self.problems):
            body["truncated"] = self.total - len(self.problems)
        return body


def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _checker(feature: Feature) -> Callable[[Any], Any]:
    """A function returning the typed value, or raising ValueError with the reason."""
    allowed = set(feature.allowed) if feature.allowed is not None else None
    t = feature.type

    def check_allowed(v: Any) -> Any:
        if allowed is not None and v not in allowed:
            shown = ", ".join(map(str, feature.allowed[:10]))
            raise ValueError(f"{_describe(v)} is not allowed; expected one of: {shown}")
        return v

    if t == "number":
        def check(v: Any) -> Any:
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ValueError(f"expected a number; got {_describe(v)}")
            if isinstance(v, int) and not _INT64_MIN <= v <= _INT64_MAX:
                try:
                    v = float(v)  # past 64 bits: what any model's JSON reader would make of it
                except OverflowError:  # past float too (a JSON integer of 309+ digits)
                    raise ValueError(f"expected a finite number; got {_describe(v)}") from None
            if not math.isfinite(v):
                raise ValueError(f"expected a finite number; got {_describe(v)}")
            return check_allowed(v)
    elif t == "integer":
        def check(v: Any) -> Any:
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ValueError(f"expected an integer; got {_describe(v)}")
            if isinstance(v, float):
                if not math.isfinite(v):
                    raise ValueError(f"expected a finite integer; got {v}")
                if not v.is_integer():
                    raise ValueError(f"expected an integer; got {v}")
                v = int(v)
            if not _INT64_MIN <= v <= _INT64_MAX:
                raise ValueError(f"expected an integer in the 64-bit range; got {_describe(v)}")
            return check_allowed(v)
    elif t == "boolean":
        def check(v: Any) -> Any:
            if not isinstance(v, bool):
                raise ValueError(f"expected true or false; got {_describe(v)}")
            return check_allowed(v)
    else:
        def check(v: Any) -> Any:
            if not isinstance(v, str):
                raise ValueError(f"expected a string; got {_describe(v)}")
            return check_allowed(v)
    return check


def _text_parser(feature: Feature) -> Callable[[str], Any]:
    """Convert a CSV cell to the feature's type (the checker then applies the rules)."""
    t = feature.type
    if t == "number":
        def parse(s: str) -> Any:
            try:
                return float(s)
            except ValueError:
                return s
    elif t == "integer":
        def parse(s: str) -> Any:
            try:
                return int(s)
            except ValueError:
                try:
                    return float(s)
                except ValueError:
                    return s
    elif t == "boolean":
        def parse(s: str) -> Any:
            low = s.strip().lower()
            if low in _TRUE:
                return True
            if low in _FALSE:
                return False
            return s
    else:
        def parse(s: str) -> Any:
            return s
    return parse


# the value types a feature takes as they are, unconverted (bool is not an int here: type() is exact)
_FAST_TYPES = {"number": frozenset({float, int}), "integer": frozenset({int}), "boolean": frozenset({bool}),
               "string": frozenset({str})}


MISSING_COLUMN = "required column is missing"


class RowValidator:
    """Validates rows (dicts) for one manifest; compiled once, used for every request.

    A row holds the features and the manifest's passthrough columns: both are checked, and
    `split` gives them back apart (the model only ever gets the features). Problems number
    rows from 1; a required column absent from every row is one problem (`row` None)."""

    def __init__(self, manifest: Manifest):
        self.features = manifest.features
        self.passthrough = list(getattr(manifest, "passthrough", None) or [])
        self.names = [f.name for f in self.features]
        self.passthrough_names = [p.name for p in self.passthrough]
        columns = self.features + self.passthrough
        self._known = {f.name for f in columns}
        self._checks = [(f.name, f.required, _checker(f)) for f in columns]
        self._required = [f.name for f in columns if f.required]
        self._parsers = {f.name: _text_parser(f) for f in columns}
        self._fast = [(f.name, f.required, _FAST_TYPES[f.type],
                       frozenset(f.allowed) if f.allowed is not None else None, f.type) for f in columns]
        self._optional_features = [f.name for f in self.features if not f.required]
        self._width = len(columns)

    def validate(self, rows: Any, header: Optional[list[str]] = None) -> list[dict]:
        """The clean feature rows (see `split`); the passthrough values are dropped."""
        return self.split(rows, header)[0]

    def split(self, rows: Any, header: Optional[list[str]] = None) -> tuple[list[dict], Optional[dict[str, list]]]:
        """(clean rows: the features only, typed, None for a missing optional value;
        `{passthrough column: [value per row]}`, or None when the manifest declares none).

        `header`: the columns of a CSV the rows came from, which say which columns are missing.
        Many rows of good values are checked a column at a time and returned as they came, each
        completed in place with None for its missing optional values (so the caller's `rows`),
        its passthrough values taken out."""
        if type(rows) is list and len(rows) >= FAST_PATH_ROWS:
            clean = self._validate_fast(rows)
            if clean is not None:
                return clean
        return self._validate(rows, header)

    def _validate_fast(self, rows: list) -> Optional[tuple[list[dict], Optional[dict[str, list]]]]:
        """Column at a time, the common case: every value already of its declared type (no
        conversion), within its range and allowed list. None whenever a row might need a word
        said about it or a value converted: `_validate` then decides, row by row, as always."""
        known = self._known
        for row in rows:
            if type(row) is not dict or not known.issuperset(row):
                return None
        for name, required, types, allowed, t in self._fast:
            column = [row.get(name) for row in rows]
            present = column
            seen = set(map(type, column))
            if type(None) in seen:
                if required:
                    return None
                seen.discard(type(None))
                present = [v for v in column if v is not None]
            if not seen <= types:
                return None
            if present:
                if t == "number":
                    try:
                        if not math.isfinite(math.fsum(present)):
                            return None
                    except OverflowError:
                        return None
                    if int in seen:
                        ints = [v for v in present if type(v) is int]
                        if min(ints) < _INT64_MIN or max(ints) > _INT64_MAX:
                            return None  # past 64 bits: converted (slow path)
                elif t == "integer":
                    if min(present) < _INT64_MIN or max(present) > _INT64_MAX:
                        return None
                if allowed is not None and not allowed.issuperset(present):
                    return None
        width = self._width
        optional = self._optional_features
        for row in rows:
            if len(row) != width:  # no unknown keys: so some optional value is missing
                for name in optional:
                    if name not in row:
                        row[name] = None
        if not self.passthrough_names:
            return rows, None
        return rows, {name: [row.pop(name, None) for row in rows] for name in self.passthrough_names}

    def _validate(self, rows: Any, header: Optional[list[str]] = None
                  ) -> tuple[list[dict], Optional[dict[str, list]]]:
        if not isinstance(rows, list):
            raise RowsInvalid([RowProblem(None, None, 'expected "rows" to be a list of objects')], 1)
        problems: list[RowProblem] = []
        total = 0
        clean: list[dict] = []
        passthrough: Optional[dict[str, list]] = {n: [] for n in self.passthrough_names} if self.passthrough else None
        checks, known = self._checks, self._known
        # a required column no row has (or the CSV header lacks) is one problem, not one per row;
        # looked for only once a required value is missing (the common case never pays for it)
        absent: dict[str, bool] = {}

        def column_absent(name: str) -> bool:
            if name not in absent:
                if header is not None:
                    absent[name] = name not in header
                else:
                    absent[name] = not any(name in row for row in rows if isinstance(row, dict))
                if absent[name]:
                    column_problems.append(RowProblem(None, name, MISSING_COLUMN))
            return absent[name]

        column_problems: list[RowProblem] = []
        for i, row in enumerate(rows, 1):
            if not isinstance(row, dict):
                total += 1
                if len(problems) < MAX_REPORTED_PROBLEMS:
                    problems.append(RowProblem(i, None, f"expected an object of feature values; got {_describe(row)}"))
                continue
            out = {}
            for name, required, check in checks:
                v = row.get(name)
                if v is None:
                    if required and not column_absent(name):
                        total += 1
                        if len(problems) < MAX_REPORTED_PROBLEMS:
                            problems.append(RowProblem(i, name, "required value is missing"))
                    out[name] = None
                    continue
                try:
                    out[name] = check(v)
                except ValueError as e:
                    total += 1
                    if len(problems) < MAX_REPORTED_PROBLEMS:
                        problems.append(RowProblem(i, name, str(e)))
            if len(row) > len(out) or not known.issuperset(row):
                for key in row:
                    if key not in known:
                        total += 1
                        if len(problems) < MAX_REPORTED_PROBLEMS:
                            problems.append(RowProblem(i, key, self._unknown()))
            if passthrough is not None:
                for name in passthrough:
                    passthrough[name].append(out.pop(name, None))
            clean.append(out)
        if total or column_problems:
            total += len(column_problems)
            # the missing columns first, in the manifest's order
            order = {name: k for k, name in enumerate(self._required)}
            column_problems.sort(key=lambda p: order[p["field"]])
            problems = (column_problems + problems)[:MAX_REPORTED_PROBLEMS]
            raise RowsInvalid(problems, total)
        return clean, passthrough

    def _unknown(self) -> str:
        if self.passthrough:
            return "unknown column (not a declared feature or passthrough column)"
        return "unknown column (not a declared feature)"

    def rows_from_csv(self, header: list[str], records: Iterable[list[str]]) -> list[dict]:
        """Typed row dicts from CSV records; empty cells are missing values."""
        parsers = [self._parsers.get(h) for h in header]
        rows = []
        for rec in records:
            row = {}
            for h, p, cell in zip(header, parsers, rec):
                if cell == "":
                    continue
                row[h] = p(cell) if p else cell
            rows.append(row)
        return rows

    def header_problems(self, header: list[str]) -> list[RowProblem]:
        """A CSV header's problems as row problems (`row` None), one per column: a required
        column missing, an unknown or a repeated one."""
        problems = []
        seen: set[str] = set()
        for h in header:
            if h in seen:
                problems.append(RowProblem(None, h, "column appears more than once"))
            seen.add(h)
        for name in self._required:
            if name not in seen:
                problems.append(RowProblem(None, name, MISSING_COLUMN))
        for h in header:
            if h not in self._known:
                problems.append(RowProblem(None, h, self._unknown()))
        return problems

    def check_header(self, header: list[str]) -> list[str]:
        """Problems with a CSV header: required columns missing, unknown or repeated columns."""
        problems = []
        seen = set()
        for h in header:
            if h in seen:
                problems.append(f"column {h!r} appears more than once")
            seen.add(h)
        for f in self.features:
            if f.required and f.name not in seen:
                problems.append(f"required feature column {f.name!r} is missing")
        for p in self.passthrough:
            if p.required and p.name not in seen:
                problems.append(f"required passthrough column {p.name!r} is missing")
        for h in header:
            if h not in self._known:
                declared = f"declared features: {', '.join(self.names)}"
                if self.passthrough:
                    declared += f"; passthrough columns: {', '.join(self.passthrough_names)}"
                problems.append(f"unknown column {h!r} ({declared})")
        return problems


_NUMBER_TYPES = frozenset({float, int})


def check_scores(model: str, answer: Any, n_rows: int) -> list[float]:
    """The model's answer must be `{"scores": [one finite number per row]}`; raise ValueError saying what is wrong."""
    if not isinstance(answer, dict) or "scores" not in answer:
        raise ValueError(f'model {model} answered without a "scores" list: {_describe(answer)}')
    scores = answer["scores"]
    if not isinstance(scores, list):
        raise ValueError(f'model {model} answered "scores" that is not a list: {_describe(scores)}')
    if len(scores) != n_rows:
        raise ValueError(f"model {model} answered {len(scores)} score(s) for {n_rows} row(s)")
    if set(map(type, scores)) <= _NUMBER_TYPES:  # the common case at C speed; else row by row, naming it
        try:
            if math.isfinite(math.fsum(scores)):
                return scores
        except OverflowError:
            pass
    for i, s in enumerate(scores, 1):
        if isinstance(s, bool) or not isinstance(s, (int, float)):
            raise ValueError(f"model {model} answered a non-numeric score at row {i}: {_describe(s)}")
        try:
            finite = math.isfinite(s)
        except OverflowError:  # an integer past float's range
            finite = False
        if not finite:
            raise ValueError(f"model {model} answered a non-finite score at row {i}: {_describe(s)}")
    return scores


class TextRowChecker:
    """Checks CSV data rows (lists of text cells, in `header` order) against the features and
    the passthrough columns.

    Made for whole datasets: a block of rows is checked column by column with one C-level
    conversion per column (`map(float, column)`); only a column that fails is gone through
    cell by cell to name the rows. Problems are `{"row", "field", "error"}` with `row` the
    1-based data row (the header is not a row); the first MAX_REPORTED_PROBLEMS are kept and
    `total` counts them all.
    """

    def __init__(self, manifest: Manifest, header: list[str]):
        self.width = len(header)
        declared = list(manifest.features) + list(getattr(manifest, "passthrough", None) or [])
        by_name = {f.name: f for f in declared}
        self.columns = [(i, by_name[h]) for i, h in enumerate(header) if h in by_name]
        self._parse = {f.name: _text_parser(f) for f in declared}
        self._check = {f.name: _checker(f) for f in declared}
        self._allowed = {f.name: ({str(a) for a in f.allowed} if f.allowed is not None else None)
                         for f in declared}
        missing = [f for f in declared if f.required and f.name not in by_name]
        self.missing_required = [f.name for f in missing]
        self.problems: list[RowProblem] = []
        self.total = 0

    def _add(self, row: int, field: Optional[str], error: str) -> None:
        self.total += 1
        if len(self.problems) < MAX_REPORTED_PROBLEMS:
            self.problems.append(RowProblem(row, field, error))

    def check(self, records: list[list[str]], first_row: int) -> None:
        """Check `records`, the data rows numbered `first_row`, `first_row + 1`, …"""
        if not records:
            return
        width = self.width
        if any(len(r) != width for r in records):
            self._check_slow(records, first_row, [i for i, _ in self.columns])
            return
        columns = list(zip(*records))
        slow = [i for i, feature in self.columns if not self._column_ok(columns[i], feature)]
        if slow:
            self._check_slow(records, first_row, slow)

    def check_text(self, text: str, first_row: int) -> int:
        """Check the rows in `text` (lines ending in "\\n", cells split by commas, no quotes);
        returns how many rows it held. The fast path splits the whole block at once."""
        return self.check_cells(text, first_row)[0]

    def check_cells(self, text: str, first_row: int) -> tuple[int, Optional[list[str]]]:
        """`check_text`, also giving the block's cells, row after row (None when a row has
        another width than the header)."""
        n = text.count("\n")
        if not n:
            return 0, []
        width = self.width
        flat = text[:-1].replace("\n", ",").split(",")
        if len(flat) != n * width:
            self.check([line.split(",") for line in text[:-1].split("\n")], first_row)
            return n, None
        slow = [i for i, feature in self.columns if not self._column_ok(flat[i::width], feature)]
        if slow:
            self._check_slow([flat[k * width:(k + 1) * width] for k in range(n)], first_row, slow)
        return n, flat

    def _column_ok(self, column, feature: Feature) -> bool:
        t = feature.type
        allowed = self._allowed[feature.name]
        if "" in column:
            if feature.required:
                return False
            column = [c for c in column if c]
        try:
            if t == "number":
                # A sum is finite only if every value is (inf or nan anywhere makes it inf or nan).
                # `sum`, not `math.fsum`: three times faster per million cells, and a sum that
                # overflows from finite values only sends the column to the cell-by-cell check.
                if allowed is None:
                    return math.isfinite(sum(map(float, column)))
                values = list(map(float, column))
                return math.isfinite(sum(values)) and {float(a) for a in feature.allowed}.issuperset(values)
            if t == "integer":
                if allowed is None:
                    deque(map(int, column), maxlen=0)  # consumed at C speed; a bad cell raises
                    return True
                return {int(a) for a in feature.allowed}.issuperset(map(int, column))
            if t == "boolean":
                seen = {c.strip().lower() for c in set(column)}
                return seen <= (_TRUE | _FALSE) and allowed is None
            return allowed is None or allowed.issuperset(column)
        except (ValueError, OverflowError, TypeError):
            return False

    def _check_slow(self, records: list, first_row: int, column_indexes: list[int]) -> None:
        features = dict(self.columns)
        width = self.width
        for n, rec in enumerate(records):
            if len(rec) != width:
                self._add(first_row + n, None, f"has {len(rec)} cell(s); the header has {width}")
                continue
            for i in column_indexes:
                feature = features[i]
                cell = rec[i]
                if cell == "":
                    if feature.required:
                        self._add(first_row + n, feature.name, "required value is missing")
                    continue
                try:
                    self._check[feature.name](self._parse[feature.name](cell))
                except ValueError as e:
                    self._add(first_row + n, feature.name, str(e))

    def summary(self) -> str:
        first = self.problems[0] if self.problems else None
        where = (f" (first: row {first['row']}" + (f", {first['field']}" if first["field"] else "")
                 + f": {first['error']})") if first else ""
        return f"{self.total} value(s) in the dataset do not match the model's features{where}"
