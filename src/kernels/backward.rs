//! The backward pass's kernels: the two per-channel sums in one read of `x` and `dy`, then
//! `dx` element by element.
//!
//! With `xc = x - hi` the centred input (`hi` the saved mean, which is of the element type), the sums are `Σ dy` and `Σ dy * xc`; the layer
//! turns them into `dbias`, `dweight` and the coefficients of
//! `dx = a * dy + b * xc + c` ([`BackAffine`]). As in the statistics, f32 accumulator lanes add
//! at most [`MAX_CHAIN`] values before their sums move to `f64`.

use super::buffers::{aligned_arrays, row_pieces, row_tail, Grad, Span};
use super::lanes::{load_tile, load_upto, Lanes};
use super::normalize::{map_runs, RunIo, RunMap};
use super::simd::{Simd, WithSimd};
use super::stats::{
    block_len, fold_pieces, prefetch, runs_per_block, Piece, Reduce, MAX_CHAIN, MAX_WIDTH, TILE,
};
use crate::element::{Data, Element};
use std::ops::Range;

/// `Σ dy` and `Σ dy * (x - center)` of a channel, or of a piece of one.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct GradSums {
    pub dy: f64,
    pub dy_xc: f64,
}

impl GradSums {
    pub fn add(self, o: GradSums) -> GradSums {
        GradSums {
            dy: self.dy + o.dy,
            dy_xc: self.dy_xc + o.dy_xc,
        }
    }
}

/// One channel's `dx = a * dy + b * (x - hi) + c`.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct BackAffine<T> {
    pub hi: T,
    pub a: T,
    pub b: T,
    pub c: T,
}

/// Every channel's [`BackAffine`] as arrays.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ChannelBack<'a, T> {
    pub hi: &'a [T],
    pub a: &'a [T],
    pub b: &'a [T],
    pub c: &'a [T],
}

impl<T: Element> ChannelBack<'_, T> {
    #[inline(always)]
    pub fn get(&self, ch: usize) -> BackAffine<T> {
        BackAffine {
            hi: self.hi[ch],
            a: self.a[ch],
            b: self.b[ch],
            c: self.c[ch],
        }
    }
}

/// Writes every channel's [`BackAffine`] into `buf`, as four arrays aligned to 64 bytes
/// ([`aligned_arrays`]), and returns the kernels' view of it.
pub(crate) fn fill_back<T: Element>(
    buf: &mut Vec<T>,
    channels: usize,
    f: impl Fn(usize) -> BackAffine<T>,
) -> ChannelBack<'_, T> {
    let [hi, a, b, c] = aligned_arrays::<T, 4>(buf, channels);
    for ch in 0..channels {
        let p = f(ch);
        (hi[ch], a[ch], b[ch], c[ch]) = (p.hi, p.a, p.b, p.c);
    }
    ChannelBack { hi, a, b, c }
}

/// Independent accumulators per sum.
pub(crate) const UNROLL: usize = 4;

/// A run of the backward pass's inputs: `x`, `dy` and, where a ReLU was fused into the forward
/// pass, its output `y` (empty otherwise), which gates `dy` (`dz = if y <= 0 { 0 } else { dy }`,
/// PyTorch's `threshold_backward`). The kernels take a `GATED` constant, so the plain path
/// never looks at `y`.
#[derive(Debug)]
pub(crate) struct GradRun<'a, D> {
    pub x: &'a [D],
    pub dy: &'a [D],
    pub y: &'a [D],
}

impl<'a, D> GradRun<'a, D> {
    /// Elements `r` of each.
    #[inline(always)]
    pub fn range(self, r: Range<usize>) -> Self {
        GradRun {
            x: &self.x[r.clone()],
            dy: &self.dy[r.clone()],
            y: if self.y.is_empty() {
                self.y
            } else {
                &self.y[r]
            },
        }
    }

