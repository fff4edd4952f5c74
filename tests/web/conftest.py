"""Fixtures of the portal tests, reused: the `world` of tenants and users, and captured node messages."""

from tests.portal.conftest import nodes, sent, world  # noqa: F401 -- pytest finds fixtures by name

# ``web``: acme's web-1 with an address, on shared-1, which publishes ports from 198.18.129.1:20000-20002
from tests.portal.test_published_ports import web  # noqa: F401
