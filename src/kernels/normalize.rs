//! The element-wise pass: `y = (x - hi) * scale + shift` per channel.
//!
//! `hi` is the channel's mean rounded to the element type and `shift` absorbs the rest of it:
//! with `mean = hi + lo`, `shift = bias - lo * scale` (in `f64`, rounded once). `x - hi` is
//! exact for `x` near the mean, so a mean of 1e6 (whose `f32` rounding alone is 0.03) still
//! centres the data exactly. Without a centre (`hi = 0`) this is the inference engines'
//! `y = x * scale + shift`.

use super::buffers::{
    aligned_arrays, alike_in_lines, row_pieces, row_tail, Buffers, LanesOf, Param,
};
use super::lanes::{load_upto, Lanes, MapAt, MapLanes};
use super::simd::{Simd, WithSimd};
use super::Isa;
use crate::element::Element;
use std::mem::size_of;

/// One channel's normalization: `y = (x - hi) * scale + shift`.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct Affine<T> {
    pub hi: T,
    pub scale: T,
    pub shift: T,
}

impl<T: Element> Affine<T> {
    /// The normalization `(x - mean) * scale + shift` of a channel with mean `mean`: `mean`
    /// rounded to `hi`, its remainder folded into the shift.
    pub fn centered(mean: f64, scale: f64, shift: f64) -> Self {
        let hi = T::from_f64(mean);
        let scale = T::from_f64(scale);
        Affine {
            hi,
            scale,
            shift: T::from_f64(shift - (mean - hi.to_f64()) * scale.to_f64()),
        }
    }
}

/// Every channel's [`Affine`], as arrays (lanes load the parameters of neighbouring
/// channels together). An empty `hi` means no centering.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ChannelAffine<'a, T> {
    pub hi: &'a [T],
    pub scale: &'a [T],
    pub shift: &'a [T],
}

impl<T: Element> ChannelAffine<'_, T> {
    /// Channel `c`'s parameters.
    #[inline(always)]
    pub fn get(&self, c: usize) -> Affine<T> {
        Affine {
            hi: self.hi.get(c).copied().unwrap_or(T::ZERO),
            scale: self.scale[c],
            shift: self.shift[c],
        }
    }
}

/// [`Affine`] in lanes: `(v - hi) * scale + shift`.
#[derive(Clone, Copy)]
pub(crate) struct AffineLanes<L> {
    hi: L,
    scale: L,
    shift: L,
}

impl<L: Lanes> MapLanes<L> for AffineLanes<L> {
    #[inline(always)]
    fn apply(&self, v: L) -> L {
        v.sub(self.hi).mul_add(self.scale, self.shift)
    }
}

impl<L: Lanes> AffineLanes<L> {
    #[inline(always)]
    fn splat(a: &Affine<L::Elem>) -> Self {
        AffineLanes {
            hi: L::splat(a.hi),
            scale: L::splat(a.scale),
            shift: L::splat(a.shift),
        }
    }

    /// The parameters of the `n` channels from `c0` (padded with zeros past `n < WIDTH`).
    #[inline(always)]
    fn load(p: &ChannelAffine<'_, L::Elem>, c0: usize, n: usize) -> Self {
        AffineLanes {
            hi: if p.hi.is_empty() {
                L::splat(L::Elem::ZERO)
            } else {
                load_upto(p.hi, c0, n)
            },
            scale: load_upto(p.scale, c0, n),
            shift: load_upto(p.shift, c0, n),
        }
    }
}

/// A row's parameters as whole vectors: vector `j` of a piece of a row is normalized with
/// lanes `j * WIDTH ..` of each array (all of the same length, a multiple of `WIDTH`; `hi`
/// may be empty: no centering).
struct RowAffine<'a, T> {
    hi: &'a [T],
    scale: &'a [T],
    shift: &'a [T],
}

impl<'a, T> RowAffine<'a, T> {
    /// The `n` parameters of each array of `p` from `first`.
    #[inline(always)]
    fn new(p: &ChannelAffine<'a, T>, first: usize, n: usize) -> Self {
        let hi = if p.hi.is_empty() {
            p.hi
        } else {
            &p.hi[first..first + n]
        };
        RowAffine {
            hi,
            scale: &p.scale[first..first + n],
            shift: &p.shift[first..first + n],
        }
    }
}

