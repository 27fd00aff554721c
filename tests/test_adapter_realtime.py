"""The realtime adapter as a real process in front of a real fixture model, over real HTTP."""
from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from control.emulator import free_port

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "adapter" / "realtime"
ROOT = Path(__file__).resolve().parent.parent
MODEL = "fixture-realtime"


def child_env(**extra: str) -> dict:
    """The test's env with this interpreter first on PATH, so the manifest's `python` is ours."""
    env = dict(os.environ, **extra)
    env["MODELPLANE_MODEL_ENV"] = "FIXTURE_MODE,FIXTURE_CRASH_AFTER"   # a model gets nothing else of ours
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    return env


def wait_http(url: str, *, proc: subprocess.Popen, status: int = 200, attempts: int = 400) -> None:
    for _ in range(attempts):
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} answered")
        try:
            if requests.get(url, timeout=1).status_code == status:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{url} never answered {status}")


def stop(proc: subprocess.Popen) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


class Adapter:
    def __init__(self, tmp: Path, *args: str, ready: bool = True, folder: Path = FIXTURE, **env: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.stderr_path = tmp / f"adapter-{self.port}.stderr"
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "adapters", "serve", str(folder), "--port", str(self.port), *args],
                cwd=ROOT, env=child_env(**env), stdout=subprocess.DEVNULL, stderr=err)
        try:
            wait_http(self.url + ("/v2/health/ready" if ready else "/v2/health/live"), proc=self.proc)
        except RuntimeError as e:
            self.stop()
            raise RuntimeError(f"{e}\n{self.stderr()}") from e

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def stop(self) -> int:
        return stop(self.proc)

    def predict(self, rows, **kw) -> requests.Response:
        return requests.post(self.url + "/predict", json={"rows": rows}, timeout=10, **kw)


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    a = Adapter(tmp_path_factory.mktemp("adapter"))
    yield a
    a.stop()


def row(x=1.0, **kw):
    return {"x": x, "region": "west", **kw}


# -- /predict -----------------------------------------------------------------------------

def test_predict_json_returns_one_score_per_row(adapter):
    r = adapter.predict([row(1.5, n=2), row(-3, region="east", member=True)])
    assert r.status_code == 200, r.text
    assert r.json() == {"model": MODEL, "version": "1.0.0", "scores": [5.0, -6.0]}


def test_predict_csv_body_and_csv_answer(adapter):
    body = "x,region,n\n1,west,\n2.5,east,3\n"
    r = requests.post(adapter.url + "/predict", data=body, headers={"Content-Type": "text/csv"}, timeout=10)
    assert r.status_code == 200, r.text
    assert r.json()["scores"] == [2.0, 8.0]
    r = requests.post(adapter.url + "/predict", data=body,
                      headers={"Content-Type": "text/csv", "Accept": "text/csv"}, timeout=10)
    assert r.status_code == 200
    assert r.headers["Content-Type"].startswith("text/csv")
    assert r.text.splitlines() == ["score", "2.0", "8.0"]


@pytest.mark.parametrize("bad_row, field, fragment", [
    ({"x": 1.0, "region": None}, "region", "required value is missing"),
    ({"x": "ten", "region": "west"}, "x", "expected a number"),
    ({"x": 1.0, "region": "north"}, "region", "not allowed"),
    ({"x": 1.0, "region": "west", "colour": "red"}, "colour", "unknown column"),
    ({"x": 1.0, "region": "west", "n": 2.5}, "n", "expected an integer"),
    ({"x": 1.0, "region": "west", "member": "yes"}, "member", "expected true or false"),
], ids=["missing-required", "wrong-type", "not-allowed", "unknown-column", "not-integer", "not-boolean"])
def test_invalid_rows_are_422_naming_row_and_field(adapter, bad_row, field, fragment):
    r = adapter.predict([row(), bad_row])
    assert r.status_code == 422
    body = r.json()
    assert "error" in body
    # rows are numbered from 1: the bad row is the second
    assert any(p["row"] == 2 and p["field"] == field and fragment in p["error"] for p in body["problems"]), body


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_json_values_are_422(adapter, literal):
    body = '{"rows": [{"x": ' + literal + ', "region": "west"}]}'
    r = requests.post(adapter.url + "/predict", data=body, headers={"Content-Type": "application/json"}, timeout=10)
    assert r.status_code == 422, r.text
    assert r.json()["problems"] == [{"row": 1, "field": "x", "error": r.json()["problems"][0]["error"]}]
    assert "finite" in r.json()["problems"][0]["error"]


