//! AVX-512F lanes: `__m512` as 16 `f32`, `__m512d` as 8 `f64`, with mask registers for the
//! tails.
//!
//! Safety: as for the AVX2 lanes, values exist only inside kernels entered through the
//! `#[target_feature(enable = "avx512f")]` functions of [`super::Avx512`], which exists only
//! after `is_x86_feature_detected!("avx512f")`; every access is bounds-checked through a slice
//! or masked to the slice's length.

use crate::kernels::lanes::{Convert, Lanes};
use half::{bf16, f16};
use std::arch::x86_64::*;

/// 16 `f32` lanes in a `__m512`.
#[derive(Clone, Copy, Debug)]
pub struct F32x16(__m512);

/// 8 `f64` lanes in a `__m512d`.
#[derive(Clone, Copy, Debug)]
pub struct F64x8(__m512d);

/// The mask of the first `n <= lanes` lanes.
#[inline(always)]
fn mask(n: usize) -> u32 {
    (1u32 << n.min(31)) - 1
}

/// The first `s.len() < 16` lanes from `s`, the others `fill`.
///
/// # Safety
/// The CPU must have AVX-512F; `s` must be shorter than a vector (the mask covers its
/// `s.len()` elements and nothing beyond).
#[inline(always)]
unsafe fn load_partial_ps(s: &[f32], fill: f32) -> __m512 {
    // SAFETY: AVX-512F detected (the caller's contract); the mask limits the access to
    // `s.len()` elements of `s`.
    unsafe { _mm512_mask_loadu_ps(_mm512_set1_ps(fill), mask(s.len()) as __mmask16, s.as_ptr()) }
}

/// Writes the first `s.len() < 16` lanes of `v` to `s`.
///
/// # Safety
/// The CPU must have AVX-512F; `s` must be shorter than a vector (the mask covers its
/// `s.len()` elements and nothing beyond).
#[inline(always)]
unsafe fn store_partial_ps(s: &mut [f32], v: __m512) {
    // SAFETY: AVX-512F detected (the caller's contract); the mask limits the access to
    // `s.len()` elements of `s`.
    unsafe { _mm512_mask_storeu_ps(s.as_mut_ptr(), mask(s.len()) as __mmask16, v) }
}

/// The first `s.len() < 8` lanes from `s`, the others `fill`.
///
/// # Safety
/// The CPU must have AVX-512F; `s` must be shorter than a vector (the mask covers its
/// `s.len()` elements and nothing beyond).
#[inline(always)]
unsafe fn load_partial_pd(s: &[f64], fill: f64) -> __m512d {
    // SAFETY: AVX-512F detected (the caller's contract); the mask limits the access to
    // `s.len()` elements of `s`.
    unsafe { _mm512_mask_loadu_pd(_mm512_set1_pd(fill), mask(s.len()) as __mmask8, s.as_ptr()) }
}

/// Writes the first `s.len() < 8` lanes of `v` to `s`.
///
/// # Safety
/// The CPU must have AVX-512F; `s` must be shorter than a vector (the mask covers its
/// `s.len()` elements and nothing beyond).
#[inline(always)]
unsafe fn store_partial_pd(s: &mut [f64], v: __m512d) {
    // SAFETY: AVX-512F detected (the caller's contract); the mask limits the access to
    // `s.len()` elements of `s`.
    unsafe { _mm512_mask_storeu_pd(s.as_mut_ptr(), mask(s.len()) as __mmask8, v) }
}

/// Lanes `i < k` from `a`, the others from `b`.
///
/// # Safety
/// The CPU must have AVX-512F.
#[inline(always)]
unsafe fn splice_ps(k: usize, a: __m512, b: __m512) -> __m512 {
    // SAFETY: AVX-512F detected (the caller's contract); no memory is accessed.
    unsafe { _mm512_mask_blend_ps(mask(k) as __mmask16, b, a) }
}

/// Lanes `i < k` from `a`, the others from `b`.
///
/// # Safety
/// The CPU must have AVX-512F.
#[inline(always)]
unsafe fn splice_pd(k: usize, a: __m512d, b: __m512d) -> __m512d {
    // SAFETY: AVX-512F detected (the caller's contract); no memory is accessed.
    unsafe { _mm512_mask_blend_pd(mask(k) as __mmask8, b, a) }
}

/// `dy` where `!(y <= 0)`, else 0 (the gradient through a ReLU whose output is `y`).
///
/// # Safety
/// The CPU must have AVX-512F.
#[inline(always)]
unsafe fn relu_grad_ps(dy: __m512, y: __m512) -> __m512 {
    // SAFETY: AVX-512F detected (the caller's contract); no memory is accessed.
    unsafe {
        _mm512_maskz_mov_ps(
            _mm512_cmp_ps_mask::<_CMP_NLE_UQ>(y, _mm512_setzero_ps()),
            dy,
        )
    }
}