impl<L: Lanes> MapAt<L> for RowAffine<'_, L::Elem> {
    /// Vector `j`'s parameters; `hi` is 0 without a centre (`v - 0` is `v`, bit for bit).
    type At = AffineLanes<L>;
    #[inline(always)]
    fn at(&self, j: usize) -> Self::At {
        let (at, w) = (j * L::WIDTH, L::WIDTH);
        // One bounds check for the three arrays (six in the hot loop otherwise: measured 25%
        // slower NHWC inference with AVX2 on Zen 5).
        assert!(at + w <= self.scale.len());
        // SAFETY: `new` made `scale`, `shift` and a non-empty `hi` of one length, and
        // `at + w` is within it.
        let lanes = |a: &[L::Elem]| L::load(unsafe { a.get_unchecked(at..at + w) });
        AffineLanes {
            hi: if self.hi.is_empty() {
                L::splat(L::Elem::ZERO)
            } else {
                lanes(self.hi)
            },
            scale: lanes(self.scale),
            shift: lanes(self.shift),
        }
    }
    #[inline(always)]
    fn apply(&self, at: Self::At, _: usize, _: usize, v: L) -> L {
        at.apply(v)
    }
}

/// Normalizes consecutive runs of `s` values (NCHW), run `r` of `buf` with `affine(r)`.
#[inline(always)]
pub(crate) fn normalize_runs<L: Lanes, B: Buffers<Data = L::Mem>>(
    buf: &mut B,
    s: usize,
    mut affine: impl FnMut(usize) -> Affine<L::Elem>,
) {
    let runs = buf.len().checked_div(s).unwrap_or(0);
    if s >= L::WIDTH {
        map_runs::<L, _, _>(
            &mut Io(buf),
            0,
            s,
            runs,
            #[inline(always)]
            |r| AffineLanes::splat(&affine(r)),
        );
    } else {
        for r in 0..runs {
            normalize_short::<L, B>(buf, r * s, s, &affine(r));
        }
    }
    if buf.streaming() {
        super::store_fence();
    }
}

/// What [`map_runs`] maps: vectors of input (one tensor, or `x` and `dy`) to vectors of
/// output, at the same index.
pub(crate) trait RunIo<L: Lanes> {
    /// The input at one index: a vector, or one of each input tensor.
    type In: Copy;
    /// The input vector(s) at `i`.
    fn read(&self, i: usize) -> Self::In;
    /// Writes the output vector at `i`, streaming if `stream` and the address is aligned.
    fn write(&mut self, i: usize, v: L, stream: bool);
    /// Maps the `len / WIDTH` whole vectors from `at` with `f`, without per-vector bounds
    /// checks, streaming if [`streams`](Self::streams).
    fn map_whole<M: RunMap<L, Self::In>>(&mut self, at: usize, len: usize, f: &M);
    /// Whether the output is written with streaming stores.
    fn streams(&self) -> bool;
    /// The output from `i` on (for its alignment).
    fn output_at(&self, i: usize) -> *const L::Mem;
}

/// A [`Buffers`] as [`RunIo`].
pub(crate) struct Io<'a, B>(pub &'a mut B);

impl<L: Lanes, B: Buffers<Data = L::Mem>> RunIo<L> for Io<'_, B> {
    type In = L;
    #[inline(always)]
    fn read(&self, i: usize) -> L {
        self.0.load(i)
    }
    #[inline(always)]
    fn write(&mut self, i: usize, v: L, stream: bool) {
        if stream {
            self.0.put(i, v)
        } else {
            self.0.store(i, v)
        }
    }
    #[inline(always)]
    fn map_whole<M: RunMap<L, L>>(&mut self, at: usize, len: usize, f: &M) {
        self.0.map_vectors([at], len, &Whole(f))
    }
    #[inline(always)]
    fn streams(&self) -> bool {
        self.0.streaming()
    }
    #[inline(always)]
    fn output_at(&self, i: usize) -> *const L::Mem {
        self.0.output()[i..].as_ptr()
    }
}

/// A run's map as a [`MapAt`] (the same for every vector).
struct Whole<'a, M>(&'a M);

impl<L: Lanes, M: RunMap<L, L>> MapAt<L> for Whole<'_, M> {
    type At = ();
    #[inline(always)]
    fn at(&self, _: usize) {}
    #[inline(always)]
    fn apply(&self, _: (), _: usize, _: usize, v: L) -> L {
        self.0.map(v)
    }
}

