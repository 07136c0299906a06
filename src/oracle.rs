//! The scalar reference: every public operation computed the plain way, two passes, in `f64`.
//!
//! It shares nothing with the kernels but the types, and is kept deliberately simple so that it
//! can be trusted by reading it. Tests, the fuzz targets and the report example compare every
//! fast path with it. It expects valid input (check it with the layer first) and panics on
//! lengths that do not match the shape.

use crate::element::Element;
use crate::layer::BatchNorm;
use crate::shape::{Layout, Shape};

/// Mean and biased variance of every channel, by (corrected) two passes in `f64`.
pub fn mean_var<T: Element>(x: &[T], shape: Shape, layout: Layout) -> Vec<(f64, f64)> {
    (0..shape.c)
        .map(|c| {
            let values = channel(x, shape, layout, c);
            let n = values.len() as f64;
            // The corrected two-pass algorithm: the second pass also removes the rounding
            // error of the first mean, which a plain f64 sum of thousands of values has.
            let rough = values.iter().sum::<f64>() / n;
            let mean = rough + values.iter().map(|v| v - rough).sum::<f64>() / n;
            let var = values.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / n;
            (mean, var)
        })
        .collect()
}

/// The values of channel `c`, widened to `f64`.
pub fn channel<T: Element>(x: &[T], shape: Shape, layout: Layout, c: usize) -> Vec<f64> {
    let mut out = Vec::with_capacity(shape.n * shape.spatial);
    for n in 0..shape.n {
        for s in 0..shape.spatial {
            out.push(x[shape.index(layout, n, c, s)].to_f64());
        }
    }
    out
}

/// `y[i] = f(channel of i, x[i])` for every element.
pub fn map<T: Element>(
    x: &[T],
    shape: Shape,
    layout: Layout,
    f: impl Fn(usize, f64) -> f64,
) -> Vec<f64> {
    let mut y = vec![0.0; x.len()];
    for n in 0..shape.n {
        for c in 0..shape.c {
            for s in 0..shape.spatial {
                let i = shape.index(layout, n, c, s);
                y[i] = f(c, x[i].to_f64());
            }
        }
    }
    y
}

/// What training's forward pass computes, in `f64`.
#[derive(Clone, Debug, PartialEq)]
pub struct Train {
    /// The normalized output.
    pub y: Vec<f64>,
    /// Batch mean per channel.
    pub mean: Vec<f64>,
    /// `1 / sqrt(biased var + eps)` per channel.
    pub invstd: Vec<f64>,
    /// Running mean after the update.
    pub running_mean: Vec<f64>,
    /// Running variance after the update.
    pub running_var: Vec<f64>,
    /// `num_batches_tracked` after the update.
    pub num_batches_tracked: u64,
}

/// Training's forward pass of `layer` on `x`, without changing the layer.
pub fn forward_train<T: Element>(
    layer: &BatchNorm<T>,
    x: &[T],
    shape: Shape,
    layout: Layout,
) -> Train {
    let stats = mean_var(x, shape, layout);
    let count = (shape.n * shape.spatial) as f64;
    let mean: Vec<f64> = stats.iter().map(|s| s.0).collect();
    let invstd: Vec<f64> = stats
        .iter()
        .map(|s| 1.0 / (s.1 + layer.eps).sqrt())
        .collect();
    let y = map(x, shape, layout, |c, v| {
        (v - mean[c]) * invstd[c] * layer.weight[c].to_f64() + layer.bias[c].to_f64()
    });
    let num_batches_tracked = layer.num_batches_tracked + 1;
    let factor = layer.momentum.unwrap_or(1.0 / num_batches_tracked as f64);
    let running_mean = (0..shape.c)
        .map(|c| (1.0 - factor) * layer.running_mean[c].to_f64() + factor * mean[c])
        .collect();
    let running_var = (0..shape.c)
        .map(|c| {
            let var = if layer.unbiased_running_var {
                stats[c].1 * count / (count - 1.0)
            } else {
                stats[c].1
            };
            (1.0 - factor) * layer.running_var[c].to_f64() + factor * var
        })
        .collect();
    Train {
        y,
        mean,
        invstd,
        running_mean,
        running_var,
        num_batches_tracked,
    }
}

/// Inference of `layer` on `x`: `(x - running_mean) / sqrt(running_var + eps) * weight + bias`.
pub fn forward_eval<T: Element>(
    layer: &BatchNorm<T>,
    x: &[T],
    shape: Shape,
    layout: Layout,
) -> Vec<f64> {
    map(x, shape, layout, |c, v| {
        let invstd = 1.0 / (layer.running_var[c].to_f64() + layer.eps).sqrt();
        (v - layer.running_mean[c].to_f64()) * invstd * layer.weight[c].to_f64()
            + layer.bias[c].to_f64()
    })
}

/// `x * scale[c] + shift[c]`.
pub fn apply_scale_shift<T: Element>(
    x: &[T],
    scale: &[T],
    shift: &[T],
    shape: Shape,
    layout: Layout,
) -> Vec<f64> {
    map(x, shape, layout, |c, v| {
        v * scale[c].to_f64() + shift[c].to_f64()
    })
}
