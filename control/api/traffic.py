"""Traffic: roll a version out to a share of a realtime model's requests, mirror a share to it
(shadow), promote it, and compare what it answered in the shadow with what the live version did.

Rolling back (withdrawing a rollout at once, or returning to an earlier version) is
`POST /api/models/{name}/rollback` (control/api/models.py).
"""
from __future__ import annotations

from control import api_schema as s
from control.api import Routes, body_json, query


def routes(plane) -> Routes:
    r = Routes("traffic")
    runtime = plane.runtime

    rollout_spec = s.RouteSpec("POST", "/api/models/<name>/rollout",
                               "Send a share of a realtime model's requests to another version (and/or mirror "
                               "a share to it)", [s.Answer(200, s.TrafficAnswer)], body=s.RolloutRequest,
                               errors=(404, 409, 422, 503), tag="models",
                               role="deployer", audit="rollout", owned=True)

    @r(rollout_spec)
    def rollout(name: str):
        req = body_json(rollout_spec)
        traffic = runtime.rollout(name, version=req.version, percent=req.percent, shadow=req.shadow)
        plane.policies.clear()
        return {"name": name, **traffic.to_json()}

    promote_spec = s.RouteSpec("POST", "/api/models/<name>/promote",
                               "Make the version under rollout live: it takes every request",
                               [s.Answer(200, s.Deployed)], body=s.PromoteRequest, errors=(404, 409, 503),
                               tag="models", role="deployer", audit="promote", owned=True)

    @r(promote_spec)
    def promote(name: str):
        body_json(promote_spec)
        answer = {"name": name, **runtime.promote(name).to_json()}
        plane.policies.clear()
        return answer

    pin_spec = s.RouteSpec("POST", "/api/models/<name>/pins",
                           "Keep a deployed version routed at 0 %, with a URL of its own (on a cluster only the "
                           "live version, a rollout's candidate and pinned versions have a route)",
                           [s.Answer(200, s.TrafficAnswer)], body=s.PinRequest, errors=(400, 404, 409, 503),
                           tag="models", role="deployer", audit="pin", owned=True)

    @r(pin_spec)
    def pin(name: str):
        req = body_json(pin_spec)
        return {"name": name, **runtime.pin(name, req.version).to_json()}

    unpin_spec = s.RouteSpec("DELETE", "/api/models/<name>/pins/<version>", "Take a pinned version's route away",
                             [s.Answer(200, s.TrafficAnswer)], errors=(400, 404, 409, 503), tag="models",
                             role="deployer", audit="unpin", owned=True)

    @r(unpin_spec)
    def unpin(name: str, version: str):
        return {"name": name, **runtime.unpin(name, version).to_json()}

    @r(s.RouteSpec("GET", "/api/models/<name>/traffic", "How a realtime model's requests are split",
                   [s.Answer(200, s.TrafficAnswer)], errors=(404,), tag="models"))
    def traffic(name: str):
        return {"name": name, **runtime.traffic(name).to_json()}

    shadow_spec = s.RouteSpec("GET", "/api/models/<name>/shadow",
                              "What the version under rollout answered to the live requests mirrored to it, "
                              "compared with the live answers", [s.Answer(200, s.ShadowAnswer)],
                              query=s.ShadowQuery, errors=(404,), tag="models")

    @r(shadow_spec)
    def shadow(name: str):
        q = query(shadow_spec)
        current = runtime.traffic(name)   # NotFound for an unknown model
        return plane.shadow.report(name, live=current.live if current.candidate else None,
                                   candidate=current.candidate, threshold=q.threshold, top=q.top)

    return r
