"""Remove what a test's compute nodes' routers made: resolvers (dnsmasq), nftables tables, bridges.

Why a helper: a node's dnsmasq outlives its worker (it is a daemon) and, in
a namespace "host", would keep the namespace alive after ``ip netns del``.
Each test node gets its own ``SKYPORT_NFT_TABLE`` (:func:`table_for`), so
runs on one machine never touch each other's rules.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import socket
import subprocess
from pathlib import Path
from typing import Any

from compute.config import NodeConfig
from compute.network.router import Router


def table_for(node: str) -> str:
    """A per-node nftables table name (letters, digits and '_')."""
    return "t_" + re.sub(r"[^A-Za-z0-9_]", "_", node)[:30]


def router_for(node: str, state_dir: Path) -> Router:
    return Router(NodeConfig(node, state_dir, "", "qemu", "crun", "", nft_table=table_for(node)))


def teardown_node(node: str, state_dir: Path, *, in_this_namespace: bool) -> None:
    """Stop the node's resolvers; in the node's own namespace also drop its tables and bridges."""
    router = router_for(node, state_dir)
    if in_this_namespace:
        router.teardown()
    else:
        router.stop_resolvers()


# --- what an interrupted run left behind -------------------------------------------------------
#
# A run that is killed (an environment restart, a CI timeout, SIGKILL) never reaches its
# teardowns, and the kernel keeps what its host-namespace nodes made: a tenant bridge holding
# the first /24 of the test pool, and the node's nftables tables.  The next run's first network
# then gets the same /24, and the node refuses it, rightly ("collides with the route to ...").
# So each test session marks itself as a user of its pool (for its whole life) and, when no
# other session is live on it, first removes such leftovers: Skyport bridges (``skn-``) with an address in
# the pool that no live node's table names (only test nodes' ``t_`` tables, or none) and the
# test fixtures' own (``skw``, ``skt``, ...: every link Skyport or its tests make is named
# ``sk*``), their ports, and the test tables that named only them.
# Anything else holding an address in the pool is not ours: the run stops and says so.


def _ip_json(*args: str) -> list[dict[str, Any]]:
    out = subprocess.run(["ip", "-j", *args], check=True, capture_output=True, text=True).stdout
    return json.loads(out or "[]")  # type: ignore[no-any-return]


def _tables_naming_bridges() -> dict[str, set[str]]:
    """inet table name -> the bridges its ``bridges`` set names (Skyport nodes' tables)."""
    got: dict[str, set[str]] = {}
    out = subprocess.run(["nft", "-j", "list", "sets", "inet"], capture_output=True, text=True)
    if out.returncode != 0:
        return got
    for item in json.loads(out.stdout).get("nftables", []):
        s = item.get("set")
        if s and s.get("name") == "bridges":
            elems = s.get("elem", [])
            got[s["table"]] = {e for e in elems if isinstance(e, str)}
    return got


class PoolTaken(RuntimeError):
    pass


def claim_test_pool(pool: str) -> tuple[socket.socket, bool]:
    """Mark this session as a live user of the test network ``pool``; say whether it is the only one.

    The mark is an abstract unix socket named after the pool and the PID: it lives in the network
    namespace, which is what sessions that could collide share (a CI job with its own file
    system on the same machine included), and dies with the session.  Only a session that is
    alone may :func:`sweep_stale`: a live session's bridges are not leftovers.  Keep the socket."""
    prefix = f"skyport-test-pool {pool} "
    mark = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    mark.bind(f"\0{prefix}{os.getpid()}")
    mine = f"@{prefix}{os.getpid()}"
    others = False
    with open("/proc/net/unix") as f:
        for line in f:
            m = re.match(r"\S+: \S+ \S+ \S+ \S+ \S+\s+\d+ (.*)$", line.rstrip("\n"))
            path = m.group(1) if m else ""
            if path.startswith("@" + prefix) and path != mine:
                others = True
    return mark, not others


def sweep_stale(pool: str) -> list[str]:
    """Remove what killed runs left in ``pool`` (see above); return what was removed.

    Call only while holding :func:`claim_test_pool`'s lock for ``pool``.  Raises
    :class:`PoolTaken` when an address in the pool belongs to something that is not a
    leftover test bridge."""
    net = ipaddress.ip_network(pool)
    tables = _tables_naming_bridges()
    stale: list[str] = []
    for iface in _ip_json("-4", "addr", "show"):
        name = iface["ifname"]
        inside = [
            f"{a['local']}/{a['prefixlen']}"
            for a in iface.get("addr_info", [])
            if ipaddress.ip_interface(f"{a['local']}/{a['prefixlen']}").network.overlaps(net)
        ]
        if not inside:
            continue
        owners = sorted(t for t, names in tables.items() if name in names)
        if not name.startswith("sk") or any(not t.startswith("t_") for t in owners):
            raise PoolTaken(
                f"{name} holds {', '.join(inside)} inside the test network pool {pool}"
                + (f" (named by nftables table {', '.join(owners)})" if owners else "")
                + "; it is not a test run's leftover: give the tests another "
                "SKYPORT_TEST_NETWORK_POOL (a free range of 198.18.0.0/15)"
            )
        stale.append(name)
    removed: list[str] = []
    links = {link["ifname"]: link for link in _ip_json("link", "show")} if stale else {}
    for name in stale:
        ports = sorted(n for n, link in links.items() if link.get("master") == name)
        for port in ports:
            subprocess.run(["ip", "link", "del", port], capture_output=True)
        subprocess.run(["ip", "link", "del", name], check=True, capture_output=True)
        removed.append(f"link {name}" + (f" (ports {', '.join(ports)})" if ports else ""))
    gone = set(stale)
    for table, names in sorted(tables.items()):
        if table.startswith("t_") and names and names <= gone:
            for family in ("inet", "bridge"):
                subprocess.run(["nft", "delete", "table", family, table], capture_output=True)
            removed.append(f"nftables tables {table}")
    return removed
