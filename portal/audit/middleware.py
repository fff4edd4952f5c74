"""Writes an Event for every state-changing request, in one place.

Views only describe what they acted on (:func:`portal.audit.record.describe`);
this middleware writes the row after the response is known, so refusals
(403, 404, 409) are audited as well as successes and no view can forget it.
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Callable
from typing import Any

from django.http import HttpRequest, HttpResponse

from portal import requestlog
from portal.audit.log import record
from portal.audit.models import Outcome
from portal.audit.record import client_ip

log = logging.getLogger(__name__)

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})
MESSAGE_MAX = 2000
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{8,64}$")


def outcome_for(status: int) -> str:
    if status < 400:
        return Outcome.SUCCESS
    if status in (401, 403):
        return Outcome.DENIED
    return Outcome.FAILURE


class AuditMiddleware:
    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        given = request.headers.get("X-Request-ID", "")
        request.request_id = given if _REQUEST_ID.match(given) else uuid.uuid4().hex  # type: ignore[attr-defined]
        with requestlog.bound(request.request_id):  # type: ignore[attr-defined]
            response = self.get_response(request)
        response["X-Request-ID"] = request.request_id  # type: ignore[attr-defined]
        if request.method not in SAFE_METHODS and not getattr(request, "audit", {}).get("dry_run"):
            try:
                self._record(request, response)
            except Exception:  # the audit write must never turn a done action into a 500
                log.exception("could not write audit event for %s %s", request.method, request.path)
        return response

    def _record(self, request: HttpRequest, response: HttpResponse) -> None:
        info: dict[str, Any] = getattr(request, "audit", {})
        user = getattr(request, "user", None)
        record(
            str(info.get("action") or f"{request.method} {request.path}"),
            tenant_id=info.get("tenant_id"),
            actor=user,
            outcome=outcome_for(response.status_code),
            # error messages may quote what the client sent: keep the log's rows small
            message=str(info.get("message", ""))[:MESSAGE_MAX],
            request_id=request.request_id,  # type: ignore[attr-defined]
            object_type=str(info.get("object_type", ""))[:50],
            object_id=str(info.get("object_id", ""))[:64],
            object_repr=str(info.get("object_repr", ""))[:200],
            source_ip=client_ip(request),
            method=request.method or "",
            path=request.path[:255],
            status_code=response.status_code,
        )
