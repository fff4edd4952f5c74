"""The Debian 12 cloud guest boots through the VM driver and takes an SSH login with the injected key.

Two guests boot side by side in one boot budget (TCG here: ~1-2 min): one without
user-data, one with a multi-part user-data of its own (a ``#cloud-config`` part and
a script part) that says nothing about SSH keys.  Both take ``ssh -i key
debian@addr`` because the key travels in meta-data ``public-keys`` (issue 13: custom
user-data used to drop it), and the custom one shows both parts ran.  The plain one is
checked from inside too: the hostname is the injected one, the seed's default route
is in place (real cloud-init 22.4 renders it), python3 and curl are there for the
networking tests, and the serial console shows a login prompt (issue 14's console
works on it).
"""

from __future__ import annotations

import hashlib
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from compute.drivers.vm import LibvirtDriver
from compute.network import bridge
from compute.spec import InstanceSpec, NetworkAttachment, NetworkSegment
from tests.compute.vm_fixtures import make_state_dir, node_config, random_mac, vm_spec, wait_for
from tests.hostcaps import require_binary, require_libvirtd
from tests.workloads import WorkloadImages, cloud_ref, pick_subnet, ssh, wait_ssh_login

pytestmark = [pytest.mark.host, pytest.mark.slow]

BOOT_DEADLINE = 300.0  # TCG on a shared 2-core machine: ~45-75 s measured, with room for load


@pytest.fixture
def ssh_key(tmp_path: Path) -> Path:
    require_binary("ssh-keygen")
    key = tmp_path / "id_ed25519"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "skyport-test", "-f", str(key)], check=True
    )
    return key


@pytest.fixture
def driver() -> Iterator[LibvirtDriver]:
    require_libvirtd()
    for tool in ("qemu-img", "genisoimage", "ssh"):
        require_binary(tool)
    state = make_state_dir()
    try:
        yield LibvirtDriver(node_config(state))
    finally:
        shutil.rmtree(state, ignore_errors=True)


# Multi-part MIME user-data with no key in it: cloud-config writes a file, the script writes another.
USER_DATA = (
    'Content-Type: multipart/mixed; boundary="==skyport=="\nMIME-Version: 1.0\n\n'
    '--==skyport==\nContent-Type: text/cloud-config; charset="us-ascii"\n\n'
    "#cloud-config\nwrite_files:\n- path: /etc/skyport-part1\n  content: |\n    from-cloud-config\n\n"
    '--==skyport==\nContent-Type: text/x-shellscript; charset="us-ascii"\n\n'
    "#!/bin/sh\necho from-script > /etc/skyport-part2\n\n--==skyport==--\n"
)


def test_debian_cloud_guest_takes_ssh_with_the_injected_key(
    workload_images: WorkloadImages, driver: LibvirtDriver, ssh_key: Path
) -> None:
    net = pick_subnet()
    gateway = str(net.network_address + 1)
    br = f"skw{secrets.token_hex(4)}"
    ref = cloud_ref(workload_images.cloud, workload_images.sha256("debian-cloud"))
    key = ssh_key.with_suffix(".pub").read_text().strip()

    def guest(host: int, user_data: str | None) -> tuple[InstanceSpec, str]:
        address = str(net.network_address + host)
        segment = NetworkSegment("testnet", br, host_address=f"{gateway}/24")
        nic = NetworkAttachment(segment, f"{address}/24", random_mac(), gateway=gateway)
        name = f"deb-{secrets.token_hex(3)}"
        return vm_spec(ref, (nic,), hostname=name, ram_mb=512, ssh_keys=(key,), user_data=user_data), address

    (spec, address), (custom, custom_address) = guest(10, None), guest(11, USER_DATA)
    hostname = spec.hostname
    try:
        t0 = time.monotonic()
        driver.spawn(spec)
        driver.spawn(custom)
        try:
            _, logged_in = wait_ssh_login(ssh_key, address, BOOT_DEADLINE)
            _, custom_logged_in = wait_ssh_login(ssh_key, custom_address, BOOT_DEADLINE)
        except TimeoutError as exc:
            tails = [driver.console_log(s.instance_id, max_bytes=3000) for s in (spec, custom)]
            pytest.fail(f"{exc}; console tails:\n{tails[0]}\n----\n{tails[1]}")
        print(f"debian-cloud x2: spawn -> SSH {logged_in - t0:.1f} s, custom {custom_logged_in - t0:.1f} s")
        # the key came from meta-data: the user-data of its own did not drop it, and both parts ran
        out = ssh(
            ssh_key,
            custom_address,
            "cloud-init status --wait >/dev/null; id -un; hostname;"
            " cat /etc/skyport-part1 /etc/skyport-part2; sudo md5sum /var/lib/cloud/instance/user-data.txt",
        )
        assert out.returncode == 0, out.stderr
        lines = out.stdout.splitlines()
        assert lines[:4] == ["debian", custom.hostname, "from-cloud-config", "from-script"], lines
        assert lines[4].split()[0] == hashlib.md5(USER_DATA.encode()).hexdigest()  # byte for byte
        driver.destroy(custom.instance_id)
        out = ssh(
            ssh_key,
            address,
            "hostname; id -un; ip -4 route show default; cloud-init --version 2>&1;"
            " python3 -c 'import http.server, sys; print(sys.version.split()[0])'; curl --version | head -n1",
        )
        assert out.returncode == 0, out.stderr
        lines = out.stdout.splitlines()
        assert lines[0] == hostname
        assert lines[1] == "debian"  # cloud-init's default user got the key
        assert lines[2].startswith(f"default via {gateway} dev eth0"), lines[2]
        assert "22.4" in lines[3]
        assert lines[4].startswith("3.11.")
        assert lines[5].startswith("curl 7.88")
        # the serial console runs a getty: an interactive console shows a login prompt
        wait_for(
            "a login prompt on ttyS0",
            lambda: f"{hostname} login:" in driver.console_log(spec.instance_id),
            60,
        )
    finally:
        driver.destroy(spec.instance_id)
        driver.destroy(custom.instance_id)
        bridge.delete_bridge(br)
