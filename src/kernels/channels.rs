//! Training and backward over NCHW a group of channels at a time, fused: a task owns some
//! consecutive channels, reduces them, computes their parameters, and maps them while their
//! data is still in cache (the group is sized for that by the caller).
//!
//! A group's data is `n` spans, one per image, each holding the group's runs of `s` values
//! side by side. Reading and writing them span by span keeps memory access in long
//! sequential stretches, where a channel-by-channel order would jump between runs of a few
//! KiB each (7x7 to 28x28 activations) and defeat the prefetchers.
//!
//! The per-channel work is arranged to overlap: one kernel entry for the whole group, the
//! reductions of all its channels first, then their parameters (independent iterations, so
//! the divisions and square roots of one channel overlap those of the next), then the maps.
//! With one image, channels that fit in L1 go in sub-groups of one statistics block.

use super::backward::{
    backward_group, grad_sums_runs, sums_f64, BackAffine, GradLanes, GradRun, GradSums, UNROLL,
};
use super::buffers::{Buffers, Grad, LanesOf, Param};
use super::lanes::Lanes;
use super::normalize::{normalize_group, Affine};
use super::simd::{Simd, WithSimd};
use super::stats::{
    block_f64, block_len, fold_pieces, moments_each, Piece, PivotedSum, Reduce, ShiftedSums,
    ACCUMULATORS, MAX_CHAIN,
};
use crate::element::{tiny_squares, Data, Element};
use crate::moments::Moments;

/// The most channels in a group: their parameters live on the stack.
pub(crate) const GROUP: usize = 64;

/// The span of image `i` (every slot is filled by the caller).
#[inline(always)]
fn span<B>(spans: &mut [Option<B>], i: usize) -> &mut B {
    spans[i]
        .as_mut()
        .expect("every image's span of a channel group")
}

/// Channels per L1 sub-group for channels of `s` values.
#[inline(always)]
fn sub_group<L: Lanes>(s: usize) -> usize {
    (block_len::<L>() / s.max(1)).clamp(1, GROUP)
}

/// Reduces each of the `centres.len() <= GROUP` channels of a group over its runs of `s`
/// values in `n` image spans, run `j` of span `i` being `piece(i, j)`, into `out[j]`: span by
/// span (memory order), a run at a time into `K` accumulators that are then added to the
/// channel's own, whose lanes move to `f64` every few spans (each lane adds at most
/// [`MAX_CHAIN`] values; a run longer than that, in parts). `centres[j]` is channel `j`'s
/// reduction with no sums yet. One horizontal sum per channel, not one per run: a 7x7 run is
/// 49 values.
///
/// With `AHEAD`, each run prefetches the same channel's run in the next image, a jump away in
/// memory that the hardware prefetchers do not follow. Measured on Zen 5, one thread: the
/// statistics of 256x64x56x56 `f16` training 1.25x faster with it, `f32` unchanged; backward
/// (two tensors) 10% slower with it in `f32`, so it does not ask.
#[inline(always)]
fn fold_spans<'a, L: Lanes, A: Reduce<L> + 'a, const K: usize, const AHEAD: bool>(
    n: usize,
    s: usize,
    piece: &impl Fn(usize, usize) -> A::Piece<'a>,
    centres: &[A],
    out: &mut [[f64; 2]],
) {
    let count = centres.len().min(GROUP);
    let Some(&first) = centres.first() else {
        return;
    };
    out[..count].fill([0.0; 2]);
    let per_run = s.div_ceil(L::WIDTH).div_ceil(K) + 1;
    if per_run > MAX_CHAIN {
        // A run alone is longer than a chain: each run in parts of `MAX_CHAIN` values a lane,
        // each part's sums moved to `f64`. (Before, a whole run went into the lanes: 1260
        // values a lane for runs of 5037 on the scalar path, whose `f32` sums then gave an
        // `f16` channel's variance 1.6e-5 too small, against a few 1e-7.)
        let part = MAX_CHAIN * K * L::WIDTH;
        for i in 0..n {
            for (j, (o, c)) in out[..count].iter_mut().zip(centres).enumerate() {
                if AHEAD && i + 1 < n {
                    piece(i + 1, j).prefetch();
                }
                let (parts, rest) = piece(i, j).chunks_exact(part);
                for p in parts.chain(std::iter::once(rest)) {
                    let piece = {
                        #[inline(always)]
                        |_| p
                    };
                    let [u, v] = fold_pieces::<L, A, K>(1, &piece, c.empty()).sums();
                    *o = [o[0] + u, o[1] + v];
                }
            }
        }
        return;
    }
    let per_flush = MAX_CHAIN / per_run;
    let mut acc = [first; GROUP];
    let mut i = 0;
    while i < n {
        let spans = i..(i + per_flush).min(n);
        for (a, c) in acc.iter_mut().zip(&centres[..count]) {
            *a = c.empty();
        }
        for i in spans.clone() {
            for (j, a) in acc[..count].iter_mut().enumerate() {
                if AHEAD && i + 1 < n {
                    piece(i + 1, j).prefetch();
                }
                let one = {
                    #[inline(always)]
                    |_| piece(i, j)
                };
                let run = fold_pieces::<L, A, K>(1, &one, a.empty());
                *a = a.merge(run);
            }
        }
        for (o, a) in out.iter_mut().zip(&acc[..count]) {
            let [u, v] = a.sums();
            *o = [o[0] + u, o[1] + v];
        }
        i = spans.end;
    }
}

