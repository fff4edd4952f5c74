from __future__ import annotations

import pytest
from django.core.management import CommandError, call_command

from portal.cloud.models import ComputeNode
from tests.portal.conftest import World


def test_register_dedicate_share(world: World) -> None:
    call_command("node", "register", "n7", "--vcpus", "4")
    node = ComputeNode.objects.get(name="n7")
    assert (node.queue, node.vcpus, node.status) == ("node.n7", 4, "down")
    call_command("node", "dedicate", "n7", "bobco")
    assert ComputeNode.objects.get(name="n7").owner == world.b
    call_command("node", "share", "n7")
    assert ComputeNode.objects.get(name="n7").tenancy == "shared"
    with pytest.raises(CommandError, match="hosts instances of acme"):
        call_command("node", "dedicate", "shared-1", "bobco")
    with pytest.raises(CommandError, match="no tenant"):
        call_command("node", "dedicate", "n7", "nobody")
    with pytest.raises(CommandError, match="no node"):
        call_command("node", "share", "nope")
    call_command("node", "disable", "n7")
    assert ComputeNode.objects.get(name="n7").status == "disabled"
