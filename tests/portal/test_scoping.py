"""Cross-tenant matrix: another tenant's objects do not exist for you (404), on every endpoint."""

from __future__ import annotations

from typing import Any

import pytest

from portal.images.models import Image
from tests.portal.conftest import World


def _objects(w: World) -> list[tuple[str, str, dict[str, Any]]]:
    """(endpoint, lookup, a harmless PATCH body) of one tenant-A object per type."""
    return [
        ("tenants", w.a.slug, {"name": "x"}),
        ("memberships", str(w.membership_a.pk), {"role": "viewer"}),
        ("quotas", str(w.a.quota.pk), {"instances": 99}),
        ("flavors", str(w.flavor_a.pk), {"name": "stolen"}),
        ("instances", str(w.instance_a.pk), {"name": "renamed"}),
        ("events", str(w.event_a.pk), {}),
        ("ssh-keys", str(w.key_a.pk), {}),
        ("tokens", str(w.token_a.pk), {}),
        ("networks", str(w.instance_a.network_id), {}),
        ("images", str(Image.objects.get(name="secret").pk), {}),
    ]


@pytest.mark.parametrize("who", ["b_admin", "b_member"])
def test_other_tenant_gets_404_on_every_object(world: World, who: str) -> None:
    client = world.client(who)
    for endpoint, lookup, patch in _objects(world):
        url = f"/api/v1/{endpoint}/{lookup}/"
        assert client.get(url).status_code == 404, url
        assert client.patch(url, patch, format="json").status_code in (404, 405), url
        assert client.delete(url).status_code in (404, 405), url
        listing = client.get(f"/api/v1/{endpoint}/", {"page_size": 500})
        assert listing.status_code == 200, endpoint
        seen = {str(row.get("slug") or row["id"]) for row in listing.json()["results"]}
        assert lookup not in seen, f"{endpoint} lists tenant A's object to {who}"
    # nothing was changed by the attempts
    world.instance_a.refresh_from_db()
    assert world.instance_a.name == "web-1"
    world.a.refresh_from_db()
    assert world.a.name == "Acme"


def test_member_of_a_sees_a_objects(world: World) -> None:
    client = world.client("a_admin")
    for endpoint, lookup, _ in _objects(world):
        assert client.get(f"/api/v1/{endpoint}/{lookup}/").status_code == 200, endpoint


def test_nodes_are_for_operators_only(world: World) -> None:
    for who in ("a_admin", "b_admin"):
        client = world.client(who)
        assert client.get("/api/v1/nodes/").status_code == 403
        assert client.get(f"/api/v1/nodes/{world.node_a.name}/").status_code == 403
    op = world.client("operator")
    assert op.get(f"/api/v1/nodes/{world.node_a.name}/").json()["owner"] == "acme"


def test_operator_sees_all_tenants(world: World) -> None:
    rows = world.client("operator").get("/api/v1/tenants/").json()["results"]
    assert {r["slug"] for r in rows} == {"acme", "bobco"}


def test_private_image_is_unusable_by_other_tenants(world: World) -> None:
    r = world.client("b_member").post(
        "/api/v1/instances/",
        {"tenant": "bobco", "name": "x", "image": "secret:1", "flavor": world.flavor_public.pk},
        format="json",
    )
    assert r.status_code == 400 and "No active image 'secret:1'" in r.json()["message"]
    public = {i["name"] for i in world.client("b_member").get("/api/v1/images/").json()["results"]}
    assert public == {"busybox", "tiny", "sample"}


def test_create_in_other_tenant_is_refused_without_leaking(world: World) -> None:
    client = world.client("b_admin")
    r = client.post(
        "/api/v1/instances/",
        {"tenant": "acme", "name": "x", "image": "tiny:1", "flavor": world.flavor_public.pk},
        format="json",
    )
    assert r.status_code == 400
    assert "No tenant 'acme' that you belong to" in r.json()["message"]
    r = client.post(
        "/api/v1/instances/",
        {"tenant": "bobco", "name": "x", "image": "tiny:1", "flavor": world.flavor_a.pk},
        format="json",
    )
    assert r.status_code == 400, "tenant A's private flavor must be unusable by B"
    r = client.post(
        "/api/v1/memberships/", {"tenant": "acme", "user": "b_member", "role": "admin"}, format="json"
    )
    assert r.status_code == 400


def test_anonymous_is_refused(world: World) -> None:
    from rest_framework.test import APIClient

    r = APIClient().get("/api/v1/instances/")
    assert r.status_code == 401
    assert r.json()["message"]
