#!/bin/sh
# Turn a Debian root (rootfs.sh derive … with the cloud packages) into a bootable cloud guest.
#
#   cloud.sh ROOT OUT.qcow2
#
# The disk: an MBR with syslinux, partition 1 FAT (kernel, initrd, syslinux.cfg),
# partition 2 ext4 holding ROOT (made by mkfs.ext4 -d, so nothing is mounted and no
# loop device is needed), converted to a compressed qcow2.  The guest boots with
# root=/dev/vda2 console=ttyS0,115200 net.ifnames=0; cloud-init (NoCloud, then None)
# sets hostname, network and SSH keys; systemd puts a getty on the serial console.
# ROOT is changed in place (configured and cleaned for imaging).
set -eu

log() { echo "cloud.sh: $*" >&2; }
here=$(cd "$(dirname "$0")" && pwd)
root=${1:?usage: cloud.sh ROOT OUT.qcow2}
out=${2:?usage: cloud.sh ROOT OUT.qcow2}
BOOT_MIB=64
DISK_MIB=2048

# -- configure --------------------------------------------------------------------------------
install -m 0644 "$here/files/cloud/99-skyport.cfg" "$root/etc/cloud/cloud.cfg.d/99-skyport.cfg"
printf '/dev/vda2\t/\text4\tdefaults,errors=remount-ro\t0\t1\n' >"$root/etc/fstab"
echo debian >"$root/etc/hostname"
: >"$root/etc/resolv.conf"
# Every clone gets its own identity on first boot: systemd makes a machine-id, cloud-init SSH host keys.
: >"$root/etc/machine-id"
rm -f "$root/var/lib/dbus/machine-id" "$root"/etc/ssh/ssh_host_*
# No LVM in the guest: e2scrub_reap (stale LVM snapshots of ext4 checks) only competed with
# cloud-init for the one vCPU at boot.
ln -sf /dev/null "$root/etc/systemd/system/e2scrub_reap.service"
# A small initramfs: the root disk's drivers only (the cloud kernel has ext4 built in).
sed -i -e 's/^MODULES=.*/MODULES=list/' -e 's/^FSTYPE=.*/FSTYPE=ext4/' "$root/etc/initramfs-tools/initramfs.conf"
printf 'virtio_pci\nvirtio_blk\n' >>"$root/etc/initramfs-tools/modules"
"$here/rootfs.sh" run "$root" update-initramfs -u -k all >&2
rm -f "$root/usr/sbin/policy-rc.d"
"$here/rootfs.sh" run "$root" apt-get clean >&2
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/log/*.log "$root"/var/log/apt/* "$root"/tmp/* "$root"/var/tmp/*

# -- assemble ---------------------------------------------------------------------------------
work=$(mktemp -d "$(dirname "$out")/.cloud.XXXXXX")
trap 'rm -rf "$work"' EXIT INT TERM
kernel=$(ls "$root"/boot/vmlinuz-* | sort -V | tail -n1)
initrd=$(ls "$root"/boot/initrd.img-* | sort -V | tail -n1)
cp "$kernel" "$work/vmlinuz"
cp "$initrd" "$work/initrd.img"
cat >"$work/syslinux.cfg" <<'CFG'
DEFAULT debian
PROMPT 0
TIMEOUT 0
LABEL debian
  KERNEL vmlinuz
  INITRD initrd.img
  APPEND root=/dev/vda2 ro console=ttyS0,115200 net.ifnames=0 panic=-1
CFG
log "assembling the disk ($(basename "$kernel"))"
truncate -s "${DISK_MIB}M" "$work/disk.raw"
printf 'start=2048, size=%s, type=c, bootable\nstart=%s, type=83\n' \
    $((BOOT_MIB * 2048)) $((2048 + BOOT_MIB * 2048)) | sfdisk --quiet "$work/disk.raw" >&2
mkfs.vfat -n SKYBOOT -C "$work/boot.img" $((BOOT_MIB * 1024)) >/dev/null
mcopy -i "$work/boot.img" "$work/vmlinuz" "$work/initrd.img" "$work/syslinux.cfg" ::/
syslinux --install "$work/boot.img"
root_mib=$((DISK_MIB - BOOT_MIB - 1))
mkfs.ext4 -q -L skyroot -E root_owner=0:0 -d "$root" "$work/root.img" "${root_mib}M" >&2
dd if="$work/boot.img" of="$work/disk.raw" bs=512 seek=2048 conv=notrunc status=none
dd if="$work/root.img" of="$work/disk.raw" bs=512 seek=$((2048 + BOOT_MIB * 2048)) conv=notrunc status=none
dd if=/usr/lib/syslinux/mbr/mbr.bin of="$work/disk.raw" bs=440 count=1 conv=notrunc status=none
qemu-img convert -c -O qcow2 -o compression_type=zstd "$work/disk.raw" "$work/disk.qcow2"
chmod 0644 "$work/disk.qcow2"
mv "$work/disk.qcow2" "$out"
log "built $out ($(du -m "$out" | cut -f1) MiB)"
