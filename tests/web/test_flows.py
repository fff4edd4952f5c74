"""Writes through the browser UI: each goes through the domain services and is audited."""

from __future__ import annotations

import re
from typing import Any

from django.db import transaction

from compute.spec import Kind
from portal.audit.models import Event
from portal.cloud import services, states
from portal.cloud.choices import VmState
from portal.cloud.models import ComputeNode, Instance
from portal.cloud.tasks import apply_node_report
from portal.errors import InvalidAction
from portal.storage.models import Snapshot
from portal.tenancy.models import APIToken, Quota, SSHKey
from portal.web.presenters import action_allowed, sparkline_points
from tests.portal.conftest import UP_BOTH, FakeNodes, World, heartbeat, new_ed25519
from tests.web.helpers import client, taken_snapshot, text


def _image(name: str) -> int:
    from portal.images.models import Image

    return Image.objects.get(name=name).pk


def _ready_node_a() -> None:
    ComputeNode.objects.filter(name="node-a").update(
        status="up", vcpus=8, ram_mb=8192, disk_gb=100, drivers=UP_BOTH
    )


def test_launch_form_errors_keep_input(world: World, sent: list[Any]) -> None:
    c = client(world, "a_member")
    body = {"name": "Bad Name!", "image": _image("tiny"), "flavor": world.flavor_public.pk, "kind": "vm",
            "network": "default", "user_data": "#!/bin/sh\necho kept\n"}  # fmt: skip
    r = c.post("/instances/new/", body)
    page = text(r)
    assert r.status_code == 400
    assert "Use lower-case letters" in page and 'value="Bad Name!"' in page
    assert "echo kept" in page and 'aria-invalid="true"' in page
    r = c.post("/instances/new/", {**body, "name": "ok", "image": "999999", "kind": "lxc"})
    page = text(r)
    assert r.status_code == 400 and "Select a valid choice" in page and 'value="ok"' in page
    # a private flavor of another tenant is not offered, and refused if posted
    r = c.post("/instances/new/", {**body, "name": "ok", "flavor": "999"})
    assert r.status_code == 400
    # the service's refusal (container without a dedicated node) is shown, input kept
    ComputeNode.objects.filter(name="node-a").delete()
    r = c.post("/instances/new/", {**body, "name": "ctr", "image": _image("busybox"), "kind": "container"})
    assert r.status_code == 409 and "dedicate" in text(r) and 'value="ctr"' in text(r)
    assert Instance.objects.filter(tenant=world.a).count() == 1 and sent == []


def test_preview_then_launch_uses_the_services(world: World, sent: list[Any]) -> None:
    _ready_node_a()
    c = client(world, "a_member")
    q = {"name": "", "image": _image("sample"), "flavor": world.flavor_public.pk, "kind": "auto"}
    page = text(c.get("/instances/new/preview/", q))
    assert "container on node-a: dedicated to acme" in page
    assert re.search(r"Containers</th><td class=\"num\">0</td><td class=\"num\">\+1</td>", page)
    assert Instance.objects.filter(tenant=world.a).count() == 1
    page = text(c.get("/instances/new/preview/", {**q, "kind": "vm"}))
    assert "Runs as" in page and ">vm<" in page
    r = c.post("/instances/new/", {**q, "name": "app", "network": "default", "ssh_keys": []})
    inst = Instance.objects.get(tenant=world.a, name="app")
    assert (r.status_code, r["Location"]) == (303, f"/instances/{inst.pk}/")
    assert (inst.kind, inst.node.name if inst.node else None) == ("container", "node-a")
    assert sent[0][:2] == ("node.node-a", "compute.instance.create")
    ev = Event.objects.get(action="instance.create", object_id=str(inst.pk), path="/instances/new/")
    assert (ev.tenant, ev.actor_name, ev.status_code) == (world.a, "a_member", 303)
    detail = text(c.get(r["Location"]))
    assert "container on node-a: dedicated to acme" in detail and "spawning" in detail


