"""Batch jobs: submit on a dataset in a bucket, upload a dataset (which starts its job at
once), list, one job, cancel one, its results."""
from __future__ import annotations

import logging
import tempfile

from flask import Response, g, jsonify, request
from werkzeug.wsgi import wrap_file

from control import api_schema as s
from control import events as ce
from control.api import Routes, body_json, json_response, query
from control.errors import BadRequest, Conflict, Forbidden, NotFound, PlaneError

log = logging.getLogger(__name__)

DATASET_TYPES = ("text/csv", "application/octet-stream")


def _results_location(uri: str) -> str:
    return uri if uri.lower().endswith(".csv") else uri.rstrip("/") + "/scores.csv"


def routes(plane) -> Routes:
    r = Routes("jobs")
    settings, runtime, guard = plane.settings, plane.runtime, plane.guard
    job_spec = s.RouteSpec("POST", "/api/models/<name>/jobs", "Run a model on a dataset in a bucket (a realtime one streams it through its replicas)",
                           [s.Answer(202, s.JobAnswer)], body=s.JobRequest, errors=(404, 409, 422, 503),
                           tag="jobs", role="runner", audit="job.run", owned=True)
    allowed_buckets = {settings.bucket_name} | {b.strip() for b in settings.dataset_buckets.split(",") if b.strip()}

    @r(job_spec)
    def submit_job(name: str):
        dataset = body_json(job_spec).dataset
        bucket = dataset[len("gs://"):].split("/", 1)[0]
        if bucket not in allowed_buckets:
            raise Forbidden(f"dataset bucket {bucket!r} is not one jobs may read from "
                            f"({', '.join(sorted(allowed_buckets))}; MODELPLANE_DATASET_BUCKETS adds more)")
        job, _ = runtime.submit_job(name, dataset=dataset, trigger="api")
        g.audit = {"job": job.id, "dataset": dataset}
        return jsonify(job.to_json()), 202

    dataset_spec = s.RouteSpec("POST", "/api/models/<name>/datasets",
                               "Upload a CSV to incoming/{name}/; its bucket event starts a job at once",
                               [s.Answer(201, s.DatasetUploaded)], query=s.DatasetQuery, body_types=DATASET_TYPES,
                               body_limit=settings.max_dataset_upload, errors=(404, 409, 503), tag="jobs",
                               role="runner", audit="job.run", owned=True)

    @r(dataset_spec)
    def upload_dataset(name: str):
        filename = query(dataset_spec).filename
        runtime.model(name)   # a batch model runs on it; a realtime one streams it through its replicas
        object_name = f"incoming/{name}/{filename}"
        bucket = settings.bucket_name
        with tempfile.TemporaryFile() as spool:
            size = guard.spool_body(settings.max_dataset_upload, spool)
            if size == 0:
                raise BadRequest("the dataset is empty: send the CSV as the request body")
            spool.seek(0)
            blob = plane.storage.bucket(bucket).blob(object_name)
            blob.upload_from_file(spool, size=size, content_type="text/csv")
        generation = str(blob.generation) if blob.generation is not None else None
        uri = f"gs://{bucket}/{object_name}"
        answer = {"uri": uri, "bucket": bucket, "object": object_name, "generation": generation,
                  "size": size, "key": ce.event_key(bucket, object_name, generation or "")}
        # The object's finalized event, handled here and now: the job starts without waiting for
        # the watcher's next poll or a broker. The watcher (or the bucket's notification) delivers
        # the same event later; its key makes that a duplicate, never a second job.
        event = ce.finalized_event({"bucket": bucket, "name": object_name, "generation": generation,
                                    "size": size, "contentType": "text/csv",
                                    "timeCreated": blob.time_created.isoformat() if blob.time_created else None})
        try:
            _, result = plane.sink.handle(event)
            if result.get("job"):
                answer["job"] = result["job"]
        except PlaneError as e:  # stored all the same: the watcher's delivery tries again
            log.warning("dataset %s stored, but its job did not start yet: %s", uri, e.message)
            job = runtime.job_for_upload(name, bucket=bucket, obj=object_name, generation=generation or "")
            if job:
                answer["job"] = job  # the job the bucket event will start (it may not exist yet)
        return jsonify(answer), 201

    jobs_spec = s.RouteSpec("GET", "/api/jobs", "List jobs, newest first", [s.Answer(200, list[s.JobAnswer])],
                            query=s.JobsQuery, tag="jobs")

    @r(jobs_spec)
    def list_jobs():
        q = query(jobs_spec)
        jobs = runtime.jobs(model=q.model, limit=q.limit if not (q.dataset or q.status) else max(q.limit, 10_000))
        out = [j for j in jobs if (not q.dataset or j.dataset == q.dataset) and (not q.status or j.status == q.status)]
        return json_response([j.to_json() for j in out[:q.limit]])

    job_path = {"job_id": s.JOB_ID_PATTERN}

    @r(s.RouteSpec("GET", "/api/jobs/<job_id>", "One job", [s.Answer(200, s.JobAnswer)], errors=(404,),
                   path_patterns=job_path, tag="jobs"))
    def get_job(job_id: str):
        return jsonify(runtime.job(job_id).to_json())

    @r(s.RouteSpec("DELETE", "/api/jobs/<job_id>",
                   "Cancel a queued or running job: it never starts, or its processes are stopped; it ends "
                   "failed with the error 'cancelled by <token name>'. A job already cancelled is answered "
                   "as it is (200); one that has ended otherwise is 409", [s.Answer(200, s.JobAnswer)],
                   errors=(404, 409), path_patterns=job_path, tag="jobs", role="runner", audit="job.cancel",
                   owned=True))
    def cancel_job(job_id: str):
        job = runtime.job(job_id)
        g.audit = {"model": job.model, "job": job_id}
        if g.identity.owner is not None:  # the route has no model name in its path: checked here
            guard.require_owner(g.identity, plane.policy(job.model).owner, job.model)
        return jsonify(runtime.cancel_job(job_id, by=g.identity.name).to_json())

    @r(s.RouteSpec("GET", "/api/jobs/<job_id>/results", "A succeeded job's scores (CSV)",
                   [s.Answer(200, None, "text/csv", "the scores, one row per input row")], errors=(404, 409),
                   path_patterns=job_path, tag="jobs"))
    def job_results(job_id: str):
        job = runtime.job(job_id)
        if job.status != "succeeded" or not job.results_uri:
            raise Conflict(f"job {job_id} is {job.status}; results exist once it has succeeded")
        location = _results_location(job.results_uri)
        headers = {"Content-Disposition": f'attachment; filename="{job.model}-{job_id}.csv"'}
        if not location.startswith("gs://"):
            raise NotFound(f"the results of job {job_id} are not in a bucket; the API serves results from buckets only")
        from google.api_core import exceptions as gexc

        from control.gcs import split_gs_uri

        bucket, name = split_gs_uri(location)
        spool = tempfile.TemporaryFile()
        try:
            plane.storage.bucket(bucket).blob(name).download_to_file(spool)
        except gexc.NotFound:
            spool.close()
            raise NotFound(f"the results of job {job_id} are gone from {location}") from None
        except BaseException:
            spool.close()
            raise
        spool.seek(0)
        return Response(wrap_file(request.environ, spool, buffer_size=1 << 20), mimetype="text/csv", headers=headers,
                        direct_passthrough=True)

    return r
