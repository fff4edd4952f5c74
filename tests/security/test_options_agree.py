"""OPTIONS (its Allow header) and the OpenAPI schema list the same methods on every path (issue 12, item 9).

Before: OPTIONS on /images/{id}/ advertised PUT, which the schema does not
list (PUT is only for /images/{id}/file/) and which answered 405.
"""

from __future__ import annotations

import yaml

from portal.cloud.models import ComputeNode, ExternalAddress, PublishedPort, SecurityGroup, SecurityGroupRule
from portal.metering.models import Budget, PriceSheet
from portal.storage.models import Backup, Volume
from portal.tenancy.models import APIToken, SSHKey
from tests.portal.conftest import ED25519, World


def test_allow_header_matches_the_schema_everywhere(world: World) -> None:
    c = world.client("operator")
    op = world.users["operator"]
    key = SSHKey.objects.create(user=op, name="op", public_key=ED25519)
    token = APIToken(user=op, name="op", expires_at="2999-01-01T00:00:00Z")
    token.issue()
    token.save()
    image = world.instance_a.image
    assert image is not None
    external = ExternalAddress.objects.create(
        node=ComputeNode.objects.get(name="shared-1"), address="198.18.9.1"
    )
    published = PublishedPort.objects.create(
        tenant=world.a,
        instance=world.instance_a,
        protocol="tcp",
        port=80,
        external=external,
        external_port=20000,
    )
    group = SecurityGroup.objects.create(tenant=world.a, name="web")
    rule = SecurityGroupRule.objects.create(
        group=group, direction="ingress", protocol="tcp", port_min=80, port_max=80
    )
    ids = {
        "events": world.event_a.pk,
        "flavors": world.flavor_public.pk,
        "images": image.pk,
        "instances": world.instance_a.pk,
        "memberships": world.membership_a.pk,
        "networks": world.instance_a.network_id,
        "nodes": "shared-1",
        "quotas": world.a.quota.pk,
        "ssh-keys": key.pk,
        "tenants": "acme",
        "tokens": token.pk,
        "prices": PriceSheet.objects.create(effective_from="2026-01-01").pk,
        "budgets": Budget.objects.create(tenant=world.a, monthly_amount=10).pk,
        "usage": "",  # a report: no detail path
        "published-ports": published.pk,
        "security-groups": group.pk,
        "security-group-rules": rule.pk,
        "volumes": Volume.objects.create(tenant=world.a, name="v", size_gb=1, node=external.node).pk,
    }
    backups = {
        "volumes": Backup.objects.create(
            tenant=world.a, volume_id=ids["volumes"], volume_name="v", format="qcow2", size_gb=1
        ),
        "instances": Backup.objects.create(
            tenant=world.a, instance=world.instance_a, volume_name="i", format="qcow2", size_gb=1
        ),
    }
    doc = yaml.safe_load(c.get("/api/schema/").content)
    checked = 0
    for path, item in doc["paths"].items():
        resource = path.split("/")[3]
        url = path
        for param in ("{id}", "{name}", "{slug}"):
            url = url.replace(param, str(ids[resource]))
        if "{bid}" in url:  # a volume's or an instance's backup
            url = url.replace("{bid}", str(backups[resource].pk))
        r = c.options(url)
        assert r.status_code == 200, (url, r.status_code)
        allowed = {m.strip().lower() for m in r["Allow"].split(",")} - {"head", "options"}
        assert allowed == set(item), (path, sorted(allowed), sorted(item))
        checked += 1
    assert checked >= 28


def test_put_on_an_image_is_405_with_a_hint(world: World) -> None:
    image = world.instance_a.image
    assert image is not None
    r = world.client("operator").put(f"/api/v1/images/{image.pk}/", {"name": "x"}, format="json")
    assert r.status_code == 405
    assert "PUT /images/{id}/file/" in r.json()["message"]
    assert "PUT" not in r["Allow"]
