//! How a call runs: the layout becomes a plan (channel runs or channel-interleaved rows), the
//! plan becomes work units (a group of channels, a piece of a channel, a block of columns, a
//! span of rows), and the units run on the kernels of the chosen instruction set, on the
//! calling thread or in rayon tasks.
//!
//! Training and backward over NCHW are fused when there are enough channels to keep every
//! thread busy: a task takes a group of consecutive channels (as many as fit in half of L2),
//! reduces them and maps them straight away, so the second read comes from cache
//! ([`channels`]). With fewer channels than that, channels are cut into pieces whose moments
//! are merged (Chan), and the map runs as a second, parallel pass. Rows (NHWC, `(N, C)`)
//! always take two passes, a channel being spread over the whole tensor: their reductions
//! split by blocks of columns or by spans of rows ([`row_pieces`]), their maps by spans of
//! rows. Where streaming stores pay is decided here too ([`Plan::streams`]).

use crate::element::{Data, Element};
use crate::kernels::backward::{
    fill_back, BackAffine, BackwardRows, BackwardRuns, ChannelBack, GradSums, GradSumsRows,
    GradSumsRuns,
};
use crate::kernels::buffers::{
    alike_in_lines, rotated_arrays, rotation_of, Buffers, Grad, Param, Span,
};
use crate::kernels::channels::{
    self, BackwardChannels, GradSumsChannels, MomentsChannels, TrainChannels,
};
use crate::kernels::normalize::{
    fill_affine, Affine, ChannelAffine, NormalizeRows, NormalizeRuns, ROW_PARAM_BYTES,
};
use crate::kernels::simd::{Simd, WithSimd};
use crate::kernels::stats::{MomentsRows, MomentsRuns, PivotSums};
use crate::kernels::{dispatch, Isa};
use crate::moments::Moments;
use crate::parallel::{self, Par};
use crate::shape::{Layout, Shape};
use std::ops::Range;

/// The memory pattern of a tensor, whatever layout it was given in.
#[derive(Clone, Copy, Debug)]
enum Plan {
    /// `n * c` contiguous runs of `s` values, run `i` belonging to channel `i % c` (NCHW).
    Runs { n: usize, c: usize, s: usize },
    /// `rows` rows of `c` values, one per channel (NHWC, and NCHW with `spatial == 1`).
    Rows { rows: usize, c: usize },
}

impl Plan {
    /// Channels per task of the fused NCHW paths of training and backward
    /// ([`channels::train_channels`]): as many as keep a group's data within half of L2 (so
    /// that the map after the reduction reads it from there) and leave four groups a thread,
    /// at most [`channels::GROUP`].
    fn group<T>(self, par: Par) -> usize {
        let Plan::Runs { c, .. } = self else {
            return 1;
        };
        let by_threads = if par.on { c / (4 * par.threads) } else { c };
        (parallel::caches().l2 / 2 / self.channel_bytes::<T>().max(1))
            .min(by_threads)
            .clamp(1, channels::GROUP)
    }

    /// The runs `(n, c, s)` and channels per task of the NCHW statistics and backward sums by
    /// channel groups ([`stats_runs`]), when they take that path: with more than one image,
    /// and channels enough for every thread. As many as [`channels::GROUP`] (the longer a
    /// group's span of each image, the closer its reading is to one sequential stream),
    /// leaving four groups a thread.
    fn stats_group(self, par: Par) -> Option<((usize, usize, usize), usize)> {
        let (n, c, s) = self.fused(par)?;
        let by_threads = if par.on { c / (4 * par.threads) } else { c };
        (n > 1).then(|| ((n, c, s), by_threads.clamp(1, channels::GROUP)))
    }

    /// The bytes of one image's run of a channel (NCHW), of a row otherwise.
    fn run_bytes<T>(self) -> usize {
        match self {
            Plan::Runs { s, .. } => s,
            Plan::Rows { c, .. } => c,
        }
        .saturating_mul(std::mem::size_of::<T>())
    }

    /// The bytes of one channel (all images).
    fn channel_bytes<T>(self) -> usize {
        match self {
            Plan::Runs { n, s, .. } => n.saturating_mul(s),
            Plan::Rows { rows, .. } => rows,
        }
        .saturating_mul(std::mem::size_of::<T>())
    }

