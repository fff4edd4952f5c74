"""Regressions found by schemathesis (tests/security/test_schemathesis_live.py), one focused test each."""

from __future__ import annotations

from typing import Any

import yaml
from rest_framework.test import APIClient

from portal.audit.models import Event, Outcome
from portal.cloud.models import Instance
from tests.portal.conftest import World


def _schema(client: APIClient) -> dict[str, Any]:
    r = client.get("/api/schema/")
    assert r.status_code == 200
    loaded: dict[str, Any] = yaml.safe_load(r.content)
    return loaded


def test_every_operation_documents_its_json_errors(world: World) -> None:
    """Error answers were undocumented (only 200/201 were): clients could not expect a 404 or 409."""
    doc = _schema(world.client("a_member"))
    assert doc["components"]["schemas"]["Error"]["required"] == ["message", "code"]
    for path, item in doc["paths"].items():
        for method, op in item.items():
            codes = set(op["responses"])
            assert {"401", "403", "404"} <= codes, (method, path)
            if "requestBody" in op:
                assert {"400", "415"} <= codes, (method, path)
            if method in ("post", "patch", "put", "delete"):
                assert "409" in codes, (method, path)
    # and the body the API really sends has that shape
    r = world.client("a_member").get("/api/v1/events/?page=0")
    assert r.status_code == 404 and set(r.json()) == {"message", "code"}


def test_image_reference_that_is_not_a_string_or_id_is_400(world: World) -> None:
    """``"image": false`` was taken for an int and crashed int("False") with a 500."""
    c = world.client("a_member")
    for url in ("/api/v1/instances/", "/api/v1/instances/preview/"):
        for bad in (False, True, 1.5, ["tiny:1"], {"name": "tiny"}):
            r = c.post(url, {"name": "x", "image": bad, "flavor": world.flavor_public.pk}, format="json")
            assert r.status_code == 400, (url, bad, r.content)
            assert "image" in r.json()["errors"]


def test_ssh_key_of_unknown_type_is_400(world: World) -> None:
    """cryptography raises UnsupportedAlgorithm (not ValueError) for an unknown key type: it was a 500."""
    c = world.client("a_member")
    r = c.post("/api/v1/ssh-keys/", {"name": "k", "public_key": "Invalid AAAA"}, format="json")
    assert r.status_code == 400
    assert "Not a valid OpenSSH public key" in r.json()["message"]


def test_nullable_references_are_documented_as_nullable(world: World) -> None:
    """A public image's owner, an unplaced instance's node, a deleted creator and a node event's
    tenant are null; the schema said "string", so every such response violated it."""
    doc = _schema(world.client("operator"))
    props = {name: s.get("properties", {}) for name, s in doc["components"]["schemas"].items()}
    assert props["Image"]["owner"]["nullable"] is True
    assert props["Instance"]["node"]["nullable"] is True
    assert props["Instance"]["created_by"]["nullable"] is True
    assert props["Event"]["tenant"]["nullable"] is True

    Instance.objects.filter(pk=world.instance_a.pk).update(node=None, created_by=None)
    c = world.client("a_member")
    body = c.get(f"/api/v1/instances/{world.instance_a.pk}/").json()
    assert body["node"] is None and body["created_by"] is None
    owners = {i["name"]: i["owner"] for i in c.get("/api/v1/images/").json()["results"]}
    assert owners["tiny"] is None and owners["secret"] == "acme"
    node_event = Event.objects.create(action="node.down", outcome=Outcome.SUCCESS, actor_name="sweeper")
    seen = world.client("operator").get(f"/api/v1/events/{node_event.pk}/").json()
    assert seen["tenant"] is None


def test_preview_without_tenant_uses_the_only_tenant(world: World) -> None:
    """The default tenant was filled in for create only: a preview without "tenant" was a KeyError (500)."""
    body = {"name": "x", "image": "tiny:1", "flavor": world.flavor_public.pk}
    r = world.client("a_member").post("/api/v1/instances/preview/", body, format="json")
    assert r.status_code == 200, r.json()
    assert r.json()["kind"] == "vm"
    world.users["a_member"].memberships.create(tenant=world.b, role="member")
    r = world.client("a_member").post("/api/v1/instances/preview/", body, format="json")
    assert r.status_code == 400 and "Name the tenant" in r.json()["message"]


def test_ssh_key_ids_out_of_range_are_400(world: World) -> None:
    """An id beyond 64 bits overflowed the database driver in the key lookup (500)."""
    c = world.client("a_member")
    for bad in (2**63, -(2**70), 0):
        body = {"name": "x", "image": "tiny:1", "flavor": world.flavor_public.pk, "ssh_key_ids": [bad]}
        for url in ("/api/v1/instances/", "/api/v1/instances/preview/"):
            r = c.post(url, body, format="json")
            assert r.status_code == 400, (url, bad, r.content)
            assert "ssh_key_ids" in r.json()["errors"]
