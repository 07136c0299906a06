//! What the report and resnet50 examples share: one timing method for an operation and the
//! memory copy it is compared with, the copy itself, and the test data.
#![allow(dead_code)]

use batchnorm::{oracle, BatchNorm, Data, Element, Fuse, Layout, SavedStats, Shape};
use rayon::prelude::*;
use std::time::{Duration, Instant};

/// ResNet-50's batch norms (torchvision, 224x224 input): (channels, height = width, how many
/// layers of that shape); 53 layers in all.
pub const RESNET50: [(usize, usize, usize); 12] = [
    (64, 112, 1),
    (64, 56, 6),
    (256, 56, 4),
    (128, 56, 1),
    (128, 28, 7),
    (512, 28, 5),
    (256, 28, 1),
    (256, 14, 11),
    (1024, 14, 7),
    (512, 14, 1),
    (512, 7, 5),
    (2048, 7, 4),
];

/// Median and minimum of repeated calls.
#[derive(Clone, Copy, Debug, Default)]
pub struct Timing {
    pub median: Duration,
    pub min: Duration,
}

impl Timing {
    fn of(mut samples: Vec<Duration>) -> Timing {
        samples.sort();
        Timing {
            median: samples[samples.len() / 2],
            min: samples[0],
        }
    }

    /// GB/s for `bytes` moved in the median time.
    pub fn gbs(&self, bytes: f64) -> f64 {
        bytes / self.median.as_secs_f64() / 1e9
    }
}

/// Times `op` and `copy` called alternately (so that both see the same machine load, the
/// same buffers and the same caches) until `budget` is spent: one warm-up call each, then at
/// least `min_calls` and at most 1000 calls each. Returns (op, copy).
pub fn time_pair(
    budget: Duration,
    min_calls: usize,
    op: impl FnMut(),
    copy: impl FnMut(),
) -> (Timing, Timing) {
    time_pair_after(budget, min_calls, || {}, op, copy)
}

/// [`time_pair`] with `before` called ahead of each call of `op`, untimed (an [`Evict`]).
pub fn time_pair_after(
    budget: Duration,
    min_calls: usize,
    mut before: impl FnMut(),
    mut op: impl FnMut(),
    mut copy: impl FnMut(),
) -> (Timing, Timing) {
    op();
    copy();
    let (mut a, mut b) = (Vec::new(), Vec::new());
    let start = Instant::now();
    while a.len() < min_calls || (start.elapsed() < budget && a.len() < 1000) {
        before();
        let t = Instant::now();
        op();
        a.push(t.elapsed());
        let t = Instant::now();
        copy();
        b.push(t.elapsed());
    }
    (Timing::of(a), Timing::of(b))
}

/// `dst.copy_from_slice(src)` on `threads` threads of the current rayon pool: the baseline
/// every operation is compared with, run with the same thread count as the operation. Below
/// 1 MiB a single thread copies faster than several, and does.
pub fn copy<D: Copy + Send + Sync>(src: &[D], dst: &mut [D], threads: usize) {
    if threads <= 1 || std::mem::size_of_val(src) < 1 << 20 {
        dst.copy_from_slice(src);
    } else {
        let chunk = src.len().div_ceil(threads).next_multiple_of(1024);
        dst.par_chunks_mut(chunk)
            .zip(src.par_chunks(chunk))
            .for_each(|(d, s)| d.copy_from_slice(s));
    }
}

/// A buffer of twice the largest cache (from Linux's sysfs; 64 MiB where it does not say),
/// read through to push everything else out of the caches: what a row whose data would
/// otherwise stay in the last-level cache between calls runs after, so that it reads memory
/// as the call it is compared with does.
pub struct Evict(Vec<u64>);

