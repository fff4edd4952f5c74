"""Flavors, compute nodes and instances."""

from __future__ import annotations

import uuid

from django.conf import settings
from django.db import models
from django.db.models import Q

from compute.spec import Capability, PowerState
from portal.cloud.choices import (
    POWER_STATE_CHOICES,
    Kind,
    NodeStatus,
    NodeTenancy,
    RequestedKind,
    TaskState,
    VmState,
)
from portal.tenancy.models import Tenant
from portal.tenancy.querysets import TenantScopedQuerySet

_CAPABILITIES = frozenset(Capability)


class FlavorQuerySet(TenantScopedQuerySet["Flavor"]):
    def restrict(self, actor):  # type: ignore[no-untyped-def]
        """Public flavors plus the private flavors of the actor's tenants."""
        if actor.is_operator:
            return self
        return self.filter(Q(is_public=True) | Q(tenant_id__in=actor.tenant_ids))


class Flavor(models.Model):
    """A size of instance: vCPUs, memory and disk.

    Public flavors have no tenant; private ones belong to exactly one tenant.
    """

    name = models.CharField(max_length=64)
    vcpus = models.PositiveSmallIntegerField()
    ram_mb = models.PositiveIntegerField()
    disk_gb = models.PositiveIntegerField()
    is_public = models.BooleanField(default=True)
    tenant = models.ForeignKey(
        Tenant, null=True, blank=True, on_delete=models.CASCADE, related_name="flavors"
    )

    objects = FlavorQuerySet.as_manager()

    class Meta:
        ordering = ["vcpus", "ram_mb", "name"]
        constraints = [
            models.CheckConstraint(
                condition=Q(is_public=True, tenant__isnull=True) | Q(is_public=False, tenant__isnull=False),
                name="flavor_public_xor_tenant",
            ),
            models.CheckConstraint(condition=Q(vcpus__gte=1) & Q(ram_mb__gte=16), name="flavor_min_size"),
            models.UniqueConstraint(
                fields=["name"], condition=Q(tenant__isnull=True), name="flavor_unique_public_name"
            ),
            models.UniqueConstraint(fields=["tenant", "name"], name="flavor_unique_tenant_name"),
        ]

    def __str__(self) -> str:
        return f"{self.name} ({self.vcpus} vCPU, {self.ram_mb} MiB, {self.disk_gb} GiB)"


