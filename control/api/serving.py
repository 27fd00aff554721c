"""The models' own routes: predict and the Open Inference Protocol (v2), under /models/{name}/
and, as KServe and Triton serve it, at the service's root (/v2/…).

Declared here, with the rest of the API, for the OpenAPI document; served by the asyncio
front door (control/frontdoor.py), which `match`es a request to one of them. The protocol's
server-wide routes (`/v2`, `/v2/health/live`, `/v2/health/ready`) name no model: they are the
control service's own and answered here, by Flask.
"""
from __future__ import annotations

from typing import Optional

from control import api_schema as s
from control.api import Routes
from control.settings import modelplane_version

PREDICT_TYPES = ("application/json", "text/csv")
INFER_TYPES = ("application/json", "application/octet-stream")
MODEL_ERRORS = (404, 409, 413, 422, 502, 503, 504)
#: The Open Inference Protocol's extensions the service speaks (the binary tensor data one,
#: as the adapter does both ways).
V2_EXTENSIONS = ["binary_tensor_data"]

#: (method, rule, summary, accepted body types)
FORWARDED = [
    ("POST", "/models/<name>/predict", "Score rows (JSON {rows: [...]} or CSV)", PREDICT_TYPES),
    ("POST", "/models/<name>/versions/<version>/predict",
     "Score rows with one deployed version, whatever the traffic split (its own URL)", PREDICT_TYPES),
    ("GET", "/models/<name>/v2", "Open Inference Protocol: server metadata", ()),
    ("GET", "/models/<name>/v2/health/live", "Open Inference Protocol: live", ()),
    ("GET", "/models/<name>/v2/health/ready", "Open Inference Protocol: ready", ()),
    ("GET", "/models/<name>/v2/models/<model>", "Open Inference Protocol: model metadata", ()),
    ("GET", "/models/<name>/v2/models/<model>/ready", "Open Inference Protocol: model ready", ()),
    ("POST", "/models/<name>/v2/models/<model>/infer", "Open Inference Protocol: inference", INFER_TYPES),
    ("GET", "/models/<name>/v2/models/<model>/versions/<version>", "Open Inference Protocol: version metadata", ()),
    ("GET", "/models/<name>/v2/models/<model>/versions/<version>/ready", "Open Inference Protocol: version ready", ()),
    ("POST", "/models/<name>/v2/models/<model>/versions/<version>/infer", "Open Inference Protocol: inference",
     INFER_TYPES),
]

#: The same model routes at the service's root, where KServe and Triton clients given the base
#: URL look for them. The adapter serves each under the very path the client sent.
ROOT = [
    ("GET", "/v2/models/<name>", "Open Inference Protocol at the root: model metadata (the live version's)", ()),
    ("GET", "/v2/models/<name>/ready", "Open Inference Protocol at the root: model ready", ()),
    ("POST", "/v2/models/<name>/infer",
     "Open Inference Protocol at the root: inference (the version the traffic split picks)", INFER_TYPES),
    ("GET", "/v2/models/<name>/versions/<version>", "Open Inference Protocol at the root: version metadata", ()),
    ("GET", "/v2/models/<name>/versions/<version>/ready", "Open Inference Protocol at the root: version ready", ()),
    ("POST", "/v2/models/<name>/versions/<version>/infer",
     "Open Inference Protocol at the root: inference with one deployed version", INFER_TYPES),
]

Shapes = dict[tuple[str, ...], dict[str, tuple[str, tuple[str, ...]]]]


def _shapes(table: list, skip: int) -> Shapes:
    """The routes' shapes (path segments from the `skip`-th on, "*" for a variable one)."""
    shapes: Shapes = {}
    for method, rule, _, types in table:
        shape = tuple("*" if p.startswith("<") else p for p in rule.split("/")[skip:])
        shapes.setdefault(shape, {})[method] = (rule, types)
    return shapes


_SHAPES = _shapes(FORWARDED, 3)     # after /models/<name>/
_ROOT_SHAPES = _shapes(ROOT, 1)     # the whole path: v2/models/<name>/…


