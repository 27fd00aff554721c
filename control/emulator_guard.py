"""The embedded bucket, answering only the plane: gcp-storage-emulator's own request handler,
run in this process behind a check of every request.

A request reaches the emulator only if it carries `Authorization: Bearer <storage key>` (the
plane's per-plane secret, env MODELPLANE_STORAGE_KEY, which this process removes from its
environment), names a loopback-style Host (an IP literal or `localhost`, with any port: a DNS
name is how a rebinding page would reach it) and comes from no browser page (no `Origin`,
no `Sec-Fetch-Site: cross-site|same-site`). Anything else gets a 403 that says why, before a
byte of its body is read or stored (403, not 401, for a missing key too: google-auth answers a
401 by trying to refresh anonymous credentials, and its error would hide ours).

Wrapping the handler class rather than proxying keeps one process and one hop: the emulator's
http.server handler is subclassed, so its routes, storage and URLs are exactly as before.

Preconditions, as GCS honours them: a write or delete of an object with `ifGenerationMatch`,
`ifGenerationNotMatch`, `ifMetagenerationMatch` or `ifMetagenerationNotMatch` in its query
(what the google-cloud-storage client sends for `if_generation_match=` and friends) answers
412 conditionNotMet when the object's current generation does not satisfy it;
`ifGenerationMatch=0` means "only if there is no such object". The emulator itself ignores
them, and the plane's shared state (control/state.py) rests on them for compare-and-swap.
Reads are not checked. The server handles one request at a time, so check and write are one step.

Listing pages as GCS does: at most `maxResults` (1,000 by default and at most) objects a page,
by name, with `nextPageToken`; and `fields=items(a,b,…),nextPageToken` keeps only those fields
of each object (a partial response). The emulator answers every object, whole, in one page: a
client listing a large bucket here would otherwise measure memory real GCS never makes it use.

`python -m control.emulator_guard --host H --port P [--default-bucket B]`, data in $STORAGE_BASE.
"""
from __future__ import annotations

import argparse
import bisect
import hmac
import ipaddress
import json
import logging
import os
import signal
import sys
import threading
from functools import partial
from http import server as http_server
from urllib.parse import parse_qs, urlparse

KEY_ENV = "MODELPLANE_STORAGE_KEY"
CROSS = ("cross-site", "same-site")
PRECONDITIONS = ("ifGenerationMatch", "ifGenerationNotMatch", "ifMetagenerationMatch", "ifMetagenerationNotMatch")
UNMET = "At least one of the pre-conditions you specified did not hold."


class PreconditionFailed(Exception):
    """A write's or delete's precondition does not hold for the object as it is."""


def preconditions(path: str) -> dict[str, int]:
    """The object preconditions in a request's query: {name: value}; ValueError for a non-integer one."""
    query = parse_qs(urlparse(path).query)
    out = {}
    for name in PRECONDITIONS:
        if name in query:
            out[name] = int(query[name][-1])
    return out


def unmet(current: dict | None, conditions: dict[str, int]) -> bool:
    """True when `current` (the live object's resource, None if there is none) fails `conditions`."""
    generation = int(current["generation"]) if current else 0
    metageneration = int(current.get("metageneration") or 1) if current else None
    for name, value in conditions.items():
        if name == "ifGenerationMatch" and generation != value:
            return True
        if name == "ifGenerationNotMatch" and current is not None and generation == value:
            return True
        if name == "ifMetagenerationMatch" and metageneration != value:
            return True
        if name == "ifMetagenerationNotMatch" and metageneration is not None and metageneration == value:
            return True
    return False


def with_preconditions(storage_cls):
    """A subclass of the emulator's storage whose writes and deletes check the current request's
    preconditions (set by the handler in `conditions`) against the object as it is."""

    class Checked(storage_cls):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.conditions = threading.local()
            # a listing's later pages come from the sorted list its first page made, kept until
            # an object is written, patched or deleted
            self.changes = 0
            self.listings: dict = {}

        def _check(self, bucket_name, file_name):
            wanted = getattr(self.conditions, "value", None)
            if wanted and unmet(self.objects.get(bucket_name, {}).get(file_name), wanted):
                raise PreconditionFailed(f"{bucket_name}/{file_name}: {wanted}")

        def create_file(self, bucket_name, file_name, content, file_obj, file_id=None):
            self._check(bucket_name, file_name)
            self.changes += 1
            try:
                return super().create_file(bucket_name, file_name, content, file_obj, file_id)
            finally:
                self.changes += 1

        def delete_file(self, bucket_name, file_name):
            self._check(bucket_name, file_name)
            self.changes += 1
            try:
                return super().delete_file(bucket_name, file_name)
            finally:
                self.changes += 1

        def patch_object(self, bucket_name, file_name, file_obj):
            self.changes += 1
            return super().patch_object(bucket_name, file_name, file_obj)

    return Checked


PAGE_MAX = 1000


def _item_fields(fields: str | None) -> set[str] | None:
    """`items(name,generation),nextPageToken` -> {"name", "generation"}; None: every field."""
    if not fields or "items(" not in fields:
        return None
    inner = fields.split("items(", 1)[1].split(")", 1)[0]
    return {f.strip() for f in inner.split(",") if f.strip()}


