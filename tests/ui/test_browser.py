"""The issue's browser scenarios in real Chromium, with a screenshot of each main page.

Compute is faked (see conftest): the portal's messages to nodes are played
by FakeNodes when the test calls ``fake_nodes.run()``, and the page must
then show the new state by itself (htmx polling), without a reload.
"""

from __future__ import annotations

import json
import os
import re
import time
from typing import Any

import pytest

try:
    from playwright.sync_api import expect
except ImportError:  # the dev extra installs it; CI must not pass by skipping
    if os.environ.get("CI"):
        raise
    pytest.skip("the playwright Python package is missing (pip install -e '.[dev]')", allow_module_level=True)

from portal.cloud import services
from portal.cloud.models import ComputeNode, Instance
from portal.cloud.tasks import apply_node_report
from tests.portal.conftest import UP_BOTH, FakeNodes, World
from tests.ui.conftest import login, shot
from tests.web.helpers import taken_snapshot

POLL_TIMEOUT = 8_000  # ms: the pages poll every 2 s
REASON = "container on node-a: dedicated to acme"
ORPHAN = "11111111-2222-3333-4444-555555555555"


def _mark(page: Any) -> None:
    """Leave a mark in the page's JS state: it survives polling, not a reload."""
    page.evaluate("window.__noReload = true")


def _not_reloaded(page: Any) -> None:
    assert page.evaluate("window.__noReload === true"), "the page was reloaded"


def _unlabelled_controls(page: Any) -> list[str]:
    return page.evaluate(
        """() => [...document.querySelectorAll('input, select, textarea')]
             .filter(e => e.type !== 'hidden' && !e.labels?.length && !e.getAttribute('aria-label'))
             .map(e => e.name || e.id)"""
    )


def _heartbeats_until_samples(fake_nodes: FakeNodes, instance: Instance, wanted: int) -> None:
    """Send heartbeats of the instance's node until the portal holds ``wanted`` CPU/memory samples.

    A sample is the difference of two beats, and a beat no newer than the last one is ignored,
    so this counts what the portal kept instead of trusting a fixed number of beats.
    """
    assert instance.node is not None
    node = fake_nodes.service(instance.node.queue)
    for _ in range(100):
        if len(services.stats(instance)["samples"]) >= wanted:
            return
        node.report()
    raise AssertionError(f"the portal kept fewer than {wanted} samples of {instance.name}")


def _answer_nodes_until(fake_nodes: FakeNodes, locator: Any, text: str, rounds: int = 8) -> None:
    """Play the messages the page's polling sends to nodes until ``locator`` shows ``text``.

    The console panel asks the node for a fresh tail as it polls; each round answers what is
    queued, then waits (an explicit expect, one poll period) for the panel to show it.
    """
    for _ in range(rounds - 1):
        fake_nodes.run()
        try:
            expect(locator).to_contain_text(text, timeout=2_500)
            return
        except AssertionError:
            continue
    fake_nodes.run()
    expect(locator).to_contain_text(text, timeout=2_500)


