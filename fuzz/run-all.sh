#!/usr/bin/env bash
# Fuzzes every target in turn for DURATION seconds each (default 60) with cargo-fuzz.
#
#   fuzz/run-all.sh 600            # the long runs: 10 minutes per target
#   fuzz/run-all.sh 60 jwt upgrade # only some targets
#
# Needs `cargo install cargo-fuzz`. The toolchain is stable, so nightly-only flags are
# unlocked with RUSTC_BOOTSTRAP=1. Set SANITIZER=none if AddressSanitizer does not link
# (default: address). New inputs go to fuzz/work/<target>/ (ignored by git); the checked-in
# seeds in fuzz/corpus/<target>/ are read, never written. Crashes land in
# fuzz/artifacts/<target>/; the script keeps going and exits non-zero if any target crashed.
set -uo pipefail
cd "$(dirname "$0")"

duration="${1:-60}"
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    targets=(http_request upgrade tls_upgrade ws_frames client_json notification query_token jwt claims resp)
fi
sanitizer="${SANITIZER:-address}"
# Parallel fuzzing (libFuzzer -jobs/-workers) only when asked: JOBS=2 on a free 2-core box.
parallel=()
if [ "${JOBS:-1}" -gt 1 ]; then
    parallel=(-jobs="$JOBS" -workers="$JOBS")
fi

export RUSTC_BOOTSTRAP=1
nice -n 10 cargo fuzz build -O -s "$sanitizer" || exit 1

failed=()
for t in "${targets[@]}"; do
    mkdir -p "work/$t"
    echo "=== $t: ${duration}s ($sanitizer sanitizer)"
    if ! nice -n 10 cargo fuzz run -O -s "$sanitizer" "$t" "work/$t" "corpus/$t" -- \
        -max_total_time="$duration" "${parallel[@]}" -print_final_stats=1 \
        -max_len=16384 -timeout=10 -rss_limit_mb=2048; then
        failed+=("$t")
    fi
done
if [ ${#failed[@]} -gt 0 ]; then
    echo "crashed: ${failed[*]} (inputs in fuzz/artifacts/<target>/; minimize with" \
         "RUSTC_BOOTSTRAP=1 cargo fuzz tmin -O -s $sanitizer <target> <crash file>)"
    exit 1
fi
echo "all targets ran ${duration}s without a crash"