    /// Elements `at .. at + len` of each.
    #[inline(always)]
    pub fn at(self, at: usize, len: usize) -> Self {
        self.range(at..at + len)
    }
}

/// The inputs alone, cut as the buffers are (the backward's sums by channel groups).
impl<D: Data> Span for GradRun<'_, D> {
    #[inline(always)]
    fn len(&self) -> usize {
        self.x.len()
    }
    #[inline(always)]
    fn split_at(self, mid: usize) -> (Self, Self) {
        (self.range(0..mid), self.range(mid..self.x.len()))
    }
}

impl<D> Clone for GradRun<'_, D> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<D> Copy for GradRun<'_, D> {}

impl<D> Piece for GradRun<'_, D> {
    #[inline(always)]
    fn len(self) -> usize {
        self.x.len()
    }
    #[inline(always)]
    fn prefetch(self) {
        prefetch(self.x);
        prefetch(self.dy);
        prefetch(self.y);
    }
    #[inline(always)]
    fn chunks_exact(self, n: usize) -> (impl Iterator<Item = Self>, Self) {
        let len = self.x.len();
        let done = len - len % n;
        (
            (0..len / n).map(
                #[inline(always)]
                move |k| self.at(k * n, n),
            ),
            self.range(done..len),
        )
    }
}

impl<'a, D: Data> GradRun<'a, D> {
    /// `x` and the gradient `dz` at `i..i + n` (`n <= WIDTH`; a partial vector's other lanes
    /// `fill` for `x`, 0 for `dz`).
    #[inline(always)]
    pub fn read<L: Lanes<Mem = D>, const GATED: bool>(
        self,
        i: usize,
        n: usize,
        fill: L::Elem,
    ) -> (L, L) {
        let x = read_n::<L>(self.x, i, n, fill);
        let dy = read_n::<L>(self.dy, i, n, L::Elem::ZERO);
        let dz = if GATED {
            dy.relu_grad(read_n::<L>(self.y, i, n, L::Elem::ZERO))
        } else {
            dy
        };
        (x, dz)
    }

    /// `x` and `dz` at `i`, in `f64` (for the rare `f64` paths).
    #[inline(always)]
    pub fn get(self, i: usize) -> (f64, f64) {
        let dy = self.dy[i].to_f64();
        let gated = self.y.get(i).is_some_and(|y| y.to_f64() <= 0.0);
        (self.x[i].to_f64(), if gated { 0.0 } else { dy })
    }
}

/// The `n <= WIDTH` elements of `v` at `i` as a vector, the other lanes `fill`. (A function,
/// not a closure: a closure left out of line would lose the entry's target features.)
#[inline(always)]
fn read_n<L: Lanes>(v: &[L::Mem], i: usize, n: usize, fill: L::Elem) -> L {
    if n == L::WIDTH {
        L::read(&v[i..i + n])
    } else {
        L::read_partial(&v[i..i + n], fill)
    }
}

/// `Σ dy` and `Σ dy * (x - hi)` in lanes; padding lanes have `dy = 0` and add nothing.
#[derive(Clone, Copy)]
pub(crate) struct GradLanes<L: Lanes, const GATED: bool> {
    hi: L::Elem,
    hv: L,
    dy: L,
    dy_xc: L,
}

impl<L: Lanes, const GATED: bool> Reduce<L> for GradLanes<L, GATED> {
    type Piece<'a> = GradRun<'a, L::Mem>;
    type V = (L, L);
    #[inline(always)]
    fn load(g: Self::Piece<'_>, at: usize) -> (L, L) {
        g.read::<L, GATED>(at, L::WIDTH, L::Elem::ZERO)
    }
    #[inline(always)]
    fn load_tail(&self, g: Self::Piece<'_>, at: usize) -> (L, L) {
        g.read::<L, GATED>(at, g.x.len() - at, self.hi)
    }
    #[inline(always)]
    fn step(self, (x, dy): (L, L)) -> Self {
        GradLanes {
            dy: self.dy.add(dy),
            dy_xc: dy.mul_add(x.sub(self.hv), self.dy_xc),
            ..self
        }
    }
    #[inline(always)]
    fn merge(self, o: Self) -> Self {
        GradLanes {
            dy: self.dy.add(o.dy),
            dy_xc: self.dy_xc.add(o.dy_xc),
            ..self
        }
    }
    #[inline(always)]
    fn empty(&self) -> Self {
        Self::around(self.hi)
    }
    #[inline(always)]
    fn sums(&self) -> [f64; 2] {
        [self.dy.sum().to_f64(), self.dy_xc.sum().to_f64()]
    }
}

