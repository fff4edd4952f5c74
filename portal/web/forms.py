"""Forms of the browser UI.  They check input; the domain services decide."""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from typing import Any

from django import forms
from django.conf import settings
from django.core.validators import MaxValueValidator, RegexValidator
from django.db.models import Q

from portal.audit.models import Outcome
from portal.cloud import launch, networks, placement, secgroups
from portal.cloud.choices import Kind, RequestedKind, VmState
from portal.cloud.models import ComputeNode, Flavor, Instance, Network, SecurityGroup
from portal.cloud.naming import NAME_RE, NAME_RULE
from portal.images import naming as image_naming
from portal.images.choices import ImageStatus
from portal.images.models import Image
from portal.tenancy.models import (
    APIToken,
    Quota,
    SSHKey,
    Tenant,
    ssh_key_fingerprint,
    validate_ssh_public_key,
)
from portal.tenancy.querysets import Actor

name_validator = RegexValidator(NAME_RE, NAME_RULE)


class NoSuffix:
    """Labels without Django's trailing colon (they sit above their fields)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("label_suffix", "")
        super().__init__(*args, **kwargs)


class ImageChoiceField(forms.ModelChoiceField):  # type: ignore[type-arg]
    def label_from_instance(self, obj: Any) -> str:
        kinds = sorted({"container" if f == "oci" else "vm" for f in obj.formats()})
        owner = "public" if obj.is_public else f"private to {obj.owner.slug}"
        return f"{obj} ({', '.join(kinds) or 'no artifact'}; {owner})"


class SecretTextarea(forms.Textarea):
    """A textarea that never renders what was typed (env values may be secrets), even on an error."""

    def format_value(self, value: Any) -> str | None:
        return None


class LaunchForm(NoSuffix, forms.Form):
    """What ``placement.Request`` needs.  With ``preview=True`` the name may still be empty."""

    name = forms.CharField(max_length=63, validators=[name_validator], help_text=NAME_RULE)
    image = ImageChoiceField(queryset=Image.objects.none(), empty_label="Choose an image")
    flavor = forms.ModelChoiceField(queryset=Flavor.objects.none(), empty_label="Choose a flavor")
    kind = forms.ChoiceField(
        choices=RequestedKind.choices,
        initial=RequestedKind.AUTO,
        widget=forms.RadioSelect,
        help_text="Automatic: a container when your tenant has a dedicated node with room, else a VM.",
    )
    networks = forms.ModelMultipleChoiceField(
        queryset=Network.objects.none(),
        required=False,
        widget=forms.CheckboxSelectMultiple,
        label="Networks",
        help_text="One NIC on each chosen network (eth0, eth1, … in the order listed; the first has the "
        "default route). None chosen: the tenant's default network. Create networks on the Networks page.",
    )
    ssh_keys = forms.ModelMultipleChoiceField(
        queryset=SSHKey.objects.none(),
        required=False,
        widget=forms.CheckboxSelectMultiple,
        label="SSH keys",
        help_text="Injected into VMs through cloud-init; add keys on the SSH keys page.",
    )
    security_groups = forms.ModelMultipleChoiceField(
        queryset=SecurityGroup.objects.none(),
        required=False,
        widget=forms.CheckboxSelectMultiple,
        label="Security groups",
        help_text="None chosen: the tenant's default group (all egress, ingress from its members). "
        "Edit them on the Security groups page.",
    )
    user_data = forms.CharField(
        required=False,
        max_length=16384,
        strip=False,
        widget=forms.Textarea(attrs={"rows": 5, "spellcheck": "false"}),
        label="User data",
        help_text="cloud-init user data (VMs), at most 16 KiB.",
    )
    command = forms.CharField(
        required=False,
        max_length=16384,
        label="Command (containers)",
        help_text="Replaces the image's Entrypoint and Cmd; split like a shell line: sh -c 'echo hi'.",
    )
    env = forms.CharField(
        required=False,
        max_length=launch.MAX_ENV_BYTES + 2 * launch.MAX_ENV,
        strip=False,
        widget=SecretTextarea(attrs={"rows": 3, "spellcheck": "false", "autocomplete": "off"}),
        label="Environment (containers)",
        help_text="NAME=value per line, added to the image's; values are never shown again.",
    )
    workdir = forms.CharField(required=False, max_length=255, label="Working directory (containers)")
    user = forms.CharField(
        required=False, max_length=65, label="User (containers)", help_text="user[:group], names or ids."
    )
    restart_policy = forms.CharField(
        required=False, max_length=16, initial="no", label="Restart policy (containers)",
        help_text=launch.RESTART_HELP,
    )  # fmt: skip

    def __init__(
        self, *args: Any, actor: Actor, tenant: Tenant, user: Any, preview: bool = False, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.tenant = tenant
        images = Image.objects.restrict(actor).filter(status=ImageStatus.ACTIVE)
        self.fields["image"].queryset = (  # type: ignore[attr-defined]
            images.filter(Q(owner__isnull=True) | Q(owner=tenant))
            .select_related("owner")
            .prefetch_related("artifacts")
        )
        self.fields["flavor"].queryset = Flavor.objects.restrict(actor).filter(  # type: ignore[attr-defined]
            Q(is_public=True) | Q(tenant=tenant)
        )
        self.fields["ssh_keys"].queryset = SSHKey.objects.filter(user=user)  # type: ignore[attr-defined]
        groups = SecurityGroup.objects.filter(tenant=tenant).order_by("name")
        self.fields["security_groups"].queryset = groups  # type: ignore[attr-defined]
        self.fields["security_groups"].label_from_instance = lambda g: g.name  # type: ignore[attr-defined]
        self.fields["networks"].queryset = Network.objects.filter(tenant=tenant).order_by("name")  # type: ignore[attr-defined]
        self.fields["networks"].label_from_instance = lambda n: f"{n.name} ({n.cidr})"  # type: ignore[attr-defined]
        if preview:  # the preview only needs what placement depends on
            self.fields["name"].required = False

    def clean_name(self) -> str:
        """A live instance of the tenant with the same name is refused here, next to the field
        (the preview asks as the user types), not only by the database on submit."""
        name: str = self.cleaned_data["name"]
        if name and Instance.objects.live().filter(tenant=self.tenant, name=name).exists():
            raise forms.ValidationError(
                f"Tenant {self.tenant.slug} already has an instance named {name}; choose another name."
            )
        return name

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        image, flavor = data.get("image"), data.get("flavor")
        if image is not None and flavor is not None:
            short = [
                f"{need} {unit} of {what} (this flavor has {has} {unit})"
                for what, need, has, unit in (
                    ("memory", image.min_ram_mb, flavor.ram_mb, "MiB"),
                    ("disk", image.min_disk_gb, flavor.disk_gb, "GiB"),
                )
                if has < need
            ]
            if short:
                self.add_error("flavor", f"Image {image} needs at least {' and '.join(short)}.")
        self._clean_overrides(data)
        return data

    def _clean_overrides(self, data: dict[str, Any]) -> None:
        """The API's rules (portal/cloud/launch.py); env values never appear in an error."""
        try:
            data["command"] = shlex.split(data.get("command") or "")
        except ValueError as exc:
            self.add_error("command", f"Cannot split the command: {exc}.")
            data["command"] = []
        env, problem = launch.parse_env_lines(data.get("env") or "")
        data["env"] = env
        data["restart_policy"] = data.get("restart_policy") or "no"
        checks = {
            "command": launch.command_error(data["command"]),
            "env": problem or launch.env_error(env),
            "workdir": launch.workdir_error(data.get("workdir") or ""),
            "user": launch.user_error(data.get("user") or ""),
            "restart_policy": launch.restart_policy_error(data["restart_policy"]),
        }
        for field, error in checks.items():
            if error:
                self.add_error(field, error)

    #: fields the preview does not depend on: their errors do not stop it
    PREVIEW_ONLY_NEEDS = ("image", "flavor", "kind")

    def previewable(self) -> bool:
        """Whether placement can be previewed: the fields it depends on are valid."""
        self.is_valid()
        return not any(f in self.errors for f in self.PREVIEW_ONLY_NEEDS) and not self.non_field_errors()

    def to_request(self) -> placement.Request:
        data = self.cleaned_data
        return placement.Request(
            tenant=self.tenant,
            name=data.get("name") or "preview",
            image=data["image"],
            flavor=data["flavor"],
            requested_kind=data["kind"],
            ssh_keys=tuple(k.public_key for k in data.get("ssh_keys") or ()),
            user_data=data.get("user_data") or "",
            command=tuple(data.get("command") or ()),
            env=tuple((data.get("env") or {}).items()),
            workdir=data.get("workdir") or "",
            run_as=data.get("user") or "",
            restart_policy=data.get("restart_policy") or "no",
            security_groups=tuple(data.get("security_groups") or ()),
            networks=tuple(data.get("networks") or ()),
        )


