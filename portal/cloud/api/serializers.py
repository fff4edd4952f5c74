from __future__ import annotations

import re
from typing import Any, TypeVar

from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from compute import logs
from compute.mountpath import overlaps
from portal.api.authentication import actor_for, user_id_of
from portal.api.conflicts import FieldConflict
from portal.api.fields import DefaultTenantMixin, TenantField, TenantSlugField
from portal.api.strict import (
    QuerySerializer,
    StrictCharField,
    StrictIntegerField,
    StrictModelSerializer,
    StrictPrimaryKeyRelatedField,
    StrictRegexField,
)
from portal.cloud import launch, metrics, states
from portal.cloud.choices import RequestedKind
from portal.cloud.models import (
    ComputeNode,
    Flavor,
    Instance,
    Network,
    PublishedPort,
    SecurityGroup,
    SecurityGroupRule,
)
from portal.cloud.naming import NAME_RE as _NAME_RE
from portal.cloud.naming import NAME_RULE
from portal.images.choices import ImageStatus
from portal.images.models import Image
from portal.storage.api.serializers import VolumeMountSerializer
from portal.tenancy.models import SSHKey

#: NICs an instance may have (the VM driver's limit is 10; few real workloads need more than a handful)
MAX_NICS = 8
#: the largest id a database can hold (BigAutoField); larger ones overflow the query, not just miss
MAX_ID = 2**63 - 1
_IMAGE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,150}(:[A-Za-z0-9._-]{1,40})?$")


class FlavorSerializer(StrictModelSerializer[Flavor]):
    tenant = TenantSlugField(
        required=False,
        allow_null=True,
        help_text="Owner tenant of a private flavor; empty for a public flavor.",
    )

    class Meta:
        model = Flavor
        fields = ["id", "name", "vcpus", "ram_mb", "disk_gb", "is_public", "tenant"]
        read_only_fields = ["id", "is_public"]
        extra_kwargs = {"vcpus": {"min_value": 1}, "ram_mb": {"min_value": 16}}  # flavor_min_size
        validators: list[Any] = []  # uniqueness is enforced by the database and answered with 409

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        tenant = attrs.get("tenant", getattr(self.instance, "tenant", None))
        attrs["is_public"] = tenant is None
        if attrs.get("vcpus", 1) < 1 or attrs.get("ram_mb", 16) < 16:
            raise serializers.ValidationError("A flavor needs at least 1 vCPU and 16 MiB of memory.")
        return attrs


class HostLoadSerializer(serializers.Serializer[dict[str, Any]]):
    """The host's own load from the node's newest heartbeat (``compute.spec.HostLoad``)."""

    load1 = serializers.FloatField(help_text="1-minute load average")
    load5 = serializers.FloatField(help_text="5-minute load average")
    cpu_percent = serializers.FloatField(help_text="busy share of all CPUs since the previous heartbeat")
    mem_available_mb = serializers.IntegerField(help_text="MemAvailable")
    disk_free_gb = serializers.FloatField(help_text="free on the file system of the node's state directory")
    at = serializers.FloatField(help_text="when the node sent it (epoch seconds)")


