"""Consoles over the API and a WebSocket, without a browser, against a real container and VM.

The ticket endpoint (``POST /api/v1/instances/{id}/console/sessions/``), the
relay on uvicorn, the node's hub and the workload are all real; only Celery
is replaced by a direct call of the node's ``NodeService``.
"""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

import pytest
from django.utils import timezone

from compute.drivers.container import ContainerDriver
from compute.spec import InstanceSpec
from portal.audit.models import Event
from portal.console.models import ConsoleSession
from tests.console.conftest import Nodes, Relay, Term, instance_row
from tests.portal.conftest import World

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.host, pytest.mark.slow]


@pytest.fixture(autouse=True)
def ws_url(settings: Any, relay: Relay) -> str:
    settings.SKYPORT_CONSOLE_WS_URL = f"ws://127.0.0.1:{relay.port}"
    return settings.SKYPORT_CONSOLE_WS_URL


def ticket(world: World, who: str, instance_id: str, mode: str, **extra: Any) -> dict[str, Any]:
    resp = world.client(who).post(
        f"/api/v1/instances/{instance_id}/console/sessions/", {"mode": mode, **extra}, format="json"
    )
    assert resp.status_code == 201, resp.content
    body: dict[str, Any] = resp.json()
    return body


def test_container_shell_over_the_api(world: World, nodes: Nodes, container: InstanceSpec) -> None:
    instance_row(world, container, "container")
    t = ticket(world, "a_member", container.instance_id, "exec")
    assert t["ws_url"].endswith(f"/ws/console/{t['ticket']}/") and t["mode"] == "exec"
    term = Term(t["ws_url"])
    assert term.wait_text("ready")["mode"] == "exec"
    term.type(b"hostname; echo sum-$((40+2))\n")
    term.until(b"sum-42")
    term.until(b"shell-box")
    term.type(b"id\n")
    term.until(b"uid=0(root) gid=0(root)")  # root of its own user namespace (a root image)
    term.type(b"exit 5\n")
    code, reason = term.wait_closed()
    assert (code, reason) == (1000, "the command exited with status 5")
    session = ConsoleSession.objects.get(pk=t["session"])
    assert session.started_at and session.ended_at and session.end_reason == reason
    actions = list(
        Event.objects.filter(object_id=container.instance_id).order_by("id").values_list("action", flat=True)
    )
    assert actions[-2:] == ["console.start", "console.end"]
    assert "ended after" in Event.objects.filter(action="console.end").latest("id").message


def test_a_ticket_is_single_use(world: World, nodes: Nodes, container: InstanceSpec) -> None:
    instance_row(world, container, "container")
    t = ticket(world, "a_member", container.instance_id, "exec")
    first = Term(t["ws_url"])
    first.wait_text("ready")
    again = Term(t["ws_url"])
    assert again.wait_closed() == (4401, "console ticket already used")
    first.close()


def test_an_expired_ticket_is_refused(world: World, nodes: Nodes, container: InstanceSpec) -> None:
    instance_row(world, container, "container")
    t = ticket(world, "a_member", container.instance_id, "exec")
    ConsoleSession.objects.filter(pk=t["session"]).update(expires_at=timezone.now() - dt.timedelta(seconds=1))
    assert Term(t["ws_url"]).wait_closed() == (4401, "console ticket expired")
    assert Term(t["ws_url"].replace(t["ticket"], "x" * 43)).wait_closed() == (4401, "unknown console ticket")


def test_a_wrong_origin_is_refused_and_does_not_use_the_ticket(
    world: World, nodes: Nodes, container: InstanceSpec
) -> None:
    instance_row(world, container, "container")
    t = ticket(world, "a_member", container.instance_id, "exec")
    code, reason = Term(t["ws_url"], origin="https://evil.example").wait_closed()
    assert (code, reason) == (4403, "origin https://evil.example is not allowed")
    ok = Term(t["ws_url"])  # the ticket is still good for the portal's own page
    ok.wait_text("ready")
    ok.close()


