"""Operators' network commands: switch egress (source NAT onto the nodes' uplinks) per network or tenant.

Egress needs both switches on: the network's and its tenant's.  The nodes
that carry the affected networks get their segments again at once, so the
change is in force within a message's delivery; it is audited.
"""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from portal.audit.log import record
from portal.cloud import networks
from portal.cloud.models import Network
from portal.tenancy.models import Tenant


class Command(BaseCommand):
    help = "Manage tenant networks: switch egress on or off for one network or a whole tenant; list."

    def add_arguments(self, parser: CommandParser) -> None:
        sub = parser.add_subparsers(dest="action", required=True)
        egress = sub.add_parser("egress", help="switch egress of a tenant (or one of its networks) on or off")
        egress.add_argument("state", choices=["on", "off"])
        egress.add_argument("tenant", help="tenant slug")
        egress.add_argument("--network", help="only this network of the tenant (by name)")
        sub.add_parser("list", help="list networks with their egress switches")

    def handle(self, *args: Any, **options: Any) -> None:
        if options["action"] == "list":
            for n in Network.objects.select_related("tenant"):
                on = n.egress and n.tenant.network_egress
                self.stdout.write(
                    f"{n.tenant.slug}/{n.name:16} {n.cidr:18} gateway {n.host_address:15} "
                    f"egress {'on' if on else 'off'} (network {n.egress}, tenant {n.tenant.network_egress})"
                )
            return
        tenant = Tenant.objects.filter(slug=options["tenant"]).first()
        if tenant is None:
            raise CommandError(f"no tenant {options['tenant']!r}")
        on = options["state"] == "on"
        network = None
        if options["network"]:
            network = Network.objects.filter(tenant=tenant, name=options["network"]).first()
            if network is None:
                raise CommandError(f"tenant {tenant.slug} has no network {options['network']!r}")
        queues = networks.set_egress(network, None if network else tenant, on)
        target: Network | Tenant = network or tenant
        what = f"network {tenant.slug}/{network.name}" if network else f"tenant {tenant.slug}"
        record(
            "network.egress", target, actor_name="manage.py", message=f"egress {options['state']} for {what}"
        )
        self.stdout.write(f"egress {options['state']} for {what}; told {len(queues)} node(s)")
