#!/usr/bin/env bash
# The base image of examples/node-app without a registry: a Debian bookworm
# root filesystem with nodejs, made by mmdebstrap from Debian's archive and
# cached as a tarball at $1 (idempotent; about 270 MB, 40 s on first use).
set -euo pipefail
out=$1
[ -s "$out" ] && exit 0
command -v mmdebstrap >/dev/null || { echo "node-base: mmdebstrap missing: apt-get install mmdebstrap" >&2; exit 1; }
mkdir -p "$(dirname "$out")"
tmp="$out.tmp.$$"
trap 'rm -f "$tmp"' EXIT
echo "node-base: building a Debian bookworm + nodejs root filesystem (mmdebstrap)" >&2
mmdebstrap --quiet --variant=minbase --include=nodejs bookworm "$tmp"
mv "$tmp" "$out"
