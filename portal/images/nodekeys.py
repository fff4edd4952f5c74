"""Node keys: what a compute node presents to fetch blobs from the portal.

A node's key is an HMAC of its name under the portal's secret key, so the
portal stores nothing per node and an operator prints the key for a new
host with ``manage.py node key <name>``.  Rotating the secret key rotates
every node key.
"""

from __future__ import annotations

import hashlib
import hmac

from django.conf import settings


def node_key(name: str) -> str:
    secret = str(settings.SECRET_KEY).encode()
    return hmac.new(secret, b"skyport-node-key:" + name.encode(), hashlib.sha256).hexdigest()
