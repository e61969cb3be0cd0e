#!/usr/bin/env bash
# CI check for the fuzz targets, on stable Rust, without cargo-fuzz: build every target with
# plain cargo (libfuzzer-sys compiles libFuzzer with the system C++ compiler) and replay the
# checked-in seeds and regression inputs through each. Exits non-zero if a target fails to
# build or any input crashes.
#
#   bash fuzz/ci.sh                  # build + replay (about 2-3 minutes cold on 2 cores)
#   FUZZ_SECONDS=3 bash fuzz/ci.sh   # also mutate for 3 s per target (no coverage feedback
#                                    # in this build: a smoke test, not real fuzzing)
set -euo pipefail
cd "$(dirname "$0")"

targets=(http_request upgrade tls_upgrade ws_frames client_json notification query_token jwt claims resp)
start=$SECONDS
# The fuzz crate's own workspace and target dir (fuzz/target), apart from herald's build.
cargo build --profile ci --manifest-path Cargo.toml --bins
built=$SECONDS

status=0
for t in "${targets[@]}"; do
    inputs=("corpus/$t")
    if [ -d "regressions/$t" ] && [ -n "$(ls -A "regressions/$t")" ]; then
        inputs+=("regressions/$t")
    fi
    if [ "${FUZZ_SECONDS:-0}" -gt 0 ]; then
        scratch="$(mktemp -d)"
        args=("$scratch" "${inputs[@]}" -max_total_time="$FUZZ_SECONDS" -max_len=16384)
    else
        args=("${inputs[@]}" -runs=0)
    fi
    if ./target/ci/"$t" "${args[@]}" -timeout=10 -rss_limit_mb=2048 \
        -artifact_prefix="${TMPDIR:-/tmp}/herald-fuzz-$t-" >"${TMPDIR:-/tmp}/herald-fuzz-$t.log" 2>&1; then
        echo "ok    $t ($(find "${inputs[@]}" -type f | wc -l) inputs)"
    else
        echo "CRASH $t — log: ${TMPDIR:-/tmp}/herald-fuzz-$t.log"
        tail -n 30 "${TMPDIR:-/tmp}/herald-fuzz-$t.log"
        status=1
    fi
    if [ -n "${scratch:-}" ]; then rm -rf "$scratch"; scratch=; fi
done
echo "fuzz ci: build $((built - start))s, replay $((SECONDS - built))s"
exit $status
