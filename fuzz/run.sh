#!/usr/bin/env bash
# Runs every fuzz target for SECONDS each (default 60) on nightly Rust, installing cargo-fuzz
# first if it is missing. Each target starts from its committed seed corpus (copied, so the
# corpus stays small); a failing input is saved under fuzz/artifacts/<target>/ and the run
# fails. Add such an input to fuzz/corpus/<target>/ with its fix: `cargo test` replays it.
set -euo pipefail
cd "$(dirname "$0")"
secs=${1:-60}
command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked
for target in forward_train forward_eval moments_merge backward; do
    work=$(mktemp -d)
    cp corpus/"$target"/* "$work"/
    echo "fuzzing $target for ${secs}s"
    cargo +nightly fuzz run "$target" "$work" -- -max_total_time="$secs" -rss_limit_mb=4096 -print_final_stats=1
    rm -rf "$work"
done
