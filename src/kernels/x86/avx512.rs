//! AVX-512F lanes: `__m512` as 16 `f32`, `__m512d` as 8 `f64`, with mask registers for the
//! tails.
//!
//! Safety: as for the AVX2 lanes, values exist only inside kernels entered through the
//! `#[target_feature(enable = "avx512f")]` functions of [`super::Avx512`], which exists only
//! after `is_x86_feature_detected!("avx512f")`; every access is bounds-checked through a slice
//! or masked to the slice's length.

use crate::kernels::lanes::Lanes;
use std::arch::x86_64::*;

/// 16 `f32` lanes in a `__m512`.
#[derive(Clone, Copy, Debug)]
pub struct F32x16(__m512);

/// 8 `f64` lanes in a `__m512d`.
#[derive(Clone, Copy, Debug)]
pub struct F64x8(__m512d);

macro_rules! avx512_lanes {
    ($v:ident, $t:ty, $w:expr, $m:ty, $set1:ident, $loadu:ident, $storeu:ident,
     $mask_loadu:ident, $mask_storeu:ident, $add:ident, $sub:ident, $mul:ident,
     $fmadd:ident, $reduce:ident) => {
        impl Lanes for $v {
            type Elem = $t;
            const WIDTH: usize = $w;

            #[inline(always)]
            fn splat(v: $t) -> Self {
                // SAFETY: see the module comment (AVX-512F confirmed before any value exists).
                unsafe { $v($set1(v)) }
            }
            #[inline(always)]
            fn load(s: &[$t]) -> Self {
                let s = &s[..$w];
                // SAFETY: AVX-512F as above; `s` holds the $w elements read.
                unsafe { $v($loadu(s.as_ptr())) }
            }
            #[inline(always)]
            fn load_partial(s: &[$t], fill: $t) -> Self {
                let k: $m = ((1u32 << s.len().min($w - 1)) - 1) as $m;
                // SAFETY: AVX-512F as above; the mask enables only the first `s.len()` lanes,
                // masked-off lanes are not read and cannot fault.
                unsafe { $v($mask_loadu($set1(fill), k, s.as_ptr())) }
            }
            #[inline(always)]
            fn store(self, s: &mut [$t]) {
                let s = &mut s[..$w];
                // SAFETY: AVX-512F as above; `s` holds the $w elements written.
                unsafe { $storeu(s.as_mut_ptr(), self.0) }
            }
            #[inline(always)]
            fn store_partial(self, s: &mut [$t]) {
                let k: $m = ((1u32 << s.len().min($w - 1)) - 1) as $m;
                // SAFETY: AVX-512F as above; only the first `s.len()` lanes are written.
                unsafe { $mask_storeu(s.as_mut_ptr(), k, self.0) }
            }
            #[inline(always)]
            fn add(self, o: Self) -> Self {
                // SAFETY: AVX-512F as above.
                unsafe { $v($add(self.0, o.0)) }
            }
            #[inline(always)]
            fn sub(self, o: Self) -> Self {
                // SAFETY: AVX-512F as above.
                unsafe { $v($sub(self.0, o.0)) }
            }
            #[inline(always)]
            fn mul(self, o: Self) -> Self {
                // SAFETY: AVX-512F as above.
                unsafe { $v($mul(self.0, o.0)) }
            }
            #[inline(always)]
            fn mul_add(self, a: Self, b: Self) -> Self {
                // SAFETY: AVX-512F as above.
                unsafe { $v($fmadd(self.0, a.0, b.0)) }
            }
            #[inline(always)]
            fn sum(self) -> $t {
                // SAFETY: AVX-512F as above.
                unsafe { $reduce(self.0) }
            }
        }
    };
}

avx512_lanes!(
    F32x16,
    f32,
    16,
    __mmask16,
    _mm512_set1_ps,
    _mm512_loadu_ps,
    _mm512_storeu_ps,
    _mm512_mask_loadu_ps,
    _mm512_mask_storeu_ps,
    _mm512_add_ps,
    _mm512_sub_ps,
    _mm512_mul_ps,
    _mm512_fmadd_ps,
    _mm512_reduce_add_ps
);
avx512_lanes!(
    F64x8,
    f64,
    8,
    __mmask8,
    _mm512_set1_pd,
    _mm512_loadu_pd,
    _mm512_storeu_pd,
    _mm512_mask_loadu_pd,
    _mm512_mask_storeu_pd,
    _mm512_add_pd,
    _mm512_sub_pd,
    _mm512_mul_pd,
    _mm512_fmadd_pd,
    _mm512_reduce_add_pd
);