class ComputeNode(models.Model):
    """A host running a compute worker that consumes queue ``node.<name>``.

    A dedicated node belongs to one tenant and may run its containers; a
    shared node runs VMs of any tenant.  Capacity times the allocation ratio
    is what the scheduler may place.
    """

    name = models.CharField(max_length=63, unique=True)
    queue = models.CharField(max_length=80, unique=True)
    tenancy = models.CharField(max_length=16, choices=NodeTenancy.choices, default=NodeTenancy.SHARED)
    owner = models.ForeignKey(
        Tenant, null=True, blank=True, on_delete=models.PROTECT, related_name="dedicated_nodes"
    )
    vcpus = models.PositiveIntegerField(default=0)
    ram_mb = models.PositiveIntegerField(default=0)
    disk_gb = models.PositiveIntegerField(default=0)
    cpu_allocation_ratio = models.FloatField(default=4.0)
    ram_allocation_ratio = models.FloatField(default=1.0)
    disk_allocation_ratio = models.FloatField(default=1.0)
    status = models.CharField(max_length=16, choices=NodeStatus.choices, default=NodeStatus.DOWN)
    status_reason = models.CharField(max_length=255, blank=True)
    last_heartbeat = models.DateTimeField(null=True, blank=True)
    drivers = models.JSONField(default=dict, blank=True)
    cached = models.JSONField(
        default=list,
        blank=True,
        help_text="Digests the node holds (image cache, layers)",
    )
    orphans = models.JSONField(
        default=list,
        blank=True,
        help_text="Workloads on the node that the database does not know (reconcile)",
    )
    network_drift = models.CharField(
        max_length=255,
        blank=True,
        help_text="Why the node's network rules differ from what it loaded (last heartbeat)",
    )
    tunnel_address = models.GenericIPAddressField(
        protocol="IPv4",
        null=True,
        blank=True,
        help_text="Underlay address for VXLAN tunnels, from the heartbeat; empty: the node does not tunnel",
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name"]
        constraints = [
            models.CheckConstraint(
                condition=Q(tenancy=NodeTenancy.SHARED, owner__isnull=True)
                | Q(tenancy=NodeTenancy.DEDICATED, owner__isnull=False),
                name="node_dedicated_has_owner",
            ),
            models.CheckConstraint(
                condition=Q(cpu_allocation_ratio__gt=0)
                & Q(ram_allocation_ratio__gt=0)
                & Q(disk_allocation_ratio__gt=0),
                name="node_positive_ratios",
            ),
        ]

    def __str__(self) -> str:
        return self.name

    def capabilities(self, kind: str) -> frozenset[Capability]:
        """What the node's driver of ``kind`` reported it can do in its last heartbeat."""
        reported = (self.drivers or {}).get(kind, {}).get("capabilities", ())
        return frozenset(Capability(c) for c in reported if c in _CAPABILITIES)


#: VXLAN adds 50 bytes to every frame; tenant networks leave room for it in a 1500-byte underlay.
TENANT_MTU = 1450


class Network(models.Model):
    """A tenant's L2 network: one Linux bridge per node, joined across nodes by VXLAN.

    ``vni`` is the network's VXLAN segment id.  Each node that carries the
    network has its own address on it (:class:`HostPort`).  ``host_address``
    (the subnet's first address) is the network's gateway and resolver, the
    same on every node that carries it (an anycast gateway).  ``egress``
    (operators) lets its traffic out through the nodes' uplinks with source
    NAT, when the tenant's ``network_egress`` allows it too.
    """

    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="networks")
    name = models.CharField(max_length=63)
    cidr = models.CharField(max_length=43, unique=True)
    bridge = models.CharField(max_length=15, unique=True)
    vni = models.PositiveIntegerField(unique=True, help_text="VXLAN network identifier (1..16777215)")
    host_address = models.GenericIPAddressField(
        protocol="IPv4", help_text="The gateway and DNS resolver (the subnet's first address) on every node"
    )
    mtu = models.PositiveIntegerField(default=TENANT_MTU)
    egress = models.BooleanField(
        default=True,
        db_default=True,
        help_text="Operators: traffic may leave through the nodes' uplinks (source NAT)",
    )
    peers_serial = models.PositiveBigIntegerField(
        default=0,
        db_default=0,
        help_text="Raised for each VXLAN peer list sent to the carrying nodes (they prune on a newer one)",
    )
    created_at = models.DateTimeField(auto_now_add=True)

    objects = TenantScopedQuerySet.as_manager()

    class Meta:
        ordering = ["tenant__slug", "name"]
        constraints = [
            models.UniqueConstraint(fields=["tenant", "name"], name="network_unique_tenant_name"),
            models.CheckConstraint(condition=Q(vni__gte=1) & Q(vni__lte=2**24 - 1), name="network_vni_range"),
        ]

    def __str__(self) -> str:
        return f"{self.tenant.slug}/{self.name} {self.cidr}"


class HostPort(models.Model):
    """A node's own address on a network (IPAM: the same pool as :class:`Port`).

    Put on the node's bridge of the network so the host reaches its
    instances.  Kept while the network and the node exist, because the
    node's bridge keeps the address after its last instance on the network
    is gone.
    """

    network = models.ForeignKey(Network, on_delete=models.CASCADE, related_name="host_ports")
    node = models.ForeignKey(ComputeNode, on_delete=models.CASCADE, related_name="host_ports")
    address = models.GenericIPAddressField(protocol="IPv4")

    class Meta:
        ordering = ["network", "address"]
        constraints = [
            models.UniqueConstraint(fields=["network", "node"], name="hostport_unique_node"),
            models.UniqueConstraint(fields=["network", "address"], name="hostport_unique_address"),
        ]

    def __str__(self) -> str:
        return f"{self.node.name} {self.address}"


class Port(models.Model):
    """An instance's address and MAC on a network (IPAM): one NIC, ``index`` its place (eth0, eth1, ...)."""

    network = models.ForeignKey(Network, on_delete=models.CASCADE, related_name="ports")
    instance = models.ForeignKey("Instance", on_delete=models.CASCADE, related_name="ports")
    address = models.GenericIPAddressField(protocol="IPv4")
    mac = models.CharField(max_length=17, unique=True)
    index = models.PositiveSmallIntegerField(
        default=0, db_default=0, help_text="The NIC's place on the instance: 0 is eth0 (the default route)"
    )

    class Meta:
        ordering = ["network", "address"]
        constraints = [models.UniqueConstraint(fields=["network", "address"], name="port_unique_address")]

    def __str__(self) -> str:
        return f"{self.address} ({self.mac})"


