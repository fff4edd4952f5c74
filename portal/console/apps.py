from django.apps import AppConfig


class ConsoleConfig(AppConfig):
    """Console sessions and their relay."""

    name = "portal.console"
    label = "console"
    verbose_name = "Consoles"
