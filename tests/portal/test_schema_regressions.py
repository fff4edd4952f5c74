"""Regressions found by schemathesis (tests/security/test_api_schema.py), one focused test each."""

from __future__ import annotations

from typing import Any

import yaml
from rest_framework.test import APIClient

from tests.portal.conftest import World


def _schema(client: APIClient) -> dict[str, Any]:
    r = client.get("/api/schema/")
    assert r.status_code == 200
    loaded: dict[str, Any] = yaml.safe_load(r.content)
    return loaded


def test_every_operation_documents_its_json_errors(world: World) -> None:
    """Error answers were undocumented (only 200/201 were): clients could not expect a 404 or 409."""
    doc = _schema(world.client("a_member"))
    assert doc["components"]["schemas"]["Error"]["required"] == ["message", "code"]
    for path, item in doc["paths"].items():
        for method, op in item.items():
            codes = set(op["responses"])
            assert {"401", "403", "404"} <= codes, (method, path)
            if "requestBody" in op:
                assert {"400", "415"} <= codes, (method, path)
            if method in ("post", "patch", "put", "delete"):
                assert "409" in codes, (method, path)
    # and the body the API really sends has that shape
    r = world.client("a_member").get("/api/v1/events/?page=0")
    assert r.status_code == 404 and set(r.json()) == {"message", "code"}
