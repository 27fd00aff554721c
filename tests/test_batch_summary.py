"""Batch summaries for drift: the scores' reservoir and the inputs' per-feature summary.

Summaries come from real results files and datasets (adapters/batch.py `score_summary`,
adapters/inputs.py `summarize_file`) and go through the real score monitor."""
from __future__ import annotations

import random
from pathlib import Path

import pytest

from adapters.batch import ScoreSummary, score_summary
from adapters.manifest import parse_manifest
from control import stats
from control.monitor import ScoreMonitor

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "monitor"
BLOCK_SEED = 7


def block(shift: float = 0.0) -> list[float]:
    r = random.Random(BLOCK_SEED)
    return [round(min(1.0, r.random() + shift), 4) for _ in range(20)]


def results_file(path: Path, values: list[float]) -> Path:
    path.write_text("p\n" + "\n".join(map(repr, values)) + "\n")
    return path


def manifest():
    return parse_manifest((FIXTURES / "drift-batch" / "model.yaml").read_text(), check_files=False)


def monitor_psi(tmp_path, reference: dict, recent: dict) -> dict:
    monitor = ScoreMonitor(tmp_path / "monitor", start=False,
                           manifest_of=lambda n, v: {"monitoring": {"reference_size": 1000}})
    monitor.observe_job("m", "1.0.0", reference, job="reference")
    monitor.observe_job("m", "1.0.0", recent, job="recent")
    return monitor.report("m", batch=False)["versions"]["1.0.0"]


def test_periodic_data_of_one_distribution_is_not_flagged(tmp_path):
    """200,000 rows of one 20-row block repeated against the same block's 2,000 rows: one
    distribution. Every k-th score (k a power of two) lined up with the block (PSI 2.77)."""
    small = score_summary(results_file(tmp_path / "small.csv", block() * 100), manifest())
    big = score_summary(results_file(tmp_path / "big.csv", block() * 10_000), manifest())
    v = monitor_psi(tmp_path, small, big)
    assert v["reference"]["complete"] and v["drift"]["psi"] < 0.1, v["drift"]
    assert v["drifted"] is False
    assert big["count"] == 200_000 and big["sampled"] == 16_384


def test_a_shifted_distribution_written_the_same_way_is_flagged(tmp_path):
    small = score_summary(results_file(tmp_path / "small.csv", block() * 100), manifest())
    big = score_summary(results_file(tmp_path / "big.csv", block(0.3) * 10_000), manifest())
    v = monitor_psi(tmp_path, small, big)
    assert v["drift"]["psi"] > 1.0 and v["drifted"] is True


