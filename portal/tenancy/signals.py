"""Every tenant gets a quota row with the configured defaults."""

from typing import Any

from django.db.models.signals import post_save
from django.dispatch import receiver

from portal.tenancy.models import Quota, Tenant


@receiver(post_save, sender=Tenant)
def create_quota(sender: type[Tenant], instance: Tenant, created: bool, **kwargs: Any) -> None:
    if created:
        Quota.objects.get_or_create(tenant=instance, defaults=Quota.defaults())
