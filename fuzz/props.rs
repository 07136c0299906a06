//! Property checks shared by the cargo-fuzz targets (`fuzz_targets/`) and the corpus replay
//! test (`tests/fuzz_corpus.rs`, stable Rust): arbitrary bytes decode into a shape, a layout,
//! layer parameters and data biased toward the hard cases; each operation runs on every
//! instruction set this CPU has, on the calling thread and in a 3-thread pool with every
//! tensor parallel and streaming; and each `check_*` panics when a property fails.
//!
//! Running and verifying are separate (`run_*`, `verify_*`), so that a test can hand the
//! verifiers deliberately wrong results and see them rejected: every property is a check that
//! can fail.
//!
//! The bounds, against the float64 two-pass reference of the same f32 values (docs/ACCURACY.md
//! explains them):
//! - batch mean within `1e-5` standard deviations (plus `1e-12` of its magnitude);
//! - batch variance within `2e-5` of itself, however small (squares below f32's normal range
//!   are redone in f64);
//! - output within `1e-5 * (1 + |y|)` wherever the scale `weight / sqrt(var + eps)` exists in
//!   f32 (with eps = 0 and a variance below about 1e-77 it does not);
//! - a channel with a non-finite input comes out NaN (and, in backward, its `dx` and
//!   `dweight`); a value whose distance from its channel's mean does not fit in f32 (values of
//!   both signs near `f32::MAX`) may come out NaN or infinite; no other channel or value may.
#![allow(dead_code)]

use batchnorm::half::{bf16, f16};
use batchnorm::{
    oracle, with_isa, with_parallel_threshold, with_stream_threshold, BatchNorm, Data, Error,
    Gradients, Isa, Layout, Moments, SavedStats, Shape,
};
use std::sync::OnceLock;

/// A decoded case.
#[derive(Clone, Debug)]
pub struct Case {
    pub shape: Shape,
    pub layout: Layout,
    pub layer: BatchNorm<f32>,
    pub x: Vec<f32>,
    pub dy: Vec<f32>,
    /// Where to cut the batch for the merge property (`0 ..= n`).
    pub cut: usize,
}

struct Bytes<'a> {
    data: &'a [u8],
    at: usize,
    state: u64,
}

impl Bytes<'_> {
    fn byte(&mut self) -> u8 {
        let b = self.data.get(self.at).copied().unwrap_or(0);
        self.at += 1;
        b
    }
    /// Raw f32 from the next four bytes (cycling through the input): any bit pattern.
    fn raw(&mut self) -> f32 {
        let n = self.data.len().max(1);
        let b = |i: usize| self.data.get((self.at + i) % n).copied().unwrap_or(0);
        let v = f32::from_le_bytes([b(0), b(1), b(2), b(3)]);
        self.at += 4;
        v
    }
    /// Uniform in [-1, 1) from an xorshift seeded by the input.
    fn unit(&mut self) -> f64 {
        self.state ^= self.state << 13;
        self.state ^= self.state >> 7;
        self.state ^= self.state << 17;
        (self.state >> 11) as f64 / (1u64 << 52) as f64 - 1.0
    }
}

/// The value generators, one per channel ("mixed" picks one per channel).
fn value(bytes: &mut Bytes<'_>, flavor: u8, c: usize) -> f32 {
    let flavor = if flavor == 7 { (c % 7) as u8 } else { flavor };
    let u = bytes.unit();
    match flavor {
        0 => bytes.raw(),
        // A huge common offset with a tiny spread: offset/std from 1 to 1e7.
        1 => {
            let offset = 10f64.powi((c % 8) as i32) * if c.is_multiple_of(2) { 1.0 } else { -1.0 };
            (offset + u) as f32
        }
        // Near f32::MAX: the variance overflows.
        2 => (3.0e38 + 3.0e37 * u) as f32 * if c.is_multiple_of(2) { 1.0 } else { -1.0 },
        // Subnormals.
        3 => (1e-40 * u) as f32,
        // Constant channels.
        4 => (c as f32 + 0.5) * 3.0,
        // One channel hot, the others empty.
        5 => {
            if c == 0 {
                (1e6 * u) as f32
            } else {
                0.0
            }
        }
        _ => u as f32,
    }
}

