"""Give every existing network a VXLAN VNI (1, 2, ... by primary key) and the tunnel-sized MTU.

Networks made before VXLAN have MTU 1500; with a 1500-byte underlay VXLAN
leaves 1450.  Instances already running keep their old MTU until they are
created again.
"""

from django.db import migrations


def forwards(apps, schema_editor):
    Network = apps.get_model("cloud", "Network")
    for vni, net in enumerate(Network.objects.order_by("pk"), start=1):
        Network.objects.filter(pk=net.pk).update(vni=vni, mtu=min(net.mtu, 1450))


class Migration(migrations.Migration):
    dependencies = [("cloud", "0003_network_vni_computenode_tunnel_address_hostport")]

    operations = [migrations.RunPython(forwards, migrations.RunPython.noop)]
