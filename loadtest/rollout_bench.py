"""What a rollout costs the live traffic: the control route's p50 with a 10 % split and with a
100 % shadow, each against the same route with no rollout, measured in turn within each round.

The model is the benchmark's route copy (one replica); its second version is the same folder
under a higher version number, deployed beside it (`POST /api/models?live=false`) with one
replica of its own, so the figures are the routing's and the shadow copies', not scaling's.
"""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import yaml

from . import measure
from .common import sample_rows
from .report import Figure

CANDIDATE = "9.9.9"
CLIENTS = (1, 8)


def deploy_candidate(plane, folder: Path) -> str:
    """Deploy `folder` again as version CANDIDATE, not live; its version string."""
    data = yaml.safe_load((folder / "model.yaml").read_text(encoding="utf-8"))
    data["version"] = CANDIDATE
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for path in sorted(folder.rglob("*")):
            if path.is_file() and path.name != "model.yaml" and "__pycache__" not in path.parts:
                tar.add(path, arcname=f"{folder.name}/{path.relative_to(folder)}")
        text = yaml.safe_dump(data, sort_keys=False).encode()
        info = tarfile.TarInfo(f"{folder.name}/model.yaml")
        info.size = len(text)
        tar.addfile(info, io.BytesIO(text))
    r = plane.session.post(f"{plane.url}/api/models", params={"live": "false"}, data=buf.getvalue(),
                           headers={"Content-Type": "application/gzip"}, timeout=120)
    if r.status_code != 201:
        raise RuntimeError(f"deploying the candidate answered {r.status_code}: {r.text[:300]}")
    return CANDIDATE


def _set(plane, name: str, **split) -> None:
    """Roll the candidate out with `split`; with none, withdraw whatever rollout there is."""
    if split:
        r = plane.session.post(f"{plane.url}/api/models/{name}/rollout", json={"version": CANDIDATE, **split}, timeout=60)
    elif plane.get(f"/api/models/{name}/traffic").get("candidate"):
        r = plane.session.post(f"{plane.url}/api/models/{name}/rollback", json={}, timeout=60)
    else:
        return
    if r.status_code != 200:
        raise RuntimeError(f"changing the split answered {r.status_code}: {r.text[:300]}")


def bench_rollout(bench, merge) -> None:
    """The section: `bench` is the running `loadtest.bench.Bench`, `merge` its sample merger."""
    plane, name = bench.plane, bench.route_name
    deploy_candidate(plane, bench.tmp / "models" / name)
    row = sample_rows(bench.rt_py)[0]
    body = json.dumps({"rows": [row]}).encode()
    url = f"{plane.url}/models/{name}/predict"
    # the candidate's own replica up before anything is measured (its URL starts it)
    status, answer = measure.post_json(f"{plane.url}/models/{name}/versions/{CANDIDATE}/predict", {"rows": [row]},
                                       headers=plane.auth)
    if status != 200:
        raise RuntimeError(f"the candidate answered {status}: {answer}")
    modes = {"no rollout": {}, "10 % split": {"percent": 10}, "100 % shadow": {"shadow": 100}}
    by_mode: dict[str, dict] = {m: {} for m in modes}
    try:
        for _ in range(bench.cfg.latency_rounds):
            for c in CLIENTS:
                for mode, split in modes.items():
                    _set(plane, name, **split)
                    lat = measure.closed_loop(url, body, concurrency=c, headers=plane.auth,
                                              requests=bench.cfg.latency_requests[c] // bench.cfg.latency_rounds)
                    merge(by_mode[mode], c, lat)
    finally:
        _set(plane, name)
    shadow = plane.session.get(f"{plane.url}/api/models/{name}/shadow", timeout=60).json()
    bench.details["rollout"] = {"model": name, "candidate": CANDIDATE,
                                "by_mode": {m: {c: lat.summary() for c, lat in by.items()} for m, by in by_mode.items()},
                                "shadow": {k: shadow.get(k) for k in ("requests", "candidate_errors", "dropped")}}
    base = by_mode["no rollout"]
    for mode, key, target in (("10 % split", "split", 1.1), ("100 % shadow", "shadow", None)):
        for c in CLIENTS:
            path = by_mode[mode][c]
            bench.figures.append(Figure(
                id=f"rollout_{key}_p50_ratio_c{c}",
                title=f"live p50 with a {mode} ÷ without, {c} client{'s' if c > 1 else ''}", unit="×",
                value=path.p50 / base[c].p50, baseline=1.0,
                baseline_label=f"no rollout = 1 ({base[c].p50:.3g} ms; with {path.p50:.3g} ms)",
                target=target if c == 1 else None, ratio=None, ratio_of="", samples=len(path.samples_ms),
                extra={"p50_ms": path.p50, "p99_ms": path.p99, "errors": path.errors,
                       "baseline_p99_ms": base[c].p99}))