def test_launch_watch_running_stop_and_delete(live_server: Any, page: Any, world: World,
                                              fake_nodes: FakeNodes) -> None:  # fmt: skip
    ComputeNode.objects.filter(name="node-a").update(
        status="up", vcpus=8, ram_mb=8192, disk_gb=100, drivers=UP_BOTH
    )
    base = live_server.url
    login(page, base, "a_member")
    expect(page.get_by_role("heading", name=re.compile("Acme"))).to_be_visible()
    expect(page.get_by_role("meter", name="Instances")).to_have_attribute("aria-valuenow", "1")
    shot(page, "dashboard")

    page.get_by_role("link", name="Launch instance").first.click()
    assert _unlabelled_controls(page) == []
    page.get_by_label("Name", exact=True).fill("app")
    page.get_by_label("Image").select_option(label="sample:1 (container, vm; public)")
    page.get_by_label("Flavor").select_option(label="m1.tiny (1 vCPU, 128 MiB, 1 GiB)")
    preview = page.locator("#preview")
    expect(preview.locator("[data-field=preview-reason]")).to_have_text(REASON)
    expect(preview.locator("[data-field=preview-kind]")).to_have_text("container")
    page.get_by_label("Virtual machine").check()
    expect(preview.locator("[data-field=preview-kind]")).to_have_text("vm")
    page.get_by_label("Automatic (portal chooses)").check()
    expect(preview.locator("[data-field=preview-kind]")).to_have_text("container")
    shot(page, "launch-preview")
    page.get_by_role("button", name="Launch").click()

    expect(page.get_by_role("heading", name=re.compile("^app"))).to_be_visible()
    expect(page.locator("[data-field=isolation_reason]")).to_have_text(REASON)
    status = page.locator("#instance-status")
    expect(status.locator("[data-field=vm_state]")).to_have_text("building")
    expect(status.get_by_role("button", name="Shut down")).to_be_disabled()
    _mark(page)
    # The detail page also polls the console and the logs, which may queue requests
    # to the node at any moment; what matters is that the launch sent one create.
    polled = ("compute.instance.console", "compute.instance.logs")
    pending = [task for _, task, _ in fake_nodes.sent if task not in polled]
    assert pending == ["compute.instance.create"]
    fake_nodes.run()
    expect(status.locator("[data-field=vm_state]")).to_have_text("active", timeout=POLL_TIMEOUT)
    expect(status.locator("[data-field=power_state]")).to_have_text("running")
    expect(status.get_by_role("button", name="Shut down")).to_be_enabled()
    expect(page.locator(".log")).to_contain_text("node.create success", timeout=POLL_TIMEOUT)
    expect(page.locator("[data-field=stats]")).to_contain_text("No statistics yet")
    # heartbeats bring CPU and memory samples, a console request brings the log tail:
    # both panels show them by themselves
    _heartbeats_until_samples(fake_nodes, Instance.objects.get(name="app"), 2)
    stats = page.locator("[data-field=stats]")
    expect(stats.get_by_role("img", name=re.compile("^memory use over the last heartbeats"))).to_be_visible(
        timeout=12_000
    )
    expect(stats).to_contain_text("48.0 MiB used; the flavor gives 128 MiB")
    expect(stats.get_by_role("img", name=re.compile("^CPU use over the last heartbeats"))).to_be_visible()
    _answer_nodes_until(fake_nodes, page.locator("pre[data-field=console]"), "fake: app booted")
    _not_reloaded(page)
    shot(page, "instance-detail")

    status.get_by_role("button", name="Shut down").click()
    expect(page.get_by_role("status")).to_contain_text("Stop sent to node-a")
    expect(page.locator("#instance-status [data-field=task_state]")).to_have_text("stopping")
    page.get_by_role("link", name="Instances", exact=True).click()
    row = page.locator("tr[data-instance=app]")
    expect(row.locator("[data-field=vm_state]")).to_have_text("active")
    _mark(page)
    fake_nodes.run()
    expect(row.locator("[data-field=vm_state]")).to_have_text("stopped", timeout=POLL_TIMEOUT)
    _not_reloaded(page)
    shot(page, "instances")

    row.get_by_role("link", name="app").click()
    page.get_by_role("link", name="Delete…").click()
    expect(page.get_by_role("heading", name="Delete instance app?")).to_be_visible()
    page.get_by_role("button", name="Delete instance").click()
    # back on the list (not on the dead instance's page): the row shows the delete, then leaves
    expect(page).to_have_url(re.compile(r"/instances/$"))
    expect(page.get_by_role("status")).to_contain_text("Delete of app requested")
    row = page.locator("tr[data-instance=app]")
    expect(row).to_contain_text("deleting")
    _mark(page)
    fake_nodes.run()
    expect(row).to_have_count(0, timeout=POLL_TIMEOUT)
    _not_reloaded(page)
    assert Instance.objects.get(name="app").vm_state == "deleted"


