"""Real consoles through the portal: the relay on uvicorn, real nodes (crun, libvirt) in this process.

Messages the portal sends to a node are handed to a real :class:`NodeService`
(the worker's code minus Celery), whose hubs are real processes talking to the
tests' own Redis database.  ``world`` (tests/portal/conftest.py) supplies the
tenants and users; instance rows are made for the workloads booted here.
"""

from __future__ import annotations

import dataclasses
import json
import secrets
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from django.conf import settings
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from compute.config import NodeConfig
from compute.drivers.container import ContainerDriver
from compute.drivers.vm import LibvirtDriver
from compute.spec import InstanceSpec, Kind, NetworkAttachment, NetworkSegment
from compute.tasks import NodeService
from portal.cloud import dispatch
from portal.cloud.models import ComputeNode, Instance
from tests.compute.container_fixtures import SampleImages, make_spec, require_container_host, sample_images
from tests.compute.vm_fixtures import (
    build_sample_image,
    image_ref,
    node_config,
    random_mac,
    vm_spec,
    vm_state_dir,
    wait_for,
)
from tests.hostcaps import require_libvirtd
from tests.portal.conftest import World, world

__all__ = ["sample_images", "vm_state_dir", "world"]
BROKER = settings.CELERY_BROKER_URL


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Relay:
    """``portal.asgi`` under uvicorn in a thread, on a free port."""

    def __init__(self) -> None:
        self.port = free_port()
        config = uvicorn.Config(
            "portal.asgi:application", host="127.0.0.1", port=self.port, log_level="warning"
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> Relay:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="session")
def relay() -> Iterator[Relay]:
    with Relay() as r:
        yield r


@dataclasses.dataclass
class Nodes:
    services: dict[Kind, NodeService]

    def deliver(self, queue: str, task: str, args: list[Any]) -> None:
        payload = args[0]
        kind = Kind(payload.get("kind") or payload["spec"]["kind"])
        self.services[kind].handle(task, payload)


@pytest.fixture(scope="session")
def container_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ContainerDriver]:
    require_container_host()
    state = tmp_path_factory.mktemp("console-node")
    drv = ContainerDriver(
        NodeConfig(f"skc{secrets.token_hex(3)}", state, "test:///default", "qemu", "crun", BROKER)
    )
    yield drv
    base = state / "containers"
    if base.exists():
        for d in base.iterdir():
            if d.name.startswith("sky-"):
                drv.destroy(d.name.removeprefix("sky-"))
    shutil.rmtree(state, ignore_errors=True)


@pytest.fixture(scope="session")
def container(container_node: ContainerDriver, sample_images: SampleImages) -> Iterator[InstanceSpec]:
    spec = dataclasses.replace(
        make_spec(sample_images.base, command=("sleep", "36000")), hostname="shell-box"
    )
    container_node.spawn(spec)
    yield spec
    container_node.destroy(spec.instance_id)


@pytest.fixture(scope="module")
def vm_node(vm_state_dir: Path) -> LibvirtDriver:
    require_libvirtd()
    return LibvirtDriver(dataclasses.replace(node_config(vm_state_dir), broker_url=BROKER))


def off_loop(fn: Any) -> Any:
    """Run ``fn`` in a fresh thread: pyroute2 runs its own asyncio loop, which it cannot do in a
    thread where Playwright's loop is already running."""
    out: list[Any] = []
    err: list[BaseException] = []

    def run() -> None:
        try:
            out.append(fn())
        except BaseException as exc:
            err.append(exc)

    t = threading.Thread(target=run)
    t.start()
    t.join()
    if err:
        raise err[0]
    return out[0] if out else None


@pytest.fixture(scope="module")
def vm(vm_node: LibvirtDriver) -> Iterator[InstanceSpec]:
    from compute.network import bridge

    name, n = f"skt{secrets.token_hex(4)}", secrets.randbelow(254) + 1
    net = NetworkAttachment(
        NetworkSegment("testnet", name, host_address=f"198.18.{n}.1/24"), f"198.18.{n}.10/24", random_mac()
    )
    spec = vm_spec(image_ref(build_sample_image()), (net,), hostname="console-guest")
    try:
        off_loop(lambda: vm_node.spawn(spec))
        wait_for("ready", lambda: "SKYPORT-READY" in vm_node.console_log(spec.instance_id, 1 << 20), 90, 0.2)
        yield spec
    finally:
        off_loop(lambda: vm_node.destroy(spec.instance_id))
        off_loop(lambda: bridge.delete_bridge(name))


