"""A one-node Kubernetes cluster running Knative itself, for the real-Knative tier.

Everything is built from its Go module by scripts/cluster-build.sh (versions pinned in
scripts/cluster-versions.env) and its images by scripts/cluster-images.sh:

- Kubernetes (kube-apiserver, kube-controller-manager, kube-scheduler, kubelet, kube-proxy in
  iptables mode) and etcd, on the host as a node's daemons run, with containerd and a CNI bridge
  (tests/node.py);
- cluster DNS: CoreDNS on the bridge's gateway address, its `kubernetes` plugin serving
  `cluster.local`, the kubelet's --cluster-dns;
- Knative Serving and Eventing, installed from the YAML under each module's `config/` with only
  the `ko://` image references replaced, the ingress class, and the autoscaler windows the tests
  shorten (each named in `SETTINGS`); model images go by `dev.local/...`, a registry Knative skips
  tag resolution for by default (config-deployment `registries-skipping-tag-resolving`);
- the ingress: Traefik's Knative provider, in a Pod (tests/cluster/traefik.yaml).

Nothing of Knative is reproduced here: its controllers, webhooks, activator, autoscaler,
queue-proxy, Broker, Trigger and JobSink dispatcher are Knative's own binaries.
"""
from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import yaml

import kube
import node as node_mod

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "scripts"
CLUSTER_YAML = Path(__file__).resolve().parent / "cluster"
DOMAIN = "cluster.local"
KNATIVE_NAMESPACES = ("knative-serving", "knative-eventing", "traefik")
INGRESS_CLASS = "traefik.ingress.networking.knative.dev"

# What the tests change in Knative's own ConfigMaps, and why.
SETTINGS = {
    ("knative-serving", "config-network"): {"ingress-class": INGRESS_CLASS},
    ("knative-serving", "config-autoscaler"): {
        # Scale to zero within a test's patience: the shortest windows Knative accepts
        # (pkg/autoscaler/config: stable-window >= 6s, grace period >= 6s).
        "enable-scale-to-zero": "true",
        "stable-window": "6s",
        "scale-to-zero-grace-period": "6s",
        "scale-to-zero-pod-retention-period": "0s",
    },
}


class Builds:
    """The folders scripts/cluster-build.sh filled, at the pinned versions."""

    def __init__(self, root: Optional[Path] = None):
        v = kube.pinned
        self.root = root or kube.cluster_cache()
        self.kube = self.root / f"kubernetes-{v('KUBERNETES_VERSION')}" / "bin"
        self.pause = self.root / f"pause-{v('KUBERNETES_VERSION')}" / "bin" / "pause"
        self.etcd = self.root / f"etcd-{v('ETCD_VERSION')}" / "bin" / "etcd"
        self.serving = self.root / f"serving-{v('KNATIVE_SERVING_VERSION')}"
        self.eventing = self.root / f"eventing-{v('KNATIVE_EVENTING_VERSION')}"
        self.coredns = self.root / f"coredns-{v('COREDNS_VERSION')}" / "bin" / "coredns"
        self.traefik = self.root / f"traefik-{v('TRAEFIK_VERSION')}" / "bin" / "traefik"
        self.traefik_image = f"localhost/modelplane-cluster/traefik:{v('TRAEFIK_VERSION')}"

    def missing(self) -> list[str]:
        out = []
        for name, stamp in [("kubernetes", self.kube.parent), ("pause", self.pause.parent.parent),
                            ("etcd", self.etcd.parent.parent), ("serving", self.serving),
                            ("eventing", self.eventing), ("coredns", self.coredns.parent.parent),
                            ("traefik", self.traefik.parent.parent)]:
            if not (stamp / ".built").is_file():
                out.append(f"{name} (scripts/cluster-build.sh {name})")
        return out

    def images(self) -> dict[str, Path]:
        """ref -> OCI archive, building what is missing (scripts/cluster-images.sh)."""
        proc = subprocess.run([str(SCRIPTS / "cluster-images.sh"), str(self.root)], capture_output=True,
                              text=True, timeout=1800)
        if proc.returncode != 0:
            raise RuntimeError(f"scripts/cluster-images.sh failed:\n{proc.stderr[-3000:]}")
        return {ref: Path(archive) for ref, archive in (line.split() for line in proc.stdout.splitlines() if line)}


# -- Knative's own YAML, rendered as its release does (ko resolve), images replaced ---------

def _yaml_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.yaml") if p.is_file())


def knative_documents(builds: Builds, images: dict[str, Path]) -> list[dict]:
    """serving-core (config/core + its linked networking and caching files), eventing-core
    (config/core), the in-memory channel and the multi-tenant channel-based Broker: the files
    knative/serving and knative/eventing `hack/generate-yamls.sh` resolve into their releases."""
    files = [*_yaml_files(builds.serving / "config" / "core"),
             *_yaml_files(builds.serving / "config" / "deps"),
             *_yaml_files(builds.eventing / "config" / "core"),
             *_yaml_files(builds.eventing / "config" / "channels" / "in-memory-channel"),
             *_yaml_files(builds.eventing / "config" / "brokers" / "mt-channel-broker")]
    refs = {}
    for ref in images:
        m = re.match(r"^localhost/(knative\.dev/[^:]+):(v[\d.]+)$", ref)
        if m:
            refs[f"ko://{m.group(1)}"] = ref
    docs = []
    for path in files:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                docs.append(_resolve(doc, refs, path))
    for doc in docs:
        key = (doc["metadata"].get("namespace"), doc["metadata"]["name"])
        if doc["kind"] == "ConfigMap" and key in SETTINGS:
            doc.setdefault("data", {}).update(SETTINGS[key])
        if doc["kind"] == "Deployment":
            _scale_cpu_requests(doc)
    return docs


