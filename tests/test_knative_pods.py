"""The cluster path on real Pods: the project's images, built from its Dockerfiles, run by a
real kubelet on containerd (tests/node.py), from the objects the cluster runtime renders.

Knative's controllers cannot run here (their source is in no registry these machines reach).
Each test reproduces what their source shows they do with our objects, and nothing more:
- a realtime revision: Knative Serving's revision reconciler turns the Service's template into
  a Deployment (knative/serving pkg/reconciler/revision/resources/deploy.go `MakeDeployment`,
  `makeServingContainer`, `makeContainer`; env_var.go `getKnativeEnvVar`; meta.go `makeLabels`).
  It adds a queue-proxy container, which runs the serving container's HTTP readiness probe
  against 127.0.0.1 and proxies requests to it; there is no queue-proxy here, so the kubelet
  runs that probe against the pod IP and the test sends requests to the adapter's port.
- a batch job: Knative Eventing's JobSink dispatcher (knative/eventing cmd/jobsink/main.go
  `ServeHTTP`, `toJobName`; pkg/apis/sinks/v1alpha1/job_sink_defaults.go) creates a Job from
  the JobSink's template and a Secret holding the event.
- the control service: knative/control.yaml's Deployment as written, except what only a cluster
  network gives (kube-proxy routing the `kubernetes` Service: the test points the in-cluster
  config at the API server's forwarder on the pod bridge) and the images' names.
"""
from __future__ import annotations

import base64
import copy
import csv
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

import images
import kube
import node as node_mod
from adapters.manifest import load_manifest
from conftest import MODELS, ROOT, requires_r
from control.emulator import free_port, wait_for_port
from control.runtime import knative_objects as ko
from control.settings import Settings

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

NS = "modelplane"
REQUIRED = os.environ.get("MODELPLANE_REQUIRE_NODE") == "1"  # .ci/run: these tests must run, not skip
POD_TIMEOUT = 180.0


