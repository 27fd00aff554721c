"""Locust scenarios against a running modelplane control service. Run headless, in a subprocess only:

    locust -f loadtest/locustfile.py --headless -u 16 -r 16 -t 30s --host http://127.0.0.1:8080 \
        --csv artifacts/locust/steady SteadyUser                  # steady load over the realtime models
    … BurstUser                                                   # a burst against models at zero
    … SteadyUser BatchUploader                                    # realtime traffic + batch uploads

(`python -m loadtest.scenarios steady|burst|mix --host …` does the same with bounds and parses
the CSV.) Configured by environment variables:

- `LOADTEST_MODELS`: realtime models to call, comma-separated (default: every realtime model).
- `LOADTEST_BATCH_MODEL`: the batch model the uploads go to (default: the first batch model).
- `LOADTEST_BATCH_ROWS` (2000): rows per uploaded dataset; `LOADTEST_JOB_TIMEOUT` (180 s).
- `LOADTEST_UPLOAD`: `api` (default; `POST /api/models/{name}/datasets`) or `gcs` (the
  google-cloud-storage client writes `incoming/{model}/…` itself; needs `STORAGE_EMULATOR_HOST` with
  `MODELPLANE_STORAGE_KEY` (the embedded bucket: the key in `.modelplane/storage-key`)
  or credentials, and `MODELPLANE_BUCKET`).
- `LOADTEST_IDLE_WAIT` (90 s): how long BurstUser waits for its models to reach zero first.
- `LOADTEST_WAIT` (0.05 s): pause between one user's requests.
- `MODELPLANE_TOKEN`: sent as a bearer token on every call (the control service needs it).

Every response is checked (200, one finite score per row; job `succeeded`): anything else
counts as a failure in locust's stats. A batch job shows as request type `JOB`.
"""
from __future__ import annotations

import json
import logging
import math
import os
import random
import time
import uuid

import requests
from locust import HttpUser, constant, events, task

log = logging.getLogger("loadtest")

REALTIME: dict[str, list[dict]] = {}   # model -> feature list
BATCH: dict[str, list[dict]] = {}


def _env_list(name: str) -> list[str]:
    return [x.strip() for x in os.environ.get(name, "").split(",") if x.strip()]


def _auth() -> dict:
    token = os.environ.get("MODELPLANE_TOKEN")
    return {"Authorization": f"Bearer {token}"} if token else {}


def _items(payload, key: str) -> list:
    """`GET /api/models` / `/api/jobs` answer a list, or an object holding it under `key`."""
    if isinstance(payload, dict):
        return payload.get(key) or []
    return payload or []


def _value(feature: dict, rng: random.Random):
    allowed = feature.get("allowed")
    if allowed:
        return rng.choice(allowed)
    kind = feature.get("type")
    if kind == "integer":
        return rng.randint(0, 12)
    if kind == "boolean":
        return rng.random() < 0.5
    if kind == "string":
        return "x"
    return round(rng.uniform(1.0, 250_000.0), 2)


def make_row(features: list[dict], rng: random.Random) -> dict:
    return {f["name"]: _value(f, rng) for f in features}


def make_csv(features: list[dict], rows: int, rng: random.Random) -> bytes:
    names = [f["name"] for f in features]
    out = [",".join(names)]
    for _ in range(rows):
        row = make_row(features, rng)
        out.append(",".join(("true" if v else "false") if isinstance(v, bool) else str(v) for v in (row[n] for n in names)))
    return ("\n".join(out) + "\n").encode()


def _discover(host: str) -> None:
    """Fill REALTIME/BATCH from the control API (features from each model's manifest)."""
    s = requests.Session()
    s.headers.update(_auth())
    listed = _items(s.get(f"{host}/api/models", timeout=30).json(), "models")
    wanted = set(_env_list("LOADTEST_MODELS"))
    batch_wanted = os.environ.get("LOADTEST_BATCH_MODEL")
    for m in listed:
        name, kind = m["name"], m.get("kind")
        if kind == "realtime" and (not wanted or name in wanted):
            pass
        elif kind == "batch" and (not batch_wanted or name == batch_wanted):
            pass
        else:
            continue
        detail = s.get(f"{host}/api/models/{name}", timeout=30).json()
        manifest = detail.get("manifest") or {}
        # the passthrough columns (a row's id) are part of every row the model takes
        features = (manifest.get("features") or []) + [
            c if isinstance(c, dict) else {"name": c, "type": "string"} for c in manifest.get("passthrough") or []]
        (REALTIME if kind == "realtime" else BATCH)[name] = features
    missing = wanted - set(REALTIME)
    if missing:
        raise RuntimeError(f"LOADTEST_MODELS names models the plane does not list as realtime: {sorted(missing)}")


def _wait_idle(host: str, names: list[str], timeout: float) -> None:
    """Block until every model in `names` is scaled to zero (status `idle`), or give up loudly."""
    deadline = time.monotonic() + timeout
    status = {}
    while time.monotonic() < deadline:
        listed = _items(requests.get(f"{host}/api/models", headers=_auth(), timeout=30).json(), "models")
        status = {m["name"]: m.get("status") for m in listed if m["name"] in names}
        if status and all(s == "idle" for s in status.values()):
            log.warning("burst: %s at zero, starting", ", ".join(sorted(status)))
            return
        time.sleep(0.2)
    log.warning("burst: models not at zero after %.0fs: %s", timeout, status)


