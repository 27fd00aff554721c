"""The service itself: health, Prometheus metrics, the API's OpenAPI document."""
from __future__ import annotations

import logging

from flask import Response, jsonify

from control import api_schema as s
from control.api import Routes, current_plane
from control.runtime.base import JOB_STATUSES
from control.settings import modelplane_version

log = logging.getLogger(__name__)


def routes(plane) -> Routes:
    r = Routes("service")
    runtime = plane.runtime

    @r(s.RouteSpec("GET", "/healthz", "Is the service up", [s.Answer(200, s.Health)], auth="none", tag="service"))
    def healthz():
        problems = list(getattr(runtime, "problems", lambda: [])())
        sandbox = getattr(runtime, "sandbox", None)   # the local runtime's model sandbox (adapters/sandbox.py)
        return {"status": "degraded" if problems else "ok", "runtime": runtime.name, "problems": problems,
                **({"sandbox": sandbox.describe()} if sandbox is not None else {})}

    @r(s.RouteSpec("GET", "/readyz", "Is the service ready to answer (on a cluster: its watch cache listed)",
                   [s.Answer(200, s.Health)], errors=(503,), auth="none", tag="service"))
    def readyz():
        ready = getattr(runtime, "ready", lambda: True)()
        problems = list(getattr(runtime, "problems", lambda: [])())
        body = {"status": "ok" if ready else "degraded", "runtime": runtime.name, "problems": problems}
        return (body, 200) if ready else (body, 503)

    @r(s.RouteSpec("GET", "/metrics", "Prometheus metrics",
                   [s.Answer(200, None, "text/plain", "the Prometheus text format")], tag="service"))
    def metrics():
        return Response(render_metrics(plane), mimetype="text/plain; version=0.0.4")

    @r(s.RouteSpec("GET", "/openapi.json", "This API's OpenAPI document",
                   [s.Answer(200, None, "application/json", "OpenAPI 3.1")], auth="none", tag="service"))
    def openapi():
        return jsonify(openapi_doc(current_plane()))

    return r


def openapi_doc(plane) -> dict:
    if plane.openapi is None:
        plane.openapi = s.openapi_document(
            plane.routes, version=modelplane_version(),
            security_note="Every route but /healthz, /readyz, /openapi.json, /v2 and /v2/health/* needs "
                          "`Authorization: Bearer <token>`; the models' routes too unless predict is opened.")
    return plane.openapi


def _label(value) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render_metrics(plane) -> str:
    lines: list[str] = []
    api, model_requests = plane.metrics.snapshot()

    lines += ["# HELP modelplane_api_requests_total Control API requests by route, method and status.",
              "# TYPE modelplane_api_requests_total counter"]
    for (route, method, status), (count, _) in sorted(api.items()):
        lines.append(f'modelplane_api_requests_total{{route="{_label(route)}",method="{method}",status="{status}"}} {count}')
    lines += ["# HELP modelplane_api_request_seconds_sum Time spent answering control API requests.",
              "# TYPE modelplane_api_request_seconds_sum counter"]
    for (route, method, status), (_, seconds) in sorted(api.items()):
        lines.append(f'modelplane_api_request_seconds_sum{{route="{_label(route)}",method="{method}",status="{status}"}} {seconds:.6f}')

    lines += ["# HELP modelplane_events_total CloudEvents received by what they did.",
              "# TYPE modelplane_events_total counter"]
    for action, count in sorted(plane.events.counts().items()):
        lines.append(f'modelplane_events_total{{action="{action}"}} {count}')

    try:
        jobs = plane.runtime.jobs(limit=1_000_000)
    except Exception:  # metrics must render even when the runtime is unwell
        log.exception("metrics: listing jobs failed")
        jobs = []
    by_status = {status: 0 for status in JOB_STATUSES}
    for job in jobs:
        by_status[job.status] = by_status.get(job.status, 0) + 1
    lines += ["# HELP modelplane_jobs Batch jobs by status.", "# TYPE modelplane_jobs gauge"]
    for status, count in by_status.items():
        lines.append(f'modelplane_jobs{{status="{status}"}} {count}')

    try:
        models = plane.runtime.models()
    except Exception:
        log.exception("metrics: listing models failed")
        models = []
    lines += ["# HELP modelplane_model_replicas Running replicas of each model.",
              "# TYPE modelplane_model_replicas gauge"]
    for m in models:
        lines.append(f'modelplane_model_replicas{{model="{_label(m.name)}",status="{m.status}"}} {m.replicas}')
    lines += ["# HELP modelplane_model_requests_total Requests routed to each model, by status.",
              "# TYPE modelplane_model_requests_total counter"]
    for (name, status), count in sorted(model_requests.items()):
        lines.append(f'modelplane_model_requests_total{{model="{_label(name)}",status="{status}"}} {count}')
    lines += ["# HELP modelplane_models_failed Model folders that could not be registered.",
              "# TYPE modelplane_models_failed gauge", f"modelplane_models_failed {len(plane.failed)}"]
    lines += _monitor_lines(plane.monitor)
    return "\n".join(lines) + "\n"


