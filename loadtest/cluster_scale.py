"""The cluster runtime at scale (issue 20): N modelplane Knative Services on the real API server,
read through the watch cache (control/runtime/knative_cache.py).

    python -m loadtest.cluster_scale --services 10000

Starts etcd + kube-apiserver (tests/kube.py `Cluster`, in `--workdir`, kept between runs so the
Services need creating once), installs the Knative CRDs, creates the missing Services (each
rendered by `knative_objects.realtime_service` from a labelled manifest, with the versions and
traffic annotations `deploy` writes and a Ready status as Knative reports it), then measures in
a fresh process — a control pod starting — for each transform (`--transforms`):

- `ready_s`: from the process's start to an Informer over the Services synced (a paged list);
  `list_s` the list alone; target ≤ 30 s.
- `cache_rss_mib`: the process's RSS after the sync less before it; `rss_mib` its whole RSS
  after building the models list; target ≤ 512 MiB.
- `models_*_ms`: `GET /api/models`'s work when the cache changed (every Service status change
  in a busy cluster): `models()` from the cache (each Service's row kept by resourceVersion, as
  a runtime would), then the API's encoded list (`control.api.models.Snapshot`) and its answer,
  unfiltered and filtered by a manifest label (each filter new); p50 and p90 of `--samples`.
  `models_cold_ms` is the first build (every row parsed). `answer_cached_*_ms`: the answer when
  nothing changed (the Snapshot kept), filtered. Target ≤ 20 ms at p50. `rebuild_*_p50_ms` split
  a rebuild: the rows from the cache, their `to_json()`, the Snapshot (encoding, search texts).

The pods behind each model (their replicas) are not in this figure: no kubelet runs.
"""
from __future__ import annotations

import argparse
import gc
import http.client
import json
import os
import ssl
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

import yaml

from .common import percentile

ROOT = Path(__file__).resolve().parent.parent
NS = "modelplane"
SERVICES = f"/apis/serving.knative.dev/v1/namespaces/{NS}/services"


def _kube():
    """tests/kube.py, the test suite's API server (the one place that knows how to start it)."""
    sys.path.insert(0, str(ROOT / "tests"))
    import kube  # noqa: E402

    return kube


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def settings():
    from control.settings import Settings

    return Settings(runtime="knative", namespace=NS, bucket="scale-bucket", registry="registry.test/models",
                    adapter_image="registry.test/adapter:0.1.0", broker="default")


# -- the Services ---------------------------------------------------------------------------------

def service_body(i: int, conf) -> tuple[dict, dict]:
    """(the Service as `deploy` creates it, the status Knative would report for it)."""
    from adapters.manifest import Manifest
    from control.runtime import knative_objects as ko
    from control.runtime.base import Traffic
    from control.runtime.knative import _traffic_json

    from .catalog_bench import manifest_text

    manifest = Manifest.model_validate(yaml.safe_load(manifest_text(i)))
    svc = ko.realtime_service(manifest, conf)
    revision = ko.object_name(manifest)
    svc["metadata"]["annotations"][ko.ANN_VERSIONS] = json.dumps(
        {manifest.version: {"revision": revision, "deployed_at": "2025-01-01T00:00:00Z",
                            "manifest": manifest.to_dict()}}, sort_keys=True)
    svc["metadata"]["annotations"][ko.ANN_TRAFFIC] = _traffic_json(Traffic(live=manifest.version))
    name = manifest.name
    cond = {"type": "Ready", "status": "True", "lastTransitionTime": "2025-01-01T00:00:00Z"}
    status = {"observedGeneration": 1,
              "conditions": [cond, dict(cond, type="ConfigurationsReady"), dict(cond, type="RoutesReady")],
              "url": f"http://{name}.{NS}.example.com",
              "address": {"url": f"http://{name}.{NS}.svc.cluster.local"},
              "latestCreatedRevisionName": revision, "latestReadyRevisionName": revision,
              "traffic": [{"revisionName": revision, "percent": 100, "latestRevision": False, "tag": "v1-0-0",
                           "url": f"http://v1-0-0-{name}.{NS}.example.com"}]}
    return svc, status


