"""Fixtures of the portal tests, reused here: node messages are captured, never sent to a broker."""

from tests.portal.conftest import sent, store, world

__all__ = ["sent", "store", "world"]
