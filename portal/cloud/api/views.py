from __future__ import annotations

import dataclasses
from typing import Any

from django.conf import settings
from django.db import models
from django.http import HttpResponseBase, StreamingHttpResponse
from django.shortcuts import get_object_or_404
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import extend_schema
from rest_framework import permissions, status
from rest_framework.decorators import action
from rest_framework.exceptions import PermissionDenied, ValidationError
from rest_framework.request import Request
from rest_framework.response import Response

from compute.spec import ConsoleMode
from portal.api.schema import EXTRA_ERRORS
from portal.api.viewsets import ScopedViewSet
from portal.audit.record import describe
from portal.cloud import disclosure, evacuation, forwards, networks, placement, secgroups, services
from portal.cloud import logs as cloud_logs
from portal.cloud.api import serializers
from portal.cloud.choices import VmState
from portal.cloud.models import (
    ComputeNode,
    Flavor,
    Instance,
    Network,
    PublishedPort,
    SecurityGroup,
    SecurityGroupRule,
)
from portal.console import services as console_services
from portal.console.api import serializers as console_api
from portal.errors import Conflict
from portal.images.api.serializers import ImageSerializer
from portal.storage import backups as backup_service
from portal.storage import snapshots
from portal.storage.api.backup_actions import UUID, BackupEvents, BackupViewSet
from portal.storage.api.serializers import (
    BackupPolicySerializer,
    BackupSerializer,
    RestoreSerializer,
    SnapshotCreateSerializer,
    SnapshotSerializer,
    VolumeSerializer,
)
from portal.tenancy.choices import Role


class FlavorViewSet(ScopedViewSet):
    """Public flavors and your tenants' private ones; operators manage them."""

    queryset = Flavor.objects.select_related("tenant")
    serializer_class = serializers.FlavorSerializer
    operator_actions = frozenset({"create", "update", "partial_update", "destroy"})
    filterset_fields = {
        "name": ["exact"],
        "vcpus": ["exact", "gte", "lte"],
        "ram_mb": ["gte", "lte"],
        "is_public": ["exact"],
        "tenant__slug": ["exact"],
    }
    search_fields = ["name"]
    ordering_fields = ["name", "vcpus", "ram_mb", "disk_gb"]


class IsOperator(permissions.BasePermission):
    message = "Only operators can see and manage compute nodes."

    def has_permission(self, request: Request, view: Any) -> bool:
        return bool(request.user and request.user.is_authenticated and view.actor.is_operator)


class ComputeNodeViewSet(ScopedViewSet):
    """Compute nodes (operators only)."""

    queryset = ComputeNode.objects.select_related("owner")
    serializer_class = serializers.ComputeNodeSerializer
    permission_classes = [IsOperator]
    filterset_fields = {
        "tenancy": ["exact"],
        "status": ["exact"],
        "owner__slug": ["exact"],
        "name": ["exact"],
    }
    search_fields = ["name"]
    ordering_fields = ["name", "status", "last_heartbeat"]
    lookup_field = "name"

    def get_queryset(self) -> models.QuerySet[Any]:
        return ComputeNode.objects.select_related("owner")

    def tenant_id_of(self, obj: models.Model) -> int | None:
        return None

    def perform_update(self, serializer: Any) -> None:
        data = serializer.validated_data
        if "tenancy" in data or "owner" in data:
            owner = data.pop("owner", serializer.instance.owner)
            if data.pop("tenancy", None) == "shared":
                owner = None
            services.set_node_tenancy(serializer.instance, owner)
            serializer.instance.refresh_from_db()
        super().perform_update(serializer)

    @extend_schema(request=None, responses={202: serializers.EvacuationReportSerializer})
    @action(detail=True, methods=["post"], url_path="evacuate")
    def evacuate(self, request: Request, name: str | None = None) -> Response:
        """Rebuild the instances of a down node on other nodes (409 while it may still run them).

        Root disks on the node are lost: VMs are rebuilt from their image, containers from their
        image and launch config; volumes (local files on the node) are marked error.  Each
        instance's outcome is in ``instances``; one no node can take goes to ``error``.
        """
        node = self.get_object()
        describe(request, "computenode.evacuate", node)
        report = evacuation.evacuate(node, request.user)
        describe(request, "computenode.evacuate", node, message=report.summary())
        return Response(report.as_dict(), status=status.HTTP_202_ACCEPTED)

    @extend_schema(request=None, responses={202: serializers.EvacuationReportSerializer})
    @action(detail=True, methods=["post"], url_path="drain")
    def drain(self, request: Request, name: str | None = None) -> Response:
        """Disable a live node for new placements and move its containers cold to other nodes.

        VMs are migrated cold with their disk (shut down cleanly, or they stay; started again on
        the target if they ran); a VM with volumes or snapshots, or one no node can take, stays
        (listed with the reason).
        """
        node = self.get_object()
        describe(request, "computenode.drain", node)
        report = evacuation.drain(node, request.user)
        describe(request, "computenode.drain", node, message=report.summary())
        return Response(report.as_dict(), status=status.HTTP_202_ACCEPTED)

    def perform_destroy(self, instance: models.Model) -> None:
        assert isinstance(instance, ComputeNode)
        if instance.instances.live().exists():
            raise Conflict(f"Node {instance.name} still hosts instances; move or delete them first.")
        super().perform_destroy(instance)


