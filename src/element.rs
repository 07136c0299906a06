//! The element types the kernels run on.

use std::fmt::Debug;
use std::ops::{Add, Mul, Sub};

mod private {
    use crate::kernels::lanes::Lanes;

    /// Seals [`Element`](super::Element) and names each type's SIMD lanes, where no user can
    /// reach them: a lane type of an instruction set this CPU lacks must not be constructible
    /// from safe code.
    pub trait Sealed: Sized {
        /// `wide`'s portable vector (`f32x8`, `f64x4`).
        type Wide: Lanes<Elem = Self>;
        /// AVX2 + FMA vector of 256 bits.
        #[cfg(target_arch = "x86_64")]
        type Avx2: Lanes<Elem = Self>;
        /// AVX-512F vector of 512 bits.
        #[cfg(target_arch = "x86_64")]
        type Avx512: Lanes<Elem = Self>;

        /// Runs `f` on this thread's scratch vector of this type (a fresh one if it is
        /// already in use further up the stack).
        fn with_scratch<R>(f: impl FnOnce(&mut Vec<Self>) -> R) -> R;
    }

    thread_local! {
        static SCRATCH_F32: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
        static SCRATCH_F64: std::cell::Cell<Vec<f64>> = const { std::cell::Cell::new(Vec::new()) };
    }

    /// Runs `f` on the vector in `slot`, taken out for the call (so a nested call finds an
    /// empty one rather than a borrowed one) and put back after.
    fn borrow<T: 'static, R>(
        slot: &'static std::thread::LocalKey<std::cell::Cell<Vec<T>>>,
        f: impl FnOnce(&mut Vec<T>) -> R,
    ) -> R {
        let mut v = slot.take();
        let r = f(&mut v);
        slot.set(v);
        r
    }

    impl Sealed for f32 {
        type Wide = wide::f32x8;
        #[cfg(target_arch = "x86_64")]
        type Avx2 = crate::kernels::x86::avx2::F32x8;
        #[cfg(target_arch = "x86_64")]
        type Avx512 = crate::kernels::x86::avx512::F32x16;
        fn with_scratch<R>(f: impl FnOnce(&mut Vec<f32>) -> R) -> R {
            borrow(&SCRATCH_F32, f)
        }
    }

    impl Sealed for f64 {
        type Wide = wide::f64x4;
        #[cfg(target_arch = "x86_64")]
        type Avx2 = crate::kernels::x86::avx2::F64x4;
        #[cfg(target_arch = "x86_64")]
        type Avx512 = crate::kernels::x86::avx512::F64x8;
        fn with_scratch<R>(f: impl FnOnce(&mut Vec<f64>) -> R) -> R {
            borrow(&SCRATCH_F64, f)
        }
    }
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
    /// Zero.
    const ZERO: Self;
    /// Below this mean square (`Σ d² / n`), squared deviations computed in this type are
    /// subnormal and lose their precision: the smallest normal over the precision, `2^-103`
    /// for `f32`. The statistics redo such blocks in `f64`, or with the deviations scaled by
    /// [`TINY_SCALE`](Self::TINY_SCALE) ([`tiny_squares`]). 0 for `f64`, which has no wider
    /// type to redo them in.
    const TINY_SQUARE: f64;
    /// A power of two that lifts the smallest deviation's square into the normal range and
    /// keeps the squares of a block below [`TINY_SQUARE`](Self::TINY_SQUARE) finite: `2^86`
    /// for `f32` (`(2^-149 * 2^86)² = 2^-126`).
    const TINY_SCALE: f64;
    /// Widens to `f64` (exact).
    fn to_f64(self) -> f64;
    /// Rounds an `f64` to the nearest value of this type.
    fn from_f64(v: f64) -> Self;
}

impl Element for f32 {
    const ZERO: f32 = 0.0;
    const TINY_SQUARE: f64 = (f32::MIN_POSITIVE / f32::EPSILON) as f64;
    const TINY_SCALE: f64 = (1u128 << 86) as f64;
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
    const ZERO: f64 = 0.0;
    const TINY_SQUARE: f64 = 0.0;
    const TINY_SCALE: f64 = 1.0;
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self
    }
    #[inline(always)]
    fn from_f64(v: f64) -> f64 {
        v
    }
}

/// Whether shifted sums `s1`, `s2` of `n` values of type `T` need redoing in `f64`: not finite
/// (squares beyond `T`'s range, or a non-finite input, which stays non-finite), or a mean
/// square so small that the squares were subnormal in `T` (deviations below about `1e-19` in
/// `f32`). A block whose values are all equal also lands here (its sums are 0); the `f64`
/// path returns it at once.
#[inline(always)]
pub(crate) fn tiny_squares<T: Element>(n: usize, s1: f64, s2: f64) -> bool {
    !(s1.is_finite() && s2.is_finite() && s2 >= n as f64 * T::TINY_SQUARE)
}