def test_token_created_shown_once_and_revoked(live_server: Any, page: Any, world: World) -> None:
    base = live_server.url
    login(page, base, "a_member")
    page.get_by_role("link", name="API tokens").click()
    page.get_by_label("Name").fill("ci")
    page.get_by_label("Expires in (days)").fill("9999")
    page.get_by_role("button", name="Create token").click()
    expect(page.get_by_text("At most 365 days")).to_be_visible()
    expect(page.get_by_label("Name")).to_have_value("ci")
    page.get_by_label("Expires in (days)").fill("7")
    page.get_by_role("button", name="Create token").click()
    key = page.get_by_label("New key").input_value()
    assert re.fullmatch(r"sky_[0-9a-f]{16}_[A-Za-z0-9_-]+", key)
    auth = {"Authorization": f"Bearer {key}"}
    assert page.request.get(f"{base}/api/v1/instances/", headers=auth).status == 200
    shot(page, "tokens")
    expect(page).to_have_url(f"{base}/tokens/")  # POST/redirect/GET: a reload re-posts nothing
    page.reload()
    expect(page.locator("#new-key")).to_have_count(0)
    assert key not in page.content(), "the key is shown once"
    expect(page.locator("tr[data-token=ci]")).to_have_count(1)
    row = page.locator("tr[data-token=ci]")
    row.get_by_role("link", name="Revoke token ci").click()
    page.get_by_role("button", name="Revoke token").click()
    expect(page.locator("tr[data-token=ci] [data-field=token-status]")).to_have_text("revoked")
    assert page.request.get(f"{base}/api/v1/instances/", headers=auth).status == 401


def test_operator_dedicates_a_node(live_server: Any, page: Any, world: World) -> None:
    base = live_server.url
    login(page, base, "operator")
    expect(page).to_have_url(f"{base}/ops/nodes/")
    card = page.locator("[data-node=shared-1]")
    card.get_by_label("Dedicate to").select_option("bobco")
    card.get_by_role("button", name="Apply").click()
    expect(page.locator("#ops-error")).to_contain_text("hosts instances of acme")
    card = page.locator("[data-node=shared-1]")
    card.get_by_label("Dedicate to").select_option("acme")
    card.get_by_role("button", name="Apply").click()
    expect(page.get_by_role("status")).to_contain_text("Node shared-1 is now dedicated to acme.")
    expect(page.locator("[data-node=shared-1] [data-field=tenancy]")).to_have_text("dedicated to acme")
    assert ComputeNode.objects.get(name="shared-1").owner == world.a
    shot(page, "ops-nodes")
    # draining disrupts scheduling: a confirmation page first, then the POST
    page.locator("[data-node=shared-1]").get_by_role("link", name="Drain (disable scheduling)…").click()
    expect(page.get_by_role("heading", name="Drain node shared-1?")).to_be_visible()
    assert ComputeNode.objects.get(name="shared-1").status == "up", "the confirmation page changes nothing"
    shot(page, "ops-drain-confirm")
    page.get_by_role("button", name="Drain node").click()
    expect(page.get_by_role("status")).to_contain_text("Node shared-1 is disabled")
    assert ComputeNode.objects.get(name="shared-1").status == "disabled"
    page.locator("[data-node=shared-1]").get_by_role("button", name="Enable scheduling").click()
    expect(page.get_by_role("status")).to_contain_text("Node shared-1 is down: waiting for heartbeat")
    for name, url in (("ops-tenants", "/ops/tenants/"), ("ops-instances", "/ops/instances/"),
                      ("ops-events", "/ops/events/")):  # fmt: skip
        page.goto(base + url)
        expect(page.get_by_role("heading", level=1)).to_be_visible()
        shot(page, name)
    expect(page.get_by_role("cell", name="computenode.dedicate").first).to_be_visible()
    # a heartbeat of shared-1 lists a workload the portal does not know and misses web-1
    orphan = {"instance_id": ORPHAN, "kind": "vm", "power_state": "running"}
    apply_node_report({"node": "shared-1", "queue": "node.shared-1", "vcpus": 64, "ram_mb": 262144,
                       "disk_gb": 10000, "drivers": [{"kind": "vm", "ok": True}], "sent_at": time.time(),
                       "inventory": [orphan]})  # fmt: skip
    page.get_by_role("link", name="Orphans and drift").click()
    expect(page.get_by_role("heading", name="Orphans and drift")).to_be_visible()
    expect(page.get_by_role("cell", name=ORPHAN, exact=True)).to_be_visible()
    expect(page.get_by_role("link", name="web-1", exact=True)).to_be_visible()
    expect(page.get_by_role("cell", name="reconcile.orphans").first).to_be_visible()
    shot(page, "ops-drift")