/// One run's map in lanes: input vector(s) to an output vector.
pub(crate) trait RunMap<L: Lanes, In>: Copy {
    fn map(&self, v: In) -> L;
}

impl<L: Lanes> RunMap<L, L> for AffineLanes<L> {
    #[inline(always)]
    fn map(&self, v: L) -> L {
        MapLanes::apply(self, v)
    }
}

/// Maps the `count` consecutive runs of `s >= WIDTH` values of `io` from `start`, run `j`
/// with `f(j)` (called once per run, in order), in whole vectors laid over the span without
/// regard to where runs end: a vector that straddles runs `j` and `j + 1` takes each lane from
/// its run's map ([`Lanes::splice`]). One loop for the span, with no per-run tail, and every
/// output line written whole, so that streaming stores pay even for runs of 49 values. The
/// last vector, when the span is not a whole number of them, overlaps its predecessor and is
/// computed from the input as it was before the span was written (in place too, every
/// element is mapped once from its original value).
#[inline(always)]
pub(crate) fn map_runs<L: Lanes, I: RunIo<L>, M: RunMap<L, I::In>>(
    io: &mut I,
    start: usize,
    s: usize,
    count: usize,
    mut f: impl FnMut(usize) -> M,
) {
    let (w, len) = (L::WIDTH, s * count);
    if count == 0 || s < w {
        return;
    }
    let stream = io.streams();
    let last = io.read(start + len - w);
    let mut cur = f(0);
    // With streaming stores, one plain vector up to the first aligned output address.
    let mut p = 0;
    if stream {
        let head = io.output_at(start).align_offset(w * size_of::<L::Mem>());
        if head > 0 && head < w {
            let v = cur.map(io.read(start));
            io.write(start, v, false);
            p = head;
        }
    }
    let (mut j, mut end) = (0, s);
    let mut next = if count > 1 { f(1) } else { cur };
    loop {
        // The whole vectors of run `j`.
        let whole = (end.min(len) - p.min(end)) / w * w;
        io.map_whole(start + p, whole, &cur);
        p += whole;
        if p + w > len {
            break;
        }
        if p < end {
            // The vector across the end of run `j`; runs are at least a vector long, so it
            // ends within run `j + 1`.
            let v = io.read(start + p);
            let out = cur.map(v).splice(end - p, next.map(v));
            io.write(start + p, out, stream);
            p += w;
        }
        j += 1;
        end += s;
        cur = next;
        if j + 1 < count {
            next = f(j + 1);
        }
    }
    if p < len {
        io.write(start + len - w, cur.map(last), false);
    }
}

/// Normalizes the `params.len()` consecutive runs of `s` values of `buf` from `start`, run
/// `j` with `params[j]`: [`map_runs`] when runs are at least a vector long.
#[inline(always)]
pub(crate) fn normalize_group<L: Lanes, B: Buffers<Data = L::Mem>>(
    buf: &mut B,
    start: usize,
    s: usize,
    params: &[Affine<L::Elem>],
) {
    if s >= L::WIDTH {
        map_runs::<L, _, _>(
            &mut Io(buf),
            start,
            s,
            params.len(),
            #[inline(always)]
            |j| AffineLanes::splat(&params[j]),
        );
    } else {
        for (j, p) in params.iter().enumerate() {
            normalize_short::<L, B>(buf, start + j * s, s, p);
        }
    }
}

/// Normalizes the `s < WIDTH` values of `buf` from `start` with `a`.
#[inline(always)]
fn normalize_short<L: Lanes, B: Buffers<Data = L::Mem>>(
    buf: &mut B,
    start: usize,
    s: usize,
    a: &Affine<L::Elem>,
) {
    buf.map(start, s, &AffineLanes::<L>::splat(a));
}

/// The least distance in bytes between two stretches of rows that [`normalize_rows`] maps
/// side by side, so that each is a stream of its own pages: neighbouring rows 1 KiB apart,
/// mapped side by side within one page, took 1.7-1.9x as long as one row after the other
/// (Zen 4, a plain AVX-512 loop over 32x256x28x28 with residual and ReLU), where two stretches
/// half the tensor apart took 0.85-0.95x.
const STRETCH_BYTES: usize = 16 << 10;

