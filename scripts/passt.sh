#!/usr/bin/env bash
# Installs a passt that keeps quiet connections open, if the system's does not.
#
# Debian 12's passt (0.0~git20230309) resets every TCP connection a guest opens
# once 24 s pass without the far side sending a byte: its handshake leaves an
# ACK timer armed that only data towards the guest disarms (a long upload, or a
# client waiting on a slow server, breaks). Debian 13's passt fixed it. Where the
# installed passt is older than that, this builds Debian 13's from Debian's
# source archive (checksum pinned) into the assets directory, where vmc looks
# first. Idempotent; the tarball is cached.
set -euo pipefail
dest=${1:?usage: passt.sh ASSETS_DIR CACHE_DIR}
cache=${2:?usage: passt.sh ASSETS_DIR CACHE_DIR}
ver=0.0~git20250503.587980c
tarball=passt_$ver.orig.tar.xz
sha256=69d5eb843f7d648c2cc60bfbca6ea7b5014c6b6f07cdee362c2a8cf490515a49
url=http://deb.debian.org/debian/pool/main/p/passt/$tarball

installed=$(dpkg-query -W -f='${Version}' passt 2>/dev/null || true)
if [ -n "$installed" ] && dpkg --compare-versions "$installed" ge 0.0~git20240000; then
    rm -f "$dest/passt" "$dest/passt.avx2" "$dest/pasta"   # the system's is good: use it
    exit 0
fi
[ -x "$dest/passt" ] && [ -x "$dest/passt.avx2" ] && [ -L "$dest/pasta" ] && [ "$(cat "$dest/passt.version" 2>/dev/null)" = "$ver" ] && exit 0

mkdir -p "$cache" "$dest"
# One build at a time; a second caller finds the first's result.
exec 9>"$cache/passt.lock"
flock 9
[ -x "$dest/passt" ] && [ -x "$dest/passt.avx2" ] && [ -L "$dest/pasta" ] && [ "$(cat "$dest/passt.version" 2>/dev/null)" = "$ver" ] && exit 0
echo "passt: building $ver (the installed ${installed:-none} resets quiet connections after 24 s)" >&2
if ! { [ -f "$cache/$tarball" ] && echo "$sha256  $cache/$tarball" | sha256sum -c --quiet - >/dev/null 2>&1; }; then
    curl -fsS --retry 3 -o "$cache/$tarball.tmp.$$" "$url"
    echo "$sha256  $cache/$tarball.tmp.$$" | sha256sum -c --quiet - || { rm -f "$cache/$tarball.tmp.$$"; exit 1; }
    mv -f "$cache/$tarball.tmp.$$" "$cache/$tarball"
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
tar -C "$work" -xJf "$cache/$tarball"
# passt execs passt.avx2 beside it where the CPU has AVX2.
make -C "$work"/passt-* -s VERSION="$ver" passt passt.avx2 >/dev/null
for b in passt.avx2 passt; do
    install -m 0755 "$work"/passt-*/$b "$dest/.$b.tmp"
    "$dest/.$b.tmp" --version >/dev/null || { echo "passt: the built $b does not run" >&2; exit 1; }
    mv -f "$dest/.$b.tmp" "$dest/$b"
done
ln -sfn passt "$dest/.pasta.tmp" && mv -fT "$dest/.pasta.tmp" "$dest/pasta"
echo "$ver" > "$dest/.passt.version.tmp" && mv -f "$dest/.passt.version.tmp" "$dest/passt.version"
