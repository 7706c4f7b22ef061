#!/usr/bin/env bash
# Builds a minimal root filesystem from Debian's busybox-static at $1 (idempotent).
set -euo pipefail
out=$1
bb=/bin/busybox
[ -x "$bb" ] || { echo "busybox-rootfs: $bb missing: apt-get install busybox-static" >&2; exit 1; }
if [ -x "$out/bin/busybox" ] && cmp -s "$bb" "$out/bin/busybox"; then exit 0; fi
tmp="$out.tmp.$$"
rm -rf "$tmp"
mkdir -p "$tmp"/{bin,etc,proc,sys,dev,tmp,root,var,run}
cp "$bb" "$tmp/bin/busybox"
for a in $("$bb" --list); do
    [ "$a" = busybox ] || ln -s busybox "$tmp/bin/$a"
done
printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n' > "$tmp/etc/passwd"
printf 'root:x:0:\nnogroup:x:65534:\n' > "$tmp/etc/group"
chmod 1777 "$tmp/tmp"
rm -rf "$out"
mv "$tmp" "$out"
