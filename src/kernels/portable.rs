//! `wide`'s vectors as [`Lanes`]: the portable path (SSE2 in a default x86-64 build, NEON on
//! aarch64, simd128 on wasm, and whatever target features the build itself enables).

use super::lanes::{array_fn, convert_by_element, same_memory, Convert, Lanes};
use half::bf16;
use wide::{f32x8, f64x4, u32x8};

macro_rules! wide_lanes {
    ($v:ty, $t:ty, $w:expr) => {
        impl Lanes for $v {
            type Elem = $t;
            same_memory!($t);
            const WIDTH: usize = $w;

            #[inline(always)]
            fn splat(v: $t) -> Self {
                <$v>::splat(v)
            }
            #[inline(always)]
            fn load(s: &[$t]) -> Self {
                let a: [$t; $w] = s[..$w].try_into().expect("slice of WIDTH");
                <$v>::new(a)
            }
            #[inline(always)]
            fn load_partial(s: &[$t], fill: $t) -> Self {
                let mut a = [fill; $w];
                a[..s.len()].copy_from_slice(s);
                <$v>::new(a)
            }
            #[inline(always)]
            fn store(self, s: &mut [$t]) {
                s[..$w].copy_from_slice(&self.to_array());
            }
            #[inline(always)]
            fn store_partial(self, s: &mut [$t]) {
                let n = s.len();
                s.copy_from_slice(&self.to_array()[..n]);
            }
            #[inline(always)]
            fn add(self, o: Self) -> Self {
                self + o
            }
            #[inline(always)]
            fn sub(self, o: Self) -> Self {
                self - o
            }
            #[inline(always)]
            fn mul(self, o: Self) -> Self {
                self * o
            }
            #[inline(always)]
            fn mul_add(self, a: Self, b: Self) -> Self {
                <$v>::mul_add(self, a, b)
            }
            #[inline(always)]
            fn sum(self) -> $t {
                self.reduce_add()
            }
            #[inline(always)]
            fn splice(self, k: usize, rest: Self) -> Self {
                let index = <$v>::new(array_fn(
                    #[inline(always)]
                    |i| i as $t,
                ));
                index.simd_lt(<$v>::splat(k as $t)).select(self, rest)
            }
            #[inline(always)]
            fn relu(self) -> Self {
                let zero = <$v>::splat(0.0);
                self.simd_lt(zero).select(zero, self)
            }
            #[inline(always)]
            fn relu_grad(self, y: Self) -> Self {
                let zero = <$v>::splat(0.0);
                y.simd_le(zero).select(zero, self)
            }
        }
    };
}

wide_lanes!(f32x8, f32, 8);
wide_lanes!(f64x4, f64, 4);

convert_by_element!(f32x8, 8, half::f16);

/// `bf16` in integer lanes, as the AVX2 and AVX-512 lanes convert it: widening is a shift,
/// narrowing rounds to nearest even (a NaN stays a NaN, made quiet; overflow goes to
/// infinity). Converted one value at a time with the `half` crate, as `f16` is, inference
/// took 2.4x as long as on the scalar path (32x64x56x56 NCHW, Intel Xeon with AVX-512).
impl Convert<bf16> for f32x8 {
    #[inline(always)]
    fn widen(s: &[bf16]) -> Self {
        let s = &s[..8];
        let bits = u32x8::new(array_fn(
            #[inline(always)]
            |i| u32::from(s[i].to_bits()),
        ));
        bytemuck::cast(bits << 16)
    }
    #[inline(always)]
    fn narrow(self, s: &mut [bf16]) {
        let bits: u32x8 = bytemuck::cast(self);
        let high = bits >> 16;
        let rounded = (bits + (high & u32x8::splat(1)) + u32x8::splat(0x7fff)) >> 16;
        let quiet = high | u32x8::splat(0x40);
        let nan: u32x8 = bytemuck::cast(self.is_nan());
        let out: [u32; 8] = bytemuck::cast(nan.bitselect(quiet, rounded));
        for (o, v) in s[..8].iter_mut().zip(out) {
            *o = bf16::from_bits(v as u16);
        }
    }
}