/// The moments of each of the `out.len() <= GROUP` channels of a group over `spans.len() > 1`
/// image spans, with the whole channel as the statistics block (the group fits in L2), in one
/// read where it can: each channel's centre `k` is the rounded mean of its run in the first
/// image (a short read, which the main one then finds in cache), and `Σ (x - k)`, `Σ (x - k)²`
/// read span by span ([`fold_spans`]) give the moments directly when the channel's mean lies
/// within a standard deviation of `k` (then `Σ (x - k)² - (Σ (x - k))² / n` loses at most a
/// factor of two to cancellation, as for NHWC's later blocks; the first run's mean estimates
/// the channel's, so this is the rule). Otherwise (data that drifts from image to image, or
/// non-finite sums) a second read around the mean found, as a statistics block does.
/// Measured on Zen 5, one thread: 32x64x56x56 NCHW training 1.2x faster than with two reads
/// (`f32`), 1.3x (`f16`).
///
/// `image(i)` is image `i`'s span of the group (`out.len()` runs). With `AHEAD`, each run
/// asks for the next image's ([`fold_spans`]): training does, the statistics alone do not
/// (measured on Zen 5, one thread, the statistics alone: 256x64x56x56 7.8 -> 6.5 ms without,
/// 32x2048x7x7 0.32 -> 0.26 ms, 32x256x28x28 unchanged within noise).
#[inline(always)]
fn group_moments<'a, L: Lanes + 'a, const AHEAD: bool>(
    n: usize,
    image: impl Fn(usize) -> &'a [L::Mem],
    s: usize,
    out: &mut [Moments],
) {
    let count = out.len().min(GROUP);
    let run = {
        #[inline(always)]
        |i: usize, j: usize| &image(i)[j * s..][..s]
    };
    let mut centres = [ShiftedSums::<L>::around(L::Elem::ZERO); GROUP];
    for (j, c) in centres[..count].iter_mut().enumerate() {
        let first = run(0, j);
        let p = first[0].to_param();
        let piece = {
            #[inline(always)]
            |_| first
        };
        let sum = fold_pieces::<L, _, ACCUMULATORS>(1, &piece, PivotedSum::around(p));
        *c = ShiftedSums::around(L::Elem::from_f64(p.to_f64() + sum.sums()[0] / s as f64));
    }
    let mut sums = [[0.0; 2]; GROUP];
    fold_spans::<L, _, ACCUMULATORS, AHEAD>(n, s, &run, &centres[..count], &mut sums);
    let values = n * s;
    for (j, o) in out[..count].iter_mut().enumerate() {
        let [mut s1, mut s2] = sums[j];
        // (Σd)² / n <= Σd² / 2 says (mean - k)² <= variance; NaN fails it.
        let near = 2.0 * s1 * s1 <= values as f64 * s2;
        if !near {
            let k = centres[j].centre.to_f64() + s1 / values as f64;
            centres[j] = ShiftedSums::around(L::Elem::from_f64(k));
            let mut again = [[0.0; 2]];
            fold_spans::<L, _, ACCUMULATORS, AHEAD>(
                n,
                s,
                &{
                    #[inline(always)]
                    |i, _| run(i, j)
                },
                &centres[j..=j],
                &mut again,
            );
            [s1, s2] = again[0];
        }
        *o = if tiny_squares::<L::Elem>(values, s1, s2) {
            block_f64(n, |i| run(i, j))
        } else {
            Moments::from_shifted_sums(values as u64, centres[j].centre.to_f64(), s1, s2)
        };
    }
}

