#!/usr/bin/env bash
# Builds a minimal root filesystem from Debian's busybox-static at $1
# (idempotent). Built under a lock to a temporary name, checked, then renamed
# into place, so that concurrent callers (test binaries) never see half of it
# and never replace one another's tree while it is in use.
set -euo pipefail
out=$1
bb=/bin/busybox
[ -x "$bb" ] || { echo "busybox-rootfs: $bb missing: apt-get install busybox-static" >&2; exit 1; }
current() { [ -x "$out/bin/busybox" ] && cmp -s "$bb" "$out/bin/busybox" && [ -L "$out/bin/sh" ]; }
current && exit 0
mkdir -p "$(dirname "$out")"
exec 9>"$out.lock"
flock 9
current && exit 0
tmp="$out.tmp.$$"
trap 'rm -rf "$tmp"' EXIT
rm -rf "$tmp"
mkdir -p "$tmp"/{bin,etc,proc,sys,dev,tmp,root,var,run}
cp "$bb" "$tmp/bin/busybox"
for a in $("$bb" --list); do
    [ "$a" = busybox ] || ln -s busybox "$tmp/bin/$a"
done
printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n' > "$tmp/etc/passwd"
printf 'root:x:0:\nnogroup:x:65534:\n' > "$tmp/etc/group"
chmod 1777 "$tmp/tmp"
[ "$("$tmp/bin/busybox" echo ok)" = ok ] || { echo "busybox-rootfs: $tmp/bin/busybox does not run" >&2; exit 1; }
# Swap in the new tree; the old one (another busybox) goes after.
if [ -e "$out" ]; then
    mv "$out" "$out.old.$$"
fi
mv "$tmp" "$out"
rm -rf "$out.old.$$"
