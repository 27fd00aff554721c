"""A real Kubernetes API server for the cluster-runtime tests: etcd + kube-apiserver (the version
pinned in scripts/cluster-versions.env) on loopback, token auth, RBAC, service-account tokens,
Pod Security and strict field validation as that release enforces them, the official Knative CRDs.

Alone, no kubelet, scheduler or Knative controller runs: the fast tier (tests/test_knative.py)
plays the controllers by patching `status`. tests/knative_cluster.py runs the real ones. The
binaries come from `scripts/cluster-build.sh` (its cache), MODELPLANE_KUBE_BIN (the folder) or
MODELPLANE_KUBE_APISERVER, etcd likewise or MODELPLANE_ETCD; CRDs from ../shared/knative/crds
or MODELPLANE_KNATIVE_CRDS.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator, Optional

import yaml

ROOT = Path(__file__).resolve().parent.parent
ISSUER = "https://kubernetes.default.svc"


def cluster_cache() -> Path:
    """Where scripts/cluster-build.sh keeps what it built (MODELPLANE_CLUSTER_CACHE)."""
    return Path(os.environ.get("MODELPLANE_CLUSTER_CACHE")
                or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "modelplane" / "cluster")


def pinned(key: str) -> str:
    """A version from scripts/cluster-versions.env."""
    for line in (ROOT / "scripts" / "cluster-versions.env").read_text().splitlines():
        if line.startswith(key + "="):
            return line.split("=", 1)[1].strip()
    raise KeyError(key)


def kube_binary(name: str) -> Optional[Path]:
    """A Kubernetes binary built by scripts/cluster-build.sh (its cache, at the pinned version), or
    from MODELPLANE_KUBE_BIN (a folder holding them all)."""
    folder = os.environ.get("MODELPLANE_KUBE_BIN")
    if folder:
        candidate = Path(folder) / name
    elif name == "pause":
        candidate = cluster_cache() / f"pause-{pinned('KUBERNETES_VERSION')}" / "bin" / name
    else:
        candidate = cluster_cache() / f"kubernetes-{pinned('KUBERNETES_VERSION')}" / "bin" / name
    return candidate if candidate.is_file() else None


def binary_minor(binary: Path) -> int:
    """The minor version a Kubernetes binary prints (`Kubernetes v1.34.4` -> 34)."""
    out = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=30).stdout
    match = re.search(r"v1\.(\d+)\.", out)
    if not match:
        raise RuntimeError(f"{binary} --version printed {out!r}: not a Kubernetes version")
    return int(match.group(1))


def etcd_binary() -> str:
    """MODELPLANE_ETCD, else the etcd scripts/cluster-build.sh built."""
    explicit = os.environ.get("MODELPLANE_ETCD")
    if explicit:
        return explicit
    return str(cluster_cache() / f"etcd-{pinned('ETCD_VERSION')}" / "bin" / "etcd")


def apiserver_binary() -> Optional[Path]:
    explicit = os.environ.get("MODELPLANE_KUBE_APISERVER")
    return Path(explicit) if explicit else kube_binary("kube-apiserver")


def crds_dir() -> Path:
    explicit = os.environ.get("MODELPLANE_KNATIVE_CRDS")
    if explicit:
        return Path(explicit)
    return ROOT.parent / "shared" / "knative" / "crds"


def serving_crd(name: str) -> Optional[Path]:
    """One of Knative Serving's own CRDs (`revision`, `configuration`, `route`) from its module's
    config/, as scripts/cluster-build.sh keeps it (../shared/knative/crds holds the Service's)."""
    path = cluster_cache() / f"serving-{pinned('KNATIVE_SERVING_VERSION')}" / "config" / "core" / "300-resources" / f"{name}.yaml"
    return path if path.is_file() else None


def events_dir() -> Path:
    """Google's GCS event samples (../shared/knative/events beside the checkout, or MODELPLANE_KNATIVE_EVENTS)."""
    explicit = os.environ.get("MODELPLANE_KNATIVE_EVENTS")
    return Path(explicit) if explicit else ROOT.parent / "shared" / "knative" / "events"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def fix_crd_for_120(node: Any) -> Any:
    """API server 1.20 rejects `default: ""` and list-type map pairs in these newer CRDs."""
    if isinstance(node, dict):
        out = {}
        is_map_list = node.get("x-kubernetes-list-type") == "map"
        for key, value in node.items():
            if key == "default" and value == "":
                continue
            if is_map_list and key in ("x-kubernetes-list-type", "x-kubernetes-list-map-keys"):
                continue
            out[key] = fix_crd_for_120(value)
        return out
    if isinstance(node, list):
        return [fix_crd_for_120(v) for v in node]
    return node


class ApiError(Exception):
    def __init__(self, status: int, body: str):
        super().__init__(f"HTTP {status}: {body[:500]}")
        self.status = status
        self.body = body


class Kube:
    """A minimal JSON client for the test side (admin or any token), independent of the
    code under test."""

    def __init__(self, url: str, token: str, ca: Path):
        self.url = url
        self.token = token
        self.ctx = ssl.create_default_context(cafile=str(ca))

    def request(self, method: str, path: str, body: Any = None, *,
                content_type: str = "application/json", query: str = "") -> Any:
        data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
        req = urllib.request.Request(self.url + path + (f"?{query}" if query else ""), data=data, method=method,
                                     headers={"Authorization": f"Bearer {self.token}",
                                              "Content-Type": content_type, "Accept": "application/json"})
        try:
            with urllib.request.urlopen(req, context=self.ctx, timeout=30) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            raise ApiError(e.code, e.read().decode("utf-8", "replace")) from None
        try:
            return json.loads(raw) if raw else {}
        except ValueError:
            return raw.decode("utf-8", "replace")

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def merge_patch(self, path: str, patch: dict) -> Any:
        return self.request("PATCH", path, patch, content_type="application/merge-patch+json")

    def apply(self, obj: dict, *, dry_run: bool = False) -> Any:
        """Server-side apply (optionally `dryRun=All`)."""
        query = "fieldManager=modelplane-test&force=true" + ("&dryRun=All" if dry_run else "")
        return self.request("PATCH", object_path(obj), obj, content_type="application/apply-patch+yaml",
                            query=query)


def has_condition(obj: dict, kind: str = "Ready") -> bool:
    """`status.conditions` holds `kind` with status True."""
    return any(c.get("type") == kind and c.get("status") == "True"
               for c in (obj.get("status") or {}).get("conditions") or [])


def wait_crds_served(admin: Kube, names: list[str], *, timeout: float = 60) -> None:
    """Until each CRD is Established and its API is served (a moment after Established)."""
    deadline = time.monotonic() + timeout
    for name in names:
        path = f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}"
        while not has_condition(crd := admin.get(path), "Established"):
            if time.monotonic() > deadline:
                raise RuntimeError(f"CRD {name} not established after {timeout}s: {crd.get('status')}")
            time.sleep(0.2)
        plural, group = name.split(".", 1)
        while True:
            try:
                admin.get(f"/apis/{group}/{crd['spec']['versions'][0]['name']}/{plural}")
                break
            except ApiError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)