@events.init.add_listener
def _on_init(environment, **_kw):
    # Runs before the -t timer starts, so waiting for scale-to-zero does not eat the run time.
    host = (environment.host or "").rstrip("/")
    if not host:
        raise RuntimeError("pass --host http://127.0.0.1:PORT (the control service)")
    _discover(host)
    classes = {c.__name__ for c in environment.user_classes}
    if "BurstUser" in classes:
        _wait_idle(host, sorted(REALTIME), float(os.environ.get("LOADTEST_IDLE_WAIT", "90")))


class SteadyUser(HttpUser):
    """Steady realtime load spread over several models: one 1-row request at a time."""

    wait_time = constant(float(os.environ.get("LOADTEST_WAIT", "0.05")))

    def on_start(self):
        self.client.headers.update(_auth())
        self.rng = random.Random()
        if not REALTIME:
            raise RuntimeError("no realtime models to call")
        self.models = sorted(REALTIME)

    def predict(self, name: str, rows: int = 1) -> None:
        body = {"rows": [make_row(REALTIME[name], self.rng) for _ in range(rows)]}
        with self.client.post(f"/models/{name}/predict", json=body, name=f"/models/{name}/predict",
                              catch_response=True, timeout=120) as resp:
            if resp.status_code != 200:
                resp.failure(f"{resp.status_code}: {resp.text[:300]}")
                return
            try:
                scores = resp.json()["scores"]
            except (ValueError, KeyError, TypeError):
                resp.failure(f"no scores in {resp.text[:300]}")
                return
            if len(scores) != rows or not all(isinstance(s, (int, float)) and math.isfinite(s) for s in scores):
                resp.failure(f"expected {rows} finite score(s), got {scores!r:.200}")

    @task
    def score_one(self):
        self.predict(self.rng.choice(self.models))


class BurstUser(SteadyUser):
    """Like SteadyUser, but the run starts only once its models are at zero: with -r equal to
    -u every user's first request lands while the first replica is still starting."""

    wait_time = constant(float(os.environ.get("LOADTEST_WAIT", "0.05")))


class BatchUploader(HttpUser):
    """Uploads a dataset for a batch model while realtime traffic runs, then waits for its job."""

    fixed_count = 1
    wait_time = constant(0.5)

    def on_start(self):
        self.client.headers.update(_auth())
        self.rng = random.Random()
        if not BATCH:
            raise RuntimeError("no batch model to upload to")
        self.model = sorted(BATCH)[0]
        self.rows = int(os.environ.get("LOADTEST_BATCH_ROWS", "2000"))
        self.timeout = float(os.environ.get("LOADTEST_JOB_TIMEOUT", "180"))
        self.mode = os.environ.get("LOADTEST_UPLOAD", "api")

    def upload(self, data: bytes, filename: str) -> str | None:
        if self.mode == "gcs":
            return self._upload_gcs(data, filename)
        with self.client.post(f"/api/models/{self.model}/datasets?filename={filename}", data=data,
                              headers={"Content-Type": "text/csv", **_auth()},
                              name=f"/api/models/{self.model}/datasets", catch_response=True, timeout=300) as resp:
            if resp.status_code not in (200, 201, 202):
                resp.failure(f"{resp.status_code}: {resp.text[:300]}")
                return None
            try:
                return resp.json()["uri"]
            except (ValueError, KeyError):
                resp.failure(f"no uri in {resp.text[:300]}")
                return None

    def _upload_gcs(self, data: bytes, filename: str) -> str | None:
        from loadtest.gcs_upload import upload  # google-cloud-storage, imported only in this mode

        started = time.perf_counter()
        try:
            uri = upload(self.model, filename, data)
        except Exception as e:  # noqa: BLE001 — reported as a failed upload
            self._fire("GCS", f"incoming/{self.model}/", started, len(data), e)
            return None
        self._fire("GCS", f"incoming/{self.model}/", started, len(data), None)
        return uri

    def _fire(self, kind: str, name: str, started: float, length: int, exc) -> None:
        self.environment.events.request.fire(request_type=kind, name=name,
                                             response_time=(time.perf_counter() - started) * 1000,
                                             response_length=length, exception=exc, context={})

    @task
    def upload_and_wait(self):
        filename = f"locust-{uuid.uuid4().hex[:12]}.csv"
        data = make_csv(BATCH[self.model], self.rows, self.rng)
        started = time.perf_counter()
        uri = self.upload(data, filename)
        if not uri:
            return
        job, error = None, None
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            resp = self.client.get("/api/jobs", params={"model": self.model, "dataset": uri},
                                   name="/api/jobs?dataset= (poll)", timeout=30)
            jobs = _items(resp.json(), "jobs") if resp.ok else []
            jobs = [j for j in jobs if j.get("dataset") == uri] or jobs
            if jobs:
                job = jobs[0]
                if job.get("status") in ("succeeded", "failed"):
                    break
            time.sleep(0.25)
        if job is None:
            error = RuntimeError(f"no job for {uri} after {self.timeout:.0f}s")
        elif job.get("status") != "succeeded":
            error = RuntimeError(f"job {job.get('id')} is {job.get('status')} after {self.timeout:.0f}s: "
                                 f"{job.get('error') or ''} {json.dumps(job.get('log_tail', ''))[-300:]}")
        elif job.get("rows") not in (None, self.rows):
            error = RuntimeError(f"job {job.get('id')} scored {job.get('rows')} rows, expected {self.rows}")
        self._fire("JOB", f"{self.model} upload -> job succeeded", started, self.rows, error)
