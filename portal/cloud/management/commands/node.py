"""Operators' node commands: register, dedicate, share, enable/disable, evacuate/drain, list, addresses."""

from __future__ import annotations

import ipaddress
import re
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from portal.audit.log import record
from portal.cloud import evacuation, services
from portal.cloud.models import ComputeNode, ExternalAddress
from portal.errors import Conflict
from portal.images.nodekeys import node_key
from portal.tenancy.models import Tenant


class Command(BaseCommand):
    help = "Manage compute nodes: register, dedicate, share, disable, enable, evacuate, drain, list."

    def add_arguments(self, parser: CommandParser) -> None:
        sub = parser.add_subparsers(dest="action", required=True)
        reg = sub.add_parser("register", help="register a node (its worker consumes queue node.<name>)")
        reg.add_argument("name")
        for field in ("vcpus", "ram_mb", "disk_gb"):
            reg.add_argument(f"--{field.replace('_', '-')}", dest=field, type=int, default=0)
        ded = sub.add_parser(
            "dedicate", help="dedicate a node to one tenant (it may then run its containers)"
        )
        ded.add_argument("name")
        ded.add_argument("tenant")
        share = sub.add_parser("share", help="make a node shared (VMs of any tenant, no containers)")
        share.add_argument("name")
        for verb in ("disable", "enable"):
            sub.add_parser(verb, help=f"{verb} scheduling onto a node").add_argument("name")
        sub.add_parser(
            "evacuate", help="rebuild the instances of a down node on other nodes (root disks are lost)"
        ).add_argument("name")
        sub.add_parser(
            "drain", help="disable a live node, move its containers and migrate its VMs (cold) to other nodes"
        ).add_argument("name")
        sub.add_parser("list", help="list nodes")
        ext = sub.add_parser(
            "external-address",
            help="add (or with --remove drop) an address on the node's outside for published ports",
        )
        ext.add_argument("name")
        ext.add_argument("address")
        ext.add_argument("--ports", default="20000-29999", help="the published port range, FIRST-LAST")
        ext.add_argument("--remove", action="store_true")
        sub.add_parser(
            "key", help="print the key a node sends to fetch image blobs (its SKYPORT_NODE_KEY)"
        ).add_argument("name")

    def _node(self, name: str) -> ComputeNode:
        node = ComputeNode.objects.select_related("owner").filter(name=name).first()
        if node is None:
            raise CommandError(f"no node named {name!r}; see 'manage.py node list'")
        return node

    def _audit(self, node: ComputeNode, action: str, message: str) -> None:
        record(f"node.{action}", node, actor_name="manage.py", message=message)

    def _external(self, node: ComputeNode, options: dict[str, Any]) -> None:
        try:
            address = str(ipaddress.IPv4Address(options["address"]))
        except ValueError:
            raise CommandError(f"{options['address']!r} is not an IPv4 address") from None
        if options["remove"]:
            row = ExternalAddress.objects.filter(node=node, address=address).first()
            if row is None:
                raise CommandError(f"node {node.name} has no external address {address}")
            if row.published_ports.exists():
                raise CommandError(f"{address} still has published ports; unpublish them first")
            row.delete()
            self._audit(node, "external_address", f"removed {address}")
            self.stdout.write(f"removed {address} from node {node.name}")
            return
        match = re.fullmatch(r"(\d{1,5})-(\d{1,5})", options["ports"])
        first, last = (int(match[1]), int(match[2])) if match else (0, 0)
        if not 1 <= first <= last <= 65535:
            raise CommandError(f"--ports {options['ports']!r}: expected FIRST-LAST within 1-65535")
        ExternalAddress.objects.update_or_create(
            node=node, address=address, defaults={"first_port": first, "last_port": last}
        )
        self._audit(node, "external_address", f"publishes on {address} ports {first}-{last}")
        self.stdout.write(f"node {node.name} publishes ports on {address}:{first}-{last}")

    def handle(self, *args: Any, **options: Any) -> None:  # noqa: PLR0912 -- one branch per sub-command
        action = options["action"]
        if action == "list":
            for n in ComputeNode.objects.select_related("owner"):
                owner = f" -> {n.owner.slug}" if n.owner else ""
                self.stdout.write(
                    f"{n.name:20} {n.status:8} {n.tenancy}{owner}  {n.vcpus} vCPU {n.ram_mb} MiB "
                    f"queue={n.queue} heartbeat={n.last_heartbeat or '-'}"
                )
            return
        name = options["name"]
        if action in ("key", "register") and not re.fullmatch(r"[A-Za-z0-9_-]{1,63}", name):
            raise CommandError("node names use letters, digits, '-' and '_' (at most 63)")
        if action == "key":
            self.stdout.write(node_key(name))
            return
        if action == "register":
            node, created = ComputeNode.objects.get_or_create(name=name, defaults={"queue": f"node.{name}"})
            for field in ("vcpus", "ram_mb", "disk_gb"):
                if options[field]:
                    setattr(node, field, options[field])
            node.save()
            self._audit(node, "register", "registered by an operator")
            self.stdout.write(
                f"{'registered' if created else 'updated'} node {name} (queue {node.queue}); it is "
                "marked up by its first heartbeat"
            )
            return
        node = self._node(name)
        if action == "external-address":
            self._external(node, options)
            return
        try:
            if action == "dedicate":
                tenant = Tenant.objects.filter(slug=options["tenant"]).first()
                if tenant is None:
                    raise CommandError(f"no tenant {options['tenant']!r}")
                services.set_node_tenancy(node, tenant)
                self._audit(node, "dedicate", f"dedicated to {tenant.slug}")
                self.stdout.write(f"node {name} is dedicated to {tenant.slug}")
            elif action in ("evacuate", "drain"):
                report = (evacuation.evacuate if action == "evacuate" else evacuation.drain)(node, None)
                for m in report.moves:
                    self.stdout.write(
                        f"{m.tenant}/{m.name} ({m.kind}): {m.result} {m.target or ''} {m.reason}"
                    )
                for v in report.volumes:
                    self.stdout.write(f"volume {v.tenant}/{v.name}: {v.status}: {v.reason}")
                self.stdout.write(f"{report.summary()}. {report.data_loss}")
            elif action == "share":
                services.set_node_tenancy(node, None)
                self._audit(node, "share", "made shared")
                self.stdout.write(f"node {name} is shared")
            else:
                services.set_node_enabled(node, enabled=action == "enable")
                self._audit(node, action, node.status_reason)
                self.stdout.write(f"node {name} is {node.status}")
        except Conflict as exc:
            raise CommandError(str(exc)) from exc
