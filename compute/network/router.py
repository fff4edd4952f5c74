"""The node's router for tenant networks: anycast gateway, DNS, egress NAT, port security.

Why here and not in the drivers: VMs (taps) and containers (veths) sit on
the same bridges and get the same policy, so the node keeps one desired
network state and converges the kernel to it:

- **State on disk** (``<state_dir>/net/``): the :class:`NetworkSegment` of
  each network the node carries and, per instance, its NICs (host interface,
  MAC, address).  Every change rewrites one file, then :meth:`Router.converge`
  brings Skyport's two nftables tables to what *all* files describe, under
  the node's rule lock.  What only one instance changes (its NICs' set
  elements, its security chains and their verdict-map entries) is loaded as
  a delta of its own, whose cost does not grow with the instances the node
  carries; anything else (a network, a published port) reloads both tables
  whole in one transaction (``compute.network.nft``).  ``net/loaded.json``
  records what the kernel was given, so a delta is computed against it;
  without that record, or when a delta is refused, the tables are loaded
  whole.  Idempotent: the same state gives the same tables either way.
- **Gateway**: the network's ``.1`` on the bridge of every node that carries
  it (anycast; the node's own host address stays the bridge's primary
  address).  ARP for the gateway never crosses the VXLAN tunnel (bridge
  table), so each instance resolves its own node's gateway and its traffic
  leaves by the node it runs on.  Routing is switched on per bridge
  (``net.ipv4.conf.<bridge>.forwarding``) and on the uplink, never globally.
- **Policy** (``inet`` table): from a tenant bridge the node accepts only
  its own addresses *on that bridge* (closing the cross-network gap) and
  broadcast; it forwards a tenant's packets only out of the uplink, with
  masquerade, for networks whose ``egress`` is on; into a tenant bridge only
  replies.  Networks never route to each other.
- **Port security** (``bridge`` table): a NIC's frames must carry its MAC,
  and its ARP and IPv4 packets its address; other ethertypes are dropped.
- **DNS**: a ``dnsmasq`` per network, bound to the gateway address only,
  answering the network's instance names and forwarding the rest to the
  node's ``SKYPORT_DNS_SERVERS`` (none: names only).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import hashlib
import ipaddress
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from compute.config import NodeConfig
from compute.network import bridge, nft, vxlan
from compute.network.nft import (
    ACCEPT,
    DROP,
    MASQUERADE,
    Chain,
    Expr,
    Map,
    Rule,
    Set,
    Table,
    anon,
    concat,
    ct_state,
    dnat,
    fib_daddr_type,
    jump,
    match,
    meta,
    payload,
    prefix,
    ref,
    vmap,
)
from compute.spec import (
    Direction,
    Forward,
    GroupMembers,
    InstanceSpec,
    Kind,
    NetworkSegment,
    SecurityRule,
    SpecError,
    from_json,
    to_json,
)

log = logging.getLogger(__name__)

DNSMASQ = "dnsmasq"
PENDING = "pending"  # rules loaded, fingerprint not taken yet
UNSPECIFIED = str(ipaddress.IPv4Address(0))  # the sender address of ARP probes


class RouterError(Exception):
    """The node could not bring its networks to the desired state; the message says why."""


def nic_ifname(kind: Kind, instance_id: str, index: int) -> str:
    """Host-side interface of NIC ``index``: ``skv``/``skc`` + 8 hex of the id + index."""
    return f"{'skv' if kind is Kind.VM else 'skc'}{instance_id[:8]}{index}"[:15]


@dataclasses.dataclass(frozen=True)
class Nic:
    """One NIC as port security sees it."""

    ifname: str
    bridge: str
    mac: str
    address: str


def nics_of(spec: InstanceSpec) -> tuple[Nic, ...]:
    return tuple(
        Nic(nic_ifname(spec.kind, spec.instance_id, i), n.bridge, n.mac, n.ip)
        for i, n in enumerate(spec.networks)
    )


# ---------------------------------------------------------------- the tables


def _ip(iface: str) -> str:
    return str(ipaddress.IPv4Interface(iface).ip)


def tables(
    name: str,
    uplink: str,
    segments: Sequence[NetworkSegment],
    nics: Sequence[Nic],
    forwards: Sequence[Forward] = (),
    security: Mapping[str, tuple[SecurityRule, ...]] | None = None,
    groups: Mapping[str, Sequence[str]] | None = None,
) -> tuple[Table, Table]:
    """Skyport's ``inet`` and ``bridge`` tables for the given desired state.

    ``security`` maps an ifname to the resolved rules of its instance's
    security groups; NICs not in it are not filtered.  ``groups``: the
    member addresses of the groups those rules name as remote (a group
    without an entry admits nobody yet).
    """
    inet = inet_table(name, uplink, segments, forwards)
    return inet, bridge_table(name, segments, nics, security or {}, groups or {})


def inet_table(
    name: str, uplink: str, segments: Sequence[NetworkSegment], forwards: Sequence[Forward] = ()
) -> Table:
    bridges = sorted({s.bridge for s in segments})
    own = sorted({(s.bridge, _ip(a)) for s in segments for a in (s.host_address, s.gateway) if a is not None})
    egress = sorted({str(s.subnet) for s in segments if s.egress and s.subnet is not None}) if uplink else []
    iif, oif = meta("iifname"), meta("oifname")
    saddr = payload("ip", "saddr")
    sets = (
        Set("bridges", "ifname", tuple(bridges)),
        Set("own", ("ifname", "ipv4_addr"), tuple({"concat": list(p)} for p in own)),
        Set("egress_nets", "ipv4_addr", tuple(prefix(c) for c in egress), interval=True),
        Set("bridged", ("ifname", "ifname"), tuple({"concat": [b, b]} for b in bridges)),
    )
    chains = (
        Chain("input", hook="input"),
        Chain("forward", hook="forward"),
        Chain("postrouting", hook="postrouting", type="nat", priority=100),
        Chain("prerouting", hook="prerouting", type="nat", priority=-100),
        Chain("from_tenant"),
        Chain("route_from_tenant"),
        Chain("route_to_tenant"),
    )
    rules = [
        Rule("input", (match(iif, ref("bridges")), jump("from_tenant"))),
        Rule("from_tenant", (ct_state("established", "related"), ACCEPT), "replies to the node's own"),
        Rule("from_tenant", (match(concat(iif, payload("ip", "daddr")), ref("own")), ACCEPT)),
        Rule("from_tenant", (fib_daddr_type("broadcast", "multicast"), ACCEPT)),
        Rule("from_tenant", (DROP,), "the node's addresses on other networks"),
        # With br_netfilter (bridge-nf-call-iptables=1) frames bridged between two ports of one
        # network pass here too, with the bridge as both interfaces: that is switching, not routing.
        Rule("forward", (match(concat(iif, oif), ref("bridged")), ACCEPT), "bridged within a network"),
        Rule("forward", (match(iif, ref("bridges")), jump("route_from_tenant"))),
        Rule("forward", (match(oif, ref("bridges")), jump("route_to_tenant"))),
    ]
    if uplink:
        rules.append(
            Rule("route_from_tenant", (match(oif, uplink), match(saddr, ref("egress_nets")), ACCEPT))
        )
        rules.append(
            Rule("postrouting", (match(oif, uplink), match(saddr, ref("egress_nets")), MASQUERADE), "egress")
        )
    for f in sorted(forwards, key=lambda f: (f.external_address, f.protocol, f.external_port)):
        rules.append(
            Rule(
                "prerouting",
                (
                    match(payload("ip", "daddr"), f.external_address),
                    match(meta("l4proto"), f.protocol.value),
                    match(payload("th", "dport"), f.external_port),
                    dnat(f.address, f.port),
                ),
                "published port",
            )
        )
    dnatted = match({"ct": {"key": "status"}}, "dnat", "in")
    rules += [
        Rule("route_from_tenant", (dnatted, ct_state("established", "related"), ACCEPT), "published replies"),
        Rule("route_from_tenant", (DROP,), "networks never route to each other"),
        Rule("route_to_tenant", (ct_state("established", "related"), ACCEPT)),
        Rule("route_to_tenant", (dnatted, ACCEPT), "published ports"),
        Rule("route_to_tenant", (DROP,)),
    ]
    return Table("inet", name, sets, chains, tuple(rules))


def bridge_table(
    name: str,
    segments: Sequence[NetworkSegment],
    nics: Sequence[Nic],
    security: Mapping[str, tuple[SecurityRule, ...]] | None = None,
    groups: Mapping[str, Sequence[str]] | None = None,
) -> Table:
    tunnels = sorted({vxlan.device_name(s.vni) for s in segments if s.vni is not None and s.tunnel_local})
    gateways = sorted({_ip(s.gateway) for s in segments if s.gateway})
    iif, oif = meta("iifname"), meta("oifname")
    arp_s, arp_d = payload("arp", "saddr ip"), payload("arp", "daddr ip")
    is_arp = match(payload("ether", "type"), "arp")
    sets = (
        Set("tunnels", "ifname", tuple(tunnels)),
        Set("gateways", "ipv4_addr", tuple(gateways)),
        Set("nics", "ifname", tuple(sorted({n.ifname for n in nics}))),
        Set("nic_mac", ("ifname", "ether_addr"), tuple({"concat": [n.ifname, n.mac]} for n in nics)),
        Set("nic_ip", ("ifname", "ipv4_addr"), tuple({"concat": [n.ifname, n.address]} for n in nics)),
    )
    chains = (
        Chain("prerouting", hook="prerouting", priority=-200),
        Chain("forward", hook="forward"),
        Chain("output", hook="output"),
        Chain("port_security"),
        Chain("from_tunnel"),
        Chain("to_tunnel"),
    )
    rules = (
        Rule("prerouting", (match(iif, ref("nics")), jump("port_security"))),
        Rule("prerouting", (match(iif, ref("tunnels")), jump("from_tunnel"))),
        Rule("port_security", (match(concat(iif, payload("ether", "saddr")), ref("nic_mac"), "!="), DROP)),
        Rule("port_security", (is_arp, match(arp_s, UNSPECIFIED), ACCEPT), "ARP probes"),
        Rule("port_security", (is_arp, match(concat(iif, arp_s), ref("nic_ip"), "!="), DROP)),
        Rule(
            "port_security",
            (
                match(payload("ether", "type"), "ip"),
                match(concat(iif, payload("ip", "saddr")), ref("nic_ip"), "!="),
                DROP,
            ),
        ),
        Rule("port_security", (match(payload("ether", "type"), {"set": ["ip", "arp"]}, "!="), DROP)),
        Rule("from_tunnel", (is_arp, match(arp_s, ref("gateways")), DROP), "anycast gateway stays local"),
        Rule("from_tunnel", (is_arp, match(arp_d, ref("gateways")), DROP)),
        Rule("to_tunnel", (is_arp, match(arp_s, ref("gateways")), DROP)),
        Rule("to_tunnel", (is_arp, match(arp_d, ref("gateways")), DROP)),
        Rule("forward", (match(oif, ref("tunnels")), jump("to_tunnel"))),
        Rule("output", (match(oif, ref("tunnels")), jump("to_tunnel"))),
    )
    node_addresses = sorted({_ip(a) for s in segments for a in (s.host_address, s.gateway) if a is not None})
    more: tuple[Set, ...] = (Set("node_addresses", "ipv4_addr", tuple(node_addresses)),)
    more += tuple(
        Set(group_set(g), "ipv4_addr", tuple(sorted((groups or {}).get(g, ()))))
        for g in referenced_groups(security or {})
    )
    sg_chains, sg_rules, sg_maps = security_groups(security or {})
    return Table("bridge", name, sets + more, chains + sg_chains, rules + sg_rules, sg_maps)


# Security groups, stateless: this kernel has no bridge conntrack (nf_conntrack_bridge), so replies
# are admitted the way stateless ACLs do it: TCP segments that do not open a connection (not SYN
# without ACK), ICMP replies and errors, and UDP from the port ranges the other direction allows.
_ICMP_REPLIES = anon(("echo-reply", "destination-unreachable", "time-exceeded"))


def group_set(group: str) -> str:
    """The bridge table's set of the member addresses of security group ``group``."""
    return f"grp_{group}"


