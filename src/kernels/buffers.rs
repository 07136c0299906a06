//! What an element-wise kernel reads and writes: an input and a separate output, or one buffer
//! normalized where it lies. Kernels are generic over this, so the in-place API shares them.

use super::backward::GradRun;
use super::lanes::{Lanes, MapAt, MapLanes};
use crate::element::{Data, Element};
use std::marker::PhantomData;

/// Buffers of equal length that are cut together, so that threads can share them out.
pub(crate) trait Span: Send + Sized {
    /// Number of elements.
    fn len(&self) -> usize;
    /// The first `mid` elements and the rest.
    fn split_at(self, mid: usize) -> (Self, Self);
}

/// A span of `len()` elements read as input and written as output.
pub(crate) trait Buffers: Span {
    /// The tensor element type.
    type Data: Data;
    /// The input values (the output buffer itself when in place).
    fn input(&self) -> &[Self::Data];
    /// The output values (the input itself when in place).
    fn output(&self) -> &[Self::Data];
    /// Whether [`put`](Self::put) writes its output with streaming stores
    /// ([`Lanes::write_stream`]); only a separate output takes them.
    fn set_streaming(&mut self, _on: bool) {}
    /// Whether [`set_streaming`](Self::set_streaming) turned streaming on.
    fn streaming(&self) -> bool {
        false
    }
    /// Asks for the cache lines of what the epilogue will read (a residual), ahead of the map.
    #[inline(always)]
    fn prefetch_epilogue(&self) {}
    /// [`Epilogue::read_ahead`] of the epilogue's reads, if any.
    fn epilogue_read_ahead(&mut self, _elements: usize) {}
    /// Whether the epilogue reads memory of its own (a residual).
    fn epilogue_reads(&self) -> bool {
        false
    }
    /// Makes every whole vector read of the input by [`map_vectors`](Self::map_vectors) ask
    /// for the line `elements` further on (a hint, wherever that lies), so that the input a
    /// later pass reads comes in while this one writes.
    fn input_read_ahead(&mut self, _elements: usize) {}
    /// `out[i .. i + n] = f(in[i .. i + n])` with `n = WIDTH`, or `n < WIDTH` for a tail.
    fn map<L: Lanes<Mem = Self::Data>>(&mut self, i: usize, n: usize, f: &impl MapLanes<L>);
    /// The full vector of input at `i`.
    fn load<L: Lanes<Mem = Self::Data>>(&self, i: usize) -> L;
    /// Writes a full vector of output at `i`.
    fn store<L: Lanes<Mem = Self::Data>>(&mut self, i: usize, v: L);
    /// [`store`](Self::store), streaming ([`Lanes::write_stream`]) when streaming is on and
    /// the address is aligned.
    #[inline(always)]
    fn put<L: Lanes<Mem = Self::Data>>(&mut self, i: usize, v: L) {
        self.store(i, v)
    }
    /// `out[s + j * WIDTH ..][..WIDTH] = f.apply(f.at(j), k, j, in[..same])` for the
    /// `len / WIDTH` whole vectors of each of the `K` stretches `s = starts[k]` (`len` a
    /// multiple of `WIDTH`; the stretches disjoint and in order): vector `j` of every stretch,
    /// then vector `j + 1`, so that `f.at(j)` is loaded once for all of them. The output's
    /// stretches are checked once per call and written unchecked; reads index their slices
    /// (checks the compiler may drop). Streaming stores when streaming is on.
    fn map_vectors<L: Lanes<Mem = Self::Data>, const K: usize>(
        &mut self,
        starts: [usize; K],
        len: usize,
        f: &impl MapAt<L>,
    );
}

/// The parameter (arithmetic) type of the buffers `B`.
pub(crate) type Param<B> = <<B as Buffers>::Data as Data>::Param;
/// The lanes of the buffers `B` on the instruction set `S`.
pub(crate) type LanesOf<B, S> = <<B as Buffers>::Data as Data>::Lanes<S>;

/// Input `x` and output `y` of equal lengths.
pub(crate) struct Split<'a, T> {
    pub x: &'a [T],
    pub y: &'a mut [T],
    /// Streaming stores in [`Buffers::put`].
    pub stream: bool,
    /// When not 0: each whole vector read of `x` asks for the line this many elements further
    /// on ([`Buffers::input_read_ahead`]).
    pub ahead: usize,
}

