#!/bin/sh
# Build the base images of docker-compose.yml from Debian packages, for hosts that reach
# Debian's archive and PyPI but no container registry.
#
#   deploy/build-local-bases.sh            build what is missing, print the .env lines
#   deploy/build-local-bases.sh --key      print the cache key only
#   deploy/build-local-bases.sh >> .env    (then `docker compose build` uses them)
#
# The public images the compose file names by default (debian:bookworm, python:3.11-slim-bookworm,
# postgres:16-bookworm, redis:7-bookworm) are replaced by:
#   localhost/skyport-base/debian:bookworm-<key>     debootstrap --variant=minbase, imported
#   localhost/skyport-base/python:3.11-<key>         + Debian's python3 (3.11), venv
#   localhost/skyport-base/postgres:15-<key>         + Debian's postgresql-15, an entrypoint that
#                                                     honours POSTGRES_{DB,USER,PASSWORD} like the
#                                                     official image's
#   localhost/skyport-base/redis:7-<key>             + Debian's redis-server (7.0)
# <key> is a hash of this script and deploy/local-bases/, so a change to either builds anew and
# anything else reuses what the engine's own storage holds (the cache): a second run on the same
# machine does nothing but print.  Older keys beyond the two newest are removed.
#
# Environment: SKYPORT_ENGINE (podman, or docker: the same commands), DEBIAN_MIRROR,
# DEBIAN_SECURITY_MIRROR.  Builds run with the host's network (no bridge, no NAT is made).
set -eu

here=$(cd "$(dirname "$0")" && pwd)
engine=${SKYPORT_ENGINE:-podman}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
security=${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
repo=localhost/skyport-base
log() { echo "build-local-bases: $*" >&2; }

# Certificates this host added to its trust store (e.g. an intercepting proxy's, without which
# pip cannot reach PyPI from a build) go into the bases too, and into the key.
local_cas=$(find /usr/local/share/ca-certificates -name '*.crt' -type f 2>/dev/null | LC_ALL=C sort)
key=$(cat "$here/build-local-bases.sh" $(find "$here/local-bases" -type f | LC_ALL=C sort) $local_cas \
    | sha256sum | cut -c1-12)
if [ "${1:-}" = "--key" ]; then
    echo "$key"
    exit 0
fi
debian=$repo/debian:bookworm-$key
python=$repo/python:3.11-$key
postgres=$repo/postgres:15-$key
redis=$repo/redis:7-$key

have() { "$engine" image inspect "$1" >/dev/null 2>&1; }

build_all() {
    if ! have "$debian"; then
        command -v debootstrap >/dev/null || { log "debootstrap is not installed (apt-get install debootstrap)"; exit 1; }
        work=$(mktemp -d /var/tmp/skyport-base.XXXXXX)
        trap 'rm -rf "$work"' EXIT
        log "debootstrap bookworm (minbase) from $mirror"
        debootstrap --variant=minbase bookworm "$work/root" "$mirror" >"$work/debootstrap.log" 2>&1 \
            || { tail -n 20 "$work/debootstrap.log" >&2; exit 1; }
        root=$work/root
        # what image builders leave out: device nodes (the runtime provides /dev), downloaded
        # packages and lists, logs
        rm -rf "$root"/dev/* "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* \
            "$root"/var/log/* "$root"/etc/apt/sources.list
        printf 'Types: deb\nURIs: %s\nSuites: bookworm bookworm-updates\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\nTypes: deb\nURIs: %s\nSuites: bookworm-security\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
            "$mirror" "$security" >"$root/etc/apt/sources.list.d/debian.sources"
        # no daemons started by package scripts during image builds; no docs or manuals
        printf '#!/bin/sh\nexit 101\n' >"$root/usr/sbin/policy-rc.d"
        chmod 755 "$root/usr/sbin/policy-rc.d"
        cp "$here/local-bases/apt-slim.conf" "$root/etc/dpkg/dpkg.cfg.d/skyport-slim"
        # installing ca-certificates (every image here does) adds them to the bundle pip is told to use
        mkdir -p "$root/usr/local/share/ca-certificates"
        for ca in $local_cas; do cp "$ca" "$root/usr/local/share/ca-certificates/"; done
        tar -C "$root" --numeric-owner -cf - . \
            | "$engine" import --change 'CMD ["bash"]' --change 'ENV LANG=C.UTF-8' \
                --change 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt' - "$debian" >/dev/null
        rm -rf "$work"
        trap - EXIT
        log "made $debian"
    fi
    for pair in "python:$python" "postgres:$postgres" "redis:$redis"; do
        name=${pair%%:*}
        tag=${pair#*:}
        have "$tag" && continue
        log "building $tag"
        "$engine" build --network host --build-arg "BASE=$debian" -t "$tag" \
            -f "$here/local-bases/$name.Containerfile" "$here/local-bases" >&2
    done
}

prune() {
    # keep this key and the newest other one (another checkout may still use it)
    "$engine" images --format '{{.Repository}}:{{.Tag}} {{.CreatedAt}}' --filter "reference=$repo/debian" \
        | sort -k2 -r | awk '{print $1}' | sed 's/.*-//' | grep -v "^$key$" | tail -n +2 \
        | while read -r old; do
            for r in "debian:bookworm" "python:3.11" "postgres:15" "redis:7"; do
                "$engine" rmi "$repo/$r-$old" >/dev/null 2>&1 || true
            done
            log "removed the bases of key $old"
        done
}

if ! { have "$debian" && have "$python" && have "$postgres" && have "$redis"; }; then
    mkdir -p /run/lock
    exec 9>/run/lock/skyport-local-bases.lock
    flock 9     # another run building the same bases: wait for it, then find them made
    build_all
    prune
    exec 9>&-
fi
echo "SKYPORT_DEBIAN_BASE=$debian"
echo "SKYPORT_PYTHON_BASE=$python"
echo "POSTGRES_IMAGE=$postgres"
echo "REDIS_IMAGE=$redis"
