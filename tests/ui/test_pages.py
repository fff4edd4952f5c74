"""Every page, at 1280 px and 390 px: an axe-core scan (no serious or critical violation), no
sideways scrolling on the phone, and a screenshot of each in test-artifacts/ui/.

axe-core is vendored under tests/ui/vendor/ (see its README) and injected into each page.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from django.core.management import call_command

try:
    from playwright.sync_api import expect
except ImportError:  # the dev extra installs it; CI must not pass by skipping
    if os.environ.get("CI"):
        raise
    pytest.skip("the playwright Python package is missing (pip install -e '.[dev]')", allow_module_level=True)

from portal.cloud import forwards, networks, secgroups
from portal.cloud.models import PublishedPort, SecurityGroup
from portal.images.models import Image
from tests.portal.conftest import World
from tests.ui.conftest import login
from tests.web.helpers import taken_snapshot

AXE = Path(__file__).resolve().parent / "vendor" / "axe-core-4.10.2" / "axe.min.js"
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "ui"
WIDTHS = {"1280": {"width": 1280, "height": 900}, "390": {"width": 390, "height": 844}}
#: dark mode (prefers-color-scheme) is scanned too, at the wide size
DARK = {"1280-dark": {"width": 1280, "height": 900}}
SERIOUS = ("serious", "critical")


def tenant_pages(world: World) -> dict[str, str]:
    inst = world.instance_a.pk
    secret = Image.objects.get(name="secret").pk
    www = SecurityGroup.objects.get(tenant=world.a, name="www")
    published = PublishedPort.objects.get(instance=world.instance_a)
    return {
        "dashboard": "/",
        "instances": "/instances/",
        "launch": "/instances/new/",
        "instance": f"/instances/{inst}/",
        "instance-delete": f"/instances/{inst}/delete/",
        "instances-bulk": f"/instances/bulk/?action=reboot&id={inst}",
        "instance-revert": f"/instances/{inst}/revert/?name=before-upgrade",
        "images": "/images/",
        "image": f"/images/{secret}/",
        "image-upload": "/images/upload/",
        "image-delete": f"/images/{secret}/delete/",
        "networks": "/networks/",
        "security-groups": "/security-groups/",
        "security-group-delete": f"/security-groups/{www.pk}/delete/",
        "security-rule-delete": f"/security-groups/rules/{www.rules.get().pk}/delete/",
        "port-unpublish": f"/instances/{inst}/ports/{published.pk}/delete/",
        "ssh-keys": "/ssh-keys/",
        "ssh-key-delete": f"/ssh-keys/{world.key_a.pk}/delete/",
        "tokens": "/tokens/",
        "token-revoke": f"/tokens/{world.token_a.pk}/revoke/",
        "events": "/events/",
        "tasks": "/tasks/",
    }


OPERATOR_PAGES = {
    "ops-nodes": "/ops/nodes/",
    "ops-node": "/ops/nodes/shared-1/",
    "ops-drain": "/ops/nodes/shared-1/drain/",
    "ops-tenants": "/ops/tenants/",
    "ops-quota": "/ops/tenants/acme/quota/",
    "ops-instances": "/ops/instances/",
    "ops-drift": "/ops/drift/",
    "ops-events": "/ops/events/",
}


def _network(world: World) -> None:
    """A security group with a rule and a published port on the instance, so its Network panel has rows."""
    inst = world.instance_a
    networks.allocate_port(inst.network, inst)
    call_command("node", "external-address", "shared-1", "198.18.129.1", "--ports", "20000-20009")
    www = secgroups.create_group(world.a, "www", "web servers")
    secgroups.add_rule(www, "ingress", "tcp", 80, 80)
    secgroups.set_groups(inst, [www, secgroups.default_group(world.a)])
    forwards.publish(inst, "tcp", 80)


def _scan(page: Any, name: str, width: str) -> list[str]:
    """axe's serious and critical violations of the page, one line each."""
    page.add_script_tag(content=AXE.read_text())
    result = page.evaluate("async () => await axe.run(document, {resultTypes: ['violations']})")
    return [
        f"{name}@{width}: {v['id']} ({v['impact']}): {v['help']} -> {[n['target'] for n in v['nodes']][:3]}"
        for v in result["violations"]
        if v["impact"] in SERIOUS
    ]


def _visit(
    browser: Any, base: str, who: str | None, pages: dict[str, str], sizes: dict[str, Any] = WIDTHS
) -> list[str]:
    problems: list[str] = []
    for width, viewport in sizes.items():
        context = browser.new_context(
            viewport=viewport, is_mobile=width == "390", color_scheme="dark" if "dark" in width else "light"
        )
        context.set_default_timeout(10_000)
        try:
            page = context.new_page()
            if who:
                login(page, base, who)
            for name, url in pages.items():
                response = page.goto(base + url)
                assert response is not None and response.status == 200, (url, response and response.status)
                expect(page.get_by_role("heading", level=1)).to_be_visible()
                problems += _scan(page, name, width)
                inner = page.evaluate("window.innerWidth")
                scroll = page.evaluate("document.documentElement.scrollWidth")
                if scroll > inner:
                    problems.append(f"{name}@{width}: {scroll}px wide in a {inner}px window")
                page.screenshot(path=str(ARTIFACTS / f"{name}-{width}.png"), full_page=True)
        finally:
            context.close()
    return problems


def test_every_page_is_accessible_fits_and_is_photographed(
    live_server: Any, browser: Any, world: World, queued: list[Any]
) -> None:
    from portal.tenancy.models import Membership

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    taken_snapshot(world.instance_a, "before-upgrade")
    _network(world)
    Membership.objects.create(user=world.users["operator"], tenant=world.a, role="admin")
    base = live_server.url
    problems = _visit(browser, base, None, {"login": "/login/"})
    problems += _visit(browser, base, "a_admin", tenant_pages(world))
    problems += _visit(browser, base, "operator", OPERATOR_PAGES)
    problems += _visit(browser, base, "a_admin", tenant_pages(world), DARK)
    assert problems == [], "\n".join(problems)
    shots = sorted(p.name for p in ARTIFACTS.glob("*.png"))
    pages = 1 + len(tenant_pages(world)) + len(OPERATOR_PAGES)
    assert len([s for s in shots if s.endswith(("-1280.png", "-390.png"))]) >= 2 * pages