impl<L: Lanes, const GATED: bool> GradLanes<L, GATED> {
    /// No sums yet, around `hi`.
    #[inline(always)]
    pub fn around(hi: L::Elem) -> Self {
        let zero = L::splat(L::Elem::ZERO);
        GradLanes {
            hi,
            hv: L::splat(hi),
            dy: zero,
            dy_xc: zero,
        }
    }
}

/// The sums of a block of `count` pieces `piece(i)` around `hi`, [`UNROLL`] vectors at a time
/// into independent accumulators ([`fold_pieces`]; [`runs_per_block`] bounds `count`).
#[inline(always)]
fn block_sums<'a, L: Lanes, const GATED: bool>(
    count: usize,
    piece: &impl Fn(usize) -> GradRun<'a, L::Mem>,
    hi: L::Elem,
) -> GradSums {
    let init = GradLanes::<L, GATED>::around(hi);
    let [dy, dy_xc] = fold_pieces::<L, _, UNROLL>(count, piece, init).sums();
    let sums = GradSums { dy, dy_xc };
    if sums.dy.is_finite() && sums.dy_xc.is_finite() {
        return sums;
    }
    let mut exact = GradSums::default();
    for i in 0..count {
        let g = piece(i);
        exact = exact.add(sums_f64(g.x.len(), |j| g.get(j), hi.to_f64()));
    }
    exact
}

/// The sums of `n` pairs `pair(i) = (x, dy)` in plain `f64`: the rare path for blocks whose
/// sums overflow the element type. Non-finite inputs stay non-finite.
#[cold]
#[inline(never)]
pub(crate) fn sums_f64(n: usize, pair: impl Fn(usize) -> (f64, f64), center: f64) -> GradSums {
    let mut out = GradSums::default();
    for i in 0..n {
        let (x, dy) = pair(i);
        out.dy += dy;
        out.dy_xc += dy * (x - center);
    }
    out
}

/// The sums of `count` runs of `len` values, run `i` being `run(i)`, around the center `hi`:
/// short runs grouped into blocks, long ones cut into them, as
/// [`super::stats::moments_runs`].
#[inline(always)]
pub(crate) fn grad_sums_runs<'a, L: Lanes, const GATED: bool>(
    count: usize,
    len: usize,
    run: impl Fn(usize) -> GradRun<'a, L::Mem>,
    hi: L::Elem,
) -> GradSums {
    // UNROLL accumulators per sum, each adding at most MAX_CHAIN values.
    let block = block_len::<L>().min(UNROLL * MAX_CHAIN * L::WIDTH);
    let mut acc = GradSums::default();
    if len >= block {
        for i in 0..count {
            let g = run(i);
            let len = len.min(g.x.len());
            let mut start = 0;
            while start < len {
                let end = (start + block).min(len);
                let piece = {
                    #[inline(always)]
                    |_| g.range(start..end)
                };
                acc = acc.add(block_sums::<L, GATED>(1, &piece, hi));
                start = end;
            }
        }
        return acc;
    }
    let per_block = runs_per_block::<L, UNROLL>(len, block);
    let mut i = 0;
    while i < count {
        let k = per_block.min(count - i);
        let piece = {
            #[inline(always)]
            |j| run(i + j)
        };
        acc = acc.add(block_sums::<L, GATED>(k, &piece, hi));
        i += k;
    }
    acc
}

