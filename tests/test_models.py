"""The four example models honour the model process contract on their own (no adapter), and train.py reproduces them."""
from __future__ import annotations

import csv
import filecmp
import http.client
import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from adapters.manifest import load_manifest
from adapters.schema import RowValidator
from control.emulator import free_port
from conftest import MODELS, requires_r

REALTIME = ["donor-propensity", pytest.param("major-gift", marks=requires_r)]
BATCH = ["churn-risk", pytest.param("member-retention", marks=requires_r)]
READY_TIMEOUT = 30.0


def load_train():
    spec = importlib.util.spec_from_file_location("models_train", MODELS / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sample_rows(name: str) -> list[dict]:
    """The sample as the adapter would send it: typed values, empty optional cells left out, the
    features only (a passthrough column, such as major-gift's donor_id, never reaches the model)."""
    manifest = load_manifest(MODELS / name)
    with open(manifest.sample_path, newline="") as f:
        records = list(csv.reader(f))
    features = set(manifest.feature_names)
    return [{k: v for k, v in row.items() if k in features}
            for row in RowValidator(manifest).rows_from_csv(records[0], records[1:])]


def post(port: int, rows: list, conn: http.client.HTTPConnection | None = None) -> tuple[int, dict]:
    own = conn is None
    conn = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("POST", "/predict", body=json.dumps({"rows": rows}), headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        if own:
            conn.close()


@pytest.fixture
def serve(tmp_path):
    """Start a realtime example exactly as the adapter does (its command, in its folder, PORT set); always stopped."""
    procs = []

    def start(name: str) -> int:
        manifest = load_manifest(MODELS / name)
        port = free_port()
        log = open(tmp_path / f"{name}.log", "wb")
        proc = subprocess.Popen(manifest.command, cwd=manifest.folder, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "PORT": str(port), "HOST": "127.0.0.1"}, start_new_session=True)
        procs.append((proc, log))
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            assert proc.poll() is None, (tmp_path / f"{name}.log").read_text()
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    conn.close()
                    return port
                conn.close()
            except OSError:
                pass
            assert time.monotonic() < deadline, f"{name} not healthy within {READY_TIMEOUT}s"
            time.sleep(0.05)

    yield start
    for proc, log in procs:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def assert_probabilities(scores, n):
    assert isinstance(scores, list) and len(scores) == n
    for s in scores:
        assert isinstance(s, float) and math.isfinite(s) and 0.0 < s < 1.0, s


# -- realtime ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", REALTIME)
def test_realtime_model_scores_its_sample(serve, name):
    port = serve(name)
    rows = sample_rows(name)
    status, answer = post(port, rows)
    assert status == 200, answer
    assert_probabilities(answer["scores"], len(rows))
    # same order: scoring rows one at a time gives the same scores
    singles = [post(port, [row])[1]["scores"][0] for row in rows[:5]]
    assert singles == pytest.approx(answer["scores"][:5], rel=1e-12)


@pytest.mark.parametrize("name, optional", [("donor-propensity", "years_since_first_gift"),
                                            pytest.param("major-gift", "last_gift_amount", marks=requires_r)])
def test_realtime_model_copes_with_null_optional_value(serve, name, optional):
    port = serve(name)
    row = next(r for r in sample_rows(name) if optional in r)
    as_null, absent = {**row, optional: None}, {k: v for k, v in row.items() if k != optional}
    status, answer = post(port, [row, as_null, absent])
    assert status == 200, answer
    assert_probabilities(answer["scores"], 3)
    known, null, missing = answer["scores"]
    assert null == missing          # null and a left-out key mean the same: unknown
    assert null != known            # and "unknown" has its own learned effect
    status, answer = post(port, [as_null])   # a lone null column (no other value to infer a type from)
    assert status == 200 and answer["scores"] == [null]


@pytest.mark.parametrize("name", REALTIME)
def test_realtime_model_answers_empty_and_bad_requests(serve, name):
    port = serve(name)
    assert post(port, []) == (200, {"scores": []})
    status, answer = post(port, [{"nonsense": 1}])
    assert status == 400 and "error" in answer


def test_python_realtime_model_keeps_connections_alive(serve):
    port = serve("donor-propensity")
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    rows = sample_rows("donor-propensity")[:3]
    try:
        first = post(port, rows, conn)
        sock = conn.sock
        second = post(port, rows, conn)
        assert conn.sock is sock and sock is not None   # the same TCP connection served both
    finally:
        conn.close()
    assert first == second and first[0] == 200


def test_donor_propensity_scores_are_the_fitted_logistic_regression(serve):
    """The served model and train.py agree on the design: score = sigmoid(params · design(row))."""
    train = load_train()
    params = json.loads((MODELS / "donor-propensity" / "params.json").read_text())
    beta = [params["intercept"], params["log10_net_worth"], params["gifts_last_year"],
            *(params["region"][r] for r in train.REGIONS[1:]),
            params["years_since_first_gift"], params["years_since_first_gift_missing"], params["board_member"]]
    rows = sample_rows("donor-propensity")
    expected = [train.sigmoid(sum(b * x for b, x in zip(beta, train.donor_design(
        {"years_since_first_gift": None, **row})))) for row in rows]
    _, answer = post(serve("donor-propensity"), rows)
    assert answer["scores"] == pytest.approx(expected, rel=1e-9)


# -- batch ----------------------------------------------------------------------------

def run_batch(name: str, dataset: Path, results: Path) -> subprocess.CompletedProcess:
    manifest = load_manifest(MODELS / name)
    return subprocess.run(manifest.command, cwd=manifest.folder, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "DATASET": str(dataset), "RESULTS": str(results)})


