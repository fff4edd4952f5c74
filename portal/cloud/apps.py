from django.apps import AppConfig


class CloudConfig(AppConfig):
    name = "portal.cloud"
    label = "cloud"
    verbose_name = "Cloud"

    def ready(self) -> None:
        from portal.cloud import deadlines

        # refuse to start with task deadlines the broker's redelivery could outlast
        deadlines.check_settings()
