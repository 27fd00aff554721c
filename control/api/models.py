"""Models: list (a snapshot, filtered, paged, with an ETag), deploy, one model, remove, roll back."""
from __future__ import annotations

import bisect
import hashlib
import itertools
import operator
import shutil
import tempfile
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Optional
from urllib.parse import quote

import orjson
from flask import Response, g, jsonify, request

from adapters.manifest import MANIFEST_FILE, ManifestError, parse_manifest, read_manifest_text
from control import api_schema as s
from control.api import Routes, body_json, query
from control.errors import BadRequest, Invalid, NotFound
from control.runtime.base import DeployCheckFailed
from control.uploads import extract_model

MODEL_ARCHIVE_TYPES = ("application/gzip", "application/x-gzip", "application/x-tar", "application/octet-stream")


#: Encoded answers (and filtered row lists) a snapshot keeps, least recently used evicted first,
#: and the bytes those answers may hold in all (a broad filter's answer is nearly the whole list).
ANSWERS_CACHED = 64
ANSWER_BYTES = 16 * 2**20


@dataclass(frozen=True)
class Filter:
    """What `GET /api/models` was asked for: label selectors, an owner, a search text (lowercase)."""

    selectors: tuple[tuple[str, str, Optional[str]], ...] = ()
    owner: Optional[str] = None
    q: Optional[str] = None
    kind: Optional[str] = None

    @classmethod
    def of(cls, query) -> "Filter":
        return cls(tuple(s.parse_label_selector(text) for text in query.label), query.owner or None,
                   query.q.lower() if query.q else None, query.kind)

    def __bool__(self) -> bool:
        return bool(self.selectors or self.owner is not None or self.q or self.kind)

    def link_params(self, query) -> str:
        """The filters as the next page's link carries them (as they were sent)."""
        out = "".join(f"&label={quote(text, safe='')}" for text in query.label)
        if self.owner is not None:
            out += f"&owner={quote(self.owner, safe='')}"
        if query.q:
            out += f"&q={quote(query.q, safe='')}"
        if self.kind:
            out += f"&kind={self.kind}"
        return out


class Row(tuple):
    """One model of the list, encoded once: (name, owner, kind, labels, search text, JSON bytes,
    digest of the bytes). A row whose model did not change is reused by the next snapshot."""

    __slots__ = ()

    @classmethod
    def of(cls, m: dict) -> "Row":
        encoded = orjson.dumps(m)
        return cls((m["name"], m.get("owner") or "", m.get("kind"), m.get("labels") or {},
                    "\0".join((m["name"], m.get("description") or "", m.get("owner") or "",
                               *(m.get("labels") or {}).values())).lower(), encoded,
                    hashlib.blake2b(encoded, digest_size=12).digest()))


