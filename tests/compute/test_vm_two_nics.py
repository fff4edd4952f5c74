"""A real VM (libvirtd, TCG) with two NICs on two bridges: two virtio interfaces, one ethernet each in the
seed's network-config, both addresses configured by the guest and reachable from the host on each bridge."""

from __future__ import annotations

import secrets
import subprocess
import time
from pathlib import Path

import pytest

from compute.drivers.vm import LibvirtDriver, tap_name
from compute.network import bridge
from compute.spec import NetworkAttachment, NetworkSegment
from tests.compute.vm_fixtures import (
    build_sample_image,
    image_ref,
    make_state_dir,
    node_config,
    random_mac,
    vm_spec,
    wait_for,
)
from tests.hostcaps import require_binary, require_libvirtd

pytestmark = [pytest.mark.host, pytest.mark.slow]


def _pings(address: str) -> bool:
    return subprocess.run(["ping", "-c1", "-W1", address], capture_output=True).returncode == 0


def test_a_vm_with_two_nics_on_two_bridges() -> None:
    require_libvirtd()
    for tool in ("qemu-img", "genisoimage", "ping"):
        require_binary(tool)
    image = image_ref(build_sample_image())
    state = make_state_dir()
    driver = LibvirtDriver(node_config(state))
    # two subnets of the 198.18.0.0/15 test range next to each other, a /24 and a /26
    n = 168 + secrets.randbelow(7)
    names = [f"skt{secrets.token_hex(4)}", f"skt{secrets.token_hex(4)}"]
    nets = [(f"198.18.{n}", 24), (f"198.18.{n + 1}", 26)]
    nics = tuple(
        NetworkAttachment(
            NetworkSegment(f"acme/n{i}", names[i], mtu=1450, host_address=f"{prefix}.1/{length}"),
            f"{prefix}.10/{length}",
            random_mac(),
            gateway=f"{prefix}.1" if i == 0 else None,
            dns=(f"{prefix}.1",),
        )
        for i, (prefix, length) in enumerate(nets)
    )
    spec = vm_spec(image, nics, hostname="duo")
    try:
        start = time.monotonic()
        driver.spawn(spec)

        def log() -> str:
            return driver.console_log(spec.instance_id, max_bytes=1 << 20)

        wait_for("the ready marker", lambda: "SKYPORT-READY" in log(), 120.0, 0.2)
        booted = time.monotonic() - start
        text = log()
        assert f"SKYPORT-READY hostname=duo address={nics[0].address}" in text, text[-2000:]
        for i, nic in enumerate(nics):
            assert f"skyport-init: eth{i} {nic.mac} {nic.address} mtu 1450" in text, text[-2000:]
            # each tap is on its network's bridge with the network's MTU
            assert bridge.bridge_ports(nic.bridge) == [tap_name(spec.instance_id, i)]
        for address in (nic.ip for nic in nics):
            wait_for(f"ping {address}", lambda address=address: _pings(address), 20.0, 0.2)  # type: ignore[misc]
        print(f"VM with two NICs: ready after {booted:.1f} s, both addresses answer")
    finally:
        driver.destroy(spec.instance_id)
        for name in names:
            bridge.delete_bridge(name)
        subprocess.run(["rm", "-rf", str(state)], check=False)
    assert not any(bridge.link_exists(name) for name in names)
    assert not Path(state).exists()
