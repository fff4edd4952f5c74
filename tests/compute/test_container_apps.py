"""Ordinary app images under the container driver: user namespaces for real (issue 18).

The images are images/debian's (tests/workloads): nginx (root inside,
Entrypoint/Cmd/Env/WorkingDir/StopSignal/ExposedPorts), pyhttp (``USER 1000``).
Each runs under real crun + conmon; the host view (``/proc/<pid>/status``,
``ls -n`` of the upper dir) shows only the tenant's unprivileged range, and the
container's own view (its mountinfo) shows no node path.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from compute.drivers.base import DriverError
from compute.drivers.container import ContainerDriver, cgroups_path, exit_reason, id_base
from compute.layers import LayerStore
from compute.spec import ImageFormat, ImageRef, InstanceSpec, Kind, PowerState
from compute.tasks import NodeService
from tests.compute.container_fixtures import BridgeNet, driver, leftovers, make_spec, testnet
from tests.compute.test_container_driver import proc_status, wait_for
from tests.workloads import WorkloadImages

__all__ = ["driver", "testnet"]

pytestmark = pytest.mark.host


@pytest.fixture(scope="module")
def shared_layers(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One layer store for the module: each image is unpacked once, not once per test."""
    return tmp_path_factory.mktemp("app-layers")


@pytest.fixture
def app_driver(driver: ContainerDriver, shared_layers: Path) -> ContainerDriver:
    driver.layers = LayerStore(shared_layers)
    return driver


def ref(wi: WorkloadImages, name: str) -> ImageRef:
    return ImageRef(name, "1", ImageFormat.OCI, f"sha256:{wi.sha256(name)}", str(wi.path(name)))


def cgroup_pids(spec: InstanceSpec) -> list[int]:
    procs = Path("/sys/fs/cgroup/pids") / cgroups_path(spec.instance_id).lstrip("/") / "cgroup.procs"
    return [int(p) for p in procs.read_text().split()]


def host_ids(pid: int) -> tuple[set[int], set[int]]:
    status = proc_status(pid)
    return {int(u) for u in status["Uid"].split()}, {int(g) for g in status["Gid"].split()}


def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as r:
        return str(r.read().decode())


def serves(url: str) -> bool:
    try:
        get(url)
    except OSError:
        return False
    return True


def finished(driver: ContainerDriver, spec: InstanceSpec) -> bool:
    return driver.info(spec.instance_id).power_state == PowerState.SHUTDOWN


def test_nginx_root_inside_serves_port_80_as_an_unprivileged_range(
    app_driver: ContainerDriver, workload_images: WorkloadImages, testnet: BridgeNet
) -> None:
    driver = app_driver
    spec = make_spec(ref(workload_images, "nginx"), networks=(testnet.attachment(20),), ram_mb=64)
    info = driver.spawn(spec)
    assert info.power_state == PowerState.RUNNING and info.pid
    url = f"http://{testnet.address(20)}:80/"
    wait_for(lambda: serves(url), timeout=10, what="nginx on :80")
    assert "nginx" in get(url).lower()

    # Host view: every process (master as root inside, workers as www-data) is in the range.
    base = id_base(spec)
    wait_for(lambda: len(cgroup_pids(spec)) >= 2, what="nginx workers")
    seen = set()
    for pid in cgroup_pids(spec):
        uids, gids = host_ids(pid)
        assert all(base <= u < base + 65536 for u in uids | gids), (pid, uids, gids)
        seen |= uids
    assert base in seen and base + 33 in seen  # root and www-data (33) inside
    # The image config: Entrypoint + Cmd, Env, WorkingDir.
    # (nginx's setproctitle overwrites /proc/<pid>/environ: read what crun was given.)
    config = json.loads((driver.base / f"sky-{spec.instance_id}" / "bundle" / "config.json").read_text())
    assert "NGINX_ENTRY=skyport" in config["process"]["env"]
    assert config["process"]["args"] == ["/usr/sbin/nginx", "-g", "daemon off;"]
    assert os.readlink(f"/proc/{info.pid}/cwd").endswith("/var/www/html")
    assert Path(f"/proc/{info.pid}/cmdline").read_bytes().startswith(b"nginx: master process")

    # ls -n of the private upper dir: only the container's range owns what it wrote.
    upper = driver.base / f"sky-{spec.instance_id}" / "upper"
    owners = {(p.lstat().st_uid, p.lstat().st_gid) for p in upper.rglob("*")}
    assert owners, "nginx wrote nothing (pid file, /var/lib/nginx)"
    assert all(base <= u < base + 65536 and base <= g < base + 65536 for u, g in owners), owners

    # StopSignal SIGQUIT: nginx's graceful shutdown, exit 0 well before the timeout.
    stopped = driver.stop(spec.instance_id, timeout=20)
    assert stopped.exit_code == 0, stopped
    driver.destroy(spec.instance_id)
    assert leftovers(driver, spec) == []