impl Evict {
    pub fn new() -> Evict {
        let largest = (0..8)
            .filter_map(|i| {
                let path = format!("/sys/devices/system/cpu/cpu0/cache/index{i}/size");
                let text = std::fs::read_to_string(path).ok()?;
                let text = text.trim();
                let (digits, unit) = text.split_at(text.find(|c: char| !c.is_ascii_digit())?);
                let scale = match unit {
                    "K" => 1 << 10,
                    "M" => 1 << 20,
                    _ => return None,
                };
                Some(digits.parse::<usize>().ok()? * scale)
            })
            .max()
            .unwrap_or(32 << 20);
        Evict((0..2 * largest / 8).map(|i| i as u64).collect())
    }

    /// Reads the whole buffer.
    pub fn run(&self) {
        std::hint::black_box(self.0.iter().fold(0, |a, &w| a ^ w));
    }
}

impl Default for Evict {
    fn default() -> Self {
        Evict::new()
    }
}

/// Deterministic input whose channels have different means: element `i` of a tensor of `c`
/// channels.
pub fn input(len: usize, c: usize) -> Vec<f32> {
    (0..len)
        .map(|i| ((i * 7919) % 1009) as f32 * 0.01 - 3.0 + (i % c.max(1)) as f32)
        .collect()
}

/// Deterministic output gradient.
pub fn grad(len: usize) -> Vec<f32> {
    (0..len)
        .map(|i| ((i * 31) % 17) as f32 * 0.1 - 0.8)
        .collect()
}

/// Largest `|y - want| / (1 + |want|)`.
pub fn max_error<D: Data>(y: &[D], want: &[f64]) -> f64 {
    assert_eq!(y.len(), want.len());
    y.iter()
        .zip(want)
        .map(|(&g, &w)| (g.to_f64() - w).abs() / (1.0 + w.abs()))
        .fold(0.0, f64::max)
}

/// The largest [`max_error`] an output of type `D` may have: 1e-5 for `f32` (the crate's
/// bound), one unit in the last place of a value near 1 for the 16-bit types (`2^-10` for
/// `f16`, `2^-7` for `bf16`, whose outputs are within one unit of the reference).
pub fn error_bound<D: Data>() -> f64 {
    match std::any::type_name::<D>() {
        n if n.ends_with("bf16") => 2f64.powi(-7),
        n if n.ends_with("f16") => 2f64.powi(-10),
        _ => 1e-5,
    }
}

/// The name of the tensor type `D`: `f32`, `f16`, `bf16`.
pub fn type_name<D: Data>() -> &'static str {
    let n = std::any::type_name::<D>();
    n.rsplit("::").next().unwrap_or(n)
}

/// The value after `flag` on the command line.
pub fn arg<T: std::str::FromStr>(args: &[String], flag: &str) -> Option<T> {
    let i = args.iter().position(|a| a == flag)?;
    args.get(i + 1)?.parse().ok()
}

/// The operations the examples time, and the tensors each moves (x read and y written: 2;
/// backward reads x and dy and writes dx: 3).
pub const OPS: [(&str, f64); 3] = [("eval", 2.0), ("train", 2.0), ("backward", 3.0)];

/// Training in place (`forward_train_in_place`, the output over the input: one tensor read
/// and written), timed by [`Case::time`] on a buffer that each call normalizes again (the
/// same memory traffic) and checked on one call over a fresh copy of the input.
pub const IN_PLACE_OPS: [(&str, f64); 1] = [("train in place", 2.0)];

/// One shape and layout, ready to time: input, output gradient, a layer with running
/// statistics, the oracle's results, and the buffers of the operations and of their copies.
pub struct Case<D: Data = f32> {
    pub shape: Shape,
    pub layout: Layout,
    x: Vec<D>,
    dy: Vec<D>,
    y: Vec<D>,
    dx: Vec<D>,
    bn: BatchNorm<D::Param>,
    saved: SavedStats<D::Param>,
    want: [Vec<f64>; 3],
    dst: Vec<D>,
    /// The backward copy moves three tensors' bytes: one and a half tensors each way.
    back_src: Vec<D>,
    back_dst: Vec<D>,
    /// The fused operations' buffers, made by their first call.
    fused: Option<Fused<D>>,
}

