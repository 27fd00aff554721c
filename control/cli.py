"""`modelplane`: the command line. Everything but `up`, `serve`, `watch`, `validate`, `render`
and `console` is an HTTP client of the control API; errors end in one line and a non-zero exit.
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import os
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path
from typing import Any, Optional, Sequence
from urllib.parse import quote

import requests

log = logging.getLogger("modelplane")

EXCLUDE = {".git", "__pycache__", ".venv", ".Rproj.user", ".ipynb_checkpoints", ".DS_Store", "node_modules"}
CONSOLE_APP = Path(__file__).resolve().parent.parent / "console" / "app.py"


class CLIError(Exception):
    """A user-facing failure: printed as one line (plus details), exit status 1."""

    def __init__(self, message: str, *, details: Sequence[str] = (), status: Optional[int] = None):
        super().__init__(message)
        self.message = message
        self.details = list(details)
        self.status = status  # the control service's HTTP status, when it answered


# -- the HTTP client -------------------------------------------------------------------------

class Client:
    def __init__(self, url: str, token: Optional[str], *, timeout: float = 30.0):
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.session = requests.Session()
        self.session.trust_env = False
        if token:
            self.session.headers["Authorization"] = f"Bearer {token}"

    def request(self, method: str, path: str, *, timeout: Optional[float] = None, **kwargs) -> requests.Response:
        try:
            resp = self.session.request(method, self.url + path, timeout=timeout or self.timeout, **kwargs)
        except requests.ConnectionError:
            raise CLIError(f"cannot reach the control service at {self.url} — is `modelplane up` running?") from None
        except requests.Timeout:
            raise CLIError(f"the control service at {self.url} did not answer within {timeout or self.timeout:.0f}s") from None
        if resp.status_code >= 400:
            try:
                body = resp.json()
            except ValueError:
                body = {"error": resp.text.strip()[:300] or resp.reason}
            if not isinstance(body, dict):
                body = {"error": str(body)}
            details = []
            for p in body.get("problems") or []:
                if "row" in p:
                    details.append(f"  row {p.get('row')}: {p.get('field')}: {p.get('error') or p.get('message')}")
                else:
                    where = f"{p.get('file', '')}:{p['line']}" if p.get("line") else p.get("file", "")
                    details.append(f"  {where}: {p.get('field') + ': ' if p.get('field') else ''}{p.get('message')}")
            if body.get("log_tail"):   # a version that failed its deploy check: the end of its log
                details.append("its log ends with:")
                details += [f"  {line}" for line in str(body["log_tail"]).splitlines()]
            error = str(body.get("error") or resp.reason or "")
            problems = body.get("problems") or []
            if problems and isinstance(problems[0], dict) and "file" in problems[0]:
                message = "invalid manifest"
            else:
                message = error.splitlines()[0] if error else f"HTTP {resp.status_code}"
            message = f"{message} ({resp.status_code})"
            raise CLIError(message, details=details, status=resp.status_code)
        return resp

    def json(self, method: str, path: str, **kwargs) -> Any:
        resp = self.request(method, path, **kwargs)
        try:
            return resp.json()
        except ValueError:
            raise CLIError(f"{method} {path} answered something that is not JSON") from None


# -- output ------------------------------------------------------------------------------------

def table(rows: list[list[Any]], headers: list[str]) -> str:
    """Aligned columns; None prints as '-'."""
    cells = [[("-" if v is None or v == "" else str(v)) for v in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    return "\n".join(lines)


def out(text: str = "") -> None:
    print(text, flush=True)


# -- settings --------------------------------------------------------------------------------

def load_settings(args: argparse.Namespace):
    from control.settings import Settings

    overrides = {}
    if getattr(args, "token", None) is not None:
        raise CLIError("--token is not taken: a token on the command line is visible to every user of the machine "
                       "(ps). Use MODELPLANE_TOKEN, --token-file FILE, or --token-file - to read it from stdin")
    token_file = getattr(args, "token_file", None)
    if token_file is not None:
        overrides["token"] = _read_token_file(token_file)
    for flag, field in (("url", "url"), ("port", "port"), ("state_dir", "state_dir"),
                        ("models_dir", "models_dir"), ("host", "host"), ("bucket", "bucket")):
        value = getattr(args, flag, None)
        if value is not None:
            overrides[field] = value
    if getattr(args, "no_console", False):
        overrides["console"] = False
    try:
        return Settings(**overrides)
    except Exception as e:  # pydantic's ValidationError: say which setting is wrong
        raise CLIError(f"invalid settings: {' '.join(str(e).split())}") from None


def _read_token_file(path: str) -> str:
    """The token in `path` (its first line), or stdin's for `-`."""
    try:
        if path == "-":
            text = sys.stdin.readline()
        else:
            with open(path, encoding="utf-8") as f:
                text = f.readline(4096)
    except OSError as e:
        raise CLIError(f"cannot read the token file {path}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise CLIError(f"the token file {path} is not text") from None
    token = text.strip()
    if not token:
        raise CLIError(f"the token file {path} is empty" if path != "-" else "no token on stdin")
    return token


def client_for(args: argparse.Namespace) -> Client:
    """A client of the control API with the token: `MODELPLANE_TOKEN` / `--token`, else (for a
    service on this machine only) the one `modelplane up` stored in the state dir."""
    from control.auth import client_token, is_loopback_host
    from urllib.parse import urlsplit

    settings = load_settings(args)
    url = settings.control_url
    token = settings.token
    if not token and is_loopback_host(urlsplit(url).hostname or ""):
        token = client_token(settings)
    return Client(url, token)


# -- commands against the API ------------------------------------------------------------------

def cmd_ls(args) -> int:
    params: list[tuple[str, Any]] = [("label", s) for s in args.label or []]
    if args.owner:
        params.append(("owner", args.owner))
    if args.search:
        params.append(("q", args.search))
    if args.limit:
        params.append(("limit", args.limit))
    resp = client_for(args).request("GET", "/api/models", params=params)
    try:
        models = resp.json()
    except ValueError:
        raise CLIError("GET /api/models answered something that is not JSON") from None
    filtered = bool(args.label or args.owner or args.search)
    if not models:
        out("no models match" if filtered else "no models")
        return 0
    # The catalog's columns appear when some model listed has something to show in them.
    drift = any(m.get("drifted") for m in models)
    owners = any(m.get("owner") for m in models)
    labels = any(m.get("labels") for m in models)
    rows = []
    for m in models:
        last = m.get("endpoint")
        if m.get("status") == "failed" and m.get("error"):
            last = str(m["error"]).splitlines()[0]
        row = [m["name"], m.get("kind"), m.get("language"), m.get("version"), m.get("status"), m.get("replicas")]
        if drift:
            row.append(f"yes({','.join(m['drifted'])})" if m.get("drifted") else None)
        if owners:
            row.append(m.get("owner"))
        if labels:
            row.append(_labels_text(m.get("labels") or {}))
        rows.append(row + [last])
    headers = ["NAME", "KIND", "LANGUAGE", "VERSION", "STATUS", "REPLICAS"] + (["DRIFT"] if drift else []) \
        + (["OWNER"] if owners else []) + (["LABELS"] if labels else []) + ["ENDPOINT / ERROR"]
    out(table(rows, headers))
    total = resp.headers.get("X-Total-Count")
    if total and total.isdigit() and int(total) > len(models):
        out(f"{len(models)} of {int(total):,} models{' matching' if filtered else ''} (--limit)")
    return 0


def cmd_whoami(args) -> int:
    me = client_for(args).json("GET", "/api/whoami")
    owner = f", limited to models owned by {me['owner']}" if me.get("owner") else ""
    out(f"{me['name']} ({me['role']}{owner})")
    return 0


def cmd_token(args) -> int:
    client = client_for(args)
    if args.action == "create":
        if not args.role:
            raise CLIError("token create needs --role (viewer, runner, deployer or admin)")
        body = {"name": args.name, "role": args.role, **({"owner": args.owner} if args.owner else {})}
        made = client.json("POST", "/api/tokens", json=body)
        limited = f", limited to models owned by {made['owner']}" if made.get("owner") else ""
        print(f"created token {made['name']} ({made['role']}{limited}); it is shown this once, keep it now:",
              file=sys.stderr, flush=True)
        out(made["token"])
        return 0
    if args.action == "revoke":
        if not args.name:
            raise CLIError("token revoke needs the token's NAME")
        gone = client.json("DELETE", f"/api/tokens/{quote(args.name, safe='')}")
        out(f"revoked {gone['name']}: it is refused from now on")
        return 0
    tokens = client.json("GET", "/api/tokens")
    if not tokens:
        out("no named tokens (only the bootstrap admin token)")
        return 0
    out(table([[t["name"], t["role"], t.get("owner"), t.get("created_at"), t.get("created_by")] for t in tokens],
              ["NAME", "ROLE", "OWNER", "CREATED", "BY"]))
    return 0


def cmd_audit(args) -> int:
    client = client_for(args)
    if args.verify:
        check = client.json("GET", "/api/audit/verify")
        if check["ok"]:
            out(f"the audit trail is intact: {check['records']:,} records, chained from the first")
            return 0
        raise CLIError(f"the audit trail is broken after {check['records']:,} good records: {check['problem']}")
    params = {k: v for k, v in (("who", args.who), ("action", args.action), ("model", args.model),
                                ("outcome", args.outcome), ("since", args.since), ("limit", args.limit)) if v}
    entries = client.json("GET", "/api/audit", params=params)
    if args.json:
        out(json.dumps(entries, indent=2))
        return 0
    if not entries:
        out("no audit records match")
        return 0
    rows = []
    for e in entries:
        what = " ".join(x for x in (e.get("model"), e.get("version"), e.get("target")) if x)
        rows.append([e["seq"], e["at"].replace("T", " ").replace("Z", ""), e["who"], e["role"], e["action"], what,
                     f"{e['outcome']} ({e['status']})", e.get("request_id")])
    out(table(rows, ["SEQ", "WHEN (UTC)", "WHO", "ROLE", "ACTION", "WHAT", "OUTCOME", "REQUEST"]))
    return 0


def _labels_text(labels: dict, width: int = 40) -> str:
    """`k=v,k=v`, cut to `width` with an ellipsis."""
    text = ",".join(f"{k}={v}" if v else k for k, v in sorted(labels.items()))
    return text if len(text) <= width else text[:width - 1] + "…"


def cmd_status(args) -> int:
    m = client_for(args).json("GET", f"/api/models/{quote(args.name)}")
    labels = m.get("labels") or {}
    fields = [("name", m.get("name")), ("kind", m.get("kind")), ("language", m.get("language")),
              ("version", m.get("version")), ("status", m.get("status")), ("replicas", m.get("replicas")),
              ("endpoint", m.get("endpoint")), ("owner", m.get("owner") or None),
              ("labels", ", ".join(f"{k}={v}" for k, v in sorted(labels.items())) or None),
              ("drift", _drift_summary(m.get("monitoring") or {}))]
    width = max(len(k) for k, _ in fields)
    for k, v in fields:
        out(f"{k.ljust(width)}  {'-' if v is None else v}")
    if m.get("error"):
        out("error:")
        for line in str(m["error"]).splitlines():
            out(f"  {line}")
    features = (m.get("manifest") or {}).get("features") or []
    if features:
        out("\nfeatures")
        out(table([[f["name"], f["type"], "yes" if f.get("required", True) else "no",
                    ", ".join(map(str, f["allowed"])) if f.get("allowed") else None] for f in features],
                  ["NAME", "TYPE", "REQUIRED", "ALLOWED"]))
    _print_traffic(m.get("traffic") or {})
    if m.get("versions"):
        out("\nversions")
        out(table([[v["version"], v.get("deployed_at"), _version_state(v)] for v in m["versions"]],
                  ["VERSION", "DEPLOYED", "STATE"]))
        for v in m["versions"]:
            if v.get("failed") and v.get("error"):
                out(f"\n{v['version']} failed its deploy check (it takes no traffic):")
                for line in str(v["error"]).splitlines():
                    out(f"  {line}")
            elif v.get("crash_error") and not v.get("live"):
                # a version's crash is the version's: the model serves from its live version
                out(f"\n{v['version']} crashed ({m.get('name')} still serves from {m.get('version')}):")
                for line in str(v["crash_error"]).splitlines():
                    out(f"  {line}")
    _print_drift(m.get("monitoring") or {})
    metrics = m.get("metrics") or {}
    shown = [(k, metrics[k]) for k in ("requests", "errors", "p50_ms", "p95_ms", "cold_starts") if k in metrics]
    if shown:
        out("\nmetrics")
        out(table([[k, v] for k, v in shown], ["METRIC", "VALUE"]))
    return 0


def _version_state(v: dict) -> str:
    if v.get("live"):
        return "live"
    if v.get("failed"):
        return "failed"     # its deploy check: why is printed below the table
    if v.get("crashed"):
        return "crashed"    # not restarted until a deploy or rollback
    return "crashed lately" if v.get("crash_error") else ""


def _drift_summary(monitoring: dict) -> str:
    """`drifted: 1.0.1` / `none` / `not measured yet`, from GET /api/models/{name}'s monitoring."""
    versions = monitoring.get("versions") or {}
    if not versions:
        return "not measured yet"
    drifted = sorted(v for v, x in versions.items() if (x or {}).get("drifted"))
    return f"drifted: {', '.join(drifted)}" if drifted else "none"


def _print_drift(monitoring: dict) -> None:
    """Each version's drift against its reference: PSI, KS, the scores (rows) each side holds."""
    versions = monitoring.get("versions") or {}
    if not versions:
        return
    rows = []
    for version, x in sorted(versions.items()):
        x = x or {}
        drift = x.get("drift") or {}
        psi, ks = drift.get("psi"), drift.get("ks")
        rows.append([version, "yes" if x.get("drifted") else "no", _num(psi) if psi is not None else None,
                     _num(ks) if ks is not None else None, (x.get("reference") or {}).get("count"),
                     (x.get("recent") or {}).get("count"), drift.get("reason")])
    out("\ndrift (scores against each version's reference; counts are scores, one per row)")
    out(table(rows, ["VERSION", "DRIFTED", "PSI", "KS", "REFERENCE", "RECENT", "NOTE"]))


def _tar_folder(folder: Path) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for path in sorted(folder.rglob("*")):
            rel = path.relative_to(folder)
            if any(part in EXCLUDE for part in rel.parts) or path.suffix == ".pyc":
                continue
            if path.is_file() and not path.is_symlink():
                tar.add(path, arcname=str(rel), recursive=False)
            elif path.is_symlink() and path.resolve().is_file():
                tar.add(path.resolve(), arcname=str(rel), recursive=False)
    return buf.getvalue()


def cmd_deploy(args) -> int:
    folder = Path(args.dir)
    if not (folder / "model.yaml").is_file():
        raise CLIError(f"{folder}: no model.yaml here (a model folder needs one)")
    body = _tar_folder(folder)
    path = "/api/models?live=false" if args.no_live else "/api/models"
    v = client_for(args).json("POST", path, data=body, headers={"Content-Type": "application/gzip"}, timeout=300)
    if v.get("live"):
        out(f"deployed {v['name']} {v['version']} (live)")
    else:
        out(f"deployed {v['name']} {v['version']} (not live: `modelplane rollout {v['name']} {v['version']} "
            f"--percent 10` sends it a share of the requests)")
    return 0


def cmd_rollback(args) -> int:
    body = {"version": args.version} if args.version else {}
    v = client_for(args).json("POST", f"/api/models/{quote(args.name)}/rollback", json=body)
    out(f"{v.get('name', args.name)} {v['version']} is live" + ("" if args.version else " and takes every request"))
    return 0


def _print_traffic(traffic: dict) -> None:
    targets = traffic.get("targets") or []
    if not targets:
        return
    out("\ntraffic")
    rows = [[t["version"], t.get("role"), f"{t['percent']}%", f"{t['shadow']}%" if t.get("shadow") else None]
            for t in targets]
    headers = ["VERSION", "ROLE", "SHARE", "SHADOW"]
    if any("requests" in t for t in targets):   # the model's detail counts each version's answers (shadow included)
        rows = [r + [t.get("requests"), t.get("errors"), t.get("replicas")] for r, t in zip(rows, targets)]
        headers += ["REQUESTS", "ERRORS", "REPLICAS"]
    out(table(rows, headers))


def cmd_rollout(args) -> int:
    if args.percent is None and args.shadow is None:
        raise CLIError("say how much: --percent P (share of requests it answers) and/or --shadow P "
                       "(share of live requests also sent to it)")
    for flag, value in (("--percent", args.percent), ("--shadow", args.shadow)):
        if value is not None and not 0 <= value <= 100:
            raise CLIError(f"{flag} {value}: a percent is 0 to 100")
    t = client_for(args).json("POST", f"/api/models/{quote(args.name)}/rollout",
                              json={"version": args.version, "percent": args.percent or 0, "shadow": args.shadow or 0})
    out(f"{args.name}: {t['candidate']} answers {t['percent']}% of requests, {t['live']} the rest"
        + (f"; {t['shadow']}% of {t['live']}'s requests are also sent to {t['candidate']} (shadow)" if t["shadow"] else ""))
    _print_traffic(t)
    out(f"\n`modelplane promote {args.name}` makes {t['candidate']} live; `modelplane rollback {args.name}` "
        f"withdraws it at once")
    return 0


def cmd_promote(args) -> int:
    v = client_for(args).json("POST", f"/api/models/{quote(args.name)}/promote", json={})
    out(f"{v.get('name', args.name)} {v['version']} is live and takes every request")
    return 0


def cmd_pin(args) -> int:
    t = client_for(args).json("POST", f"/api/models/{quote(args.name)}/pins", json={"version": args.version})
    out(f"{args.name} {args.version} is pinned: it keeps a route of its own at 0 % until "
        f"`modelplane unpin {args.name} {args.version}`")
    _print_traffic(t)
    return 0


def cmd_unpin(args) -> int:
    t = client_for(args).json("DELETE", f"/api/models/{quote(args.name)}/pins/{quote(args.version)}")
    out(f"{args.name} {args.version} is no longer pinned")
    _print_traffic(t)
    return 0


def cmd_shadow(args) -> int:
    params = {"top": args.top}
    if args.threshold is not None:
        params["threshold"] = args.threshold
    r = client_for(args).json("GET", f"/api/models/{quote(args.name)}/shadow", params=params)
    if args.json:
        out(json.dumps(r, indent=2))
        return 0
    if not r.get("candidate"):
        out(f"{args.name}: no shadow traffic recorded (`modelplane rollout {args.name} VERSION --shadow P`)")
        return 0
    lat = r.get("latency_ms") or {}
    out(f"{args.name}: {r['requests']} live request(s) of {r['live']} mirrored to {r['candidate']}; "
        f"{r['candidate_errors']} failed there, {r.get('dropped', 0)} dropped (too many in flight)")
    if lat.get("live_p50") is not None and lat.get("candidate_p50") is not None:
        out(f"p50 latency: {r['live']} {lat['live_p50']:.1f} ms, {r['candidate']} {lat['candidate_p50']:.1f} ms")
    c = r.get("comparison")
    if c:
        d = c["drift"]
        out(f"rows compared: {c['rows']}; mean |difference| {c['difference']['mean_abs']}, "
            f"max {c['difference']['max_abs']}; PSI {d['psi']}, KS {d['ks']}")
        if "flips" in c:
            out(f"decisions flipped at {c['threshold']}: {c['flips']['count']} of {c['rows']}")
    for e in r.get("errors") or []:
        out(f"  failed: request {e.get('rid')}: {e.get('status') or '-'} {e.get('error')}")
    return 0


def _psi_reading(psi: Optional[float]) -> str:
    if psi is None:
        return "-"
    return "stable" if psi < 0.1 else "moderate" if psi < 0.25 else "major"


def _num(x: Any) -> str:
    return "-" if x is None else f"{x:.6g}" if isinstance(x, float) else str(x)


def _print_comparison(c: dict) -> None:
    rep = c["report"]
    a, b = rep["labels"]["a"], rep["labels"]["b"]
    out(f"{c['model']}: {a} vs {b} on {c['dataset']}")
    out(f"rows compared: {rep['rows']}   identical: {rep['difference']['identical_rows']}")
    qa, qb = rep["quantiles"][a], rep["quantiles"][b]
    keys = ["min"] + [k for k in qa if k.startswith("p")] + ["max", "mean"]
    out()
    out(table([[k, _num(qa.get(k)), _num(qb.get(k)), _num(None if qa.get(k) is None or qb.get(k) is None
                                                          else qb[k] - qa[k])] for k in keys],
              ["QUANTILE", a, b, "B-A"]))
    d, diff = rep["drift"], rep["difference"]
    out()
    out(f"difference ({b} - {a}): mean {_num(diff['mean'])}, mean |d| {_num(diff['mean_abs'])}, "
        f"p95 |d| {_num(diff['p95_abs'])}, max |d| {_num(diff['max_abs'])}")
    out(f"drift: PSI {_num(d['psi'])} ({_psi_reading(d['psi'])}), KS {_num(d['ks'])}")
    flips = rep.get("flips")
    if flips is not None:
        out(f"decisions flipped at threshold {rep['threshold']:g}: {flips['count']} of {rep['rows']} "
            f"({flips['to_positive']} to >= threshold, {flips['to_negative']} below)")
        if flips["rows"]:
            out(table([[f["row"], _num(f[a]), _num(f[b])] for f in flips["rows"][:20]], ["ROW", a, b]))
            if flips["count"] > 20:
                out(f"… and {flips['count'] - 20} more (--json lists up to {len(flips['rows'])})")
    if rep.get("largest"):
        out()
        out("largest differences:")
        out(table([[x["row"], _num(x[a]), _num(x[b]), _num(x["difference"])] for x in rep["largest"]],
                  ["ROW", a, b, "DIFF"]))


def cmd_compare(args) -> int:
    if args.threshold is not None and not (-1e300 <= args.threshold <= 1e300):
        raise CLIError(f"--threshold {args.threshold}: expected a finite number")
    if not 0 <= args.top <= 1000:
        raise CLIError(f"--top {args.top}: expected 0 to 1000")
    client = client_for(args)
    name = quote(args.name)
    dataset = args.dataset
    if not dataset.startswith("gs://"):
        path = Path(dataset)
        if not path.is_file():
            raise CLIError(f"{path}: no such file (give a local CSV or a gs:// URI)")
        with open(path, "rb") as f:
            up = client.json("POST", f"/api/models/{name}/comparisons/datasets", data=f,
                             headers={"Content-Type": "text/csv"}, timeout=600)
        print(f"uploaded {path} to {up['uri']}", file=sys.stderr, flush=True)
        dataset = up["uri"]
    body: dict[str, Any] = {"a": args.a, "b": args.b, "dataset": dataset, "top": args.top}
    if args.threshold is not None:
        body["threshold"] = args.threshold
    c = client.json("POST", f"/api/models/{name}/comparisons", json=body)
    deadline = time.monotonic() + args.timeout
    shown = ""
    while c["status"] not in ("succeeded", "failed"):
        if time.monotonic() > deadline:
            raise CLIError(f"comparison {c['id']} is still {c['status']} after {args.timeout:.0f}s "
                           f"(GET /api/comparisons/{c['id']} has it when it is done)")
        time.sleep(0.3)
        c = client.json("GET", f"/api/comparisons/{quote(c['id'])}")
        line = _progress_line(c)
        if line != shown:
            print(line, file=sys.stderr, flush=True)
            shown = line
    if c["status"] == "failed":
        details = [f"  row {p.get('row')}: {p.get('field') or '-'}: {p.get('error')}" for p in c.get("problems") or []][:20]
        if c.get("log_tail"):
            details += ["  " + line for line in str(c["log_tail"]).splitlines()[-10:]]
        raise CLIError(f"comparison {c['id']} failed: {c.get('error')}", details=details)
    if args.json:
        out(json.dumps(c["report"], indent=2))
        return 0
    _print_comparison(c)
    return 0


def _progress_line(c: dict) -> str:
    p = c.get("progress") or {}
    text = f"comparison {c['id']}: {c['status']}"
    if p.get("stage"):
        text += f", {p['stage']}"
    if p.get("total") is not None and p.get("rows") is not None:
        text += f" ({p['rows']}/{p['total']} rows)"
    for v, j in sorted((p.get("jobs") or {}).items()):
        text += f"; {v}: job {j.get('job')} {j.get('status')}"
    return text


def cmd_remove(args) -> int:
    """Show what goes (every version; which one is live, which takes a share), then ask: on a
    terminal, the model's name typed back; elsewhere only `--yes` removes it."""
    client = client_for(args)
    m = client.json("GET", f"/api/models/{quote(args.name)}")
    versions = m.get("versions") or []
    shares = {t.get("version"): t.get("percent") for t in (m.get("traffic") or {}).get("targets") or []}
    out(f"removing {args.name} deletes it and all {len(versions)} of its version(s):")
    rows = []
    for v in versions:
        state = "live" if v.get("live") else "failed" if v.get("failed") else ""
        if shares.get(v["version"]):
            state = f"{state or 'rollout'}, takes {shares[v['version']]}% of requests"
        rows.append([v["version"], v.get("deployed_at"), state])
    if rows:
        out(table(rows, ["VERSION", "DEPLOYED", "STATE"]))
    if not args.yes:
        if not sys.stdin.isatty():
            raise CLIError(f"not removed: removing {args.name} deletes every version and needs confirmation; "
                           f"stdin is not a terminal, so pass --yes to remove it")
        try:
            answer = input(f"type {args.name} to remove it: ")
        except EOFError:
            answer = ""
        if answer.strip() != args.name:
            raise CLIError(f"not removed: {args.name} was not typed back")
    client.json("DELETE", f"/api/models/{quote(args.name)}")
    out(f"removed {args.name}")
    return 0


def _read_input(args) -> tuple[bytes, str]:
    if args.csv:
        return Path(args.csv).read_bytes(), "text/csv"
    if args.json:
        raw = Path(args.json).read_bytes()
    elif args.stdin == "-":
        raw = sys.stdin.buffer.read()
        if not raw.lstrip()[:1] in (b"{", b"["):
            return raw, "text/csv"
    else:
        raise CLIError("give the rows: --csv FILE, --json FILE, or - to read CSV or JSON from stdin")
    try:
        data = json.loads(raw)
    except ValueError as e:
        raise CLIError(f"not JSON: {e}") from None
    if isinstance(data, dict) and "rows" not in data:
        data = {"rows": [data]}
    elif isinstance(data, list):
        data = {"rows": data}
    return json.dumps(data).encode(), "application/json"


def cmd_predict(args) -> int:
    try:
        body, content_type = _read_input(args)
    except OSError as e:
        raise CLIError(f"cannot read the input: {e.strerror}: {e.filename}") from None
    path = f"/models/{quote(args.name)}/versions/{quote(args.version)}/predict" if args.version \
        else f"/models/{quote(args.name)}/predict"
    result = client_for(args).json("POST", path, data=body,
                                   headers={"Content-Type": content_type, "Accept": "application/json"},
                                   timeout=args.timeout)
    if args.raw:
        out(json.dumps(result, indent=2))
        return 0
    for score in result.get("scores", []):
        out(str(score))
    return 0


def _print_job(job: dict) -> None:
    fields = ["id", "model", "version", "status", "dataset", "rows", "results_uri", "created_at",
              "started_at", "finished_at", "trigger", "error"]
    width = max(map(len, fields))
    for k in fields:
        if job.get(k) not in (None, ""):
            out(f"{k.ljust(width)}  {job[k]}")
    if job.get("problems"):
        total = job.get("invalid_values") or len(job["problems"])
        out(f"rows that do not match the features ({total} value(s) in all):")
        for p in job["problems"][:20]:
            out(f"  row {p.get('row')}: {p.get('field') or '-'}: {p.get('error')}")
        if total > 20:
            out(f"  … and {total - 20} more (GET /api/jobs/{job.get('id')} lists the first 100)")
    elif job.get("status") == "failed" and job.get("log_tail"):
        out("log tail:")
        for line in str(job["log_tail"]).splitlines()[-20:]:
            out(f"  {line}")


PROGRESS_LINE_SECONDS = 5.0  # not a terminal: a progress line at most this often (or each 10 %)
PROGRESS_BAR_WIDTH = 24


def _eta_text(seconds: Optional[float]) -> str:
    if seconds is None:
        return "ETA …"
    s = int(round(seconds))
    return f"ETA {s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"ETA {s // 60}:{s % 60:02d}"


class _JobProgress:
    """A job's progress on stderr while `run --wait` waits: a bar redrawn in place on a terminal;
    elsewhere (a log, a pipe) a line when it moved by 10 % or PROGRESS_LINE_SECONDS passed, and
    the last one when the job ended."""

    def __init__(self, stream=None, *, clock=time.monotonic):
        self.stream = stream if stream is not None else sys.stderr
        try:
            self.tty = self.stream.isatty()
        except (AttributeError, ValueError):
            self.tty = False
        self.clock = clock
        self._drawn = False
        self._last: Optional[tuple[float, int, str]] = None  # (when, tenths, text) of the last line

    @staticmethod
    def text(job: dict) -> Optional[str]:
        scored, total = job.get("rows_scored"), job.get("rows_total")
        if scored is None:
            return None
        if not total:
            return f"job {job.get('id')}: {scored:,} rows scored"
        frac = min(max(scored / total, 0.0), 1.0)
        fill = int(frac * PROGRESS_BAR_WIDTH)
        bar = "#" * fill + "-" * (PROGRESS_BAR_WIDTH - fill)
        eta = f" · {_eta_text(job.get('eta_seconds'))}" if job.get("status") == "running" else ""
        return f"job {job.get('id')}: [{bar}] {scored:,}/{total:,} rows {frac * 100:3.0f}%{eta}"

    def show(self, job: dict) -> None:
        text = self.text(job)
        if text is None:
            return
        try:
            if self.tty:
                self.stream.write("\r" + text + "\x1b[K")
                self._drawn = True
            else:
                total = job.get("rows_total") or 0
                tenths = int(10 * job["rows_scored"] / total) if total else 0
                now = self.clock()
                last = self._last
                ended = job.get("status") in ("succeeded", "failed")  # its last line is always shown
                if last is not None and (text == last[2] or (
                        not ended and tenths <= last[1] and now - last[0] < PROGRESS_LINE_SECONDS)):
                    return
                self._last = (now, tenths, text)
                self.stream.write(text + "\n")
            self.stream.flush()
        except (OSError, ValueError):
            pass

    def close(self) -> None:
        if self._drawn:
            try:
                self.stream.write("\n")
                self.stream.flush()
            except (OSError, ValueError):
                pass
            self._drawn = False


def _wait_job(client: Client, job_id: str, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    progress = _JobProgress()
    try:
        while True:
            job = client.json("GET", f"/api/jobs/{quote(job_id)}")
            progress.show(job)
            if job["status"] in ("succeeded", "failed"):
                return job
            if time.monotonic() > deadline:
                raise CLIError(f"job {job_id} is still {job['status']} after {timeout:.0f}s")
            time.sleep(0.3)
    finally:
        progress.close()


def cmd_run(args) -> int:
    client = client_for(args)
    if args.dataset.startswith("gs://"):
        job = client.json("POST", f"/api/models/{quote(args.name)}/jobs", json={"dataset": args.dataset})
    else:
        path = Path(args.dataset)
        if not path.is_file():
            raise CLIError(f"{path}: no such file (give a local CSV or a gs:// URI)")
        with open(path, "rb") as f:
            up = client.json("POST", f"/api/models/{quote(args.name)}/datasets",
                             params={"filename": path.name}, data=f, headers={"Content-Type": "text/csv"},
                             timeout=600)
        out(f"uploaded {up['uri']}")
        job = _job_of_upload(client, up, args.timeout)
    out(f"job {job['id']} {job['status']}")
    if not args.wait:
        return 0
    job = _wait_job(client, job["id"], args.timeout)
    _print_job(job)
    if job["status"] == "succeeded":
        # where the scores are, and how to fetch them
        out(f"\nscores: {job.get('results_uri') or '(in the bucket)'}")
        out(f"get them: modelplane job {job['id']} --results > scores.csv")
        out(f"      or: GET {client.url}/api/jobs/{job['id']}/results (with your token)")
    return 0 if job["status"] == "succeeded" else 1


def _job_of_upload(client, up: dict, timeout: float) -> dict:
    """The job the upload's bucket event starts: named in the upload's answer where the runtime
    knows it in advance (the cluster: the event goes to Knative, not to the control service),
    else found in `/api/events` by the event's exactly-once key."""
    deadline = time.monotonic() + timeout
    while True:
        if up.get("job"):
            try:
                return client.json("GET", f"/api/jobs/{quote(up['job'])}")
            except CLIError as e:
                if e.status != 404:
                    raise
        else:
            events = client.json("GET", "/api/events", params={"key": up["key"]})
            done = [e for e in events if e.get("job")]
            if done:
                return client.json("GET", f"/api/jobs/{quote(done[0]['job'])}")
            ignored = [e for e in events if e.get("action") == "ignored"]
            if ignored:
                raise CLIError(f"the upload event was ignored: {ignored[0].get('reason')}")
        if time.monotonic() > deadline:
            where = (f"job {up['job']} did not appear — is the bridge (modelplane watch) delivering the bucket's "
                     "events to the Broker? (With Eventarc, events carry Google's ids: find the job with "
                     "`modelplane jobs`.)" if up.get("job") else "is the bucket watcher running?")
            raise CLIError(f"no job started for {up['uri']} within {timeout:.0f}s — {where}")
        time.sleep(0.2 if not up.get("job") else 1.0)


def cmd_jobs(args) -> int:
    params = {k: v for k, v in (("model", args.model), ("status", args.status), ("limit", args.limit)) if v}
    jobs = client_for(args).json("GET", "/api/jobs", params=params)
    if not jobs:
        out("no jobs")
        return 0
    out(table([[j["id"], j["model"], j.get("version"), j["status"], j.get("rows"), j.get("trigger"),
                j.get("created_at", "")[:19], j.get("dataset")] for j in jobs],
              ["ID", "MODEL", "VERSION", "STATUS", "ROWS", "TRIGGER", "CREATED", "DATASET"]))
    return 0


def cmd_job(args) -> int:
    client = client_for(args)
    if args.results:
        resp = client.request("GET", f"/api/jobs/{quote(args.id)}/results", timeout=600)
        sys.stdout.buffer.write(resp.content)
        sys.stdout.flush()
        return 0
    _print_job(client.json("GET", f"/api/jobs/{quote(args.id)}"))
    return 0


def cmd_cancel(args) -> int:
    job = client_for(args).json("DELETE", f"/api/jobs/{quote(args.id)}", timeout=60)
    out(f"job {job['id']} ({job.get('model')}) is {job.get('status')}: {job.get('error') or ''}".rstrip(": "))
    return 0


# -- local commands ------------------------------------------------------------------------------

def cmd_validate(args) -> int:
    from control.validate import run

    return run([Path(d) for d in args.dirs], timeout=args.timeout, stream=sys.stdout)


def cmd_render(args) -> int:
    from adapters.manifest import ManifestError, load_manifest
    from control.runtime.knative_objects import render_yaml

    settings = load_settings(args)
    target = Path(args.target)
    if not (target / "model.yaml").is_file():
        candidate = Path(settings.models_dir) / args.target
        if not (candidate / "model.yaml").is_file():
            raise CLIError(f"{args.target}: neither a model folder nor a model under {settings.models_dir}")
        target = candidate
    try:
        manifest = load_manifest(target)
    except ManifestError as e:
        raise CLIError("invalid manifest", details=[f"  {line}" for line in str(e).splitlines()]) from None
    sys.stdout.write(render_yaml(manifest, settings))
    sys.stdout.flush()
    return 0


def _console_command(settings, port: int) -> list[str]:
    # console.serve: Streamlit with a Host and WebSocket-origin guard in front (DNS rebinding)
    return [sys.executable, "-m", "console.serve", "run", str(CONSOLE_APP), "--server.port", str(port),
            "--server.address", "127.0.0.1" if settings.host in ("127.0.0.1", "localhost") else settings.host,
            "--server.headless", "true", "--browser.gatherUsageStats", "false"]


def _console_env(settings, key: str = "") -> dict:
    """The console's environment; `key`: the one its link carries (console/serve.py)."""
    env = dict(os.environ, MODELPLANE_URL=settings.control_url)
    if key:
        env["MODELPLANE_CONSOLE_KEY"] = key
    if settings.token:
        env["MODELPLANE_TOKEN"] = settings.token
    return env


def cmd_console(args) -> int:
    settings = load_settings(args)
    if not CONSOLE_APP.is_file():
        raise CLIError(f"the console is not installed ({CONSOLE_APP} is missing)")
    import secrets

    key = secrets.token_urlsafe(24)
    out(f"console  http://127.0.0.1:{settings.console_port}/?key={key}   (a new key each start: open this link)")
    return subprocess.call(_console_command(settings, settings.console_port), env=_console_env(settings, key))


def cmd_watch(args) -> int:
    from control.server import wait_for_signal
    from control.watcher import from_settings

    settings = load_settings(args)
    watcher = from_settings(settings, sink=args.sink).start()
    out(f"watching gs://{settings.bucket_name}/incoming/ -> {args.sink} every {settings.watch_interval:g}s or more "
        "(listing stays under 10% of the time)")
    try:
        wait_for_signal()
    finally:
        watcher.stop()
    return 0


def cmd_serve(args) -> int:
    from control.auth import TokenError
    from control.server import serve
    from control.statelock import StateLocked

    try:
        serve(load_settings(args))
    except (TokenError, StateLocked) as e:
        raise CLIError(str(e)) from None
    return 0


PARTS_FILE = "processes.json"
CONSOLE_START_TIMEOUT = 60.0


def _port_free(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _start_console(settings, state: Path, url: str, token: str):
    """(the console process once it answers its health check, the key its link carries), or
    (None, why it did not start)."""
    from control.runtime.local_procs import stop_process, with_pdeathsig

    port = settings.console_port
    if not _port_free(port):
        return None, f"port {port} is taken by another process (set MODELPLANE_CONSOLE_PORT)"
    import secrets

    console_settings = settings.model_copy(update={"url": url, "token": token})
    key = secrets.token_urlsafe(24)
    log_path = state / "logs" / "console.log"
    with open(log_path, "ab") as logf:
        proc = subprocess.Popen(with_pdeathsig(_console_command(console_settings, port)),
                                env=_console_env(console_settings, key), stdout=logf, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    session = requests.Session()
    session.trust_env = False
    deadline = time.monotonic() + CONSOLE_START_TIMEOUT
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                return None, f"it exited with status {proc.returncode} (see {log_path})"
            try:
                if session.get(f"http://127.0.0.1:{port}/_stcore/health", timeout=1).status_code == 200:
                    if proc.poll() is None:  # ours answered, not something else on the port
                        return proc, key
            except requests.RequestException:
                pass
            time.sleep(0.2)
    finally:
        session.close()
    stop_process(proc, grace=5.0)
    return None, f"it did not answer within {CONSOLE_START_TIMEOUT:.0f}s (see {log_path})"


def cmd_up(args) -> int:
    from control import statelock
    from control.auth import TokenError, token_path
    from control.emulator import Emulator
    from control.runtime.local_procs import reap_recorded, record_parts, start_time, stop_process
    from control.server import ControlServer

    settings = load_settings(args)
    state = Path(settings.state_dir).resolve()
    try:  # before anything in the state dir is read or started
        statelock.acquire(state)
    except statelock.StateLocked as e:
        raise CLIError(str(e)) from None
    (state / "logs").mkdir(parents=True, exist_ok=True)
    parts_file = state / PARTS_FILE
    for what in reap_recorded(parts_file):
        out(f"stopped  {what}, left running by a plane that did not stop cleanly")
    started: list = []  # (name, stop callable), stopped in reverse order
    recorded: list[dict] = []
    stopping = threading.Event()

    def record(name: str, pid: int) -> None:
        recorded.append({"name": name, "pid": pid, "start": start_time(pid)})
        record_parts(parts_file, recorded)

    def on_signal(signum, frame):  # also during start-up: finish starting, then stop cleanly
        stopping.set()
    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        emulator_note = ""
        if os.environ.get("STORAGE_EMULATOR_HOST"):
            from control.gcs import ensure_bucket, storage_client

            ensure_bucket(storage_client(), settings.bucket_name)
            emulator_note = f" (emulator at {os.environ['STORAGE_EMULATOR_HOST']})"
        elif not settings.bucket:
            from control.gcs import storage_key

            emu = Emulator(state / "gcs", bucket=settings.bucket_name, port=settings.emulator_port,
                           key=storage_key(state))  # every request needs it; local tools read it there
            try:
                emu.start()
            except RuntimeError as e:
                raise CLIError(str(e).splitlines()[0]) from None
            started.append(("GCS emulator", emu.stop))
            record("GCS emulator", emu.proc.pid)
            os.environ["STORAGE_EMULATOR_HOST"] = emu.endpoint
            os.environ["MODELPLANE_STORAGE_KEY"] = emu.key  # the watcher, uploads and batch adapters send it
            emulator_note = f" (embedded emulator at {emu.endpoint})"

        try:
            server = ControlServer(settings, watch=True).start()
        except OSError as e:
            raise CLIError(e.strerror or str(e)) from None
        except (TokenError, statelock.StateLocked) as e:
            raise CLIError(str(e)) from None
        started.append(("control service", server.stop))
        out(f"control  {server.url}")
        out(f"bucket   gs://{settings.bucket_name}{emulator_note}")
        if getattr(server.runtime, "sandbox", None) is not None:
            out(f"sandbox  {server.runtime.sandbox.describe()}")
        if server.plane.token_created:  # printed once: from now on it is read from the file
            out(f"token    {server.plane.token}")
            out(f"         (new; stored in {token_path(settings.state_dir)}, which the CLI and console here read)")
        elif not settings.token:
            out(f"token    in {token_path(settings.state_dir)}")

        if settings.console and CONSOLE_APP.is_file():
            proc, why = _start_console(settings, state, server.url, server.plane.token)   # why: or its key
            if proc is None:  # never a URL for a part that is not running
                print(f"console  not started: {why}", file=sys.stderr, flush=True)
            else:
                started.append(("console", lambda: stop_process(proc, grace=10.0)))
                record("console", proc.pid)
                # the link carries the console's key (console/serve.py): without it the port answers 401
                out(f"console  http://127.0.0.1:{settings.console_port}/?key={why}")

        models = server.runtime.models()
        failed = server.plane.failed
        out(f"models   {len(models)} registered" + (f": {', '.join(m.name for m in models)}" if models else "")
            + (f"; {len(failed)} failed: {', '.join(failed)} (see `modelplane ls`)" if failed else ""))
        out("press Ctrl-C to stop")
        while not stopping.wait(0.5):
            pass
    finally:
        for name, stop in reversed(started):
            began = time.monotonic()
            try:
                stop()
            except Exception as e:  # keep stopping the rest
                print(f"stopping the {name} failed: {e}", file=sys.stderr)
            log.info("stopped the %s in %.1fs", name, time.monotonic() - began)
        try:
            parts_file.unlink()
        except FileNotFoundError:
            pass
        statelock.release(state)
        for s, h in previous.items():
            signal.signal(s, h)
    out("stopped")
    return 0


# -- argument parsing ----------------------------------------------------------------------------

def _global_flags(parser: argparse.ArgumentParser, *, suppress: bool) -> None:
    default = argparse.SUPPRESS if suppress else None
    g = parser.add_argument_group("global options")
    g.add_argument("--url", default=default, help="control service URL (MODELPLANE_URL)")
    g.add_argument("--token-file", default=default, metavar="FILE",
                   help="read the bearer token from FILE, or from stdin with '-' (default: MODELPLANE_TOKEN, else "
                        "the state dir's token file for a service on this machine)")
    g.add_argument("--token", default=default, help=argparse.SUPPRESS)  # refused: see load_settings
    g.add_argument("--port", type=int, default=default, help="control service port (MODELPLANE_PORT)")
    g.add_argument("--state-dir", default=default, help="state directory (MODELPLANE_STATE_DIR)")
    g.add_argument("--models-dir", default=default, help="model folders registered at start (MODELPLANE_MODELS_DIR)")
    g.add_argument("-v", "--verbose", action="store_true", default=default, help="log more")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="modelplane", description="Serve data-science models in any language.")
    _global_flags(parser, suppress=False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, func, help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_)
        _global_flags(p, suppress=True)
        p.set_defaults(func=func)
        return p

    p = command("up", cmd_up, "start the embedded plane: GCS emulator, control service, watcher, console")
    p.add_argument("--no-console", action="store_true", help="do not start the console")
    command("serve", cmd_serve, "run the control service only (foreground)")
    p = command("watch", cmd_watch, "watch the bucket's incoming/ and POST events to a sink (the cluster bridge)")
    p.add_argument("--sink", required=True, help="where to POST the CloudEvents (e.g. the Broker URL)")
    command("console", cmd_console, "run the Streamlit console against the control service")
    p = command("ls", cmd_ls, "list models (filtered by label, owner or text)")
    p.add_argument("--label", "-l", action="append", metavar="SELECTOR",
                   help="key=value, key!=value or key (has the label); repeat: all must match")
    p.add_argument("--owner", help="only this owner's models (exact)")
    p.add_argument("--search", "-s", metavar="TEXT",
                   help="case-insensitive text in the name, description, owner or label values")
    p.add_argument("--limit", type=int, metavar="N", help="at most N models (the first N by name)")
    p = command("status", cmd_status, "one model in full")
    p.add_argument("name")
    p = command("deploy", cmd_deploy, "deploy a model folder as a new version")
    p.add_argument("dir")
    p.add_argument("--no-live", action="store_true",
                   help="keep the live version live (then `rollout` the new one to a share of requests)")
    p = command("rollout", cmd_rollout, "send a share of a realtime model's requests to another version")
    p.add_argument("name")
    p.add_argument("version")
    p.add_argument("--percent", type=int, metavar="P", help="percent of requests the version answers")
    p.add_argument("--shadow", type=int, metavar="P",
                   help="percent of the live version's requests also sent to it (answers recorded, never returned)")
    p = command("promote", cmd_promote, "make the version under rollout live")
    p.add_argument("name")
    p = command("pin", cmd_pin, "keep a version routed at 0 %%, with a URL of its own (cluster runtime)")
    p.add_argument("name")
    p.add_argument("version")
    p = command("unpin", cmd_unpin, "take a pinned version's route away")
    p.add_argument("name")
    p.add_argument("version")
    p = command("rollback", cmd_rollback, "withdraw a rollout at once, or make an earlier version live")
    p.add_argument("name")
    p.add_argument("version", nargs="?", help="the version to make live (default: undo the last change)")
    p = command("shadow", cmd_shadow, "compare what the version under rollout answered to mirrored requests")
    p.add_argument("name")
    p.add_argument("--threshold", type=float, help="count the rows whose decision flips at this score")
    p.add_argument("--top", type=int, default=10, help="largest differences to include (default 10)")
    p.add_argument("--json", action="store_true", help="print the whole report as JSON")
    p = command("compare", cmd_compare, "score one dataset with two versions and compare them row by row")
    p.add_argument("name")
    p.add_argument("a", metavar="A", help="a deployed version (the baseline)")
    p.add_argument("b", metavar="B", help="another deployed version")
    p.add_argument("dataset", metavar="FILE|gs://URI", help="a local CSV (uploaded first) or a CSV in the bucket")
    p.add_argument("--threshold", type=float, help="list the rows whose decision (score >= T) flips")
    p.add_argument("--top", type=int, default=20, help="how many of the largest differences to list (default 20)")
    p.add_argument("--json", action="store_true", help="print the whole report as JSON")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait (default 3600)")
    command("whoami", cmd_whoami, "the name, role and owner of the token this CLI uses")
    p = command("token", cmd_token, "named tokens with roles: create, ls, revoke (admin)")
    p.add_argument("action", choices=["create", "ls", "revoke"])
    p.add_argument("name", nargs="?", help="the token's name (create, revoke)")
    p.add_argument("--role", choices=["viewer", "runner", "deployer", "admin"],
                   help="viewer: read; runner: also predict and run jobs; deployer: also deploy, roll out, "
                        "compare; admin: also remove models and manage tokens")
    p.add_argument("--owner", help="limit the token to the models whose manifest names this owner")
    p = command("audit", cmd_audit, "who changed what, and how it ended (newest first)")
    p.add_argument("--who", help="only this token name's records")
    p.add_argument("--action", help="only this action (deploy, rollout, promote, rollback, remove, reference, "
                                    "compare, job.run, job.cancel, dataset.upload, token.create, token.revoke)")
    p.add_argument("--model", help="only this model's records")
    p.add_argument("--outcome", choices=["ok", "denied", "failed"])
    p.add_argument("--since", metavar="TIME", help="records at or after this UTC time (2026-12-01 or ISO 8601)")
    p.add_argument("--limit", type=int, default=50, help="at most N records (default 50)")
    p.add_argument("--json", action="store_true", help="print the records as JSON")
    p.add_argument("--verify", action="store_true", help="check the hash chain from the first record")
    p = command("remove", cmd_remove, "delete a model and all its versions (asks first)")
    p.add_argument("name")
    p.add_argument("--yes", "-y", action="store_true", help="do not ask: remove it and every version")
    p = command("predict", cmd_predict, "score rows with a realtime model")
    p.add_argument("name")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--csv", metavar="FILE", help="rows as CSV (header = feature names)")
    src.add_argument("--json", metavar="FILE", help='rows as JSON: {"rows": [...]}, a list of rows, or one row')
    src.add_argument("stdin", nargs="?", choices=["-"], help="read CSV or JSON from stdin")
    p.add_argument("--version", help="score with this deployed version, whatever the traffic split")
    p.add_argument("--raw", action="store_true", help="print the whole JSON answer")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait (default 120)")
    p = command("run", cmd_run, "run a batch model on a dataset (gs:// URI, or a local CSV uploaded to the bucket)")
    p.add_argument("name")
    p.add_argument("dataset", metavar="gs://URI|FILE")
    p.add_argument("--wait", action="store_true", help="wait for the job and print its result")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds to wait (default 1800)")
    p = command("jobs", cmd_jobs, "list batch jobs")
    p.add_argument("--model")
    p.add_argument("--status", choices=["queued", "running", "succeeded", "failed"])
    p.add_argument("--limit", type=int)
    p = command("job", cmd_job, "one job; --results prints its scores CSV")
    p.add_argument("id")
    p.add_argument("--results", action="store_true")
    p = command("cancel", cmd_cancel, "cancel a queued or running job: it is stopped and ends failed "
                                      "('cancelled by <you>'); cancelling it again changes nothing")
    p.add_argument("id")
    p = command("validate", cmd_validate, "check model folders: manifest + a live contract test with sample.csv")
    p.add_argument("dirs", nargs="+", metavar="DIR")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per model (default 60)")
    p = command("render", cmd_render, "print the Knative YAML a model becomes (offline)")
    p.add_argument("target", metavar="NAME|DIR")
    p = command("bench", None, "measure the plane against its targets (options: see `modelplane bench --help`)")
    p.add_argument("bench_args", nargs=argparse.REMAINDER, help="options of the benchmark, e.g. --quick")
    return parser


BENCH_MISSING = "error: `modelplane bench` needs the [bench] extra: pip install 'modelplane[bench]'"


def cmd_bench(argv: Sequence[str]) -> int:
    """`modelplane bench …` is `python -m loadtest …`, its options passed through untouched. The
    benchmark is a command the package registers (entry point group `modelplane.commands`), so
    the control service never imports it."""
    from importlib.metadata import entry_points

    found = entry_points(group="modelplane.commands", name="bench")
    try:
        bench_main = next(iter(found)).load() if found else None
    except ImportError as e:
        print(f"{BENCH_MISSING} ({e.name or e} is missing)", file=sys.stderr)
        return 2
    if bench_main is None:
        print(BENCH_MISSING, file=sys.stderr)
        return 2
    return bench_main(list(argv))


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        return cmd_bench(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if getattr(args, "verbose", False) else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command in ("up", "serve", "watch") and not getattr(args, "verbose", False):
        logging.getLogger().setLevel(logging.INFO)
    try:
        return args.func(args)
    except CLIError as e:
        print(f"error: {e.message}", file=sys.stderr)
        for line in e.details:
            print(line, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
    except Exception as e:  # never a traceback for the user; the log has it at -v
        log.debug("unexpected failure", exc_info=True)
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
