"""Snapshot resources on the wire: what the list shows and what a create accepts."""

from __future__ import annotations

from rest_framework import serializers

from portal.api.strict import StrictModelSerializer, StrictRegexField
from portal.cloud.naming import NAME_RE, NAME_RULE
from portal.storage.models import Snapshot


class SnapshotSerializer(StrictModelSerializer[Snapshot]):
    class Meta:
        model = Snapshot
        fields = ["name", "instance_id", "status", "status_reason", "size_bytes", "taken_at", "created_at"]
        read_only_fields = fields


class SnapshotCreateSerializer(serializers.Serializer):  # type: ignore[type-arg]
    name = StrictRegexField(NAME_RE, max_length=63, error_messages={"invalid": NAME_RULE})
