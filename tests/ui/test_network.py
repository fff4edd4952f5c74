"""Security groups and published ports in Chromium: publish a port of an instance, open it in a group."""

from __future__ import annotations

import os
from typing import Any

import pytest

try:
    from playwright.sync_api import expect
except ImportError:  # the dev extra installs it; CI must not pass by skipping
    if os.environ.get("CI"):
        raise
    pytest.skip("the playwright Python package is missing (pip install -e '.[dev]')", allow_module_level=True)

from django.core.management import call_command

from compute.spec import Direction, InstanceForwards, SecurityBatch, Task, from_json
from portal.cloud import networks, secgroups
from tests.portal.conftest import World
from tests.ui.conftest import login, shot


def test_publish_a_port_and_allow_it_in_a_group(
    live_server: Any, page: Any, world: World, queued: list[tuple[str, str, list[Any]]]
) -> None:
    inst = world.instance_a
    networks.allocate_port(inst.network, inst)
    call_command("node", "external-address", "shared-1", "198.18.129.1", "--ports", "20000-20009")
    www = secgroups.create_group(world.a, "www")
    secgroups.set_groups(inst, [www])
    queued.clear()
    base = live_server.url
    login(page, base, "a_member")
    page.goto(f"{base}/instances/{inst.pk}/")
    network = page.locator("#network")
    network.get_by_label("Instance port").fill("8080")
    network.get_by_label("External port").fill("20005")
    network.get_by_role("button", name="Publish port").click()
    expect(page.get_by_text("Published tcp/8080 of web-1: connect to 198.18.129.1:20005.")).to_be_visible()
    expect(page.locator('#network tr[data-port="tcp/8080"]')).to_contain_text("198.18.129.1:20005")
    (fwd,) = [from_json(InstanceForwards, a[0]) for _, t, a in queued if t == Task.FORWARDS][-1].forwards
    assert (fwd.external_port, fwd.port) == (20005, 8080)
    # a bad port is a form error next to the field, and the typed value stays
    network.get_by_label("Instance port").fill("70000")
    network.get_by_role("button", name="Publish port").click()
    expect(page.get_by_role("alert").first).to_have_text("Check the port to publish.")
    expect(page.locator("#port-port")).to_have_attribute("aria-invalid", "true")
    # now let it in: the group's page, an ingress rule for tcp/8080, live on the node
    page.locator("#network").get_by_role("link", name="www").click()
    group = page.locator('section[data-group="www"]')
    group.get_by_text("Add a rule to www").click()
    group.get_by_label("First port").fill("8080")
    group.get_by_role("button", name="Add rule").click()
    expect(page.locator('section[data-group="www"] tbody tr')).to_contain_text("8080")
    batches = [from_json(SecurityBatch, a[0]) for _, t, a in queued if t == Task.SECURITY_BATCH]
    (rule,) = batches[-1].items[0].rules
    assert (rule.direction, rule.protocol, rule.port_min, rule.port_max) == (
        Direction.INGRESS,
        "tcp",
        8080,
        8080,
    )
    shot(page, "security-groups")
