"""The control plane's error hierarchy; the API maps each class to one HTTP status in one place."""
from __future__ import annotations


class PlaneError(Exception):
    """Base: a message for the user and the HTTP status it maps to."""

    status = 500

    def __init__(self, message: str, *, status: int | None = None, details: dict | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status
        self.details = details or {}
        self.headers = headers or {}  # sent with the answer (WWW-Authenticate, Retry-After)

    def to_json(self) -> dict:
        return {"error": self.message, **self.details}


class BadRequest(PlaneError):
    status = 400


class Unauthorized(PlaneError):
    status = 401


class Forbidden(PlaneError):
    status = 403


class NotFound(PlaneError):
    status = 404


class Conflict(PlaneError):
    status = 409


class Invalid(PlaneError):
    """Input that will never work as sent (a bad manifest, a bad field)."""

    status = 422


class Unavailable(PlaneError):
    """Try again later: a model that is starting, a cluster that is unreachable."""

    status = 503


class UpstreamError(PlaneError):
    """A model or the cluster answered something unusable."""

    status = 502


class TooLarge(PlaneError):
    """A body, archive or file over its limit."""

    status = 413


class UnsupportedType(PlaneError):
    """A body whose Content-Type the route does not take."""

    status = 415
