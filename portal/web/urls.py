from django.urls import path

from portal.metering import views as usage
from portal.web.views import auth, images, instances, keys, ops, tenant

app_name = "web"

urlpatterns = [
    path("", tenant.dashboard, name="dashboard"),
    path("login/", auth.LoginView.as_view(), name="login"),
    path("logout/", auth.LogoutView.as_view(), name="logout"),
    path("tenant/", auth.switch_tenant, name="switch-tenant"),
    path("instances/", instances.instance_list, name="instances"),
    path("instances/rows/", instances.instance_rows, name="instance-rows"),
    path("instances/new/", instances.launch, name="launch"),
    path("instances/new/preview/", instances.launch_preview, name="launch-preview"),
    path("instances/<uuid:pk>/", instances.instance_detail, name="instance"),
    path("instances/<uuid:pk>/status/", instances.instance_status, name="instance-status"),
    path("instances/<uuid:pk>/console/", instances.instance_console, name="instance-console"),
    path("instances/<uuid:pk>/stats/", instances.instance_stats, name="instance-stats"),
    path("instances/<uuid:pk>/action/", instances.instance_action, name="instance-action"),
    path("instances/<uuid:pk>/delete/", instances.instance_delete, name="instance-delete"),
    path("instances/<uuid:pk>/revert/", instances.instance_revert, name="instance-revert"),
    path("instances/<uuid:pk>/publish/", images.instance_publish, name="instance-publish"),
    path("images/", tenant.images, name="images"),
    path("images/upload/", images.image_upload, name="image-upload"),
    path("images/<int:pk>/", tenant.image_detail, name="image"),
    path("images/<int:pk>/status/", images.image_status, name="image-status"),
    path("images/<int:pk>/delete/", images.image_delete, name="image-delete"),
    path("networks/", tenant.networks, name="networks"),
    path("ssh-keys/", keys.ssh_keys, name="ssh-keys"),
    path("ssh-keys/<int:pk>/delete/", keys.ssh_key_delete, name="ssh-key-delete"),
    path("tokens/", keys.tokens, name="tokens"),
    path("tokens/<int:pk>/revoke/", keys.token_revoke, name="token-revoke"),
    path("events/", tenant.events, name="events"),
    path("usage/", usage.usage, name="usage"),
    path("usage/<slug:slug>/<int:year>-<int:month>/", usage.statement, name="statement"),
    path("ops/", ops.nodes, name="ops"),
    path("ops/nodes/", ops.nodes, name="ops-nodes"),
    path("ops/nodes/<str:name>/tenancy/", ops.node_tenancy, name="ops-node-tenancy"),
    path("ops/nodes/<str:name>/drain/", ops.node_drain, name="ops-node-drain"),
    path("ops/nodes/<str:name>/enable/", ops.node_enable, name="ops-node-enable"),
    path("ops/tenants/", ops.tenants, name="ops-tenants"),
    path("ops/tenants/<slug:slug>/quota/", ops.tenant_quota, name="ops-quota"),
    path("ops/instances/", ops.instances, name="ops-instances"),
    path("ops/drift/", ops.drift, name="ops-drift"),
    path("ops/events/", ops.events, name="ops-events"),
    path("ops/usage/", usage.ops_usage, name="ops-usage"),
]