def referenced_groups(security: Mapping[str, Sequence[SecurityRule]]) -> list[str]:
    """The groups the given rules name as remote (each has a set in the bridge table)."""
    return sorted({r.remote_group for rules in security.values() for r in rules if r.remote_group})


def _sg_match(rule: SecurityRule, peer: str, ports: str) -> list[Expr] | None:
    """The match of one rule (``peer`` saddr/daddr, ``ports`` dport/sport); None when it admits nobody."""
    if not rule.remote and not rule.remote_group:
        return None
    exprs: list[Expr] = [match(payload("ether", "type"), "ip")]
    if rule.remote_group:
        exprs.append(match(payload("ip", peer), ref(group_set(rule.remote_group))))
    elif "0.0.0.0/0" not in rule.remote:
        exprs.append(match(payload("ip", peer), anon(prefix(c) for c in sorted(rule.remote))))
    if rule.protocol != "any":
        exprs.append(match(meta("l4proto"), rule.protocol))
    if rule.port_min is not None and rule.port_max is not None:
        exprs.append(match(payload(rule.protocol, ports), {"range": [rule.port_min, rule.port_max]}))
    return exprs


def _sg_chain(chain: str, rules: Sequence[SecurityRule], direction: Direction) -> list[Rule]:
    """``to_<if>`` (frames to the NIC: ingress) or ``from_<if>`` (frames from it: egress)."""
    peer = "saddr" if direction is Direction.INGRESS else "daddr"
    reverse_peer = "daddr" if peer == "saddr" else "saddr"
    out = [
        Rule(chain, (match(payload("ether", "type"), "arp"), ACCEPT)),
        # the node itself (its host address, the gateway: health checks, DNS answers) is always admitted
        Rule(
            chain,
            (
                match(payload("ether", "type"), "ip"),
                match(payload("ip", peer), ref("node_addresses")),
                ACCEPT,
            ),
        ),
        Rule(
            chain,
            (
                match(meta("l4proto"), "tcp"),
                match({"&": [payload("tcp", "flags"), ["syn", "ack"]]}, "syn", "!="),
                ACCEPT,
            ),
            "replies",
        ),
        Rule(chain, (match(meta("l4proto"), "icmp"), match(payload("icmp", "type"), _ICMP_REPLIES), ACCEPT)),
    ]
    for r in rules:
        if r.direction is direction:
            m = _sg_match(r, peer, "dport")
            if m is not None:
                out.append(Rule(chain, (*m, ACCEPT)))
        elif r.protocol == "udp" and r.port_min is not None:
            m = _sg_match(r, reverse_peer, "sport")  # reflexive: replies to UDP the other direction allows
            if m is not None:
                out.append(Rule(chain, (*m, ACCEPT), "udp replies"))
    out.append(Rule(chain, (DROP,)))
    return out


