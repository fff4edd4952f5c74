"""Issue 15's defects that need no browser, through Django's test client.

Each test names its defect ("D4" is defect 4 of the issue) and failed before its fix.
"""

from __future__ import annotations

import time
from typing import Any

from django.contrib.auth import get_user_model
from django.core.cache import cache

from portal.audit.models import Event
from portal.cloud import metrics
from portal.cloud.models import ComputeNode, Flavor, Instance
from portal.tenancy.models import APIToken, Membership, Quota
from tests.portal.conftest import UP_BOTH, World
from tests.web.helpers import client, taken_snapshot, text


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


def _image(name: str) -> int:
    from portal.images.models import Image

    return int(Image.objects.get(name=name).pk)


def _ready_node_a() -> None:
    ComputeNode.objects.filter(name="node-a").update(
        status="up", vcpus=8, ram_mb=8192, disk_gb=100, drivers=UP_BOTH
    )


def test_d2_revert_offers_taken_snapshots_and_refuses_others(world: World, sent: list[Any]) -> None:
    c = client(world, "a_member")
    url = f"/instances/{world.instance_a.pk}/"
    page = text(c.get(url))
    assert '<select name="name" disabled' in page and "No snapshots yet" in page
    taken_snapshot(world.instance_a, "before-upgrade")
    page = text(c.get(url))
    assert '<option value="before-upgrade">before-upgrade</option>' in page
    sent.clear()
    r = c.post(url + "revert/", {"name": "never-taken"})
    assert r.status_code == 400 and "No snapshot named never-taken has been taken of this VM." in text(r)
    assert sent == [], "an unknown snapshot is refused before anything is sent"


def test_d3_preview_is_a_post_and_takes_16k_of_user_data(world: World) -> None:
    _ready_node_a()
    c = client(world, "a_member")
    page = text(c.get("/instances/new/"))
    assert 'hx-post="/instances/new/preview/"' in page and 'hx-get="/instances/new/preview/' not in page
    events = Event.objects.count()
    body = {"image": _image("sample"), "flavor": world.flavor_public.pk, "kind": "vm",
            "user_data": "#cloud-config\n" + "x" * 12_000}  # fmt: skip
    r = c.post("/instances/new/preview/", body)
    assert r.status_code == 200 and 'data-field="preview-kind">vm<' in text(r)
    assert Event.objects.count() == events, "a preview is a dry run: no audit event"


def test_d9_duplicate_name_is_a_field_error_while_typing(world: World) -> None:
    c = client(world, "a_member")
    body = {"name": "web-1", "image": _image("tiny"), "flavor": world.flavor_public.pk, "kind": "vm"}
    page = text(c.post("/instances/new/preview/", body))
    assert '<p id="name-check" class="error" aria-live="polite" hx-swap-oob="true">' in page
    assert "Tenant acme already has an instance named web-1; choose another name." in page
    assert 'data-field="preview-kind">vm<' in page, "the rest of the preview still shows"
    r = c.post("/instances/new/", {**body, "network": "default"})
    assert r.status_code == 400 and 'id="id_name_error"' in text(r)


def test_d9_a_refusal_shows_once(world: World, sent: list[Any]) -> None:
    ComputeNode.objects.update(status="down")
    c = client(world, "a_member")
    body = {"name": "x1", "image": _image("tiny"), "flavor": world.flavor_public.pk, "kind": "vm",
            "network": "default"}  # fmt: skip
    r = c.post("/instances/new/", body)
    page = text(r)
    assert r.status_code == 409 and page.count("No node can take this VM now") == 1, page
    assert ', load"' not in page, "the preview does not repeat the refusal on load"


def test_d14_capacity_refusal_says_it_is_not_the_quota(world: World) -> None:
    big = Flavor.objects.create(name="huge", vcpus=5000, ram_mb=1024, disk_gb=1)
    Quota.objects.filter(tenant=world.a).update(vcpus=10000)
    c = client(world, "a_member")
    body = {"image": _image("tiny"), "flavor": big.pk, "kind": "vm"}
    page = text(c.post("/instances/new/preview/", body))
    assert "not enough vCPUs" in page
    assert "This is the cloud&#x27;s capacity, not your quota" in page and "smaller flavor" in page


