"""Traffic splits, shadow copies and each version's own URL, with real replicas behind the real
control service (front door + API), driven through the API and the CLI."""
from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from control.cli import main
from control.errors import NotFound
from control.runtime.local import LocalRuntime
from control_helpers import TOKEN, api, running, settings_for, wait_until, token_file
from test_local_runtime import make_model

SCALING = {"min": 0, "max": 2, "target_concurrency": 8, "idle_timeout": "60s"}


def tar_of(folder: Path) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(folder, arcname=folder.name)
    return buf.getvalue()


def deploy(server, folder: Path, *, live: bool = True) -> dict:
    r = api.post(f"{server.url}/api/models", params={"live": str(live).lower()}, data=tar_of(folder),
                 headers={"Content-Type": "application/gzip"})
    assert r.status_code == 201, r.text
    return r.json()


def predict(server, x: float, path: str = "/models/echo/predict") -> dict:
    r = api.post(f"{server.url}{path}", json={"rows": [{"x": x}]}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


@pytest.fixture
def plane(tmp_path, monkeypatch):
    """echo 1.0.0 (score = x) live, 1.1.0 (score = 2x) deployed beside it, not live."""
    for var in ("MODELPLANE_URL", "MODELPLANE_TOKEN", "MODELPLANE_PORT"):
        monkeypatch.delenv(var, raising=False)
    settings = settings_for(tmp_path)
    with running(settings) as server:
        assert deploy(server, make_model(tmp_path, "echo", version="1.0.0", scaling=SCALING,
                                         params={"factor": 1}))["live"] is True
        assert deploy(server, make_model(tmp_path, "echo", version="1.1.0", scaling=SCALING,
                                         params={"factor": 2}), live=False)["live"] is False
        yield server, tmp_path


def traffic(server) -> dict:
    r = api.get(f"{server.url}/api/models/echo/traffic")
    assert r.status_code == 200, r.text
    return r.json()


def test_a_version_deployed_not_live_takes_no_request_until_rolled_out(plane):
    server, _ = plane
    assert {predict(server, 1)["version"] for _ in range(20)} == {"1.0.0"}
    t = traffic(server)
    assert t["live"] == "1.0.0" and t["candidate"] is None
    assert [(x["version"], x["percent"], x["tag"]) for x in t["targets"]] == [("1.0.0", 100, "v1-0-0")]


def test_2000_requests_at_10_percent_land_10_percent_on_the_candidate(plane):
    server, _ = plane
    r = api.post(f"{server.url}/api/models/echo/rollout", json={"version": "1.1.0", "percent": 10})
    assert r.status_code == 200, r.text
    assert [(t["version"], t["percent"]) for t in r.json()["targets"]] == [("1.0.0", 90), ("1.1.0", 10)]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda i: predict(server, i), range(2000)))
    versions = Counter(a["version"] for a in answers)
    assert versions["1.0.0"] + versions["1.1.0"] == 2000
    assert 160 <= versions["1.1.0"] <= 240, versions           # 10 % ± 2 %
    # each answer came from the version it names: 1.1.0 doubles
    assert all(a["scores"] == [(2 if a["version"] == "1.1.0" else 1) * i] for i, a in enumerate(answers))
    # and the per-version counts in the model's detail agree with what the callers saw
    targets = {t["version"]: t for t in api.get(f"{server.url}/api/models/echo").json()["traffic"]["targets"]}
    assert targets["1.1.0"]["requests"] == versions["1.1.0"] and targets["1.0.0"]["requests"] == versions["1.0.0"]
    assert targets["1.1.0"]["errors"] == 0


def test_each_version_has_its_own_url_whatever_the_split(plane):
    server, _ = plane
    assert predict(server, 3, "/models/echo/versions/1.1.0/predict") == {"model": "echo", "version": "1.1.0",
                                                                           "scores": [6]}
    assert predict(server, 3, "/models/echo/versions/1.0.0/predict")["scores"] == [3]
    # the live URL is untouched by it
    assert predict(server, 3)["version"] == "1.0.0"
    r = api.post(f"{server.url}/models/echo/versions/9.9.9/predict", json={"rows": [{"x": 1}]})
    assert r.status_code == 404 and "9.9.9" in r.json()["error"] and "1.1.0" in r.json()["error"]
    # the Open Inference Protocol's versioned route goes to the version it names too
    r = api.post(f"{server.url}/models/echo/v2/models/echo/versions/1.1.0/infer",
                 json={"inputs": [{"name": "x", "shape": [1], "datatype": "FP64", "data": [5]}]})
    assert r.status_code == 200, r.text
    assert r.json()["model_version"] == "1.1.0" and r.json()["outputs"][0]["data"] == [10]
    # a version's URL needs the token like any predict
    import requests

    assert requests.post(f"{server.url}/models/echo/versions/1.1.0/predict", json={"rows": [{"x": 1}]}).status_code == 401


