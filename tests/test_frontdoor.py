"""The control service's asyncio front door, with the local runtime's real replicas: requests
held at zero wait on the event loop, not on the service's threads."""
from __future__ import annotations

import json
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor

import yaml

from control_helpers import api, running, settings_for

from test_local_runtime import FIXTURES


def test_requests_held_at_zero_take_no_thread_and_the_api_answers_meanwhile(tmp_path):
    # four threads (the least there may be) for the whole API; a model that takes 2 s to start, one replica
    settings = settings_for(tmp_path, threads=4)
    folder = settings.models_dir / "slow-echo"
    shutil.copytree(FIXTURES / "echo", folder)
    manifest = yaml.safe_load((folder / "model.yaml").read_text())
    manifest.update(name="slow-echo", scaling={"min": 0, "max": 1, "target_concurrency": 100, "idle_timeout": "60s"})
    (folder / "model.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    (folder / "params.json").write_text(json.dumps({"startup_delay": 2.0, "factor": 2}))
    held = 24
    done, lock = [], threading.Lock()
    with running(settings) as server:
        url = f"{server.url}/models/slow-echo/predict"

        def one(i):
            r = api.post(url, json={"rows": [{"x": i}]}, timeout=60)
            with lock:
                done.append(r.status_code)
            return r.status_code, r.json()

        with ThreadPoolExecutor(held) as pool:
            futures = [pool.submit(one, i) for i in range(held)]
            # all of them are held: the model is starting and none has been answered
            deadline_rounds = 100
            while deadline_rounds and api.get(f"{server.url}/api/models/slow-echo").json()["status"] != "starting":
                threading.Event().wait(0.02)
                deadline_rounds -= 1
            listed = api.get(f"{server.url}/api/models", timeout=30)
            health = api.get(f"{server.url}/healthz", timeout=30)
            with lock:
                answered_before_api = len(done)
            results = [f.result() for f in futures]
        assert listed.status_code == 200 and health.status_code == 200
        # the API answered on its four threads while all 24 predicts were still held
        assert answered_before_api == 0, answered_before_api
        assert [status for status, _ in results] == [200] * held
        assert sorted(body["scores"][0] for _, body in results) == [2.0 * i for i in range(held)]
        detail = api.get(f"{server.url}/api/models/slow-echo").json()
        assert detail["metrics"]["cold_starts"] == 1 and detail["replicas"] == 1


# -- the Open Inference Protocol at the service's root, as KServe serves it ------------------------

def _v2_inputs(xs: list) -> dict:
    return {"inputs": [{"name": "x", "datatype": "FP64", "shape": [len(xs)], "data": xs}]}


def test_the_open_inference_protocol_at_the_root_is_each_models_own_route(tmp_path):
    """`/v2/models/{name}/…` is the same request as `/models/{name}/v2/models/{name}/…`: the same
    answers (a version that is not served, a model that does not exist included), the live version
    or the one its URL names, the same hand-offs and metrics; every error the protocol's JSON
    object, never a page. `/v2` and `/v2/health/*` are the control service's own."""
    import gzip

    from control.settings import modelplane_version
    from test_rollout import SCALING, deploy
    from test_local_runtime import make_model

    settings = settings_for(tmp_path)
    with running(settings) as server:
        base = server.url
        deploy(server, make_model(tmp_path, "echo", version="1.0.0", scaling=SCALING, params={"factor": 1}))
        deploy(server, make_model(tmp_path, "echo", version="1.1.0", scaling=SCALING, params={"factor": 2}), live=False)
        handed = []   # the monitor's hand-off, spied on (and passed through)
        monitor = server.plane.monitor
        observe = monitor.observe
        monitor.observe = lambda name, result, *rest: (handed.append((name, result.status)), observe(name, result, *rest))[-1]

        assert api.get(f"{base}/v2").json() == {"name": "modelplane", "version": modelplane_version(),
                                                "extensions": ["binary_tensor_data"]}
        assert api.get(f"{base}/v2/health/live").json() == {"live": True}
        assert api.get(f"{base}/v2/health/ready").json() == {"ready": True}

        for path in ("/v2/models/echo", "/v2/models/echo/ready", "/v2/models/echo/versions/1.1.0",
                     "/v2/models/echo/versions/1.1.0/ready", "/v2/models/echo/versions/9.9.9",
                     "/v2/models/echo/versions/9.9.9/ready", "/v2/models/nope", "/v2/models/nope/ready"):
            name = path.split("/")[3]
            root, twin = api.get(base + path, timeout=60), api.get(f"{base}/models/{name}{path}", timeout=60)
            assert (root.status_code, root.json()) == (twin.status_code, twin.json()), path
            assert root.headers["Content-Type"].startswith("application/json"), path
        assert api.get(f"{base}/v2/models/echo").json()["versions"] == ["1.0.0"]          # the live version
        assert api.get(f"{base}/v2/models/echo/versions/1.1.0").json()["versions"] == ["1.1.0"]
        r = api.get(f"{base}/v2/models/echo/versions/9.9.9/ready")
        assert r.status_code == 404 and "has no version 9.9.9" in r.json()["error"]
        r = api.get(f"{base}/v2/models/nope")
        assert r.status_code == 404 and r.json() == {"error": "no model named 'nope'"}

        # inference: the live version, and one version by its URL
        r = api.post(f"{base}/v2/models/echo/infer", json=_v2_inputs([1.0, 2.5]), timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["model_version"] == "1.0.0" and r.json()["outputs"][0]["data"] == [1.0, 2.5]
        r = api.post(f"{base}/v2/models/echo/versions/1.1.0/infer", json=_v2_inputs([1.0, 2.5]), timeout=60)
        assert r.json()["model_version"] == "1.1.0" and r.json()["outputs"][0]["data"] == [2.0, 5.0]
        r = api.post(f"{base}/v2/models/echo/versions/9.9.9/infer", json=_v2_inputs([1.0]))
        assert r.status_code == 404 and "has no version 9.9.9" in r.json()["error"]
        # a gzip body is decoded, as on every model route
        r = api.post(f"{base}/v2/models/echo/infer", data=gzip.compress(json.dumps(_v2_inputs([4.0])).encode()),
                     headers={"Content-Type": "application/json", "Content-Encoding": "gzip"}, timeout=60)
        assert r.status_code == 200 and r.json()["outputs"][0]["data"] == [4.0]
        assert handed.count(("echo", 200)) >= 3

        # errors: the protocol's JSON object with the right status
        for method, path, status in (("GET", "/v2/models/echo/infer", 405), ("POST", "/v2/models/echo", 405),
                                     ("GET", "/v2/models/echo/explain", 404), ("GET", "/v2/models/", 404),
                                     ("GET", "/v2/models/echo%2Dx/ready", 404), ("GET", "/v2/repository/index", 404),
                                     ("POST", "/v2/models/nope/infer", 404)):
            r = api.request(method, base + path, json=_v2_inputs([1.0]) if method == "POST" else None)
            assert r.status_code == status, (method, path, r.status_code, r.text)
            assert r.headers["Content-Type"].startswith("application/json") and set(r.json()) >= {"error"}, path
        r = api.get(f"{base}/v2/models/echo/infer")
        assert r.headers["Allow"] == "POST"
        r = api.post(f"{base}/v2/models/echo/infer", data="x=1", headers={"Content-Type": "text/plain"})
        assert r.status_code == 415 and "text/plain" in r.json()["error"]

        metrics = api.get(f"{base}/metrics").text
        assert 'route="/v2/models/<name>/infer",method="POST",status="200"' in metrics
        assert 'route="/v2/models/<name>/versions/<version>/infer",method="POST",status="200"' in metrics
        assert 'route="/v2/health/ready",method="GET",status="200"' in metrics
