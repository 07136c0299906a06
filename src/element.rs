//! The types of tensors ([`Data`]) and of parameters and arithmetic ([`Element`]).

use crate::kernels::lanes::{Lanes, Stored};
use crate::kernels::simd::Simd;
use half::{bf16, f16};
use std::fmt::Debug;
use std::ops::{Add, Mul, Sub};

mod private {
    /// Seals [`Data`](super::Data) and [`Element`](super::Element): the kernels rely on IEEE
    /// semantics and on the lane types each type names.
    pub trait Sealed {}

    impl Sealed for f32 {}
    impl Sealed for f64 {}
    impl Sealed for half::f16 {}
    impl Sealed for half::bf16 {}

    /// Per-thread scratch storage of parameter arrays.
    pub trait Scratch: Sized {
        /// Runs `f` on one of this thread's scratch vectors of this type (each call nested in
        /// another gets a vector of its own, kept for the next call as deeply nested).
        fn with_scratch<R>(f: impl FnOnce(&mut Vec<Self>) -> R) -> R;
    }

    type Stack<T> = std::cell::Cell<Vec<Vec<T>>>;

    thread_local! {
        static SCRATCH_F32: Stack<f32> = const { std::cell::Cell::new(Vec::new()) };
        static SCRATCH_F64: Stack<f64> = const { std::cell::Cell::new(Vec::new()) };
    }

    /// Scratch vectors kept per thread and type: the depth of the deepest nesting (the
    /// inference path fills its parameters, and rotated rows a rotated copy of them).
    const KEPT: usize = 4;

    /// Runs `f` on a vector taken from the stack in `slot` (a new one when it is empty), put
    /// back after: a nested call takes another, and no call allocates once the vectors of
    /// its depth have grown.
    fn borrow<T: 'static, R>(
        slot: &'static std::thread::LocalKey<Stack<T>>,
        f: impl FnOnce(&mut Vec<T>) -> R,
    ) -> R {
        let mut stack = slot.take();
        let mut v = stack.pop().unwrap_or_default();
        slot.set(stack);
        let r = f(&mut v);
        let mut stack = slot.take();
        if stack.len() < KEPT {
            stack.push(v);
        }
        slot.set(stack);
        r
    }

    impl Scratch for f32 {
        fn with_scratch<R>(f: impl FnOnce(&mut Vec<f32>) -> R) -> R {
            borrow(&SCRATCH_F32, f)
        }
    }

    impl Scratch for f64 {
        fn with_scratch<R>(f: impl FnOnce(&mut Vec<f64>) -> R) -> R {
            borrow(&SCRATCH_F64, f)
        }
    }
}

/// A tensor element type: `f32` and `f64` compute in themselves; [`half::f16`] and
/// [`half::bf16`] are stored as 16 bits and computed in `f32` (their [`Param`](Self::Param)),
/// converted in registers on load and rounded once, to nearest even, on store.
///
/// Sealed: the kernels rely on IEEE semantics and on the lanes each type names.
pub trait Data:
    Copy + Default + Debug + PartialEq + Send + Sync + 'static + private::Sealed
{
    /// The type of the parameters, statistics and gradients of a layer over this data, and
    /// of the arithmetic on it.
    type Param: Element;
    /// The lanes that carry this type on the instruction set `S`: arithmetic in
    /// [`Param`](Self::Param), memory in `Self`.
    #[doc(hidden)]
    type Lanes<S: Simd>: Lanes<Elem = Self::Param, Mem = Self>;
    /// Widens to [`Param`](Self::Param) (exact).
    fn to_param(self) -> Self::Param;
    /// Rounds a [`Param`](Self::Param) to the nearest value of this type (ties to even).
    fn from_param(v: Self::Param) -> Self;
    /// Widens to `f64` (exact).
    fn to_f64(self) -> f64;
    /// Rounds an `f64` to the nearest value of this type (ties to even), in one rounding.
    fn from_f64(v: f64) -> Self;
}

/// A floating-point type that arithmetic, parameters and statistics use: `f32` and `f64`. Each
/// is also a [`Data`] type, its own [`Param`](Data::Param).
pub trait Element:
    Data<Param = Self>
    + PartialOrd
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + private::Scratch
{
    /// Zero.
    const ZERO: Self;
    /// Below this mean square (`Σ d² / n`), squared deviations computed in this type are
    /// subnormal and lose their precision: the smallest normal over the precision, `2^-103`
    /// for `f32`. The statistics redo such blocks in `f64`, or with the deviations scaled by
    /// [`TINY_SCALE`](Self::TINY_SCALE) (`tiny_squares` in this module). 0 for `f64`, which
    /// has no wider type to redo them in.
    const TINY_SQUARE: f64;
    /// A power of two that lifts the smallest deviation's square into the normal range and
    /// keeps the squares of a block below [`TINY_SQUARE`](Self::TINY_SQUARE) finite: `2^86`
    /// for `f32` (`(2^-149 * 2^86)² = 2^-126`).
    const TINY_SCALE: f64;
}

/// `Data` for a type that is its own parameter type.
macro_rules! element_data {
    ($t:ty, $family:ident) => {
        impl Data for $t {
            type Param = $t;
            type Lanes<S: Simd> = S::$family;
            #[inline(always)]
            fn to_param(self) -> $t {
                self
            }
            #[inline(always)]
            fn from_param(v: $t) -> $t {
                v
            }
            #[inline(always)]
            fn to_f64(self) -> f64 {
                self as f64
            }
            #[inline(always)]
            fn from_f64(v: f64) -> $t {
                v as $t
            }
        }
    };
}