class SnapshotForm(NoSuffix, forms.Form):
    name = forms.CharField(max_length=63, validators=[name_validator], label="Snapshot name")

    #: ids of the fields; the detail page holds several forms with a "name" field
    id_prefix = "snapshot"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("auto_id", f"{self.id_prefix}-%s")
        super().__init__(*args, **kwargs)


class RevertForm(NoSuffix, forms.Form):
    """The snapshot to go back to, picked from the VM's ``available`` Snapshot rows (a GET form whose
    answer is a confirmation page); an unknown name is refused here, before anything is sent."""

    name = forms.ChoiceField(label="Snapshot to revert to")

    def __init__(self, *args: Any, names: list[str], of: str = "this VM", **kwargs: Any) -> None:
        kwargs.setdefault("auto_id", "revert-%s")
        super().__init__(*args, **kwargs)
        field = self.fields["name"]
        field.choices = [(n, n) for n in names]  # type: ignore[attr-defined]
        field.error_messages["invalid_choice"] = f"No snapshot named %(value)s has been taken of {of}."
        if not names:
            field.widget.attrs["disabled"] = True
            field.help_text = "No snapshots yet: take one first."

    def error_text(self) -> str:
        """Why the form is invalid, as the page says it."""
        return " ".join(str(e) for e in self.errors.get("name", ())) or "Check the snapshot to revert to."


