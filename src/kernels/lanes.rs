//! The SIMD abstraction every kernel is written against, and its scalar (width 1) version.

use crate::element::Element;

/// A vector of `WIDTH` elements. Kernels are generic over this trait and instantiated once per
/// instruction set, so the arithmetic is written once.
///
/// Loads and stores take slices; the full-width ones read or write the first `WIDTH` elements
/// (callers guarantee at least that many), the partial ones fewer, for the tails.
pub trait Lanes: Copy + Send + Sync + 'static {
    /// The element type.
    type Elem: Element;
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
    /// [`store`](Self::store) with a non-temporal (streaming) store where the instruction set
    /// has one and `s` is aligned to the vector's size: the line goes to memory without being
    /// read first or kept in cache. For outputs larger than the last-level cache.
    #[inline(always)]
    fn store_stream(self, s: &mut [Self::Elem]) {
        self.store(s)
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
}

/// An element-wise function on vectors, for [`Buffers::map`](super::buffers::Buffers::map).
/// (A trait, not a closure, so that it is always inlined: see `stats::Reduce`.)
pub(crate) trait MapLanes<L: Lanes> {
    fn apply(&self, v: L) -> L;
}

/// An element-wise function on vectors that also depends on the vector's index in a span,
/// for [`Buffers::map_vectors`](super::buffers::Buffers::map_vectors) (per-channel parameters
/// across a row).
pub(crate) trait MapAt<L: Lanes> {
    fn apply_at(&self, j: usize, v: L) -> L;
}

/// The `min(left, WIDTH)` elements at `x[i..]` as a vector, zero-padded: a full load when
/// `left >= WIDTH`, else a partial one.
#[inline(always)]
pub(crate) fn load_upto<L: Lanes>(x: &[L::Elem], i: usize, left: usize) -> L {
    if left >= L::WIDTH {
        L::load(&x[i..])
    } else {
        L::load_partial(&x[i..i + left], L::Elem::ZERO)
    }
}

/// The `width <= K * WIDTH` elements at `x[at..]` as `K` vectors, zero-padded past `width`:
/// a tile of neighbouring channels' values.
#[inline(always)]
pub(crate) fn load_tile<L: Lanes, const K: usize>(
    x: &[L::Elem],
    at: usize,
    width: usize,
) -> [L; K] {
    let mut tile = [L::splat(L::Elem::ZERO); K];
    for (j, v) in tile.iter_mut().enumerate() {
        let done = (j * L::WIDTH).min(width);
        *v = load_upto::<L>(x, at + done, width - done);
    }
    tile
}

/// One element as a vector of width 1: the plain scalar path.
#[derive(Clone, Copy, Debug)]
pub struct Scalar<T>(pub T);

impl<T: Element> Lanes for Scalar<T> {
    type Elem = T;
    const WIDTH: usize = 1;

    #[inline(always)]
    fn splat(v: T) -> Self {
        Scalar(v)
    }
    #[inline(always)]
    fn load(s: &[T]) -> Self {
        Scalar(s[0])
    }
    #[inline(always)]
    fn load_partial(_: &[T], fill: T) -> Self {
        Scalar(fill) // a partial load of width 1 reads nothing
    }
    #[inline(always)]
    fn store(self, s: &mut [T]) {
        s[0] = self.0;
    }
    #[inline(always)]
    fn store_partial(self, _: &mut [T]) {}
    #[inline(always)]
    fn add(self, o: Self) -> Self {
        Scalar(self.0 + o.0)
    }
    #[inline(always)]
    fn sub(self, o: Self) -> Self {
        Scalar(self.0 - o.0)
    }
    #[inline(always)]
    fn mul(self, o: Self) -> Self {
        Scalar(self.0 * o.0)
    }
    #[inline(always)]
    fn mul_add(self, a: Self, b: Self) -> Self {
        // Unfused: a software fma (what `f32::mul_add` becomes without FMA) is far slower.
        Scalar(self.0 * a.0 + b.0)
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
}
