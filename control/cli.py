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



def problem_line(p: dict, offset: int = 0) -> str:
    """One row problem as the CLI prints it: `row N: field: error` (rows from 1), or
    `column F: error` for a problem of a whole column (row null)."""
    text = p.get("error") or p.get("message")
    row = p.get("row")
    if isinstance(row, int) and not isinstance(row, bool):
        return f"  row {row + offset:,}: {p.get('field') or '-'}: {text}"
    if p.get("field"):
        return f"  column {p.get('field')}: {text}"
    return f"  {text}"

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
                    details.append(problem_line(p))
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
        details = [problem_line(p) for p in c.get("problems") or []][:20]
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


#: requests in flight at once for a split file: the model's most replicas, within these bounds
PREDICT_MAX_PARALLEL = 8
#: a chunk answered 503/429 or whose connection broke is tried again this many times more
PREDICT_RETRIES = 4
PREDICT_RETRY_MAX_WAIT = 10.0       # seconds: the longest wait before a retry (Retry-After is capped at it)
#: chunks read ahead of the first one not yet written: bounds what is held of the input and the answers
PREDICT_WINDOW_PER_REQUEST = 2
DEFAULT_MAX_ROWS = 10_000           # the manifest's defaults, used when the model cannot be read
DEFAULT_MAX_BODY = 16 * 1024 * 1024
JSON_READ_BLOCK = 1 << 20
_WS = b" \t\r\n"


class _Chunk:
    __slots__ = ("index", "offset", "rows", "body", "end")

    def __init__(self, index: int, offset: int, rows: int, body: bytes, end: int):
        self.index = index      # 0, 1, … in the file
        self.offset = offset    # rows of the file before this chunk: its row k is the file's row k + offset
        self.rows = rows
        self.body = body
        self.end = end          # bytes of the input read once this chunk was complete


class _Input:
    """A binary stream with a few bytes already read from it put back in front."""

    def __init__(self, stream, prefix: bytes = b""):
        self.stream = stream
        self.prefix = prefix
        self.pos = 0            # bytes handed out so far

    def read(self, n: int) -> bytes:
        if self.prefix:
            data, self.prefix = self.prefix[:n], self.prefix[n:]
            if len(data) < n:
                data += self.stream.read(n - len(data))
        else:
            data = self.stream.read(n)
        self.pos += len(data)
        return data

    def readline(self) -> bytes:
        if self.prefix:
            cut = self.prefix.find(b"\n")
            if cut >= 0:
                data, self.prefix = self.prefix[:cut + 1], self.prefix[cut + 1:]
            else:
                data, self.prefix = self.prefix + self.stream.readline(), b""
        else:
            data = self.stream.readline()
        self.pos += len(data)
        return data


def _sniff(stream) -> tuple[_Input, str]:
    """The stream with its first bytes put back, and "json" when it starts (after a BOM and
    whitespace) with { or [, else "csv"."""
    bom = b"\xef\xbb\xbf"
    head = rest = b""
    while len(head) < 4096:
        b = stream.read(1)
        if not b:
            break
        head += b
        rest = head[3:] if head.startswith(bom) else b"" if bom.startswith(head) else head
        if rest.strip(_WS):
            break
    first = rest.lstrip(_WS)[:1]
    return _Input(stream, head), "json" if first in (b"{", b"[") else "csv"


def _too_big(row: int, max_body: int) -> CLIError:
    return CLIError(f"row {row:,} alone is larger than the model's max_body ({max_body:,} bytes): "
                    "it cannot be sent in any request")


def _csv_records(src: _Input, room: int, max_body: int):
    """The CSV's records as bytes, each with its line end: a record spans lines while a quoted
    field is open (its count of double quotes is odd). Blank lines are skipped, as the model's
    adapter skips them. A record over `room` bytes (max_body less the header) is refused."""
    row = 1
    parts: list[bytes] = []
    size = quotes = 0
    while True:
        line = src.readline()
        if not line:
            break
        parts.append(line)
        size += len(line)
        quotes += line.count(b'"')
        if size > room:
            raise _too_big(row, max_body)
        if quotes % 2:
            continue
        record = b"".join(parts) if len(parts) > 1 else parts[0]
        parts, size, quotes = [], 0, 0
        if not record.rstrip(b"\r\n"):
            continue
        yield record if record.endswith(b"\n") else record + b"\n"
        row += 1
    if parts:  # an unterminated quote: sent as it is, the adapter names the fault
        yield b"".join(parts) + b"\n"


