"""Comparisons: two versions of a model scoring the same dataset (control/compare.py does the
work in the background), a dataset uploaded for them without starting a job, and a version's
score-monitoring reference scored from a dataset the user names."""
from __future__ import annotations

import tempfile
import uuid
from urllib.parse import quote

from flask import jsonify

from control import api_schema as s
from control.api import Routes, body_json, json_response, query
from control.compare import Comparisons
from control.errors import BadRequest, Forbidden, Unavailable

UPLOAD_TYPES = ("text/csv", "application/octet-stream")


def routes(plane) -> Routes:
    r = Routes("compare")
    settings, guard = plane.settings, plane.guard
    manager = plane.comparisons
    allowed_buckets = {settings.bucket_name} | {b.strip() for b in settings.dataset_buckets.split(",") if b.strip()}

    def allowed(dataset: str) -> None:
        bucket = dataset[len("gs://"):].split("/", 1)[0]
        if bucket not in allowed_buckets:
            raise Forbidden(f"dataset bucket {bucket!r} is not one the plane may read from "
                            f"({', '.join(sorted(allowed_buckets))}; MODELPLANE_DATASET_BUCKETS adds more)")

    def accepted(record: dict):
        response = jsonify(record)
        response.status_code = 202
        response.headers["Location"] = f"/api/comparisons/{quote(record['id'])}"
        return response

    compare_spec = s.RouteSpec("POST", "/api/models/<name>/comparisons",
                               "Score one dataset with two versions and compare them row by row (runs in the "
                               "background: poll the answer's Location)",
                               [s.Answer(202, s.ComparisonAnswer)], body=s.ComparisonRequest,
                               errors=(404, 422, 503), tag="comparisons", role="deployer", audit="compare",
                               owned=True)

    @r(compare_spec)
    def start_comparison(name: str):
        req = body_json(compare_spec)
        allowed(req.dataset)
        return accepted(manager.submit(name, a=req.a, b=req.b, dataset=req.dataset, threshold=req.threshold,
                                       top=req.top))

    list_spec = s.RouteSpec("GET", "/api/models/<name>/comparisons", "A model's comparisons, newest first",
                            [s.Answer(200, list[s.ComparisonAnswer])], query=s.ComparisonsQuery, errors=(404,),
                            tag="comparisons")

    @r(list_spec)
    def list_comparisons(name: str):
        q = query(list_spec)
        plane.runtime.model(name)   # NotFound for an unknown model
        return json_response(manager.list(model=name, limit=q.limit))

    @r(s.RouteSpec("GET", "/api/comparisons/<comparison_id>",
                   "One comparison (or reference job): status, progress and, once done, the report",
                   [s.Answer(200, s.ComparisonAnswer)], errors=(404,),
                   path_patterns={"comparison_id": s.COMPARISON_ID_PATTERN}, tag="comparisons"))
    def get_comparison(comparison_id: str):
        return json_response(manager.get(comparison_id))

    cap = min(settings.max_dataset_upload, 2 * 2**30)
    upload_spec = s.RouteSpec("POST", "/api/models/<name>/comparisons/datasets",
                              "Store a CSV for comparisons under comparisons/{name}/ (no job starts)",
                              [s.Answer(201, s.ComparisonDataset)], body_types=UPLOAD_TYPES, body_limit=cap,
                              errors=(404, 503), tag="comparisons", role="deployer",
                              audit="dataset.upload", owned=True)

    @r(upload_spec)
    def upload_dataset(name: str):
        plane.runtime.model(name)   # NotFound for an unknown model
        bucket = settings.bucket_name
        object_name = f"comparisons/{name}/{uuid.uuid4().hex}.csv"
        with tempfile.TemporaryFile() as spool:
            size = guard.spool_body(cap, spool)
            if size == 0:
                raise BadRequest("the dataset is empty: send the CSV as the request body")
            spool.seek(0)
            try:
                plane.storage.bucket(bucket).blob(object_name).upload_from_file(spool, size=size,
                                                                                 content_type="text/csv")
            except Exception as e:  # noqa: BLE001 — the storage client's errors are many
                raise Unavailable(f"cannot store the dataset in gs://{bucket}: {type(e).__name__}: "
                                  f"{str(e)[:200]}") from None
        uri = f"gs://{bucket}/{object_name}"
        return jsonify({"uri": uri, "bucket": bucket, "object": object_name, "size": size}), 201

    reference_spec = s.RouteSpec("PUT", "/api/models/<name>/versions/<version>/reference",
                                 "Score a dataset with a version and make the scores its monitoring reference "
                                 "(runs in the background: poll the answer's Location)",
                                 [s.Answer(202, s.ComparisonAnswer)], body=s.ReferenceRequest,
                                 path_patterns={"version": s.SEMVER_PATTERN}, errors=(404, 422, 503),
                                 tag="comparisons", role="deployer", audit="reference", owned=True)

    @r(reference_spec)
    def reference_from_dataset(name: str, version: str):
        req = body_json(reference_spec)
        allowed(req.dataset)
        return accepted(manager.submit_reference(name, version, dataset=req.dataset))

    return r