/// The least width of a row's parameters (each of the three arrays), in bytes, for which
/// [`normalize_rows`] maps two rows side by side; the driver maps narrower rows several at a
/// time, as one row whose parameters are repeated. Paired one by one, narrow rows cost more
/// in the calls than their parameters do: on Zen 4, 32x64x56x56 (256 bytes) took 1.07x
/// (AVX2) to 1.20x (AVX-512) as long, 32x128x28x28 (512 bytes) the same.
pub(crate) const ROW_PARAM_BYTES: usize = 1024;

/// Normalizes whole rows of `c` channels each (NHWC), lane `j` of a vector being channel
/// `c0 + j`, in the pieces of [`row_pieces`] with `p` rotated by `rotation` (0: not
/// rotated). The whole rows go as two stretches, the first half and the second, mapped side
/// by side where rows are wide, vectors whole lines, the input as far into its line as the
/// output, and the stretches [`STRETCH_BYTES`] apart: row `r` with row `half + r`, vector by
/// vector, each vector's parameters loaded once for both.
///
/// Wide rows read three parameter vectors for each data vector, from arrays as wide as the
/// row, and on Zen 4 that walk set the pace: a 32x2048x7x7 map with residual and ReLU took
/// 1.9x as long as its NCHW twin, and 1.1x with the parameters cut to 4 vectors (wrong
/// results, a probe). Measured on Zen 4, one thread, AVX-512, f32 NHWC, before -> after this
/// pairing, the driver's grouping of narrow rows and
/// [`Epilogue::range`](super::buffers::Epilogue::range), means of 8 alternated runs: with
/// residual and ReLU, inference 32x2048x7x7 2.40 -> 1.53 ms, 32x1024x14x14 3.46 -> 2.66 ms,
/// 32x256x28x28 3.25 -> 2.60 ms, 32x64x56x56 2.81 -> 2.68 ms, and training 32x2048x7x7 2.95
/// -> 2.29 ms, 32x256x28x28 4.73 -> 4.14 ms; plain inference 32x2048x7x7 1.41 -> 1.06 ms,
/// 32x256x28x28 the same (2.08 -> 2.11 ms), in place 1.23 -> 0.99 ms.
#[inline(always)]
pub(crate) fn normalize_rows<L: Lanes, B: Buffers<Data = L::Mem>>(
    buf: &mut B,
    c: usize,
    p: &ChannelAffine<'_, L::Elem>,
    rotation: usize,
) {
    let stream = buf.streaming();
    // The parameters of a whole row, made once: most pieces are whole rows.
    let row = RowParams::<L>::new(p, 0, c, stream);
    let pieces = row_pieces(buf.len(), c, rotation);
    let row_at = {
        #[inline(always)]
        |r: usize| pieces.start + r * c
    };
    // The rows as two stretches, mapped side by side where rows are wide and the stretches
    // lie apart.
    let half = pieces.rows / 2;
    let wide = c * size_of::<L::Elem>() >= ROW_PARAM_BYTES;
    // Only vectors of whole lines, with the input as far into its line as the output, or
    // anywhere where AVX-512 runs in halves. With AVX2 (half lines) and an input 32 bytes past
    // the output's offset, paired rows took 2.7x as long as single ones (Zen 4, 32x256x28x28
    // inference, streamed); with AVX-512 on Zen 4 they pair as well as alike buffers
    // (32x64x56x56 with residual and ReLU, one thread, 5 alternated runs: the input 32 bytes
    // off, single rows 2.66-3.00 ms in 4 runs, the fifth 4.72; paired, a mean of 2.32 ms;
    // alike, paired, 2.34 ms). Unmeasured on CPUs with full-width units, where such buffers
    // take AVX2 unless AVX-512 is forced ([`Isa::for_rows`]).
    let whole_lines = L::WIDTH * size_of::<L::Mem>() >= 64
        && (Isa::avx512_in_halves() || alike_in_lines(buf.output(), &[buf.input()]));
    let paired = if wide && whole_lines && half * c * size_of::<L::Mem>() >= STRETCH_BYTES {
        for r in 0..half {
            row.map(buf, [row_at(r), row_at(half + r)]);
        }
        2 * half
    } else {
        0
    };
    for r in paired..pieces.rows {
        row.map(buf, [row_at(r)]);
    }
    for (start, n, first) in pieces.head.into_iter().chain(pieces.tail) {
        RowParams::<L>::new(p, first, n, stream).map(buf, [start]);
    }
    if stream {
        super::store_fence();
    }
}