def _scale_cpu_requests(deployment: dict) -> None:
    """A tenth of each CPU request (limits unchanged): Knative's components ask for ~1.5 cores
    between them, more than a two-core test node can give beside the models. Scheduling only:
    the processes get the CPU they use."""
    for c in deployment["spec"]["template"]["spec"].get("containers", []):
        requests = (c.get("resources") or {}).get("requests") or {}
        cpu = requests.get("cpu")
        if cpu:
            milli = int(cpu[:-1]) if str(cpu).endswith("m") else int(float(cpu) * 1000)
            requests["cpu"] = f"{max(milli // 10, 5)}m"


def _resolve(node: Any, refs: dict[str, str], path: Path) -> Any:
    """Every string of `node` that is a key of `refs` replaced by its value; a `ko://` reference
    without a built image is an error naming the file."""
    if isinstance(node, dict):
        return {k: _resolve(val, refs, path) for k, val in node.items()}
    if isinstance(node, list):
        return [_resolve(val, refs, path) for val in node]
    if isinstance(node, str) and node.startswith("ko://") and node not in refs:
        raise RuntimeError(f"{path}: no image built for {node} (scripts/cluster-build.sh lists the commands)")
    return refs.get(node, node) if isinstance(node, str) else node


# -- applying documents of any kind (discovery, then server-side apply) -------------------

class Applier:
    def __init__(self, admin: kube.Kube):
        self.admin = admin
        self.resources: dict[tuple[str, str], tuple[str, bool]] = {}

    def _discover(self, api_version: str) -> None:
        path = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
        for r in self.admin.get(path)["resources"]:
            if "/" not in r["name"]:
                self.resources[(api_version, r["kind"])] = (r["name"], r["namespaced"])

    def path(self, obj: dict) -> str:
        key = (obj["apiVersion"], obj["kind"])
        if key not in self.resources:
            self._discover(obj["apiVersion"])
        plural, namespaced = self.resources[key]
        base = "/api/v1" if obj["apiVersion"] == "v1" else f"/apis/{obj['apiVersion']}"
        if namespaced:
            base += f"/namespaces/{obj['metadata'].get('namespace', 'default')}"
        return f"{base}/{plural}/{obj['metadata']['name']}"

    def apply(self, obj: dict) -> Any:
        return self.admin.request("PATCH", self.path(obj), obj, content_type="application/apply-patch+yaml",
                                  query="fieldManager=modelplane-test&force=true")


