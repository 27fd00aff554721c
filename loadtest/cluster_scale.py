"""The cluster runtime at scale (issue 20): N modelplane Knative Services on the real API server,
read through the watch cache (control/runtime/knative_cache.py).

    python -m loadtest.cluster_scale --services 10000

Starts etcd + kube-apiserver (tests/kube.py `Cluster`, in `--workdir`, kept between runs so the
Services need creating once), installs the Knative CRDs, creates the missing Services (each
rendered by `knative_objects.realtime_service` from a labelled manifest, with the versions and
traffic annotations `deploy` writes and a Ready status as Knative reports it), then measures in
a fresh process — a control pod starting — with the cluster runtime's own watch cache
(`KnativeRuntime.start`) and the API's own list (`control.api.models.ModelList`):

- `ready_s`: from the process's start to the cache synced (every kind listed, in pages);
  target ≤ 30 s.
- `cache_rss_mib`: the process's RSS after the sync less before it; `rss_mib` its whole RSS
  at the end; target ≤ 512 MiB.
- `after_a_change_*_ms`: `GET /api/models`'s answer right after one Service's status changed
  (patched by the admin, as Knative's controllers write it, and delivered by the watch), so the
  list is rebuilt; unfiltered and filtered by a label; p50 and p90 of `--samples`. Target ≤ 20 ms
  at p50. `unchanged_*_p50_ms`: the answer when nothing changed. `models_cold_ms`: the first.

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

def measure(mode: str, samples: int) -> dict:
    """Run in the child: KUBECONFIG points at the cluster, as in a control pod. The runtime is
    started as the control service starts it (its watch cache over Services, Triggers, JobSinks,
    Jobs and Pods), and `GET /api/models` is answered by the API's own `ModelList`."""
    started = time.monotonic()
    import types

    from control.api.models import Filter, ModelList
    from control.runtime.knative import KnativeRuntime

    if mode == "listing":
        return measure_listing(samples)
    if mode != "runtime":
        raise SystemExit(f"unknown mode {mode!r}: runtime (the watch cache) or listing (no cache)")
    rt = KnativeRuntime(settings())
    rt.api  # the client, from KUBECONFIG as in a pod  # noqa: B018
    gc.collect()
    rss0 = rss_mib()
    t0 = time.monotonic()
    rt.start()
    deadline = time.monotonic() + 600
    while not rt.ready():
        if time.monotonic() > deadline:
            raise RuntimeError(f"not synced after 600 s: {rt.problems()}")
        time.sleep(0.02)
    list_s = time.monotonic() - t0
    ready_s = time.monotonic() - started
    gc.collect()
    rss1 = rss_mib()
    plane = types.SimpleNamespace(runtime=rt, failed={}, monitor=types.SimpleNamespace(generation=0, flags=dict),
                                  failed_info=None)
    listing = ModelList(plane)
    services = rt._informers["services"]

    def answer(wanted):
        return listing.current().answer(wanted, None, None)

    t = time.perf_counter()
    body, _, _, total = answer(Filter())
    cold_ms = (time.perf_counter() - t) * 1000
    # A change (a Service's status moves, as Knative's controllers write it): wait until the
    # watch delivered it, then time the answer, which must rebuild.
    admin = _admin()
    profiler = None
    if os.environ.get("MODELPLANE_PROFILE"):   # where a profile of the answers after a change goes
        import cProfile

        profiler = cProfile.Profile()
    run = os.urandom(4).hex()   # the API server is kept between runs: each run's changes are new
    names = sorted(services.snapshot()[1])
    changed_all, changed_filtered, cached_all, cached_filtered = [], [], [], []
    teams = ("fundraising", "membership", "marketing", "finance", "events")
    for k in range(samples):
        for which, (timings, wanted) in enumerate(((changed_all, Filter()),
                                                   (changed_filtered,
                                                    Filter(selectors=(("team", "=", teams[k % len(teams)]),))))):
            generation = rt.models_generation()
            name = names[(k * 7919 + which * 104729) % len(names)]
            admin.merge_patch(f"{SERVICES}/{name}/status", {"status": {"conditions": [
                {"type": "Ready", "status": "True", "lastTransitionTime": f"2024-01-01T00:{k % 60:02d}:00Z",
                 "message": f"run {run} sample {k}.{which}"}]}})
            wait_until = time.monotonic() + 30
            while rt.models_generation() == generation:
                if time.monotonic() > wait_until:
                    raise RuntimeError("the watch did not deliver a status change within 30 s")
                time.sleep(0.002)
            if profiler is not None:
                profiler.enable()
            t = time.perf_counter()
            answer(wanted)
            timings.append((time.perf_counter() - t) * 1000)
            if profiler is not None:
                profiler.disable()
        for timings, wanted in ((cached_all, Filter()),
                                (cached_filtered, Filter(selectors=(("customer", "=", f"c{k:04d}"),)))):
            t = time.perf_counter()
            answer(wanted)
            timings.append((time.perf_counter() - t) * 1000)
    rss2 = rss_mib()
    if profiler is not None:
        import pstats

        with open(os.environ["MODELPLANE_PROFILE"], "w") as out:
            pstats.Stats(profiler, stream=out).sort_stats("cumulative").print_stats(40)
    rt.close()
    return {"mode": mode, "objects": len(services), "pages": services.pages, "list_s": round(list_s, 2),
            "ready_s_in_process": round(ready_s, 2), "rss_before_mib": round(rss0, 1),
            "cache_rss_mib": round(rss1 - rss0, 1), "rss_mib": round(rss2, 1),
            "answer_bytes": len(body), "models_total": total, "models_cold_ms": round(cold_ms, 1),
            "after_a_change_all_p50_ms": round(percentile(changed_all, 50), 1),
            "after_a_change_all_p90_ms": round(percentile(changed_all, 90), 1),
            "after_a_change_filtered_p50_ms": round(percentile(changed_filtered, 50), 1),
            "after_a_change_filtered_p90_ms": round(percentile(changed_filtered, 90), 1),
            "unchanged_all_p50_ms": round(percentile(cached_all, 50), 2),
            "unchanged_filtered_p50_ms": round(percentile(cached_filtered, 50), 2)}


