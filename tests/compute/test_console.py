"""Interactive consoles on the node (compute/console), against real crun and libvirt.

A container: a shell through ``crun exec --tty`` in the container's namespaces
and cgroup, typed into and read back through the hub's Redis streams, its exit
status reported; non-interactive exec with its exit code, output cap and
timeout.  A VM: the serial console of a booted tiny guest, where ``hostname``
answers with the name the seed gave it, and a viewer's keystrokes never reach it.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from compute.console import runexec
from compute.drivers.base import InvalidState, NotSupported
from compute.drivers.container import ContainerDriver, cgroups_path, id_base
from compute.drivers.vm import LibvirtDriver
from compute.spec import ConsoleMode, ConsoleOpen, ExecRequest, InstanceSpec, Kind, NetworkAttachment
from compute.spec import NetworkSegment as Segment
from compute.tasks import NodeService
from tests.compute.console_tools import BROKER, HubClient
from tests.compute.container_fixtures import SampleImages, driver, make_spec, sample_images
from tests.compute.vm_fixtures import (
    build_sample_image,
    image_ref,
    node_config,
    random_mac,
    test_bridge,
    vm_spec,
    vm_state_dir,
    wait_for,
)
from tests.hostcaps import require_libvirtd

pytestmark = [pytest.mark.host, pytest.mark.slow]
__all__ = ["driver", "sample_images", "test_bridge", "vm_state_dir"]


def service(drv: ContainerDriver | LibvirtDriver) -> NodeService:
    config = dataclasses.replace(drv.config, broker_url=BROKER)
    return NodeService(config, lambda task, payload: None, drivers={drv.kind: drv})


@pytest.fixture
def running(driver: ContainerDriver, sample_images: SampleImages) -> Iterator[InstanceSpec]:
    spec = make_spec(sample_images.base, command=("sleep", "3600"))
    driver.spawn(spec)
    try:
        yield spec
    finally:
        driver.destroy(spec.instance_id)


def open_hub(
    svc: NodeService, spec: InstanceSpec, mode: ConsoleMode, command: tuple[str, ...] = ()
) -> HubClient:
    hub = secrets.token_hex(8)
    client = HubClient(hub)
    client.hold()
    svc.console_open(ConsoleOpen(spec.instance_id, spec.kind, hub, mode, command))
    client.wait_alive()
    return client


def test_container_shell_runs_in_the_container_and_reports_its_exit(
    driver: ContainerDriver, running: InstanceSpec
) -> None:
    svc = service(driver)
    client = open_hub(svc, running, ConsoleMode.EXEC, ("/bin/sh",))
    try:
        client.send(b"echo marker-$((6*7)); hostname\n")
        client.read_until(b"marker-42")
        assert running.hostname.encode() in client.read_until(b"box1\r\n")
        # seen from the host: the shell is in the container's cgroup and in every namespace of its PID 1
        procs = Path("/sys/fs/cgroup/pids", cgroups_path(running.instance_id).lstrip("/"), "cgroup.procs")

        def cmdline(pid: int) -> bytes:
            try:
                return Path(f"/proc/{pid}/cmdline").read_bytes()
            except FileNotFoundError:  # exited between the two reads
                return b""

        # busybox sh runs `hostname` as an applet in a forked child whose cmdline stays /bin/sh: it has
        # printed, but on a loaded host it may not have exited yet; wait until only the shell is left
        deadline = time.monotonic() + 10
        while True:
            pids = [int(p) for p in procs.read_text().split()]
            shells = [p for p in pids if cmdline(p).startswith(b"/bin/sh")]
            init = [p for p in pids if cmdline(p).startswith(b"sleep")]
            if (len(shells) == 1 and len(init) == 1) or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert len(shells) == 1 and len(init) == 1, pids
        for ns in ("user", "pid", "mnt", "net", "uts", "ipc"):
            assert os.readlink(f"/proc/{shells[0]}/ns/{ns}") == os.readlink(f"/proc/{init[0]}/ns/{ns}"), ns
        # user namespaces (docs/container-driver.md): root inside, the tenant range's base on the host
        client.send(b"id\n")
        client.read_until(b"uid=0(root) gid=0(root)")
        host_ids = Path(f"/proc/{shells[0]}/status").read_text().split("Uid:")[1].split()[:4]
        assert host_ids == [str(id_base(running))] * 4, host_ids
        client.send(b"exit 7\n")
        assert client.wait_end() == "the command exited with status 7"
    finally:
        client.cleanup()
    for hub in svc._hubs:
        assert hub.wait(10) == 0


def test_container_shell_hub_ends_when_nobody_holds_the_lease(
    driver: ContainerDriver, running: InstanceSpec
) -> None:
    svc = service(driver)
    client = open_hub(svc, running, ConsoleMode.EXEC, ("/bin/sh",))
    try:
        client.r.delete(client.keys.lease)
        assert client.wait_end() == "idle: no client attached"
    finally:
        client.cleanup()


def test_exec_of_a_stopped_container_ends_with_the_reason(
    driver: ContainerDriver, sample_images: SampleImages
) -> None:
    spec = make_spec(sample_images.base, command=("true",))
    driver.spawn(spec)
    try:
        wait_for("exit", lambda: driver.info(spec.instance_id).power_state.value != "running", 10, 0.1)
        with pytest.raises(InvalidState):
            driver.exec_argv(spec.instance_id, ("id",), tty=True)
        hub = secrets.token_hex(8)
        client = HubClient(hub)
        client.hold()
        service(driver).console_open(ConsoleOpen(spec.instance_id, spec.kind, hub, ConsoleMode.EXEC, ("sh",)))
        assert "is not running" in client.wait_end()
        client.cleanup()
    finally:
        driver.destroy(spec.instance_id)


def test_non_interactive_exec_exit_code_cap_and_timeout(
    driver: ContainerDriver, running: InstanceSpec
) -> None:
    iid = running.instance_id

    def run(*command: str, timeout: float = 10.0, max_bytes: int = 65536) -> runexec.ExecResult:
        return runexec.run(driver, ExecRequest(iid, Kind.CONTAINER, command, "r", timeout, max_bytes))

    done = run("sh", "-c", "echo out; echo err >&2; exit 3")
    assert (done.exit_code, done.output, done.truncated, done.timed_out) == (3, "out\nerr\n", False, False)
    capped = run("sh", "-c", "yes | head -c 1000000", max_bytes=1000)
    assert capped.exit_code == 0 and capped.truncated and len(capped.output) == 1000
    slow = run("sleep", "30", timeout=1.0)
    assert slow.timed_out and slow.exit_code is None and slow.seconds < 10
    missing = run("/no/such/binary")
    assert missing.exit_code not in (0, None)


def test_vm_has_no_exec_and_containers_no_serial(driver: ContainerDriver, running: InstanceSpec) -> None:
    with pytest.raises(NotSupported):
        driver.serial_pty(running.instance_id)


# ---------------------------------------------------------------- VM serial console


@pytest.fixture(scope="module")
def vm(vm_state_dir: Path, test_bridge: tuple[str, int]) -> Iterator[tuple[LibvirtDriver, InstanceSpec]]:
    require_libvirtd()
    drv = LibvirtDriver(node_config(vm_state_dir))
    name, n = test_bridge
    net = NetworkAttachment(
        Segment("testnet", name, host_address=f"198.18.{n}.1/24"), f"198.18.{n}.10/24", random_mac()
    )
    spec = vm_spec(image_ref(build_sample_image()), (net,), hostname="console-vm")
    try:
        drv.spawn(spec)
        wait_for(
            "guest ready",
            lambda: "SKYPORT-READY" in drv.console_log(spec.instance_id, 1 << 20),
            90.0,
            0.2,
        )
        yield drv, spec
    finally:
        drv.destroy(spec.instance_id)


def test_vm_serial_console_answers_typing(vm: tuple[LibvirtDriver, InstanceSpec]) -> None:
    drv, spec = vm
    assert drv.serial_pty(spec.instance_id).startswith("/dev/pts/")
    client = open_hub(service(drv), spec, ConsoleMode.WRITE)
    try:
        client.send(b"\n")
        client.read_until(b"# ")
        client.send(b"hostname\n")
        client.read_until(b"console-vm\r\n")
        # libvirt's <log> still records what the guest printed
        assert "console-vm" in drv.console_log(spec.instance_id, 4096)
    finally:
        client.r.delete(client.keys.lease)
        client.wait_end()
        client.cleanup()


def test_vm_viewer_keystrokes_never_reach_the_guest(vm: tuple[LibvirtDriver, InstanceSpec]) -> None:
    drv, spec = vm
    marker = f"viewer-{uuid.uuid4().hex[:8]}"
    client = open_hub(service(drv), spec, ConsoleMode.VIEW)
    try:
        client.send(f"echo {marker}\n".encode())
        client.read(1.0)
        client.read(1.0)
        assert marker.encode() not in client.output
    finally:
        client.r.delete(client.keys.lease)
        client.wait_end()
        client.cleanup()
    assert marker not in drv.console_log(spec.instance_id, 1 << 16)


def test_a_second_open_of_a_live_vm_hub_is_a_no_op(vm: tuple[LibvirtDriver, InstanceSpec]) -> None:
    drv, spec = vm
    svc = service(drv)
    client = open_hub(svc, spec, ConsoleMode.WRITE)
    try:
        second = svc.console_open(
            ConsoleOpen(spec.instance_id, spec.kind, client.keys.hub, ConsoleMode.WRITE)
        )
        assert second.wait(15) == 0  # claimed by the first: exits at once
        assert client.r.exists(client.keys.alive)
    finally:
        client.r.delete(client.keys.lease)
        client.wait_end()
        client.cleanup()
