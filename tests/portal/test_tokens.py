"""API tokens: tied to one membership, expiring, revocable, shown once."""

from __future__ import annotations

import datetime as dt

from django.utils import timezone
from rest_framework.test import APIClient

from portal.tenancy.choices import Role
from portal.tenancy.models import APIToken, Membership
from tests.portal.conftest import World


def _bearer(key: str) -> APIClient:
    c = APIClient()
    c.credentials(HTTP_AUTHORIZATION=f"Bearer {key}")
    return c


def _issue(world: World, who: str, tenant: str, days: int = 30) -> str:
    r = world.client(who).post(
        "/api/v1/tokens/", {"name": "auto", "tenant": tenant, "expires_in_days": days}, format="json"
    )
    assert r.status_code == 201, r.json()
    key: str = r.json()["key"]
    assert key.startswith("sky_")
    listed = world.client(who).get("/api/v1/tokens/").json()["results"]
    assert all(row["key"] is None for row in listed), "the key is shown only once"
    return key


def test_token_works_and_expires(world: World) -> None:
    key = _issue(world, "a_member", "acme")
    c = _bearer(key)
    assert c.get("/api/v1/instances/").status_code == 200
    APIToken.objects.filter(key_id=key.split("_")[1]).update(
        expires_at=timezone.now() - dt.timedelta(seconds=1)
    )
    r = c.get("/api/v1/instances/")
    assert r.status_code == 401 and "expired" in r.json()["message"]


def test_token_revoke(world: World) -> None:
    key = _issue(world, "a_member", "acme")
    token_id = APIToken.objects.get(key_id=key.split("_")[1]).pk
    assert world.client("a_member").delete(f"/api/v1/tokens/{token_id}/").status_code == 204
    r = _bearer(key).get("/api/v1/instances/")
    assert r.status_code == 401 and "revoked" in r.json()["message"]


def test_bad_tokens_are_401(world: World) -> None:
    assert _bearer("sky_0123456789abcdef_" + "x" * 30).get("/api/v1/tenants/").status_code == 401
    assert _bearer("garbage").get("/api/v1/tenants/").json()["message"].startswith("Malformed")


def test_token_of_one_membership_cannot_act_in_another_tenant(world: World) -> None:
    both = world.users["a_member"]
    Membership.objects.create(user=both, tenant=world.b, role=Role.ADMIN)
    key = _issue(world, "a_member", "acme")
    c = _bearer(key)
    b_instance = c.post(
        "/api/v1/instances/",
        {"tenant": "bobco", "name": "x", "image": "tiny:1", "flavor": world.flavor_public.pk},
        format="json",
    )
    assert b_instance.status_code == 400, "token of acme must not create in bobco"
    # the same user by session can, and the token then cannot see it
    r = world.client("a_member").post(
        "/api/v1/instances/",
        {"tenant": "bobco", "name": "x", "image": "tiny:1", "flavor": world.flavor_public.pk},
        format="json",
    )
    assert r.status_code == 202
    assert c.get(f"/api/v1/instances/{r.json()['id']}/").status_code == 404
    assert c.get("/api/v1/tenants/bobco/").status_code == 404
    assert [t["slug"] for t in c.get("/api/v1/tenants/").json()["results"]] == ["acme"]
    # and it cannot use the bobco admin role to manage bobco members: its acme role (member)
    # may add members nowhere, so it is refused before the body is read
    body = {"tenant": "bobco", "user": "a_viewer", "role": "viewer"}
    r = c.post("/api/v1/memberships/", body, format="json")
    assert r.status_code == 403 and "tenant admin role" in r.json()["message"]


def test_token_of_staff_membership_has_no_operator_powers(world: World) -> None:
    op = world.users["operator"]
    Membership.objects.create(user=op, tenant=world.a, role=Role.ADMIN)
    key = _issue(world, "operator", "acme")
    c = _bearer(key)
    assert c.get("/api/v1/nodes/").status_code == 403
    assert [t["slug"] for t in c.get("/api/v1/tenants/").json()["results"]] == ["acme"]


def test_token_expiry_bounds(world: World) -> None:
    r = world.client("a_member").post(
        "/api/v1/tokens/", {"name": "x", "tenant": "acme", "expires_in_days": 9999}, format="json"
    )
    assert r.status_code == 400 and "At most" in r.json()["message"]
    r = world.client("a_member").post("/api/v1/tokens/", {"name": "x", "tenant": "bobco"}, format="json")
    assert r.status_code == 400