impl<'a, T> Split<'a, T> {
    pub fn new(x: &'a [T], y: &'a mut [T]) -> Self {
        Split {
            x,
            y,
            stream: false,
            ahead: 0,
        }
    }
}

impl<T: Data> Span for Split<'_, T> {
    #[inline(always)]
    fn len(&self) -> usize {
        self.y.len()
    }
    #[inline(always)]
    fn split_at(self, mid: usize) -> (Self, Self) {
        let (xa, xb) = self.x.split_at(mid);
        let (ya, yb) = self.y.split_at_mut(mid);
        let (stream, ahead) = (self.stream, self.ahead);
        (
            Split {
                x: xa,
                y: ya,
                stream,
                ahead,
            },
            Split {
                x: xb,
                y: yb,
                stream,
                ahead,
            },
        )
    }
}

impl<T: Data> Buffers for Split<'_, T> {
    type Data = T;
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
    fn input_read_ahead(&mut self, elements: usize) {
        self.ahead = elements;
    }
    #[inline(always)]
    fn map_vectors<L: Lanes<Mem = T>, const K: usize>(
        &mut self,
        starts: [usize; K],
        len: usize,
        f: &impl MapAt<L>,
    ) {
        let mut x = [&self.x[..0]; K];
        for (x, &s) in x.iter_mut().zip(&starts) {
            *x = &self.x[s..s + len];
        }
        let mut y = Stretches::new(self.y, starts, len);
        let w = L::WIDTH;
        let ahead = self.ahead;
        // A hint, whatever the address: it may lie beyond `x` (past the end of the tensor).
        let read_ahead = {
            #[inline(always)]
            |_: &mut Stretches<T, K>, k: usize, i: usize| {
                let x = &x[k][i..i + w];
                super::stats::prefetch_line(x.as_ptr().wrapping_add(ahead));
                L::read(x)
            }
        };
        let read = {
            #[inline(always)]
            |_: &mut Stretches<T, K>, k: usize, i: usize| L::read(&x[k][i..i + w])
        };
        let stream = {
            #[inline(always)]
            |v: L, y: &mut [T]| v.write_stream(y)
        };
        let write = {
            #[inline(always)]
            |v: L, y: &mut [T]| v.write(y)
        };
        let y = &mut y;
        match (ahead > 0, self.stream) {
            (true, true) => map_stretches(y, f, read_ahead, stream),
            (true, false) => map_stretches(y, f, read_ahead, write),
            (false, true) => map_stretches(y, f, read, stream),
            (false, false) => map_stretches(y, f, read, write),
        }
    }
    #[inline(always)]
    fn input(&self) -> &[T] {
        self.x
    }
    #[inline(always)]
    fn load<L: Lanes<Mem = T>>(&self, i: usize) -> L {
        L::read(&self.x[i..i + L::WIDTH])
    }
    #[inline(always)]
    fn store<L: Lanes<Mem = T>>(&mut self, i: usize, v: L) {
        v.write(&mut self.y[i..i + L::WIDTH])
    }
    #[inline(always)]
    fn put<L: Lanes<Mem = T>>(&mut self, i: usize, v: L) {
        if self.stream {
            v.write_stream(&mut self.y[i..i + L::WIDTH])
        } else {
            v.write(&mut self.y[i..i + L::WIDTH])
        }
    }
    #[inline(always)]
    fn map<L: Lanes<Mem = T>>(&mut self, i: usize, n: usize, f: &impl MapLanes<L>) {
        if n == L::WIDTH {
            f.apply(L::read(&self.x[i..i + n]))
                .write(&mut self.y[i..i + n]);
        } else {
            f.apply(L::read_partial(&self.x[i..i + n], L::Elem::ZERO))
                .write_partial(&mut self.y[i..i + n]);
        }
    }
}

/// `K` disjoint stretches of `len` elements of one mutable buffer, each borrowed mutably at
/// once. (As raw pointers, checked once: an array of `&mut` slices is made with
/// `<[_; K]>::map`, which the compiler left as a call per row, and the slices' bounds checked
/// at every vector made NCHW maps of short runs 4% slower.)
struct Stretches<'a, T, const K: usize> {
    starts: [*mut T; K],
    len: usize,
    _buffer: PhantomData<&'a mut [T]>,
}

