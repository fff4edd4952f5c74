"""The OpenAPI schema lists every resource; schemathesis runs against it live.

The run itself is tests/security/test_schemathesis_live.py: the schemathesis
CLI with ``--checks all`` (every response a documented non-5xx, schema-valid
data accepted, invalid data refused, bad credentials refused, methods the
schema does not list answered 405 with the right Allow header, stateful
create/read/delete) over HTTP against a live test server, as a tenant admin
and as an operator, bounded and seeded.  It replaced an in-process run of five
of those checks.
"""

from __future__ import annotations

import schemathesis

from portal.wsgi import application

schema = schemathesis.openapi.from_wsgi("/api/schema/", application)


def test_schema_covers_the_api() -> None:
    """The run is only as good as the schema: it must list every resource."""
    paths = {op.ok().path for op in schema.get_all_operations()}
    for resource in (
        "tenants",
        "memberships",
        "quotas",
        "ssh-keys",
        "tokens",
        "flavors",
        "nodes",
        "instances",
        "events",
        "networks",
        "images",
    ):
        assert f"/api/v1/{resource}/" in paths, resource
    assert "/api/v1/instances/{id}/actions/" in paths
    assert "/api/v1/instances/{id}/logs/" in paths
