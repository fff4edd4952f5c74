#!/bin/sh
# Build the sample OCI image archives offline from Debian's busybox-static.
#   images/sample_container/build.sh OUTDIR
# Writes OUTDIR/busybox-<ver>.oci.tar and OUTDIR/busybox-web-<ver>.oci.tar
# (+ .sha256).  Deterministic and idempotent: same inputs, same bytes.
set -eu
[ $# -eq 1 ] || { echo "usage: $0 OUTDIR" >&2; exit 2; }
here=$(cd "$(dirname "$0")" && pwd)
py=${PYTHON:-python3}
exec "$py" "$here/build.py" "$1"
