#!/usr/bin/env bash
# Runs every fuzz target (fuzz/, cargo-fuzz on the nightly toolchain) for
# FUZZ_SECONDS each (default 60), from the seeds in fuzz/corpus/TARGET and a
# working corpus it grows outside the repo (${VMC_CACHE:-~/.cache/vmc}/fuzz/
# TARGET, kept between runs); a crash is saved as fuzz/artifacts/TARGET/
# crash-* and fails the run. Seeds and crashes are replayed by the regular
# test suite on stable (tests/fuzz_corpus.rs): commit a crash with its fix.
# FUZZ_TARGETS limits the run to some targets (space-separated names).
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_EACH=${FUZZ_SECONDS:-60}
if ! rustup toolchain list | grep -q '^nightly'; then
    echo "fuzz: the nightly toolchain is missing: rustup toolchain install nightly" >&2
    exit 1
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz
fi
targets=${FUZZ_TARGETS:-$(sed -n 's/^name = "\(.*\)"$/\1/p' fuzz/Cargo.toml | grep -v '^vmc-fuzz$')}
failed=()
for t in $targets; do
    echo "fuzz: $t for ${SECONDS_EACH} s"
    work="${VMC_CACHE:-$HOME/.cache/vmc}/fuzz/$t"
    mkdir -p "$work"
    log="${TMPDIR:-/tmp}/vmc-fuzz-$t.log"
    # -rss_limit_mb: vmc's own bounds must hold well under it.
    rc=0
    cargo +nightly fuzz run --fuzz-dir fuzz "$t" "$work" "fuzz/corpus/$t" -- \
        -max_total_time="$SECONDS_EACH" -rss_limit_mb=2048 -timeout=10 \
        -print_final_stats=1 >"$log" 2>&1 || rc=$?
    grep -E '^(#[0-9]+ +DONE|stat::number_of_executed_units|stat::peak_rss_mb|SUMMARY)' "$log" || true
    if [ "$rc" != 0 ]; then
        tail -20 "$log" >&2
        failed+=("$t")
    fi
done
if [ ${#failed[@]} -gt 0 ]; then
    echo "fuzz: crashes in: ${failed[*]} (see fuzz/artifacts/)" >&2
    exit 1
fi