def _csv_chunks(src: _Input, max_rows: int, max_body: int):
    header = src.readline()
    if not header.endswith(b"\n"):
        header += b"\n"
    index = offset = 0
    rows: list[bytes] = []
    size = len(header)
    for record in _csv_records(src, max_body - len(header), max_body):
        if rows and (len(rows) >= max_rows or size + len(record) > max_body):
            yield _Chunk(index, offset, len(rows), header + b"".join(rows), src.pos)
            index, offset = index + 1, offset + len(rows)
            rows, size = [], len(header)
        rows.append(record)
        size += len(record)
    yield _Chunk(index, offset, len(rows), header + b"".join(rows), src.pos)


class _JSONRows:
    """The rows of a JSON document read a block at a time: `{"rows": [...]}` (other keys are
    ignored, as the adapter ignores them), a list of rows, or one row (an object without
    "rows"). Each row comes out as its own text, never re-encoded."""

    def __init__(self, src: _Input, max_body: int):
        import codecs

        self.src = src
        self.max_body = max_body
        self.decoder = json.JSONDecoder()
        self.utf8 = codecs.getincrementaldecoder("utf-8-sig")()
        self.buf = ""
        self.i = 0
        self.eof = False
        self.row = 1

    def _more(self) -> bool:
        if self.eof:
            return False
        data = self.src.read(JSON_READ_BLOCK)
        try:
            text = self.utf8.decode(data, final=not data)
        except UnicodeDecodeError as e:
            raise CLIError(f"the JSON is not UTF-8 text (byte {self.src.pos - len(data) + e.start:,})") from None
        self.eof = not data
        self.buf = self.buf[self.i:] + text
        self.i = 0
        return True

    def _skip_ws(self) -> str:
        """The next character that is not whitespace ('' at the end)."""
        while True:
            while self.i < len(self.buf) and self.buf[self.i] in " \t\r\n":
                self.i += 1
            if self.i < len(self.buf):
                return self.buf[self.i]
            if not self._more():
                return ""

    def _value(self, what: str) -> tuple[Any, str]:
        """The next JSON value and its text; reads on while it may be cut off by the block's end."""
        self._skip_ws()
        while True:
            try:
                value, end = self.decoder.raw_decode(self.buf, self.i)
            except json.JSONDecodeError as e:
                if self.eof:
                    raise CLIError(f"not JSON: {e.msg} in {what}") from None
                if len(self.buf) - self.i > self.max_body:
                    raise CLIError(f"not JSON ({e.msg}) in {what}, or it is larger than the model's max_body "
                                   f"({self.max_body:,} bytes)") from None
                self._more()
                continue
            if end >= len(self.buf) and not self.eof:  # a number may go on in the next block
                self._more()
                continue
            text = self.buf[self.i:end]
            self.i = end
            return value, text

    def _expect(self, chars: str, what: str) -> str:
        c = self._skip_ws()
        if c == "" or c not in chars:
            found = "the end of the input" if c == "" else repr(c)
            raise CLIError(f"not JSON rows: expected {' or '.join(map(repr, chars))} {what}; found {found}")
        self.i += 1
        return c

    def rows(self):
        """Yields each row's text."""
        c = self._skip_ws()
        if c == "[":
            self.i += 1
            yield from self._array()
        elif c == "{":
            yield from self._object()
        else:
            raise CLIError('not JSON rows: expected {"rows": [...]}, a list of rows or one row')
        if self._skip_ws() != "":
            raise CLIError("not JSON: more after the end of the document")

    def _array(self):
        if self._skip_ws() == "]":
            self.i += 1
            return
        while True:
            _, text = self._value(f"row {self.row:,}")
            yield text
            self.row += 1
            if self._expect(",]", f"after row {self.row - 1:,}") == "]":
                return

    def _object(self):
        self.i += 1
        keys_text = []
        found = False
        if self._skip_ws() == "}":
            self.i += 1
            yield "{}"
            return
        while True:
            key, _ = self._value("a key")
            self._expect(":", f"after the key {key!r}")
            if key == "rows" and not found and self._skip_ws() == "[":
                found = True
                self.i += 1
                yield from self._array()
            else:
                _, text = self._value(f"the value of {key!r}")
                keys_text.append((key, text))
            if self._expect(",}", "between an object's members") == "}":
                break
        if not found:  # one row: its members as they were written
            yield "{" + ",".join(f"{json.dumps(k)}:{t}" for k, t in keys_text) + "}"


