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
    assert found[0][0] == 2 and found[0][1] == field  # rows are numbered from 1 and words in found[0][2]


def test_not_a_list_or_not_objects(v):
    assert "list" in bad(v, {"net_worth": 1})[0][2]
    assert bad(v, [3])[0][:2] == (1, None)


def test_problem_list_is_bounded(v):
    with pytest.raises(RowsInvalid) as info:
        v.validate([{"net_worth": None, "region": "west"}] * 500)
    assert info.value.total == 500
    body = info.value.to_json()
    assert len(body["problems"]) == 100 and body["truncated"] == 400


def test_csv_cells_are_parsed_by_type(v):
    rows = v.rows_from_csv(["net_worth", "gifts", "region", "active"],
                           [["1.5", "", "west", "true"], ["x", "2", "east", "0"]])
    assert rows == [{"net_worth": 1.5, "region": "west", "active": True},
                    {"net_worth": "x", "gifts": 2, "region": "east", "active": False}]
    found = bad(v, rows)
    assert found == [(2, "net_worth", "expected a number; got 'x'")]


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
    ({"scores": [0.5, "high"]}, "non-numeric score at row 2"),
    ({"scores": [0.5, None]}, "non-numeric score at row 2"),
    ({"scores": [math.nan, 0.5]}, "non-finite score at row 1"),
])
def test_broken_answers_are_named(answer, words):
    with pytest.raises(ValueError) as info:
        check_scores("donor", answer, 2)
    assert words in str(info.value) and "model donor" in str(info.value)


def test_good_answer():
    assert check_scores("donor", {"scores": [0.1, 1]}, 2) == [0.1, 1]


# -- a column missing from every row: one problem -----------------------------------------

@pytest.mark.parametrize("n", [1, 3, 300])
def test_a_column_no_row_has_is_one_problem(v, n):
    found = bad(v, [{"region": "west"}] * n)
    assert found == [(None, "net_worth", "required column is missing")]


def test_a_column_some_rows_have_is_named_per_row(v):
    found = bad(v, [{"net_worth": 1, "region": "west"}, {"region": "west"}, {"net_worth": None, "region": "east"}])
    assert found == [(2, "net_worth", "required value is missing"), (3, "net_worth", "required value is missing")]


def test_a_csv_header_says_which_column_is_missing(v):
    # every cell of the column empty: the column is there, its values are missing (per row)
    rows = v.rows_from_csv(["net_worth", "region"], [["", "west"], ["", "east"]])
    assert bad_split(v, rows, ["net_worth", "region"]) == [(1, "net_worth", "required value is missing"),
                                                           (2, "net_worth", "required value is missing")]
    rows = v.rows_from_csv(["region"], [["west"]] * 300)
    assert bad_split(v, rows, ["region"]) == [(None, "net_worth", "required column is missing")]
    assert [(p["row"], p["field"], p["error"]) for p in v.header_problems(["region", "colour", "region"])] == [
        (None, "region", "column appears more than once"), (None, "net_worth", "required column is missing"),
        (None, "colour", "unknown column (not a declared feature)")]


def bad_split(v, rows, header=None):
    with pytest.raises(RowsInvalid) as info:
        v.split(rows, header)
    return [(p["row"], p["field"], p["error"]) for p in info.value.problems]


# -- passthrough columns ------------------------------------------------------------------

PT = parse_manifest("""name: m
version: 1.0.0
kind: realtime
language: python
command: [python, model.py]
features:
  - {name: net_worth, type: number}
  - {name: region, type: string, required: false}
passthrough:
  - customer_id
  - {name: batch_no, type: integer, required: false}
""", check_files=False)


@pytest.mark.parametrize("n", [1, 7, 8, 50])  # below and from FAST_PATH_ROWS
def test_passthrough_values_are_split_off(n):
    v = RowValidator(PT)
    rows = [{"net_worth": float(i), "customer_id": f"c{i}", **({"batch_no": i} if i % 2 else {})} for i in range(n)]
    clean, passthrough = v.split(rows)
    assert clean == [{"net_worth": float(i), "region": None} for i in range(n)]  # the model's: features only
    assert passthrough == {"customer_id": [f"c{i}" for i in range(n)],
                           "batch_no": [i if i % 2 else None for i in range(n)]}


def test_no_passthrough_declared_splits_nothing(v):
    rows = [{"net_worth": 1, "region": "west"}] * 10
    assert v.split(rows)[1] is None and v.split(rows[:1])[1] is None


@pytest.mark.parametrize("n", [2, 20])
def test_passthrough_types_are_checked_by_row_and_field(n):
    v = RowValidator(PT)
    rows = [{"net_worth": 1, "customer_id": f"c{i}"} for i in range(n)]
    rows[1] = {"net_worth": 1, "customer_id": 17, "batch_no": "x"}
    found = bad_split(v, rows)
    assert found == [(2, "customer_id", "expected a string; got 17"), (2, "batch_no", "expected an integer; got 'x'")]
    found = bad_split(v, [{"net_worth": 1}] * n)
    assert found == [(None, "customer_id", "required column is missing")]
    found = bad_split(v, [{"net_worth": 1, "customer_id": "a", "id": 3}] * 2)
    assert found[0] == (1, "id", "unknown column (not a declared feature or passthrough column)")


def test_passthrough_csv_cells_are_parsed_and_checked():
    v = RowValidator(PT)
    header = ["customer_id", "net_worth", "batch_no"]
    rows = v.rows_from_csv(header, [["007", "1", "3"], ["008", "2", "x"]])
    assert bad_split(v, rows, header) == [(2, "batch_no", "expected an integer; got 'x'")]
    rows = v.rows_from_csv(header, [["007", "1", "3"], ["008", "2", ""]])
    clean, passthrough = v.split(rows, header)
    assert clean == [{"net_worth": 1.0, "region": None}, {"net_worth": 2.0, "region": None}]
    assert passthrough == {"customer_id": ["007", "008"], "batch_no": [3, None]}  # ids keep their zeros
    assert v.check_header(["net_worth"]) == ["required passthrough column 'customer_id' is missing"]