def nic_security(ifname: str, rules: Sequence[SecurityRule]) -> list[Rule]:
    """The rules of a filtered NIC's ``to_<if>`` and ``from_<if>`` chains."""
    return _sg_chain(f"to_{ifname}", rules, Direction.INGRESS) + _sg_chain(
        f"from_{ifname}", rules, Direction.EGRESS
    )


def _sg_entries(ifname: str) -> dict[str, list[list[object]]]:
    """A filtered NIC's entries in the verdict maps ``sg_to`` (frames to it) and ``sg_from``."""
    return {"sg_to": [[ifname, jump(f"to_{ifname}")]], "sg_from": [[ifname, jump(f"from_{ifname}")]]}


def security_groups(
    security: Mapping[str, tuple[SecurityRule, ...]],
) -> tuple[tuple[Chain, ...], tuple[Rule, ...], tuple[Map, ...]]:
    """Per filtered NIC a ``to_`` and a ``from_`` chain, reached through named verdict maps keyed by
    interface (named, so that one NIC's entries can be added and removed alone)."""
    chains: list[Chain] = [
        Chain("sg_ingress_fwd", hook="forward", priority=10),
        Chain("sg_ingress_out", hook="output", priority=10),
        Chain("sg_egress", hook="prerouting", priority=-150),
    ]
    rules: list[Rule] = [
        Rule("sg_ingress_fwd", (vmap(meta("oifname"), "sg_to"),)),
        Rule("sg_ingress_out", (vmap(meta("oifname"), "sg_to"),)),
        Rule("sg_egress", (vmap(meta("iifname"), "sg_from"),)),
    ]
    entries: dict[str, list[list[object]]] = {"sg_to": [], "sg_from": []}
    for ifname in sorted(security):
        chains += [Chain(f"to_{ifname}"), Chain(f"from_{ifname}")]
        rules += nic_security(ifname, security[ifname])
        for map_name, pairs in _sg_entries(ifname).items():
            entries[map_name] += pairs
    maps = tuple(Map(m, "ifname", tuple(entries[m])) for m in ("sg_to", "sg_from"))
    return tuple(chains), tuple(rules), maps


# ---------------------------------------------------------------- one NIC at a time


@dataclasses.dataclass(frozen=True)
class Loaded:
    """What one NIC has in the loaded bridge table: its elements and, if filtered, its rules' digest."""

    mac: str
    address: str
    security: str | None = None


def loaded_nics(nics: Sequence[Nic], security: Mapping[str, tuple[SecurityRule, ...]]) -> dict[str, Loaded]:
    found = {}
    for n in nics:
        rules = security.get(n.ifname)
        found[n.ifname] = Loaded(n.mac, n.address, None if rules is None else _rules_digest(rules))
    return found


@functools.lru_cache(maxsize=256)
def _rules_digest(rules: tuple[SecurityRule, ...]) -> str:
    """The digest of the chains ``rules`` make (the same for every NIC but for the chains' names;
    most NICs of a node share a few rule lists, so each is digested once)."""
    return _digest([[r.chain[:3], r.expr, r.comment] for r in nic_security("-", rules)])