def _json_chunks(src: _Input, max_rows: int, max_body: int):
    head, tail = b'{"rows": [', b"]}"
    index = offset = 0
    rows: list[bytes] = []
    size = len(head) + len(tail)
    reader = _JSONRows(src, max_body)
    for text in reader.rows():
        row = text.encode()
        if len(row) + len(head) + len(tail) > max_body:
            raise _too_big(offset + len(rows) + 1, max_body)
        if rows and (len(rows) >= max_rows or size + len(row) + 1 > max_body):
            yield _Chunk(index, offset, len(rows), head + b",".join(rows) + tail, src.pos)
            index, offset = index + 1, offset + len(rows)
            rows, size = [], len(head) + len(tail)
        rows.append(row)
        size += len(row) + 1
    yield _Chunk(index, offset, len(rows), head + b",".join(rows) + tail, src.pos)


class _ChunkFailed(Exception):
    def __init__(self, chunk: _Chunk, status: Optional[int], body: dict):
        super().__init__(body.get("error"))
        self.chunk, self.status, self.body = chunk, status, body


class _Sender:
    """POSTs chunks, one requests session per thread, tried again on 503/429/a broken connection."""

    def __init__(self, client: Client, accept: str, content_type: str, timeout: float):
        self.url = client.url
        self.headers = dict(client.session.headers)
        self.headers.update({"Content-Type": content_type, "Accept": accept})
        self.timeout = timeout
        self.local = threading.local()
        self.sessions: list[requests.Session] = []
        self.stop = threading.Event()

    def _session(self) -> requests.Session:
        s = getattr(self.local, "session", None)
        if s is None:
            s = requests.Session()
            s.trust_env = False
            self.local.session = s
            self.sessions.append(s)
        return s

    def close(self) -> None:
        for s in self.sessions:
            s.close()

    def send(self, path: str, chunk: _Chunk) -> requests.Response:
        session = self._session()
        for attempt in range(PREDICT_RETRIES + 1):
            last = attempt == PREDICT_RETRIES
            wait = min(0.5 * 2 ** attempt, PREDICT_RETRY_MAX_WAIT)
            try:
                resp = session.post(self.url + path, data=chunk.body, headers=self.headers, timeout=self.timeout)
            except requests.Timeout:
                raise _ChunkFailed(chunk, None, {"error": f"no answer within {self.timeout:.0f}s"}) from None
            except requests.ConnectionError:
                if last or self.stop.is_set():
                    raise _ChunkFailed(chunk, None, {"error": f"cannot reach the control service at {self.url}"}) \
                        from None
                log.debug("rows %d–%d: the connection broke; trying again in %.1fs",
                          chunk.offset + 1, chunk.offset + chunk.rows, wait)
                self.stop.wait(wait)
                continue
            if resp.status_code in (429, 503) and not last and not self.stop.is_set():
                try:
                    wait = min(max(float(resp.headers.get("Retry-After", "")), 0.0), PREDICT_RETRY_MAX_WAIT)
                except ValueError:
                    pass
                log.debug("rows %d–%d: answered %d; trying again in %.1fs",
                          chunk.offset + 1, chunk.offset + chunk.rows, resp.status_code, wait)
                self.stop.wait(wait)
                continue
            if resp.status_code >= 400:
                try:
                    body = resp.json()
                except ValueError:
                    body = {"error": resp.text.strip()[:300] or resp.reason}
                raise _ChunkFailed(chunk, resp.status_code, body if isinstance(body, dict) else {"error": str(body)})
            return resp
        raise AssertionError("unreachable")


