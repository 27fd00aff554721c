"""A real one-node Kubernetes cluster for the tests: the kube-apiserver + etcd of `kube.Cluster`
(bound to the CNI bridge's gateway address), kube-controller-manager, kube-scheduler, and a
kubelet running real containers through containerd with a CNI bridge. containerd, runc, the CNI
plugins and iptables are Debian's; Kubernetes, etcd and the pod sandbox are built from their
modules by scripts/cluster-build.sh (see ../shared/knative/NODE.md for what was established on
these machines).

Alone it has no kube-proxy, cluster DNS or Knative: tests/knative_cluster.py adds them.
Pods reach the tests' own servers on loopback (the GCS emulator) through `Forwarder`s on the
bridge's gateway address.

The kubelet changes host settings; `Node.stop` restores them: three sysctls, its bind mount of
its root dir, its cgroups, the bridge. One node per machine at a time (a file lock).
"""
from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
import shutil
import socket
import subprocess
import tarfile
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Optional

import kube

PAUSE_IMAGE = "registry.k8s.io/pause:3.6"  # the kubelet's sandbox image, as NODE.md names it
BRIDGE = "mp-cni0"
SUBNET_PREFIX = "10.89.0"  # not podman's default 10.88.0.0/16
GATEWAY = f"{SUBNET_PREFIX}.1"
NODE_NAME = "node1"
KUBELET_SYSCTLS = ("kernel.panic", "kernel.panic_on_oops", "vm.overcommit_memory")
CGROUP_ROOT = Path("/sys/fs/cgroup")
LOCK = Path(tempfile.gettempdir()) / "modelplane-node.lock"
COMPONENTS = ("kubelet", "kube-controller-manager", "kube-scheduler")
DEBIAN_TOOLS = {"containerd": "containerd", "ctr": "containerd", "runc": "runc", "iptables": "iptables",
                "openssl": "openssl", "ip": "iproute2"}


def missing_parts() -> list[str]:
    """What this machine lacks to run a node (empty when it can)."""
    missing = [f"{tool} (Debian {pkg})" for tool, pkg in DEBIAN_TOOLS.items() if shutil.which(tool) is None]
    if not Path("/usr/lib/cni/bridge").is_file():
        missing.append("/usr/lib/cni/bridge (Debian containernetworking-plugins)")
    for name in ("kube-apiserver", *COMPONENTS, "pause"):
        if kube.kube_binary(name) is None:
            missing.append(f"{name} (scripts/cluster-build.sh builds it)")
    if os.geteuid() != 0:
        missing.append("root (the kubelet and containerd run as root)")
    return missing


def run(*args: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(args), capture_output=True, text=True, timeout=kw.pop("timeout", 300), **kw)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}")
    return proc


# -- images ---------------------------------------------------------------------------------

def pause_archive(path: Path, binary: Path) -> Path:
    """An OCI image archive of the sandbox image: the `pause` binary built from the Kubernetes
    tree (build/pause/linux/pause.c), as its Dockerfile builds it (FROM scratch, ENTRYPOINT /pause)."""
    layer = io.BytesIO()
    with tarfile.open(fileobj=layer, mode="w") as tar:
        info = tarfile.TarInfo("pause")
        data = binary.read_bytes()
        info.size, info.mode = len(data), 0o755
        tar.addfile(info, io.BytesIO(data))
    layer_bytes = layer.getvalue()
    layer_digest = hashlib.sha256(layer_bytes).hexdigest()
    config = json.dumps({
        "architecture": "amd64" if os.uname().machine == "x86_64" else "arm64", "os": "linux",
        "config": {"Entrypoint": ["/pause"], "User": "65535:65535"},
        "rootfs": {"type": "layers", "diff_ids": [f"sha256:{layer_digest}"]},
    }).encode()
    blobs = {layer_digest: layer_bytes, hashlib.sha256(config).hexdigest(): config}
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": f"sha256:{hashlib.sha256(config).hexdigest()}", "size": len(config)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": f"sha256:{layer_digest}", "size": len(layer_bytes)}],
    }).encode()
    manifest_digest = hashlib.sha256(manifest).hexdigest()
    blobs[manifest_digest] = manifest
    index = json.dumps({"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": f"sha256:{manifest_digest}",
        "size": len(manifest), "annotations": {"io.containerd.image.name": PAUSE_IMAGE,
                                               "org.opencontainers.image.ref.name": "3.6"}}]}).encode()
    with tarfile.open(path, "w") as tar:
        for name, data in [("oci-layout", b'{"imageLayoutVersion": "1.0.0"}'), ("index.json", index),
                           *((f"blobs/sha256/{d}", b) for d, b in blobs.items())]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


