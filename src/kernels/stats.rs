//! Moments in one pass over memory.
//!
//! A per-element Welford update is a chain of dependent divisions, bound by latency. Instead the
//! data is cut into blocks that fit in L1; each block is read twice, which costs one pass over
//! memory: first its sum (several independent accumulators), giving a rounded block mean `k`,
//! then `Σ (x - k)` and `Σ (x - k)²`. Near `k` the subtraction is exact, so a huge common offset
//! costs no precision, and the sums correct for the rounding of `k` itself
//! ([`Moments::from_shifted_sums`]). Blocks merge in `f64` with Chan's formula.

use super::lanes::{load_upto, Lanes};
use crate::element::Element;
use crate::moments::Moments;
use std::ops::Range;

/// Bytes of input one block covers: half of a 32 KiB L1, so the second read hits it.
const BLOCK_BYTES: usize = 16 * 1024;

/// Vectors of channels an NHWC tile keeps in registers: 4 accumulators each of 3 kinds.
const TILE: usize = 4;

/// The widest vector any [`Lanes`] has (AVX-512 `f32`: 16), for spilling lanes to the stack.
const MAX_WIDTH: usize = 64;

fn block_len<T>() -> usize {
    BLOCK_BYTES / std::mem::size_of::<T>()
}

/// A reduction over vectors: one step per vector, and the merge of two partial results.
///
/// A trait with `#[inline(always)]` methods rather than closures: a closure the compiler
/// leaves out of line loses the `#[target_feature]` of the entry that called it, and with it
/// the vector instructions (closures cannot be marked `#[inline(always)]` on stable Rust).
/// Everything else that touches lanes is `#[inline(always)]` with plain loops for the same
/// reason.
trait Reduce<L: Lanes>: Copy {
    fn step(self, v: L) -> Self;
    fn merge(self, other: Self) -> Self;
}

/// `Σ (x - p)`.
#[derive(Clone, Copy)]
struct PivotedSum<L> {
    p: L,
    sum: L,
}

impl<L: Lanes> Reduce<L> for PivotedSum<L> {
    #[inline(always)]
    fn step(self, v: L) -> Self {
        PivotedSum {
            sum: self.sum.add(v.sub(self.p)),
            ..self
        }
    }
    #[inline(always)]
    fn merge(self, o: Self) -> Self {
        PivotedSum {
            sum: self.sum.add(o.sum),
            ..self
        }
    }
}

/// `Σ (x - k)` and `Σ (x - k)²`.
#[derive(Clone, Copy)]
struct ShiftedSums<L> {
    k: L,
    s1: L,
    s2: L,
}

impl<L: Lanes> Reduce<L> for ShiftedSums<L> {
    #[inline(always)]
    fn step(self, v: L) -> Self {
        let d = v.sub(self.k);
        ShiftedSums {
            s1: self.s1.add(d),
            s2: d.mul_add(d, self.s2),
            ..self
        }
    }
    #[inline(always)]
    fn merge(self, o: Self) -> Self {
        ShiftedSums {
            s1: self.s1.add(o.s1),
            s2: self.s2.add(o.s2),
            ..self
        }
    }
}

/// Reduces `x` vector by vector into `K` independent accumulators (so consecutive additions
/// do not wait on each other), padding the last partial vector with `fill`.
#[inline(always)]
fn fold<L: Lanes, A: Reduce<L>, const K: usize>(x: &[L::Elem], fill: L::Elem, init: A) -> A {
    let w = L::WIDTH;
    let mut acc = [init; K];
    let mut chunks = x.chunks_exact(K * w);
    for chunk in &mut chunks {
        for k in 0..K {
            acc[k] = acc[k].step(L::load(&chunk[k * w..]));
        }
    }
    let mut vectors = chunks.remainder().chunks_exact(w);
    for v in &mut vectors {
        acc[0] = acc[0].step(L::load(v));
    }
    let tail = vectors.remainder();
    if !tail.is_empty() {
        acc[1 % K] = acc[1 % K].step(L::load_partial(tail, fill));
    }
    let mut total = acc[0];
    for a in &acc[1..] {
        total = total.merge(*a);
    }
    total
}

/// `Σ (x - p)` in lanes; padding lanes hold `p`.
#[inline(always)]
fn pivoted_sum<L: Lanes>(x: &[L::Elem], p: L::Elem) -> L::Elem {
    let init = PivotedSum {
        p: L::splat(p),
        sum: L::splat(L::Elem::ZERO),
    };
    fold::<L, _, 4>(x, p, init).sum.sum()
}

/// `(Σ (x - k), Σ (x - k)²)` in lanes; padding lanes hold `k` and so add nothing.
#[inline(always)]
fn shifted_sums<L: Lanes>(x: &[L::Elem], k: L::Elem) -> (L::Elem, L::Elem) {
    let zero = L::splat(L::Elem::ZERO);
    let init = ShiftedSums {
        k: L::splat(k),
        s1: zero,
        s2: zero,
    };
    let r = fold::<L, _, 4>(x, k, init);
    (r.s1.sum(), r.s2.sum())
}