class PublishForm(NoSuffix, forms.Form):
    """A VM's disk as a new private image of its tenant."""

    name = forms.CharField(max_length=100, validators=[image_naming.name_validator], label="Image name")
    version = forms.CharField(max_length=40, validators=[image_naming.version_validator], label="Version")
    description = forms.CharField(required=False, max_length=2000, label="Description")

    def __init__(self, *args: Any, tenant: Any, **kwargs: Any) -> None:
        kwargs.setdefault("auto_id", "publish-%s")
        super().__init__(*args, **kwargs)
        self.tenant = tenant

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        name, version = data.get("name"), data.get("version")
        if name and version and Image.objects.filter(owner=self.tenant, name=name, version=version).exists():
            self.add_error("version", f"{name}:{version} already exists in tenant {self.tenant.slug}.")
        return data


class InstanceFilterForm(NoSuffix, forms.Form):
    """Filters of instance lists; invalid values are reported and ignored."""

    q = forms.CharField(required=False, max_length=63, label="Name contains")
    state = forms.ChoiceField(
        required=False,
        choices=[("", "Any live state"), *((s, s) for s in VmState.values)],
        label="State",
    )
    kind = forms.ChoiceField(required=False, choices=[("", "Any kind"), *Kind.choices], label="Kind")


class OpsInstanceFilterForm(InstanceFilterForm):
    tenant = forms.ModelChoiceField(
        queryset=Tenant.objects.all(), required=False, to_field_name="slug", empty_label="Any tenant"
    )
    node = forms.ModelChoiceField(
        queryset=ComputeNode.objects.all(), required=False, to_field_name="name", empty_label="Any node"
    )


