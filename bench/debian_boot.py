"""Boot of the Debian 12 cloud guest to an SSH login: the Skyport VM driver vs plain libvirt.

    .venv/bin/python bench/debian_boot.py [--runs 1]

driver: LibvirtDriver.spawn (image cache, overlay, NoCloud seed, bridge, XML, define,
        create); timed spawn -> sshd banner -> `ssh -i key debian@addr true` works.
bare:   defineXML + create of a hand-written equivalent domain on a plain qcow2
        overlay of the same cached base and a seed made beforehand (the same
        cloud-init files); timed define -> banner -> login.
Runs alternate between the two in the same process, one boot at a time (TCG boots
are CPU-bound).  Needs root, libvirtd and the test images (`make test-images`).
"""

from __future__ import annotations

import argparse
import secrets
import shutil
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import libvirt  # noqa: E402

from bench.vm_boot import BARE_XML  # noqa: E402  (the same hand-written domain, more memory)
from compute.drivers import cloudinit  # noqa: E402
from compute.drivers.vm import LibvirtDriver  # noqa: E402
from compute.network import bridge  # noqa: E402
from compute.spec import ImageRef, InstanceSpec, NetworkAttachment, NetworkSegment  # noqa: E402
from tests.compute.vm_fixtures import make_state_dir, node_config, random_mac, vm_spec  # noqa: E402
from tests.workloads import cloud_ref, find, pick_subnet, wait_ssh_login  # noqa: E402

DEADLINE = 300.0
RAM_MB = 512

Timing = tuple[float, float, float]  # call returned, sshd banner, login works (s from the start)


class Bench:
    def __init__(self, ref: ImageRef, state: Path, br: str, gateway: str, key: Path) -> None:
        self.ref, self.state, self.br, self.gateway, self.key = ref, state, br, gateway, key
        self.drv = LibvirtDriver(node_config(state))
        self.conn = libvirt.open("qemu:///system")
        self.base = self.drv.images.fetch(ref)  # both variants start from a warm image cache
        self.prefix = gateway.rsplit(".", 1)[0]

    def spec(self, host: int) -> InstanceSpec:
        segment = NetworkSegment("bench", self.br, host_address=f"{self.gateway}/24")
        nic = NetworkAttachment(segment, f"{self.prefix}.{host}/24", random_mac(), gateway=self.gateway)
        pub = self.key.with_suffix(".pub").read_text().strip()
        return vm_spec(self.ref, (nic,), hostname=f"bench-{host}", ram_mb=RAM_MB, ssh_keys=(pub,))

    def _login(self, spec: InstanceSpec, t0: float) -> tuple[float, float]:
        banner, login = wait_ssh_login(self.key, spec.networks[0].address.split("/")[0], DEADLINE)
        return banner - t0, login - t0

    def driver(self, i: int) -> Timing:
        spec = self.spec(100 + i)
        t0 = time.monotonic()
        self.drv.spawn(spec)
        called = time.monotonic() - t0
        try:
            return (called, *self._login(spec, t0))
        finally:
            self.drv.destroy(spec.instance_id)

    def bare(self, i: int) -> Timing:
        spec = self.spec(10 + i)
        d = self.state / f"bare-{i}"
        d.mkdir(mode=0o755)
        disk, seed, log = d / "disk.qcow2", d / "seed.iso", d / "console.log"
        subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(self.base), str(disk)],
            check=True,
        )
        disk.chmod(0o644)
        cloudinit.build_seed(spec, seed)
        name = f"sky-bench-{uuid.uuid4().hex[:8]}"
        xml = BARE_XML.format(
            name=name, ram=RAM_MB, disk=disk, seed=seed, log=log, mac=spec.networks[0].mac, bridge=self.br
        )
        t0 = time.monotonic()
        dom = self.conn.defineXML(xml)
        try:
            dom.create()
            called = time.monotonic() - t0
            return (called, *self._login(spec, t0))
        finally:
            if dom.isActive():
                dom.destroy()
            dom.undefine()

    def close(self) -> None:
        self.conn.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=1, help="boots per variant (each takes about a minute)")
    args = ap.parse_args()
    images = find()
    if images is None:
        print("debian_boot.py: no test images; run `make test-images` first", file=sys.stderr)
        return 1
    ref = cloud_ref(images.cloud, images.sha256("debian-cloud"))
    state = make_state_dir()
    net = pick_subnet()
    gateway = str(net.network_address + 1)
    br = f"skb{secrets.token_hex(4)}"
    key = state / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    results: dict[str, list[Timing]] = {"driver": [], "bare": []}
    bench = None
    try:
        bench = Bench(ref, state, br, gateway, key)
        for i in range(args.runs):
            for label, fn in (("driver", bench.driver), ("bare", bench.bare)):
                results[label].append(fn(i))
                c, b, login = results[label][-1]
                print(
                    f"run {i + 1} {label:6s} call {c:5.2f} s  sshd {b:6.1f} s  login {login:6.1f} s",
                    file=sys.stderr,
                )
    finally:
        if bench is not None:
            bench.close()
        bridge.delete_bridge(br)
        shutil.rmtree(state, ignore_errors=True)

    v = images.manifest["versions"]
    print(
        f"Debian {v['debian']} cloud guest (cloud-init {v['cloud-init']}, {v['kernel']}) to SSH login, "
        f"TCG, 1 vCPU, {RAM_MB} MiB, {args.runs} run(s) each, medians"
    )
    print(f"{'variant':30s} {'call s':>7s} {'sshd s':>7s} {'login s':>8s}")
    for label, what in (("driver", "driver spawn -> SSH"), ("bare", "libvirt define+create -> SSH")):
        cols = [statistics.median(t[k] for t in results[label]) for k in range(3)]
        print(f"{what:30s} {cols[0]:7.2f} {cols[1]:7.1f} {cols[2]:8.1f}")
    ratio = statistics.median(t[2] for t in results["driver"]) / statistics.median(
        t[2] for t in results["bare"]
    )
    print(f"{'ratio driver/bare (login)':30s} {'':7s} {'':7s} {ratio:8.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
