"""Named identities with roles, owner-limited tokens, and the hash-chained audit trail, over
real HTTP against the real server (front door + Flask API) in front of an in-memory runtime.

The role table is generated from the service's own OpenAPI document: every operation it
serves must be in EXPECTED below, so a new route cannot be added without deciding (and
testing) who may call it.
"""
from __future__ import annotations

import io
import json
import os
import re
import stat
import tarfile
from pathlib import Path

import pytest
import requests

from control.cli import main
from control_fake_runtime import FakeRuntime
from control_helpers import FIXTURES, TOKEN, copy_fixture, running, settings_for, token_file

ROLES = ("viewer", "runner", "deployer", "admin")

#: (method, OpenAPI path) -> the least role that may call it; None: no token needed.
EXPECTED = {
    ("get", "/healthz"): None,
    ("get", "/readyz"): None,
    ("get", "/openapi.json"): None,
    ("get", "/v2"): None,
    ("get", "/v2/health/live"): None,
    ("get", "/v2/health/ready"): None,
    ("get", "/metrics"): "viewer",
    ("get", "/api/models"): "viewer",
    ("post", "/api/models"): "deployer",
    ("get", "/api/models/{name}"): "viewer",
    ("delete", "/api/models/{name}"): "admin",
    ("post", "/api/models/{name}/rollback"): "deployer",
    ("post", "/api/models/{name}/rollout"): "deployer",
    ("post", "/api/models/{name}/promote"): "deployer",
    ("post", "/api/models/{name}/pins"): "deployer",
    ("delete", "/api/models/{name}/pins/{version}"): "deployer",
    ("get", "/api/models/{name}/traffic"): "viewer",
    ("get", "/api/models/{name}/shadow"): "viewer",
    ("post", "/api/models/{name}/jobs"): "runner",
    ("post", "/api/models/{name}/datasets"): "runner",
    ("get", "/api/jobs"): "viewer",
    ("get", "/api/jobs/{job_id}"): "viewer",
    ("delete", "/api/jobs/{job_id}"): "runner",
    ("get", "/api/jobs/{job_id}/results"): "viewer",
    ("post", "/api/models/{name}/comparisons"): "deployer",
    ("get", "/api/models/{name}/comparisons"): "viewer",
    ("get", "/api/comparisons/{comparison_id}"): "viewer",
    ("post", "/api/models/{name}/comparisons/datasets"): "deployer",
    ("put", "/api/models/{name}/versions/{version}/reference"): "deployer",
    ("post", "/events"): "runner",
    ("get", "/api/events"): "viewer",
    ("get", "/api/whoami"): "viewer",
    ("get", "/api/tokens"): "admin",
    ("post", "/api/tokens"): "admin",
    ("delete", "/api/tokens/{token_name}"): "admin",
    ("get", "/api/audit"): "viewer",
    ("get", "/api/audit/verify"): "viewer",
}
#: The models' own routes (served by the front door): a runner's, unless the model is public.
PREDICT_PATHS = re.compile(r"^/(v2/)?models/\{name\}")
PARAMS = {"name": "echo-rt", "version": "1.0.0", "model": "echo-rt", "job_id": "job-0001",
          "comparison_id": "cmp-0123456789abcdef", "token_name": "nobody"}


@pytest.fixture
def plane(tmp_path):
    settings = settings_for(tmp_path, token=TOKEN)
    for name in ("echo-rt", "sum-batch"):
        copy_fixture(name, settings.models_dir)
    runtime = FakeRuntime()
    with running(settings, runtime=runtime) as server:
        yield server, runtime, settings


def call(server, method: str, path: str, token=None, **kwargs) -> requests.Response:
    headers = dict(kwargs.pop("headers", {}))
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return requests.request(method, server.url + path, headers=headers, timeout=30, **kwargs)


def make_token(server, name: str, role: str, owner=None) -> str:
    body = {"name": name, "role": role, **({"owner": owner} if owner else {})}
    r = call(server, "POST", "/api/tokens", TOKEN, json=body)
    assert r.status_code == 201, r.text
    return r.json()["token"]


def tokens_for_roles(server) -> dict[str, str]:
    return {role: make_token(server, f"a-{role}", role) for role in ROLES}


