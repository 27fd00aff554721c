"""The fast tier of the cluster runtime: a real kube-apiserver (the pinned 1.34, with Pod
Security, strict field validation and the Job status rules it enforces) with the official
Knative CRDs, and no Knative.

The runtime runs as the control service's ServiceAccount (a TokenRequest token, verified
by the API server) bound to knative/rbac.yaml's Role, so every test here also proves the
Role is enough; `test_role_is_exactly_what_the_runtime_uses` proves it is no more. No
Knative controller runs here: `reconcile_*` below stand for Knative's controllers by patching
`status` (and `job_status` for the Job controller). tests/test_knative_real.py runs the real ones.
"""
from __future__ import annotations

import ast
import base64
import copy
import hashlib
import http.server
import json
import secrets
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from adapters.manifest import load_manifest
from control.errors import BadRequest, Conflict, Forbidden, Invalid, NotFound
from control.settings import Settings

import kube

ROOT = Path(__file__).resolve().parent.parent
NS = "modelplane-models"   # the models, their Jobs and the Broker (knative/namespace.yaml)
CONTROL_NS = "modelplane"  # the control service, its ServiceAccount and its own Secrets
SA = "modelplane-control"
BINARY = kube.apiserver_binary()

pytestmark = pytest.mark.cluster

USED: set[tuple[str, str]] = set()  # (verb, resource) of every request the runtime made
STATE_USED: set[tuple[str, str]] = set()  # the same, of the token store and the audit head
COMPLETED: set[str] = set()  # lifecycle tests that ran to the end


def settings(**overrides) -> Settings:
    values = dict(runtime="knative", namespace=NS, control_namespace=CONTROL_NS, bucket="test-bucket", registry="registry.test/models",
                  adapter_image="registry.test/adapter:0.1.0", broker="default")
    values.update(overrides)
    return Settings(**values)


class RevisionMaker:
    """Plays Knative's Configuration controller: a Revision for each Service's template, with
    the template's labels and annotations and the labels Knative adds
    (serving pkg/reconciler/configuration/resources/revision.go `MakeRevision`)."""

    def __init__(self, admin):
        self.admin = admin
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="revision-maker")
        self.error = None

    def start(self) -> "RevisionMaker":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            try:
                self.make_all()
            except Exception as e:  # the API server stopping under it, at the end
                self.error = e

    def make_all(self) -> None:
        revisions = self.admin.get(f"/apis/serving.knative.dev/v1/namespaces/{NS}/revisions")["items"]
        existing = {r["metadata"]["name"] for r in revisions}
        services = self.admin.get(f"/apis/serving.knative.dev/v1/namespaces/{NS}/services")["items"]
        # and the garbage collector: a removed Service's Revisions go with it (ownerReferences)
        names = {s["metadata"]["name"] for s in services}
        for r in revisions:
            if r["metadata"]["labels"].get("serving.knative.dev/service") not in names:
                try:
                    self.admin.request("DELETE", f"/apis/serving.knative.dev/v1/namespaces/{NS}/revisions/"
                                                 f"{r['metadata']['name']}")
                except kube.ApiError:
                    pass
        for svc in services:
            template = svc["spec"]["template"]
            name = template["metadata"].get("name")
            if not name or name in existing:
                continue
            owner = svc["metadata"]["name"]
            try:
                self.admin.request("POST", f"/apis/serving.knative.dev/v1/namespaces/{NS}/revisions", {
                    "apiVersion": "serving.knative.dev/v1", "kind": "Revision",
                    "metadata": {"name": name, "labels": {**template["metadata"].get("labels", {}),
                                                          "serving.knative.dev/service": owner,
                                                          "serving.knative.dev/configuration": owner},
                                 "annotations": template["metadata"].get("annotations", {})},
                    "spec": template["spec"]})
            except kube.ApiError as e:
                if e.status != 409:
                    raise
                continue
            # and the Revision controller: Ready, unless the version says it is broken
            failing = "ContainerMissing" if "-broken" in name else None
            self.admin.merge_patch(f"/apis/serving.knative.dev/v1/namespaces/{NS}/revisions/{name}/status", {
                "status": {"conditions": [
                    {"type": "Ready", "status": "False" if failing else "True", "reason": failing or "",
                     "message": "the container exited with 1" if failing else "",
                     "lastTransitionTime": "2024-01-01T00:00:00Z"}]}})


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if BINARY is None or not BINARY.is_file():
        pytest.skip(f"no kube-apiserver binary{f' at {BINARY}' if BINARY else ''}: run scripts/kube-apiserver.sh "
                    "(builds and caches it) or set MODELPLANE_KUBE_APISERVER")
    revision_crd = kube.serving_crd("revision")
    if revision_crd is None:
        pytest.skip("Knative Serving's Revision CRD is not built: run scripts/cluster-build.sh serving")
    c = kube.Cluster(tmp_path_factory.mktemp("kube"), BINARY).start()
    try:
        c.install_crds(kube.crds_dir())
        c.install_crd_file(revision_crd)  # the versions of a realtime model are its Revisions
        # Stands in for Knative's own install, which owns this namespace.
        c.admin.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "knative-serving"}})
        for path, doc in kube.iter_knative_docs():
            if path.name in ("namespace.yaml", "rbac.yaml"):
                c.admin.apply(doc)
        maker = RevisionMaker(c.admin).start()
        try:
            yield c
        finally:
            maker.stop()
    except Exception:
        print(c.log_tail())
        raise
    finally:
        c.stop()


@pytest.fixture(scope="module")
def sa_token(cluster):
    return cluster.service_account_token(CONTROL_NS, SA)


def make_runtime(cluster, token, **overrides):
    from control.runtime.knative import KnativeRuntime

    rt = KnativeRuntime(settings(**overrides), api_client=cluster.api_client(token))
    inner = rt._request

    def recording(method, resource, name=None, *, verb, **kw):
        USED.add((verb, resource))
        return inner(method, resource, name, verb=verb, **kw)

    rt._request = recording
    watch_request = rt._watch_request

    def recording_watch(resource):
        USED.update({("list", resource), ("watch", resource)})
        return watch_request(resource)

    rt._watch_request = recording_watch
    return rt


@pytest.fixture(scope="module")
def runtime(cluster, sa_token):
    rt = make_runtime(cluster, sa_token)
    yield rt
    rt.close()


# -- playing the Knative controllers -------------------------------------------------------

def svc_path(name):
    return f"/apis/serving.knative.dev/v1/namespaces/{NS}/services/{name}"


def reconcile_service(admin, name, *, ready=True, message="", address=None):
    svc = admin.get(svc_path(name))
    revision = svc["spec"]["template"]["metadata"]["name"]
    status = "True" if ready else "False"
    cond = {"type": "Ready", "status": status, "lastTransitionTime": "2024-01-01T00:00:00Z"}
    if not ready:
        cond.update(reason="RevisionFailed", message=message)
    admin.merge_patch(svc_path(name) + "/status", {"status": {
        "observedGeneration": svc["metadata"]["generation"],
        "conditions": [cond, dict(cond, type="ConfigurationsReady"), dict(cond, type="RoutesReady")],
        "url": f"http://{name}.{NS}.example.com",
        "address": {"url": address or f"http://{name}.{NS}.svc.cluster.local"},
        "latestCreatedRevisionName": revision,
        "latestReadyRevisionName": revision if ready else None,
        "traffic": [{"revisionName": t["revisionName"], "percent": t["percent"], "latestRevision": False,
                     **({"tag": t["tag"], "url": f"http://{t['tag']}-{name}.{NS}.example.com"} if t.get("tag") else {})}
                    for t in svc["spec"]["traffic"]],
    }})


def reconcile_ready(admin, plural, group_version, name, extra=None):
    path = f"/apis/{group_version}/namespaces/{NS}/{plural}/{name}"
    obj = admin.get(path)
    admin.merge_patch(path + "/status", {"status": {
        "observedGeneration": obj["metadata"]["generation"],
        "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": "2024-01-01T00:00:00Z"}],
        **(extra or {})}})


