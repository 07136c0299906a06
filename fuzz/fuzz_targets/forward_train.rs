//! Fuzz target: the `forward_train` properties of `props.rs` on arbitrary bytes, on the path (instruction set, threads) its last byte picks.
#![no_main]

#[path = "../props.rs"]
mod props;

libfuzzer_sys::fuzz_target!(|data: &[u8]| props::check_forward_train(data, props::path_of(data)));
