"""Fixtures of the portal tests, reused: the `world` of tenants and users, and captured node messages."""

from tests.portal.conftest import nodes, sent, world  # noqa: F401 -- pytest finds fixtures by name