class InstanceQuerySet(TenantScopedQuerySet["Instance"]):
    def live(self) -> InstanceQuerySet:
        """Instances that count against quota and capacity."""
        return self.exclude(vm_state=VmState.DELETED)


class Instance(models.Model):
    """A VM or container of a tenant.

    ``kind`` is what the portal decided and ``isolation_reason`` says why in
    one sentence.  Sizes are copied from the flavor at creation so later
    flavor edits do not change what is accounted.
    """

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    tenant = models.ForeignKey(Tenant, on_delete=models.PROTECT, related_name="instances")
    name = models.CharField(max_length=63)
    requested_kind = models.CharField(
        max_length=16, choices=RequestedKind.choices, default=RequestedKind.AUTO
    )
    kind = models.CharField(max_length=16, choices=Kind.choices)
    isolation_reason = models.CharField(max_length=255)
    # Deleted instances are kept for the record; their image may be deleted after them.
    image = models.ForeignKey("images.Image", null=True, on_delete=models.SET_NULL, related_name="instances")
    # The first NIC's network (eth0); every NIC is a Port (``index`` orders them).  Null once deleted.
    network = models.ForeignKey(
        "Network", null=True, blank=True, on_delete=models.SET_NULL, related_name="instances"
    )
    anti_affinity_group = models.CharField(max_length=63, blank=True)
    ssh_keys = models.JSONField(default=list, blank=True, help_text="Public keys injected at creation")
    user_data = models.TextField(blank=True)
    # Containers: launch overrides of the image config (docs/container-driver.md).  ``env``
    # values may be secrets: the API, events and the audit log show only the names.
    command = models.JSONField(default=list, blank=True, help_text="Replaces Entrypoint + Cmd")
    env = models.JSONField(default=dict, blank=True, help_text="Added to (and overriding) the image's Env")
    workdir = models.CharField(max_length=255, blank=True)
    run_as = models.CharField(max_length=65, blank=True, help_text="user[:group], name or id")
    restart_policy = models.CharField(max_length=16, default="no", help_text="no | on-failure[:N] | always")
    restarts = models.PositiveIntegerField(default=0, help_text="Restarts in a row by the node's policy")
    flavor = models.ForeignKey(Flavor, on_delete=models.PROTECT, related_name="instances")
    vcpus = models.PositiveSmallIntegerField()
    ram_mb = models.PositiveIntegerField()
    disk_gb = models.PositiveIntegerField()
    node = models.ForeignKey(
        ComputeNode, null=True, blank=True, on_delete=models.PROTECT, related_name="instances"
    )
    vm_state = models.CharField(max_length=16, choices=VmState.choices, default=VmState.BUILDING)
    task_state = models.CharField(  # noqa: DJ001 -- null means "no action in flight", as in Nova
        max_length=16, choices=TaskState.choices, null=True, blank=True
    )
    power_state = models.CharField(max_length=16, choices=POWER_STATE_CHOICES, default=PowerState.NOSTATE)
    status_reason = models.CharField(max_length=255, blank=True)
    action_id = models.CharField(max_length=64, blank=True, help_text="Id of the action in flight")
    task_deadline = models.DateTimeField(null=True, blank=True)
    missing_since = models.DateTimeField(
        null=True, blank=True, help_text="When reconcile found the workload missing on its node (drift)"
    )
    addresses = models.JSONField(default=list, blank=True)
    resize_from = models.JSONField(
        null=True, blank=True, help_text="Flavor and sizes before a resize in flight (restored if it fails)"
    )
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="instances"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)
    deleted_at = models.DateTimeField(null=True, blank=True)

    objects = InstanceQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            models.UniqueConstraint(
                fields=["tenant", "name"],
                condition=~Q(vm_state=VmState.DELETED),
                name="instance_unique_live_name",
            ),
        ]
        indexes = [
            models.Index(fields=["tenant", "vm_state"], name="instance_tenant_state"),
            # the list pages (newest first, live ones) read 50 rows in order instead of sorting them all
            models.Index(
                fields=["tenant", "-created_at"],
                condition=~Q(vm_state=VmState.DELETED),
                name="instance_live_newest",
            ),
            models.Index(
                fields=["-created_at"],
                condition=~Q(vm_state=VmState.DELETED),
                name="instance_all_live_newest",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.name} ({self.kind}, {self.vm_state})"

    @property
    def capabilities(self) -> frozenset[Capability]:
        """What the driver of this instance's kind on its node can do (nothing without a node)."""
        return self.node.capabilities(self.kind) if self.node is not None else frozenset()


class AppliedAction(models.Model):
    """An action id whose observation was applied to an instance: a redelivery is then ignored.

    Kept apart from the audit log, so pruning events can never make a node's
    late or repeated observation apply a second time.
    """

    instance = models.ForeignKey(Instance, on_delete=models.CASCADE, related_name="applied_actions")
    action_id = models.CharField(max_length=64)
    action = models.CharField(max_length=32)
    applied_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["instance", "action_id", "action"], name="applied_action_once")
        ]

    def __str__(self) -> str:
        return f"{self.action} {self.action_id} of {self.instance_id}"


