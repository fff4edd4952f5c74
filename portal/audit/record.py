"""How views tell the audit middleware what they acted on."""

from __future__ import annotations

import ipaddress
from typing import Any

from django.conf import settings
from django.db import models
from django.http import HttpRequest


def _django_request(request: Any) -> HttpRequest:
    inner: HttpRequest = getattr(request, "_request", request)  # DRF wraps the HttpRequest
    return inner


def describe(
    request: Any,
    action: str,
    obj: models.Model | None = None,
    tenant_id: int | None = None,
    message: str | None = None,
) -> None:
    """Name the action and object of this request for its audit Event."""
    info: dict[str, Any] = getattr(_django_request(request), "audit", {})
    info["action"] = action
    if obj is not None:
        info["object_type"] = obj._meta.model_name
        info["object_id"] = str(obj.pk)
        info["object_repr"] = str(obj)
        if tenant_id is None:
            tenant_id = getattr(obj, "tenant_id", None)
    if tenant_id is not None:
        info["tenant_id"] = tenant_id
    if message is not None:
        info["message"] = message
    _django_request(request).audit = info  # type: ignore[attr-defined]


def not_a_change(request: Any) -> None:
    """This POST changes nothing (a dry run, e.g. the launch preview): write no Event for it."""
    info: dict[str, Any] = getattr(_django_request(request), "audit", {})
    info["dry_run"] = True
    _django_request(request).audit = info  # type: ignore[attr-defined]


def note_error(request: Any, message: str) -> None:
    """Keep the error message a refused request answered with."""
    info: dict[str, Any] = getattr(_django_request(request), "audit", {})
    info.setdefault("message", message)
    _django_request(request).audit = info  # type: ignore[attr-defined]


def client_ip(request: Any) -> str | None:
    """The client's address: REMOTE_ADDR, or behind a reverse proxy (``SKYPORT_BEHIND_PROXY``)
    the last X-Forwarded-For entry, the one that proxy appended (earlier ones are the client's word)."""
    meta = _django_request(request).META
    remote: str | None = meta.get("REMOTE_ADDR") or None
    if settings.SKYPORT_BEHIND_PROXY:
        forwarded = meta.get("HTTP_X_FORWARDED_FOR", "").split(",")[-1].strip()
        try:
            return str(ipaddress.ip_address(forwarded))
        except ValueError:
            return remote
    return remote
