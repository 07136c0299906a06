//! The integration tests that need no optional feature, as one test binary: each file below is
//! a module, named as before (`cargo test --test suite -- fused::` runs one of them).
//!
//! One binary, because each test binary instantiates the kernels for every instruction set,
//! tensor type, layout and epilogue it calls: as eleven binaries they took 50 to 183 s each to
//! compile (a clean `cargo test` build, 13 minutes on CI's 2 cores), most of it compiling the
//! same kernels again; as one, 167 s (the build 7 minutes in all). The tests of the optional
//! features (`capi`, `ndarray`, `candle`) stay binaries of their own, built with their feature.

mod common;

mod accuracy;
mod backward;
mod bad_input;
mod fold;
mod fused;
mod fuzz_corpus;
mod half;
mod oracle;
mod rows_streaming;
mod running_stats;
mod sync;
