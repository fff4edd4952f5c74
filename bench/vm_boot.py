"""Boot time of the tiny sample VM: bare libvirt vs the Skyport VM driver.

    .venv/bin/python bench/vm_boot.py [--runs 5]

bare:   defineXML + create of a hand-written equivalent domain on a plain
        qcow2 overlay and seed made beforehand; timed define -> ready marker.
driver: LibvirtDriver.spawn (image cache check, overlay, seed, bridge, XML,
        define, create); timed spawn -> ready marker.
Runs alternate between the two on the same image in the same process.  Needs
root and libvirtd; builds the sample image if missing.
"""

from __future__ import annotations

import argparse
import json
import secrets
import shutil
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import libvirt  # noqa: E402

from compute.drivers import cloudinit  # noqa: E402
from compute.drivers.libvirt_xml import tb_cache_mib  # noqa: E402
from compute.drivers.vm import LibvirtDriver  # noqa: E402
from compute.network import bridge  # noqa: E402
from compute.spec import ImageRef, NetworkAttachment, NetworkSegment  # noqa: E402
from tests.compute.vm_fixtures import (  # noqa: E402
    build_sample_image,
    image_ref,
    make_state_dir,
    node_config,
    random_mac,
    vm_spec,
)

READY = b"SKYPORT-READY"

BARE_XML = """<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>{ram}</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/></os>
  <features><acpi/><tcg><tb-cache unit='MiB'>{tb}</tb-cache></tcg></features>
  <devices>
    <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
      <source file='{disk}'/><target dev='vda' bus='virtio'/></disk>
    <disk type='file' device='disk'><driver name='qemu' type='raw'/>
      <source file='{seed}'/><target dev='vdb' bus='virtio'/><readonly/></disk>
    <interface type='bridge'><mac address='{mac}'/><source bridge='{bridge}'/>
      <model type='virtio'/><rom enabled='no'/></interface>
    <serial type='file'><source path='{log}'/><target port='0'/></serial>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>
</domain>"""


def wait_ready(log: Path, deadline: float = 120.0) -> None:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        try:
            if READY in log.read_bytes():
                return
        except FileNotFoundError:
            pass
        time.sleep(0.02)
    raise TimeoutError(f"no ready marker in {log}")


class Bench:
    def __init__(self, ref: ImageRef, state: Path, br: str, drv: LibvirtDriver, conn: object) -> None:
        self.ref, self.state, self.br, self.drv, self.conn = ref, state, br, drv, conn
        self.base = drv.images.fetch(ref)  # both variants start from a warm cache

    def bare(self, i: int) -> float:
        d = self.state / f"bare-{i}"
        d.mkdir(mode=0o755)
        disk, seed, log = d / "disk.qcow2", d / "seed.iso", d / "console.log"
        subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(self.base), str(disk)],
            check=True,
        )
        disk.chmod(0o644)
        spec = vm_spec(
            self.ref,
            (NetworkAttachment(NetworkSegment("b", self.br), f"198.18.250.{10 + i}/24", random_mac()),),
        )
        cloudinit.build_seed(spec, seed)
        name = f"sky-bench-{uuid.uuid4().hex[:8]}"
        xml = BARE_XML.format(
            name=name,
            ram=128,
            tb=tb_cache_mib(128),
            disk=disk,
            seed=seed,
            log=log,
            mac=random_mac(),
            bridge=self.br,
        )
        t0 = time.monotonic()
        dom = self.conn.defineXML(xml)  # type: ignore[attr-defined]
        try:
            dom.create()
            wait_ready(log)
            return time.monotonic() - t0
        finally:
            if dom.isActive():
                dom.destroy()
            dom.undefine()

    def driver(self, i: int) -> float:
        net = NetworkAttachment(NetworkSegment("b", self.br), f"198.18.250.{100 + i}/24", random_mac())
        spec = vm_spec(self.ref, (net,))
        t0 = time.monotonic()
        self.drv.spawn(spec)
        try:
            wait_ready(self.drv.console_log_path(spec.instance_id))
            return time.monotonic() - t0
        finally:
            self.drv.destroy(spec.instance_id)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--json", type=Path, help="also write the medians as JSON here")
    args = ap.parse_args()

    ref = image_ref(build_sample_image())
    state = make_state_dir()
    br = f"skt{secrets.token_hex(4)}"
    bridge.ensure_bridge(br)
    drv = LibvirtDriver(node_config(state))
    conn = libvirt.open("qemu:///system")
    results: dict[str, list[float]] = {"bare": [], "driver": []}
    try:
        bench = Bench(ref, state, br, drv, conn)
        runners: dict[str, Callable[[int], float]] = {"bare": bench.bare, "driver": bench.driver}
        for i in range(args.runs):
            for label, fn in runners.items():
                results[label].append(fn(i))
                print(f"run {i + 1} {label:6s} {results[label][-1]:6.2f} s", file=sys.stderr)
    finally:
        conn.close()
        bridge.delete_bridge(br)
        shutil.rmtree(state, ignore_errors=True)

    print(f"tiny VM boot to ready marker, TCG, 1 vCPU, 128 MiB, {args.runs} runs each")
    print(f"{'variant':24s} {'median s':>9s} {'min s':>7s} {'max s':>7s}")
    for label, what in (("bare", "bare define->ready"), ("driver", "driver spawn->ready")):
        xs = results[label]
        print(f"{what:24s} {statistics.median(xs):9.2f} {min(xs):7.2f} {max(xs):7.2f}")
    ratio = statistics.median(results["driver"]) / statistics.median(results["bare"])
    print(f"{'ratio driver/bare':24s} {ratio:9.2f}")
    if args.json:
        medians = {k: statistics.median(v) for k, v in results.items()}
        args.json.write_text(
            json.dumps(
                {"runs": args.runs, "bare_s": medians["bare"], "driver_s": medians["driver"], "ratio": ratio}
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