element_data!(f32, F32);
element_data!(f64, F64);

impl Element for f32 {
    const ZERO: f32 = 0.0;
    const TINY_SQUARE: f64 = (f32::MIN_POSITIVE / f32::EPSILON) as f64;
    const TINY_SCALE: f64 = (1u128 << 86) as f64;
}

impl Element for f64 {
    const ZERO: f64 = 0.0;
    const TINY_SQUARE: f64 = 0.0;
    const TINY_SCALE: f64 = 1.0;
}

/// `v` rounded to the nearest value (ties to even) of a binary format with `mantissa` stored
/// bits and smallest normal exponent `min_exp`, as an `f64` (beyond the format's largest
/// finite value it is still finite; the caller's conversion makes it infinite): the quantum
/// of `v`'s binade, `q`, is a power of two, so `v / q`, its rounding to an integer and the
/// product are all exact. (`half`'s own `from_f64` drops the lower 32 bits of the `f64` before
/// rounding, which misrounds values just above a tie.)
fn round_to_format(v: f64, mantissa: i32, min_exp: i32) -> f64 {
    if !v.is_finite() || v == 0.0 {
        return v;
    }
    let exp = ((v.to_bits() >> 52) & 0x7ff) as i32 - 1023;
    // 2^e as bits (e >= -133 for the formats here, well within f64's normal range).
    let q = f64::from_bits(((exp.max(min_exp) - mantissa + 1023) as u64) << 52);
    (v / q).round_ties_even() * q
}

/// `Data` for a 16-bit type computed in `f32`, converted by the `half` crate outside the
/// vector kernels; `$mantissa` stored bits, smallest normal exponent `$min_exp`.
macro_rules! half_data {
    ($t:ty, $mantissa:expr, $min_exp:expr) => {
        impl Data for $t {
            type Param = f32;
            type Lanes<S: Simd> = Stored<S::F32, $t>;
            #[inline(always)]
            fn to_param(self) -> f32 {
                self.to_f32()
            }
            #[inline(always)]
            fn from_param(v: f32) -> $t {
                <$t>::from_f32(v)
            }
            #[inline(always)]
            fn to_f64(self) -> f64 {
                <$t>::to_f64(self)
            }
            #[inline(always)]
            fn from_f64(v: f64) -> $t {
                // Exact once rounded (or beyond the largest value: infinity).
                <$t>::from_f64(round_to_format(v, $mantissa, $min_exp))
            }
        }
    };
}

half_data!(f16, 10, -14);
half_data!(bf16, 7, -126);

/// Whether shifted sums `s1`, `s2` of `n` values of type `T` need redoing in `f64`: not finite
/// (squares beyond `T`'s range, or a non-finite input, which stays non-finite), or a mean
/// square so small that the squares were subnormal in `T` (deviations below about `1e-19` in
/// `f32`). A block whose values are all equal also lands here (its sums are 0); the `f64`
/// path returns it at once.
#[inline(always)]
pub(crate) fn tiny_squares<T: Element>(n: usize, s1: f64, s2: f64) -> bool {
    !(s1.is_finite() && s2.is_finite() && s2 >= n as f64 * T::TINY_SQUARE)
}

#[cfg(test)]
mod tests {
    use super::Data;
    use half::{bf16, f16};

    /// `from_f64` rounds once, to nearest, ties to even, from `f64` values that `f32` cannot
    /// hold: just above and below every midpoint between neighbours, the midpoints themselves,
    /// beyond the largest value, and into the subnormals.
    fn check_rounding<D: Data>(of: fn(u16) -> D, bits: fn(D) -> u16, max_bits: u16) {
        for b in 0..max_bits {
            let (lo, hi) = (of(b).to_f64(), of(b + 1).to_f64());
            let mid = (lo + hi) / 2.0;
            let tiny = (hi - lo) * 1e-12;
            assert_eq!(
                bits(D::from_f64(mid - tiny)),
                b,
                "below the midpoint above {b:#x}"
            );
            assert_eq!(
                bits(D::from_f64(mid + tiny)),
                b + 1,
                "above the midpoint above {b:#x}"
            );
            let even = if b % 2 == 0 { b } else { b + 1 };
            assert_eq!(bits(D::from_f64(mid)), even, "the midpoint above {b:#x}");
            assert_eq!(bits(D::from_f64(-(mid + tiny))), (b + 1) | 0x8000);
        }
        let max = of(max_bits).to_f64();
        let next = of(max_bits - 1).to_f64();
        let beyond = max + (max - next) / 2.0;
        assert!(
            D::from_f64(beyond).to_f64().is_infinite(),
            "overflow at the tie"
        );
        assert_eq!(bits(D::from_f64(beyond * (1.0 - 1e-12))), max_bits);
        assert!(D::from_f64(f64::NAN).to_f64().is_nan());
    }

    #[test]
    #[cfg_attr(miri, ignore)]
    fn from_f64_rounds_once_to_nearest_even() {
        check_rounding::<f16>(f16::from_bits, f16::to_bits, 0x7bff);
        check_rounding::<bf16>(bf16::from_bits, bf16::to_bits, 0x7f7f);
    }
}
