"""POST /memberships/: no user-name enumeration (issue 12, item 6), and the tenant defaults (item 7).

Before: an unknown user name was answered "Object with username=… does not
exist" while any existing one was added (201), so a tenant admin could list
every account of the portal; and a single-tenant token had to name the
tenant although the serializer meant to default it (DRF's unique-together
validator made the field required first).
"""

from __future__ import annotations

from typing import Any

from rest_framework.test import APIClient

from portal.tenancy.choices import Role
from portal.tenancy.models import APIToken, Membership
from tests.portal.conftest import World, make_user


def _token(world: World, who: str, tenant: Any) -> APIClient:
    token = APIToken(
        user=world.users[who],
        membership=Membership.objects.get(user=world.users[who], tenant=tenant),
        name="t",
        expires_at="2999-01-01T00:00:00Z",
    )
    key = token.issue()
    token.save()
    c = APIClient()
    c.credentials(HTTP_AUTHORIZATION=f"Bearer {key}")
    return c


def _answer(c: APIClient, username: str) -> tuple[int, Any]:
    r = c.post("/api/v1/memberships/", {"tenant": "acme", "user": username, "role": "viewer"}, format="json")
    body = r.json()
    return r.status_code, {**body, "message": body["message"].replace(username, "<name>"),
                           "errors": {k: [m.replace(username, "<name>") for m in v]
                                      for k, v in body.get("errors", {}).items()}}  # fmt: skip


def test_unknown_and_existing_outsider_get_the_same_answer(world: World) -> None:
    make_user("zed_outsider")  # exists, in no tenant at all
    for c in (world.client("a_admin"), _token(world, "a_admin", world.a)):
        unknown = _answer(c, "nobody_by_that_name")
        outsider = _answer(c, "zed_outsider")
        other_tenant = _answer(c, "b_member")  # exists, member of bobco only
        assert unknown == outsider == other_tenant, (unknown, outsider, other_tenant)
        assert unknown[0] == 400
        assert "does not exist" not in unknown[1]["message"]
        assert "that you can add" in unknown[1]["message"]
    assert not Membership.objects.filter(user__username__in=["zed_outsider", "b_member"], tenant=world.a)


ADD_B_MEMBER = {"tenant": "acme", "user": "b_member", "role": "viewer"}


def test_users_sharing_a_tenant_can_be_added(world: World) -> None:
    """A tenant admin of two tenants adds a member of one to the other; operators add anyone."""
    Membership.objects.create(user=world.users["a_admin"], tenant=world.b, role=Role.VIEWER)
    c = world.client("a_admin")
    r = c.post("/api/v1/memberships/", ADD_B_MEMBER, format="json")
    assert r.status_code == 201, r.json()
    r = c.post("/api/v1/memberships/", ADD_B_MEMBER, format="json")
    assert r.status_code == 409 and "already a member of acme" in r.json()["message"]
    make_user("newcomer")
    r = world.client("operator").post(
        "/api/v1/memberships/", {"tenant": "acme", "user": "newcomer", "role": "member"}, format="json"
    )
    assert r.status_code == 201, r.json()


def test_single_tenant_token_defaults_the_tenant(world: World) -> None:
    """Like every other resource: a token of acme's admin need not name acme."""
    Membership.objects.create(user=world.users["a_admin"], tenant=world.b, role=Role.VIEWER)
    Membership.objects.create(user=world.users["a_member"], tenant=world.b, role=Role.MEMBER)
    Membership.objects.filter(user=world.users["a_member"], tenant=world.a).delete()
    # a_member is now only in bobco; a_admin's acme token sees acme's members only
    c = _token(world, "a_admin", world.a)
    r = c.post("/api/v1/memberships/", {"user": "a_viewer", "role": "admin"}, format="json")
    assert r.status_code == 409 and "already a member of acme" in r.json()["message"], r.json()
    Membership.objects.filter(user=world.users["a_viewer"], tenant=world.a).delete()
    Membership.objects.create(user=world.users["a_viewer"], tenant=world.b, role=Role.VIEWER)
    # session of a_admin (acme and bobco): must name the tenant; with it, adds a bobco user to acme
    s = world.client("a_admin")
    r = s.post("/api/v1/memberships/", {"user": "a_viewer", "role": "viewer"}, format="json")
    assert r.status_code == 400 and "Name the tenant" in r.json()["message"]
    r = s.post("/api/v1/memberships/", {"user": "a_viewer", "tenant": "acme"}, format="json")
    assert r.status_code == 201, r.json()
    # a single-tenant session (b_admin: bobco only) defaults to it
    r = world.client("b_admin").post("/api/v1/memberships/", {"user": "a_member", "role": "admin"},
                                     format="json")  # fmt: skip
    assert r.status_code == 409 and "already a member of bobco" in r.json()["message"]
    Membership.objects.filter(user=world.users["a_member"], tenant=world.b).delete()
    Membership.objects.create(user=world.users["a_member"], tenant=world.a, role=Role.MEMBER)
    Membership.objects.filter(user=world.users["a_viewer"], tenant=world.b).delete()
    bc = _token(world, "b_admin", world.b)
    r = bc.post("/api/v1/memberships/", {"user": "b_member", "role": "admin"}, format="json")
    assert r.status_code == 409 and "already a member of bobco" in r.json()["message"]
    Membership.objects.filter(user=world.users["b_member"], tenant=world.b).delete()
    # b_member now shares no tenant with b_admin: unknown, like any other outsider
    r = bc.post("/api/v1/memberships/", {"user": "b_member", "role": "admin"}, format="json")
    assert r.status_code == 400 and "that you can add" in r.json()["message"]
