#!/usr/bin/env bash
# `make fresh-check`: the README's first two commands as a new user runs them.
# A clean clone of this checkout's HEAD in a scratch directory, with a scratch
# HOME (so empty ~/.cache/vmc and ~/.local/share/vmc: the guest kernel, the
# agent, passt, the busybox and Debian root filesystems are all built anew)
# and a scratch store (VMC_HOME), runs `make demo` and then `make test`.
# The Rust toolchain and cargo's registry stay where they are (CARGO_HOME,
# RUSTUP_HOME): they are the machine's, not vmc's. Not part of `make test`:
# run it after changing setup scripts. Takes ~40 minutes on 2 cores.
#
#   scripts/fresh-check.sh [--keep]    (--keep leaves the scratch directory)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
keep=${1:-}
scratch=$(mktemp -d "${TMPDIR:-/var/tmp}/vmc-fresh.XXXXXX")
cleanup() {
    # Containers a failed run left behind, then the scratch tree.
    if [ -x "$scratch/clone/vmc" ]; then
        VMC_HOME=$scratch/store HOME=$scratch/home "$scratch/clone/vmc" ps -aq 2>/dev/null \
            | xargs -r env VMC_HOME="$scratch/store" HOME="$scratch/home" "$scratch/clone/vmc" rm -f >/dev/null 2>&1 || true
    fi
    if [ "$keep" = --keep ]; then echo "fresh-check: kept $scratch"; else rm -rf "$scratch"; fi
}
trap cleanup EXIT
export CARGO_HOME=${CARGO_HOME:-$HOME/.cargo}
export RUSTUP_HOME=${RUSTUP_HOME:-$HOME/.rustup}
export PATH="$CARGO_HOME/bin:$PATH"
git clone -q "$here" "$scratch/clone"
mkdir -p "$scratch/home" "$scratch/store"
export HOME=$scratch/home VMC_HOME=$scratch/store
unset VMC_CACHE VMC_ASSETS XDG_CACHE_HOME XDG_DATA_HOME CARGO_TARGET_DIR
cd "$scratch/clone"
t0=$(date +%s)
echo "fresh-check: make demo in $scratch/clone (HOME=$HOME)"
make demo
t1=$(date +%s)
echo "fresh-check: make test"
CI=true make test
t2=$(date +%s)
echo "fresh-check: passed: make demo $((t1 - t0)) s, make test $((t2 - t1)) s"