class Snapshot:
    """The encoded list, each model's byte span in it (a page is a slice, never a re-encoding),
    each row's owner, labels and lowercase search text (a filter never re-reads the rows), and
    an ETag of the whole. Never changed once built, but for its small cache of answers."""

    def __init__(self, infos: Optional[list[dict]] = None, *, rows: Optional[list[Row]] = None,
                 base: Optional["Snapshot"] = None, changed: Optional[list[int]] = None):
        """From `rows` (or dicts, `infos`); or from `base` with the rows at the positions
        `changed` replaced by those of `rows` (the same models in the same order otherwise)."""
        rows = rows if rows is not None else [Row.of(m) for m in infos or []]
        if base is not None and changed is not None:
            self.names, self.owners, self.kinds, self.labels, self.texts = (
                list(base.names), list(base.owners), list(base.kinds), list(base.labels), list(base.texts))
            encoded, digests = list(base._encoded), list(base._digests)
            resized = False
            for i in changed:
                row = rows[i]
                self.owners[i], self.kinds[i], self.labels[i], self.texts[i] = row[1], row[2], row[3], row[4]
                resized = resized or len(row[5]) != len(encoded[i])
                encoded[i], digests[i] = row[5], row[6]
            spans = base.spans if not resized else None
        elif rows:
            self.names, self.owners, self.kinds, self.labels, self.texts, encoded, digests = map(list, zip(*rows))
            spans = None
        else:
            self.names, self.owners, self.kinds, self.labels, self.texts, encoded, digests = [], [], [], [], [], [], []
            spans = None
        if spans is None:
            # row i spans [ends[i] - len(row i), ends[i]) of the body: "[" + rows joined by "," + "]"
            ends = list(itertools.accumulate(len(e) + 1 for e in encoded))
            spans = [(end - len(e), end) for end, e in zip(ends, encoded)]
        self.spans = spans
        self._encoded, self._digests = encoded, digests
        self.body = b"[" + b",".join(encoded) + b"]"
        # the ETag: a digest of the rows' digests (each made once, with its row)
        self.etag = _etag(b"".join(digests))
        self._lock = threading.Lock()
        self._answers: OrderedDict = OrderedDict()
        self._answer_bytes = 0
        self._matches: OrderedDict = OrderedDict()
        if base is not None and changed is not None:
            self._carry_matches(base, changed)

    def page(self, after: Optional[str], limit: Optional[int]) -> tuple[bytes, str, Optional[str]]:
        """(the JSON list of the page, its ETag, the name to page after for the next one or None)."""
        body, etag, next_after, _ = self.answer(Filter(), after, limit)
        return body, etag, next_after

    def answer(self, wanted: Filter, after: Optional[str], limit: Optional[int]
               ) -> tuple[bytes, str, Optional[str], int]:
        """(the JSON list of the page of the models `wanted` matches, its ETag, the name to page
        after for the next page or None, how many models match in all)."""
        if not wanted and after is None and limit is None:
            return self.body, self.etag, None, len(self.names)
        key = (wanted, after, limit)
        with self._lock:
            hit = self._answers.get(key)
            if hit is not None:
                self._answers.move_to_end(key)
                return hit
        rows, names = self._match(wanted)
        start = bisect.bisect_right(names, after) if after else 0
        end = len(names) if limit is None else min(len(names), start + limit)
        if rows is None:
            body = b"[" + self.body[self.spans[start][0]:self.spans[end - 1][1]] + b"]" if start < end else b"[]"
        else:
            body = b"[" + b",".join(self.body[self.spans[i][0]:self.spans[i][1]] for i in rows[start:end]) + b"]"
        etag = _etag(self.etag.encode() + repr(key).encode())
        answer = (body, etag, names[end - 1] if start < end < len(names) else None, len(names))
        if len(body) <= ANSWER_BYTES // 4:
            with self._lock:
                if key not in self._answers:
                    self._answers[key] = answer
                    self._answer_bytes += len(body)
                while len(self._answers) > ANSWERS_CACHED or self._answer_bytes > ANSWER_BYTES:
                    self._answer_bytes -= len(self._answers.popitem(last=False)[1][0])
        return answer

    def _match(self, wanted: Filter) -> tuple[Optional[list[int]], list[str]]:
        """(the indexes of the matching rows, None for all; their names, in order)."""
        if not wanted:
            return None, self.names
        with self._lock:
            hit = self._matches.get(wanted)
            if hit is not None:
                self._matches.move_to_end(wanted)
                return hit
        hit = self._scan(wanted)
        with self._lock:
            self._matches[wanted] = hit
            while len(self._matches) > ANSWERS_CACHED:
                self._matches.popitem(last=False)
        return hit

    def _matches_row(self, wanted: Filter, i: int) -> bool:
        labels = self.labels[i]
        if (wanted.kind is not None and self.kinds[i] != wanted.kind) or \
                (wanted.owner is not None and self.owners[i] != wanted.owner):
            return False
        for key, op, value in wanted.selectors:
            if op == "exists":
                if key not in labels:
                    return False
            elif (labels.get(key) == value) != (op == "="):
                return False
        return not wanted.q or wanted.q in self.texts[i]

    def _carry_matches(self, base: "Snapshot", changed: list[int]) -> None:
        """The filters `base` answered, answered for this snapshot by looking again at the
        changed rows only (the others are the same rows in the same places)."""
        with base._lock:
            cached = list(base._matches.items())
        changed_set = set(changed)
        for wanted, (rows, names) in cached:
            now = {i for i in changed if self._matches_row(wanted, i)}
            if now == changed_set.intersection(rows):
                self._matches[wanted] = (rows, names)
                continue
            rows = sorted([i for i in rows if i not in changed_set] + list(now))
            self._matches[wanted] = (rows, [self.names[i] for i in rows])

    def _scan(self, wanted: Filter) -> tuple[list[int], list[str]]:
        rows = range(len(self.names))
        if wanted.kind is not None:
            kind, kinds = wanted.kind, self.kinds
            rows = [i for i in rows if kinds[i] == kind]
        if wanted.owner is not None:
            owner, owners = wanted.owner, self.owners
            rows = [i for i in rows if owners[i] == owner]
        for key, op, value in wanted.selectors:
            labels = self.labels
            if op == "exists":
                rows = [i for i in rows if key in labels[i]]
            elif op == "=":
                rows = [i for i in rows if labels[i].get(key) == value]
            else:
                rows = [i for i in rows if labels[i].get(key) != value]
        if wanted.q:
            q, texts = wanted.q, self.texts
            rows = [i for i in rows if q in texts[i]]
        rows = list(rows)
        return rows, [self.names[i] for i in rows]