def nic_delta(
    table: str,
    old: Mapping[str, Loaded],
    nics: Sequence[Nic],
    security: Mapping[str, tuple[SecurityRule, ...]],
) -> list[dict[str, object]]:
    """The commands that take the bridge table from ``old`` NICs to ``nics`` (their other parts equal).

    Removals come first (a NIC's elements, then its map entries before the
    chains they jump to); one transaction, so frames never see half a NIC.
    """
    want = loaded_nics(nics, security)
    remove = [c for i, was in sorted(old.items()) for c in _nic_out(table, i, was, want.get(i))]
    add = [c for i, now in sorted(want.items()) for c in _nic_in(table, i, old.get(i), now, security)]
    return remove + add


def groups_delta(
    table: str,
    old: Mapping[str, Sequence[str]],
    new: Mapping[str, Sequence[str]],
    nic_cmds: Sequence[dict[str, object]],
) -> list[dict[str, object]]:
    """``nic_cmds`` (a :func:`nic_delta`) with the group sets brought from ``old`` to ``new``.

    A group the rules name for the first time gets its set (and members) before the NICs'
    rules that name it; a set no rule names any more goes after the NICs' chains that named
    it.  A node whose only member of a group comes and goes (one container at a time) thus
    changes a few elements, not the whole table set.
    """
    added = [
        nft.named_set("add", "bridge", table, group_set(g), "ipv4_addr") for g in sorted(set(new) - set(old))
    ]
    gone = [nft.named_set("delete", "bridge", table, group_set(g)) for g in sorted(set(old) - set(new))]
    return [*added, *members_delta(table, old, new), *nic_cmds, *gone]


def members_delta(
    table: str, old: Mapping[str, Sequence[str]], new: Mapping[str, Sequence[str]]
) -> list[dict[str, object]]:
    """The element changes that take each group's set from ``old`` members to ``new`` (a group new
    in ``new`` gets all its members; one only in ``old`` is left to the caller)."""
    cmds: list[dict[str, object]] = []
    for group in sorted(new):
        before, after = set(old.get(group, ())), set(new[group])
        if before - after:
            cmds.append(nft.elements("delete", "bridge", table, group_set(group), sorted(before - after)))
        if after - before:
            cmds.append(nft.elements("add", "bridge", table, group_set(group), sorted(after - before)))
    return cmds


def _nic_elements(ifname: str, e: Loaded) -> dict[str, list[object]]:
    return {"nic_mac": [{"concat": [ifname, e.mac]}], "nic_ip": [{"concat": [ifname, e.address]}]}


def _nic_out(table: str, ifname: str, was: Loaded, now: Loaded | None) -> list[dict[str, object]]:
    """What of ``was`` goes: all of it when the NIC is gone (``now`` None), else what ``now`` changes."""
    cmds: list[dict[str, object]] = []
    if now == was:
        return cmds
    if was.security is not None and (now is None or now.security is None):
        cmds += [nft.elements("delete", "bridge", table, m, p) for m, p in _sg_entries(ifname).items()]
        for c in (f"to_{ifname}", f"from_{ifname}"):
            cmds += [nft.chain("flush", "bridge", table, c), nft.chain("delete", "bridge", table, c)]
    if now is None:
        cmds.append(nft.elements("delete", "bridge", table, "nics", [ifname]))
    if now is None or (now.mac, now.address) != (was.mac, was.address):
        cmds += [nft.elements("delete", "bridge", table, s, e) for s, e in _nic_elements(ifname, was).items()]
    return cmds


def _nic_in(
    table: str,
    ifname: str,
    was: Loaded | None,
    now: Loaded,
    security: Mapping[str, tuple[SecurityRule, ...]],
) -> list[dict[str, object]]:
    """What of ``now`` comes: all of it for a new NIC (``was`` None), else what changed since ``was``."""
    cmds: list[dict[str, object]] = []
    if now == was:
        return cmds
    if was is None:
        cmds.append(nft.elements("add", "bridge", table, "nics", [ifname]))
    if was is None or (now.mac, now.address) != (was.mac, was.address):
        cmds += [nft.elements("add", "bridge", table, s, e) for s, e in _nic_elements(ifname, now).items()]
    if now.security is not None and (was is None or was.security != now.security):
        for c in (f"to_{ifname}", f"from_{ifname}"):
            cmds += [nft.chain("add", "bridge", table, c), nft.chain("flush", "bridge", table, c)]
        cmds += [nft.add_rule("bridge", table, r) for r in nic_security(ifname, security[ifname])]
        if was is None or was.security is None:
            cmds += [nft.elements("add", "bridge", table, m, p) for m, p in _sg_entries(ifname).items()]
    return cmds


@functools.lru_cache(maxsize=256)
def _parse_rules(text: str) -> tuple[SecurityRule, ...]:
    """An instance's security state file; most instances of a node share a few rule lists."""
    return tuple(from_json(SecurityRule, r) for r in json.loads(text))


def _digest(data: object) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


# ---------------------------------------------------------------- the node's state


def prepare_devices(seg: NetworkSegment, prune: bool = False) -> None:
    """Create the tenant bridge with this node's addresses on it, then its VXLAN device and peers.

    A segment without a local tunnel address stays on this node's bridge.
    Without ``prune`` peers are only added, never removed: creates and
    ensures for one network may be handled out of order (two worker
    processes), and a stale peer list must not cut off a node that joined
    since.  :meth:`Router.ensure` prunes only for a segment whose
    ``peers_serial`` is newer than every one it applied before.  The device
    functions take the host-wide network lock themselves.
    """
    collision = route_collision(seg)
    if collision:
        raise RouterError(collision)
    try:
        bridge.ensure_bridge(
            seg.bridge, seg.mtu, address=seg.host_address, exclusive=True, gateway=seg.gateway
        )
    except (bridge.NetworkError, NetlinkError, OSError) as exc:
        raise RouterError(f"cannot prepare bridge {seg.bridge}: {exc}") from exc
    if seg.vni is None or seg.tunnel_local is None:
        return
    try:
        vxlan.ensure_vxlan(seg.vni, seg.tunnel_local, seg.bridge, seg.mtu)
        vxlan.set_peers(seg.vni, seg.tunnel_peers, prune=prune)
    except (bridge.NetworkError, NetlinkError, OSError) as exc:
        raise RouterError(f"cannot prepare VXLAN {seg.vni} of {seg.network}: {exc}") from exc