def operations(doc: dict) -> dict[tuple[str, str], dict]:
    return {(method, path): op for path, ops in doc["paths"].items() for method, op in ops.items()}


def example_request(doc_op: dict) -> dict:
    """A request shaped as the route takes it: its body type (no real content is needed: the
    role is judged before the body is read)."""
    body = doc_op.get("requestBody")
    if not body:
        return {}
    media = next(iter(body["content"]))
    return {"headers": {"Content-Type": media}, "data": b"{}" if media.endswith("json") else b"x"}


def concrete(path: str) -> str:
    return re.sub(r"\{(\w+)\}", lambda m: PARAMS[m.group(1)], path)


def role_refusal(r: requests.Response) -> bool:
    return r.status_code == 403 and "holds the role" in r.json().get("error", "")


# -- the table --------------------------------------------------------------------------------------

def test_every_route_in_the_openapi_document_has_a_decided_role(plane):
    server, _, _ = plane
    doc = requests.get(f"{server.url}/openapi.json", timeout=10).json()
    ops = operations(doc)
    api_ops = {k: v for k, v in ops.items() if not PREDICT_PATHS.match(k[1])}
    assert set(api_ops) == set(EXPECTED), ("routes without a decided role: "
                                           f"{sorted(set(api_ops) - set(EXPECTED))}; gone: "
                                           f"{sorted(set(EXPECTED) - set(api_ops))}")
    for key, op in api_ops.items():
        assert op.get("x-modelplane-role") == EXPECTED[key], key
        if EXPECTED[key] is None:
            assert "security" not in op, key
    predict_ops = {k: v for k, v in ops.items() if PREDICT_PATHS.match(k[1])}
    assert len(predict_ops) >= 4
    assert all(op["x-modelplane-role"] == "runner" for op in predict_ops.values())


def test_each_role_may_call_exactly_the_routes_of_its_rank(plane):
    """Every operation of the document, with no token and with each role's token: refused
    below its role (403 naming the role), let through at and above it (whatever the route
    then answers), 401 without a token."""
    server, _, _ = plane
    tokens = tokens_for_roles(server)
    doc = requests.get(f"{server.url}/openapi.json", timeout=10).json()
    ops = operations(doc)
    ranked = sorted(ops, key=lambda k: (k[0] in ("delete",), k))  # removals last: they change the plane
    checked = 0
    for method, path in ranked:
        op = ops[(method, path)]
        least = op.get("x-modelplane-role")
        request = example_request(op)
        url = concrete(path)
        if least is None:
            r = call(server, method.upper(), url, **request)
            assert r.status_code not in (401, 403), (method, path, r.status_code)
            continue
        r = call(server, method.upper(), url, **request)
        assert r.status_code == 401, (method, path, r.status_code, r.text)
        assert r.headers["WWW-Authenticate"].startswith("Bearer"), (method, path)
        for role in ROLES:
            r = call(server, method.upper(), url, tokens[role], **request)
            allowed = ROLES.index(role) >= ROLES.index(least)
            if allowed:
                assert r.status_code != 401 and not role_refusal(r), (method, path, role, r.status_code, r.text)
            else:
                assert role_refusal(r), (method, path, role, r.status_code, r.text)
                assert f"needs {least}" in r.json()["error"]
            checked += 1
    assert checked >= 4 * (len(EXPECTED) - 2)


def test_a_wrong_or_revoked_token_is_401_with_a_challenge(plane):
    server, _, _ = plane
    r = call(server, "GET", "/api/models", "mp_not-a-token")
    assert r.status_code == 401 and 'error="invalid_token"' in r.headers["WWW-Authenticate"]
    runner = make_token(server, "ci", "runner")
    assert call(server, "GET", "/api/whoami", runner).json() == {"name": "ci", "role": "runner", "owner": None,
                                                                  "may": ["viewer", "runner"]}
    r = call(server, "DELETE", "/api/tokens/ci", TOKEN)
    assert r.status_code == 200 and r.json()["name"] == "ci"
    r = call(server, "GET", "/api/models", runner)
    assert r.status_code == 401 and "revoked" in r.json()["error"]
    r = call(server, "POST", "/models/echo-rt/predict", runner, json={"rows": [{"x": 1}]})
    assert r.status_code == 401