impl<'a, T, const K: usize> Stretches<'a, T, K> {
    /// The stretches of `buf` from `starts`, which must be in order and disjoint (each at or
    /// past the end of the one before) and within `buf`.
    #[inline(always)]
    fn new(buf: &'a mut [T], starts: [usize; K], len: usize) -> Self {
        // Every pointer from one: a reborrow of `buf` for each would end the ones before.
        let (base, size) = (buf.as_mut_ptr(), buf.len());
        let mut ptrs = [base; K];
        let mut end = 0;
        for (p, &s) in ptrs.iter_mut().zip(&starts) {
            assert!(s >= end, "stretches in order, disjoint");
            end = s
                .checked_add(len)
                .filter(|&e| e <= size)
                .expect("within the buffer");
            // SAFETY: `s <= end <= size`: within `buf`, or just past its end when `len` is 0.
            *p = unsafe { base.add(s) };
        }
        Stretches {
            starts: ptrs,
            len,
            _buffer: PhantomData,
        }
    }

    /// Elements `i..i + n` of stretch `k`.
    #[inline(always)]
    fn get(&mut self, k: usize, i: usize, n: usize) -> &mut [T] {
        assert!(i <= self.len && n <= self.len - i);
        // SAFETY: just checked.
        unsafe { self.get_unchecked(k, i, n) }
    }

    /// Elements `i..i + n` of stretch `k`.
    ///
    /// # Safety
    /// `i + n <= len`.
    #[inline(always)]
    unsafe fn get_unchecked(&mut self, k: usize, i: usize, n: usize) -> &mut [T] {
        // SAFETY: `new` checked that stretch `k` is `len` elements of the buffer borrowed
        // mutably for `'a`, disjoint from the others; `i..i + n` lies within it (the caller
        // ensures), and the slice borrows `self` mutably, so no other slice of it is alive.
        unsafe { std::slice::from_raw_parts_mut(self.starts[k].add(i), n) }
    }
}

/// [`Buffers::map_vectors`]' loop over the stretches `out`: vector `j` of stretch `k`, read
/// with `read(out, k, j * WIDTH)`, mapped and written with `write`.
#[inline(always)]
fn map_stretches<L: Lanes, const K: usize>(
    out: &mut Stretches<L::Mem, K>,
    f: &impl MapAt<L>,
    read: impl Fn(&mut Stretches<L::Mem, K>, usize, usize) -> L,
    write: impl Fn(L, &mut [L::Mem]),
) {
    let w = L::WIDTH;
    for j in 0..out.len / w {
        let (at, i) = (f.at(j), j * w);
        for k in 0..K {
            let v = f.apply(at, k, j, read(out, k, i));
            // SAFETY: `i + w <= out.len / w * w <= out.len`.
            write(v, unsafe { out.get_unchecked(k, i, w) });
        }
    }
}

/// An input alone, cut as buffers are (the statistics' channel groups).
impl<T: Data> Span for &[T] {
    #[inline(always)]
    fn len(&self) -> usize {
        <[T]>::len(self)
    }
    #[inline(always)]
    fn split_at(self, mid: usize) -> (Self, Self) {
        <[T]>::split_at(self, mid)
    }
}

/// One buffer normalized where it lies: the input, overwritten by the output.
pub(crate) struct InPlace<'a, T> {
    xy: &'a mut [T],
    /// When not 0: each whole vector read asks for the line this many elements further on
    /// ([`Buffers::input_read_ahead`]).
    ahead: usize,
}

impl<'a, T> InPlace<'a, T> {
    pub fn new(xy: &'a mut [T]) -> Self {
        InPlace { xy, ahead: 0 }
    }
}

impl<T: Data> Span for InPlace<'_, T> {
    #[inline(always)]
    fn len(&self) -> usize {
        self.xy.len()
    }
    #[inline(always)]
    fn split_at(self, mid: usize) -> (Self, Self) {
        let (a, b) = self.xy.split_at_mut(mid);
        let ahead = self.ahead;
        (InPlace { xy: a, ahead }, InPlace { xy: b, ahead })
    }
}