class InstanceViewSet(BackupViewSet):
    """Instances of your tenants.  Members create, act on and delete them; viewers read.

    Create, actions and delete return 202: the node does the work and the
    instance's ``task_state`` shows it in flight.
    """

    queryset = Instance.objects.select_related("tenant", "flavor", "node", "created_by", "image")
    serializer_class = serializers.InstanceSerializer
    write_role = Role.MEMBER
    filterset_fields = {
        "tenant__slug": ["exact"],
        "kind": ["exact"],
        "vm_state": ["exact"],
        "task_state": ["exact", "isnull"],
        "power_state": ["exact"],
        "node__name": ["exact"],
        "name": ["exact", "icontains"],
    }
    search_fields = ["name", "image__name"]
    ordering_fields = ["name", "created_at", "vm_state", "kind"]
    backup_source = "instance"
    backup_events = BackupEvents(
        start="instance.backup",
        delete="instance.backup.delete",
        restore="instance.backup.restore",
        policy="instance.backup_policy",
    )

    def get_queryset(self) -> models.QuerySet[Any]:
        qs = super().get_queryset()
        if self.request.query_params.get("vm_state") != VmState.DELETED and self.action == "list":
            qs = qs.live()  # type: ignore[attr-defined]
        return qs

    def _request(self, data: dict[str, Any]) -> placement.Request:
        self.check_role(data["tenant"].pk, self.write_role)
        return placement.Request(
            tenant=data["tenant"],
            name=data["name"],
            image=data["image"],
            flavor=data["flavor"],
            requested_kind=data["requested_kind"],
            anti_affinity_group=data.get("anti_affinity_group", ""),
            ssh_keys=tuple(data.get("ssh_key_ids", ())),
            user_data=data.get("user_data", ""),
            command=tuple(data.get("command", ())),
            env=tuple(data.get("env", {}).items()),
            workdir=data.get("workdir", ""),
            run_as=data.get("run_as", ""),
            restart_policy=data.get("restart_policy", "no"),
            security_groups=tuple(data.get("security_group_ids", ())),
            networks=tuple(data.get("networks", ())),
            volumes=tuple((str(v["volume"]), v["mount_path"]) for v in data.get("volumes", ())),
        )

    @extend_schema(responses={202: serializers.InstanceSerializer})
    def create(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        serializer = self.get_serializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        describe(request, "instance.create", tenant_id=serializer.validated_data["tenant"].pk)
        instance = services.create_instance(self._request(serializer.validated_data), request.user)
        describe(request, "instance.create", instance, message=instance.isolation_reason)
        serializer.instance = instance  # as DRF's save() does: its fields are built once, not twice
        return Response(serializer.data, status=status.HTTP_202_ACCEPTED)

    @extend_schema(request=serializers.InstanceSerializer, responses={200: serializers.PreviewSerializer})
    @action(detail=False, methods=["post"], url_path="preview")
    def preview(self, request: Request) -> Response:
        """Dry run: which kind and node the portal would choose, why, and the quota effect."""
        serializer = self.get_serializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        result = placement.preview(self._request(serializer.validated_data))
        body = dataclasses.asdict(result)
        body["rejected"] = disclosure.rejected_for(self.actor, result.rejected)
        return Response(body)

    @extend_schema(
        request=serializers.InstanceActionSerializer, responses={202: serializers.InstanceSerializer}
    )
    @action(detail=True, methods=["post"], url_path="actions")
    def actions(self, request: Request, pk: str | None = None) -> Response:
        """start | stop | reboot | pause | resume | snapshot | revert (202, task_state shows progress)."""
        instance = self.get_object()
        body = serializers.InstanceActionSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        describe(request, f"instance.{body.validated_data['action']}", instance)
        snapshots.act(instance, body.validated_data["action"], body.validated_data["params"], request.user)
        instance.refresh_from_db()
        return Response(self.get_serializer(instance).data, status=status.HTTP_202_ACCEPTED)

    @extend_schema(request=serializers.ResizeSerializer, responses={202: serializers.InstanceSerializer})
    @action(detail=True, methods=["post"], url_path="resize")
    def resize(self, request: Request, pk: str | None = None) -> Response:
        """Give a stopped VM another flavor (quota and its node's capacity checked; the disk only grows)."""
        instance = self.get_object()
        body = serializers.ResizeSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        describe(request, "instance.resize", instance)
        flavor = Flavor.objects.restrict(self.actor).filter(pk=body.validated_data["flavor"]).first()
        if flavor is None:
            raise ValidationError({"flavor": f"No flavor {body.validated_data['flavor']} that you may use."})
        instance = services.resize(instance, flavor, request.user)
        return Response(self.get_serializer(instance).data, status=status.HTTP_202_ACCEPTED)

    @extend_schema(methods=["get"], responses={200: SnapshotSerializer(many=True)})
    @extend_schema(methods=["post"], request=SnapshotCreateSerializer, responses={202: SnapshotSerializer})
    @action(
        detail=True, methods=["get", "post"], url_path="snapshots", pagination_class=None, filter_backends=[]
    )
    def snapshots(self, request: Request, pk: str | None = None) -> Response:
        """The VM's disk snapshots, oldest first; POST {"name"} takes one (202, ``creating``)."""
        instance = self.get_object()
        if request.method == "GET":
            rows = instance.snapshots.all()
            return Response(SnapshotSerializer(rows, many=True).data)
        body = SnapshotCreateSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        describe(request, "snapshot.create", instance, message=f"snapshot {body.validated_data['name']}")
        snap = snapshots.take(instance, body.validated_data["name"], request.user)
        return Response(SnapshotSerializer(snap).data, status=status.HTTP_202_ACCEPTED)

    @extend_schema(
        methods=["get"], responses={200: BackupSerializer(many=True)}, summary="The disk's backups"
    )
    @extend_schema(methods=["post"], request=None, responses={202: BackupSerializer}, summary="Back up now")
    @action(
        detail=True, methods=["get", "post"], url_path="backups", pagination_class=None, filter_backends=[]
    )
    def backups(self, request: Request, pk: str | None = None) -> Response:
        """The VM's root-disk backups, newest first; POST backs the stopped VM's disk up (202)."""
        return self.list_or_start_backup(request, backup_service.start_instance)

    @extend_schema(request=RestoreSerializer, responses={202: VolumeSerializer})
    @action(detail=True, methods=["post"], url_path=rf"backups/(?P<bid>{UUID})/restore")
    def restore_backup(self, request: Request, pk: str | None = None, bid: str = "") -> Response:
        """Restore a disk backup into a new qcow2 volume (quota and node checked as a create)."""
        return self.restore_from(request, bid)

    @extend_schema(methods=["get"], responses={200: BackupPolicySerializer})
    @extend_schema(methods=["post"], request=BackupPolicySerializer, responses={200: BackupPolicySerializer})
    @extend_schema(methods=["delete"], responses={204: None})
    @action(detail=True, methods=["get", "post", "delete"], url_path="backup-policy")
    def backup_policy(self, request: Request, pk: str | None = None) -> Response:
        """The VM disk's scheduled backups: every ``interval_hours``, keep ``retention`` (POST sets,
        DELETE stops them; existing backups stay).  A VM that is not stopped is skipped at that tick."""
        return self.get_set_or_remove_policy(request)

    @extend_schema(methods=["get"], responses={200: SnapshotSerializer})
    @extend_schema(methods=["delete"], responses={202: SnapshotSerializer})
    @action(detail=True, methods=["get", "delete"], url_path=r"snapshots/(?P<name>[a-z0-9-]{1,63})")
    def snapshot(self, request: Request, name: str, pk: str | None = None) -> Response:
        """One snapshot; DELETE removes it on the node (202, ``deleting``; 404 when it is not listed)."""
        instance = self.get_object()
        if request.method == "GET":
            return Response(SnapshotSerializer(snapshots.get(instance, name)).data)
        describe(request, "snapshot.delete", instance, message=f"snapshot {name}")
        snap = snapshots.delete(instance, name, request.user)
        return Response(SnapshotSerializer(snap).data, status=status.HTTP_202_ACCEPTED)

    @extend_schema(request=None, responses={202: SnapshotSerializer})
    @action(detail=True, methods=["post"], url_path=r"snapshots/(?P<name>[a-z0-9-]{1,63})/revert")
    def revert_snapshot(self, request: Request, name: str, pk: str | None = None) -> Response:
        """Return the VM to this snapshot (202; 404 when the instance has no such snapshot)."""
        instance = self.get_object()
        describe(request, "snapshot.revert", instance, message=f"snapshot {name}")
        snap = snapshots.revert(instance, name, request.user)
        return Response(SnapshotSerializer(snap).data, status=status.HTTP_202_ACCEPTED)

    @extend_schema(
        request=serializers.InstanceSecurityGroupsSerializer,
        responses={200: serializers.SecurityGroupSerializer(many=True)},
    )
    @action(
        detail=True,
        methods=["get", "post"],
        url_path="security-groups",
        pagination_class=None,
        filter_backends=[],
    )
    def security_groups(self, request: Request, pk: str | None = None) -> Response:
        """The instance's security groups; POST sets exactly these (applied live on its node)."""
        instance = self.get_object()
        if request.method == "POST":
            self.check_role(instance.tenant_id, self.write_role)
            body = serializers.InstanceSecurityGroupsSerializer(data=request.data)
            body.is_valid(raise_exception=True)
            ids = body.validated_data["security_groups"]
            groups = list(SecurityGroup.objects.restrict(self.actor).filter(pk__in=ids))
            missing = sorted(set(ids) - {g.pk for g in groups})
            if missing:
                raise ValidationError({"security_groups": [f"No security group with id {missing[0]}."]})
            secgroups.set_groups(instance, groups)
            describe(request, "instance.security_groups", instance, message=", ".join(g.name for g in groups))
        groups = instance.security_groups.prefetch_related("rules")
        ctx = {"request": request}
        return Response(serializers.SecurityGroupSerializer(groups, many=True, context=ctx).data)

    @extend_schema(responses={200: serializers.ConsoleSerializer})
    @action(detail=True, methods=["get"], url_path="console")
    def console(self, request: Request, pk: str | None = None) -> Response:
        """Tail of the console log; each read asks the node for a fresh one (at most every 2 s)."""
        instance = self.get_object()
        return Response(serializers.ConsoleSerializer(services.console(instance)).data)

    @extend_schema(
        request=console_api.ConsoleSessionRequestSerializer,
        responses={201: console_api.ConsoleTicketSerializer},
    )
    @action(detail=True, methods=["post"], url_path="console/sessions")
    def console_sessions(self, request: Request, pk: str | None = None) -> Response:
        """A single-use ticket (30 s) for an interactive console over a WebSocket (docs/console.md).

        Viewers may open ``view`` sessions of a VM's serial console; ``write``
        and ``exec`` (a shell in a container) need the member role.
        """
        # not get_object(): its write check wants a member, and a viewer may watch
        instance = get_object_or_404(self.get_queryset().select_related("node"), pk=pk)
        body = console_api.ConsoleSessionRequestSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        mode = ConsoleMode(body.validated_data["mode"])
        describe(request, f"console.{mode.value}", instance)
        try:
            session, ticket = console_services.mint(
                self.actor, request.user, instance, mode, tuple(body.validated_data.get("command", ()))
            )
        except console_services.RoleTooLow as exc:
            raise PermissionDenied(str(exc)) from None
        base = settings.SKYPORT_CONSOLE_WS_URL or (
            ("wss://" if request.is_secure() else "ws://") + request.get_host()
        )
        data = {
            "session": session.pk,
            "mode": session.mode,
            "ticket": ticket,
            "expires_at": session.expires_at,
            "ws_url": f"{base}/ws/console/{ticket}/",
        }
        return Response(console_api.ConsoleTicketSerializer(data).data, status=status.HTTP_201_CREATED)

    @extend_schema(
        request=console_api.ExecRequestSerializer,
        responses={200: console_api.ExecResultSerializer},
    )
    @action(detail=True, methods=["post"], url_path="exec")
    def exec(self, request: Request, pk: str | None = None) -> Response:
        """Run a command in a running container: exit code and output (capped), killed at the timeout."""
        instance = self.get_object()
        body = console_api.ExecRequestSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        describe(request, "instance.exec", instance)
        data = body.validated_data
        answer = console_services.run_exec(
            instance, tuple(data["command"]), data["timeout"], data["max_bytes"]
        )
        if answer.result is None:
            return Response(
                {
                    "message": f"Node {instance.node} did not answer within {answer.waited:.0f} s.",
                    "code": "node_timeout",
                },
                status=status.HTTP_504_GATEWAY_TIMEOUT,
            )
        if answer.result.error:
            raise console_services.ConsoleRefused(answer.result.error)
        return Response(console_api.ExecResultSerializer(dataclasses.asdict(answer.result)).data)

    @extend_schema(
        parameters=[serializers.LogsQuerySerializer],
        responses={
            (200, "application/json"): serializers.LogsSerializer,
            (200, "application/x-ndjson"): OpenApiTypes.STR,
        },
        description=(
            "A container's stdout and stderr lines, oldest first, each with its time and stream; "
            "readable after it exited and, for `SKYPORT_LOG_RETENTION_HOURS` (72), after its delete. "
            "`follow=1` answers NDJSON instead: one `{time, stream, text}` object a line, new lines "
            "as they come (about once a second), for at most `SKYPORT_LOG_FOLLOW_SECONDS` (60), "
            'ending with `{"end": "<why>"}`; go on with `since=` the last time. '
            "A VM has no such logs (409): read its serial console."
        ),
        # a VM or a node without logs (409), too many follows (429), a node that does not answer (504)
        extensions={EXTRA_ERRORS: ["409", "429", "504"]},
    )
    @action(detail=True, methods=["get"], url_path="logs")
    def logs(self, request: Request, pk: str | None = None) -> HttpResponseBase:
        """A container's logs: ``?tail=N&since=<RFC 3339>&stream=stdout|stderr&follow=1``."""
        instance = self.get_object()
        params = serializers.LogsQuerySerializer(data=request.query_params)
        params.is_valid(raise_exception=True)
        data = params.validated_data
        query = cloud_logs.Query(data.get("tail"), data.get("since", ""), data.get("stream", ""))
        try:
            if data["follow"]:
                body = cloud_logs.follow(instance, query)
                response = StreamingHttpResponse(body, content_type="application/x-ndjson")
                response["Cache-Control"] = "no-cache"
                response["X-Accel-Buffering"] = "no"  # a proxy must pass lines on as they come
                return response
            answer = cloud_logs.read(instance, query)
        except cloud_logs.NodeSilent as exc:
            return Response({"message": str(exc), "code": exc.code}, status=status.HTTP_504_GATEWAY_TIMEOUT)
        except cloud_logs.TooManyFollows as exc:
            return Response({"message": str(exc), "code": exc.code}, status=status.HTTP_429_TOO_MANY_REQUESTS)
        lines = [{"time": t, "stream": s, "text": x} for t, s, x in answer.lines]
        out = {
            "lines": lines,
            "truncated": answer.truncated,
            "retained": answer.retained,
            "node": answer.node,
        }
        return Response(serializers.LogsSerializer(out).data)

    @extend_schema(responses={200: serializers.StatsSerializer})
    @action(detail=True, methods=["get"], url_path="stats")
    def stats(self, request: Request, pk: str | None = None) -> Response:
        """Recent CPU and memory use, one sample per node heartbeat."""
        instance = self.get_object()
        return Response(serializers.StatsSerializer(services.stats(instance)).data)

    @extend_schema(request=serializers.PublishSerializer, responses={202: ImageSerializer})
    @action(detail=True, methods=["post"], url_path="publish")
    def publish(self, request: Request, pk: str | None = None) -> Response:
        """Publish the VM's disk as a new private image of its tenant (202; the image imports)."""
        instance = self.get_object()
        body = serializers.PublishSerializer(data=request.data, context={"instance": instance})
        body.is_valid(raise_exception=True)
        describe(request, "instance.publish", instance)
        image = services.publish(instance, user=request.user, **body.validated_data)
        describe(request, "instance.publish", instance, message=f"publishing image {image} (id {image.pk})")
        return Response(
            ImageSerializer(image, context={"request": request}).data, status=status.HTTP_202_ACCEPTED
        )

    @extend_schema(responses={202: serializers.InstanceSerializer})
    def destroy(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        instance = self.get_object()
        describe(request, "instance.delete", instance)
        instance = services.delete_instance(instance, request.user)
        return Response(self.get_serializer(instance).data, status=status.HTTP_202_ACCEPTED)

    @extend_schema(request=serializers.InstanceRenameSerializer)
    def partial_update(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        return super().partial_update(request, *args, **kwargs)

    def perform_update(self, serializer: Any) -> None:
        if set(serializer.validated_data) - {"name"}:
            raise PermissionDenied("Only the name of an instance can be changed.")
        super().perform_update(serializer)


class NetworkViewSet(ScopedViewSet):
    """Networks of your tenants.  Members create and delete them; viewers read.

    Each tenant gets a ``default`` network on its first launch.  Instances
    choose networks at launch (``networks``: one NIC each, in order); a
    network in use cannot be deleted (409 names the instances).  Networks
    count against the tenant's ``networks`` quota.
    """

    queryset = Network.objects.select_related("tenant").prefetch_related("ports__instance")
    serializer_class = serializers.NetworkSerializer
    http_method_names = ["get", "post", "delete", "head", "options"]
    filterset_fields = {"tenant__slug": ["exact"], "name": ["exact"]}
    ordering_fields = ["name", "created_at"]

    @extend_schema(responses={201: serializers.NetworkSerializer})
    def create(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        serializer = self.get_serializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        data = serializer.validated_data
        self.check_role(data["tenant"].pk, self.write_role)
        describe(request, "network.create", tenant_id=data["tenant"].pk)
        net = networks.create_network(
            data["tenant"], data["name"], data.get("cidr", ""), data.get("prefix_length")
        )
        describe(request, "network.create", net, tenant_id=net.tenant_id, message=f"{net.name} {net.cidr}")
        return Response(self.get_serializer(net).data, status=status.HTTP_201_CREATED)

    def perform_destroy(self, instance: models.Model) -> None:
        assert isinstance(instance, Network)
        describe(self.request, "network.delete", instance, tenant_id=instance.tenant_id)
        networks.delete_network(instance)


class PublishedPortViewSet(ScopedViewSet):
    """Published ports of your tenants' instances: a tcp/udp port reachable at an address:port of its node.

    Members publish and unpublish; the node applies it at once.  Ports count
    against the tenant's ``published_ports`` quota and go with the instance.
    """

    queryset = PublishedPort.objects.select_related("tenant", "instance", "external__node")
    serializer_class = serializers.PublishedPortSerializer
    http_method_names = ["get", "post", "delete", "head", "options"]
    filterset_fields = {"instance": ["exact"], "protocol": ["exact"], "tenant__slug": ["exact"]}
    ordering_fields = ["created_at", "external_port"]

    @extend_schema(responses={201: serializers.PublishedPortSerializer})
    def create(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        serializer = self.get_serializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        data = serializer.validated_data
        instance = data["instance"]
        self.check_role(instance.tenant_id, self.write_role)
        row = forwards.publish(instance, data["protocol"], data["port"], data.get("external_port"))
        describe(request, "publishedport.create", row, tenant_id=row.tenant_id, message=str(row))
        return Response(self.get_serializer(row).data, status=status.HTTP_201_CREATED)

    def perform_destroy(self, instance: models.Model) -> None:
        assert isinstance(instance, PublishedPort)
        describe(
            self.request,
            "publishedport.delete",
            instance,
            tenant_id=instance.tenant_id,
            message=str(instance),
        )
        forwards.unpublish(instance)


class SecurityGroupViewSet(ScopedViewSet):
    """Security groups of your tenants: named allow rules attached to instances, changed live.

    Each tenant has a ``default`` group (all egress; ingress only from its
    members) that instances get when launched without groups.
    """

    queryset = SecurityGroup.objects.select_related("tenant").prefetch_related("rules")
    serializer_class = serializers.SecurityGroupSerializer
    filterset_fields = {"tenant__slug": ["exact"], "name": ["exact"]}
    ordering_fields = ["name", "created_at"]

    def perform_create(self, serializer: Any) -> None:
        data = serializer.validated_data
        self.check_role(data["tenant"].pk, self.write_role)
        group = secgroups.create_group(data["tenant"], data["name"], data.get("description", ""))
        serializer.instance = group
        describe(self.request, "securitygroup.create", group, tenant_id=group.tenant_id)

    def perform_destroy(self, instance: models.Model) -> None:
        assert isinstance(instance, SecurityGroup)
        describe(self.request, "securitygroup.delete", instance, tenant_id=instance.tenant_id)
        secgroups.delete_group(instance)


class SecurityGroupRuleViewSet(ScopedViewSet):
    """Rules of your tenants' security groups.  A change reaches the running instances within a second."""

    queryset = SecurityGroupRule.objects.select_related("group__tenant", "remote_group")
    serializer_class = serializers.SecurityGroupRuleSerializer
    http_method_names = ["get", "post", "delete", "head", "options"]
    filterset_fields = {"group": ["exact"], "direction": ["exact"]}
    ordering_fields = ["created_at"]

    def get_queryset(self) -> models.QuerySet[Any]:
        groups = SecurityGroup.objects.restrict(self.actor)
        return SecurityGroupRule.objects.select_related("group__tenant", "remote_group").filter(
            group__in=groups
        )

    def tenant_id_of(self, obj: models.Model) -> int | None:
        assert isinstance(obj, SecurityGroupRule)
        return obj.group.tenant_id

    def perform_create(self, serializer: Any) -> None:
        data = serializer.validated_data
        self.check_role(data["group"].tenant_id, self.write_role)
        rule = secgroups.add_rule(**data)
        serializer.instance = rule
        describe(self.request, "securitygrouprule.create", rule, tenant_id=rule.group.tenant_id)

    def perform_destroy(self, instance: models.Model) -> None:
        assert isinstance(instance, SecurityGroupRule)
        self.check_role(instance.group.tenant_id, self.write_role)
        describe(self.request, "securitygrouprule.delete", instance, tenant_id=instance.group.tenant_id)
        secgroups.remove_rule(instance)