# -- a TCP forwarder: what kube-proxy would give pods -----------------------------------------

class Forwarder:
    """Accepts on `listen` (the bridge's gateway address) and forwards to `target` on loopback."""

    def __init__(self, listen: tuple[str, int], target: tuple[str, int]):
        self.target = target
        self.sock = socket.create_server(listen)
        self.address = self.sock.getsockname()[:2]
        self._stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=10)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while chunk := src.recv(65536):
                dst.sendall(chunk)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self._stop.set()
        self.sock.close()


# -- the node -------------------------------------------------------------------------------

def _certificates(folder: Path) -> tuple[Path, Path, Path]:
    """A CA and the API server's serving certificate, valid for loopback, the bridge gateway (pods
    connect there) and the `kubernetes` Service's names."""
    folder.mkdir(parents=True, exist_ok=True)
    ca_key, ca, key, csr, cert = (folder / n for n in ("ca.key", "ca.crt", "apiserver.key", "apiserver.csr",
                                                       "apiserver.crt"))
    run("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(ca_key), "-out", str(ca),
        "-days", "2", "-subj", "/CN=modelplane-test-ca")
    run("openssl", "req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr),
        "-subj", "/CN=kube-apiserver")
    ext = folder / "san.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1,IP:10.96.0.1,IP:" + GATEWAY
                   + ",DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc\n"
                   "extendedKeyUsage=serverAuth\n")
    run("openssl", "x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key), "-CAcreateserial",
        "-out", str(cert), "-days", "2", "-extfile", str(ext))
    return cert, key, ca


