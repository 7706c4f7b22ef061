#!/usr/bin/env bash
# Installs the Debian packages vmc needs, if any are missing (idempotent).
set -euo pipefail
pkgs=(gcc libc6-dev linux-source flex bison bc libelf-dev libssl-dev cpio erofs-utils e2fsprogs busybox-static skopeo umoci docker-registry mmdebstrap passt crun curl qemu-system-x86)
missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
echo "deps: installing ${missing[*]}" >&2
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
rest=()
for p in "${missing[@]}"; do [ "$p" = qemu-system-x86 ] || rest+=("$p"); done
[ ${#rest[@]} -eq 0 ] || $sudo apt-get install -y -qq "${rest[@]}" >/dev/null
# The bench's VM peer: its recommends (firmware, GUI) are not needed.
if [ ${#rest[@]} -ne ${#missing[@]} ]; then
    $sudo apt-get install -y -qq --no-install-recommends qemu-system-x86 >/dev/null
fi