class KnativeNode(node_mod.Node):
    """node.Node on the pinned Kubernetes, with kube-proxy and cluster DNS; `install()` adds
    Knative Serving, Eventing and the ingress, and waits until every Deployment is Available."""

    def __init__(self, builds: Builds, workdir: Optional[Path] = None):
        super().__init__(workdir, bin_dir=builds.kube, etcd=builds.etcd, pause=builds.pause)
        self.builds = builds
        self.applier: Optional[Applier] = None
        self.timings: dict[str, float] = {}
        self._route_localnet = ""

    # -- the node's extra daemons ---------------------------------------------------------
    def _before_kubelet(self) -> None:
        self._route_localnet = node_mod.run("sysctl", "-n", "net.ipv4.conf.all.route_localnet").stdout.strip()
        self._spawn("kube-proxy", [
            str(self.binary("kube-proxy")), "--kubeconfig", str(self.kubeconfig),
            f"--hostname-override={node_mod.NODE_NAME}", "--proxy-mode=iptables",
            f"--cluster-cidr={node_mod.SUBNET_PREFIX}.0/24",
            # NodePorts only on the bridge; no listeners on the host's other addresses.
            f"--nodeport-addresses={node_mod.GATEWAY}/32",
            f"--metrics-bind-address=127.0.0.1:{kube.free_port()}", f"--healthz-bind-address=127.0.0.1:{kube.free_port()}",
            "--oom-score-adj=0",
            # Leave the host's conntrack settings as they are.
            "--conntrack-max-per-core=0", "--conntrack-tcp-timeout-established=0",
            "--conntrack-tcp-timeout-close-wait=0", "-v=1"])
        corefile = self.dir / "Corefile"
        corefile.write_text(f"""{DOMAIN}:53 in-addr.arpa:53 ip6.arpa:53 {{
    bind {node_mod.GATEWAY}
    errors
    kubernetes {DOMAIN} in-addr.arpa ip6.arpa {{
        kubeconfig {self.kubeconfig} test
        pods insecure
    }}
    cache 5
}}
""")
        self._spawn("coredns", [str(self.builds.coredns), "-conf", str(corefile)])

    def kubelet_extra_args(self) -> list[str]:
        return [f"--cluster-dns={node_mod.GATEWAY}", f"--cluster-domain={DOMAIN}"]

    def stop(self, *, logs_to: Optional[Path] = None) -> None:
        if logs_to is not None and self.cluster is not None and self.cluster.admin is not None:
            try:
                logs_to.mkdir(parents=True, exist_ok=True)
                for ns in KNATIVE_NAMESPACES:
                    (logs_to / f"pods-{ns}.txt").write_text(self.diagnose(ns, "", lines=200))
            except Exception as e:  # diagnostics only
                print(f"knative node: collecting pod logs failed: {e}")
        super().stop(logs_to=logs_to)
        # kube-proxy's iptables chains and rules, as `kube-proxy --cleanup` removes them.
        node_mod.run(str(self.binary("kube-proxy")), "--cleanup", check=False, timeout=60)
        if self._route_localnet:
            node_mod.run("sysctl", "-w", f"net.ipv4.conf.all.route_localnet={self._route_localnet}", check=False)

    def memory_mib(self) -> dict[str, float]:
        """Resident memory (MiB) of the node's daemons (API server, etcd, controllers, kubelet,
        kube-proxy, CoreDNS, containerd) and of every process in its pods (the kubepods cgroup:
        Knative, the ingress, modelplane, the models), and their sum."""
        def rss(pid: int) -> int:
            try:
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1])
            except OSError:
                pass
            return 0
        daemons = [p.pid for _, p in self.procs if p.poll() is None]
        daemons += [p.pid for p in (self.cluster.procs if self.cluster else []) if p.poll() is None]
        pods: set[int] = set()
        for procs in Path("/sys/fs/cgroup/memory/kubepods").rglob("cgroup.procs"):
            try:
                pods.update(int(x) for x in procs.read_text().split())
            except OSError:
                pass
        shims = [int(x) for x in node_mod.run("pgrep", "-f", f"containerd-shim.*{self.socket}", check=False).stdout.split()]
        out = {"daemons": sum(rss(p) for p in daemons) / 1024, "pods": sum(rss(p) for p in pods) / 1024,
               "shims": sum(rss(p) for p in shims) / 1024}
        out["node"] = sum(out.values())
        return {k: round(v) for k, v in out.items()}

    # -- Knative ---------------------------------------------------------------------------
    def install(self, images: dict[str, Path], timeout: float = 600) -> None:
        t0 = time.monotonic()
        for archive in images.values():
            self.import_archive(archive)
        self.timings["import images"] = time.monotonic() - t0
        self.applier = Applier(self.admin)
        docs = knative_documents(self.builds, images)
        docs += [_resolve(d, {"TRAEFIK_IMAGE": self.builds.traefik_image}, p)
                 for p in sorted(CLUSTER_YAML.glob("*.yaml")) for d in kube.load_docs(p)]
        first = [d for d in docs if d["kind"] in ("Namespace", "CustomResourceDefinition")]
        for d in first:
            self.applier.apply(d)
        kube.wait_crds_served(self.admin, [d["metadata"]["name"] for d in first
                                           if d["kind"] == "CustomResourceDefinition"])
        rest = [d for d in docs if d not in first]
        self._apply_until_accepted(rest, timeout)
        self.timings["apply"] = time.monotonic() - t0
        self.wait_deployments(KNATIVE_NAMESPACES, timeout)
        self.timings["knative ready"] = time.monotonic() - t0

    def _apply_until_accepted(self, docs: list[dict], timeout: float) -> None:
        """Apply each; what a webhook that is not up yet refuses (it is installed by the same
        documents) is retried until it is accepted."""
        deadline = time.monotonic() + timeout
        pending = docs
        while pending:
            failed = []
            for d in pending:
                try:
                    self.applier.apply(d)
                except kube.ApiError as e:
                    failed.append((d, e))
            if not failed:
                return
            if time.monotonic() > deadline:
                raise RuntimeError("not accepted: " + "; ".join(
                    f"{d['kind']} {d['metadata'].get('namespace', '')}/{d['metadata']['name']}: {e}"
                    for d, e in failed[:5]))
            pending = [d for d, _ in failed]
            time.sleep(2)

    def deployments(self, namespaces) -> Iterator[dict]:
        for ns in namespaces:
            yield from self.admin.get(f"/apis/apps/v1/namespaces/{ns}/deployments")["items"]

    def wait_deployments(self, namespaces, timeout: float) -> None:
        waiting: list[str] = []

        def ready():
            waiting[:] = [f"{d['metadata']['namespace']}/{d['metadata']['name']}" for d in self.deployments(namespaces)
                          if (d["spec"].get("replicas", 1) or 0) > (d.get("status", {}).get("availableReplicas") or 0)]
            return not waiting
        try:
            self.wait(ready, timeout, "every Knative Deployment Available", interval=2)
        except TimeoutError as e:
            raise RuntimeError(f"{e}: waiting for {waiting}\n"
                               + "\n".join(self.describe_pods(ns) for ns in namespaces)) from None
