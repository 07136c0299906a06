//! Fuzz target: the `moments_merge` properties of `props.rs` on arbitrary bytes.
#![no_main]

#[path = "../props.rs"]
mod props;

libfuzzer_sys::fuzz_target!(|data: &[u8]| props::check_moments_merge(data));
