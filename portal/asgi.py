"""The ASGI entry point: the console relay for WebSockets, Django for anything else.

``uvicorn portal.asgi:application`` serves ``/ws/`` behind the proxy (or on its
own port under ``make run``); gunicorn keeps serving the pages and the API
(``portal.wsgi``), so the request path of everything else is unchanged.
HTTP requests that reach this server anyway are answered by Django.
"""

from __future__ import annotations

import os
from typing import Any

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "portal.settings")
django_application = get_asgi_application()

from portal.console import relay  # noqa: E402 -- needs the apps loaded


async def application(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "websocket":
        await relay.application(scope, receive, send)
    elif scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    else:
        await django_application(scope, receive, send)
