"""A small HTTP client of the control API: the only way the console reaches the plane.

It imports nothing from `control` or `adapters` (an import-linter contract enforces it), so
the console works the same against the embedded plane and a control service on a cluster.
Failures become a few exception classes the pages turn into plain messages.
"""
from __future__ import annotations

import ipaddress
import os
import threading
from pathlib import Path
from typing import Any, Optional, Sequence
from urllib.parse import parse_qs, quote, urlsplit

import requests

DEFAULT_URL = "http://127.0.0.1:8080"


class ControlError(Exception):
    """The control service answered with an error (`{"error": ...}`) or could not be used."""

    def __init__(self, message: str, *, status: Optional[int] = None, url: str = "",
                 body: Optional[dict] = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.url = url
        self.body = body or {}

    @property
    def problems(self) -> list[dict]:
        """Per-row, per-field problems of a 422 (`[{"row", "field", "error"}]`), if any."""
        problems = self.body.get("problems")
        return problems if isinstance(problems, list) else []


class Unreachable(ControlError):
    """Nothing answered at the control URL (connection refused, DNS, timeout)."""


class Unauthorized(ControlError):
    """401/403: the token is missing or wrong (401), or its role or owner does not allow the call (403)."""

    @property
    def forbidden(self) -> bool:
        """403: the token is good, but its identity may not make this call."""
        return self.status == 403


class NotFound(ControlError):
    """404: no such model or job."""


class Invalid(ControlError):
    """422: input that will never work as sent; `problems` says where."""


def _error_class(status: int) -> type[ControlError]:
    if status in (401, 403):
        return Unauthorized
    if status == 404:
        return NotFound
    if status == 422:
        return Invalid
    return ControlError


def is_loopback_host(host: str) -> bool:
    host = (host or "").strip().strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


def is_loopback_url(url: str) -> bool:
    return is_loopback_host(urlsplit(url).hostname or "")


def read_local_token() -> Optional[str]:
    """The token file of the state dir on this machine, or None."""
    path = Path(os.environ.get("MODELPLANE_STATE_DIR") or ".modelplane") / "token"
    try:
        return path.read_text(encoding="utf-8").strip() or None
    except (OSError, UnicodeDecodeError):
        return None


def _list_params(label: Sequence[str], owner: Optional[str], q: Optional[str]) -> list[tuple[str, Any]]:
    params: list[tuple[str, Any]] = [("label", s) for s in label if s]
    if owner:
        params.append(("owner", owner))
    if q:
        params.append(("q", q))
    return params


# -- a CSV over a model's max_rows: split, scored in parallel, joined back in order -------------

#: requests in flight at once for a split file: the model's most replicas, within these bounds
MAX_PARALLEL = 8
#: a chunk answered 503/429, or whose connection broke, is tried again this many times more
CHUNK_RETRIES = 4
_SIZE_UNITS = {"": 1, "K": 1000, "M": 1000**2, "G": 1000**3, "T": 1000**4,
               "Ki": 1024, "Mi": 1024**2, "Gi": 1024**3, "Ti": 1024**4}


def parse_size(text: Any, default: int = 16 * 1024**2) -> int:
    """A manifest size (`16Mi`, `512Ki`, `1000`) in bytes; `default` when it is not one."""
    import re

    m = re.match(r"^(\d+)(Ki|Mi|Gi|Ti|K|M|G|T)?$", str(text or "").strip())
    return int(m.group(1)) * _SIZE_UNITS[m.group(2) or ""] if m else default


def split_csv(data: bytes, max_rows: int, max_body: int) -> list[tuple[int, int, bytes]]:
    """A CSV as `(offset, rows, body)` requests of at most `max_rows` data rows and `max_body`
    bytes, each with the header; row k of a body is row k + offset of the file. Records are
    split on their quotes, not on lines (a quoted field may hold newlines), their bytes kept;
    blank lines are skipped, as the model's adapter skips them. A row too large for any
    request raises ValueError naming it."""
    import io

    lines = io.BytesIO(data).readlines()   # on "\n" only, as the CSV reader ends records
    if not lines:
        return [(0, 0, data)]
    header = lines[0] if lines[0].endswith(b"\n") else lines[0] + b"\n"
    out: list[tuple[int, int, bytes]] = []
    rows: list[bytes] = []
    size = len(header)
    offset = 0
    parts: list[bytes] = []
    quotes = 0

    def record_done(record: bytes) -> None:
        nonlocal rows, size, offset
        if not record.endswith(b"\n"):
            record += b"\n"
        if len(header) + len(record) > max_body:
            raise ValueError(f"row {offset + len(rows) + 1:,} alone is larger than the model's max_body "
                             f"({max_body:,} bytes)")
        if rows and (len(rows) >= max_rows or size + len(record) > max_body):
            out.append((offset, len(rows), header + b"".join(rows)))
            offset += len(rows)
            rows, size = [], len(header)
        rows.append(record)
        size += len(record)

    for line in lines[1:]:
        parts.append(line)
        quotes += line.count(b'"')
        if quotes % 2:
            continue
        record = b"".join(parts)
        parts, quotes = [], 0
        if record.strip(b"\r\n"):
            record_done(record)
    if parts:
        record_done(b"".join(parts))
    out.append((offset, len(rows), header + b"".join(rows)))
    return out


def join_answers(answers: Sequence[dict]) -> dict:
    """One answer from the answers of consecutive chunks: lists (`scores`) end to end, objects
    of lists (`passthrough` columns) column by column, anything else as the first has it."""
    joined: dict = {}
    for answer in answers:
        for k, v in answer.items():
            have = joined.get(k)
            if k not in joined:
                joined[k] = list(v) if isinstance(v, list) else \
                    {c: list(x) if isinstance(x, list) else x for c, x in v.items()} if isinstance(v, dict) else v
            elif isinstance(v, list) and isinstance(have, list):
                have.extend(v)
            elif isinstance(v, dict) and isinstance(have, dict):
                for c, x in v.items():
                    if isinstance(x, list) and isinstance(have.get(c), list):
                        have[c].extend(x)
    return joined


class ControlClient:
    """The control API, one method per call the console makes.

    `url` and `token` default to `MODELPLANE_URL` and `MODELPLANE_TOKEN` (see `from_env`).
    The token is sent on every call: the service requires it on every API call.
    """

    def __init__(self, url: Optional[str] = None, token: Optional[str] = None, *,
                 timeout: float = 10.0, session: Optional[requests.Session] = None):
        self.url = (url or DEFAULT_URL).rstrip("/")
        self.token = token or None
        self.timeout = timeout
        self.session = session or requests.Session()
        # Never pick up proxies from the environment for a loopback control service.
        self.session.trust_env = False

    @classmethod
    def from_env(cls, **kwargs: Any) -> "ControlClient":
        """`MODELPLANE_URL`, and the token the CLI would use: `MODELPLANE_TOKEN`, else, for a
        control service on this machine only, the `token` file `modelplane up` keeps in the
        state dir (`MODELPLANE_STATE_DIR`, default `.modelplane`)."""
        url = os.environ.get("MODELPLANE_URL") or DEFAULT_URL
        token = (os.environ.get("MODELPLANE_TOKEN") or "").strip() or None
        if token is None and is_loopback_url(url):
            token = read_local_token()
        return cls(url, token, **kwargs)

    # -- plumbing -------------------------------------------------------------------------

    def _request(self, method: str, path: str, *, timeout: Optional[float] = None,
                 **kwargs: Any) -> requests.Response:
        headers = dict(kwargs.pop("headers", None) or {})
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        url = self.url + path
        try:
            resp = self.session.request(method, url, headers=headers,
                                        timeout=timeout or self.timeout, **kwargs)
        except requests.Timeout as e:
            raise Unreachable(f"the control service at {self.url} did not answer in time", url=self.url) from e
        except requests.RequestException as e:
            raise Unreachable(f"the control service at {self.url} is unreachable ({type(e).__name__})",
                              url=self.url) from e
        if resp.status_code >= 400:
            body: dict = {}
            try:
                parsed = resp.json()
                body = parsed if isinstance(parsed, dict) else {"error": str(parsed)}
            except ValueError:
                body = {"error": resp.text.strip()[:500] or resp.reason}
            message = str(body.get("error") or resp.reason or f"HTTP {resp.status_code}")
            raise _error_class(resp.status_code)(message, status=resp.status_code, url=self.url, body=body)
        return resp

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        resp = self._request(method, path, **kwargs)
        if not resp.content:
            return {}
        try:
            return resp.json()
        except ValueError as e:
            raise ControlError(f"{method} {path} answered something that is not JSON",
                               status=resp.status_code, url=self.url) from e

    # -- the API --------------------------------------------------------------------------

    def health(self) -> bool:
        """True when `GET /healthz` answers; raises Unreachable otherwise."""
        self._request("GET", "/healthz", timeout=3)
        return True

    def check_token(self) -> bool:
        """Whether the service accepts this client's token (every API call needs it): the
        cheapest authenticated read, `GET /api/events?limit=1`; 401/403 mean no."""
        try:
            self._request("GET", "/api/events", params={"limit": 1}, timeout=5)
        except Unauthorized:
            return False
        except ControlError as err:
            if isinstance(err, Unreachable):
                raise
        return True

    def whoami(self) -> dict:
        """`{name, role, owner, may}` of this client's token; Unauthorized when it is refused."""
        return self._json("GET", "/api/whoami", timeout=5)

    def models(self, *, label: Sequence[str] = (), owner: Optional[str] = None,
               q: Optional[str] = None) -> list[dict]:
        """Every model (matching the filters, as `models_page` takes them). With thousands of
        models, a page does better: `models_page`."""
        data = self._json("GET", "/api/models", params=_list_params(label, owner, q))
        if isinstance(data, dict):
            data = data.get("models", [])
        return list(data)

    def models_page(self, *, label: Sequence[str] = (), owner: Optional[str] = None, q: Optional[str] = None,
                    limit: int = 50, after: Optional[str] = None) -> dict:
        """One page of the models matching every label selector (`key=value`, `key!=value`, `key`),
        the owner (exact) and the text `q` (name, description, owner, label values), by name:
        `{"models": [...], "total": how many match, "next": the `after` of the next page or None}`.
        A bad selector raises ControlError (status 400) saying what is wrong."""
        params = _list_params(label, owner, q) + [("limit", int(limit))]
        if after:
            params.append(("after", after))
        resp = self._request("GET", "/api/models", params=params)
        try:
            models = resp.json()
        except ValueError as e:
            raise ControlError("GET /api/models answered something that is not JSON", status=resp.status_code,
                               url=self.url) from e
        total = resp.headers.get("X-Total-Count", "")
        nxt = (resp.links.get("next") or {}).get("url")
        after_next = (parse_qs(urlsplit(nxt).query).get("after") or [None])[0] if nxt else None
        return {"models": list(models), "total": int(total) if total.isdigit() else len(models),
                "next": after_next}

    def model_names(self, *, include: Optional[str] = None, limit: int = 500, kind: Optional[str] = None) -> list[str]:
        """The first `limit` model names (of one `kind`, if given: a selector's choices stay
        bounded whatever the plane holds), plus `include` if that model exists beyond them."""
        page = self._json("GET", "/api/models", params={"limit": limit, **({"kind": kind} if kind else {})})
        names = [m["name"] for m in page]
        if include and include not in names:
            try:
                if kind is None or self.model(include).get("kind") == kind:
                    names = sorted([*names, include])
            except ControlError as err:
                if isinstance(err, (Unreachable, Unauthorized)):
                    raise
        return names

    def model(self, name: str) -> dict:
        return self._json("GET", f"/api/models/{quote(name)}")

    def rollback(self, name: str, *, version: Optional[str] = None) -> dict:
        """Make `version` live; without one, withdraw the rollout in progress (or undo the last change)."""
        return self._json("POST", f"/api/models/{quote(name)}/rollback", json={"version": version} if version else {})

    def rollout(self, name: str, *, version: str, percent: int = 0, shadow: int = 0) -> dict:
        return self._json("POST", f"/api/models/{quote(name)}/rollout",
                          json={"version": version, "percent": percent, "shadow": shadow})

    def promote(self, name: str) -> dict:
        return self._json("POST", f"/api/models/{quote(name)}/promote", json={})

    def shadow(self, name: str, *, threshold: Optional[float] = None, top: int = 20) -> dict:
        params: dict[str, Any] = {"top": top}
        if threshold is not None:
            params["threshold"] = threshold
        return self._json("GET", f"/api/models/{quote(name)}/shadow", params=params)

    def predict(self, name: str, *, rows: Optional[list[dict]] = None,
                csv: Optional[bytes] = None, timeout: float = 120.0) -> dict:
        """Score rows (JSON) or a CSV body; held by the control service while a replica starts."""
        if csv is not None:
            return self._json("POST", f"/models/{quote(name)}/predict", data=csv,
                              headers={"Content-Type": "text/csv"}, timeout=timeout)
        return self._json("POST", f"/models/{quote(name)}/predict", json={"rows": rows or []},
                          timeout=timeout)

    def predict_csv(self, name: str, data: bytes, *, max_rows: int, max_body: int = 16 * 1024**2,
                    parallel: int = 1, live: Optional[str] = None, timeout: float = 120.0,
                    on_progress: Optional[Any] = None) -> dict:
        """Score a CSV of any length: split (`split_csv`) into requests sent `parallel` at once
        (at most MAX_PARALLEL), each tried again on 503/429 or a broken connection, and the
        answers joined in the file's order (`join_answers`), as one request would answer. Every
        request goes to one version: `live` when given (no rollout splitting the traffic), else
        the one that answered the first. `on_progress(rows_done, rows_total)` is called from
        the caller's thread. A failure stops the sending and raises the ControlError of the
        earliest failed request, its problems' rows numbered in the whole file (`row` + offset)."""
        import time
        from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

        try:
            chunks = split_csv(data, max(int(max_rows), 1), max(int(max_body), 1024))
        except ValueError as e:
            raise ControlError(str(e), status=413) from None
        total = sum(rows for _, rows, _ in chunks)
        model_path = f"/models/{quote(name)}/predict"

        def send(path: str, chunk: tuple[int, int, bytes], session: requests.Session) -> dict:
            offset, rows, body = chunk
            for attempt in range(CHUNK_RETRIES + 1):
                try:
                    resp = session.post(self.url + path, data=body, timeout=timeout, headers={
                        "Content-Type": "text/csv", "Accept": "application/json",
                        **({"Authorization": f"Bearer {self.token}"} if self.token else {})})
                except requests.Timeout as e:
                    raise Unreachable(f"rows {offset + 1:,}–{offset + rows:,}: no answer within {timeout:.0f}s",
                                      url=self.url) from e
                except requests.RequestException as e:
                    if attempt == CHUNK_RETRIES:
                        raise Unreachable(f"the control service at {self.url} is unreachable ({type(e).__name__})",
                                          url=self.url) from e
                    time.sleep(min(0.5 * 2 ** attempt, 10))
                    continue
                if resp.status_code in (429, 503) and attempt < CHUNK_RETRIES:
                    try:
                        pause = min(max(float(resp.headers.get("Retry-After", "")), 0.0), 10.0)
                    except ValueError:
                        pause = min(0.5 * 2 ** attempt, 10)
                    time.sleep(pause)
                    continue
                if resp.status_code >= 400:
                    try:
                        parsed = resp.json()
                        err_body = parsed if isinstance(parsed, dict) else {"error": str(parsed)}
                    except ValueError:
                        err_body = {"error": resp.text.strip()[:500] or resp.reason}
                    for p in err_body.get("problems") or []:   # rows of the whole file
                        if isinstance(p, dict) and isinstance(p.get("row"), int) and not isinstance(p["row"], bool):
                            p["row"] += offset
                    message = str(err_body.get("error") or resp.reason or f"HTTP {resp.status_code}")
                    if len(chunks) > 1:
                        message = f"rows {offset + 1:,}–{offset + rows:,} of the file: {message}"
                    err_body["offset"] = offset
                    raise _error_class(resp.status_code)(message, status=resp.status_code, url=self.url, body=err_body)
                try:
                    answer = resp.json()
                except ValueError as e:
                    raise ControlError(f"POST {path} answered something that is not JSON",
                                       status=resp.status_code, url=self.url) from e
                return answer if isinstance(answer, dict) else {"scores": answer}
            raise AssertionError("unreachable")

        sessions: list[requests.Session] = []

        def session() -> requests.Session:
            s = requests.Session()
            s.trust_env = False
            sessions.append(s)
            return s

        try:
            if len(chunks) == 1:
                answer = send(model_path, chunks[0], self.session)
                if on_progress:
                    on_progress(total, total)
                return answer
            answers: dict[int, dict] = {}
            done_rows = 0
            start = 0
            if live is None:   # a rollout splits the traffic: the first request picks the version for all
                answers[0] = send(model_path, chunks[0], self.session)
                live = str(answers[0].get("version") or "")
                if not live:
                    raise ControlError(f"{name} did not say which version answered", url=self.url)
                start = 1
                done_rows = chunks[0][1]
                if on_progress:
                    on_progress(done_rows, total)
            path = f"/models/{quote(name)}/versions/{quote(live)}/predict"
            workers = max(1, min(int(parallel), MAX_PARALLEL))
            local = threading.local()

            def work(i: int) -> dict:
                if getattr(local, "session", None) is None:
                    local.session = session()
                return send(path, chunks[i], local.session)

            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="console-predict") as pool:
                todo = list(range(start, len(chunks)))
                pending: dict = {}
                failures: list[tuple[int, ControlError]] = []
                while todo or pending:
                    while todo and not failures and len(pending) < workers:
                        i = todo.pop(0)
                        pending[pool.submit(work, i)] = i
                    if not pending:
                        break
                    finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                    for fut in finished:
                        i = pending.pop(fut)
                        try:
                            answers[i] = fut.result()
                        except ControlError as err:
                            failures.append((i, err))
                            todo.clear()
                            continue
                        done_rows += chunks[i][1]
                    if on_progress and not failures:
                        on_progress(done_rows, total)
                if failures:
                    raise min(failures, key=lambda f: f[0])[1]
            return join_answers([answers[i] for i in range(len(chunks))])
        finally:
            for s in sessions:
                s.close()

    def submit_job(self, name: str, *, dataset: str) -> dict:
        return self._json("POST", f"/api/models/{quote(name)}/jobs", json={"dataset": dataset})

    def upload_dataset(self, name: str, *, filename: str, data: bytes) -> dict:
        """Store a CSV at `incoming/{name}/{filename}` in the bucket; the bucket event runs the job."""
        return self._json("POST", f"/api/models/{quote(name)}/datasets", params={"filename": filename},
                          data=data, headers={"Content-Type": "text/csv"}, timeout=120.0)

    def jobs(self, *, model: Optional[str] = None, dataset: Optional[str] = None) -> list[dict]:
        params = {k: v for k, v in (("model", model), ("dataset", dataset)) if v}
        data = self._json("GET", "/api/jobs", params=params)
        if isinstance(data, dict):
            data = data.get("jobs", [])
        return list(data)

    def job(self, job_id: str) -> dict:
        return self._json("GET", f"/api/jobs/{quote(job_id)}")

    def job_results(self, job_id: str) -> bytes:
        return self._request("GET", f"/api/jobs/{quote(job_id)}/results", timeout=120.0).content

    def events(self) -> list[dict]:
        data = self._json("GET", "/api/events")
        if isinstance(data, dict):
            data = data.get("events", [])
        return list(data)

    # -- access: the audit trail and named tokens ------------------------------------------

    def audit(self, *, who: Optional[str] = None, action: Optional[str] = None, model: Optional[str] = None,
              outcome: Optional[str] = None, since: Optional[str] = None, limit: int = 100) -> list[dict]:
        """The audit trail, newest first; `since` is an ISO 8601 UTC time."""
        params: dict[str, Any] = {"limit": int(limit)}
        for key, value in (("who", who), ("action", action), ("model", model), ("outcome", outcome),
                           ("since", since)):
            if value:
                params[key] = value
        return list(self._json("GET", "/api/audit", params=params))

    def audit_verify(self) -> dict:
        """`{ok, records, last, problem}`: the audit trail's hash chain checked from its first record."""
        return self._json("GET", "/api/audit/verify", timeout=60)

    def tokens(self) -> list[dict]:
        """The named tokens (admin): name, role, owner, when and by whom created."""
        return list(self._json("GET", "/api/tokens"))

    def create_token(self, name: str, *, role: str, owner: Optional[str] = None) -> dict:
        """A new named token (admin); the answer's `token` is shown this once."""
        body: dict[str, Any] = {"name": name, "role": role}
        if owner:
            body["owner"] = owner
        return self._json("POST", "/api/tokens", json=body)

    def revoke_token(self, name: str) -> dict:
        return self._json("DELETE", f"/api/tokens/{quote(name, safe='')}")

    # -- comparisons ----------------------------------------------------------------------

    def upload_comparison_dataset(self, name: str, *, data: bytes) -> dict:
        """Store a CSV for comparisons (under comparisons/{name}/: no job starts); `{"uri", …}`."""
        return self._json("POST", f"/api/models/{quote(name)}/comparisons/datasets", data=data,
                          headers={"Content-Type": "text/csv"}, timeout=600)

    def compare(self, name: str, *, a: str, b: str, dataset: str, threshold: Optional[float] = None,
                top: int = 20) -> dict:
        """Start scoring `dataset` with versions `a` and `b`; the comparison (poll `comparison`)."""
        body: dict[str, Any] = {"a": a, "b": b, "dataset": dataset, "top": top}
        if threshold is not None:
            body["threshold"] = threshold
        return self._json("POST", f"/api/models/{quote(name)}/comparisons", json=body)

    def comparison(self, comparison_id: str) -> dict:
        return self._json("GET", f"/api/comparisons/{quote(comparison_id, safe='')}")

    def comparisons(self, name: str) -> list[dict]:
        return list(self._json("GET", f"/api/models/{quote(name)}/comparisons"))