    /// Whether a normalization that moves `elements` elements (input and output together)
    /// writes its output with streaming stores: at least [`parallel::stream_threshold`] bytes,
    /// written in whole cache lines. NCHW runs of at least a line are (they are mapped in
    /// whole vectors laid over the span, [`crate::kernels::normalize::map_runs`]); rows are
    /// when a row is a whole number of lines (they are mapped shifted to the output's first
    /// line, [`row_pieces`]). Streaming stores that fill a line only in part (unaligned rows,
    /// or the ends of short runs mapped one by one) made a 32x2048x7x7 inference 12x slower.
    fn streams<T>(self, elements: usize) -> bool {
        let size = std::mem::size_of::<T>();
        let whole_lines = match self {
            Plan::Runs { s, .. } => s.saturating_mul(size) >= 64,
            Plan::Rows { c, .. } => c > 0 && c.saturating_mul(size).is_multiple_of(64),
        };
        whole_lines && elements.saturating_mul(size) >= parallel::stream_threshold()
    }

    /// Whether training and backward take the fused NCHW path: the channels keep every
    /// thread busy.
    fn fused(self, par: Par) -> Option<(usize, usize, usize)> {
        match self {
            Plan::Runs { n, c, s } if !par.on || c >= 2 * par.threads => Some((n, c, s)),
            _ => None,
        }
    }

    /// The instruction set of a normalization over `buf` with this plan (see
    /// [`Isa::for_rows`]).
    fn isa<B: Buffers>(self, buf: &B) -> Isa {
        match self {
            Plan::Runs { .. } => Isa::current(),
            Plan::Rows { c, .. } => Isa::for_rows(&[buf.input(), buf.output()], c),
        }
    }

    fn of(shape: Shape, layout: Layout) -> Plan {
        let Shape { n, c, spatial: s } = shape;
        match layout {
            Layout::Nchw if s > 1 => Plan::Runs { n, c, s },
            Layout::Nhwc if c == 1 => Plan::Runs { n: 1, c, s: n * s },
            // Saturating: with no channels, `n * s` need not fit, and nothing is read.
            _ => Plan::Rows {
                rows: n.saturating_mul(s),
                c,
            },
        }
    }
}

/// Per-channel moments of `x` (already validated against `shape`).
pub(crate) fn moments<D: Data>(x: &[D], shape: Shape, layout: Layout) -> Vec<Moments> {
    let (plan, par) = (
        Plan::of(shape, layout),
        Par::for_work(x.len(), shape.c, parallel::REDUCE),
    );
    dispatch(Isa::current(), StatsJob { x, plan, par })
}

/// Training's forward pass over `buf`: per-channel moments, then every channel normalized with
/// `finish(channel, moments)`. Returns the moments.
pub(crate) fn train<B, F>(buf: B, shape: Shape, layout: Layout, finish: F) -> Vec<Moments>
where
    B: Buffers,
    F: Fn(usize, &Moments) -> Affine<Param<B>> + Sync,
{
    let (plan, par) = (
        Plan::of(shape, layout),
        Par::for_work(buf.len(), shape.c, parallel::REDUCE_MAP),
    );
    let mut buf = buf;
    buf.set_streaming(plan.streams::<B::Data>(2 * buf.len()));
    dispatch(
        plan.isa(&buf),
        TrainJob {
            buf,
            plan,
            par,
            finish,
        },
    )
}

/// Normalizes every channel `c` of `buf` with `p.get(c)`.
pub(crate) fn apply<B: Buffers>(
    buf: B,
    shape: Shape,
    layout: Layout,
    p: &ChannelAffine<'_, Param<B>>,
) {
    let (plan, par) = (
        Plan::of(shape, layout),
        Par::for_work(buf.len(), shape.c, parallel::MAP),
    );
    let mut buf = buf;
    buf.set_streaming(plan.streams::<B::Data>(2 * buf.len()));
    dispatch(plan.isa(&buf), ApplyJob { buf, plan, par, p })
}

struct StatsJob<'a, T> {
    x: &'a [T],
    plan: Plan,
    par: Par,
}

impl<D: Data> WithSimd for StatsJob<'_, D> {
    type Output = Vec<Moments>;
    fn with_simd<S: Simd>(self, simd: S) -> Vec<Moments> {
        match self.plan {
            Plan::Runs { n, c, s } => stats_runs(simd, self.x, n, c, s, self.par),
            Plan::Rows { rows, c } => stats_rows(simd, self.x, rows, c, self.par),
        }
    }
}

