"""Session fixtures of the real-Knative tier (imported by conftest.py): one cluster for every
test that needs Knative, started when the first of them runs and stopped at the session's end.

- `knative`: a KnativeNode (tests/knative_cluster.py), Knative Serving, Eventing and the ingress
  Ready, the project's images in its containerd, the tests' GCS emulator reachable from pods at
  `knative.gcs` (gateway, port).
- `knative_plane`: modelplane's control service from knative/namespace.yaml, rbac.yaml and
  control.yaml, a `Plane` to call it.

Without the built components the tier skips, unless MODELPLANE_REQUIRE_KNATIVE=1 (.ci/run),
where it fails.
"""
from __future__ import annotations

import copy
import hashlib
import io
import json
import os
import tarfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

import images
import knative_cluster as kc
import kube
from control.runtime.knative_objects import STORAGE_KEY_SECRET

ROOT = Path(__file__).resolve().parent.parent
NS = "modelplane-models"   # models, their Jobs, the Broker (knative/namespace.yaml)
CONTROL_NS = "modelplane"  # the control service, the bridge, the control service's Secrets
REQUIRED = os.environ.get("MODELPLANE_REQUIRE_KNATIVE") == "1"
TIMEOUT = 300.0
REGISTRY_HOST = "dev.local"  # one of Knative's registries-skipping-tag-resolving defaults
FIGURES = ROOT / "artifacts" / "knative-figures.json"
#: The cluster's bucket: one of its own in the tests' emulator, so the plane on the cluster starts
#: from an empty state/ rather than the records the session's other tests left in test-bucket
BUCKET = "knative-bucket"


def unavailable(reason: str):
    if REQUIRED:
        pytest.fail(f"{reason} (MODELPLANE_REQUIRE_KNATIVE=1: the real-Knative tier must run here)")
    pytest.skip(reason)


def record(name: str, value) -> None:
    """A measured figure, kept in artifacts/knative-figures.json (and printed with -s)."""
    FIGURES.parent.mkdir(parents=True, exist_ok=True)
    data = json.loads(FIGURES.read_text()) if FIGURES.is_file() else {}
    data[name] = value
    FIGURES.write_text(json.dumps(data, indent=2, sort_keys=True))
    print(f"figure: {name} = {value}")


def http(method: str, url: str, body: bytes | None = None, headers: dict | None = None,
         timeout: float = 60) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def model_tarball(folder: Path) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(folder, arcname=folder.name)
    return buf.getvalue()


class Plane:
    """The control service's Pod on the cluster, as a client reaches it."""

    def __init__(self, cluster: kc.KnativeNode, base: str, token: str, registry: str):
        self.cluster, self.base, self.token, self.registry = cluster, base, token, registry

    @property
    def auth(self) -> dict:
        return {"Authorization": f"Bearer {self.token}"}

    def call(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
             timeout: float = 120) -> tuple[int, bytes]:
        return http(method, self.base + path, body, {**self.auth, **(headers or {})}, timeout=timeout)

    def deploy(self, folder: Path, *, live: bool = True) -> dict:
        status, body = self.call("POST", "/api/models" + ("" if live else "?live=false"), model_tarball(folder),
                                 {"Content-Type": "application/gzip"})
        assert status == 201, body
        return json.loads(body)

    def predict(self, name: str, rows: bytes, *, timeout: float = 120) -> tuple[int, bytes]:
        return self.call("POST", f"/models/{name}/predict", rows, {"Content-Type": "text/csv"}, timeout=timeout)


STORAGE_KEY_ENV = {"name": "MODELPLANE_STORAGE_KEY",
                   "valueFrom": {"secretKeyRef": {"name": STORAGE_KEY_SECRET, "key": "key"}}}

@pytest.fixture(scope="session")
def knative_builds():
    b = kc.Builds()
    missing = b.missing()
    if missing:
        unavailable("the test cluster's components are not built: " + ", ".join(missing))
    if not images.have_podman():
        unavailable("podman is not installed (apt-get install podman runc)")
    return b


