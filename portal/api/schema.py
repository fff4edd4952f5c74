"""Error responses in the OpenAPI schema.

Every failure is answered with the same JSON body (``portal.api.exceptions``);
this post-processing hook documents it on every operation with the status
codes that operation can answer, so clients (and schemathesis) know them.
"""

from __future__ import annotations

from typing import Any

ERROR_COMPONENT = "Error"
ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "Every error: a one-sentence message, a machine code, and field errors when invalid.",
    "properties": {
        "message": {"type": "string"},
        "code": {"type": "string"},
        "errors": {"description": "Validation errors: field name to messages (invalid input only)."},
    },
    "required": ["message", "code"],
}
_WRITES = frozenset({"post", "put", "patch", "delete"})
_DESCRIPTIONS = {
    "400": (
        "Invalid input: a body, filter or query parameter the schema refuses, a string with a NUL "
        "character, JSON nested deeper than SKYPORT_JSON_MAX_DEPTH, or a rule the schema cannot "
        "express: a reference to an object that does "
        "not exist or is not yours (tenant, flavor, image, user, SSH key), an SSH key that does not parse, "
        "an upload whose checksum differs."
    ),
    "401": "Not authenticated, or the API token is invalid, expired or revoked.",
    "403": "Authenticated but not allowed (role, operator-only action, CSRF).",
    "404": "No such object among those you may see (or no such page).",
    "409": (
        "Conflicts with the current state: a name or version in use, already a member, a task in flight, "
        "an action the instance's state does not allow, no node with room, the quota."
    ),
    "413": "The body is over its limit (SKYPORT_BODY_MAX_BYTES; uploads: SKYPORT_UPLOAD_MAX_BYTES).",
    "415": "The request body's media type is not supported (JSON; uploads: application/octet-stream).",
    "429": "Too many at once: try again shortly (the message says what is busy).",
    "504": "The instance's compute node did not answer in time.",
}
#: an operation's own further error codes: ``@extend_schema(extensions={EXTRA_ERRORS: ["409"]})``
EXTRA_ERRORS = "x-skyport-errors"


def error_codes(method: str, operation: dict[str, Any]) -> list[str]:
    """The error status codes an operation can answer."""
    codes = ["401", "403", "404"]
    has_query = any(p.get("in") == "query" for p in operation.get("parameters", []))
    if "requestBody" in operation or has_query:
        codes.append("400")
    if method in _WRITES:
        codes.append("409")
    if "requestBody" in operation:
        codes += ["413", "415"]
    return sorted(codes)


def add_error_responses(result: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
    """drf-spectacular post-processing hook: document the JSON error body on every operation."""
    result.setdefault("components", {}).setdefault("schemas", {})[ERROR_COMPONENT] = ERROR_SCHEMA
    ref = {"$ref": f"#/components/schemas/{ERROR_COMPONENT}"}
    for path_item in result.get("paths", {}).values():
        for method, operation in path_item.items():
            responses = operation.setdefault("responses", {})
            extra = operation.pop(EXTRA_ERRORS, [])
            for code in sorted(set(error_codes(method, operation)) | set(extra)):
                responses.setdefault(
                    code,
                    {"description": _DESCRIPTIONS[code], "content": {"application/json": {"schema": ref}}},
                )
    return result
