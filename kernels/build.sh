#!/usr/bin/env bash
# Build vmc's guest kernel (an uncompressed vmlinux with a PVH entry point) from
# Debian's linux-source package, cache it by (source version, config and patch
# hash), and install it where vmc looks for it with no flag.
#
#   kernels/build.sh            build if needed, install, print the installed path
#   kernels/build.sh --print-key   print the cache key and exit
#
# Cache:   ${VMC_CACHE:-~/.cache/vmc}/kernel/<version>-<hash>/vmlinux
# Install: ${VMC_ASSETS:-${XDG_DATA_HOME:-~/.local/share}/vmc}/vmlinux
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
cache_root=${VMC_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/vmc}
assets=${VMC_ASSETS:-${XDG_DATA_HOME:-$HOME/.local/share}/vmc}
jobs=${JOBS:-$(nproc)}

die() { echo "kernels/build.sh: $*" >&2; exit 1; }

tarball=$(ls /usr/src/linux-source-*.tar.xz 2>/dev/null | sort -V | tail -n 1 || true)
[ -n "$tarball" ] || die "no /usr/src/linux-source-*.tar.xz; install it with: apt-get install linux-source"
series=$(basename "$tarball" .tar.xz)          # linux-source-6.1
pkg_version=$(dpkg-query -W -f='${Version}' "$series" 2>/dev/null || stat -c %Y "$tarball")

hash=$( { echo "$pkg_version"; cat "$here/microvm.config" "$here"/patches/*.patch "$0"; } \
        | sha256sum | cut -c1-12)
key="${pkg_version}-${hash}"
if [ "${1:-}" = "--print-key" ]; then echo "$key"; exit 0; fi

out="$cache_root/kernel/$key"
install_kernel() {
    mkdir -p "$assets"
    if ! cmp -s "$out/vmlinux" "$assets/vmlinux" 2>/dev/null; then
        cp "$out/vmlinux" "$assets/.vmlinux.tmp.$$"
        mv -f "$assets/.vmlinux.tmp.$$" "$assets/vmlinux"
    fi
    printf '%s\n' "$key" > "$assets/.vmlinux.key.$$"
    mv -f "$assets/.vmlinux.key.$$" "$assets/vmlinux.key"
    echo "$assets/vmlinux"
}

if [ -f "$out/vmlinux" ]; then
    install_kernel
    exit 0
fi

# One build at a time per cache; a build that died leaves only its work dir,
# which the next build removes.
mkdir -p "$cache_root/kernel"
exec 9>"$cache_root/kernel/.lock"
flock 9
if [ -f "$out/vmlinux" ]; then
    install_kernel
    exit 0
fi
rm -rf "$cache_root"/kernel/build-* "$cache_root"/kernel/*.tmp

for tool in make gcc flex bison bc; do
    command -v "$tool" >/dev/null || die "$tool is missing; run: make setup (or apt-get install build-essential flex bison bc libelf-dev libssl-dev)"
done

work="$cache_root/kernel/build-$key"
mkdir -p "$work"
trap 'rm -rf "$work"' EXIT
echo "kernels/build.sh: building guest kernel $key with -j$jobs (about 5 minutes on 2 cores)" >&2
tar -C "$work" -xf "$tarball"
src="$work/$series"
for p in "$here"/patches/*.patch; do
    patch -d "$src" -p1 --quiet < "$p" || die "patch $(basename "$p") does not apply to $series $pkg_version"
done

make -C "$src" -s tinyconfig >/dev/null
"$src/scripts/kconfig/merge_config.sh" -m -O "$src" "$src/.config" "$here/microvm.config" >/dev/null
make -C "$src" -s olddefconfig >/dev/null

# Every option the fragment asks for must have survived olddefconfig.
missing=0
while IFS= read -r line; do
    case "$line" in
        CONFIG_*=*)
            grep -qxF "$line" "$src/.config" || { echo "  wanted $line, got: $(grep -E "^(# )?${line%%=*}[= ]" "$src/.config" || echo absent)" >&2; missing=1; } ;;
        "# CONFIG_"*" is not set")
            opt=${line#\# }; opt=${opt%% *}
            if grep -qE "^$opt=" "$src/.config"; then echo "  wanted $opt off, got: $(grep -E "^$opt=" "$src/.config")" >&2; missing=1; fi ;;
    esac
done < "$here/microvm.config"
[ "$missing" = 0 ] || die "the kernel config lost options from kernels/microvm.config (see above)"

make -C "$src" -s -j"$jobs" vmlinux
# An uncompressed 64-bit ELF kernel with a PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY).
[ "$(head -c 5 "$src/vmlinux" | od -An -c | tr -d ' ')" = '177ELF002' ] || die "the build did not produce a 64-bit ELF vmlinux"
readelf -n "$src/vmlinux" 2>/dev/null | grep -q 'Xen.*0x00000012\|PHYS32_ENTRY' || die "vmlinux has no PVH entry note (is CONFIG_PVH set?)"
mkdir -p "$out.tmp"
cp "$src/vmlinux" "$src/.config" "$src/System.map" "$out.tmp/"
rm -rf "$out"
mv "$out.tmp" "$out"
rm -rf "$work"
install_kernel