def test_ssh_key_is_injected_when_chosen(world: World, sent: list[Any]) -> None:
    key = SSHKey.objects.create(user=world.users["a_member"], name="mine", public_key=new_ed25519())
    c = client(world, "a_member")
    r = c.post("/instances/new/", {"name": "k", "image": _image("tiny"), "flavor": world.flavor_public.pk,
                                   "kind": "vm", "network": "default", "ssh_keys": [key.pk]})  # fmt: skip
    assert r.status_code == 303
    assert Instance.objects.get(name="k").ssh_keys == [key.public_key]
    other = world.key_a.pk  # a_admin's key is not offered to a_member
    r = c.post("/instances/new/", {"name": "k2", "image": _image("tiny"), "flavor": world.flavor_public.pk,
                                   "kind": "vm", "network": "default", "ssh_keys": [other]})  # fmt: skip
    assert r.status_code == 400 and not Instance.objects.filter(name="k2").exists()


def test_actions_and_delete_follow_the_state(world: World, nodes: FakeNodes) -> None:
    c = client(world, "a_member")
    c.post("/instances/new/", {"name": "vm1", "image": _image("tiny"), "flavor": world.flavor_public.pk,
                               "kind": "vm", "network": "default"})  # fmt: skip
    inst = Instance.objects.get(name="vm1")
    url = f"/instances/{inst.pk}/"
    status = text(c.get(url + "status/"))
    assert 'value="stop" disabled' in status and "spawning" in status
    r = c.post(url + "action/", {"action": "stop"})
    assert r.status_code == 409 and "busy (spawning)" in text(r)
    nodes.run()
    status = text(c.get(url + "status/"))
    assert 'value="stop" disabled' not in status and 'value="start" disabled' in status
    r = c.post(url + "action/", {"action": "stop"})
    assert r.status_code == 303
    nodes.run()
    assert Instance.objects.get(pk=inst.pk).vm_state == "stopped"
    r = c.post(url + "action/", {"action": "reboot"})
    assert r.status_code == 409 and "while it is stopped" in text(r)
    r = c.post(url + "action/", {"action": "explode"})
    assert r.status_code == 409 and "Unknown action" in text(r)
    r = c.post(url + "action/", {"action": "snapshot", "name": "../x"})
    assert r.status_code == 400 and 'value="../x"' in text(r)
    assert c.post(url + "action/", {"action": "snapshot", "name": "s1"}).status_code == 303
    nodes.run()
    assert "Delete instance vm1?" in text(c.get(url + "delete/"))
    r = c.post(url + "delete/")
    assert r.status_code == 303 and Instance.objects.get(pk=inst.pk).task_state == "deleting"
    nodes.run()
    assert Instance.objects.get(pk=inst.pk).vm_state == "deleted"
    assert c.get(url + "status/").status_code == 286, "polling stops for a deleted instance"
    actions = set(Event.objects.filter(object_id=str(inst.pk), path__startswith="/instances/")
                  .values_list("action", "outcome"))  # fmt: skip
    assert {("instance.stop", "success"), ("instance.stop", "failure"), ("instance.delete", "success"),
            ("instance.snapshot", "success")} <= actions  # fmt: skip


def test_list_filters_and_rows_partial(world: World, sent: list[Any]) -> None:
    c = client(world, "a_member")
    page = text(c.get("/instances/", {"q": "web", "state": "active", "kind": "vm"}))
    assert 'data-instance="web-1"' in page and 'hx-trigger="every 2s"' in page
    assert 'data-instance="web-1"' not in text(c.get("/instances/rows/", {"kind": "container"}))
    assert 'data-instance="web-1"' not in text(c.get("/instances/", {"q": "zzz"}))
    r = c.get("/instances/", {"state": "bogus", "page": "x"})
    assert r.status_code == 200 and "(ignored)" in text(r) and 'data-instance="web-1"' in text(r)
    Instance.objects.filter(pk=world.instance_a.pk).update(vm_state="deleted")
    assert 'data-instance="web-1"' not in text(c.get("/instances/"))
    assert 'data-instance="web-1"' in text(c.get("/instances/", {"state": "deleted"}))


