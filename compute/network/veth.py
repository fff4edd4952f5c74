"""The veths of a container's network namespace.

crun makes the namespace (inside the container's user namespace, so the
container can mount its own sysfs); between ``crun create`` and the start the
driver wires it here.  Each NIC is one veth pair made by one netlink request
from the host side: the host end enslaved to the network's bridge and up, the
peer pushed into the container's namespace as ``eth<i>`` with its MAC and
MTU.  A short-lived thread that joined the namespace then sets the address,
loopback, the namespace's sysctls and, only if the attachment has a gateway,
a default route (only the first such NIC: eth0, eth1, ... in the spec's
order, one default route).  When the namespace goes with its container, the
kernel deletes the veth pairs: nothing to clean up on the host.

Why from the host side: a pair made inside the namespace needs its host end
looked up, moved under the bridge and brought up afterwards, three more
requests and two link dumps (``bench/container_start.py``: 11.7 ms for the
wiring before, see docs/container-driver.md).
"""

from __future__ import annotations

import ipaddress
import os
import socket
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from compute import nsenv
from compute.network.bridge import NetworkError, ensure_bridge
from compute.spec import NetworkAttachment

HOST_PREFIX = "skc"


def host_ifname(short_id: str, index: int) -> str:
    """Host-side veth name: ``skc`` + 8 hex of the instance id + NIC index."""
    return f"{HOST_PREFIX}{short_id}{index}"[:15]


def wire_netns(netns: str, short_id: str, nics: Sequence[NetworkAttachment]) -> list[str]:
    """Wire the existing network namespace ``netns`` (e.g. ``/proc/<pid>/ns/net``); return host veths.

    On failure no veth is left on the host.
    """
    hosts = [host_ifname(short_id, i) for i in range(len(nics))]
    bridges = [bridge_index(nic.bridge, nic.mtu) for nic in nics]
    fd = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
    try:
        with IPRoute() as ipr:
            for i, (nic, host, master) in enumerate(zip(nics, hosts, bridges, strict=True)):
                peer = {"ifname": f"eth{i}", "net_ns_fd": fd, "address": nic.mac, "mtu": nic.mtu}
                ipr.link("add", ifname=host, kind="veth", mtu=nic.mtu, master=master, state="up", peer=peer)
        _in_thread(f"netns-{short_id}", lambda: _configure_inside(fd, nics))
    except BaseException as exc:
        delete_links(hosts)
        if isinstance(exc, NetlinkError | OSError):
            raise NetworkError(f"cannot wire the network namespace: {exc}") from exc
        raise
    finally:
        os.close(fd)
    return hosts


def _in_thread(name: str, body: Callable[[], None]) -> None:
    """Run ``body`` in a new thread (one that may enter another namespace) and re-raise its error."""
    error: list[BaseException] = []

    def run() -> None:
        try:
            body()
        except BaseException as exc:
            error.append(exc)

    t = threading.Thread(target=run, name=name)
    t.start()
    t.join()
    if error:
        raise error[0]


def _configure_inside(netns_fd: int, nics: Sequence[NetworkAttachment]) -> None:
    """In this (throwaway) thread: join the namespace, then its sysctls, loopback, addresses, route."""
    nsenv.setns(netns_fd, nsenv.CLONE_NEWNET)
    _container_sysctls()
    with IPRoute() as ipr:
        ipr.link("set", index=socket.if_nametoindex("lo"), state="up")
        routed = False  # one default route: through the first NIC that has a gateway
        for i, nic in enumerate(nics):
            idx = socket.if_nametoindex(f"eth{i}")  # a socket of this thread's namespace
            iface = ipaddress.ip_interface(nic.address)
            ipr.addr("add", index=idx, address=str(iface.ip), prefixlen=iface.network.prefixlen)
            ipr.link("set", index=idx, state="up")
            if nic.gateway and not routed:
                ipr.route("add", dst="default", gateway=nic.gateway, oif=idx)
                routed = True


# Per-netns sysctls of a container's namespace (this thread is inside it;
# /proc/sys/net is the calling thread's netns).  As Docker does: every port is
# unprivileged and ICMP echo sockets are allowed, so a non-root user inside can
# bind :80 or ping without NET_BIND_SERVICE or NET_RAW.
_NETNS_SYSCTLS = (
    ("net/ipv4/ip_unprivileged_port_start", "0"),
    ("net/ipv4/ping_group_range", "0 2147483647"),
)


def _container_sysctls() -> None:
    for key, value in _NETNS_SYSCTLS:
        with open(f"/proc/sys/{key}", "w") as fh:
            fh.write(value)


def bridge_index(name: str, mtu: int) -> int:
    """The index of bridge ``name`` in this thread's namespace, made first when missing.

    ``if_nametoindex`` (an ioctl on a socket of this thread's namespace) when it
    exists, the normal case; ``ensure_bridge`` takes the host-wide lock only to make it.
    """
    try:
        return socket.if_nametoindex(name)
    except OSError:
        ensure_bridge(name, mtu=mtu)
        return socket.if_nametoindex(name)


def release_netns(netns_path: Path) -> None:
    """Drop the bind mount (the namespace stays while a container uses it)."""
    if nsenv.is_mountpoint(netns_path):
        nsenv.umount(netns_path)
    netns_path.unlink(missing_ok=True)


def delete_links(names: Sequence[str]) -> None:
    """Delete host-side veths that still exist (normally gone with their netns)."""
    found = []
    for name in names:
        try:
            found.append(socket.if_nametoindex(name))
        except OSError:
            continue  # gone already
    if not found:
        return
    with IPRoute() as ipr:
        for index in found:
            try:
                ipr.link("del", index=index)
            except NetlinkError as exc:
                if exc.code not in (2, 19):
                    raise