class ComputeNodeSerializer(StrictModelSerializer[ComputeNode]):
    owner = TenantSlugField(required=False, allow_null=True)
    host_load = serializers.SerializerMethodField()

    class Meta:
        model = ComputeNode
        fields = [
            "id",
            "name",
            "queue",
            "tenancy",
            "owner",
            "vcpus",
            "ram_mb",
            "disk_gb",
            "cpu_allocation_ratio",
            "ram_allocation_ratio",
            "disk_allocation_ratio",
            "status",
            "status_reason",
            "last_heartbeat",
            "drivers",
            "orphans",
            "cached",
            "tunnel_address",
            "network_drift",
            "host_load",
            "created_at",
        ]
        read_only_fields = [
            "host_load",
            "network_drift",
            "orphans",
            "cached",
            "id",
            "queue",
            "status",
            "status_reason",
            "last_heartbeat",
            "drivers",
            "tunnel_address",
            "created_at",
        ]
        # a name in use is a conflict (409), in validate()
        extra_kwargs: dict[str, Any] = {"name": {"validators": []}}

    @extend_schema_field(HostLoadSerializer(allow_null=True))
    def get_host_load(self, node: ComputeNode) -> dict[str, Any] | None:
        """The host's own load, memory and disk from its newest heartbeat (kept an hour in the cache)."""
        return metrics.host(node.name)

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        tenancy = attrs.get("tenancy", getattr(self.instance, "tenancy", "shared"))
        owner = attrs.get("owner", getattr(self.instance, "owner", None))
        if attrs.get("tenancy") == "shared" and "owner" not in attrs:
            owner = attrs["owner"] = None
        if tenancy == "dedicated" and owner is None:
            raise serializers.ValidationError({"owner": "A dedicated node needs an owner tenant."})
        if tenancy == "shared" and owner is not None:
            raise serializers.ValidationError(
                {"owner": "A shared node has no owner; set tenancy 'dedicated'."}
            )
        for ratio in ("cpu_allocation_ratio", "ram_allocation_ratio", "disk_allocation_ratio"):
            if ratio in attrs and not 0 < attrs[ratio] <= 64:
                raise serializers.ValidationError({ratio: "Must be above 0 and at most 64."})
        if "name" in attrs:
            if not re.fullmatch(r"[A-Za-z0-9_-]{1,63}", attrs["name"]):
                raise serializers.ValidationError({"name": "Use letters, digits, '-' and '_' (at most 63)."})
            taken = ComputeNode.objects.filter(name=attrs["name"])
            if self.instance is not None:
                taken = taken.exclude(pk=self.instance.pk)
            if taken.exists():
                raise FieldConflict("name", f"A node named {attrs['name']!r} exists already.")
            attrs["queue"] = f"node.{attrs['name']}"
        return attrs


@extend_schema_field(
    {
        "oneOf": [
            {"type": "integer", "minimum": 1, "maximum": MAX_ID},
            {"type": "string", "minLength": 1, "maxLength": 192},
        ],
        "description": "An image id, or 'name:version', or 'name' (the newest active version)",
    }
)
class ImageRefField(serializers.Field):  # type: ignore[type-arg]
    """An image by id, ``name:version`` or ``name`` (newest active), among images visible to the requester."""

    default_error_messages = {"unknown": "No active image '{value}' that you may use."}

    def to_internal_value(self, data: Any) -> Image:
        qs = Image.objects.restrict(actor_for(self.context["request"])).filter(status=ImageStatus.ACTIVE)
        # the artifacts once: validation, placement and the node's spec each ask for them
        qs = qs.prefetch_related("artifacts")
        if not isinstance(data, str | int) or isinstance(data, bool):
            raise serializers.ValidationError("Expected an image id or a reference such as 'busybox:1.36'.")
        text = str(data).strip()
        if isinstance(data, int) or (text.isascii() and text.isdigit()):
            if not 1 <= int(text) <= MAX_ID:
                raise serializers.ValidationError(f"An image id is between 1 and {MAX_ID}.")
            image = qs.filter(pk=int(text)).first()
        elif _IMAGE_RE.match(text):
            name, _, version = text.partition(":")
            qs = qs.filter(name=name)
            image = (qs.filter(version=version) if version else qs.order_by("-created_at")).first()
        else:
            raise serializers.ValidationError("Expected an image id or a reference such as 'busybox:1.36'.")
        if image is None:
            self.fail("unknown", value=text)
        assert image is not None
        return image

    def to_representation(self, value: Image) -> str:
        return str(value)


_T = TypeVar("_T")


def _checked(value: _T, problem: str | None) -> _T:
    if problem:
        raise serializers.ValidationError(problem)
    return value


class EnvVarSerializer(serializers.Serializer):  # type: ignore[type-arg]
    """One environment variable of a container; the value is write-only (answers show a mask)."""

    name = StrictCharField(max_length=launch.MAX_ENV_NAME, trim_whitespace=False)
    value = StrictCharField(max_length=32768, allow_blank=True, trim_whitespace=False)


