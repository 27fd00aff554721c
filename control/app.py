"""The control service's API: a Flask app whose routes parse, delegate to the Runtime and serialize.

The routes live in blueprints by resource (control/api/); each is declared with its request
and answer models (control/api_schema.py), which validate requests and are served as
`GET /openapi.json`. Before a route runs, the checks here apply control/guard.py: the Host,
cross-site calls, the token and the body's type and size. Errors are `PlaneError`s mapped to
`{"error": ...}` and a status in one handler; anything else is a 500 that names a request id
and keeps the details in the log. The models' own traffic (/models/*) never reaches Flask:
the asyncio front door (control/frontdoor.py) serves it and hands everything else here.
"""
from __future__ import annotations

import logging
import os
import re
import time
import uuid
from typing import Optional

from flask import Flask, Response, g, jsonify, request
from werkzeug.exceptions import HTTPException

from control import api_schema as s
from control.api import access, compare, events, jobs, models, service, serving, traffic
from control.auth import service_token
from control.errors import PlaneError
from control.plane import Plane
from control.runtime.base import Runtime
from control.runtime.factory import get_runtime
from control.settings import Settings

log = logging.getLogger(__name__)

MUTATING = {"POST", "PUT", "PATCH", "DELETE"}
REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
RESOURCES = (service, models, traffic, jobs, compare, events, access, serving)


def request_id(given: str) -> str:
    """The caller's X-Request-Id when it is a sane one, else a new id."""
    return given if given and REQUEST_ID.match(given) else os.urandom(8).hex()


def create_app(settings: Optional[Settings] = None, *, runtime: Optional[Runtime] = None,
               register: bool = True) -> Flask:
    """The control API. Without `runtime`, the one `settings.runtime` names is built and
    started (and closed by `app.extensions["modelplane"].close()`); `register` deploys every
    model folder under `settings.models_dir`. Raises `control.auth.TokenError` when the
    service may not start without a token (bound beyond loopback with none set)."""
    settings = settings or Settings()
    token, created = service_token(settings)
    owns = runtime is None
    if runtime is None:
        runtime = get_runtime(settings)
        runtime.start()
    plane = Plane(settings, runtime, owns_runtime=owns, token=token, token_created=created)
    app = Flask(__name__)
    app.json.sort_keys = False
    app.url_map.strict_slashes = False
    app.extensions["modelplane"] = plane
    if register:
        plane.register_models()

    specs: dict[tuple[str, str], s.RouteSpec] = {}
    for resource in RESOURCES:
        routes = resource.routes(plane)
        app.register_blueprint(routes.blueprint)
        plane.routes.extend(routes.specs)
        specs.update({(spec.rule, spec.method): spec for spec in routes.specs})
    _checks(app, plane, specs)
    return app


def _checks(app: Flask, plane: Plane, specs: dict[tuple[str, str], s.RouteSpec]) -> None:
    """What every request passes before its route, and how every answer and error leaves."""
    guard = plane.guard

    @app.before_request
    def _before():
        g.started = time.perf_counter()
        g.request_id = request_id(request.headers.get("X-Request-Id", ""))
        guard.check_host(request.headers)
        rule = request.url_rule
        spec = specs.get((rule.rule, "GET" if request.method == "HEAD" else request.method)) if rule else None
        if spec is None:
            return None  # an unknown route or method: Flask answers 404/405
        g.spec = spec
        if spec.auth == "token":
            g.identity = guard.authorize(request.headers, request.method, request.path, "viewer")
            guard.require_role(g.identity, request.method, request.path, spec.role)   # audited when refused
            name = (request.view_args or {}).get("name")
            if spec.owned and name is not None and g.identity.owner is not None:
                guard.require_owner(g.identity, plane.policy(name).owner, name)
        if request.method in MUTATING:
            guard.check_origin(request.headers)
            if spec.body is not None:
                guard.check_content_type(("application/json",))
            elif spec.body_types and not (spec.rule == "/events" and "ce-specversion" in request.headers):
                guard.check_content_type(spec.body_types)
            if spec.body_limit is not None:
                guard.check_length(spec.body_limit)
        return None

    @app.after_request
    def _after(response: Response):
        route_name = request.url_rule.rule if request.url_rule is not None else "unmatched"
        spec, identity = g.get("spec"), g.get("identity")
        if spec is not None and spec.audit and identity is not None and not g.get("skip_audit"):
            plane.record(identity, spec.audit, response.status_code, g.get("request_id"),
                         **{**{k: v for k, v in (request.view_args or {}).items() if k in ("name", "version")},
                            **g.get("audit", {})})
        seconds = time.perf_counter() - g.get("started", time.perf_counter())
        plane.metrics.observe_api(route_name, request.method, response.status_code, seconds)
        response.headers["X-Request-Id"] = g.get("request_id", "")
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Cache-Control", "no-store")
        log.debug("%s %s -> %s in %.1f ms", request.method, request.path, response.status_code, seconds * 1000)
        return response

    @app.errorhandler(PlaneError)
    def _plane_error(e: PlaneError):
        if e.status >= 500:
            log.warning("%s %s [%s]: %s", request.method, request.path, g.get("request_id"), e.message)
        return jsonify(e.to_json()), e.status, e.headers

    @app.errorhandler(HTTPException)
    def _http_error(e: HTTPException):
        response = jsonify({"error": f"{e.name}: {e.description}"})
        response.status_code = e.code or 500
        for key, value in e.get_headers():
            if key.lower() != "content-type":
                response.headers[key] = value
        return response

    @app.errorhandler(Exception)
    def _unexpected(e: Exception):
        rid = g.get("request_id") or uuid.uuid4().hex[:16]
        log.error("%s %s failed [request id %s]", request.method, request.path, rid, exc_info=e)
        return jsonify({"error": f"internal error: the control service's log has the details under request id {rid}",
                        "request_id": rid}), 500