impl<T: Data> Buffers for InPlace<'_, T> {
    type Data = T;
    #[inline(always)]
    fn output(&self) -> &[T] {
        self.xy
    }
    /// Taken only when the buffer (the whole tensor: this is asked before it is cut) reaches
    /// [`stream_threshold`](crate::parallel::stream_threshold), past the caches: for one that
    /// fits, the requests cost more than they bring. Measured on Zen 5, in-place training, one
    /// thread, without -> with: 256x64x56x56 14.7-15.0 -> 12.8-13.0 ms, 32x256x28x28
    /// 0.85-0.92 -> 0.83-0.85 ms, 32x64x56x56 0.96-1.06 -> 0.94-0.96 ms; 32x512x14x14
    /// (12.8 MB) 0.32-0.33 -> 0.35-0.37 ms.
    fn input_read_ahead(&mut self, elements: usize) {
        let bytes = self.xy.len().saturating_mul(std::mem::size_of::<T>());
        if bytes >= crate::parallel::stream_threshold() {
            self.ahead = elements;
        }
    }
    #[inline(always)]
    fn map_vectors<L: Lanes<Mem = T>, const K: usize>(
        &mut self,
        starts: [usize; K],
        len: usize,
        f: &impl MapAt<L>,
    ) {
        let mut xy = Stretches::new(self.xy, starts, len);
        let (w, ahead) = (L::WIDTH, self.ahead);
        let write = {
            #[inline(always)]
            |v: L, y: &mut [T]| v.write(y)
        };
        if ahead > 0 {
            let read = {
                #[inline(always)]
                |xy: &mut Stretches<T, K>, k: usize, i: usize| {
                    let x = xy.get(k, i, w);
                    // A hint, whatever the address: it may lie past the end of the tensor.
                    super::stats::prefetch_line(x.as_ptr().wrapping_add(ahead));
                    L::read(x)
                }
            };
            map_stretches(&mut xy, f, read, write)
        } else {
            let read = {
                #[inline(always)]
                |xy: &mut Stretches<T, K>, k: usize, i: usize| L::read(xy.get(k, i, w))
            };
            map_stretches(&mut xy, f, read, write)
        }
    }
    #[inline(always)]
    fn input(&self) -> &[T] {
        self.xy
    }
    #[inline(always)]
    fn load<L: Lanes<Mem = T>>(&self, i: usize) -> L {
        L::read(&self.xy[i..i + L::WIDTH])
    }
    #[inline(always)]
    fn store<L: Lanes<Mem = T>>(&mut self, i: usize, v: L) {
        v.write(&mut self.xy[i..i + L::WIDTH])
    }
    #[inline(always)]
    fn map<L: Lanes<Mem = T>>(&mut self, i: usize, n: usize, f: &impl MapLanes<L>) {
        let s = &mut self.xy[i..i + n];
        if n == L::WIDTH {
            f.apply(L::read(s)).write(s);
        } else {
            f.apply(L::read_partial(s, L::Elem::ZERO)).write_partial(s);
        }
    }
}

/// The backward pass's buffers: inputs `x`, `dy` and, where a ReLU was fused into the forward
/// pass, its output `y` (empty otherwise: see [`GradRun`]); output `dx`; of equal lengths.
pub(crate) struct Grad<'a, T> {
    pub x: &'a [T],
    pub dy: &'a [T],
    pub y: &'a [T],
    pub dx: &'a mut [T],
    /// Streaming stores for `dx` (see [`super::normalize::map_runs`]).
    pub stream: bool,
}

impl<'a, T> Grad<'a, T> {
    /// The buffers, with plain stores (the plan may turn streaming on); `y` empty for none.
    pub fn new(x: &'a [T], dy: &'a [T], y: &'a [T], dx: &'a mut [T]) -> Self {
        Grad {
            x,
            dy,
            y,
            dx,
            stream: false,
        }
    }

    /// The inputs, as a run.
    #[inline(always)]
    pub fn inputs(&self) -> GradRun<'a, T> {
        GradRun {
            x: self.x,
            dy: self.dy,
            y: self.y,
        }
    }
}

