//! The C ABI of `batchnorm` (its `capi` module, declared in `include/batchnorm.h`) as a static
//! and a shared library, for C and C++ engines: `cargo build --release -p batchnorm-capi`
//! leaves `libbatchnorm_capi.a` and `libbatchnorm_capi.so` in `target/release/`. The entries
//! are `batchnorm::capi`'s own; this crate only gives them the library crate types, which the
//! `batchnorm` crate does not build (a Rust user of it builds an rlib alone).

pub use batchnorm::capi::*;