@pytest.fixture(scope="session")
def knative_images():
    """The project's images (scripts/build-images.sh)."""
    return images.build_images()


@pytest.fixture(scope="session")
def knative(knative_builds, knative_images, gcs):
    import node as node_mod

    missing = node_mod.missing_parts()
    if missing:
        unavailable("cannot run a Kubernetes node here: missing " + ", ".join(missing))
    cluster_images = knative_builds.images()
    FIGURES.unlink(missing_ok=True)  # this run's figures only
    t0 = time.monotonic()
    n = kc.KnativeNode(knative_builds).start(timeout=180)
    ok = False
    try:
        record("node Ready (s)", round(time.monotonic() - t0, 1))
        n.install(cluster_images)
        record("cluster start to Knative Ready (s)", round(time.monotonic() - t0, 1))
        record("Knative install steps (s)", {k: round(v, 1) for k, v in n.timings.items()})
        record("node memory with Knative Ready, idle (MiB)", n.memory_mib())
        for entry in knative_images.values():
            n.import_archive(Path(entry["archive"]))
            # Knative resolves a revision's image tags to digests unless the registry is in
            # config-deployment's registries-skipping-tag-resolving; its resolver
            # (go-containerregistry name.ParseReference) takes `localhost/...` for a Docker Hub
            # repository, so the model images go by a registry it recognises as one.
            n.ctr("images", "tag", "--force", entry["ref"], entry["ref"].replace("localhost/", f"{REGISTRY_HOST}/", 1))
        from google.cloud import storage

        from adapters.storage import emulator_credentials

        client = storage.Client(project="test", credentials=emulator_credentials(gcs.key))
        if client.lookup_bucket(BUCKET) is None:
            client.create_bucket(BUCKET)
        n.gcs = n.forward(gcs.port)  # the emulator, as pods reach it
        n.gcs_key = gcs.key
        yield n
        ok = True
    finally:
        n.stop(logs_to=ROOT / "artifacts" / "knative-node" if not ok else None)


@pytest.fixture(scope="session")
def knative_plane(knative, knative_images):
    """knative/namespace.yaml, rbac.yaml and control.yaml as written, with this cluster's values:
    the registry (the images in the node's containerd), the bucket (the tests' emulator), one
    replica."""
    cluster = knative
    registry = knative_images["adapter"]["ref"].rsplit("/", 1)[0].replace("localhost/", f"{REGISTRY_HOST}/", 1)
    token = "t-" + hashlib.sha256(os.urandom(16)).hexdigest()[:24]
    applier = cluster.applier
    docs = [(p, d) for p, d in kube.iter_knative_docs() if p.name in ("namespace.yaml", "rbac.yaml", "control.yaml")]
    for path, doc in sorted(docs, key=lambda pd: pd[0].name != "namespace.yaml"):  # the namespace first
        doc = copy.deepcopy(doc)
        if doc["kind"] == "Namespace":
            ns = doc["metadata"]["name"]
            applier.apply(doc)
            cluster.wait(lambda: cluster.admin.get(f"/api/v1/namespaces/{ns}/serviceaccounts/default"), 60,
                         "the default ServiceAccount")
            if ns == CONTROL_NS:
                applier.apply({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "modelplane-token",
                                                                                  "namespace": ns},
                               "stringData": {"token": token}})
            # the tests' bucket answers only its key: the control service and the bridge (in
            # modelplane) and each batch Job (in modelplane-models) read it from this Secret
            # (control/runtime/knative_objects.py)
            applier.apply({"apiVersion": "v1", "kind": "Secret",
                           "metadata": {"name": STORAGE_KEY_SECRET, "namespace": ns},
                           "stringData": {"key": cluster.gcs_key}})
            continue
        if doc["kind"] == "ConfigMap" and doc["metadata"]["name"] == "modelplane":
            doc["data"].update(bucket=BUCKET, registry=registry)
        if doc["kind"] == "Deployment":
            doc["spec"]["replicas"] = 1
            [container] = doc["spec"]["template"]["spec"]["containers"]
            container["image"] = knative_images["control"]["ref"]
            container["env"].append({"name": "STORAGE_EMULATOR_HOST",
                                     "value": f"http://{cluster.gcs[0]}:{cluster.gcs[1]}"})
            container["env"].append(STORAGE_KEY_ENV)
        applier.apply(doc)
    path = f"/apis/apps/v1/namespaces/{CONTROL_NS}/deployments/modelplane-control"
    try:
        cluster.wait(lambda: (cluster.admin.get(path).get("status") or {}).get("availableReplicas") == 1,
                     TIMEOUT, "the control service available")
    except TimeoutError as e:
        raise AssertionError(f"{e}\n{cluster.diagnose(CONTROL_NS, 'app.kubernetes.io/name=modelplane-control')}") from None
    pods = cluster.admin.request("GET", f"/api/v1/namespaces/{CONTROL_NS}/pods",
                                 query="labelSelector=app.kubernetes.io/name%3Dmodelplane-control")["items"]
    running = [p for p in pods if p["status"].get("phase") == "Running" and p["metadata"].get("deletionTimestamp") is None]
    return Plane(cluster, f"http://{running[0]['status']['podIP']}:8080", token, registry)