/// Decodes `data`, or `None` when it is too short.
pub fn decode(data: &[u8]) -> Option<Case> {
    if data.len() < 8 {
        return None;
    }
    let mut seed = 0x9E37_79B9_7F4A_7C15u64;
    for &b in data {
        seed = (seed ^ b as u64).wrapping_mul(0x100_0000_01B3);
    }
    let mut b = Bytes {
        data,
        at: 0,
        state: seed | 1,
    };
    let (mut n, mut c) = (1 + b.byte() as usize % 7, 1 + b.byte() as usize % 11);
    let mut s = 1 + b.byte() as usize % 40;
    let flags = b.byte();
    if flags & 0xC0 == 0xC0 {
        // Channels longer than a statistics block (up to 7760 values), in a quarter of the
        // cases and with few of them, so that a case stays cheap: at most 23,280 values.
        s *= 97;
        (n, c) = (1 + n % 2, 1 + c % 3);
    }
    let layout = if flags & 1 == 0 {
        Layout::Nchw
    } else {
        Layout::Nhwc
    };
    let flavor = b.byte() % 8;
    let shape = Shape::new(n, c, s);
    let mut layer = BatchNorm::<f32>::new(c);
    layer.eps = [1e-5, 0.0, 1e-3, 1.0][b.byte() as usize % 4];
    if flavor == 4 {
        layer.eps = 0.0;
    }
    layer.momentum = [Some(0.1), None, Some(1.0)][b.byte() as usize % 3];
    layer.unbiased_running_var = b.byte().is_multiple_of(2);
    for ch in 0..c {
        layer.weight[ch] = (1.0 + 0.5 * b.unit()) as f32;
        layer.bias[ch] = b.unit() as f32;
        layer.running_mean[ch] = b.unit() as f32;
        layer.running_var[ch] = (1.0 + b.unit()) as f32;
    }
    let len = n * c * s;
    let mut x = vec![0.0f32; len];
    for i in 0..n {
        for ch in 0..c {
            for j in 0..s {
                x[shape.index(layout, i, ch, j)] = value(&mut b, flavor, ch);
            }
        }
    }
    let dy = (0..len).map(|_| b.unit() as f32).collect();
    let cut = b.byte() as usize % (n + 1);
    Some(Case {
        shape,
        layout,
        layer,
        x,
        dy,
        cut,
    })
}

/// What a verifier says: nothing, or the property that failed.
pub type Verdict = Result<(), String>;

/// Fails the verdict with the message when `cond` is false.
macro_rules! ensure {
    ($cond:expr, $($msg:tt)+) => {
        if !$cond {
            return Err(format!($($msg)+));
        }
    };
}

/// The paths every operation runs on: each instruction set this CPU has, on the calling
/// thread (`false`) and in a 3-thread pool with every tensor parallel and every output
/// streamed (`true`).
pub fn paths() -> Vec<(Isa, bool)> {
    Isa::available()
        .into_iter()
        .flat_map(|isa| [(isa, false), (isa, true)])
        .collect()
}

/// Runs `f` on one path; a failure is labelled with it.
pub fn on_path((isa, threads): (Isa, bool), f: impl FnOnce() -> Verdict + Send) -> Verdict {
    static POOL: OnceLock<rayon::ThreadPool> = OnceLock::new();
    let pool = POOL.get_or_init(|| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .expect("thread pool")
    });
    if threads {
        pool.install(|| {
            with_isa(isa, || {
                with_parallel_threshold(0, || with_stream_threshold(0, f))
            })
        })
        .map_err(|e| format!("{isa:?}, 3 threads: {e}"))
    } else {
        with_isa(isa, f).map_err(|e| format!("{isa:?}: {e}"))
    }
}

/// Runs `f` on every path ([`paths`]) when `which` is `None` (the corpus replay), else on
/// path `which % paths().len()` (a fuzz target, which picks it from its input: one path an
/// execution keeps a case cheap, and the fuzzer sees each path's coverage as its own).
pub fn on_paths(which: Option<usize>, mut f: impl FnMut() -> Verdict + Send) -> Verdict {
    let all = paths();
    match which {
        Some(k) => on_path(all[k % all.len()], f),
        None => all.into_iter().try_for_each(|p| on_path(p, &mut f)),
    }
}

/// [`on_paths`], panicking on a failure (what a fuzz target reports).
fn each_path(which: Option<usize>, f: impl FnMut() -> Verdict + Send) {
    on_paths(which, f).unwrap_or_else(|e| panic!("{e}"))
}

/// The path a fuzz target runs an input on: from its last byte.
pub fn path_of(data: &[u8]) -> Option<usize> {
    data.last().map(|&b| b as usize)
}

/// What the reference says about a channel.
#[derive(Clone, Debug)]
pub struct Channel {
    pub mean: f64,
    pub var: f64,
    /// Every input value finite.
    pub finite: bool,
}

/// The reference statistics of every channel.
pub fn channels(case: &Case) -> Vec<Channel> {
    let (shape, layout, x) = (case.shape, case.layout, &case.x);
    oracle::mean_var(x, shape, layout)
        .into_iter()
        .enumerate()
        .map(|(c, (mean, var))| Channel {
            mean,
            var,
            finite: indices(shape, layout, c).all(|i| x[i].is_finite()),
        })
        .collect()
}

/// The indices of channel `c`'s values.
fn indices(shape: Shape, layout: Layout, c: usize) -> impl Iterator<Item = usize> {
    (0..shape.n).flat_map(move |n| (0..shape.spatial).map(move |s| shape.index(layout, n, c, s)))
}

/// Every value of channel `c` of `v` NaN: the channel has a non-finite input.
fn channel_nan(v: &[f32], shape: Shape, layout: Layout, c: usize, what: &str) -> Verdict {
    for i in indices(shape, layout, c) {
        ensure!(
            v[i].is_nan(),
            "{what}[{i}] of channel {c}, which has a non-finite input: {}",
            v[i]
        );
    }
    Ok(())
}