def test_the_reservoir_keeps_every_position_alike_and_is_bounded():
    from adapters import inputs

    res = inputs.Reservoir(1000, seed=1)
    for start in range(0, 1_000_000, 4096):   # chunks of a size unrelated to the sample's
        res.add(list(range(start, min(start + 4096, 1_000_000))))
    assert len(res.items) == 1000 and res.seen == 1_000_000 and len(set(res.items)) == 1000
    tenths = [0] * 10
    for i in res.items:
        tenths[i // 100_000] += 1
    assert all(70 <= t <= 130 for t in tenths), tenths   # ~100 each; a stride or a prefix is not
    again = inputs.Reservoir(1000, seed=1)
    again.add(list(range(1_000_000)))
    assert len(again.items) == 1000


def test_score_summary_exact_up_to_its_sample_and_chunking_does_not_matter():
    values = [random.Random(2).random() for _ in range(10_000)]
    a, b = ScoreSummary(), ScoreSummary()
    a.add(values)
    for i in range(0, len(values), 7):
        b.add(values[i:i + 7])
    assert a.result()["percentiles"] == b.result()["percentiles"]
    assert a.result()["quantiles"]["p50"] == pytest.approx(stats.quantile(sorted(values), 0.5))


def test_input_summary_of_a_dataset_per_feature_bounded(tmp_path):
    from adapters import inputs

    features = [{"name": "x", "type": "number"}, {"name": "n", "type": "integer"},
                {"name": "city", "type": "string"}, {"name": "member", "type": "boolean"}]
    r = random.Random(4)
    lines = ["customer_id,x,n,city,member"]
    for i in range(10_000):
        lines.append(f"c{i},{r.gauss(5, 1)!r},{i % 7},town{i % 60},{'true' if i % 4 else 'FALSE'}")
    path = tmp_path / "data.csv"
    path.write_text("\n".join(lines) + "\n")
    s = inputs.summarize_file(features, path)
    assert s["rows"] == 10_000 and s["sampled"] == inputs.INPUT_SAMPLE
    assert set(s["features"]) == {"x", "n", "city", "member"}   # the passthrough column is not a feature
    x = s["features"]["x"]
    assert x["type"] == "number" and len(x["percentiles"]) == 101 and 4.8 < x["percentiles"][50] < 5.2
    city = s["features"]["city"]["shares"]
    assert len(city) == inputs.MAX_CATEGORIES + 1 and inputs.OTHER in city   # 60 towns: 50 kept, the rest one
    member = s["features"]["member"]["shares"]
    assert set(member) == {"true", "false"} and 0.7 < member["true"] < 0.8

    quoted = tmp_path / "quoted.csv"   # quotes (a newline inside one) go through the csv module
    quoted.write_text('x,n,city,member\n1.5,2,"a\nb",true\n2.5,3,"c,d",false\n')
    q = inputs.summarize_file(features, quoted)
    assert q["rows"] == 2 and q["features"]["city"]["shares"] == {"a\nb": 0.5, "c,d": 0.5}
    assert q["features"]["x"]["percentiles"][0] == 1.5

    missing = tmp_path / "missing.csv"
    missing.write_text("x\n1\n\n2\n")
    m = inputs.summarize_file(features, missing)
    assert m["rows"] == 2 and m["features"]["city"]["missing"] == 2 and m["features"]["city"]["shares"] == {}
    assert inputs.summarize_file(features, tmp_path / "absent.csv") is None   # never the job's failure


def _dataset(path: Path, rows: list[tuple]) -> Path:
    path.write_text("x,y,region\n" + "".join(f"{x!r},{y!r},{g}\n" for x, y, g in rows))
    return path


def test_periodic_inputs_of_one_distribution_are_not_flagged_a_single_shifted_feature_is_named(tmp_path):
    from adapters import inputs

    features = [{"name": "x", "type": "number"}, {"name": "y", "type": "number"},
                {"name": "region", "type": "string"}]
    r = random.Random(BLOCK_SEED)
    rows = [(r.gauss(0, 1), r.gauss(0, 1), "south" if i % 4 == 0 else "north") for i in range(20)]
    small = score_summary(results_file(tmp_path / "s.csv", block() * 100), manifest())
    small["inputs"] = inputs.summarize_file(features, _dataset(tmp_path / "small.csv", rows * 100))

    def against_small(name: str, data: list[tuple]) -> dict:
        big = score_summary(results_file(tmp_path / f"{name}-scores.csv", block() * 10_000), manifest())
        big["inputs"] = inputs.summarize_file(features, _dataset(tmp_path / f"{name}.csv", data))
        return monitor_psi(tmp_path / name, small, big)

    v = against_small("same", rows * 10_000)
    assert v["inputs"]["drifted"] == [], v["inputs"]
    assert all(f["psi"] < 0.1 for f in v["inputs"]["features"].values()), v["inputs"]
    shifted = [(x, y + 1.5, g) for x, y, g in rows]
    v = against_small("shifted", shifted * 10_000)
    assert v["inputs"]["drifted"] == ["y"] and v["inputs"]["features"]["y"]["psi"] > 1.0, v["inputs"]


def test_features_watched_are_bounded_by_the_manifest_and_capped():
    from adapters import inputs

    many = [{"name": f"f{i}", "type": "number" if i % 2 else "boolean"} for i in range(100)]
    kinds = inputs.feature_kinds(many)
    assert len(kinds) == inputs.MAX_FEATURES and list(kinds)[:2] == ["f0", "f1"]
    assert kinds["f0"] == "category" and kinds["f1"] == "number"
    assert inputs.value_of("number", True) is None and inputs.value_of("number", "1e999") is None
    assert inputs.value_of("category", "TRUE") == "true" and len(inputs.value_of("category", "z" * 500)) == 100


def test_a_reference_filled_from_jobs_weighs_each_by_its_rows(tmp_path):
    monitor = ScoreMonitor(tmp_path / "monitor", start=False,
                           manifest_of=lambda n, v: {"monitoring": {"reference_size": 500}})

    def summary(rows: int, south: float, p50: float) -> dict:
        return {"count": rows, "percentiles": [p50 + (i - 50) / 100 for i in range(101)],
                "inputs": {"rows": rows, "sampled": min(rows, 4096), "features": {
                    "region": {"type": "category", "count": min(rows, 4096), "missing": 0,
                               "shares": {"south": south, "north": round(1 - south, 6)}}}}}

    monitor.observe_job("m", "1.0.0", summary(20, 1.0, 5.0), job="small")
    assert not monitor.report("m", batch=False)["versions"]["1.0.0"]["reference"]["complete"]
    monitor.observe_job("m", "1.0.0", summary(100_000, 0.3, 0.5), job="big")
    v = monitor.report("m", batch=False)["versions"]["1.0.0"]
    assert v["reference"]["count"] == 100_020 and v["reference"]["complete"]
    assert v["reference"]["quantiles"]["p50"] == pytest.approx(0.5, abs=0.02)   # the big job's, nearly
    region = v["inputs"]["features"]["region"]["reference"]["shares"]
    assert region["south"] == pytest.approx((20 + 100_000 * 0.3) / 100_020, abs=1e-4)
