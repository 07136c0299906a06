//! Moments in one pass over memory.
//!
//! A per-element Welford update is a chain of dependent divisions, bound by latency. Instead the
//! data is cut into blocks that fit in L1; each block is read twice, which costs one pass over
//! memory: first its sum (several independent accumulators), giving a rounded block mean `k`,
//! then `Σ (x - k)` and `Σ (x - k)²`. Near `k` the subtraction is exact, so a huge common offset
//! costs no precision, and the sums correct for the rounding of `k` itself
//! ([`Moments::from_shifted_sums`]). Blocks merge in `f64` with Chan's formula.

use super::lanes::Lanes;
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

/// Folds `x` vector by vector into `K` independent accumulators (so consecutive additions do
/// not wait on each other), padding the last partial vector with `fill`.
#[inline(always)]
fn fold<L: Lanes, A: Copy, const K: usize>(
    x: &[L::Elem],
    fill: L::Elem,
    init: A,
    step: impl Fn(A, L) -> A,
    combine: impl Fn(A, A) -> A,
) -> A {
    let w = L::WIDTH;
    let mut acc = [init; K];
    let mut chunks = x.chunks_exact(K * w);
    for chunk in &mut chunks {
        for (k, a) in acc.iter_mut().enumerate() {
            *a = step(*a, L::load(&chunk[k * w..]));
        }
    }
    let mut vectors = chunks.remainder().chunks_exact(w);
    for v in &mut vectors {
        acc[0] = step(acc[0], L::load(v));
    }
    let tail = vectors.remainder();
    if !tail.is_empty() {
        acc[1 % K] = step(acc[1 % K], L::load_partial(tail, fill));
    }
    acc.into_iter().reduce(combine).unwrap_or(init)
}

/// `Σ (x - p)` in lanes; padding lanes hold `p`.
#[inline(always)]
fn pivoted_sum<L: Lanes>(x: &[L::Elem], p: L::Elem) -> L::Elem {
    let (zero, pv) = (L::splat(L::Elem::ZERO), L::splat(p));
    fold::<L, L, 4>(x, p, zero, |a, v| a.add(v.sub(pv)), |a, b| a.add(b)).sum()
}

/// `(Σ (x - k), Σ (x - k)²)` in lanes; padding lanes hold `k` and so add nothing.
#[inline(always)]
fn shifted_sums<L: Lanes>(x: &[L::Elem], k: L::Elem) -> (L::Elem, L::Elem) {
    let zero = L::splat(L::Elem::ZERO);
    let kv = L::splat(k);
    let (s1, s2) = fold::<L, (L, L), 4>(
        x,
        k,
        (zero, zero),
        |(s1, s2), v| {
            let d = v.sub(kv);
            (s1.add(d), d.mul_add(d, s2))
        },
        |(a1, a2), (b1, b2)| (a1.add(b1), a2.add(b2)),
    );
    (s1.sum(), s2.sum())
}

/// The moments of a block given as `pieces` (which together fit in L1).
///
/// The first read sums `x - p` around the block's first value `p`, so the rounded block mean
/// `k = p + Σ (x - p) / n` is accurate to a small fraction of the spread even when the offset
/// is 1e6 spreads (summing `x` itself would leave `k` several spreads off).
#[inline(always)]
fn block<L: Lanes>(pieces: &[&[L::Elem]]) -> Moments {
    let count: usize = pieces.iter().map(|p| p.len()).sum();
    let Some(&p) = pieces.iter().find_map(|piece| piece.first()) else {
        return Moments::EMPTY;
    };
    let total: f64 = pieces.iter().map(|x| pivoted_sum::<L>(x, p).to_f64()).sum();
    let k = L::Elem::from_f64(p.to_f64() + total / count as f64);
    let (mut s1, mut s2) = (0.0, 0.0);
    for x in pieces {
        let (a, b) = shifted_sums::<L>(x, k);
        s1 += a.to_f64();
        s2 += b.to_f64();
    }
    Moments::from_shifted_sums(count as u64, k.to_f64(), s1, s2)
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
            for piece in run(i).chunks(block_len) {
                acc = acc.merge(block::<L>(&[piece]));
            }
        }
        return acc;
    }
    // Up to this many short runs form one block; a fixed array keeps this allocation-free.
    const GROUP: usize = 64;
    let per_block = (block_len / len.max(1)).clamp(1, GROUP);
    let mut pieces: [&[L::Elem]; GROUP] = [&[]; GROUP];
    let mut i = 0;
    while i < count {
        let k = per_block.min(count - i);
        for (j, p) in pieces[..k].iter_mut().enumerate() {
            *p = run(i + j);
        }
        acc = acc.merge(block::<L>(&pieces[..k]));
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
    let load = |r: usize, j: usize, fill| {
        let lo = r * c + c0 + j * w;
        let hi = r * c + c0 + width;
        if lo + w <= hi {
            L::load(&x[lo..])
        } else {
            L::load_partial(&x[lo..hi], fill)
        }
    };
    let rows_per_block = (block_len::<L::Elem>() / width).max(1);
    let mut r0 = rows.start;
    while r0 < rows.end {
        let r1 = (r0 + rows_per_block).min(rows.end);
        // First read: sums around the block's first row, as in `block`.
        let pivots: [L; K] = std::array::from_fn(|j| load(r0, j, zero));
        let mut sums = [L::splat(zero); K];
        for r in r0..r1 {
            for (j, s) in sums.iter_mut().enumerate() {
                *s = s.add(load(r, j, zero).sub(pivots[j]));
            }
        }
        let inv = L::splat(L::Elem::from_f64(1.0 / (r1 - r0) as f64));
        let means: [L; K] = std::array::from_fn(|j| sums[j].mul_add(inv, pivots[j]));
        let mut s1 = [L::splat(zero); K];
        let mut s2 = [L::splat(zero); K];
        for r in r0..r1 {
            for j in 0..K {
                let d = load(r, j, zero).sub(means[j]);
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