/// Moments `m` against the mean and variance `want` of a channel whose reference is `r`: the
/// mean within `1e-5` standard deviations (plus `1e-12` of its magnitude), the variance within
/// `2e-5` of itself, both bounds times `slack`.
fn moments_close(what: &str, m: Moments, want: (f64, f64), r: &Channel, slack: f64) -> Verdict {
    let tol = slack * (1e-5 * r.var.sqrt() + 1e-12 * r.mean.abs());
    ensure!(
        close(m.mean, want.0, tol),
        "{what}: mean {} vs {}",
        m.mean,
        want.0
    );
    let var = m.variance();
    ensure!(
        close(var, want.1, slack * 2e-5 * r.var),
        "{what}: variance {var:e} vs {:e}",
        want.1
    );
    Ok(())
}

fn close(got: f64, want: f64, tol: f64) -> bool {
    (got - want).abs() <= tol
}

/// The bits of each value, every NaN as the same one: a NaN's payload is not specified (the
/// compiler may commute the operands of an addition or multiplication, and x86 propagates the
/// first operand's payload), so two correct results may differ there.
fn bits(v: &[f32]) -> Vec<u32> {
    v.iter()
        .map(|x| {
            if x.is_nan() {
                f32::NAN.to_bits()
            } else {
                x.to_bits()
            }
        })
        .collect()
}

/// Whether the values at `x[i]` has a distance from the channel mean that f32 holds with room
/// to spare (beyond it, the centred value may overflow: NaN or infinite outputs are allowed).
fn centrable(x: f32, r: &Channel) -> bool {
    (x as f64 - r.mean).abs() < 1e38
}

/// One call of training's forward pass, out of place and in place, with the moments of `x`.
#[derive(Clone, Debug)]
pub struct TrainRun {
    pub saved: Result<SavedStats<f32>, Error>,
    pub y: Vec<f32>,
    /// The layer after the call.
    pub layer: BatchNorm<f32>,
    pub moments: Vec<Moments>,
    pub in_place: Vec<f32>,
    pub in_place_saved: Option<SavedStats<f32>>,
}

pub fn run_forward_train(case: &Case) -> TrainRun {
    let (shape, layout, layer, x) = (case.shape, case.layout, &case.layer, &case.x);
    let mut bn = layer.clone();
    let mut y = vec![0.0f32; x.len()];
    let saved = bn.forward_train(x, &mut y, shape, layout);
    let mut in_place = x.clone();
    let in_place_saved = layer
        .clone()
        .forward_train_in_place(&mut in_place, shape, layout)
        .ok();
    TrainRun {
        saved,
        y,
        layer: bn,
        moments: batchnorm::moments(x, shape, layout).unwrap_or_default(),
        in_place,
        in_place_saved,
    }
}

/// Training's forward pass: refused only where it must be (and then the layer untouched),
/// statistics and outputs within the bounds, non-finite values confined, in place identical to
/// out of place.
pub fn verify_forward_train(
    case: &Case,
    refs: &[Channel],
    want: &oracle::Train,
    got: &TrainRun,
) -> Verdict {
    let (shape, layout, layer, x) = (case.shape, case.layout, &case.layer, &case.x);
    if shape.n * shape.spatial < 2 {
        ensure!(got.saved.is_err(), "training on one value per channel");
        ensure!(
            format!("{:?}", got.layer) == format!("{layer:?}"),
            "refused call changed the layer"
        );
        return Ok(());
    }
    let saved = got.saved.as_ref().map_err(|e| format!("refused: {e}"))?;
    let (len, c) = (x.len(), shape.c);
    ensure!(
        got.y.len() == len && got.in_place.len() == len,
        "output lengths"
    );
    ensure!(
        saved.mean.len() == c && saved.invstd.len() == c,
        "saved lengths"
    );
    ensure!(got.moments.len() == c, "moments length");
    for (c, r) in refs.iter().enumerate() {
        if !r.finite {
            channel_nan(&got.y, shape, layout, c, "y")?;
            continue;
        }
        let std = r.var.sqrt();
        moments_close(
            &format!("channel {c}"),
            got.moments[c],
            (r.mean, r.var),
            r,
            1.0,
        )?;
        let saved_mean = saved.mean[c] as f64;
        // Rounding to f32: half an ulp, which for subnormals is absolute.
        let rounding = r.mean.abs() * f32::EPSILON as f64 + f32::from_bits(1) as f64;
        ensure!(
            close(saved_mean, r.mean, 1e-5 * std + rounding),
            "saved mean of {c}: {saved_mean} vs {} (var {:e})",
            r.mean,
            r.var
        );
        // The scale `weight / sqrt(var + eps)` must exist in f32 for the outputs to (below a
        // variance of about 1e-77 with eps = 0 it does not: docs/ACCURACY.md says what comes out).
        let scale = layer.weight[c] as f64 / (r.var + layer.eps).sqrt();
        if scale.abs() < 1e37 {
            for i in indices(shape, layout, c).filter(|&i| centrable(x[i], r)) {
                let (g, w) = (got.y[i] as f64, want.y[i]);
                ensure!(
                    close(g, w, 1e-5 * (1.0 + w.abs())),
                    "y[{i}] of channel {c}: {g} vs {w}"
                );
            }
            let rm = want.running_mean[c];
            ensure!(
                // The batch mean's bound, plus rounding of the running value.
                close(
                    got.layer.running_mean[c] as f64,
                    rm,
                    1e-5 * (std + 1.0 + rm.abs())
                ),
                "running mean of {c}: {} vs {rm} (batch mean {}, var {:e})",
                got.layer.running_mean[c],
                r.mean,
                r.var
            );
            let rv = want.running_var[c];
            let got_rv = got.layer.running_var[c];
            if rv > f32::MAX as f64 {
                ensure!(
                    got_rv.is_infinite(),
                    "running var of {c} beyond f32: {got_rv}"
                );
            } else if r.var > 1e-30 || rv > 1e-30 {
                ensure!(
                    close(got_rv as f64, rv, 2e-5 * (1e-30 + rv.abs())),
                    "running var of {c}: {got_rv} vs {rv}"
                );
            }
        }
    }
    ensure!(
        bits(&got.in_place) == bits(&got.y),
        "in-place training differs"
    );
    ensure!(
        format!("{:?}", got.in_place_saved.as_ref()) == format!("{:?}", Some(saved)),
        "in-place saved statistics differ"
    );
    Ok(())
}