def test_dashboard_shows_usage_and_counts(world: World) -> None:
    page = text(client(world, "a_viewer").get("/"))
    assert 'aria-label="Instances" aria-valuemin="0" aria-valuemax="10" aria-valuenow="1"' in page
    assert "Dedicated node: node-a" in page


def test_tokens_key_shown_once_and_revoked(world: World) -> None:
    c = client(world, "a_viewer")  # any member may hold tokens for its own membership (as the API)
    r = c.post("/tokens/", {"name": "ci", "tenant": "acme", "expires_in_days": "400"})
    assert r.status_code == 400 and "At most 365 days" in text(r) and 'value="ci"' in text(r)
    r = c.post("/tokens/", {"name": "ci", "tenant": "bobco", "expires_in_days": "7"})
    assert r.status_code == 400 and not APIToken.objects.filter(user=world.users["a_viewer"]).exists()
    r = c.post("/tokens/", {"name": "ci", "tenant": "acme", "expires_in_days": "7"})
    # POST/redirect/GET: the POST answers no key, only where to read it (once)
    assert (r.status_code, r["Location"]) == (303, "/tokens/") and "sky_" not in text(r)
    shown = c.get("/tokens/")
    assert shown.status_code == 200 and shown["Cache-Control"] == "no-store"
    key = re.search(r'value="(sky_[0-9a-f]{16}_[^"]+)"', text(shown))
    assert key is not None and "Token ci is created" in text(shown)
    token = APIToken.objects.get(user=world.users["a_viewer"])
    assert token.membership is not None and token.membership.role == "viewer"
    assert token.key_hash == APIToken.hash_secret(key[1].split("_", 2)[2])
    # a reload is a GET of the page: the key is gone and no second token is created
    again = text(c.get("/tokens/"))
    assert key[1] not in again and 'id="new-key"' not in again, "the key is shown once"
    assert APIToken.objects.filter(user=world.users["a_viewer"]).count() == 1
    assert "skyport_new_token" not in c.session, "the key does not stay in the session"
    api = client(world, None)
    assert api.get("/api/v1/instances/", headers={"Authorization": f"Bearer {key[1]}"}).status_code == 200
    assert "Revoke token ci (sky_" in text(c.get(f"/tokens/{token.pk}/revoke/"))
    assert c.post(f"/tokens/{token.pk}/revoke/").status_code == 303
    assert api.get("/api/v1/instances/", headers={"Authorization": f"Bearer {key[1]}"}).status_code == 401
    assert Event.objects.filter(action="apitoken.revoke", object_id=str(token.pk), outcome="success").exists()


def test_ssh_keys_add_and_delete(world: World) -> None:
    c = client(world, "a_admin")
    r = c.post("/ssh-keys/", {"name": "laptop", "public_key": "ssh-rsa AAAA nope"})
    page = text(r)
    assert r.status_code == 400 and "already have a key with this name" in page and "Not a valid" in page
    r = c.post("/ssh-keys/", {"name": "other", "public_key": world.key_a.public_key})
    assert r.status_code == 400 and "already added this key" in text(r)
    r = c.post("/ssh-keys/", {"name": "priv", "public_key": "-----BEGIN OPENSSH PRIVATE KEY----- x"})
    assert r.status_code == 400 and "private key" in text(r)
    r = c.post("/ssh-keys/", {"name": "desk", "public_key": new_ed25519()})
    assert r.status_code == 303
    key = SSHKey.objects.get(name="desk")
    assert c.post(f"/ssh-keys/{key.pk}/delete/").status_code == 303
    assert not SSHKey.objects.filter(pk=key.pk).exists()
    assert Event.objects.filter(action="sshkey.delete", outcome="success").count() == 1


