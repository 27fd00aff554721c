"""The cluster runtime on Knative itself: Kubernetes, Knative Serving and Eventing and the ingress
built from their modules (scripts/cluster-build.sh, versions in scripts/cluster-versions.env),
installed from their own YAML on a one-node cluster (tests/knative_cluster.py), and modelplane's
control service running as a Pod from knative/*.yaml.

No Knative component is reproduced here: revisions, queue-proxy, the activator, the autoscaler,
the webhooks, the Broker, Triggers and the JobSink are Knative's. `make test-knative` runs this
tier alone; under .ci/run (MODELPLANE_REQUIRE_KNATIVE=1) it must run, not skip.
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import io
import json
import os
import re
import shutil
import time
from pathlib import Path

import pytest

import kube
from adapters.manifest import load_manifest
from conftest import MODELS, ROOT, requires_r

pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.knative]

from knative_fixtures import BUCKET, CONTROL_NS, NS, TIMEOUT, http, record


def local_realtime_scores(name: str) -> list[float]:
    """The sample scored by the adapter and model as local processes (what the local runtime runs)."""
    import subprocess
    import sys

    from control.emulator import free_port, wait_for_port

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


def local_batch_scores(name: str, dataset: bytes, tmp_path: Path) -> list[float]:
    import subprocess
    import sys

    (tmp_path / "local.csv").write_bytes(dataset)
    proc = subprocess.run([sys.executable, "-m", "adapters", "batch", str(MODELS / name), "--dataset",
                           str(tmp_path / "local.csv"), "--results", str(tmp_path / "local-results"), "--job", "local"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return read_scores((tmp_path / "local-results" / "scores.csv").read_text())


def read_scores(text: str) -> list[float]:
    """A scores.csv's scores: its last column (any passthrough columns come first)."""
    return [float(line.rsplit(",", 1)[-1]) for line in text.splitlines()[1:]]


def ksvc(cluster, name: str) -> dict:
    return cluster.admin.get(f"/apis/serving.knative.dev/v1/namespaces/{NS}/services/{name}")


def model_pods(cluster, name: str) -> list[dict]:
    return cluster.admin.request("GET", f"/api/v1/namespaces/{NS}/pods",
                                 query=f"labelSelector=serving.knative.dev/service%3D{name}")["items"]


def wait_ready(cluster, name: str) -> dict:
    try:
        return cluster.wait(lambda: kube.has_condition(ksvc(cluster, name)) and ksvc(cluster, name), TIMEOUT,
                            f"Knative Service {name} Ready")
    except TimeoutError as e:
        svc = cluster.admin.get(f"/apis/serving.knative.dev/v1/namespaces/{NS}/services/{name}")
        raise AssertionError(f"{e}\nstatus: {json.dumps(svc.get('status'))[:3000]}\n"
                             f"{cluster.diagnose(NS, f'serving.knative.dev/service={name}')}") from None


def wait_zero(cluster, name: str, timeout: float = TIMEOUT) -> float:
    """Until no pod of the model is left (observed); returns the seconds it took."""
    t0 = time.monotonic()
    cluster.wait(lambda: not model_pods(cluster, name), timeout, f"{name} scaled to zero (no pod left)", interval=1)
    return time.monotonic() - t0


def ingress_address(cluster, name: str) -> str:
    """Where a cluster-local model's own address leads: Knative's placeholder Service for the
    Route is an ExternalName naming the ingress's private Service (the KIngress status Traefik
    wrote); that Service's ClusterIP, through kube-proxy."""
    placeholder = cluster.admin.get(f"/api/v1/namespaces/{NS}/services/{name}")
    assert placeholder["spec"]["type"] == "ExternalName", placeholder["spec"]
    assert placeholder["spec"]["externalName"] == "traefik-private.traefik.svc.cluster.local"
    svc = cluster.admin.get("/api/v1/namespaces/traefik/services/traefik-private")
    return f"http://{svc['spec']['clusterIP']}:80"


def routing(cluster, name: str) -> str:
    """The KIngress Knative made and the routers Traefik made of it: what a routing failure prints."""
    kingress = cluster.admin.get(f"/apis/networking.internal.knative.dev/v1alpha1/namespaces/{NS}/ingresses/{name}")
    pods = cluster.admin.request("GET", "/api/v1/namespaces/traefik/pods")["items"]
    _, routers = http("GET", f"http://{pods[0]['status']['podIP']}:9000/api/http/routers") if pods else (0, b"")
    return f"KIngress spec: {json.dumps(kingress['spec'])}\nTraefik routers: {routers[:6000].decode(errors='replace')}"