def test_promote_then_rollback_then_withdraw(plane, capsys):
    server, _ = plane
    flags = ["--url", server.url, "--token-file", token_file(TOKEN)]
    assert main(["rollout", "echo", "1.1.0", "--percent", "50", *flags]) == 0
    text = capsys.readouterr().out
    assert "1.1.0 answers 50% of requests, 1.0.0 the rest" in text and "modelplane promote echo" in text
    assert main(["status", "echo", *flags]) == 0
    text = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in text.split("\ntraffic\n")[1].splitlines()[1:3]}
    assert rows["1.0.0"][1:3] == ["live", "50%"] and rows["1.1.0"][1:3] == ["candidate", "50%"]

    assert main(["promote", "echo", *flags]) == 0
    assert "1.1.0 is live and takes every request" in capsys.readouterr().out
    assert {predict(server, 1)["version"] for _ in range(30)} == {"1.1.0"}
    t = traffic(server)
    assert (t["live"], t["candidate"], t["previous"]) == ("1.1.0", None, "1.0.0")

    # rollback with no version undoes the promote at once
    assert main(["rollback", "echo", *flags]) == 0
    assert "1.0.0 is live" in capsys.readouterr().out
    assert {predict(server, 1)["version"] for _ in range(30)} == {"1.0.0"}

    # and withdraws a rollout in progress, the live version keeping every request
    assert main(["rollout", "echo", "1.1.0", "--percent", "100", *flags]) == 0
    assert {predict(server, 1)["version"] for _ in range(10)} == {"1.1.0"}
    assert main(["rollback", "echo", *flags]) == 0
    capsys.readouterr()
    t = traffic(server)
    assert (t["live"], t["candidate"], t["percent"]) == ("1.0.0", None, 0)
    assert {predict(server, 1)["version"] for _ in range(30)} == {"1.0.0"}

    # what cannot be done says why
    assert main(["promote", "echo", *flags]) == 1
    assert "no rollout to promote" in capsys.readouterr().err
    assert main(["rollout", "echo", "1.0.0", "--percent", "10", *flags]) == 1
    assert "live version already" in capsys.readouterr().err
    assert main(["rollout", "echo", "1.1.0", *flags]) == 1
    assert "--percent" in capsys.readouterr().err