def read_scores(path: Path, header: str) -> list[float]:
    lines = path.read_text().splitlines()
    assert lines[0] == header
    return [float(x) for x in lines[1:]]


def write_rows(path: Path, columns: list[str], rows: list[dict]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(columns)
        for r in rows:
            w.writerow([r.get(c, "") for c in columns])
    return path


@pytest.mark.parametrize("name", BATCH)
def test_batch_model_scores_its_sample(tmp_path, name):
    manifest = load_manifest(MODELS / name)
    proc = run_batch(name, manifest.sample_path, tmp_path / "scores.csv")
    assert proc.returncode == 0, proc.stderr
    scores = read_scores(tmp_path / "scores.csv", manifest.score.name)
    assert_probabilities(scores, len(sample_rows(name)))


@pytest.mark.parametrize("name, optional", [("churn-risk", "support_tickets"),
                                            pytest.param("member-retention", "distance_km", marks=requires_r)])
def test_batch_model_reads_columns_by_name_and_copes_with_missing_optional(tmp_path, name, optional):
    manifest = load_manifest(MODELS / name)
    with open(manifest.sample_path, newline="") as f:
        rows = list(csv.DictReader(f))
    names = manifest.feature_names
    base = run_batch(name, manifest.sample_path, tmp_path / "base.csv")
    shuffled = run_batch(name, write_rows(tmp_path / "shuffled.csv", names[::-1], rows), tmp_path / "shuffled_out.csv")
    assert base.returncode == 0 and shuffled.returncode == 0, base.stderr + shuffled.stderr
    assert read_scores(tmp_path / "shuffled_out.csv", manifest.score.name) == \
        read_scores(tmp_path / "base.csv", manifest.score.name)

    blank = [{**r, optional: ""} for r in rows]
    empty_cells = run_batch(name, write_rows(tmp_path / "blank.csv", names, blank), tmp_path / "blank_out.csv")
    without = [n for n in names if n != optional]
    no_column = run_batch(name, write_rows(tmp_path / "nocol.csv", without, rows), tmp_path / "nocol_out.csv")
    assert empty_cells.returncode == 0 and no_column.returncode == 0, empty_cells.stderr + no_column.stderr
    unknown = read_scores(tmp_path / "blank_out.csv", manifest.score.name)
    assert unknown == read_scores(tmp_path / "nocol_out.csv", manifest.score.name)
    assert_probabilities(unknown, len(rows))
    assert unknown != read_scores(tmp_path / "base.csv", manifest.score.name)


@pytest.mark.parametrize("name, column, value", [("churn-risk", "plan", "gold"),
                                                 pytest.param("member-retention", "tier", "gold", marks=requires_r)])
def test_batch_model_fails_loudly_on_a_bad_value(tmp_path, name, column, value):
    manifest = load_manifest(MODELS / name)
    with open(manifest.sample_path, newline="") as f:
        rows = list(csv.DictReader(f))
    rows[3][column] = value
    proc = run_batch(name, write_rows(tmp_path / "bad.csv", manifest.feature_names, rows), tmp_path / "out.csv")
    assert proc.returncode != 0
    assert "gold" in proc.stderr


def test_churn_risk_compiled_stumps_equal_the_sum_of_stumps(tmp_path):
    """score.py folds the stumps into per-feature step functions; that must not change a score."""
    params = json.loads((MODELS / "churn-risk" / "params.json").read_text())
    rows = [{"tenure_months": t, "monthly_spend": s, "plan": p, "support_tickets": k, "autopay": a}
            for t in (0, 3, 9, 10, 40) for s in (8.0, 78.8, 78.9, 119.99) for p in ("basic", "plus", "premium")
            for k in ("", 0, 2, 7) for a in ("true", "false")]

    def direct(r):
        z = params["base"]
        for st in params["stumps"]:
            v = r[st["feature"]]
            if "threshold" in st:
                left = (float(v) if v != "" else -1.0) <= st["threshold"]
            else:
                left = ((v == "true") if st["feature"] == "autopay" else v) == st["equals"]
            z += st["left"] if left else st["right"]
        return 1 / (1 + math.exp(-z))

    proc = run_batch("churn-risk", write_rows(tmp_path / "grid.csv", list(rows[0]), rows), tmp_path / "out.csv")
    assert proc.returncode == 0, proc.stderr
    got = read_scores(tmp_path / "out.csv", "churn_probability")
    assert got == pytest.approx([direct(r) for r in rows], rel=1e-5)   # scores are written with 6 digits


# -- training reproduces -------------------------------------------------------------------

@pytest.mark.parametrize("names", [["donor-propensity", "churn-risk"],
                                   pytest.param(["major-gift", "member-retention"], marks=requires_r)])
def test_train_reproduces_the_committed_parameters(tmp_path, names):
    proc = subprocess.run([sys.executable, str(MODELS / "train.py"), *names, "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    for name in names:
        for file in ("params.json", "sample.csv"):
            fresh, committed = tmp_path / name / file, MODELS / name / file
            assert filecmp.cmp(fresh, committed, shallow=False), f"{name}/{file} differs from a fresh train.py run"