/// The longest run of an image in a channel, in bytes, for which the plain NCHW training
/// takes two passes on Zen 4 (see `TrainJob`): between the 24.5 KiB where two passes won and
/// the 36.75 KiB where they were even.
const SHORT_RUN: usize = 32 << 10;

struct TrainJob<B, F> {
    buf: B,
    plan: Plan,
    par: Par,
    finish: F,
}

impl<B, F> WithSimd for TrainJob<B, F>
where
    B: Buffers,
    F: Fn(usize, &Moments) -> Affine<Param<B>> + Sync,
{
    type Output = Vec<Moments>;
    fn with_simd<S: Simd>(self, simd: S) -> Vec<Moments> {
        let TrainJob {
            buf,
            plan,
            par,
            finish,
        } = self;
        // With a residual, over more than one image, where its channels overflow half of L2
        // each, or on one thread where the tensor is past the caches (streamed): the
        // statistics by channel groups ([`stats_runs`]), then one map over the whole tensor
        // in memory order (below), though `x` is read twice from memory. A channel group's
        // map reads the residual in stretches of one image each, which memory serves more
        // slowly than one stream, and `x` from L2 only while the group stays there. Measured,
        // one thread, with residual and ReLU, groups -> two passes: on Zen 5, 256x64x56x56
        // 21.0-21.8 -> 19.0-19.7 ms, 8x32x224x224 4.25-4.43 -> 4.20-4.25 ms, 32x256x28x28
        // 1.91-1.97 -> 1.94-2.06 ms, 32x64x56x56 2.32-2.53 -> 2.43-2.47 ms; on Zen 4 (an
        // 8-way L2 where Zen 5's has 16 ways), 32x64x56x56 5.1-5.2 -> 3.0 ms, 32x256x28x28
        // 5.0-5.1 -> 3.1 ms. (Two threads on Zen 4 gained as much, but threads keep the
        // groups until measured on Zen 5, where the backward's groups win with threads.)
        //
        // Without a residual, the same on Zen 4 where runs are short, on one thread past the
        // caches: the groups' read-ahead (below) made them 1.3x faster on Zen 5, but on Zen 4
        // two passes win where an image's run of a channel is short, and lose where it is
        // long. Measured on Zen 4, one thread, plain training, groups -> two passes, by run
        // length: 3 KiB 32x256x28x28 3.59 -> 3.23 ms, 32x128x28x28 1.73 -> 1.48 ms; 12.25 KiB
        // 32x64x56x56 3.79 -> 2.91 ms, 64x64x56x56 7.24 -> 5.49 ms, 256x64x56x56 30.3 -> 23.1
        // ms; 24.5 KiB 16x64x56x112 3.09 -> 2.88 ms; 36.75 KiB 16x64x84x112 4.38 -> 4.43 ms;
        // 49 KiB 16x64x112x112 5.02 -> 5.54 ms, 8x64x112x112 3.03 -> 3.21 ms; 196 KiB
        // 8x32x224x224 4.94 -> 5.42 ms; runs under a line the same (32x2048x7x7).
        let spills = plan.channel_bytes::<B::Data>() > parallel::caches().l2 / 2;
        let past_caches = !par.on && buf.streaming();
        let two_passes = if buf.epilogue_reads() {
            spills || past_caches
        } else {
            past_caches && crate::kernels::zen4() && plan.run_bytes::<B::Data>() <= SHORT_RUN
        };
        let grouped = plan.fused(par).filter(|&(n, ..)| n == 1 || !two_passes);
        if let Some((n, c, s)) = grouped {
            let group = plan.group::<B::Data>(par);
            let mut buf = buf;
            if n > 1 {
                // A group's map reads a residual image by image: each image's stretch asks
                // for the next image's, `c * s` elements on.
                buf.epilogue_read_ahead(c * s);
                // Without a residual, its `x` asks for the next group's, `group * s` elements
                // on (within the image), so that the next group's statistics find it in L2
                // instead of reading memory in a pass that writes nothing. Measured on Zen 5,
                // one thread: plain training 32x256x28x28 1.68 -> 1.27 ms, 32x64x56x56 1.79
                // -> 1.53 ms, 256x64x56x56 17.2 -> 14.5 ms (`f16` 12.7 -> 9.0 ms). With a
                // residual it would push out the group's own `x` (32x256x28x28 with residual
                // and ReLU 1.99 -> 2.29 ms). In place, the buffer takes it only for tensors
                // past the caches ([`InPlace`](crate::kernels::buffers::InPlace)).
                if !buf.epilogue_reads() {
                    buf.input_read_ahead(group * s);
                }
            }
            return for_each_channel_group(buf, (n, c, s), group, par, |first, spans, out| {
                simd.vectorize(TrainChannels {
                    spans,
                    s,
                    first,
                    finish: &finish,
                    out,
                })
            });
        }
        let moments = match plan {
            Plan::Runs { n, c, s } => stats_runs(simd, buf.input(), n, c, s, par),
            Plan::Rows { rows, c } => stats_rows(simd, buf.input(), rows, c, par),
        };
        let mut storage = Vec::new();
        let params = fill_affine(&mut storage, moments.len(), |c| finish(c, &moments[c]));
        apply_plan(simd, buf, plan, par, &params);
        moments
    }
}

