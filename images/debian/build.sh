#!/bin/sh
# Skyport's test workloads (Debian 12 cloud guest, OCI app images), cached once per machine.
#   images/debian/build.sh --cache | --cached | --key | OUTDIR      (see testimages.py)
set -eu
here=$(cd "$(dirname "$0")" && pwd)
exec "${PYTHON:-python3}" "$here/testimages.py" "$@"
