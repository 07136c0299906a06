//! The instruction sets as types: a token per instruction set, the proof that its features were
//! detected, which names its lane types and enters any kernel with its features switched on.
//!
//! The shape of `pulp`'s `Simd` and `WithSimd`: a kernel is a value whose type implements
//! [`WithSimd`], with one generic method; [`Simd::vectorize`] calls it from the instruction
//! set's single `#[target_feature]` entry. Everything the kernel calls is `#[inline(always)]`,
//! closures included, so it is compiled into that entry with the entry's features ([the
//! inlining rule](super)). Adding a kernel is adding one such type; adding an instruction set
//! is adding one token.

use super::lanes::{Convert, Lanes, One};
use half::{bf16, f16};

/// An instruction set, as a zero-sized token that only detection makes (or, for the scalar
/// and portable paths, anyone: they need nothing).
pub trait Simd: Copy + Send + Sync + 'static {
    /// Lanes of `f32`, which also carry the 16-bit types.
    type F32: Lanes<Elem = f32, Mem = f32> + Convert<f16> + Convert<bf16>;
    /// Lanes of `f64`.
    type F64: Lanes<Elem = f64, Mem = f64>;
    /// Runs `op` with this instruction set's features switched on.
    fn vectorize<Op: WithSimd>(self, op: Op) -> Op::Output;
}

/// A computation generic over the instruction set. Its `with_simd` is `#[inline(always)]`
/// when it is a kernel (entered with [`Simd::vectorize`]); a driver that spreads kernels over
/// threads is run with the token directly ([`super::dispatch`]) and enters them at its leaves,
/// since rayon runs its tasks on threads outside any caller's target features.
pub trait WithSimd {
    /// What the computation returns.
    type Output;
    /// Runs it on the lanes of `simd`.
    fn with_simd<S: Simd>(self, simd: S) -> Self::Output;
}

/// The scalar path: one element at a time, the reference every vector path is compared with.
#[derive(Clone, Copy, Debug)]
pub struct Scalar;

impl Simd for Scalar {
    type F32 = One<f32>;
    type F64 = One<f64>;
    #[inline(always)]
    fn vectorize<Op: WithSimd>(self, op: Op) -> Op::Output {
        op.with_simd(self)
    }
}

/// The portable path: `wide`'s vectors, with whatever target features the build enables.
#[derive(Clone, Copy, Debug)]
pub struct Portable;

impl Simd for Portable {
    type F32 = wide::f32x8;
    type F64 = wide::f64x4;
    #[inline(always)]
    fn vectorize<Op: WithSimd>(self, op: Op) -> Op::Output {
        op.with_simd(self)
    }
}
