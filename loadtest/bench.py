"""The benchmark behind `python -m loadtest` / `modelplane bench`: every DESIGN.md number, each against
a baseline measured in the same run, on an embedded plane this module starts and stops itself.

Sections (all by default; `--only` picks some):

- `overhead` — p50/p99 of a 1-row request at 1, 8 and 32 clients: model alone, adapter in
  front of it, and the control route + the runtime's adapter. Overhead = p50(path) − p50(model).
- `cold` — scaled to zero → first score through the control route, Python and R realtime
  examples (benchmark copies with `idle_timeout: 1s`); baseline: the model process started
  alone until `/health` answers.
- `batch` — N rows end to end (upload through the API → bucket event → job → results in the
  bucket) against the batch model alone on a local file; the adapter's peak RSS at two sizes.
- `burst` — a burst of simultaneous requests against a model at zero; failures must be 0;
  baseline: the same burst against the warm model.
- `list` — `GET /api/models` with 10,000 registered models; baseline: the examples alone.
- `rollout` — the control route's p50 with a 10 % split and with a 100 % shadow against the
  same route with no rollout (loadtest/rollout_bench.py).
- `catalog` — 10,000 labelled models searched through the API and the console in Chromium
  (loadtest/catalog_bench.py).
- `locust` — the locust scenarios (steady, burst, mix) briefly, as extra figures (full mode).
"""
from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from adapters.manifest import load_manifest
from control.emulator import free_port, wait_for_port

from . import measure, rollout_bench
from .common import bench_copy, examples, median, percentile, sample_rows, write_dataset
from .plane import EmbeddedPlane, PlaneError, copy_models
from .report import Figure, cold_start_chart, latency_chart, table, write_json

log = logging.getLogger(__name__)

SECTIONS = ("overhead", "cold", "burst", "batch", "list", "catalog", "rollout", "locust")
CONCURRENCY = (1, 8, 32)


@dataclass
class Config:
    quick: bool = False
    out: Path = Path("artifacts/bench")
    only: tuple[str, ...] = SECTIONS
    keep: bool = False

    @property
    def cold_samples(self) -> int:
        return 3 if self.quick else 10

    @property
    def latency_requests(self) -> dict[int, int]:
        return {1: 300, 8: 800, 32: 1600} if self.quick else {1: 1500, 8: 4000, 32: 6400}

    @property
    def latency_rounds(self) -> int:
        return 1 if self.quick else 3

    @property
    def batch_sizes(self) -> tuple[int, int]:
        return (10_000, 100_000) if self.quick else (100_000, 1_000_000)

    @property
    def batch_repeats(self) -> int:
        return 1 if self.quick else 2

    @property
    def batch_languages(self) -> tuple[str, ...]:
        return ("python",) if self.quick else ("python", "r")

    @property
    def registered_models(self) -> int:
        return 1_000 if self.quick else 10_000

    @property
    def burst_size(self) -> int:
        return 32 if self.quick else 64

    @property
    def burst_rounds(self) -> int:
        return 1 if self.quick else 3


