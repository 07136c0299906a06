//! The SIMD abstraction every kernel is written against, its scalar (width 1) version, and
//! [`Stored`], the lanes of the 16-bit types.

use crate::element::{Data, Element};
use std::marker::PhantomData;

/// A vector of `WIDTH` elements. Kernels are generic over this trait and instantiated once per
/// instruction set, so the arithmetic is written once.
///
/// Loads and stores take slices; the full-width ones read or write the first `WIDTH` elements
/// (callers guarantee at least that many), the partial ones fewer, for the tails. Two kinds:
/// `load` and `store` move values of the arithmetic type [`Elem`](Self::Elem) (parameters,
/// spilled sums), `read` and `write` move tensor elements of type [`Mem`](Self::Mem),
/// converting where the two differ (a 16-bit type computed in `f32`, [`Stored`]).
pub trait Lanes: Copy + Send + Sync + 'static {
    /// The element type of the arithmetic.
    type Elem: Element;
    /// The element type of the tensors: `Elem` itself, or a 16-bit type widened on read and
    /// rounded on write.
    type Mem: Data<Param = Self::Elem>;
    /// Number of lanes.
    const WIDTH: usize;

    /// Every lane set to `v`.
    fn splat(v: Self::Elem) -> Self;
    /// The first `WIDTH` elements of `s`.
    fn load(s: &[Self::Elem]) -> Self;
    /// The `s.len() < WIDTH` elements of `s`, the other lanes set to `fill`.
    fn load_partial(s: &[Self::Elem], fill: Self::Elem) -> Self;
    /// Writes the lanes to the first `WIDTH` elements of `s`.
    fn store(self, s: &mut [Self::Elem]);
    /// Writes the first `s.len() < WIDTH` lanes to `s`.
    fn store_partial(self, s: &mut [Self::Elem]);
    /// The first `WIDTH` tensor elements of `s`, widened to `Elem`.
    fn read(s: &[Self::Mem]) -> Self;
    /// The `s.len() < WIDTH` tensor elements of `s`, the other lanes set to `fill`.
    fn read_partial(s: &[Self::Mem], fill: Self::Elem) -> Self;
    /// Writes the lanes, rounded to `Mem`, to the first `WIDTH` elements of `s`.
    fn write(self, s: &mut [Self::Mem]);
    /// Writes the first `s.len() < WIDTH` lanes, rounded to `Mem`, to `s`.
    fn write_partial(self, s: &mut [Self::Mem]);
    /// [`write`](Self::write) with a non-temporal (streaming) store where the instruction set
    /// has one and `s` is aligned to the size written: the line goes to memory without being
    /// read first or kept in cache. For outputs larger than the last-level cache.
    #[inline(always)]
    fn write_stream(self, s: &mut [Self::Mem]) {
        self.write(s)
    }
    /// Lane-wise `self + o`.
    fn add(self, o: Self) -> Self;
    /// Lane-wise `self - o`.
    fn sub(self, o: Self) -> Self;
    /// Lane-wise `self * o`.
    fn mul(self, o: Self) -> Self;
    /// Lane-wise `self * a + b`, fused where the instruction set has it.
    fn mul_add(self, a: Self, b: Self) -> Self;
    /// Sum of the lanes.
    fn sum(self) -> Self::Elem;
    /// Lanes `i < k` from `self`, the others from `rest` (`k <= WIDTH`): a vector that
    /// straddles two channels' runs, each part computed with its channel's parameters.
    fn splice(self, k: usize, rest: Self) -> Self;
    /// `max(self, 0)` lane-wise, as `if v < 0 { 0 } else { v }`: a NaN stays NaN, `-0` stays.
    fn relu(self) -> Self;
    /// The gradient `self` through a ReLU whose output is `y`: `if y <= 0 { 0 } else { self }`
    /// lane-wise (PyTorch's `threshold_backward`; a NaN output lets the gradient through).
    fn relu_grad(self, y: Self) -> Self;
}

/// An element-wise function on vectors, for [`Buffers::map`](super::buffers::Buffers::map).
/// (A trait, not a closure, so that it is always inlined: see `stats::Reduce`.)
pub(crate) trait MapLanes<L: Lanes> {
    fn apply(&self, v: L) -> L;
}

/// An element-wise function on vectors that also depends on the vector's index `j` in a span,
/// and on which of [`Buffers::map_vectors`](super::buffers::Buffers::map_vectors)' stretches
/// `k` it is in (per-channel parameters across rows, an epilogue per stretch).
pub(crate) trait MapAt<L: Lanes> {
    /// What vector `j` of every stretch shares: its parameters, loaded once for all of them.
    type At: Copy;
    fn at(&self, j: usize) -> Self::At;
    /// Vector `j` of stretch `k`, `v`, mapped with `at = self.at(j)`.
    fn apply(&self, at: Self::At, k: usize, j: usize, v: L) -> L;
}