@pytest.mark.parametrize("cell", ["nan", "inf"])
def test_non_finite_csv_values_are_422(adapter, cell):
    r = requests.post(adapter.url + "/predict", data=f"x,region\n{cell},west\n",
                      headers={"Content-Type": "text/csv"}, timeout=10)
    assert r.status_code == 422
    assert r.json()["problems"][0]["field"] == "x"


def test_body_not_json_is_400(adapter):
    r = requests.post(adapter.url + "/predict", data="{rows:", headers={"Content-Type": "application/json"}, timeout=10)
    assert r.status_code == 400
    assert "not valid JSON" in r.json()["error"]


def test_body_over_max_body_is_413(adapter):
    padding = " " * 5000  # the manifest allows 4Ki
    r = requests.post(adapter.url + "/predict", data='{"rows": []}' + padding,
                      headers={"Content-Type": "application/json"}, timeout=10)
    assert r.status_code == 413
    assert "limits.max_body" in r.json()["error"]


def test_a_body_refused_while_it_arrives_is_counted_under_its_route(adapter):
    def count() -> float:
        return metric(requests.get(adapter.url + "/metrics", timeout=5).text, "modelplane_adapter_requests_total",
                      route="/predict", status="413")

    before = count()
    r = requests.post(adapter.url + "/predict", data=b" " * 5000, headers={"Content-Type": "application/json"}, timeout=10)
    assert r.status_code == 413
    assert count() == before + 1


def test_more_rows_than_max_rows_is_413(adapter):
    r = requests.post(adapter.url + "/predict", data=b'{"rows":[' + b",".join([b"{}"] * 51) + b"]}",
                      headers={"Content-Type": "application/json"}, timeout=10)
    assert r.status_code == 413
    assert "51 rows" in r.json()["error"] and "limits.max_rows" in r.json()["error"]


def test_slow_model_is_504(adapter):
    r = adapter.predict([row(1006)])
    assert r.status_code == 504
    assert MODEL in r.json()["error"] and "limits.timeout" in r.json()["error"]
    # and the adapter still serves afterwards
    assert adapter.predict([row(1)]).status_code == 200


@pytest.mark.parametrize("x, fragment", [
    (1001, "answered 2 score(s) for 1 row(s)"),
    (1002, "non-numeric score"),
    (1003, "non-finite score"),
    (1004, "not JSON"),
    (1005, "HTTP 500: Error in predict(): object 'coef' not found"),
    (1007, 'without a "scores" list'),
], ids=["wrong-count", "non-numeric", "non-finite", "not-json", "model-5xx", "no-scores"])
def test_broken_model_answer_is_502_naming_the_model(adapter, x, fragment):
    r = adapter.predict([row(x)])
    assert r.status_code == 502
    error = r.json()["error"]
    assert f"model {MODEL}" in error and fragment in error, error


# -- Open Inference Protocol v2 -----------------------------------------------------------

def test_v2_health_and_metadata(adapter):
    assert requests.get(adapter.url + "/v2/health/live", timeout=5).json() == {"live": True}
    assert requests.get(adapter.url + "/v2/health/ready", timeout=5).status_code == 200
    assert requests.get(adapter.url + f"/v2/models/{MODEL}/ready", timeout=5).status_code == 200
    meta = requests.get(adapter.url + f"/v2/models/{MODEL}", timeout=5).json()
    assert meta["name"] == MODEL and meta["versions"] == ["1.0.0"]
    assert [(i["name"], i["datatype"]) for i in meta["inputs"]] == [
        ("x", "FP64"), ("n", "INT64"), ("region", "BYTES"), ("member", "BOOL")]
    assert meta["outputs"] == [{"name": "score", "datatype": "FP64", "shape": [-1]}]
    assert requests.get(adapter.url + "/v2/models/other", timeout=5).status_code == 404


