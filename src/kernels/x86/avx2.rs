//! AVX2 + FMA lanes: `__m256` as 8 `f32`, `__m256d` as 4 `f64`.
//!
//! Safety: the intrinsics need AVX2 and FMA. Values of these types are only created inside
//! kernels entered through the `#[target_feature(enable = "avx2,fma")]` functions of
//! [`super::Avx2`], which exists only after `is_x86_feature_detected!` confirmed both; the
//! types and the `Lanes` trait are unreachable from outside the crate. Every load and store
//! goes through a slice that bounds-checks it first (or, partial, masks it to `s.len()` lanes).

use crate::kernels::lanes::{Convert, Lanes};
use half::{bf16, f16};
use std::arch::x86_64::*;

/// 8 `f32` lanes in a `__m256`.
#[derive(Clone, Copy, Debug)]
pub struct F32x8(__m256);

/// 4 `f64` lanes in a `__m256d`.
#[derive(Clone, Copy, Debug)]
pub struct F64x4(__m256d);

/// Lanes `i < n` all ones (32-bit lanes).
///
/// # Safety
/// The CPU must have AVX2 and FMA.
#[inline(always)]
unsafe fn mask32(n: usize) -> __m256i {
    // SAFETY: AVX2 and FMA detected (the caller's contract); no memory is accessed.
    unsafe {
        _mm256_cmpgt_epi32(
            _mm256_set1_epi32(n as i32),
            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
        )
    }
}

/// Lanes `i < n` all ones (64-bit lanes).
///
/// # Safety
/// The CPU must have AVX2 and FMA.
#[inline(always)]
unsafe fn mask64(n: usize) -> __m256i {
    // SAFETY: AVX2 and FMA detected (the caller's contract); no memory is accessed.
    unsafe { _mm256_cmpgt_epi64(_mm256_set1_epi64x(n as i64), _mm256_setr_epi64x(0, 1, 2, 3)) }
}

/// Sum of the 8 lanes: halves, then pairs.
///
/// # Safety
/// The CPU must have AVX2 and FMA.
#[inline(always)]
unsafe fn hsum_ps(v: __m256) -> f32 {
    // SAFETY: AVX2 and FMA detected (the caller's contract); no memory is accessed.
    unsafe {
        let x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let x = _mm_add_ps(x, _mm_movehl_ps(x, x));
        _mm_cvtss_f32(_mm_add_ss(x, _mm_movehdup_ps(x)))
    }
}

/// Sum of the 4 lanes: halves, then the pair.
///
/// # Safety
/// The CPU must have AVX2 and FMA.
#[inline(always)]
unsafe fn hsum_pd(v: __m256d) -> f64 {
    // SAFETY: AVX2 and FMA detected (the caller's contract); no memory is accessed.
    unsafe {
        let x = _mm_add_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd::<1>(v));
        _mm_cvtsd_f64(_mm_add_sd(x, _mm_unpackhi_pd(x, x)))
    }
}

/// The first `s.len() < 8` lanes from `s`, the others `fill`.
///
/// # Safety
/// The CPU must have AVX2 and FMA; `s` must be shorter than a vector (the mask covers its
/// `s.len()` elements and nothing beyond).
#[inline(always)]
unsafe fn load_partial_ps(s: &[f32], fill: f32) -> __m256 {
    // SAFETY: AVX2 and FMA detected (the caller's contract); the mask limits the access to
    // `s.len()` elements of `s`.
    unsafe {
        let m = mask32(s.len());
        _mm256_blendv_ps(
            _mm256_set1_ps(fill),
            _mm256_maskload_ps(s.as_ptr(), m),
            _mm256_castsi256_ps(m),
        )
    }
}

/// Writes the first `s.len() < 8` lanes of `v` to `s`.
///
/// # Safety
/// The CPU must have AVX2 and FMA; `s` must be shorter than a vector (the mask covers its
/// `s.len()` elements and nothing beyond).
#[inline(always)]
unsafe fn store_partial_ps(s: &mut [f32], v: __m256) {
    // SAFETY: AVX2 and FMA detected (the caller's contract); the mask limits the access to
    // `s.len()` elements of `s`.
    unsafe { _mm256_maskstore_ps(s.as_mut_ptr(), mask32(s.len()), v) }
}