def _etag(body: bytes) -> str:
    return '"' + hashlib.blake2b(body, digest_size=12).hexdigest() + '"'


class ModelList:
    """The models as `GET /api/models` lists them, rebuilt only when something changed.

    The runtime's `models_generation()` changes whenever a model, a version, the live pointer
    or a replica's state does (None: it cannot tell, so every call rebuilds); registration
    failures and the score monitor's drift flags (its `generation`) are part of the key too.
    """

    def __init__(self, plane):
        self.plane = plane
        self._lock = threading.Lock()
        self._key: object = object()
        self._snapshot: Optional[Snapshot] = None
        #: the last call's models (the objects), rows, and the names shown with something added
        #: (drift flags, a registration failure)
        self._prev: Optional[tuple] = None

    def current(self) -> Snapshot:
        gen = self.plane.runtime.models_generation()
        failed = tuple((k, v["error"]) for k, v in sorted(self.plane.failed.items()))
        key = (gen, failed, self.plane.monitor.generation) if gen is not None else object()
        with self._lock:
            if key != self._key or self._snapshot is None:
                rows, changed = self._make_rows()
                base = self._snapshot if changed is not None else None
                self._snapshot = Snapshot(rows=rows, base=base, changed=changed)
                self._key = key
            return self._snapshot

    def _make_rows(self) -> tuple[list[Row], Optional[list[int]]]:
        """The rows, and the positions that changed since the last call (None: build it all).
        A runtime that hands back the same ModelInfo objects for the models that did not change
        (the cluster runtime's watch cache) has only the others encoded again."""
        failed = {e["name"]: e for e in self.plane.failed.values()}
        flags = self.plane.monitor.flags()
        special = frozenset(failed) | frozenset(n for n, f in flags.items() if f)
        models = self.plane.runtime.models()
        prev = self._prev
        if prev is not None and not failed and prev[2] == special and len(prev[0]) == len(models):
            before, rows = prev[0], list(prev[1])
            changed = list(itertools.compress(range(len(models)), map(operator.is_not, models, before)))
            if special:
                changed = sorted(set(changed) | {i for i, m in enumerate(models) if m.name in special})
            if all(models[i].name == before[i].name for i in changed):
                for i in changed:
                    rows[i] = self._row(models[i], flags, failed)
                self._prev = (list(models), rows, special)
                return rows, changed
        rows = [self._row(m, flags, failed) for m in models]
        self._prev = (list(models), list(rows), special)
        for entry in failed.values():   # a folder that never registered (or whose model failed)
            if not any(r[0] == entry["name"] for r in rows):
                info = self.plane.failed_info(entry)
                info["drifted"] = flags.get(info["name"], [])
                rows.append(Row.of(info))
        names = [r[0] for r in rows]
        if failed or names != sorted(names):
            rows.sort(key=lambda r: r[0])
            self._prev = None
        return rows, None

    @staticmethod
    def _row(m, flags: dict, failed: dict) -> Row:
        info = m.to_json()
        if m.name in failed:
            info["error"] = failed[m.name]["error"]
        info["drifted"] = flags.get(m.name, [])
        return Row.of(info)


