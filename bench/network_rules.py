"""Cost of Skyport's nftables rules on a node (run as root from the repo root).

    .venv/bin/python bench/network_rules.py            # 1, 100, 1000 instances with 5 rules each

Everything runs in a network namespace this script makes (deleted at the
end, also on failure): one tenant network with its gateway, then N
instances' NICs with port security and a security group of 5 rules each
(ingress tcp 22, tcp 80, udp 53 from a /24, icmp, egress any).  Printed:

- ``reload``: ``Router.converge`` (read the state files, build both tables,
  one ``nft -j -f -`` transaction: what drift repair pays), against the bare
  tool loading the same JSON (``nft -j -f``) in the same run;
- ``attach``: what a container or VM start pays for its rules (record one
  more instance and load its per-NIC delta, with N already present; the
  mean of an attach and a detach);
- ``rule change``: ``Router.set_security`` on one instance with N present
  (alternating between two rule lists, so each call changes something),
  i.e. the node's share of "API → enforced" (the rest is one broker hop);
- the number of nftables rules loaded.
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from compute import nsenv  # noqa: E402
from compute.config import NodeConfig  # noqa: E402
from compute.network import hostlock, nft, router  # noqa: E402
from compute.spec import (  # noqa: E402
    Direction,
    ImageFormat,
    ImageRef,
    InstanceSpec,
    Kind,
    NetworkAttachment,
    NetworkSegment,
    SecurityRule,
    to_json,
)

T = TypeVar("T")
RULES = (
    SecurityRule(Direction.INGRESS, "tcp", 22, 22),
    SecurityRule(Direction.INGRESS, "tcp", 80, 80),
    SecurityRule(Direction.INGRESS, "udp", 53, 53, ("198.19.191.0/24",)),
    SecurityRule(Direction.INGRESS, "icmp"),
    SecurityRule(Direction.EGRESS),
)
SEG = NetworkSegment("bench/n", "skbnchbr", 1450, "198.19.191.10/24", gateway="198.19.191.1/24")
IMAGE = ImageRef("x", "1", ImageFormat.OCI, "sha256:" + "0" * 64, "/x")


def in_ns(ns: str, fn: Callable[[], T]) -> T:
    out: list[T] = []
    err: list[BaseException] = []

    def run() -> None:
        try:
            fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
            nsenv.setns(fd, nsenv.CLONE_NEWNET)
            os.close(fd)
            out.append(fn())
        except BaseException as exc:
            err.append(exc)

    t = threading.Thread(target=run)
    t.start()
    t.join()
    if err:
        raise err[0]
    return out[0]


def spec(i: int) -> InstanceSpec:
    host = 20 + i % 200
    mac = f"52:54:00:{(i >> 16) & 255:02x}:{(i >> 8) & 255:02x}:{i & 255:02x}"
    nic = NetworkAttachment(SEG, f"198.19.191.{host}/24", mac, "198.19.191.1")
    return InstanceSpec(
        str(uuid.uuid4()), "b", "b", "bench", Kind.CONTAINER, 1, 64, 0, IMAGE, (nic,), security=RULES
    )


def timed(fn: Callable[[], object], runs: int) -> float:
    samples = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples) * 1000


def main() -> None:
    ns = f"skbench-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            hostlock.LOCK_FILE = Path(tmp) / "lock"
            cfg = NodeConfig(
                "bench", Path(tmp) / "node", "test:///default", "qemu", "crun", "memory://",
                network_lock=Path(tmp) / "lock", nft_table=f"skbench{secrets.token_hex(3)}",
            )  # fmt: skip
            r = router.Router(cfg)
            in_ns(ns, lambda: r.ensure(SEG))
            head = ("instances", "nft rules", "bare nft -f", "reload", "attach", "rule change")
            print("{:>9} {:>9} {:>12} {:>9} {:>9} {:>12}".format(*head))
            have = 0
            for n in (1, 100, 1000):
                specs = [spec(i) for i in range(have, n)]
                for s in specs:  # record the state files directly: one reload below, not one per instance
                    (r.root / "nics").mkdir(parents=True, exist_ok=True)
                    (r.root / "security").mkdir(parents=True, exist_ok=True)
                    nics = [dataclasses.asdict(x) for x in router.nics_of(s)]
                    (r.root / "nics" / f"{s.instance_id}.json").write_text(json.dumps(nics))
                    (r.root / "security" / f"{s.instance_id}.json").write_text(
                        json.dumps([to_json(x) for x in RULES])
                    )
                have = n
                doc = json.dumps({"nftables": [c for t in r.desired() for c in t.commands()]})
                path = Path(tmp) / "rules.json"
                path.write_text(doc)
                bare_load = ["nft", "-j", "-f", str(path)]
                bare = in_ns(ns, lambda cmd=bare_load: timed(lambda: subprocess.run(cmd, check=True), 5))
                reload = in_ns(ns, lambda: timed(r.converge, 5))
                extra = spec(999_999)

                def attach_detach(extra: InstanceSpec = extra) -> None:
                    r.attach(extra)
                    r.detach(extra.instance_id)

                attach = in_ns(ns, lambda: timed(attach_detach, 5)) / 2
                some = next(iter(r.instance_nics()))
                lists = iter([RULES[:4], RULES] * 3)  # each call a real change (the same list is a no-op)
                change = in_ns(
                    ns, lambda iid=some, lists=lists: timed(lambda: r.set_security(iid, next(lists)), 5)
                )
                listing = in_ns(ns, lambda: nft.listing("bridge", cfg.nft_table)) or {}
                listing_inet = in_ns(ns, lambda: nft.listing("inet", cfg.nft_table)) or {}
                count = sum(
                    1 for o in listing.get("nftables", []) + listing_inet.get("nftables", []) if "rule" in o
                )
                print(
                    f"{n:>9} {count:>9} {bare:>10.1f}ms {reload:>7.1f}ms {attach:>7.1f}ms {change:>10.1f}ms"
                )
            in_ns(ns, r.teardown)
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)


if __name__ == "__main__":
    main()
