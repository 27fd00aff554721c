"""The local runtime: models as processes on this machine, state in a directory that survives restarts.

The pieces live beside this module: `local_store` (immutable versions and the live pointer),
`local_replicas` (adapter processes, the activator and the autoscaler), `local_jobs` (batch
job records and workers) and `local_metrics`. This class wires them to the `Runtime` contract.

Everything this runtime starts runs in its own process group and is stopped by `close()`,
which also runs at normal interpreter exit; adapters are further started under
`setpriv --pdeathsig KILL` where available, so they die with the control service even when
it is killed outright.
"""
from __future__ import annotations

import atexit
import dataclasses
import io
import json
import logging
import os
import secrets
import shutil
import sys
import threading
import weakref
from pathlib import Path
from typing import Mapping, Optional

import adapters
from adapters import SECRET_ENV, served
from adapters.manifest import Manifest
from control import statelock, validate
from control.durable import write_json_atomic
from control.errors import BadRequest, Conflict, NotFound
from control.runtime.base import (DeployCheckFailed, Job, ModelDetail, ModelInfo, ProxyResponse, Runtime, Traffic,
                                  VersionInfo)
from control.runtime.local_jobs import JobRunner, JobStore, new_job_id
from control.runtime.local_replicas import CheckFailed, ReplicaManager, Split
from control.runtime.local_store import ModelRecord, VersionStore, utcnow

log = logging.getLogger(__name__)

_PROJECT_ROOT = str(Path(adapters.__file__).resolve().parent.parent)
# Variables that would change what the adapter does behind our back (sidecar mode, another
# dataset or port); we pass all of that on the command line instead.
# The adapter secret is this runtime's own, given to its replicas only (`_replica_env`).
_STRIP_ENV = ("MODEL_URL", "MODELPLANE_MANIFEST", "DATASET_URI", "RESULTS_URI", "JOB_ID", "K_EVENT_PATH", "PORT",
              SECRET_ENV)

_open_runtimes: "weakref.WeakSet[LocalRuntime]" = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    for runtime in list(_open_runtimes):
        runtime.close()