def test_v2_infer_mlserver_pandas_request(adapter):
    # what mlserver.codecs.PandasCodec.encode_request(df) sends: one [n, 1] input per column
    request = {
        "id": "req-42",
        "parameters": {"content_type": "pd"},
        "inputs": [
            {"name": "x", "shape": [3, 1], "datatype": "FP64", "data": [1.0, 2.0, 3.5]},
            {"name": "n", "shape": [3, 1], "datatype": "INT64", "data": [0, 1, 2]},
            {"name": "region", "shape": [3, 1], "datatype": "BYTES", "parameters": {"content_type": "str"},
             "data": ["west", "east", "west"]},
            {"name": "member", "shape": [3, 1], "datatype": "BOOL", "data": [True, False, True]},
        ],
    }
    r = requests.post(adapter.url + f"/v2/models/{MODEL}/infer", json=request, timeout=10)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model_name"] == MODEL and body["model_version"] == "1.0.0" and body["id"] == "req-42"
    [out] = body["outputs"]
    assert out["name"] == "score" and out["datatype"] == "FP64" and out["shape"][0] == 3
    assert out["data"] == [2.0, 5.0, 9.0]


def test_v2_infer_kserve_client_request(adapter):
    # what kserve's InferRequest(...).to_rest() / tritonclient.http send: flat data, shape [n]
    request = {
        "id": "8c1b-kserve",
        "inputs": [
            {"name": "x", "shape": [2], "datatype": "FP64", "data": [0.25, 4.0]},
            {"name": "region", "shape": [2], "datatype": "BYTES", "data": ["east", "east"]},
        ],
        "outputs": [{"name": "score", "parameters": {"binary_data": False}}],
    }
    r = requests.post(adapter.url + f"/v2/models/{MODEL}/versions/1.0.0/infer", json=request, timeout=10)
    assert r.status_code == 200, r.text
    assert r.json()["id"] == "8c1b-kserve"
    assert r.json()["outputs"][0]["data"] == [0.5, 8.0]


def test_v2_infer_invalid_values_are_the_protocols_400_naming_the_input(adapter):
    """KServe's v2 REST spec: a rejected inference request is 400 with {"error": "..."}."""
    request = {"inputs": [
        {"name": "x", "shape": [2], "datatype": "FP64", "data": [1.0, 2.0]},
        {"name": "region", "shape": [2], "datatype": "BYTES", "data": ["west", "mars"]},
        {"name": "colour", "shape": [2], "datatype": "BYTES", "data": ["red", "blue"]},
    ]}
    r = requests.post(adapter.url + f"/v2/models/{MODEL}/infer", json=request, timeout=10)
    assert r.status_code == 400
    assert list(r.json()) == ["error"]
    assert "input 'colour'" in r.json()["error"]
    request["inputs"] = request["inputs"][:2]
    r = requests.post(adapter.url + f"/v2/models/{MODEL}/infer", json=request, timeout=10)
    assert r.status_code == 400 and "input 'region' row 2" in r.json()["error"] and "mars" in r.json()["error"]


