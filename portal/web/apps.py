from django.apps import AppConfig


class WebConfig(AppConfig):
    """Server-rendered pages for tenants and the operator console (htmx, no build step)."""

    name = "portal.web"
    label = "web"
    verbose_name = "Browser UI"