@pytest.fixture(scope="session")
def knative_bridge(knative, knative_plane, knative_images):
    """knative/broker.yaml and knative/bridge.yaml: the `default` Broker and the bucket watcher
    posting to its ingress. The watcher's PersistentVolumeClaim binds a PersistentVolume made
    here (a folder of the node), as a cluster's storage provisioner would give one."""
    cluster = knative
    folder = cluster.dir / "bridge-volume"
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o777)  # fsGroup does not apply to a hostPath volume: the watcher runs as 65532
    cluster.applier.apply({
        "apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": "modelplane-bridge-state"},
        "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteOnce"],
                 "persistentVolumeReclaimPolicy": "Delete", "hostPath": {"path": str(folder)},
                 "claimRef": {"namespace": CONTROL_NS, "name": "modelplane-bridge-state"}}})
    for path, doc in kube.iter_knative_docs():
        if path.name not in ("broker.yaml", "bridge.yaml"):
            continue
        doc = copy.deepcopy(doc)
        if doc["kind"] == "Deployment":
            [container] = doc["spec"]["template"]["spec"]["containers"]
            container["image"] = knative_images["control"]["ref"]
            # the tests' bucket, looked at every second
            container["env"] = [e for e in container["env"] if e["name"] != "MODELPLANE_WATCH_INTERVAL"] + [
                {"name": "STORAGE_EMULATOR_HOST", "value": f"http://{cluster.gcs[0]}:{cluster.gcs[1]}"},
                STORAGE_KEY_ENV, {"name": "MODELPLANE_WATCH_INTERVAL", "value": "1"}]
        cluster.applier.apply(doc)

    try:
        cluster.wait(lambda: kube.has_condition(cluster.admin.get(
            f"/apis/eventing.knative.dev/v1/namespaces/{NS}/brokers/default")), TIMEOUT, "the default Broker Ready")
        cluster.wait(lambda: (cluster.admin.get(f"/apis/apps/v1/namespaces/{CONTROL_NS}/deployments/modelplane-bridge")
                              .get("status") or {}).get("availableReplicas") == 1, TIMEOUT, "the bridge available")
    except TimeoutError as e:
        b = cluster.admin.get(f"/apis/eventing.knative.dev/v1/namespaces/{NS}/brokers/default")
        raise AssertionError(f"{e}\nbroker: {json.dumps(b.get('status'))[:2000]}\n"
                             f"{cluster.diagnose(CONTROL_NS, 'app.kubernetes.io/name=modelplane-bridge')}") from None
    return cluster
