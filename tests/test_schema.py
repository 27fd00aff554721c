"""Row validation and the check of a model's answer."""
from __future__ import annotations

import math

import pytest

from adapters.manifest import parse_manifest
from adapters.schema import RowsInvalid, RowValidator, check_scores

MANIFEST = parse_manifest("""\
name: m
version: 1.0.0
kind: realtime
language: python
command: [python, model.py]
features:
  - {name: net_worth, type: number}
  - {name: gifts, type: integer, required: false}
  - {name: region, type: string, allowed: [west, east]}
  - {name: active, type: boolean, required: false}
""", check_files=False)


@pytest.fixture
def v():
    return RowValidator(MANIFEST)


def bad(v, rows):
    with pytest.raises(RowsInvalid) as info:
        v.validate(rows)
    return [(p["row"], p["field"], p["error"]) for p in info.value.problems]


def test_clean_rows_are_typed_and_complete(v):
    rows = v.validate([{"net_worth": 10, "gifts": 2.0, "region": "west"}])
    assert rows == [{"net_worth": 10, "gifts": 2, "region": "west", "active": None}]
    assert isinstance(rows[0]["gifts"], int)


@pytest.mark.parametrize("row, field, words", [
    ({"gifts": 1, "region": "west"}, "net_worth", "required value is missing"),
    ({"net_worth": None, "region": "west"}, "net_worth", "required value is missing"),
    ({"net_worth": "lots", "region": "west"}, "net_worth", "expected a number"),
    ({"net_worth": True, "region": "west"}, "net_worth", "expected a number"),
    ({"net_worth": math.nan, "region": "west"}, "net_worth", "finite"),
    ({"net_worth": math.inf, "region": "west"}, "net_worth", "finite"),
    ({"net_worth": 1, "gifts": 1.5, "region": "west"}, "gifts", "expected an integer"),
    ({"net_worth": 1, "region": "north"}, "region", "not allowed"),
    ({"net_worth": 1, "region": 3}, "region", "expected a string"),
    ({"net_worth": 1, "region": "west", "active": "yes"}, "active", "true or false"),
    ({"net_worth": 1, "region": "west", "colour": "red"}, "colour", "unknown column"),
])
def test_each_problem_names_row_and_field(v, row, field, words):
    found = bad(v, [{"net_worth": 1, "region": "east"}, row])
    assert len(found) == 1
    assert found[0][0] == 1 and found[0][1] == field and words in found[0][2]


def test_not_a_list_or_not_objects(v):
    assert "list" in bad(v, {"net_worth": 1})[0][2]
    assert bad(v, [3])[0][:2] == (0, None)


def test_problem_list_is_bounded(v):
    with pytest.raises(RowsInvalid) as info:
        v.validate([{"region": "west"}] * 500)
    assert info.value.total == 500
    body = info.value.to_json()
    assert len(body["problems"]) == 100 and body["truncated"] == 400


def test_csv_cells_are_parsed_by_type(v):
    rows = v.rows_from_csv(["net_worth", "gifts", "region", "active"],
                           [["1.5", "", "west", "true"], ["x", "2", "east", "0"]])
    assert rows == [{"net_worth": 1.5, "region": "west", "active": True},
                    {"net_worth": "x", "gifts": 2, "region": "east", "active": False}]
    found = bad(v, rows)
    assert found == [(1, "net_worth", "expected a number; got 'x'")]


def test_header_problems(v):
    assert v.check_header(["net_worth", "region", "gifts", "active"]) == []
    problems = v.check_header(["region", "colour", "region"])
    assert any("'region' appears more than once" in p for p in problems)
    assert any("'net_worth' is missing" in p for p in problems)
    assert any("unknown column 'colour'" in p for p in problems)


@pytest.mark.parametrize("answer, words", [
    ({"score": [1]}, 'without a "scores" list'),
    ([0.5], 'without a "scores" list'),
    ({"scores": 0.5}, "not a list"),
    ({"scores": [0.5]}, "1 score(s) for 2 row(s)"),
    ({"scores": [0.5, "high"]}, "non-numeric score at row 1"),
    ({"scores": [0.5, None]}, "non-numeric score at row 1"),
    ({"scores": [math.nan, 0.5]}, "non-finite score at row 0"),
])
def test_broken_answers_are_named(answer, words):
    with pytest.raises(ValueError) as info:
        check_scores("donor", answer, 2)
    assert words in str(info.value) and "model donor" in str(info.value)


def test_good_answer():
    assert check_scores("donor", {"scores": [0.1, 1]}, 2) == [0.1, 1]
