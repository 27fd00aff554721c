"""CloudEvents in (the bucket watcher, a broker) and what recent ones did."""
from __future__ import annotations

from flask import g, jsonify, request

from control import api_schema as s
from control import events as ce
from control.api import MAX_EVENT, Routes, json_response, query
from control.errors import BadRequest, Forbidden

#: A structured CloudEvent's types; binary mode (`ce-specversion` header) may carry any data type.
EVENT_TYPES = ("application/cloudevents+json", "application/cloudevents-batch+json", "application/json")


def routes(plane) -> Routes:
    r = Routes("events")

    @r(s.RouteSpec("POST", "/events", "A CloudEvent (GCS object finalized) from the bucket watcher or a broker",
                   [s.Answer(200, s.EventEntry, description="ignored, or a duplicate of one already run"),
                    s.Answer(202, s.EventEntry, description="a job was started")],
                   body_types=EVENT_TYPES, body_limit=MAX_EVENT, errors=(404, 409, 503), tag="events",
                   role="runner", audit="job.run"))
    def receive_event():
        if g.identity.owner is not None:
            raise Forbidden(f"{g.identity.name} is limited to the models of {g.identity.owner!r}, and a bucket event "
                            "may name any model: run jobs with POST /api/models/{name}/jobs instead")
        body = plane.guard.read_body(MAX_EVENT)
        try:
            event = ce.parse(request.headers, body)
            status, result = plane.sink.handle(event)
            if status == 202:   # a job started; an ignored or duplicate event changes nothing
                g.audit = {"name": result.get("model"), "job": result.get("job"), "target": result.get("object")}
            else:
                g.skip_audit = True
        except BadRequest as e:
            plane.sink.reject(e.message, request.headers)
            raise
        return jsonify(result), status

    events_spec = s.RouteSpec("GET", "/api/events", "What recent events did, newest first",
                              [s.Answer(200, list[s.EventEntry])], query=s.EventsQuery, tag="events")

    @r(events_spec)
    def list_events():
        q = query(events_spec)
        return json_response(plane.events.entries(limit=q.limit, action=q.action, key=q.key, model=q.model))

    return r