@dataclass
class Bench:
    cfg: Config
    figures: list[Figure] = field(default_factory=list)
    details: dict = field(default_factory=dict)
    charts: list[str] = field(default_factory=list)
    errors: dict = field(default_factory=dict)

    def __post_init__(self):
        self.examples = examples()
        self.rt_py = self.examples.get(("realtime", "python"))
        self.rt_r = self.examples.get(("realtime", "r"))
        self.plane: Optional[EmbeddedPlane] = None

    # -- orchestration ---------------------------------------------------------------------
    def run(self) -> int:
        out = Path(self.cfg.out)
        out.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        meta = {"mode": "quick" if self.cfg.quick else "full", "machine": measure.machine(),
                "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "python": sys.version.split()[0],
                "command": "python -m loadtest" + (" --quick" if self.cfg.quick else "")}
        with tempfile.TemporaryDirectory(prefix="modelplane-bench-") as tmp:
            self.tmp = Path(tmp)
            try:
                self._start_plane()
                for section in SECTIONS:
                    if section not in self.cfg.only:
                        continue
                    t0 = time.monotonic()
                    self._section(section)
                    self.details.setdefault("section_seconds", {})[section] = round(time.monotonic() - t0, 1)
            finally:
                if self.plane is not None:
                    self.plane.stop()
        meta["wall_seconds"] = round(time.monotonic() - started, 1)
        meta["errors"] = self.errors
        if "overhead" in self.details:
            p = latency_chart(out / "latency_vs_concurrency.png", self.details["overhead"]["by_path"])
            if p:
                self.charts.append(str(p))
        if "cold_start" in self.details:
            p = cold_start_chart(out / "cold_start.png", self.details["cold_start"])
            if p:
                self.charts.append(str(p))
        meta["charts"] = self.charts
        write_json(out / "report.json", figures=self.figures, details=self.details, meta=meta)
        text = table(self.figures)
        (out / "table.md").write_text(text + "\n", encoding="utf-8")
        print()
        print(text)
        print(f"\n{meta['mode']} run in {meta['wall_seconds']:.0f} s on {meta['machine']['nproc']} CPU(s) "
              f"({meta['machine']['cpu_model']}); report: {out / 'report.json'}; charts: {', '.join(self.charts)}")
        for section, err in self.errors.items():
            print(f"section {section} failed: {err}", file=sys.stderr)
        return 1 if self.errors else 0

    def _section(self, name: str) -> None:
        fn: Callable[[], None] = getattr(self, f"bench_{name}")
        print(f"[bench] {name} …", file=sys.stderr, flush=True)
        try:
            fn()
        except Exception as e:  # one broken section must not hide the others' figures
            log.exception("section %s failed", name)
            self.errors[name] = f"{type(e).__name__}: {e}"

    def _start_plane(self) -> None:
        models = self.tmp / "models"
        copy_models(self.examples.values(), models)
        self.cold_names = {}
        for lang, m in (("python", self.rt_py), ("r", self.rt_r)):
            if m is None:
                continue
            self.cold_names[lang] = bench_copy(m, models, suffix="bench-cold",
                                               scaling={"min": 0, "idle_timeout": "1s"}).name
        self.burst_name = self.route_name = None
        if self.rt_py is not None:
            # the route's cost, not the autoscaler's: one replica, as the adapter alone is one
            self.route_name = bench_copy(self.rt_py, models, suffix="bench-route",
                                         scaling={"min": 1, "max": 1, "idle_timeout": "10m"}).name
            self.burst_name = bench_copy(self.rt_py, models, suffix="bench-burst",
                                         scaling={"min": 0, "max": 4, "target_concurrency": 4,
                                                  "idle_timeout": "1s"}).name
        names = [load_manifest(p, check_files=False).name for p in sorted(models.iterdir())
                 if (p / "model.yaml").is_file()]
        self.plane = EmbeddedPlane(self.tmp / "plane", models_dir=models)
        t0 = time.monotonic()
        self.plane.start(expect=names)
        self.details["plane_start_s"] = round(time.monotonic() - t0, 2)
        self.details["models"] = names

    # -- adapter and control-route overhead -----------------------------------------------------
    def bench_overhead(self) -> None:
        """1 row at 1, 8 and 32 clients and 100 rows at 1 client, on three paths measured in turn
        within each round: the model alone, the adapter in front of it, the control route (to a
        copy of the model held at one replica, so the figures are the route's, not scaling's)."""
        m = self.rt_py
        rows = sample_rows(m)
        row = rows[0]
        body = json.dumps({"rows": [row]}).encode()
        body100 = json.dumps({"rows": [rows[i % len(rows)] for i in range(100)]}).encode()
        labels = ("model alone", "adapter", "control route + adapter")
        by_path: dict[str, dict[int, measure.Latency]] = {label: {} for label in labels}
        rows100: dict[str, measure.Latency] = {}
        with measure.ModelProcess(m) as model:
            adapter_port = free_port()
            adapter = subprocess.Popen(
                [sys.executable, "-m", "adapters", "serve", str(m.folder), "--port", str(adapter_port),
                 "--model-url", model.url], env=dict(os.environ, MODELPLANE_LOG_LEVEL="WARNING"),
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
            try:
                wait_for_port("127.0.0.1", adapter_port, timeout=30, proc=adapter)
                deadline = time.monotonic() + 30
                while not measure.http_ok("127.0.0.1", adapter_port, "/v2/health/ready"):
                    if time.monotonic() > deadline:
                        raise RuntimeError("the adapter never became ready")
                    time.sleep(0.02)
                time.sleep(0.5)
                # at idle, before any load: the adapter's own memory, and the model's beside it
                rss = {"adapter": measure.rss_bytes(adapter.pid) / 2**20, "model": measure.rss_bytes(model.proc.pid) / 2**20}
                urls = {"model alone": f"{model.url}/predict",
                        "adapter": f"http://127.0.0.1:{adapter_port}/predict",
                        "control route + adapter": f"{self.plane.url}/models/{self.route_name}/predict"}
                status, answer = measure.post_json(urls["control route + adapter"], {"rows": [row]},
                                                   headers=self.plane.auth)
                if status != 200:
                    raise RuntimeError(f"control route answered {status}: {answer}")
                for _ in range(self.cfg.latency_rounds):
                    for c in CONCURRENCY:
                        # interleaved per round so machine noise lands on every path alike
                        for label, url in urls.items():
                            # every path gets the token header: the same bytes on each, the control route checks it
                            lat = measure.closed_loop(url, body, concurrency=c, headers=self.plane.auth,
                                                      requests=self.cfg.latency_requests[c] // self.cfg.latency_rounds)
                            _merge(by_path[label], c, lat)
                    for label, url in urls.items():
                        lat = measure.closed_loop(url, body100, concurrency=1, headers=self.plane.auth,
                                                  requests=self.cfg.latency_requests[1] // (2 * self.cfg.latency_rounds))
                        _merge(rows100, label, lat)
            finally:
                adapter.terminate()
                try:
                    adapter.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    adapter.kill()
                    adapter.wait()
                adapter.stderr.close()
        summary = {label: {c: lat.summary() for c, lat in by_c.items()} for label, by_c in by_path.items()}
        self.details["overhead"] = {"model": m.name, "row": row, "by_path": summary,
                                    "rows100": {label: lat.summary() for label, lat in rows100.items()},
                                    "idle_rss_mib": rss}
        model_, adapter_, control = (by_path[label] for label in labels)
        for label, key, by in (("adapter", "adapter", adapter_), ("control route + adapter", "control", control)):
            for c in CONCURRENCY:
                base, path = model_[c], by[c]
                target = 0.3 if key == "adapter" and c == 1 else None
                self.figures.append(Figure(
                    id=f"{key}_overhead_p50_c{c}", title=f"{label} adds, p50, {c} client{'s' if c > 1 else ''}",
                    unit="ms", value=path.p50 - base.p50, baseline=base.p50, baseline_label="model alone p50",
                    target=target, ratio=path.p50 / base.p50 if base.p50 else None,
                    ratio_of="p50(path) / p50(model alone)", samples=len(path.samples_ms),
                    extra={"p50_ms": path.p50, "p99_ms": path.p99, "baseline_p99_ms": base.p99,
                           "p99_overhead_ms": path.p99 - base.p99, "errors": path.errors + base.errors,
                           "rps": path.rps, "baseline_rps": base.rps}))
        self.figures.append(Figure(
            id="adapter_rps_ratio_c8", title="adapter throughput ÷ model alone, 8 clients", unit="×",
            value=adapter_[8].rps / model_[8].rps, baseline=1.0,
            baseline_label=f"model alone = 1 ({model_[8].rps:,.0f} req/s; adapter {adapter_[8].rps:,.0f})",
            target=0.6, op=">=", ratio=None, ratio_of="", samples=len(adapter_[8].samples_ms),
            extra={"adapter_rps": adapter_[8].rps, "model_rps": model_[8].rps}))
        base100, adapter100 = rows100["model alone"], rows100["adapter"]
        self.figures.append(Figure(
            id="adapter_overhead_p50_100rows", title="adapter adds, p50, 100 rows a request, 1 client", unit="ms",
            value=adapter100.p50 - base100.p50, baseline=base100.p50, baseline_label="model alone p50, 100 rows",
            target=0.5, samples=len(adapter100.samples_ms),
            extra={"control_route_p50_ms": rows100["control route + adapter"].p50}))
        self.figures.append(Figure(
            id="adapter_idle_rss", title="adapter resident memory at idle (beside its model)", unit="MiB",
            value=rss["adapter"], baseline=rss["model"], baseline_label="the model process's own", target=40.0,
            samples=1))
        for c in CONCURRENCY:
            self.figures.append(Figure(
                id=f"control_vs_adapter_p50_c{c}",
                title=f"control route p50 ÷ adapter p50, {c} client{'s' if c > 1 else ''}", unit="×",
                value=control[c].p50 / adapter_[c].p50, baseline=1.0,
                baseline_label=f"adapter = 1 ({adapter_[c].p50:.3g} ms; route {control[c].p50:.3g} ms)",
                target=1.3, ratio=None, ratio_of="", samples=len(control[c].samples_ms),
                extra={"control_p50_ms": control[c].p50, "control_p99_ms": control[c].p99,
                       "adapter_p99_ms": adapter_[c].p99}))
        self.figures.append(Figure(
            id="control_vs_adapter_rps_c8", title="control route throughput ÷ adapter, 8 clients", unit="×",
            value=control[8].rps / adapter_[8].rps, baseline=1.0,
            baseline_label=f"adapter = 1 ({adapter_[8].rps:,.0f} req/s; route {control[8].rps:,.0f})",
            target=0.8, op=">=", ratio=None, ratio_of="", samples=len(control[8].samples_ms),
            extra={"control_rps": control[8].rps}))
        for label, key, by in (("adapter", "adapter", adapter_), ("control route + adapter", "control", control)):
            for c in CONCURRENCY:
                base, path = model_[c], by[c]
                self.figures.append(Figure(
                    id=f"{key}_overhead_p99_c{c}", title=f"{label} adds, p99, {c} client{'s' if c > 1 else ''}",
                    unit="ms", value=path.p99 - base.p99, baseline=base.p99, baseline_label="model alone p99",
                    ratio=path.p99 / base.p99 if base.p99 else None, ratio_of="p99(path) / p99(model alone)",
                    samples=len(path.samples_ms)))

    def bench_rollout(self) -> None:
        rollout_bench.bench_rollout(self, _merge)

    # -- cold start ------------------------------------------------------------------------------
    def bench_cold(self) -> None:
        cold = {}
        for lang, manifest, target in (("python", self.rt_py, 0.5), ("r", self.rt_r, 1.0)):
            if manifest is None or lang not in self.cold_names:
                continue
            name = self.cold_names[lang]
            row = sample_rows(manifest)[0]
            alone = []
            for _ in range(self.cfg.cold_samples):
                proc = measure.ModelProcess(manifest)
                try:
                    alone.append(proc.start())
                finally:
                    proc.stop()
            plane, idle_waits, statuses = [], [], []
            for _ in range(self.cfg.cold_samples):
                idle_waits.append(self.plane.wait_status(name, "idle", timeout=90))
                t0 = time.perf_counter()
                status, answer = measure.post_json(f"{self.plane.url}/models/{name}/predict", {"rows": [row]},
                                                   headers=self.plane.auth)
                dt = time.perf_counter() - t0
                statuses.append(status)
                if status != 200 or len(answer.get("scores") or []) != 1:
                    raise RuntimeError(f"cold request to {name} answered {status}: {answer}")
                plane.append(dt)
            cold[f"{manifest.name} ({lang})"] = {"plane_s": plane, "alone_s": alone, "target_s": target,
                                                 "idle_wait_s": idle_waits}
            value, base = median(plane), median(alone)
            self.figures.append(Figure(
                id=f"cold_start_{lang}", title=f"cold start, zero → first score, {lang} ({manifest.name}), median",
                unit="s", value=value, baseline=base, baseline_label="model alone → /health, median",
                target=target, samples=len(plane),
                extra={"plane_s": plane, "alone_s": alone, "plane_max_s": max(plane), "alone_max_s": max(alone),
                       "added_s": value - base}))
        self.details["cold_start"] = cold

    # -- burst at zero ---------------------------------------------------------------------------
    def _burst(self, name: str, row: dict, size: int) -> dict:
        url = f"{self.plane.url}/models/{name}/predict"
        barrier = threading.Barrier(size)
        replicas, stop = [], threading.Event()

        def watch():
            while not stop.is_set():
                try:
                    replicas.append(self.plane.model(name).get("replicas", 0))
                except Exception:  # noqa: BLE001 — a missed sample is fine
                    pass
                stop.wait(0.05)

        def one(_):
            barrier.wait()
            t0 = time.perf_counter()
            try:
                status, answer = measure.post_json(url, {"rows": [row]}, timeout=120, headers=self.plane.auth)
                ok = status == 200 and len(answer.get("scores") or []) == 1
            except OSError as e:
                status, ok = repr(e), False
            return ok, status, time.perf_counter() - t0

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        try:
            with ThreadPoolExecutor(max_workers=size) as pool:
                results = list(pool.map(one, range(size)))
            time.sleep(0.3)
        finally:
            stop.set()
            watcher.join()
        failed = [r for r in results if not r[0]]
        return {"requests": size, "failed": len(failed), "statuses": sorted({str(r[1]) for r in failed}),
                "max_replicas": max(replicas or [0]), "p50_s": percentile([r[2] for r in results], 50),
                "max_s": max(r[2] for r in results)}

    def bench_burst(self) -> None:
        name, row = self.burst_name, sample_rows(self.rt_py)[0]
        cold_runs, warm_runs = [], []
        for _ in range(self.cfg.burst_rounds):
            self.plane.wait_status(name, "idle", timeout=90)
            cold_runs.append(self._burst(name, row, self.cfg.burst_size))
            warm_runs.append(self._burst(name, row, self.cfg.burst_size))
        failed = sum(r["failed"] for r in cold_runs)
        self.details["burst"] = {"model": name, "at_zero": cold_runs, "warm": warm_runs}
        self.figures.append(Figure(
            id="burst_failures", title=f"failed requests, burst of {self.cfg.burst_size} at zero → N "
                                       f"(×{self.cfg.burst_rounds})",
            unit="", value=failed, baseline=sum(r["failed"] for r in warm_runs),
            baseline_label="same burst, warm", target=0, op="==", target_label="0", ratio=None, ratio_of="",
            samples=sum(r["requests"] for r in cold_runs),
            extra={"max_replicas": max(r["max_replicas"] for r in cold_runs),
                   "slowest_s": max(r["max_s"] for r in cold_runs)}))

    # -- batch --------------------------------------------------------------------------------
    def _results_exist(self, uri: str) -> int:
        """Bytes of scores.csv under the job's results prefix (0 if absent), via google-cloud-storage."""
        from google.cloud import storage

        from adapters.storage import emulator_credentials

        client = storage.Client(project="modelplane-bench", credentials=emulator_credentials(self.plane.emulator.key),
                                client_options={"api_endpoint": self.plane.emulator.endpoint})
        bucket, _, prefix = uri[len("gs://"):].partition("/")
        name = prefix if prefix.endswith(".csv") else prefix.rstrip("/") + "/scores.csv"
        blob = client.bucket(bucket).get_blob(name)
        return blob.size if blob is not None else 0

    def _plane_batch(self, name: str, dataset: Path) -> dict:
        with measure.BatchMemorySampler(self.plane.pid) as mem:
            t0 = time.perf_counter()
            upload = self.plane.upload(name, dataset)
            t_up = time.perf_counter() - t0
            uploaded_wall = time.time()
            job = self.plane.wait_job(model=name, dataset=upload["uri"], timeout=1800)
            total = time.perf_counter() - t0
            done_wall = time.time()
        if job["status"] != "succeeded":
            raise RuntimeError(f"job {job['id']} {job['status']}: {job.get('error')} {job.get('log_tail', '')[-1000:]}")
        size = self._results_exist(job["results_uri"])
        if not size:
            raise RuntimeError(f"job {job['id']} succeeded but nothing at {job['results_uri']}")
        created, started, finished = (_epoch(job.get(k)) for k in ("created_at", "started_at", "finished_at"))
        phases = {"upload_s": t_up, "upload_to_job_s": created - uploaded_wall, "queued_s": started - created,
                  "job_run_s": finished - started, "seen_done_s": done_wall - finished}
        return {"seconds": total, "phases": phases, "upload_s": t_up, "job": job["id"], "rows": job.get("rows"),
                "results_uri": job["results_uri"], "results_bytes": size, "job_started_at": job.get("started_at"),
                "job_finished_at": job.get("finished_at"), "job_created_at": job.get("created_at"),
                "adapter_peak_rss_mib": mem.peak_adapter / 2**20, "tree_peak_rss_mib": mem.peak_tree / 2**20,
                "rss_samples": mem.samples}

    def bench_batch(self) -> None:
        small, large = self.cfg.batch_sizes
        out = {}
        for lang in self.cfg.batch_languages:
            m = self.examples.get(("batch", lang))
            if m is None:
                continue
            data = self.tmp / "data" / m.name
            small_csv = write_dataset(m, data / f"bench-{small}.csv", small)
            large_csv = write_dataset(m, data / f"bench-{large}.csv", large)
            # the first run only warms the page cache and the interpreter: dropped, as the plane's runs come after it
            alone = [measure.run_batch_alone(m, large_csv, data / f"alone-{i}.csv")
                     for i in range(self.cfg.batch_repeats + 2)][1:]
            runs_small = [self._plane_batch(m.name, small_csv)]
            runs_large = []
            for i in range(self.cfg.batch_repeats):
                # a distinct object name per run: a new object is a new event, a new job
                copy = large_csv.with_name(f"bench-{large}-{i}.csv")
                os.link(large_csv, copy)
                runs_large.append(self._plane_batch(m.name, copy))
            for r in runs_large:
                if r["rows"] not in (None, large):
                    raise RuntimeError(f"{m.name}: job scored {r['rows']} rows, expected {large}")
            e2e, base = median(r["seconds"] for r in runs_large), median(alone)
            out[m.name] = {"rows": large, "alone_s": alone, "plane": runs_large, "plane_small": runs_small,
                           "dataset_bytes": large_csv.stat().st_size}
            self.figures.append(Figure(
                id=f"batch_e2e_{lang}", title=f"batch {large:,} rows end to end, {lang} ({m.name}), median",
                unit="s", value=e2e, baseline=base, baseline_label="model alone on a local file, median",
                target=None, samples=len(runs_large),
                extra={"phases_median": {k: median(r["phases"][k] for r in runs_large)
                                         for k in runs_large[0]["phases"]}}))
            self.figures.append(Figure(
                id=f"batch_e2e_ratio_{lang}", title=f"batch end to end ÷ model alone, {lang} ({large:,} rows)",
                unit="×", value=e2e / base, baseline=1.0, baseline_label="model alone", target=1.15,
                target_label="≤ 1.15×", ratio=e2e / base, ratio_of="e2e / model alone", samples=len(runs_large)))
            peak_small = runs_small[0]["adapter_peak_rss_mib"]
            peak_large = max(r["adapter_peak_rss_mib"] for r in runs_large)
            self.figures.append(Figure(
                id=f"batch_adapter_rss_{lang}", title=f"adapter peak RSS, {large:,} rows vs {small:,}, {lang}",
                unit="MiB", value=peak_large, baseline=peak_small, baseline_label=f"{small:,} rows",
                target=round(peak_small * 1.2, 1), target_label=f"flat: ≤ 1.2× the {small:,}-row peak",
                samples=len(runs_large) + 1,
                extra={"tree_peak_small_mib": runs_small[0]["tree_peak_rss_mib"],
                       "tree_peak_large_mib": max(r["tree_peak_rss_mib"] for r in runs_large)}))
        self.details["batch"] = out

    # -- listing 10,000 models ------------------------------------------------------------------
    def bench_list(self) -> None:
        """The API's reads with N/10 and N registered models (N = 10,000, 1,000 in quick mode):
        the whole list (target: ≤ 20 ms at the median with N), a page of 100, one model, the jobs;
        each read's median with N ÷ with N/10 shows whether it stays flat as models grow."""
        from .registry import populate

        count = self.cfg.registered_models
        reads = {"list": "/api/models", "page of 100": "/api/models?limit=100&after=filler-00050",
                 "one model": "/api/models/filler-00007", "jobs": "/api/jobs?limit=50"}
        by_size, meta = {}, {}
        for size in (count // 10, count):
            state = self.tmp / f"many-{size}" / "state"
            t0 = time.monotonic()
            populate(state, size)
            populate_s = time.monotonic() - t0
            env = {"STORAGE_EMULATOR_HOST": self.plane.emulator.endpoint,
                   "MODELPLANE_STORAGE_KEY": self.plane.emulator.key} if self.plane.emulator else {}
            many = EmbeddedPlane(self.tmp / f"many-{size}", models_dir=self.tmp / f"many-{size}" / "no-models",
                                 state_dir=state, emulator=False, env=env)
            t0 = time.monotonic()
            many.start(timeout=600)
            start_s = time.monotonic() - t0
            try:
                listed = len(many.models())
                if listed < size:
                    raise RuntimeError(f"the plane lists {listed} models, {size} registered")
                by_size[size] = {read: self._time_get(many, path, repeats=7 if self.cfg.quick else 21)
                                 for read, path in reads.items()}
                by_size[size]["list, not modified (ETag)"] = self._time_get(many, "/api/models", repeats=21,
                                                                             etag=True)
            finally:
                many.stop()
            meta[size] = {"listed": listed, "populate_s": populate_s, "control_start_s": start_s}
        small = count // 10
        timing, base = by_size[count]["list"], self._time_get(self.plane, "/api/models", repeats=15)
        self.details["list"] = {"registered": count, "meta": meta, "samples_ms": by_size,
                                "baseline_samples_ms": base}
        self.figures.append(Figure(
            id="list_models_ms", title=f"GET /api/models with {count:,} models, median", unit="ms",
            value=median(timing), baseline=median(base),
            baseline_label=f"{len(self.plane.models())} models, median", target=20.0, samples=len(timing),
            extra={"max_ms": max(timing), "p90_ms": percentile(timing, 90), "models": meta[count]["listed"]}))
        for read in by_size[count]:
            big, little = median(by_size[count][read]), median(by_size[small][read])
            self.figures.append(Figure(
                id=f"read_growth_{read.split(',')[0].replace(' ', '_')}" + ("_etag" if "ETag" in read else ""),
                title=f"{read}: median with {count:,} models ÷ with {small:,}", unit="×",
                value=big / little if little else math.nan, baseline=little,
                baseline_label=f"ms with {small:,} models", ratio=None, ratio_of="",
                target=None if read == "list" else 1.5,
                target_label="(the whole list grows with it)" if read == "list" else "flat: ≤ 1.5×",
                samples=len(by_size[count][read]), extra={"ms": big}))

    @staticmethod
    def _time_get(plane: EmbeddedPlane, path: str, *, repeats: int, etag: bool = False) -> list[float]:
        """Milliseconds of `repeats` GETs of `path` on one keep-alive connection, each body read
        whole as a client would; `etag`: sent with the ETag of the first answer (304s)."""
        import requests

        times = []
        with requests.Session() as s:
            s.headers.update(plane.auth)
            first = s.get(f"{plane.url}{path}", timeout=120)  # warm caches and the connection
            first.raise_for_status()
            headers = {"If-None-Match": first.headers["ETag"]} if etag else {}
            for _ in range(repeats):
                t0 = time.perf_counter()
                r = s.get(f"{plane.url}{path}", timeout=120, headers=headers)
                r.content  # noqa: B018 — the whole body, as a client would read it
                times.append((time.perf_counter() - t0) * 1000)
                if r.status_code != (304 if etag else 200):
                    raise RuntimeError(f"GET {path} answered {r.status_code}: {r.text[:200]}")
        return times

    # -- the catalog: thousands of labelled models, searched ----------------------------------------
    def bench_catalog(self) -> None:
        from .catalog_bench import bench_catalog

        bench_catalog(self)

    # -- locust scenarios ------------------------------------------------------------------------
    def bench_locust(self) -> None:
        from .scenarios import run_scenario

        if self.cfg.quick:
            self.details["locust"] = {"skipped": "quick mode (tests/test_loadtest.py runs every scenario)"}
            return
        realtime = ",".join(m.name for m in (self.rt_py, self.rt_r) if m is not None)
        batch = self.examples.get(("batch", "python"))
        runs = {}
        out = Path(self.cfg.out) / "locust"
        runs["steady"] = run_scenario("steady", host=self.plane.url, out_dir=out, users=16, spawn_rate=16,
                                      duration="20s", env={"LOADTEST_MODELS": realtime, "MODELPLANE_TOKEN": self.plane.token})
        runs["mix"] = run_scenario("mix", host=self.plane.url, out_dir=out, users=9, spawn_rate=9, duration="30s",
                                   env={"LOADTEST_MODELS": realtime, "LOADTEST_BATCH_MODEL": batch.name,
                                        "LOADTEST_BATCH_ROWS": "20000", "MODELPLANE_TOKEN": self.plane.token}
                                   if batch else {"LOADTEST_MODELS": realtime, "MODELPLANE_TOKEN": self.plane.token})
        runs["burst"] = run_scenario("burst", host=self.plane.url, out_dir=out, users=48, spawn_rate=48,
                                     duration="10s", env={"LOADTEST_MODELS": self.cold_names["python"],
                                                          "MODELPLANE_TOKEN": self.plane.token})
        self.details["locust"] = {k: v.to_json() for k, v in runs.items()}
        steady = runs["steady"]
        for key, res in runs.items():
            t = res.total
            jobs = [r.__dict__ for r in res.rows if r.type == "JOB"]
            self.figures.append(Figure(
                id=f"locust_{key}_failures",
                title=f"locust {key}: failed of {res.requests:,} requests ({res.users} users, {res.duration})",
                unit="", value=res.failed, baseline=steady.failed if key != "steady" else 0,
                baseline_label="locust steady, warm models" if key != "steady" else "none expected",
                target=0, op="==", target_label="0", ratio=None, ratio_of="", samples=res.requests,
                extra={"p50_ms": t.p50_ms if t else None, "p99_ms": t.p99_ms if t else None,
                       "rps": t.rps if t else None, "jobs": jobs}))


def _merge(into: dict, key, lat: "measure.Latency") -> None:
    """Add one round's samples to the run's figure for `key`."""
    prev = into.get(key)
    if prev is None:
        into[key] = lat
    else:
        prev.samples_ms.extend(lat.samples_ms)
        prev.errors += lat.errors
        prev.wall_s += lat.wall_s


def _epoch(stamp: Optional[str]) -> float:
    """An ISO-8601 UTC stamp of the API as epoch seconds (NaN when absent)."""
    from datetime import datetime

    if not stamp:
        return math.nan
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def run(cfg: Config) -> int:
    return Bench(cfg).run()