/// The moments of a block made of `count` pieces, piece `i` being `piece(i)` (together they
/// fit in L1).
///
/// The first read sums `x - p` around the block's first value `p`, so the rounded block mean
/// `k = p + Σ (x - p) / n` is accurate to a small fraction of the spread even when the offset
/// is 1e6 spreads (summing `x` itself would leave `k` several spreads off).
#[inline(always)]
fn block<'a, L: Lanes>(count: usize, piece: impl Fn(usize) -> &'a [L::Elem]) -> Moments {
    let mut n = 0;
    let mut pivot = None;
    for i in 0..count {
        let x = piece(i);
        n += x.len();
        pivot = pivot.or(x.first().copied());
    }
    let Some(p) = pivot else {
        return Moments::EMPTY;
    };
    let mut total = 0.0;
    for i in 0..count {
        total += pivoted_sum::<L>(piece(i), p).to_f64();
    }
    let k = L::Elem::from_f64(p.to_f64() + total / n as f64);
    let (mut s1, mut s2) = (0.0, 0.0);
    for i in 0..count {
        let (a, b) = shifted_sums::<L>(piece(i), k);
        s1 += a.to_f64();
        s2 += b.to_f64();
    }
    Moments::from_shifted_sums(n as u64, k.to_f64(), s1, s2)
}

/// The moments of `count` runs of `len` values each, run `i` being `run(i)`: one channel of an
/// NCHW tensor (or a piece of one). Short runs are grouped and long ones cut so that each block
/// is about [`BLOCK_BYTES`].
#[inline(always)]
pub(crate) fn moments_runs<'a, L: Lanes>(
    count: usize,
    len: usize,
    run: impl Fn(usize) -> &'a [L::Elem],
) -> Moments {
    let block_len = block_len::<L::Elem>();
    let mut acc = Moments::EMPTY;
    if len >= block_len {
        for i in 0..count {
            let x = run(i);
            let mut start = 0;
            while start < len {
                let end = (start + block_len).min(len);
                acc = acc.merge(block::<L>(1, |_| &x[start..end]));
                start = end;
            }
        }
        return acc;
    }
    let per_block = block_len / len.max(1);
    let mut i = 0;
    while i < count {
        let k = per_block.min(count - i);
        acc = acc.merge(block::<L>(k, |j| run(i + j)));
        i += k;
    }
    acc
}

/// Adds the moments of rows `rows` of a row-major `[_, c]` matrix `x` to `out[ch]` for every
/// channel: NHWC data, vectorized across channels (lane `j` holds channel `c0 + j`).
#[inline(always)]
pub(crate) fn moments_rows<L: Lanes>(
    x: &[L::Elem],
    c: usize,
    rows: Range<usize>,
    out: &mut [Moments],
) {
    let w = L::WIDTH;
    let mut c0 = 0;
    while c0 + TILE * w <= c {
        tile::<L, TILE>(x, c, rows.clone(), c0, TILE * w, out);
        c0 += TILE * w;
    }
    while c0 < c {
        let width = w.min(c - c0);
        tile::<L, 1>(x, c, rows.clone(), c0, width, out);
        c0 += width;
    }
}

/// `moments_rows` for the channels `c0 .. c0 + width`, `width <= K * WIDTH` (only the last
/// vector may be partial), a block of rows at a time.
#[inline(always)]
fn tile<L: Lanes, const K: usize>(
    x: &[L::Elem],
    c: usize,
    rows: Range<usize>,
    c0: usize,
    width: usize,
    out: &mut [Moments],
) {
    let w = L::WIDTH;
    let zero = L::Elem::ZERO;
    let rows_per_block = (block_len::<L::Elem>() / width).max(1);
    let mut r0 = rows.start;
    while r0 < rows.end {
        let r1 = (r0 + rows_per_block).min(rows.end);
        // First read: sums around the block's first row, as in `block`.
        let mut pivots = [L::splat(zero); K];
        for j in 0..K {
            pivots[j] = load_upto::<L>(x, r0 * c + c0 + j * w, width - (j * w).min(width));
        }
        let mut sums = [L::splat(zero); K];
        for r in r0..r1 {
            for j in 0..K {
                let v = load_upto::<L>(x, r * c + c0 + j * w, width - (j * w).min(width));
                sums[j] = sums[j].add(v.sub(pivots[j]));
            }
        }
        let inv = L::splat(L::Elem::from_f64(1.0 / (r1 - r0) as f64));
        let mut means = [L::splat(zero); K];
        for j in 0..K {
            means[j] = sums[j].mul_add(inv, pivots[j]);
        }
        let mut s1 = [L::splat(zero); K];
        let mut s2 = [L::splat(zero); K];
        for r in r0..r1 {
            for j in 0..K {
                let v = load_upto::<L>(x, r * c + c0 + j * w, width - (j * w).min(width));
                let d = v.sub(means[j]);
                s1[j] = s1[j].add(d);
                s2[j] = d.mul_add(d, s2[j]);
            }
        }
        for j in 0..K {
            let first = c0 + j * w;
            let n = w.min(c0 + width - first);
            let (mut k, mut a, mut b) = ([zero; MAX_WIDTH], [zero; MAX_WIDTH], [zero; MAX_WIDTH]);
            means[j].store(&mut k);
            s1[j].store(&mut a);
            s2[j].store(&mut b);
            for i in 0..n {
                let m = Moments::from_shifted_sums(
                    (r1 - r0) as u64,
                    k[i].to_f64(),
                    a[i].to_f64(),
                    b[i].to_f64(),
                );
                out[first + i] = out[first + i].merge(m);
            }
        }
        r0 = r1;
    }
}
