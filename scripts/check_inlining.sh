#!/usr/bin/env bash
# Fails when an intrinsic is compiled out of line in a user's crate. An intrinsic inlines only
# into a function compiled with its target features; a closure or helper that is not inlined
# into the instruction set's `#[target_feature]` entry is compiled without them, and each
# intrinsic in it becomes a function call that passes its vectors through memory (issue 27:
# bf16 inference 45x slower). Generic kernels are compiled in the crate that calls them, so the
# check builds two such crates in release, the report example and `examples/every_path.rs`
# (every public call on every data type), and lists the `core::core_arch` functions left in
# them, CPU detection (`cpuid`, `xgetbv`) aside. Symbols, not timings: it cannot flake.
#
# `scripts/check_inlining.sh` (x86-64 only; elsewhere it says so and succeeds).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(uname -m)" != x86_64 ]; then
    echo "check_inlining: x86-64 only (the AVX2 and AVX-512 entries); skipped on $(uname -m)"
    exit 0
fi
cargo build --release --example report --example every_path
status=0
for bin in target/release/examples/report target/release/examples/every_path; do
    left=$(nm -C "$bin" | grep 'core::core_arch::' | grep -vE 'cpuid|xgetbv' || true)
    if [ -n "$left" ]; then
        echo "check_inlining: $bin holds $(wc -l <<<"$left") intrinsics compiled out of line:"
        sed 's/^/    /' <<<"$left"
        # Where they are called from: the functions to mark `#[inline(always)]`.
        echo "  called from:"
        objdump -d --no-show-raw-insn -C "$bin" | awk -v list="$(cut -d' ' -f1 <<<"$left")" '
            BEGIN { n = split(list, a, "\n"); for (i = 1; i <= n; i++) { sub(/^0+/, "", a[i]); out[a[i]] = 1 } }
            /^[0-9a-f]+ <.*>:$/ { fn = substr($0, index($0, "<")) }
            /call/ { for (k in out) if (index($0, k " <")) { print fn; break } }' |
            sort | uniq -c | sort -rn | sed 's/^/    /'
        status=1
    else
        echo "check_inlining: $bin: no intrinsic out of line"
    fi
done
exit "$status"