def quick_model(tmp_path: Path, model: str, idle: str = "2s", version: str | None = None) -> Path:
    """The example model, with a short idle timeout so that scale to zero happens within a test
    (and another version number, if given)."""
    folder = tmp_path / f"{model}-{version or 'v'}" / model
    shutil.copytree(MODELS / model, folder)
    text = (folder / "model.yaml").read_text()
    text = re.sub(r"idle_timeout: \w+", f"idle_timeout: {idle}", text)
    assert f"idle_timeout: {idle}" in text, "the example has no scaling.idle_timeout: update quick_model"
    if version:
        text = text.replace(f"version: {load_manifest(MODELS / model).version}\n", f"version: {version}\n")
        assert f"version: {version}\n" in text
    (folder / "model.yaml").write_text(text)
    return folder


@pytest.mark.parametrize("model", ["donor-propensity", pytest.param("major-gift", marks=requires_r)])
def test_realtime_model_serves_scales_to_zero_and_cold_starts_through_the_activator(knative, knative_plane, tmp_path, model):
    cluster, plane = knative, knative_plane
    manifest = load_manifest(MODELS / model)
    sample = (MODELS / model / "sample.csv").read_bytes()
    t0 = time.monotonic()
    plane.deploy(quick_model(tmp_path, model))
    svc = wait_ready(cluster, model)
    record(f"{model}: deploy to Ready (s)", round(time.monotonic() - t0, 1))

    # Through the control route. Traefik's Knative provider marks a new KIngress ready before its
    # routers serve it (no K-Network-Probe, see the rollout test): until they do, Traefik itself
    # answers its plain-text 404, which is waited out here (and its length recorded).
    t1 = time.monotonic()
    status, body = plane.predict(model, sample)
    while status == 404 and body.startswith(b"404 page not found") and time.monotonic() - t1 < 30:
        time.sleep(0.2)
        status, body = plane.predict(model, sample)
    record(f"{model}: ingress serving it after Ready (s)", round(time.monotonic() - t1, 2))
    assert status == 200, body
    answer = json.loads(body)
    assert (answer["model"], answer["version"]) == (model, manifest.version)
    expected = answer["scores"]
    assert expected == pytest.approx(local_realtime_scores(model), rel=1e-9)  # what the local runtime answers
    # The adapter's contract checks hold behind Knative too: a bad row is a 422 naming the field.
    status, body = plane.call("POST", f"/models/{model}/predict", json.dumps({"rows": [{"nonsense": 1}]}).encode(),
                              {"Content-Type": "application/json"})
    assert status == 422, body

    # Through the Route's own address: the ingress (Traefik's Knative provider), by Host.
    host = svc["status"]["address"]["url"].split("://", 1)[1]
    status, body = http("POST", ingress_address(cluster, model) + "/predict", sample,
                        {"Host": host, "Content-Type": "text/csv"})
    assert status == 200, body
    assert json.loads(body)["scores"] == expected

    # Idle: Knative's autoscaler takes it to zero; no pod is left.
    record(f"{model}: idle to zero (s)", round(wait_zero(cluster, model), 1))

    # The next request cold-starts it through the activator, and answers.
    t1 = time.monotonic()
    status, body = plane.predict(model, sample, timeout=TIMEOUT)
    assert status == 200, body
    assert json.loads(body)["scores"] == expected
    record(f"{model}: cold start zero to first score, control route (s)", round(time.monotonic() - t1, 2))

    # A burst of 32 at zero: every one answered.
    wait_zero(cluster, model)
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        results = list(pool.map(lambda _: plane.predict(model, sample, timeout=TIMEOUT), range(32)))
    failed = [(s, b[:200]) for s, b in results if s != 200]
    assert not failed, failed
    assert all(json.loads(b)["scores"] == expected for _, b in results)
    record("node memory after a burst of 32 at zero (MiB)", cluster.memory_mib())

    status, body = plane.call("DELETE", f"/api/models/{model}")
    assert status in (200, 204), body
    cluster.wait(lambda: not model_pods(cluster, model) and not _exists(cluster, model), TIMEOUT,
                 f"{model}'s objects gone")