/// Adds the sums of rows `rows` of the columns `cols` of the row-major `[_, c]` matrices `x`
/// and `dy` to `out` (one per column), around the per-channel centers `hi`; vectorized across
/// channels as [`super::stats::moments_rows`]. Unlike the statistics, a block is read once
/// here, so it is not streamed in first: measured on Zen 5, doing so made NHWC backward 5% to
/// 20% slower.
#[inline(always)]
pub(crate) fn grad_sums_rows<L: Lanes, const GATED: bool>(
    g: GradRun<'_, L::Mem>,
    c: usize,
    rows: Range<usize>,
    cols: Range<usize>,
    hi: &[L::Elem],
    out: &mut [GradSums],
) {
    if rows.is_empty() || cols.is_empty() {
        return;
    }
    let w = L::WIDTH;
    let mut r0 = rows.start;
    while r0 < rows.end {
        let block = r0..(r0 + MAX_CHAIN).min(rows.end);
        let mut c0 = cols.start;
        while c0 + TILE * w <= cols.end {
            let out = &mut out[c0 - cols.start..];
            grad_tile::<L, TILE, GATED>(g, c, block.clone(), c0, TILE * w, hi, out);
            c0 += TILE * w;
        }
        while c0 < cols.end {
            let width = w.min(cols.end - c0);
            let out = &mut out[c0 - cols.start..];
            grad_tile::<L, 1, GATED>(g, c, block.clone(), c0, width, hi, out);
            c0 += width;
        }
        r0 = block.end;
    }
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn grad_tile<L: Lanes, const K: usize, const GATED: bool>(
    g: GradRun<'_, L::Mem>,
    c: usize,
    rows: Range<usize>,
    c0: usize,
    width: usize,
    hi: &[L::Elem],
    out: &mut [GradSums],
) {
    let w = L::WIDTH;
    let zero = L::splat(L::Elem::ZERO);
    let left = {
        #[inline(always)]
        |j: usize| width - (j * w).min(width)
    };
    let hv = load_tile::<L, K>(hi, c0, width);
    let mut sd = [zero; K];
    let mut sx = [zero; K];
    for r in rows.clone() {
        for j in 0..K {
            let i = r * c + c0 + j * w;
            let (xv, dv) = g.read::<L, GATED>(i, w.min(left(j)), L::Elem::ZERO);
            sd[j] = sd[j].add(dv);
            sx[j] = dv.mul_add(xv.sub(hv[j]), sx[j]);
        }
    }
    let e = L::Elem::ZERO;
    for j in 0..K {
        let (mut a, mut b) = ([e; MAX_WIDTH], [e; MAX_WIDTH]);
        sd[j].store(&mut a);
        sx[j].store(&mut b);
        let lanes = w.min(left(j));
        for (i, o) in out[j * w..][..lanes].iter_mut().enumerate() {
            let (mut sd, mut sx) = (a[i].to_f64(), b[i].to_f64());
            if !(sd.is_finite() && sx.is_finite()) {
                // Sums beyond the element type's range: this channel's block again in f64.
                let ch = c0 + j * w + i;
                let at = |r: usize| (rows.start + r) * c + ch;
                let center = hi[ch].to_f64();
                let redo = sums_f64(rows.len(), |r| g.get(at(r)), center);
                (sd, sx) = (redo.dy, redo.dy_xc);
            }
            o.dy += sd;
            o.dy_xc += sx;
        }
    }
}

/// [`BackAffine`] in lanes.
#[derive(Clone, Copy)]
struct BackLanes<L> {
    hi: L,
    a: L,
    b: L,
    c: L,
}

impl<L: Lanes> BackLanes<L> {
    #[inline(always)]
    fn splat(p: BackAffine<L::Elem>) -> Self {
        BackLanes {
            hi: L::splat(p.hi),
            a: L::splat(p.a),
            b: L::splat(p.b),
            c: L::splat(p.c),
        }
    }

    /// The coefficients of the `n` channels from `c0` (zeros past `n < WIDTH`).
    #[inline(always)]
    fn load(p: &ChannelBack<'_, L::Elem>, c0: usize, n: usize) -> Self {
        BackLanes {
            hi: load_upto(p.hi, c0, n),
            a: load_upto(p.a, c0, n),
            b: load_upto(p.b, c0, n),
            c: load_upto(p.c, c0, n),
        }
    }

    /// `a * dy + b * (x - hi) + c`.
    #[inline(always)]
    fn dx(&self, xv: L, dv: L) -> L {
        dv.mul_add(self.a, xv.sub(self.hi).mul_add(self.b, self.c))
    }
}

impl<L: Lanes> RunMap<L, (L, L)> for BackLanes<L> {
    #[inline(always)]
    fn map(&self, (x, dy): (L, L)) -> L {
        self.dx(x, dy)
    }
}

/// [`Grad`] as [`RunIo`]: reads `x` and the gradient `dz` (gated with `GATED`), writes `dx`.
pub(crate) struct GradIo<'g, 'a, D, const GATED: bool>(pub &'g mut Grad<'a, D>);

impl<L: Lanes, const GATED: bool> RunIo<L> for GradIo<'_, '_, L::Mem, GATED> {
    type In = (L, L);
    #[inline(always)]
    fn read(&self, i: usize) -> (L, L) {
        self.0.inputs().read::<L, GATED>(i, L::WIDTH, L::Elem::ZERO)
    }
    #[inline(always)]
    fn write(&mut self, i: usize, v: L, stream: bool) {
        let out = &mut self.0.dx[i..i + L::WIDTH];
        if stream {
            v.write_stream(out)
        } else {
            v.write(out)
        }
    }
    #[inline(always)]
    fn map_whole<M: RunMap<L, (L, L)>>(&mut self, at: usize, len: usize, f: &M) {
        let w = L::WIDTH;
        let g = self.0.inputs().at(at, len);
        let stream = self.0.stream;
        let dx = self.0.dx[at..at + len].chunks_exact_mut(w);
        let inputs = g.x.chunks_exact(w).zip(g.dy.chunks_exact(w));
        // Four loops rather than a test per vector: streaming or not, gated or not.
        if GATED {
            let vectors = inputs.zip(g.y.chunks_exact(w)).zip(dx);
            for (((x, dy), y), out) in vectors {
                let v = f.map((L::read(x), L::read(dy).relu_grad(L::read(y))));
                if stream {
                    v.write_stream(out)
                } else {
                    v.write(out)
                }
            }
        } else if stream {
            for ((x, dy), out) in inputs.zip(dx) {
                f.map((L::read(x), L::read(dy))).write_stream(out);
            }
        } else {
            for ((x, dy), out) in inputs.zip(dx) {
                f.map((L::read(x), L::read(dy))).write(out);
            }
        }
    }
    #[inline(always)]
    fn streams(&self) -> bool {
        self.0.stream
    }
    #[inline(always)]
    fn output_at(&self, i: usize) -> *const L::Mem {
        self.0.dx[i..].as_ptr()
    }
}

/// `dx` for consecutive runs of `s` values (NCHW), run `r` with `params(r)`.
#[inline(always)]
pub(crate) fn backward_runs<L: Lanes, const GATED: bool>(
    g: &mut Grad<'_, L::Mem>,
    s: usize,
    params: impl FnMut(usize) -> BackAffine<L::Elem>,
) {
    let runs = g.dx.len().checked_div(s).unwrap_or(0);
    backward_group::<L, GATED>(g, 0, s, runs, params);
    if g.stream {
        super::store_fence();
    }
}

/// `dx` for the `count` consecutive runs of `s` values of `g` from `start`, run `j` with
/// `params(j)` (called once per run, in order): [`map_runs`] when runs are at least a vector
/// long. The caller fences streaming stores ([`super::store_fence`]) once it is done.
#[inline(always)]
pub(crate) fn backward_group<L: Lanes, const GATED: bool>(
    g: &mut Grad<'_, L::Mem>,
    start: usize,
    s: usize,
    count: usize,
    mut params: impl FnMut(usize) -> BackAffine<L::Elem>,
) {
    if s >= L::WIDTH {
        let mut io = GradIo::<_, GATED>(g);
        map_runs::<L, _, _>(
            &mut io,
            start,
            s,
            count,
            #[inline(always)]
            |j| BackLanes::<L>::splat(params(j)),
        );
        return;
    }
    for j in 0..count {
        let at = start + j * s;
        let f = BackLanes::<L>::splat(params(j));
        let (x, dz) = g.inputs().read::<L, GATED>(at, s, L::Elem::ZERO);
        f.dx(x, dz).write_partial(&mut g.dx[at..at + s]);
    }
}

/// `dx` for whole rows of `c` channels (NHWC), in the pieces of [`row_pieces`] with `p`
/// rotated by `rotation` (0: not rotated).
#[inline(always)]
pub(crate) fn backward_rows<L: Lanes, const GATED: bool>(
    g: &mut Grad<'_, L::Mem>,
    c: usize,
    p: &ChannelBack<'_, L::Elem>,
    rotation: usize,
) {
    if g.stream {
        backward_pieces::<L, GATED, true>(g, c, p, rotation);
        super::store_fence();
    } else {
        backward_pieces::<L, GATED, false>(g, c, p, rotation);
    }
}

/// [`backward_rows`], streaming with `STREAM`.
#[inline(always)]
fn backward_pieces<L: Lanes, const GATED: bool, const STREAM: bool>(
    g: &mut Grad<'_, L::Mem>,
    c: usize,
    p: &ChannelBack<'_, L::Elem>,
    rotation: usize,
) {
    let w = L::WIDTH;
    // A tail shorter than a vector ([`row_tail`]): an overlapping last vector unless
    // streaming (`dx` is written, never read, so the overlap recomputes the same values).
    let tail = {
        #[inline(always)]
        |first: usize, n: usize| match row_tail(n, w, !STREAM) {
            Some((c0, m)) => Some((c0, m, BackLanes::<L>::load(p, first + c0, m))),
            None => None,
        }
    };
    // The tail of a whole row, made once: most pieces are whole rows.
    let row_tail = tail(0, c);
    let pieces = row_pieces(g.dx.len(), c, rotation);
    let rows = (0..pieces.rows).map(
        #[inline(always)]
        |r| (pieces.start + r * c, c, 0),
    );
    for (start, n, first) in rows.chain(pieces.head).chain(pieces.tail) {
        let inputs = g.inputs().at(start, n);
        let dx = &mut g.dx[start..start + n];
        let full = n - n % w;
        let (hi, a) = (chunks(p.hi, first, full, w), chunks(p.a, first, full, w));
        let params = (hi.zip(a)).zip(chunks(p.b, first, full, w).zip(chunks(p.c, first, full, w)));
        for (j, (((hi, a), (b, c)), out)) in params.zip(dx.chunks_exact_mut(w)).enumerate() {
            let f = BackLanes {
                hi: L::load(hi),
                a: L::load(a),
                b: L::load(b),
                c: L::load(c),
            };
            let (x, dz) = inputs.read::<L, GATED>(j * w, w, L::Elem::ZERO);
            if STREAM {
                f.dx(x, dz).write_stream(out);
            } else {
                f.dx(x, dz).write(out);
            }
        }
        let tail = if (first, n) == (0, c) {
            row_tail
        } else {
            tail(first, n)
        };
        if let Some((c0, m, f)) = tail {
            let (x, dz) = inputs.read::<L, GATED>(c0, m, L::Elem::ZERO);
            if m == w {
                f.dx(x, dz).write(&mut dx[c0..]);
            } else {
                f.dx(x, dz).write_partial(&mut dx[c0..]);
            }
        }
    }
}

/// [`grad_sums_runs`] as a kernel: the sums of `count` runs of `len` values, run `i` being
/// `run(i)`, around `hi`; `gated` when the runs carry a fused ReLU's output.
pub(crate) struct GradSumsRuns<T, F> {
    pub count: usize,
    pub len: usize,
    pub run: F,
    pub hi: T,
    pub gated: bool,
}

impl<'a, D: Data, F: Fn(usize) -> GradRun<'a, D>> WithSimd for GradSumsRuns<D::Param, F> {
    type Output = GradSums;
    #[inline(always)]
    fn with_simd<S: Simd>(self, _: S) -> GradSums {
        let GradSumsRuns {
            count,
            len,
            run,
            hi,
            gated,
        } = self;
        if gated {
            grad_sums_runs::<D::Lanes<S>, true>(count, len, run, hi)
        } else {
            grad_sums_runs::<D::Lanes<S>, false>(count, len, run, hi)
        }
    }
}

/// [`grad_sums_rows`] as a kernel: rows `rows`, columns `cols` of the `[_, c]` matrices of `g`
/// added to `out`, around the centres `hi`.
pub(crate) struct GradSumsRows<'a, D: Data> {
    pub g: GradRun<'a, D>,
    pub c: usize,
    pub rows: Range<usize>,
    pub cols: Range<usize>,
    pub hi: &'a [D::Param],
    pub out: &'a mut [GradSums],
}