def test_pyhttp_runs_as_its_image_user_1000(
    app_driver: ContainerDriver, workload_images: WorkloadImages, testnet: BridgeNet
) -> None:
    driver = app_driver
    spec = make_spec(ref(workload_images, "pyhttp"), networks=(testnet.attachment(21),), ram_mb=64)
    info = driver.spawn(spec)
    assert info.pid
    url = f"http://{testnet.address(21)}:8000/"
    wait_for(lambda: serves(url), timeout=15, what="python http.server on :8000")
    base = id_base(spec)
    uids, gids = host_ids(info.pid)
    assert uids == {base + 1000} and gids == {base + 1000}
    status = proc_status(info.pid)
    assert int(status["CapEff"], 16) == 0  # a non-root user has no effective capability
    assert os.readlink(f"/proc/{info.pid}/cwd").endswith("/srv/www")
    driver.destroy(spec.instance_id)
    assert leftovers(driver, spec) == []


def test_user_and_workdir_overrides_and_unknown_user(
    app_driver: ContainerDriver, workload_images: WorkloadImages
) -> None:
    driver = app_driver
    image = ref(workload_images, "pyhttp")
    spec = make_spec(image, command=("sh", "-c", "id -u; id -g; pwd"))
    spec = InstanceSpec(**{**spec.__dict__, "user": "www-data", "workdir": "/tmp"})
    driver.spawn(spec)
    wait_for(lambda: finished(driver, spec), what="exit")
    assert driver.console_log(spec.instance_id).split() == ["33", "33", "/tmp"]
    driver.destroy(spec.instance_id)

    bad = InstanceSpec(**{**make_spec(image).__dict__, "user": "nobody-here"})
    with pytest.raises(DriverError, match="user 'nobody-here' is not in the image's /etc/passwd"):
        driver.spawn(bad)
    assert leftovers(driver, bad) == []


HARDENING = r"""
echo uid=$(id -u)
grep -c . /proc/self/mountinfo >/dev/null
cat /proc/self/mountinfo > /tmp/mi; echo mountinfo-begin; cat /tmp/mi; echo mountinfo-end
(echo x > /proc/sys/kernel/hostname) 2>/dev/null && echo W:proc-sys || echo ok:proc-sys
(echo 1 > /proc/sys/net/ipv4/ip_forward) 2>/dev/null && echo W:net-sysctl || echo ok:net-sysctl
(echo 1 > /proc/sysrq-trigger) 2>/dev/null && echo W:sysrq || echo ok:sysrq
(echo 9999999 > /sys/fs/cgroup/memory/memory.limit_in_bytes) 2>/dev/null && echo W:cgroup || echo ok:cgroup
(echo 1 > /sys/kernel/mm/ksm/run) 2>/dev/null && echo W:sysfs || echo ok:sysfs
mknod /tmp/null2 c 1 3 2>/dev/null && echo W:mknod || echo ok:mknod
mknod /tmp/sda b 8 0 2>/dev/null && echo W:mknod-blk || echo ok:mknod-blk
(head -c1 /proc/kcore) 2>/dev/null | grep -q . && echo W:kcore || echo ok:kcore
echo dev: $(ls /dev)
echo net: $(ls /sys/class/net)
(mount -t tmpfs x /mnt) 2>/dev/null && echo W:mount || echo ok:mount
(chown 0 /proc/1/root/../../ 2>/dev/null; touch /proc/1/root/etc/escape) 2>/dev/null; echo done
"""


def test_hardening_from_inside_a_root_container(
    app_driver: ContainerDriver, workload_images: WorkloadImages, testnet: BridgeNet
) -> None:
    driver = app_driver
    spec = make_spec(
        ref(workload_images, "nginx"), command=("sh", "-c", HARDENING), networks=(testnet.attachment(22),)
    )
    driver.spawn(spec)
    wait_for(lambda: finished(driver, spec), timeout=10, what="exit")
    log = driver.console_log(spec.instance_id)
    assert "uid=0" in log and "done" in log, log
    assert "W:" not in log, log
    mountinfo = log.split("mountinfo-begin", 1)[1].split("mountinfo-end", 1)[0]
    # No node path: not the driver's state dir, not the layer store, not /var/lib/skyport.
    for leak in (str(driver.config.state_dir), "/var/lib/skyport", "/layers/", "containers/sky-"):
        assert leak not in mountinfo, (leak, mountinfo)
    # Its own read-only sysfs (its netns belongs to its user namespace): no host cgroup
    # tree, no host interface.
    sys_mounts = [line.split() for line in mountinfo.splitlines() if " /sys" in line]
    assert [m[4] for m in sys_mounts if m[4] == "/sys"] == ["/sys"]
    assert all(m[5].startswith("ro") for m in sys_mounts), sys_mounts
    assert not any(m[4].startswith("/sys/fs/cgroup") for m in sys_mounts), sys_mounts
    assert log.split("net:", 1)[1].split("\n", 1)[0].split() == ["eth0", "lo"]
    devs = set(log.split("dev:", 1)[1].split("\n", 1)[0].split())
    standard = {"console", "full", "mqueue", "null", "ptmx", "pts", "random", "shm", "tty", "urandom", "zero"}
    assert devs <= standard | {"core", "fd", "stdin", "stdout", "stderr"}  # + crun's symlinks
    # What the container wrote stays in its range; the escape attempt reached no host file.
    assert not Path("/etc/escape").exists()
    driver.destroy(spec.instance_id)
    assert leftovers(driver, spec) == []