def routes(plane) -> Routes:
    r = Routes("models")
    settings, runtime, guard = plane.settings, plane.runtime, plane.guard
    listing = ModelList(plane)
    list_spec = s.RouteSpec("GET", "/api/models", "List the models, filtered by label, owner or text "
                            "(paged with limit/after; ETag)",
                            [s.Answer(200, list[s.ModelSummary])], query=s.ModelsQuery, tag="models")

    @r(list_spec)
    def list_models():
        args = request.args.to_dict()
        if "label" in request.args:
            args["label"] = request.args.getlist("label")   # repeatable: every selector must match
        q = s.validate(s.ModelsQuery, args, where="query")
        wanted = Filter.of(q)
        snapshot = listing.current()
        body, etag, next_after, total = snapshot.answer(wanted, q.after, q.limit)
        headers = {"ETag": etag, "X-Total-Count": str(total)}
        if next_after is not None:
            headers["Link"] = (f'</api/models?limit={q.limit}&after={quote(next_after)}'
                               f'{wanted.link_params(q)}>; rel="next"')
        if etag in {t.strip() for t in (request.headers.get("If-None-Match") or "").split(",")}:
            return Response(status=304, headers=headers)
        return Response(body, mimetype="application/json", headers=headers)

    deploy_spec = s.RouteSpec("POST", "/api/models", "Deploy a model folder (a gzip tar)",
                              [s.Answer(201, s.Deployed)], body_types=MODEL_ARCHIVE_TYPES, query=s.DeployQuery,
                              body_limit=settings.max_model_upload, errors=(409, 422, 503), tag="models",
                              role="deployer", audit="deploy")
    # 422 also when the new version does not start, become ready and score its sample: then it is
    # recorded as failed (the versions list says why) and what was live stays live

    @r(deploy_spec)
    def deploy_model():
        make_live = query(deploy_spec).live
        uploads = Path(settings.state_dir) / "uploads"
        uploads.mkdir(parents=True, exist_ok=True)
        dest = Path(tempfile.mkdtemp(prefix="model-", dir=uploads))
        try:
            with tempfile.TemporaryFile(dir=uploads) as spool:
                if guard.spool_body(settings.max_model_upload, spool) == 0:
                    raise BadRequest("the body is empty: send a gzip tar of the model folder")
                spool.seek(0)
                folder = extract_model(spool, dest, max_size=settings.max_model_size,
                                       max_files=settings.max_model_files)
            rel = folder.relative_to(dest) / MANIFEST_FILE
            try:
                text = read_manifest_text(folder / MANIFEST_FILE)
                manifest = parse_manifest(text, file=rel, folder=folder)
            except ManifestError as e:
                problems = [{"file": str(rel), "line": p.line, "field": p.field, "message": p.message}
                            for p in e.problems]
                message = "\n".join(f"{rel}:{p.line}: {p.field + ': ' if p.field else ''}{p.message}" if p.line
                                    else f"{rel}: {p.field + ': ' if p.field else ''}{p.message}" for p in e.problems)
                raise Invalid(message, details={"problems": problems}) from None
            g.audit = {"name": manifest.name, "version": manifest.version}
            identity = g.identity
            if identity.owner is not None:
                guard.require_owner(identity, manifest.owner, manifest.name)
                plane.policies.clear()
                existing = plane.policy(manifest.name).owner
                if existing is not None:   # the model exists: it must be this owner's already
                    guard.require_owner(identity, existing, manifest.name)
            try:
                version = runtime.deploy(manifest, make_live=make_live)  # the runtime keeps its own copy
            except DeployCheckFailed as e:
                if e.details.get("new_model"):   # nothing deployed: the model list says why
                    tail = e.details.get("log_tail")
                    plane.failed[manifest.name] = {"name": manifest.name, "path": "", "error": e.message + (
                        f"\nits log ends with:\n{tail}" if tail else "")}
                raise
        finally:
            shutil.rmtree(dest, ignore_errors=True)
        plane.failed.pop(manifest.name, None)
        plane.policies.clear()
        return jsonify({"name": manifest.name, **version.to_json()}), 201

    @r(s.RouteSpec("GET", "/api/models/<name>", "One model: manifest, versions, metrics",
                   [s.Answer(200, s.ModelDetail)], errors=(404,), tag="models"))
    def get_model(name: str):
        try:
            detail = runtime.model(name)
            return jsonify({**detail.to_json(), "monitoring": plane.monitor.report(name, batch=detail.kind == "batch")})
        except NotFound:
            entry = plane.failed.get(name)
            if entry is None:
                raise
            detail = plane.failed_info(entry)
            return jsonify({**detail, "manifest": {}, "versions": [], "metrics": {}})

    @r(s.RouteSpec("DELETE", "/api/models/<name>", "Remove a model and all its versions",
                   [s.Answer(200, s.Removed)], errors=(404, 409), tag="models", role="admin", audit="remove"))
    def remove_model(name: str):
        if name in plane.failed:
            plane.failed.pop(name)
            try:
                runtime.remove(name)
            except NotFound:
                pass
        else:
            runtime.remove(name)
        plane.policies.clear()
        plane.shadow.forget(name)
        plane.monitor.forget(name)
        return {"name": name, "removed": True}

    rollback_spec = s.RouteSpec("POST", "/api/models/<name>/rollback",
                                "Withdraw a rollout at once, or make an earlier version live",
                                [s.Answer(200, s.Deployed)], body=s.RollbackRequest, errors=(404, 409, 422, 503),
                                tag="models", role="deployer", audit="rollback", owned=True)

    @r(rollback_spec)
    def rollback(name: str):
        version = body_json(rollback_spec).version
        answer = {"name": name, **runtime.rollback(name, version=version).to_json()}
        plane.policies.clear()
        return answer

    return r