def test_revert_to_a_snapshot_asks_first(live_server: Any, page: Any, browser: Any, world: World,
                                        queued: list[Any]) -> None:  # fmt: skip
    base = live_server.url
    taken_snapshot(world.instance_a, "before-upgrade")
    queued.clear()
    # the confirmation is plain forms: it works the same with JavaScript off
    no_js = browser.new_context(java_script_enabled=False)
    try:
        plain = no_js.new_page()
        login(plain, base, "a_member")
        plain.goto(f"{base}/instances/{world.instance_a.pk}/")
        plain.get_by_label("Snapshot to revert to").select_option("before-upgrade")
        plain.get_by_role("button", name="Revert to snapshot…").click()
        expect(plain.get_by_role("heading", name="Revert web-1 to snapshot before-upgrade?")).to_be_visible()
        expect(plain).to_have_url(re.compile(r"/revert/\?name=before-upgrade$"))
    finally:
        no_js.close()
    assert [m for m in queued if m[1] == "compute.instance.action"] == []

    login(page, base, "a_member")
    page.goto(f"{base}/instances/{world.instance_a.pk}/")
    page.get_by_label("Snapshot to revert to").select_option("before-upgrade")
    page.get_by_role("button", name="Revert to snapshot…").click()
    expect(page.get_by_role("heading", name="Revert web-1 to snapshot before-upgrade?")).to_be_visible()
    expect(page.get_by_text("What changed in web-1 since snapshot before-upgrade")).to_be_visible()
    shot(page, "revert-confirm")
    page.get_by_role("link", name="Cancel").click()
    expect(page.get_by_role("heading", name=re.compile("^web-1"))).to_be_visible()
    expect(page.locator("#instance-status [data-field=task_state]")).to_have_text("none")
    assert [m for m in queued if m[1] == "compute.instance.action"] == [], "nothing is sent before confirming"

    page.get_by_label("Snapshot to revert to").select_option("before-upgrade")
    page.get_by_role("button", name="Revert to snapshot…").click()
    page.get_by_role("button", name="Revert to snapshot", exact=True).click()
    expect(page.get_by_role("status")).to_contain_text("Revert to before-upgrade sent to shared-1")
    expect(page.locator("#instance-status [data-field=task_state]")).to_have_text("reverting")
    actions = [args[0] for _, task, args in queued if task == "compute.instance.action"]
    assert [(a["action"], a["params"]) for a in actions] == [("revert", {"name": "before-upgrade"})]


def test_instance_filters_go_to_the_url_and_survive_paging(live_server: Any, page: Any, world: World,
                                                           queued: list[Any]) -> None:  # fmt: skip
    web = world.instance_a
    Instance.objects.bulk_create(
        Instance(tenant=world.a, name=f"bulk-{n:02}", kind="vm", isolation_reason="test", image=web.image,
                 flavor=web.flavor, network=web.network, vcpus=1, ram_mb=128, disk_gb=1, vm_state="active")
        for n in range(60)
    )  # fmt: skip
    base = live_server.url
    login(page, base, "a_member")
    page.goto(base + "/instances/")
    _mark(page)
    page.get_by_label("Kind").select_option("vm")
    expect(page).to_have_url(re.compile(r"[?&]kind=vm(&|$)"))
    expect(page.locator(".pagination")).to_contain_text("Page 1 of 2 (61)")
    page.get_by_label("Name contains").fill("bulk")
    expect(page).to_have_url(re.compile(r"[?&]q=bulk(&|$)"))
    expect(page.locator(".pagination")).to_contain_text("Page 1 of 2 (60)")
    expect(page.locator("tr[data-instance=web-1]")).to_have_count(0)
    _not_reloaded(page)  # filtering swapped the results in place
    page.get_by_role("link", name="Next").click()
    expect(page.locator(".pagination")).to_contain_text("Page 2 of 2 (60)")
    expect(page).to_have_url(re.compile(r"q=bulk.*kind=vm.*page=2"))
    expect(page.get_by_label("Name contains")).to_have_value("bulk")
    expect(page.locator("tr[data-instance]")).to_have_count(10)


def test_member_of_another_tenant_gets_404(live_server: Any, page: Any, world: World) -> None:
    base = live_server.url
    login(page, base, "b_member")
    response = page.goto(f"{base}/instances/{world.instance_a.pk}/")
    assert response is not None and response.status == 404
    expect(page.get_by_role("heading", name="Not found")).to_be_visible()
    expect(page.get_by_text("web-1")).to_have_count(0)


NARROW = {"width": 390, "height": 844}


