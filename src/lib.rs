#![doc = include_str!("../README.md")]
#![cfg_attr(docsrs, feature(doc_cfg))]
#![warn(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn)]
#![deny(clippy::undocumented_unsafe_blocks)]

mod element;
mod error;
mod exec;
mod fold;
mod fuse;
mod kernels;
mod layer;
mod moments;
#[cfg(feature = "mpi")]
#[cfg_attr(docsrs, doc(cfg(feature = "mpi")))]
pub mod mpi;
mod ops;
pub mod oracle;
mod parallel;
mod shape;
pub mod sync;

#[cfg(feature = "candle")]
#[cfg_attr(docsrs, doc(cfg(feature = "candle")))]
pub mod candle;
pub mod capi;
#[cfg(feature = "ndarray")]
#[cfg_attr(docsrs, doc(cfg(feature = "ndarray")))]
pub mod ndarray;

pub use element::{Data, Element};
pub use error::{CollectiveError, Error};
pub use fuse::Fuse;
/// The `half` crate this one was built with, so that callers name the same `f16` and `bf16`.
pub use half;
pub use kernels::{with_isa, Isa};
pub use layer::{BatchNorm, Gradients, SavedStats};
pub use moments::Moments;
pub use ops::{
    apply_scale_shift, apply_scale_shift_fused, apply_scale_shift_fused_in_place,
    apply_scale_shift_in_place, fold_scale_shift, moments,
};
pub use parallel::DEFAULT_PARALLEL_THRESHOLD;
#[doc(hidden)]
pub use parallel::{with_parallel_threshold, with_stream_threshold};
pub use shape::{Layout, Shape};
pub use sync::{Collective, LocalGroup};

/// The guides in `docs/`, compiled and run as doctests (`cargo test --doc`) so that their
/// examples stay true.
#[cfg(doctest)]
mod guides {
    #[doc = include_str!("../docs/HALF_PRECISION.md")]
    struct HalfPrecision;
    #[doc = include_str!("../docs/FUSED.md")]
    struct Fused;
    #[doc = include_str!("../docs/FOLDING.md")]
    struct Folding;
    #[doc = include_str!("../docs/NDARRAY.md")]
    struct Ndarray;
    #[doc = include_str!("../docs/CANDLE.md")]
    struct Candle;
    #[doc = include_str!("../docs/SYNC.md")]
    struct Sync;
}