def measure_listing(samples: int) -> dict:
    """Before the watch cache: the runtime not started, so every `GET /api/models` lists every
    Service, Trigger, JobSink, Pod and Job from the API server (how the control service answered
    before); a few samples (each takes seconds)."""
    import types

    from control.api.models import Filter, ModelList
    from control.runtime.knative import KnativeRuntime

    rt = KnativeRuntime(settings())
    plane = types.SimpleNamespace(runtime=rt, failed={}, monitor=types.SimpleNamespace(generation=0, flags=dict),
                                  failed_info=None)
    listing = ModelList(plane)
    rss0 = rss_mib()
    timings = []
    for _ in range(max(1, min(samples, 5))):
        t = time.perf_counter()
        body, _, _, total = listing.current().answer(Filter(), None, None)
        timings.append((time.perf_counter() - t) * 1000)
    rss = rss_mib()
    rt.close()
    return {"mode": "listing", "models_total": total, "answer_bytes": len(body),
            "every_request_p50_ms": round(percentile(timings, 50), 1), "samples": len(timings),
            "rss_before_mib": round(rss0, 1), "rss_mib": round(rss, 1)}


def _admin():
    """The admin client in the child (the KUBECONFIG token), for the status changes."""
    kube = _kube()
    config = yaml.safe_load(Path(os.environ["KUBECONFIG"]).read_text())
    cluster = config["clusters"][0]["cluster"]
    return kube.Kube(cluster["server"], config["users"][0]["user"]["token"], Path(cluster["certificate-authority"]))


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
    if "ready_s_in_process" in result:
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
    ap.add_argument("--modes", default="listing,runtime",
                    help="listing (no cache: how GET /api/models answered before), runtime (the watch cache)")
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
    crds = kube.crds_dir()   # ../shared/knative/crds beside the checkout, or MODELPLANE_KNATIVE_CRDS
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
        for mode in args.modes.split(","):
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