impl<T: Data> Span for Grad<'_, T> {
    #[inline(always)]
    fn len(&self) -> usize {
        self.dx.len()
    }
    #[inline(always)]
    fn split_at(self, mid: usize) -> (Self, Self) {
        let (a, b) = (
            self.inputs().range(0..mid),
            self.inputs().range(mid..self.x.len()),
        );
        let (oa, ob) = self.dx.split_at_mut(mid);
        let stream = self.stream;
        (
            Grad {
                x: a.x,
                dy: a.dy,
                y: a.y,
                dx: oa,
                stream,
            },
            Grad {
                x: b.x,
                dy: b.dy,
                y: b.y,
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

/// `K` per-channel arrays of `len` elements (or empty) rotated left by `by` and repeated
/// `copies` times into `buf`, as [`aligned_arrays`] lays them out: `out[i] = array[(i + by) %
/// len]` for `i < copies * len`, an empty array staying empty. A row kernel whose output
/// starts `by` elements before a cache line walks the rows shifted by `by` ([`row_pieces`]),
/// so that its vectors are written whole lines; the rotated arrays give each of those vectors
/// its channels' parameters with aligned loads. Repeated, they are the parameters of `copies`
/// rows taken as one.
pub(crate) fn rotated_arrays<'b, T: Element, const K: usize>(
    buf: &'b mut Vec<T>,
    arrays: [&[T]; K],
    by: usize,
    copies: usize,
) -> [&'b mut [T]; K] {
    let len = arrays.iter().map(|a| a.len()).max().unwrap_or(0);
    let mut out = aligned_arrays::<T, K>(buf, len * copies);
    for (o, a) in out.iter_mut().zip(arrays) {
        if a.is_empty() {
            *o = &mut [];
        } else {
            let (head, tail) = a.split_at(by % len);
            for o in o.chunks_exact_mut(len) {
                o[..tail.len()].copy_from_slice(tail);
                o[tail.len()..].copy_from_slice(head);
            }
        }
    }
    out
}

/// How a row kernel maps `len` elements of rows of `c` channels whose output starts
/// `rotation` elements before a 64-byte line, with parameter arrays rotated by `rotation`
/// ([`rotated_arrays`]). Without rotation, the rows. With it, a head piece of the `rotation`
/// elements before the first line (channels `0..rotation`, the rotated arrays' last), rows
/// shifted by `rotation` (every one starting on a line when `c` fills whole lines), and a
/// short last piece. A piece is `(start, n, first)`: `n` elements from `start`, with the
/// parameters from index `first` of the rotated arrays.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RowPieces {
    pub head: Option<(usize, usize, usize)>,
    /// Whole (shifted) rows: row `r` starts at `start + r * c`, parameters from index 0.
    pub start: usize,
    pub rows: usize,
    pub tail: Option<(usize, usize, usize)>,
}

/// [`RowPieces`] of `len` elements.
#[inline(always)]
pub(crate) fn row_pieces(len: usize, c: usize, rotation: usize) -> RowPieces {
    let head = (rotation > 0 && len > 0).then(|| (0, rotation.min(len), c - rotation));
    let start = rotation.min(len);
    let rows = (len - start).checked_div(c).unwrap_or(0);
    let end = start + rows * c;
    RowPieces {
        head,
        start,
        rows,
        tail: (end < len).then(|| (end, len - end, 0)),
    }
}

/// The rotation ([`row_pieces`]) that puts `output`'s rows of `c` channels on cache lines:
/// the elements before its first 64-byte boundary, where a row is a whole number of lines and
/// the output starts on an element boundary; else 0.
pub(crate) fn rotation_of<T>(output: &[T], c: usize) -> usize {
    let size = std::mem::size_of::<T>();
    let head = output.as_ptr().align_offset(64);
    if size == 0 || c == 0 || !(c * size).is_multiple_of(64) || head >= 64 / size {
        0
    } else {
        head
    }
}

/// Whether every non-empty buffer of `others` starts as far into its 64-byte line as `output`
/// does (as plain `Vec`s from the allocator do): rows mapped from `output`'s first line
/// ([`row_pieces`]) then read them in whole lines too.
pub(crate) fn alike_in_lines<T>(output: &[T], others: &[&[T]]) -> bool {
    let offset = |b: &[T]| b.as_ptr() as usize % 64;
    others
        .iter()
        .all(|b| b.is_empty() || offset(b) == offset(output))
}

/// Where the tail of a row piece of `n` elements, past its whole vectors of `w`, is mapped:
/// `(c0, m)`, `m` elements from `c0`. An overlapping last whole vector (`m == w`) where the
/// piece is at least a vector wide and `overlap` allows it (masked stores are slow on some
/// CPUs), else the partial rest; `None` without a tail.
#[inline(always)]
pub(crate) fn row_tail(n: usize, w: usize, overlap: bool) -> Option<(usize, usize)> {
    let full = n - n % w;
    if full == n {
        None
    } else if n >= w && overlap {
        Some((n - w, w))
    } else {
        Some((full, n - full))
    }
}

/// What follows the normalization in the same pass, applied to each output vector before it
/// is stored: a residual added, a ReLU, or both (`y = relu(bn(x) + residual)`). A type
/// parameter of the buffers ([`Then`]), so that the plain path is the plain buffers, untouched.
pub(crate) trait Epilogue<D: Data>: Send + Copy {
    /// Whether it reads memory of its own.
    const READS: bool = false;
    /// The epilogue of the first `mid` elements and of the rest (cut as the buffers are).
    fn split_at(self, mid: usize) -> (Self, Self);
    /// The epilogue of the `len` outputs from `start` alone, indexed from 0: a value of its
    /// own for a run of whole vectors, which the compiler keeps in registers (through `&self`
    /// it reloaded the residual's address, length and read-ahead from memory at every vector,
    /// since the stores might have changed them: measured on Zen 4, 32x2048x7x7 NHWC
    /// inference with residual and ReLU 14% slower).
    fn range(&self, start: usize, len: usize) -> Self;
    /// Applied to the vector `v` that goes to output index `i..i + n` (`n <= WIDTH`).
    fn apply<L: Lanes<Mem = D>>(&self, i: usize, n: usize, v: L) -> L;
    /// Asks for the cache lines of what it reads.
    #[inline(always)]
    fn prefetch(&self) {}
    /// Makes every whole vector read of what it reads ask for the line `elements` further on:
    /// a steady stream of requests for the next image's stretch while one image's is mapped,
    /// where the stretches are too short for the hardware prefetchers.
    fn read_ahead(&mut self, _elements: usize) {}
}

/// `y = relu(v)`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Relu;

impl<D: Data> Epilogue<D> for Relu {
    #[inline(always)]
    fn split_at(self, _: usize) -> (Self, Self) {
        (Relu, Relu)
    }
    #[inline(always)]
    fn range(&self, _: usize, _: usize) -> Self {
        Relu
    }
    #[inline(always)]
    fn apply<L: Lanes<Mem = D>>(&self, _: usize, _: usize, v: L) -> L {
        v.relu()
    }
}

/// `y = v + residual`, then a ReLU with `RELU`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Residual<'a, D, const RELU: bool> {
    pub residual: &'a [D],
    /// When not 0: each whole vector read asks for the residual this many elements further
    /// on ([`Epilogue::read_ahead`]).
    pub ahead: usize,
}

