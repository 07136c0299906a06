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

x86_lanes!(F32x16, f32, 16;
    _mm512_set1_ps, _mm512_loadu_ps, _mm512_storeu_ps, _mm512_stream_ps, _mm512_add_ps, _mm512_sub_ps,
    _mm512_mul_ps, _mm512_fmadd_ps;
    load_partial_ps, store_partial_ps, _mm512_reduce_add_ps, splice_ps);
x86_lanes!(F64x8, f64, 8;
    _mm512_set1_pd, _mm512_loadu_pd, _mm512_storeu_pd, _mm512_stream_pd, _mm512_add_pd, _mm512_sub_pd,
    _mm512_mul_pd, _mm512_fmadd_pd;
    load_partial_pd, store_partial_pd, _mm512_reduce_add_pd, splice_pd);
