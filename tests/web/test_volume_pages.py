"""The volume pages: the tenant's volumes, one volume's snapshots with size and time, and
take / revert (asks first, picks from the list) / delete, answered as the API would."""

from __future__ import annotations

from typing import Any

from portal.storage.models import Volume, VolumeSnapshot
from tests.portal.conftest import World
from tests.web.helpers import client, text


def _vol(world: World, name: str = "data", tenant: Any = None, **kw: Any) -> Volume:
    return Volume.objects.create(
        tenant=tenant or world.a, name=name, size_gb=1, node=world.node_a, status="available", **kw
    )


def _snap(vol: Volume, name: str, status: str = "available", size: int = 3 * 2**20) -> VolumeSnapshot:
    return VolumeSnapshot.objects.create(
        tenant=vol.tenant, volume=vol, name=name, status=status, size_bytes=size
    )


def test_list_and_detail_show_snapshots_with_size_and_time(world: World) -> None:
    vol = _vol(world)
    theirs = _vol(world, "theirs", tenant=world.b)
    c = client(world, "a_member")
    listing = text(c.get("/volumes/"))
    assert 'data-volume="data"' in listing and "theirs" not in listing
    assert f'href="/volumes/{vol.pk}/"' in listing
    page = text(c.get(f"/volumes/{vol.pk}/"))
    assert "No snapshots." in page and "disabled>Revert to snapshot…" in page
    _snap(vol, "one")
    _snap(vol, "two", status="creating", size=0)
    page = text(c.get(f"/volumes/{vol.pk}/"))
    assert 'data-snapshot="one"' in page and 'data-snapshot="two"' in page
    assert 'data-bytes="3145728"' in page and "3.0\xa0MB" in page
    # revert picks from the snapshots the node has: not one still being taken
    assert '<option value="one"' in page and '<option value="two"' not in page
    assert f'action="/volumes/{vol.pk}/revert/"' in page
    assert client(world, "b_admin").get(f"/volumes/{vol.pk}/").status_code == 404
    assert c.get(f"/volumes/{theirs.pk}/").status_code == 404


def test_take_revert_delete_from_the_page(world: World, sent: list[Any]) -> None:
    vol = _vol(world)
    c = client(world, "a_member")
    base = f"/volumes/{vol.pk}"
    # take: a bad name or a clash is refused on the page, nothing sent
    assert c.post(f"{base}/snapshots/", {"name": "Bad Name"}).status_code == 400
    _snap(vol, "one")
    r = c.post(f"{base}/snapshots/", {"name": "one"})
    assert r.status_code == 409 and "already has a snapshot &#x27;one&#x27;" in text(r)
    assert client(world, "a_viewer").post(f"{base}/snapshots/", {"name": "x"}).status_code == 403
    assert sent == []
    r = c.post(f"{base}/snapshots/", {"name": "two"})
    assert r.status_code == 303
    assert sent[-1][1] == "compute.volume" and sent[-1][2][0]["op"] == "snapshot"
    assert sent[-1][2][0]["snapshot"] == "two"
    assert VolumeSnapshot.objects.get(volume=vol, name="two").status == "creating"
    VolumeSnapshot.objects.filter(volume=vol, name="two").update(status="available")
    sent.clear()
    # revert: a name not in the list is 400; a known one asks first, then sends
    r = c.get(f"{base}/revert/", {"name": "nope"})
    assert r.status_code == 400 and "No snapshot named nope has been taken of volume data." in text(r)
    r = c.get(f"{base}/revert/", {"name": "one"})
    assert r.status_code == 200 and "Revert volume data to snapshot one?" in text(r) and sent == []
    r = c.post(f"{base}/revert/", {"name": "one"})
    assert r.status_code == 303 and sent[-1][2][0]["op"] == "revert"
    assert VolumeSnapshot.objects.get(volume=vol, name="one").status == "reverting"
    # while it works nothing else starts
    r = c.post(f"{base}/snapshots/", {"name": "three"})
    assert r.status_code == 409 and "in progress" in text(r)
    VolumeSnapshot.objects.filter(volume=vol, name="one").update(status="available")
    sent.clear()
    # attached: the page says why revert is off, and a forced GET is 409
    Volume.objects.filter(pk=vol.pk).update(instance=world.instance_a, status="in-use", target="vdc")
    page = text(c.get(f"{base}/"))
    assert "No revert now: Volume data is attached to web-1" in page
    r = c.get(f"{base}/revert/", {"name": "one"})
    assert r.status_code == 409 and sent == []
    Volume.objects.filter(pk=vol.pk).update(instance=None, status="available", target="")
    # delete asks, then sends; an unknown one is 404
    assert c.get(f"{base}/snapshots/nope/delete/").status_code == 404
    r = c.get(f"{base}/snapshots/one/delete/")
    assert r.status_code == 200 and "Delete snapshot one of volume data?" in text(r) and sent == []
    assert c.post(f"{base}/snapshots/one/delete/").status_code == 303
    assert sent[-1][2][0]["op"] == "delete_snapshot"
    assert VolumeSnapshot.objects.get(volume=vol, name="one").status == "deleting"
    # another tenant's volume: 404 for every page
    bob = client(world, "b_admin")
    assert bob.post(f"{base}/snapshots/", {"name": "x"}).status_code == 404
    assert bob.post(f"{base}/revert/", {"name": "two"}).status_code == 404
    assert bob.post(f"{base}/snapshots/two/delete/").status_code == 404