class Evacuation(models.Model):
    """An instance moved off a node by an evacuation (node down) or a drain (node up): from where, to where.

    The copy on ``source`` is stale from that moment: the portal's row now
    belongs to ``target`` (or is deleted).  Until the source no longer lists
    the copy (``cleaned_at``), the source's reconcile asks it to destroy the
    copy with ``destroy_action_id`` (``portal.cloud.evacuation``), never the
    other way round.  ``create_pending``: a drain sends the create to the
    target only once the source has destroyed its copy (one copy at a time).
    """

    class Mode(models.TextChoices):
        EVACUATE = "evacuate"
        DRAIN = "drain"

    class Step(models.TextChoices):
        DONE = "", "-"
        STOPPING = "stopping"  # the source shuts the VM down (cleanly, or refuses)
        SENDING = "sending"  # the source uploads its flattened disk
        IMPORTING = "importing"  # the disk arrived; the portal checks it
        CREATING = "creating"  # the target builds the VM on that disk

    instance = models.ForeignKey(Instance, on_delete=models.CASCADE, related_name="evacuations")
    source = models.ForeignKey(ComputeNode, on_delete=models.CASCADE, related_name="evacuations")
    target = models.ForeignKey(
        ComputeNode, null=True, blank=True, on_delete=models.SET_NULL, related_name="evacuations_in"
    )
    mode = models.CharField(max_length=16, choices=Mode.choices)
    destroy_action_id = models.CharField(
        max_length=64, help_text="Action id of the destroy sent to the source"
    )
    destroy_sent_at = models.DateTimeField(null=True, blank=True)
    create_pending = models.BooleanField(
        default=False, help_text="The create on the target waits for the source's destroy (drain)"
    )
    then_stop = models.BooleanField(
        default=False, help_text="The instance was stopped: stop it again once it is rebuilt"
    )
    # A VM's cold migration (drain) in progress: the step it is at; "" once the copy on the
    # target runs and this row is what is left on the source (portal/cloud/vm_migration.py).
    step = models.CharField(max_length=12, choices=Step.choices, blank=True, default="")
    image = models.ForeignKey(
        "images.Image",
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
        help_text="The hidden image the VM's disk travels through (deleted after the move)",
    )
    created_at = models.DateTimeField(auto_now_add=True)
    cleaned_at = models.DateTimeField(
        null=True, blank=True, help_text="When the source was seen without the copy (or destroyed it)"
    )

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            models.UniqueConstraint(
                fields=["instance", "source"],
                condition=Q(cleaned_at__isnull=True),
                name="evacuation_one_open_copy_per_node",
            ),
        ]

    def __str__(self) -> str:
        to = self.target.name if self.target else "-"
        return f"{self.mode} of {self.instance_id} from {self.source.name} to {to}"


