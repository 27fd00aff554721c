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