def _fits(page: Any, url: str, controls: list[Any]) -> None:
    """No sideways scrolling of the page, and each key control visible within the window's width."""
    page.goto(url)
    expect(page.get_by_role("heading", level=1)).to_be_visible()
    inner = page.evaluate("window.innerWidth")
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= inner, f"{url} is {width}px wide in a {inner}px window"
    for control in controls:
        expect(control).to_be_visible()
        box = control.bounding_box()
        assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= inner, (url, control, box)


def test_tenant_pages_and_narrow_screen(live_server: Any, page: Any, browser: Any, world: World,
                                       queued: list[Any]) -> None:  # fmt: skip
    base = live_server.url
    page.goto(base + "/login/")
    expect(page.get_by_role("heading", name="Log in")).to_be_visible()
    assert _unlabelled_controls(page) == []
    shot(page, "login")
    login(page, base, "a_member")
    for name, url in (("images", "/images/"), ("networks", "/networks/"), ("ssh-keys", "/ssh-keys/"),
                      ("events", "/events/")):  # fmt: skip
        page.goto(base + url)
        expect(page.get_by_role("heading", level=1)).to_be_visible()
        assert _unlabelled_controls(page) == [], url
        shot(page, name)
    # keyboard: the first Tab reaches the skip link, which moves focus to the content
    page.goto(base + "/")
    page.keyboard.press("Tab")
    expect(page.get_by_role("link", name="Skip to content")).to_be_focused()

    narrow = browser.new_context(viewport=NARROW, is_mobile=True)
    try:
        phone = narrow.new_page()
        login(phone, base, "a_member")

        def link(name: str) -> Any:
            return phone.get_by_role("link", name=name, exact=True)

        def button(name: str) -> Any:
            return phone.get_by_role("button", name=name, exact=True)

        def field(name: str) -> Any:
            return phone.get_by_label(name, exact=True)

        pages: list[tuple[str, str, list[Any]]] = [
            ("dashboard-390", "/", [link("Launch instance")]),
            (
                "instance-detail-390",
                f"/instances/{world.instance_a.pk}/",
                [button("Shut down"), link("Delete…")],
            ),
            (
                "launch-390",
                "/instances/new/",
                [field("Name"), field("Image"), field("Flavor"), button("Launch")],
            ),
            (
                "instances-390",
                "/instances/",
                [field("Name contains"), field("Kind"), button("Filter"), link("web-1")],
            ),
            ("images-390", "/images/", [link("Upload an image"), link("busybox:1")]),
        ]
        for name, url, controls in pages:
            _fits(phone, base + url, controls)
            shot(phone, name)
        phone.context.clear_cookies()
        login(phone, base, "operator")
        card = phone.locator("[data-node=shared-1]")
        apply = card.get_by_role("button", name="Apply")
        drain = card.get_by_role("link", name="Drain (disable scheduling)…")
        _fits(phone, base + "/ops/nodes/", [card.get_by_label("Dedicate to"), apply, drain])
        shot(phone, "ops-nodes-390")
    finally:
        narrow.close()


#: keeps every value the upload page's <progress> takes, as [value, max], in sessionStorage, which
#: outlives the page: the upload page leaves for the image's page as soon as the file is sent
RECORD_PROGRESS = """
document.addEventListener("DOMContentLoaded", () => {
  const bar = document.getElementById("upload-progress");
  if (!bar) return;
  new MutationObserver(() => {
    const seen = JSON.parse(sessionStorage.getItem("progress") || "[]");
    seen.push([bar.value, bar.max]);
    sessionStorage.setItem("progress", JSON.stringify(seen));
  }).observe(bar, {attributes: true, attributeFilter: ["value"]});
});
"""