def test_another_tenants_instance_gets_no_ticket(world: World, nodes: Nodes, container: InstanceSpec) -> None:
    instance_row(world, container, "container")
    for mode in ("exec", "view"):
        resp = world.client("b_member").post(
            f"/api/v1/instances/{container.instance_id}/console/sessions/", {"mode": mode}, format="json"
        )
        assert resp.status_code == 404
    resp = world.client("b_member").post(
        f"/api/v1/instances/{container.instance_id}/exec/", {"command": ["id"]}, format="json"
    )
    assert resp.status_code == 404


def test_viewer_gets_no_shell_and_no_write(world: World, nodes: Nodes, container: InstanceSpec) -> None:
    instance_row(world, container, "container")
    viewer = world.client("a_viewer")
    for mode in ("exec", "write"):
        resp = viewer.post(f"/api/v1/instances/{container.instance_id}/console/sessions/", {"mode": mode})
        assert resp.status_code == 403, resp.content
        assert "member role" in resp.json()["message"]
    resp = viewer.post(f"/api/v1/instances/{container.instance_id}/exec/", {"command": ["id"]}, format="json")
    assert resp.status_code == 403


def test_bad_console_requests_are_400_or_409(world: World, nodes: Nodes, container: InstanceSpec) -> None:
    instance_row(world, container, "container")
    c = world.client("a_member")
    url = f"/api/v1/instances/{container.instance_id}/console/sessions/"
    assert c.post(url, {"mode": "root"}, format="json").status_code == 400
    assert c.post(url, {"mode": "write", "command": ["sh"]}, format="json").status_code == 400
    resp = c.post(url, {"mode": "write"}, format="json")
    assert resp.status_code == 409 and "has no serial console" in resp.json()["message"]
    bad = c.post(f"/api/v1/instances/{container.instance_id}/exec/", {"command": "id"}, format="json")
    assert bad.status_code == 400


def test_non_interactive_exec(world: World, nodes: Nodes, container: InstanceSpec) -> None:
    instance_row(world, container, "container")
    c = world.client("a_member")
    url = f"/api/v1/instances/{container.instance_id}/exec/"
    resp = c.post(url, {"command": ["sh", "-c", "hostname; exit 4"]}, format="json")
    assert resp.status_code == 200, resp.content
    assert resp.json() | {"seconds": 0} == {
        "exit_code": 4,
        "output": "shell-box\n",
        "truncated": False,
        "timed_out": False,
        "seconds": 0,
    }
    resp = c.post(url, {"command": ["sleep", "20"], "timeout": 0.5}, format="json")
    assert resp.json()["timed_out"] is True and resp.json()["exit_code"] is None
    assert c.post(url, {"command": ["id"], "timeout": 10_000}, format="json").status_code == 400


def test_vm_serial_console_write_and_view(world: World, nodes: Nodes, vm: InstanceSpec) -> None:
    instance_row(world, vm, "vm")
    writer = Term(ticket(world, "a_member", vm.instance_id, "write")["ws_url"])
    writer.wait_text("ready")
    viewer = Term(ticket(world, "a_viewer", vm.instance_id, "view")["ws_url"])
    viewer.wait_text("ready")
    writer.type(b"hostname\n")
    writer.until(b"console-guest\r\n")
    viewer.until(b"console-guest\r\n")  # the viewer watches the same console
    marker = f"viewer-{uuid.uuid4().hex[:8]}"
    viewer.type(f"echo {marker}\n".encode())
    assert viewer.wait_text("notice")["message"] == "view only: your keystrokes are not sent"
    writer.type(b"echo writer-done\n")
    writer.until(b"writer-done\r\n")
    assert marker.encode() not in writer.output and marker.encode() not in viewer.output
    for term in (writer, viewer):
        term.close()


def test_idle_session_is_closed(
    world: World, nodes: Nodes, container: InstanceSpec, settings: Any, container_node: ContainerDriver
) -> None:
    settings.SKYPORT_CONSOLE_IDLE_SECONDS = 1.5
    instance_row(world, container, "container")
    term = Term(ticket(world, "a_member", container.instance_id, "exec")["ws_url"])
    term.wait_text("ready")
    assert term.wait_closed() == (4408, "idle for 1.5 s: closed")
