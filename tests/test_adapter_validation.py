"""The adapter's row and score checks: the column-at-a-time fast path must agree with the row by
row checks on every input (same clean rows, or it steps aside so the row checks word the errors)."""
from __future__ import annotations

import random
from pathlib import Path

import pytest

from adapters.manifest import load_manifest, parse_manifest
from adapters.schema import RowsInvalid, RowValidator, check_scores

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "adapter" / "realtime"


@pytest.fixture(scope="module")
def validator() -> RowValidator:
    return RowValidator(load_manifest(FIXTURE, check_files=False))


_VALUES = [1.5, -2, 0, 2**63 - 1, 2**63, -2**63 - 1, 10**400, float("nan"), float("inf"), 1e308, True, False,
           None, "west", "east", "north", "", 3.0, 2.5, [1], {"a": 1}, "1"]


def _outcome(fn, rows):
    try:
        return "ok", fn(rows)
    except RowsInvalid as e:
        return "invalid", e.to_json()


def _copy(rows):
    return [dict(r) if type(r) is dict else r for r in rows]


PASSTHROUGH = """
passthrough:
  - customer_id
  - {name: batch_no, type: integer, required: false}
"""


@pytest.mark.parametrize("passthrough", [False, True], ids=["features", "features+passthrough"])
def test_fast_path_and_row_checks_agree_on_random_rows(validator, passthrough):
    if passthrough:
        text = (FIXTURE / "model.yaml").read_text() + PASSTHROUGH
        validator = RowValidator(parse_manifest(text, check_files=False))
    rng = random.Random(11)
    names = ["x", "n", "region", "member", "colour"] + (["customer_id", "batch_no"] if passthrough else [])
    fast_taken = 0
    for _ in range(3000):
        rows = []
        for _ in range(rng.choice([1, 2, 3, 9, 12])):
            if rng.random() < 0.03:
                rows.append(rng.choice([[], "row", 3, None]))
                continue
            base = {"x": rng.choice([1.5, -2, 0.0]), "region": rng.choice(["west", "east"])}
            if passthrough:
                base["customer_id"] = rng.choice(["c1", "c2"])
            for _ in range(rng.randrange(0, 3)):
                base[rng.choice(names)] = rng.choice(_VALUES)
            if rng.random() < 0.1:
                base.pop(rng.choice(list(base)))
            rows.append(base)
        slow = _outcome(validator._validate, _copy(rows))
        fast = validator._validate_fast(_copy(rows)) if all(type(r) is dict for r in rows) else None
        if fast is not None:
            fast_taken += 1
            assert slow == ("ok", fast), rows
            # same values *and* same types (1 vs 1.0 vs True compare equal)
            assert [{k: type(v) for k, v in r.items()} for r in fast[0]] == \
                [{k: type(v) for k, v in r.items()} for r in slow[1][0]]
            if passthrough:
                assert [{k: type(v) for k, v in zip(fast[1], r)} for r in zip(*fast[1].values())] == \
                    [{k: type(v) for k, v in zip(slow[1][1], r)} for r in zip(*slow[1][1].values())]
        assert _outcome(validator.split, _copy(rows)) == slow
    assert fast_taken > 300  # the fast path is exercised, not always stepped around


def test_huge_integers_are_a_named_422_value_not_a_crash(validator):
    with pytest.raises(RowsInvalid) as e:
        validator.validate([{"x": 10**400, "region": "west"}])
    [problem] = e.value.problems
    assert problem["row"] == 1 and problem["field"] == "x" and "finite" in problem["error"]
    assert validator.validate([{"x": 2**64, "region": "west"}]) == [{"x": float(2**64), "n": None, "region": "west",
                                                                     "member": None}]


@pytest.mark.parametrize("scores, fragment", [
    ([1.0, float("nan")], "non-finite score at row 2"),
    ([1.0, 10**400], "non-finite score at row 2"),
    ([True, 1.0], "non-numeric score at row 1"),
    ([1.0, "0.5"], "non-numeric score at row 2"),
    ([1.0, float("-inf")], "non-finite score at row 2"),
])
def test_broken_scores_are_named_by_row(scores, fragment):
    with pytest.raises(ValueError) as e:
        check_scores("m", {"scores": scores}, len(scores))
    assert fragment in str(e.value)


def test_good_scores_pass_as_they_are():
    scores = [0.5, 1, -2.25, 2**70, 1e308]
    assert check_scores("m", {"scores": scores}, 5) is scores
    assert check_scores("m", {"scores": [1e308, 1e308]}, 2) == [1e308, 1e308]  # fsum overflows: checked one by one
