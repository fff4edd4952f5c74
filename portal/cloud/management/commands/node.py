"""Operators' node commands: register, dedicate to a tenant, share, enable/disable, list."""

from __future__ import annotations

import re
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from portal.audit.log import record
from portal.cloud import services
from portal.cloud.models import ComputeNode
from portal.errors import Conflict
from portal.images.nodekeys import node_key
from portal.tenancy.models import Tenant


class Command(BaseCommand):
    help = "Manage compute nodes: register, dedicate, share, disable, enable, list."

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
        sub.add_parser("list", help="list nodes")
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

    def handle(self, *args: Any, **options: Any) -> None:
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
        try:
            if action == "dedicate":
                tenant = Tenant.objects.filter(slug=options["tenant"]).first()
                if tenant is None:
                    raise CommandError(f"no tenant {options['tenant']!r}")
                services.set_node_tenancy(node, tenant)
                self._audit(node, "dedicate", f"dedicated to {tenant.slug}")
                self.stdout.write(f"node {name} is dedicated to {tenant.slug}")
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
