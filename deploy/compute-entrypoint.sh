#!/bin/sh
# Start libvirtd in this container, then become the node's Celery worker.
# start-libvirtd.sh does nothing when a libvirtd already answers at qemu:///system,
# e.g. the host's own through a bind-mounted /run/libvirt.
set -eu
: "${SKYPORT_NODE_NAME:?set SKYPORT_NODE_NAME to this host's node name}"
: "${CELERY_BROKER_URL:?set COMPUTE_BROKER_URL (the control host's Redis) in .env}"
/app/compute/host/start-libvirtd.sh /var/log/libvirt/skyport-libvirtd.log
exec celery -A compute.worker worker -Q "node.${SKYPORT_NODE_NAME}" -n "node@${SKYPORT_NODE_NAME}" \
    --concurrency "${SKYPORT_NODE_CONCURRENCY:-2}" --loglevel "${SKYPORT_LOG_LEVEL:-INFO}"
