from rest_framework import serializers

from portal.audit.models import Event


class EventSerializer(serializers.ModelSerializer[Event]):
    tenant: serializers.SlugRelatedField[Event] = serializers.SlugRelatedField(
        slug_field="slug", read_only=True, allow_null=True
    )

    class Meta:
        model = Event
        fields = [
            "id",
            "created_at",
            "actor_name",
            "tenant",
            "action",
            "object_type",
            "object_id",
            "object_repr",
            "request_id",
            "source_ip",
            "method",
            "path",
            "status_code",
            "outcome",
            "message",
        ]
        read_only_fields = fields