def test_command_not_found_is_an_error_with_the_reason_and_leaves_nothing(
    app_driver: ContainerDriver, workload_images: WorkloadImages
) -> None:
    driver = app_driver
    spec = make_spec(ref(workload_images, "pyhttp"), command=("no-such-program", "x"))
    with pytest.raises(DriverError, match="no-such-program"):
        driver.spawn(spec)
    assert leftovers(driver, spec) == []


def test_a_killed_app_is_reported_at_once_with_its_signal_and_last_output(
    app_driver: ContainerDriver, workload_images: WorkloadImages
) -> None:
    """``kill -9`` of the app: the node sees conmon's exit file and reports without waiting for a beat."""
    driver = app_driver
    sent: list[dict[str, Any]] = []
    service = NodeService(driver.config, lambda task, payload: sent.append(payload), {Kind.CONTAINER: driver})
    assert service.exits_changed() is False
    spec = make_spec(ref(workload_images, "crashloop"), command=("sh", "-c", "echo serving; exec sleep 600"))
    info = driver.spawn(spec)
    wait_for(lambda: "serving" in driver.console_log(spec.instance_id), what="output")
    assert service.exits_changed() is False  # a start is no exit
    assert info.pid is not None
    os.kill(info.pid, signal.SIGKILL)
    wait_for(service.exits_changed, timeout=5, what="the exit to be noticed")
    report = service.report()
    (item,) = [i for i in report.inventory if i.instance_id == spec.instance_id]
    assert item.power_state == PowerState.SHUTDOWN and item.exit_code == 137
    assert item.message.startswith("killed by SIGKILL (exit code 137)")
    assert "last output: serving" in item.message
    assert sent and sent[-1]["inventory"][0]["message"] == item.message
    assert service.exits_changed() is False  # reported once
    driver.destroy(spec.instance_id)


def test_a_crashing_app_reports_its_exit_code() -> None:
    assert exit_reason(3) == "exited with code 3"
    assert exit_reason(143) == "killed by SIGTERM (exit code 143)"
    assert exit_reason(255) == "exited with code 255"


def test_a_crash_loop_is_restarted_with_backoff_then_given_up(
    app_driver: ContainerDriver, workload_images: WorkloadImages
) -> None:
    driver = app_driver
    spec = dataclasses.replace(make_spec(ref(workload_images, "crashloop")), restart_policy="on-failure:3")
    driver.spawn(spec)
    deadline = time.monotonic() + 30
    while not driver.info(spec.instance_id).gave_up:
        assert time.monotonic() < deadline, driver.info(spec.instance_id)
        driver.supervise()
        time.sleep(0.05)
    info = driver.info(spec.instance_id)
    assert (info.power_state, info.restarts, info.exit_code) == (PowerState.CRASHED, 3, 3)
    assert info.message.startswith("crash loop: gave up after 3 restarts; exited with code 3; last output:")
    assert "exiting with 3" in info.message
    assert driver.console_log(spec.instance_id).count("exiting with 3") == 4  # the first run + 3 restarts
    assert driver.supervise() == ()  # given up: left alone
    # A start by the user is a new run with a new count.
    assert driver.start(spec.instance_id).restarts == 0
    driver.destroy(spec.instance_id)
    assert leftovers(driver, spec) == []


def test_always_restarts_a_clean_exit_but_never_a_stopped_container(
    app_driver: ContainerDriver, workload_images: WorkloadImages
) -> None:
    driver = app_driver
    base = make_spec(ref(workload_images, "crashloop"), command=("sh", "-c", "echo ran; exec sleep 600"))
    spec = dataclasses.replace(base, restart_policy="always")
    info = driver.spawn(spec)
    assert info.pid is not None
    os.kill(info.pid, signal.SIGKILL)
    wait_for(lambda: driver.info(spec.instance_id).power_state == PowerState.SHUTDOWN, what="exit")
    wait_for(lambda: spec.instance_id in driver.supervise(), timeout=5, what="a restart")
    again = driver.info(spec.instance_id)
    assert again.power_state == PowerState.RUNNING and again.restarts == 1 and again.pid != info.pid
    stopped = driver.stop(spec.instance_id, timeout=0)
    assert stopped.power_state == PowerState.SHUTDOWN
    time.sleep(0.5)
    assert driver.supervise() == () and driver.info(spec.instance_id).power_state == PowerState.SHUTDOWN
    # policy "no": an exit stays an exit
    plain = make_spec(ref(workload_images, "crashloop"))
    driver.spawn(plain)
    wait_for(lambda: driver.info(plain.instance_id).power_state == PowerState.SHUTDOWN, what="exit")
    time.sleep(0.3)
    assert driver.supervise() == () and driver.info(plain.instance_id).restarts == 0
    driver.destroy(spec.instance_id)
    driver.destroy(plain.instance_id)