/// Every path ([`on_paths`]) or the one `which` picks.
pub fn check_forward_train(data: &[u8], which: Option<usize>) {
    let Some(case) = decode(data) else { return };
    let refs = channels(&case);
    let want = oracle::forward_train(&case.layer, &case.x, case.shape, case.layout);
    each_path(which, || {
        verify_forward_train(&case, &refs, &want, &run_forward_train(&case))
    });
}

/// One call of inference, out of place and in place, and of the folded scale and shift.
#[derive(Clone, Debug)]
pub struct EvalRun {
    pub y: Vec<f32>,
    pub in_place: Vec<f32>,
    pub folded: Vec<f32>,
    pub folded_in_place: Vec<f32>,
}

pub fn run_forward_eval(case: &Case) -> EvalRun {
    let (shape, layout, layer, x) = (case.shape, case.layout, &case.layer, &case.x);
    let (scale, shift) = layer.scale_shift().expect("finite parameters");
    let mut y = vec![0.0f32; x.len()];
    layer.forward_eval(x, &mut y, shape, layout).expect("eval");
    let mut in_place = x.clone();
    layer
        .forward_eval_in_place(&mut in_place, shape, layout)
        .expect("eval in place");
    let mut folded = vec![0.0f32; x.len()];
    batchnorm::apply_scale_shift(x, &mut folded, &scale, &shift, shape, layout).expect("apply");
    let mut folded_in_place = x.clone();
    batchnorm::apply_scale_shift_in_place(&mut folded_in_place, &scale, &shift, shape, layout)
        .expect("apply in place");
    EvalRun {
        y,
        in_place,
        folded,
        folded_in_place,
    }
}

/// Inference: out of place and in place identical, for the layer and for the folded scale and
/// shift; the layer's output within the bound of the oracle where it is finite, NaN where the
/// input is.
pub fn verify_forward_eval(case: &Case, want: &[f64], got: &EvalRun) -> Verdict {
    let x = &case.x;
    ensure!(
        got.y.len() == x.len() && got.in_place.len() == x.len(),
        "output lengths"
    );
    ensure!(
        got.folded.len() == x.len() && got.folded_in_place.len() == x.len(),
        "folded lengths"
    );
    ensure!(
        bits(&got.in_place) == bits(&got.y),
        "in-place inference differs"
    );
    for (i, (g, w)) in got.y.iter().zip(want).enumerate() {
        if x[i].is_nan() {
            ensure!(g.is_nan(), "y[{i}] = {g} from a NaN input");
        } else if x[i].is_finite() && w.is_finite() && w.abs() < 1e30 {
            ensure!(
                close(*g as f64, *w, 1e-5 * (1.0 + w.abs())),
                "y[{i}] {g} vs {w}"
            );
        }
    }
    ensure!(
        bits(&got.folded_in_place) == bits(&got.folded),
        "in-place folded inference differs"
    );
    Ok(())
}

/// Every path ([`on_paths`]) or the one `which` picks.
pub fn check_forward_eval(data: &[u8], which: Option<usize>) {
    let Some(case) = decode(data) else { return };
    let want = oracle::forward_eval(&case.layer, &case.x, case.shape, case.layout);
    each_path(which, || {
        verify_forward_eval(&case, &want, &run_forward_eval(&case))
    });
}

/// The moments of the whole batch and of its two parts (cut along N).
#[derive(Clone, Debug)]
pub struct MergeRun {
    pub whole: Vec<Moments>,
    pub parts: [Vec<Moments>; 2],
}

pub fn run_moments_merge(case: &Case) -> MergeRun {
    let (shape, layout, x, cut) = (case.shape, case.layout, &case.x, case.cut);
    // Both layouts keep a sample's values together, so a cut along N splits the buffer.
    let (a, b) = x.split_at(cut * shape.c * shape.spatial);
    let sa = Shape::new(cut, shape.c, shape.spatial);
    let sb = Shape::new(shape.n - cut, shape.c, shape.spatial);
    let moments = |x, s| batchnorm::moments(x, s, layout).expect("moments");
    MergeRun {
        whole: moments(x, shape),
        parts: [moments(a, sa), moments(b, sb)],
    }
}

