"""HTTP for the services: one entrypoint class that maps exceptions to responses in one place.

Handlers raise ``ApiError`` subclasses; the entrypoint turns them into JSON (or, for Open311
routes, the error format of that specification). Anything unexpected is a 500 with no internals.
"""

import json
import logging

from nameko.web.handlers import HttpRequestHandler
from werkzeug.exceptions import HTTPException
from werkzeug.wrappers import Response

log = logging.getLogger(__name__)


class ApiError(Exception):
    status = 400
    code = "bad_request"

    def __init__(self, message: str, details: list | None = None, status: int | None = None):
        super().__init__(message)
        self.message = message
        self.details = details or []
        if status is not None:
            self.status = status

    def __str__(self):
        # Crosses RPC as the error's value, so the CLI can show every field's problem.
        if not self.details:
            return self.message
        return (
            self.message
            + " — "
            + "; ".join(f"{d['field']}: {d['problem']}" if d.get("field") else d["problem"] for d in self.details)
        )


class Unauthorized(ApiError):
    status = 401
    code = "unauthorized"


class Forbidden(ApiError):
    status = 403
    code = "forbidden"


class NotFound(ApiError):
    status = 404
    code = "not_found"


class Conflict(ApiError):
    """A step that is not allowed in the current state (a reply to a returned referral, ...)."""

    status = 409
    code = "illegal_step"


class ValidationFailed(ApiError):
    """Bad input: ``details`` lists ``{"field", "problem"}``, one per problem."""

    status = 422
    code = "validation_failed"


def json_body(request) -> dict:
    """The request's JSON object, or a 400 naming the problem."""
    try:
        data = json.loads(request.get_data(as_text=True) or "{}")
    except ValueError as exc:
        raise ValidationFailed(
            f"body is not valid JSON: {exc}", [{"field": None, "problem": "not JSON"}], status=400
        ) from None
    if not isinstance(data, dict):
        raise ValidationFailed(
            "the body must be a JSON object", [{"field": None, "problem": "not an object"}], status=400
        )
    return data


def json_response(status: int, body, headers: dict | None = None) -> Response:
    return Response(
        json.dumps(body, ensure_ascii=False),
        status=status,
        headers=headers,
        mimetype="application/json",
    )


def download_response(body: bytes, content_type: str, filename: str) -> Response:
    """A file to save (an export): ``filename`` must be plain ASCII."""
    return Response(
        body,
        status=200,
        headers={"Content-Disposition": f'attachment; filename="{filename}"', "Cache-Control": "no-store"},
        content_type=content_type,
    )


def json_error(request, exc: Exception) -> Response:
    if isinstance(exc, ApiError):
        body = {"error": {"code": exc.code, "message": exc.message}}
        if exc.details:
            body["error"]["details"] = exc.details
        return json_response(exc.status, body)
    if isinstance(exc, HTTPException):
        return json_response(exc.code or 500, {"error": {"code": "http_error", "message": exc.description}})
    log.error("unexpected error on %s %s: %s", request.method, request.path, type(exc).__name__)
    return json_response(500, {"error": {"code": "internal_error", "message": "internal error"}})


class HttpEntrypoint(HttpRequestHandler):
    """``@http`` whose errors are rendered by ``error_renderer(request, exc)``."""

    def __init__(self, method, url, error_renderer=json_error, **kwargs):
        self.error_renderer = error_renderer
        # An ApiError is the API's answer to its caller (401, 404, 422 …), not a server fault:
        # nameko logs an expected exception as one (logs.ExpectedErrorsBriefly makes that brief).
        kwargs.setdefault("expected_exceptions", ApiError)
        super().__init__(method, url, **kwargs)

    def handle_request(self, request):
        try:
            return super().handle_request(request)
        except Exception as exc:
            return self.error_renderer(request, exc)

    def response_from_exception(self, exc):
        # nameko calls this without the request; re-raise so handle_request renders the error
        # knowing which route (and so which error format) it came from.
        raise exc


http = HttpEntrypoint.decorator