def test_v2_outputs_keep_the_inputs_shape(adapter):
    """An input of shape [n] is answered [n] (KServe and Triton clients reshape by it); [n, 1] stays [n, 1]."""
    for shape in ([2], [2, 1]):
        request = {"inputs": [{"name": "x", "shape": shape, "datatype": "FP64", "data": [0.25, 4.0]},
                              {"name": "region", "shape": shape, "datatype": "BYTES", "data": ["east", "west"]}]}
        r = requests.post(adapter.url + f"/v2/models/{MODEL}/infer", json=request, timeout=10)
        assert r.status_code == 200, r.text
        assert r.json()["outputs"][0]["shape"] == shape and r.json()["outputs"][0]["data"] == [0.5, 8.0]
        # the binary extension answers the same shape
        r = requests.post(adapter.url + f"/v2/models/{MODEL}/infer", json={**request, "parameters": {
            "binary_data_output": True}}, timeout=10)
        head = json.loads(r.content[:int(r.headers["Inference-Header-Content-Length"])])
        assert head["outputs"][0]["shape"] == shape
        raw = r.content[int(r.headers["Inference-Header-Content-Length"]):]
        assert struct.unpack("<2d", raw) == (0.5, 8.0)
        # a binary request of shape [2]: answered [2]
        x, region = struct.pack("<2d", 0.25, 4.0), b"".join(struct.pack("<I", 4) + s for s in (b"east", b"west"))
        head = json.dumps({"inputs": [
            {"name": "x", "shape": shape, "datatype": "FP64", "parameters": {"binary_data_size": len(x)}},
            {"name": "region", "shape": shape, "datatype": "BYTES", "parameters": {"binary_data_size": len(region)}}],
            "outputs": [{"name": "score", "parameters": {"binary_data": False}}]}).encode()
        r = requests.post(adapter.url + f"/v2/models/{MODEL}/infer", data=head + x + region, timeout=10,
                          headers={"Inference-Header-Content-Length": str(len(head)),
                                   "Content-Type": "application/octet-stream"})
        assert r.status_code == 200, r.text
        assert r.json()["outputs"] == [{"name": "score", "datatype": "FP64", "shape": shape, "data": [0.5, 8.0]}]


# -- a column missing from every row: one problem ------------------------------------------

def test_a_csv_header_without_a_required_column_is_one_problem(adapter):
    body = "x,n\n" + "1,2\n" * 40
    r = requests.post(adapter.url + "/predict", data=body, headers={"Content-Type": "text/csv"}, timeout=10)
    assert r.status_code == 422, r.text
    assert r.json()["problems"] == [{"row": None, "field": "region", "error": "required column is missing"}]
    # an unknown column too: named once, not per row
    body = "x,region,colour\n" + "1,west,red\n" * 40
    r = requests.post(adapter.url + "/predict", data=body, headers={"Content-Type": "text/csv"}, timeout=10)
    assert r.status_code == 422 and r.json()["problems"] == [
        {"row": None, "field": "colour", "error": "unknown column (not a declared feature)"}]
    # the column is there, some of its cells are empty: named per row, from 1
    body = "x,region\n1,west\n2,\n3,east\n"
    r = requests.post(adapter.url + "/predict", data=body, headers={"Content-Type": "text/csv"}, timeout=10)
    assert r.json()["problems"] == [{"row": 2, "field": "region", "error": "required value is missing"}]


@pytest.mark.parametrize("n", [1, 7, 40])
def test_json_rows_none_of_which_has_a_required_field_is_one_problem(adapter, n):
    r = adapter.predict([{"x": 1.0}] * n)
    assert r.status_code == 422, r.text
    assert r.json() == {"error": "1 invalid value(s) in the request",
                        "problems": [{"row": None, "field": "region", "error": "required column is missing"}]}
    r = requests.post(adapter.url + f"/v2/models/{MODEL}/infer", timeout=10, json={
        "inputs": [{"name": "x", "shape": [n], "datatype": "FP64", "data": [1.0] * n}]})
    assert r.status_code == 400 and r.json()["error"] == (
        "1 invalid value(s) in the request: input 'region': required column is missing")


# -- passthrough columns -------------------------------------------------------------------

PASSTHROUGH = """
passthrough:
  - customer_id
  - {name: batch_no, type: integer, required: false}
  - {name: vip, type: boolean, required: false}
"""


