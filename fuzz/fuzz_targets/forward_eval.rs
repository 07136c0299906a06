//! Fuzz target: the `forward_eval` properties of `props.rs` on arbitrary bytes.
#![no_main]

#[path = "../props.rs"]
mod props;

libfuzzer_sys::fuzz_target!(|data: &[u8]| props::check_forward_eval(data));
