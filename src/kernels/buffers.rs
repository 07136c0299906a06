//! What an element-wise kernel reads and writes: an input and a separate output, or one buffer
//! normalized where it lies. Kernels are generic over this, so the in-place API shares them.

use super::lanes::{Lanes, MapAt, MapLanes};
use crate::element::Element;

/// Buffers of equal length that are cut together, so that threads can share them out.
pub(crate) trait Span: Send + Sized {
    /// Number of elements.
    fn len(&self) -> usize;
    /// The first `mid` elements and the rest.
    fn split_at(self, mid: usize) -> (Self, Self);
}

/// A span of `len()` elements read as input and written as output.
pub(crate) trait Buffers<T: Element>: Span {
    /// The input values (the output buffer itself when in place).
    fn input(&self) -> &[T];
    /// The output values (the input itself when in place).
    fn output(&self) -> &[T];
    /// Whether [`put`](Self::put) writes its output with streaming stores
    /// ([`Lanes::store_stream`]); only a separate output takes them.
    fn set_streaming(&mut self, _on: bool) {}
    /// Whether [`set_streaming`](Self::set_streaming) turned streaming on.
    fn streaming(&self) -> bool {
        false
    }
    /// `out[i .. i + n] = f(in[i .. i + n])` with `n = WIDTH`, or `n < WIDTH` for a tail.
    fn map<L: Lanes<Elem = T>>(&mut self, i: usize, n: usize, f: &impl MapLanes<L>);
    /// The full vector of input at `i`.
    fn load<L: Lanes<Elem = T>>(&self, i: usize) -> L;
    /// Writes a full vector of output at `i`.
    fn store<L: Lanes<Elem = T>>(&mut self, i: usize, v: L);
    /// [`store`](Self::store), streaming ([`Lanes::store_stream`]) when streaming is on and
    /// the address is aligned.
    #[inline(always)]
    fn put<L: Lanes<Elem = T>>(&mut self, i: usize, v: L) {
        self.store(i, v)
    }
    /// `out[start + j * WIDTH ..][..WIDTH] = f.apply_at(j, in[..same])` for the `len / WIDTH`
    /// whole vectors from `start` (`len` a multiple of `WIDTH`): one bounds check for the
    /// span, none per vector; streaming stores when streaming is on.
    fn map_vectors<L: Lanes<Elem = T>>(&mut self, start: usize, len: usize, f: &impl MapAt<L>);
}

/// Input `x` and output `y` of equal lengths.
pub(crate) struct Split<'a, T> {
    pub x: &'a [T],
    pub y: &'a mut [T],
    /// Streaming stores in [`Buffers::put`].
    pub stream: bool,
}

impl<'a, T> Split<'a, T> {
    pub fn new(x: &'a [T], y: &'a mut [T]) -> Self {
        Split {
            x,
            y,
            stream: false,
        }
    }
}

impl<T: Element> Span for Split<'_, T> {
    #[inline(always)]
    fn len(&self) -> usize {
        self.y.len()
    }
    #[inline(always)]
    fn split_at(self, mid: usize) -> (Self, Self) {
        let (xa, xb) = self.x.split_at(mid);
        let (ya, yb) = self.y.split_at_mut(mid);
        let stream = self.stream;
        (
            Split {
                x: xa,
                y: ya,
                stream,
            },
            Split {
                x: xb,
                y: yb,
                stream,
            },
        )
    }
}