# -- tokens ------------------------------------------------------------------------------------------

def test_tokens_are_shown_once_and_stored_only_as_hashes(plane):
    server, _, settings = plane
    made = call(server, "POST", "/api/tokens", TOKEN, json={"name": "alice", "role": "deployer", "owner": "risk-team"})
    assert made.status_code == 201
    token = made.json()["token"]
    assert token.startswith("mp_") and len(token) > 40
    listed = call(server, "GET", "/api/tokens", TOKEN).json()
    assert listed == [{"name": "alice", "role": "deployer", "owner": "risk-team",
                       "created_at": listed[0]["created_at"], "created_by": "admin"}]
    stored = Path(settings.state_dir) / "tokens.json"
    text = stored.read_text()
    assert token not in text and token[3:] not in text
    assert stat.S_IMODE(stored.stat().st_mode) == 0o600
    # refusals name what is wrong
    r = call(server, "POST", "/api/tokens", TOKEN, json={"name": "alice", "role": "viewer"})
    assert r.status_code == 409 and "exists" in r.json()["error"]
    r = call(server, "POST", "/api/tokens", TOKEN, json={"name": "bob", "role": "root"})
    assert r.status_code == 400 and "role" in r.json()["error"]
    r = call(server, "POST", "/api/tokens", TOKEN, json={"name": "boss", "role": "admin", "owner": "x"})
    assert r.status_code == 400 and "owner" in r.json()["error"]
    r = call(server, "POST", "/api/tokens", TOKEN, json={"name": "admin", "role": "viewer"})
    assert r.status_code == 400 and "bootstrap" in r.json()["error"]
    r = call(server, "DELETE", "/api/tokens/admin", TOKEN)
    assert r.status_code == 400
    r = call(server, "DELETE", "/api/tokens/nobody", TOKEN)
    assert r.status_code == 404
    # a deployer cannot mint itself an admin token
    r = call(server, "POST", "/api/tokens", token, json={"name": "mine", "role": "admin"})
    assert role_refusal(r)


def test_tokens_survive_a_restart(tmp_path):
    settings = settings_for(tmp_path, token=TOKEN)
    with running(settings, runtime=FakeRuntime()) as server:
        token = make_token(server, "ops", "viewer")
    with running(settings, runtime=FakeRuntime()) as server:
        assert call(server, "GET", "/api/whoami", token).json()["name"] == "ops"


# -- owners ------------------------------------------------------------------------------------------

def model_archive(name: str, owner: str, version: str = "1.0.0") -> bytes:
    folder = FIXTURES / "echo-rt"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for path in sorted(folder.rglob("*")):
            if not path.is_file():
                continue
            data = path.read_bytes()
            if path.name == "model.yaml":
                text = data.decode().replace("name: echo-rt", f"name: {name}").replace("version: 1.0.0",
                                                                                       f"version: {version}")
                data = (text + f"owner: {owner}\n").encode()
            info = tarfile.TarInfo(str(path.relative_to(folder)))
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def deploy(server, token, name, owner, version="1.0.0"):
    return call(server, "POST", "/api/models", token, data=model_archive(name, owner, version),
                headers={"Content-Type": "application/gzip"})