/// The first `s.len() < 4` lanes from `s`, the others `fill`.
///
/// # Safety
/// The CPU must have AVX2 and FMA; `s` must be shorter than a vector (the mask covers its
/// `s.len()` elements and nothing beyond).
#[inline(always)]
unsafe fn load_partial_pd(s: &[f64], fill: f64) -> __m256d {
    // SAFETY: AVX2 and FMA detected (the caller's contract); the mask limits the access to
    // `s.len()` elements of `s`.
    unsafe {
        let m = mask64(s.len());
        _mm256_blendv_pd(
            _mm256_set1_pd(fill),
            _mm256_maskload_pd(s.as_ptr(), m),
            _mm256_castsi256_pd(m),
        )
    }
}

/// Writes the first `s.len() < 4` lanes of `v` to `s`.
///
/// # Safety
/// The CPU must have AVX2 and FMA; `s` must be shorter than a vector (the mask covers its
/// `s.len()` elements and nothing beyond).
#[inline(always)]
unsafe fn store_partial_pd(s: &mut [f64], v: __m256d) {
    // SAFETY: AVX2 and FMA detected (the caller's contract); the mask limits the access to
    // `s.len()` elements of `s`.
    unsafe { _mm256_maskstore_pd(s.as_mut_ptr(), mask64(s.len()), v) }
}

/// Lanes `i < k` from `a`, the others from `b`.
///
/// # Safety
/// The CPU must have AVX2 and FMA.
#[inline(always)]
unsafe fn splice_ps(k: usize, a: __m256, b: __m256) -> __m256 {
    // SAFETY: AVX2 and FMA detected (the caller's contract); no memory is accessed.
    unsafe { _mm256_blendv_ps(b, a, _mm256_castsi256_ps(mask32(k))) }
}

/// Lanes `i < k` from `a`, the others from `b`.
///
/// # Safety
/// The CPU must have AVX2 and FMA.
#[inline(always)]
unsafe fn splice_pd(k: usize, a: __m256d, b: __m256d) -> __m256d {
    // SAFETY: AVX2 and FMA detected (the caller's contract); no memory is accessed.
    unsafe { _mm256_blendv_pd(b, a, _mm256_castsi256_pd(mask64(k))) }
}

/// `dy` where `!(y <= 0)`, else 0 (the gradient through a ReLU whose output is `y`).
///
/// # Safety
/// The CPU must have AVX2 and FMA.
#[inline(always)]
unsafe fn relu_grad_ps(dy: __m256, y: __m256) -> __m256 {
    // SAFETY: AVX detected (the caller's contract); no memory is accessed.
    unsafe { _mm256_and_ps(_mm256_cmp_ps::<_CMP_NLE_UQ>(y, _mm256_setzero_ps()), dy) }
}

/// `dy` where `!(y <= 0)`, else 0.
///
/// # Safety
/// The CPU must have AVX2 and FMA.
#[inline(always)]
unsafe fn relu_grad_pd(dy: __m256d, y: __m256d) -> __m256d {
    // SAFETY: AVX detected (the caller's contract); no memory is accessed.
    unsafe { _mm256_and_pd(_mm256_cmp_pd::<_CMP_NLE_UQ>(y, _mm256_setzero_pd()), dy) }
}

x86_lanes!(F32x8, f32, 8;
    _mm256_set1_ps, _mm256_loadu_ps, _mm256_storeu_ps, _mm256_stream_ps, _mm256_add_ps, _mm256_sub_ps,
    _mm256_mul_ps, _mm256_fmadd_ps, _mm256_max_ps;
    load_partial_ps, store_partial_ps, hsum_ps, splice_ps, relu_grad_ps);
x86_lanes!(F64x4, f64, 4;
    _mm256_set1_pd, _mm256_loadu_pd, _mm256_storeu_pd, _mm256_stream_pd, _mm256_add_pd, _mm256_sub_pd,
    _mm256_mul_pd, _mm256_fmadd_pd, _mm256_max_pd;
    load_partial_pd, store_partial_pd, hsum_pd, splice_pd, relu_grad_pd);