def _exists(cluster, name: str) -> bool:
    try:
        ksvc(cluster, name)
        return True
    except kube.ApiError as e:
        if e.status == 404:
            return False
        raise


def test_rollout_splits_the_routes_traffic_and_each_version_has_its_own_url(knative, knative_plane, tmp_path):
    """10 % to a new version: 1,000 requests through the Route's address land on it 10 % ± 3
    points (Knative's split, done by the ingress); each version's tag address answers with that
    version; promote; rollback."""
    cluster, plane, model = knative, knative_plane, "donor-propensity"
    sample = (MODELS / model / "sample.csv").read_bytes()
    one = b"\n".join(sample.splitlines()[:2]) + b"\n"
    plane.deploy(quick_model(tmp_path, model, idle="60s"))
    wait_ready(cluster, model)
    # Its image: the models CI builds one per version; here 1.0.0's, under 1.1.0's name (the adapter
    # answers with the version of the manifest it is given).
    image = f"{plane.registry}/{model}:1.0.0"
    cluster.ctr("images", "tag", "--force", image, image.replace(":1.0.0", ":1.1.0"))
    plane.deploy(quick_model(tmp_path, model, idle="60s", version="1.1.0"), live=False)
    status, body = plane.call("POST", f"/api/models/{model}/rollout", json.dumps({"version": "1.1.0", "percent": 10}).encode(),
                              {"Content-Type": "application/json"})
    assert status == 200, body

    def split_ready():
        svc = ksvc(cluster, model)
        traffic = {t.get("tag"): t.get("percent") for t in (svc.get("status") or {}).get("traffic", [])}
        return kube.has_condition(svc) and traffic.get("v1-1-0") == 10 and traffic.get("v1-0-0") == 90 and svc
    try:
        svc = cluster.wait(split_ready, TIMEOUT, "the 90/10 split in the Route's status")
    except TimeoutError as e:
        raise AssertionError(f"{e}\n{json.dumps(ksvc(cluster, model).get('status'))[:3000]}") from None

    address = ingress_address(cluster, model)
    host = svc["status"]["address"]["url"].split("://", 1)[1]
    versions = {"1.0.0": 0, "1.1.0": 0}

    def one_request(_):
        status, body = http("POST", address + "/predict", one, {"Host": host, "Content-Type": "text/csv"},
                            timeout=TIMEOUT)
        assert status == 200, body
        return json.loads(body)["version"]

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        for v in pool.map(one_request, range(1000)):
            versions[v] += 1
    share = versions["1.1.0"] / 10
    record("rollout: share of 1,000 requests to the 10 % candidate (%)", share)
    assert 7 <= share <= 13, versions

    # Each version's own address: its tag's Host, through the same ingress.
    for version in ("1.0.0", "1.1.0"):
        tag_host = f"v{version.replace('.', '-')}-{host}"
        status, body = http("POST", address + "/predict", one, {"Host": tag_host, "Content-Type": "text/csv"},
                            timeout=TIMEOUT)
        assert status == 200 and json.loads(body)["version"] == version, (
            tag_host, status, body[:300], routing(cluster, model))
        # and the control service's per-version route
        status, body = plane.call("POST", f"/models/{model}/versions/{version}/predict", one,
                                  {"Content-Type": "text/csv"}, timeout=TIMEOUT)
        assert status == 200 and json.loads(body)["version"] == version, body[:300]

    # Promote, then roll back: each time the Route takes every request to one version.
    for action, version in (("promote", "1.1.0"), ("rollback", "1.0.0")):
        status, body = plane.call("POST", f"/api/models/{model}/{action}", b"{}", {"Content-Type": "application/json"})
        assert status == 200, body
        tag = "v" + version.replace(".", "-")
        cluster.wait(lambda: {t.get("tag"): t.get("percent") for t in ksvc(cluster, model)["status"].get("traffic", [])}
                     .get(tag) == 100, TIMEOUT, f"{version} takes every request after {action}")
        # Traefik's Knative provider marks the KIngress ready without probing that its routers
        # serve the new split (no K-Network-Probe handling in traefik
        # pkg/provider/kubernetes/knative/kubernetes.go, unlike Kourier or Istio), so the Route may
        # report the switch a moment before the ingress makes it: wait for 5 answers in a row.
        t0, streak, seen = time.monotonic(), 0, []
        while streak < 5 and time.monotonic() - t0 < 30:
            status, body = plane.predict(model, one)
            assert status == 200, body
            seen.append(json.loads(body)["version"])
            streak = streak + 1 if seen[-1] == version else 0
        assert streak == 5, f"after {action}, still answered by {seen[-10:]}"
        record(f"rollout: {action}: ingress serving it after the Route said so (s)", round(time.monotonic() - t0, 2))

    status, body = plane.call("DELETE", f"/api/models/{model}")
    assert status in (200, 204), body
    cluster.wait(lambda: not model_pods(cluster, model) and not _exists(cluster, model), TIMEOUT,
                 f"{model}'s objects gone")


