"""A small HTTP client of the control API: the only way the console reaches the plane.

It imports nothing from `control` or `adapters` (an import-linter contract enforces it), so
the console works the same against the embedded plane and a control service on a cluster.
Failures become a few exception classes the pages turn into plain messages.
"""
from __future__ import annotations

import ipaddress
import os
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
