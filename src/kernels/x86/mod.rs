//! x86-64 instruction sets chosen at run time: the same generic kernels, entered through one
//! `#[target_feature]` function per instruction set ([`Simd::vectorize`]) so that the compiler
//! emits AVX2/AVX-512 code for them in a default build. The entries sit at the leaves, not
//! around a driver: rayon runs tasks on other threads, outside any caller's target features.

/// Implements `Lanes` for `$v`, a wrapper of one x86 vector register of `$w` lanes of `$t`:
/// the full-width operations from the named intrinsics, the partial loads and stores, the
/// horizontal sum, the splice and the ReLU gradient from helper functions of the instruction
/// set's module. Every method is an
/// intrinsic behind a slice bounds check; see each module's safety comment for why calling them
/// is sound.
macro_rules! x86_lanes {
    ($v:ident, $t:ty, $w:expr;
     $set1:ident, $loadu:ident, $storeu:ident, $stream:ident, $add:ident, $sub:ident, $mul:ident, $fmadd:ident, $max:ident;
     $load_partial:ident, $store_partial:ident, $sum:ident, $splice:ident, $gate:ident) => {
        impl Lanes for $v {
            type Elem = $t;
            $crate::kernels::lanes::same_memory!($t);
            const WIDTH: usize = $w;

            #[inline(always)]
            fn splat(v: $t) -> Self {
                // SAFETY: the instruction set was detected before any value exists.
                unsafe { $v($set1(v)) }
            }
            #[inline(always)]
            fn load(s: &[$t]) -> Self {
                let s = &s[..$w];
                // SAFETY: detected as above; `s` holds the lanes read.
                unsafe { $v($loadu(s.as_ptr())) }
            }
            #[inline(always)]
            fn load_partial(s: &[$t], fill: $t) -> Self {
                // SAFETY: detected as above; the helper masks the access to `s.len()` lanes.
                unsafe { $v($load_partial(s, fill)) }
            }
            #[inline(always)]
            fn store(self, s: &mut [$t]) {
                let s = &mut s[..$w];
                // SAFETY: detected as above; `s` holds the lanes written.
                unsafe { $storeu(s.as_mut_ptr(), self.0) }
            }
            #[inline(always)]
            fn write_stream(self, s: &mut [$t]) {
                let s = &mut s[..$w];
                if s.as_ptr().align_offset(std::mem::size_of::<Self>()) == 0 {
                    // SAFETY: detected as above; `s` holds the lanes written and is aligned to
                    // the vector's size, as the streaming store requires.
                    unsafe { $stream(s.as_mut_ptr(), self.0) }
                } else {
                    self.store(s)
                }
            }
            #[inline(always)]
            fn store_partial(self, s: &mut [$t]) {
                // SAFETY: detected as above; the helper masks the access to `s.len()` lanes.
                unsafe { $store_partial(s, self.0) }
            }
            #[inline(always)]
            fn add(self, o: Self) -> Self {
                // SAFETY: detected as above.
                unsafe { $v($add(self.0, o.0)) }
            }
            #[inline(always)]
            fn sub(self, o: Self) -> Self {
                // SAFETY: detected as above.
                unsafe { $v($sub(self.0, o.0)) }
            }
            #[inline(always)]
            fn mul(self, o: Self) -> Self {
                // SAFETY: detected as above.
                unsafe { $v($mul(self.0, o.0)) }
            }
            #[inline(always)]
            fn mul_add(self, a: Self, b: Self) -> Self {
                // SAFETY: detected as above (FMA with AVX2; part of AVX-512F).
                unsafe { $v($fmadd(self.0, a.0, b.0)) }
            }
            #[inline(always)]
            fn sum(self) -> $t {
                // SAFETY: detected as above.
                unsafe { $sum(self.0) }
            }
            #[inline(always)]
            fn splice(self, k: usize, rest: Self) -> Self {
                // SAFETY: detected as above.
                unsafe { $v($splice(k, self.0, rest.0)) }
            }
            #[inline(always)]
            fn relu(self) -> Self {
                // `max(0, v)` returns its second operand, `v`, when `v` is NaN or a zero.
                // SAFETY: detected as above.
                unsafe { $v($max($set1(0.0), self.0)) }
            }
            #[inline(always)]
            fn relu_grad(self, y: Self) -> Self {
                // SAFETY: detected as above.
                unsafe { $v($gate(self.0, y.0)) }
            }
        }
    };
}

pub mod avx2;
pub mod avx512;

use crate::kernels::simd::{Simd, WithSimd};

/// Defines the token of an x86 instruction set: made by `detect` only, its lanes, and its
/// one `#[target_feature]` entry.
macro_rules! x86_token {
    ($(#[$doc:meta])* $name:ident, $f32:ty, $f64:ty, $features:literal, $($detect:tt),+) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug)]
        pub struct $name(());

        impl $name {
            /// The token, if this CPU has the instruction set.
            pub fn detect() -> Option<Self> {
                ($(std::arch::is_x86_feature_detected!($detect))&&+).then_some($name(()))
            }
        }

        impl Simd for $name {
            type F32 = $f32;
            type F64 = $f64;
            #[inline(always)]
            fn vectorize<Op: WithSimd>(self, op: Op) -> Op::Output {
                /// # Safety
                /// The CPU must have the instruction set (a token is the proof).
                #[target_feature(enable = $features)]
                unsafe fn entry<Op: WithSimd>(simd: $name, op: Op) -> Op::Output {
                    op.with_simd(simd)
                }
                // SAFETY: `self` exists, so `detect` found the features.
                unsafe { entry(self, op) }
            }
        }
    };
}

x86_token!(
    /// AVX2 with FMA and F16C (every AVX2 CPU has F16C): 8 `f32` or 4 `f64` lanes.
    Avx2, avx2::F32x8, avx2::F64x4, "avx2,fma,f16c", "avx2", "fma", "f16c"
);
x86_token!(
    /// AVX-512F: 16 `f32` or 8 `f64` lanes.
    Avx512, avx512::F32x16, avx512::F64x8, "avx512f", "avx512f"
);

/// Whether this CPU is AMD's Zen 4: family 19h with AVX-512F (the only family-19h CPUs with
/// it). Read once (`cpuid` exits a virtual machine, which makes it slow), then cached. Two
/// choices are tuned for it ([`crate::kernels::zen4`]).
pub(crate) fn zen4() -> bool {
    static ZEN4: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ZEN4.get_or_init(|| {
        use std::arch::x86_64::__cpuid;
        if Avx512::detect().is_none() {
            return false;
        }
        // `__cpuid` is safe in Rust 1.95, which this was built with, but not in every release
        // the crate supports (from 1.89): kept in `unsafe`, allowed where it is unused.
        #[allow(unused_unsafe)]
        // SAFETY: `cpuid` exists on every x86-64 CPU, and leaves 0 and 1 on every one.
        let (vendor, signature) = unsafe { (__cpuid(0), __cpuid(1)) };
        let amd = [vendor.ebx, vendor.edx, vendor.ecx] == [0x6874_7541, 0x6974_6e65, 0x444d_4163];
        // The family: the base family, plus the extended family where the base is 0xF.
        let base = (signature.eax >> 8) & 0xF;
        let family = base
            + if base == 0xF {
                (signature.eax >> 20) & 0xFF
            } else {
                0
            };
        amd && family == 0x19
    })
}