def _chunk_error(failed: _ChunkFailed, split: bool) -> CLIError:
    """The failure of one request, its rows numbered in the whole file (chunk offset + the row the
    answer names)."""
    c, body = failed.chunk, failed.body
    error = str(body.get("error") or "").splitlines()
    message = error[0] if error else f"HTTP {failed.status}"
    if failed.status is not None:
        message += f" ({failed.status})"
    if split:
        message = f"rows {c.offset + 1:,}–{c.offset + c.rows:,} of the file (request {c.index + 1}): {message}"
    details = []
    for p in body.get("problems") or []:
        if not isinstance(p, dict):
            continue
        details.append(problem_line(p, c.offset))
    if body.get("truncated"):
        details.append(f"  … and {body['truncated']} more")
    if split:
        details.append("nothing was written: no request after it was sent")
    return CLIError(message, details=details, status=failed.status)


class _StderrBar:
    """What the progress displays share: stderr (or the stream given), whether it is a terminal,
    and ending a bar drawn in place with a newline."""

    def __init__(self, stream=None, *, clock=time.monotonic):
        self.stream = stream if stream is not None else sys.stderr
        try:
            self.tty = self.stream.isatty()
        except (AttributeError, ValueError):
            self.tty = False
        self.clock = clock
        self._drawn = False

    def close(self) -> None:
        if self._drawn:
            try:
                self.stream.write("\n")
                self.stream.flush()
            except (OSError, ValueError):
                pass
            self._drawn = False


class _PredictProgress(_StderrBar):
    """Rows scored of a split file on stderr: a bar redrawn in place on a terminal (or with
    --progress), else one line at the end."""

    def __init__(self, total_bytes: Optional[int], *, force: bool, stream=None, clock=time.monotonic):
        super().__init__(stream, clock=clock)
        self.bar = self.tty or force
        self.total_bytes = total_bytes
        self.start = clock()
        self._shown = 0.0

    def text(self, done: int, done_bytes: int, total: Optional[int]) -> str:
        exact = total is not None
        if total is None and self.total_bytes and done_bytes:
            total = max(done, round(done * self.total_bytes / done_bytes))
        if not total:
            return f"{done:,} rows scored"
        frac = min(done / total, 1.0)
        fill = int(frac * PROGRESS_BAR_WIDTH)
        elapsed = self.clock() - self.start
        eta = elapsed * (total - done) / done if done else None
        return (f"[{'#' * fill}{'-' * (PROGRESS_BAR_WIDTH - fill)}] {done:,}/{'' if exact else '~'}{total:,} rows "
                f"{frac * 100:3.0f}% · {_eta_text(eta if done < total else 0)}")

    def show(self, done: int, done_bytes: int, total: Optional[int]) -> None:
        if not self.bar:
            return
        now = self.clock()
        if self._drawn and now - self._shown < 0.1 and done != total:
            return
        self._shown = now
        try:
            self.stream.write("\r" + self.text(done, done_bytes, total) + "\x1b[K")
            self.stream.flush()
            self._drawn = True
        except (OSError, ValueError):
            pass

    def finish(self, rows: int, requests_: int, parallel: int) -> None:
        self.close()
        took = self.clock() - self.start
        try:
            self.stream.write(f"scored {rows:,} rows in {requests_:,} requests ({parallel} at once) "
                              f"in {took:.1f}s\n")
            self.stream.flush()
        except (OSError, ValueError):
            pass



def _join_json(joined: Optional[dict], answer: dict) -> dict:
    """One answer from two: lists (scores) end to end, objects of lists (passthrough columns)
    column by column; anything else as the first answer has it."""
    if joined is None:
        return {k: (list(v) if isinstance(v, list) else
                    {c: list(x) for c, x in v.items()} if isinstance(v, dict) else v) for k, v in answer.items()}
    for k, v in answer.items():
        have = joined.get(k)
        if isinstance(v, list) and isinstance(have, list):
            have.extend(v)
        elif isinstance(v, dict) and isinstance(have, dict):
            for c, x in v.items():
                if isinstance(x, list) and isinstance(have.get(c), list):
                    have[c].extend(x)
        elif k not in joined:
            joined[k] = v
    return joined


