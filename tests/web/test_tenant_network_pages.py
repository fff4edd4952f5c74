"""The Networks page creates and deletes networks through the API's services (form errors for bad input,
409s as the API answers them, viewers refused); the launch form offers the tenant's networks, and the
instance page lists every NIC."""

from __future__ import annotations

import ipaddress
from typing import Any

from django.conf import settings

from compute.spec import CreateInstance, ReleaseNetwork, Task, from_json
from portal.audit.models import Event
from portal.cloud import networks
from portal.cloud.models import Instance, Network
from portal.tenancy.models import Quota
from tests.portal.conftest import FakeNodes, World
from tests.web.helpers import client, text

NETS = "/networks/"


def _image(name: str) -> int:
    from portal.images.models import Image

    return Image.objects.get(name=name).pk


def test_networks_page_creates_networks_and_shows_form_errors(world: World) -> None:
    c = client(world, "a_member")
    page = text(c.get(NETS))
    assert "<h1>Networks of acme</h1>" in page and "Create a network" in page
    assert settings.SKYPORT_NETWORK_POOL in page
    r = c.post(NETS, {"name": "back", "cidr": "", "prefix_length": ""})
    net = Network.objects.get(tenant=world.a, name="back")
    assert (r.status_code, r["Location"]) == (303, f"{NETS}#network-{net.pk}")
    assert ipaddress.ip_network(net.cidr).prefixlen == 24
    assert Event.objects.filter(action="network.create", object_id=str(net.pk), tenant=world.a).exists()
    page = text(c.get(NETS))
    assert f'id="network-{net.pk}" data-network="back"' in page and net.cidr in page
    # bad input: the field says why, input kept, nothing created
    for body, says in (
        ({"name": "x", "cidr": "10.1.2.0/24"}, "is not inside the network pool"),
        ({"name": "x", "cidr": "nonsense"}, "is not an IPv4 network address"),
        ({"name": "x", "prefix_length": "30"}, "The prefix length must be between"),
        ({"name": "Bad Name", "cidr": ""}, "Use lower-case letters"),
    ):
        r = c.post(NETS, body)
        assert r.status_code == 400, body
        assert (
            says in text(r) and 'aria-invalid="true"' in text(r) and "The network was not created" in text(r)
        )
    # an overlap and a taken name are the service's 409, next to their field
    r = c.post(NETS, {"name": "again", "cidr": net.cidr})
    assert r.status_code == 409 and "overlaps network back" in text(r) and 'value="again"' in text(r)
    r = c.post(NETS, {"name": "back"})
    assert r.status_code == 409 and "already has a network named back" in text(r)
    Quota.objects.filter(tenant=world.a).update(networks=2)
    assert '<p data-field="network-quota">2 of 2 networks' in text(c.get(NETS))
    r = c.post(NETS, {"name": "third"})
    assert r.status_code == 409 and "Quota exceeded for networks" in text(r)
    assert Network.objects.filter(tenant=world.a).count() == 2


def test_viewers_see_networks_but_no_forms_and_are_refused(world: World) -> None:
    net = networks.create_network(world.a, "back")
    c = client(world, "a_viewer")
    page = text(c.get(NETS))
    assert "back" in page and "Create a network" not in page and "Delete…" not in page
    assert "Viewers cannot change networks" in page
    assert c.post(NETS, {"name": "v"}).status_code == 403
    assert c.post(f"{NETS}{net.pk}/delete/").status_code == 403
    assert Network.objects.filter(pk=net.pk).exists()
    # another tenant's network is a 404, whatever the role
    assert client(world, "b_admin").get(f"{NETS}{net.pk}/delete/").status_code == 404


def test_launch_with_two_networks_lists_both_nics_and_delete_waits_for_the_instance(
    world: World, sent: list[Any], nodes: FakeNodes
) -> None:
    front = networks.create_network(world.a, "front")
    back = networks.create_network(world.a, "back")
    c = client(world, "a_member")
    form = text(c.get("/instances/new/"))
    assert f'value="{front.pk}"' in form and f"front ({front.cidr})" in form and f"back ({back.cidr})" in form
    r = c.post("/instances/new/", {"name": "two", "image": _image("tiny"), "flavor": world.flavor_public.pk,
                                   "kind": "vm", "networks": [front.pk, back.pk]})  # fmt: skip
    assert r.status_code == 303, text(r)
    inst = Instance.objects.get(name="two")
    (create,) = [from_json(CreateInstance, a[0]) for _, t, a in sent if t == Task.CREATE]
    # the form lists networks by name: back is eth0
    assert [n.segment.network for n in create.spec.networks] == ["acme/back", "acme/front"]
    nodes.run()
    page = text(c.get(f"/instances/{inst.pk}/"))
    assert 'data-nic="eth0"' in page and 'data-nic="eth1"' in page
    for addr in inst.addresses:
        assert addr["address"] in page and addr["mac"] in page
    assert f"via {back.host_address} (eth0)" in page
    listing = text(c.get(NETS))
    assert listing.count(f'href="/instances/{inst.pk}/"') == 2
    # delete: a confirmation first; refused while "two" uses it
    assert "Delete network front" in text(c.get(f"{NETS}{front.pk}/delete/"))
    r = c.post(f"{NETS}{front.pk}/delete/")
    assert r.status_code == 409 and "Network front is used by instances (two)" in text(r)
    c.post(f"/instances/{inst.pk}/delete/")
    nodes.run()
    assert Instance.objects.get(pk=inst.pk).vm_state == "deleted"
    sent.clear()
    r = c.post(f"{NETS}{front.pk}/delete/")
    assert (r.status_code, r["Location"]) == (303, NETS)
    assert not Network.objects.filter(pk=front.pk).exists()
    (release,) = [from_json(ReleaseNetwork, a[0]) for _, t, a in sent if t == Task.RELEASE_NETWORK]
    assert release.bridge == front.bridge
    assert Event.objects.filter(action="network.delete", object_id=str(front.pk)).exists()


def test_launch_without_a_choice_joins_the_default_network(world: World, sent: list[Any]) -> None:
    c = client(world, "a_member")
    r = c.post("/instances/new/", {"name": "one", "image": _image("tiny"), "flavor": world.flavor_public.pk,
                                   "kind": "vm"})  # fmt: skip
    assert r.status_code == 303, text(r)
    (create,) = [from_json(CreateInstance, a[0]) for _, t, a in sent if t == Task.CREATE]
    assert [n.segment.network for n in create.spec.networks] == ["acme/default"]
    other = networks.create_network(world.b, "theirs")
    r = c.post("/instances/new/", {"name": "x", "image": _image("tiny"), "flavor": world.flavor_public.pk,
                                   "kind": "vm", "networks": [other.pk]})  # fmt: skip
    assert r.status_code == 400 and "Select a valid choice" in text(r)
