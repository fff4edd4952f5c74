"""Schemathesis over every operation of the OpenAPI schema, as a tenant admin with a bearer token.

Every response must be a non-5xx that the schema documents: status code,
content type, headers and body.  Generation is bounded and derandomized so
the run is repeatable and takes well under a minute and a half.
"""

from __future__ import annotations

from typing import Any

import pytest
import schemathesis
from django.core.signals import request_finished, request_started
from django.db import close_old_connections
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from portal.tenancy.models import APIToken, Membership
from portal.wsgi import application
from tests.portal.conftest import World

schema = schemathesis.openapi.from_wsgi("/api/schema/", application)

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
]


@pytest.fixture
def keep_test_connection() -> Any:
    """The WSGI handler closes "old" connections around each request, which would close the test's
    open transaction; Django's test client disconnects the same receivers for the same reason."""
    request_started.disconnect(close_old_connections)
    request_finished.disconnect(close_old_connections)
    yield
    request_started.connect(close_old_connections)
    request_finished.connect(close_old_connections)


@pytest.fixture
def bearer(world: World) -> dict[str, str]:
    """A token of acme's tenant admin: writes in the tenant are allowed, other tenants are 404."""
    user = world.users["a_admin"]
    token = APIToken(
        user=user,
        membership=Membership.objects.get(user=user, tenant=world.a),
        name="schemathesis",
        expires_at="2999-01-01T00:00:00Z",
    )
    key = token.issue()
    token.save()
    return {"Authorization": f"Bearer {key}"}


def test_schema_covers_the_api() -> None:
    """The run below is only as good as the schema: it must list every resource."""
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


@pytest.mark.slow
@schema.parametrize()
@settings(
    max_examples=25,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
def test_api_conforms(case: Any, bearer: dict[str, str], keep_test_connection: None) -> None:
    case.call_and_validate(headers=bearer, checks=CHECKS)
