"""The Debian 12 cloud guest boots through the VM driver and takes an SSH login with the injected key.

One boot (TCG here: ~1 min unloaded) with a multi-part user-data of its own (a
``#cloud-config`` part and a script part) that says nothing about SSH keys: ``ssh -i
key debian@addr`` works because the key travels in meta-data ``public-keys`` (issue
13: custom user-data used to drop it), and both parts ran from the byte-identical
user-data.  Without user-data the seed's meta-data is the same bytes (checked here,
before the boot), so this one boot covers both cases.  Checked from inside too: the
hostname is the injected one, the seed's default route is in place (real cloud-init
22.4 renders it), python3 and curl are there for the networking tests, and the serial
console shows a login prompt (issue 14's console works on it).
"""

from __future__ import annotations

import dataclasses
import hashlib
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from compute.drivers import cloudinit
from compute.drivers.vm import LibvirtDriver
from compute.network import bridge
from compute.spec import NetworkAttachment, NetworkSegment
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
    gateway, address = str(net.network_address + 1), str(net.network_address + 10)
    br = f"skw{secrets.token_hex(4)}"
    segment = NetworkSegment("testnet", br, host_address=f"{gateway}/24")
    nic = NetworkAttachment(segment, f"{address}/24", random_mac(), gateway=gateway)
    hostname = f"deb-{secrets.token_hex(3)}"
    key = ssh_key.with_suffix(".pub").read_text().strip()
    ref = cloud_ref(workload_images.cloud, workload_images.sha256("debian-cloud"))
    spec = vm_spec(ref, (nic,), hostname=hostname, ram_mb=512, ssh_keys=(key,), user_data=USER_DATA)
    # the seed's meta-data (where the key is) is the same without user-data: one boot covers both
    plain = dataclasses.replace(spec, user_data=None)
    assert cloudinit.seed_files(plain)["meta-data"] == cloudinit.seed_files(spec)["meta-data"]
    try:
        t0 = time.monotonic()
        driver.spawn(spec)
        try:
            _, logged_in = wait_ssh_login(ssh_key, address, BOOT_DEADLINE)
        except TimeoutError as exc:
            pytest.fail(f"{exc}; console tail:\n{driver.console_log(spec.instance_id, max_bytes=3000)}")
        print(f"debian-cloud: spawn -> SSH login {logged_in - t0:.1f} s (multi-part user-data)")
        # the key came from meta-data: the user-data of its own did not drop it, and both parts ran
        out = ssh(
            ssh_key,
            address,
            "cloud-init status --wait >/dev/null; hostname; id -un; ip -4 route show default;"
            " cloud-init --version 2>&1; python3 -c 'import http.server, sys; print(sys.version.split()[0])';"
            " curl --version | head -n1; cat /etc/skyport-part1 /etc/skyport-part2;"
            " sudo md5sum /var/lib/cloud/instance/user-data.txt",
        )
        assert out.returncode == 0, out.stderr
        lines = out.stdout.splitlines()
        assert lines[0] == hostname
        assert lines[1] == "debian"  # cloud-init's default user got the key
        assert lines[2].startswith(f"default via {gateway} dev eth0"), lines[2]
        assert "22.4" in lines[3]
        assert lines[4].startswith("3.11.")
        assert lines[5].startswith("curl 7.88")
        assert lines[6:8] == ["from-cloud-config", "from-script"], lines
        assert lines[8].split()[0] == hashlib.md5(USER_DATA.encode()).hexdigest()  # byte for byte
        # the serial console runs a getty: an interactive console shows a login prompt
        wait_for(
            "a login prompt on ttyS0",
            lambda: f"{hostname} login:" in driver.console_log(spec.instance_id),
            60,
        )
    finally:
        driver.destroy(spec.instance_id)
        bridge.delete_bridge(br)
