from __future__ import annotations

import contextlib
import dataclasses
import io
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from django.conf import settings
from django.contrib.auth import get_user_model
from django.test import Client
from rest_framework.test import APIClient

from compute import fetch, transfer
from compute.drivers.fake import REAL_CAPABILITIES
from compute.spec import Kind, Task
from compute.volumes import VolumeError
from portal.audit.models import Event, Outcome
from portal.cloud import dispatch, networks
from portal.cloud.models import ComputeNode, Flavor, Instance
from portal.images.models import Artifact, Image
from portal.images.nodekeys import node_key
from portal.storage import moves
from portal.tenancy.choices import Role
from portal.tenancy.models import APIToken, Membership, SSHKey, Tenant


def new_ed25519() -> str:
    key = ed25519.Ed25519PrivateKey.generate().public_key()
    return key.public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH).decode() + " test@host"


ED25519 = new_ed25519()


DIGEST = "sha256:" + "ab" * 32
#: a node's ``drivers`` as its heartbeat records them: both drivers up, with the real drivers' capabilities
UP_BOTH = {
    kind.value: {"ok": True, "detail": "test", "capabilities": sorted(REAL_CAPABILITIES[kind])}
    for kind in Kind
}


@pytest.fixture(autouse=True)
def sent(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str, list[Any]]]:
    """Messages the portal sends to nodes, captured instead of reaching a broker."""
    messages: list[tuple[str, str, list[Any]]] = []
    monkeypatch.setattr(dispatch, "_send", lambda queue, task, args: messages.append((queue, task, args)))
    # tests run inside a transaction that never commits: hand messages over at once
    monkeypatch.setattr(dispatch.transaction, "on_commit", lambda func, using=None, robust=False: func())
    # nor does the sweeper read a queue's length there (what the lane's Redis holds is not the
    # test's): unknown, so nodes are judged by their beats alone; tests that mean it patch it
    monkeypatch.setattr(dispatch, "queued", lambda queue: None)
    return messages


def heartbeat(
    node: str,
    *,
    kinds: tuple[str, ...] = ("vm", "container"),
    down: Mapping[str, str] | None = None,
    capabilities: Mapping[str, Iterable[str]] | None = None,
    inventory: Iterable[dict[str, Any]] = (),
    sent_at: float | None = None,
    vcpus: int = 64,
    ram_mb: int = 262144,
    disk_gb: int = 10000,
    **extra: Any,
) -> dict[str, Any]:
    """A node's heartbeat as the control worker receives it (a NodeReport's JSON, not validated here).

    ``down`` names the drivers that are not operational, with the reason.
    """
    down, capabilities = down or {}, capabilities or {}
    drivers = [
        {
            "kind": k,
            "ok": k not in down,
            "detail": down.get(k, ""),
            "capabilities": sorted(capabilities.get(k, ())),
        }
        for k in kinds
    ]
    return {
        "node": node,
        "queue": f"node.{node}",
        "vcpus": vcpus,
        "ram_mb": ram_mb,
        "disk_gb": disk_gb,
        "drivers": drivers,
        "inventory": list(inventory),
        "sent_at": time.time() if sent_at is None else sent_at,
        **extra,
    }


def make_image(name: str, version: str, *formats: str, owner: Tenant | None = None) -> Image:
    image = Image.objects.create(name=name, version=version, owner=owner, status="active")
    for fmt in formats:
        Artifact.objects.create(image=image, format=fmt, digest=DIGEST, size=1)
    return image


@dataclasses.dataclass
class World:
    a: Tenant
    b: Tenant
    users: dict[str, Any]
    flavor_public: Flavor
    flavor_a: Flavor
    instance_a: Instance
    node_a: ComputeNode
    key_a: SSHKey
    token_a: APIToken
    event_a: Event
    membership_a: Membership

    def client(self, who: str) -> APIClient:
        c = APIClient()
        c.force_login(self.users[who])
        return c


def make_user(username: str, **extra: Any) -> Any:
    return get_user_model().objects.create_user(username=username, password="pw-" + username * 2, **extra)


