//! How a call runs: the layout becomes a plan (channel runs or channel-interleaved rows), the
//! plan becomes work units (a channel, a piece of a channel, a span of rows), and the units run
//! on the kernels of the chosen instruction set, on the calling thread or in rayon tasks.
//!
//! Training over NCHW is fused when there are enough channels to keep every thread busy: a
//! task takes one channel, computes its moments and normalizes it straight away, so the second
//! read comes from cache when the channel fits there. With fewer channels than that, channels
//! are cut into pieces whose moments are merged (Chan), and normalization runs as a second,
//! parallel pass. NHWC always takes two passes: a channel is spread over the whole tensor.

use crate::element::Element;
use crate::kernels::buffers::Buffers;
use crate::kernels::normalize::{fill_affine, Affine, ChannelAffine};
use crate::kernels::{dispatch, Isa, Job, Kernels};
use crate::moments::Moments;
use crate::parallel::{self, Par};
use crate::shape::{Layout, Shape};

/// The memory pattern of a tensor, whatever layout it was given in.
#[derive(Clone, Copy, Debug)]
enum Plan {
    /// `n * c` contiguous runs of `s` values, run `i` belonging to channel `i % c` (NCHW).
    Runs { n: usize, c: usize, s: usize },
    /// `rows` rows of `c` values, one per channel (NHWC, and NCHW with `spatial == 1`).
    Rows { rows: usize, c: usize },
}

impl Plan {
    fn of(shape: Shape, layout: Layout) -> Plan {
        let Shape { n, c, spatial: s } = shape;
        match layout {
            Layout::Nchw if s > 1 => Plan::Runs { n, c, s },
            Layout::Nhwc if c == 1 => Plan::Runs { n: 1, c, s: n * s },
            _ => Plan::Rows { rows: n * s, c },
        }
    }
}

/// Per-channel moments of `x` (already validated against `shape`).
pub(crate) fn moments<T: Element>(x: &[T], shape: Shape, layout: Layout) -> Vec<Moments> {
    let (plan, par) = (Plan::of(shape, layout), Par::for_len(x.len()));
    dispatch(Isa::current(), StatsJob { x, plan, par })
}

/// Training's forward pass over `buf`: per-channel moments, then every channel normalized with
/// `finish(channel, moments)`. Returns the moments.
pub(crate) fn train<T, B, F>(buf: B, shape: Shape, layout: Layout, finish: F) -> Vec<Moments>
where
    T: Element,
    B: Buffers<T>,
    F: Fn(usize, &Moments) -> Affine<T> + Sync,
{
    let (plan, par) = (Plan::of(shape, layout), Par::for_len(buf.len()));
    dispatch(
        Isa::current(),
        TrainJob {
            buf,
            plan,
            par,
            finish,
        },
    )
}

/// Normalizes every channel `c` of `buf` with `p.get(c)`.
pub(crate) fn apply<T: Element, B: Buffers<T>>(
    buf: B,
    shape: Shape,
    layout: Layout,
    p: &ChannelAffine<'_, T>,
) {
    let (plan, par) = (Plan::of(shape, layout), Par::for_len(buf.len()));
    dispatch(Isa::current(), ApplyJob { buf, plan, par, p })
}

struct StatsJob<'a, T> {
    x: &'a [T],
    plan: Plan,
    par: Par,
}

impl<T: Element> Job<T> for StatsJob<'_, T> {
    type Output = Vec<Moments>;
    fn run<K: Kernels<T>>(self, k: K) -> Vec<Moments> {
        match self.plan {
            Plan::Runs { n, c, s } => stats_runs(k, self.x, n, c, s, self.par),
            Plan::Rows { rows, c } => stats_rows(k, self.x, rows, c, self.par),
        }
    }
}

struct TrainJob<B, F> {
    buf: B,
    plan: Plan,
    par: Par,
    finish: F,
}

impl<T, B, F> Job<T> for TrainJob<B, F>
where
    T: Element,
    B: Buffers<T>,
    F: Fn(usize, &Moments) -> Affine<T> + Sync,
{
    type Output = Vec<Moments>;
    fn run<K: Kernels<T>>(self, k: K) -> Vec<Moments> {
        let TrainJob {
            buf,
            plan,
            par,
            finish,
        } = self;
        let moments = match plan {
            Plan::Runs { n, c, s } if !par.on || c >= 2 * par.threads => {
                return train_runs_fused(k, buf, n, c, s, par, &finish);
            }
            Plan::Runs { n, c, s } => stats_runs(k, buf.input(), n, c, s, par),
            Plan::Rows { rows, c } => stats_rows(k, buf.input(), rows, c, par),
        };
        let mut storage = Vec::new();
        let params = fill_affine(&mut storage, moments.len(), |c| finish(c, &moments[c]));
        apply_plan(k, buf, plan, par, &params);
        moments
    }
}

