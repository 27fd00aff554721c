"""The control API's routes, a blueprint per resource (service, models, jobs, events, serving).

Each module's `routes(plane)` returns a `Routes`: a Flask blueprint whose every route is
declared with its `RouteSpec` (request and answer models, auth, body types and cap). The app
(control/app.py) registers the blueprints and checks each request against its spec before
the route runs; the specs are also the OpenAPI document. The models' own routes are declared
here but served by the asyncio front door (control/frontdoor.py).
"""
from __future__ import annotations

from typing import Callable, Optional

import orjson
from flask import Blueprint, current_app, request

from control import api_schema as s
from control.errors import BadRequest

#: Caps of the small bodies: a JSON call and a CloudEvent.
MAX_JSON = 64 * 2**10
MAX_EVENT = 1 * 2**20


class Routes:
    """A blueprint and the specs of its routes."""

    def __init__(self, name: str):
        self.blueprint = Blueprint(name, __name__)
        self.specs: list[s.RouteSpec] = []

    def __call__(self, spec: s.RouteSpec) -> Callable:
        def decorate(view):
            self.blueprint.add_url_rule(spec.rule, endpoint=f"{spec.method} {spec.rule}".replace(".", "_"), view_func=view,
                                        methods=[spec.method])
            self.specs.append(spec)
            return view
        return decorate

    def declare(self, spec: s.RouteSpec) -> None:
        """A route served outside Flask (the front door), described in the same document."""
        self.specs.append(spec)


def current_plane():
    """The `control.plane.Plane` of the app serving this request."""
    return current_app.extensions["modelplane"]


def body_json(spec: s.RouteSpec):
    """The request's JSON body, read within the route's cap and validated against its model."""
    raw = current_plane().guard.read_body(spec.body_limit or MAX_JSON)
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise BadRequest(f"the body is not JSON: {str(e)[:200]}") from None
    return s.validate(spec.body, data, where="body")


def query(spec: s.RouteSpec):
    return s.validate(spec.query, request.args.to_dict(), where="query")


def json_response(data, status: int = 200, headers: Optional[dict] = None):
    """orjson for the answers that can be large (lists of models, jobs, events)."""
    from flask import Response

    return Response(orjson.dumps(data), status=status, mimetype="application/json", headers=headers)