@pytest.fixture(scope="module")
def pt_adapter(tmp_path_factory):
    """The fixture model with passthrough columns declared; the model refuses any column it does
    not know (so a 200 proves it never saw them)."""
    folder = tmp_path_factory.mktemp("passthrough") / "model"
    shutil.copytree(FIXTURE, folder)
    (folder / "model.yaml").write_text((FIXTURE / "model.yaml").read_text() + PASSTHROUGH)
    a = Adapter(folder.parent, folder=folder)
    yield a
    a.stop()


@pytest.mark.parametrize("n", [2, 12])  # the row-by-row and the column-at-a-time checks
def test_passthrough_json_comes_back_beside_the_scores(pt_adapter, n):
    rows = [row(float(i), customer_id=f"C-{i:04d}", **({"batch_no": i} if i % 2 else {})) for i in range(n)]
    r = pt_adapter.predict(rows)
    assert r.status_code == 200, r.text
    assert r.json() == {"model": MODEL, "version": "1.0.0", "scores": [2.0 * i for i in range(n)],
                        "passthrough": {"customer_id": [f"C-{i:04d}" for i in range(n)],
                                        "batch_no": [i if i % 2 else None for i in range(n)],
                                        "vip": [None] * n}}
    assert pt_adapter.predict([]).json()["passthrough"] == {"customer_id": [], "batch_no": [], "vip": []}


def test_passthrough_csv_in_and_out(pt_adapter):
    body = 'region,customer_id,x,vip\nwest,"Smith, J.",1,true\neast,007,2.5,\n'
    r = requests.post(pt_adapter.url + "/predict", data=body, timeout=10,
                      headers={"Content-Type": "text/csv", "Accept": "text/csv"})
    assert r.status_code == 200, r.text
    assert list(csv.reader(io.StringIO(r.text))) == [
        ["customer_id", "batch_no", "vip", "score"], ["Smith, J.", "", "true", "2.0"], ["007", "", "", "5.0"]]
    r = requests.post(pt_adapter.url + "/predict", data=body, headers={"Content-Type": "text/csv"}, timeout=10)
    assert r.json()["passthrough"] == {"customer_id": ["Smith, J.", "007"], "batch_no": [None, None],
                                       "vip": [True, None]}


def test_passthrough_values_are_checked_naming_row_and_field(pt_adapter):
    r = pt_adapter.predict([row(customer_id="a"), row(customer_id=7, batch_no="two")])
    assert r.status_code == 422
    assert r.json()["problems"] == [{"row": 2, "field": "customer_id", "error": "expected a string; got 7"},
                                    {"row": 2, "field": "batch_no", "error": "expected an integer; got 'two'"}]
    body = "x,region,customer_id,batch_no\n" + "1,west,a,1\n" * 9 + "1,west,b,1.5\n"
    r = requests.post(pt_adapter.url + "/predict", data=body, headers={"Content-Type": "text/csv"}, timeout=10)
    assert r.json()["problems"] == [{"row": 10, "field": "batch_no", "error": "expected an integer; got 1.5"}]
    r = pt_adapter.predict([row()] * 30)
    assert r.json()["problems"] == [{"row": None, "field": "customer_id", "error": "required column is missing"}]
    r = pt_adapter.predict([row(customer_id="a", id=1)])
    assert r.json()["problems"] == [{"row": 1, "field": "id", "error": "unknown column (not a declared feature or "
                                                                       "passthrough column)"}]


