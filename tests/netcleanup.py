"""Remove what a test's compute nodes' routers made: resolvers (dnsmasq), nftables tables, bridges.

Why a helper: a node's dnsmasq outlives its worker (it is a daemon) and, in
a namespace "host", would keep the namespace alive after ``ip netns del``.
Each test node gets its own ``SKYPORT_NFT_TABLE`` (:func:`table_for`), so
runs on one machine never touch each other's rules.
"""

from __future__ import annotations

import re
from pathlib import Path

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