def _first_record(data: bytes) -> int:
    """Where the first CSV record of `data` ends (quotes taken into account)."""
    quotes = 0
    start = 0
    while True:
        cut = data.find(b"\n", start)
        if cut < 0:
            return len(data)
        quotes += data.count(b'"', start, cut)
        start = cut + 1
        if quotes % 2 == 0:
            return start


def _model_limits(client: Client, name: str) -> dict:
    """max_rows, max_body, the most replicas, the score's and passthrough columns' names and the
    live version (when no rollout splits the traffic) of `name`, or the manifest's defaults when
    the token may not read the model."""
    try:
        detail = client.json("GET", f"/api/models/{quote(name)}")
    except CLIError as e:
        if e.status not in (401, 403):
            raise
        detail = {}
    manifest = detail.get("manifest") or {}
    limits = manifest.get("limits") or {}
    try:
        from adapters.manifest import parse_bytes

        max_body = parse_bytes(limits.get("max_body") or DEFAULT_MAX_BODY)
    except (ValueError, ImportError):
        max_body = DEFAULT_MAX_BODY
    traffic = detail.get("traffic") or {}
    steady = traffic.get("live") and not traffic.get("candidate") and not traffic.get("percent")
    return {
        "max_rows": max(int(limits.get("max_rows") or DEFAULT_MAX_ROWS), 1),
        "max_body": max(max_body, 1024),
        "replicas": int((manifest.get("scaling") or {}).get("max") or 1),
        "score": (manifest.get("score") or {}).get("name") or "score",
        "passthrough": [p if isinstance(p, str) else (p or {}).get("name")
                        for p in manifest.get("passthrough") or []],
        "live": traffic.get("live") if steady else None,
    }


def _open_input(args):
    """(binary stream, its size or None, "csv" | "json") of the rows the command names."""
    given = [(flag, v) for flag, v in (("--csv", args.csv), ("--json", args.json),
                                        ("-", args.stdin), ("--raw", args.raw if isinstance(args.raw, str) else None))
             if v is not None]
    if len(given) > 1:
        raise CLIError(f"give the rows once: {' and '.join(f for f, _ in given)} both name them")
    if not given:
        raise CLIError("give the rows: --csv FILE, --json FILE, or - (or --raw -) to read CSV or JSON from stdin")
    flag, value = given[0]
    if value == "-":
        src, kind = _sniff(sys.stdin.buffer)
        return src, None, kind
    try:
        f = open(value, "rb")
        size = os.fstat(f.fileno()).st_size
    except OSError as e:
        raise CLIError(f"cannot read the input: {e.strerror}: {value}") from None
    if flag == "--raw":
        src, kind = _sniff(f)
        return src, size, kind
    return _Input(f), size, "csv" if flag == "--csv" else "json"


def cmd_predict(args) -> int:
    for flag, value in (("--parallel", args.parallel), ("--rows-per-request", args.max_rows)):
        if value is not None and value < 1:
            raise CLIError(f"{flag} must be 1 or more; got {value}")
    client = client_for(args)
    src, size, kind = _open_input(args)
    try:
        return _predict(client, args, src, size, kind)
    finally:
        if src.stream is not sys.stdin.buffer:
            src.stream.close()


