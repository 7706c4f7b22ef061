#!/usr/bin/env bash
# The base image of examples/node-app without a registry: a Debian bookworm
# root filesystem with nodejs, made by mmdebstrap from Debian's archive and
# cached as a tarball at $1 (idempotent; about 270 MB, 40 s on first use).
# Built under a lock to a temporary name, checked to be a readable tar
# archive, then renamed into place: concurrent callers make it once.
set -euo pipefail
out=$1
is_tar() { [ -f "$1" ] && [ -s "$1" ] && tar -tf "$1" ./usr/bin/node >/dev/null 2>&1; }
[ -f "$out" ] && [ -s "$out" ] && exit 0
command -v mmdebstrap >/dev/null || { echo "node-base: mmdebstrap missing: apt-get install mmdebstrap" >&2; exit 1; }
mkdir -p "$(dirname "$out")"
exec 9>"$out.lock"
flock 9
[ -f "$out" ] && [ -s "$out" ] && exit 0
# A directory left by an older version of this script at $out is not a tarball.
[ -d "$out" ] && rm -rf "$out"
tmp="$out.tmp.$$"
trap 'rm -rf "$tmp"' EXIT
echo "node-base: building a Debian bookworm + nodejs root filesystem (mmdebstrap)" >&2
# --format=tar: the temporary name has no .tar suffix to guess the format from.
mmdebstrap --quiet --format=tar --variant=minbase --include=nodejs bookworm "$tmp"
is_tar "$tmp" || { echo "node-base: mmdebstrap did not make a tar archive with /usr/bin/node at $tmp" >&2; exit 1; }
mv -f "$tmp" "$out"