class LocalRuntime(Runtime):
    """Runs realtime models as adapter processes scaled by load, batch models as local jobs."""

    name = "local"

    def __init__(self, settings, *, adapter_command: Optional[list[str]] = None):
        self.settings = settings
        self.state_dir = Path(settings.state_dir).resolve()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        statelock.acquire(self.state_dir)  # before any record is read (StateLocked names the holder)
        try:
            self._init_state(adapter_command)
        except BaseException:
            statelock.release(self.state_dir)
            raise
        _open_runtimes.add(self)

    def _init_state(self, adapter_command: Optional[list[str]]) -> None:
        settings = self.settings
        self._adapter = list(adapter_command or [sys.executable, "-m", "adapters"])
        from adapters import sandbox

        self.sandbox = sandbox.state({sandbox.MODE_ENV: settings.sandbox})  # probed once, handed to adapters
        log.info("model sandbox: %s", self.sandbox.describe())
        self._admin = threading.RLock()     # deploy/rollback/remove: the store and the routing change together
        self._deploying: dict[str, threading.Lock] = {}   # one deploy (and its check) of a model at a time
        self._start_lock = threading.Lock()
        self._started = False
        self._closed = False
        # what this runtime's adapters require of every request: their loopback ports answer it only
        self._adapter_secret = secrets.token_urlsafe(32)
        self.store = VersionStore(self.state_dir / "models")
        self.job_store = JobStore(self.state_dir / "jobs")
        self.replicas = ReplicaManager(
            logs=self.state_dir / "logs" / "replicas", cwd=self.state_dir,
            start_timeout=settings.start_timeout, max_restarts=settings.max_restarts,
            argv=self._serve_argv,
            env=self._replica_env, manifest=self.store.manifest, directory=self.store.version_dir,
            secret=self._adapter_secret, failures=self.state_dir / "crashes.json")
        self.work_root = self.state_dir / "work"
        self.runner = JobRunner(self.job_store, concurrency=settings.job_concurrency,
                                logs=self.state_dir / "logs" / "jobs", command=self._job_command, env=self._env,
                                spare_argv=[*self._adapter, "batch"],
                                work=lambda job: self.work_root / job.id)
        self._requeue = self.runner.recover()
        # nothing runs yet: whatever a previous runtime left in its jobs' work folders is stale
        shutil.rmtree(self.work_root, ignore_errors=True)
        for name in self.store.names():
            record = self.store.get(name)
            if record.live is None:
                # a first version whose deploy check never finished (the service stopped): not deployed
                log.warning("%s: its first version was never checked to the end; forgetting it", name)
                self.store.remove(name)
                continue
            # not clear_failure: a live version that kept crashing before the restart is still failed
            self._route(record, clear_failure=False)

    # -- lifecycle ----------------------------------------------------------------------
    def start(self) -> None:
        with self._start_lock:
            if self._started or self._closed:
                return
            self._started = True
        self.replicas.start()
        self.runner.start()
        for job in self._requeue:
            self.runner.enqueue(job.id)
        self._requeue = []

    def close(self) -> None:
        with self._start_lock:
            if self._closed:
                return
            self._closed = True
        try:
            self.replicas.close()
            self.runner.close()
        finally:
            _open_runtimes.discard(self)
            statelock.release(self.state_dir)

    def problems(self) -> list[str]:
        """Records found unreadable at start (moved aside; see the log), for `/healthz`."""
        return [*self.store.problems, *self.job_store.problems]

    def __enter__(self) -> "LocalRuntime":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- versions -----------------------------------------------------------------------
    def deploy(self, manifest: Manifest, *, make_live: bool = True) -> VersionInfo:
        """Freeze the version, check it (started, ready, its sample scored: `_check`), and only then
        make it live. A version that fails its check is recorded as failed and never routed
        (DeployCheckFailed, 422); what was live keeps every request throughout."""
        name = manifest.name
        with self._admin:
            lock = self._deploying.setdefault(name, threading.Lock())
        with lock:
            with self._admin:
                info, created, _ = self.store.add(manifest, make_live=False, hold=True)
                record = self.store.get(name)
                if not created and info.failed is None:   # the same version again: nothing changes
                    return self._version_info(record, info)
            self.start()

            def passed() -> None:
                with self._admin:
                    if info.failed is not None:
                        self.store.set_failed(name, info.version, None)   # the same content passes now
                    if make_live or self.store.get(name).live is None:
                        self.store.set_live(name, info.version)
                        self._route(self.store.get(name), clear_failure=True)

            try:
                self._check(name, info.version, passed)
            except DeployCheckFailed as e:
                with self._admin:
                    record = self.store.find(name)
                    if record is not None and record.live is None:
                        self.store.drop(name, info.version)     # a new model: nothing of it is kept
                        e.details["new_model"] = True
                    elif record is not None:
                        self.store.set_failed(name, info.version, e.details["error_text"])
                e.details.pop("error_text", None)
                raise
            except Exception as e:
                # the check did not finish (the runtime is closing, say): the version must not be
                # taken for a checked one; deploying it again checks it again
                message = getattr(e, "message", None) or f"{type(e).__name__}: {e}"
                with self._admin:
                    record = self.store.find(name)
                    if record is not None and record.live is None:
                        self.store.drop(name, info.version)
                    elif record is not None and record.live != info.version:
                        self.store.set_failed(name, info.version, f"its deploy check did not finish: {message}")
                raise
            record = self.store.get(name)
            return self._version_info(record, record.version(info.version))

    @staticmethod
    def _version_info(record: ModelRecord, v) -> VersionInfo:
        return VersionInfo(version=v.version, deployed_at=v.deployed_at, live=record.live == v.version,
                           failed=v.failed is not None, error=v.failed)

    def _check(self, name: str, version: str, passed) -> None:
        """Start the version and score its sample as `modelplane validate` does, before it takes
        traffic: DeployCheckFailed (with the reason and the tail of its log) if it does not start,
        is not ready within `deploy_check_timeout`, or answers its sample wrongly. Nothing of
        the version is left running after a failed check. `passed()` runs once it passed (for a
        realtime version, while its checked replica is still held, so routing it keeps it warm)."""
        manifest = self.store.manifest(name, version)
        timeout = self.settings.deploy_check_timeout or self.settings.start_timeout
        live = (self.store.get(name).live or None)
        try:
            sample = None
            if manifest.sample_path is not None:
                try:
                    sample = validate.read_sample(manifest)
                except OSError as e:
                    raise CheckFailed(f"its sample {manifest.sample} cannot be read: {e.strerror or e}") from None
                except validate.CheckFailed as e:
                    raise CheckFailed(str(e)) from None
            if manifest.kind == "realtime":
                self.replicas.check(name, version, self._sample_probe(manifest, sample), timeout=timeout,
                                    on_pass=passed)
                return
            if sample is not None:
                self._check_batch(manifest, len(sample[2]), timeout)
        except CheckFailed as e:
            kept = f"{live} stays live" if live else "it was not deployed"
            message = f"{name} {version} failed its deploy check, so {kept}: {e.reason}"
            text = e.reason + (f"\nits log ends with:\n{e.log_tail}" if e.log_tail else "")
            log.warning("%s", message)
            raise DeployCheckFailed(message, details={"model": name, "version": version, "reason": e.reason,
                                                      "log_tail": e.log_tail, "error_text": text}) from None
        passed()

    @staticmethod
    def _sample_probe(manifest: Manifest, sample):
        """What a realtime version must answer before it takes traffic: its sample through
        `POST /predict` (as CSV) and the Open Inference Protocol, one finite score per row
        (`modelplane validate`'s checks). Without a sample, being ready is all it is asked."""
        def probe(send) -> None:
            if sample is None:
                return
            data, header, records = sample
            n = len(records)
            checks = [("POST /predict (its sample as CSV)", "/predict", {"Content-Type": "text/csv"}, data),
                      (f"POST /v2/models/{manifest.name}/infer (its sample)", f"/v2/models/{manifest.name}/infer",
                       {"Content-Type": "application/json"},
                       json.dumps(validate.infer_body(manifest, header, records)).encode())]
            for what, path, headers, body in checks:
                resp = send("POST", path, headers, body)
                try:
                    answer = json.loads(resp.body) if resp.body else None
                except ValueError:
                    answer = resp.body.decode("utf-8", "replace")
                try:
                    if resp.status != 200:
                        raise validate.CheckFailed(f"{what} {validate._answer_error(resp.status, answer)}")
                    if path == "/predict":
                        found = answer.get("scores") if isinstance(answer, dict) else answer
                    else:
                        outputs = answer.get("outputs") if isinstance(answer, dict) else None
                        if not outputs or not isinstance(outputs[0], dict):
                            raise validate.CheckFailed(f"{what}: no outputs in the answer: {str(answer)[:300]}")
                        found = outputs[0].get("data")
                    validate.check_scores(found, n, what)
                except validate.CheckFailed as e:
                    raise CheckFailed(str(e)) from None
        return probe

    def _check_batch(self, manifest: Manifest, n_rows: int, timeout: float) -> None:
        """A batch version's sample through the batch adapter, as `modelplane validate` runs it."""
        report = validate.Report(io.StringIO())
        validate.test_batch(manifest, n_rows, report, timeout=timeout, adapter=self._adapter, env=self._env(),
                            job="deploy-check")
        if report.failures:
            what, detail = report.failures[0]
            reason, _, rest = detail.partition("\n")
            raise CheckFailed(f"{what}: {reason}" if reason else what, rest.strip())

    def rollback(self, name: str, *, version: Optional[str] = None) -> VersionInfo:
        with self._admin:
            record = self.store.get(name)
            if version is None and record.candidate:
                self.store.set_rollout(name, None)          # withdraw the rollout: live takes all
                info = record.live_record
            else:
                info = self.store.rollback(name, version)   # walks back through the live history
            self._route(self.store.get(name), clear_failure=True)
        self.start()
        return VersionInfo(version=info.version, deployed_at=info.deployed_at, live=True)

    def rollout(self, name: str, *, version: str, percent: int = 0, shadow: int = 0) -> Traffic:
        with self._admin:
            record = self._live(name)
            if record.live_record.manifest.get("kind") != "realtime":
                raise BadRequest(f"{name} is a batch model: a rollout splits requests, and it takes none")
            target = record.version(version)
            if target is not None and target.manifest.get("kind") != "realtime":
                raise BadRequest(f"{name} {version} is a batch version; only a realtime one can take requests")
            self.store.set_rollout(name, version, percent=percent, shadow=shadow)
            record = self.store.get(name)
            self._route(record, clear_failure=True)
        self.start()
        return self.traffic(name)

    def promote(self, name: str) -> VersionInfo:
        with self._admin:
            record = self.store.get(name)
            if not record.candidate:
                raise Conflict(f"{name} has no rollout to promote; start one with "
                               f"`modelplane rollout {name} VERSION --percent P`")
            info = self.store.set_live(name, record.candidate)
            self._route(self.store.get(name), clear_failure=False)
        self.start()
        return VersionInfo(version=info.version, deployed_at=info.deployed_at, live=True)

    def version_manifest(self, name: str, version: str) -> dict:
        return dict(self.store.version_record(name, version).manifest)

    def traffic(self, name: str) -> Traffic:
        record = self.store.get(name)
        return Traffic(live=record.live, candidate=record.candidate, percent=record.percent, shadow=record.shadow,
                       previous=record.previous, past=list(record.past))

    def remove(self, name: str) -> None:
        with self._admin:
            self.store.get(name)
            self.replicas.forget(name)
            for job in self.job_store.all():
                if job.model == name and job.status in ("queued", "running"):
                    self.runner.cancel(job.id, f"the model {name} was removed")
            self.store.remove(name)

    def _route(self, record: ModelRecord, *, clear_failure: bool) -> None:
        live = record.live_record
        if live is None:
            return
        if live.manifest.get("kind") == "realtime":
            split = Split(live.version, record.candidate, record.percent)
            warm = {v: (record.version(v).manifest.get("scaling") or {}).get("min", 0) > 0 for v in split.versions()}
            self.replicas.set_route(record.name, split, clear_failure=clear_failure, warm=warm)
        else:
            self.replicas.forget(record.name)   # a model that turned batch keeps no replicas

    # -- listing ------------------------------------------------------------------------
    def models(self) -> list[ModelInfo]:
        out = []
        for name in self.store.names():
            record = self.store.find(name)
            if record is not None and record.live_record is not None:
                out.append(self._info(record, ModelInfo))
        return out

    def models_generation(self):
        return self.store.generation, self.replicas.generation

    def model(self, name: str) -> ModelDetail:
        record = self._live(name)
        detail = self._info(record, ModelDetail)
        live = record.live_record
        detail.manifest = dict(live.manifest)
        detail.versions = [self._version_info(record, v) for v in reversed(record.versions)]
        if live.manifest.get("kind") == "realtime":
            # a version other than the live one that crashed: said on that version, not the model
            crashed = self.replicas.version_errors(name)
            for v in detail.versions:
                if v.version in crashed and not v.failed:
                    v.crashed, v.crash_error = crashed[v.version][0], crashed[v.version][1]
            detail.metrics = self.replicas.metrics(name)
            detail.traffic = self.traffic(name).to_json()
            per_version = self.replicas.version_metrics(name)
            for target in detail.traffic["targets"]:
                target.update(per_version.get(target["version"]) or {"requests": 0, "errors": 0, "replicas": 0})
        else:
            counts = {status: 0 for status in ("queued", "running", "succeeded", "failed")}
            for job in self.job_store.all():
                if job.model == name:
                    counts[job.status] = counts.get(job.status, 0) + 1
            detail.metrics = {"requests": 0, "errors": 0, "p50_ms": None, "p95_ms": None, "cold_starts": 0,
                              "replicas": counts["running"], "history": [], "jobs": counts}
        return detail

    def _info(self, record: ModelRecord, cls):
        live = record.live_record
        m = live.manifest
        if m.get("kind") == "realtime":
            status, replicas, error = self.replicas.status(record.name)
            endpoint = f"{self.settings.control_url}/models/{record.name}/predict"
        else:
            # A batch model is always ready to take a job; its "replicas" are the jobs running now.
            status, replicas, error = "ready", self.runner.running(record.name), None
            endpoint = f"gs://{self.settings.bucket_name}/incoming/{record.name}/"
        return cls(name=record.name, kind=m.get("kind"), language=m.get("language"), version=live.version,
                   status=status, replicas=replicas, endpoint=endpoint, error=error,
                   description=m.get("description", ""), owner=m.get("owner", ""),
                   labels=dict(m.get("labels") or {}))

    # -- realtime -----------------------------------------------------------------------
    def forward(self, name: str, *, method: str, path: str, headers: Mapping[str, str],
                body: bytes, query: str = "", version: Optional[str] = None) -> ProxyResponse:
        self._realtime(name, version)
        return self.replicas.forward(name, method=method, path=path, headers=headers, body=body, query=query,
                                     version=version)

    async def aforward(self, name: str, *, method: str, path: str, headers: Mapping[str, str],
                       body: bytes, query: str = "", version: Optional[str] = None) -> ProxyResponse:
        self._realtime(name, version)
        return await self.replicas.aforward(name, method=method, path=path, headers=headers, body=body,
                                            query=query, version=version)

    def _serve_argv(self, folder: Path, port: int) -> list[str]:
        """A replica's adapter command, handing over the manifest checked at deploy when it can."""
        argv = [*self._adapter, "serve", str(folder), "--port", str(port)]
        checked = self._checked_manifest(folder)
        return argv + ["--checked-manifest", str(checked)] if checked else argv

    def _checked_manifest(self, folder: Path) -> Optional[Path]:
        """`{version}/.modelplane/served.json`: what serving needs of the version's manifest, checked
        when it was deployed, written once (a version never changes; `.modelplane` is not part of
        its content). None when it cannot be written: the adapter then checks model.yaml itself."""
        path = folder / ".modelplane" / "served.json"
        if path.is_file():
            return path
        try:
            manifest = self.store.manifest(folder.parent.name, folder.name)
            write_json_atomic(path, served.document(manifest))
        except Exception as e:  # noqa: BLE001 — only a shortcut: the adapter can check it itself
            log.debug("no checked manifest for %s: %s", folder, e)
            return None
        return path

    def _live(self, name: str) -> ModelRecord:
        """The model's record; NotFound while its first version is still being checked."""
        record = self.store.get(name)
        if record.live_record is None:
            raise NotFound(f"{name} has no live version yet: its first version is being checked")
        return record

    def _realtime(self, name: str, version: Optional[str] = None) -> None:
        record = self._live(name)
        if version is not None:
            pinned = record.version(version)
            if pinned is not None and pinned.failed is not None:
                raise Conflict(f"{name} {version} failed its deploy check, so it takes no requests: {pinned.failed}",
                               details={"model": name, "version": version})
        if record.live_record.manifest.get("kind") != "realtime":
            raise BadRequest(f"{name} is a batch model: it takes datasets, not requests — submit a job "
                             f"(POST /api/models/{name}/jobs) or upload a CSV to "
                             f"gs://{self.settings.bucket_name}/incoming/{name}/")
        self.start()

    # -- batch --------------------------------------------------------------------------
    def submit_job(self, name: str, *, dataset: str, event_key: Optional[str] = None,
                   trigger: str = "api", version: Optional[str] = None) -> tuple[Job, bool]:
        record = self.store.get(name)
        live = record.live_record if version is None else record.version(version)
        if live is None:
            known = ", ".join(v.version for v in record.versions) or "none"
            raise NotFound(f"{name} has no version {version} (deployed: {known})")
        if live.failed is not None:
            raise Conflict(f"{name} {live.version} failed its deploy check, so it runs no job: {live.failed}",
                           details={"model": name, "version": live.version})
        if not dataset or not str(dataset).strip():
            raise BadRequest("dataset: expected gs://bucket/path.csv or a local path")
        dataset = str(dataset).strip()
        if not dataset.startswith("gs://"):
            path = Path(dataset.removeprefix("file://")).expanduser().resolve()
            if not path.is_file():
                raise BadRequest(f"dataset: no file at {path}")
            dataset = str(path)
        with self.job_store.lock:
            if event_key:
                existing = self.job_store.by_key(event_key)
                if existing is not None:
                    return dataclasses.replace(existing), False
            job = Job(id=new_job_id(), model=name, version=live.version, status="queued", dataset=dataset,
                      created_at=utcnow(), trigger=trigger)
            self.job_store.add(job, event_key)
            snapshot = dataclasses.replace(job)
        self.start()
        self.runner.enqueue(job.id)
        return snapshot, True

    def jobs(self, *, model: Optional[str] = None, limit: int = 200) -> list[Job]:
        jobs = [j for j in self.job_store.all() if model is None or j.model == model]
        jobs.sort(key=lambda j: (j.created_at, j.id), reverse=True)
        return [dataclasses.replace(j) for j in jobs[:limit]]

    def job(self, job_id: str) -> Job:
        return dataclasses.replace(self.job_store.get(job_id))

    def cancel_job(self, job_id: str, *, by: str) -> Job:
        return dataclasses.replace(self.runner.cancel_job(job_id, by))

    def results_prefix(self, job: Job) -> str:
        """Where a job's scores.csv and result.json go (DESIGN.md, "Bucket layout and events")."""
        if job.dataset.startswith("gs://"):
            return f"gs://{self.settings.bucket_name}/results/{job.model}/{job.id}/"
        return str(self.state_dir / "results" / job.model / job.id) + os.sep

    def _job_command(self, job: Job):
        try:
            manifest = self.store.manifest(job.model, job.version)
        except NotFound as e:
            raise NotFound(f"{job.model} {job.version} is no longer deployed") from e
        if manifest.kind == "realtime":
            return self._stream_call(job, manifest), 0.0
        argv = [*self._adapter, "batch", str(self.store.version_dir(job.model, job.version)),
                "--dataset", job.dataset, "--results", self.results_prefix(job), "--job", job.id,
                "--work", str(self.work_root / job.id)]
        return argv, manifest.batch.timeout_seconds

    def _stream_call(self, job: Job, manifest: Manifest):
        """A realtime model's job, run in a job worker thread (local_jobs.py `_run_inline`): the
        dataset streamed (adapters/stream.py) through this runtime's own forwarding to the job's
        version, so its replicas start, scale out and idle as for live traffic. In-process, not a
        `python -m adapters stream` process against the front door: no credential has to be made
        for it, and chunks skip a hop through the HTTP front door."""
        import asyncio

        from adapters import batch, stream
        from control.errors import PlaneError

        headers = {"Content-Type": "text/csv", "Accept": "text/csv"}
        local = threading.local()
        loops: list = []
        lock = threading.Lock()

        def send(body: bytes):
            loop = getattr(local, "loop", None)
            if loop is None:  # one loop per sending thread: its kept-alive connections to replicas stay usable
                loop = local.loop = asyncio.new_event_loop()
                with lock:
                    loops.append(loop)
            try:
                resp = loop.run_until_complete(self.replicas.aforward(
                    job.model, method="POST", path="/predict", headers=headers, body=body, version=job.version))
            except PlaneError as e:   # no replica could answer (503), or one broke (502), …
                return e.status, {}, json.dumps({"error": e.message}).encode()
            return resp.status, resp.headers, resp.body

        def call(work: Optional[Path], stop: threading.Event):
            spec = batch.JobSpec(dataset_uri=job.dataset, job=job.id, results_prefix=self.results_prefix(job))
            try:
                # the forwarding sends a request whose replica broke off once more elsewhere itself
                return stream.run_stream(manifest, spec, send, work=work, stop=stop, alone=False)
            finally:
                with lock:
                    for loop in loops:
                        try:
                            loop.close()
                        except RuntimeError:  # a send still under way (the job failed meanwhile)
                            pass
        return call

    def _env(self) -> dict:
        """The adapter's environment: ours (so STORAGE_EMULATOR_HOST and credentials reach it),
        minus what we pass as arguments, plus the path to the `adapters` package."""
        env = {k: v for k, v in os.environ.items() if k not in _STRIP_ENV}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_PROJECT_ROOT, env.get("PYTHONPATH")) if p)
        env["PYTHONUNBUFFERED"] = "1"
        # what this runtime found (no probe per adapter); `on` when required makes each start refuse
        env["MODELPLANE_SANDBOX"] = "on" if self.sandbox.active or self.sandbox.mode == "on" else "off"
        env["MODELPLANE_SANDBOX_CHECKED"] = "1" if self.sandbox.active else "0"
        env["MODELPLANE_SANDBOX_HIDE"] = os.pathsep.join(
            str(p) for p in (self.state_dir, Path(self.settings.models_dir).resolve()))
        return env

    def _replica_env(self) -> dict:
        """A replica adapter's environment: `_env` and this runtime's adapter secret (the adapter
        takes it out of its environment at start: its model never sees it)."""
        env = self._env()
        env[SECRET_ENV] = self._adapter_secret
        return env