struct ApplyJob<'p, 'a, B, T> {
    buf: B,
    plan: Plan,
    par: Par,
    p: &'p ChannelAffine<'a, T>,
}

impl<B: Buffers> WithSimd for ApplyJob<'_, '_, B, Param<B>> {
    type Output = ();
    fn with_simd<S: Simd>(self, simd: S) {
        apply_plan(simd, self.buf, self.plan, self.par, self.p)
    }
}

/// How the `n` runs of `s` values of each channel are cut into pieces for threads: about
/// four tasks per thread, whole runs when there are enough of them, else parts of runs.
#[derive(Clone, Copy, Debug)]
struct Pieces {
    n: usize,
    s: usize,
    pieces: usize,
    cuts: usize,
    per_channel: usize,
}

impl Pieces {
    fn new(n: usize, c: usize, s: usize, par: Par) -> Pieces {
        let pieces = if par.on {
            (4 * par.threads).div_ceil(c.max(1))
        } else {
            1
        };
        let cuts = pieces.div_ceil(n.max(1));
        let per_channel = if n >= pieces { pieces } else { n * cuts };
        Pieces {
            n,
            s,
            pieces,
            cuts,
            per_channel: per_channel.max(1),
        }
    }

    /// Piece `p` of a channel: its runs and the columns of each.
    fn get(&self, p: usize) -> (Range<usize>, Range<usize>) {
        let (n, s) = (self.n, self.s);
        if n >= self.pieces {
            (n * p / self.pieces..n * (p + 1) / self.pieces, 0..s)
        } else {
            let (i, j) = (p / self.cuts, p % self.cuts);
            (
                i..(i + 1).min(n),
                s * j / self.cuts..s * (j + 1) / self.cuts,
            )
        }
    }

    /// `f(channel, runs, columns)` for every piece of every channel, in parallel when `par.on`,
    /// the results of each channel folded with `merge` in order.
    fn map<R: Send + Copy + Default>(
        &self,
        c: usize,
        par: Par,
        f: impl Fn(usize, Range<usize>, Range<usize>) -> R + Sync + Send,
        merge: impl Fn(R, R) -> R,
    ) -> Vec<R> {
        let per = self.per_channel;
        let parts = parallel::map(c * per, par.on, |t| {
            let (runs, cols) = self.get(t % per);
            f(t / per, runs, cols)
        });
        parts
            .chunks(per)
            .map(|ps| ps.iter().fold(R::default(), |a, b| merge(a, *b)))
            .collect()
    }
}

/// Moments of the channels of NCHW runs: by channel groups, each read image by image in
/// long stretches ([`Plan::stats_group`]), or else by pieces of channels, in parallel.
/// Measured on Zen 5, one thread, groups against pieces (a channel's runs one after
/// another): 32x256x28x28 0.80 -> 0.55 ms, 32x64x56x56 0.86 -> 0.54 ms, 256x64x56x56 10.3 ->
/// 6.6 ms, 8x32x224x224 1.8 -> 1.55 ms, 32x2048x7x7 0.61 -> 0.26 ms.
fn stats_runs<D: Data, S: Simd>(
    simd: S,
    x: &[D],
    n: usize,
    c: usize,
    s: usize,
    par: Par,
) -> Vec<Moments> {
    if let Some((runs, group)) = (Plan::Runs { n, c, s }).stats_group(par) {
        return for_each_channel_group(x, runs, group, par, |_, spans, out| {
            simd.vectorize(MomentsChannels { spans, s, out })
        });
    }
    Pieces::new(n, c, s, par).map(
        c,
        par,
        |ch, runs, cols| {
            simd.vectorize(MomentsRuns {
                count: runs.len(),
                len: cols.len(),
                run: |i| &x[((runs.start + i) * c + ch) * s + cols.start..][..cols.len()],
            })
        },
        Moments::merge,
    )
}