def wide_model(tmp_path: Path, version: str, features: int) -> Path:
    """donor-propensity with `features` optional features in all (a manifest of tens of KiB),
    `scaling.min: 1`, and this version number."""
    model = "donor-propensity"
    folder = tmp_path / f"wide-{version}" / "wide-model"
    shutil.copytree(MODELS / model, folder)
    text = (folder / "model.yaml").read_text().replace("name: donor-propensity", "name: wide-model", 1)
    text = text.replace("version: 1.0.0\n", f"version: {version}\n", 1)
    text = re.sub(r"scaling: \{[^}]*\}", "scaling: {min: 1, max: 2, target_concurrency: 8, idle_timeout: 0s}", text)
    # a small request: the test node has 2 CPUs, and the version a deploy replaces holds its
    # pod until Knative has drained it
    text = re.sub(r'cpu: "?\d+m"?', 'cpu: "100m"', text)
    extra = "".join(f"  - {{name: extra_feature_{i:03d}, type: number, required: false, "
                    f"description: Extra input {i} of a wide model (optional; the model ignores it)}}\n"
                    for i in range(features - 5))
    text = text.replace("score:", extra + "score:", 1)
    (folder / "model.yaml").write_text(text)
    assert len(load_manifest(folder).features) == features
    return folder


def test_versions_cost_nothing_once_they_are_not_routed(knative, knative_plane, tmp_path):
    """Version after version of a 200-feature model with `scaling.min: 1`: the Service's
    annotations do not grow with the number of versions (the manifests live in the Revisions), no
    object Knative writes for it reaches the 256 KiB annotation limit, the Route names only the
    live version, and only the live version holds a pod (Knative scales unrouted revisions to
    zero whatever their min-scale). MODELPLANE_PROOF_VERSIONS sets how many (default 5)."""
    cluster, plane = knative, knative_plane
    count = int(os.environ.get("MODELPLANE_PROOF_VERSIONS", "5"))
    image = f"{plane.registry}/donor-propensity:1.0.0"
    sizes: dict[str, int] = {}
    annotation_bytes = {}
    t0 = time.monotonic()
    for n in range(1, count + 1):
        version = f"1.0.{n}"
        cluster.ctr("images", "tag", "--force", image, f"{plane.registry}/wide-model:{version}")
        plane.deploy(wide_model(tmp_path, version, 200))
        svc = ksvc(cluster, "wide-model")
        annotation_bytes[n] = sum(len(k) + len(v) for k, v in svc["metadata"]["annotations"].items())
        if n in (1, 3, count):
            cluster.wait(lambda: kube.has_condition(ksvc(cluster, "wide-model")), TIMEOUT, f"{version} Ready")
            for what, obj in knative_objects(cluster, "wide-model"):
                size = len(json.dumps(obj["metadata"].get("annotations") or {}))
                sizes[what] = max(sizes.get(what, 0), size)
                assert size < 256 * 1024, (what, size)
    record(f"{count} versions of a 200-feature model deployed one after another (s)", round(time.monotonic() - t0, 1))
    record("Service annotation bytes at versions 1, 3, last", [annotation_bytes[1], annotation_bytes[3], annotation_bytes[count]])
    record("largest annotations per object kind (bytes)", sizes)
    manifest_bytes = len(json.dumps(load_manifest(wide_model(tmp_path, "9.9.9", 200)).to_dict()))
    # One manifest is on the Service (the live version's); the others never are: the growth
    # from version 3 to the last is the history of live versions (20 at most) and version strings.
    assert annotation_bytes[count] - annotation_bytes[3] < 512 < manifest_bytes
    svc = ksvc(cluster, "wide-model")
    assert [t["revisionName"] for t in svc["spec"]["traffic"]] == [f"wide-model-1-0-{count}"]

    def pods_by_revision():
        out: dict[str, int] = {}
        for p in model_pods(cluster, "wide-model"):
            if p["metadata"].get("deletionTimestamp") is None:
                rev = p["metadata"]["labels"].get("serving.knative.dev/revision")
                out[rev] = out.get(rev, 0) + 1
        return out

    t1 = time.monotonic()
    try:
        cluster.wait(lambda: pods_by_revision() == {f"wide-model-1-0-{count}": 1}, TIMEOUT,
                     "only the live version holding a pod", interval=1)
    except TimeoutError as e:
        raise AssertionError(f"{e}: {pods_by_revision()}") from None
    record("only the live version holds pods, after the last deploy (s)", round(time.monotonic() - t1, 1))
    status, body = plane.call("GET", "/api/models/wide-model")
    assert status == 200, body
    assert [v["version"] for v in json.loads(body)["versions"]] == [f"1.0.{n}" for n in range(1, count + 1)]
    status, body = plane.call("DELETE", "/api/models/wide-model")
    assert status in (200, 204), body
    cluster.wait(lambda: not model_pods(cluster, "wide-model") and not _exists(cluster, "wide-model"), TIMEOUT,
                 "wide-model's objects gone")


