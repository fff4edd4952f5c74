from __future__ import annotations

from typing import Any

from django.test import Client

from tests.portal.conftest import World


def client(world: World, who: str | None) -> Client:
    c = Client()
    if who:
        c.force_login(world.users[who])
    return c


def text(response: Any) -> str:
    return response.content.decode()
