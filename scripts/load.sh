#!/usr/bin/env bash
# A load generator for testing vmc on a busy host: two busy loops and four
# idle microVMs (busybox `sleep`), in a store of their own.
#
#   scripts/load.sh start    starts them (returns at once; the VMs boot in the background)
#   scripts/load.sh stop     stops and removes them
#   scripts/load.sh run CMD  runs CMD under the load, then stops it; CMD's exit code
#
# Used to check that `make test` passes on a loaded host:
#   scripts/load.sh run make test
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
state=${VMC_LOAD_DIR:-${TMPDIR:-/tmp}/vmc-load}
vmc=${VMC_LOAD_BIN:-$here/vmc}
start() {
    [ -x "$vmc" ] || { echo "load.sh: $vmc is missing: run make build" >&2; exit 1; }
    mkdir -p "$state/store"
    rootfs=${XDG_CACHE_HOME:-$HOME/.cache}/vmc/busybox-rootfs
    for i in 1 2; do
        nohup bash -c 'while :; do :; done' >/dev/null 2>&1 &
        echo $! >>"$state/busy.pids"
    done
    for i in 1 2 3 4; do
        VMC_HOME=$state/store nohup "$vmc" run -d --network none --rootfs "$rootfs" -- sleep 1000000 \
            >>"$state/vms.log" 2>&1 &
    done
    echo "load.sh: 2 busy loops and 4 VMs starting (state in $state)"
}
stop() {
    [ -f "$state/busy.pids" ] && xargs -r kill <"$state/busy.pids" 2>/dev/null || true
    rm -f "$state/busy.pids"
    if [ -d "$state/store" ]; then
        VMC_HOME=$state/store "$vmc" ps -aq 2>/dev/null | xargs -r env VMC_HOME="$state/store" "$vmc" rm -f >/dev/null 2>&1 || true
    fi
    rm -rf "$state"
}
case "${1:-}" in
    start) start ;;
    stop) stop ;;
    run)
        shift
        start
        trap stop EXIT
        "$@"
        ;;
    *) echo "usage: $0 start|stop|run CMD..." >&2; exit 2 ;;
esac