class Client:
    """One keep-alive HTTPS connection to the API server (one per creating thread)."""

    def __init__(self, url: str, token: str, ca: Path):
        host, port = url.split("://", 1)[1].rsplit(":", 1)
        self.conn = http.client.HTTPSConnection(host, int(port), context=ssl.create_default_context(cafile=str(ca)),
                                                timeout=60)
        self.headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}

    def call(self, method: str, path: str, body: Optional[dict] = None, content_type: str = "application/json"):
        data = json.dumps(body).encode() if body is not None else None
        self.conn.request(method, path, data, {**self.headers, "Content-Type": content_type})
        resp = self.conn.getresponse()
        raw = resp.read()
        return resp.status, raw


def existing_names(client: Client) -> set[str]:
    names: set[str] = set()
    token = ""
    while True:
        status, raw = client.call("GET", f"{SERVICES}?limit=500" + (f"&continue={token}" if token else ""))
        if status != 200:
            raise RuntimeError(f"listing Services: HTTP {status} {raw[:200]!r}")
        page = json.loads(raw)
        names.update(o["metadata"]["name"] for o in page["items"])
        token = page["metadata"].get("continue") or ""
        if not token:
            return names


def create_services(cluster, count: int, *, workers: int, budget_s: float) -> dict:
    conf = settings()
    clients = threading.local()
    probe = Client(cluster.url, cluster.admin_token, cluster.ca)
    have = existing_names(probe)
    from .catalog_bench import manifest_text

    todo = [i for i in range(count) if yaml.safe_load(manifest_text(i))["name"] not in have]
    deadline = time.monotonic() + budget_s
    failures: list[str] = []

    def make(i: int) -> bool:
        if time.monotonic() > deadline:
            return False
        client = getattr(clients, "c", None)
        if client is None:
            client = clients.c = Client(cluster.url, cluster.admin_token, cluster.ca)
        svc, status = service_body(i, conf)
        code, raw = client.call("POST", SERVICES, svc)
        if code not in (201, 409):
            failures.append(f"create {svc['metadata']['name']}: HTTP {code} {raw[:200]!r}")
            return False
        code, raw = client.call("PATCH", f"{SERVICES}/{svc['metadata']['name']}/status", {"status": status},
                                "application/merge-patch+json")
        if code != 200:
            failures.append(f"status {svc['metadata']['name']}: HTTP {code} {raw[:200]!r}")
            return False
        return True

    t0 = time.monotonic()
    with ThreadPoolExecutor(workers) as pool:
        made = sum(pool.map(make, todo))
    took = time.monotonic() - t0
    if failures:
        print(f"{len(failures)} failures, first: {failures[0]}", file=sys.stderr)
    return {"existing": len(have), "created": made, "create_s": round(took, 1),
            "create_per_s": round(made / took, 1) if made else None, "total": len(have) + made,
            "complete": len(have) + made >= count}


# -- the measurement, in a fresh process ------------------------------------------------------------

def lean_service(obj: dict) -> dict:
    """What `models()` and `model()` read of a Service: metadata (annotations hold the versions and
    the traffic split), `status`, and of `spec` only the traffic list and the template's metadata
    (the fallbacks of a Service applied by hand)."""
    from control.runtime.knative_cache import keep

    out = keep()(obj)
    spec = obj.get("spec") or {}
    out["spec"] = {"traffic": spec.get("traffic") or [],
                   "template": {"metadata": (spec.get("template") or {}).get("metadata") or {}}}
    return out


