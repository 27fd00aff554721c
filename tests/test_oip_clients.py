"""Stock Open Inference Protocol clients against a running control service, given only its base
URL and the bearer token as a header: Triton's (`tritonclient.http`) and KServe's
(`kserve.InferenceRESTClient`). The control service runs the local runtime and the example
realtime model, with its real adapter and replicas; each client checks the server's and the
model's readiness, reads the model's metadata and scores rows, which must get the scores
`/models/{name}/predict` gives the same rows, in the shape they were sent."""
from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from control_helpers import AUTH, TOKEN, api, running, settings_for

ROOT = Path(__file__).resolve().parent.parent
MODEL = "donor-propensity"
SCORE = "propensity"
NUMPY = {"FP64": np.float64, "INT64": np.int64, "BOOL": np.bool_, "BYTES": np.object_}


def complete_rows() -> list[dict]:
    """The example model's sample rows that have every feature (a v2 tensor has no empty cell),
    typed as its manifest says."""
    import yaml

    folder = ROOT / "models" / MODEL
    features = {f["name"]: f["type"] for f in yaml.safe_load((folder / "model.yaml").read_text())["features"]}
    rows = []
    with open(folder / "sample.csv", newline="") as f:
        for raw in csv.DictReader(f):
            if any(text == "" for text in raw.values()):
                continue
            rows.append({k: (float(v) if features[k] == "number" else int(v) if features[k] == "integer"
                             else v.lower() == "true" if features[k] == "boolean" else v) for k, v in raw.items()})
    assert len(rows) >= 5
    return rows


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    if not (ROOT / "models" / MODEL / "model.yaml").is_file():
        pytest.skip(f"the example model {MODEL} is not present")
    tmp = tmp_path_factory.mktemp("oip")
    settings = settings_for(tmp)
    shutil.copytree(ROOT / "models" / MODEL, settings.models_dir / MODEL)
    rows = complete_rows()
    with running(settings) as server:
        r = api.post(f"{server.url}/models/{MODEL}/predict", json={"rows": rows}, timeout=60)
        assert r.status_code == 200, r.text
        yield server, rows, r.json()["scores"]


def auth() -> dict:
    """The token header, a fresh dict each call: tritonclient adds its own headers to the one given."""
    return dict(AUTH)


