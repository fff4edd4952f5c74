"""WSGI entry point (gunicorn portal.wsgi).

The Django application inside :class:`portal.unreadbody.UnreadBodyMiddleware`, which keeps a
connection usable after a request refused before its body was read (or makes the answer say
``Connection: close``).
"""

import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "portal.settings")
application = get_wsgi_application()

from portal.unreadbody import UnreadBodyMiddleware  # noqa: E402 - imports settings: after the setup

application = UnreadBodyMiddleware(application)  # type: ignore[assignment]