def measure(mode: str, samples: int) -> dict:
    """Run in the child: KUBECONFIG points at the cluster, as in a control pod."""
    started = time.monotonic()
    from control.api.models import Filter, Snapshot
    from control.runtime import knative_objects as ko
    from control.runtime.knative import MANAGED, KnativeRuntime
    from control.runtime.knative_cache import Informer, api_request, by_label, keep

    transform = {"lean": lean_service, "full": keep(spec=True), "default": keep()}[mode]
    rt = KnativeRuntime(settings())
    rt.api  # the client, from KUBECONFIG as in a pod  # noqa: B018
    gc.collect()
    rss0 = rss_mib()
    t0 = time.monotonic()
    inf = Informer(api_request(lambda: rt.api, rt._path("services")), kind="services", selector=MANAGED,
                   transform=transform, index=by_label(ko.LABEL_MODEL)).start()
    if not inf.wait_synced(600):
        raise RuntimeError(f"not synced after 600 s: {inf.last_error}")
    list_s = time.monotonic() - t0
    ready_s = time.monotonic() - started
    gc.collect()
    rss1 = rss_mib()

    rows: dict[str, tuple[str, object]] = {}  # name -> (resourceVersion, ModelInfo)

    def models():
        _, services = inf.snapshot()
        out = []
        for name, svc in services.items():
            rv = svc["metadata"]["resourceVersion"]
            hit = rows.get(name)
            if hit is None or hit[0] != rv:
                hit = rows[name] = (rv, rt._realtime_detail(svc, [], brief=True))
            out.append(hit[1])
        out.sort(key=lambda m: m.name)
        return out

    def answer(wanted):
        infos = [m.to_json() for m in models()]
        snap = Snapshot(infos)
        body, _, _, total = snap.answer(wanted, None, None)
        return snap, body, total

    t = time.perf_counter()
    snap, body, total = answer(Filter())
    cold_ms = (time.perf_counter() - t) * 1000
    all_ms, filtered_ms, cached_ms, matched = [], [], [], []
    teams = ("fundraising", "membership", "marketing", "finance", "events")
    for k in range(samples):
        t = time.perf_counter()
        answer(Filter())
        all_ms.append((time.perf_counter() - t) * 1000)
        t = time.perf_counter()
        _, _, n = answer(Filter(selectors=(("team", "=", teams[k % len(teams)]),)))
        filtered_ms.append((time.perf_counter() - t) * 1000)
        t = time.perf_counter()
        n2 = snap.answer(Filter(selectors=(("customer", "=", f"c{k:04d}"),)), None, None)[3]
        cached_ms.append((time.perf_counter() - t) * 1000)
        matched.append((n, n2))
    # where a rebuild's time goes: the rows from the cache, their JSON form, the encoded list
    rows_ms, json_ms, snap_ms = [], [], []
    for _ in range(samples):
        t = time.perf_counter()
        listed = models()
        t1 = time.perf_counter()
        infos = [m.to_json() for m in listed]
        t2 = time.perf_counter()
        Snapshot(infos)
        t3 = time.perf_counter()
        rows_ms.append((t1 - t) * 1000)
        json_ms.append((t2 - t1) * 1000)
        snap_ms.append((t3 - t2) * 1000)
    rss2 = rss_mib()
    inf.stop()
    return {"transform": mode, "objects": len(inf), "pages": inf.pages, "list_s": round(list_s, 2),
            "ready_s_in_process": round(ready_s, 2), "rss_before_mib": round(rss0, 1),
            "cache_rss_mib": round(rss1 - rss0, 1), "rss_mib": round(rss2, 1),
            "answer_bytes": len(body), "models_total": total, "models_cold_ms": round(cold_ms, 1),
            "models_all_p50_ms": round(percentile(all_ms, 50), 1),
            "models_all_p90_ms": round(percentile(all_ms, 90), 1),
            "models_filtered_p50_ms": round(percentile(filtered_ms, 50), 1),
            "models_filtered_p90_ms": round(percentile(filtered_ms, 90), 1),
            "rebuild_models_p50_ms": round(percentile(rows_ms, 50), 1),
            "rebuild_to_json_p50_ms": round(percentile(json_ms, 50), 1),
            "rebuild_snapshot_p50_ms": round(percentile(snap_ms, 50), 1),
            "answer_cached_filtered_p50_ms": round(percentile(cached_ms, 50), 3),
            "answer_cached_filtered_p90_ms": round(percentile(cached_ms, 90), 3),
            "matched_team_customer": list(matched[0])}