class EventFilterForm(NoSuffix, forms.Form):
    action = forms.CharField(required=False, max_length=100, label="Action starts with")
    outcome = forms.ChoiceField(required=False, choices=[("", "Any outcome"), *Outcome.choices])
    q = forms.CharField(required=False, max_length=100, label="Text contains")


class OpsEventFilterForm(EventFilterForm):
    tenant = forms.ModelChoiceField(
        queryset=Tenant.objects.all(), required=False, to_field_name="slug", empty_label="Any tenant"
    )


class SSHKeyForm(NoSuffix, forms.ModelForm):  # type: ignore[type-arg]
    class Meta:
        model = SSHKey
        fields = ["name", "public_key"]
        widgets = {"public_key": forms.Textarea(attrs={"rows": 3, "spellcheck": "false"})}
        help_texts = {"public_key": "One line from a .pub file, e.g. ~/.ssh/id_ed25519.pub."}

    def __init__(self, *args: Any, user: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.user = user

    # the model's unique constraints name the user, who is not a form field: check them here
    def clean_name(self) -> str:
        name: str = self.cleaned_data["name"]
        if SSHKey.objects.filter(user=self.user, name=name).exists():
            raise forms.ValidationError("You already have a key with this name.")
        return name

    def clean_public_key(self) -> str:
        key: str = self.cleaned_data["public_key"].strip()
        validate_ssh_public_key(key)
        fingerprint = ssh_key_fingerprint(key)
        if SSHKey.objects.filter(user=self.user, fingerprint=fingerprint).exists():
            raise forms.ValidationError(f"You already added this key ({fingerprint}).")
        return key


class TokenForm(NoSuffix, forms.Form):
    name = forms.CharField(max_length=100)
    tenant = forms.ChoiceField(label="Acts in tenant")
    expires_in_days = forms.IntegerField(
        min_value=1, initial=30, label="Expires in (days)", help_text="The key stops working after this."
    )

    OPERATOR = "__operator__"

    def __init__(
        self, *args: Any, tenants: list[Tenant], is_operator: bool, user_id: int | None = None, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.user_id = user_id
        choices = [(t.slug, t.slug) for t in tenants]
        if is_operator:
            choices.append((self.OPERATOR, "none: operator token (all tenants)"))
        self.fields["tenant"].choices = choices  # type: ignore[attr-defined]
        limit = settings.SKYPORT_TOKEN_MAX_DAYS
        self.fields["expires_in_days"].validators.append(
            MaxValueValidator(limit, f"At most {limit} days (SKYPORT_TOKEN_MAX_DAYS).")
        )
        self.fields["expires_in_days"].widget.attrs["max"] = limit

    def clean_name(self) -> str:
        """Names tell tokens apart on the list and in "Revoke token X?": one live token per name."""
        name: str = self.cleaned_data["name"].strip()
        if self.user_id is None:
            return name
        live = APIToken.objects.filter(user_id=self.user_id, name=name, revoked_at__isnull=True)
        if live.exists():
            raise forms.ValidationError(f"You already have a token named {name}; choose another name.")
        return name


class QuotaForm(NoSuffix, forms.ModelForm):  # type: ignore[type-arg]
    class Meta:
        model = Quota
        fields = list(Quota.LIMITS)
        labels = {"ram_mb": "Memory (MiB)", "disk_gb": "Disk (GiB)", "vcpus": "vCPUs", "vms": "VMs"}


class NodeTenancyForm(NoSuffix, forms.Form):
    owner = forms.ModelChoiceField(
        queryset=Tenant.objects.filter(active=True),
        to_field_name="slug",
        required=False,
        empty_label="nobody: shared",
        label="Dedicate to",
    )


class NetworkForm(NoSuffix, forms.Form):
    """A new network of the current tenant: the API's CIDR and prefix rules (``portal.cloud.networks``);
    an overlap, a taken name or the quota are the service's Conflict."""

    name = forms.CharField(max_length=63, validators=[name_validator], help_text=NAME_RULE)
    cidr = forms.CharField(
        max_length=43,
        required=False,
        label="CIDR",
        help_text="Your own subnet inside the pool, e.g. 198.18.40.0/24; empty: the pool chooses one.",
    )
    prefix_length = forms.IntegerField(
        required=False,
        label="Prefix length",
        help_text="Without a CIDR: the size of the subnet the pool gives (empty: 24).",
    )

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("auto_id", "network-%s")
        super().__init__(*args, **kwargs)

    def clean_cidr(self) -> str:
        text: str = self.cleaned_data.get("cidr") or ""
        try:
            return str(networks.parse_cidr(text)) if text else ""
        except networks.InvalidNetwork as exc:
            raise forms.ValidationError(str(exc)) from None

    def clean_prefix_length(self) -> int | None:
        value: int | None = self.cleaned_data.get("prefix_length")
        try:
            return networks.check_prefix(value) if value is not None else None
        except networks.InvalidNetwork as exc:
            raise forms.ValidationError(str(exc)) from None

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        if data.get("cidr") and data.get("prefix_length") is not None:
            self.add_error("prefix_length", "Give either a CIDR or a prefix length, not both.")
        return data


class SecurityGroupForm(NoSuffix, forms.Form):
    """A new security group of the current tenant (a taken name is the service's Conflict)."""

    name = forms.CharField(max_length=63, validators=[name_validator], help_text=NAME_RULE)
    description = forms.CharField(max_length=255, required=False)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("auto_id", "group-%s")
        super().__init__(*args, **kwargs)


class RuleForm(NoSuffix, forms.Form):
    """One allow rule of ``group``, checked by the API's own ``secgroups.validate_rule``.

    ``groups`` are the tenant's groups (the remote group choices), read once for all the
    forms of a page.  A first port without a last one means that one port.
    """

    direction = forms.ChoiceField(choices=[(d, d) for d in secgroups.DIRECTIONS], initial="ingress")
    protocol = forms.ChoiceField(choices=[(p, p) for p in secgroups.PROTOCOLS], initial="tcp")
    port_min = forms.IntegerField(
        required=False,
        label="First port",
        help_text="tcp/udp; empty: every port",
        min_value=1,
        max_value=65535,
    )
    port_max = forms.IntegerField(
        required=False,
        label="Last port",
        help_text="empty: the first port only",
        min_value=1,
        max_value=65535,
    )
    remote_cidr = forms.CharField(
        required=False, max_length=18, label="From/to CIDR", help_text="e.g. 198.18.0.0/24; empty: anyone"
    )
    remote_group = forms.ChoiceField(required=False, label="Or members of group")

    def __init__(
        self, *args: Any, group: SecurityGroup, groups: Sequence[SecurityGroup], **kwargs: Any
    ) -> None:
        kwargs.setdefault("auto_id", f"rule-{group.pk}-%s")
        super().__init__(*args, **kwargs)
        self.group = group
        self._groups = {str(g.pk): g for g in groups}
        self.fields["remote_group"].choices = [("", "none"), *((k, g.name) for k, g in self._groups.items())]  # type: ignore[attr-defined]

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        if self.errors:
            return data
        if data.get("port_min") is not None and data.get("port_max") is None:
            data["port_max"] = data["port_min"]
        data["remote_group"] = self._groups.get(data.get("remote_group") or "")
        try:
            data["remote_cidr"] = secgroups.validate_rule(
                self.group,
                data["protocol"],
                data.get("port_min"),
                data.get("port_max"),
                data.get("remote_cidr", ""),
                data["remote_group"],
            )
        except ValueError as exc:
            self.add_error(self._field_of(str(exc)), str(exc))
        return data

    @staticmethod
    def _field_of(message: str) -> str | None:
        """The field a ``validate_rule`` sentence is about (None: the rule as a whole)."""
        if message.startswith("Give"):  # remote CIDR and group both given
            return None
        if message.startswith("Port ranges"):
            return "protocol"
        return next((f for f in ("remote_cidr", "remote_group", "port_max") if f in message), None)


class InstanceGroupsForm(NoSuffix, forms.Form):
    """Exactly the security groups an instance has (from its tenant's ``groups``)."""

    security_groups = forms.MultipleChoiceField(
        required=False,
        widget=forms.CheckboxSelectMultiple,
        label="Security groups",
        help_text="Traffic no rule of these groups allows is dropped; none chosen: nothing in or out.",
    )

    def __init__(self, *args: Any, groups: Sequence[SecurityGroup], **kwargs: Any) -> None:
        kwargs.setdefault("auto_id", "groups-%s")
        super().__init__(*args, **kwargs)
        self._groups = {str(g.pk): g for g in groups}
        field = self.fields["security_groups"]
        field.choices = [(k, g.name) for k, g in self._groups.items()]  # type: ignore[attr-defined]
        field.error_messages["invalid_choice"] = "No security group %(value)s in this tenant."

    def chosen(self) -> list[SecurityGroup]:
        return [self._groups[k] for k in self.cleaned_data["security_groups"]]


class PortForm(NoSuffix, forms.Form):
    """A port of the instance to publish on its node's external address."""

    protocol = forms.ChoiceField(choices=[("tcp", "tcp"), ("udp", "udp")], initial="tcp")
    port = forms.IntegerField(label="Instance port", min_value=1, max_value=65535)
    external_port = forms.IntegerField(
        required=False,
        label="External port",
        help_text="Optional: one of the node's published range; empty: the first free one",
        min_value=1,
        max_value=65535,
    )

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("auto_id", "port-%s")
        super().__init__(*args, **kwargs)


class MoveForm(NoSuffix, forms.Form):
    """The node to move a volume to, picked from the nodes ``portal.storage.moves.check_target`` allows."""

    node = forms.ChoiceField(label="Move to node")

    def __init__(self, *args: Any, nodes: list[str], **kwargs: Any) -> None:
        kwargs.setdefault("auto_id", "move-%s")
        super().__init__(*args, **kwargs)
        field = self.fields["node"]
        field.choices = [(n, n) for n in nodes]  # type: ignore[attr-defined]
        field.error_messages["invalid_choice"] = "Node %(value)s is not one this volume can move to."
        if not nodes:
            field.widget.attrs["disabled"] = True
            field.help_text = "No other node this volume can move to."


class BackupPolicyForm(NoSuffix, forms.Form):
    """A volume's scheduled backups (the same bounds as the API's ``BackupPolicySerializer``)."""

    interval_hours = forms.IntegerField(min_value=1, max_value=8760, label="Every (hours)")
    retention = forms.IntegerField(min_value=1, max_value=100, label="Keep (backups)")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("auto_id", "policy-%s")
        super().__init__(*args, **kwargs)


class RestoreForm(NoSuffix, forms.Form):
    """A backup (picked from the volume's available ones) restored into a new volume: its name, and
    optionally its node (default as for a create)."""

    backup = forms.ChoiceField(label="Backup to restore")
    name = forms.CharField(max_length=63, validators=[name_validator], label="New volume name")
    node = forms.CharField(required=False, max_length=63, label="Node (optional)")

    def __init__(self, *args: Any, backups: Sequence[tuple[str, str]], **kwargs: Any) -> None:
        kwargs.setdefault("auto_id", "restore-%s")
        super().__init__(*args, **kwargs)
        field = self.fields["backup"]
        field.choices = list(backups)  # type: ignore[attr-defined]
        field.error_messages["invalid_choice"] = "No available backup %(value)s of this volume."
        if not backups:
            field.widget.attrs["disabled"] = True
            field.help_text = "No available backup yet: back up first."