@pytest.fixture
def nodes(monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> Iterator[Nodes]:
    """Real node services for the workloads the test asked for (``container`` and/or ``vm``)."""
    services = {}
    if "container" in request.fixturenames:
        drv: ContainerDriver = request.getfixturevalue("container_node")
        services[Kind.CONTAINER] = NodeService(drv.config, lambda t, p: None, {Kind.CONTAINER: drv})
    if "vm" in request.fixturenames:
        vdrv: LibvirtDriver = request.getfixturevalue("vm_node")
        services[Kind.VM] = NodeService(vdrv.config, lambda t, p: None, {Kind.VM: vdrv})
    n = Nodes(services)
    monkeypatch.setattr(dispatch, "_send", n.deliver)
    yield n
    for svc in services.values():
        for hub in svc._hubs:
            try:
                hub.wait(20)
            except Exception:
                hub.kill()


def instance_row(world: World, spec: InstanceSpec, kind: str) -> Instance:
    """An active instance of tenant a whose id is the workload's, on a node that reports consoles."""
    node = ComputeNode.objects.get(name="shared-1")
    inst = world.instance_a
    return Instance.objects.create(
        id=spec.instance_id,
        tenant=world.a,
        name=f"{kind}-console",
        kind=kind,
        isolation_reason="test",
        image=inst.image,
        flavor=inst.flavor,
        network=inst.network,
        vcpus=1,
        ram_mb=128,
        disk_gb=1,
        vm_state="active",
        power_state="running",
        node=node,
    )


class Term:
    """A WebSocket console client: what a browser's terminal does, in a test."""

    def __init__(self, url: str, origin: str | None = "http://127.0.0.1") -> None:
        self.ws: ClientConnection = connect(url, origin=origin, open_timeout=10)  # type: ignore[arg-type]
        self.output = bytearray()
        self.texts: list[dict[str, Any]] = []
        self.close_code: int | None = None
        self.close_reason = ""

    def _recv(self, timeout: float) -> bool:
        try:
            msg = self.ws.recv(timeout=timeout)
        except TimeoutError:
            return True
        except ConnectionClosed as exc:
            if exc.rcvd is not None:
                self.close_code, self.close_reason = exc.rcvd.code, exc.rcvd.reason
            return False
        if isinstance(msg, bytes):
            self.output += msg
        else:
            self.texts.append(json.loads(msg))
        return True

    def until(self, needle: bytes, timeout: float = 20.0) -> bytes:
        """Read until ``needle`` shows up (searching only what arrived since the last look)."""
        deadline = time.monotonic() + timeout
        seen = 0
        while needle not in self.output[max(0, seen - len(needle)) :]:
            seen = len(self.output)
            left = deadline - time.monotonic()
            if left <= 0 or not self._recv(min(left, 0.5)):
                raise AssertionError(f"{needle!r} not seen; got {bytes(self.output[-400:])!r}, {self.texts}")
        return bytes(self.output)

    def wait_text(self, kind: str, timeout: float = 20.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            for t in self.texts:
                if t.get("type") == kind:
                    return t
            left = deadline - time.monotonic()
            if left <= 0 or not self._recv(min(left, 0.5)):
                raise AssertionError(f"no {kind!r} message; got {self.texts}, closed {self.close_code}")

    def wait_closed(self, timeout: float = 20.0) -> tuple[int | None, str]:
        deadline = time.monotonic() + timeout
        while self._recv(0.5):
            if time.monotonic() > deadline:
                raise AssertionError("the relay did not close the socket")
        return self.close_code, self.close_reason

    def type(self, data: bytes) -> None:
        self.ws.send(data)

    def close(self) -> None:
        self.ws.close()