def _monitor_lines(monitor) -> list[str]:
    """Score monitoring: each version's drift against its reference, and what was observed."""
    try:
        gauges = monitor.gauges()
    except Exception:  # metrics must render even when monitoring is unwell
        log.exception("metrics: score monitoring failed")
        gauges = []
    lines: list[str] = []
    for metric, key, help_ in (
            ("modelplane_model_score_psi", "psi", "PSI of each version's recent scores against its reference "
                                                  "(absent until both hold enough scores)."),
            ("modelplane_model_score_ks", "ks", "Kolmogorov-Smirnov distance of each version's recent scores "
                                                "from its reference (absent until both hold enough scores).")):
        lines += [f"# HELP {metric} {help_}", f"# TYPE {metric} gauge"]
        for g in gauges:
            if g[key] is not None:
                lines.append(f'{metric}{{model="{_label(g["model"])}",version="{_label(g["version"])}"}} {g[key]:.6f}')
    lines += ["# HELP modelplane_model_drifted 1 when a version's PSI is above its monitoring.drift_threshold.",
              "# TYPE modelplane_model_drifted gauge"]
    for g in gauges:
        lines.append(f'modelplane_model_drifted{{model="{_label(g["model"])}",version="{_label(g["version"])}"}} '
                     f'{int(g["drifted"])}')
    lines += ["# HELP modelplane_model_feature_psi PSI of each version's recent inputs against its reference's, "
              "per feature (absent until both hold enough values; features bounded by the manifest).",
              "# TYPE modelplane_model_feature_psi gauge"]
    for g in gauges:
        for feature, d in sorted((g.get("features") or {}).items()):
            if d["psi"] is not None:
                lines.append(f'modelplane_model_feature_psi{{model="{_label(g["model"])}",version="{_label(g["version"])}",'
                             f'feature="{_label(feature)}"}} {d["psi"]:.6f}')
    lines += ["# HELP modelplane_model_feature_drifted 1 when a feature's PSI is above its version's "
              "monitoring.drift_threshold.", "# TYPE modelplane_model_feature_drifted gauge"]
    for g in gauges:
        for feature, d in sorted((g.get("features") or {}).items()):
            lines.append(f'modelplane_model_feature_drifted{{model="{_label(g["model"])}",version="{_label(g["version"])}",'
                         f'feature="{_label(feature)}"}} {int(d["drifted"])}')
    lines += ["# HELP modelplane_model_scores_observed_total Scores taken in by score monitoring, by version.",
              "# TYPE modelplane_model_scores_observed_total counter"]
    for g in gauges:
        lines.append(f'modelplane_model_scores_observed_total{{model="{_label(g["model"])}",'
                     f'version="{_label(g["version"])}"}} {g["observed"]}')
    lines += ["# HELP modelplane_monitor_answers_dropped_total Model answers score monitoring dropped "
              "(its queue was full).", "# TYPE modelplane_monitor_answers_dropped_total counter",
              f"modelplane_monitor_answers_dropped_total {monitor.dropped}",
              "# HELP modelplane_monitor_answers_skipped_total Model answers whose scores monitoring does not read "
              "(binary tensor data).", "# TYPE modelplane_monitor_answers_skipped_total counter",
              f"modelplane_monitor_answers_skipped_total {monitor.skipped}",
              "# HELP modelplane_monitor_answers_sampled_out_total Model answers score monitoring left out: "
              "past its sample rate of answers a second per model.",
              "# TYPE modelplane_monitor_answers_sampled_out_total counter",
              f"modelplane_monitor_answers_sampled_out_total {monitor.sampled_out}"]
    return lines