# apiVersion/kind -> (plural, namespaced) for what knative/ and the tests write
KINDS = {
    ("v1", "Namespace"): ("namespaces", False),
    ("v1", "ServiceAccount"): ("serviceaccounts", True),
    ("v1", "Service"): ("services", True),
    ("v1", "ConfigMap"): ("configmaps", True),
    ("v1", "Secret"): ("secrets", True),
    ("v1", "Pod"): ("pods", True),
    ("v1", "PersistentVolumeClaim"): ("persistentvolumeclaims", True),
    ("apps/v1", "Deployment"): ("deployments", True),
    ("batch/v1", "Job"): ("jobs", True),
    ("rbac.authorization.k8s.io/v1", "Role"): ("roles", True),
    ("rbac.authorization.k8s.io/v1", "RoleBinding"): ("rolebindings", True),
    ("rbac.authorization.k8s.io/v1", "ClusterRole"): ("clusterroles", False),
    ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding"): ("clusterrolebindings", False),
    ("apiextensions.k8s.io/v1", "CustomResourceDefinition"): ("customresourcedefinitions", False),
    ("serving.knative.dev/v1", "Service"): ("services", True),
    ("eventing.knative.dev/v1", "Broker"): ("brokers", True),
    ("eventing.knative.dev/v1", "Trigger"): ("triggers", True),
    ("sinks.knative.dev/v1alpha1", "JobSink"): ("jobsinks", True),
}