def test_an_owner_limited_token_acts_only_on_its_owners_models(plane):
    server, runtime, _ = plane
    assert deploy(server, TOKEN, "fraud", "team-b").status_code == 201
    alice = make_token(server, "alice", "deployer", owner="team-a")
    carol = make_token(server, "carol", "runner", owner="team-a")
    # its own: deploy, roll out, predict
    assert deploy(server, alice, "churn", "team-a").status_code == 201
    assert deploy(server, alice, "churn", "team-a", "1.1.0").status_code == 201
    r = call(server, "POST", "/api/models/churn/rollback", alice, json={"version": "1.0.0"})
    assert r.status_code == 200, r.text
    r = call(server, "POST", "/models/churn/predict", carol, json={"rows": [{"x": 1}]})
    assert r.status_code == 200, r.text
    # another owner's: refused, naming the owners
    r = deploy(server, alice, "scam", "team-b")
    assert r.status_code == 403 and "team-a" in r.json()["error"] and "team-b" in r.json()["error"]
    r = deploy(server, alice, "fraud", "team-a", "2.0.0")   # taking over team-b's model by renaming the owner
    assert r.status_code == 403
    assert "2.0.0" not in [v.version for v in runtime.model("fraud").versions]
    r = call(server, "POST", "/api/models/fraud/rollback", alice, json={"version": "1.0.0"})
    assert r.status_code == 403
    r = call(server, "POST", "/models/fraud/predict", carol, json={"rows": [{"x": 1}]})
    assert r.status_code == 403
    r = call(server, "POST", "/api/models/sum-batch/jobs", carol, json={"dataset": "gs://test-bucket/incoming/x.csv"})
    assert r.status_code == 403
    r = call(server, "POST", "/events", carol, json={"specversion": "1.0", "id": "1", "source": "x", "type": "y"},
             headers={"Content-Type": "application/cloudevents+json"})
    assert r.status_code == 403 and "POST /api/models" in r.json()["error"]
    # reads are not limited
    assert call(server, "GET", "/api/models/fraud", alice).status_code == 200
    assert {m["name"] for m in call(server, "GET", "/api/models", carol).json()} >= {"fraud", "churn"}


# -- the audit trail ---------------------------------------------------------------------------------

def test_every_change_is_audited_with_who_what_and_how_it_ended(plane):
    server, _, settings = plane
    tokens = tokens_for_roles(server)
    assert deploy(server, tokens["deployer"], "churn", "risk", "1.0.0").status_code == 201
    r = call(server, "POST", "/api/models/churn/rollback", tokens["viewer"], json={"version": "1.0.0"},
             headers={"X-Request-Id": "req-denied-1"})
    assert r.status_code == 403
    r = call(server, "POST", "/api/models/sum-batch/jobs", tokens["runner"],
             json={"dataset": "gs://test-bucket/incoming/sum-batch/a.csv"}, headers={"X-Request-Id": "req-job-1"})
    assert r.status_code == 202
    job = r.json()["id"]
    r = call(server, "DELETE", "/api/models/churn", tokens["admin"])
    assert r.status_code == 200
    assert call(server, "GET", "/api/models", tokens["viewer"]).status_code == 200   # a read: not audited

    entries = call(server, "GET", "/api/audit?limit=100", tokens["viewer"]).json()
    actions = [(e["who"], e["action"], e["outcome"]) for e in reversed(entries)]
    assert actions == [("admin", "token.create", "ok")] * 4 + [
        ("a-deployer", "deploy", "ok"), ("a-viewer", "rollback", "denied"), ("a-runner", "job.run", "ok"),
        ("a-admin", "remove", "ok")]
    by_action = {e["action"]: e for e in entries}
    assert by_action["deploy"]["model"] == "churn" and by_action["deploy"]["version"] == "1.0.0"
    assert by_action["deploy"]["role"] == "deployer" and by_action["deploy"]["status"] == 201
    denied = by_action["rollback"]
    assert denied["request_id"] == "req-denied-1" and denied["status"] == 403 and denied["model"] == "churn"
    assert by_action["job.run"]["detail"]["job"] == job and by_action["job.run"]["request_id"] == "req-job-1"
    assert entries[-1]["detail"]["granted"] == "viewer" and entries[-1]["target"] == "a-viewer"
    assert [e["seq"] for e in reversed(entries)] == list(range(1, 9))
    # filters
    only = call(server, "GET", "/api/audit?who=a-viewer", tokens["viewer"]).json()
    assert [e["action"] for e in only] == ["rollback"]
    assert [e["who"] for e in call(server, "GET", "/api/audit?outcome=denied", TOKEN).json()] == ["a-viewer"]
    assert [e["action"] for e in call(server, "GET", "/api/audit?model=churn", TOKEN).json()] == \
        ["remove", "rollback", "deploy"]
    assert call(server, "GET", "/api/audit?since=2999-01-01", TOKEN).json() == []
    assert call(server, "GET", "/api/audit?outcome=maybe", TOKEN).status_code == 400
    check = call(server, "GET", "/api/audit/verify", TOKEN).json()
    assert check == {"ok": True, "records": 8, "last": 8, "problem": None}
    log = Path(settings.state_dir) / "audit.log"
    assert stat.S_IMODE(log.stat().st_mode) == 0o600
    assert not any(t in log.read_text() for t in tokens.values())


