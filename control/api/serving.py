"""The models' own routes: predict and the Open Inference Protocol (v2), under /models/{name}/.

Declared here, with the rest of the API, for the OpenAPI document; served by the asyncio
front door (control/frontdoor.py), which `match`es a request to one of them.
"""
from __future__ import annotations

from typing import Optional

from control import api_schema as s
from control.api import Routes

PREDICT_TYPES = ("application/json", "text/csv")
INFER_TYPES = ("application/json", "application/octet-stream")
MODEL_ERRORS = (404, 409, 413, 422, 502, 503, 504)

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

#: The routes' shapes after /models/<name>/: path segments, "*" for a variable one.
_SHAPES: dict[tuple[str, ...], dict[str, tuple[str, tuple[str, ...]]]] = {}
for _method, _rule, _, _types in FORWARDED:
    _shape = tuple("*" if p.startswith("<") else p for p in _rule.split("/")[3:])
    _SHAPES.setdefault(_shape, {})[_method] = (_rule, _types)


def routes(plane) -> Routes:
    r = Routes("serving")
    versioned = {"model": s.NAME_PATTERN, "version": s.SEMVER_PATTERN}
    for method, rule, summary, types in FORWARDED:
        r.declare(s.RouteSpec(method, rule, summary, [s.Answer(200, s.ModelAnswer)], auth="predict", role="runner", owned=True,
                              body_types=types, body_limit=None, errors=MODEL_ERRORS, path_patterns=versioned,
                              tag="serving"))
    return r


def pinned(segments: list[str]) -> tuple[Optional[str], list[str]]:
    """(the version a matched path names, the path the adapter serves it under): `versions/V/…`
    right after the model's name is that version's own URL, served by the adapter as `/…`; the
    Open Inference Protocol's `…/models/M/versions/V/…` names V and goes as it is."""
    if len(segments) > 2 and segments[0] == "versions":
        return segments[1], segments[2:]
    if len(segments) > 4 and segments[0] == "v2" and segments[3] == "versions":
        return segments[4], segments
    return None, segments


def match(segments: list[str]) -> Optional[dict[str, tuple[str, tuple[str, ...]]]]:
    """The routes (method -> (rule, body types)) whose shape the path after /models/<name>/
    has, or None. A variable segment matches any non-empty one."""
    if segments and segments[-1] == "" and len(segments) > 1:
        segments = segments[:-1]   # one trailing slash is the same route
    for shape, methods in _SHAPES.items():
        if len(shape) == len(segments) and all(p == "*" and seg or p == seg for p, seg in zip(shape, segments)):
            return methods
    return None
