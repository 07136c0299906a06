//! The element types the kernels run on.

use crate::kernels::lanes::Lanes;
use std::fmt::Debug;
use std::ops::{Add, Mul, Sub};

mod private {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for f64 {}
}

/// A floating-point element type: `f32` and `f64` now (half types, computed in `f32`, later).
///
/// Sealed: the kernels rely on IEEE semantics and on the lane types named here.
pub trait Element:
    Copy
    + Default
    + Debug
    + PartialEq
    + PartialOrd
    + Send
    + Sync
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + 'static
    + private::Sealed
{
    /// `wide`'s portable SIMD vector of this type (`f32x8`, `f64x4`).
    #[doc(hidden)]
    type Wide: Lanes<Elem = Self>;
    /// Zero.
    const ZERO: Self;
    /// Widens to `f64` (exact).
    fn to_f64(self) -> f64;
    /// Rounds an `f64` to the nearest value of this type.
    fn from_f64(v: f64) -> Self;
}

impl Element for f32 {
    type Wide = wide::f32x8;
    const ZERO: f32 = 0.0;
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self as f64
    }
    #[inline(always)]
    fn from_f64(v: f64) -> f32 {
        v as f32
    }
}

impl Element for f64 {
    type Wide = wide::f64x4;
    const ZERO: f64 = 0.0;
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self
    }
    #[inline(always)]
    fn from_f64(v: f64) -> f64 {
        v
    }
}