/// `f32` lanes rounded to `bf16` bits (in the low half of each 32-bit lane), to nearest
/// even; a NaN stays a NaN (made quiet), overflow goes to infinity.
///
/// # Safety
/// The CPU must have AVX2 and FMA.
#[inline(always)]
unsafe fn round_bf16(v: __m256) -> __m256i {
    // SAFETY: AVX2 detected (the caller's contract); no memory is accessed.
    unsafe {
        let bits = _mm256_castps_si256(v);
        let high = _mm256_srli_epi32::<16>(bits);
        let lsb = _mm256_and_si256(high, _mm256_set1_epi32(1));
        let bias = _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff));
        let rounded = _mm256_srli_epi32::<16>(_mm256_add_epi32(bits, bias));
        let quiet = _mm256_or_si256(high, _mm256_set1_epi32(0x40));
        let nan = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_UNORD_Q>(v, v));
        let r = _mm256_blendv_epi8(rounded, quiet, nan);
        // Eight 16-bit values in the low 128 bits: pack within each half, then gather them.
        _mm256_permute4x64_epi64::<0b1000>(_mm256_packus_epi32(r, r))
    }
}

/// Eight 16-bit values to the first 8 elements of `s`, streaming where `s` is aligned to 16
/// bytes.
///
/// # Safety
/// The CPU must have AVX2 and FMA.
#[inline(always)]
unsafe fn store_halves<D>(s: &mut [D], v: __m128i, stream: bool) {
    const { assert!(std::mem::size_of::<D>() == 2) };
    let s = &mut s[..8];
    let p = s.as_mut_ptr().cast::<__m128i>();
    // SAFETY: AVX2 detected (the caller's contract); `s` holds the 16 bytes written, and the
    // streaming store is used only where they are aligned to 16 as it requires.
    unsafe {
        if stream && p.align_offset(16) == 0 {
            _mm_stream_si128(p, v)
        } else {
            _mm_storeu_si128(p, v)
        }
    }
}

/// The first 8 elements of `s`, 16 bits each.
///
/// # Safety
/// The CPU must have AVX2 and FMA.
#[inline(always)]
unsafe fn load_halves<D>(s: &[D]) -> __m128i {
    const { assert!(std::mem::size_of::<D>() == 2) };
    let s = &s[..8];
    // SAFETY: AVX2 detected (the caller's contract); `s` holds the 16 bytes read.
    unsafe { _mm_loadu_si128(s.as_ptr().cast()) }
}

// SAFETY (all four methods below): values exist only inside kernels entered with AVX2, FMA and
// F16C enabled (`super::Avx2` requires all three); the helpers bound the memory accessed.
impl Convert<f16> for F32x8 {
    #[inline(always)]
    fn widen(s: &[f16]) -> Self {
        // SAFETY: see above.
        unsafe { F32x8(_mm256_cvtph_ps(load_halves(s))) }
    }
    #[inline(always)]
    fn narrow(self, s: &mut [f16]) {
        // SAFETY: see above.
        unsafe {
            store_halves(
                s,
                _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(self.0),
                false,
            )
        }
    }
    #[inline(always)]
    fn narrow_stream(self, s: &mut [f16]) {
        // SAFETY: see above.
        unsafe {
            store_halves(
                s,
                _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(self.0),
                true,
            )
        }
    }
}

impl Convert<bf16> for F32x8 {
    #[inline(always)]
    fn widen(s: &[bf16]) -> Self {
        // SAFETY: see above.
        unsafe {
            let wide = _mm256_cvtepu16_epi32(load_halves(s));
            F32x8(_mm256_castsi256_ps(_mm256_slli_epi32::<16>(wide)))
        }
    }
    #[inline(always)]
    fn narrow(self, s: &mut [bf16]) {
        // SAFETY: see above.
        unsafe { store_halves(s, _mm256_castsi256_si128(round_bf16(self.0)), false) }
    }
    #[inline(always)]
    fn narrow_stream(self, s: &mut [bf16]) {
        // SAFETY: see above.
        unsafe { store_halves(s, _mm256_castsi256_si128(round_bf16(self.0)), true) }
    }
}