impl<'a, D, const RELU: bool> Residual<'a, D, RELU> {
    pub fn new(residual: &'a [D]) -> Self {
        Residual { residual, ahead: 0 }
    }
}

impl<D: Data, const RELU: bool> Epilogue<D> for Residual<'_, D, RELU> {
    const READS: bool = true;
    #[inline(always)]
    fn split_at(self, mid: usize) -> (Self, Self) {
        let (a, b) = self.residual.split_at(mid);
        let ahead = self.ahead;
        (
            Residual { residual: a, ahead },
            Residual { residual: b, ahead },
        )
    }
    #[inline(always)]
    fn range(&self, start: usize, len: usize) -> Self {
        Residual {
            residual: &self.residual[start..start + len],
            ahead: self.ahead,
        }
    }
    #[inline(always)]
    fn prefetch(&self) {
        super::stats::prefetch(self.residual)
    }
    fn read_ahead(&mut self, elements: usize) {
        self.ahead = elements;
    }
    #[inline(always)]
    fn apply<L: Lanes<Mem = D>>(&self, i: usize, n: usize, v: L) -> L {
        let r = if n == L::WIDTH {
            if self.ahead > 0 {
                // A hint, whatever the address: it may lie beyond this span's residual (in
                // the next image's, or past the end).
                super::stats::prefetch_line(self.residual.as_ptr().wrapping_add(i + self.ahead));
            }
            L::read(&self.residual[i..i + n])
        } else {
            L::read_partial(&self.residual[i..i + n], L::Elem::ZERO)
        };
        let sum = v.add(r);
        if RELU {
            sum.relu()
        } else {
            sum
        }
    }
}

