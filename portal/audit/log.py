"""The one writer of audit Events: requests, node steps, the sweeper, commands and logins.

Every site names what happened with the same arguments, so an Event always
has its object (type, id, a short repr) and its actor filled in the same way.
"""

from __future__ import annotations

from typing import Any

from django.db import models

from portal.audit.models import Event, Outcome


def record(
    action: str,
    obj: models.Model | None = None,
    *,
    tenant_id: int | None = None,
    actor: Any = None,
    actor_name: str = "",
    outcome: str = Outcome.SUCCESS,
    message: str = "",
    request_id: str = "",
    **fields: Any,
) -> Event:
    """Write one Event.

    ``obj`` fills the object fields (and the tenant, unless ``tenant_id`` is
    given); ``actor`` is a user (an anonymous one counts as none) and
    ``actor_name`` what to show without one (``node:<name>``, ``portal``).
    ``fields`` are further Event fields: a request's HTTP fields
    (``source_ip``, ``method``, ``path``, ``status_code``), or the object
    fields when there is no model instance at hand.
    """
    user = actor if actor is not None and getattr(actor, "is_authenticated", False) else None
    if obj is not None:
        fields |= {
            "object_type": obj._meta.model_name or "",
            "object_id": str(obj.pk),
            "object_repr": str(obj)[:200],
        }
        if tenant_id is None:
            tenant_id = getattr(obj, "tenant_id", None)
    return Event.objects.create(
        actor=user,
        actor_name=(user.get_username() if user is not None else actor_name)[:150],
        tenant_id=tenant_id,
        action=action[:100],
        request_id=request_id[:64],
        outcome=outcome,
        message=message,
        **fields,
    )
