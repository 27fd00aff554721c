"""Models: list (a snapshot, paged, with an ETag), deploy, one model, remove, roll back."""
from __future__ import annotations

import bisect
import hashlib
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Optional
from urllib.parse import quote

import orjson
from flask import Response, jsonify, request

from adapters.manifest import MANIFEST_FILE, ManifestError, parse_manifest, read_manifest_text
from control import api_schema as s
from control.api import Routes, body_json, query
from control.errors import BadRequest, Invalid, NotFound
from control.uploads import extract_model

MODEL_ARCHIVE_TYPES = ("application/gzip", "application/x-gzip", "application/x-tar", "application/octet-stream")


class Snapshot:
    """The encoded list, each model's byte span in it (a page is a slice, never a re-encoding)
    and an ETag of the whole. Never changed once built."""

    def __init__(self, infos: list[dict]):
        parts, spans, at = [], [], 1
        for info in infos:
            encoded = orjson.dumps(info)
            spans.append((at, at + len(encoded)))
            parts.append(encoded)
            at += len(encoded) + 1
        self.body = b"[" + b",".join(parts) + b"]"
        self.spans = spans
        self.names = [m["name"] for m in infos]
        self.etag = _etag(self.body)

    def page(self, after: Optional[str], limit: Optional[int]) -> tuple[bytes, str, Optional[str]]:
        """(the JSON list of the page, its ETag, the name to page after for the next one or None)."""
        start = bisect.bisect_right(self.names, after) if after else 0
        end = len(self.names) if limit is None else min(len(self.names), start + limit)
        if start == 0 and end == len(self.names):
            return self.body, self.etag, None
        body = b"[" + self.body[self.spans[start][0]:self.spans[end - 1][1]] + b"]" if start < end else b"[]"
        return body, _etag(body), self.names[end - 1] if start < end < len(self.names) else None


def _etag(body: bytes) -> str:
    return '"' + hashlib.blake2b(body, digest_size=12).hexdigest() + '"'


class ModelList:
    """The models as `GET /api/models` lists them, rebuilt only when something changed.

    The runtime's `models_generation()` changes whenever a model, a version, the live pointer
    or a replica's state does (None: it cannot tell, so every call rebuilds); registration
    failures are part of the key too.
    """

    def __init__(self, plane):
        self.plane = plane
        self._lock = threading.Lock()
        self._key: object = object()
        self._snapshot: Optional[Snapshot] = None

    def current(self) -> Snapshot:
        gen = self.plane.runtime.models_generation()
        failed = tuple((k, v["error"]) for k, v in sorted(self.plane.failed.items()))
        key = (gen, failed) if gen is not None else object()
        with self._lock:
            if key != self._key or self._snapshot is None:
                self._snapshot = Snapshot(self._infos())
                self._key = key
            return self._snapshot

    def _infos(self) -> list[dict]:
        infos = [m.to_json() for m in self.plane.runtime.models()]
        known = {m["name"]: m for m in infos}
        for entry in self.plane.failed.values():
            if entry["name"] in known:
                known[entry["name"]]["error"] = entry["error"]
            else:
                infos.append(self.plane.failed_info(entry))
        infos.sort(key=lambda m: m["name"])
        return infos


def routes(plane) -> Routes:
    r = Routes("models")
    settings, runtime, guard = plane.settings, plane.runtime, plane.guard
    listing = ModelList(plane)
    list_spec = s.RouteSpec("GET", "/api/models", "List the models (paged with limit/after; ETag)",
                            [s.Answer(200, list[s.ModelSummary])], query=s.ModelsQuery, tag="models")

    @r(list_spec)
    def list_models():
        q = query(list_spec)
        snapshot = listing.current()
        body, etag, next_after = snapshot.page(q.after, q.limit)
        headers = {"ETag": etag, "X-Total-Count": str(len(snapshot.names))}
        if next_after is not None:
            headers["Link"] = f'</api/models?limit={q.limit}&after={quote(next_after)}>; rel="next"'
        if etag in {t.strip() for t in (request.headers.get("If-None-Match") or "").split(",")}:
            return Response(status=304, headers=headers)
        return Response(body, mimetype="application/json", headers=headers)

    deploy_spec = s.RouteSpec("POST", "/api/models", "Deploy a model folder (a gzip tar)",
                              [s.Answer(201, s.Deployed)], body_types=MODEL_ARCHIVE_TYPES, query=s.DeployQuery,
                              body_limit=settings.max_model_upload, errors=(409, 422, 503), tag="models")

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
            version = runtime.deploy(manifest, make_live=make_live)  # the runtime keeps its own copy
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
                   [s.Answer(200, s.Removed)], errors=(404, 409), tag="models"))
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
                                tag="models")

    @r(rollback_spec)
    def rollback(name: str):
        version = body_json(rollback_spec).version
        answer = {"name": name, **runtime.rollback(name, version=version).to_json()}
        plane.policies.clear()
        return answer

    return r