def test_tritonclient_given_the_base_url(served, caplog):
    httpclient = pytest.importorskip("tritonclient.http")
    from tritonclient.utils import InferenceServerException

    server, rows, expected = served
    n = len(rows)
    client = httpclient.InferenceServerClient(url=f"127.0.0.1:{server.port}")   # host:port, as Triton's clients take it
    try:
        assert client.is_server_live(headers=auth()) and client.is_server_ready(headers=auth())
        assert client.get_server_metadata(headers=auth())["name"] == "modelplane"
        assert client.is_model_ready(MODEL, headers=auth())
        assert client.is_model_ready(MODEL, model_version="1.0.0", headers=auth())
        assert not client.is_model_ready(MODEL, model_version="9.9.9", headers=auth())

        metadata = client.get_model_metadata(MODEL, headers=auth())
        assert metadata["name"] == MODEL and metadata["versions"] == ["1.0.0"]
        assert [o["name"] for o in metadata["outputs"]] == [SCORE]
        datatypes = {i["name"]: i["datatype"] for i in metadata["inputs"]}
        assert set(datatypes) == set(rows[0])

        def inputs(binary: bool) -> list:
            out = []
            for name, datatype in datatypes.items():
                tensor = httpclient.InferInput(name, [n], datatype)
                values = [row[name] for row in rows]
                tensor.set_data_from_numpy(np.array([v.encode() for v in values] if datatype == "BYTES" else values,
                                                    dtype=NUMPY[datatype]), binary_data=binary)
                out.append(tensor)
            return out

        for binary in (True, False):   # binary tensors (the client's default) and JSON lists, both ways
            result = client.infer(MODEL, inputs(binary), headers=auth(), request_id=f"triton-{binary}",
                                  outputs=[httpclient.InferRequestedOutput(SCORE, binary_data=binary)])
            answer = result.get_response()
            assert answer["model_name"] == MODEL and answer["model_version"] == "1.0.0"
            assert answer["id"] == f"triton-{binary}"
            assert result.as_numpy(SCORE).reshape(-1).tolist() == pytest.approx(expected, rel=1e-12), binary
        # a gzip body, as the client compresses it
        result = client.infer(MODEL, inputs(True), headers=auth(), request_compression_algorithm="gzip")
        assert result.as_numpy(SCORE).reshape(-1).tolist() == pytest.approx(expected, rel=1e-12)
        # one version's own route: /v2/models/{name}/versions/{version}/infer
        result = client.infer(MODEL, inputs(True), model_version="1.0.0", headers=auth())
        assert result.as_numpy(SCORE).reshape(-1).tolist() == pytest.approx(expected, rel=1e-12)

        # the service's errors come through the client as the protocol's error object's text
        with pytest.raises(InferenceServerException, match="no model named 'no-such-model'"):
            client.get_model_metadata("no-such-model", headers=auth())
        with pytest.raises(InferenceServerException, match="has no version 9.9.9"):
            client.infer(MODEL, inputs(True), model_version="9.9.9", headers=auth())
        with pytest.raises(InferenceServerException, match="needs 'Authorization: Bearer <token>'"):
            client.infer(MODEL, inputs(True))
        with pytest.raises(InferenceServerException, match="bearer token is not one this service knows"):
            client.get_model_metadata(MODEL, headers={"Authorization": "Bearer wrong"})
        # the client drops a connection once it has read a health check's status: no error for the service
        assert [r.getMessage() for r in caplog.records if r.levelname == "ERROR"] == []

        # the shape the rows were sent in is the shape of the scores
        result = client.infer(MODEL, inputs(True), headers=auth())
        assert result.get_output(SCORE)["shape"] == [n]
    finally:
        client.close()


def kserve_python() -> str:
    """The interpreter of the virtualenv holding the kserve client (`make test` makes
    .venv-kserve; MODELPLANE_KSERVE_PYTHON names another)."""
    given = os.environ.get("MODELPLANE_KSERVE_PYTHON") or str(ROOT / ".venv-kserve" / "bin" / "python")
    if not Path(given).is_file():
        reason = (f"no kserve client at {given}: `make test` makes it (.venv-kserve) (kserve pins cloudevents<2, the "
                  "project needs 2, so it has a virtualenv of its own)")
        if os.environ.get("CI") == "true":
            pytest.fail(reason + " - CI must run this test")
        pytest.skip(reason)
    return given


def test_kserve_client_given_the_base_url(served):
    python = kserve_python()
    server, rows, expected = served
    n = len(rows)
    metadata = api.get(f"{server.url}/v2/models/{MODEL}").json()
    datatypes = {i["name"]: i["datatype"] for i in metadata["inputs"]}
    spec = {"columns": {name: [row[name] for row in rows] for name in datatypes}, "datatypes": datatypes}
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    done = subprocess.run([python, str(Path(__file__).with_name("kserve_client.py")), server.url, MODEL],
                          input=json.dumps(spec), capture_output=True, text=True, timeout=120,
                          env={**env, "MODELPLANE_TOKEN": TOKEN})
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout)
    assert out["server_live"] is True and out["server_ready"] is True and out["model_ready"] is True
    assert out["model_ready_without_token"] is False
    assert "404" in out["unknown_model"] and "no model named 'no-such-model'" in out["unknown_model"]
    assert out["json"]["model_name"] == MODEL   # (kserve's InferResponse.from_bytes drops model_version)
    assert out["json"]["id"] == "kserve-json" and out["binary"]["id"] == "kserve-binary"
    for how in ("json", "binary"):
        (output,) = out[how]["outputs"]
        assert output["name"] == SCORE and output["datatype"] == "FP64"
        assert output["data"] == pytest.approx(expected, rel=1e-12), how
    # the shape the rows were sent in is the shape of the scores
    for how in ("json", "binary"):
        assert out[how]["outputs"][0]["shape"] == [n], how