/// Moments of the channels of `rows` rows of `c`.
fn stats_rows<D: Data, S: Simd>(simd: S, x: &[D], rows: usize, c: usize, par: Par) -> Vec<Moments> {
    row_pieces(
        rows,
        c,
        std::mem::size_of_val(x),
        par,
        |rows, cols, acc: &mut [PivotSums]| {
            simd.vectorize(MomentsRows {
                x,
                c,
                rows,
                cols,
                acc,
            })
        },
        |acc, rows| acc.moments(rows),
        Moments::merge,
    )
}

/// Columns a column-split task takes at least, and a multiple of which it takes: a few cache
/// lines of every row, so that tasks share no line and each reads whole lines.
const COLUMN_GRAIN: usize = 64;

/// Per-channel results over `rows` rows of `c` channels (`bytes` of input), from
/// `f(rows, cols, acc)`, which
/// accumulates a rectangle into `acc` (one zeroed accumulator per column), and `done(acc,
/// rows)`, which turns an accumulator of that many rows into a result; results of different
/// rows merge with `merge`.
///
/// One thread: one rectangle. With threads, when the columns give every thread at least
/// [`COLUMN_GRAIN`] of them and the data fits in the threads' L2 caches (BatchNorm1d, small
/// NHWC), or the rows are too few to share: a block of columns over all rows per task, and no
/// merge at all. Otherwise a span of rows per thread, their accumulators in one buffer, merged
/// per column in parallel: no task allocates, and no thread makes a serial pass over
/// `threads x c` values.
fn row_pieces<A, R>(
    rows: usize,
    c: usize,
    bytes: usize,
    par: Par,
    f: impl Fn(Range<usize>, Range<usize>, &mut [A]) + Sync + Send,
    done: impl Fn(&A, usize) -> R + Sync + Send,
    merge: impl Fn(R, R) -> R + Sync + Send,
) -> Vec<R>
where
    A: Default + Clone + Send + Sync,
    R: Send + Default + Clone,
{
    let threads = if par.on { par.threads } else { 1 };
    // Columns when the rows are few, or the tensor fits in the threads' L2 caches: a block of
    // columns of a larger tensor makes every task stream through all of its memory.
    let columns = rows < 4 * threads
        || (c / COLUMN_GRAIN >= threads && bytes <= parallel::caches().l2 * threads);
    if threads == 1 || columns {
        let tasks = if threads == 1 {
            1
        } else {
            (c / COLUMN_GRAIN).clamp(1, 4 * threads)
        };
        let per = c.div_ceil(tasks).next_multiple_of(16);
        let mut acc = vec![A::default(); c];
        parallel::for_each_chunk(&mut acc, per, threads > 1, |i, acc| {
            f(0..rows, i * per..i * per + acc.len(), acc)
        });
        return acc.iter().map(|a| done(a, rows)).collect();
    }
    let pieces = threads;
    let span = |p: usize| rows * p / pieces..rows * (p + 1) / pieces;
    let mut parts = vec![A::default(); pieces * c];
    parallel::for_each_chunk(&mut parts, c, true, |p, acc| f(span(p), 0..c, acc));
    let per = c.div_ceil(4 * threads).next_multiple_of(16);
    let mut out = vec![R::default(); c];
    parallel::for_each_chunk(&mut out, per, true, |i, out| {
        for (j, o) in out.iter_mut().enumerate() {
            let ch = i * per + j;
            *o = (1..pieces).fold(done(&parts[ch], span(0).len()), |m, p| {
                merge(m, done(&parts[p * c + ch], span(p).len()))
            });
        }
    });
    out
}