/// Implements the [`Lanes`] methods that move tensor elements for a lane type whose tensors
/// hold `Elem` itself: they are `load` and `store`.
macro_rules! same_memory {
    ($t:ty) => {
        type Mem = $t;
        #[inline(always)]
        fn read(s: &[$t]) -> Self {
            Self::load(s)
        }
        #[inline(always)]
        fn read_partial(s: &[$t], fill: $t) -> Self {
            Self::load_partial(s, fill)
        }
        #[inline(always)]
        fn write(self, s: &mut [$t]) {
            self.store(s)
        }
        #[inline(always)]
        fn write_partial(self, s: &mut [$t]) {
            self.store_partial(s)
        }
    };
}
pub(crate) use same_memory;

/// The `min(left, WIDTH)` values at `x[i..]` as a vector, zero-padded: a full load when
/// `left >= WIDTH`, else a partial one.
#[inline(always)]
pub(crate) fn load_upto<L: Lanes>(x: &[L::Elem], i: usize, left: usize) -> L {
    if left >= L::WIDTH {
        L::load(&x[i..])
    } else {
        L::load_partial(&x[i..i + left], L::Elem::ZERO)
    }
}

/// [`load_upto`] of tensor elements.
#[inline(always)]
pub(crate) fn read_upto<L: Lanes>(x: &[L::Mem], i: usize, left: usize) -> L {
    if left >= L::WIDTH {
        L::read(&x[i..])
    } else {
        L::read_partial(&x[i..i + left], L::Elem::ZERO)
    }
}

/// `[f(0), f(1), .., f(K - 1)]`, as `std::array::from_fn`, but always inlined: `from_fn` is
/// only a hint, and where the compiler leaves it out of line, `f` is compiled into it without
/// the entry's target features (every intrinsic in `f` then a call; see [`crate::kernels`]).
/// `f` must be an `#[inline(always)]` closure too. `K >= 1`.
#[inline(always)]
pub(crate) fn array_fn<T: Copy, const K: usize>(mut f: impl FnMut(usize) -> T) -> [T; K] {
    const { assert!(K > 0) };
    let mut out = [f(0); K];
    for (j, o) in out.iter_mut().enumerate().skip(1) {
        *o = f(j);
    }
    out
}

/// The `width <= K * WIDTH` values at `x[at..]` as `K` vectors, zero-padded past `width`:
/// a tile of neighbouring channels' values.
#[inline(always)]
pub(crate) fn load_tile<L: Lanes, const K: usize>(
    x: &[L::Elem],
    at: usize,
    width: usize,
) -> [L; K] {
    array_fn(
        #[inline(always)]
        |j| {
            let done = (j * L::WIDTH).min(width);
            load_upto::<L>(x, at + done, width - done)
        },
    )
}

/// [`load_tile`] of tensor elements.
#[inline(always)]
pub(crate) fn read_tile<L: Lanes, const K: usize>(x: &[L::Mem], at: usize, width: usize) -> [L; K] {
    array_fn(
        #[inline(always)]
        |j| {
            let done = (j * L::WIDTH).min(width);
            read_upto::<L>(x, at + done, width - done)
        },
    )
}

/// One element as a vector of width 1: the plain scalar path.
#[derive(Clone, Copy, Debug)]
pub struct One<T>(pub T);

impl<T: Element> Lanes for One<T> {
    type Elem = T;
    same_memory!(T);
    const WIDTH: usize = 1;

    #[inline(always)]
    fn splat(v: T) -> Self {
        One(v)
    }
    #[inline(always)]
    fn load(s: &[T]) -> Self {
        One(s[0])
    }
    #[inline(always)]
    fn load_partial(_: &[T], fill: T) -> Self {
        One(fill) // a partial load of width 1 reads nothing
    }
    #[inline(always)]
    fn store(self, s: &mut [T]) {
        s[0] = self.0;
    }
    #[inline(always)]
    fn store_partial(self, _: &mut [T]) {}
    #[inline(always)]
    fn add(self, o: Self) -> Self {
        One(self.0 + o.0)
    }
    #[inline(always)]
    fn sub(self, o: Self) -> Self {
        One(self.0 - o.0)
    }
    #[inline(always)]
    fn mul(self, o: Self) -> Self {
        One(self.0 * o.0)
    }
    #[inline(always)]
    fn mul_add(self, a: Self, b: Self) -> Self {
        // Unfused: a software fma (what `f32::mul_add` becomes without FMA) is far slower.
        One(self.0 * a.0 + b.0)
    }
    #[inline(always)]
    fn sum(self) -> T {
        self.0
    }
    #[inline(always)]
    fn splice(self, k: usize, rest: Self) -> Self {
        if k > 0 {
            self
        } else {
            rest
        }
    }
    #[inline(always)]
    fn relu(self) -> Self {
        if self.0 < T::ZERO {
            One(T::ZERO)
        } else {
            self
        }
    }
    #[inline(always)]
    fn relu_grad(self, y: Self) -> Self {
        if y.0 <= T::ZERO {
            One(T::ZERO)
        } else {
            self
        }
    }
}