impl<D: Data> WithSimd for GradSumsRows<'_, D> {
    type Output = ();
    #[inline(always)]
    fn with_simd<S: Simd>(self, _: S) {
        let GradSumsRows {
            g,
            c,
            rows,
            cols,
            hi,
            out,
        } = self;
        if g.y.is_empty() {
            grad_sums_rows::<D::Lanes<S>, false>(g, c, rows, cols, hi, out)
        } else {
            grad_sums_rows::<D::Lanes<S>, true>(g, c, rows, cols, hi, out)
        }
    }
}

/// The `n / w` vectors of `v` from `first`.
#[inline(always)]
fn chunks<T>(v: &[T], first: usize, n: usize, w: usize) -> std::slice::ChunksExact<'_, T> {
    v[first..first + n].chunks_exact(w)
}

/// [`backward_runs`] as a kernel: `dx` of runs of `s` values, run `r` with `params(r)`.
pub(crate) struct BackwardRuns<'g, 'a, D, F> {
    pub g: &'g mut Grad<'a, D>,
    pub s: usize,
    pub params: F,
}

impl<D: Data, F: FnMut(usize) -> BackAffine<D::Param>> WithSimd for BackwardRuns<'_, '_, D, F> {
    type Output = ();
    #[inline(always)]
    fn with_simd<S: Simd>(self, _: S) {
        if self.g.y.is_empty() {
            backward_runs::<D::Lanes<S>, false>(self.g, self.s, self.params)
        } else {
            backward_runs::<D::Lanes<S>, true>(self.g, self.s, self.params)
        }
    }
}

/// [`backward_rows`] as a kernel: `dx` of rows of `c` channels.
pub(crate) struct BackwardRows<'g, 'a, 'p, D: Data> {
    pub g: &'g mut Grad<'a, D>,
    pub c: usize,
    pub p: &'p ChannelBack<'p, D::Param>,
    /// The rotation of `p` ([`row_pieces`]).
    pub rotation: usize,
}

impl<D: Data> WithSimd for BackwardRows<'_, '_, '_, D> {
    type Output = ();
    #[inline(always)]
    fn with_simd<S: Simd>(self, _: S) {
        if self.g.y.is_empty() {
            backward_rows::<D::Lanes<S>, false>(self.g, self.c, self.p, self.rotation)
        } else {
            backward_rows::<D::Lanes<S>, true>(self.g, self.c, self.p, self.rotation)
        }
    }
}