class EnvField(serializers.ListField):
    """``[{"name", "value"}]`` in, a dict on the model, names with masked values out."""

    child = EnvVarSerializer()

    def to_internal_value(self, data: Any) -> dict[str, str]:  # type: ignore[override]
        items = super().to_internal_value(data)
        env: dict[str, str] = {}
        for item in items:
            if item["name"] in env:
                raise serializers.ValidationError(f"Variable {item['name'][:64]!r} is given twice.")
            env[item["name"]] = item["value"]
        return env

    def to_representation(self, data: Any) -> list[dict[str, str]]:
        return [{"name": str(name), "value": launch.MASK} for name in (data or {})]


class InstanceSerializer(DefaultTenantMixin, StrictModelSerializer[Instance]):
    tenant = TenantField(required=False)
    flavor = StrictPrimaryKeyRelatedField(queryset=Flavor.objects.all())
    image = ImageRefField()
    kind = serializers.ChoiceField(
        choices=RequestedKind.choices,
        default=RequestedKind.AUTO,
        source="requested_kind",
        help_text="auto (portal chooses), vm or container",
    )
    decided_kind = serializers.CharField(source="kind", read_only=True)
    node: serializers.SlugRelatedField[Any] = serializers.SlugRelatedField(
        slug_field="name", read_only=True, allow_null=True
    )
    created_by: serializers.SlugRelatedField[Any] = serializers.SlugRelatedField(
        slug_field="username", read_only=True, allow_null=True
    )
    ssh_key_ids = serializers.ListField(
        child=StrictIntegerField(min_value=1, max_value=MAX_ID),
        write_only=True,
        required=False,
        max_length=20,
        help_text="Ids of your SSH keys to inject",
    )
    user_data = StrictCharField(
        required=False, allow_blank=True, max_length=16384, write_only=True, trim_whitespace=False
    )
    command = serializers.ListField(
        child=StrictCharField(max_length=4096, allow_blank=True, trim_whitespace=False),
        required=False,
        max_length=launch.MAX_ARGS,
        help_text="Container: replaces the image's Entrypoint + Cmd",
    )
    env = EnvField(
        required=False,
        max_length=launch.MAX_ENV,
        help_text="Container: environment added to the image's; values are never shown again (masked)",
    )
    workdir = StrictCharField(
        required=False, allow_blank=True, max_length=255, help_text="Container: working directory"
    )
    restart_policy = StrictCharField(
        required=False,
        default="no",
        max_length=16,
        help_text=f"Container: {launch.RESTART_HELP}",
    )
    user = StrictCharField(
        source="run_as",
        required=False,
        allow_blank=True,
        max_length=65,
        help_text="Container: user[:group] to run as (name or id, resolved in the image)",
    )
    security_group_ids = serializers.ListField(
        child=StrictIntegerField(min_value=1, max_value=MAX_ID),
        write_only=True,
        required=False,
        max_length=20,
        help_text="Ids of the tenant's security groups to attach (default: its 'default' group)",
    )
    networks = serializers.ListField(
        child=StrictIntegerField(min_value=1, max_value=MAX_ID),
        write_only=True,
        required=False,
        min_length=1,
        max_length=MAX_NICS,
        help_text="Ids of the tenant's networks, one NIC each in this order (eth0 first, it has the "
        "default route); default: the tenant's default network",
    )
    volumes = serializers.ListField(
        child=VolumeMountSerializer(),
        write_only=True,
        required=False,
        max_length=16,
        help_text="Container: ext4 volumes to mount, [{volume, mount_path}]; it is placed on their node",
    )

    class Meta:
        model = Instance
        fields = [
            "id",
            "tenant",
            "name",
            "kind",
            "decided_kind",
            "isolation_reason",
            "image",
            "flavor",
            "vcpus",
            "ram_mb",
            "disk_gb",
            "node",
            "vm_state",
            "task_state",
            "power_state",
            "status_reason",
            "addresses",
            "anti_affinity_group",
            "ssh_key_ids",
            "security_group_ids",
            "networks",
            "volumes",
            "user_data",
            "command",
            "env",
            "workdir",
            "user",
            "restart_policy",
            "restarts",
            "created_by",
            "created_at",
            "updated_at",
        ]
        read_only_fields = [
            "id",
            "isolation_reason",
            "vcpus",
            "ram_mb",
            "disk_gb",
            "vm_state",
            "task_state",
            "power_state",
            "status_reason",
            "addresses",
            "restarts",
            "created_at",
            "updated_at",
        ]
        validators: list[Any] = []  # live-name uniqueness is checked under the quota lock (409)

    def get_fields(self) -> dict[str, Any]:
        fields = super().get_fields()
        request = self.context.get("request")
        if request is not None and request.user.is_authenticated:
            fields["flavor"].queryset = Flavor.objects.restrict(actor_for(request))  # type: ignore[attr-defined]
        if self.instance is not None and not isinstance(self.instance, list | tuple):
            for immutable in ("tenant", "flavor", "image", "kind", "anti_affinity_group"):
                fields[immutable].read_only = True
        return fields

    def validate_name(self, value: str) -> str:
        if not _NAME_RE.match(value):
            raise serializers.ValidationError(NAME_RULE)
        return value

    def validate_anti_affinity_group(self, value: str) -> str:
        if value and not _NAME_RE.match(value):
            raise serializers.ValidationError("Use lower-case letters, digits and '-' (at most 63).")
        return value

    def validate_command(self, value: list[str]) -> list[str]:
        return _checked(value, launch.command_error(value))

    def validate_env(self, value: dict[str, str]) -> dict[str, str]:
        return _checked(value, launch.env_error(value))

    def validate_workdir(self, value: str) -> str:
        return _checked(value, launch.workdir_error(value))

    def validate_user(self, value: str) -> str:
        return _checked(value, launch.user_error(value))

    def validate_restart_policy(self, value: str) -> str:
        return _checked(value, launch.restart_policy_error(value))

    def validate_volumes(self, value: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for i, a in enumerate(value):
            for b in value[:i]:
                if a["volume"] == b["volume"]:
                    raise serializers.ValidationError(f"Volume {a['volume']} is given twice.")
                if overlaps(a["mount_path"], b["mount_path"]):
                    raise serializers.ValidationError(
                        f"Mount paths {b['mount_path']} and {a['mount_path']} overlap."
                    )
        return value

    def validate_security_group_ids(self, value: list[int]) -> list[SecurityGroup]:
        groups = {
            g.pk: g
            for g in SecurityGroup.objects.restrict(actor_for(self.context["request"])).filter(pk__in=value)
        }
        missing = sorted(set(value) - set(groups))
        if missing:
            raise serializers.ValidationError(f"No security group with id {missing[0]}.")
        return [groups[k] for k in value]

    def validate_networks(self, value: list[int]) -> list[Network]:
        if len(set(value)) != len(value):
            raise serializers.ValidationError(
                "A network is given twice; an instance has one NIC per network."
            )
        found = {
            n.pk: n for n in Network.objects.restrict(actor_for(self.context["request"])).filter(pk__in=value)
        }
        missing = [k for k in value if k not in found]
        if missing:
            raise serializers.ValidationError(f"No network with id {missing[0]}.")
        return [found[k] for k in value]

    def validate_ssh_key_ids(self, value: list[int]) -> list[str]:
        keys = dict(
            SSHKey.objects.filter(user_id=user_id_of(self.context["request"]), pk__in=value).values_list(
                "pk", "public_key"
            )
        )
        missing = sorted(set(value) - set(keys))
        if missing:
            raise serializers.ValidationError(f"No SSH key of yours with id {missing[0]}.")
        return [keys[k] for k in value]

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        attrs = super().validate(attrs)
        flavor = attrs.get("flavor")
        tenant = attrs.get("tenant")
        if (
            flavor is not None
            and tenant is not None
            and not flavor.is_public
            and flavor.tenant_id != tenant.pk
        ):
            raise serializers.ValidationError({"flavor": "This flavor is private to another tenant."})
        image = attrs.get("image")
        if image is not None and tenant is not None and image.owner_id not in (None, tenant.pk):
            # The requester may see it through another membership; it still belongs to that tenant.
            raise serializers.ValidationError({"image": f"Image {image} is private to another tenant."})
        foreign = [n for n in attrs.get("networks", ()) if tenant is not None and n.tenant_id != tenant.pk]
        if foreign:
            raise serializers.ValidationError(
                {"networks": f"Network {foreign[0].name} belongs to tenant {foreign[0].tenant.slug}."}
            )
        if (
            image is not None
            and flavor is not None
            and (flavor.ram_mb < image.min_ram_mb or flavor.disk_gb < image.min_disk_gb)
        ):
            need = f"{image.min_ram_mb} MiB and {image.min_disk_gb} GiB"
            raise serializers.ValidationError({"flavor": f"Image {image} needs at least {need}."})
        self._check_overrides(attrs, image)
        return attrs

    @staticmethod
    def _check_overrides(attrs: dict[str, Any], image: Any) -> None:
        """What the portal can know from the image config recorded at import."""
        given = [k for k in ("command", "env", "workdir", "run_as", "volumes") if attrs.get(k)]
        if attrs.get("restart_policy", "no") != "no":
            given.append("restart_policy")
        if given and attrs.get("requested_kind") == RequestedKind.VM:
            field = given[0] if given[0] != "run_as" else "user"
            raise serializers.ValidationError({field: "Applies to containers only, not to kind=vm."})
        artifact = image.artifact_for("container") if image is not None else None
        config = artifact.config if artifact is not None else {}
        no_command = not (config.get("entrypoint") or config.get("cmd"))
        if artifact is not None and config and no_command and not attrs.get("command"):
            raise serializers.ValidationError(
                {"command": f"Image {image} has no Entrypoint or Cmd: give a command."}
            )


class InstanceRenameSerializer(StrictModelSerializer[Instance]):
    """What PATCH on an instance takes (the schema's request body): only its name changes."""

    class Meta:
        model = Instance
        fields = ["name"]


class ConsoleSerializer(serializers.Serializer):  # type: ignore[type-arg]
    text = serializers.CharField(help_text="Tail of the serial console (VM) or stdout/stderr (container)")
    at = serializers.DateTimeField(allow_null=True, help_text="When the node read it")
    node = serializers.CharField(allow_null=True)
    refreshing = serializers.BooleanField(help_text="A fresh tail was requested from the node; read again")


@extend_schema_field({"type": "string", "format": "date-time", "maxLength": 64})
class RFC3339Field(serializers.CharField):
    """A time as text, kept to the nanosecond (a DateTimeField would cut it to microseconds)."""


class LogsQuerySerializer(QuerySerializer):
    """The query of ``GET /instances/{id}/logs/``."""

    tail = serializers.IntegerField(
        required=False, min_value=0, max_value=logs.MAX_TAIL, help_text="Only the last N lines (0..10000)"
    )
    since = RFC3339Field(required=False, max_length=64, help_text="Only lines at or after this RFC 3339 time")
    stream = serializers.ChoiceField(choices=logs.STREAMS, required=False, help_text="One stream only")
    follow = serializers.BooleanField(
        required=False, default=False, help_text="Stream new lines (NDJSON) for a bounded time"
    )

    def validate_since(self, value: str) -> str:
        try:
            logs.parse_time(value)
        except logs.LogError as exc:
            raise serializers.ValidationError(str(exc)) from None
        return value


class LogLineSerializer(serializers.Serializer):  # type: ignore[type-arg]
    time = serializers.CharField(help_text="When conmon read the line, RFC 3339 UTC with nanoseconds")
    stream = serializers.ChoiceField(choices=logs.STREAMS)
    text = serializers.CharField(allow_blank=True)


class LogsSerializer(serializers.Serializer):  # type: ignore[type-arg]
    lines = LogLineSerializer(many=True, help_text="Oldest first")
    truncated = serializers.BooleanField(help_text="Older lines were left out to keep the answer under 1 MiB")
    retained = serializers.BooleanField(help_text="Read from the logs kept after the container was deleted")
    node = serializers.CharField()


class SampleSerializer(serializers.Serializer):  # type: ignore[type-arg]
    at = serializers.DateTimeField()
    cpu_percent = serializers.FloatField(help_text="CPU use since the previous sample; 100 = one CPU busy")
    memory_bytes = serializers.IntegerField()


class StatsSerializer(serializers.Serializer):  # type: ignore[type-arg]
    vcpus = serializers.IntegerField()
    memory_limit_bytes = serializers.IntegerField()
    samples = SampleSerializer(many=True)


class PublishSerializer(serializers.Serializer):  # type: ignore[type-arg]
    name = StrictRegexField(
        r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$", max_length=100, help_text="Name of the new image"
    )
    version = StrictRegexField(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,39}$", max_length=40)
    description = StrictCharField(required=False, default="", allow_blank=True, max_length=2000)

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        instance = self.context["instance"]
        if Image.objects.filter(owner=instance.tenant, name=attrs["name"], version=attrs["version"]).exists():
            raise FieldConflict(
                "version",
                f"{attrs['name']}:{attrs['version']} already exists in tenant {instance.tenant.slug}.",
            )
        return attrs


@extend_schema_field(
    {
        "type": "object",
        "description": "stop: timeout, force; snapshot/revert: name",
        "properties": {
            "timeout": {"type": "number", "exclusiveMinimum": True, "minimum": 0, "maximum": 600},
            "force": {"type": "boolean"},
            "name": {"type": "string", "pattern": _NAME_RE.pattern, "maxLength": 63},
        },
        "additionalProperties": False,
    }
)
class ActionParamsField(serializers.DictField):
    """An action's parameters; which ones an action takes is checked by the serializer."""


class InstanceActionSerializer(serializers.Serializer):  # type: ignore[type-arg]
    action = serializers.ChoiceField(choices=[str(a) for a in states.PUBLIC_ACTIONS])
    params = ActionParamsField(required=False, default=dict)

    def validate_params(self, value: dict[str, Any]) -> dict[str, Any]:
        allowed = states.PUBLIC_PARAMS
        if set(value) - allowed:
            raise serializers.ValidationError(
                f"Unknown params {sorted(set(value) - allowed)}; allowed: {sorted(allowed)}."
            )
        timeout = value.get("timeout")
        if "timeout" in value and (
            isinstance(timeout, bool) or not (isinstance(timeout, int | float) and 0 < timeout <= 600)
        ):
            raise serializers.ValidationError("timeout must be a number of seconds in 1..600.")
        if "name" in value and not (isinstance(value["name"], str) and _NAME_RE.match(value["name"])):
            raise serializers.ValidationError("name must be lower-case letters, digits and '-'.")
        if "force" in value and not isinstance(value["force"], bool):
            raise serializers.ValidationError("force must be true or false.")
        return value


class PreviewSerializer(serializers.Serializer):  # type: ignore[type-arg]
    kind = serializers.CharField()
    node = serializers.CharField()
    reason = serializers.CharField()
    quota = serializers.DictField()
    rejected = serializers.ListField(child=serializers.ListField(child=serializers.CharField()))


class NetworkInstanceSerializer(serializers.Serializer[Any]):
    """One live instance with a NIC on the network."""

    id = serializers.UUIDField(source="instance.pk")
    name = serializers.CharField(source="instance.name")
    address = serializers.IPAddressField(protocol="IPv4")
    mac = serializers.CharField()
    nic = serializers.IntegerField(source="index", help_text="0 is the instance's eth0")


class NetworkSerializer(DefaultTenantMixin, StrictModelSerializer[Network]):
    """A tenant network.  Create with ``cidr`` (inside the pool, overlapping no network) or let the pool
    choose a free subnet of ``prefix_length`` (default 24)."""

    tenant = TenantField(required=False)
    cidr = StrictCharField(
        required=False,
        max_length=43,
        help_text="Your own subnet inside the portal's pool, e.g. 198.18.40.0/24; empty: the pool chooses",
    )
    prefix_length = StrictIntegerField(
        write_only=True,
        required=False,
        min_value=8,
        max_value=28,
        help_text="Without cidr: the size of the subnet the pool gives (default 24)",
    )
    gateway = serializers.IPAddressField(source="host_address", read_only=True, protocol="IPv4")
    dns = serializers.SerializerMethodField()
    instances = serializers.SerializerMethodField()

    class Meta:
        model = Network
        fields = [
            "id",
            "tenant",
            "name",
            "cidr",
            "prefix_length",
            "gateway",
            "dns",
            "bridge",
            "vni",
            "host_address",
            "mtu",
            "egress",
            "instances",
            "created_at",
        ]
        read_only_fields = ["id", "bridge", "vni", "host_address", "mtu", "egress", "created_at"]
        validators: list[Any] = []  # a name in use is a conflict (409) from the service

    def validate_name(self, value: str) -> str:
        if not _NAME_RE.match(value):
            raise serializers.ValidationError(NAME_RULE)
        return value

    def validate_cidr(self, value: str) -> str:
        from portal.cloud import networks

        try:
            return str(networks.parse_cidr(value)) if value else ""
        except networks.InvalidNetwork as exc:
            raise serializers.ValidationError(str(exc)) from None

    def validate_prefix_length(self, value: int) -> int:
        from portal.cloud import networks

        try:
            return networks.check_prefix(value)
        except networks.InvalidNetwork as exc:
            raise serializers.ValidationError(str(exc)) from None

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        attrs = super().validate(attrs)
        if attrs.get("cidr") and "prefix_length" in attrs:
            raise serializers.ValidationError(
                {"prefix_length": "Give either cidr or prefix_length, not both."}
            )
        return attrs

    def get_dns(self, obj: Network) -> list[str]:
        """The resolver instances on this network are given (the gateway)."""
        return [str(obj.host_address)]

    @extend_schema_field(NetworkInstanceSerializer(many=True))
    def get_instances(self, obj: Network) -> list[dict[str, Any]]:
        ports = [p for p in obj.ports.all() if p.instance.vm_state != "deleted"]
        return NetworkInstanceSerializer(ports, many=True).data  # type: ignore[return-value]


class ResizeSerializer(serializers.Serializer):  # type: ignore[type-arg]
    flavor = StrictIntegerField(min_value=1, max_value=MAX_ID, help_text="Id of a flavor you may use")


@extend_schema_field(
    {"type": "string", "format": "uuid", "maxLength": 36, "description": "The id of an instance of yours"}
)
class InstanceRefField(serializers.PrimaryKeyRelatedField):  # type: ignore[type-arg]
    """An instance of your tenants by id (a UUID string); others do not exist for you."""

    def to_internal_value(self, data: Any) -> Any:
        if not isinstance(data, str):
            self.fail("incorrect_type", data_type=type(data).__name__)
        return super().to_internal_value(data)

    def to_representation(self, value: Any) -> str:
        return str(value.pk)


class PublishedPortSerializer(StrictModelSerializer[PublishedPort]):
    """A published port: ``protocol``/``port`` of ``instance`` at ``external_address:external_port``."""

    tenant: serializers.SlugRelatedField[Any] = serializers.SlugRelatedField(
        slug_field="slug", read_only=True
    )
    instance = InstanceRefField(queryset=Instance.objects.none())  # type: ignore[assignment]  # popped by DRF
    protocol = serializers.ChoiceField(choices=["tcp", "udp"])
    port = StrictIntegerField(min_value=1, max_value=65535, help_text="The instance's port")
    external_port = StrictIntegerField(
        min_value=1,
        max_value=65535,
        required=False,
        help_text="Optional: a port of the node's published range (default: the first free one)",
    )
    external_address = serializers.CharField(source="external.address", read_only=True)
    node = serializers.CharField(source="external.node.name", read_only=True)
    url = serializers.SerializerMethodField()

    class Meta:
        model = PublishedPort
        fields = [
            "id",
            "tenant",
            "instance",
            "protocol",
            "port",
            "external_address",
            "external_port",
            "node",
            "url",
            "created_at",
        ]
        read_only_fields = ["id", "created_at"]
        validators: list[Any] = []  # "already published" is a 409 from the service, with a sentence

    def get_url(self, obj: PublishedPort) -> str:
        return f"{obj.protocol}://{obj.external.address}:{obj.external_port}"

    def get_fields(self) -> dict[str, Any]:
        fields = super().get_fields()
        request = self.context.get("request")
        if request is not None and request.user.is_authenticated:
            fields["instance"].queryset = Instance.objects.restrict(actor_for(request)).live()  # type: ignore[attr-defined]
        return fields


class SecurityGroupRuleSerializer(StrictModelSerializer[SecurityGroupRule]):
    """One allow rule; ``remote_cidr`` or ``remote_group`` (a group of the same tenant), neither: anyone."""

    group = StrictPrimaryKeyRelatedField(queryset=SecurityGroup.objects.none())
    remote_group = StrictPrimaryKeyRelatedField(
        queryset=SecurityGroup.objects.none(), required=False, allow_null=True
    )
    port_min = StrictIntegerField(min_value=1, max_value=65535, required=False, allow_null=True)
    port_max = StrictIntegerField(min_value=1, max_value=65535, required=False, allow_null=True)

    class Meta:
        model = SecurityGroupRule
        fields = [
            "id",
            "group",
            "direction",
            "protocol",
            "port_min",
            "port_max",
            "remote_cidr",
            "remote_group",
        ]
        read_only_fields = ["id"]

    def get_fields(self) -> dict[str, Any]:
        fields = super().get_fields()
        request = self.context.get("request")
        if request is not None and request.user.is_authenticated:
            visible = SecurityGroup.objects.restrict(actor_for(request))
            fields["group"].queryset = visible  # type: ignore[attr-defined]
            # any group: a foreign one is refused with a sentence in validate(), not "does not exist"
            fields["remote_group"].queryset = SecurityGroup.objects.all()  # type: ignore[attr-defined]
        return fields

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        from portal.cloud import secgroups

        try:
            attrs["remote_cidr"] = secgroups.validate_rule(
                attrs["group"],
                attrs.get("protocol", "any"),
                attrs.get("port_min"),
                attrs.get("port_max"),
                attrs.get("remote_cidr", ""),
                attrs.get("remote_group"),
            )
        except ValueError as exc:
            raise serializers.ValidationError(str(exc)) from exc
        return attrs


class SecurityGroupSerializer(DefaultTenantMixin, StrictModelSerializer[SecurityGroup]):
    tenant = TenantField(required=False)
    rules = SecurityGroupRuleSerializer(many=True, read_only=True)

    class Meta:
        model = SecurityGroup
        fields = ["id", "tenant", "name", "description", "rules", "created_at"]
        read_only_fields = ["id", "created_at"]
        validators: list[Any] = []

    def validate_name(self, value: str) -> str:
        if not _NAME_RE.match(value):
            raise serializers.ValidationError(NAME_RULE)
        return value

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        attrs = super().validate(attrs)
        from portal.cloud import secgroups

        tenant = attrs.get("tenant") or getattr(self.instance, "tenant", None)
        name = attrs.get("name")
        taken = (
            secgroups.name_taken(tenant, name, getattr(self.instance, "pk", None))
            if name and tenant
            else None
        )
        if taken:
            raise FieldConflict("name", taken)
        return attrs


class InstanceSecurityGroupsSerializer(serializers.Serializer[Any]):
    security_groups = serializers.ListField(
        child=StrictIntegerField(min_value=1, max_value=MAX_ID),
        max_length=20,
        help_text="Ids of security groups",
    )


class EvacuationMoveSerializer(serializers.Serializer[Any]):
    id = serializers.UUIDField()
    name = serializers.CharField()
    tenant = serializers.CharField()
    kind = serializers.CharField()
    result = serializers.ChoiceField(
        choices=["rebuilding", "moving", "migrating", "error", "deleted", "stays"],
        help_text="migrating: a VM's cold migration with its disk has started (drain)",
    )
    target = serializers.CharField(allow_null=True)
    reason = serializers.CharField()


class EvacuationVolumeSerializer(serializers.Serializer[Any]):
    id = serializers.UUIDField()
    name = serializers.CharField()
    tenant = serializers.CharField()
    status = serializers.CharField()
    reason = serializers.CharField()


class EvacuationReportSerializer(serializers.Serializer[Any]):
    """What an evacuation or a drain did to each instance of the node (``portal.cloud.evacuation``)."""

    node = serializers.CharField()
    mode = serializers.ChoiceField(choices=["evacuate", "drain"])
    status = serializers.CharField(help_text="The node's status")
    data_loss = serializers.CharField(help_text="What is lost with the node's local disks")
    counts = serializers.DictField(child=serializers.IntegerField())
    instances = EvacuationMoveSerializer(many=True)
    volumes = EvacuationVolumeSerializer(many=True)