struct ApplyJob<'p, 'a, B, T> {
    buf: B,
    plan: Plan,
    par: Par,
    p: &'p ChannelAffine<'a, T>,
}

impl<T: Element, B: Buffers<T>> Job<T> for ApplyJob<'_, '_, B, T> {
    type Output = ();
    fn run<K: Kernels<T>>(self, k: K) {
        apply_plan(k, self.buf, self.plan, self.par, self.p)
    }
}

/// Moments of the channels of NCHW runs; with threads, each channel is cut into pieces (runs,
/// or parts of runs when there are few) so that there are about four tasks per thread.
fn stats_runs<T: Element, K: Kernels<T>>(
    k: K,
    x: &[T],
    n: usize,
    c: usize,
    s: usize,
    par: Par,
) -> Vec<Moments> {
    if n == 0 || s == 0 {
        return vec![Moments::EMPTY; c];
    }
    let pieces = if par.on {
        (4 * par.threads).div_ceil(c.max(1))
    } else {
        1
    };
    // Pieces are runs [n * p / pieces, ...) when there are enough runs, else each run is cut
    // into `cuts` column ranges.
    let cuts = pieces.div_ceil(n);
    let per_channel = if n >= pieces { pieces } else { n * cuts };
    let parts = parallel::map(c * per_channel, par.on, |t| {
        let (ch, p) = (t / per_channel, t % per_channel);
        let (runs, cols) = if n >= pieces {
            (n * p / pieces..n * (p + 1) / pieces, 0..s)
        } else {
            let (i, j) = (p / cuts, p % cuts);
            (i..i + 1, s * j / cuts..s * (j + 1) / cuts)
        };
        k.moments_runs(runs.len(), cols.len(), |i| {
            &x[((runs.start + i) * c + ch) * s + cols.start..][..cols.len()]
        })
    });
    parts
        .chunks(per_channel)
        .map(|ps| ps.iter().fold(Moments::EMPTY, |a, b| a.merge(*b)))
        .collect()
}

/// Moments of the channels of `rows` rows of `c`; with threads, rows are cut into spans whose
/// per-channel moments are merged in order.
fn stats_rows<T: Element, K: Kernels<T>>(
    k: K,
    x: &[T],
    rows: usize,
    c: usize,
    par: Par,
) -> Vec<Moments> {
    let pieces = if par.on {
        (4 * par.threads).min(rows).max(1)
    } else {
        1
    };
    let parts = parallel::map(pieces, par.on, |p| {
        let mut m = vec![Moments::EMPTY; c];
        k.moments_rows(x, c, rows * p / pieces..rows * (p + 1) / pieces, &mut m);
        m
    });
    let mut out = vec![Moments::EMPTY; c];
    for part in parts {
        for (o, m) in out.iter_mut().zip(part) {
            *o = o.merge(m);
        }
    }
    out
}

/// Training over NCHW runs, a channel per task: moments, then normalization while the
/// channel is still in cache. The runs are first gathered channel by channel (one small
/// allocation of `n * c` handles), so each task owns exactly its channel's runs.
fn train_runs_fused<T, K, B, F>(
    k: K,
    buf: B,
    n: usize,
    c: usize,
    s: usize,
    par: Par,
    finish: &F,
) -> Vec<Moments>
where
    T: Element,
    K: Kernels<T>,
    B: Buffers<T>,
    F: Fn(usize, &Moments) -> Affine<T> + Sync,
{
    let mut slots: Vec<Option<B>> = (0..n * c).map(|_| None).collect();
    let mut rest = buf;
    for i in 0..n * c {
        let (run, tail) = rest.split_at(s);
        slots[(i % c) * n + i / c] = Some(run);
        rest = tail;
    }
    let mut moments = vec![Moments::EMPTY; c];
    parallel::for_each_group(&mut slots, n, &mut moments, par.on, |ch, runs, m| {
        *m = k.moments_runs(n, s, |i| runs[i].as_ref().map_or(&[][..], |r| r.input()));
        let a = finish(ch, m);
        for run in runs.iter_mut().flatten() {
            k.normalize_runs(run, s, |_| a);
        }
    });
    moments
}

/// Normalizes every channel of `buf` with `p`, in spans of whole runs or rows.
fn apply_plan<T: Element, K: Kernels<T>, B: Buffers<T>>(
    k: K,
    buf: B,
    plan: Plan,
    par: Par,
    p: &ChannelAffine<'_, T>,
) {
    let len = buf.len();
    match plan {
        Plan::Runs { c, s, .. } => {
            parallel::for_each_span(buf, s, par.grain(len, s), 0, &|first, span| {
                let mut span = span;
                k.normalize_runs(&mut span, s, |r| p.get((first + r) % c))
            })
        }
        Plan::Rows { c, .. } => {
            parallel::for_each_span(buf, c, par.grain(len, c), 0, &|_, mut span| {
                k.normalize_rows(&mut span, c, p)
            })
        }
    }
}