def paged_ls(request, response, storage, *args, **kwargs):
    """objects.list with GCS's paging and partial responses (the emulator's own `ls` has neither)."""
    import base64

    from gcp_storage_emulator.exceptions import BadRequest, NotFound

    def one(name):
        values = request.query.get(name)
        return values[0] if values else None

    try:
        size = max(1, min(int(one("maxResults") or PAGE_MAX), PAGE_MAX))
        after = base64.urlsafe_b64decode((one("pageToken") or "").encode()).decode() if one("pageToken") else None
    except ValueError:
        response.status = 400
        return
    query = (request.params["bucket_name"], one("prefix"), one("delimiter"), one("matchGlob"),
             (one("softDeleted") or "").lower() in ("1", "true", "yes"))
    listings = getattr(storage, "listings", None)
    hit = listings.get(query) if listings is not None and after is not None else None
    if hit is not None and hit[0] == storage.changes:
        _, files, names, prefixes = hit
    else:
        try:
            files, prefixes = storage.get_file_list(*query[:4], soft_deleted=query[4])
        except NotFound:
            response.status = 404
            return
        except BadRequest:
            response.status = 400
            return
        files = sorted(files, key=lambda f: f["name"])
        names = [f["name"] for f in files]
        if listings is not None:
            listings.clear()   # one listing at a time is what a paging client needs
            listings[query] = (storage.changes, files, names, prefixes)
    start = bisect.bisect_right(names, after) if after is not None else 0
    page = files[start:start + size]
    keep = _item_fields(one("fields"))
    if keep is not None:
        page = [{k: v for k, v in f.items() if k in keep} for f in page]
    out = {"kind": "storage#objects", "items": page}
    if after is None:
        out["prefixes"] = prefixes
    if start + size < len(files):
        out["nextPageToken"] = base64.urlsafe_b64encode(files[start + size - 1]["name"].encode()).decode()
    response.json(out)


def with_paging() -> None:
    """The emulator's objects.list route answered by `paged_ls`."""
    from gcp_storage_emulator import server
    from gcp_storage_emulator.handlers import objects

    for _, handlers in server.HANDLERS:
        for method, handler in list(handlers.items()):
            if handler is objects.ls:
                handlers[method] = paged_ls


def host_allowed(host: str | None) -> bool:
    """`localhost` or an IP literal, with an optional port."""
    if not host:
        return False
    host = host.strip().lower()
    if host.startswith("["):
        name, sep, rest = host[1:].partition("]")
        if not sep or (rest and not (rest.startswith(":") and rest[1:].isdigit())):
            return False
    else:
        name, _, port = host.partition(":")
        if port and not port.isdigit():
            return False
    if name == "localhost":
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def refusal(headers, key: str) -> tuple[int, str] | None:
    """(status, why) for a request the bucket must not answer; None to let it through."""
    if not host_allowed(headers.get("Host")):
        return 403, (f"Host {headers.get('Host')!r} refused: the embedded bucket answers only "
                     "requests addressed to localhost or an IP address")
    if headers.get("Origin") is not None:
        return 403, "requests from web pages (an Origin header) are refused by the embedded bucket"
    if (headers.get("Sec-Fetch-Site") or "").strip().lower() in CROSS:
        return 403, "cross-site requests (Sec-Fetch-Site) are refused by the embedded bucket"
    auth = headers.get("Authorization") or ""
    scheme, _, token = auth.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return 403, ("the embedded bucket needs Authorization: Bearer <storage key> "
                     "(the key is in the state dir's storage-key file, or env MODELPLANE_STORAGE_KEY)")
    if not hmac.compare_digest(token.strip().encode(), key.encode()):
        return 403, "wrong storage key for the embedded bucket"
    return None


def guarded(handler_cls, key: str):
    """A subclass of the emulator's handler that answers a refused request itself."""

    class Guarded(handler_cls):
        def _refused(self) -> bool:
            verdict = refusal(self.headers, key)
            if verdict is None:
                return False
            status, why = verdict
            self.close_connection = True   # its body, if any, is never read
            self._answer(status, {"error": {"code": status, "message": why}}, close=True)
            return True

        def _answer(self, status: int, doc: dict, *, close: bool = False) -> None:
            body = json.dumps(doc).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            if close:
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body)

        def _conditioned(self, inner) -> None:
            """Run the emulator's handler with this request's preconditions in force."""
            try:
                wanted = preconditions(self.path)
            except ValueError:
                self.close_connection = True
                self._answer(400, {"error": {"code": 400, "message": "a precondition is not an integer"}},
                             close=True)
                return
            holder = getattr(self.storage, "conditions", None)
            if holder is None or not wanted:
                inner(self)
                return
            holder.value = wanted
            try:
                inner(self)
            except PreconditionFailed:
                self._answer(412, {"error": {"code": 412, "message": UNMET, "errors": [
                    {"domain": "global", "reason": "conditionNotMet", "message": UNMET}]}})
            finally:
                holder.value = None

    for method in ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"):
        inner = getattr(handler_cls, f"do_{method}", None)

        def do(self, _inner=inner):
            if self._refused():
                return
            if _inner is None:
                self.send_error(501)
                return
            self._conditioned(_inner)

        setattr(Guarded, f"do_{method}", do)
    return Guarded


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m control.emulator_guard", description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--default-bucket")
    args = p.parse_args(argv)
    key = os.environ.pop(KEY_ENV, "").strip()
    if not key:
        print(f"emulator_guard: {KEY_ENV} is not set; the embedded bucket never runs without its key",
              file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.CRITICAL)
    from gcp_storage_emulator.handlers import buckets
    from gcp_storage_emulator.server import RequestHandler
    from gcp_storage_emulator.storage import Storage

    with_paging()
    storage = with_preconditions(Storage)(use_memory_fs=False)
    if args.default_bucket:
        buckets.create_bucket(args.default_bucket, storage)
    httpd = http_server.HTTPServer((args.host, args.port), partial(guarded(RequestHandler, key), storage))

    def stop(signum, frame):
        threading.Thread(target=httpd.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        httpd.serve_forever()
    finally:
        httpd.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
