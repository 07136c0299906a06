//! What the report and resnet50 examples share: one timing method for an operation and the
//! memory copy it is compared with, the copy itself, and the test data.
#![allow(dead_code)]

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