@pytest.fixture
def world(db: Any) -> World:
    a = Tenant.objects.create(slug="acme", name="Acme")
    b = Tenant.objects.create(slug="bobco", name="Bob Co")
    users = {
        "a_admin": make_user("a_admin"),
        "a_member": make_user("a_member"),
        "a_viewer": make_user("a_viewer"),
        "b_admin": make_user("b_admin"),
        "b_member": make_user("b_member"),
        "operator": make_user("operator", is_staff=True),
    }
    Membership.objects.create(user=users["a_admin"], tenant=a, role=Role.ADMIN)
    membership_a = Membership.objects.create(user=users["a_member"], tenant=a, role=Role.MEMBER)
    Membership.objects.create(user=users["a_viewer"], tenant=a, role=Role.VIEWER)
    Membership.objects.create(user=users["b_admin"], tenant=b, role=Role.ADMIN)
    Membership.objects.create(user=users["b_member"], tenant=b, role=Role.MEMBER)
    flavor_public = Flavor.objects.create(name="m1.tiny", vcpus=1, ram_mb=128, disk_gb=1)
    flavor_a = Flavor.objects.create(
        name="acme.big", vcpus=2, ram_mb=512, disk_gb=4, is_public=False, tenant=a
    )
    make_image("busybox", "1", "oci")
    tiny = make_image("tiny", "1", "qcow2")
    make_image("sample", "1", "qcow2", "oci")
    make_image("secret", "1", "qcow2", owner=a)
    ComputeNode.objects.create(
        name="shared-1",
        queue="node.shared-1",
        status="up",
        vcpus=64,
        ram_mb=262144,
        disk_gb=10000,
        drivers=UP_BOTH,
    )
    node_a = ComputeNode.objects.create(name="node-a", queue="node.node-a", tenancy="dedicated", owner=a)
    instance_a = Instance.objects.create(
        tenant=a,
        name="web-1",
        kind="vm",
        isolation_reason="vm: test",
        image=tiny,
        flavor=flavor_public,
        network=networks.default_network(a),
        vcpus=1,
        ram_mb=128,
        disk_gb=1,
        created_by=users["a_member"],
        vm_state="active",
        power_state="running",
        node=ComputeNode.objects.get(name="shared-1"),
    )
    key_a = SSHKey.objects.create(user=users["a_admin"], name="laptop", public_key=ED25519)
    token = APIToken(
        user=users["a_admin"],
        membership=Membership.objects.get(user=users["a_admin"]),
        name="ci",
        expires_at="2999-01-01T00:00:00Z",
    )
    token.issue()
    token.save()
    event_a = Event.objects.create(
        tenant=a, action="test.event", outcome=Outcome.SUCCESS, actor_name="a_admin"
    )
    return World(
        a, b, users, flavor_public, flavor_a, instance_a, node_a, key_a, token, event_a, membership_a
    )


class FakeNodes:
    """Plays the compute nodes for captured messages: NodeService over FakeDrivers.

    Observations and heartbeats go straight to the control tasks, so a test
    walks the whole flow of the product without a broker or hypervisor.
    """

    def __init__(self, sent: list[tuple[str, str, list[Any]]], tmp: Any) -> None:
        self.sent = sent
        self.tmp = tmp
        self.nodes: dict[str, Any] = {}
        self.replies: dict[str, dict[str, Any]] = {}  # what nodes pushed onto Redis lists (logs)
        self.split = False  # True: each node its own state directory (tmp/<name>), as moves need

    def service(self, queue: str) -> Any:
        from compute.config import NodeConfig
        from compute.drivers.fake import FakeDriver
        from compute.tasks import NodeService
        from portal.cloud.tasks import apply_console, apply_node_report, apply_observation
        from portal.storage.tasks import apply_volume_observation, apply_volume_progress

        if queue not in self.nodes:
            name = queue.removeprefix("node.")
            state = Path(self.tmp) / name if self.split else self.tmp
            cfg = NodeConfig(name, state, "test:///default", "qemu", "crun", "memory://")

            def deliver(task: str, payload: dict[str, Any]) -> None:
                handlers = {
                    Task.OBSERVE: apply_observation,
                    Task.CONSOLE_TAIL: apply_console,
                    Task.NODE_REPORT: apply_node_report,
                    Task.OBSERVE_VOLUME: apply_volume_observation,
                    Task.VOLUME_PROGRESS: apply_volume_progress,
                }
                handlers[Task(task)](payload)

            drivers = {Kind.VM: FakeDriver(Kind.VM), Kind.CONTAINER: FakeDriver(Kind.CONTAINER)}
            self.nodes[queue] = NodeService(
                cfg, deliver, drivers, prepare_bridge=lambda nic: None, reply=self.replies.__setitem__
            )
        return self.nodes[queue]

    def run(self, redeliver: bool = False) -> int:
        """Deliver every pending message (twice each with ``redeliver``); returns how many."""
        done = 0
        while self.sent:
            queue, task, args = self.sent.pop(0)
            svc = self.service(queue)
            for _ in range(2 if redeliver else 1):
                svc.handle(task, *args)
            done += 1
        return done