def test_operator_dedicates_shares_drains_and_edits_quota(world: World) -> None:
    op = client(world, "operator")
    r = op.post("/ops/nodes/shared-1/tenancy/", {"owner": "bobco"})
    assert r.status_code == 409 and "hosts instances of acme" in text(r)
    r = op.post("/ops/nodes/shared-1/tenancy/", {"owner": "acme"})
    assert r.status_code == 303
    assert ComputeNode.objects.get(name="shared-1").owner == world.a
    r = op.post("/ops/nodes/shared-1/tenancy/", {"owner": "nobody"})
    assert r.status_code == 400
    assert op.post("/ops/nodes/node-a/tenancy/", {"owner": ""}).status_code == 303
    assert ComputeNode.objects.get(name="node-a").tenancy == "shared"
    assert op.post("/ops/nodes/nope/tenancy/", {"owner": ""}).status_code == 404
    nodes_page = text(op.get("/ops/nodes/"))
    assert 'href="/ops/nodes/shared-1/drain/"' in nodes_page, "drain is a link to its confirmation page"
    # GET only asks: the node stays up, however often the page is opened
    for _ in range(2):
        r = op.get("/ops/nodes/shared-1/drain/")
        assert r.status_code == 200 and "Drain node shared-1?" in text(r)
        assert "Instances already there keep running (1 now)" in text(r)
        assert ComputeNode.objects.get(name="shared-1").status == "up"
    # an "enable" from a page rendered before enable had its own URL does not drain
    r = op.post("/ops/nodes/shared-1/drain/", {"enable": "1"})
    assert r.status_code == 400 and "Nothing changed" in text(r)
    assert ComputeNode.objects.get(name="shared-1").status == "up"
    assert op.post("/ops/nodes/shared-1/drain/").status_code == 303
    assert ComputeNode.objects.get(name="shared-1").status == "disabled"
    assert "Enable scheduling" in text(op.get("/ops/nodes/"))
    assert op.get("/ops/nodes/shared-1/enable/").status_code == 405, "enable is a POST"
    assert op.post("/ops/nodes/shared-1/enable/").status_code == 303
    assert ComputeNode.objects.get(name="shared-1").status == "down"
    assert op.get("/ops/nodes/nope/drain/").status_code == 404
    ev = Event.objects.filter(path__startswith="/ops/nodes/").values_list("action", "status_code")
    assert ("computenode.dedicate", 409) in ev and ("computenode.disable", 303) in ev
    assert ("computenode.enable", 303) in ev
    r = op.post("/ops/tenants/acme/quota/", {"instances": "-1", "vcpus": "4", "ram_mb": "x", "disk_gb": "1",
                                             "containers": "1", "vms": "1"})  # fmt: skip
    assert r.status_code == 400 and 'value="-1"' in text(r) and 'value="x"' in text(r)
    r = op.post("/ops/tenants/acme/quota/", {"instances": "3", "vcpus": "4", "ram_mb": "1024",
                                             "disk_gb": "1", "containers": "1", "vms": "1"})  # fmt: skip
    assert r.status_code == 303 and Quota.objects.get(tenant=world.a).instances == 3
    assert op.get("/ops/tenants/nope/quota/").status_code == 404


def test_ops_lists_orphans_drift_and_filters(world: World) -> None:
    orphan = {"instance_id": "11111111-2222-3333-4444-555555555555", "kind": "vm", "power_state": "running"}
    apply_node_report(heartbeat("shared-1", kinds=("vm",), inventory=[orphan]))
    op = client(world, "operator")
    page = text(op.get("/ops/drift/"))
    assert "11111111-2222-3333-4444-555555555555" in page and "reconcile.orphans" in page
    assert "web-1" in page and "missing on node shared-1" in page
    assert "web-1" in text(op.get("/ops/instances/", {"tenant": "acme", "node": "shared-1"}))
    assert "web-1" not in text(op.get("/ops/instances/", {"tenant": "bobco"}))
    assert "reconcile.missing" in text(op.get("/ops/events/", {"action": "reconcile."}))
    assert op.get("/ops/events/", {"tenant": "nope", "page": "99"}).status_code == 200


