from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from django.contrib.auth import get_user_model
from rest_framework.test import APIClient

from portal.audit.models import Event, Outcome
from portal.cloud.models import ComputeNode, Flavor, Instance
from portal.tenancy.choices import Role
from portal.tenancy.models import APIToken, Membership, SSHKey, Tenant


def new_ed25519() -> str:
    key = ed25519.Ed25519PrivateKey.generate().public_key()
    return key.public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH).decode() + " test@host"


ED25519 = new_ed25519()


@dataclasses.dataclass
class World:
    a: Tenant
    b: Tenant
    users: dict[str, Any]
    flavor_public: Flavor
    flavor_a: Flavor
    instance_a: Instance
    node_a: ComputeNode
    key_a: SSHKey
    token_a: APIToken
    event_a: Event
    membership_a: Membership

    def client(self, who: str) -> APIClient:
        c = APIClient()
        c.force_login(self.users[who])
        return c


def make_user(username: str, **extra: Any) -> Any:
    return get_user_model().objects.create_user(username=username, password="pw-" + username * 2, **extra)


@pytest.fixture
def world(db: Any) -> World:
    a = Tenant.objects.create(slug="acme", name="Acme")
    b = Tenant.objects.create(slug="bobco", name="Bob Co")
    users = {
        "a_admin": make_user("a_admin"),
        "a_member": make_user("a_member"),
        "a_viewer": make_user("a_viewer"),
        "b_admin": make_user("b_admin"),
        "b_member": make_user("b_member"),
        "operator": make_user("operator", is_staff=True),
    }
    Membership.objects.create(user=users["a_admin"], tenant=a, role=Role.ADMIN)
    membership_a = Membership.objects.create(user=users["a_member"], tenant=a, role=Role.MEMBER)
    Membership.objects.create(user=users["a_viewer"], tenant=a, role=Role.VIEWER)
    Membership.objects.create(user=users["b_admin"], tenant=b, role=Role.ADMIN)
    Membership.objects.create(user=users["b_member"], tenant=b, role=Role.MEMBER)
    flavor_public = Flavor.objects.create(name="m1.tiny", vcpus=1, ram_mb=128, disk_gb=1)
    flavor_a = Flavor.objects.create(
        name="acme.big", vcpus=2, ram_mb=512, disk_gb=4, is_public=False, tenant=a
    )
    instance_a = Instance.objects.create(
        tenant=a,
        name="web-1",
        kind="vm",
        isolation_reason="vm: test",
        image="busybox:1",
        flavor=flavor_public,
        vcpus=1,
        ram_mb=128,
        disk_gb=1,
        created_by=users["a_member"],
    )
    node_a = ComputeNode.objects.create(name="node-a", queue="node.node-a", tenancy="dedicated", owner=a)
    key_a = SSHKey.objects.create(user=users["a_admin"], name="laptop", public_key=ED25519)
    token = APIToken(
        user=users["a_admin"],
        membership=Membership.objects.get(user=users["a_admin"]),
        name="ci",
        expires_at="2999-01-01T00:00:00Z",
    )
    token.issue()
    token.save()
    event_a = Event.objects.create(
        tenant=a, action="test.event", outcome=Outcome.SUCCESS, actor_name="a_admin"
    )
    return World(
        a, b, users, flavor_public, flavor_a, instance_a, node_a, key_a, token, event_a, membership_a
    )
