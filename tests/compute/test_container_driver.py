"""The container driver for real: crun + conmon as root, on test bridges."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from compute import cgroups
from compute.drivers.base import DriverError, InstanceNotFound, InvalidState, NotSupported
from compute.drivers.container import ContainerDriver, cgroups_path, id_base
from compute.spec import PowerState, to_json
from tests.compute.container_fixtures import (
    BridgeNet,
    SampleImages,
    driver,
    leftovers,
    make_spec,
    sample_images,
    testnet,
)

__all__ = ["driver", "sample_images", "testnet"]

pytestmark = pytest.mark.host

# CHOWN DAC_OVERRIDE FOWNER FSETID KILL SETGID SETUID SETPCAP NET_BIND_SERVICE SYS_CHROOT AUDIT_WRITE SETFCAP
DOCKER_CAPS_MASK = sum(1 << n for n in (0, 1, 3, 4, 5, 6, 7, 8, 10, 18, 29, 31))


def wait_for(cond: Callable[[], object], timeout: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def proc_status(pid: int) -> dict[str, str]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        out[key] = value.strip()
    return out


def gone(pid: int) -> bool:
    """Dead or a zombie (an orphan waits for PID 1 to reap it)."""
    try:
        return not Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return True


def ping(address: str, wait: int = 2) -> bool:
    return subprocess.run(["ping", "-c1", f"-W{wait}", address], capture_output=True).returncode == 0


def test_health(driver: ContainerDriver) -> None:
    ok, why = driver.health()
    assert ok, why
    assert why.startswith("crun ")


def test_lifecycle_network_stats_and_cleanup(
    driver: ContainerDriver, sample_images: SampleImages, testnet: BridgeNet
) -> None:
    spec = make_spec(sample_images.base, networks=(testnet.attachment(10),), hostname="web-1")
    info = driver.spawn(spec)
    assert info.power_state == PowerState.RUNNING and info.pid
    # The image's command prints its hostname and $$: the workload is PID 1.
    wait_for(lambda: "pid=" in driver.console_log(spec.instance_id), what="log line")
    assert "hostname=web-1 pid=1" in driver.console_log(spec.instance_id)

    # Root inside its own user namespace, an unprivileged range outside; Docker's
    # default capabilities (no NET_RAW, no MKNOD) inside that namespace only.
    status = proc_status(info.pid)
    base = id_base(spec)
    assert base >= 1 << 24
    assert [int(u) for u in status["Uid"].split()] == [base] * 4
    assert [int(g) for g in status["Gid"].split()] == [base] * 4
    assert Path(f"/proc/{info.pid}/uid_map").read_text().split() == ["0", str(base), "65536"]
    assert Path(f"/proc/{info.pid}/gid_map").read_text().split() == ["0", str(base), "65536"]
    assert os.readlink(f"/proc/{info.pid}/ns/user") != os.readlink("/proc/self/ns/user")
    assert int(status["CapEff"], 16) == DOCKER_CAPS_MASK == int(status["CapBnd"], 16)
    assert int(status["CapInh"], 16) == 0 and int(status["CapAmb"], 16) == 0
    assert status["NoNewPrivs"] == "1"
    assert status["Seccomp"] == "2"

    assert ping(testnet.address(10))
    assert driver.spawn(spec).pid == info.pid  # idempotent
    assert [i.instance_id for i in driver.list()] == [spec.instance_id]

    stats = driver.stats(spec.instance_id)
    assert stats.memory_bytes > 0 and stats.cpu_time_ns > 0
    assert stats.memory_limit_bytes == 32 * 1024 * 1024
    assert stats.pids == 1 and (stats.memory_peak_bytes or 0) >= stats.memory_bytes

    assert driver.pause(spec.instance_id).power_state == PowerState.PAUSED
    assert driver.pause(spec.instance_id).power_state == PowerState.PAUSED
    assert driver.resume(spec.instance_id).power_state == PowerState.RUNNING

    stopped = driver.stop(spec.instance_id, timeout=0.3)
    assert stopped.power_state == PowerState.SHUTDOWN and stopped.exit_code == 137
    assert driver.stop(spec.instance_id).power_state == PowerState.SHUTDOWN  # no-op
    assert not ping(testnet.address(10), wait=1)
    with pytest.raises(InvalidState):
        driver.reboot(spec.instance_id)

    started = driver.start(spec.instance_id)
    assert started.power_state == PowerState.RUNNING and started.pid != info.pid
    assert ping(testnet.address(10))
    rebooted = driver.reboot(spec.instance_id)
    assert rebooted.power_state == PowerState.RUNNING and rebooted.pid != started.pid
    assert ping(testnet.address(10))
    # ping is answered by the kernel as soon as the netns has its address, perhaps before the new
    # run's shell has printed its line (and conmon written it): the log keeps the runs' lines
    wait_for(
        lambda: driver.console_log(spec.instance_id).count("hostname=web-1 pid=1") >= 2,
        what="the first run's line and the rebooted run's in the log",
    )

    with pytest.raises(NotSupported):
        driver.snapshot(spec.instance_id, "s1")
    assert driver.list_snapshots(spec.instance_id) == []

    driver.destroy(spec.instance_id)
    assert leftovers(driver, spec) == []
    driver.destroy(spec.instance_id)  # already gone: fine
    with pytest.raises(InstanceNotFound):
        driver.info(spec.instance_id)
    assert driver.list() == []


def test_exit_code_and_logs_survive_a_new_driver(
    driver: ContainerDriver, sample_images: SampleImages
) -> None:
    spec = make_spec(
        sample_images.base, command=("/bin/sh", "-c", "echo to-stdout; echo to-stderr >&2; exit 3")
    )
    driver.spawn(spec)
    wait_for(lambda: driver.info(spec.instance_id).power_state == PowerState.SHUTDOWN, what="exit")
    info = driver.info(spec.instance_id)
    assert info.exit_code == 3 and not info.oom_killed

    fresh = ContainerDriver(driver.config)
    again = fresh.info(spec.instance_id)
    assert again.power_state == PowerState.SHUTDOWN and again.exit_code == 3
    log = fresh.console_log(spec.instance_id)
    assert "to-stdout" in log and "to-stderr" in log
    assert fresh.stats(spec.instance_id).pids == 0
    fresh.destroy(spec.instance_id)
    assert leftovers(driver, spec) == []


def test_memory_limit_oom_kill_is_reported(driver: ContainerDriver, sample_images: SampleImages) -> None:
    # dd's 64 MiB buffer does not fit into 32 MiB (swap limited to the same).
    spec = make_spec(
        sample_images.base, command=("/bin/dd", "if=/dev/zero", "of=/dev/null", "bs=64M", "count=1")
    )
    driver.spawn(spec)
    wait_for(lambda: driver.info(spec.instance_id).power_state != PowerState.RUNNING, what="oom kill")
    info = driver.info(spec.instance_id)
    assert info.oom_killed, info
    assert info.exit_code == 137
    assert info.power_state == PowerState.CRASHED
    assert "out of memory" in info.message
    # Still reported after a restart of the worker (new driver object) and after stop.
    assert ContainerDriver(driver.config).info(spec.instance_id).oom_killed
    assert driver.stop(spec.instance_id).oom_killed


def test_fork_bomb_stops_at_pids_limit(driver: ContainerDriver, sample_images: SampleImages) -> None:
    bomb = "f() { f | f & }; f; sleep 30"
    spec = make_spec(sample_images.base, command=("/bin/sh", "-c", bomb), pids_limit=16, cpu_quota_percent=50)
    driver.spawn(spec)
    path = cgroups_path(spec.instance_id)
    fs = cgroups.SysCgroupFS()
    assert (fs.read("pids", path, "pids.max") or "").strip() == "16"

    def refused() -> int:
        events = fs.read("pids", path, "pids.events") or "max 0"
        return int(events.split()[1])

    # Sample while the bomb runs: the count never passes the limit, and the
    # kernel refuses forks (pids.events "max"), so the bomb hit the limit.
    # (How long the bomb itself lives varies: busybox sh exits when a fork
    # fails, so only the limit is asserted, not the shape of the bomb.)
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline or not refused():
        current = int(fs.read("pids", path, "pids.current") or 0)
        assert current <= 16
        assert time.monotonic() < deadline + 5, "the fork bomb never hit the pids limit"
        time.sleep(0.005)
    # The host stays fine: we can still fork and the node answers.
    assert subprocess.run(["true"]).returncode == 0
    driver.destroy(spec.instance_id)
    assert leftovers(driver, spec) == []


def test_failed_spawn_leaves_nothing(
    driver: ContainerDriver, sample_images: SampleImages, testnet: BridgeNet
) -> None:
    spec = make_spec(sample_images.base, command=("/no/such/program",), networks=(testnet.attachment(11),))
    with pytest.raises(DriverError):
        driver.spawn(spec)
    assert leftovers(driver, spec) == []
    with pytest.raises(InstanceNotFound):
        driver.info(spec.instance_id)


def uptime() -> float:
    return float(Path("/proc/uptime").read_text().split()[0])


def test_the_network_is_made_while_crun_creates_and_done_before_the_start(
    driver: ContainerDriver, sample_images: SampleImages, testnet: BridgeNet
) -> None:
    """spawn_with: the node's network step overlaps crun's create; the workload starts after it."""
    script = "cat /proc/uptime; sleep 60"  # the host's clock: crun makes no time namespace
    spec = make_spec(
        sample_images.base, command=("/bin/sh", "-c", script), networks=(testnet.attachment(12),)
    )
    seen: list[tuple[str, float]] = []

    def network() -> None:
        deadline = time.monotonic() + 10
        while (state := driver._crun_state(spec.instance_id)) is None or (
            not seen and state["status"] != "created"
        ):  # crun's create runs meanwhile: the container exists, created, its PID 1 waiting
            assert time.monotonic() < deadline, f"crun never created the container: {state}"
            time.sleep(0.01)
        time.sleep(0.2)
        seen.append((state["status"], uptime()))

    info = driver.spawn_with(spec, network)
    assert info.power_state == PowerState.RUNNING
    assert [s for s, _ in seen] == ["created"]
    wait_for(lambda: driver.console_log(spec.instance_id).strip(), what="the workload's first line")
    started = float(driver.console_log(spec.instance_id).split()[0])
    assert started >= seen[0][1], (started, seen)
    # A redelivered create finds the container running and makes the network again, once.
    driver.spawn_with(spec, network)
    assert [s for s, _ in seen] == ["created", "running"]
    driver.destroy(spec.instance_id)
    assert leftovers(driver, spec) == []


def test_a_failed_network_step_undoes_the_spawn(
    driver: ContainerDriver, sample_images: SampleImages, testnet: BridgeNet
) -> None:
    spec = make_spec(sample_images.base, networks=(testnet.attachment(13),))

    def network() -> None:
        raise DriverError("the bridge could not be made")

    with pytest.raises(DriverError, match="the bridge could not be made"):
        driver.spawn_with(spec, network)
    assert leftovers(driver, spec) == []
    assert driver._crun_state(spec.instance_id) is None
    with pytest.raises(InstanceNotFound):
        driver.info(spec.instance_id)


def test_two_images_share_the_base_layer(
    driver: ContainerDriver, sample_images: SampleImages, testnet: BridgeNet
) -> None:
    base = make_spec(sample_images.base, networks=(testnet.attachment(20),), hostname="plain")
    web = make_spec(sample_images.web, networks=(testnet.attachment(21),), hostname="web")
    driver.spawn(base)
    driver.spawn(web)
    layers = driver.layers.layers()
    assert len(layers) == 2  # base once, plus the web layer
    base_layer = driver.layers.unpack(Path(sample_images.base.location), sample_images.base.digest).layers
    web_layers = driver.layers.unpack(Path(sample_images.web.location), sample_images.web.digest).layers
    assert web_layers[0] == base_layer[0]

    def page() -> bool:
        try:
            with urllib.request.urlopen(f"http://{testnet.address(21)}:8080/", timeout=2) as resp:
                return b"Skyport busybox-web" in resp.read()
        except OSError:
            return False

    wait_for(page, what="httpd answer")
    driver.destroy(base.instance_id)
    driver.destroy(web.instance_id)
    assert leftovers(driver, base) == [] and leftovers(driver, web) == []


def test_graceful_stop_with_a_sigterm_handler(driver: ContainerDriver, sample_images: SampleImages) -> None:
    script = "trap 'echo got-term; exit 0' TERM; echo ready; while true; do sleep 0.1; done"
    spec = make_spec(sample_images.base, command=("/bin/sh", "-c", script))
    driver.fast_start = False  # also cover the plain `crun start` path
    driver.spawn(spec)
    wait_for(lambda: "ready" in driver.console_log(spec.instance_id), what="ready")
    info = driver.stop(spec.instance_id, timeout=5)
    assert info.exit_code == 0 and "got-term" in driver.console_log(spec.instance_id)
    driver.destroy(spec.instance_id)
    assert leftovers(driver, spec) == []


def test_survives_a_worker_restart(
    driver: ContainerDriver, sample_images: SampleImages, testnet: BridgeNet
) -> None:
    """Spawned by another process that has exited: still observable, stoppable, removable."""
    spec = make_spec(sample_images.base, networks=(testnet.attachment(30),))
    code = (
        "import json, sys\n"
        "from compute.drivers.container import ContainerDriver\n"
        "from compute.config import NodeConfig\n"
        "from compute.spec import InstanceSpec, from_json\n"
        "from pathlib import Path\n"
        "cfg = json.loads(sys.argv[1]); cfg['state_dir'] = Path(cfg['state_dir'])\n"
        "d = ContainerDriver(NodeConfig(**cfg))\n"
        "print(d.spawn(from_json(InstanceSpec, json.loads(sys.argv[2]))).power_state)\n"
    )
    cfg = {k: str(v) for k, v in dataclasses.asdict(driver.config).items()}
    out = subprocess.run(
        [sys.executable, "-c", code, json.dumps(cfg), json.dumps(to_json(spec))],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert out.stdout.strip() == "running", out.stderr
    info = driver.info(spec.instance_id)
    assert info.power_state == PowerState.RUNNING
    assert ping(testnet.address(30))
    wait_for(lambda: "pid=1" in driver.console_log(spec.instance_id), what="log line")
    stopped = driver.stop(spec.instance_id, timeout=0.2)
    assert stopped.exit_code == 137
    assert driver.start(spec.instance_id).power_state == PowerState.RUNNING
    assert ping(testnet.address(30))
    driver.destroy(spec.instance_id)
    assert leftovers(driver, spec) == []


def test_supervisor_gone_is_reported_not_waited_for(
    driver: ContainerDriver, sample_images: SampleImages
) -> None:
    spec = make_spec(sample_images.base)
    info = driver.spawn(spec)
    assert info.pid
    inst = driver.base / f"sky-{spec.instance_id}"
    conmon = int((inst / "conmon" / "conmon.pid").read_text())
    os.kill(conmon, signal.SIGKILL)
    wait_for(lambda: gone(conmon), what="conmon gone")
    os.kill(info.pid, signal.SIGKILL)
    wait_for(lambda: driver.info(spec.instance_id).power_state == PowerState.SHUTDOWN, what="shutdown")
    t0 = time.monotonic()
    after = driver.info(spec.instance_id)
    assert time.monotonic() - t0 < 0.5
    assert after.exit_code is None and "unknown" in after.message
    driver.destroy(spec.instance_id)
    assert leftovers(driver, spec) == []


def test_gateway_and_resolver_reach_the_container(
    driver: ContainerDriver, sample_images: SampleImages, testnet: BridgeNet
) -> None:
    """The NIC's gateway becomes the default route, its resolvers /etc/resolv.conf (read-only)."""
    nic = dataclasses.replace(
        testnet.attachment(10), gateway=testnet.address(1), dns=(testnet.address(1), "198.18.128.53")
    )
    spec = make_spec(sample_images.base, networks=(nic,), hostname="dns-1")
    info = driver.spawn(spec)
    assert info.pid
    resolv = Path(f"/proc/{info.pid}/root/etc/resolv.conf").read_text()
    assert resolv == f"nameserver {testnet.address(1)}\nnameserver 198.18.128.53\n"
    routes = subprocess.run(
        ["nsenter", "-t", str(info.pid), "-n", "ip", "-4", "route"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert f"default via {testnet.address(1)} dev eth0" in routes
    mounts = Path(f"/proc/{info.pid}/mountinfo").read_text()
    (line,) = [m for m in mounts.splitlines() if " /etc/resolv.conf " in m]
    assert " ro," in line or " ro " in line
    driver.destroy(spec.instance_id)
    assert leftovers(driver, spec) == []