def make_pod(admin, name, labels, *, ready=True):
    pod = admin.request("POST", f"/api/v1/namespaces/{NS}/pods", {
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": labels},
        # what the namespace's Pod Security level ("restricted", knative/namespace.yaml) admits
        "spec": {"securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
                 "containers": [{"name": "publish", "image": "registry.test/x", "securityContext": {
                     "allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}}]}})
    if ready:
        admin.merge_patch(f"/api/v1/namespaces/{NS}/pods/{name}/status", {"status": {
            "phase": "Running",
            "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": "2024-01-01T00:00:00Z"}]}})
    return pod


def job_status(admin, name, status):
    admin.merge_patch(f"/apis/batch/v1/namespaces/{NS}/jobs/{name}/status", {"status": status})


def example(name):
    folder = ROOT / "models" / name
    if not (folder / "model.yaml").is_file():
        pytest.skip(f"example model {name} not present")
    return load_manifest(folder)


def bump(manifest, version, **changes):
    data = manifest.model_dump(mode="python")
    data.update(version=version, **changes)
    return type(manifest).model_validate(data)


class Echo(http.server.BaseHTTPRequestHandler):
    """Stands in for a model's adapter behind the Knative URL."""

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        out = json.dumps({"path": self.path, "host": self.headers.get("Host"), "got": json.loads(body)}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *args):
        pass


# -- realtime -------------------------------------------------------------------------------

def test_realtime_deploy_status_rollback_remove(cluster, runtime):
    admin = cluster.admin
    v1 = example("donor-propensity")
    name = v1.name

    info = runtime.deploy(v1)
    assert (info.version, info.live) == ("1.0.0", True)
    svc = admin.get(svc_path(name))
    template = svc["spec"]["template"]
    assert template["metadata"]["name"] == f"{name}-1-0-0"
    assert svc["spec"]["traffic"] == [{"revisionName": f"{name}-1-0-0", "percent": 100, "latestRevision": False,
                                       "tag": "v1-0-0"}]
    adapter, model = template["spec"]["containers"]
    assert adapter["image"] == "registry.test/adapter:0.1.0" and adapter["args"] == ["serve", "--host", "127.0.0.1"]
    [port] = adapter["ports"]  # the one port Knative routes to (the CRD defaults protocol: TCP)
    assert (port["name"], port["containerPort"]) == ("http1", 8080)
    assert adapter["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    env = {e["name"]: e["value"] for e in adapter["env"]}
    assert env["MODEL_URL"] == "http://127.0.0.1:8081"
    assert json.loads(env["MODELPLANE_MANIFEST"])["name"] == name
    assert model["image"] == f"registry.test/models/{name}:1.0.0"
    # The model images have no CMD: the container runs the manifest's command in the model folder.
    assert (model["command"], model["workingDir"]) == (v1.command, "/model")
    assert {"name": "PORT", "value": "8081"} in model["env"]
    assert model["resources"]["requests"] == {"cpu": "500m", "memory": "128Mi"}
    ann = template["metadata"]["annotations"]
    assert ann["autoscaling.knative.dev/min-scale"] == "0" and ann["autoscaling.knative.dev/max-scale"] == "5"
    assert ann["autoscaling.knative.dev/target"] == "8"
    # idle_timeout: how long the last replica stays; scale-down-delay would slow every scale-down.
    assert ann["autoscaling.knative.dev/scale-to-zero-pod-retention-period"] == "60s"
    assert "autoscaling.knative.dev/scale-down-delay" not in ann
    assert ann["autoscaling.knative.dev/metric"] == "concurrency"
    assert ann["serving.knative.dev/no-gc"] == "true"  # never garbage-collected: every version can be rolled back to
    assert svc["metadata"]["labels"]["modelplane.dev/model"] == name
    assert svc["metadata"]["labels"]["networking.knative.dev/visibility"] == "cluster-local"

    # No controller has looked at it yet.
    [row] = [m for m in runtime.models() if m.name == name]
    assert (row.status, row.kind, row.version, row.language) == ("starting", "realtime", "1.0.0", "python")

    reconcile_service(admin, name)
    [row] = [m for m in runtime.models() if m.name == name]
    assert (row.status, row.replicas, row.endpoint) == ("idle", 0, f"http://{name}.{NS}.example.com")

    make_pod(admin, f"{name}-pod-a", {"modelplane.dev/model": name,
                                      "serving.knative.dev/revision": f"{name}-1-0-0",
                                      "serving.knative.dev/service": name})
    detail = runtime.model(name)
    assert (detail.status, detail.replicas) == ("ready", 1)
    assert detail.metrics["cluster"]["latestReadyRevisionName"] == f"{name}-1-0-0"
    assert detail.manifest["name"] == name and [v.version for v in detail.versions] == ["1.0.0"]

    # Deploying the same version again changes nothing at all.
    before = admin.get(svc_path(name))["metadata"]["resourceVersion"]
    again = runtime.deploy(load_manifest(ROOT / "models" / name))
    assert (again.version, again.live) == ("1.0.0", True)
    assert admin.get(svc_path(name))["metadata"]["resourceVersion"] == before

    # Same version, different content: versions are immutable.
    with pytest.raises(Conflict, match="immutable"):
        runtime.deploy(bump(v1, "1.0.0", description="changed"))

    # A new version: a new revision, traffic moves, the old one stays for rollback.
    v2 = bump(v1, "1.1.0", scaling={"min": 1, "max": 3, "target_concurrency": 4, "idle_timeout": "2m"})
    assert runtime.deploy(v2).live
    svc = admin.get(svc_path(name))
    assert svc["spec"]["template"]["metadata"]["name"] == f"{name}-1-1-0"
    # only the live version is routed: 1.0.0 keeps its Revision (for rollback), not a route
    assert [(t["revisionName"], t["percent"], t["tag"]) for t in svc["spec"]["traffic"]] == [
        (f"{name}-1-1-0", 100, "v1-1-0")]
    assert "modelplane.dev/versions" not in svc["metadata"]["annotations"]
    assert svc["spec"]["template"]["metadata"]["annotations"][
        "autoscaling.knative.dev/scale-to-zero-pod-retention-period"] == "120s"
    assert runtime.model(name).status == "starting"  # generation moved past observedGeneration
    reconcile_service(admin, name)
    detail = runtime.model(name)
    assert (detail.version, detail.status, detail.replicas) == ("1.1.0", "idle", 0)  # the pod was 1.0.0's
    assert [(v.version, v.live) for v in detail.versions] == [("1.0.0", False), ("1.1.0", True)]

    # Rollback is a traffic change only.
    template_before = admin.get(svc_path(name))["spec"]["template"]
    back = runtime.rollback(name, version="1.0.0")
    assert (back.version, back.live) == ("1.0.0", True)
    svc = admin.get(svc_path(name))
    assert [(t["revisionName"], t["percent"], t["tag"]) for t in svc["spec"]["traffic"]] == [
        (f"{name}-1-0-0", 100, "v1-0-0")]
    assert svc["spec"]["template"] == template_before
    # the Service shows its live version's manifest
    assert json.loads(svc["metadata"]["annotations"]["modelplane.dev/manifest"])["version"] == "1.0.0"
    with pytest.raises(NotFound, match="no version 9.9.9"):
        runtime.rollback(name, version="9.9.9")

    # forward() goes to the Service's address over pooled connections.
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Echo)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        reconcile_service(admin, name, address=f"http://127.0.0.1:{server.server_port}")
        runtime._endpoints.clear()
        detail = runtime.model(name)
        assert (detail.version, detail.status, detail.replicas) == ("1.0.0", "ready", 1)
        resp = runtime.forward(name, method="POST", path="/predict", query="x=1",
                               headers={"Content-Type": "application/json", "Host": "control"},
                               body=json.dumps({"rows": [{"a": 1}]}).encode())
        assert resp.status == 200
        assert json.loads(resp.body) == {"path": "/predict?x=1", "host": f"127.0.0.1:{server.server_port}",
                                         "got": {"rows": [{"a": 1}]}}
        # a version with no route is refused with what to do; pinned, it has one
        with pytest.raises(Conflict, match="modelplane pin"):
            runtime.forward(name, method="POST", path="/predict", headers={}, body=b"{}", version="1.1.0")
        runtime.pin(name, "1.1.0")
        assert [(t["revisionName"], t["percent"]) for t in admin.get(svc_path(name))["spec"]["traffic"]] == [
            (f"{name}-1-0-0", 100), (f"{name}-1-1-0", 0)]
        runtime._endpoints.clear()
        # one version, whatever the split: the same address, its traffic tag's Host
        resp = runtime.forward(name, method="POST", path="/predict", headers={"Content-Type": "application/json"},
                               body=b'{"rows": []}', version="1.1.0")
        assert json.loads(resp.body)["host"] == f"v1-1-0-{name}.{NS}.svc.cluster.local"
        with pytest.raises(NotFound, match="no version 7.0.0"):
            runtime.forward(name, method="POST", path="/predict", headers={}, body=b"{}", version="7.0.0")
    finally:
        server.shutdown()
        server.server_close()

    reconcile_service(admin, name, ready=False, message="Container model crashed: exit 1")
    [row] = [m for m in runtime.models() if m.name == name]
    assert row.status == "failed" and "exit 1" in row.error

    # a realtime model takes a dataset too: a Job of its stream JobSink (more in the stream test)
    job, created = runtime.submit_job(name, dataset="gs://test-bucket/incoming/x.csv")
    assert created and job.model == name

    runtime.remove(name)
    with pytest.raises(NotFound):
        runtime.model(name)
    with pytest.raises(kube.ApiError) as gone:
        admin.get(svc_path(name))
    assert gone.value.status == 404
    with pytest.raises(NotFound):
        runtime.remove(name)
    COMPLETED.add("realtime")


def test_realtime_rollout_writes_percents_and_a_tag_per_version(cluster, runtime):
    """A rollout, a shadow, promote and rollback are changes of the Service's traffic list (and
    the annotation that records the split), accepted by the API server with the real CRDs and
    by the rules Knative's webhook applies (route_validation.go)."""
    from control.runtime import knative_rules as rules

    admin = cluster.admin
    v1 = bump(example("donor-propensity"), "1.0.0")
    name = "rollout-" + secrets.token_hex(3)
    v1 = bump(v1, "1.0.0", name=name)
    v2 = bump(v1, "1.1.0")
    runtime.deploy(v1)
    # deployed beside the live version: no share yet, but its own tag (and URL) at once
    assert runtime.deploy(v2, make_live=False).live is False

    def traffic():
        svc = admin.get(svc_path(name))
        assert rules.problems(svc) == []
        return [(t["revisionName"].removeprefix(name + "-"), t["percent"], t.get("tag")) for t in svc["spec"]["traffic"]]

    assert traffic() == [("1-0-0", 100, "v1-0-0")]   # no route until it is rolled out (or pinned)
    assert runtime.version_manifest(name, "1.1.0")["version"] == "1.1.0"   # not live, still described
    state = runtime.rollout(name, version="1.1.0", percent=10, shadow=20)
    assert (state.live, state.candidate, state.percent, state.shadow) == ("1.0.0", "1.1.0", 10, 20)
    assert traffic() == [("1-0-0", 90, "v1-0-0"), ("1-1-0", 10, "v1-1-0")]
    reconcile_service(admin, name)
    detail = runtime.model(name)
    assert detail.version == "1.0.0"
    assert [(t["version"], t["percent"], t["url"]) for t in detail.traffic["targets"]] == [
        ("1.0.0", 90, f"http://v1-0-0-{name}.{NS}.example.com"), ("1.1.0", 10, f"http://v1-1-0-{name}.{NS}.example.com")]
    assert detail.traffic["shadow"] == 20
    # a third version: deployed, the split untouched; pinned, it joins the list at 0 %
    runtime.deploy(bump(v1, "2.0.0-rc.1"), make_live=False)
    assert traffic() == [("1-0-0", 90, "v1-0-0"), ("1-1-0", 10, "v1-1-0")]
    assert runtime.pin(name, "2.0.0-rc.1").pinned == ["2.0.0-rc.1"]
    assert traffic() == [("1-0-0", 90, "v1-0-0"), ("1-1-0", 10, "v1-1-0"), ("2-0-0-rc-1", 0, "v2-0-0-rc-1")]
    runtime.unpin(name, "2.0.0-rc.1")
    assert traffic() == [("1-0-0", 90, "v1-0-0"), ("1-1-0", 10, "v1-1-0")]
    with pytest.raises(NotFound, match="not pinned"):
        runtime.unpin(name, "2.0.0-rc.1")

    with pytest.raises(Conflict, match="live version already"):
        runtime.rollout(name, version="1.0.0", percent=5)
    with pytest.raises(NotFound, match="no version 9.0.0"):
        runtime.rollout(name, version="9.0.0", percent=5)

    assert runtime.promote(name).version == "1.1.0"
    assert traffic() == [("1-1-0", 100, "v1-1-0")]
    t = runtime.traffic(name)
    assert (t.live, t.candidate, t.previous) == ("1.1.0", None, "1.0.0")
    with pytest.raises(Conflict, match="no rollout to promote"):
        runtime.promote(name)
    # rollback with no version: back to the version live before
    assert runtime.rollback(name).version == "1.0.0"
    assert traffic()[0] == ("1-0-0", 100, "v1-0-0")
    # and a rollout in progress is withdrawn at once
    runtime.rollout(name, version="2.0.0-rc.1", percent=100)
    assert traffic() == [("1-0-0", 0, "v1-0-0"), ("2-0-0-rc-1", 100, "v2-0-0-rc-1")]
    assert runtime.rollback(name).version == "1.0.0"
    assert traffic()[0] == ("1-0-0", 100, "v1-0-0") and runtime.traffic(name).candidate is None
    # a second rollback does not swing back to 1.1.0, the version just rolled back from: there
    # is nothing earlier than 1.0.0
    with pytest.raises(Conflict, match="no earlier live version"):
        runtime.rollback(name)
    assert traffic()[0] == ("1-0-0", 100, "v1-0-0")
    runtime.remove(name)


def test_a_tag_too_long_for_a_service_name_is_left_out():
    from control.runtime import knative_objects as ko
    from control.runtime.base import Traffic

    name = "m" * 55
    targets = ko.traffic_list(name, {"1.0.0": f"{name}-1-0-0", "1.0.0-rc.1": f"{name}-1-0-0-rc-1"},
                              Traffic(live="1.0.0", candidate="1.0.0-rc.1", percent=5))
    assert targets == [{"revisionName": f"{name}-1-0-0", "percent": 95, "latestRevision": False, "tag": "v1-0-0"},
                       {"revisionName": f"{name}-1-0-0-rc-1", "percent": 5, "latestRevision": False}]


# -- batch ----------------------------------------------------------------------------------

def jobsink_path(name):
    return f"/apis/sinks.knative.dev/v1alpha1/namespaces/{NS}/jobsinks/{name}"


def trigger_path(name):
    return f"/apis/eventing.knative.dev/v1/namespaces/{NS}/triggers/{name}"


def test_batch_deploy_jobs_rollback_remove(cluster, runtime, gcs):
    admin = cluster.admin
    v1 = example("churn-risk")
    name = v1.name
    sink_name = f"{name}-1-0-0"

    assert runtime.deploy(v1).live
    sink = admin.get(jobsink_path(sink_name))
    job = sink["spec"]["job"]["spec"]
    assert (job["backoffLimit"], job["activeDeadlineSeconds"] >= 1800, job["ttlSecondsAfterFinished"] > 0) == \
        (0, True, True)
    pod = job["template"]["spec"]
    # Two main containers: Knative's dispatcher gives the event to main containers only.
    assert "initContainers" not in pod
    adapter, model = pod["containers"]
    assert (adapter["name"], adapter["image"], adapter["args"]) == \
        ("adapter", "registry.test/adapter:0.1.0", ["job", "--work", "/work"])
    assert not any(m["name"] == "jobsink-event" for c in pod["containers"] for m in c["volumeMounts"])
    env = {e["name"]: e.get("value") for e in adapter["env"]}
    # Results go to the plane's bucket, under the Job's own name.
    assert env["RESULTS_URI"] == f"gs://test-bucket/results/{name}/$(JOB_ID)/"
    assert (model["name"], model["image"], model["command"][0]) == ("model", f"registry.test/models/{name}:1.0.0", "sh")
    assert model["command"][-2:] == ["python3", "score.py"]  # the model's own command, no Python needed
    assert {"name": "DATASET", "value": "/work/dataset.csv"} in model["env"]
    # The Job pods' identity (Workload Identity on GKE) reads datasets and writes results.
    assert pod["serviceAccountName"] == "modelplane-job"
    assert {v["name"] for v in pod["volumes"]} == {"work", "tmp"}
    trig = admin.get(trigger_path(name))
    assert trig["spec"]["broker"] == "default"
    assert trig["spec"]["filters"] == [
        {"exact": {"type": "google.cloud.storage.object.v1.finalized"}},
        {"exact": {"source": "//storage.googleapis.com/projects/_/buckets/test-bucket"}},
        {"prefix": {"subject": f"objects/incoming/{name}/"}},
    ]
    assert trig["spec"]["subscriber"]["ref"] == {"apiVersion": "sinks.knative.dev/v1alpha1", "kind": "JobSink",
                                                 "name": sink_name}

    [row] = [m for m in runtime.models() if m.name == name]
    assert (row.kind, row.status, row.version) == ("batch", "starting", "1.0.0")
    reconcile_ready(admin, "triggers", "eventing.knative.dev/v1", name)
    reconcile_ready(admin, "jobsinks", "sinks.knative.dev/v1alpha1", sink_name,
                    {"address": {"url": f"http://job-sink.knative-eventing.svc.cluster.local/{NS}/{sink_name}"}})
    [row] = [m for m in runtime.models() if m.name == name]
    assert (row.status, row.replicas) == ("idle", 0)
    assert row.endpoint.endswith(f"/{NS}/{sink_name}")

    before = (admin.get(jobsink_path(sink_name))["metadata"]["resourceVersion"],
              admin.get(trigger_path(name))["metadata"]["resourceVersion"])
    runtime.deploy(load_manifest(ROOT / "models" / name))
    assert (admin.get(jobsink_path(sink_name))["metadata"]["resourceVersion"],
            admin.get(trigger_path(name))["metadata"]["resourceVersion"]) == before

    # A job through the API: a Job from the JobSink's template plus the event Secret.
    dataset = f"gs://test-bucket/incoming/{name}/march.csv"
    job, created = runtime.submit_job(name, dataset=dataset, event_key="test-bucket/march.csv#1")
    assert created and job.status == "queued" and job.model == name and job.version == "1.0.0"
    kjob = admin.get(f"/apis/batch/v1/namespaces/{NS}/jobs/{job.id}")
    assert kjob["metadata"]["labels"]["sinks.knative.dev/job-sink-name"] == sink_name
    assert kjob["metadata"]["ownerReferences"][0]["kind"] == "JobSink"
    assert kjob["spec"]["backoffLimit"] == 0
    kpod = kjob["spec"]["template"]["spec"]
    assert [c["name"] for c in kpod["containers"]] == ["adapter", "model"]
    for c in kpod["containers"]:  # as the dispatcher does: event mount, K_EVENT_PATH, K_EXECUTION_MODE
        assert {"name": "jobsink-event", "mountPath": "/etc/jobsink-event", "readOnly": True} in c["volumeMounts"]
        assert {"name": "K_EVENT_PATH", "value": "/etc/jobsink-event"} in c["env"]
        assert {"name": "K_EXECUTION_MODE", "value": "batch"} in c["env"]
    assert {"name": "jobsink-event", "secret": {"secretName": job.id, "defaultMode": 420}} in kpod["volumes"]
    secret = admin.get(f"/api/v1/namespaces/{NS}/secrets/{job.id}")
    import base64
    event = json.loads(base64.b64decode(secret["data"]["event"]))
    assert event["type"] == "google.cloud.storage.object.v1.finalized"
    assert event["subject"] == f"objects/incoming/{name}/march.csv"
    assert event["data"] == {"bucket": "test-bucket", "name": f"incoming/{name}/march.csv",
                             "kind": "storage#object", "contentType": "text/csv"}
    # The same event again: the same job, not a second one.
    again, created_again = runtime.submit_job(name, dataset=dataset, event_key="test-bucket/march.csv#1")
    assert (again.id, created_again) == (job.id, False)
    # An upload's key names the Job as the JobSink names it for the upload's bucket event (id
    # `{object}#{generation}`), so that event finds it instead of running the dataset again.
    upload, _ = runtime.submit_job(name, dataset=dataset, event_key=f"test-bucket/incoming/{name}/march.csv#7")
    assert upload.id == runtime.job_for_upload(name, bucket="test-bucket", obj=f"incoming/{name}/march.csv",
                                               generation="7") != job.id
    admin.request("DELETE", f"/apis/batch/v1/namespaces/{NS}/jobs/{upload.id}",  # not orphaned: no GC runs here
                  {"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Background"})
    admin.request("DELETE", f"/api/v1/namespaces/{NS}/secrets/{upload.id}")

    # A Job as Knative's JobSink dispatcher would create it for a bucket event.
    bucket_job = json.loads(json.dumps(sink["spec"]["job"]))
    bucket_job["metadata"]["name"] = f"{sink_name}-from-bucket"
    bucket_job["metadata"]["labels"]["sinks.knative.dev/job-sink-name"] = sink_name
    # (knative/eventing cmd/jobsink: the event Secret as volume `jobsink-event`, mounted in containers)
    bucket_pod = bucket_job["spec"]["template"]["spec"]
    bucket_pod["volumes"].append({"name": "jobsink-event", "secret": {"secretName": f"{sink_name}-from-bucket"}})
    for c in bucket_pod["containers"]:
        c["volumeMounts"].append({"name": "jobsink-event", "mountPath": "/etc/jobsink-event", "readOnly": True})
        c["env"].append({"name": "K_EVENT_PATH", "value": "/etc/jobsink-event"})
    admin.request("POST", f"/apis/batch/v1/namespaces/{NS}/jobs", bucket_job)

    # (the jobs this cluster ran: the session's bucket may hold results of the same model's
    # local jobs from other tests, which are listed too, from the bucket)
    jobs = [j for j in runtime.jobs(model=name) if j.id.startswith(sink_name)]
    assert {j.id: (j.status, j.trigger) for j in jobs} == {job.id: ("queued", "api"),
                                                           f"{sink_name}-from-bucket": ("queued", "bucket")}
    job_status(admin, job.id, {"active": 1, "startTime": "2024-01-01T00:00:00Z"})
    make_pod(admin, f"{job.id}-pod", {"job-name": job.id}, ready=False)  # no node: no log yet
    got = runtime.job(job.id)
    assert (got.status, got.started_at) == ("running", "2024-01-01T00:00:00Z")
    assert runtime.model(name).replicas == 1
    assert runtime.model(name).status == "ready"
    job_status(admin, job.id, {"active": 0, "succeeded": 1, "completionTime": "2024-01-01T00:05:00Z",
                               # as the Job controller writes them (batch/v1 validation
                               # since 1.31: Complete only after SuccessCriteriaMet)
                               "conditions": [{"type": "SuccessCriteriaMet", "status": "True",
                                               "lastTransitionTime": "2024-01-01T00:05:00Z"},
                                              {"type": "Complete", "status": "True",
                                               "lastTransitionTime": "2024-01-01T00:05:00Z"}]})
    got = runtime.job(job.id)
    assert (got.status, got.finished_at) == ("succeeded", "2024-01-01T00:05:00Z")
    assert got.results_uri == f"gs://test-bucket/results/{name}/{job.id}/scores.csv"
    job_status(admin, f"{sink_name}-from-bucket", {"startTime": "2024-01-01T00:00:00Z", "conditions": [{
        "type": "FailureTarget", "status": "True", "reason": "DeadlineExceeded",
        "message": "Job was active longer than specified deadline", "lastTransitionTime": "2024-01-01T01:00:00Z"}, {
        "type": "Failed", "status": "True", "reason": "DeadlineExceeded",
        "message": "Job was active longer than specified deadline", "lastTransitionTime": "2024-01-01T01:00:00Z"}]})
    failed = runtime.job(f"{sink_name}-from-bucket")
    assert failed.status == "failed" and "DeadlineExceeded" in failed.error
    with pytest.raises(NotFound):
        runtime.job("no-such-job")
    with pytest.raises(Invalid, match="gs://"):
        runtime.submit_job(name, dataset="/tmp/local.csv")

    # New version: a second JobSink, the Trigger moves; rollback moves it back.
    assert runtime.deploy(bump(v1, "1.1.0")).live
    assert admin.get(trigger_path(name))["spec"]["subscriber"]["ref"]["name"] == f"{name}-1-1-0"
    assert admin.get(jobsink_path(sink_name))  # the earlier version stays
    detail = runtime.model(name)
    assert [(v.version, v.live) for v in detail.versions] == [("1.0.0", False), ("1.1.0", True)]
    runtime.rollback(name, version="1.0.0")
    assert admin.get(trigger_path(name))["spec"]["subscriber"]["ref"]["name"] == sink_name
    assert runtime.model(name).version == "1.0.0"

    with pytest.raises(BadRequest):
        runtime.forward(name, method="POST", path="/predict", headers={}, body=b"{}")

    runtime.remove(name)
    with pytest.raises(NotFound):
        runtime.model(name)
    for path in (trigger_path(name), jobsink_path(sink_name), jobsink_path(f"{name}-1-1-0")):
        with pytest.raises(kube.ApiError):
            admin.get(path)
    COMPLETED.add("batch")


# -- what reaches the cluster ---------------------------------------------------------------

def test_crd_schemas_accept_every_rendered_object(cluster):
    from control.runtime.knative_objects import render_objects

    folders = sorted(p.parent for p in (ROOT / "models").glob("*/model.yaml"))
    assert folders, "no example models"
    for folder in folders:
        for obj in render_objects(load_manifest(folder), settings()):
            cluster.admin.request("POST", kube.object_path(obj).rsplit("/", 1)[0], obj, query="dryRun=All")
    # ... and the schema really is enforced: a non-string autoscaling annotation is refused.
    [obj] = render_objects(example("donor-propensity"), settings())
    obj["spec"]["template"]["metadata"]["annotations"]["autoscaling.knative.dev/min-scale"] = 0
    with pytest.raises(kube.ApiError) as refused:
        cluster.admin.request("POST", kube.object_path(obj).rsplit("/", 1)[0], obj, query="dryRun=All")
    assert refused.value.status == 422


def test_bad_manifest_never_reaches_the_cluster(cluster, sa_token):
    rt = make_runtime(cluster, sa_token)
    calls = []
    api = rt.api
    original = api.call_api
    api.call_api = lambda *a, **kw: calls.append(a) or original(*a, **kw)
    v1 = example("donor-propensity")
    too_long = bump(v1, "1.0.0-" + "a" * 40, name="a-rather-long-model-name-for-a-revision")
    with pytest.raises(Invalid, match="63"):
        rt.deploy(too_long)
    hand_built = v1.model_copy(update={"name": "Not_A_DNS_Label"})  # skips validation
    with pytest.raises(Invalid, match="name"):
        rt.deploy(hand_built)
    # A DNS label may start with a digit; a Knative Service and its revisions may not (DNS-1035).
    with pytest.raises(Invalid) as refused:
        rt.deploy(bump(v1, "1.0.0", name="3d-donors"))
    assert refused.value.details["problems"][0]["field"] in ("name", "name/version")
    # Knative caps a revision's timeout (max-revision-timeout-seconds, 600 by default); ours is
    # limits.timeout + 5 s.
    with pytest.raises(Invalid) as refused:
        rt.deploy(bump(v1, "1.0.0", limits={"timeout": "600s"}))
    assert [p["field"] for p in refused.value.details["problems"]] == ["limits.timeout"]
    assert "600" in refused.value.message
    # The retention of the last replica is at most an hour (Knative's WindowMax).
    with pytest.raises(Invalid) as refused:
        rt.deploy(bump(v1, "1.0.0", scaling={"idle_timeout": "2h"}))
    assert [p["field"] for p in refused.value.details["problems"]] == ["scaling.idle_timeout"]
    assert calls == []
    # What fits is rendered: 595 s, or more where the cluster allows more.
    from control.runtime.knative_objects import render_objects

    [svc] = render_objects(bump(v1, "1.0.0", limits={"timeout": "595s"}), settings())
    assert svc["spec"]["template"]["spec"]["timeoutSeconds"] == 600
    [svc] = render_objects(bump(v1, "1.0.0", limits={"timeout": "600s"}), settings(max_revision_timeout=900))
    assert svc["spec"]["template"]["spec"]["timeoutSeconds"] == 605


def test_visibility_public_leaves_the_route_external():
    from control.runtime.knative_objects import render_objects

    [svc] = render_objects(bump(example("donor-propensity"), "1.0.0", visibility="public"), settings())
    assert "networking.knative.dev/visibility" not in svc["metadata"]["labels"]
    with pytest.raises(Exception, match="visibility"):
        bump(example("churn-risk"), "1.0.0", visibility="public")


def test_visibility_follows_the_live_version_both_ways(cluster, runtime):
    """A model made public later loses the cluster-local label (a merge patch removes a label only
    with null), and one made cluster-local again gets it back; a rollback brings its version's."""
    admin = cluster.admin
    name = "visible-" + secrets.token_hex(3)
    v1 = bump(example("donor-propensity"), "1.0.0", name=name)
    label = "networking.knative.dev/visibility"
    runtime.deploy(v1)
    assert admin.get(svc_path(name))["metadata"]["labels"][label] == "cluster-local"
    runtime.deploy(bump(v1, "2.0.0", visibility="public"))
    assert label not in admin.get(svc_path(name))["metadata"]["labels"]
    runtime.rollback(name, version="1.0.0")
    assert admin.get(svc_path(name))["metadata"]["labels"][label] == "cluster-local"
    runtime.rollback(name, version="2.0.0")
    assert label not in admin.get(svc_path(name))["metadata"]["labels"]
    runtime.remove(name)


def test_the_adapter_is_probed_and_reached_as_queue_proxy_does_and_waited_for_as_long_as_its_revision():
    """Loopback only (queue-proxy forwards and probes on 127.0.0.1); a probe without a period
    (queue-proxy's aggressive start-up probing); `forward` waits past the revision's timeout."""
    from control.runtime import knative
    from control.runtime.knative_objects import render_objects

    slow = bump(example("donor-propensity"), "1.0.0", limits={"timeout": "400s"})
    [svc] = render_objects(slow, settings(max_revision_timeout=600))
    adapter = svc["spec"]["template"]["spec"]["containers"][0]
    assert adapter["args"] == ["serve", "--host", "127.0.0.1"]
    assert adapter["readinessProbe"] == {"httpGet": {"path": "/v2/health/ready"}}
    assert svc["spec"]["template"]["spec"]["timeoutSeconds"] == 405
    assert knative._revision_timeout(svc, settings()) == 405
    runtime = knative.KnativeRuntime(settings(max_revision_timeout=600))
    runtime._timeouts["slow"] = knative._revision_timeout(svc, settings())
    assert runtime._read_timeout("slow") == 405 + knative.READ_TIMEOUT_MARGIN
    assert runtime._read_timeout("unknown") == 600 + knative.READ_TIMEOUT_MARGIN


def test_api_errors_are_mapped(cluster, sa_token, runtime):
    # Outside the RoleBinding's namespace: 403, naming verb, resource and namespace.
    elsewhere = make_runtime(cluster, sa_token, namespace="default")
    with pytest.raises(Forbidden) as denied:
        elsewhere.models()
    message = denied.value.message
    assert "list" in message and "services.serving.knative.dev" in message and "namespace default" in message
    assert denied.value.details["permission"] == {"verb": "list", "resource": "services",
                                                  "apiGroup": "serving.knative.dev", "namespace": "default"}
    with pytest.raises(NotFound):
        runtime.model("never-deployed")
    with pytest.raises(NotFound):
        runtime.rollback("never-deployed", version="1.0.0")

    # 422 from the API server names the field it rejected.
    from control.runtime.knative_objects import render_objects

    [svc] = render_objects(example("donor-propensity"), settings())
    svc["metadata"]["name"] = "bad"
    svc["spec"]["template"]["metadata"]["annotations"]["autoscaling.knative.dev/max-scale"] = 5
    with pytest.raises(Invalid) as rejected:
        runtime._create("services", svc)
    assert rejected.value.status == 422
    assert "Service bad" in rejected.value.message
    assert "spec.template.metadata.annotations.autoscaling.knative.dev/max-scale" in rejected.value.message
    assert rejected.value.details["problems"][0]["field"].startswith("spec.template.metadata.annotations")

    # Nothing listening: Unavailable (try again later), not a crash.
    from control.errors import Unavailable
    from control.runtime.knative import KnativeRuntime
    from kubernetes import client

    cfg = client.Configuration()
    cfg.host = f"https://127.0.0.1:{kube.free_port()}"
    cfg.ssl_ca_cert = str(cluster.ca)
    cfg.retries = 0
    down = KnativeRuntime(settings(), api_client=client.ApiClient(cfg), request_timeout=2)
    with pytest.raises(Unavailable):
        down.models()


def test_jobsink_jobs_pass_the_dry_run_knatives_webhook_makes(cluster):
    """Eventing's JobSink webhook dry-run-creates `spec.job` exactly as written, named like the
    JobSink plus five random characters (pkg/apis/sinks/v1alpha1/job_sink_validation.go); a JobSink
    whose Job the API server refuses is refused. Every example batch model's Job passes, and the
    check is real: a template whose init container mounts the dispatcher's event volume (which only
    the dispatcher adds, to main containers) is refused."""
    from control.runtime.knative_objects import render_objects

    def dry_run(job: dict, sink_name: str):
        job = copy.deepcopy(job)
        job["metadata"]["name"] = sink_name[:58] + secrets.token_hex(3)[:5]
        return cluster.admin.request("POST", f"/apis/batch/v1/namespaces/{NS}/jobs", job, query="dryRun=All")

    folders = sorted(p.parent for p in (ROOT / "models").glob("*/model.yaml"))
    batch = [load_manifest(f) for f in folders if load_manifest(f).kind == "batch"]
    assert batch, "no example batch models"
    for manifest in batch:
        sink, _ = render_objects(manifest, settings())
        dry_run(sink["spec"]["job"], sink["metadata"]["name"])
    broken = copy.deepcopy(sink["spec"]["job"])
    broken["spec"]["template"]["spec"]["initContainers"] = [{
        "name": "fetch", "image": "registry.test/adapter:0.1.0",
        "volumeMounts": [{"name": "jobsink-event", "mountPath": "/etc/jobsink-event"}]}]
    with pytest.raises(kube.ApiError) as refused:
        dry_run(broken, sink["metadata"]["name"])
    assert refused.value.status == 422 and "jobsink-event" in refused.value.body


def test_a_failed_version_is_explained_by_its_revision_and_events(cluster, runtime):
    """A version whose Revision Knative could not make Ready shows as failed on that version,
    with Knative's reason and the Warning events of its Revision; the model itself still serves
    its live version, and a rollback skips it."""
    admin = cluster.admin
    v1 = bump(example("donor-propensity"), "1.0.0", name="broken-later")
    runtime.deploy(v1)
    runtime.deploy(bump(v1, "2.0.0"), make_live=False)
    rev_path = f"/apis/serving.knative.dev/v1/namespaces/{NS}/revisions/broken-later-2-0-0"
    admin.merge_patch(rev_path + "/status", {"status": {"conditions": [
        {"type": "Ready", "status": "False", "reason": "ContainerMissing", "lastTransitionTime": "2024-01-01T00:00:00Z",
         "message": "Unable to fetch image \"registry.test/models/broken-later:2.0.0\""}]}})
    admin.request("POST", f"/api/v1/namespaces/{NS}/events", {
        "apiVersion": "v1", "kind": "Event", "metadata": {"name": "broken-later-2-0-0.1"}, "type": "Warning",
        "reason": "InternalError", "message": "failed to resolve image to digest: 401 Unauthorized",
        "involvedObject": {"kind": "Revision", "name": "broken-later-2-0-0", "namespace": NS,
                           "apiVersion": "serving.knative.dev/v1"},
        "lastTimestamp": "2024-01-01T00:00:00Z"})
    detail = runtime.model("broken-later")
    by_version = {v.version: v for v in detail.versions}
    assert by_version["1.0.0"].live and not by_version["1.0.0"].failed
    assert by_version["2.0.0"].failed and "ContainerMissing" in by_version["2.0.0"].error
    assert "401 Unauthorized" in by_version["2.0.0"].error
    assert detail.status != "failed"
    with pytest.raises(Conflict, match="failed to become Ready"):
        runtime.rollout("broken-later", version="2.0.0", percent=10)
    runtime.remove("broken-later")


def test_reads_come_from_the_watch_cache_and_list_nothing_per_request(cluster, sa_token):
    """Started as the control service starts it, the runtime lists each kind once and then
    watches: `models()` and `jobs()` make no request; its own writes show at once; the cluster's
    changes show when the watch delivers them; a second replica's cache agrees."""
    first, second = make_runtime(cluster, sa_token), make_runtime(cluster, sa_token)
    first.start()
    second.start()
    try:
        assert first.problems() or first.ready()   # not ready until listed
        deadline = time.monotonic() + 30
        while not (first.ready() and second.ready()):
            assert time.monotonic() < deadline, (first.problems(), second.problems())
            time.sleep(0.05)
        assert first.problems() == []
        requests = []
        inner = first._request
        first._request = lambda *a, **kw: (requests.append((a, kw.get("verb"))), inner(*a, **kw))[1]
        name = "cached-" + secrets.token_hex(3)
        v1 = bump(example("donor-propensity"), "1.0.0", name=name)
        first.deploy(v1)
        requests.clear()
        [row] = [m for m in first.models() if m.name == name]   # its own write, at once
        assert (row.version, row.status, row.language, row.owner) == ("1.0.0", "starting", "python",
                                                                      v1.owner)
        first.jobs(limit=10)
        assert requests == []   # answered from memory
        generation = first.models_generation()
        reconcile_service(cluster.admin, name)   # Knative's controller, elsewhere

        def row_of(rt):
            return next((m for m in rt.models() if m.name == name), None)

        deadline = time.monotonic() + 10
        while (row_of(first) or row_of(second)) is None or row_of(first).status != "idle" or \
                (row_of(second) is None or row_of(second).status != "idle"):
            assert time.monotonic() < deadline, (row_of(first), row_of(second))
            time.sleep(0.05)
        assert first.models_generation() != generation
        assert row_of(second).to_json() == row_of(first).to_json()
        first.remove(name)
        assert row_of(first) is None   # forgotten at once
        deadline = time.monotonic() + 10
        while row_of(second) is not None:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        first.close()
        second.close()


def test_a_comparison_pins_the_versions_it_scores_and_unpins_them_after(cluster, runtime):
    """A version with no route is pinned while a comparison scores through it (then unpinned),
    and the comparison waits until Knative reports the pinned version's URL."""
    import types

    from control.compare import Comparisons

    name = "compared-" + secrets.token_hex(3)
    v1 = bump(example("donor-propensity"), "1.0.0", name=name)
    runtime.deploy(v1)
    runtime.deploy(bump(v1, "2.0.0"), make_live=False)
    assert runtime.traffic(name).routed() == ["1.0.0"]
    stop = threading.Event()

    def knative_routes():   # the Route controller, reporting each target's URL
        while not stop.wait(0.2):
            try:
                reconcile_service(cluster.admin, name)
            except kube.ApiError:
                pass

    routes = threading.Thread(target=knative_routes, daemon=True)
    routes.start()
    comparisons = Comparisons.__new__(Comparisons)
    comparisons.plane = types.SimpleNamespace(runtime=runtime)
    try:
        with comparisons._routed(name, ["1.0.0", "2.0.0"]):
            state = runtime.traffic(name)
            assert (state.live, state.pinned) == ("1.0.0", ["2.0.0"])
            targets = {t["version"]: t for t in runtime.model(name).traffic["targets"]}
            assert targets["2.0.0"]["url"] == f"http://v2-0-0-{name}.{NS}.example.com"
        assert runtime.traffic(name).pinned == []
        assert runtime.traffic(name).routed() == ["1.0.0"]
    finally:
        stop.set()
        routes.join()
        runtime.remove(name)


def test_versions_of_a_wide_model_leave_the_service_the_size_of_one(cluster, runtime):
    """Versions of a 200-feature model deployed one after another, each made live, on the real
    API server (40 here; MODELPLANE_PROOF_VERSIONS=300 for the figure): no object ever over
    256 KiB, the Service's annotations as large at the last version as from the 21st on (the 20
    earlier live versions a rollback walks back through, and version strings, are all that
    changes), the Route names only the live version, and every version is still there to roll
    back to. (tests/test_knative_real.py runs versions on real Knative, with the objects Knative
    writes and the pods.)"""
    from control.runtime.knative_objects import render_objects

    count = int(os.environ.get("MODELPLANE_PROOF_VERSIONS", "40"))
    base = example("donor-propensity").model_dump(mode="python")
    base["name"] = "wide-" + secrets.token_hex(3)
    base["features"] = base["features"] + [
        {"name": f"extra_feature_{i:03d}", "type": "number", "required": False,
         "description": f"Extra input {i} of a wide model (optional; the model ignores it)"} for i in range(195)]
    base["scaling"] = {"min": 1, "max": 2, "target_concurrency": 8, "idle_timeout": "0s"}
    wide = type(example("donor-propensity")).model_validate(base)
    manifest_bytes = len(json.dumps(render_objects(wide, settings())[0]["metadata"]["annotations"]))
    sizes, largest = {}, 0
    t0 = time.monotonic()
    for n in range(1, count + 1):
        runtime.deploy(bump(wide, f"1.0.{n}"))
        svc = cluster.admin.get(svc_path(wide.name))
        largest = max(largest, len(json.dumps(svc)))
        sizes[n] = sum(len(k) + len(v) for k, v in svc["metadata"]["annotations"].items())
        assert [t["revisionName"] for t in svc["spec"]["traffic"]] == [f"{wide.name}-1-0-{n}"]
    seconds = time.monotonic() - t0
    picks = {n: sizes[n] for n in (1, 3, 21, count) if n in sizes}
    print(f"figure: {count} versions of a 200-feature model: Service annotation bytes {picks}, largest Service "
          f"{largest} bytes, one manifest {manifest_bytes} bytes, {seconds:.1f} s")
    assert largest < 256 * 1024
    if count >= 21:
        # from the 21st version on, only version strings change (1.0.21 -> 1.0.300: 20 history entries + live)
        assert sizes[count] - sizes[21] <= 21 * (len(str(count)) - 2) + 64
    assert sizes[count] - sizes[1] < manifest_bytes / 10
    versions = [v.version for v in runtime.model(wide.name).versions]
    assert len(versions) == count and versions[0] == "1.0.1"
    assert runtime.rollback(wide.name, version="1.0.1").version == "1.0.1"
    runtime.remove(wide.name)


def test_a_version_knative_cannot_make_ready_fails_its_deploy_and_the_live_one_stays(cluster, runtime):
    """The deploy check on a cluster: a new version whose Revision Knative reports failed is a
    422 naming Knative's reason; the version live before stays live (its traffic entry back, as
    if the deploy had not moved it), the failed one stays deployed and marked failed."""
    from control.runtime.base import DeployCheckFailed

    name = "checked-" + secrets.token_hex(3)
    v1 = bump(example("donor-propensity"), "1.0.0", name=name)
    runtime.deploy(v1)
    with pytest.raises(DeployCheckFailed, match="ContainerMissing") as failed:
        runtime.deploy(bump(v1, "2.0.0-broken"))
    assert "1.0.0 stays live" in failed.value.message
    state = runtime.traffic(name)
    assert (state.live, state.routed()) == ("1.0.0", ["1.0.0"])
    assert [t["revisionName"] for t in cluster.admin.get(svc_path(name))["spec"]["traffic"]] == [f"{name}-1-0-0"]
    versions = {v.version: v for v in runtime.model(name).versions}
    assert versions["2.0.0-broken"].failed and not versions["1.0.0"].failed
    assert runtime.deploy(bump(v1, "2.0.0")).live   # a fixed version goes live
    runtime.remove(name)


def test_concurrent_deploys_lose_no_version(cluster, sa_token):
    """The control Deployment runs two replicas; the versions of a realtime model live in one
    annotation. A write computed from a stale read must not drop a version the other wrote."""
    first, second = make_runtime(cluster, sa_token), make_runtime(cluster, sa_token)
    v1 = bump(example("donor-propensity"), "1.0.0", name="race-model")
    first.deploy(v1)
    inner = second._patch
    raced = []

    def patch_after_a_rival(resource, name, patch, **kw):
        if not raced:  # `second` has read the Service; `first` writes before it does
            raced.append(first.deploy(bump(v1, "1.1.0")))
        return inner(resource, name, patch, **kw)

    second._patch = patch_after_a_rival
    assert second.deploy(bump(v1, "1.2.0")).live
    assert raced and raced[0].version == "1.1.0"
    # every version is a Revision of its own; the Service carries none of them
    assert [v.version for v in second.model("race-model").versions] == ["1.0.0", "1.1.0", "1.2.0"]
    assert cluster.admin.get(svc_path("race-model"))["spec"]["traffic"][0]["revisionName"] == "race-model-1-2-0"
    first.remove("race-model")


def test_knative_install_passes_server_side_dry_run(cluster):
    docs = list(kube.iter_knative_docs())
    kinds = {d["kind"] for _, d in docs}
    assert {"Namespace", "ServiceAccount", "Role", "RoleBinding", "Deployment", "Service", "Broker",
            "ConfigMap"} <= kinds
    for path, doc in docs:
        try:
            cluster.admin.apply(doc, dry_run=True)
        except kube.ApiError as e:
            pytest.fail(f"{path.name}: {doc['kind']} {doc['metadata']['name']}: {e}")
    control = next(d for _, d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "modelplane-control")
    container = control["spec"]["template"]["spec"]["containers"][0]
    assert {"name": "MODELPLANE_RUNTIME", "value": "knative"} in container["env"]
    assert control["spec"]["template"]["spec"]["serviceAccountName"] == SA
    bridge = next(d for _, d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "modelplane-bridge")
    args = bridge["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[:2] == ["watch", "--sink"] and args[2].endswith(f"/{NS}/default")
    autoscaler = next(d for _, d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "config-autoscaler")
    assert autoscaler["metadata"]["namespace"] == "knative-serving"
    assert autoscaler["data"]["enable-scale-to-zero"] == "true"


def test_named_tokens_live_in_a_secret_every_control_replica_reads(cluster, sa_token):
    """Two control replicas (two stores, as the control ServiceAccount): a token made on one is
    accepted by the other, concurrent changes lose nothing (the Secret is replaced at the
    resourceVersion read), a revocation reaches the other replica, and only hashes are stored.
    The account reads that one Secret and no other."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    from control.identity import Identity, SecretTokens

    def replica():
        return SecretTokens(client.CoreV1Api(cluster.api_client(sa_token)), CONTROL_NS, "bootstrap-secret", ttl=0.3)

    a, b = replica(), replica()
    token, record = a.create("alice", "deployer", "risk-team", by="admin")
    assert record["name"] == "alice" and "hash" not in record
    assert b.identify(token) == Identity("alice", "deployer", "risk-team")
    assert b.identify("bootstrap-secret") == Identity("admin", "admin")
    made: list[str] = []

    def create(store, prefix):
        for n in range(8):
            made.append(store.create(f"{prefix}-{n}", "viewer", None, by="admin")[0])

    threads = [threading.Thread(target=create, args=(s, p)) for s, p in ((a, "from-a"), (b, "from-b"))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wanted = {"alice"} | {f"from-{s}-{n}" for s in "ab" for n in range(8)}
    deadline = time.monotonic() + 5
    while {r["name"] for r in b.list()} != wanted:   # b's cache may still hold its own last write
        assert time.monotonic() < deadline, f"replica b lists {sorted(r['name'] for r in b.list())}"
        time.sleep(0.1)
    a.revoke("alice")
    deadline = time.monotonic() + 5
    while b.identify(token) is not None:
        assert time.monotonic() < deadline, "the other replica still accepts a revoked token"
        time.sleep(0.1)
    stored = cluster.admin.get(f"/api/v1/namespaces/{CONTROL_NS}/secrets/modelplane-tokens")
    text = base64.b64decode(stored["data"]["tokens.json"]).decode()
    assert not any(t in text for t in made) and len(json.loads(text)["tokens"]) == 16
    core = client.CoreV1Api(cluster.api_client(sa_token))
    with pytest.raises(ApiException) as refused:
        core.read_namespaced_secret("modelplane-token", CONTROL_NS)   # the bootstrap token: not this account's to read
    assert refused.value.status == 403
    STATE_USED.update({("get", "secrets"), ("update", "secrets")})


def test_the_audit_chain_is_shared_by_replicas_and_shows_edits(cluster, sa_token, gcs_client):
    """Two replicas record at once: one chain, no seq twice, no record lost (the head moves by
    compare-and-swap in its ConfigMap); an edited or deleted record in the bucket shows."""
    from kubernetes import client

    from control.audit import PREFIX, ClusterAudit

    bucket = gcs_client.bucket("test-bucket")

    def replica():
        return ClusterAudit(client.CoreV1Api(cluster.api_client(sa_token)), CONTROL_NS, bucket)

    a, b = replica(), replica()

    def record(store, who):
        for n in range(10):
            assert store.record(who=who, role="deployer", action="deploy", model=f"m{n}", version="1.0.0",
                                status=201, outcome="ok", request_id=f"{who}-{n}") is not None

    threads = [threading.Thread(target=record, args=(s, w)) for s, w in ((a, "alice"), (b, "bob"))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert a.verify() == {"ok": True, "records": 20, "last": 20, "problem": None}
    entries = b.entries(limit=100)
    assert [e["seq"] for e in entries] == list(range(20, 0, -1))
    assert len(b.entries(who="bob", limit=100)) == 10 and b.entries(model="m3", who="alice")[0]["version"] == "1.0.0"
    head = cluster.admin.get(f"/api/v1/namespaces/{CONTROL_NS}/configmaps/modelplane-audit")["data"]
    assert head["seq"] == "20" and head["hash"] == entries[0]["hash"]

    blob = bucket.blob(f"{PREFIX}{5:012d}.json")
    original = blob.download_as_bytes()
    edited = json.loads(original)
    edited["who"] = "mallory"
    blob.upload_from_string(json.dumps(edited))
    check = a.verify()
    assert not check["ok"] and check["records"] == 4 and "record 5 was changed" in check["problem"]
    blob.upload_from_string(original)
    bucket.blob(f"{PREFIX}{20:012d}.json").delete()
    check = a.verify()
    assert not check["ok"] and check["records"] == 19 and "missing" in check["problem"]
    STATE_USED.update({("get", "configmaps"), ("update", "configmaps")})


def test_the_control_account_cannot_reach_the_control_services_secrets(cluster, sa_token):
    """Least privilege, asked of the API server itself (SubjectAccessReview for the control
    ServiceAccount): no route to a Secret's content in either namespace — not by reading it, not
    through a Pod, exec or a token of another account, not by a Job in the control namespace. A
    Job it may create (in the models' namespace) can only mount Secrets of that namespace, which
    holds none of the control service's."""
    user = f"system:serviceaccount:{CONTROL_NS}:{SA}"

    def allowed(verb, resource, namespace, *, group="", subresource="", name=""):
        review = cluster.admin.request("POST", "/apis/authorization.k8s.io/v1/subjectaccessreviews", {
            "apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview",
            "spec": {"user": user, "groups": ["system:serviceaccounts", f"system:serviceaccounts:{CONTROL_NS}"],
                     "resourceAttributes": {"verb": verb, "resource": resource, "namespace": namespace,
                                            "group": group, "subresource": subresource, "name": name}}})
        return review["status"].get("allowed", False)

    refused = [
        *[(verb, "secrets", ns, "", "", name) for ns in (NS, CONTROL_NS) for verb in ("get", "list", "watch")
          for name in ("", "modelplane-token")],
        ("create", "pods", NS, "", "", ""), ("create", "pods", CONTROL_NS, "", "", ""),
        ("create", "pods", NS, "", "exec", "x"), ("get", "pods", NS, "", "exec", "x"),
        ("create", "serviceaccounts", NS, "", "token", "modelplane-job"),
        ("create", "serviceaccounts", CONTROL_NS, "", "token", SA),
        ("create", "jobs", CONTROL_NS, "batch", "", ""), ("create", "deployments", NS, "apps", "", ""),
        ("create", "cronjobs", NS, "batch", "", ""), ("patch", "roles", NS, "rbac.authorization.k8s.io", "", ""),
        ("create", "rolebindings", NS, "rbac.authorization.k8s.io", "", ""),
        ("update", "secrets", CONTROL_NS, "", "", "modelplane-token"),
    ]
    wrongly = [r for r in refused if allowed(r[0], r[1], r[2], group=r[3], subresource=r[4], name=r[5])]
    assert wrongly == []
    assert allowed("create", "jobs", NS, group="batch")   # the one way it runs code: a Job in the models' namespace
    assert allowed("get", "secrets", CONTROL_NS, name="modelplane-tokens")   # its own token hashes
    # ... where no Secret of the control service is, and a volume cannot name another namespace's
    for name in ("modelplane-token", "modelplane-tokens"):
        with pytest.raises(kube.ApiError) as missing:
            cluster.admin.get(f"/api/v1/namespaces/{NS}/secrets/{name}")
        assert missing.value.status == 404
    job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "steal"},
           "spec": {"template": {"spec": {"restartPolicy": "Never", "containers": [
               {"name": "c", "image": "registry.test/x"}],
               "volumes": [{"name": "s", "secret": {"secretName": "modelplane-token", "namespace": CONTROL_NS}}]}}}}
    with pytest.raises(kube.ApiError) as strict:
        cluster.admin.request("POST", f"/apis/batch/v1/namespaces/{NS}/jobs", job, query="fieldValidation=Strict&dryRun=All")
    assert strict.value.status == 400 and "namespace" in strict.value.body


# -- cancel, and jobs whose Job is gone ----------------------------------------------------------

def adapter_result(name, job_id, *, status, started, rows=None, error=None):
    """result.json as the batch adapter writes it (adapters/batch.py `Job`)."""
    doc = {"model": name, "version": "1.0.0", "job": job_id, "status": status,
           "input": {"uri": f"gs://test-bucket/incoming/{name}/{job_id}.csv", "generation": "1", "md5": "x"},
           "results_uri": f"gs://test-bucket/results/{name}/{job_id}/scores.csv" if status == "succeeded" else None,
           "rows": rows, "started_at": started, "finished_at": started}
    if status == "succeeded":
        doc["score_summary"] = {"count": rows}
    else:
        doc.update(error=error, log_tail="the model was stopped")
    return json.dumps(doc)


def test_cancel_deletes_the_job_and_jobs_whose_job_is_gone_stay_listed(cluster, runtime, gcs, gcs_client):
    admin = cluster.admin
    name = "cancel-me"
    manifest = bump(example("churn-risk"), "1.0.0", name=name)
    runtime.deploy(manifest)
    bucket = gcs_client.bucket("test-bucket")
    jobs_path = f"/apis/batch/v1/namespaces/{NS}/jobs"

    def submit(key):
        job, created = runtime.submit_job(name, dataset=f"gs://test-bucket/incoming/{name}/{key}.csv",
                                          event_key=f"test-bucket/{key}.csv#1")
        assert created
        return job

    running_job, finished, gone = submit("a"), submit("b"), submit("c")
    job_status(admin, running_job.id, {"active": 1, "startTime": "2024-01-01T00:00:00Z"})
    kjob = admin.get(f"{jobs_path}/{running_job.id}")

    # Cancelled as the control ServiceAccount: recorded in the bucket, the Job deleted.
    cancelled = runtime.cancel_job(running_job.id, by="alice")
    assert (cancelled.status, cancelled.error, cancelled.results_uri) == ("failed", "cancelled by alice", None)
    with pytest.raises(kube.ApiError):
        admin.get(f"{jobs_path}/{running_job.id}")
    # No garbage collector runs here: in a cluster it deletes the pod and the event Secret, whose
    # owner is the deleted Job.
    secret = admin.get(f"/api/v1/namespaces/{NS}/secrets/{running_job.id}")
    assert secret["metadata"]["ownerReferences"][0]["uid"] == kjob["metadata"]["uid"]
    marker = json.loads(bucket.blob(f"results/{name}/{running_job.id}/cancelled.json").download_as_bytes())
    assert marker["error"] == "cancelled by alice" and marker["status"] == "failed"
    got = runtime.job(running_job.id)
    assert (got.status, got.error, got.model, got.version, got.dataset, got.created_at, got.started_at) == (
        "failed", "cancelled by alice", name, "1.0.0", running_job.dataset, running_job.created_at,
        "2024-01-01T00:00:00Z")
    # The adapter, stopped, then writes its failed result: the job still reads cancelled, with its log.
    bucket.blob(f"results/{name}/{running_job.id}/result.json").upload_from_string(adapter_result(
        name, running_job.id, status="failed", started="2024-01-01T00:00:01.000Z",
        error="the job was stopped (SIGTERM) before it finished"))
    got = runtime.job(running_job.id)
    assert (got.status, got.error, got.log_tail) == ("failed", "cancelled by alice", "the model was stopped")
    # Again: the same job, nothing changes (and no second record).
    assert runtime.cancel_job(running_job.id, by="bob").error == "cancelled by alice"

    # A finished job: 409 naming its status, in the cluster or gone from it.
    job_status(admin, finished.id, {"active": 0, "succeeded": 1, "startTime": "2024-01-01T00:00:00Z",
                                    "completionTime": "2024-01-01T00:05:00Z",
                                    "conditions": [{"type": "SuccessCriteriaMet", "status": "True",
                                                    "lastTransitionTime": "2024-01-01T00:05:00Z"},
                                                   {"type": "Complete", "status": "True",
                                                    "lastTransitionTime": "2024-01-01T00:05:00Z"}]})
    with pytest.raises(Conflict, match="it is succeeded"):
        runtime.cancel_job(finished.id, by="alice")
    assert admin.get(f"{jobs_path}/{finished.id}")
    with pytest.raises(NotFound):
        runtime.cancel_job(f"{name}-no-such-job", by="alice")

    # A succeeded job whose Job's TTL passed: listed from its result.json, once.
    bucket.blob(f"results/{name}/{gone.id}/result.json").upload_from_string(adapter_result(
        name, gone.id, status="succeeded", started="2024-01-01T00:00:02.000Z", rows=3))
    bucket.blob(f"results/{name}/{finished.id}/result.json").upload_from_string(adapter_result(
        name, finished.id, status="succeeded", started="2024-01-01T00:00:01.500Z", rows=5))
    admin.request("DELETE", f"{jobs_path}/{gone.id}",
                  {"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Background"})
    old = runtime.job(gone.id)
    assert (old.status, old.rows, old.results_uri, old.version, old.score_summary) == (
        "succeeded", 3, f"gs://test-bucket/results/{name}/{gone.id}/scores.csv", "1.0.0", {"count": 3})
    assert old.dataset == f"gs://test-bucket/incoming/{name}/{gone.id}.csv" and old.error is None
    with pytest.raises(Conflict, match="it is succeeded"):
        runtime.cancel_job(gone.id, by="alice")

    listed = runtime.jobs(model=name)
    assert sorted((j.id, j.status) for j in listed) == sorted(
        [(running_job.id, "failed"), (finished.id, "succeeded"), (gone.id, "succeeded")])
    assert {j.id: j for j in listed}[running_job.id].cancelled
    assert [j.id for j in listed] == [j.id for j in sorted(listed, key=lambda j: (j.created_at, j.id), reverse=True)]
    assert {j.id for j in runtime.jobs()} >= {running_job.id, finished.id, gone.id}
    assert len(runtime.jobs(model=name, limit=1)) == 1

    runtime.remove(name)
    for job_id in (finished.id,):
        admin.request("DELETE", f"{jobs_path}/{job_id}",
                      {"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Background"})
    COMPLETED.add("cancel")


def test_two_control_replicas_agree_on_every_read_after_writes_to_either(cluster, sa_token, gcs, gcs_client,
                                                                          tmp_path):
    """(After the audit test, which counts the chain from its start.) Two control services (as knative/control.yaml runs them: the cluster runtime, the token
    Secret, the audit head, the bucket's state/), each written to in turn, read the same from
    the other: models, versions, the split, pins, tokens, the audit trail, comparisons."""
    import io
    import tarfile

    import requests

    from control_helpers import TOKEN, running, settings_for

    name = "replicated-" + secrets.token_hex(3)
    folder = tmp_path / "src" / name
    folder.parent.mkdir()
    import shutil as _shutil
    _shutil.copytree(ROOT / "models" / "donor-propensity", folder)
    text = (folder / "model.yaml").read_text().replace("name: donor-propensity", f"name: {name}", 1)
    (folder / "model.yaml").write_text(text)

    def tarball(version):
        (folder / "model.yaml").write_text(re.sub(r"^version: .*$", f"version: {version}", text, flags=re.M))
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz") as tar:
            tar.add(folder, arcname=name)
        return buf.getvalue()

    def plane(label):
        (tmp_path / label).mkdir()
        s = settings_for(tmp_path / label, runtime="knative", namespace=NS, control_namespace=CONTROL_NS,
                         registry="registry.test/models", adapter_image="registry.test/adapter:0.1.0",
                         broker="default", token=TOKEN, deploy_check_timeout=5)
        rt = make_runtime(cluster, sa_token)
        rt.start()   # as `serve` starts the runtime it builds (a runtime passed in is the caller's to start)
        runtimes.append(rt)
        return running(s, runtime=rt)

    runtimes: list = []

    auth = {"Authorization": f"Bearer {TOKEN}"}

    def call(server, method, path, **kw):
        return requests.request(method, server.url + path, headers={**auth, **kw.pop("headers", {})}, timeout=60, **kw)

    def same(path, a, b, key=lambda d: d, timeout=10):
        """`path` answers the same on both (after the other's watch has caught up)."""
        deadline = time.monotonic() + timeout
        while True:
            ra, rb = call(a, "GET", path), call(b, "GET", path)
            if ra.status_code == rb.status_code == 200 and key(ra.json()) == key(rb.json()):
                return ra.json()
            assert time.monotonic() < deadline, (path, ra.status_code, ra.text[:500], rb.status_code, rb.text[:500])
            time.sleep(0.1)

    with plane("a") as a, plane("b") as b:
        for server in (a, b):
            wait = time.monotonic() + 30
            while requests.get(server.url + "/readyz", timeout=5).status_code != 200:
                assert time.monotonic() < wait
                time.sleep(0.1)
        r = call(a, "POST", "/api/models", data=tarball("1.0.0"), headers={"Content-Type": "application/gzip"})
        assert r.status_code == 201, r.text
        r = call(b, "POST", "/api/models?live=false", data=tarball("1.1.0"), headers={"Content-Type": "application/gzip"})
        assert r.status_code == 201, r.text
        listed = same("/api/models", a, b, key=lambda rows: [m for m in rows if m["name"] == name])
        assert [(m["version"], m["owner"]) for m in listed if m["name"] == name] == [("1.0.0", "fundraising-analytics")]
        detail = same(f"/api/models/{name}", a, b, key=lambda d: (d["version"], [v["version"] for v in d["versions"]]))
        assert [v["version"] for v in detail["versions"]] == ["1.0.0", "1.1.0"]
        assert call(a, "POST", f"/api/models/{name}/rollout", json={"version": "1.1.0", "percent": 20}).status_code == 200
        assert call(b, "POST", f"/api/models/{name}/pins", json={"version": "1.1.0"}).status_code == 200
        traffic = same(f"/api/models/{name}/traffic", a, b)
        assert (traffic["live"], traffic["candidate"], traffic["percent"]) == ("1.0.0", "1.1.0", 20)
        made = call(b, "POST", "/api/tokens", json={"name": "carol-" + secrets.token_hex(2), "role": "viewer"})
        assert made.status_code == 201, made.text
        wait = time.monotonic() + 10
        while requests.get(a.url + "/api/whoami", headers={"Authorization": f"Bearer {made.json()['token']}"},
                           timeout=10).status_code != 200:
            assert time.monotonic() < wait, "a token made on b is not accepted by a"
            time.sleep(0.1)
        assert call(a, "DELETE", f"/api/tokens/{made.json()['name']}").status_code in (200, 204)
        trail = same(f"/api/audit?model={name}", a, b)
        assert {e["action"] for e in trail} >= {"deploy", "rollout", "pin"}
        gcs_client.bucket("test-bucket").blob(f"comparisons/{name}/rows.csv").upload_from_string(
            (ROOT / "models" / "donor-propensity" / "sample.csv").read_bytes())
        started = call(a, "POST", f"/api/models/{name}/comparisons",
                       json={"a": "1.0.0", "b": "1.1.0", "dataset": f"gs://test-bucket/comparisons/{name}/rows.csv"})
        assert started.status_code == 202, started.text
        cid = started.json()["id"]
        seen = same(f"/api/comparisons/{cid}", a, b, key=lambda d: (d["id"], d["status"], d.get("error")), timeout=60)
        assert seen["model"] == name
        assert [c["id"] for c in same(f"/api/models/{name}/comparisons", a, b)] == [cid]
        assert call(a, "DELETE", f"/api/models/{name}", params={"yes": "1"}).status_code in (200, 204)
        wait = time.monotonic() + 10
        while call(b, "GET", f"/api/models/{name}").status_code != 404:
            assert time.monotonic() < wait
            time.sleep(0.1)
    for rt in runtimes:
        rt.close()


def test_role_is_exactly_what_the_runtime_uses():
    """Run last: every (verb, resource) the tests above made the runtime use is granted (they
    passed as the ServiceAccount), and the Role grants nothing they did not use."""
    if COMPLETED != {"realtime", "batch", "cancel"}:
        pytest.skip("needs the lifecycle and cancel tests to have run in this session")
    roles = {d["metadata"]["namespace"]: d for _, d in kube.iter_knative_docs() if d["kind"] == "Role"}
    assert set(roles) == {NS, CONTROL_NS}

    def granted(role):
        return {(verb, resource) for rule in role["rules"] for resource in rule["resources"] for verb in rule["verbs"]}

    assert granted(roles[NS]) == USED
    assert granted(roles[CONTROL_NS]) == STATE_USED


# -- offline checks -------------------------------------------------------------------------

def test_render_needs_no_kubernetes_client():
    code = ("import sys; from control.runtime import knative_objects as k; "
            "from adapters.manifest import load_manifest; from control.settings import Settings; "
            "print(k.render_yaml(load_manifest('models/donor-propensity'), Settings())); "
            "assert 'kubernetes' not in sys.modules, 'kubernetes imported'")
    if not (ROOT / "models" / "donor-propensity").is_dir():
        pytest.skip("example model missing")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    docs = list(yaml.safe_load_all(out.stdout))
    assert docs[0]["kind"] == "Service" and "&id" not in out.stdout


def test_a_realtime_model_renders_a_stream_jobsink_and_its_own_trigger():
    """A realtime model's dataset runs as a Job of one container, the adapter's `stream` command
    against the model's Service inside the cluster; Knative's dispatcher gives it the event as it
    gives a batch Job (cmd/jobsink/main.go: the Secret volume and K_EVENT_PATH in main containers)."""
    from control.runtime import knative_objects as ko

    m = example("donor-propensity")
    sink, trig = ko.stream_objects(m, settings())
    assert sink["kind"] == "JobSink" and sink["metadata"]["name"] == "donor-propensity-1-0-0"
    job = sink["spec"]["job"]["spec"]
    assert job["backoffLimit"] == 0 and job["activeDeadlineSeconds"] == ko.STREAM_DEADLINE_SECONDS
    pod = job["template"]["spec"]
    [adapter] = pod["containers"]   # no model container: the model's replicas score the rows
    assert (adapter["name"], adapter["image"]) == ("adapter", "registry.test/adapter:0.1.0")
    assert adapter["args"] == ["stream", "--url", f"http://donor-propensity.{NS}.svc.cluster.local/predict",
                               "--work", "/work"]
    env = {e["name"]: e.get("value") for e in adapter["env"]}
    assert json.loads(env["MODELPLANE_MANIFEST"])["kind"] == "realtime"
    assert env["RESULTS_URI"] == "gs://test-bucket/results/donor-propensity/$(JOB_ID)/"
    assert pod["serviceAccountName"] == "modelplane-job" and pod["securityContext"]["runAsNonRoot"]
    assert (trig["kind"], trig["metadata"]["name"]) == ("Trigger", "donor-propensity-stream")
    assert trig["metadata"]["labels"]["modelplane.dev/kind"] == "realtime"
    assert {"prefix": {"subject": "objects/incoming/donor-propensity/"}} in trig["spec"]["filters"]
    assert trig["spec"]["subscriber"]["ref"]["name"] == sink["metadata"]["name"]
    made = ko.job_for_event(sink, name="donor-propensity-1-0-0-abc", event_id="e1", source="s",
                            dataset="gs://test-bucket/incoming/donor-propensity/a.csv", event_key=None,
                            trigger_label="event")
    [c] = made["spec"]["template"]["spec"]["containers"]
    assert {"name": "K_EVENT_PATH", "value": "/etc/jobsink-event"} in c["env"]
    docs = list(yaml.safe_load_all(ko.render_yaml(m, settings())))
    assert [d["kind"] for d in docs] == ["Service", "JobSink", "Trigger"]


@pytest.mark.skipif(BINARY is None, reason="no kube-apiserver binary (scripts/cluster-build.sh)")
def test_a_realtime_models_stream_jobsink_is_deployed_run_and_removed(cluster, runtime):
    def _trigger_sink(trig: dict) -> str:
        return trig["spec"]["subscriber"]["ref"]["name"]

    admin = cluster.admin
    m = bump(example("donor-propensity"), "1.0.0", name="stream-rt")
    assert runtime.deploy(m).live
    sink = admin.get(jobsink_path("stream-rt-1-0-0"))
    assert sink["spec"]["job"]["spec"]["template"]["spec"]["containers"][0]["args"][0] == "stream"
    trig = admin.get(trigger_path("stream-rt-stream"))
    assert trig["spec"]["subscriber"]["ref"]["name"] == "stream-rt-1-0-0"
    assert [(r.name, r.kind) for r in runtime.models() if r.name.startswith("stream-rt")] == [("stream-rt", "realtime")]
    # the Trigger follows the live version: a new one, a rollback, a promoted rollout
    assert runtime.deploy(bump(example("donor-propensity"), "1.1.0", name="stream-rt")).live
    assert _trigger_sink(admin.get(trigger_path("stream-rt-stream"))) == "stream-rt-1-1-0"
    runtime.rollback("stream-rt")
    assert _trigger_sink(admin.get(trigger_path("stream-rt-stream"))) == "stream-rt-1-0-0"
    runtime.rollout("stream-rt", version="1.1.0", percent=10)
    assert _trigger_sink(admin.get(trigger_path("stream-rt-stream"))) == "stream-rt-1-0-0"
    runtime.promote("stream-rt")
    assert _trigger_sink(admin.get(trigger_path("stream-rt-stream"))) == "stream-rt-1-1-0"
    runtime.rollback("stream-rt", version="1.0.0")
    assert _trigger_sink(admin.get(trigger_path("stream-rt-stream"))) == "stream-rt-1-0-0"
    job, created = runtime.submit_job("stream-rt", dataset="gs://test-bucket/incoming/stream-rt/a.csv")
    assert created and job.model == "stream-rt"
    kjob = admin.get(f"/apis/batch/v1/namespaces/{NS}/jobs/{job.id}")
    assert [c["args"][0] for c in kjob["spec"]["template"]["spec"]["containers"]] == ["stream"]
    assert job.id in [j.id for j in runtime.jobs(model="stream-rt")]
    admin.request("DELETE", f"/apis/batch/v1/namespaces/{NS}/jobs/{job.id}",
                  {"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Background"})
    runtime.remove("stream-rt")
    with pytest.raises(kube.ApiError):
        admin.get(trigger_path("stream-rt-stream"))


def test_names_labels_and_tags_from_any_version():
    from control.runtime import knative_objects as ko

    m = bump(example("churn-risk"), "2.0.0-rc.1+build.7")
    sink, trig = ko.render_objects(m, settings())
    assert sink["metadata"]["name"] == "churn-risk-2-0-0-rc-1-build-7"
    assert sink["metadata"]["labels"]["modelplane.dev/version"] == "2.0.0-rc.1_build.7"  # labels forbid '+'
    assert sink["spec"]["job"]["metadata"]["annotations"]["modelplane.dev/version"] == "2.0.0-rc.1+build.7"
    model = sink["spec"]["job"]["spec"]["template"]["spec"]["containers"][1]
    assert model["image"] == "registry.test/models/churn-risk:2.0.0-rc.1_build.7"
    assert trig["spec"]["subscriber"]["ref"]["name"] == sink["metadata"]["name"]


def test_job_names_are_the_ones_knatives_dispatcher_gives():
    """kmeta.ChildName(sink + "-", md5hex(source + id)) (knative/eventing cmd/jobsink/main.go, Eventing
    >= 1.17): the concatenation while it fits 63 characters, else the parent's first 31 characters and
    the md5 of the whole. A repeated event must find the Job the dispatcher made."""
    from control.runtime import knative_objects as ko

    source = "//storage.googleapis.com/projects/_/buckets/b"
    digest = hashlib.md5((source + "1").encode()).hexdigest()
    assert ko.job_name("churn-risk-1-0-0", source, "1") == f"churn-risk-1-0-0-{digest}"
    assert ko.job_name("x" * 30, source, "1") == "x" * 30 + "-" + digest  # 63: still fits
    long = "churn-risk-2-0-0-rc-1-build-7"  # 29 + "-" + 32 = 62
    assert ko.job_name(long, source, "1") == f"{long}-{digest}"
    longer = "member-retention-10-20-30-rc-1"  # 30 characters: 31 with the dash, 63 in all
    assert ko.job_name(longer, source, "1") == f"{longer}-{digest}"
    longest = "member-retention-10-20-30-rc-12"  # 31: over 63, so hashed
    expected = f"{longest}-"[:31] + hashlib.md5(f"{longest}-{digest}".encode()).hexdigest()
    assert ko.job_name(longest, source, "1") == expected and len(expected) == 63


def _dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_container_builds_are_consistent():
    """No Docker engine here: check statically what a build would trip on."""
    pyproject = __import__("tomllib").loads((ROOT / "pyproject.toml").read_text())
    scripts = pyproject["project"]["scripts"]
    contexts = {"adapter": ROOT, "control": ROOT, "python-base": ROOT / "knative/images/python-base",
                "r-base": ROOT / "knative/images/r-base", "model": ROOT / "models" / "donor-propensity"}
    for name, context in contexts.items():
        dockerfile = ROOT / "knative" / "images" / name / "Dockerfile"
        assert dockerfile.is_file(), dockerfile
        steps = _dockerfile_instructions(dockerfile)
        assert steps and steps[0][0] in ("FROM", "ARG")
        for word, rest in steps:
            if word == "COPY":
                parts = [p for p in rest.split() if not p.startswith("--")]
                for src in parts[:-1]:
                    assert (context / src).exists(), f"{dockerfile}: COPY source {src} missing in {context}"
            if word == "ENTRYPOINT":
                [program] = json.loads(rest)[:1]
                assert program in scripts, f"{dockerfile}: {program} is not a console script in pyproject"
                module, func = scripts[program].split(":")
                source = ROOT / (module.replace(".", "/") + ".py")
                assert source.is_file(), f"{program} -> {module}: {source} missing"
                tree = ast.parse(source.read_text())
                assert any(isinstance(n, ast.FunctionDef) and n.name == func for n in tree.body), \
                    f"{program} -> {scripts[program]}: no function {func}"
    r_base = (ROOT / "knative/images/r-base/Dockerfile").read_text()
    assert all(p in r_base for p in ("r-base-core", "r-cran-plumber", "r-cran-jsonlite"))


def test_models_pipeline_validates_prs_and_deploys_main():
    wf = yaml.safe_load((ROOT / ".github/workflows/models.yml").read_text())
    triggers = wf.get(True) or wf.get("on")  # YAML 1.1 reads `on` as True
    assert "pull_request" in triggers and triggers["push"]["branches"] == ["main"]
    runs = {name: "\n".join(s.get("run", "") for s in job["steps"]) for name, job in wf["jobs"].items()}
    assert "modelplane validate" in runs["validate"]
    assert "modelplane deploy" in runs["deploy"]
    assert wf["jobs"]["deploy"]["if"].startswith("github.event_name == 'push'")
    assert '$REGISTRY/${{ matrix.model }}:${{ steps.meta.outputs.tag }}' in runs["deploy"]