/// The fused operations of ResNet's blocks, timed against the same work as separate passes.
/// (op, tensors moved: residual and x read and y written for the forward passes; x, y and dy
/// read and dx and the residual's gradient written for backward).
/// `backward+relu` is the backward of a batch norm + ReLU (no residual's gradient).
pub const FUSED_OPS: [(&str, f64); 11] = [
    ("eval+relu", 2.0),
    ("train+relu", 2.0),
    ("eval+add+relu", 3.0),
    ("eval, add, relu", 3.0),
    ("train+add+relu", 3.0),
    ("train, add, relu", 3.0),
    ("backward+relu", 4.0),
    ("backward+add+relu", 5.0),
    ("relu, backward", 5.0),
    // A read of the residual's bytes alone, nothing written: what the residual adds to
    // training's memory traffic, timed as the rest is but for one thing: the caches are
    // emptied before each call ([`Evict`]), since the fused training reads the residual from
    // memory (its `x` and `y` push it out). Alternated with its copy alone, a 25.7 MB
    // residual stayed in part in a 32 MiB L3 (Zen 4: 0.87-0.90 ms against 1.11-1.15 ms read
    // from memory).
    ("read residual", 1.0),
    // The plain training forward, then that read, as one sequence: the same work as the two
    // rows before, without the read alone's advantage of a memory with no writes pending.
    ("train, read residual", 3.0),
];

/// Buffers and references of the fused operations.
struct Fused<D> {
    residual: Vec<D>,
    /// The fused training forward's output (the backward's `y`).
    yf: Vec<D>,
    dr: Vec<D>,
    /// A copy of two and a half tensors each way (up to 5 tensors moved).
    src: Vec<D>,
    dst: Vec<D>,
    /// The references of eval and train with a residual, backward, eval and train without.
    want: [Vec<f64>; 5],
    /// Run before each `read residual`: see [`FUSED_OPS`].
    evict: Evict,
}

/// Reads every byte of `x` once (an exclusive or of its 8-byte words) and writes nothing, on
/// `threads` threads of the current pool as [`copy`] does.
fn read_pass<D: Data>(x: &[D], threads: usize) -> u64 {
    let one = |x: &[D]| {
        // SAFETY: every `Data` type is a plain floating-point number (f32, f64, f16, bf16):
        // no padding, so each of its bytes is initialized and may be read as an integer.
        let (head, words, tail) = unsafe { x.align_to::<u64>() };
        let edge = |part: &[D]| part.len() as u64;
        words.iter().fold(edge(head) ^ edge(tail), |a, &w| a ^ w)
    };
    if threads <= 1 || std::mem::size_of_val(x) < 1 << 20 {
        one(x)
    } else {
        let chunk = x.len().div_ceil(threads).next_multiple_of(1024);
        x.par_chunks(chunk).map(one).reduce(|| 0, |a, b| a ^ b)
    }
}

/// `y += r`, one element at a time: a separate pass of the unfused work.
fn add_pass<D: Data>(y: &mut [D], r: &[D]) {
    for (y, r) in y.iter_mut().zip(r) {
        *y = D::from_param(y.to_param() + r.to_param());
    }
}

/// `y = max(y, 0)`, one element at a time.
fn relu_pass<D: Data>(y: &mut [D]) {
    for y in y.iter_mut() {
        if y.to_param() < D::Param::ZERO {
            *y = D::from_param(D::Param::ZERO);
        }
    }
}