def _predict(client: Client, args, src: _Input, size: Optional[int], kind: str) -> int:
    model = _model_limits(client, args.name)
    max_rows = min(model["max_rows"], args.max_rows) if args.max_rows else model["max_rows"]
    chunks = (_csv_chunks if kind == "csv" else _json_chunks)(src, max_rows, model["max_body"])
    raw = args.raw is not None and args.raw is not False
    out_json = raw or (args.out is not None and args.out.lower().endswith(".json"))
    csv_mode = not out_json and (args.out is not None or bool(model["passthrough"]))
    accept = "text/csv" if csv_mode else "application/json"
    content_type = "text/csv" if kind == "csv" else "application/json"
    name = quote(args.name)
    model_path = f"/models/{name}/predict"

    def version_path(v: str) -> str:
        return f"/models/{name}/versions/{quote(v)}/predict"

    first = next(chunks)
    second = next(chunks, None)
    split = second is not None
    parallel = max(1, min(model["replicas"], PREDICT_MAX_PARALLEL, args.parallel or PREDICT_MAX_PARALLEL))
    pinned = args.version or (model["live"] if split else None)

    # where the answers go: a file beside --out (renamed over it at the end), or stdout at the end
    import tempfile

    if args.out:
        target = Path(args.out)
        try:
            fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part",
                                            dir=str(target.parent.resolve()))
        except OSError as e:
            raise CLIError(f"cannot write {args.out}: {e.strerror}") from None
        spool = os.fdopen(fd, "w+b")
        try:  # the mode the file would have had (mkstemp makes it 0600)
            mode = target.stat().st_mode & 0o777
        except OSError:
            umask = os.umask(0o022)
            os.umask(umask)
            mode = 0o666 & ~umask
        os.fchmod(fd, mode)
    else:
        target, tmp_name = None, None
        spool = tempfile.TemporaryFile()
    joined: Optional[dict] = None
    header: Optional[bytes] = None
    rows_done = 0
    sender = _Sender(client, accept, content_type, args.timeout)
    progress = _PredictProgress(size, force=args.progress) if split else None
    ok = False

    def emit(chunk: _Chunk, resp: requests.Response) -> None:
        nonlocal joined, header, rows_done
        if csv_mode:
            data = resp.content
            cut = _first_record(data)
            if header is None:
                header = data[:cut]
                spool.write(data)
            elif data[:cut] != header:
                raise CLIError(f"rows {chunk.offset + 1:,}–{chunk.offset + chunk.rows:,} of the file were answered "
                               f"with other columns ({data[:cut].decode(errors='replace').strip()!r}, "
                               f"not {header.decode(errors='replace').strip()!r})")
            else:
                spool.write(data[cut:])
        else:
            try:
                answer = resp.json()
            except ValueError:
                raise CLIError(f"POST {model_path} answered something that is not JSON") from None
            joined = _join_json(joined, answer if isinstance(answer, dict) else {"scores": answer})
        rows_done += chunk.rows
        if progress is not None:
            progress.show(rows_done, chunk.end, total)

    total: Optional[int] = None
    try:
        from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

        if not split:
            path = version_path(args.version) if args.version else model_path
            try:
                emit(first, sender.send(path, first))
            except _ChunkFailed as e:
                raise _chunk_error(e, False) from None
        else:
            if pinned is None:  # a rollout splits the traffic: the first request picks the version for all
                try:
                    resp = sender.send(model_path, first)
                except _ChunkFailed as e:
                    raise _chunk_error(e, True) from None
                pinned = resp.headers.get("X-Model-Version")
                if not pinned and not csv_mode:
                    try:
                        pinned = (resp.json() or {}).get("version")
                    except (ValueError, AttributeError):
                        pinned = None
                if not pinned:
                    raise CLIError(f"{args.name} did not say which version answered: cannot send the rest to it")
                emit(first, resp)
                upcoming = [second]
                next_write = 1
            else:
                upcoming = [first, second]
                next_write = 0
            path = version_path(pinned)
            window = parallel * PREDICT_WINDOW_PER_REQUEST
            pending: dict = {}
            answered: dict[int, tuple[_Chunk, requests.Response]] = {}
            failures: list[_ChunkFailed] = []
            seen = upcoming[-1].index + 1
            with ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="predict") as pool:
                try:
                    while True:
                        while not failures and upcoming and len(pending) < parallel \
                                and upcoming[0].index < next_write + window:
                            chunk = upcoming.pop(0)
                            pending[pool.submit(sender.send, path, chunk)] = chunk
                            if not upcoming and total is None:
                                nxt = next(chunks, None)
                                if nxt is None:
                                    total = chunk.offset + chunk.rows
                                else:
                                    upcoming.append(nxt)
                                    seen = nxt.index + 1
                        if not pending:
                            break
                        done, _ = wait(pending, return_when=FIRST_COMPLETED)
                        for fut in done:
                            chunk = pending.pop(fut)
                            try:
                                answered[chunk.index] = (chunk, fut.result())
                            except _ChunkFailed as e:
                                failures.append(e)
                                sender.stop.set()
                        while not failures and next_write in answered:
                            emit(*answered.pop(next_write))
                            next_write += 1
                    if failures:
                        raise _chunk_error(min(failures, key=lambda f: f.chunk.index), True)
                except BaseException:
                    sender.stop.set()
                    for fut in pending:
                        fut.cancel()
                    raise
            progress.finish(rows_done, seen, parallel)
        # the answer, whole: to --out, or printed (CSV answers are in the spool already)
        if not csv_mode and (raw or args.out):
            spool.write(json.dumps(joined or {}, indent=2 if raw and not args.out else None).encode() + b"\n")
        elif not csv_mode:
            answer = joined or {}
            passthrough = answer.get("passthrough") if isinstance(answer.get("passthrough"), dict) else {}
            if passthrough:
                import csv as csvlib

                text = io.StringIO()
                writer = csvlib.writer(text, lineterminator="\n")
                cols = list(passthrough)
                writer.writerow([*cols, model["score"]])
                for i, score in enumerate(answer.get("scores") or []):
                    writer.writerow([*(passthrough[c][i] if i < len(passthrough[c]) else "" for c in cols), score])
                spool.write(text.getvalue().encode())
            else:
                spool.write("".join(f"{s}\n" for s in answer.get("scores") or []).encode())
        spool.flush()
        if target is not None:
            os.fsync(spool.fileno())
            spool.close()
            os.replace(tmp_name, target)
            ok = True
            out(f"wrote {rows_done:,} scores to {target}")
        else:
            spool.seek(0)
            sys.stdout.flush()
            import shutil

            shutil.copyfileobj(spool, sys.stdout.buffer)
            sys.stdout.buffer.flush()
            ok = True
    finally:
        sender.stop.set()
        sender.close()
        if progress is not None and not ok:
            progress.close()
        if not spool.closed:
            spool.close()
        if tmp_name is not None and not ok:
            try:
                os.unlink(tmp_name)
            except OSError:
                pass
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
            out(problem_line(p))
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