def routes(plane) -> Routes:
    r = Routes("serving")
    versioned = {"model": s.NAME_PATTERN, "version": s.SEMVER_PATTERN}
    for method, rule, summary, types in FORWARDED + ROOT:
        r.declare(s.RouteSpec(method, rule, summary, [s.Answer(200, s.ModelAnswer)], auth="predict", role="runner", owned=True,
                              body_types=types, body_limit=None, errors=MODEL_ERRORS, path_patterns=versioned,
                              tag="serving"))
    runtime = plane.runtime

    # The protocol's server-wide routes: the control service's own, open as /healthz and
    # /readyz are (they tell nothing about any model).
    @r(s.RouteSpec("GET", "/v2", "Open Inference Protocol: server metadata (the control service's)",
                   [s.Answer(200, s.ModelAnswer)], auth="none", tag="serving"))
    def v2_server_metadata():
        return {"name": "modelplane", "version": modelplane_version(), "extensions": V2_EXTENSIONS}

    @r(s.RouteSpec("GET", "/v2/health/live", "Open Inference Protocol: the control service is live",
                   [s.Answer(200, s.ModelAnswer)], auth="none", tag="serving"))
    def v2_live():
        return {"live": True}

    @r(s.RouteSpec("GET", "/v2/health/ready", "Open Inference Protocol: the control service is ready (as /readyz)",
                   [s.Answer(200, s.ModelAnswer)], errors=(503,), auth="none", tag="serving"))
    def v2_ready():
        if getattr(runtime, "ready", lambda: True)():
            return {"ready": True}
        problems = list(getattr(runtime, "problems", lambda: [])())
        return {"ready": False, "error": "the control service is not ready: "
                                         + ("; ".join(problems) or f"its {runtime.name} runtime is starting")}, 503

    return r


def body_type(types: tuple[str, ...], headers) -> str:
    """The media type of a request's body: its Content-Type without parameters. Stock Open
    Inference Protocol clients (tritonclient) send an inference request with none: on the
    inference routes that is a binary request when it carries the binary tensor extension's
    `Inference-Header-Content-Length`, else JSON. (No Content-Type refuses no defence: a browser's
    cross-site call is refused by its Origin, and a token is never sent by a browser on its own.)"""
    given = headers.get("Content-Type", "").split(";")[0].strip().lower()
    if given or types != INFER_TYPES:
        return given
    return "application/octet-stream" if "Inference-Header-Content-Length" in headers else "application/json"


def pinned(segments: list[str]) -> tuple[Optional[str], list[str]]:
    """(the version a matched path names, the path the adapter serves it under): `versions/V/…`
    right after the model's name is that version's own URL, served by the adapter as `/…`; the
    Open Inference Protocol's `…/models/M/versions/V/…` names V and goes as it is (the segments
    after /models/<name>/, or the whole path of a route at the root)."""
    if len(segments) > 2 and segments[0] == "versions":
        return segments[1], segments[2:]
    if len(segments) > 4 and segments[0] == "v2" and segments[3] == "versions":
        return segments[4], segments
    return None, segments


def _match(shapes: Shapes, segments: list[str]) -> Optional[dict[str, tuple[str, tuple[str, ...]]]]:
    if segments and segments[-1] == "" and len(segments) > 1:
        segments = segments[:-1]   # one trailing slash is the same route
    for shape, methods in shapes.items():
        if len(shape) == len(segments) and all(p == "*" and seg or p == seg for p, seg in zip(shape, segments)):
            return methods
    return None


def match(segments: list[str]) -> Optional[dict[str, tuple[str, tuple[str, ...]]]]:
    """The routes (method -> (rule, body types)) whose shape the path after /models/<name>/
    has, or None. A variable segment matches any non-empty one."""
    return _match(_SHAPES, segments)


def match_root(segments: list[str]) -> Optional[dict[str, tuple[str, tuple[str, ...]]]]:
    """The same for a path at the root, split on "/" after its leading one (`v2`, `models`,
    the model's name, …)."""
    return _match(_ROOT_SHAPES, segments)