/// Training's forward pass over a group of `out.len() <= GROUP` channels of `s` values per
/// image, the first being channel `first`, in `spans` (one per image): `out[j]` gets channel
/// `first + j`'s moments, and the channel is normalized with `finish(first + j, &out[j])`.
#[inline(always)]
pub(crate) fn train_channels<L: Lanes, B: Buffers<Data = L::Mem>>(
    spans: &mut [Option<B>],
    s: usize,
    first: usize,
    finish: &impl Fn(usize, &Moments) -> Affine<L::Elem>,
    out: &mut [Moments],
) {
    let mut params = [Affine::default(); GROUP];
    if spans.len() == 1 {
        // One image: sub-groups that fit in L1, each reduced, finished and mapped in turn.
        let buf = span(spans, 0);
        let sub = sub_group::<L>(s);
        for (g, moments) in out.chunks_mut(sub).enumerate() {
            let at = g * sub;
            moments_each::<L>(&buf.input()[at * s..][..moments.len() * s], s, moments);
            for (j, (p, m)) in params.iter_mut().zip(moments.iter()).enumerate() {
                *p = finish(first + at + j, m);
            }
            normalize_group::<L, B>(buf, at * s, s, &params[..moments.len()]);
        }
    } else {
        let image = {
            #[inline(always)]
            |i: usize| spans[i].as_ref().expect("every image's span").input()
        };
        group_moments::<L, true>(spans.len(), image, s, out);
        for (j, (p, m)) in params.iter_mut().zip(out.iter()).enumerate() {
            *p = finish(first + j, m);
        }
        // A residual is read in short stretches (the group's runs of each image), which the
        // hardware prefetchers do not follow from one to the next: the first image's is asked
        // for here, and each image's read asks for the next one's line by line (the caller
        // set [`Buffers::epilogue_read_ahead`]). Measured on Zen 5, one thread, against asking
        // for each next image's stretch at once before its map: 32x64x56x56 NCHW training
        // with residual and ReLU 2.7 -> 1.9 ms, 8x32x224x224 6.5 -> 5.3 ms.
        span(spans, 0).prefetch_epilogue();
        for i in 0..spans.len() {
            normalize_group::<L, B>(span(spans, i), 0, s, &params[..out.len()]);
        }
    }
    if spans
        .iter()
        .any(|b| b.as_ref().is_some_and(|b| b.streaming()))
    {
        super::store_fence();
    }
}