def test_passthrough_v2_inputs_answer_tensors_beside_the_score(pt_adapter):
    url = pt_adapter.url + f"/v2/models/{MODEL}/infer"
    meta = requests.get(pt_adapter.url + f"/v2/models/{MODEL}", timeout=5).json()
    assert [o["name"] for o in meta["outputs"]] == ["score", "customer_id", "batch_no", "vip"]
    assert {"name": "customer_id", "datatype": "BYTES", "shape": [-1],
            "parameters": {"required": True, "passthrough": True}} in meta["inputs"]
    for shape in ([3], [3, 1]):
        request = {"inputs": [
            {"name": "x", "shape": shape, "datatype": "FP64", "data": [1.0, 2.0, 3.0]},
            {"name": "region", "shape": shape, "datatype": "BYTES", "data": ["west", "east", "west"]},
            {"name": "customer_id", "shape": shape, "datatype": "BYTES", "data": ["a", "b", "c"]},
            {"name": "batch_no", "shape": shape, "datatype": "INT64", "data": [7, 8, 9]}]}
        r = requests.post(url, json=request, timeout=10)
        assert r.status_code == 200, r.text
        assert r.json()["outputs"] == [  # vip was not sent: no tensor for it
            {"name": "score", "datatype": "FP64", "shape": shape, "data": [2.0, 4.0, 6.0]},
            {"name": "customer_id", "datatype": "BYTES", "shape": shape, "data": ["a", "b", "c"]},
            {"name": "batch_no", "datatype": "INT64", "shape": shape, "data": [7, 8, 9]}]
    # an outputs filter may name the passthrough columns; binary answers hold them too
    request["outputs"] = [{"name": "customer_id", "parameters": {"binary_data": True}},
                          {"name": "score", "parameters": {"binary_data": True}}, {"name": "batch_no"}]
    r = requests.post(url, json=request, timeout=10)
    assert r.status_code == 200, r.text
    n = int(r.headers["Inference-Header-Content-Length"])
    head, raw = json.loads(r.content[:n]), r.content[n:]
    assert [(o["name"], o["shape"]) for o in head["outputs"]] == [("customer_id", [3, 1]), ("score", [3, 1]),
                                                                  ("batch_no", [3, 1])]
    assert head["outputs"][2]["data"] == [7, 8, 9]
    ids_size = head["outputs"][0]["parameters"]["binary_data_size"]
    assert raw[:ids_size] == b"".join(struct.pack("<I", 1) + c for c in (b"a", b"b", b"c"))
    assert struct.unpack("<3d", raw[ids_size:]) == (2.0, 4.0, 6.0)
    # a bad passthrough value: the protocol's 400 naming the input and row
    request = {"inputs": request["inputs"][:2] + [
        {"name": "customer_id", "shape": [3], "datatype": "INT64", "data": [1, 2, 3]}]}
    r = requests.post(url, json=request, timeout=10)
    assert r.status_code == 400 and "input 'customer_id' row 1: expected a string" in r.json()["error"]
    r = requests.post(url, json={**request, "outputs": [{"name": "id"}]}, timeout=10)
    assert r.status_code == 400 and "'score', 'customer_id', 'batch_no', 'vip'" in r.json()["error"]


# -- metrics ------------------------------------------------------------------------------

def metric(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        m = re.match(r"^(\w+)\{(.*)\} (\S+)$", line)
        if m and m.group(1) == name:
            got = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2)))
            if all(got.get(k) == v for k, v in labels.items()):
                return float(m.group(3))
    return 0.0


def test_metrics_count_requests_by_route_and_status(adapter):
    before = requests.get(adapter.url + "/metrics", timeout=5).text
    for _ in range(3):
        assert adapter.predict([row()]).status_code == 200
    assert adapter.predict([{"x": "bad"}]).status_code == 422
    after = requests.get(adapter.url + "/metrics", timeout=5)
    assert after.headers["Content-Type"].startswith("text/plain")
    text = after.text

    def delta(name, **labels):
        return metric(text, name, **labels) - metric(before, name, **labels)

    assert delta("modelplane_adapter_requests_total", route="/predict", status="200") == 3
    assert delta("modelplane_adapter_requests_total", route="/predict", status="422") == 1
    assert delta("modelplane_adapter_request_duration_seconds_count", route="/predict") == 4
    assert delta("modelplane_adapter_request_duration_seconds_bucket", route="/predict", le="+Inf") == 4
    assert metric(text, "modelplane_adapter_model_up", model=MODEL) == 1
    assert metric(text, "modelplane_adapter_in_flight_requests", model=MODEL) == 1  # this very /metrics request
    assert "# TYPE modelplane_adapter_request_duration_seconds histogram" in text


