//! What an element-wise kernel reads and writes: an input and a separate output, or one buffer
//! normalized where it lies. Kernels are generic over this, so the in-place API shares them.

use super::lanes::{Lanes, MapLanes};
use crate::element::Element;

/// A span of `len()` elements read as input and written as output.
pub(crate) trait Buffers<T: Element>: Send + Sized {
    /// Number of elements.
    fn len(&self) -> usize;
    /// The input values (the output buffer itself when in place).
    fn input(&self) -> &[T];
    /// The first `mid` elements and the rest.
    fn split_at(self, mid: usize) -> (Self, Self);
    /// `out[i .. i + n] = f(in[i .. i + n])` with `n = WIDTH`, or `n < WIDTH` for a tail.
    fn map<L: Lanes<Elem = T>>(&mut self, i: usize, n: usize, f: &impl MapLanes<L>);
}

/// Input `x` and output `y` of equal lengths.
pub(crate) struct Split<'a, T> {
    pub x: &'a [T],
    pub y: &'a mut [T],
}

impl<T: Element> Buffers<T> for Split<'_, T> {
    #[inline(always)]
    fn len(&self) -> usize {
        self.y.len()
    }
    #[inline(always)]
    fn input(&self) -> &[T] {
        self.x
    }
    #[inline(always)]
    fn split_at(self, mid: usize) -> (Self, Self) {
        let (xa, xb) = self.x.split_at(mid);
        let (ya, yb) = self.y.split_at_mut(mid);
        (Split { x: xa, y: ya }, Split { x: xb, y: yb })
    }
    #[inline(always)]
    fn map<L: Lanes<Elem = T>>(&mut self, i: usize, n: usize, f: &impl MapLanes<L>) {
        if n == L::WIDTH {
            f.apply(L::load(&self.x[i..i + n]))
                .store(&mut self.y[i..i + n]);
        } else {
            f.apply(L::load_partial(&self.x[i..i + n], T::ZERO))
                .store_partial(&mut self.y[i..i + n]);
        }
    }
}

impl<T: Element> Buffers<T> for &mut [T] {
    #[inline(always)]
    fn len(&self) -> usize {
        <[T]>::len(self)
    }
    #[inline(always)]
    fn input(&self) -> &[T] {
        self
    }
    #[inline(always)]
    fn split_at(self, mid: usize) -> (Self, Self) {
        self.split_at_mut(mid)
    }
    #[inline(always)]
    fn map<L: Lanes<Elem = T>>(&mut self, i: usize, n: usize, f: &impl MapLanes<L>) {
        let s = &mut self[i..i + n];
        if n == L::WIDTH {
            f.apply(L::load(s)).store(s);
        } else {
            f.apply(L::load_partial(s, T::ZERO)).store_partial(s);
        }
    }
}