impl<D: Data> Case<D> {
    pub fn new(shape: Shape, layout: Layout) -> Case<D> {
        let len = shape.numel().expect("shape fits");
        let half =
            |v: Vec<f32>| -> Vec<D> { v.into_iter().map(|v| D::from_f64(v as f64)).collect() };
        let x = half(input(len, shape.c));
        let dy = half(grad(len));
        let mut y = vec![D::default(); len];
        let mut bn = BatchNorm::<D::Param>::new(shape.c);
        bn.running_mean = (0..shape.c).map(|c| D::Param::from_f64(c as f64)).collect();
        bn.running_var = vec![D::Param::from_f64(2.0); shape.c];
        let saved = bn.clone().forward_train(&x, &mut y, shape, layout).unwrap();
        let want = [
            oracle::forward_eval(&bn, &x, shape, layout),
            oracle::forward_train(&bn, &x, shape, layout).y,
            oracle::backward(&bn, &x, &dy, &saved, shape, layout).dx,
        ];
        let back_src: Vec<D> = x.iter().chain(&x[..len / 2]).copied().collect();
        Case {
            shape,
            layout,
            dy,
            y,
            dx: vec![D::default(); len],
            bn,
            saved,
            want,
            dst: vec![D::default(); len],
            back_dst: vec![D::default(); back_src.len()],
            back_src,
            x,
            fused: None,
        }
    }

    /// Times fused operation `op` of [`FUSED_OPS`] as [`Case::time`] times the plain ones.
    pub fn time_fused(
        &mut self,
        op: &str,
        threads: usize,
        budget: Duration,
        min_calls: usize,
    ) -> (Timing, Timing, f64) {
        let (shape, layout, len) = (self.shape, self.layout, self.x.len());
        if self.fused.is_none() {
            let residual: Vec<D> = grad(len)
                .into_iter()
                .map(|v| D::from_f64(v as f64 * 2.0))
                .collect();
            let mut yf = vec![D::default(); len];
            let fuse = Fuse::add_relu(&residual[..]);
            let saved = self
                .bn
                .clone()
                .forward_train_fused(&self.x, &mut yf, shape, layout, fuse)
                .unwrap();
            let r = Some(&residual[..]);
            let want = [
                oracle::epilogue(
                    &oracle::forward_eval(&self.bn, &self.x, shape, layout),
                    r,
                    true,
                ),
                oracle::epilogue(
                    &oracle::forward_train(&self.bn, &self.x, shape, layout).y,
                    r,
                    true,
                ),
                oracle::backward_fused(
                    &self.bn, &self.x, &yf, &self.dy, &saved, shape, layout, true,
                )
                .0
                .dx,
                oracle::epilogue::<D>(
                    &oracle::forward_eval(&self.bn, &self.x, shape, layout),
                    None,
                    true,
                ),
                oracle::epilogue::<D>(
                    &oracle::forward_train(&self.bn, &self.x, shape, layout).y,
                    None,
                    true,
                ),
            ];
            let src: Vec<D> = self
                .x
                .iter()
                .chain(&self.x)
                .chain(&self.x[..len / 2])
                .copied()
                .collect();
            self.fused = Some(Fused {
                dr: vec![D::default(); len],
                dst: vec![D::default(); src.len()],
                src,
                residual,
                yf,
                want,
                evict: Evict::new(),
            });
        }
        let Case {
            x,
            dy,
            y,
            dx,
            bn,
            fused,
            ..
        } = self;
        let f = fused.as_mut().expect("made above");
        let Fused {
            residual,
            yf,
            dr,
            src,
            dst,
            evict,
            ..
        } = f;
        let saved = self.saved.clone();
        let tensors = FUSED_OPS.iter().find(|o| o.0 == op).expect("a fused op").1;
        let bytes = (tensors * len as f64 / 2.0) as usize;
        let mut layer = bn.clone();
        let (timing, copy_t) = time_pair_after(
            budget,
            min_calls,
            || {
                if op == "read residual" {
                    evict.run()
                }
            },
            || match op {
                "eval+relu" => bn
                    .forward_eval_fused(x, y, shape, layout, Fuse::relu())
                    .unwrap(),
                "train+relu" => {
                    layer
                        .forward_train_fused(x, y, shape, layout, Fuse::relu())
                        .unwrap();
                }
                "eval+add+relu" => bn
                    .forward_eval_fused(x, y, shape, layout, Fuse::add_relu(&residual[..]))
                    .unwrap(),
                "eval, add, relu" => {
                    bn.forward_eval(x, y, shape, layout).unwrap();
                    add_pass(y, residual);
                    relu_pass(y);
                }
                "train+add+relu" => {
                    layer
                        .forward_train_fused(x, y, shape, layout, Fuse::add_relu(&residual[..]))
                        .unwrap();
                }
                "train, add, relu" => {
                    layer.forward_train(x, y, shape, layout).unwrap();
                    add_pass(y, residual);
                    relu_pass(y);
                }
                "backward+relu" => {
                    bn.backward_fused(
                        x,
                        yf,
                        dy,
                        &saved,
                        dx,
                        Some(&mut dr[..]),
                        shape,
                        layout,
                        true,
                    )
                    .unwrap();
                }
                "read residual" => {
                    std::hint::black_box(read_pass(residual, threads));
                }
                "train, read residual" => {
                    layer.forward_train(x, y, shape, layout).unwrap();
                    std::hint::black_box(read_pass(residual, threads));
                }
                _ => {
                    for ((o, &d), &y) in dr.iter_mut().zip(dy.iter()).zip(yf.iter()) {
                        *o = if y.to_param() <= D::Param::ZERO {
                            D::from_param(D::Param::ZERO)
                        } else {
                            d
                        };
                    }
                    bn.backward(x, dr, &saved, dx, shape, layout).unwrap();
                }
            },
            || copy(&src[..bytes], &mut dst[..bytes], threads),
        );
        let want = &self.fused.as_ref().expect("made above").want;
        let err = match op {
            "eval+relu" => max_error(&self.y, &want[3]),
            "train+relu" => max_error(&self.y, &want[4]),
            "eval+add+relu" | "eval, add, relu" => max_error(&self.y, &want[0]),
            "train+add+relu" | "train, add, relu" => max_error(&self.y, &want[1]),
            "read residual" => 0.0,
            "train, read residual" => max_error(&self.y, &self.want[1]),
            _ => max_error(&self.dx, &want[2]),
        };
        (timing, copy_t, err)
    }

