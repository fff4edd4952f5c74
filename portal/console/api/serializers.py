"""What the console endpoints accept and answer (and so what the OpenAPI schema says)."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from rest_framework import serializers

from compute.spec import ConsoleMode
from portal.api.strict import StrictCharField, StrictFloatField, StrictIntegerField

EXEC_MAX_OUTPUT = 1 << 20


def _command(**extra: Any) -> serializers.ListField:
    return serializers.ListField(
        child=StrictCharField(max_length=4096, allow_blank=False, trim_whitespace=False),
        min_length=1,
        max_length=64,
        **extra,
    )


class ConsoleSessionRequestSerializer(serializers.Serializer):  # type: ignore[type-arg]
    mode = serializers.ChoiceField(
        choices=[m.value for m in ConsoleMode],
        help_text="view (watch a VM's serial console), write (type into it) or exec (a shell in a container)",
    )
    command = _command(
        required=False, help_text="exec only: the command to run in a terminal (default /bin/sh)"
    )

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        if attrs["mode"] != ConsoleMode.EXEC and attrs.get("command"):
            raise serializers.ValidationError({"command": "Only an exec session runs a command."})
        if attrs["mode"] == ConsoleMode.EXEC and not attrs.get("command"):
            attrs["command"] = ["/bin/sh"]
        return attrs


class ConsoleTicketSerializer(serializers.Serializer):  # type: ignore[type-arg]
    session = serializers.UUIDField()
    mode = serializers.CharField()
    ticket = serializers.CharField(help_text="Single use; redeem it at ws_url before expires_at")
    expires_at = serializers.DateTimeField()
    ws_url = serializers.CharField(
        help_text="The WebSocket to open (binary frames both ways; docs/console.md)"
    )


class ExecRequestSerializer(serializers.Serializer):  # type: ignore[type-arg]
    command = _command()
    timeout = StrictFloatField(min_value=0.1, default=30.0, help_text="Seconds before the command is killed")
    max_bytes = StrictIntegerField(
        min_value=1, max_value=EXEC_MAX_OUTPUT, default=65536, help_text="Output kept; the rest is dropped"
    )

    def validate_timeout(self, value: float) -> float:
        if value > settings.SKYPORT_EXEC_MAX_SECONDS:
            raise serializers.ValidationError(f"At most {settings.SKYPORT_EXEC_MAX_SECONDS:g} seconds.")
        return value


class ExecResultSerializer(serializers.Serializer):  # type: ignore[type-arg]
    exit_code = serializers.IntegerField(allow_null=True, help_text="null when it timed out")
    output = serializers.CharField(help_text="stdout and stderr, merged in order")
    truncated = serializers.BooleanField()
    timed_out = serializers.BooleanField()
    seconds = serializers.FloatField()