@pytest.fixture
def nodes(sent: list[tuple[str, str, list[Any]]], tmp_path: Any) -> FakeNodes:
    return FakeNodes(sent, tmp_path)


@pytest.fixture
def store(settings: Any, tmp_path: Path) -> Path:
    """An empty image store of the test's own (uploads need qemu-img to be checked)."""
    from tests.hostcaps import require_binary

    require_binary("qemu-img")
    root = tmp_path / "store"
    settings.SKYPORT_IMAGE_STORE = root
    return root


@pytest.fixture
def wire(monkeypatch: pytest.MonkeyPatch, store: Path) -> list[tuple[str, int, int]]:
    """The nodes' HTTP to the portal through the test client; returns the progress reports seen."""
    client = Client()

    def put(url: str, token: str, body: Any, size: int, timeout: float = 0) -> None:
        data = b"".join(iter(lambda: body.read(1 << 16), b""))
        r = client.put(
            url.removeprefix(settings.SKYPORT_PORTAL_URL),
            data=data,
            content_type="application/octet-stream",
            HTTP_AUTHORIZATION=f"Upload {token}",
        )
        if r.status_code >= 400:
            raise VolumeError(f"PUT {url}: HTTP {r.status_code} {r.json()['message']}")

    @contextlib.contextmanager
    def get(url: str, timeout: float = 0) -> Iterator[Any]:
        r = client.get(
            url.removeprefix(settings.SKYPORT_PORTAL_URL),
            HTTP_AUTHORIZATION=f"Node shared-1:{node_key('shared-1')}",
        )
        if r.status_code >= 400:
            raise fetch.FetchError(f"GET {url}: HTTP {r.status_code}")
        data = b"".join(r.streaming_content)  # type: ignore[attr-defined]
        fh = io.BytesIO(data)
        fh.headers = {"Content-Length": str(len(data))}  # type: ignore[attr-defined]
        yield fh

    seen: list[tuple[str, int, int]] = []
    recorded = moves.progress

    def progress(p: Any) -> bool:
        seen.append((p.phase.value, p.done, p.total))
        return recorded(p)

    monkeypatch.setattr(transfer, "http_put", put)
    monkeypatch.setattr(fetch, "open_url", get)
    monkeypatch.setattr(moves, "progress", progress)
    return seen


@pytest.fixture
def split(nodes: FakeNodes) -> FakeNodes:
    nodes.split = True
    ComputeNode.objects.create(
        name="shared-2",
        queue="node.shared-2",
        status="up",
        vcpus=64,
        ram_mb=262144,
        disk_gb=10000,
        drivers=UP_BOTH,
    )
    return nodes


@pytest.fixture
def node_uploads(store: Path, settings: Any, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """A fake node's uploads (``compute.fetch.upload``: publish, migration) reach the portal's real
    upload endpoint through the test client instead of HTTP; returns the paths PUT to, in order."""
    from django.test import Client

    from compute import fetch

    done: list[str] = []

    def put(url: str, token: str, path: Path, timeout: float = 3600.0) -> None:
        where = url.removeprefix(settings.SKYPORT_PORTAL_URL)
        auth = f"Upload {token}"
        r = Client().put(where, path.read_bytes(), "application/octet-stream", HTTP_AUTHORIZATION=auth)
        done.append(where)
        if r.status_code >= 300:
            raise fetch.FetchError(f"PUT {url}: HTTP {r.status_code} {r.content[:300]!r}")

    monkeypatch.setattr(fetch, "upload", put)
    return done
