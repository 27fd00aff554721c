"""Who is calling, the tokens an admin hands out, and the audit trail of every change."""
from __future__ import annotations

from flask import g, jsonify

from control import api_schema as s
from control.api import Routes, body_json, json_response, query
from control.identity import ROLES, RANK


def routes(plane) -> Routes:
    r = Routes("access")

    @r(s.RouteSpec("GET", "/api/whoami", "The identity of this request's token: its name, role and owner",
                   [s.Answer(200, s.WhoAmI)], tag="access"))
    def whoami():
        identity = g.identity
        return {**identity.to_json(), "may": [role for role in ROLES if RANK[role] <= RANK[identity.role]]}

    @r(s.RouteSpec("GET", "/api/tokens", "The named tokens (never the tokens themselves)",
                   [s.Answer(200, list[s.TokenInfo])], tag="access", role="admin"))
    def list_tokens():
        return json_response(plane.tokens.list())

    create_spec = s.RouteSpec("POST", "/api/tokens", "Create a named token with a role (shown once)",
                              [s.Answer(201, s.TokenCreated)], body=s.TokenRequest, errors=(409,), tag="access",
                              role="admin", audit="token.create")

    @r(create_spec)
    def create_token():
        req = body_json(create_spec)
        g.audit = {"target": req.name, "granted": req.role, **({"limited_to": req.owner} if req.owner else {})}
        token, record = plane.tokens.create(req.name, req.role, req.owner, by=g.identity.name)
        return jsonify({**record, "token": token}), 201

    @r(s.RouteSpec("DELETE", "/api/tokens/<token_name>", "Revoke a named token: it is refused from now on",
                   [s.Answer(200, s.TokenInfo)], errors=(404,), path_patterns={"token_name": s.TOKEN_NAME_PATTERN},
                   tag="access", role="admin", audit="token.revoke"))
    def revoke_token(token_name: str):
        g.audit = {"target": token_name}
        return plane.tokens.revoke(token_name)

    audit_spec = s.RouteSpec("GET", "/api/audit", "The audit trail, newest first, filtered",
                             [s.Answer(200, list[s.AuditEntry])], query=s.AuditQuery, tag="access")

    @r(audit_spec)
    def audit():
        q = query(audit_spec)
        return json_response(plane.audit.entries(limit=q.limit, who=q.who, action=q.action, model=q.model,
                                                 outcome=q.outcome, since=q.since))

    @r(s.RouteSpec("GET", "/api/audit/verify", "Check the audit trail's hash chain from its first record",
                   [s.Answer(200, s.AuditCheck)], tag="access"))
    def audit_verify():
        return plane.audit.verify()

    return r
