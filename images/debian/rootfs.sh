#!/bin/sh
# Debian root file systems for the test workloads, made offline-friendly by a .deb cache.
#
#   rootfs.sh base   DEBS ROOT            debootstrap bookworm --variant=minbase into ROOT
#   rootfs.sh derive DEBS BASE ROOT [PKG…]  copy BASE to ROOT and apt-get install PKG… in it
#   rootfs.sh run ROOT CMD…               run CMD in the chroot ROOT
#
# DEBS keeps every downloaded .deb, so a second build downloads nothing that is
# still current.  Everything that needs /proc runs in a private mount namespace
# (unshare -m): its mounts vanish with the process, even when a step fails, so
# nothing is ever left mounted on the host.  No daemon starts in the chroot
# (policy-rc.d; the build tools drop it from every image they make).
set -eu

log() { echo "rootfs.sh: $*" >&2; }
die() { log "$*"; exit 1; }

# The Debian mirror the host itself uses (deb822 .sources or one-line sources.list);
# SKYPORT_DEBIAN_MIRROR overrides it.
mirror() {
    if [ -n "${SKYPORT_DEBIAN_MIRROR:-}" ]; then echo "$SKYPORT_DEBIAN_MIRROR"; return; fi
    m=$(cat /etc/apt/sources.list.d/*.sources 2>/dev/null |
        awk '/^URIs:/ {u=$2} /^Suites:/ && / bookworm( |$)/ {print u; exit}')
    [ -n "$m" ] || m=$(sed -n 's/^deb \(\[[^]]*\] \)\{0,1\}\([^ ]*\) bookworm .*/\2/p' /etc/apt/sources.list 2>/dev/null | head -n1)
    echo "${m:-http://deb.debian.org/debian}"
}

# Run a command in ROOT with /proc and /sys mounted, in a private mount namespace.
in_root() {
    root=$1
    shift
    unshare --mount --propagation private sh -ec '
        root=$1; shift
        mount -t proc proc "$root/proc"
        mount -t sysfs -o ro sysfs "$root/sys"
        exec chroot "$root" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LC_ALL=C.UTF-8 \
            DEBIAN_FRONTEND=noninteractive "$@"' sh "$root" "$@"
}

base() {
    debs=$1 root=$2
    mkdir -p "$debs"
    url=$(mirror)
    log "debootstrap --variant=minbase bookworm from $url"
    # debootstrap mounts /proc and /sys in the target itself: keep those mounts private too.
    unshare --mount --propagation private \
        debootstrap --variant=minbase --cache-dir="$(cd "$debs" && pwd)" bookworm "$root" "$url" >&2 ||
        { tail -n 20 "$root/debootstrap/debootstrap.log" >&2 2>/dev/null || true; die "debootstrap failed"; }
    # debootstrap leaves its sources.list (this mirror, bookworm main) and package lists:
    # derived roots install from them without another apt-get update.
    printf '#!/bin/sh\nexit 101\n' >"$root/usr/sbin/policy-rc.d"
    chmod 0755 "$root/usr/sbin/policy-rc.d"
    # debootstrap copies the host's name and resolver into the target: images must not carry them.
    rm -f "$root/etc/hostname"
    printf '127.0.0.1\tlocalhost\n::1\t\tlocalhost ip6-localhost ip6-loopback\n' >"$root/etc/hosts"
    cp /etc/resolv.conf "$root/etc/resolv.conf"  # apt in the chroot resolves the mirror; dropped later
    rm -f "$root"/var/cache/apt/archives/*.deb
}

derive() {
    debs=$1 src=$2 root=$3
    shift 3
    cp -a "$src" "$root"
    [ $# -gt 0 ] || return 0
    # Seed apt's archive with the cache (hard links: same file system, no copy).
    find "$debs" -maxdepth 1 -name '*.deb' -exec cp -l -t "$root/var/cache/apt/archives/" {} + 2>/dev/null ||
        find "$debs" -maxdepth 1 -name '*.deb' -exec cp -t "$root/var/cache/apt/archives/" {} +
    log "apt-get install $*"
    in_root "$root" apt-get install -y -q --no-install-recommends "$@" >&2
    for f in "$root"/var/cache/apt/archives/*.deb; do
        [ -e "$f" ] || continue
        [ -e "$debs/${f##*/}" ] || cp -l "$f" "$debs/" 2>/dev/null || cp "$f" "$debs/"
    done
    rm -f "$root"/var/cache/apt/archives/*.deb
}

cmd=${1:-}
[ $# -ge 1 ] && shift
case $cmd in
base) [ $# -eq 2 ] || die "usage: rootfs.sh base DEBS ROOT"; base "$@" ;;
derive) [ $# -ge 3 ] || die "usage: rootfs.sh derive DEBS BASE ROOT [PKG...]"; derive "$@" ;;
run) [ $# -ge 2 ] || die "usage: rootfs.sh run ROOT CMD..."; in_root "$@" ;;
*) die "usage: rootfs.sh base|derive|run ..." ;;
esac