/// The moments of the two parts of a batch, merged, equal the moments of the whole.
pub fn verify_moments_merge(case: &Case, refs: &[Channel], got: &MergeRun) -> Verdict {
    let c = case.shape.c;
    ensure!(got.whole.len() == c, "moments length");
    ensure!(
        got.parts.iter().all(|p| p.len() == c),
        "part moments length"
    );
    for (c, r) in refs.iter().enumerate() {
        let merged = got.parts[0][c].merge(got.parts[1][c]);
        let whole = got.whole[c];
        ensure!(merged.count == whole.count, "merged count of {c}");
        if !r.finite {
            continue;
        }
        let want = (whole.mean, whole.variance());
        moments_close(&format!("merged channel {c}"), merged, want, r, 2.0)?;
    }
    Ok(())
}

/// Every path ([`on_paths`]) or the one `which` picks.
pub fn check_moments_merge(data: &[u8], which: Option<usize>) {
    let Some(case) = decode(data) else { return };
    let refs = channels(&case);
    each_path(which, || {
        verify_moments_merge(&case, &refs, &run_moments_merge(&case))
    });
}

/// One call of the backward pass, with the saved statistics it was given.
#[derive(Clone, Debug)]
pub struct BackwardRun {
    pub dx: Vec<f32>,
    pub grads: Gradients<f32>,
}

/// The saved statistics of training's forward pass on `case` (on the current path).
pub fn saved_stats(case: &Case) -> SavedStats<f32> {
    let mut y = vec![0.0f32; case.x.len()];
    case.layer
        .clone()
        .forward_train(&case.x, &mut y, case.shape, case.layout)
        .expect("training")
}

pub fn run_backward(case: &Case, saved: &SavedStats<f32>) -> BackwardRun {
    let (shape, layout, layer, x, dy) = (case.shape, case.layout, &case.layer, &case.x, &case.dy);
    let mut dx = vec![0.0f32; x.len()];
    let grads = layer
        .backward(x, dy, saved, &mut dx, shape, layout)
        .expect("backward");
    BackwardRun { dx, grads }
}

/// The backward pass against the oracle, with the tolerances of `tests/backward.rs`: relative
/// to the terms that are summed, since the results may cancel; a channel with a non-finite
/// input gets NaN gradients.
pub fn verify_backward(
    case: &Case,
    refs: &[Channel],
    saved: &SavedStats<f32>,
    want: &oracle::Backward,
    got: &BackwardRun,
) -> Verdict {
    let (shape, layout, layer, x, dy) = (case.shape, case.layout, &case.layer, &case.x, &case.dy);
    ensure!(got.dx.len() == x.len(), "dx length");
    ensure!(
        got.grads.weight.len() == shape.c && got.grads.bias.len() == shape.c,
        "gradient lengths"
    );
    let m = (shape.n * shape.spatial) as f64;
    for (c, r) in refs.iter().enumerate() {
        if !r.finite {
            ensure!(
                got.grads.weight[c].is_nan(),
                "dweight of non-finite channel {c}"
            );
            channel_nan(&got.dx, shape, layout, c, "dx")?;
            continue;
        }
        let is = saved.invstd[c] as f64;
        let spread = indices(shape, layout, c).all(|i| centrable(x[i], r));
        if !spread || !is.is_finite() || r.var <= 1e-30 {
            continue;
        }
        let mean = saved.mean[c] as f64;
        let (mut sum_dy, mut sum_dy_xhat) = (0.0, 0.0);
        for i in indices(shape, layout, c) {
            let d = dy[i] as f64;
            sum_dy += d.abs();
            sum_dy_xhat += (d * (x[i] as f64 - mean) * is).abs();
        }
        let (db, dw) = (got.grads.bias[c] as f64, got.grads.weight[c] as f64);
        ensure!(
            close(db, want.bias[c], 1e-5 * (1.0 + sum_dy)),
            "dbias of {c}: {db} vs {}",
            want.bias[c]
        );
        ensure!(
            close(dw, want.weight[c], 1e-5 * (1.0 + sum_dy_xhat)),
            "dweight of {c}: {dw} vs {}",
            want.weight[c]
        );
        let w = layer.weight[c] as f64;
        for i in indices(shape, layout, c) {
            let xhat = (x[i] as f64 - mean) * is;
            let scale = (w * is * dy[i] as f64).abs()
                + (w * is / m * xhat * want.weight[c]).abs()
                + (w * is / m * want.bias[c]).abs();
            let (g, wv) = (got.dx[i] as f64, want.dx[i]);
            ensure!(
                close(g, wv, 1e-5 * (1.0 + scale)),
                "dx[{i}] of {c}: {g} vs {wv}"
            );
        }
    }
    Ok(())
}

/// Every path ([`on_paths`]) or the one `which` picks.
pub fn check_backward(data: &[u8], which: Option<usize>) {
    let Some(case) = decode(data) else { return };
    if case.shape.n * case.shape.spatial < 2 {
        return;
    }
    let refs = channels(&case);
    let saved = saved_stats(&case);
    let want = oracle::backward(
        &case.layer,
        &case.x,
        &case.dy,
        &saved,
        case.shape,
        case.layout,
    );
    each_path(which, || {
        verify_backward(&case, &refs, &saved, &want, &run_backward(&case, &saved))
    });
}

/// A 16-bit tensor type, with its values in order as integers (for counting units in the last
/// place).
pub trait Half: Data<Param = f32> {
    fn bits16(self) -> u16;
    /// Consecutive values have consecutive numbers; both zeros are 0.
    fn ordered(self) -> i32 {
        let b = self.bits16() as i32;
        if b & 0x8000 != 0 {
            -(b & 0x7fff)
        } else {
            b
        }
    }
}