/// Gathers NCHW runs by groups of `group` consecutive channels and calls `f(first channel,
/// spans, results)` once per group, in parallel when `par.on`: `spans` holds the group's runs
/// of each image (one span of `group * s` values per image), `results` the group's slice of
/// the per-channel results, which are returned in channel order. The gathering costs one
/// small allocation of `n * c / group` handles, so that each task owns exactly its group's
/// data: that is what lets a task reduce its channels and then write them while they are
/// still in cache.
fn for_each_channel_group<B: Span, R: Send + Default + Clone>(
    buf: B,
    (n, c, s): (usize, usize, usize),
    group: usize,
    par: Par,
    f: impl Fn(usize, &mut [Option<B>], &mut [R]) + Sync + Send,
) -> Vec<R> {
    let groups = c.div_ceil(group);
    if groups == 0 {
        // No channels, nothing to read: and `n` may then be any number (the statistics of a
        // `usize::MAX / 3 x 0 x 2` tensor are a valid, empty call).
        return Vec::new();
    }
    let mut slots: Vec<Option<B>> = (0..n * groups).map(|_| None).collect();
    let mut rest = buf;
    for i in 0..n {
        for g in 0..groups {
            let channels = group.min(c - g * group);
            let (span, tail) = rest.split_at(channels * s);
            slots[g * n + i] = Some(span);
            rest = tail;
        }
    }
    let mut out = vec![R::default(); c];
    parallel::for_each_group(&mut slots, n, &mut out, group, par.on, |g, spans, o| {
        f(g * group, spans, o)
    });
    out
}

/// `get(channel of run r)` for runs `first, first + 1, ...` of an NCHW span, called in order:
/// counts channels instead of dividing for each run.
fn channel_cycle<A>(first: usize, c: usize, get: impl Fn(usize) -> A) -> impl FnMut(usize) -> A {
    let mut ch = first % c.max(1);
    move |_| {
        let a = get(ch);
        ch += 1;
        if ch == c {
            ch = 0;
        }
        a
    }
}

/// Normalizes every channel of `buf` with `p`, in spans of whole runs or rows.
fn apply_plan<S: Simd, B: Buffers>(
    simd: S,
    buf: B,
    plan: Plan,
    par: Par,
    p: &ChannelAffine<'_, Param<B>>,
) {
    let len = buf.len();
    match plan {
        Plan::Runs { c, s, .. } => {
            parallel::for_each_span(buf, s, par.grain(len, s), 0, &|first, span| {
                let mut span = span;
                simd.vectorize(NormalizeRuns {
                    buf: &mut span,
                    s,
                    affine: channel_cycle(first, c, |ch| p.get(ch)),
                })
            })
        }
        Plan::Rows { c, .. } => {
            let rotation = rows_rotation(c, buf.output(), &[buf.input()], buf.streaming());
            // Narrow rows are mapped several at a time, as one row of parameters repeated
            // (fewer calls, and vectors across rows instead of a tail in each): measured on
            // Zen 4, one thread, f32, inference 32x3x112x112 1.78 -> 0.34 ms, 32x64x56x56
            // 2.21 -> 1.88 ms, 8x32x224x224 3.74 -> 3.56 ms, 32x20x56x56 the same.
            let copies = ROW_PARAM_BYTES.div_ceil(c.max(1) * size_of::<Param<B>>());
            let run = |p: &ChannelAffine<'_, Param<B>>| {
                parallel::for_each_span(buf, c, par.grain(len, c), 0, &|_, mut span| {
                    simd.vectorize(NormalizeRows {
                        buf: &mut span,
                        c: c * copies,
                        p,
                        rotation,
                    })
                })
            };
            let arrays = [p.hi, p.scale, p.shift];
            rotated(arrays, rotation, copies, |[hi, scale, shift]| {
                run(&ChannelAffine { hi, scale, shift })
            })
        }
    }
}

/// The backward pass over `g`: per-channel sums of `dy` and `dy * (x - centers[c])`, then `dx`
/// with `finish(channel, sums)`. Returns the sums.
pub(crate) fn backward<D, F>(
    g: Grad<'_, D>,
    shape: Shape,
    layout: Layout,
    centers: &[D::Param],
    finish: F,
) -> Vec<GradSums>
where
    D: Data,
    F: Fn(usize, GradSums) -> BackAffine<D::Param> + Sync,
{
    let (plan, par) = (
        Plan::of(shape, layout),
        Par::for_work(g.len(), shape.c, parallel::REDUCE_MAP),
    );
    let mut g = g;
    g.stream = plan.streams::<D>(3 * g.len());
    dispatch(
        Isa::current(),
        BackwardJob {
            g,
            plan,
            par,
            centers,
            finish,
        },
    )
}