def knative_objects(cluster, name: str):
    """Every object Knative writes for a Service, with what it is."""
    base = f"/apis/serving.knative.dev/v1/namespaces/{NS}"
    yield "Service", ksvc(cluster, name)
    yield "Configuration", cluster.admin.get(f"{base}/configurations/{name}")
    yield "Route", cluster.admin.get(f"{base}/routes/{name}")
    yield "KIngress", cluster.admin.get(f"/apis/networking.internal.knative.dev/v1alpha1/namespaces/{NS}/ingresses/{name}")
    for rev in cluster.admin.request("GET", f"{base}/revisions",
                                     query=f"labelSelector=serving.knative.dev/service%3D{name}")["items"]:
        yield "Revision", rev
    for svc in cluster.admin.request("GET", f"/api/v1/namespaces/{NS}/services",
                                     query=f"labelSelector=serving.knative.dev/route%3D{name}")["items"]:
        yield "Kubernetes Service (route, tag)", svc


# -- batch: bucket -> bridge -> Broker -> Trigger -> JobSink -> Job ---------------------------

def jobs_of(cluster, sink: str) -> list[dict]:
    return cluster.admin.request("GET", f"/apis/batch/v1/namespaces/{NS}/jobs",
                                 query=f"labelSelector=sinks.knative.dev/job-sink-name%3D{sink}")["items"]


def wait_finished(cluster, name: str) -> dict:
    path = f"/apis/batch/v1/namespaces/{NS}/jobs/{name}"

    def finished():
        conds = {c["type"]: c["status"] for c in (cluster.admin.get(path).get("status") or {}).get("conditions", [])}
        return "True" in (conds.get("Complete"), conds.get("Failed"))
    try:
        cluster.wait(finished, TIMEOUT, f"Job {name} finished")
    except TimeoutError as e:
        raise AssertionError(f"{e}\n{cluster.diagnose(NS, f'job-name={name}')}") from None
    return cluster.admin.get(path)


def new_job(cluster, sink: str, known: set[str]) -> dict:
    try:
        return cluster.wait(lambda: next((j for j in jobs_of(cluster, sink) if j["metadata"]["name"] not in known),
                                         None), TIMEOUT, f"a Job of {sink} from the bucket event")
    except TimeoutError as e:
        raise AssertionError(f"{e}\n{cluster.log_tail('kubelet', 5)}\n"
                             f"{cluster.diagnose(CONTROL_NS, 'app.kubernetes.io/name=modelplane-bridge')}\n"
                             f"{cluster.diagnose('knative-eventing', 'app=job-sink')}") from None