impl Half for f16 {
    fn bits16(self) -> u16 {
        self.to_bits()
    }
}

impl Half for bf16 {
    fn bits16(self) -> u16 {
        self.to_bits()
    }
}

/// A case's tensors rounded to a 16-bit type (the layer stays `f32`).
#[derive(Clone, Debug)]
pub struct HalfCase<D> {
    pub case: Case,
    pub x: Vec<D>,
    pub dy: Vec<D>,
}

impl<D: Half> HalfCase<D> {
    pub fn of(case: Case) -> Self {
        let x = case.x.iter().map(|&v| D::from_f64(v as f64)).collect();
        let dy = case.dy.iter().map(|&v| D::from_f64(v as f64)).collect();
        HalfCase { case, x, dy }
    }
}

/// Inference, training and backward on 16-bit tensors.
#[derive(Clone, Debug)]
pub struct HalfRun<D> {
    pub eval: Vec<D>,
    pub eval_in_place: Vec<D>,
    pub train: Vec<D>,
    pub train_in_place: Vec<D>,
    pub saved: Result<SavedStats<f32>, Error>,
    pub dx: Vec<D>,
}

pub fn run_half<D: Half>(h: &HalfCase<D>) -> HalfRun<D> {
    let (shape, layout, layer) = (h.case.shape, h.case.layout, &h.case.layer);
    let mut eval = vec![D::default(); h.x.len()];
    layer
        .forward_eval(&h.x, &mut eval, shape, layout)
        .expect("eval");
    let mut eval_in_place = h.x.clone();
    layer
        .forward_eval_in_place(&mut eval_in_place, shape, layout)
        .expect("eval in place");
    let mut train = vec![D::default(); h.x.len()];
    let saved = layer.clone().forward_train(&h.x, &mut train, shape, layout);
    let mut train_in_place = h.x.clone();
    let _ = layer
        .clone()
        .forward_train_in_place(&mut train_in_place, shape, layout);
    let mut dx = vec![D::default(); h.x.len()];
    if let Ok(saved) = &saved {
        layer
            .backward(&h.x, &h.dy, saved, &mut dx, shape, layout)
            .expect("backward");
    }
    HalfRun {
        eval,
        eval_in_place,
        train,
        train_in_place,
        saved,
        dx,
    }
}

/// Output `g` against the reference `w`, whose terms have size `terms`: within one unit in the
/// last place of `w` rounded to `D`, or within the `f32` bound `1e-5 * (1 + terms)` (where the
/// `f32` arithmetic before the rounding cannot do better: the output cancels to far below its
/// terms).
fn half_close<D: Half>(g: D, w: f64, terms: f64) -> bool {
    let rounded = D::from_f64(w);
    let g64 = g.to_f64();
    !g64.is_nan()
        && ((g.ordered() - rounded.ordered()).abs() <= 1 || close(g64, w, 1e-5 * (1.0 + terms)))
}

/// 16-bit tensors: in place and out of place identical; NaN out of a NaN input; elsewhere,
/// where the reference and the `f32` scale exist and the inputs are finite, every output of
/// inference, training and backward within one unit in the last place of the reference (or
/// the `f32` bound where the output cancels).
pub fn verify_half<D: Half>(h: &HalfCase<D>, got: &HalfRun<D>) -> Verdict {
    let (shape, layout, layer) = (h.case.shape, h.case.layout, &h.case.layer);
    let same = |a: &[D], b: &[D]| {
        a.len() == b.len()
            && a.iter()
                .zip(b)
                .all(|(x, y)| x == y || (x.to_f64().is_nan() && y.to_f64().is_nan()))
    };
    ensure!(
        same(&got.eval, &got.eval_in_place),
        "in-place inference differs"
    );
    ensure!(
        got.saved.is_err() || same(&got.train, &got.train_in_place),
        "in-place training differs"
    );
    let x = &h.x;
    let finite = |c: usize| indices(shape, layout, c).all(|i| x[i].to_f64().is_finite());
    let want = oracle::forward_eval(layer, x, shape, layout);
    for c in 0..shape.c {
        let b = layer.bias[c] as f64;
        for i in indices(shape, layout, c) {
            let (g, w) = (got.eval[i], want[i]);
            if x[i].to_f64().is_nan() {
                ensure!(g.to_f64().is_nan(), "eval y[{i}] = {g:?} from a NaN input");
            } else if x[i].to_f64().is_finite() && w.is_finite() {
                let terms = (w - b).abs() + b.abs();
                ensure!(half_close(g, w, terms), "eval y[{i}] {g:?} vs {w:e}");
            }
        }
    }
    let Ok(saved) = &got.saved else {
        return Ok(());
    };
    let want = oracle::forward_train(layer, x, shape, layout);
    let back = oracle::backward(layer, x, &h.dy, saved, shape, layout);
    let stats = oracle::mean_var(x, shape, layout);
    let m = (shape.n * shape.spatial) as f64;
    for (c, &(_, var)) in stats.iter().enumerate() {
        let (w_c, b) = (layer.weight[c] as f64, layer.bias[c] as f64);
        // The scale must exist in f32 (with eps = 0, a constant channel has none).
        let scale_exists = (want.invstd[c] * w_c).abs() < f32::MAX as f64;
        if !finite(c) || !scale_exists || !want.mean[c].is_finite() {
            continue;
        }
        let is = saved.invstd[c] as f64;
        // As for f32 data (`verify_backward`): a distance from the mean beyond f32's range
        // may overflow, and so may the coefficients of dx for a variance below 1e-30.
        let spread = indices(shape, layout, c).all(|i| (x[i].to_f64() - want.mean[c]).abs() < 1e38);
        if !spread || !is.is_finite() || var <= 1e-30 {
            continue;
        }
        for i in indices(shape, layout, c) {
            let (g, w) = (got.train[i], want.y[i]);
            if w.is_finite() {
                let terms = (w - b).abs() + b.abs();
                ensure!(half_close(g, w, terms), "train y[{i}] {g:?} vs {w:e}");
            }
            let xhat = (x[i].to_f64() - saved.mean[c] as f64) * is;
            let terms = (w_c * is * h.dy[i].to_f64()).abs()
                + (w_c * is / m * xhat * back.weight[c]).abs()
                + (w_c * is / m * back.bias[c]).abs();
            let (g, w) = (got.dx[i], back.dx[i]);
            if terms.is_finite() && w.is_finite() && terms < 1e30 {
                ensure!(half_close(g, w, terms), "dx[{i}] {g:?} vs {w:e}");
            }
        }
    }
    Ok(())
}