def test_action_buttons_match_what_the_service_accepts(world: World) -> None:
    """For every state, kind and action, a page offers exactly what ``services.act`` accepts."""
    inst = world.instance_a
    user = world.users["a_member"]
    for state in VmState.values:
        for kind in (Kind.VM, Kind.CONTAINER):
            for action in states.PUBLIC_ACTIONS:
                Instance.objects.filter(pk=inst.pk).update(vm_state=state, kind=kind, task_state=None)
                inst.refresh_from_db()
                offered = action_allowed(inst, action)
                try:
                    with transaction.atomic():
                        services.act(inst, action, {"name": "s1"}, user)
                        raise _Accepted
                except _Accepted:
                    accepted = True
                except InvalidAction:
                    accepted = False
                assert offered is accepted, (state, kind, action)
    inst.vm_state, inst.task_state = VmState.ACTIVE, "stopping"
    assert not any(action_allowed(inst, a) for a in states.PUBLIC_ACTIONS)


class _Accepted(Exception):
    """Rolls back an accepted action inside the test."""


def test_sparkline_points_scale_into_the_box() -> None:
    assert sparkline_points([]) == "" and sparkline_points([5]) == ""
    assert sparkline_points([0, 10], width=100, height=20) == "0.0,20.0 100.0,0.0"
    assert sparkline_points([3, 3, 3], width=10, height=10) == "0.0,10.0 5.0,10.0 10.0,10.0"


def test_publish_form_errors_keep_input_and_success_goes_to_the_image(world: World, sent: list[Any]) -> None:
    c = client(world, "a_member")
    inst = world.instance_a
    r = c.post(f"/instances/{inst.pk}/publish/", {"name": "bad name", "version": "1", "description": "kept"})
    assert r.status_code == 400 and 'value="bad name"' in text(r) and "kept" in text(r)
    r = c.post(f"/instances/{inst.pk}/publish/", {"name": "secret", "version": "1"})
    assert r.status_code == 400 and "already exists in tenant acme" in text(r)
    r = c.post(f"/instances/{inst.pk}/publish/", {"name": "web-disk", "version": "1"})
    assert r.status_code == 303
    from portal.images.models import Image

    image = Image.objects.get(name="web-disk")
    assert r["Location"] == f"/images/{image.pk}/"
    assert (image.owner_id, image.status, image.source_instance_id) == (world.a.pk, "queued", inst.pk)
    assert sent[-1][1] == "compute.instance.action" and sent[-1][2][0]["action"] == "publish"
    assert Event.objects.filter(action="instance.publish", status_code=303).exists()
    page = text(c.get(f"/images/{image.pk}/"))
    assert 'hx-trigger="every 2s"' in page and "waiting for node shared-1" in page
    # viewers cannot publish
    r = client(world, "a_viewer").post(f"/instances/{inst.pk}/publish/", {"name": "v", "version": "1"})
    assert r.status_code == 403


def test_image_delete_confirms_and_refuses_while_in_use(world: World) -> None:
    from portal.images.models import Image

    image = world.instance_a.image
    assert image is not None
    Image.objects.filter(pk=image.pk).update(owner=world.a)
    c = client(world, "a_member")
    assert "Delete image" in text(c.get(f"/images/{image.pk}/delete/"))
    r = c.post(f"/images/{image.pk}/delete/")
    assert r.status_code == 409 and "used by 1 instance" in text(r)
    unused = Image.objects.create(name="old", version="1", owner=world.a, status="active")
    r = c.post(f"/images/{unused.pk}/delete/")
    assert r.status_code == 303 and not Image.objects.filter(pk=unused.pk).exists()
    # public images: only operators; another tenant's: 404
    public = Image.objects.get(name="busybox")
    assert c.post(f"/images/{public.pk}/delete/").status_code == 403
    assert client(world, "b_admin").get(f"/images/{image.pk}/delete/").status_code == 404


def test_upload_page_needs_the_member_role(world: World) -> None:
    assert client(world, "a_viewer").get("/images/upload/").status_code == 403
    page = text(client(world, "a_member").get("/images/upload/"))
    assert 'data-tenant="acme"' in page and 'data-api="/api/v1/images/"' in page


