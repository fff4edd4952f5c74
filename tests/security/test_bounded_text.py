"""Every free-text field has a limit, the schema states it, and the API, forms and admin keep it
(issue 12, item 8).  Before: a 1 MB image description was accepted (201), as were SSH keys of any
size; the audit log kept whatever a refused request's message quoted."""

from __future__ import annotations

from typing import Any

import yaml
from django.test import Client

from portal.audit.middleware import MESSAGE_MAX
from portal.audit.models import Event
from portal.cloud.models import Instance
from portal.images.models import Image
from tests.portal.conftest import World
from tests.web.helpers import client, text

_UNBOUNDED_FORMATS = {"binary", "date-time"}
#: formats whose parser refuses anything longer than the format (a UUID is 36 characters at most)
_BOUNDED_FORMATS = {"uuid"}


def _writable_problems(name: str, schema: dict[str, Any], path: str, out: list[str]) -> None:
    if "$ref" in schema or schema.get("readOnly"):
        return
    for key in ("oneOf", "anyOf", "allOf"):
        for sub in schema.get(key, []):
            _writable_problems(name, sub, path, out)
    kind = schema.get("type")
    if kind == "string" and "enum" not in schema and schema.get("format") not in _UNBOUNDED_FORMATS:
        if "maxLength" not in schema and schema.get("format") not in _BOUNDED_FORMATS:
            out.append(f"{name}{path}: string without maxLength")
    elif kind == "array":
        if "maxItems" not in schema:
            out.append(f"{name}{path}: array without maxItems")
        _writable_problems(name, schema.get("items", {}), f"{path}[]", out)
    elif kind == "object":
        if schema.get("additionalProperties") not in (None, False):
            out.append(f"{name}{path}: object with free-form properties")
        for key, sub in schema.get("properties", {}).items():
            _writable_problems(name, sub, f"{path}.{key}", out)


def test_schema_bounds_every_writable_string(world: World) -> None:
    doc = yaml.safe_load(world.client("operator").get("/api/schema/").content)
    problems: list[str] = []
    for name, schema in doc["components"]["schemas"].items():
        if name.endswith("Request"):
            _writable_problems(name, schema, "", problems)
    assert problems == []
    image = doc["components"]["schemas"]["ImageRequest"]["properties"]
    assert image["description"]["maxLength"] == 2000
    assert doc["components"]["schemas"]["SSHKeyRequest"]["properties"]["public_key"]["maxLength"] == 8192


def test_the_issues_one_megabyte_description_is_refused(world: World) -> None:
    r = world.client("a_member").post(
        "/api/v1/images/", {"name": "d", "version": "1", "tenant": "acme", "description": "x" * 2**20},
        format="json",
    )  # fmt: skip
    assert r.status_code == 400
    assert r.json()["errors"]["description"] == ["Ensure this field has no more than 2000 characters."]
    assert not Image.objects.filter(name="d").exists()


def _bodies(world: World) -> list[tuple[str, str, str, str, dict[str, Any], str, int]]:
    """(who, method, url, field, valid body, field, limit): each refused one character past the limit."""
    image = Image.objects.get(name="secret")
    inst = world.instance_a.pk
    instance = {"tenant": "acme", "name": "n", "image": "tiny:1", "flavor": world.flavor_public.pk}
    new_image = {"name": "i", "version": "1", "tenant": "acme"}
    publish = f"/api/v1/instances/{inst}/publish/"
    return [
        ("a_member", "post", "/api/v1/images/", new_image, "description", 2000),
        ("a_member", "post", "/api/v1/images/", new_image, "os", 60),
        ("a_member", "patch", f"/api/v1/images/{image.pk}/", {}, "description", 2000),
        ("a_member", "post", "/api/v1/images/", {"name": "i", "version": "1"}, "tenant", 50),
        ("a_member", "post", "/api/v1/ssh-keys/", {"name": "k"}, "public_key", 8192),
        ("a_member", "post", "/api/v1/ssh-keys/", {"public_key": "ssh-ed25519 AAAA"}, "name", 100),
        ("a_member", "post", "/api/v1/tokens/", {"tenant": "acme"}, "name", 100),
        ("a_member", "post", "/api/v1/instances/", instance, "user_data", 16384),
        ("a_member", "post", "/api/v1/instances/", instance, "image", 192),
        ("a_member", "post", publish, {"name": "p", "version": "1"}, "description", 2000),
        ("a_member", "post", publish, {"version": "1"}, "name", 100),
        ("a_admin", "post", "/api/v1/memberships/", {"tenant": "acme"}, "user", 150),
        ("a_admin", "patch", "/api/v1/tenants/acme/", {}, "name", 200),
        ("operator", "post", "/api/v1/flavors/", {"vcpus": 1, "ram_mb": 64, "disk_gb": 1}, "name", 64),
        ("operator", "patch", "/api/v1/nodes/shared-1/", {}, "owner", 50),
    ]  # fmt: skip


def test_one_character_past_each_limit_is_400(world: World) -> None:
    for who, method, url, body, field, limit in _bodies(world):
        c = world.client(who)
        r = getattr(c, method)(url, {**body, field: "a" * (limit + 1)}, format="json")
        assert r.status_code == 400, (url, field, r.status_code, r.content[:300])
        assert field in r.json().get("errors", {}), (url, field, r.json())


def test_admin_keeps_the_limits(world: World) -> None:
    op = world.users["operator"]
    op.is_superuser = True
    op.save()
    c = Client()
    c.force_login(op)
    image = Image.objects.get(name="secret")
    r = c.post(
        f"/admin/images/image/{image.pk}/change/",
        {"name": image.name, "version": image.version, "description": "x" * 2001, "status": image.status,
         "min_ram_mb": 0, "min_disk_gb": 0, "artifacts-TOTAL_FORMS": 0, "artifacts-INITIAL_FORMS": 0},
    )  # fmt: skip
    assert r.status_code == 200 and "at most 2000 characters" in text(r)
    assert Image.objects.get(pk=image.pk).description == ""
    # instances are read-only in the admin (issue 15): no user data of any length is taken there
    r = c.post(
        f"/admin/cloud/instance/{world.instance_a.pk}/change/",
        {"user_data": "x" * 16385},
    )
    assert r.status_code == 403
    assert Instance.objects.get(pk=world.instance_a.pk).user_data == world.instance_a.user_data


def test_web_ssh_key_form_keeps_the_limit(world: World) -> None:
    r = client(world, "a_member").post(
        "/ssh-keys/", {"name": "big", "public_key": "ssh-ed25519 " + "A" * 9000}
    )
    assert r.status_code == 400 and "at most 8192 characters" in text(r)


def test_audit_log_keeps_a_bounded_message(world: World) -> None:
    """Whatever a refusal's message quotes, its event keeps at most MESSAGE_MAX characters."""
    from django.http import HttpResponse
    from django.test import RequestFactory

    from portal.audit.middleware import AuditMiddleware
    from portal.audit.record import note_error

    def refuse(request: Any) -> HttpResponse:
        note_error(request, "unknown: " + "x" * 100_000)
        return HttpResponse(status=400)

    request = RequestFactory().post("/api/v1/anything/", {})
    request.user = world.users["a_member"]
    AuditMiddleware(refuse)(request)
    event = Event.objects.get(path="/api/v1/anything/")
    assert event.message.startswith("unknown: xxx") and len(event.message) == MESSAGE_MAX