def unavailable(reason: str):
    if REQUIRED:
        pytest.fail(f"{reason} (MODELPLANE_REQUIRE_NODE=1: the real-Pod tests must run here)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def built():
    if not images.have_podman():
        unavailable("podman is not installed (apt-get install podman runc)")
    return images.build_images()


@pytest.fixture(scope="module")
def cluster(built, gcs):
    missing = node_mod.missing_parts()
    if missing:
        unavailable("cannot run a Kubernetes node here: missing " + ", ".join(missing))
    n = node_mod.Node().start()
    ok = False
    try:
        n.cluster.install_crds(kube.crds_dir())
        for entry in built.values():
            n.import_archive(Path(entry["archive"]))
        n.namespace(NS)
        for path, doc in kube.iter_knative_docs():
            if path.name == "rbac.yaml":
                n.admin.apply(doc)
        n.gcs = n.forward(gcs.port)  # the emulator, as pods reach it
        yield n
        ok = True
    finally:
        n.stop(logs_to=ROOT / "artifacts" / "node" if not ok else None)


def settings_for(cluster, built, **overrides) -> Settings:
    registry = built["adapter"]["ref"].rsplit("/", 1)[0]
    values = dict(runtime="knative", namespace=NS, bucket="test-bucket", registry=registry,
                  adapter_image=built["adapter"]["ref"],
                  storage_emulator_host=f"http://{cluster.gcs[0]}:{cluster.gcs[1]}")
    values.update(overrides)
    return Settings(**values)


def runtime_for(cluster, settings: Settings):
    """The cluster runtime as the control service's ServiceAccount (knative/rbac.yaml)."""
    from control.runtime.knative import KnativeRuntime

    token = cluster.cluster.service_account_token(NS, "modelplane-control")
    return KnativeRuntime(settings, api_client=cluster.cluster.api_client(token))


def pod_of(cluster, selector: str) -> dict:
    pods = cluster.admin.request("GET", f"/api/v1/namespaces/{NS}/pods", query=f"labelSelector={selector}")["items"]
    assert len(pods) == 1, [p["metadata"]["name"] for p in pods]
    return pods[0]


def wait_available(cluster, name: str, selector: str) -> dict:
    path = f"/apis/apps/v1/namespaces/{NS}/deployments/{name}"
    try:
        cluster.wait(lambda: (cluster.admin.get(path).get("status") or {}).get("availableReplicas") == 1,
                     POD_TIMEOUT, f"Deployment {name} available")
    except TimeoutError as e:
        raise AssertionError(f"{e}\n{cluster.diagnose(NS, selector)}") from None
    return pod_of(cluster, selector)


def http(method: str, url: str, body: bytes | None = None, headers: dict | None = None,
         timeout: float = 30) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


# -- the local runtime's answers, to compare with -------------------------------------------

def local_realtime_scores(name: str) -> list[float]:
    """The sample scored by the adapter and model as local processes (what the local runtime runs)."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "adapters", "serve", str(MODELS / name), "--port", str(port)],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for_port("127.0.0.1", port, timeout=30, proc=proc)
        status, body = 0, b""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            status, body = http("POST", f"http://127.0.0.1:{port}/predict",
                                (MODELS / name / "sample.csv").read_bytes(), {"Content-Type": "text/csv"})
            if status != 503:  # 503 until the model behind it is ready
                break
            time.sleep(0.2)
        assert status == 200, body
        return json.loads(body)["scores"]
    finally:
        proc.terminate()
        proc.wait(10)


def local_batch_scores(name: str, dataset: Path, tmp_path: Path) -> list[float]:
    proc = subprocess.run([sys.executable, "-m", "adapters", "batch", str(MODELS / name), "--dataset", str(dataset),
                           "--results", str(tmp_path / "local-results"), "--job", "local"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return read_scores((tmp_path / "local-results" / "scores.csv").read_text())


def read_scores(text: str) -> list[float]:
    return [float(r[0]) for r in list(csv.reader(io.StringIO(text)))[1:]]


# -- realtime: the revision's pod -----------------------------------------------------------

def revision_deployment(svc: dict) -> dict:
    """The Deployment Knative Serving's revision reconciler makes from the Service's current
    template (deploy.go `MakeDeployment`), without the queue-proxy container (see the module doc)."""
    template = copy.deepcopy(svc["spec"]["template"])
    service = svc["metadata"]["name"]
    revision = template["metadata"]["name"]
    spec = template["spec"]
    timeout = spec.pop("timeoutSeconds")
    spec.pop("containerConcurrency", None)
    # Revision labels (configuration/resources/revision.go) and the Deployment's (meta.go makeLabels).
    labels = {**template["metadata"].get("labels", {}), "serving.knative.dev/service": service,
              "serving.knative.dev/configuration": service, "serving.knative.dev/revision": revision,
              "app": revision}
    knative_env = [{"name": "K_REVISION", "value": revision}, {"name": "K_CONFIGURATION", "value": service},
                   {"name": "K_SERVICE", "value": service}]
    for c in spec["containers"]:
        if c.get("ports"):  # makeServingContainer: the one port, renamed, and PORT
            port = c["ports"][0]["containerPort"]
            c["ports"] = [{"name": "user-port", "containerPort": port}]
            c["env"] = c.get("env", []) + [{"name": "PORT", "value": str(port)}]
            probe = c["readinessProbe"]["httpGet"]  # queue-proxy's probe, run by the kubelet here
            probe["port"] = port
        c["env"] = c.get("env", []) + knative_env  # makeContainer
        c["stdin"] = c["tty"] = False
        c.setdefault("terminationMessagePolicy", "FallbackToLogsOnError")
    spec["terminationGracePeriodSeconds"] = timeout  # BuildPodSpec
    spec["enableServiceLinks"] = False  # config-defaults enable-service-links: "false"
    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": f"{revision}-deployment", "namespace": NS, "labels": labels},
        "spec": {"replicas": 1, "selector": {"matchLabels": {"serving.knative.dev/revision": revision}},
                 "progressDeadlineSeconds": 600, "revisionHistoryLimit": 0,
                 "template": {"metadata": {"labels": labels}, "spec": spec}},
    }


@pytest.mark.parametrize("model", ["donor-propensity", pytest.param("major-gift", marks=requires_r)])
def test_realtime_revision_runs_as_a_pod_and_scores_like_the_local_runtime(cluster, built, model):
    settings = settings_for(cluster, built)
    rt = runtime_for(cluster, settings)
    try:
        rt.deploy(load_manifest(MODELS / model))
    finally:
        rt.close()
    svc = cluster.admin.get(f"/apis/serving.knative.dev/v1/namespaces/{NS}/services/{model}")
    dep = revision_deployment(svc)
    revision = svc["spec"]["template"]["metadata"]["name"]
    cluster.admin.request("POST", f"/apis/apps/v1/namespaces/{NS}/deployments", dep)
    pod = wait_available(cluster, dep["metadata"]["name"], f"serving.knative.dev/revision={revision}")

    statuses = {c["name"]: c for c in pod["status"]["containerStatuses"]}
    assert set(statuses) == {"adapter", "model"} and all(c["ready"] for c in statuses.values())
    status, body = http("POST", f"http://{pod['status']['podIP']}:8080/predict",
                        (MODELS / model / "sample.csv").read_bytes(), {"Content-Type": "text/csv"})
    assert status == 200, body
    answer = json.loads(body)
    assert (answer["model"], answer["version"]) == (model, load_manifest(MODELS / model).version)
    assert answer["scores"] == pytest.approx(local_realtime_scores(model), rel=1e-9)
    # The adapter's contract checks run in the pod too: a bad row is a 422 naming the field.
    status, body = http("POST", f"http://{pod['status']['podIP']}:8080/predict",
                        json.dumps({"rows": [{"nonsense": 1}]}).encode(), {"Content-Type": "application/json"})
    assert status == 422, body
    cluster.admin.request("DELETE", f"/apis/apps/v1/namespaces/{NS}/deployments/{dep['metadata']['name']}")


# -- batch: a Job as the JobSink dispatcher creates it ---------------------------------------

def finalized_event(bucket: str, name: str, generation: str, event_id: str) -> dict:
    """Google's sample `…object.v1.finalized` CloudEvent (shared/knative/events), for our object."""
    event = json.loads((kube.events_dir() / "gcs-finalized-structured.json").read_text())
    event.update(id=event_id, source=f"//storage.googleapis.com/projects/_/buckets/{bucket}",
                 subject=f"objects/{name}", bucket=bucket)
    event["data"].update(bucket=bucket, name=name, generation=generation, id=f"{bucket}/{name}/{generation}",
                         contentType="text/csv")
    return event


def dispatch(cluster, sink_name: str, event: dict) -> str:
    """What Knative Eventing's JobSink dispatcher does with a delivered event (cmd/jobsink/main.go
    `ServeHTTP`): the JobSink's defaults, then a Job from its template named
    `kmeta.ChildName(sink + "-", md5hex(source + id))`, labelled and owned, with the event Secret
    mounted in the main containers; then that Secret. When a Job with that name's label exists
    already, nothing (ServeHTTP lists by `jobLabelSelector` first). Returns the Job's name."""
    js = cluster.admin.get(f"/apis/sinks.knative.dev/v1alpha1/namespaces/{NS}/jobsinks/{sink_name}")
    digest = hashlib.md5((event["source"] + event["id"]).encode()).hexdigest()
    name = f"{sink_name}-{digest}"  # kmeta.ChildName is this concatenation while it fits 63 characters
    # A Job for this event already (the control service made it when the dataset was uploaded):
    # the dispatcher answers 202 and creates nothing.
    existing = cluster.admin.get(f"/apis/batch/v1/namespaces/{NS}/jobs?labelSelector="
                                 f"sinks.knative.dev/job-sink-id%3D{name},sinks.knative.dev/job-sink-name%3D{sink_name}")
    if existing["items"]:
        return existing["items"][0]["metadata"]["name"]
    job = copy.deepcopy(js["spec"]["job"])
    pod = job["spec"]["template"]["spec"]
    for c in pod.get("containers", []) + pod.get("initContainers", []):  # job_sink_defaults.go SetDefaults
        if not any(e["name"] == "K_EXECUTION_MODE" for e in c.get("env", [])):
            c.setdefault("env", []).append({"name": "K_EXECUTION_MODE", "value": "batch"})
    assert len(name) <= 63
    job["metadata"]["name"] = name
    job["metadata"].setdefault("labels", {}).update({"sinks.knative.dev/job-sink-id": name,
                                                     "sinks.knative.dev/job-sink-name": sink_name})
    job["metadata"]["ownerReferences"] = [{"apiVersion": "sinks.knative.dev/v1alpha1", "kind": "JobSink",
                                           "name": sink_name, "uid": js["metadata"]["uid"], "controller": True,
                                           "blockOwnerDeletion": False}]
    for c in pod["containers"]:  # main containers only
        c.setdefault("volumeMounts", []).append({"name": "jobsink-event", "readOnly": True,
                                                 "mountPath": "/etc/jobsink-event"})
        c.setdefault("env", []).append({"name": "K_EVENT_PATH", "value": "/etc/jobsink-event"})
    pod.setdefault("volumes", []).append({"name": "jobsink-event", "secret": {"secretName": name}})
    created = cluster.admin.request("POST", f"/apis/batch/v1/namespaces/{NS}/jobs", job)
    cluster.admin.request("POST", f"/api/v1/namespaces/{NS}/secrets", {
        "apiVersion": "v1", "kind": "Secret", "type": "Opaque", "immutable": True,
        "metadata": {"name": name, "labels": {"sinks.knative.dev/job-sink-id": name,
                                              "sinks.knative.dev/job-sink-name": sink_name},
                     "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": name,
                                          "uid": created["metadata"]["uid"], "controller": True,
                                          "blockOwnerDeletion": False}]},
        "data": {"event": base64.b64encode(json.dumps(event).encode()).decode()}})
    return name


