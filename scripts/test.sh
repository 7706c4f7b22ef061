#!/usr/bin/env bash
# The test suite, as `make test` runs it: unit and doc tests through cargo,
# then the integration test binaries, longest first, each binary's time
# reported and its output kept in a log that is printed whole when it fails.
# VMC_TEST_JOBS runs several binaries at once (default 2: on this project's
# 2-core kvm_pvm machines two at a time took 862 s where one after another
# took 976 s, and three at a time longer than both; the VM tests are
# CPU-bound here); VMC_TEST_THREADS is the tests per binary (default 4).
# Each test binary runs under a timeout (VMC_TEST_TIMEOUT, default 2400 s:
# the slowest binary took 900 s on a loaded 2-core machine), so that a hang
# fails the run with its log printed instead of blocking it.
# A test that cannot run here skips through vmc::testing::skip, which
# records its reason in $VMC_TEST_SKIPS: they are printed and counted apart
# at the end. Under CI=true nothing may skip (.ci/run sets it).
set -euo pipefail
cd "$(dirname "$0")/.."
CARGO=${CARGO:-cargo}
JOBS=${VMC_TEST_JOBS:-2}
THREADS=${VMC_TEST_THREADS:-4}
TIMEOUT=${VMC_TEST_TIMEOUT:-2400}
# Cargo.toml's `ci` profile: release optimisation without LTO (the test
# binaries link several times faster); VMC_TEST_PROFILE=release tests what ships.
PROFILE=${VMC_TEST_PROFILE:-ci}
logs=$(mktemp -d "${TMPDIR:-/tmp}/vmc-tests.XXXXXX")
: >"$logs/unit-skips"
: >"$logs/skips"

# The unit tests: built first, then run under the timeout.
$CARGO test --profile "$PROFILE" --workspace --lib --bins --no-run
VMC_TEST_SKIPS=$logs/unit-skips timeout -k 30 "$TIMEOUT" \
    $CARGO test --profile "$PROFILE" --workspace --lib --bins -- --test-threads="$THREADS"
$CARGO test --profile "$PROFILE" --workspace --doc
export VMC_TEST_SKIPS=$logs/skips
# Ready snapshots are made by background processes after an image's second
# `--rm` run: off for the suite (every test has its own store, so each would
# start one), on in the tests that check them (tests/cli.rs).
export VMC_READY_SNAPSHOTS=0

# Build the integration tests and list their executables.
$CARGO test --profile "$PROFILE" --tests --no-run --message-format=json-render-diagnostics >"$logs/build.json"
grep '"kind":\["test"\]' "$logs/build.json" | grep -o '"executable":"[^"]*"' | cut -d'"' -f4 | sort -u >"$logs/all"

# Longest first (measured on a 2-core kvm_pvm machine); the rest after.
order=(node_app build many snapshot network bench vm tty ports lifecycle images cli pull ns vmm)
: >"$logs/queue"
for t in "${order[@]}"; do
    grep "/$t-[0-9a-f]*$" "$logs/all" >>"$logs/queue" || true
done
grep -v -x -F -f "$logs/queue" "$logs/all" >>"$logs/queue" || true

run_one() {
    exe=$1
    name=$(basename "$exe" | sed 's/-[0-9a-f]*$//')
    start=$(date +%s)
    rc=0
    # --report-time (each test's time, for the slowest-ten list) is a
    # libtest option that stable Rust unlocks with RUSTC_BOOTSTRAP; it
    # changes only what the test binary prints.
    RUSTC_BOOTSTRAP=1 timeout -k 30 "$TIMEOUT" "$exe" --test-threads="$THREADS" \
        -Z unstable-options --report-time >"$LOGS/$name.log" 2>&1 || rc=$?
    took=$(($(date +%s) - start))
    echo "$took $name" >>"$LOGS/times"
    if [ "$rc" = 0 ]; then
        echo "ok      $name ($took s)"
    elif [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
        echo "TIMEOUT $name (killed after $took s: VMC_TEST_TIMEOUT=$TIMEOUT)"
        echo "--- $name was killed by the harness after $took s ---" >>"$LOGS/$name.log"
        echo "$name" >>"$LOGS/failed"
    else
        echo "FAILED  $name ($took s)"
        echo "$name" >>"$LOGS/failed"
    fi
}
export -f run_one
# The binaries find the repository through CARGO_MANIFEST_DIR when it is set
# (cargo sets it; this harness runs them itself): what was compiled in is the
# checkout that built them, which is another one when two checkouts share
# the cache's target directory.
CARGO_MANIFEST_DIR=$(pwd)
export LOGS=$logs THREADS TIMEOUT CARGO_MANIFEST_DIR
echo "integration tests: $(wc -l <"$logs/queue") binaries, $JOBS at a time, logs in $logs"
t0=$(date +%s)
xargs -a "$logs/queue" -d '\n' -P "$JOBS" -I{} bash -c 'run_one "$@"' _ {}
echo "integration tests took $(($(date +%s) - t0)) s"
if [ -s "$logs/failed" ]; then
    while read -r name; do
        echo "===== $name ====="
        cat "$logs/$name.log"
    done <"$logs/failed"
    echo "failed: $(tr '\n' ' ' <"$logs/failed")"
    exit 1
fi
# awk takes the first lines and reads to the end: `head` would close the
# pipe early, and under pipefail sort's SIGPIPE (exit 141) failed the run
# once the list outgrew sort's first write.
echo "slowest binaries: $(sort -rn "$logs/times" | awk 'NR <= 5 {printf "%s %s s, ", $2, $1}' | sed 's/, $//')"
echo "slowest tests:"
for f in "$logs"/*.log; do
    sed -n "s/^test \(.*\) \.\.\. ok <\([0-9.]*\)s>$/\2 $(basename "$f" .log)::\1/p" "$f"
done | sort -rn | awk 'NR <= 10 {printf "  %7.1f s  %s\n", $1, $2}'
# libtest counts a skipped test as passed: the skips are listed and
# subtracted (a test that skipped any of its checks counts as skipped, once).
sort -u "$logs/unit-skips" "$logs/skips" | sed 's/^/SKIPPED /'
skipped=$(awk -F': ' '{print $1}' "$logs/skips" | sort -u | wc -l)
grep -h "^test result:" "$logs"/*.log | awk -v s="$skipped" '{p+=$4; f+=$6; i+=$8} END {print "integration tests: " p - s " passed, " s " skipped, " f " failed, " i " ignored"}'
echo "unit tests skipped: $(awk -F': ' '{print $1}' "$logs/unit-skips" | sort -u | wc -l)"
rm -rf "$logs"