class Node:
    """`start()` brings up the cluster and a Ready node; `stop()` takes it all down and restores
    the host. `admin` is a kube.Kube with system:masters; `kubeconfig` a file for kubectl."""

    def __init__(self, workdir: Optional[Path] = None, *, bin_dir: Optional[Path] = None,
                 etcd: Optional[Path] = None, pause: Optional[Path] = None):
        """`bin_dir`: the Kubernetes binaries, `etcd` and `pause` (default: scripts/cluster-build.sh's,
        at the versions scripts/cluster-versions.env pins)."""
        # Short paths: containerd's socket path must fit a sockaddr_un.
        self.dir = Path(workdir or tempfile.mkdtemp(prefix="mp-node-", dir="/tmp"))
        self.bin_dir = bin_dir
        self.etcd = etcd
        self.pause = pause
        self.minor = kube.binary_minor(self.binary("kube-apiserver"))
        self.procs: list[tuple[str, subprocess.Popen]] = []
        self.cluster: Optional[kube.Cluster] = None
        self.forwarders: list[Forwarder] = []
        self.sysctls: dict[str, str] = {}
        self._lock_file = None
        self._bridge_created = False
        self.kubelet_root = self.dir / "kubelet"
        self.socket = self.dir / "ctd" / "containerd.sock"
        self.api_on_bridge: tuple[str, int] = ("", 0)

    def binary(self, name: str) -> Path:
        if self.bin_dir is not None:
            return self.bin_dir / name
        found = kube.kube_binary(name)
        if found is None:
            raise RuntimeError(f"no {name}: scripts/cluster-build.sh builds it")
        return found

    def klog(self) -> list[str]:
        """Logging flags: klog's --logtostderr was removed from the components in 1.26."""
        return (["--logtostderr=true"] if self.minor < 26 else []) + ["-v=1"]

    # -- lifecycle ------------------------------------------------------------------------
    def start(self, *, timeout: float = 120.0) -> "Node":
        self._lock_file = open(LOCK, "w")
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise RuntimeError(f"another test node runs on this machine ({LOCK} is locked)") from None
        try:
            self._start(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self, timeout: float) -> None:
        self.sysctls = {k: run("sysctl", "-n", k).stdout.strip() for k in KUBELET_SYSCTLS}
        self._bridge()
        tls = _certificates(self.dir / "pki")
        (self.dir / "api").mkdir(parents=True, exist_ok=True)
        # From 1.24 on, kube-proxy routes the `kubernetes` Service to the API server's advertised
        # address: it binds the bridge's gateway, which pods reach. Before, a forwarder stands in.
        bind = GATEWAY if self.minor >= 24 else "127.0.0.1"
        self.cluster = kube.Cluster(self.dir / "api", self.binary("kube-apiserver"), tls=tls, etcd=self.etcd,
                                    bind=bind, minor=self.minor, extra_args=[
            "--authorization-mode", "Node,RBAC", "--allow-privileged=true",
            "--kubelet-preferred-address-types", "InternalIP"]).start()
        self.admin = self.cluster.admin
        self.kubeconfig = self._kubeconfig()
        self.api_on_bridge = (GATEWAY, self.cluster.port) if bind == GATEWAY else self.forward(self.cluster.port)
        self._containerd()
        self.import_archive(pause_archive(self.dir / "pause-oci.tar", self.pause or self.binary("pause")))
        self._controllers()
        self._before_kubelet()
        self._kubelet()
        self._wait_node_ready(timeout)
        self._default_service_account("default", timeout)

    def stop(self, *, logs_to: Optional[Path] = None) -> None:
        """Workloads first (so the kubelet removes their containers), then every process, then the host.
        The components' logs are copied to `logs_to` first, if given."""
        if self.cluster is not None and self.cluster.admin is not None and self._running("kubelet"):
            try:
                self._delete_workloads()
            except Exception as e:  # best effort: the host cleanup below must still run
                print(f"node: deleting workloads failed: {e}")
        kube.stop_processes([proc for _, proc in reversed(self.procs)], grace=15)
        self.procs.clear()
        self._kill_leftover_shims()
        for f in self.forwarders:
            f.close()
        self.forwarders.clear()
        if self.cluster is not None:
            self.cluster.stop()
        if logs_to is not None:
            logs_to.mkdir(parents=True, exist_ok=True)
            for f in [*self.dir.glob("*.log"), *self.dir.glob("api/*.log")]:
                shutil.copy(f, logs_to / f.name)
        self._restore_host()
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    # -- pieces ---------------------------------------------------------------------------
    def _spawn(self, name: str, args: list[str], env: Optional[dict] = None) -> subprocess.Popen:
        log = open(self.dir / f"{name}.log", "wb")
        # a node's own umask, whatever the test process's (a plane started in it makes its own 077):
        # containerd unpacks image layers with it, and a 0700 /ko-app is no use to user 65532
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, env=env, umask=0o022)
        log.close()
        self.procs.append((name, proc))
        return proc

    def _running(self, name: str) -> bool:
        return any(n == name and p.poll() is None for n, p in self.procs)

    def _bridge(self) -> None:
        """The CNI bridge, made before the pods so that forwarders can listen on its gateway address."""
        if run("ip", "link", "show", BRIDGE, check=False).returncode != 0:
            run("ip", "link", "add", BRIDGE, "type", "bridge")
            self._bridge_created = True
        run("ip", "addr", "replace", f"{GATEWAY}/24", "dev", BRIDGE)
        run("ip", "link", "set", BRIDGE, "up")

    def forward(self, port: int) -> tuple[str, int]:
        """Make 127.0.0.1:`port` reachable from pods, at the returned (gateway, port)."""
        f = Forwarder((GATEWAY, 0), ("127.0.0.1", port))
        self.forwarders.append(f)
        return f.address

    def _kubeconfig(self) -> Path:
        path = self.dir / "kubeconfig"
        path.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "test",
            "clusters": [{"name": "test", "cluster": {"server": self.cluster.url,
                                                      "certificate-authority": str(self.cluster.ca)}}],
            "users": [{"name": "admin", "user": {"token": self.cluster.admin_token}}],
            "contexts": [{"name": "test", "context": {"cluster": "test", "user": "admin"}}],
        }))
        path.chmod(0o600)
        return path

    def _containerd(self) -> None:
        ctd = self.dir / "ctd"
        cni = self.dir / "cni"
        for d in (ctd, cni):
            d.mkdir(parents=True, exist_ok=True)
        (cni / "10-modelplane.conflist").write_text(json.dumps({
            "cniVersion": "0.4.0", "name": "modelplane-test",
            "plugins": [{"type": "bridge", "bridge": BRIDGE, "isGateway": True, "ipMasq": False,
                         "hairpinMode": True,
                         "ipam": {"type": "host-local", "dataDir": str(self.dir / "ipam"),
                                  "ranges": [[{"subnet": f"{SUBNET_PREFIX}.0/24", "gateway": GATEWAY}]],
                                  "routes": [{"dst": "0.0.0.0/0"}]}},
                        {"type": "portmap", "capabilities": {"portMappings": True}}]}))
        config = ctd / "config.toml"
        config.write_text(f'''version = 2
root = "{ctd}/root"
state = "{ctd}/state"
[grpc]
  address = "{self.socket}"
[ttrpc]
  address = "{self.socket}.ttrpc"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  restrict_oom_score_adj = true
  disable_hugetlb_controller = true
  tolerate_missing_hugetlb_controller = true
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{cni}"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
''')
        proc = self._spawn("containerd", ["containerd", "--config", str(config)])
        deadline = time.monotonic() + 30
        while not self.socket.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"containerd did not start:\n{self.log_tail('containerd')}")
            time.sleep(0.1)

    def ctr(self, *args: str, timeout: float = 600) -> str:
        return run("ctr", "--address", str(self.socket), "--namespace", "k8s.io", *args, timeout=timeout).stdout

    def import_archive(self, archive: Path) -> None:
        """An OCI image archive into containerd's `k8s.io` namespace, where the kubelet finds it."""
        self.ctr("images", "import", str(archive))

    def images(self) -> set[str]:
        return set(self.ctr("images", "list", "--quiet").split())

    def _controllers(self) -> None:
        k = str(self.kubeconfig)
        insecure_off = ["--port=0"] if self.minor < 24 else []  # the insecure port is gone from 1.24
        self._spawn("kube-controller-manager", [
            str(self.binary("kube-controller-manager")), "--kubeconfig", k, "--leader-elect=false",
            *insecure_off, "--secure-port=0", "--controllers=*",
            "--service-account-private-key-file", str(self.cluster.workdir / "sa.key"),
            "--root-ca-file", str(self.cluster.ca), "--use-service-account-credentials=false",
            *self.klog()])
        self._spawn("kube-scheduler", [
            str(self.binary("kube-scheduler")), "--kubeconfig", k, "--leader-elect=false",
            *insecure_off, "--secure-port=0", *self.klog()])

    def _before_kubelet(self) -> None:
        """What a subclass starts between the controllers and the kubelet (kube-proxy, DNS)."""

    def kubelet_extra_args(self) -> list[str]:
        return []

    def _kubelet(self) -> None:
        self.kubelet_root.mkdir(parents=True, exist_ok=True)
        # --container-runtime went in 1.27; containerd's sandbox_image names the pause image.
        old = ["--container-runtime=remote", f"--pod-infra-container-image={PAUSE_IMAGE}"] if self.minor < 27 else []
        self._spawn("kubelet", [
            str(self.binary("kubelet")),
            *old, f"--container-runtime-endpoint=unix://{self.socket}",
            f"--kubeconfig={self.kubeconfig}", "--cgroup-driver=cgroupfs", "--fail-swap-on=false",
            "--oom-score-adj=0", f"--root-dir={self.kubelet_root}", f"--cert-dir={self.dir / 'kubelet-pki'}",
            f"--hostname-override={NODE_NAME}",
            "--register-node=true",
            # Its API (where the API server reads logs) on the bridge's private address only, on a
            # free port: a node IP may not be loopback.
            f"--address={GATEWAY}", f"--node-ip={GATEWAY}", f"--port={kube.free_port(GATEWAY)}",
            "--read-only-port=0", "--healthz-port=0",
            "--make-iptables-util-chains=false",
            # Never evict or collect the test images, whatever the disk looks like.
            "--eviction-hard=memory.available<1Mi,nodefs.available<1%,imagefs.available<1%",
            "--image-gc-high-threshold=100", "--image-gc-low-threshold=99",
            "--runtime-request-timeout=5m",
            f"--volume-plugin-dir={self.dir / 'volume-plugins'}",
            *self.kubelet_extra_args(), *self.klog()])

    def _wait_node_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, proc in self.procs:
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode}:\n{self.log_tail(name)}")
            try:
                node = self.admin.get(f"/api/v1/nodes/{NODE_NAME}")
                if any(c["type"] == "Ready" and c["status"] == "True" for c in node["status"].get("conditions", [])):
                    return
            except kube.ApiError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"node {NODE_NAME} not Ready after {timeout:.0f}s:\n{self.log_tail('kubelet')}")

    def _default_service_account(self, namespace: str, timeout: float) -> None:
        self.wait(lambda: self.admin.get(f"/api/v1/namespaces/{namespace}/serviceaccounts/default"),
                  timeout, f"the default ServiceAccount of {namespace}")

    # -- helpers for tests ------------------------------------------------------------------
    def wait(self, probe: Callable[[], object], timeout: float, what: str, *, interval: float = 0.5):
        """`probe()` until it returns something truthy without raising kube.ApiError."""
        deadline = time.monotonic() + timeout
        last: object = None
        while time.monotonic() < deadline:
            try:
                last = probe()
                if last:
                    return last
            except kube.ApiError as e:
                last = e
            time.sleep(interval)
        raise TimeoutError(f"{what}: not there after {timeout:.0f}s (last: {str(last)[:500]})")

    def namespace(self, name: str) -> None:
        self.admin.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
        self._default_service_account(name, 60)

    def pod_logs(self, namespace: str, pod: str, container: str) -> str:
        return self.admin.request("GET", f"/api/v1/namespaces/{namespace}/pods/{pod}/log",
                                  query=f"container={container}")

    def describe_pods(self, namespace: str, selector: str = "") -> str:
        """Phase, conditions, container states and recent events: what a failing test prints."""
        pods = self.admin.request("GET", f"/api/v1/namespaces/{namespace}/pods",
                                  query=f"labelSelector={selector}" if selector else "")["items"]
        out = []
        for p in pods:
            st = p.get("status", {})
            out.append(f"pod {p['metadata']['name']}: {st.get('phase')} ip={st.get('podIP')}")
            for c in st.get("initContainerStatuses", []) + st.get("containerStatuses", []):
                out.append(f"  {c['name']}: ready={c.get('ready')} state={json.dumps(c.get('state'))}")
        events = self.admin.request("GET", f"/api/v1/namespaces/{namespace}/events")["items"]
        out += [f"event {e['involvedObject']['name']}: {e.get('reason')}: {e.get('message')}" for e in events[-25:]]
        return "\n".join(out)

    def diagnose(self, namespace: str, selector: str, lines: int = 30) -> str:
        """`describe_pods` plus the last lines of every container's log: what a failing test prints."""
        out = [self.describe_pods(namespace, selector)]
        pods = self.admin.request("GET", f"/api/v1/namespaces/{namespace}/pods", query=f"labelSelector={selector}")
        for p in pods["items"]:
            for c in p["spec"].get("initContainers", []) + p["spec"]["containers"]:
                try:
                    text = self.pod_logs(namespace, p["metadata"]["name"], c["name"])
                except kube.ApiError as e:
                    text = f"(no log: {e})"
                tail = "\n    ".join(str(text).splitlines()[-lines:])
                out.append(f"--- {p['metadata']['name']} {c['name']}:\n    {tail}")
        return "\n".join(out)

    def log_tail(self, name: str, lines: int = 40) -> str:
        f = self.dir / f"{name}.log"
        return "\n".join(f.read_text(errors="replace").splitlines()[-lines:]) if f.is_file() else ""

    # -- teardown -------------------------------------------------------------------------
    def _delete_workloads(self, timeout: float = 60.0) -> None:
        """Delete every workload and pod, again each round until no pod is left: controllers still
        running (a StatefulSet's, Knative's) may make new ones meanwhile."""
        kinds = ("apis/apps/v1/namespaces/{}/deployments", "apis/apps/v1/namespaces/{}/statefulsets",
                 "apis/apps/v1/namespaces/{}/daemonsets", "apis/batch/v1/namespaces/{}/jobs", "api/v1/namespaces/{}/pods")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.admin.get("/api/v1/pods")["items"]:
                break
            for ns in [n["metadata"]["name"] for n in self.admin.get("/api/v1/namespaces")["items"]]:
                for kind in kinds:
                    try:
                        self.admin.request("DELETE", "/" + kind.format(ns), query="propagationPolicy=Background")
                    except kube.ApiError:
                        pass  # a kind this API server does not serve, or a namespace being deleted
            time.sleep(2)
        # The kubelet removes a deleted pod's sandbox a moment after the pod object goes.
        while time.monotonic() < deadline:
            sandboxes = run("ctr", "--address", str(self.socket), "--namespace", "k8s.io", "containers", "list",
                            "--quiet", check=False).stdout.split()
            if not sandboxes:
                break
            time.sleep(0.5)

    def _kill_leftover_shims(self) -> None:
        """containerd-shim processes of this node's containerd, if a sandbox outlived it, and what
        they ran (a sandbox's /pause outlives a killed shim): every process in the kubepods cgroup."""
        proc = run("pgrep", "-f", f"containerd-shim.*{self.socket}", check=False)
        pids = [int(p) for p in proc.stdout.split()]
        for procs in (CGROUP_ROOT / "pids" / "kubepods").rglob("cgroup.procs"):
            try:
                pids += [int(p) for p in procs.read_text().split()]
            except OSError:
                pass  # the cgroup went meanwhile
        for pid in pids:
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass

    def _restore_host(self) -> None:
        for key, value in self.sysctls.items():
            run("sysctl", "-w", f"{key}={value}", check=False)
        # The kubelet bind-mounts its root dir onto itself, and mounts pod volumes under it.
        mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()
                  if line.split()[1].startswith(str(self.dir))]
        for m in sorted(mounts, key=len, reverse=True):
            run("umount", "-l", m, check=False)
        for controller in CGROUP_ROOT.iterdir() if CGROUP_ROOT.is_dir() else []:
            top = controller / "kubepods"
            if top.is_dir():
                for d in sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: len(p.parts),
                                reverse=True):
                    try:
                        d.rmdir()
                    except OSError:
                        pass
                try:
                    top.rmdir()
                except OSError:
                    pass
        if self._bridge_created:
            run("ip", "link", "del", BRIDGE, check=False)
        shutil.rmtree(self.dir, ignore_errors=True)