/// The backward pass over a group of `out.len() <= GROUP` channels of `s` values per image,
/// the first being channel `first`, in `spans` (one per image): `out[j]` gets channel
/// `first + j`'s sums around `center(first + j)`, and its `dx` is written with
/// `finish(first + j, out[j])`.
#[inline(always)]
pub(crate) fn backward_channels<L: Lanes, const GATED: bool>(
    spans: &mut [Option<Grad<'_, L::Mem>>],
    s: usize,
    first: usize,
    center: &impl Fn(usize) -> L::Elem,
    finish: &impl Fn(usize, GradSums) -> BackAffine<L::Elem>,
    out: &mut [GradSums],
) {
    let mut params = [BackAffine::default(); GROUP];
    let mut centers = [L::Elem::default(); GROUP];
    for (j, c) in centers[..out.len()].iter_mut().enumerate() {
        *c = center(first + j);
    }
    // One image: sub-groups that fit in L1; more: the whole group, span by span.
    let n = spans.len();
    let sub = if n == 1 { sub_group::<L>(s) } else { GROUP };
    for (g, sums) in out.chunks_mut(sub).enumerate() {
        let at = g * sub;
        if n == 1 {
            let inputs = span(spans, 0).inputs();
            for (j, o) in sums.iter_mut().enumerate() {
                let run = inputs.at((at + j) * s, s);
                *o = grad_sums_runs::<L, GATED>(
                    1,
                    s,
                    #[inline(always)]
                    |_| run,
                    centers[at + j],
                );
            }
        } else {
            let runs = at * s..(at + sums.len()) * s;
            let image = {
                #[inline(always)]
                |i: usize| {
                    let grad = spans[i].as_ref().expect("every image's span");
                    grad.inputs().range(runs.clone())
                }
            };
            group_grad_sums::<L, GATED>(n, image, s, &centers[at..at + sums.len()], sums);
        }
        for (j, (p, o)) in params.iter_mut().zip(sums.iter()).enumerate() {
            *p = finish(first + at + j, *o);
        }
        for i in 0..spans.len() {
            let p = &params[..sums.len()];
            backward_group::<L, GATED>(
                span(spans, i),
                at * s,
                s,
                p.len(),
                #[inline(always)]
                |j| p[j],
            );
        }
    }
    if spans.iter().any(|g| g.as_ref().is_some_and(|g| g.stream)) {
        super::store_fence();
    }
}

/// The backward's sums of each of the `out.len() <= GROUP` channels of a group around
/// `centers[j]`, over `n > 1` image spans (`image(i)`: the group's runs of `s` values in
/// image `i`), read span by span. A channel whose `f32` sums overflow is summed again in
/// `f64`.
#[inline(always)]
fn group_grad_sums<'a, L: Lanes + 'a, const GATED: bool>(
    n: usize,
    image: impl Fn(usize) -> GradRun<'a, L::Mem>,
    s: usize,
    centers: &[L::Elem],
    out: &mut [GradSums],
) {
    let count = out.len().min(GROUP);
    let run = {
        #[inline(always)]
        |i: usize, j: usize| image(i).at(j * s, s)
    };
    let mut lanes = [GradLanes::<L, GATED>::around(L::Elem::ZERO); GROUP];
    for (l, &c) in lanes.iter_mut().zip(&centers[..count]) {
        *l = GradLanes::around(c);
    }
    let mut total = [[0.0; 2]; GROUP];
    fold_spans::<L, _, UNROLL, false>(n, s, &run, &lanes[..count], &mut total);
    for (j, (o, [dy, dy_xc])) in out[..count].iter_mut().zip(total).enumerate() {
        *o = GradSums { dy, dy_xc };
        if !(dy.is_finite() && dy_xc.is_finite()) {
            // Sums beyond the element type's range: this channel again in f64.
            let centre = centers[j].to_f64();
            *o = (0..n).fold(GradSums::default(), |acc, i| {
                let g = run(i, j);
                acc.add(sums_f64(s, |e| g.get(e), centre))
            });
        }
    }
}

/// [`group_grad_sums`] as a kernel: the sums alone, of the group of `out.len()` channels
/// from `first` over `spans` (one per image, `n > 1`), around `center(channel)`.
pub(crate) struct GradSumsChannels<'s, 'a, 'f, D, C> {
    pub spans: &'s [Option<GradRun<'a, D>>],
    pub s: usize,
    pub first: usize,
    pub center: &'f C,
    pub out: &'s mut [GradSums],
}

