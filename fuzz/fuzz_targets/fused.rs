//! Fuzz target: the fused epilogues of `props.rs` (ReLU, residual, both, neither, as the
//! input's second-to-last byte picks) against the separate passes, on the path its last byte
//! picks.
#![no_main]

#[path = "../props.rs"]
mod props;

libfuzzer_sys::fuzz_target!(|data: &[u8]| props::check_fused(data, props::path_of(data)));
