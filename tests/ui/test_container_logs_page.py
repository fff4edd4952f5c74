"""A container's page in a real browser: the Logs panel loads by itself (htmx), marks each line's
stream, switches streams, passes axe-core, fits a phone, and is photographed (test-artifacts/ui/)."""

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

from compute.spec import Kind
from tests.portal.conftest import FakeNodes, World
from tests.portal.test_flow import _dedicate_node_a
from tests.ui.conftest import login
from tests.ui.test_pages import ARTIFACTS, DARK, WIDTHS, _scan

RECORDS = (
    b"2026-12-06T01:20:00.100000000+00:00 stdout F nginx: starting worker processes\n"
    b"2026-12-06T01:20:00.200000000+00:00 stderr F warn: no TLS certificate, serving plain HTTP\n"
    b"2026-12-06T01:20:01.000000000+00:00 stdout F 198.18.0.1 - - GET / 200 612\n"
    b"2026-12-06T01:20:02.000000000+00:00 stderr F error: upstream timed out (110: Connection timed out)\n"
)


def test_the_logs_panel_in_a_browser(
    live_server: Any, browser: Any, world: World, fake_nodes: FakeNodes
) -> None:
    from rest_framework.test import APIClient

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    _dedicate_node_a(world)
    api = APIClient()
    api.force_login(world.users["a_admin"])
    body = {"tenant": "acme", "name": "web", "image": "busybox:1", "flavor": world.flavor_public.pk}
    r = api.post("/api/v1/instances/", body, format="json")
    assert r.status_code == 202 and r.json()["decided_kind"] == "container", r.content
    fake_nodes.run()
    iid = r.json()["id"]
    fake_nodes.service("node.node-a").driver(Kind.CONTAINER).log_records[iid] = RECORDS

    problems: list[str] = []
    for width, viewport in {**WIDTHS, **DARK}.items():
        context = browser.new_context(
            viewport=viewport, is_mobile=width == "390", color_scheme="dark" if "dark" in width else "light"
        )
        context.set_default_timeout(10_000)
        try:
            page = context.new_page()
            login(page, live_server.url, "a_admin")
            page.goto(f"{live_server.url}/instances/{iid}/")
            logs = page.locator("[data-field=logs]")
            expect(logs).to_contain_text("error: upstream timed out")
            expect(logs.locator(".stderr").first).to_contain_text("stderr")
            expect(logs.locator(".stdout").first).to_contain_text("01:20:00.100 stdout")
            problems += _scan(page, "container-logs", width)
            inner = page.evaluate("window.innerWidth")
            if page.evaluate("document.documentElement.scrollWidth") > inner:
                problems.append(f"container-logs@{width}: wider than its {inner}px window")
            page.locator("#logs-h").scroll_into_view_if_needed()
            page.screenshot(path=str(ARTIFACTS / f"container-logs-{width}.png"), full_page=True)
            if width == "1280":
                page.get_by_role("link", name="stderr", exact=True).click()
                expect(logs).not_to_contain_text("GET / 200")
                expect(logs).to_contain_text("no TLS certificate")
                expect(page.locator("#instance-logs strong")).to_have_text("stderr")
        finally:
            context.close()
    assert problems == [], "\n".join(problems)