/// The parameters of `n` consecutive channels of a row: whole vectors, and a tail shorter
/// than a vector.
struct RowParams<'a, L: Lanes> {
    whole: RowAffine<'a, L::Elem>,
    n: usize,
    /// The tail ([`row_tail`]): `m` elements from `c0`, an overlapping last vector when
    /// `m == WIDTH` (never over lines just streamed: no plain store after them), else partial.
    tail: Option<(usize, usize, AffineLanes<L>)>,
}

impl<'a, L: Lanes> RowParams<'a, L> {
    #[inline(always)]
    fn new(p: &ChannelAffine<'a, L::Elem>, first: usize, n: usize, stream: bool) -> Self {
        // A `match`, not `Option::map`: the closure would be compiled into `map`, which the
        // compiler may leave out of line, without the entry's features.
        let tail = match row_tail(n, L::WIDTH, !stream) {
            Some((c0, m)) => Some((c0, m, AffineLanes::load(p, first + c0, m))),
            None => None,
        };
        RowParams {
            whole: RowAffine::new(p, first, n - n % L::WIDTH),
            n,
            tail,
        }
    }

    /// Maps the pieces of `buf` from `starts` (disjoint, in order), vector by vector side by
    /// side ([`Buffers::map_vectors`]); an overlapping tail is computed from the input as it
    /// was before its piece was written, so in place too.
    #[inline(always)]
    fn map<B: Buffers<Data = L::Mem>, const K: usize>(&self, buf: &mut B, starts: [usize; K]) {
        let w = L::WIDTH;
        let mut last = [None; K];
        // The overlapping tail's input, read before its piece is written.
        if let Some((c0, ..)) = self.tail.filter(|&(_, m, _)| m == w) {
            for (v, &start) in last.iter_mut().zip(&starts) {
                *v = Some(buf.load::<L>(start + c0));
            }
        }
        buf.map_vectors::<L, K>(starts, self.n - self.n % w, &self.whole);
        for (start, last) in starts.into_iter().zip(last) {
            match (self.tail, last) {
                (Some((c0, _, f)), Some(v)) => buf.store(start + c0, f.apply(v)),
                (Some((c0, m, f)), None) => buf.map(start + c0, m, &f),
                _ => {}
            }
        }
    }
}

/// Writes every channel's [`Affine`] into `buf`, as three arrays aligned to 64 bytes
/// ([`aligned_arrays`]), and returns the kernels' view of it.
pub(crate) fn fill_affine<T: Element>(
    buf: &mut Vec<T>,
    c: usize,
    affine: impl Fn(usize) -> Affine<T>,
) -> ChannelAffine<'_, T> {
    let [hi, scale, shift] = aligned_arrays::<T, 3>(buf, c);
    for i in 0..c {
        let a = affine(i);
        (hi[i], scale[i], shift[i]) = (a.hi, a.scale, a.shift);
    }
    ChannelAffine { hi, scale, shift }
}

/// [`normalize_runs`] as a kernel: `buf` holds runs of `s` values, run `r` normalized with
/// `affine(r)`.
pub(crate) struct NormalizeRuns<'b, B, F> {
    pub buf: &'b mut B,
    pub s: usize,
    pub affine: F,
}

impl<B: Buffers, F: FnMut(usize) -> Affine<Param<B>>> WithSimd for NormalizeRuns<'_, B, F> {
    type Output = ();
    #[inline(always)]
    fn with_simd<S: Simd>(self, _: S) {
        normalize_runs::<LanesOf<B, S>, B>(self.buf, self.s, self.affine)
    }
}

/// [`normalize_rows`] as a kernel: `buf` holds rows of `c` channels, `p` rotated by
/// `rotation`.
pub(crate) struct NormalizeRows<'b, 'p, B, T> {
    pub buf: &'b mut B,
    pub c: usize,
    pub p: &'p ChannelAffine<'p, T>,
    pub rotation: usize,
}

impl<B: Buffers> WithSimd for NormalizeRows<'_, '_, B, Param<B>> {
    type Output = ();
    #[inline(always)]
    fn with_simd<S: Simd>(self, _: S) {
        normalize_rows::<LanesOf<B, S>, B>(self.buf, self.c, self.p, self.rotation)
    }
}
