#!/bin/bash
# make audit: what a running container gets, in namespace mode and in a
# microVM, seen from inside (its PID 1) and from the host: user, effective
# capabilities, no_new_privs, seccomp, devices, the root's mount flags, open
# descriptors, and vmc's own process. Runs in a store of its own; needs root
# and (for the VM) /dev/kvm. VMC names the binary (default: the release one).
set -euo pipefail

VMC=${VMC:-$(dirname "$0")/../target/release/vmc}
ROOTFS=${ROOTFS:-${XDG_CACHE_HOME:-$HOME/.cache}/vmc/busybox-rootfs}
home=$(mktemp -d "${TMPDIR:-/tmp}/vmc-audit.XXXXXX")
export VMC_HOME=$home
cleanup() {
    "$VMC" rm -f audit-ns audit-vm >/dev/null 2>&1 || true
    rm -rf "$home"
}
trap cleanup EXIT

tar -C "$ROOTFS" -cf "$home/busybox.tar" .
"$VMC" import "$home/busybox.tar" busybox >/dev/null

# Read inside the container, about its workload (`sleep`: PID 1 in
# namespace mode; in a microVM PID 1 is vmc's agent and the workload its
# child).
probe='w=$(pidof sleep | cut -d" " -f1)
echo "workload:    pid $w, as the container sees it"
echo "uid:         $(awk "/^Uid:/ {print \$3}" /proc/$w/status)"
grep -E "^(CapEff|NoNewPrivs|Seccomp):" /proc/$w/status | while read -r k v; do printf "%-13s%s\n" "$k" "$v"; done
echo "root mount:  $(awk "\$5 == \"/\" {print \$6; exit}" /proc/$w/mountinfo)"
echo "/dev mount:  $(awk "\$5 == \"/dev\" {print \$6; exit}" /proc/$w/mountinfo)"
echo "open fds:    $(ls /proc/$w/fd | tr "\n" " ")"'

report() {
    local mode=$1 name=$2
    echo "== $mode: vmc run -d --mode $mode busybox sleep 600"
    "$VMC" run -d --mode "$mode" --network none --name "$name" busybox sleep 600 >/dev/null
    "$VMC" exec "$name" sh -c "$probe"
    local id sup
    id=$("$VMC" inspect "$name" | sed -n 's/.*"Id": "\([0-9a-f]*\)".*/\1/p' | head -1)
    sup=$("$VMC" inspect "$name" | sed -n 's/.*"Pid": \([0-9]*\).*/\1/p' | head -1)
    local dev=/sys/fs/cgroup/devices/vmc-${id:0:12}/devices.list
    if [ "$mode" = ns ] && [ -r "$dev" ]; then
        echo "devices:     $(tr '\n' ',' <"$dev" | sed 's/,$//')"
    elif [ "$mode" = ns ]; then
        echo "devices:     cgroup v2: BPF device program on the container's cgroup"
    else
        echo "devices:     the guest's own virtio devices; no host device node"
    fi
    echo "host side:   supervisor pid $sup, fds: $(ls /proc/"$sup"/fd | tr '\n' ' ')"
    if [ "$mode" = ns ]; then
        # The supervisor's binary, as its own mount namespace sees it.
        local exe opts
        exe=$(readlink /proc/"$sup"/exe)
        opts=$(awk -v p="$exe" '$5 == p {print $6}' /proc/"$sup"/mountinfo | tail -1)
        echo "vmc binary:  ${exe} mounted ${opts:-(no bind: writable)} for the supervisor"
    else
        # The VMM: a jailed process of its own (README, The VMM's jail).
        local vmm
        vmm=$("$VMC" inspect "$name" | sed -n 's/.*"pid": \([0-9]*\).*/\1/p' | tail -1)
        if [ -n "$vmm" ] && [ -d /proc/"$vmm" ]; then
            echo "VMM:         pid $vmm, $(grep -E '^(Uid|CapEff|NoNewPrivs|Seccomp):' /proc/"$vmm"/status | tr -s '\t\n' '  ')"
            echo "VMM root:    $(ls -A /proc/"$vmm"/root/ | wc -l) entries; fds: $(ls /proc/"$vmm"/fd | wc -l)"
        fi
    fi
    "$VMC" rm -f "$name" >/dev/null
    echo
}

report ns audit-ns
if [ -w /dev/kvm ]; then
    report vm audit-vm
else
    echo "== vm: skipped (no /dev/kvm)"
fi
