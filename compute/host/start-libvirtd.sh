#!/bin/sh
# Start virtlogd + libvirtd without systemd, under tini as a subreaper so
# QEMU processes are reaped at once (destroy() 0.2 s instead of 1.2-1.8 s).
# Idempotent: does nothing if libvirtd already answers.  $1 = log file.
set -eu
log=${1:-/var/log/skyport-libvirtd.log}
if virsh -c qemu:///system version >/dev/null 2>&1; then
    exit 0
fi
for tool in tini virtlogd libvirtd; do
    command -v "$tool" >/dev/null || { echo "$tool is not installed (make debs installs it)" >&2; exit 1; }
done
if [ -e /dev/kvm ] && getent group kvm >/dev/null; then
    chgrp kvm /dev/kvm && chmod 0660 /dev/kvm    # else libvirt re-probes QEMU on every call
fi
rm -f /etc/libvirt/qemu/networks/autostart/default.xml   # no dnsmasq/NAT network
mkdir -p "$(dirname "$log")"
# virtlogd may have outlived a libvirtd that died; start only what is missing
setsid tini -s -- sh -c '{ pgrep -x virtlogd >/dev/null || virtlogd -d; } && exec libvirtd' </dev/null >>"$log" 2>&1 &
i=0
until virsh -c qemu:///system version >/dev/null 2>&1; do
    i=$((i + 1))
    if [ "$i" -gt 120 ]; then
        echo "libvirtd did not answer within 60 s; see $log" >&2
        exit 1
    fi
    sleep 0.5
done