def test_panels_stop_polling_once_the_instance_is_deleted(world: World, sent: list[Any]) -> None:
    c = client(world, "a_member")
    url = f"/instances/{world.instance_a.pk}/"
    for part, every in (("status/", "every 2s"), ("console/", "every 2s"), ("stats/", "every 5s")):
        r = c.get(url + part)
        assert r.status_code == 200 and f'hx-trigger="{every}"' in text(r), part
    Instance.objects.filter(pk=world.instance_a.pk).update(vm_state=VmState.DELETED, power_state="nostate")
    for part in ("status/", "console/", "stats/"):
        r = c.get(url + part)
        # 286 stops the element that asked; the panel it is replaced with has no trigger left
        assert r.status_code == 286, part
        assert "hx-trigger" not in text(r) and "hx-get" not in text(r), part
    assert "the instance is deleted" in text(c.get(url + "stats/"))


def test_revert_asks_for_confirmation_first(world: World, sent: list[Any]) -> None:
    c = client(world, "a_member")
    inst = world.instance_a
    url = f"/instances/{inst.pk}/"
    # a snapshot the portal does not list (no Snapshot row) is refused before any confirmation
    r = c.get(url + "revert/", {"name": "before-upgrade"})
    assert r.status_code == 400
    assert "No snapshot named before-upgrade has been taken of this VM." in text(r)
    # one still being taken is not offered either
    Snapshot.objects.create(tenant=inst.tenant, instance=inst, name="before-upgrade", status="creating")
    assert c.get(url + "revert/", {"name": "before-upgrade"}).status_code == 400
    Snapshot.objects.filter(instance=inst).update(status="missing")
    assert c.get(url + "revert/", {"name": "before-upgrade"}).status_code == 400, "nor one the node lost"
    Snapshot.objects.filter(instance=inst).delete()
    taken_snapshot(inst, "before-upgrade")
    assert Snapshot.objects.get(instance=inst, name="before-upgrade").status == "available"
    sent.clear()
    detail = text(c.get(url))
    assert f'<form method="get" action="{url}revert/"' in detail, "revert is a GET form to its confirmation"
    assert 'value="revert"' not in detail, "no button posts a revert at once"
    # GET only asks, however often: nothing is sent and the instance is not claimed
    for _ in range(2):
        r = c.get(url + "revert/", {"name": "before-upgrade"})
        page = text(r)
        assert r.status_code == 200 and "Revert web-1 to snapshot before-upgrade?" in page
        assert "What changed in web-1 since snapshot before-upgrade was taken is lost" in page
        assert '<input type="hidden" name="name" value="before-upgrade">' in page
        assert f'href="{url}"' in page, "Cancel goes back to the instance"
    assert sent == [] and Instance.objects.get(pk=inst.pk).task_state is None
    r = c.get(url + "revert/", {"name": "../etc"})
    assert r.status_code == 400 and "No snapshot named ../etc has been taken" in text(r)
    # posting a revert action directly is refused: it must go through the confirmation
    r = c.post(url + "action/", {"action": "revert", "name": "before-upgrade"})
    assert r.status_code == 400 and "asks for confirmation" in text(r)
    assert sent == [] and Instance.objects.get(pk=inst.pk).task_state is None
    # POST (the confirmation page's button) sends it
    r = c.post(url + "revert/", {"name": "before-upgrade"})
    assert (r.status_code, r["Location"]) == (303, url)
    action_id = Instance.objects.get(pk=inst.pk).action_id
    message = {"instance_id": str(inst.pk), "kind": "vm", "action": "revert", "action_id": action_id}
    assert [m[1:] for m in sent] == [
        ("compute.instance.action", [message | {"params": {"name": "before-upgrade"}}])
    ]
    assert Instance.objects.get(pk=inst.pk).task_state == "reverting"
    assert Event.objects.filter(action="instance.revert", object_id=str(inst.pk), status_code=303).exists()
    # a busy instance is not offered the confirmation; a viewer is refused both ways
    r = c.get(url + "revert/", {"name": "before-upgrade"})
    assert r.status_code == 409 and "cannot be reverted: it is reverting" in text(r)
    viewer = client(world, "a_viewer")
    assert viewer.get(url + "revert/", {"name": "x"}).status_code == 403
    assert viewer.post(url + "revert/", {"name": "x"}).status_code == 403
    assert len(sent) == 1