# -- readiness, model down, supervisor ----------------------------------------------------

def test_model_not_ready_is_503(tmp_path):
    a = Adapter(tmp_path, ready=False, FIXTURE_MODE="never-ready")
    try:
        assert requests.get(a.url + "/v2/health/live", timeout=5).status_code == 200
        assert requests.get(a.url + "/v2/health/ready", timeout=5).status_code == 503
        assert requests.get(a.url + f"/v2/models/{MODEL}/ready", timeout=5).status_code == 503
        r = a.predict([row()])
        assert r.status_code == 503 and "not ready" in r.json()["error"]
        assert metric(requests.get(a.url + "/metrics", timeout=5).text, "modelplane_adapter_model_up") == 0
    finally:
        a.stop()


def test_sidecar_model_down_is_503(tmp_path):
    model_port = free_port()
    with open(tmp_path / "model.stderr", "wb") as err:
        model = subprocess.Popen([sys.executable, "model.py"], cwd=FIXTURE, env=child_env(PORT=str(model_port)),
                                 stderr=err)
    a = None
    try:
        wait_http(f"http://127.0.0.1:{model_port}/health", proc=model)
        a = Adapter(tmp_path, "--model-url", f"http://127.0.0.1:{model_port}")
        assert a.predict([row(2)]).json()["scores"] == [4.0]
        model.kill()
        model.wait()
        r = a.predict([row(2)])
        assert r.status_code == 503, r.text
        assert MODEL in r.json()["error"]
        wait_http(a.url + "/v2/health/ready", proc=a.proc, status=503)
    finally:
        if a:
            a.stop()
        stop(model)


def _model_pid(adapter: Adapter) -> int:
    from model_procs import host_pid

    m = re.search(r"fixture model pid=(\d+)", adapter.stderr())
    assert m, adapter.stderr()
    return host_pid(int(m.group(1)), adapter.proc.pid)


def _gone(pid: int) -> bool:
    for _ in range(200):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def test_supervisor_passes_model_stderr_through_and_stops_model_on_sigterm(tmp_path):
    a = Adapter(tmp_path)
    pid = _model_pid(a)  # the model's own stderr line, passed through the adapter's stderr
    os.kill(pid, 0)
    assert a.stop() == 0
    assert _gone(pid), f"model process {pid} outlived the adapter"


def test_supervisor_exits_non_zero_when_model_dies(tmp_path):
    a = Adapter(tmp_path, FIXTURE_CRASH_AFTER="1.5")
    try:
        code = a.proc.wait(timeout=30)
    finally:
        a.stop()
    assert code != 0
    err = a.stderr()
    assert "exited with status 3" in err
    assert "fatal: out of coefficients" in err.split("exited with status 3", 1)[1]  # the tail is printed


def test_supervisor_reports_a_model_that_cannot_start(tmp_path):
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "model.yaml").write_text((FIXTURE / "model.yaml").read_text().replace(
        "command: [python, model.py]", "command: [python, -c, 'import sys; sys.exit(\"no coefficients file\")']"))
    proc = subprocess.run([sys.executable, "-m", "adapters", "serve", str(folder), "--port", str(free_port())],
                          cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=30, check=False)
    assert proc.returncode != 0
    assert "exited with status 1" in proc.stderr and "no coefficients file" in proc.stderr


def test_supervisor_never_orphans_the_model_even_if_killed(tmp_path):
    a = Adapter(tmp_path)
    pid = _model_pid(a)
    a.proc.kill()  # SIGKILL: no handler runs; the kernel's parent-death signal must take the model down
    a.proc.wait()
    assert _gone(pid), f"model process {pid} was orphaned"


