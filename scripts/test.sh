#!/usr/bin/env bash
# The test suite, as `make test` runs it: unit and doc tests through cargo,
# then the integration test binaries, longest first, each binary's time
# reported and its output kept in a log that is printed whole when it fails.
# VMC_TEST_JOBS runs several binaries at once (default 2: on this project's
# 2-core kvm_pvm machines two at a time took 862 s where one after another
# took 976 s, and three at a time longer than both; the VM tests are
# CPU-bound here); VMC_TEST_THREADS is the tests per binary (default 4).
set -euo pipefail
cd "$(dirname "$0")/.."
CARGO=${CARGO:-cargo}
JOBS=${VMC_TEST_JOBS:-2}
THREADS=${VMC_TEST_THREADS:-4}
# Cargo.toml's `ci` profile: release optimisation without LTO (the test
# binaries link several times faster); VMC_TEST_PROFILE=release tests what ships.
PROFILE=${VMC_TEST_PROFILE:-ci}
logs=$(mktemp -d "${TMPDIR:-/tmp}/vmc-tests.XXXXXX")

$CARGO test --profile "$PROFILE" --workspace --lib --bins -- --test-threads="$THREADS"
$CARGO test --profile "$PROFILE" --workspace --doc

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
    if "$exe" --test-threads="$THREADS" >"$LOGS/$name.log" 2>&1; then
        echo "ok      $name ($(($(date +%s) - start)) s)"
    else
        echo "FAILED  $name ($(($(date +%s) - start)) s)"
        echo "$name" >>"$LOGS/failed"
    fi
}
export -f run_one
export LOGS=$logs THREADS
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
grep -h "^test result:" "$logs"/*.log | awk '{p+=$4; f+=$6; i+=$8} END {print "integration tests: " p " passed, " f " failed, " i " ignored"}'
rm -rf "$logs"
