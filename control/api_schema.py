"""The control API's request and response models, and the OpenAPI document built from them.

Routes declare themselves with `Api.route(...)`: the method, the rule, the pydantic models of
the JSON body, the query and each answer, and who may call it. The same declarations
validate requests (a bad field is a 400 naming it) and produce `GET /openapi.json`; there is
no hand-written spec to drift from the code.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic.json_schema import models_json_schema

from adapters.manifest import DNS_LABEL, LABEL_NAME, SEMVER, label_key_problem
from control.errors import BadRequest

JOB_STATUS = Literal["queued", "running", "succeeded", "failed"]
EVENT_ACTION = Literal["started", "duplicate", "ignored", "rejected"]
#: A model name: what `Manifest.name` accepts (a lowercase DNS label).
NAME_PATTERN = DNS_LABEL.pattern
JOB_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
SEMVER_PATTERN = SEMVER.pattern


class _Closed(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


# -- requests ---------------------------------------------------------------------------------

class RollbackRequest(_Closed):
    version: Optional[str] = Field(None, pattern=SEMVER.pattern, max_length=128,
                                   description="A version the model has. Without it: withdraw the rollout in "
                                               "progress, or else return to the version live before.")


class RolloutRequest(_Closed):
    version: str = Field(pattern=SEMVER.pattern, max_length=128, description="A deployed version, not the live one.")
    percent: int = Field(0, ge=0, le=100, description="Percent of requests the version answers.")
    shadow: int = Field(0, ge=0, le=100, description="Percent of the live version's requests also sent to it; "
                                                     "its answers are recorded, never returned.")


class PromoteRequest(_Closed):
    pass


class PinRequest(_Closed):
    version: str = Field(..., min_length=1, max_length=128, description="A deployed version to keep routed at 0 %.")


class DeployQuery(_Closed):
    live: bool = Field(True, description="Make the new version live (false: deploy it beside the live one, "
                                         "to roll out to a share of requests).")


class ShadowQuery(_Closed):
    threshold: Optional[float] = Field(None, ge=-1e300, le=1e300,
                                       description="Count the rows whose decision (score >= threshold) flips.")
    top: int = Field(20, ge=0, le=1000, description="How many of the largest differences to list.")


class JobRequest(_Closed):
    dataset: str = Field(pattern=r"^gs://[a-z0-9][a-z0-9._-]{1,221}[a-z0-9]/[^\r\n]{1,1024}$",
                         max_length=1300,
                         description="A CSV object in the plane's bucket (or one the operator allows).")


class JobsQuery(_Closed):
    model: Optional[str] = Field(None, pattern=NAME_PATTERN, max_length=63)
    dataset: Optional[str] = Field(None, max_length=1300)
    status: Optional[JOB_STATUS] = None
    limit: int = Field(200, ge=1, le=10_000)


#: Label selectors one list call may carry, and the longest search text.
MAX_SELECTORS = 20
MAX_SEARCH = 200


def parse_label_selector(text: str) -> tuple[str, str, Optional[str]]:
    """`key=value` / `key==value` -> (key, "=", value); `key!=value` -> (key, "!=", value); a bare `key`
    -> (key, "exists", None). ValueError saying what is wrong (the key and value follow Kubernetes'
    label syntax, as the manifest's `labels` do)."""
    if "!=" in text:
        key, _, value = text.partition("!=")
        op = "!="
    elif "=" in text:
        key, _, value = text.partition("=")
        op = "="
        if value.startswith("="):
            value = value[1:]
    else:
        key, op, value = text, "exists", None
    problem = label_key_problem(key)
    if problem is None and value is not None and value and not (len(value) <= 63 and LABEL_NAME.match(value)):
        problem = f"expected a label value (at most 63 of A-Z, a-z, 0-9, '-', '_', '.') or empty; got {value[:80]!r}"
    if problem is not None:
        raise ValueError(f"{problem} (a selector is key=value, key!=value or key)")
    return key, op, value


class ModelsQuery(_Closed):
    limit: Optional[int] = Field(None, ge=1, le=10_000, description="at most this many (all by default)")
    after: Optional[str] = Field(None, max_length=63, description="the page after this model name "
                                 "(the previous page's last, or its Link rel=next)")
    label: list[str] = Field([], max_length=MAX_SELECTORS,
                             description="label selectors, all must match (repeat the parameter): "
                                         "`key=value`, `key!=value` (also when the label is absent) or `key` "
                                         "(has the label)")
    owner: Optional[str] = Field(None, max_length=128, description="only the models of this owner (exact; "
                                 "empty: no filter)")
    q: Optional[str] = Field(None, max_length=MAX_SEARCH, description="case-insensitive text searched in the "
                             "name, description, owner and label values")
    kind: Optional[Literal["realtime", "batch"]] = Field(None, description="only realtime or only batch models")

    @field_validator("label")
    @classmethod
    def _selectors(cls, v: list[str]) -> list[str]:
        for text in v:
            parse_label_selector(text)
        return v


class EventsQuery(_Closed):
    limit: int = Field(200, ge=1, le=10_000)
    action: Optional[EVENT_ACTION] = None
    key: Optional[str] = Field(None, max_length=2048)
    model: Optional[str] = Field(None, pattern=NAME_PATTERN, max_length=63)


class DatasetQuery(_Closed):
    filename: str = Field(pattern=r"^[^/\\\x00-\x1f.][^/\\\x00-\x1f]{0,190}\.[cC][sS][vV]$",
                          description="A plain CSV file name (no folders, not hidden), ending .csv.")


# -- answers ----------------------------------------------------------------------------------

class ErrorAnswer(_Open):
    error: str
    request_id: Optional[str] = None


class Health(_Closed):
    status: Literal["ok", "degraded"]
    runtime: str
    problems: list[str] = []
    sandbox: Optional[str] = None
    """How the local runtime runs models' own processes (bubblewrap, or scrubbed environment only)."""


class Version(_Closed):
    version: str
    deployed_at: str
    live: bool
    failed: bool = Field(False, description="It failed its deploy check: it takes no traffic.")
    error: Optional[str] = Field(None, description="Why it failed its deploy check, with the tail of its log.")
    crashed: bool = Field(False, description="Not live, and crashed max_restarts times in a row: not restarted "
                                             "until a deploy or rollback. The model's status is its live version's.")
    crash_error: Optional[str] = Field(None, description="A version that is not live and crashed lately: how, "
                                                         "with its output.")


class ModelSummary(_Closed):
    name: str
    kind: str
    language: str
    version: Optional[str]
    status: str
    replicas: int
    endpoint: Optional[str]
    error: Optional[str]
    description: str
    owner: str = ""
    labels: dict[str, str] = {}
    drifted: list[str] = Field([], description="versions whose recent scores drifted from their reference "
                                               "(GET /api/models/{name} monitoring)")


class ModelDetail(ModelSummary):
    manifest: dict[str, Any]
    versions: list[Version]
    metrics: dict[str, Any]
    traffic: dict[str, Any] = {}
    monitoring: dict[str, Any] = {}


class TrafficAnswer(_Closed):
    name: str
    live: Optional[str]
    candidate: Optional[str]
    percent: int
    shadow: int
    previous: Optional[str]
    pinned: list[str] = Field(default_factory=list, description="Versions kept routed at 0 % (cluster runtime).")
    targets: list[dict[str, Any]]


class ShadowAnswer(_Open):
    model: str
    live: Optional[str]
    candidate: Optional[str]
    requests: int
    comparison: Optional[dict[str, Any]]


class Deployed(Version):
    name: str


class Removed(_Closed):
    name: str
    removed: bool


class JobAnswer(_Closed):
    id: str
    model: str
    version: str
    status: JOB_STATUS
    dataset: str
    created_at: str
    started_at: Optional[str]
    finished_at: Optional[str]
    rows: Optional[int]
    results_uri: Optional[str]
    error: Optional[str]
    log_tail: str
    trigger: str
    input: dict[str, Any]
    problems: list[dict[str, Any]] = []
    invalid_values: Optional[int] = None
    score_summary: dict[str, Any] = {}
    #: progress (control/runtime/base.py `Job`): scores checked so far of the dataset's rows, when
    #: the adapter last said so, and the seconds left at the rate so far (running jobs only)
    rows_scored: Optional[int] = None
    rows_total: Optional[int] = None
    progress_at: Optional[str] = None
    eta_seconds: Optional[float] = None


class DatasetUploaded(_Closed):
    uri: str
    bucket: str
    object: str
    generation: Optional[str]
    size: int
    key: str
    job: Optional[str] = None


class ModelAnswer(_Open):
    """What a model's adapter answers: `{"scores": [...]}` for predict, the protocol's documents for v2."""


class EventEntry(_Open):
    at: str
    action: EVENT_ACTION
    reason: str


# -- routes -----------------------------------------------------------------------------------

@dataclass
class Answer:
    status: int
    model: Any = None  # a pydantic model, `list[Model]`, or None for a non-JSON body
    mimetype: str = "application/json"
    description: str = ""


@dataclass
class RouteSpec:
    method: str
    rule: str  # Flask's, e.g. /api/models/<name>
    summary: str
    answers: list[Answer]
    auth: Literal["token", "predict", "none"] = "token"
    role: Literal["viewer", "runner", "deployer", "admin"] = "viewer"
    """The least role whose token may call the route (control/identity.py); a `predict` route's
    is `runner`, waived when the model is public or predict is opened."""
    audit: Optional[str] = None
    """The change the route makes, as the audit trail names it (None: it changes nothing)."""
    owned: bool = False
    """Whether an owner-limited token may call it only for its owner's models."""
    body: Any = None  # pydantic model of a JSON body
    body_types: tuple[str, ...] = ()  # accepted Content-Types of a non-JSON body
    body_limit: Optional[int] = None
    query: Any = None
    path_patterns: dict[str, str] = field(default_factory=dict)
    errors: tuple[int, ...] = ()
    tag: str = ""

    @property
    def openapi_path(self) -> str:
        return re.sub(r"<(?:[a-z]+:)?([A-Za-z_]+)>", r"{\1}", self.rule)


def validate(model: type[BaseModel], data: Any, *, where: str) -> BaseModel:
    """`data` as `model`, or a BadRequest naming each field at fault."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        problems = []
        for err in e.errors(include_url=False, include_input=False):
            loc = ".".join(str(p) for p in err["loc"]) or "(body)"
            problems.append(f"{loc}: {err['msg']}")
        raise BadRequest(f"invalid {where}: " + "; ".join(problems[:10])) from None


def _schema_of(model: Any, refs: dict[type, str]) -> dict:
    origin = getattr(model, "__origin__", None)
    if origin is list:
        return {"type": "array", "items": _schema_of(model.__args__[0], refs)}
    return {"$ref": refs[model]}


def openapi_document(routes: list[RouteSpec], *, version: str, security_note: str) -> dict:
    models: set[type] = {ErrorAnswer}
    for r in routes:
        for m in (r.body, r.query):
            if m is not None:
                models.add(m)
        for a in r.answers:
            if a.model is not None:
                models.add(a.model.__args__[0] if getattr(a.model, "__origin__", None) is list else a.model)
    ordered = sorted(models, key=lambda m: m.__name__)
    keys, defs = models_json_schema([(m, "serialization") for m in ordered],
                                    ref_template="#/components/schemas/{model}")
    refs = {m: keys[(m, "serialization")]["$ref"] for m in ordered}
    components = dict(defs.get("$defs", {}))
    paths: dict[str, dict] = {}
    for r in routes:
        op: dict[str, Any] = {"summary": r.summary, "operationId": f"{r.method.lower()}_{r.rule}",
                              "responses": {}}
        if r.tag:
            op["tags"] = [r.tag]
        params = []
        for name in re.findall(r"<(?:[a-z]+:)?([A-Za-z_]+)>", r.rule):
            params.append({"name": name, "in": "path", "required": True,
                           "schema": {"type": "string", "pattern": r.path_patterns.get(name, NAME_PATTERN)}})
        if r.query is not None:
            schema = r.query.model_json_schema()
            for qname, qschema in schema.get("properties", {}).items():
                params.append({"name": qname, "in": "query", "required": qname in schema.get("required", []),
                               "schema": qschema})
        if params:
            op["parameters"] = params
        if r.body is not None:
            op["requestBody"] = {"required": True,
                                 "content": {"application/json": {"schema": {"$ref": refs[r.body]}}}}
        elif r.body_types:
            op["requestBody"] = {"required": True, "content": {
                t: {"schema": {"type": "string", "format": "binary"}} for t in r.body_types}}
        for a in r.answers:
            content = ({a.mimetype: {"schema": _schema_of(a.model, refs)}} if a.model is not None
                       else {a.mimetype: {"schema": {"type": "string"}}})
            op["responses"][str(a.status)] = {"description": a.description or "OK", "content": content}
        error_codes = set(r.errors) | {400, 500}
        if r.auth != "none":
            error_codes |= {401, 403}
        if r.body is not None or r.body_types:
            error_codes |= {413, 415}
        for code in sorted(error_codes):
            op["responses"].setdefault(str(code), {
                "description": _ERROR_TEXT.get(code, "error"),
                "content": {"application/json": {"schema": {"$ref": refs[ErrorAnswer]}}}})
        if r.auth == "token":
            op["security"] = [{"bearer": []}]
            op["x-modelplane-role"] = r.role
        elif r.auth == "predict":
            op["security"] = [{"bearer": []}, {}]
            op["x-modelplane-role"] = r.role
        if r.audit:
            op["x-modelplane-audit"] = r.audit
        paths.setdefault(r.openapi_path, {})[r.method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": "modelplane control API", "version": version, "description": security_note},
        "paths": paths,
        "components": {"schemas": components,
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    }


_ERROR_TEXT = {400: "the request is malformed (the message names the field)",
               401: "no token, or the wrong one",
               403: "refused: the token's role or owner does not allow it, a cross-site call or an unknown Host",
               404: "no such model or job", 405: "method not allowed", 409: "not in a state that allows it",
               413: "the body is over this route's limit", 415: "the body's Content-Type is not accepted",
               422: "the input will never work as sent (the message names file, field or row)",
               500: "a bug: the answer names a request id to find in the log",
               502: "the model answered something unusable", 503: "try again: starting or unreachable",
               504: "the model did not answer in time"}


# -- comparisons (two versions on the same rows) and references from a dataset -----------------

_GS_DATASET = r"^gs://[a-z0-9][a-z0-9._-]{1,221}[a-z0-9]/[^\r\n]{1,1024}$"
COMPARISON_ID_PATTERN = r"^cmp-[0-9a-f]{16}$"
COMPARISON_STATUS = Literal["queued", "running", "succeeded", "failed"]


class ComparisonRequest(_Closed):
    a: str = Field(pattern=SEMVER_PATTERN, max_length=128, description="A deployed version (the baseline).")
    b: str = Field(pattern=SEMVER_PATTERN, max_length=128, description="Another deployed version.")
    dataset: str = Field(pattern=_GS_DATASET, max_length=1300,
                         description="A CSV object in the plane's bucket (or one the operator allows).")
    threshold: Optional[float] = Field(None, allow_inf_nan=False, ge=-1e300, le=1e300,
                                       description="Report the rows whose decision (score >= threshold) flips.")
    top: int = Field(20, ge=0, le=1000, description="How many of the largest differences to list.")


class ComparisonsQuery(_Closed):
    limit: int = Field(100, ge=1, le=500)


class ReferenceRequest(_Closed):
    dataset: str = Field(pattern=_GS_DATASET, max_length=1300,
                         description="A CSV object whose scores by this version become its reference.")


class ComparisonAnswer(_Open):
    """A comparison or a reference job: its status, progress and, once succeeded, its report."""

    id: str
    kind: Literal["comparison", "reference"]
    model: str
    status: COMPARISON_STATUS
    dataset: str
    created_at: str
    started_at: Optional[str] = None
    finished_at: Optional[str] = None
    progress: dict[str, Any] = {}
    error: Optional[str] = None
    report: Optional[dict[str, Any]] = None


class ComparisonDataset(_Closed):
    uri: str
    bucket: str
    object: str
    size: int


# -- who is calling: tokens, and the audit trail -------------------------------------------------

ROLE = Literal["viewer", "runner", "deployer", "admin"]
TOKEN_NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,62}$"
AUDIT_OUTCOME = Literal["ok", "denied", "failed"]


class WhoAmI(_Open):
    name: str
    role: ROLE
    owner: Optional[str] = None
    may: list[str] = Field(description="The roles this identity holds, its own and those below it.")


class TokenRequest(_Closed):
    name: str = Field(pattern=TOKEN_NAME_PATTERN, description="Who or what holds the token (unique).")
    role: ROLE
    owner: Optional[str] = Field(None, min_length=1, max_length=100,
                                 description="Limit the token to the models whose manifest names this owner.")


class TokenInfo(_Open):
    name: str
    role: ROLE
    owner: Optional[str] = None
    created_at: Optional[str] = None
    created_by: Optional[str] = None


class TokenCreated(TokenInfo):
    token: str = Field(description="The token itself: shown this once, stored only as a hash.")


class AuditQuery(_Closed):
    limit: int = Field(100, ge=1, le=5000)
    who: Optional[str] = Field(None, max_length=63)
    action: Optional[str] = Field(None, pattern=r"^[a-z.]{1,32}$")
    model: Optional[str] = Field(None, pattern=NAME_PATTERN, max_length=63)
    outcome: Optional[AUDIT_OUTCOME] = None
    since: Optional[str] = Field(None, pattern=r"^\d{4}-\d{2}-\d{2}([T ][0-9:.]+Z?)?$",
                                 description="Records at or after this UTC time (ISO 8601).")


class AuditEntry(_Open):
    seq: int
    at: str
    who: str
    role: str
    action: str
    status: int
    outcome: AUDIT_OUTCOME
    model: Optional[str] = None
    version: Optional[str] = None
    request_id: Optional[str] = None
    hash: str
    prev: str


class AuditCheck(_Open):
    ok: bool
    records: int
    last: int
    problem: Optional[str] = None