def test_taken_port_is_a_one_line_error_and_stops_the_model(tmp_path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run([sys.executable, "-m", "adapters", "serve", str(FIXTURE), "--port", str(port)],
                              cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in proc.stderr
    assert "Traceback" not in proc.stderr
    m = re.search(r"started model \S+ \(pid (\d+)\)", proc.stderr)
    assert m and _gone(int(m.group(1)))


# -- the manifest, checked in a forked child: the same strict messages, none of its imports ---------

def _serve(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "adapters", "serve", *args, "--port", str(free_port())],
                          cwd=ROOT, env=child_env(**env), capture_output=True, text=True, timeout=60, check=False)


def test_serve_refuses_an_invalid_manifest_naming_file_line_and_field(tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "model.yaml").write_text((FIXTURE / "model.yaml").read_text().replace("type: integer", "type: int"))
    proc = _serve(str(folder))
    assert proc.returncode == 2, proc.stderr
    assert "invalid manifest" in proc.stderr and "model.yaml:8" in proc.stderr and "features[1].type" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_serve_without_a_manifest_and_with_a_batch_one(tmp_path):
    proc = _serve()
    assert proc.returncode == 2 and "give MODEL_DIR" in proc.stderr
    proc = _serve(MODELPLANE_MANIFEST="{not json")
    assert proc.returncode != 0 and "MODELPLANE_MANIFEST is not JSON" in proc.stderr
    proc = _serve(str(FIXTURE.parent / "batch"))
    assert proc.returncode == 2 and "`serve` is for realtime models" in proc.stderr
    proc = _serve(str(tmp_path))
    assert proc.returncode == 2 and "no model.yaml here" in proc.stderr


def test_serve_from_the_env_manifest_as_in_a_container(tmp_path):
    import json

    from adapters.manifest import load_manifest

    manifest = json.dumps(load_manifest(FIXTURE).to_dict())
    model_port = free_port()
    model = subprocess.Popen([sys.executable, "model.py"], cwd=FIXTURE, env=child_env(PORT=str(model_port)),
                             stderr=subprocess.DEVNULL)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "adapters", "serve", "--port", str(port), "--model-url",
                             f"http://127.0.0.1:{model_port}"], cwd=tmp_path, env=child_env(MODELPLANE_MANIFEST=manifest),
                            stderr=subprocess.DEVNULL)
    try:
        wait_http(f"http://127.0.0.1:{port}/v2/health/ready", proc=proc)
        r = requests.post(f"http://127.0.0.1:{port}/predict", json={"rows": [row(2, n=1), {"x": 1}]}, timeout=10)
        assert r.status_code == 422 and r.json()["problems"][0]["field"] == "region"
        r = requests.post(f"http://127.0.0.1:{port}/predict", json={"rows": [row(2, n=1)] * 51}, timeout=10)
        assert r.status_code == 413 and "limits.max_rows" in r.json()["error"]
    finally:
        stop(proc)
        stop(model)


def test_the_serving_process_maps_neither_pydantic_nor_yaml(adapter):
    """Resident memory of every replica: the manifest's parser runs in a child that is gone."""
    maps = Path(f"/proc/{adapter.proc.pid}/maps").read_text()
    assert "pydantic_core" not in maps and "_yaml" not in maps and "aiohttp" not in maps


def test_the_manifest_is_checked_in_process_once_the_parser_is_loaded(monkeypatch):
    """A process that imported adapters.manifest already (a warm spare can) does not fork for it;
    the answer is the same as the forked check's (see the serve tests above)."""
    import adapters.manifest  # noqa: F401
    from adapters import served

    def no_fork():
        raise AssertionError("forked although the parser was loaded")

    monkeypatch.setattr(os, "fork", no_fork)
    manifest, code = served.serve_manifest(str(FIXTURE))
    assert code == 0 and manifest.ref == "fixture-realtime@1.0.0" and manifest.limits.max_rows == 50
    assert [f.name for f in manifest.features] == ["x", "n", "region", "member"]
    assert manifest.limits.max_body_bytes == 4096 and manifest.limits.timeout_seconds == 1.0
