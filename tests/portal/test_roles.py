"""Viewers read, members create and use instances, tenant admins manage members."""

from __future__ import annotations

from portal.tenancy.choices import Role
from portal.tenancy.models import Membership
from tests.portal.conftest import FakeNodes, World


def _instance_body(w: World, name: str = "app-1") -> dict[str, object]:
    return {
        "tenant": "acme",
        "name": name,
        "image": "tiny:1",
        "flavor": w.flavor_public.pk,
        "kind": "vm",
    }


def test_viewer_cannot_write(world: World) -> None:
    c = world.client("a_viewer")
    assert c.get("/api/v1/instances/").status_code == 200
    r = c.post("/api/v1/instances/", _instance_body(world), format="json")
    assert r.status_code == 403
    assert "member role" in r.json()["message"]
    assert c.delete(f"/api/v1/instances/{world.instance_a.pk}/").status_code == 403
    assert (
        c.patch(f"/api/v1/instances/{world.instance_a.pk}/", {"name": "x"}, format="json").status_code == 403
    )
    assert c.patch("/api/v1/tenants/acme/", {"name": "x"}, format="json").status_code == 403
    r = c.post(
        "/api/v1/memberships/", {"tenant": "acme", "user": "b_member", "role": "viewer"}, format="json"
    )
    assert r.status_code == 403


def test_member_uses_instances_but_not_memberships(world: World, nodes: FakeNodes) -> None:
    c = world.client("a_member")
    r = c.post("/api/v1/instances/", _instance_body(world), format="json")
    assert r.status_code == 202, r.json()
    body = r.json()
    assert body["decided_kind"] == "vm" and body["isolation_reason"]
    assert body["vm_state"] == "building" and body["created_by"] == "a_member"
    r = c.post(
        "/api/v1/memberships/", {"tenant": "acme", "user": "b_member", "role": "viewer"}, format="json"
    )
    assert r.status_code == 403
    nodes.run()
    assert c.delete(f"/api/v1/instances/{body['id']}/").status_code == 202
    nodes.run()
    assert c.get(f"/api/v1/instances/{body['id']}/").json()["vm_state"] == "deleted"


def test_tenant_admin_manages_memberships(world: World) -> None:
    # tenant admins add users they already share a tenant with (tests/security/test_memberships.py)
    Membership.objects.create(user=world.users["a_admin"], tenant=world.b, role=Role.VIEWER)
    c = world.client("a_admin")
    r = c.post(
        "/api/v1/memberships/", {"tenant": "acme", "user": "b_member", "role": "viewer"}, format="json"
    )
    assert r.status_code == 201, r.json()
    mid = r.json()["id"]
    assert (
        c.patch(f"/api/v1/memberships/{mid}/", {"role": "member"}, format="json").json()["role"] == "member"
    )
    r = c.patch(f"/api/v1/memberships/{mid}/", {"user": "a_viewer"}, format="json")
    assert r.status_code == 400
    assert c.delete(f"/api/v1/memberships/{mid}/").status_code == 204
    # admin may rename the tenant but not disable it or change quotas
    assert c.patch("/api/v1/tenants/acme/", {"name": "Acme Ltd"}, format="json").status_code == 200
    assert c.patch("/api/v1/tenants/acme/", {"active": False}, format="json").status_code == 403
    assert c.patch(f"/api/v1/quotas/{world.a.quota.pk}/", {"instances": 99}, format="json").status_code == 403
    assert c.post("/api/v1/tenants/", {"slug": "new", "name": "New"}, format="json").status_code == 403
    assert (
        c.post(
            "/api/v1/flavors/", {"name": "f", "vcpus": 1, "ram_mb": 64, "disk_gb": 1}, format="json"
        ).status_code
        == 403
    )


def test_operator_manages_tenants_quotas_flavors_nodes(world: World) -> None:
    c = world.client("operator")
    assert c.post("/api/v1/tenants/", {"slug": "newco", "name": "New Co"}, format="json").status_code == 201
    r = c.get("/api/v1/quotas/", {"tenant__slug": "newco"}).json()["results"][0]
    assert r["instances"] == 10 and r["usage"]["instances"] == 0
    assert c.patch(f"/api/v1/quotas/{r['id']}/", {"instances": 3}, format="json").json()["instances"] == 3
    assert (
        c.post(
            "/api/v1/flavors/", {"name": "m1.x", "vcpus": 1, "ram_mb": 64, "disk_gb": 1}, format="json"
        ).status_code
        == 201
    )
    r = c.post("/api/v1/nodes/", {"name": "n2", "tenancy": "dedicated"}, format="json")
    assert r.status_code == 400 and "owner" in r.json()["errors"]
    r = c.post(
        "/api/v1/nodes/", {"name": "n2", "tenancy": "dedicated", "owner": "bobco", "vcpus": 4}, format="json"
    )
    assert r.status_code == 201 and r.json()["queue"] == "node.n2"


def test_ssh_keys_are_per_user(world: World) -> None:
    from tests.portal.conftest import new_ed25519

    c = world.client("a_member")
    r = c.post("/api/v1/ssh-keys/", {"name": "k", "public_key": new_ed25519()}, format="json")
    assert r.status_code == 201 and r.json()["fingerprint"].startswith("SHA256:")
    # same user cannot see a_admin's key even in the same tenant
    assert c.get(f"/api/v1/ssh-keys/{world.key_a.pk}/").status_code == 404
    for bad, why in [
        ("ssh-rsa AAAA", "valid"),
        ("-----BEGIN OPENSSH PRIVATE KEY-----", "private"),
        ("hello", "Expected"),
    ]:
        r = c.post("/api/v1/ssh-keys/", {"name": "bad", "public_key": bad}, format="json")
        assert r.status_code == 400 and why in r.json()["message"], r.json()
