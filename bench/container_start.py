"""Container start latency and density on this node (run as root from the repo root).

    .venv/bin/python bench/container_start.py              # bare crun vs driver, 20 runs each
    .venv/bin/python bench/container_start.py --density 1000

Start latency: a bare ``crun run -d`` of a hand-made bundle on the same
unpacked busybox layer, against the driver's ``spawn()`` (overlay rootfs,
conmon, config, limits) without and with a veth on a test bridge.
Density: N containers with 32 MiB limits and a veth each, spread over
bridges of at most 1000 ports; memory per container from MemAvailable.
Everything is removed at the end, also on failure.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from compute import nsenv  # noqa: E402
from compute.config import NodeConfig  # noqa: E402
from compute.drivers.container import ContainerDriver  # noqa: E402
from compute.network import bridge as bridges  # noqa: E402
from compute.spec import (  # noqa: E402
    ImageFormat,
    ImageRef,
    InstanceSpec,
    Kind,
    NetworkAttachment,
    NetworkSegment,
    PowerState,
)

PORTS_PER_BRIDGE = 1000


def build_image(out: Path) -> ImageRef:
    subprocess.run(
        [str(REPO / "images/sample_container/build.sh"), str(out)], check=True, capture_output=True
    )
    tar = next(out.glob("busybox-[0-9]*.oci.tar"))
    digest = (out / (tar.name + ".sha256")).read_text().split()[0]
    version = tar.name.removeprefix("busybox-").removesuffix(".oci.tar")
    return ImageRef("busybox", version, ImageFormat.OCI, f"sha256:{digest}", str(tar))


def spec_for(image: ImageRef, nets: tuple[NetworkAttachment, ...] = (), ram_mb: int = 32) -> InstanceSpec:
    return InstanceSpec(
        instance_id=str(uuid.uuid4()),
        name="bench",
        hostname="bench",
        tenant="bench",
        kind=Kind.CONTAINER,
        vcpus=1,
        ram_mb=ram_mb,
        disk_gb=0,
        image=image,
        networks=nets,
        command=("/bin/sleep", "3600"),
    )


def mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable")


def conmon_rss_bytes() -> int:
    total = 0
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            text = status.read_text()
        except OSError:
            continue
        if text.startswith("Name:\tconmon"):
            for line in text.splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
    return total


def bare_bundle(work: Path, rootfs: Path, userns: bool = False) -> Path:
    bundle = work / ("bare-userns" if userns else "bare")
    bundle.mkdir()
    subprocess.run(["crun", "spec"], cwd=bundle, check=True)
    cfg = json.loads((bundle / "config.json").read_text())
    cfg["root"] = {"path": str(rootfs), "readonly": True}
    cfg["process"]["terminal"] = False
    cfg["process"]["args"] = ["/bin/sleep", "3600"]
    cfg["linux"]["cgroupsPath"] = "/skyport-bench/bare"
    cfg["linux"]["resources"] = {"memory": {"limit": 32 << 20}, "pids": {"limit": 64}}
    if userns:  # what the driver does: root inside = an unprivileged range
        work.chmod(0o755)  # crun in the user namespace must reach the rootfs (mkdtemp: 0700)
        cfg["linux"]["namespaces"].append({"type": "user"})
        mapping = [{"containerID": 0, "hostID": 1 << 24, "size": 65536}]
        cfg["linux"]["uidMappings"] = cfg["linux"]["gidMappings"] = mapping
    (bundle / "config.json").write_text(json.dumps(cfg))
    return bundle


def bench_bare(work: Path, rootfs: Path, runs: int, userns: bool = False, gap: float = 0.0) -> list[float]:
    """``crun run -d`` of a hand-made bundle ``runs`` times; ``gap`` s of idle before each (see QUIET)."""
    bundle = work / ("bare-userns" if userns else "bare")
    if not bundle.exists():
        bare_bundle(work, rootfs, userns)
    root = work / ("bare-userns-root" if userns else "bare-root")
    times = []
    with (work / "bare.log").open("ab") as log:
        for i in range(runs):
            cid = f"skc-bare-{i}"
            time.sleep(gap)
            t0 = time.perf_counter()
            proc = subprocess.Popen(
                ["crun", f"--root={root}", "run", "-d", "--bundle", str(bundle), cid],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
            if proc.wait() != 0:
                raise RuntimeError(f"bare crun run failed: {(work / 'bare.log').read_text()[-500:]}")
            times.append(time.perf_counter() - t0)
            subprocess.run(
                ["crun", f"--root={root}", "delete", "--force", cid], check=False, capture_output=True
            )
    return times


def bench_driver(
    drv: ContainerDriver, make: Callable[[], InstanceSpec], runs: int, gap: float = 0.0
) -> list[float]:
    times = []
    for _ in range(runs):
        spec = make()
        time.sleep(gap)
        t0 = time.perf_counter()
        info = drv.spawn(spec)
        times.append(time.perf_counter() - t0)
        if info.power_state != PowerState.RUNNING:
            raise RuntimeError(f"not running: {info}")
        drv.destroy(spec.instance_id)
    return times


def table(rows: list[tuple[str, list[float]]], baseline: float) -> None:
    print(f"{'variant':44} {'median ms':>10} {'p90 ms':>8} {'ratio':>6}")
    for name, times in rows:
        med = statistics.median(times)
        p90 = sorted(times)[int(len(times) * 0.9) - 1]
        print(f"{name:44} {med * 1000:10.1f} {p90 * 1000:8.1f} {med / baseline:6.2f}")


#: Idle time before each start in the "one start on a quiet node" round.  On these hosts a
#: start that follows another within a few ms is 2-3x faster than one on a quiet node: the
#: first cgroup.procs write waits for an RCU grace period (cgroup v1's threadgroup lock)
#: unless a migration just before left the lock in its slow mode (docs/container-driver.md).
QUIET = 0.1


def start_latency(
    drv: ContainerDriver, image: ImageRef, work: Path, runs: int, net: tuple[str, str]
) -> dict[str, float]:
    unpacked = drv.layers.unpack(Path(image.location), image.digest)
    bridge, prefix = net
    counter = iter(range(2, 250))

    def networked() -> InstanceSpec:
        n = next(counter)
        nic = NetworkAttachment(
            NetworkSegment("bench", bridge), f"{prefix}.{n}/24", f"02:5c:00:00:00:{n:02x}"
        )
        return spec_for(image, (nic,))

    result: dict[str, float] = {}
    for gap, label, key in ((0.0, "back to back", ""), (QUIET, f"each after {QUIET:g} s idle", "_quiet")):
        bare = bench_bare(work, unpacked.layers[0], runs, gap=gap)
        bare_userns = bench_bare(work, unpacked.layers[0], runs, userns=True, gap=gap)
        plain = bench_driver(drv, lambda: spec_for(image), runs, gap=gap)
        with_net = bench_driver(drv, networked, runs, gap=gap)
        base = statistics.median(bare)
        print(f"\nstart → running, {runs} runs each, {label} ({drv.health()[1]}, conmon)")
        table(
            [
                ("bare crun run -d (hand-made bundle)", bare),
                ("bare crun run -d + user namespace", bare_userns),
                ("driver spawn, no network", plain),
                ("driver spawn, veth on bridge", with_net),
            ],
            base,
        )
        result |= {
            f"bare_ms{key}": base * 1000,
            f"bare_userns_ms{key}": statistics.median(bare_userns) * 1000,
            f"driver_ms{key}": statistics.median(plain) * 1000,
            f"driver_veth_ms{key}": statistics.median(with_net) * 1000,
        }
    return result


def density(drv: ContainerDriver, image: ImageRef, n: int) -> dict[str, float]:
    nbridges = (n + PORTS_PER_BRIDGE - 1) // PORTS_PER_BRIDGE
    names = [f"skc{secrets.token_hex(4)}" for _ in range(nbridges)]
    nets = [ipaddress.IPv4Network(f"198.19.{128 + 4 * b}.0/22") for b in range(nbridges)]
    specs: list[InstanceSpec] = []
    try:
        for name, net in zip(names, nets, strict=True):
            bridges.ensure_bridge(name, address=f"{net.network_address + 1}/22")
        before = mem_available()
        t0 = time.perf_counter()
        for i in range(n):
            b = i // PORTS_PER_BRIDGE
            addr = nets[b].network_address + 2 + i % PORTS_PER_BRIDGE
            mac = "02:5c:" + ":".join(f"{x:02x}" for x in addr.packed)
            spec = spec_for(image, (NetworkAttachment(NetworkSegment("bench", names[b]), f"{addr}/22", mac),))
            specs.append(spec)
            drv.spawn(spec)
            if (i + 1) % 100 == 0:
                print(f"  {i + 1} started, {time.perf_counter() - t0:.1f} s", flush=True)
        elapsed = time.perf_counter() - t0
        time.sleep(1.0)
        after = mem_available()
        cgroup_sum = sum(drv.stats(spec.instance_id).memory_bytes for spec in specs)
        conmon_rss = conmon_rss_bytes()
        states = [i.power_state for i in drv.list()]
        running = sum(1 for s in states if s == PowerState.RUNNING)
        ports = sum(len(bridges.bridge_ports(name)) for name in names)
        per = (before - after) / n / 2**20
        print(f"\ndensity: {n} containers, 32 MiB limit, veth each, {nbridges} bridge(s)")
        print(f"{'started in':28} {elapsed:8.1f} s  ({elapsed / n * 1000:.1f} ms each)")
        print(f"{'running / requested':28} {running:8d} / {n}  (bridge ports {ports})")
        print(f"{'MemAvailable drop':28} {(before - after) / 2**20:8.0f} MiB  ({per:.2f} MiB per container)")
        for label, total in (
            ("  in container cgroups", cgroup_sum),
            ("  conmon RSS (incl. shared)", conmon_rss),
        ):
            print(f"{label:28} {total / 2**20:8.0f} MiB  ({total / n / 2**20:.2f} MiB each)")
        if running != n:
            raise SystemExit(f"LOST CONTAINERS: only {running} of {n} running")
        result = {"n": n, "started_s": elapsed, "running": running, "mib_each": per}
    finally:
        t1 = time.perf_counter()
        for spec in specs:
            drv.destroy(spec.instance_id)
        for name in names:
            bridges.delete_bridge(name)
        print(f"{'cleanup':28} {time.perf_counter() - t1:8.1f} s")
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--density", type=int, nargs="?", const=1000, default=None, metavar="N")
    ap.add_argument("--json", type=Path, help="also write the results as JSON here")
    args = ap.parse_args()
    nsenv.enter_private_mount_ns()
    work = Path(tempfile.mkdtemp(prefix="skc-bench-", dir="/var/tmp"))
    cfg = NodeConfig(
        name="bench",
        state_dir=work / "node",
        libvirt_uri="test:///default",
        accelerator="qemu",
        container_runtime="crun",
        broker_url="memory://",
    )
    drv = ContainerDriver(cfg)
    ok, why = drv.health()
    if not ok:
        raise SystemExit(f"container driver not healthy: {why}")
    try:
        image = build_image(work / "images")
        if args.density:
            result = density(drv, image, args.density)
        else:
            name = f"skc{secrets.token_hex(4)}"
            bridges.ensure_bridge(name, address="198.19.250.1/24")
            try:
                result = start_latency(drv, image, work, args.runs, (name, "198.19.250"))
            finally:
                bridges.delete_bridge(name)
        if args.json:
            args.json.write_text(json.dumps({"runs": args.runs, **result}))
    finally:
        for info in drv.list():
            drv.destroy(info.instance_id)
        subprocess.run(
            ["crun", f"--root={work}/bare-root", "delete", "--force", "skc-bare"], capture_output=True
        )
        for controller in (
            "memory",
            "pids",
            "cpu",
            "cpuacct",
            "freezer",
            "devices",
            "blkio",
            "cpuset",
            "systemd",
        ):
            parent = Path("/sys/fs/cgroup") / controller / "skyport-bench"
            for d in [*parent.glob("*"), parent]:
                if d.is_dir():
                    d.rmdir()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
