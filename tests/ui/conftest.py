"""Real Chromium (Debian's package) against pytest-django's live server.

Compute is faked here: messages to nodes are queued and played by
``FakeNodes`` (``NodeService`` over ``FakeDriver``) when a test says so,
and their observations go through ``portal.cloud.tasks.apply_observation``
as in production.  ``tests/e2e`` covers the real drivers.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from portal.cloud import dispatch
from portal.cloud import logs as cloud_logs
from tests.hostcaps import require
from tests.portal.conftest import FakeNodes, world  # noqa: F401 -- pytest finds fixtures by name

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "screenshots"


@contextlib.contextmanager
def chromium() -> Iterator[Any]:
    """Debian's Chromium under Playwright, for as long as the ``with`` block lasts."""
    require(Path(CHROMIUM).exists(), f"Debian's chromium at {CHROMIUM} (DEBS in the Makefile)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        require(False, "the playwright Python package (pip install -e '.[dev]')")
        raise
    # Playwright's sync API keeps an asyncio loop running in this thread, so Django
    # would refuse ORM calls of the test itself (fixtures, FakeNodes) as if they ran
    # in a coroutine.  None does; allow them only while the browser is alive.
    old = os.environ.get("DJANGO_ALLOW_ASYNC_UNSAFE")
    os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
            yield browser
            browser.close()
    finally:
        if old is None:
            os.environ.pop("DJANGO_ALLOW_ASYNC_UNSAFE", None)
        else:
            os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = old


@pytest.fixture(scope="package")
def browser() -> Iterator[Any]:
    with chromium() as b:
        yield b


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(10_000)
    pg = context.new_page()
    yield pg
    context.close()


@pytest.fixture
def queued(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str, list[Any]]]:
    """Messages to nodes, sent after commit by the live server's thread, kept for FakeNodes."""
    messages: list[tuple[str, str, list[Any]]] = []
    monkeypatch.setattr(dispatch, "_send", lambda queue, task, args: messages.append((queue, task, args)))
    return messages


@pytest.fixture
def fake_nodes(
    queued: list[tuple[str, str, list[Any]]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> FakeNodes:
    nodes = FakeNodes(queued, tmp_path)

    def answer_logs(reply: str, timeout: float) -> dict[str, Any] | None:
        """A logs read (the container page's panel) is answered at once by its fake node; the
        test's own ``run()`` may have taken the message first, then its answer is waiting."""
        deadline = time.monotonic() + min(timeout, 2.0)
        while time.monotonic() < deadline:
            if reply in nodes.replies:
                return nodes.replies.pop(reply)
            for msg in list(queued):
                if msg[1] == "compute.instance.logs" and msg[2][0]["reply"] == reply:
                    with contextlib.suppress(ValueError):
                        queued.remove(msg)
                        nodes.service(msg[0]).handle(msg[1], *msg[2])
            time.sleep(0.01)
        return None

    monkeypatch.setattr(cloud_logs, "wait_reply", answer_logs)
    return nodes


def shot(page: Any, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)


def login(page: Any, base: str, who: str) -> None:
    page.goto(f"{base}/login/")
    page.get_by_label("Username").fill(who)
    page.get_by_label("Password").fill(f"pw-{who}{who}")
    page.get_by_role("button", name="Log in").click()
    page.wait_for_load_state()