def test_upload_an_image_with_progress_and_see_it_checked(
    live_server: Any, page: Any, world: World, settings: Any, tmp_path: Any
) -> None:
    """Real upload from the browser: the file streams through the API; the detail page polls the import."""
    from tests.hostcaps import require_binary
    from tests.portal import imagefiles as f

    require_binary("qemu-img")
    settings.SKYPORT_IMAGE_STORE = tmp_path / "store"
    disk = f.qcow2(tmp_path / "web.qcow2", "64M")
    base = live_server.url
    page.add_init_script(RECORD_PROGRESS)
    login(page, base, "a_member")
    page.get_by_role("link", name="Images").first.click()
    page.get_by_role("link", name="Upload an image").click()
    assert _unlabelled_controls(page) == []
    # a clash with an existing name:version keeps the form and says why
    page.get_by_label("Name").fill("secret")
    page.get_by_label("Version").fill("1")
    page.get_by_label("File", exact=True).set_input_files(str(disk))
    page.get_by_role("button", name="Upload").click()
    expect(page.locator("[data-for=version]")).to_contain_text("already exists in tenant acme")
    expect(page.get_by_label("Name")).to_have_value("secret")
    page.get_by_label("Name").fill("web")
    page.get_by_label("Expected sha256 (optional)").fill(f.digest(disk.read_bytes())[7:])
    shot(page, "image-upload")
    # a local upload of this ~200 KB file is over in one step; at 128 KiB/s it takes over a second,
    # so the bar has the time to show its way up (Chromium's network emulation, through CDP)
    cdp = page.context.new_cdp_session(page)
    cdp.send("Network.enable")
    slow = {"offline": False, "latency": 0, "downloadThroughput": -1, "uploadThroughput": 128 * 1024}
    cdp.send("Network.emulateNetworkConditions", slow)
    page.get_by_role("button", name="Upload").click()
    page.wait_for_url(re.compile(r"/images/\d+/$"))
    progress = json.loads(page.evaluate("sessionStorage.getItem('progress')") or "[]")
    values = [value for value, _max in progress]
    assert {m for _v, m in progress} == {100}, progress
    assert values[0] == 0 and values[-1] == 100, f"the bar starts empty and ends full: {values}"
    assert values == sorted(values), f"the bar never goes back: {values}"
    assert any(0 < v < 100 for v in values), f"the bar shows the upload on its way: {values}"
    expect(page.locator("#image-status [data-status]")).to_have_text("active", timeout=POLL_TIMEOUT)
    expect(page.locator("#image-status")).to_contain_text("VM (qcow2)")
    shot(page, "image-detail")
    image_id = int(page.url.rstrip("/").rsplit("/", 1)[1])
    # another tenant cannot open it
    assert world.client("b_admin").get(f"/api/v1/images/{image_id}/").status_code == 404


#: counts the page's XHRs (htmx polls with XHR) in ``window.__opened``; runs before the page's scripts
RECORD_XHR = """
window.__opened = [];
const open = XMLHttpRequest.prototype.open;
XMLHttpRequest.prototype.open = function (method, url) {
  window.__opened.push(new URL(url, location.href).pathname);
  return open.apply(this, arguments);
};
"""


def test_detail_panels_stop_polling_once_deleted(live_server: Any, page: Any, world: World,
                                                 fake_nodes: FakeNodes) -> None:  # fmt: skip
    """State, console and stats poll while the instance exists and all stop once it is deleted.

    Playwright's clock runs htmx's timers: after the stop, a minute of page time passes at
    once and not one more request may leave the page.
    """
    base = live_server.url
    url = f"/instances/{world.instance_a.pk}/"
    page.add_init_script(RECORD_XHR)
    page.clock.install()
    login(page, base, "a_member")
    page.goto(base + url)
    expect(page.locator("[data-field=stats]")).to_contain_text("No statistics yet")
    page.clock.run_for(6_000)
    for panel, times in (("status/", 1), ("console/", 2), ("stats/", 2)):
        page.wait_for_function(f"window.__opened.filter(p => p === '{url}{panel}').length >= {times}")

    page.get_by_role("link", name="Delete…").click()
    page.get_by_role("button", name="Delete instance").click()
    expect(page).to_have_url(re.compile(r"/instances/$"))
    page.goto(base + url)
    expect(page.locator("#instance-status [data-field=task_state]")).to_have_text("deleting")
    fake_nodes.run()
    status = page.locator("#instance-status")
    expect(status.locator("[data-field=vm_state]")).to_have_text("deleted", timeout=POLL_TIMEOUT)
    expect(page.locator("#instance-stats")).to_contain_text("the instance is deleted", timeout=POLL_TIMEOUT)
    expect(page.locator("#instance-console")).not_to_have_attribute("hx-trigger", re.compile("every"))
    # the instance's panels stop; the header's task area (not about this instance) keeps polling
    expect(page.locator("main [hx-trigger*=every]")).to_have_count(0)
    before = page.evaluate("window.__opened.length")
    page.clock.run_for(60_000)
    asked = page.evaluate(f"window.__opened.slice({before})")
    assert [p for p in asked if p != "/tasks/panel/"] == [], "a deleted instance's panels still poll"