/// The case as `f16` or `bf16` (its second-to-last byte picks), on every path or the one
/// `which` picks.
pub fn check_half(data: &[u8], which: Option<usize>) {
    let Some(case) = decode(data) else { return };
    if data[data.len() - 2] & 1 == 0 {
        let h = HalfCase::<f16>::of(case);
        each_path(which, || verify_half(&h, &run_half(&h)));
    } else {
        let h = HalfCase::<bf16>::of(case);
        each_path(which, || verify_half(&h, &run_half(&h)));
    }
}

/// A case with a fused epilogue: the residual (when there is one) is either the case's `dy`
/// or its `x` backwards (adversarial values in the residual too), as the input's
/// second-to-last byte picks, which also picks the ReLU.
#[derive(Clone, Debug)]
pub struct FusedCase {
    pub case: Case,
    pub residual: Option<Vec<f32>>,
    pub relu: bool,
}

impl FusedCase {
    pub fn of(case: Case, flags: u8) -> Self {
        let residual = match flags >> 1 & 3 {
            0 => None,
            1 | 2 => Some(case.dy.clone()),
            _ => Some(case.x.iter().rev().copied().collect()),
        };
        FusedCase {
            case,
            residual,
            relu: flags & 1 == 1,
        }
    }

    fn fuse(&self) -> batchnorm::Fuse<'_, f32> {
        batchnorm::Fuse {
            residual: self.residual.as_deref(),
            relu: self.relu,
        }
    }

    /// `relu(y + residual)` in f32, one value at a time: the separate passes.
    pub fn epilogue(&self, y: &[f32]) -> Vec<f32> {
        y.iter()
            .enumerate()
            .map(|(i, &v)| {
                let v = v + self.residual.as_ref().map_or(0.0, |r| r[i]);
                if self.relu && v < 0.0 {
                    0.0
                } else {
                    v
                }
            })
            .collect()
    }
}

/// The fused calls and, on the same path, the plain calls they must equal.
#[derive(Clone, Debug)]
pub struct FusedRun {
    pub eval: Vec<f32>,
    pub eval_in_place: Vec<f32>,
    pub plain_eval: Vec<f32>,
    /// Training: the saved statistics and the layer after the call, fused and plain.
    pub train: Result<(SavedStats<f32>, BatchNorm<f32>), Error>,
    pub plain_train: Result<(SavedStats<f32>, BatchNorm<f32>), Error>,
    pub train_y: Vec<f32>,
    pub train_in_place: Vec<f32>,
    pub plain_train_y: Vec<f32>,
    /// Backward of the fused training: with the residual's gradient, without it, and the
    /// plain backward of the masked `dy`.
    pub dx: Vec<f32>,
    pub d_residual: Vec<f32>,
    pub dx_alone: Vec<f32>,
    pub plain_dx: Vec<f32>,
    pub grads: Vec<Gradients<f32>>,
}

