#!/bin/sh
# Build the Skyport tiny VM image offline from Debian packages.
#
#   images/sample_vm/build.sh OUTDIR
#
# Produces OUTDIR/skyport-tiny-<version>.qcow2 and its .sha256, and prints the
# qcow2 path as the last line on stdout.  <version> is the builder revision
# plus the Debian kernel ABI, so a new kernel gives a new file (running VMs
# keep their lock on the old one).  Does nothing if that file exists.  The
# kernel .deb is cached in OUTDIR so rebuilds need no network.
set -eu

BUILDER_REV=3  # 2: SSH keys read from meta-data public-keys; 3: and a shell on ttyS0 (interactive console)
here=$(cd "$(dirname "$0")" && pwd)
out=${1:?usage: build.sh OUTDIR}
mkdir -p "$out"
out=$(cd "$out" && pwd)
log() { echo "build.sh: $*" >&2; }

# Kernel ABI: the dependency of the linux-image-amd64 metapackage, or the
# newest cached .deb when apt cannot tell (offline rebuilds).
kpkg=$(apt-cache depends linux-image-amd64 2>/dev/null | sed -n 's/^ *Depends: \(linux-image-[0-9].*-amd64\)$/\1/p' | head -n1 || true)
if [ -z "$kpkg" ] && ! ls "$out"/linux-image-*-amd64_*.deb >/dev/null 2>&1; then
    log "apt lists do not know linux-image-amd64; running apt-get update"
    apt-get update -q >&2 || true
    kpkg=$(apt-cache depends linux-image-amd64 2>/dev/null | sed -n 's/^ *Depends: \(linux-image-[0-9].*-amd64\)$/\1/p' | head -n1 || true)
fi
if [ -z "$kpkg" ]; then
    deb=$(ls -1 "$out"/linux-image-*-amd64_*.deb 2>/dev/null | sort -V | tail -n1 || true)
    [ -n "$deb" ] || { log "cannot resolve linux-image-amd64 and no cached kernel .deb"; exit 1; }
    kpkg=$(basename "$deb" | cut -d_ -f1)
fi
kabi=${kpkg#linux-image-}
kabi=${kabi%-amd64}
version="$BUILDER_REV-$kabi"
image="$out/skyport-tiny-$version.qcow2"
if [ -f "$image" ] && [ -f "$image.sha256" ]; then
    log "$image exists"
    echo "$image"
    exit 0
fi

deb=$(ls -1 "$out/${kpkg}"_*.deb 2>/dev/null | tail -n1 || true)
if [ -z "$deb" ]; then
    log "downloading $kpkg"
    (cd "$out" && apt-get download "$kpkg" >&2)
    deb=$(ls -1 "$out/${kpkg}"_*.deb | tail -n1)
fi

work=$(mktemp -d "$out/.build.XXXXXX")
trap 'rm -rf "$work"' EXIT INT TERM

log "extracting kernel and modules from $(basename "$deb")"
mkdir -p "$work/k"
dpkg-deb --fsys-tarfile "$deb" | tar -x -C "$work/k" --wildcards \
    './boot/vmlinuz-*' \
    './lib/modules/*/kernel/drivers/virtio/*' \
    './lib/modules/*/kernel/drivers/block/virtio_blk.ko' \
    './lib/modules/*/kernel/drivers/net/virtio_net.ko' \
    './lib/modules/*/kernel/drivers/net/net_failover.ko' \
    './lib/modules/*/kernel/net/core/failover.ko' \
    './lib/modules/*/kernel/fs/isofs/isofs.ko' \
    './lib/modules/*/kernel/drivers/cdrom/cdrom.ko' \
    './lib/modules/*/kernel/drivers/input/evdev.ko' \
    './lib/modules/*/kernel/drivers/acpi/button.ko'

# Modules we load, in dependency order: every depends= of a module must come
# earlier in this list (checked below against each module's .modinfo).
mods="virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci
failover net_failover virtio_net virtio_blk cdrom isofs evdev button"
root="$work/root"
mkdir -p "$root/bin" "$root/sbin" "$root/proc" "$root/sys" "$root/dev" "$root/lib/modules" "$root/etc"
seen=" "
for m in $mods; do
    ko=$(find "$work/k/lib/modules" -name "$m.ko" | head -n1)
    [ -n "$ko" ] || { log "module $m not in $kpkg"; exit 1; }
    deps=$(tr '\0' '\n' <"$ko" | sed -n 's/^depends=//p' | tr ',' ' ')
    for d in $deps; do
        case "$seen" in *" $d "*) ;; *) log "module $m needs $d first"; exit 1 ;; esac
    done
    seen="$seen$m "
    cp "$ko" "$root/lib/modules/"
    echo "$m" >>"$root/lib/modules/load-order"
done

cp /bin/busybox "$root/bin/busybox"
for applet in $(/bin/busybox --list); do
    [ "$applet" = busybox ] || ln -s busybox "$root/bin/$applet"
done
cp "$here/init" "$root/init"
chmod 0755 "$root/init"
(cd "$root" && find . | LC_ALL=C sort | cpio -o -H newc --quiet -R 0:0 | gzip -9n) >"$work/initrd.gz"

cat >"$work/syslinux.cfg" <<'CFG'
DEFAULT linux
PROMPT 0
TIMEOUT 0
LABEL linux
  KERNEL vmlinuz
  INITRD initrd.gz
  APPEND console=ttyS0,115200 quiet panic=-1 mitigations=off
CFG

# A 64 MiB disk with one bootable FAT partition, built without loop devices.
log "assembling disk"
truncate -s 64M "$work/disk.raw"
echo 'start=2048, type=c, bootable' | sfdisk --quiet "$work/disk.raw" >&2
mkfs.vfat -n SKYTINY -C "$work/part.img" $(((64 * 1024 - 1024))) >/dev/null
cp "$work"/k/boot/vmlinuz-* "$work/vmlinuz"
mcopy -i "$work/part.img" "$work/vmlinuz" "$work/initrd.gz" "$work/syslinux.cfg" ::/
syslinux --install "$work/part.img"
dd if="$work/part.img" of="$work/disk.raw" bs=512 seek=2048 conv=notrunc status=none
dd if=/usr/lib/syslinux/mbr/mbr.bin of="$work/disk.raw" bs=440 count=1 conv=notrunc status=none
qemu-img convert -O qcow2 "$work/disk.raw" "$work/image.qcow2"

# Publish atomically: the .sha256 marks a complete image.
(cd "$work" && sha256sum image.qcow2 | cut -d' ' -f1) >"$work/image.sha256"
mv "$work/image.qcow2" "$image"
printf '%s  %s\n' "$(cat "$work/image.sha256")" "$(basename "$image")" >"$image.sha256.tmp"
mv "$image.sha256.tmp" "$image.sha256"
chmod 0644 "$image" "$image.sha256"
log "built $image ($(du -k "$image" | cut -f1) KiB)"
echo "$image"
