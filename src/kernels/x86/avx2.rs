//! AVX2 + FMA lanes: `__m256` as 8 `f32`, `__m256d` as 4 `f64`.
//!
//! Safety: the intrinsics need AVX2 and FMA. Values of these types are only created inside
//! kernels entered through the `#[target_feature(enable = "avx2,fma")]` functions of
//! [`super::Avx2`], which exists only after `is_x86_feature_detected!` confirmed both; the
//! types and the `Lanes` trait are unreachable from outside the crate. Every load and store
//! goes through a slice that bounds-checks it first (or, partial, masks it to `s.len()` lanes).

use crate::kernels::lanes::Lanes;
use std::arch::x86_64::*;

/// 8 `f32` lanes in a `__m256`.
#[derive(Clone, Copy, Debug)]
pub struct F32x8(__m256);

/// 4 `f64` lanes in a `__m256d`.
#[derive(Clone, Copy, Debug)]
pub struct F64x4(__m256d);

macro_rules! avx2_lanes {
    ($v:ident, $t:ty, $w:expr, $r:ident, $set1:ident, $loadu:ident, $storeu:ident,
     $maskload:ident, $maskstore:ident, $blendv:ident, $add:ident, $sub:ident, $mul:ident,
     $fmadd:ident, $mask:expr, $hsum:ident) => {
        impl Lanes for $v {
            type Elem = $t;
            const WIDTH: usize = $w;

            #[inline(always)]
            fn splat(v: $t) -> Self {
                // SAFETY: see the module comment (AVX2 confirmed before any value exists).
                unsafe { $v($set1(v)) }
            }
            #[inline(always)]
            fn load(s: &[$t]) -> Self {
                let s = &s[..$w];
                // SAFETY: AVX2 as above; `s` holds the $w elements read.
                unsafe { $v($loadu(s.as_ptr())) }
            }
            #[inline(always)]
            fn load_partial(s: &[$t], fill: $t) -> Self {
                // SAFETY: AVX2 as above; the mask enables only the first `s.len()` lanes,
                // and masked-off lanes are neither read nor able to fault.
                unsafe {
                    let m = $mask(s.len());
                    $v($blendv(
                        $set1(fill),
                        $maskload(s.as_ptr(), m),
                        std::mem::transmute::<__m256i, $r>(m),
                    ))
                }
            }
            #[inline(always)]
            fn store(self, s: &mut [$t]) {
                let s = &mut s[..$w];
                // SAFETY: AVX2 as above; `s` holds the $w elements written.
                unsafe { $storeu(s.as_mut_ptr(), self.0) }
            }
            #[inline(always)]
            fn store_partial(self, s: &mut [$t]) {
                // SAFETY: AVX2 as above; only the first `s.len()` lanes are written.
                unsafe { $maskstore(s.as_mut_ptr(), $mask(s.len()), self.0) }
            }
            #[inline(always)]
            fn add(self, o: Self) -> Self {
                // SAFETY: AVX2 as above.
                unsafe { $v($add(self.0, o.0)) }
            }
            #[inline(always)]
            fn sub(self, o: Self) -> Self {
                // SAFETY: AVX2 as above.
                unsafe { $v($sub(self.0, o.0)) }
            }
            #[inline(always)]
            fn mul(self, o: Self) -> Self {
                // SAFETY: AVX2 as above.
                unsafe { $v($mul(self.0, o.0)) }
            }
            #[inline(always)]
            fn mul_add(self, a: Self, b: Self) -> Self {
                // SAFETY: FMA confirmed with AVX2, as above.
                unsafe { $v($fmadd(self.0, a.0, b.0)) }
            }
            #[inline(always)]
            fn sum(self) -> $t {
                // SAFETY: AVX2 as above.
                unsafe { $hsum(self.0) }
            }
        }
    };
}

/// Lanes `i < n` all ones (32-bit lanes).
#[inline(always)]
unsafe fn mask32(n: usize) -> __m256i {
    _mm256_cmpgt_epi32(
        _mm256_set1_epi32(n as i32),
        _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
    )
}

/// Lanes `i < n` all ones (64-bit lanes).
#[inline(always)]
unsafe fn mask64(n: usize) -> __m256i {
    _mm256_cmpgt_epi64(_mm256_set1_epi64x(n as i64), _mm256_setr_epi64x(0, 1, 2, 3))
}

/// Sum of the 8 lanes: halves, then pairs.
#[inline(always)]
unsafe fn hsum_ps(v: __m256) -> f32 {
    let x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let x = _mm_add_ps(x, _mm_movehl_ps(x, x));
    _mm_cvtss_f32(_mm_add_ss(x, _mm_movehdup_ps(x)))
}

/// Sum of the 4 lanes: halves, then the pair.
#[inline(always)]
unsafe fn hsum_pd(v: __m256d) -> f64 {
    let x = _mm_add_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd::<1>(v));
    _mm_cvtsd_f64(_mm_add_sd(x, _mm_unpackhi_pd(x, x)))
}

avx2_lanes!(
    F32x8,
    f32,
    8,
    __m256,
    _mm256_set1_ps,
    _mm256_loadu_ps,
    _mm256_storeu_ps,
    _mm256_maskload_ps,
    _mm256_maskstore_ps,
    _mm256_blendv_ps,
    _mm256_add_ps,
    _mm256_sub_ps,
    _mm256_mul_ps,
    _mm256_fmadd_ps,
    mask32,
    hsum_ps
);
avx2_lanes!(
    F64x4,
    f64,
    4,
    __m256d,
    _mm256_set1_pd,
    _mm256_loadu_pd,
    _mm256_storeu_pd,
    _mm256_maskload_pd,
    _mm256_maskstore_pd,
    _mm256_blendv_pd,
    _mm256_add_pd,
    _mm256_sub_pd,
    _mm256_mul_pd,
    _mm256_fmadd_pd,
    mask64,
    hsum_pd
);
