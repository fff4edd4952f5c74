from django.urls import include, path, re_path
from rest_framework.routers import DefaultRouter

from portal.audit.api.views import EventViewSet
from portal.cloud.api.views import (
    ComputeNodeViewSet,
    FlavorViewSet,
    InstanceViewSet,
    NetworkViewSet,
    PublishedPortViewSet,
    SecurityGroupRuleViewSet,
    SecurityGroupViewSet,
)
from portal.images.api.views import ImageViewSet, blob, node_upload
from portal.metering.api.views import BudgetViewSet, PriceSheetViewSet, UsageViewSet
from portal.storage.api.views import VolumeViewSet, instance_backup_content, volume_content
from portal.tenancy.api.views import (
    APITokenViewSet,
    MembershipViewSet,
    QuotaViewSet,
    SSHKeyViewSet,
    TenantViewSet,
)

router = DefaultRouter()
router.register("tenants", TenantViewSet)
router.register("memberships", MembershipViewSet)
router.register("quotas", QuotaViewSet)
router.register("ssh-keys", SSHKeyViewSet)
router.register("tokens", APITokenViewSet)
router.register("flavors", FlavorViewSet)
router.register("nodes", ComputeNodeViewSet)
router.register("instances", InstanceViewSet)
router.register("events", EventViewSet)
router.register("networks", NetworkViewSet)
router.register("published-ports", PublishedPortViewSet)
router.register("security-groups", SecurityGroupViewSet)
router.register("security-group-rules", SecurityGroupRuleViewSet)
router.register("images", ImageViewSet)
router.register("volumes", VolumeViewSet)
router.register("usage", UsageViewSet, basename="usage")
router.register("prices", PriceSheetViewSet)
router.register("budgets", BudgetViewSet)

urlpatterns = [
    path("blobs/uploads/<int:image_id>", node_upload, name="node-upload"),
    path("volumes/<uuid:volume_id>/content", volume_content, name="volume-content"),
    path(
        "instances/<uuid:instance_id>/backup-content",
        instance_backup_content,
        name="instance-backup-content",
    ),
    # `curl -T FILE ".../images/ID/file/?type=..."` appends FILE's name to a path ending in "/":
    # accept that form too (the name is ignored), so the README's one-liner works as written
    re_path(
        r"^images/(?P<pk>[^/.]+)/file/(?:[^/]+)$",
        ImageViewSet.as_view(
            {"put": "upload"},
            parser_classes=ImageViewSet.upload.kwargs["parser_classes"],
            http_method_names=ImageViewSet.upload.kwargs["http_method_names"],
            schema=None,
        ),
        name="image-upload-named",
    ),
    path("blobs/<str:digest>", blob, name="blob"),
    path("", include(router.urls)),
]