def test_paging_keeps_the_filters_and_htmx_filters_push_their_query(world: World) -> None:
    base = world.instance_a
    Instance.objects.bulk_create(
        Instance(tenant=world.a, name=f"bulk-{kind[0]}{n:02}", kind=kind, isolation_reason="test",
                 image=base.image, flavor=base.flavor, network=base.network, vcpus=1, ram_mb=128, disk_gb=1,
                 vm_state="active")
        for n in range(60) for kind in ("vm", "container")
    )  # fmt: skip
    c = client(world, "a_member")
    page = text(c.get("/instances/"))
    assert 'hx-get="/instances/" hx-target="#instance-results" hx-swap="outerHTML" hx-push-url="true"' in page
    # what the filter form's htmx request gets: the rows and the pagination, both with the filters
    hx = {"HX-Request": "true", "HX-Target": "instance-results"}
    r = c.get("/instances/", {"q": "bulk", "state": "", "kind": "vm"}, headers=hx)
    part = text(r)
    assert r.status_code == 200 and "<html" not in part
    assert part.lstrip().startswith('<div id="instance-results">')
    assert {"HX-Request", "HX-Target"} <= {v.strip() for v in r["Vary"].split(",")}
    assert "Page 1 of 2 (60)" in part
    assert 'href="?q=bulk&amp;state=&amp;kind=vm&amp;page=2"' in part, "the next page keeps the filters"
    assert 'hx-get="/instances/rows/?q=bulk&amp;state=&amp;kind=vm"' in part, "the rows poll with the filters"
    assert 'data-instance="web-1"' not in part
    # following that link (a plain GET of the whole page) stays filtered
    page2 = text(c.get("/instances/", {"q": "bulk", "state": "", "kind": "vm", "page": "2"}))
    assert "Page 2 of 2 (60)" in page2 and 'rel="prev"' in page2
    assert 'href="?q=bulk&amp;state=&amp;kind=vm&amp;page=1"' in page2
    assert 'hx-get="/instances/rows/?q=bulk&amp;state=&amp;kind=vm&amp;page=2"' in page2
    assert page2.count("<tr data-instance=") == 10
    assert 'value="bulk"' in page2, "the form shows the filters of the URL"
    # without the target header (a reload, or htmx restoring history) the whole page comes back
    assert "<html" in text(c.get("/instances/", {"kind": "vm"}, headers={"HX-Request": "true"}))


def test_launch_form_takes_container_overrides_and_never_shows_env_values(
    world: World, sent: list[Any]
) -> None:
    _ready_node_a()
    c = client(world, "a_member")
    secret = "hunter2-very-secret"
    body = {"name": "ctr", "image": _image("sample"), "flavor": world.flavor_public.pk, "kind": "container",
            "network": "default", "command": "sh -c 'echo hi; sleep 9'",
            "env": f"TOKEN={secret}\nMODE=prod\n", "workdir": "/srv", "user": "1000:1000",
            "restart_policy": "on-failure:3"}  # fmt: skip
    # an error elsewhere: the page comes back without the env values
    r = c.post("/instances/new/", {**body, "user": "root; reboot"})
    assert r.status_code == 400 and "user[:group]" in text(r) and secret not in text(r)
    r = c.post("/instances/new/", {**body, "env": f"NOEQUALS\nTOKEN={secret}"})
    assert r.status_code == 400 and "Line 1: write NAME=value." in text(r) and secret not in text(r)
    r = c.post("/instances/new/", body)
    assert r.status_code == 303, text(r)
    inst = Instance.objects.get(tenant=world.a, name="ctr")
    assert inst.command == ["sh", "-c", "echo hi; sleep 9"]
    assert inst.env == {"TOKEN": secret, "MODE": "prod"}
    assert (inst.workdir, inst.run_as, inst.restart_policy) == ("/srv", "1000:1000", "on-failure:3")
    detail = text(c.get(r["Location"]))
    assert secret not in detail
    assert "TOKEN=********" in detail and "sh -c echo hi; sleep 9" in detail and "on-failure:3" in detail
    assert not [e for e in Event.objects.all() if secret in e.message or secret in e.path]