impl<T: Element> Buffers<T> for Split<'_, T> {
    #[inline(always)]
    fn output(&self) -> &[T] {
        self.y
    }
    fn set_streaming(&mut self, on: bool) {
        self.stream = on;
    }
    fn streaming(&self) -> bool {
        self.stream
    }
    #[inline(always)]
    fn map_vectors<L: Lanes<Elem = T>>(&mut self, start: usize, len: usize, f: &impl MapAt<L>) {
        let x = self.x[start..start + len].chunks_exact(L::WIDTH);
        let y = self.y[start..start + len].chunks_exact_mut(L::WIDTH);
        if self.stream {
            for (j, (x, y)) in x.zip(y).enumerate() {
                f.apply_at(j, L::load(x)).store_stream(y);
            }
        } else {
            for (j, (x, y)) in x.zip(y).enumerate() {
                f.apply_at(j, L::load(x)).store(y);
            }
        }
    }
    #[inline(always)]
    fn input(&self) -> &[T] {
        self.x
    }
    #[inline(always)]
    fn load<L: Lanes<Elem = T>>(&self, i: usize) -> L {
        L::load(&self.x[i..i + L::WIDTH])
    }
    #[inline(always)]
    fn store<L: Lanes<Elem = T>>(&mut self, i: usize, v: L) {
        v.store(&mut self.y[i..i + L::WIDTH])
    }
    #[inline(always)]
    fn put<L: Lanes<Elem = T>>(&mut self, i: usize, v: L) {
        if self.stream {
            v.store_stream(&mut self.y[i..i + L::WIDTH])
        } else {
            v.store(&mut self.y[i..i + L::WIDTH])
        }
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

impl<T: Element> Span for &mut [T] {
    #[inline(always)]
    fn len(&self) -> usize {
        <[T]>::len(self)
    }
    #[inline(always)]
    fn split_at(self, mid: usize) -> (Self, Self) {
        self.split_at_mut(mid)
    }
}

impl<T: Element> Buffers<T> for &mut [T] {
    #[inline(always)]
    fn output(&self) -> &[T] {
        self
    }
    #[inline(always)]
    fn map_vectors<L: Lanes<Elem = T>>(&mut self, start: usize, len: usize, f: &impl MapAt<L>) {
        for (j, v) in self[start..start + len]
            .chunks_exact_mut(L::WIDTH)
            .enumerate()
        {
            f.apply_at(j, L::load(v)).store(v);
        }
    }
    #[inline(always)]
    fn input(&self) -> &[T] {
        self
    }
    #[inline(always)]
    fn load<L: Lanes<Elem = T>>(&self, i: usize) -> L {
        L::load(&self[i..i + L::WIDTH])
    }
    #[inline(always)]
    fn store<L: Lanes<Elem = T>>(&mut self, i: usize, v: L) {
        v.store(&mut self[i..i + L::WIDTH])
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

/// The backward pass's buffers: inputs `x` and `dy`, output `dx`, of equal lengths.
pub(crate) struct Grad<'a, T> {
    pub x: &'a [T],
    pub dy: &'a [T],
    pub dx: &'a mut [T],
    /// Streaming stores for `dx` (see [`super::normalize::map_runs`]).
    pub stream: bool,
}

impl<'a, T> Grad<'a, T> {
    /// The buffers, with plain stores (the plan may turn streaming on).
    pub fn new(x: &'a [T], dy: &'a [T], dx: &'a mut [T]) -> Self {
        Grad {
            x,
            dy,
            dx,
            stream: false,
        }
    }
}

impl<T: Element> Span for Grad<'_, T> {
    #[inline(always)]
    fn len(&self) -> usize {
        self.dx.len()
    }
    #[inline(always)]
    fn split_at(self, mid: usize) -> (Self, Self) {
        let (xa, xb) = self.x.split_at(mid);
        let (da, db) = self.dy.split_at(mid);
        let (oa, ob) = self.dx.split_at_mut(mid);
        let stream = self.stream;
        (
            Grad {
                x: xa,
                dy: da,
                dx: oa,
                stream,
            },
            Grad {
                x: xb,
                dy: db,
                dx: ob,
                stream,
            },
        )
    }
}

/// `K` arrays of `len` elements carved out of `buf` (reused storage: no allocation once it has
/// grown), each starting on a 64-byte boundary, so that vector loads of per-channel parameters
/// never straddle two cache lines. (Measured on Zen 5: within noise for AVX2; the large
/// AVX-512 slowdown of NHWC maps comes from misaligned data, see [`crate::Isa::Avx512`].)
pub(crate) fn aligned_arrays<T: Element, const K: usize>(
    buf: &mut Vec<T>,
    len: usize,
) -> [&mut [T]; K] {
    let line = 64 / std::mem::size_of::<T>();
    let stride = len.next_multiple_of(line);
    buf.clear();
    buf.resize(K * stride + line, T::ZERO);
    let start = buf.as_ptr().align_offset(64).min(line);
    let mut rest = &mut buf[start..];
    std::array::from_fn(|_| {
        let (array, tail) = std::mem::take(&mut rest).split_at_mut(stride);
        rest = tail;
        &mut array[..len]
    })
}