class ExternalAddress(models.Model):
    """An address on a node's outside (the LAN in front of it), with the port range it publishes from.

    Operators define them per node (``manage.py node external-address``);
    the node must have the address on one of its interfaces.
    """

    node = models.ForeignKey(ComputeNode, on_delete=models.CASCADE, related_name="external_addresses")
    address = models.GenericIPAddressField(protocol="IPv4")
    first_port = models.PositiveIntegerField(default=20000)
    last_port = models.PositiveIntegerField(default=29999)

    class Meta:
        ordering = ["node__name", "address"]
        constraints = [
            models.UniqueConstraint(fields=["node", "address"], name="externaladdress_unique_node_address"),
            models.CheckConstraint(
                condition=Q(first_port__gte=1)
                & Q(last_port__lte=65535)
                & Q(first_port__lte=models.F("last_port")),
                name="externaladdress_port_range",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.node.name} {self.address} {self.first_port}-{self.last_port}"


class PublishedPort(models.Model):
    """An instance's port reachable at an external address and port of its node (DNAT on the node)."""

    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="published_ports")
    instance = models.ForeignKey(Instance, on_delete=models.CASCADE, related_name="published_ports")
    protocol = models.CharField(max_length=3, choices=[("tcp", "TCP"), ("udp", "UDP")])
    port = models.PositiveIntegerField(help_text="The instance's port (1..65535)")
    external = models.ForeignKey(ExternalAddress, on_delete=models.PROTECT, related_name="published_ports")
    external_port = models.PositiveIntegerField()
    created_at = models.DateTimeField(auto_now_add=True)

    objects = TenantScopedQuerySet.as_manager()

    class Meta:
        ordering = ["instance__name", "protocol", "port"]
        constraints = [
            models.UniqueConstraint(
                fields=["external", "protocol", "external_port"], name="publishedport_unique_external"
            ),
            models.UniqueConstraint(
                fields=["instance", "protocol", "port"], name="publishedport_unique_port"
            ),
        ]

    def __str__(self) -> str:
        target = f"{self.instance.name}:{self.port}"
        return f"{self.external.address}:{self.external_port}/{self.protocol} -> {target}"


class SecurityGroup(models.Model):
    """A tenant's named set of allow rules, attached to instances (enforced per tap/veth on the node).

    Every tenant has a ``default`` group: all egress, ingress only from the
    group's own members.  Traffic no rule of an instance's groups allows is dropped.
    """

    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="security_groups")
    name = models.CharField(max_length=63)
    description = models.CharField(max_length=255, blank=True)
    instances = models.ManyToManyField(Instance, related_name="security_groups", blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    objects = TenantScopedQuerySet.as_manager()

    class Meta:
        ordering = ["tenant__slug", "name"]
        constraints = [
            models.UniqueConstraint(fields=["tenant", "name"], name="securitygroup_unique_tenant_name")
        ]

    def __str__(self) -> str:
        return f"{self.tenant.slug}/{self.name}"


class SecurityGroupRule(models.Model):
    """One allow rule: direction, protocol, port range, and a remote CIDR or group (neither: anyone)."""

    group = models.ForeignKey(SecurityGroup, on_delete=models.CASCADE, related_name="rules")
    direction = models.CharField(max_length=7, choices=[("ingress", "Ingress"), ("egress", "Egress")])
    protocol = models.CharField(
        max_length=4,
        choices=[("any", "Any"), ("tcp", "TCP"), ("udp", "UDP"), ("icmp", "ICMP")],
        default="any",
    )
    port_min = models.PositiveIntegerField(null=True, blank=True)
    port_max = models.PositiveIntegerField(null=True, blank=True)
    remote_cidr = models.CharField(max_length=18, blank=True)
    remote_group = models.ForeignKey(
        SecurityGroup, null=True, blank=True, on_delete=models.CASCADE, related_name="referenced_by"
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["group", "direction", "protocol", "port_min"]
        constraints = [
            models.CheckConstraint(
                condition=Q(remote_group__isnull=True) | Q(remote_cidr=""),
                name="securitygrouprule_one_remote",
            ),
        ]

    def __str__(self) -> str:
        ports = f" {self.port_min}-{self.port_max}" if self.port_min else ""
        remote = self.remote_cidr or (f"group {self.remote_group.name}" if self.remote_group else "anyone")
        return f"{self.direction} {self.protocol}{ports} {remote}"


class UnsentMessage(models.Model):
    """A node message the broker did not take after its transaction committed: sent again later.

    :mod:`portal.cloud.dispatch` publishes after commit; when that publish fails (the broker
    away longer than the publish retry policy lasts), the message waits here instead of being
    lost with a 500, and ``dispatch.flush`` (the beat's sweep, every few seconds) sends it.
    While a queue has messages waiting, new ones for it wait behind them: a node hears of a
    create before the delete that follows it.
    """

    queue = models.CharField(max_length=255)
    task = models.CharField(max_length=100)
    args = models.JSONField()
    created_at = models.DateTimeField(auto_now_add=True)
    attempts = models.PositiveIntegerField(default=0)
    last_error = models.TextField(blank=True)
    #: a flush sending this message holds it until then (two sweeps never send it twice)
    claimed_until = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["id"]
        indexes = [models.Index(fields=["queue", "id"], name="unsent_queue_order")]

    def __str__(self) -> str:
        return f"{self.task} to {self.queue} ({self.attempts} attempts)"