@pytest.mark.parametrize("model", ["churn-risk", pytest.param("member-retention", marks=requires_r)])
def test_batch_dataset_dropped_in_the_bucket_is_scored_by_a_job_from_the_jobsink(knative, knative_plane,
                                                                                  knative_bridge, gcs_client, model,
                                                                                  tmp_path):
    import csv

    from control.runtime import knative_objects as ko

    cluster, plane = knative, knative_plane
    manifest = load_manifest(MODELS / model)
    plane.deploy(MODELS / model)
    sink = ko.object_name(manifest)

    def trigger_ready():
        t = cluster.admin.get(f"/apis/eventing.knative.dev/v1/namespaces/{NS}/triggers/{model}")
        return kube.has_condition(t)
    cluster.wait(trigger_ready, TIMEOUT, f"Trigger {model} Ready")
    cluster.wait(lambda: kube.has_condition(cluster.admin.get(f"/apis/sinks.knative.dev/v1alpha1/namespaces/{NS}/jobsinks/{sink}")),
                 TIMEOUT, f"JobSink {sink} Ready")

    bucket = gcs_client.bucket(BUCKET)
    sample = (MODELS / model / "sample.csv").read_bytes()
    known = {j["metadata"]["name"] for j in jobs_of(cluster, sink)}
    blob = bucket.blob(f"incoming/{model}/knative-march.csv")
    blob.upload_from_string(sample, content_type="text/csv")
    job = new_job(cluster, sink, known)
    name = job["metadata"]["name"]
    job = wait_finished(cluster, name)
    assert job["status"].get("succeeded") == 1, cluster.diagnose(NS, f"job-name={name}")
    prefix = f"results/{model}/{name}"
    scores = read_scores(bucket.blob(f"{prefix}/scores.csv").download_as_text())
    assert scores == pytest.approx(local_batch_scores(model, sample, tmp_path), rel=1e-9)
    result = json.loads(bucket.blob(f"{prefix}/result.json").download_as_text())
    assert (result["status"], result["rows"], result["job"]) == ("succeeded", len(scores), name)
    assert result["input"] == {"uri": f"gs://{BUCKET}/{blob.name}", "generation": str(blob.generation),
                               "md5": hashlib.md5(sample).hexdigest()}
    # The control service reads the same from the cluster: the Job, and the result from its log.
    status, body = plane.call("GET", f"/api/jobs/{name}")
    seen = json.loads(body)
    assert status == 200 and (seen["status"], seen["rows"]) == ("succeeded", len(scores)), seen

    # The same event delivered again (as a Broker redelivers): the JobSink finds its Job, makes none.
    secret = cluster.admin.get(f"/api/v1/namespaces/{NS}/secrets/{name}")
    import base64
    event = base64.b64decode(secret["data"]["event"])
    ingress = cluster.admin.get("/api/v1/namespaces/knative-eventing/services/broker-ingress")["spec"]["clusterIP"]
    status, body = http("POST", f"http://{ingress}/{NS}/default", event,
                        {"Content-Type": "application/cloudevents+json"})
    assert status in (200, 202), body
    time.sleep(10)
    assert [j["metadata"]["name"] for j in jobs_of(cluster, sink) if j["metadata"]["name"] not in known] == [name]

    # A dataset the features refuse: a failed Job, a failed result.json, no scores.
    rows = list(csv.reader(io.StringIO(sample.decode())))
    column = {"churn-risk": "plan", "member-retention": "tier"}[model]
    rows[3][rows[0].index(column)] = "gold"
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows(rows)
    known.add(name)
    bad = bucket.blob(f"incoming/{model}/knative-bad.csv")
    bad.upload_from_string(out.getvalue(), content_type="text/csv")
    bad_job = new_job(cluster, sink, known)["metadata"]["name"]
    job = wait_finished(cluster, bad_job)
    assert job["status"].get("failed") == 1 and not job["status"].get("succeeded")
    assert not bucket.blob(f"results/{model}/{bad_job}/scores.csv").exists()
    result = json.loads(bucket.blob(f"results/{model}/{bad_job}/result.json").download_as_text())
    assert result["status"] == "failed" and result["problems"][0]["field"] == column

    # `modelplane run` on a cluster: the upload makes its Job at once, named as the JobSink names
    # it for the bridge's event; when the bridge's event arrives, the JobSink finds it and makes none.
    known.add(bad_job)
    status, body = plane.call("POST", f"/api/models/{model}/datasets?filename=april.csv", sample,
                              {"Content-Type": "text/csv"})
    assert status == 201, body
    up = json.loads(body)
    uid = cluster.admin.get(f"/apis/batch/v1/namespaces/{NS}/jobs/{up['job']}")["metadata"]["uid"]
    wait_finished(cluster, up["job"])
    status, body = plane.call("GET", f"/api/jobs/{up['job']}/results")
    assert status == 200 and body.count(b"\n") == len(scores) + 1, body[:300]
    time.sleep(5)  # the bridge looks at the bucket every second: its event has been delivered
    assert [j["metadata"]["name"] for j in jobs_of(cluster, sink) if j["metadata"]["name"] not in known] == [up["job"]]
    assert cluster.admin.get(f"/apis/batch/v1/namespaces/{NS}/jobs/{up['job']}")["metadata"]["uid"] == uid
    # Without the token: refused.
    status, _ = http("POST", f"{plane.base}/api/models/{model}/datasets?filename=x.csv", sample,
                     {"Content-Type": "text/csv"})
    assert status == 401

    # Remove: every object the model had is gone.
    status, body = plane.call("DELETE", f"/api/models/{model}")
    assert status in (200, 204), body

    def gone():
        for path in (f"/apis/eventing.knative.dev/v1/namespaces/{NS}/triggers/{model}",
                     f"/apis/sinks.knative.dev/v1alpha1/namespaces/{NS}/jobsinks/{sink}"):
            try:
                cluster.admin.get(path)
                return False
            except kube.ApiError as e:
                if e.status != 404:
                    raise
        return True
    cluster.wait(gone, TIMEOUT, f"{model}'s Trigger and JobSink gone")


