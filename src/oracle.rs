//! The scalar reference: every public operation computed the plain way, two passes, in `f64`.
//!
//! It shares nothing with the kernels but the types, and is kept deliberately simple so that it
//! can be trusted by reading it. Inputs of any [`Data`] type are widened to `f64` exactly;
//! outputs are `f64`, and [`round`] gives what a correctly rounded kernel would store. Tests, the fuzz targets and the report example compare every
//! fast path with it. It expects valid input (check it with the layer first) and panics on
//! lengths that do not match the shape.

use crate::element::Data;
use crate::layer::{BatchNorm, SavedStats};
use crate::shape::{Layout, Shape};

/// Mean and biased variance of every channel, by (corrected) two passes in `f64`.
pub fn mean_var<D: Data>(x: &[D], shape: Shape, layout: Layout) -> Vec<(f64, f64)> {
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
pub fn channel<D: Data>(x: &[D], shape: Shape, layout: Layout, c: usize) -> Vec<f64> {
    let mut out = Vec::with_capacity(shape.n * shape.spatial);
    for n in 0..shape.n {
        for s in 0..shape.spatial {
            out.push(x[shape.index(layout, n, c, s)].to_f64());
        }
    }
    out
}

/// `y[i] = f(channel of i, x[i])` for every element.
pub fn map<D: Data>(
    x: &[D],
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
pub fn forward_train<D: Data>(
    layer: &BatchNorm<D::Param>,
    x: &[D],
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
pub fn forward_eval<D: Data>(
    layer: &BatchNorm<D::Param>,
    x: &[D],
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
pub fn apply_scale_shift<D: Data>(
    x: &[D],
    scale: &[D::Param],
    shift: &[D::Param],
    shape: Shape,
    layout: Layout,
) -> Vec<f64> {
    map(x, shape, layout, |c, v| {
        v * scale[c].to_f64() + shift[c].to_f64()
    })
}

/// What the backward pass computes, in `f64`.
#[derive(Clone, Debug, PartialEq)]
pub struct Backward {
    /// Input gradient.
    pub dx: Vec<f64>,
    /// `dweight` per channel.
    pub weight: Vec<f64>,
    /// `dbias` per channel.
    pub bias: Vec<f64>,
}

/// Training's backward pass with the given batch statistics (`saved`, widened to `f64`):
/// `dbias = Σ dy`, `dweight = Σ dy * xhat`,
/// `dx = weight * invstd / M * (M * dy - dbias - xhat * dweight)`.
pub fn backward<D: Data>(
    layer: &BatchNorm<D::Param>,
    x: &[D],
    dy: &[D],
    saved: &SavedStats<D::Param>,
    shape: Shape,
    layout: Layout,
) -> Backward {
    let mean: Vec<f64> = saved.mean.iter().map(|v| v.to_f64()).collect();
    let invstd: Vec<f64> = saved.invstd.iter().map(|v| v.to_f64()).collect();
    backward_with(layer, x, dy, &mean, &invstd, true, shape, layout)
}

/// Inference's backward pass: the running statistics are constants, `dx = dy * weight *
/// invstd_running`.
pub fn backward_eval<D: Data>(
    layer: &BatchNorm<D::Param>,
    x: &[D],
    dy: &[D],
    shape: Shape,
    layout: Layout,
) -> Backward {
    let mean: Vec<f64> = layer.running_mean.iter().map(|v| v.to_f64()).collect();
    let invstd: Vec<f64> = layer
        .running_var
        .iter()
        .map(|v| 1.0 / (v.to_f64() + layer.eps).sqrt())
        .collect();
    backward_with(layer, x, dy, &mean, &invstd, false, shape, layout)
}

/// The backward pass of [`BatchNorm::forward_train_fused`], whose output was `y`: the
/// gradient `dz = if relu && y <= 0 { 0 } else { dy }` through the activation, then
/// [`backward`] with `dz`. Returns that and `dz`, the residual's gradient.
#[allow(clippy::too_many_arguments)]
pub fn backward_fused<D: Data>(
    layer: &BatchNorm<D::Param>,
    x: &[D],
    y: &[D],
    dy: &[D],
    saved: &SavedStats<D::Param>,
    shape: Shape,
    layout: Layout,
    relu: bool,
) -> (Backward, Vec<f64>) {
    let dz: Vec<f64> = dy
        .iter()
        .zip(y)
        .map(|(d, y)| {
            if relu && y.to_f64() <= 0.0 {
                0.0
            } else {
                d.to_f64()
            }
        })
        .collect();
    let mean: Vec<f64> = saved.mean.iter().map(|v| v.to_f64()).collect();
    let invstd: Vec<f64> = saved.invstd.iter().map(|v| v.to_f64()).collect();
    let back = backward_with(layer, x, &dz, &mean, &invstd, true, shape, layout);
    (back, dz)
}

#[allow(clippy::too_many_arguments)]
fn backward_with<D: Data, G: Data>(
    layer: &BatchNorm<D::Param>,
    x: &[D],
    dy: &[G],
    mean: &[f64],
    invstd: &[f64],
    batch_stats: bool,
    shape: Shape,
    layout: Layout,
) -> Backward {
    let count = (shape.n * shape.spatial) as f64;
    let xhat = |c: usize, v: f64| (v - mean[c]) * invstd[c];
    let mut weight = vec![0.0; shape.c];
    let mut bias = vec![0.0; shape.c];
    for c in 0..shape.c {
        let xs = channel(x, shape, layout, c);
        let ds = channel(dy, shape, layout, c);
        bias[c] = ds.iter().sum();
        weight[c] = xs.iter().zip(&ds).map(|(v, d)| d * xhat(c, *v)).sum();
    }
    let mut dx = vec![0.0; x.len()];
    for n in 0..shape.n {
        for c in 0..shape.c {
            let w = layer.weight[c].to_f64();
            for s in 0..shape.spatial {
                let i = shape.index(layout, n, c, s);
                let (v, d) = (x[i].to_f64(), dy[i].to_f64());
                dx[i] = if batch_stats {
                    w * invstd[c] / count * (count * d - bias[c] - xhat(c, v) * weight[c])
                } else {
                    d * w * invstd[c]
                };
            }
        }
    }
    Backward { dx, weight, bias }
}

/// The fused epilogue applied to the outputs `y` of an operation: `relu(y + residual)` (see
/// [`crate::Fuse`]), the ReLU as `if v < 0 { 0 } else { v }` (a NaN stays NaN).
pub fn epilogue<D: Data>(y: &[f64], residual: Option<&[D]>, relu: bool) -> Vec<f64> {
    y.iter()
        .enumerate()
        .map(|(i, &v)| {
            let v = v + residual.map_or(0.0, |r| r[i].to_f64());
            if relu && v < 0.0 {
                0.0
            } else {
                v
            }
        })
        .collect()
}

/// The outputs `y` rounded to the tensor type `D`, each to nearest (ties to even), in one
/// rounding: what an exact kernel would store.
pub fn round<D: Data>(y: &[f64]) -> Vec<D> {
    y.iter().map(|&v| D::from_f64(v)).collect()
}
