"""The snapshot fragment: the VM's snapshots with size and time, and a revert form that picks from them."""

from __future__ import annotations

from typing import Any

from portal.cloud.models import Instance
from portal.storage.models import Snapshot
from tests.portal.conftest import World
from tests.web.helpers import client, text


def test_fragment_lists_snapshots_and_the_page_offers_only_available_ones(world: World) -> None:
    inst = world.instance_a
    url = f"/instances/{inst.pk}/snapshots/"
    c = client(world, "a_member")
    assert "No snapshots." in text(c.get(url))
    Snapshot.objects.create(
        tenant=inst.tenant, instance=inst, name="one", status="available", size_bytes=2**20
    )
    Snapshot.objects.create(tenant=inst.tenant, instance=inst, name="two", status="creating")
    page = text(c.get(url))
    assert 'data-snapshot="one"' in page and 'data-snapshot="two"' in page and "1.0\xa0MB" in page
    assert "<select" not in page, "the page's one revert form picks the snapshot, not the list"
    # the page's revert form offers the one it can revert to, not the one still being taken
    detail = text(c.get(f"/instances/{inst.pk}/"))
    assert detail.count('for="revert-name"') == 1 and detail.count("<select") == detail.count("</select>")
    assert '<option value="one"' in detail and '<option value="two"' not in detail
    assert f'action="/instances/{inst.pk}/revert/"' in detail
    assert client(world, "b_admin").get(url).status_code == 404


def test_delete_asks_then_sends(world: World, sent: list[Any]) -> None:
    inst = world.instance_a
    Snapshot.objects.create(tenant=inst.tenant, instance=inst, name="one", status="available")
    c = client(world, "a_member")
    url = f"/instances/{inst.pk}/snapshots/one/delete/"
    r = c.get(url)
    assert r.status_code == 200 and "Delete snapshot one of web-1?" in text(r) and sent == []
    assert c.get(f"/instances/{inst.pk}/snapshots/nope/delete/").status_code == 404
    assert client(world, "a_viewer").post(url).status_code == 403
    r = c.post(url)
    assert r.status_code == 303
    assert [m[1] for m in sent] == ["compute.instance.action"]
    assert sent[0][2][0]["action"] == "delete_snapshot" and sent[0][2][0]["params"] == {"name": "one"}
    assert Snapshot.objects.get(name="one").status == "deleting"
    assert Instance.objects.get(pk=inst.pk).task_state == "deleting_snap"