def test_an_edit_or_a_gap_in_the_audit_trail_shows(tmp_path):
    settings = settings_for(tmp_path, token=TOKEN)
    log = Path(settings.state_dir) / "audit.log"
    with running(settings, runtime=FakeRuntime()) as server:
        for n in range(5):
            make_token(server, f"t{n}", "viewer")
        assert call(server, "GET", "/api/audit/verify", TOKEN).json()["ok"] is True
    lines = log.read_bytes().splitlines(keepends=True)
    original = b"".join(lines)

    record = json.loads(lines[2])
    record["who"] = "someone-else"          # an edit that keeps the stored hash
    log.write_bytes(b"".join(lines[:2] + [json.dumps(record).encode() + b"\n"] + lines[3:]))
    with running(settings, runtime=FakeRuntime()) as server:
        check = call(server, "GET", "/api/audit/verify", TOKEN).json()
        assert check["ok"] is False and check["records"] == 2 and "record 3 was changed" in check["problem"]

    log.write_bytes(b"".join(lines[:1] + lines[2:]))   # record 2 removed
    with running(settings, runtime=FakeRuntime()) as server:
        check = call(server, "GET", "/api/audit/verify", TOKEN).json()
        assert check["ok"] is False and "missing" in check["problem"]

    log.write_bytes(original)   # the chain goes on across restarts
    with running(settings, runtime=FakeRuntime()) as server:
        make_token(server, "t9", "viewer")
        assert call(server, "GET", "/api/audit/verify", TOKEN).json() == {"ok": True, "records": 6, "last": 6,
                                                                          "problem": None}


# -- the CLI -----------------------------------------------------------------------------------------

def test_the_cli_manages_tokens_and_reads_the_audit_trail(plane, capsys, monkeypatch):
    server, _, _ = plane
    admin = ["--url", server.url, "--token-file", token_file(TOKEN)]
    assert main(["token", "create", "ci-bot", "--role", "runner", *admin]) == 0
    captured = capsys.readouterr()
    token = captured.out.strip()
    assert token.startswith("mp_") and "shown this once" in captured.err
    assert main(["token", "ls", *admin]) == 0
    listed = capsys.readouterr().out
    assert "ci-bot" in listed and "runner" in listed and token not in listed

    monkeypatch.setattr("sys.stdin", io.StringIO(token + "\n"))
    assert main(["whoami", "--url", server.url, "--token-file", "-"]) == 0
    assert capsys.readouterr().out.strip() == "ci-bot (runner)"
    monkeypatch.setenv("MODELPLANE_TOKEN", token)
    assert main(["remove", "echo-rt", "--yes", "--url", server.url]) == 1
    assert "needs admin" in capsys.readouterr().err
    monkeypatch.delenv("MODELPLANE_TOKEN")

    assert main(["audit", *admin]) == 0
    text = capsys.readouterr().out
    assert "token.create" in text and "remove" in text and "denied (403)" in text and "ci-bot" in text
    assert main(["audit", "--verify", *admin]) == 0
    assert "intact: 2 records" in capsys.readouterr().out
    assert main(["token", "revoke", "ci-bot", *admin]) == 0
    assert "refused from now on" in capsys.readouterr().out


def test_the_cli_never_takes_a_token_on_its_command_line(plane, capsys):
    server, _, _ = plane
    assert main(["ls", "--url", server.url, "--token", TOKEN]) == 1
    err = capsys.readouterr().err
    assert "--token-file" in err and "MODELPLANE_TOKEN" in err and TOKEN not in err


def test_a_token_file_that_is_empty_or_missing_is_named(plane, tmp_path, capsys):
    server, _, _ = plane
    empty = tmp_path / "empty"
    empty.write_text("\n")
    assert main(["ls", "--url", server.url, "--token-file", str(empty)]) == 1
    assert f"the token file {empty} is empty" in capsys.readouterr().err
    assert main(["ls", "--url", server.url, "--token-file", str(tmp_path / "nope")]) == 1
    assert "cannot read the token file" in capsys.readouterr().err