def object_path(obj: dict) -> str:
    api_version, kind = obj["apiVersion"], obj["kind"]
    plural, namespaced = KINDS[(api_version, kind)]
    base = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    ns = obj["metadata"].get("namespace")
    if namespaced:
        base += f"/namespaces/{ns}"
    return f"{base}/{plural}/{obj['metadata']['name']}"


def load_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


class Cluster:
    """etcd + kube-apiserver in a temporary folder; `admin` is a Kube with system:masters.

    Alone it is an API server without nodes (tests play the controllers). `node.Node` adds
    the rest of a one-node cluster; it passes `extra_args` (authorization, admission) and a
    serving certificate of its own (`tls`: cert, key and the CA that signed them).
    """

    def __init__(self, workdir: Path, binary: Path, *, extra_args: Optional[list[str]] = None,
                 tls: Optional[tuple[Path, Path, Path]] = None, etcd: Optional[Path] = None,
                 bind: str = "127.0.0.1", minor: Optional[int] = None):
        self.workdir = workdir
        self.binary = binary
        self.etcd = etcd
        self.bind = bind  # the node's cluster binds the bridge's gateway, where kube-proxy sends pods
        self.minor = minor if minor is not None else binary_minor(binary)
        self.extra_args = extra_args
        self.tls = tls
        self.procs: list[subprocess.Popen] = []
        self.url = ""
        self.port = 0
        self.admin_token = ""
        self.admin: Optional[Kube] = None

    def start(self) -> "Cluster":
        w = self.workdir
        etcd_port, peer_port, api_port = free_port(), free_port(), free_port(self.bind)
        etcd_log = open(w / "etcd.log", "wb")
        self.procs.append(subprocess.Popen(
            [str(self.etcd or etcd_binary()), "--name", "test", "--data-dir", str(w / "etcd"),
             "--listen-client-urls", f"http://127.0.0.1:{etcd_port}",
             "--advertise-client-urls", f"http://127.0.0.1:{etcd_port}",
             "--listen-peer-urls", f"http://127.0.0.1:{peer_port}",
             "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer_port}",
             "--initial-cluster", f"test=http://127.0.0.1:{peer_port}",
             "--log-level", "error"],
            stdout=etcd_log, stderr=subprocess.STDOUT, start_new_session=True))
        subprocess.run(["openssl", "genrsa", "-out", str(w / "sa.key"), "2048"], check=True,
                       capture_output=True)
        subprocess.run(["openssl", "rsa", "-in", str(w / "sa.key"), "-pubout", "-out", str(w / "sa.pub")],
                       check=True, capture_output=True)
        admin_token = self.admin_token = secrets.token_hex(16)
        (w / "tokens.csv").write_text(f"{admin_token},admin,admin-uid,system:masters\n")
        api_log = open(w / "kube-apiserver.log", "wb")
        if self.tls:
            cert, key, _ = self.tls
            serving = ["--tls-cert-file", str(cert), "--tls-private-key-file", str(key)]
        else:
            serving = ["--cert-dir", str(w / "certs")]
        extra = self.extra_args if self.extra_args is not None else [
            "--authorization-mode", "RBAC",
            # No controller-manager creates `default` service accounts: do not require them.
            "--disable-admission-plugins", "ServiceAccount"]
        self.procs.append(subprocess.Popen(
            [str(self.binary),
             "--etcd-servers", f"http://127.0.0.1:{etcd_port}",
             "--bind-address", self.bind, "--advertise-address", self.bind,
             "--secure-port", str(api_port),
             # the insecure port was removed in 1.24, and klog's --logtostderr in 1.26
             *(["--insecure-port=0", "--logtostderr=true"] if self.minor < 24 else []),
             *serving,
             "--token-auth-file", str(w / "tokens.csv"),
             "--service-account-issuer", ISSUER,
             "--service-account-key-file", str(w / "sa.pub"),
             "--service-account-signing-key-file", str(w / "sa.key"),
             "--api-audiences", ISSUER,
             "--service-cluster-ip-range", "10.96.0.0/24",
             *extra, "-v=1"],
            stdout=api_log, stderr=subprocess.STDOUT, start_new_session=True))
        self.port = api_port
        self.url = f"https://{self.bind}:{api_port}"
        self._wait_ready(admin_token)
        return self

    def _wait_ready(self, token: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        cert = self.ca
        last = ""
        while time.monotonic() < deadline:
            for p in self.procs:
                if p.poll() is not None:
                    raise RuntimeError(f"{p.args[0]} exited with {p.returncode}:\n{self.log_tail()}")
            if cert.is_file():
                try:
                    self.admin = Kube(self.url, token, cert)
                    self.admin.request("GET", "/readyz")
                    return
                except (ApiError, OSError, ssl.SSLError) as e:
                    last = str(e)
            time.sleep(0.3)
        raise RuntimeError(f"kube-apiserver not ready after {timeout}s ({last}):\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        out = []
        for name in ("kube-apiserver.log", "etcd.log"):
            f = self.workdir / name
            if f.is_file():
                out.append(f"--- {name}\n" + "\n".join(f.read_text(errors="replace").splitlines()[-lines:]))
        return "\n".join(out)

    @property
    def ca(self) -> Path:
        return self.tls[2] if self.tls else self.workdir / "certs" / "apiserver.crt"

    def install_crds(self, folder: Path) -> list[str]:
        names = []
        if not sorted(folder.glob("*.yaml")):
            raise RuntimeError(f"no Knative CRDs in {folder}: they come from shared/knative/crds beside the "
                               f"checkout, or set MODELPLANE_KNATIVE_CRDS to their folder")
        for path in sorted(folder.glob("*.yaml")):
            for doc in load_docs(path):
                if doc.get("kind") != "CustomResourceDefinition":
                    continue
                crd = fix_crd_for_120(doc) if self.minor < 21 else doc
                self.admin.request("POST", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions", crd)
                names.append(crd["metadata"]["name"])
        wait_crds_served(self.admin, names, timeout=30)
        return names

    def install_crd_file(self, path: Path) -> None:
        names = []
        for doc in load_docs(path):
            if doc.get("kind") == "CustomResourceDefinition":
                self.admin.request("POST", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions", doc)
                names.append(doc["metadata"]["name"])
        wait_crds_served(self.admin, names, timeout=30)

    def service_account_token(self, namespace: str, name: str, *, seconds: int = 3600) -> str:
        """A bound token from the TokenRequest API: minted and later verified by the API server
        itself with its signing key, for a ServiceAccount that must exist."""
        resp = self.admin.request(
            "POST", f"/api/v1/namespaces/{namespace}/serviceaccounts/{name}/token",
            {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
             "spec": {"audiences": [ISSUER], "expirationSeconds": seconds}})
        return resp["status"]["token"]

    def api_client(self, token: str):
        """A `kubernetes` ApiClient for `token` (what KnativeRuntime gets in the tests)."""
        from kubernetes import client

        cfg = client.Configuration()
        cfg.host = self.url
        cfg.ssl_ca_cert = str(self.ca)
        cfg.api_key = {"BearerToken": token}
        cfg.api_key_prefix = {"BearerToken": "Bearer"}
        return client.ApiClient(cfg)

    def stop(self) -> None:
        stop_processes(reversed(self.procs), grace=10)


def stop_processes(procs, *, grace: float) -> None:
    """SIGTERM each running process in turn, SIGKILL what has not exited after `grace` seconds."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
            try:
                p.wait(grace)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def iter_knative_docs() -> Iterator[tuple[Path, dict]]:
    for path in sorted((ROOT / "knative").glob("*.yaml")):
        for doc in load_docs(path):
            yield path, doc
