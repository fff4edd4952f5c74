"""JSON errors with a message for every failure: never an HTML page, never a 500 for bad input.

Domain errors (:mod:`portal.errors`) get their HTTP status here and nowhere
else (:func:`http_status`); the pages use the same mapping.
"""

from __future__ import annotations

from typing import Any

from django.core.exceptions import RequestDataTooBig
from django.core.exceptions import ValidationError as DjangoValidationError
from django.db import IntegrityError, OperationalError
from django.db.models import ProtectedError, RestrictedError
from django.http import Http404, HttpRequest, JsonResponse
from rest_framework import exceptions, status
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler

from portal.api.parsers import BodyTooLarge, too_large_message
from portal.audit.record import note_error
from portal.errors import Conflict, DomainError, NotFound

#: the HTTP status of each domain error (the first class in the error's MRO that is listed wins)
HTTP_STATUS: dict[type[DomainError], int] = {
    Conflict: status.HTTP_409_CONFLICT,
    NotFound: status.HTTP_404_NOT_FOUND,
}


def http_status(exc: DomainError) -> int:
    for cls in type(exc).__mro__:
        if cls in HTTP_STATUS:
            return HTTP_STATUS[cls]
    return status.HTTP_400_BAD_REQUEST


class _DomainAPIError(exceptions.APIException):
    """A domain error on its way through DRF's handler."""

    def __init__(self, exc: DomainError) -> None:
        super().__init__(str(exc), exc.code)
        self.status_code = http_status(exc)
        self.errors = getattr(exc, "errors", None)  # a conflict that names its field


def _first_message(data: Any) -> str:
    if isinstance(data, dict):
        for key, value in data.items():
            inner = _first_message(value)
            return inner if key in ("non_field_errors", "detail") else f"{key}: {inner}"
    if isinstance(data, list) and data:
        return _first_message(data[0])
    return str(data)


class DatabaseBusy(exceptions.APIException):
    status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    default_detail = "The database is busy with other writes; nothing was changed. Retry in a few seconds."
    default_code = "database_busy"


def _database_busy(exc: Exception) -> bool:
    """SQLite's writer lock not granted within its busy timeout (30 s): a load problem, not a bug.

    The transaction that asked for it was rolled back (or never began), so the
    client may simply retry; PostgreSQL has no such error.
    """
    return isinstance(exc, OperationalError) and "database is locked" in str(exc)


def exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    busy = _database_busy(exc)
    response = _handle(DatabaseBusy() if busy else exc, context)
    if busy and response is not None:
        response["Retry-After"] = "5"
    return response


def _handle(exc: Exception, context: dict[str, Any]) -> Response | None:
    if isinstance(exc, ProtectedError | RestrictedError):
        exc = Conflict("This object is still in use by other objects and cannot be deleted.")
    elif isinstance(exc, IntegrityError):
        exc = Conflict("This conflicts with an existing object (a name or key is already taken).")
    if isinstance(exc, DomainError):
        exc = _DomainAPIError(exc)
    elif isinstance(exc, DjangoValidationError):
        exc = exceptions.ValidationError(exc.message_dict if hasattr(exc, "error_dict") else exc.messages)
    elif isinstance(exc, Http404):
        exc = exceptions.NotFound("Not found.")
    elif isinstance(exc, RequestDataTooBig):  # request.body beyond DATA_UPLOAD_MAX_MEMORY_SIZE
        exc = BodyTooLarge(too_large_message())
    response = drf_exception_handler(exc, context)
    if response is None:
        return None
    if isinstance(exc, exceptions.ValidationError):
        message = _first_message(response.data)
        body: dict[str, Any] = {"message": message, "code": "invalid", "errors": response.data}
    else:
        detail = (
            response.data.get("detail", response.data) if isinstance(response.data, dict) else response.data
        )
        message = str(detail)
        body = {
            "message": message,
            "code": getattr(detail, "code", None) or getattr(exc, "default_code", "error"),
        }
        if getattr(exc, "errors", None):  # a conflict that names its field (portal.api.conflicts)
            body["errors"] = exc.errors  # type: ignore[attr-defined]
    request = context.get("request")
    if request is not None:
        note_error(request, message)
    response.data = body
    return response


def json_not_found(request: HttpRequest, exception: Exception | None = None) -> JsonResponse:
    return JsonResponse({"message": "Not found.", "code": "not_found"}, status=404)


def json_server_error(request: HttpRequest) -> JsonResponse:
    return JsonResponse(
        {
            "message": "Internal error; it was logged. Quote the X-Request-ID header when reporting it.",
            "code": "error",
        },
        status=500,
    )