def wait_job(cluster, name: str) -> dict:
    path = f"/apis/batch/v1/namespaces/{NS}/jobs/{name}"

    def finished():
        conds = {c["type"]: c["status"] for c in (cluster.admin.get(path).get("status") or {}).get("conditions", [])}
        return "True" in (conds.get("Complete"), conds.get("Failed"))

    try:
        cluster.wait(finished, POD_TIMEOUT, f"Job {name} finished")
    except TimeoutError as e:
        raise AssertionError(f"{e}\n{cluster.diagnose(NS, f'job-name={name}')}") from None
    return cluster.admin.get(path)


@pytest.mark.parametrize("model", ["churn-risk", pytest.param("member-retention", marks=requires_r)])
def test_batch_job_from_a_bucket_event_scores_and_publishes(cluster, built, gcs_client, tmp_path, model):
    settings = settings_for(cluster, built)
    rt = runtime_for(cluster, settings)
    manifest = load_manifest(MODELS / model)
    rt.deploy(manifest)
    sink_name = ko.object_name(manifest)
    bucket = gcs_client.bucket("test-bucket")
    sample = (MODELS / model / "sample.csv").read_bytes()

    # A good dataset: scores and result.json in the bucket, the same scores as the local runtime.
    blob = bucket.blob(f"incoming/{model}/march.csv")
    blob.upload_from_string(sample, content_type="text/csv")
    event = finalized_event("test-bucket", blob.name, str(blob.generation), f"{model}-good")
    job_name = dispatch(cluster, sink_name, event)
    # The runtime's own copy of the dispatcher (API-submitted jobs) makes the same Job.
    js = cluster.admin.get(f"/apis/sinks.knative.dev/v1alpha1/namespaces/{NS}/jobsinks/{sink_name}")
    assert ko.job_name(sink_name, event["source"], event["id"]) == job_name
    mirrored = ko.job_for_event(js, name=job_name, event_id=event["id"], source=event["source"],
                                dataset=f"gs://test-bucket/{blob.name}", event_key=None, trigger_label="bucket")
    created = cluster.admin.get(f"/apis/batch/v1/namespaces/{NS}/jobs/{job_name}")
    assert _containers(mirrored) == _containers(created)
    assert [(v["name"], v.get("secret", {}).get("secretName")) for v in mirrored["spec"]["template"]["spec"]["volumes"]] \
        == [(v["name"], v.get("secret", {}).get("secretName")) for v in created["spec"]["template"]["spec"]["volumes"]]

    job = wait_job(cluster, job_name)
    assert job["status"].get("succeeded") == 1, cluster.diagnose(NS, f"job-name={job_name}")
    prefix = f"results/{model}/{job_name}"
    scores = read_scores(bucket.blob(f"{prefix}/scores.csv").download_as_text())
    local = tmp_path / "sample.csv"
    local.write_bytes(sample)
    assert scores == pytest.approx(local_batch_scores(model, local, tmp_path), rel=1e-9)
    result = json.loads(bucket.blob(f"{prefix}/result.json").download_as_text())
    assert (result["status"], result["rows"], result["job"]) == ("succeeded", len(scores), job_name)
    assert result["input"] == {"uri": f"gs://test-bucket/{blob.name}", "generation": str(blob.generation),
                               "md5": hashlib.md5(sample).hexdigest()}
    assert result["results_uri"] == f"gs://test-bucket/{prefix}/scores.csv"
    # The control service reads the same from the cluster: Job status, and the result line from the log.
    seen = rt.job(job_name)
    assert (seen.status, seen.rows, seen.results_uri) == ("succeeded", len(scores), result["results_uri"])

    # A dataset with a value the features refuse: the adapter's fetch step names row and field,
    # the model container is told not to run; a failed Job, a failed result.json, no scores.csv.
    rows = list(csv.reader(io.StringIO(sample.decode())))
    column = {"churn-risk": "plan", "member-retention": "tier"}[model]
    rows[3][rows[0].index(column)] = "gold"
    bad = bucket.blob(f"incoming/{model}/bad.csv")
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows(rows)
    bad.upload_from_string(out.getvalue(), content_type="text/csv")
    bad_name = dispatch(cluster, sink_name, finalized_event("test-bucket", bad.name, str(bad.generation),
                                                            f"{model}-bad"))
    job = wait_job(cluster, bad_name)
    assert job["status"].get("failed") == 1 and not job["status"].get("succeeded")
    prefix = f"results/{model}/{bad_name}"
    assert not bucket.blob(f"{prefix}/scores.csv").exists()
    result = json.loads(bucket.blob(f"{prefix}/result.json").download_as_text())
    assert result["status"] == "failed" and result["invalid_values"] == 1
    assert result["problems"] == [{"row": 3, "field": column, "error": result["problems"][0]["error"]}]
    assert "'gold' is not allowed" in result["problems"][0]["error"] and f"row 3, {column}" in result["error"]
    seen = rt.job(bad_name)
    assert seen.status == "failed" and seen.problems == result["problems"] and seen.invalid_values == 1
    rt.remove(model)
    rt.close()