class _JobProgress(_StderrBar):
    """A job's progress on stderr while `run --wait` waits: a bar redrawn in place on a terminal;
    elsewhere (a log, a pipe) a line when it moved by 10 % or PROGRESS_LINE_SECONDS passed, and
    the last one when the job ended."""

    def __init__(self, stream=None, *, clock=time.monotonic):
        super().__init__(stream, clock=clock)
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
    p = command("predict", cmd_predict, "score rows with a realtime model (a file over the model's "
                                        "max_rows is sent in parallel requests, the scores joined in order)")
    p.add_argument("name")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--csv", metavar="FILE", help="rows as CSV (header = feature names)")
    src.add_argument("--json", metavar="FILE", help='rows as JSON: {"rows": [...]}, a list of rows, or one row')
    src.add_argument("stdin", nargs="?", choices=["-"], help="read CSV or JSON from stdin")
    p.add_argument("--raw", nargs="?", const=True, metavar="FILE|-",
                   help="print the whole JSON answer; with FILE (or - for stdin) the rows are read from it, "
                        "CSV or JSON as it starts")
    p.add_argument("--out", metavar="FILE", help="write the answer to FILE (whole, or not at all): JSON for "
                   "*.json, else CSV (the passthrough columns, then the score)")
    p.add_argument("--version", help="score with this deployed version, whatever the traffic split")
    p.add_argument("--progress", action="store_true",
                   help="draw the progress bar of a split file on stderr even when it is not a terminal")
    p.add_argument("--parallel", type=int, metavar="N",
                   help=f"at most N requests at once (default: the model's scaling.max, at most {PREDICT_MAX_PARALLEL})")
    p.add_argument("--rows-per-request", dest="max_rows", type=int, metavar="N",
                   help="rows in one request (default and most: the model's limits.max_rows)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for one request (default 120)")
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
    args, extra = parser.parse_known_args(argv)
    if extra == ["-"] and getattr(args, "command", None) == "predict" and getattr(args, "stdin", "") is None:
        args.stdin = "-"   # `predict NAME --version V -`: argparse gave the positional away before the option
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
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