class Router:
    """A node's desired network state on disk, and the convergence of the kernel to it."""

    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self.root = config.state_dir / "net"

    @property
    def _segments(self) -> Path:
        return self.root / "segments"

    @property
    def _nics(self) -> Path:
        return self.root / "nics"

    @property
    def _security(self) -> Path:
        return self.root / "security"

    @property
    def _forwards(self) -> Path:
        return self.root / "forwards"

    @property
    def _groups(self) -> Path:
        return self.root / "groups"

    @property
    def _dns(self) -> Path:
        return self.root / "dns"

    def segments(self) -> list[NetworkSegment]:
        found = []
        for path in sorted(self._segments.glob("*.json")) if self._segments.is_dir() else []:
            try:
                found.append(from_json(NetworkSegment, json.loads(path.read_text())))
            except (SpecError, ValueError) as exc:
                log.warning("ignoring unreadable network state %s: %s", path, exc)
        return found

    def nics(self) -> list[Nic]:
        return [n for nics in self.instance_nics().values() for n in nics]

    def instance_nics(self) -> dict[str, list[Nic]]:
        found: dict[str, list[Nic]] = {}
        for path in sorted(self._nics.glob("*.json")) if self._nics.is_dir() else []:
            try:
                found[path.stem] = [Nic(**n) for n in json.loads(path.read_text())]
            except (TypeError, ValueError) as exc:
                log.warning("ignoring unreadable NIC state %s: %s", path, exc)
        return found

    def security(
        self, nics: Mapping[str, Sequence[Nic]] | None = None
    ) -> dict[str, tuple[SecurityRule, ...]]:
        """Resolved rules by host interface, for the instances whose security groups are known.

        ``nics``: :meth:`instance_nics`, when the caller has read them already.
        """
        by_if: dict[str, tuple[SecurityRule, ...]] = {}
        nics = self.instance_nics() if nics is None else nics
        for path in sorted(self._security.glob("*.json")) if self._security.is_dir() else []:
            try:
                rules = _parse_rules(path.read_text())
            except (SpecError, ValueError) as exc:
                log.warning("ignoring unreadable security state %s: %s", path, exc)
                continue
            for nic in nics.get(path.stem, ()):
                by_if[nic.ifname] = rules
        return by_if

    def group_members(self) -> dict[str, tuple[str, ...]]:
        """The member addresses of each security group this node was told of."""
        found: dict[str, tuple[str, ...]] = {}
        for path in sorted(self._groups.glob("*.json")) if self._groups.is_dir() else []:
            try:
                found[path.stem] = tuple(json.loads(path.read_text())["addresses"])
            except (ValueError, KeyError, TypeError) as exc:
                log.warning("ignoring unreadable group state %s: %s", path, exc)
        return found

    def _write_members(self, members: GroupMembers) -> bool:
        """Record a group's members unless a newer version was applied; whether they were."""
        path = self._groups / f"{members.group}.json"
        try:
            applied = int(json.loads(path.read_text())["version"])
        except (OSError, ValueError, KeyError, TypeError):
            applied = 0
        if members.version and members.version < applied:
            log.info("group %s: members v%d ignored, v%d applied", members.group, members.version, applied)
            return False
        _write(path, {"addresses": sorted(members.addresses), "version": max(members.version, applied)})
        return True

    def _prune_groups(self, referenced: Sequence[str]) -> None:
        """Forget the members of groups no rule on this node names any more."""
        for path in self._groups.glob("*.json") if self._groups.is_dir() else []:
            if path.stem not in referenced:
                path.unlink(missing_ok=True)

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        """The node's rule state lock (beside the host-wide device lock, which is not re-entrant)."""
        path = self.config.network_lock.with_suffix(".rules")
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def forwards(self) -> list[Forward]:
        found: list[Forward] = []
        for path in sorted(self._forwards.glob("*.json")) if self._forwards.is_dir() else []:
            try:
                found += [from_json(Forward, f) for f in json.loads(path.read_text())]
            except (SpecError, ValueError) as exc:
                log.warning("ignoring unreadable forwards %s: %s", path, exc)
        return found

    def desired(self) -> tuple[Table, Table]:
        security = self.security()
        told = self.group_members()
        return tables(
            self.config.nft_table,
            self.config.uplink,
            self.segments(),
            self.nics(),
            self.forwards(),
            security,
            {g: told.get(g, ()) for g in referenced_groups(security)},
        )

    # ------------------------------------------------------------ changes

    def ensure(self, seg: NetworkSegment) -> None:
        """Carry ``seg``: bridge with host address and gateway, VXLAN and peers, routing, DNS, rules.

        The devices are made under the rule state lock, as :meth:`release_idle`
        removes them under it: a create never finds its bridge deleted between
        making it and using it.  Writing the segment marks the network in use.
        """
        with self._lock():
            self._carry_locked([seg])
            self._converge_locked()
            self._resolvers([seg])

    @staticmethod
    def _stored(path: Path) -> dict[str, Any]:
        """The segment last applied on this node from ``path`` ({} when none or unreadable)."""
        try:
            stored = json.loads(path.read_text())
        except (FileNotFoundError, ValueError):
            return {}
        return stored if isinstance(stored, dict) else {}

    @staticmethod
    def _applied(stored: dict[str, Any]) -> tuple[int, tuple[str, ...]]:
        """The highest ``peers_serial`` applied to the network (0: none yet), and the flood list
        its tunnel holds, from its stored segment."""
        try:
            return int(stored.get("peers_serial", 0)), tuple(str(p) for p in stored.get("tunnel_peers", ()))
        except (ValueError, TypeError):
            return 0, ()

    def attach(self, spec: InstanceSpec) -> None:
        """Record the instance's NICs for port security and enforce it (before the workload starts)."""
        if not spec.networks:
            return
        with self._lock():
            self._record_nics_locked(spec)
            self._converge_locked()

    def prepare(self, spec: InstanceSpec) -> list[NetworkSegment]:
        """:meth:`ensure` each network of ``spec``, then :meth:`attach` it, with one rule load.

        What a create needs before its workload starts.  Loading the rules is
        the dearest step (the whole table set in one ``nft -f``): done once
        here after the segments and the NICs are written, not once per network
        and once more for the NICs; the rules loaded are the same.

        A network this node already carries with the same devices (its stored
        segment differs at most in ``hosts``, and its bridge exists) is not
        prepared again: the devices are the node's own, made under this lock;
        an :meth:`ensure` (``Task.ENSURE_NETWORK``) still checks and repairs
        them all.  The resolvers are left to :meth:`update_resolvers`, which
        the caller runs once the workload is up (DNS does not gate a start).
        Returns the segments to give it.
        """
        if not spec.networks:
            return []
        segments = list({nic.segment.bridge: nic.segment for nic in spec.networks}.values())
        with self._lock():
            self._carry_locked(segments, again=False)
            self._record_nics_locked(spec)
            self._converge_locked()
        return segments

    def update_resolvers(self, segments: Sequence[NetworkSegment]) -> None:
        """Bring each segment's resolver to its names (see :meth:`prepare`)."""
        with self._lock():
            self._resolvers(segments)

    def _carry_locked(self, segments: Sequence[NetworkSegment], again: bool = True) -> None:
        for seg in segments:
            path = self._segments / f"{seg.bridge}.json"
            stored_json = self._stored(path)  # read once: the serial, the flood list, the devices
            applied, held = self._applied(stored_json)
            newer = seg.peers_serial > applied
            if again or not self._carried(stored_json, seg):
                # only a newer peer list removes flood entries; an older or equal one only adds
                prepare_devices(seg, prune=newer)
                held = seg.tunnel_peers if newer else tuple(sorted({*held, *seg.tunnel_peers}))
            # The stored segment names the flood list the tunnel holds, so a later segment with the
            # same list (the serial rises with every instance that joins) finds nothing to do.
            stored = dataclasses.replace(seg, peers_serial=max(seg.peers_serial, applied), tunnel_peers=held)
            _write(path, to_json(stored))
            self._routing(stored)

    @staticmethod
    def _carried(stored: dict[str, Any], seg: NetworkSegment) -> bool:
        """Whether the stored segment is ``seg`` but for its hosts and peers' serial, and its bridge
        (and tunnel) exist: the devices are as ``seg`` wants them (the stored flood list is the tunnel's)."""
        if not stored:
            return False
        wanted = to_json(seg)
        ignored = ("hosts", "peers_serial")
        same = {k: v for k, v in stored.items() if k not in ignored} == {
            k: v for k, v in wanted.items() if k not in ignored
        }
        devices = [seg.bridge]
        if seg.vni is not None and seg.tunnel_local is not None:
            devices.append(vxlan.device_name(seg.vni))
        try:  # this thread's network namespace (sysfs shows the one it was mounted in)
            for d in devices:
                socket.if_nametoindex(d)
        except OSError:
            return False
        return same

    def _resolvers(self, segments: Sequence[NetworkSegment]) -> None:
        for seg in segments:
            try:
                self._resolver(seg)
            except (RouterError, OSError, subprocess.SubprocessError) as exc:
                # DNS is a service on the network, not a condition of it: instances still start
                log.warning("the resolver of %s is not running: %s", seg.network, exc)

    def _record_nics_locked(self, spec: InstanceSpec) -> None:
        _write(self._nics / f"{spec.instance_id}.json", [dataclasses.asdict(n) for n in nics_of(spec)])
        if spec.security is not None:
            self._write_security(spec.instance_id, spec.security, spec.security_version)
        for members in spec.security_members:
            self._write_members(members)

    def set_security(self, instance_id: str, rules: Sequence[SecurityRule], version: int = 0) -> None:
        """Make ``rules`` the instance's security group rules (enforced on its NICs at once)."""
        self.set_security_many({instance_id: rules}, {instance_id: version})

    def set_security_many(
        self,
        rules: Mapping[str, Sequence[SecurityRule]],
        versions: Mapping[str, int] | None = None,
        groups: Sequence[GroupMembers] = (),
    ) -> list[str]:
        """Make each instance's rules its security group rules and each group's members its members,
        all in one converge.

        A list whose version is older than the one applied to its instance
        (or group) is ignored (version 0: always applied).  Returns the
        instances and groups (``group:<id>``) ignored.
        """
        versions = versions or {}
        stale = []
        with self._lock():
            for instance_id, own in rules.items():
                if not self._write_security(instance_id, own, versions.get(instance_id, 0)):
                    stale.append(instance_id)
            for members in groups:
                if not self._write_members(members):
                    stale.append(f"group:{members.group}")
            if len(stale) < len(rules) + len(groups):
                self._converge_locked()
        return stale

    def _write_security(self, instance_id: str, rules: Sequence[SecurityRule], version: int) -> bool:
        """Record the instance's rules unless a newer version was applied; whether they were."""
        serial = self._security / f"{instance_id}.version"
        try:
            applied = int(serial.read_text())
        except (FileNotFoundError, ValueError):
            applied = 0
        if version and version < applied:
            log.info("ignoring security rules version %d of %s: %d applied", version, instance_id, applied)
            return False
        _write(self._security / f"{instance_id}.json", [to_json(r) for r in rules])
        if version > applied:
            _write_text(serial, str(version))
        return True

    def set_forwards(self, instance_id: str, forwards: Sequence[Forward]) -> None:
        """Make ``forwards`` the instance's complete list of published ports (empty: none)."""
        with self._lock():
            path = self._forwards / f"{instance_id}.json"
            if forwards:
                _write(path, [to_json(f) for f in forwards])
            else:
                path.unlink(missing_ok=True)
            for address in sorted({f.external_address for f in forwards}):
                ifname = _interface_of(address)
                if ifname is None:
                    raise RouterError(f"external address {address} is not configured on this node")
                _sysctl(f"net/ipv4/conf/{ifname}/forwarding", "1")  # packets to publish arrive there
            self._converge_locked()

    def detach(self, instance_id: str) -> None:
        """Forget the instance's NICs and published ports, and remove their rules."""
        paths = [self._nics / f"{instance_id}.json", self._forwards / f"{instance_id}.json"]
        paths += [self._security / f"{instance_id}.json", self._security / f"{instance_id}.version"]
        if not any(p.exists() for p in paths):
            return
        with self._lock():
            for path in paths:
                path.unlink(missing_ok=True)
            self._prune_groups(referenced_groups(self.security()))
            self._converge_locked()

    def release(self, bridge_name: str) -> None:
        """Stop carrying a network: resolver, rules, VXLAN device, bridge (each: done if already gone)."""
        with self._lock():
            self._release_locked(bridge_name)

    def _release_locked(self, bridge_name: str) -> None:
        path = self._segments / f"{bridge_name}.json"
        seg = from_json(NetworkSegment, json.loads(path.read_text())) if path.exists() else None
        self._stop_resolver(bridge_name)
        path.unlink(missing_ok=True)
        self._converge_locked()
        try:
            if seg is not None and seg.vni is not None:
                vxlan.delete_vxlan(seg.vni)
            bridge.delete_bridge(bridge_name)
        except (bridge.NetworkError, NetlinkError, OSError) as exc:
            raise RouterError(f"cannot remove the devices of {bridge_name}: {exc}") from exc

    def release_unused(self, bridge_name: str) -> bool:
        """Release the network of ``bridge_name`` now if no recorded NIC and no other port is on it.

        For a network its tenant deleted (:class:`compute.spec.ReleaseNetwork`):
        no grace, but the same checks as :meth:`idle`, under the same lock.
        A bridge this node does not have is released already (True).
        """
        with self._lock():
            if bridge_name in {n.bridge for n in self.nics()}:
                return False
            path = self._segments / f"{bridge_name}.json"
            seg = from_json(NetworkSegment, json.loads(path.read_text())) if path.exists() else None
            tunnel = vxlan.device_name(seg.vni) if seg is not None and seg.vni is not None else None
            if any(port != tunnel for port in bridge.bridge_ports(bridge_name)):
                return False
            self._release_locked(bridge_name)
            return True

    def idle(self, grace: float, now: float | None = None) -> list[NetworkSegment]:
        """The networks this node carries that no instance has used for ``grace`` seconds.

        In use: a recorded NIC of an instance (running or stopped) is on its
        bridge, or a port other than the network's VXLAN device is (a workload
        the node has no record of: never pulled from under it), or the
        network was ensured less than ``grace`` seconds ago (a create between
        making the bridge and recording its NICs).
        """
        now = time.time() if now is None else now
        used = {n.bridge for n in self.nics()}
        found = []
        for seg in self.segments():
            if seg.bridge in used:
                continue
            try:
                age = now - (self._segments / f"{seg.bridge}.json").stat().st_mtime
            except FileNotFoundError:
                continue
            if age < grace:
                continue
            tunnel = vxlan.device_name(seg.vni) if seg.vni is not None else None
            if any(port != tunnel for port in bridge.bridge_ports(seg.bridge)):
                continue
            found.append(seg)
        return found

    def release_idle(self, grace: float) -> list[str]:
        """Release every network :meth:`idle` names (checked again under the lock); their names."""
        released = []
        with self._lock():
            for seg in self.idle(grace):
                self._release_locked(seg.bridge)
                released.append(seg.network)
        return released

    def converge(self) -> None:
        """Load both tables whole from the state files (repairs rules changed outside Skyport)."""
        with self._lock():
            self._converge_locked(whole=True)

    @property
    def _loaded_path(self) -> Path:
        return self.root / "loaded.json"

    def _loaded(self) -> tuple[str, dict[str, Loaded], dict[str, list[str]]] | None:
        """The base tables' digest, the NICs and the group members the kernel was last given."""
        try:
            data = json.loads(self._loaded_path.read_text())
            nics = {k: Loaded(*v) for k, v in data["nics"].items()}
            return str(data["base"]), nics, {str(k): list(v) for k, v in data["groups"].items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None

    def _converge_locked(self, whole: bool = False) -> None:
        """Bring the kernel's tables to the state files: a per-NIC delta when only NICs changed.

        ``whole`` loads both tables whole whatever the record says (drift repair).
        """
        name, uplink = self.config.nft_table, self.config.uplink
        segments, forwards = self.segments(), self.forwards()
        by_instance = self.instance_nics()
        nics, security = [n for ns in by_instance.values() for n in ns], self.security(by_instance)
        told = self.group_members()
        # the groups the NICs' rules name have a set each; sets, members and NICs change by delta
        groups = {g: sorted(told.get(g, ())) for g in referenced_groups(security)}
        base_tables = tables(name, uplink, segments, (), forwards, {})
        base = _digest([t.commands() for t in base_tables])
        loaded = None if whole else self._loaded()
        try:
            if loaded is not None and loaded[0] == base:
                delta = groups_delta(name, loaded[2], groups, nic_delta(name, loaded[1], nics, security))
                if not delta:
                    return
                # a crash between the load and the record: no record, the next change loads whole
                self._loaded_path.unlink(missing_ok=True)
                try:
                    nft.run(delta)
                except nft.NftError as exc:
                    log.warning("a per-NIC rule change was refused (%s); loading the tables whole", exc)
                    nft.apply(tables(name, uplink, segments, nics, forwards, security, groups))
            else:
                self._loaded_path.unlink(missing_ok=True)
                nft.apply(tables(name, uplink, segments, nics, forwards, security, groups))
        except nft.NftError as exc:
            raise RouterError(f"cannot load the nftables rules: {exc}") from exc
        want = {k: [v.mac, v.address, v.security] for k, v in loaded_nics(nics, security).items()}
        _write(self._loaded_path, {"base": base, "nics": want, "groups": groups})
        # Listing the tables back costs as much as loading them: the next heartbeat takes the
        # fingerprint (drift between this load and that heartbeat goes unnoticed once).  Each
        # load has its own token, so a heartbeat that listed the tables while another load
        # went in does not store what it listed (see drift).
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "fingerprint").write_text(f"{PENDING} {secrets.token_hex(8)}")

    def _fingerprint(self) -> str:
        name = self.config.nft_table
        return nft.fingerprint("inet", name) + nft.fingerprint("bridge", name)

    def drift(self) -> str:
        """Why the kernel's rules differ from what this node last loaded ("" when they do not)."""
        try:
            stored = (self.root / "fingerprint").read_text()
        except FileNotFoundError:
            return ""
        try:
            now = self._fingerprint()
        except nft.NftError as exc:
            return f"cannot read the rules: {exc}"
        if stored.startswith(PENDING):
            # Listed outside the lock: store it only if no load went in since the token was read,
            # else it may be the tables before that load, and the next beat would call the rules
            # "changed outside Skyport" and load them whole for nothing.
            with self._lock():
                if (self.root / "fingerprint").read_text() == stored:
                    (self.root / "fingerprint").write_text(now)
            return ""
        if now == stored:
            return ""
        return f"nftables tables {self.config.nft_table} were changed outside Skyport"

    def teardown(self) -> None:
        """Remove everything this router made: resolvers, rules, devices (tests and node decommission)."""
        for seg in self.segments():
            self.release(seg.bridge)
        nft.delete(self.desired())
        self._loaded_path.unlink(missing_ok=True)

    # ------------------------------------------------------------ routing and DNS

    def _routing(self, seg: NetworkSegment) -> None:
        on = seg.gateway is not None
        _sysctl(f"net/ipv4/conf/{seg.bridge}/forwarding", "1" if on else "0")
        if on and seg.egress and self.config.uplink:
            try:
                _sysctl(f"net/ipv4/conf/{self.config.uplink}/forwarding", "1")
            except OSError as exc:
                raise RouterError(f"uplink {self.config.uplink} is not usable: {exc}") from exc

    def _resolver(self, seg: NetworkSegment) -> None:
        """Run the network's dnsmasq on the gateway address (restarted when its names change).

        The names travel as ``--host-record`` arguments, not a hosts file:
        dnsmasq reads files after dropping to ``nobody``, and the node's
        state directory need not be readable by it.  A restart takes a few
        milliseconds; clients retry.  Without a gateway there is no resolver.
        """
        if seg.gateway is None:
            self._stop_resolver(seg.bridge)
            return
        self._dns.mkdir(parents=True, exist_ok=True)
        pidfile = self._dns / f"{seg.bridge}.pid"
        args = [
            DNSMASQ,
            "--conf-file=/dev/null",
            f"--pid-file={pidfile}",
            f"--listen-address={_ip(seg.gateway)}",
            "--bind-dynamic",
            "--except-interface=lo",
            "--no-resolv",
            "--no-hosts",
            "--domain-needed",
            "--user=nobody",
            "--group=nogroup",
            f"--log-facility={self._dns / (seg.bridge + '.log')}",
            *(f"--host-record={name},{address}" for name, address in seg.hosts),
            *(f"--server={s}" for s in self.config.dns_servers),
        ]
        pid = self._resolver_pid(seg.bridge)
        if pid is not None:
            if _cmdline(pid) == args:
                return
            self._stop_resolver(seg.bridge)
        r = subprocess.run(args, capture_output=True, text=True, timeout=30)
        if r.returncode != 0:
            raise RouterError(f"cannot start the resolver of {seg.network}: {r.stderr.strip()}")

    def _resolver_pid(self, bridge_name: str) -> int | None:
        pidfile = self._dns / f"{bridge_name}.pid"
        try:
            pid = int(pidfile.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        return pid if f"--pid-file={pidfile}" in _cmdline(pid) else None

    def _stop_resolver(self, bridge_name: str) -> None:
        pid = self._resolver_pid(bridge_name)
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            for _ in range(100):  # it must free the address before a successor binds it
                if not _cmdline(pid):
                    break
                time.sleep(0.01)
        (self._dns / f"{bridge_name}.pid").unlink(missing_ok=True)

    def stop_resolvers(self) -> None:
        """Stop every resolver this node started (its state says which)."""
        for seg in self.segments():
            self._stop_resolver(seg.bridge)

    def resolver_pids(self) -> Iterator[int]:
        for seg in self.segments():
            pid = self._resolver_pid(seg.bridge)
            if pid is not None:
                yield pid


def route_collision(seg: NetworkSegment) -> str:
    """Why the segment's subnet cannot go on this host ("" when it can).

    A route to an overlapping subnet through another interface (a stale
    bridge of another portal, a LAN, a VPN) would shadow or be shadowed by
    the network's own route, and its instances would be unreachable.
    The default route overlaps everything and is not a collision.
    """
    subnet = seg.subnet
    if subnet is None:
        return ""
    with IPRoute() as ipr:
        routes = list(ipr.get_routes(family=2, table=254))
        # links after routes: a bridge another process creates meanwhile is named, not "unknown"
        names = {int(link["index"]): str(link.get_attr("IFLA_IFNAME")) for link in ipr.get_links()}
        for route in routes:
            length = int(route["dst_len"])
            dev = names.get(int(route.get_attr("RTA_OIF") or 0))
            if length == 0 or dev is None:  # the default route; a route whose device is gone already
                continue
            dst = ipaddress.IPv4Network(f"{route.get_attr('RTA_DST')}/{length}")
            if dev != seg.bridge and dst.overlaps(subnet):
                return (
                    f"network {seg.network} ({subnet}) collides with the route to {dst} via {dev} "
                    "on this host; remove that route or give the network another subnet"
                )
    return ""


def _interface_of(address: str) -> str | None:
    """The interface of this namespace that has ``address``, if any."""
    with IPRoute() as ipr:
        for a in ipr.get_addr(family=2):
            if a.get_attr("IFA_ADDRESS") == address or a.get_attr("IFA_LOCAL") == address:
                links = ipr.get_links(a["index"])
                return str(links[0].get_attr("IFLA_IFNAME")) if links else None
    return None


def _cmdline(pid: int) -> list[str]:
    """A process's arguments ([] when it is gone or a zombie)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return []
    return raw.decode(errors="replace").split("\0")[:-1] if raw else []


def _sysctl(name: str, value: str) -> None:
    """Write a per-interface sysctl of this network namespace, only when it differs."""
    path = Path("/proc/sys") / name
    if path.read_text().strip() != value:
        path.write_text(value)


def _write(path: Path, data: object) -> None:
    _write_text(path, json.dumps(data, indent=1))


def _write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
