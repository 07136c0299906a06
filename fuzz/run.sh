#!/usr/bin/env bash
# Runs the fuzz targets on nightly Rust, installing cargo-fuzz first if it is missing.
#
#   fuzz/run.sh [SECONDS] [TARGET...]
#
# Every target (or those named) for SECONDS each (default 60), from a copy of its committed
# seed corpus, so the corpus stays as committed (CI). A failing input is saved under
# fuzz/artifacts/<target>/ and the run fails: add it to fuzz/corpus/<target>/ with its fix, and
# `cargo test` replays it on every path. Each execution runs its case on one path (instruction
# set and threads) that the input's last byte picks; the replay runs every path.
#
# Environment:
#   FUZZ_SANITIZER=none  no AddressSanitizer and no comparison tracing: several times the
#                        executions per second, for long campaigns (the unsafe code is covered
#                        by Miri and by the sanitized runs of CI). Default: address.
#   FUZZ_KEEP=1          fuzz into the committed corpus itself and minimize it afterwards
#                        (`cargo fuzz cmin`): a campaign whose corpus is to be committed.
#   FUZZ_JOBS=N          fuzz N targets at a time (default 1), one core each (CI: 2), each
#                        one's output kept apart and printed when it ends (its final
#                        statistics, or all of it if it failed).
set -euo pipefail
cd "$(dirname "$0")"
secs=${1:-60}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(forward_train forward_eval moments_merge backward half fused)
command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked
build=()
if [ "${FUZZ_SANITIZER:-address}" = none ]; then
    build=(-s none --no-trace-compares)
fi
# Every target built first, in one cargo run when all of them are fuzzed (the shared crates
# once, the binaries in parallel), so that `fuzz run` finds them built.
if [ $# -eq 0 ]; then
    cargo +nightly fuzz build "${build[@]}"
fi
# Fuzzes one target; its output goes to $2.
fuzz_one() {
    local target=$1 work
    {
        if [ -n "${FUZZ_KEEP:-}" ]; then
            work=corpus/"$target"
        else
            work=$(mktemp -d)
            cp corpus/"$target"/* "$work"/
        fi
        echo "fuzzing $target for ${secs}s"
        cargo +nightly fuzz run "${build[@]}" "$target" "$work" -- \
            -max_total_time="$secs" -rss_limit_mb=4096 -print_final_stats=1
        if [ -n "${FUZZ_KEEP:-}" ]; then
            cargo +nightly fuzz cmin "${build[@]}" "$target" "$work"
        else
            rm -rf "$work"
        fi
    } >"$2" 2>&1
}
# Waits for the oldest target still running; prints the end of its log, or all of it and
# fails if it failed.
logs=$(mktemp -d)
pids=()
names=()
reap() {
    local pid=${pids[0]} target=${names[0]}
    pids=("${pids[@]:1}")
    names=("${names[@]:1}")
    if wait "$pid"; then
        head -n 1 "$logs/$target"
        grep -E '^(Done|stat::)' "$logs/$target" || true
    else
        cat "$logs/$target"
        echo "fuzz target $target FAILED"
        exit 1
    fi
}
for target in "${targets[@]}"; do
    fuzz_one "$target" "$logs/$target" &
    pids+=("$!")
    names+=("$target")
    [ ${#pids[@]} -lt "${FUZZ_JOBS:-1}" ] || reap
done
while [ ${#pids[@]} -gt 0 ]; do
    reap
done
rm -rf "$logs"
