//! Fuzz target: the 16-bit properties of `props.rs` (`f16` or `bf16` tensors, as the input's
//! second-to-last byte picks) on arbitrary bytes, on the path its last byte picks.
#![no_main]

#[path = "../props.rs"]
mod props;

libfuzzer_sys::fuzz_target!(|data: &[u8]| props::check_half(data, props::path_of(data)));