def test_d15_auto_becomes_a_vm_when_the_container_quota_is_full(world: World, sent: list[Any]) -> None:
    _ready_node_a()
    c = client(world, "a_member")
    body = {"image": _image("sample"), "flavor": world.flavor_public.pk, "kind": "auto"}
    assert 'data-field="preview-kind">container<' in text(c.post("/instances/new/preview/", body))
    Quota.objects.filter(tenant=world.a).update(containers=0)
    page = text(c.post("/instances/new/preview/", body))
    assert 'data-field="preview-kind">vm<' in page
    assert "the container quota of acme is full (0 of 0)" in page
    r = c.post("/instances/new/", {**body, "name": "fallback", "network": "default"})
    assert r.status_code == 303 and Instance.objects.get(name="fallback").kind == "vm"
    # kind=container is still refused by the quota: only auto falls back
    r = c.post("/instances/new/", {**body, "name": "ctr", "network": "default", "kind": "container"})
    assert r.status_code == 409 and "Quota exceeded for containers" in text(r)


def test_d16_sizes_in_binary_units_and_events_in_words(world: World, sent: list[Any]) -> None:
    from portal.web.templatetags.web import binary_size

    assert [binary_size(v) for v in (512, 1536, 20 * 2**30, 188_640_000)] == [
        "512 bytes", "1.5 KiB", "20 GiB", "179.9 MiB"
    ]  # fmt: skip
    c = client(world, "a_member")
    assert "up to 20 GiB" in text(c.get("/images/upload/"))
    page = text(c.get(f"/images/{_image('tiny')}/"))
    assert "needs at least 0" not in page and "0 MiB memory" not in page
    c.post(f"/instances/{world.instance_a.pk}/action/", {"action": "reboot"})
    events = text(c.get("/events/"))
    assert (
        '<span class="badge" title="HTTP 303">sent</span>' in events and "success</span> <span" not in events
    )


def test_d11_stats_explain_memory_and_have_a_scale(world: World) -> None:
    inst = world.instance_a
    now = time.time()
    metrics.record(str(inst.pk), now - 60, 1_000_000_000, 180 * 2**20)
    metrics.record(str(inst.pk), now, 2_000_000_000, 190 * 2**20)
    metrics.record(str(inst.pk), now + 60, 3_000_000_000, 189 * 2**20)
    metrics.record(str(inst.pk), now + 120, 4_000_000_000, 185 * 2**20)
    page = text(client(world, "a_member").get(f"/instances/{inst.pk}/stats/"))
    assert "MiB used; the flavor gives 128 MiB" in page
    assert "QEMU process" in page and "can exceed the flavor" in page
    assert ">now</text>" in page and "2 min ago" in page and "190.0 MiB" in page


def test_d12_console_says_the_container_printed_nothing(world: World, sent: list[Any]) -> None:
    inst = world.instance_a
    Instance.objects.filter(pk=inst.pk).update(kind="container")
    c = client(world, "a_member")
    assert "Asking shared-1 for the console" in text(c.get(f"/instances/{inst.pk}/console/"))
    cache.set(f"console-first-req:{inst.pk}", time.time() - 30, 3600)
    assert "No answer from shared-1 for 30 s" in text(c.get(f"/instances/{inst.pk}/console/"))
    metrics.store_console(str(inst.pk), "shared-1", "", time.time())
    page = text(c.get(f"/instances/{inst.pk}/console/"))
    assert "web-1 has printed nothing yet (the container's stdout and stderr are empty)" in page


def test_d8_image_names_are_strict_in_the_api(world: World) -> None:
    c = world.client("a_member")
    r = c.post("/api/v1/images/", {"name": "Bad Name!", "version": "1 0", "tenant": "acme"}, format="json")
    assert r.status_code == 400, r.content
    body = r.json()
    assert "Use letters, digits, dots, dashes and underscores" in str(body["errors"]["name"])
    assert "version" in body["errors"], "every field's error at once"
    assert c.post("/api/v1/images/", {"name": "good_name-1.0", "version": "1.0+b2", "tenant": "acme"},
                  format="json").status_code == 201  # fmt: skip