/// Buffers `B` whose every output vector goes through the epilogue `E` first.
pub(crate) struct Then<B, E> {
    pub buf: B,
    pub epilogue: E,
}

impl<B: Buffers, E: Epilogue<B::Data>> Span for Then<B, E> {
    #[inline(always)]
    fn len(&self) -> usize {
        self.buf.len()
    }
    #[inline(always)]
    fn split_at(self, mid: usize) -> (Self, Self) {
        let (a, b) = self.buf.split_at(mid);
        let (ea, eb) = self.epilogue.split_at(mid);
        (
            Then {
                buf: a,
                epilogue: ea,
            },
            Then {
                buf: b,
                epilogue: eb,
            },
        )
    }
}

/// `f` then the epilogue, for the `n` lanes at output index `at`.
struct ThenMap<'a, F, E> {
    f: &'a F,
    epilogue: &'a E,
    at: usize,
    n: usize,
}

impl<L: Lanes, F: MapLanes<L>, E: Epilogue<L::Mem>> MapLanes<L> for ThenMap<'_, F, E> {
    #[inline(always)]
    fn apply(&self, v: L) -> L {
        self.epilogue.apply(self.at, self.n, self.f.apply(v))
    }
}

/// `f` then the epilogue, for whole vectors: `epilogues[k]` is stretch `k`'s own
/// ([`Epilogue::range`]).
struct ThenAt<'a, F, E, const K: usize> {
    f: &'a F,
    epilogues: [E; K],
}

impl<L: Lanes, F: MapAt<L>, E: Epilogue<L::Mem>, const K: usize> MapAt<L> for ThenAt<'_, F, E, K> {
    type At = F::At;
    #[inline(always)]
    fn at(&self, j: usize) -> F::At {
        self.f.at(j)
    }
    #[inline(always)]
    fn apply(&self, at: F::At, k: usize, j: usize, v: L) -> L {
        self.epilogues[k].apply(j * L::WIDTH, L::WIDTH, self.f.apply(at, k, j, v))
    }
}

impl<B: Buffers, E: Epilogue<B::Data>> Buffers for Then<B, E> {
    type Data = B::Data;
    #[inline(always)]
    fn input(&self) -> &[Self::Data] {
        self.buf.input()
    }
    #[inline(always)]
    fn output(&self) -> &[Self::Data] {
        self.buf.output()
    }
    fn set_streaming(&mut self, on: bool) {
        self.buf.set_streaming(on)
    }
    fn streaming(&self) -> bool {
        self.buf.streaming()
    }
    #[inline(always)]
    fn prefetch_epilogue(&self) {
        self.epilogue.prefetch()
    }
    fn epilogue_read_ahead(&mut self, elements: usize) {
        self.epilogue.read_ahead(elements)
    }
    fn epilogue_reads(&self) -> bool {
        E::READS
    }
    fn input_read_ahead(&mut self, elements: usize) {
        self.buf.input_read_ahead(elements)
    }
    #[inline(always)]
    fn map<L: Lanes<Mem = Self::Data>>(&mut self, i: usize, n: usize, f: &impl MapLanes<L>) {
        let then = ThenMap {
            f,
            epilogue: &self.epilogue,
            at: i,
            n,
        };
        self.buf.map(i, n, &then)
    }
    #[inline(always)]
    fn load<L: Lanes<Mem = Self::Data>>(&self, i: usize) -> L {
        self.buf.load(i)
    }
    #[inline(always)]
    fn store<L: Lanes<Mem = Self::Data>>(&mut self, i: usize, v: L) {
        let v = self.epilogue.apply(i, L::WIDTH, v);
        self.buf.store(i, v)
    }
    #[inline(always)]
    fn put<L: Lanes<Mem = Self::Data>>(&mut self, i: usize, v: L) {
        let v = self.epilogue.apply(i, L::WIDTH, v);
        self.buf.put(i, v)
    }
    #[inline(always)]
    fn map_vectors<L: Lanes<Mem = Self::Data>, const K: usize>(
        &mut self,
        starts: [usize; K],
        len: usize,
        f: &impl MapAt<L>,
    ) {
        let mut epilogues = [self.epilogue; K];
        for (e, &s) in epilogues.iter_mut().zip(&starts) {
            *e = self.epilogue.range(s, len);
        }
        let then = ThenAt { f, epilogues };
        self.buf.map_vectors(starts, len, &then)
    }
}