/// `dy` where `!(y <= 0)`, else 0.
///
/// # Safety
/// The CPU must have AVX-512F.
#[inline(always)]
unsafe fn relu_grad_pd(dy: __m512d, y: __m512d) -> __m512d {
    // SAFETY: AVX-512F detected (the caller's contract); no memory is accessed.
    unsafe {
        _mm512_maskz_mov_pd(
            _mm512_cmp_pd_mask::<_CMP_NLE_UQ>(y, _mm512_setzero_pd()),
            dy,
        )
    }
}

x86_lanes!(F32x16, f32, 16;
    _mm512_set1_ps, _mm512_loadu_ps, _mm512_storeu_ps, _mm512_stream_ps, _mm512_add_ps, _mm512_sub_ps,
    _mm512_mul_ps, _mm512_fmadd_ps, _mm512_max_ps;
    load_partial_ps, store_partial_ps, _mm512_reduce_add_ps, splice_ps, relu_grad_ps);
x86_lanes!(F64x8, f64, 8;
    _mm512_set1_pd, _mm512_loadu_pd, _mm512_storeu_pd, _mm512_stream_pd, _mm512_add_pd, _mm512_sub_pd,
    _mm512_mul_pd, _mm512_fmadd_pd, _mm512_max_pd;
    load_partial_pd, store_partial_pd, _mm512_reduce_add_pd, splice_pd, relu_grad_pd);

/// `f32` lanes rounded to `bf16` bits, to nearest even; a NaN stays a NaN (made quiet),
/// overflow goes to infinity. (Not AVX512-BF16's `vcvtneps2bf16`: it flushes subnormal inputs
/// and outputs to zero, where `bf16` has subnormals down to `2^-133`.)
///
/// # Safety
/// The CPU must have AVX-512F.
#[inline(always)]
unsafe fn round_bf16(v: __m512) -> __m256i {
    // SAFETY: AVX-512F detected (the caller's contract); no memory is accessed.
    unsafe {
        let bits = _mm512_castps_si512(v);
        let high = _mm512_srli_epi32::<16>(bits);
        let lsb = _mm512_and_si512(high, _mm512_set1_epi32(1));
        let bias = _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff));
        let rounded = _mm512_srli_epi32::<16>(_mm512_add_epi32(bits, bias));
        let quiet = _mm512_or_si512(high, _mm512_set1_epi32(0x40));
        let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(v, v);
        _mm512_cvtepi32_epi16(_mm512_mask_blend_epi32(nan, rounded, quiet))
    }
}

/// Sixteen 16-bit values to the first 16 elements of `s`, streaming where `s` is aligned to
/// 32 bytes.
///
/// # Safety
/// The CPU must have AVX-512F.
#[inline(always)]
unsafe fn store_halves<D>(s: &mut [D], v: __m256i, stream: bool) {
    const { assert!(std::mem::size_of::<D>() == 2) };
    let s = &mut s[..16];
    let p = s.as_mut_ptr().cast::<__m256i>();
    // SAFETY: AVX-512F detected (the caller's contract; it implies AVX); `s` holds the 32
    // bytes written, and the streaming store is used only where they are aligned to 32.
    unsafe {
        if stream && p.align_offset(32) == 0 {
            _mm256_stream_si256(p, v)
        } else {
            _mm256_storeu_si256(p, v)
        }
    }
}

/// The first 16 elements of `s`, 16 bits each.
///
/// # Safety
/// The CPU must have AVX-512F.
#[inline(always)]
unsafe fn load_halves<D>(s: &[D]) -> __m256i {
    const { assert!(std::mem::size_of::<D>() == 2) };
    let s = &s[..16];
    // SAFETY: AVX-512F detected (the caller's contract); `s` holds the 32 bytes read.
    unsafe { _mm256_loadu_si256(s.as_ptr().cast()) }
}

// SAFETY (all four methods below): values exist only inside kernels entered with AVX-512F
// enabled (`super::Avx512`); the helpers bound the memory accessed.
impl Convert<f16> for F32x16 {
    #[inline(always)]
    fn widen(s: &[f16]) -> Self {
        // SAFETY: see above.
        unsafe { F32x16(_mm512_cvtph_ps(load_halves(s))) }
    }
    #[inline(always)]
    fn narrow(self, s: &mut [f16]) {
        // SAFETY: see above.
        unsafe {
            store_halves(
                s,
                _mm512_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(self.0),
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
                _mm512_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(self.0),
                true,
            )
        }
    }
}

impl Convert<bf16> for F32x16 {
    #[inline(always)]
    fn widen(s: &[bf16]) -> Self {
        // SAFETY: see above.
        unsafe {
            let wide = _mm512_cvtepu16_epi32(load_halves(s));
            F32x16(_mm512_castsi512_ps(_mm512_slli_epi32::<16>(wide)))
        }
    }
    #[inline(always)]
    fn narrow(self, s: &mut [bf16]) {
        // SAFETY: see above.
        unsafe { store_halves(s, round_bf16(self.0), false) }
    }
    #[inline(always)]
    fn narrow_stream(self, s: &mut [bf16]) {
        // SAFETY: see above.
        unsafe { store_halves(s, round_bf16(self.0), true) }
    }
}
