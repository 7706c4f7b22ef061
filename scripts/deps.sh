#!/usr/bin/env bash
# Installs the Debian packages vmc needs, if any are missing (idempotent).
set -euo pipefail
pkgs=(gcc libc6-dev linux-source flex bison bc libelf-dev libssl-dev cpio erofs-utils e2fsprogs busybox-static skopeo umoci docker-registry mmdebstrap passt crun curl qemu-system-x86 podman containerd)
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
# The bench's VM peer and the engines vmc-runtime is tested under (podman
# with conmon, containerd): their recommends (firmware, GUI, buildah,
# rootless helpers) are not needed.
norec=(qemu-system-x86 podman containerd)
rest=()
bare=()
for p in "${missing[@]}"; do
    if [[ " ${norec[*]} " == *" $p "* ]]; then bare+=("$p"); else rest+=("$p"); fi
done
[ ${#rest[@]} -eq 0 ] || $sudo apt-get install -y -qq "${rest[@]}" >/dev/null
[ ${#bare[@]} -eq 0 ] || $sudo apt-get install -y -qq --no-install-recommends "${bare[@]}" >/dev/null
