"""The console pages in real Chromium (Debian's), with xterm.js, against a real VM and container.

The pages come from pytest-django's live server, the WebSocket from the relay
on uvicorn (another port: ``SKYPORT_CONSOLE_WS_URL``, as under ``make run``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest

try:
    from playwright.sync_api import expect
except ImportError:  # the dev extra installs it; CI must not pass by skipping
    if os.environ.get("CI"):
        raise
    pytest.skip("the playwright Python package is missing", allow_module_level=True)

from compute.spec import InstanceSpec
from tests.console.conftest import Nodes, Relay, instance_row
from tests.portal.conftest import World
from tests.ui.conftest import chromium, login, page, shot

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.host, pytest.mark.slow]
__all__ = ["page"]


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Only while this module runs: Playwright's running loop would upset the other console
    tests that share the session's workloads (pyroute2 and Django refuse a running loop)."""
    with chromium() as b:
        yield b


@pytest.fixture(autouse=True)
def ws_url(settings: Any, relay: Relay) -> None:
    settings.SKYPORT_CONSOLE_WS_URL = f"ws://127.0.0.1:{relay.port}"


def rows(page: Any) -> str:
    """What the terminal shows (xterm's DOM renderer keeps one div per row)."""
    text: str = page.locator(".xterm-rows").inner_text()
    return text


def test_vm_console_hostname_and_a_viewer_who_cannot_type(
    live_server: Any, page: Any, browser: Any, world: World, nodes: Nodes, vm: InstanceSpec
) -> None:
    instance_row(world, vm, "vm")
    login(page, live_server.url, "a_member")
    page.goto(f"{live_server.url}/instances/{vm.instance_id}/")
    page.locator("[data-field=open-terminal]").click()
    expect(page.locator("[data-field=terminal-status]")).to_have_text("Connected.")
    page.locator(".xterm-helper-textarea").focus()
    page.keyboard.type("hostname\n")
    expect(page.locator(".xterm-rows")).to_contain_text("console-guest", timeout=20_000)
    shot(page, "console-vm")

    context = browser.new_context(viewport={"width": 1280, "height": 900})
    viewer = context.new_page()
    login(viewer, live_server.url, "a_viewer")
    viewer.goto(f"{live_server.url}/instances/{vm.instance_id}/terminal/")
    expect(viewer.locator("[data-field=terminal-status]")).to_have_text("Connected (view only).")
    page.keyboard.type("echo from-the-writer\n")
    expect(viewer.locator(".xterm-rows")).to_contain_text("from-the-writer", timeout=20_000)
    viewer.locator(".xterm-helper-textarea").focus()
    viewer.keyboard.type("echo from-the-viewer\n")
    expect(viewer.locator("[data-field=terminal-status]")).to_have_text(
        "view only: your keystrokes are not sent"
    )
    page.keyboard.type("echo check-after\n")
    expect(page.locator(".xterm-rows")).to_contain_text("check-after", timeout=20_000)
    assert "from-the-viewer" not in rows(page)
    shot(viewer, "console-vm-viewer")
    context.close()


def test_container_shell_runs_id(
    live_server: Any, page: Any, world: World, nodes: Nodes, container: InstanceSpec
) -> None:
    instance_row(world, container, "container")
    login(page, live_server.url, "a_member")
    page.goto(f"{live_server.url}/instances/{container.instance_id}/terminal/")
    expect(page.locator("[data-field=terminal-status]")).to_have_text("Connected.")
    page.locator(".xterm-helper-textarea").focus()
    page.keyboard.type("id\n")
    expect(page.locator(".xterm-rows")).to_contain_text("uid=", timeout=20_000)
    shot(page, "console-container")
    page.keyboard.type("exit\n")
    expect(page.locator("[data-field=terminal-status]")).to_have_text(
        "Closed: the command exited with status 0 (code 1000)"
    )
    expect(page.locator("#terminal-reconnect")).to_be_visible()
    page.locator("#terminal-reconnect").click()  # a new ticket, a new shell
    expect(page.locator("[data-field=terminal-status]")).to_have_text("Connected.")


def test_viewer_is_offered_no_shell(
    live_server: Any, page: Any, world: World, container: InstanceSpec
) -> None:
    instance_row(world, container, "container")
    login(page, live_server.url, "a_viewer")
    page.goto(f"{live_server.url}/instances/{container.instance_id}/terminal/")
    expect(page.get_by_role("alert")).to_contain_text("needs the member role")