def test_bad_rollouts_are_refused_naming_the_field(plane):
    server, _ = plane
    url = f"{server.url}/api/models/echo/rollout"
    for body, field in [({"version": "1.1.0", "percent": 101}, "percent"), ({"version": "1.1.0", "shadow": -1}, "shadow"),
                        ({"version": "../x", "percent": 1}, "version"), ({"percent": 1}, "version"),
                        ({"version": "1.1.0", "weight": 1}, "weight")]:
        r = api.post(url, json=body)
        assert r.status_code == 400 and field in r.json()["error"], (body, r.text)
    r = api.post(url, json={"version": "7.0.0", "percent": 1})
    assert r.status_code == 404 and "7.0.0" in r.json()["error"]
    assert api.post(f"{server.url}/api/models/nope/rollout", json={"version": "1.0.0"}).status_code == 404
    # a cross-site form post cannot start a rollout (JSON only, token required)
    import requests

    r = requests.post(url, data="version=1.1.0&percent=100", headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 401
    r = api.post(url, data="version=1.1.0&percent=100", headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 415
    assert traffic(server)["candidate"] is None


def test_shadow_copies_are_recorded_never_returned(plane, capsys):
    server, _ = plane
    r = api.post(f"{server.url}/api/models/echo/rollout", json={"version": "1.1.0", "shadow": 100})
    assert r.status_code == 200 and r.json()["percent"] == 0 and r.json()["shadow"] == 100
    answers = [predict(server, i / 10) for i in range(40)]
    assert {a["version"] for a in answers} == {"1.0.0"}          # the caller only ever sees the live answer
    report = wait_until(lambda: (x := api.get(f"{server.url}/api/models/echo/shadow",
                                               params={"threshold": 1.0}).json())["requests"] == 40 and x,
                        120, what="40 shadow records")
    assert (report["live"], report["candidate"], report["candidate_errors"]) == ("1.0.0", "1.1.0", 0)
    c = report["comparison"]
    assert c["rows"] == 40 and c["difference"]["max_abs"] == pytest.approx(3.9)
    # x >= 1 live vs 2x >= 1 shadow: rows with x in [0.5, 1) flip
    assert c["flips"]["count"] == 5 and c["flips"]["to_positive"] == 5
    flags = ["--url", server.url, "--token-file", token_file(TOKEN)]
    assert main(["shadow", "echo", "--threshold", "1", *flags]) == 0
    text = capsys.readouterr().out
    assert "40 live request(s) of 1.0.0 mirrored to 1.1.0" in text and "decisions flipped at 1.0: 5 of 40" in text


def test_a_slow_candidate_never_holds_the_live_answer(plane):
    server, tmp_path = plane
    # 3.0.0 takes 3 s to start: every shadow copy waits for it, no live answer does
    deploy(server, make_model(tmp_path, "echo", version="3.0.0", scaling=SCALING,
                              params={"factor": 3, "startup_delay": 3.0}), live=False)
    assert api.post(f"{server.url}/api/models/echo/rollout", json={"version": "3.0.0", "shadow": 100}).status_code == 200
    answers = [predict(server, i) for i in range(10)]
    assert [a["version"] for a in answers] == ["1.0.0"] * 10
    # all ten answered while the candidate was still starting: none of its answers is in yet
    assert api.get(f"{server.url}/api/models/echo/shadow").json()["requests"] == 0
    report = wait_until(lambda: (x := api.get(f"{server.url}/api/models/echo/shadow").json())["requests"] == 10 and x,
                        120, what="10 shadow records")
    assert report["candidate_errors"] == 0 and report["comparison"]["rows"] == 10
    assert [r["difference"] for r in report["comparison"]["largest"][:1]] == [18.0]   # 3 * 9 - 9


def test_a_failing_candidate_never_fails_the_live_answer(plane, seen_by_models):
    server, tmp_path = plane
    # 2.0.0 passes its deploy check, then cannot start any more (a crashing version is refused
    # at deploy: tests/test_deploy_check.py)
    flag = seen_by_models / "break-it"
    deploy(server, make_model(tmp_path, "echo", version="2.0.0", scaling=SCALING,
                              params={"factor": 2, "crash_at_start_if": str(flag)}), live=False)
    flag.touch()
    assert api.post(f"{server.url}/api/models/echo/rollout", json={"version": "2.0.0", "shadow": 100}).status_code == 200
    answers = [predict(server, i) for i in range(10)]
    assert [a["scores"] for a in answers] == [[i] for i in range(10)]
    report = wait_until(lambda: (x := api.get(f"{server.url}/api/models/echo/shadow").json())["requests"] == 10 and x,
                        120, what="10 shadow records")
    assert report["candidate_errors"] == 10 and report["comparison"] is None
    assert all(e["status"] in (502, 503) for e in report["errors"])
    # under a split, a candidate that keeps crashing gives its share back to the live version
    assert api.post(f"{server.url}/api/models/echo/rollout", json={"version": "2.0.0", "percent": 50}).status_code == 200
    wait_until(lambda: _failed(server, "2.0.0"), 120, what="2.0.0 failed")
    assert [predict(server, 1)["version"] for _ in range(20)] == ["1.0.0"] * 20


def _failed(server, version: str) -> bool:
    with server.plane.runtime.replicas._lock:
        rev = server.plane.runtime.replicas._revisions.get(("echo", version))
        return rev is not None and rev.failed is not None


def test_each_version_scales_to_zero_on_its_own(tmp_path):
    quick = {**SCALING, "idle_timeout": "1s"}
    settings = settings_for(tmp_path)
    with running(settings) as server:
        deploy(server, make_model(tmp_path, "echo", version="1.0.0", scaling=quick, params={"factor": 1}))
        deploy(server, make_model(tmp_path, "echo", version="1.1.0", scaling=quick, params={"factor": 2}), live=False)
        api.post(f"{server.url}/api/models/echo/rollout", json={"version": "1.1.0", "percent": 0})

        def replicas():
            return {t["version"]: t["replicas"] for t in api.get(f"{server.url}/api/models/echo").json()["traffic"]["targets"]}

        predict(server, 1)
        # the live version started a replica; the candidate, asked for nothing, has none
        assert replicas()["1.1.0"] == 0
        predict(server, 1, "/models/echo/versions/1.1.0/predict")
        # each goes back to zero after its own idle timeout
        wait_until(lambda: replicas() == {"1.0.0": 0, "1.1.0": 0}, 120, what="both versions at zero")


def test_the_split_survives_a_restart(tmp_path):
    settings = settings_for(tmp_path)
    from adapters.manifest import load_manifest

    with LocalRuntime(settings) as rt:
        rt.deploy(load_manifest(make_model(tmp_path, "echo", version="1.0.0", params={"factor": 1})))
        rt.deploy(load_manifest(make_model(tmp_path, "echo", version="1.1.0", params={"factor": 2})), make_live=False)
        rt.rollout("echo", version="1.1.0", percent=25, shadow=5)
        # every deployed version describes itself, live or not
        assert rt.version_manifest("echo", "1.1.0")["version"] == "1.1.0"
        with pytest.raises(NotFound, match="no version 7.0.0"):
            rt.version_manifest("echo", "7.0.0")
    with LocalRuntime(settings) as rt:
        t = rt.traffic("echo")
        assert (t.live, t.candidate, t.percent, t.shadow) == ("1.0.0", "1.1.0", 25, 5)
        rt.promote("echo")
    with LocalRuntime(settings) as rt:
        t = rt.traffic("echo")
        assert (t.live, t.candidate, t.previous) == ("1.1.0", None, "1.0.0")
        # a model.json naming a version that is not there (edited by hand) drops the rollout, not the model
        path = Path(settings.state_dir) / "models" / "echo" / "model.json"
        data = json.loads(path.read_text())
        data.update(candidate="5.5.5", percent=50)
        path.write_text(json.dumps(data))
    with LocalRuntime(settings) as rt:
        t = rt.traffic("echo")
        assert (t.live, t.candidate, t.percent) == ("1.1.0", None, 0)