def kubeconfig(cluster, path: Path) -> Path:
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "scale",
        "clusters": [{"name": "scale", "cluster": {"server": cluster.url, "certificate-authority": str(cluster.ca)}}],
        "users": [{"name": "admin", "user": {"token": cluster.admin_token}}],
        "contexts": [{"name": "scale", "context": {"cluster": "scale", "user": "admin", "namespace": NS}}]}))
    return path


def run_child(config: Path, mode: str, samples: int) -> dict:
    env = {**os.environ, "KUBECONFIG": str(config), "PYTHONPATH": str(ROOT)}
    env.pop("KUBERNETES_SERVICE_HOST", None)
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "loadtest.cluster_scale", "--child", mode, "--samples", str(samples)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        raise RuntimeError(f"measuring {mode} failed:\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["process_s"] = round(time.monotonic() - t0, 2)
    # from exec to synced: the in-process figure plus the interpreter's start before `measure` ran
    result["ready_s"] = result["ready_s_in_process"] + result.pop("startup_s", 0.0)
    return result


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loadtest.cluster_scale", description=__doc__.split("\n\n")[0])
    ap.add_argument("--services", type=int, default=10000)
    ap.add_argument("--workers", type=int, default=8, help="threads creating Services")
    ap.add_argument("--workdir", type=Path, default=Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
                    / "modelplane" / "cluster-scale", help="the API server's folder, kept between runs")
    ap.add_argument("--create-budget", type=float, default=1200.0, help="seconds at most spent creating")
    ap.add_argument("--samples", type=int, default=30)
    ap.add_argument("--transforms", default="lean,full", help="comma-separated: lean, full, default")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        t_exec = time.time() - _process_start()
        result = measure(args.child, args.samples)
        result["startup_s"] = round(t_exec, 2)
        print(json.dumps(result))
        return 0

    kube = _kube()
    binary = kube.apiserver_binary()
    if binary is None or not binary.is_file():
        print("no kube-apiserver binary: run scripts/cluster-build.sh or set MODELPLANE_KUBE_APISERVER",
              file=sys.stderr)
        return 2
    crds = kube.crds_dir()
    if not crds.is_dir():
        crds = Path("/work/shared/knative/crds") if Path("/work/shared/knative/crds").is_dir() else crds
    args.workdir.mkdir(parents=True, exist_ok=True)
    print(f"$ python -m loadtest.cluster_scale --services {args.services} (API server in {args.workdir})",
          flush=True)
    cluster = kube.Cluster(args.workdir, binary).start()
    try:
        present = {c["metadata"]["name"] for c in
                   cluster.admin.get("/apis/apiextensions.k8s.io/v1/customresourcedefinitions")["items"]}
        if "services.serving.knative.dev" not in present:
            cluster.install_crds(crds)
        cluster.admin.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}})
        made = create_services(cluster, args.services, workers=args.workers, budget_s=args.create_budget)
        print(json.dumps({"services": made}), flush=True)
        config = kubeconfig(cluster, args.workdir / "kubeconfig")
        for mode in args.transforms.split(","):
            print(json.dumps(run_child(config, mode.strip(), args.samples)), flush=True)
    finally:
        cluster.stop()
    return 0


def _process_start() -> float:
    """This process's start (wall clock), from /proc: the interpreter's own start-up counts too."""
    ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
    boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                if line.startswith("btime"))
    return boot + ticks / os.sysconf("SC_CLK_TCK")


if __name__ == "__main__":
    sys.exit(main())