struct BackwardJob<'a, 'c, D: Data, F> {
    g: Grad<'a, D>,
    plan: Plan,
    par: Par,
    centers: &'c [D::Param],
    finish: F,
}

impl<D, F> WithSimd for BackwardJob<'_, '_, D, F>
where
    D: Data,
    F: Fn(usize, GradSums) -> BackAffine<D::Param> + Sync,
{
    type Output = Vec<GradSums>;
    fn with_simd<S: Simd>(self, simd: S) -> Vec<GradSums> {
        let BackwardJob {
            g,
            plan,
            par,
            centers,
            finish,
        } = self;
        // One thread, `dx` streamed (the tensors exceed the last-level cache, see
        // [`parallel::stream_threshold`]): the sums by channel groups
        // ([`grad_sums_with`]), then one map over the whole tensor in memory order (below),
        // though the inputs are read twice from memory: one core reads long streams faster
        // than a channel group's stretches of one image each. Measured on Zen 5, one thread,
        // groups fused -> two passes: 32x256x28x28 2.72-2.89 -> 2.37-2.38 ms, 32x64x56x56
        // 2.32-2.42 -> 2.24-2.36 ms, 8x32x224x224 5.40-5.54 -> 4.90-5.02 ms, 256x64x56x56
        // 26.6 -> 24.4 ms; 32x2048x7x7 and 32x512x14x14 alike. With two threads the fused
        // groups stay faster (32x64x56x56 1.60-1.76 against 1.96-2.16 ms).
        let grouped = plan
            .fused(par)
            .filter(|&(n, ..)| n == 1 || par.on || !g.stream);
        if let Some((n, c, s)) = grouped {
            let group = plan.group::<D>(par);
            let center = |ch: usize| centers[ch];
            return for_each_channel_group(g, (n, c, s), group, par, |first, spans, out| {
                simd.vectorize(BackwardChannels {
                    spans,
                    s,
                    first,
                    center: &center,
                    finish: &finish,
                    out,
                })
            });
        }
        let sums = grad_sums_with(simd, &g, plan, par, centers);
        let mut storage = Vec::new();
        let p = fill_back(&mut storage, sums.len(), |ch| finish(ch, sums[ch]));
        backward_map_with(simd, g, plan, par, &p);
        sums
    }
}

/// The backward pass's per-channel sums alone (the reduce of [`backward`]), for callers that
/// combine them with other workers' before the map ([`backward_map`]).
pub(crate) fn grad_sums<D: Data>(
    g: &Grad<'_, D>,
    shape: Shape,
    layout: Layout,
    centers: &[D::Param],
) -> Vec<GradSums> {
    let (plan, par) = (
        Plan::of(shape, layout),
        Par::for_work(g.len(), shape.c, parallel::REDUCE),
    );
    dispatch(
        Isa::current(),
        GradSumsJob {
            g,
            plan,
            par,
            centers,
        },
    )
}

/// `dx` alone (the map of [`backward`]) with every channel's coefficients `p`.
pub(crate) fn backward_map<D: Data>(
    g: Grad<'_, D>,
    shape: Shape,
    layout: Layout,
    p: &ChannelBack<'_, D::Param>,
) {
    let (plan, par) = (
        Plan::of(shape, layout),
        Par::for_work(g.len(), shape.c, parallel::MAP),
    );
    let mut g = g;
    g.stream = plan.streams::<D>(3 * g.len());
    dispatch(Isa::current(), BackMapJob { g, plan, par, p })
}

struct GradSumsJob<'g, 'a, 'c, D: Data> {
    g: &'g Grad<'a, D>,
    plan: Plan,
    par: Par,
    centers: &'c [D::Param],
}

impl<D: Data> WithSimd for GradSumsJob<'_, '_, '_, D> {
    type Output = Vec<GradSums>;
    fn with_simd<S: Simd>(self, simd: S) -> Vec<GradSums> {
        grad_sums_with(simd, self.g, self.plan, self.par, self.centers)
    }
}

struct BackMapJob<'a, 'p, D: Data> {
    g: Grad<'a, D>,
    plan: Plan,
    par: Par,
    p: &'p ChannelBack<'p, D::Param>,
}

impl<D: Data> WithSimd for BackMapJob<'_, '_, D> {
    type Output = ();
    fn with_simd<S: Simd>(self, simd: S) {
        backward_map_with(simd, self.g, self.plan, self.par, self.p)
    }
}

