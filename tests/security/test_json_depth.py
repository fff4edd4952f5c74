"""Deeply nested JSON is a 400 (API) or a form error (admin), never a 500 (issue 12, item 1).

Before the depth limit every payload below raised RecursionError inside
``json`` and the API answered 500; the admin's JSON fields did the same.
"""

from __future__ import annotations

from typing import Any

import pytest
from django.contrib import admin
from django.test import Client
from rest_framework.test import APIClient

from compute import safejson
from compute.layers import ImageError, _json_object
from portal.cloud.models import ComputeNode, Instance
from portal.images.validation import Rejected, _json
from tests.portal.conftest import World

DEEP_LIST = "[" * 100_000
DEEP_OBJECTS = '{"a":' * 50_000 + "1" + "}" * 50_000
DEEP_PARAMS = '{"action":"pause","params":' + '{"a":' * 2000 + "1" + "}" * 2000 + "}"


def _token_client(world: World, who: str = "a_member") -> APIClient:
    """Any valid token could trigger it: a tenant member's bearer token."""
    from portal.tenancy.models import APIToken, Membership

    token = APIToken(
        user=world.users[who],
        membership=Membership.objects.get(user=world.users[who], tenant=world.a),
        name="probe",
        expires_at="2999-01-01T00:00:00Z",
    )
    key = token.issue()
    token.save()
    c = APIClient(raise_request_exception=False)
    c.credentials(HTTP_AUTHORIZATION=f"Bearer {key}")
    return c


@pytest.mark.parametrize("body", [DEEP_LIST, DEEP_OBJECTS], ids=["100000-lists", "50000-objects"])
def test_deep_body_on_preview_is_400(world: World, body: str) -> None:
    r = _token_client(world).post("/api/v1/instances/preview/", body, content_type="application/json")
    assert r.status_code == 400, r.content
    assert r.json()["code"] == "parse_error"
    assert "nested more than 32 levels deep" in r.json()["message"]


def test_deep_action_params_are_400(world: World) -> None:
    url = f"/api/v1/instances/{world.instance_a.pk}/actions/"
    r = _token_client(world).post(url, DEEP_PARAMS, content_type="application/json")
    assert r.status_code == 400, r.content
    assert "nested more than 32 levels deep" in r.json()["message"]
    assert Instance.objects.get(pk=world.instance_a.pk).task_state is None


@pytest.mark.parametrize(
    "url",
    [
        "/api/v1/instances/",
        "/api/v1/images/",
        "/api/v1/ssh-keys/",
        "/api/v1/tokens/",
        "/api/v1/memberships/",
    ],
)
def test_every_json_write_endpoint_has_the_limit(world: World, url: str) -> None:
    r = _token_client(world, "a_admin").post(url, DEEP_LIST, content_type="application/json")
    assert r.status_code == 400, (url, r.content)


def test_patch_is_limited_too(world: World) -> None:
    c = _token_client(world)
    r = c.patch(f"/api/v1/instances/{world.instance_a.pk}/", DEEP_OBJECTS, content_type="application/json")
    assert r.status_code == 400, r.content


def test_ordinary_nesting_still_parses(world: World) -> None:
    """The limit leaves room: an action with params, a body nested to exactly the limit."""
    c = _token_client(world)
    r = c.post(
        f"/api/v1/instances/{world.instance_a.pk}/actions/",
        {"action": "stop", "params": {"timeout": 5}},
        format="json",
    )
    assert r.status_code == 202, r.content
    at_limit = "[" * 32 + "]" * 32
    r = c.post("/api/v1/ssh-keys/", at_limit, content_type="application/json")
    assert r.status_code == 400 and "nested" not in r.json()["message"]  # refused by the serializer


def test_body_larger_than_the_limit_is_413(world: World, settings: Any) -> None:
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 1000
    body = '{"name": "' + "x" * 2000 + '"}'
    r = _token_client(world).post("/api/v1/ssh-keys/", body, content_type="application/json")
    assert r.status_code == 413, r.content
    assert "SKYPORT_BODY_MAX_BYTES" in r.json()["message"]


def _admin_post(world: World, obj: Any, model_admin: Any, field: str, value: str) -> Any:
    """POST the admin's change form of ``obj`` as it is, with ``field`` set to ``value``."""
    c = Client(raise_request_exception=False)
    world.users["operator"].is_superuser = True
    world.users["operator"].save()
    c.force_login(world.users["operator"])
    request = type("R", (), {"user": world.users["operator"]})()
    form = model_admin.get_form(request, obj)(instance=obj)
    data = {}
    for name, bound in form._bound_items():
        v = bound.field.prepare_value(bound.value())
        if v is None:
            continue
        if isinstance(v, list | tuple):
            data[name] = [str(x) for x in v]
        else:
            data[name] = v
    data[field] = value
    meta = obj._meta
    return c.post(f"/admin/{meta.app_label}/{meta.model_name}/{obj.pk}/change/", data)


@pytest.mark.parametrize("field", ["drivers", "orphans"])
def test_admin_json_field_too_deep_is_a_form_error(world: World, field: str) -> None:
    node = ComputeNode.objects.get(name="shared-1")
    r = _admin_post(world, node, admin.site._registry[ComputeNode], field, DEEP_LIST)
    assert r.status_code == 200, r.status_code  # the form again, with the error (a redirect means saved)
    assert b"nested more than 32 levels deep" in r.content
    assert ComputeNode.objects.get(pk=node.pk).drivers == node.drivers


def test_admin_instance_json_field_too_deep_is_refused(world: World) -> None:
    # instances are read-only in the admin (issue 15): any change is refused, deep JSON included
    instance = world.instance_a
    r = _admin_post(world, instance, admin.site._registry[Instance], "addresses", DEEP_OBJECTS)
    assert r.status_code == 403, r.status_code
    assert Instance.objects.get(pk=instance.pk).addresses == instance.addresses


def test_admin_json_field_ordinary_value_saves(world: World) -> None:
    node = ComputeNode.objects.get(name="shared-1")
    r = _admin_post(world, node, admin.site._registry[ComputeNode], "orphans", '["x"]')
    assert r.status_code == 302, r.content[-2000:]
    assert ComputeNode.objects.get(pk=node.pk).orphans == ["x"]


def test_image_manifests_too_deep_are_refused_not_crashed() -> None:
    """The import's JSON (index, manifest, config) and the node's go through the same limit."""
    with pytest.raises(Rejected, match="nested more than 32 levels"):
        _json(DEEP_LIST.encode(), "index.json")
    with pytest.raises(ImageError, match="nested more than 32 levels"):
        _json_object(DEEP_OBJECTS.encode(), "manifest")


def test_depth_is_counted_outside_strings_only() -> None:
    assert safejson.loads('{"k": "' + "[" * 1000 + '"}') == {"k": "[" * 1000}
    assert safejson.loads('["\\"[[[[", ' * 30 + "1" + "]" * 30) is not None
    with pytest.raises(safejson.TooDeep):
        safejson.loads(b"[" * 33 + b"]" * 33)
    expected: list[Any] = []
    for _ in range(31):
        expected = [expected]
    assert safejson.loads(b"[" * 32 + b"]" * 32) == expected