impl<D: Data, C: Fn(usize) -> D::Param> WithSimd for GradSumsChannels<'_, '_, '_, D, C> {
    type Output = ();
    #[inline(always)]
    fn with_simd<S: Simd>(self, _: S) {
        let GradSumsChannels {
            spans,
            s,
            first,
            center,
            out,
        } = self;
        let mut centers = [D::Param::default(); GROUP];
        for (j, c) in centers[..out.len().min(GROUP)].iter_mut().enumerate() {
            *c = center(first + j);
        }
        let image = {
            #[inline(always)]
            |i: usize| spans[i].expect("every image's span")
        };
        let centers = &centers[..out.len().min(GROUP)];
        if spans.iter().any(|g| g.is_some_and(|g| !g.y.is_empty())) {
            group_grad_sums::<D::Lanes<S>, true>(spans.len(), image, s, centers, out)
        } else {
            group_grad_sums::<D::Lanes<S>, false>(spans.len(), image, s, centers, out)
        }
    }
}

/// The moments of a group of `out.len() <= GROUP` channels of `s` values per image in
/// `spans` (one per image, `n > 1`): the statistics alone, read span by span in memory order.
pub(crate) struct MomentsChannels<'s, 'a, D> {
    pub spans: &'s [Option<&'a [D]>],
    pub s: usize,
    pub out: &'s mut [Moments],
}

impl<D: Data> WithSimd for MomentsChannels<'_, '_, D> {
    type Output = ();
    #[inline(always)]
    fn with_simd<S: Simd>(self, _: S) {
        let MomentsChannels { spans, s, out } = self;
        let image = {
            #[inline(always)]
            |i: usize| spans[i].expect("every image's span")
        };
        group_moments::<D::Lanes<S>, false>(spans.len(), image, s, out)
    }
}

/// [`train_channels`] as a kernel.
pub(crate) struct TrainChannels<'s, 'f, B, F> {
    pub spans: &'s mut [Option<B>],
    pub s: usize,
    pub first: usize,
    pub finish: &'f F,
    pub out: &'s mut [Moments],
}

impl<B: Buffers, F: Fn(usize, &Moments) -> Affine<Param<B>>> WithSimd
    for TrainChannels<'_, '_, B, F>
{
    type Output = ();
    #[inline(always)]
    fn with_simd<S: Simd>(self, _: S) {
        train_channels::<LanesOf<B, S>, B>(self.spans, self.s, self.first, self.finish, self.out)
    }
}

/// [`backward_channels`] as a kernel.
pub(crate) struct BackwardChannels<'s, 'a, 'f, D, C, F> {
    pub spans: &'s mut [Option<Grad<'a, D>>],
    pub s: usize,
    pub first: usize,
    pub center: &'f C,
    pub finish: &'f F,
    pub out: &'s mut [GradSums],
}

impl<D, C, F> WithSimd for BackwardChannels<'_, '_, '_, D, C, F>
where
    D: Data,
    C: Fn(usize) -> D::Param,
    F: Fn(usize, GradSums) -> BackAffine<D::Param>,
{
    type Output = ();
    #[inline(always)]
    fn with_simd<S: Simd>(self, _: S) {
        let BackwardChannels {
            spans,
            s,
            first,
            center,
            finish,
            out,
        } = self;
        let gated = spans
            .iter()
            .any(|g| g.as_ref().is_some_and(|g| !g.y.is_empty()));
        if gated {
            backward_channels::<D::Lanes<S>, true>(spans, s, first, center, finish, out)
        } else {
            backward_channels::<D::Lanes<S>, false>(spans, s, first, center, finish, out)
        }
    }
}