    /// Elements of the tensor.
    pub fn len(&self) -> usize {
        self.x.len()
    }

    /// Times operation `op` of [`OPS`] or [`IN_PLACE_OPS`] alternately with its copy on
    /// `threads` threads of the current pool (see [`time_pair`]), then checks its result
    /// against the oracle: returns (op, copy, largest error).
    pub fn time(
        &mut self,
        op: &str,
        threads: usize,
        budget: Duration,
        min_calls: usize,
    ) -> (Timing, Timing, f64) {
        let Case {
            shape,
            layout,
            x,
            dy,
            y,
            dx,
            bn,
            saved,
            dst,
            back_src,
            back_dst,
            ..
        } = self;
        let (shape, layout) = (*shape, *layout);
        let mut layer = bn.clone();
        let (timing, copy_t) = time_pair(
            budget,
            min_calls,
            || match op {
                "eval" => bn.forward_eval(x, y, shape, layout).unwrap(),
                "train" => {
                    layer.forward_train(x, y, shape, layout).unwrap();
                }
                "train in place" => {
                    layer.forward_train_in_place(y, shape, layout).unwrap();
                }
                _ => {
                    bn.backward(x, dy, saved, dx, shape, layout).unwrap();
                }
            },
            || match op {
                "backward" => copy(back_src, back_dst, threads),
                _ => copy(x, dst, threads),
            },
        );
        if op == "train in place" {
            self.y.copy_from_slice(&self.x);
            let mut layer = self.bn.clone();
            layer
                .forward_train_in_place(&mut self.y, shape, layout)
                .unwrap();
        }
        let err = match op {
            "eval" => max_error(&self.y, &self.want[0]),
            "train" | "train in place" => max_error(&self.y, &self.want[1]),
            _ => max_error(&self.dx, &self.want[2]),
        };
        (timing, copy_t, err)
    }
}