/// `f32` lanes that read and write the 16-bit type `D` (`f16`, `bf16`), converting in
/// registers: widening is exact, narrowing rounds to nearest even, keeps NaN a NaN and
/// overflows to infinity, as IEEE rounding does.
pub trait Convert<D>: Lanes<Elem = f32, Mem = f32> {
    /// The first `WIDTH` values of `s`, widened.
    fn widen(s: &[D]) -> Self;
    /// The lanes rounded to `D`, written to the first `WIDTH` values of `s`.
    fn narrow(self, s: &mut [D]);
    /// [`narrow`](Self::narrow) with a streaming store where `s` is aligned to the bytes
    /// written (see [`Lanes::write_stream`]).
    #[inline(always)]
    fn narrow_stream(self, s: &mut [D]) {
        self.narrow(s)
    }
}

/// `f32` lanes `L` over tensors of the 16-bit type `D`: the arithmetic of `L`, tensor reads
/// widened and writes rounded by [`Convert`]. The tails go through a vector's worth of `D` on
/// the stack.
#[derive(Clone, Copy, Debug)]
pub struct Stored<L, D>(L, PhantomData<D>);

impl<L: Convert<D>, D: Data<Param = f32>> Stored<L, D> {
    #[inline(always)]
    fn of(v: L) -> Self {
        Stored(v, PhantomData)
    }
}

/// The most lanes of any `f32` vector (AVX-512: 16).
const MAX_F32_LANES: usize = 16;

impl<L: Convert<D>, D: Data<Param = f32>> Lanes for Stored<L, D> {
    type Elem = f32;
    type Mem = D;
    const WIDTH: usize = L::WIDTH;

    #[inline(always)]
    fn splat(v: f32) -> Self {
        Self::of(L::splat(v))
    }
    #[inline(always)]
    fn load(s: &[f32]) -> Self {
        Self::of(L::load(s))
    }
    #[inline(always)]
    fn load_partial(s: &[f32], fill: f32) -> Self {
        Self::of(L::load_partial(s, fill))
    }
    #[inline(always)]
    fn store(self, s: &mut [f32]) {
        self.0.store(s)
    }
    #[inline(always)]
    fn store_partial(self, s: &mut [f32]) {
        self.0.store_partial(s)
    }
    #[inline(always)]
    fn read(s: &[D]) -> Self {
        Self::of(L::widen(s))
    }
    #[inline(always)]
    fn read_partial(s: &[D], fill: f32) -> Self {
        let mut full = [D::default(); MAX_F32_LANES];
        full[..s.len()].copy_from_slice(s);
        Self::of(L::widen(&full).splice(s.len(), L::splat(fill)))
    }
    #[inline(always)]
    fn write(self, s: &mut [D]) {
        self.0.narrow(s)
    }
    #[inline(always)]
    fn write_partial(self, s: &mut [D]) {
        let mut full = [D::default(); MAX_F32_LANES];
        self.0.narrow(&mut full);
        let n = s.len();
        s.copy_from_slice(&full[..n]);
    }
    #[inline(always)]
    fn write_stream(self, s: &mut [D]) {
        self.0.narrow_stream(s)
    }
    #[inline(always)]
    fn add(self, o: Self) -> Self {
        Self::of(self.0.add(o.0))
    }
    #[inline(always)]
    fn sub(self, o: Self) -> Self {
        Self::of(self.0.sub(o.0))
    }
    #[inline(always)]
    fn mul(self, o: Self) -> Self {
        Self::of(self.0.mul(o.0))
    }
    #[inline(always)]
    fn mul_add(self, a: Self, b: Self) -> Self {
        Self::of(self.0.mul_add(a.0, b.0))
    }
    #[inline(always)]
    fn sum(self) -> f32 {
        self.0.sum()
    }
    #[inline(always)]
    fn splice(self, k: usize, rest: Self) -> Self {
        Self::of(self.0.splice(k, rest.0))
    }
    #[inline(always)]
    fn relu(self) -> Self {
        Self::of(self.0.relu())
    }
    #[inline(always)]
    fn relu_grad(self, y: Self) -> Self {
        Self::of(self.0.relu_grad(y.0))
    }
}

/// [`Convert`] one value at a time with the `half` crate: the scalar and portable paths.
macro_rules! convert_by_element {
    ($lanes:ty, $w:expr, $d:ty) => {
        impl Convert<$d> for $lanes {
            #[inline(always)]
            fn widen(s: &[$d]) -> Self {
                let wide: [f32; $w] = $crate::kernels::lanes::array_fn(
                    #[inline(always)]
                    |i| s[i].to_f32(),
                );
                Self::load(&wide)
            }
            #[inline(always)]
            fn narrow(self, s: &mut [$d]) {
                let mut wide = [0.0f32; $w];
                self.store(&mut wide);
                for (o, v) in s[..$w].iter_mut().zip(wide) {
                    *o = <$d>::from_f32(v);
                }
            }
        }
    };
}
pub(crate) use convert_by_element;

convert_by_element!(One<f32>, 1, half::f16);
convert_by_element!(One<f32>, 1, half::bf16);