/// The backward sums of `plan`, unfused: NCHW by channel groups as the statistics are
/// ([`stats_runs`]), else by pieces.
#[inline(always)]
fn grad_sums_with<S: Simd, D: Data>(
    simd: S,
    g: &Grad<'_, D>,
    plan: Plan,
    par: Par,
    centers: &[D::Param],
) -> Vec<GradSums> {
    if let Some(((n, c, s), group)) = plan.stats_group(par) {
        let center = |ch: usize| centers[ch];
        return for_each_channel_group(g.inputs(), (n, c, s), group, par, |first, spans, out| {
            simd.vectorize(GradSumsChannels {
                spans,
                s,
                first,
                center: &center,
                out,
            })
        });
    }
    match plan {
        Plan::Runs { n, c, s } => {
            let inputs = g.inputs();
            let gated = !g.y.is_empty();
            Pieces::new(n, c, s, par).map(
                c,
                par,
                |ch, runs, cols| {
                    let at = |i: usize| ((runs.start + i) * c + ch) * s + cols.start;
                    let len = cols.len();
                    simd.vectorize(GradSumsRuns {
                        count: runs.len(),
                        len,
                        run: |i| inputs.at(at(i), len),
                        hi: centers[ch],
                        gated,
                    })
                },
                GradSums::add,
            )
        }
        Plan::Rows { rows, c } => row_pieces(
            rows,
            c,
            2 * std::mem::size_of_val(g.x),
            par,
            |rows, cols, out: &mut [GradSums]| {
                simd.vectorize(GradSumsRows {
                    g: g.inputs(),
                    c,
                    rows,
                    cols,
                    hi: centers,
                    out,
                })
            },
            |acc, _| *acc,
            GradSums::add,
        ),
    }
}

/// `dx` over the spans of `plan` with the coefficients `p`.
#[inline(always)]
fn backward_map_with<S: Simd, D: Data>(
    simd: S,
    g: Grad<'_, D>,
    plan: Plan,
    par: Par,
    p: &ChannelBack<'_, D::Param>,
) {
    let len = g.len();
    match plan {
        Plan::Runs { c, s, .. } => {
            parallel::for_each_span(g, s, par.grain(len, s), 0, &|first, mut span| {
                simd.vectorize(BackwardRuns {
                    g: &mut span,
                    s,
                    params: channel_cycle(first, c, |ch| p.get(ch)),
                })
            })
        }
        Plan::Rows { c, .. } => {
            let rotation = rows_rotation(c, g.dx, &[g.x, g.dy, g.y], g.stream);
            let run = |p: &ChannelBack<'_, D::Param>| {
                parallel::for_each_span(g, c, par.grain(len, c), 0, &|_, mut span| {
                    simd.vectorize(BackwardRows {
                        g: &mut span,
                        c,
                        p,
                        rotation,
                    })
                })
            };
            rotated([p.hi, p.a, p.b, p.c], rotation, 1, |[hi, a, b, c]| {
                run(&ChannelBack { hi, a, b, c })
            })
        }
    }
}

/// The rotation ([`rotation_of`]) with which rows of `c` channels are mapped onto `output`:
/// rows of whole lines are mapped shifted onto the output's lines, the parameters rotated to
/// match (every span of rows starts as the output does), where that pays: with streaming
/// stores (they then write whole lines), or when every (non-empty) input is as far into its
/// line as the output (every access is then within a line, and AVX-512 stays,
/// [`Isa::for_rows`]). Elsewhere rotating would only cost its copy of the parameters.
fn rows_rotation<T>(c: usize, output: &[T], inputs: &[&[T]], streaming: bool) -> usize {
    if streaming || alike_in_lines(output, inputs) {
        rotation_of(output, c)
    } else {
        0
    }
}

/// `f` of the per-channel `arrays` rotated by `rotation` and repeated `copies` times
/// ([`rotated_arrays`], in this thread's scratch storage), or of `arrays` themselves when
/// that changes nothing.
fn rotated<T: Element, const K: usize, R>(
    arrays: [&[T]; K],
    rotation: usize,
    copies: usize,
    f: impl FnOnce([&[T]; K]) -> R,
) -> R {
    if rotation == 0 && copies == 1 {
        return f(arrays);
    }
    T::with_scratch(|storage| f(rotated_arrays(storage, arrays, rotation, copies).map(|a| &*a)))
}
