from __future__ import annotations

from typing import Any

from django.db import models
from rest_framework import viewsets

from portal.api.authentication import actor_for
from portal.audit.api.serializers import EventSerializer
from portal.audit.models import Event


class EventViewSet(viewsets.ReadOnlyModelViewSet):  # type: ignore[type-arg]
    """The audit log of your tenants (operators: everything)."""

    queryset = Event.objects.select_related("tenant")
    serializer_class = EventSerializer
    filterset_fields = {
        "tenant__slug": ["exact"],
        "action": ["exact", "startswith"],
        "outcome": ["exact"],
        "object_type": ["exact"],
        "object_id": ["exact"],
        "actor_name": ["exact"],
        "request_id": ["exact"],
        "created_at": ["gte", "lte"],
    }
    search_fields = ["action", "object_repr", "message"]
    ordering_fields = ["created_at", "action"]

    def get_queryset(self) -> models.QuerySet[Any]:
        return Event.objects.select_related("tenant").restrict(actor_for(self.request))
