#!/usr/bin/env bash
# Installs the Debian packages vmc needs, if any are missing (idempotent).
set -euo pipefail
pkgs=(linux-source flex bison bc libelf-dev libssl-dev cpio erofs-utils e2fsprogs busybox-static skopeo umoci docker-registry mmdebstrap passt crun curl)
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
$sudo apt-get install -y -qq "${missing[@]}" >/dev/null