def test_realtime_dataset_dropped_in_the_bucket_streams_through_the_models_service(knative, knative_plane,
                                                                                   knative_bridge, gcs_client):
    """A dataset dropped for a realtime model: the `{model}-stream` Trigger's JobSink makes a Job
    whose adapter sends the rows, in chunks of limits.max_rows, to the model's own Knative Service;
    scores.csv and result.json land as a batch job's do, and the control service reads the job."""
    from control.runtime import knative_objects as ko

    cluster, plane = knative, knative_plane
    model = "donor-propensity"
    manifest = load_manifest(MODELS / model)
    plane.deploy(MODELS / model)
    wait_ready(cluster, model)
    sink = ko.object_name(manifest)
    trigger = ko.stream_trigger_name(model)
    cluster.wait(lambda: kube.has_condition(cluster.admin.get(
        f"/apis/eventing.knative.dev/v1/namespaces/{NS}/triggers/{trigger}")), TIMEOUT, f"Trigger {trigger} Ready")
    cluster.wait(lambda: kube.has_condition(cluster.admin.get(
        f"/apis/sinks.knative.dev/v1alpha1/namespaces/{NS}/jobsinks/{sink}")), TIMEOUT, f"JobSink {sink} Ready")

    # more rows than one request takes, so the job sends several chunks and joins them in order
    header, *lines = (MODELS / model / "sample.csv").read_text().splitlines()
    copies = manifest.limits.max_rows // len(lines) + 2
    dataset = "\n".join([header] + lines * copies) + "\n"
    n_rows = len(lines) * copies
    assert n_rows > manifest.limits.max_rows
    bucket = gcs_client.bucket(BUCKET)
    known = {j["metadata"]["name"] for j in jobs_of(cluster, sink)}
    bucket.blob(f"incoming/{model}/knative-stream.csv").upload_from_string(dataset, content_type="text/csv")
    name = new_job(cluster, sink, known)["metadata"]["name"]
    job = wait_finished(cluster, name)
    assert job["status"].get("succeeded") == 1, cluster.diagnose(NS, f"job-name={name}")
    prefix = f"results/{model}/{name}"
    scores = read_scores(bucket.blob(f"{prefix}/scores.csv").download_as_text())
    assert scores == pytest.approx(local_realtime_scores(model) * copies, rel=1e-9)
    result = json.loads(bucket.blob(f"{prefix}/result.json").download_as_text())
    assert (result["status"], result["rows"], result["job"]) == ("succeeded", n_rows, name)
    assert result["score_summary"]["count"] == n_rows
    status, body = plane.call("GET", f"/api/jobs/{name}")
    seen = json.loads(body)
    assert status == 200 and (seen["model"], seen["status"], seen["rows"]) == (model, "succeeded", n_rows), seen

    status, body = plane.call("DELETE", f"/api/models/{model}")
    assert status in (200, 204), body
