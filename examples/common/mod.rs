//! What the report and resnet50 examples share: one timing method for an operation and the
//! memory copy it is compared with, the copy itself, and the test data.
#![allow(dead_code)]

use batchnorm::{oracle, BatchNorm, Layout, SavedStats, Shape};
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
    mut op: impl FnMut(),
    mut copy: impl FnMut(),
) -> (Timing, Timing) {
    op();
    copy();
    let (mut a, mut b) = (Vec::new(), Vec::new());
    let start = Instant::now();
    while a.len() < min_calls || (start.elapsed() < budget && a.len() < 1000) {
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
pub fn copy(src: &[f32], dst: &mut [f32], threads: usize) {
    if threads <= 1 || src.len() < 1 << 18 {
        dst.copy_from_slice(src);
    } else {
        let chunk = src.len().div_ceil(threads).next_multiple_of(1024);
        dst.par_chunks_mut(chunk)
            .zip(src.par_chunks(chunk))
            .for_each(|(d, s)| d.copy_from_slice(s));
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
pub fn max_error(y: &[f32], want: &[f64]) -> f64 {
    assert_eq!(y.len(), want.len());
    y.iter()
        .zip(want)
        .map(|(&g, &w)| (g as f64 - w).abs() / (1.0 + w.abs()))
        .fold(0.0, f64::max)
}

/// The value after `flag` on the command line.
pub fn arg<T: std::str::FromStr>(args: &[String], flag: &str) -> Option<T> {
    let i = args.iter().position(|a| a == flag)?;
    args.get(i + 1)?.parse().ok()
}

/// The operations the examples time, and the bytes each moves per element.
pub const OPS: [(&str, f64); 3] = [("eval", 8.0), ("train", 8.0), ("backward", 12.0)];

/// One shape and layout, ready to time: input, output gradient, a layer with running
/// statistics, the oracle's results, and the buffers of the operations and of their copies.
pub struct Case {
    pub shape: Shape,
    pub layout: Layout,
    x: Vec<f32>,
    dy: Vec<f32>,
    y: Vec<f32>,
    dx: Vec<f32>,
    bn: BatchNorm<f32>,
    saved: SavedStats<f32>,
    want: [Vec<f64>; 3],
    dst: Vec<f32>,
    /// The backward copy moves 12 bytes per element: one and a half tensors.
    back_src: Vec<f32>,
    back_dst: Vec<f32>,
}

impl Case {
    pub fn new(shape: Shape, layout: Layout) -> Case {
        let len = shape.numel().expect("shape fits");
        let x = input(len, shape.c);
        let dy = grad(len);
        let mut y = vec![0.0f32; len];
        let mut bn = BatchNorm::<f32>::new(shape.c);
        bn.running_mean = (0..shape.c).map(|c| c as f32).collect();
        bn.running_var = vec![2.0; shape.c];
        let saved = bn.clone().forward_train(&x, &mut y, shape, layout).unwrap();
        let want = [
            oracle::forward_eval(&bn, &x, shape, layout),
            oracle::forward_train(&bn, &x, shape, layout).y,
            oracle::backward(&bn, &x, &dy, &saved, shape, layout).dx,
        ];
        let back_src: Vec<f32> = x.iter().chain(&x[..len / 2]).copied().collect();
        Case {
            shape,
            layout,
            dy,
            y,
            dx: vec![0.0; len],
            bn,
            saved,
            want,
            dst: vec![0.0; len],
            back_dst: vec![0.0; back_src.len()],
            back_src,
            x,
        }
    }

    /// Elements of the tensor.
    pub fn len(&self) -> usize {
        self.x.len()
    }

    /// Times operation `op` of [`OPS`] alternately with its copy on `threads` threads of the
    /// current pool (see [`time_pair`]), then checks its result against the oracle: returns
    /// (op, copy, largest error).
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
                _ => {
                    bn.backward(x, dy, saved, dx, shape, layout).unwrap();
                }
            },
            || match op {
                "backward" => copy(back_src, back_dst, threads),
                _ => copy(x, dst, threads),
            },
        );
        let err = match op {
            "eval" => max_error(&self.y, &self.want[0]),
            "train" => max_error(&self.y, &self.want[1]),
            _ => max_error(&self.dx, &self.want[2]),
        };
        (timing, copy_t, err)
    }
}
