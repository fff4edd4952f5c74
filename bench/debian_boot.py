"""Boot of the Debian 12 cloud guest to an SSH login: the Skyport VM driver vs plain libvirt.

    .venv/bin/python bench/debian_boot.py [--runs 1] [--tb-cache 32,128]

driver: LibvirtDriver.spawn (image cache, overlay, NoCloud seed, bridge, XML, define,
        create); timed spawn -> sshd banner -> `ssh -i key debian@addr true` works ->
        `cloud-init status --wait` returns (every stage done).
bare:   defineXML + create of a hand-written equivalent domain on a plain qcow2
        overlay of the same cached base and a seed made beforehand (the same
        cloud-init files); timed define -> banner -> login -> cloud-init done; once per
        TCG translation-cache size of --tb-cache (the driver picks its own: tb_cache_mib).
RSS: the QEMU process's resident memory once cloud-init is done.
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
from compute.drivers.libvirt_xml import tb_cache_mib  # noqa: E402
from compute.drivers.vm import LibvirtDriver  # noqa: E402
from compute.network import bridge  # noqa: E402
from compute.spec import ImageRef, InstanceSpec, NetworkAttachment, NetworkSegment  # noqa: E402
from tests.compute.vm_fixtures import make_state_dir, node_config, random_mac, vm_spec  # noqa: E402
from tests.workloads import cloud_ref, find, pick_subnet, ssh, wait_ssh_login  # noqa: E402

DEADLINE = 300.0
RAM_MB = 512

# call returned, sshd banner, login works, cloud-init done (s from the start); QEMU RSS (MiB)
Timing = tuple[float, float, float, float, float]


class Bench:
    def __init__(self, ref: ImageRef, state: Path, br: str, gateway: str, key: Path) -> None:
        self.ref, self.state, self.br, self.gateway, self.key = ref, state, br, gateway, key
        self.drv = LibvirtDriver(node_config(state))
        self.conn = libvirt.open("qemu:///system")
        self.base = self.drv.images.fetch(ref)  # both variants start from a warm image cache
        self.prefix = gateway.rsplit(".", 1)[0]
        self.bare_boots = 0

    def spec(self, host: int) -> InstanceSpec:
        segment = NetworkSegment("bench", self.br, host_address=f"{self.gateway}/24")
        nic = NetworkAttachment(segment, f"{self.prefix}.{host}/24", random_mac(), gateway=self.gateway)
        pub = self.key.with_suffix(".pub").read_text().strip()
        return vm_spec(self.ref, (nic,), hostname=f"bench-{host}", ram_mb=RAM_MB, ssh_keys=(pub,))

    def _login(self, spec: InstanceSpec, t0: float, pid: int) -> tuple[float, float, float, float]:
        address = spec.networks[0].address.split("/")[0]
        banner, login = wait_ssh_login(self.key, address, DEADLINE)
        out = ssh(self.key, address, "cloud-init status --wait", timeout=DEADLINE)
        if out.returncode != 0:
            raise RuntimeError(f"cloud-init status --wait: {out.stdout}{out.stderr}")
        done = time.monotonic() - t0
        rss_kib = int(
            next(
                x for x in Path(f"/proc/{pid}/status").read_text().splitlines() if x.startswith("VmRSS:")
            ).split()[1]
        )
        return banner - t0, login - t0, done, rss_kib / 1024

    @staticmethod
    def _pid(name: str) -> int:
        return int(Path(f"/run/libvirt/qemu/{name}.pid").read_text().strip())

    def driver(self, i: int) -> Timing:
        spec = self.spec(100 + i)
        t0 = time.monotonic()
        info = self.drv.spawn(spec)
        called = time.monotonic() - t0
        try:
            assert info.pid is not None
            return (called, *self._login(spec, t0, info.pid))
        finally:
            self.drv.destroy(spec.instance_id)

    def bare(self, tb: int) -> Timing:
        self.bare_boots += 1  # each boot its own address and directory
        spec = self.spec(10 + self.bare_boots)
        d = self.state / f"bare-{self.bare_boots}"
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
            name=name,
            ram=RAM_MB,
            tb=tb,
            disk=disk,
            seed=seed,
            log=log,
            mac=spec.networks[0].mac,
            bridge=self.br,
        )
        t0 = time.monotonic()
        dom = self.conn.defineXML(xml)
        try:
            dom.create()
            called = time.monotonic() - t0
            return (called, *self._login(spec, t0, self._pid(name)))
        finally:
            if dom.isActive():
                dom.destroy()
            dom.undefine()

    def close(self) -> None:
        self.conn.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=1, help="boots per variant (each takes one to three minutes)")
    ap.add_argument(
        "--tb-cache", default="32,128", help="the bare domain's TCG cache sizes, MiB (default 32,128)"
    )
    args = ap.parse_args()
    sizes = [int(x) for x in args.tb_cache.split(",") if x]
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
    chosen = tb_cache_mib(RAM_MB)
    # (label, what the table calls it, the plain domain's cache; None: the driver's own choice)
    variants: list[tuple[str, str, int | None]] = [("driver", f"driver spawn (tb-cache {chosen})", None)]
    variants += [(f"bare-{tb}", f"libvirt define+create (tb {tb})", tb) for tb in sizes]
    results: dict[str, list[Timing]] = {label: [] for label, _, _ in variants}
    bench = None
    try:
        bench = Bench(ref, state, br, gateway, key)
        for i in range(args.runs):
            for label, _, tb in variants:
                results[label].append(bench.driver(i) if tb is None else bench.bare(tb))
                c, b, login, done, rss = results[label][-1]
                print(
                    f"run {i + 1} {label:8s} call {c:5.2f} s  sshd {b:6.1f} s  login {login:6.1f} s"
                    f"  cloud-init done {done:6.1f} s  RSS {rss:5.0f} MiB",
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
    print(
        f"{'variant':34s} {'call s':>7s} {'sshd s':>7s} {'login s':>8s} {'c-i done s':>11s} {'RSS MiB':>8s}"
    )
    for label, what, _ in variants:
        cols = [statistics.median(t[k] for t in results[label]) for k in range(5)]
        print(f"{what:34s} {cols[0]:7.2f} {cols[1]:7.1f} {cols[2]:8.1f} {cols[3]:11.1f} {cols[4]:8.0f}")
    same = f"bare-{chosen}"
    if same in results:
        for k, what in ((2, "login"), (3, "cloud-init done")):
            ratio = statistics.median(t[k] for t in results["driver"]) / statistics.median(
                t[k] for t in results[same]
            )
            print(f"ratio driver/bare at tb {chosen} ({what}): {ratio:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