def _containers(job: dict) -> list[dict]:
    """A Job's containers without what the API server defaults (pull policy, termination paths, …)."""
    def env(c):
        out = copy.deepcopy(c.get("env", []))
        for e in out:
            ((e.get("valueFrom") or {}).get("fieldRef") or {}).pop("apiVersion", None)  # defaulted "v1"
        return out

    return [{"name": c["name"], "image": c["image"], "args": c.get("args"), "command": c.get("command"),
             "env": env(c),
             "mounts": [(m["name"], m["mountPath"], bool(m.get("readOnly"))) for m in c.get("volumeMounts", [])]}
            for c in job["spec"]["template"]["spec"]["containers"]]


# -- the control service as a real Pod ------------------------------------------------------

def model_tarball(folder: Path) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(folder, arcname=folder.name)
    return buf.getvalue()


def test_control_service_runs_from_knative_yaml_and_deploys_through_its_api(cluster, built):
    settings = settings_for(cluster, built)
    docs = [d for path, d in kube.iter_knative_docs() if path.name == "control.yaml"]
    token = "t-" + hashlib.sha256(os.urandom(16)).hexdigest()[:24]
    registry = built["adapter"]["ref"].rsplit("/", 1)[0]
    cluster.admin.apply({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "modelplane-token", "namespace": NS},
                         "stringData": {"token": token}})
    api_host, api_port = cluster.api_on_bridge
    for doc in docs:
        doc = copy.deepcopy(doc)
        if doc["kind"] == "ConfigMap" and doc["metadata"]["name"] == "modelplane":
            doc["data"].update(bucket="test-bucket", registry=registry)
        if doc["kind"] == "Deployment":
            doc["spec"]["replicas"] = 1
            pod = doc["spec"]["template"]["spec"]
            [container] = pod["containers"]
            container["image"] = built["control"]["ref"]
            container["imagePullPolicy"] = "Never"
            # No kube-proxy here: the in-cluster config reaches the API server at its forwarder.
            container["env"] += [{"name": "KUBERNETES_SERVICE_HOST", "value": api_host},
                                 {"name": "KUBERNETES_SERVICE_PORT", "value": str(api_port)},
                                 # the bucket: the tests' emulator (knative/e2e does the same)
                                 {"name": "STORAGE_EMULATOR_HOST", "value": settings.storage_emulator_host}]
            control_pod_spec = pod
        cluster.admin.apply(doc)
    # What the manifest promises: not root, nothing written outside its volumes.
    sc = control_pod_spec.get("securityContext", {})
    [csc] = [c.get("securityContext", {}) for c in control_pod_spec["containers"]]
    assert sc.get("runAsNonRoot") is True and csc.get("readOnlyRootFilesystem") is True
    assert csc.get("capabilities", {}).get("drop") == ["ALL"] and csc.get("allowPrivilegeEscalation") is False

    pod = wait_available(cluster, "modelplane-control", "app.kubernetes.io/name=modelplane-control")
    base = f"http://{pod['status']['podIP']}:8080"
    auth = {"Authorization": f"Bearer {token}"}
    status, body = http("POST", f"{base}/api/models", model_tarball(MODELS / "donor-propensity"),
                        {**auth, "Content-Type": "application/gzip"})
    assert status == 201, body
    assert json.loads(body)["version"] == load_manifest(MODELS / "donor-propensity").version
    svc = cluster.admin.get(f"/apis/serving.knative.dev/v1/namespaces/{NS}/services/donor-propensity")
    assert svc["spec"]["template"]["spec"]["containers"][1]["image"].startswith(registry + "/donor-propensity:")
    status, body = http("POST", f"{base}/api/models", model_tarball(MODELS / "churn-risk"),
                        {**auth, "Content-Type": "application/gzip"})
    assert status == 201, body
    status, body = http("GET", f"{base}/api/models", headers=auth)
    assert status == 200 and {m["name"] for m in json.loads(body)} >= {"donor-propensity", "churn-risk"}

    # `modelplane run` on a cluster: the upload handles its own bucket event, so the Job exists as
    # soon as the upload is answered, named as the JobSink names it for the bridge's event
    # (`{object}#{generation}`); when that event arrives, the JobSink finds the Job and makes none.
    sample = (MODELS / "churn-risk" / "sample.csv").read_bytes()
    status, body = http("POST", f"{base}/api/models/churn-risk/datasets?filename=april.csv", sample,
                        {**auth, "Content-Type": "text/csv"})
    assert status == 201, body
    up = json.loads(body)
    status, _ = http("GET", f"{base}/api/jobs/{up['job']}", headers=auth)
    assert status == 200  # before any event arrived
    from control.events import event_id

    event = finalized_event(up["bucket"], up["object"], up["generation"], event_id(up["object"], up["generation"]))
    uid = cluster.admin.get(f"/apis/batch/v1/namespaces/{NS}/jobs/{up['job']}")["metadata"]["uid"]
    assert dispatch(cluster, ko.object_name(load_manifest(MODELS / "churn-risk")), event) == up["job"]
    # the same Job, not one made again
    assert cluster.admin.get(f"/apis/batch/v1/namespaces/{NS}/jobs/{up['job']}")["metadata"]["uid"] == uid
    wait_job(cluster, up["job"])
    status, body = http("GET", f"{base}/api/jobs/{up['job']}", headers=auth)
    job = json.loads(body)
    assert status == 200 and (job["status"], job["rows"]) == ("succeeded", sample.count(b"\n") - 1), job
    status, body = http("GET", f"{base}/api/jobs/{up['job']}/results", headers=auth)
    assert status == 200 and body.startswith(b"churn_probability\n") and body.count(b"\n") == job["rows"] + 1, body
    # Without the token: refused.
    status, _ = http("POST", f"{base}/api/models", model_tarball(MODELS / "churn-risk"),
                     {"Content-Type": "application/gzip"})
    assert status == 401
    # Its only credentials are its ServiceAccount's (knative/rbac.yaml's Role allowed all of the above).
    assert pod["spec"]["serviceAccountName"] == "modelplane-control"
    for name in ("donor-propensity", "churn-risk"):
        http("DELETE", f"{base}/api/models/{name}", headers=auth)