def test_bulk_actions_with_one_confirmation(world: World, sent: list[Any]) -> None:
    base = world.instance_a
    second = Instance.objects.create(
        tenant=base.tenant, name="web-2", kind="vm", isolation_reason="vm: test", image=base.image,
        flavor=base.flavor, network=base.network, vcpus=1, ram_mb=128, disk_gb=1, created_by=base.created_by,
        vm_state="stopped", power_state="shutdown", node=base.node,
    )  # fmt: skip
    c = client(world, "a_member")
    page = text(c.get("/instances/"))
    assert 'form="bulk" name="id"' in page and 'hx-preserve="true"' in page
    ids = [str(base.pk), str(second.pk)]
    r = c.get("/instances/bulk/", {"action": "stop", "id": ids})
    page = text(r)
    assert r.status_code == 200 and "Shut down 1 instance?" in page
    assert "Skipped, their state does not allow it: web-2 (stopped)." in page
    assert sent == [], "the confirmation page changes nothing"
    r = c.post("/instances/bulk/", {"action": "stop", "id": [str(base.pk)]})
    assert r.status_code == 303 and r["Location"] == "/instances/"
    assert [t for _q, t, _a in sent] == ["compute.instance.action"]
    r = c.post("/instances/bulk/", {"action": "delete", "id": ids})
    assert r.status_code == 303
    assert Instance.objects.get(pk=second.pk).task_state == "deleting"
    assert Event.objects.filter(action="instance.bulk_delete").exists()
    # viewers are refused; another tenant's ids are ignored
    assert (
        client(world, "a_viewer").post("/instances/bulk/", {"action": "stop", "id": ids}).status_code == 403
    )
    r = client(world, "b_admin").get("/instances/bulk/", {"action": "stop", "id": ids})
    assert r.status_code == 303 and r["Location"] == "/instances/"


def test_task_area_shows_running_work_and_node_failures(world: World, sent: list[Any]) -> None:
    c = client(world, "a_member")
    assert 'hx-get="/tasks/panel/"' in text(c.get("/networks/")), "every tenant page has the task area"
    assert "Tasks: 0 running" in text(c.get("/tasks/panel/"))
    c.post(f"/instances/{world.instance_a.pk}/action/", {"action": "reboot"})
    panel = text(c.get("/tasks/panel/"))
    assert "Tasks: 1 running" in panel and '<span class="badge busy">rebooting</span>' in panel
    inst = Instance.objects.get(pk=world.instance_a.pk)
    from portal.cloud.tasks import apply_observation

    apply_observation({"instance_id": str(inst.pk), "node": "shared-1", "action": "reboot",
                       "action_id": inst.action_id, "ok": False, "power_state": "running",
                       "message": "the guest did not answer"})  # fmt: skip
    panel = text(c.get("/tasks/panel/"))
    assert "Tasks: 0 running" in panel and '<strong class="failed">1 failed</strong>' in panel
    assert "reboot" in panel and "the guest did not answer" in panel
    log = text(c.get("/tasks/"))
    assert "Reported by nodes" in log and "the guest did not answer" in log
    # another tenant's work is not shown
    assert "failed" not in text(client(world, "b_admin").get("/tasks/panel/"))


def test_i18n_the_browser_language_picks_the_catalogue(world: World) -> None:
    c = client(world, "a_member")
    page = text(c.get("/", headers={"Accept-Language": "de"}))
    assert '<html lang="de">' in page
    assert ">Abmelden</button>" in page and '<a href="/instances/">Instanzen</a>' in page
    assert "Kontingentnutzung" in page and "Instanz starten" in page
    page = text(c.get("/", headers={"Accept-Language": "en"}))
    assert '<html lang="en">' in page and ">Log out</button>" in page
