"""Issue 15's defects that need no browser, through Django's test client.

Each test names its defect ("D4" is defect 4 of the issue) and failed before its fix.
"""

from __future__ import annotations

from typing import Any

from django.contrib.auth import get_user_model

from portal.cloud.models import Instance
from portal.tenancy.models import APIToken, Membership
from tests.portal.conftest import World
from tests.web.helpers import client, text


def test_d4_current_section_is_marked_with_real_aria_current(world: World) -> None:
    page = text(client(world, "a_member").get("/instances/"))
    assert '<a href="/instances/" aria-current="page">Instances</a>' in page
    assert "&quot;page&quot;" not in page
    assert page.count('aria-current="page"') == 1


def test_d10_token_names_are_unique_and_revoke_says_which(world: World) -> None:
    c = client(world, "a_admin")
    r = c.post("/tokens/", {"name": "ci", "tenant": "acme", "expires_in_days": 5})
    assert r.status_code == 400 and "You already have a token named ci" in text(r)
    assert APIToken.objects.filter(name="ci").count() == 1
    page = text(c.get(f"/tokens/{world.token_a.pk}/revoke/"))
    assert f"Revoke token ci (sky_{world.token_a.key_id}…, tenant acme as tenant admin)?" in page
    assert "last used never" in page
    # a revoked token's name may be used again
    c.post(f"/tokens/{world.token_a.pk}/revoke/")
    r = c.post("/tokens/", {"name": "ci", "tenant": "acme", "expires_in_days": 5})
    assert r.status_code == 303


def test_d17_delete_goes_back_to_the_list(world: World, sent: list[Any]) -> None:
    c = client(world, "a_member")
    r = c.post(f"/instances/{world.instance_a.pk}/delete/")
    assert r.status_code == 303 and r["Location"] == "/instances/"
    assert "Delete of web-1 requested" in text(c.get("/instances/"))


def test_d19_stop_offers_shut_down_and_power_off(world: World, sent: list[Any]) -> None:
    c = client(world, "a_member")
    page = text(c.get(f"/instances/{world.instance_a.pk}/"))
    assert ">Shut down</button>" in page and ">Power off</button>" in page
    r = c.post(f"/instances/{world.instance_a.pk}/action/", {"action": "stop", "force": "1"})
    assert r.status_code == 303
    (_queue, task, args) = sent[-1]
    assert task == "compute.instance.action" and args[0]["params"] == {"force": True}
    assert "Power off sent to shared-1" in text(c.get(f"/instances/{world.instance_a.pk}/"))


def test_d19_tenant_switcher_only_with_a_choice(world: World) -> None:
    page = text(client(world, "a_member").get("/"))
    assert 'id="tenant-switch"' not in page and "Tenant <strong>acme</strong>" in page
    Membership.objects.create(user=world.users["a_member"], tenant=world.b, role="viewer")
    assert 'id="tenant-switch"' in text(client(world, "a_member").get("/"))


def test_d19_without_javascript_the_detail_page_refreshes(world: World) -> None:
    page = text(client(world, "a_member").get(f"/instances/{world.instance_a.pk}/"))
    assert '<noscript><meta http-equiv="refresh" content="10"></noscript>' in page
    Instance.objects.filter(pk=world.instance_a.pk).update(vm_state="deleted")
    page = text(client(world, "a_member").get(f"/instances/{world.instance_a.pk}/"))
    assert 'http-equiv="refresh"' not in page


def test_d19_admin_instances_are_read_only(world: World) -> None:
    admin = get_user_model().objects.create_superuser("root", "root@example.org", "pw-rootroot")
    c = client(world, None)
    c.force_login(admin)
    assert c.get("/admin/cloud/instance/add/").status_code == 403
    r = c.get(f"/admin/cloud/instance/{world.instance_a.pk}/change/")
    assert r.status_code == 200 and 'name="_save"' not in text(r)
    assert c.get(f"/admin/cloud/instance/{world.instance_a.pk}/delete/").status_code == 403