pub fn run_fused(h: &FusedCase) -> FusedRun {
    let (shape, layout, layer, x) = (h.case.shape, h.case.layout, &h.case.layer, &h.case.x);
    let len = x.len();
    let fuse = h.fuse();
    let mut eval = vec![0.0f32; len];
    let mut eval_in_place = x.clone();
    let mut plain_eval = vec![0.0f32; len];
    layer
        .forward_eval_fused(x, &mut eval, shape, layout, fuse)
        .expect("fused inference");
    layer
        .forward_eval_fused_in_place(&mut eval_in_place, shape, layout, fuse)
        .expect("fused inference in place");
    layer
        .forward_eval(x, &mut plain_eval, shape, layout)
        .expect("inference");
    type Train<'a> =
        &'a dyn Fn(&mut BatchNorm<f32>, &mut Vec<f32>) -> Result<SavedStats<f32>, Error>;
    let train_with = |y: &mut Vec<f32>, f: Train<'_>| {
        let mut bn = layer.clone();
        f(&mut bn, y).map(|saved| (saved, bn))
    };
    let (mut train_y, mut train_in_place, mut plain_train_y) =
        (vec![0.0f32; len], x.clone(), vec![0.0f32; len]);
    let train = train_with(&mut train_y, &|bn, y| {
        bn.forward_train_fused(x, y, shape, layout, fuse)
    });
    let in_place = train_with(&mut train_in_place, &|bn, y| {
        bn.forward_train_fused_in_place(y, shape, layout, fuse)
    });
    assert_eq!(
        train.is_ok(),
        in_place.is_ok(),
        "in place refused differently"
    );
    let plain_train = train_with(&mut plain_train_y, &|bn, y| {
        bn.forward_train(x, y, shape, layout)
    });
    let mut run = FusedRun {
        eval,
        eval_in_place,
        plain_eval,
        train,
        plain_train,
        train_y,
        train_in_place,
        plain_train_y,
        dx: vec![],
        d_residual: vec![],
        dx_alone: vec![],
        plain_dx: vec![],
        grads: vec![],
    };
    let Ok((saved, _)) = &run.train else {
        return run;
    };
    let (y, dy) = (&run.train_y, &h.case.dy);
    let masked: Vec<f32> = dy
        .iter()
        .zip(y)
        .map(|(&d, &y)| if h.relu && y <= 0.0 { 0.0 } else { d })
        .collect();
    let (mut dx, mut d_residual, mut dx_alone, mut plain_dx) = (
        vec![0.0f32; len],
        vec![0.0f32; len],
        vec![0.0f32; len],
        vec![0.0f32; len],
    );
    let relu = h.relu;
    let back = |dx: &mut [f32], dr: Option<&mut [f32]>| {
        layer
            .backward_fused(x, y, dy, saved, dx, dr, shape, layout, relu)
            .expect("fused backward")
    };
    let grads = vec![
        back(&mut dx, Some(&mut d_residual)),
        back(&mut dx_alone, None),
        layer
            .backward(x, &masked, saved, &mut plain_dx, shape, layout)
            .expect("backward"),
    ];
    (
        run.dx,
        run.d_residual,
        run.dx_alone,
        run.plain_dx,
        run.grads,
    ) = (dx, d_residual, dx_alone, plain_dx, grads);
    run
}

/// The fused calls equal the separate passes bit for bit (every NaN as one): inference and
/// training's output are the plain output, then `+ residual`, then the ReLU, in f32 (the
/// epilogue acts on the value the plain call would store); the in-place twins the same;
/// training's statistics and running statistics those of the plain call; the fused backward
/// the plain backward of `dy` masked where `y <= 0`, with the residual's gradient that mask.
/// With the plain calls checked against the oracle (the other targets), this checks the fused
/// ones on every path and every adversarial value.
pub fn verify_fused(h: &FusedCase, got: &FusedRun) -> Verdict {
    let want = bits(&h.epilogue(&got.plain_eval));
    ensure!(bits(&got.eval) == want, "fused inference differs");
    ensure!(
        bits(&got.eval_in_place) == want,
        "fused inference in place differs"
    );
    let (train, plain) = match (&got.train, &got.plain_train) {
        (Ok(a), Ok(b)) => (a, b),
        (Err(a), Err(b)) => {
            ensure!(a == b, "refusals differ: {a:?} vs {b:?}");
            return Ok(());
        }
        (a, b) => return Err(format!("fused {:?} vs plain {:?}", a.is_ok(), b.is_ok())),
    };
    let same_stats = |a: &[f32], b: &[f32]| bits(a) == bits(b);
    ensure!(
        same_stats(&train.0.mean, &plain.0.mean) && same_stats(&train.0.invstd, &plain.0.invstd),
        "saved statistics differ"
    );
    ensure!(
        same_stats(&train.1.running_mean, &plain.1.running_mean)
            && same_stats(&train.1.running_var, &plain.1.running_var)
            && train.1.num_batches_tracked == plain.1.num_batches_tracked,
        "running statistics differ"
    );
    let want = bits(&h.epilogue(&got.plain_train_y));
    ensure!(bits(&got.train_y) == want, "fused training differs");
    ensure!(
        bits(&got.train_in_place) == want,
        "fused training in place differs"
    );
    let masked: Vec<f32> = h
        .case
        .dy
        .iter()
        .zip(&got.train_y)
        .map(|(&d, &y)| if h.relu && y <= 0.0 { 0.0 } else { d })
        .collect();
    ensure!(bits(&got.d_residual) == bits(&masked), "d_residual differs");
    let want = bits(&got.plain_dx);
    ensure!(bits(&got.dx) == want, "fused dx differs");
    ensure!(
        bits(&got.dx_alone) == want,
        "fused dx without d_residual differs"
    );
    for g in &got.grads[..2] {
        ensure!(
            same_stats(&g.weight, &got.grads[2].weight) && same_stats(&g.bias, &got.grads[2].bias),
            "fused gradients differ"
        );
    }
    Ok(())
}

/// The case with the epilogue its second-to-last byte picks, on every path or the one
/// `which` picks.
pub fn check_fused(data: &[u8], which: Option<usize>) {
    let Some(case) = decode(data) else { return };
    let h = FusedCase::of(case, data[data.len() - 2]);
    each_path(which, || verify_fused(&h, &run_fused(&h)));
}
