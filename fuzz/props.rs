//! Property checks shared by the cargo-fuzz targets (`fuzz_targets/`) and the corpus replay
//! test (`tests/fuzz_corpus.rs`, stable Rust): arbitrary bytes decode into a shape, a layout,
//! layer parameters and data biased toward the hard cases, and each check panics when a
//! property fails.
//!
//! The bounds, against the float64 two-pass reference of the same f32 values (the README's
//! accuracy section explains them):
//! - batch mean within `1e-5` standard deviations (plus `1e-12` of its magnitude);
//! - batch variance within `2e-5` of itself, where it is above `1e-30` (below, the squares of
//!   the deviations are subnormal in f32 and lose their precision);
//! - output within `1e-5 * (1 + |y|)`;
//! - a channel with a non-finite input comes out NaN, and a value whose distance from its
//!   channel's mean does not fit in f32 (values of both signs near `f32::MAX`) may come out
//!   NaN or infinite; no other channel or value may.
#![allow(dead_code)]

use batchnorm::{oracle, with_isa, with_parallel_threshold, BatchNorm, Isa, Layout, Shape};
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
    let n = 1 + b.byte() as usize % 7;
    let c = 1 + b.byte() as usize % 11;
    let mut s = 1 + b.byte() as usize % 40;
    let flags = b.byte();
    if flags & 0x80 != 0 {
        s *= 97; // channels longer than a statistics block
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

/// Runs `f` on the default instruction set and the scalar one, on the calling thread and in a
/// 3-thread pool with every tensor parallel.
pub fn on_paths(mut f: impl FnMut(&str) + Send) {
    static POOL: OnceLock<rayon::ThreadPool> = OnceLock::new();
    let pool = POOL.get_or_init(|| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .unwrap()
    });
    for isa in [Isa::best(), Isa::Scalar] {
        with_isa(isa, || f(&format!("{isa:?}")));
        pool.install(|| {
            with_isa(isa, || {
                with_parallel_threshold(0, || f(&format!("{isa:?}, 3 threads")))
            })
        });
    }
}

/// What the reference says about channel `c`: whether the kernels must get it right.
struct Channel {
    mean: f64,
    var: f64,
    /// Finite values whose distances from the mean fit in f32 with room to spare.
    representable: bool,
}

fn channels(case: &Case) -> Vec<Channel> {
    let Case {
        shape, layout, x, ..
    } = case;
    oracle::mean_var(x, *shape, *layout)
        .into_iter()
        .enumerate()
        .map(|(c, (mean, var))| {
            let values = oracle::channel(x, *shape, *layout, c);
            let spread = values.iter().map(|v| (v - mean).abs()).fold(0.0, f64::max);
            Channel {
                mean,
                var,
                representable: values.iter().all(|v| v.is_finite()) && spread < 1e38,
            }
        })
        .collect()
}

fn close(got: f64, want: f64, tol: f64) -> bool {
    (got - want).abs() <= tol
}

/// Training's forward pass: errors only where they must be, statistics and outputs within the
/// bounds, non-finite values confined, in-place identical to out-of-place.
pub fn check_forward_train(data: &[u8]) {
    let Some(case) = decode(data) else { return };
    let Case {
        shape,
        layout,
        ref layer,
        ref x,
        ..
    } = case;
    let refs = channels(&case);
    let want = oracle::forward_train(layer, x, shape, layout);
    on_paths(|path| {
        let mut bn = layer.clone();
        let mut y = vec![0.0f32; x.len()];
        let result = bn.forward_train(x, &mut y, shape, layout);
        if shape.n * shape.spatial < 2 {
            assert!(result.is_err(), "{path}: training on one value per channel");
            assert_eq!(
                format!("{bn:?}"),
                format!("{layer:?}"),
                "{path}: refused call changed the layer"
            );
            return;
        }
        let saved = result.unwrap_or_else(|e| panic!("{path}: {e}"));
        let moments = batchnorm::moments(x, shape, layout).unwrap();
        for (c, r) in refs.iter().enumerate() {
            let values = oracle::channel(&y, shape, layout, c);
            if !r.representable {
                continue;
            }
            let m = moments[c];
            let std = r.var.sqrt();
            assert!(
                close(m.mean, r.mean, 1e-5 * std + 1e-12 * r.mean.abs()),
                "{path}: mean of {c}: {} vs {}",
                m.mean,
                r.mean
            );
            if r.var > 1e-30 {
                assert!(
                    close(m.variance(), r.var, 2e-5 * r.var),
                    "{path}: variance of {c}: {:e} vs {:e}",
                    m.variance(),
                    r.var
                );
            }
            let saved_mean = saved.mean[c] as f64;
            // Rounding to f32: half an ulp, which for subnormals is absolute.
            let rounding = r.mean.abs() * f32::EPSILON as f64 + f32::from_bits(1) as f64;
            assert!(
                close(saved_mean, r.mean, 1e-5 * std + rounding),
                "{path}: saved mean of {c}: {saved_mean} vs {} (var {:e})",
                r.mean,
                r.var
            );
            let wanted = oracle::channel(&want.y, shape, layout, c);
            if r.var > 1e-30 || layer.eps > 0.0 {
                for (i, (g, w)) in values.iter().zip(&wanted).enumerate() {
                    assert!(
                        close(*g, *w, 1e-5 * (1.0 + w.abs())),
                        "{path}: y[{i}] of channel {c}: {g} vs {w}"
                    );
                }
                assert!(
                    close(
                        bn.running_mean[c] as f64,
                        want.running_mean[c],
                        // The batch mean's bound, plus rounding of the running value.
                        1e-5 * (std + 1.0 + want.running_mean[c].abs())
                    ),
                    "{path}: running mean of {c}: {} vs {} (batch mean {}, var {:e})",
                    bn.running_mean[c],
                    want.running_mean[c],
                    r.mean,
                    r.var
                );
                let rv = want.running_var[c];
                if rv > f32::MAX as f64 {
                    assert!(
                        bn.running_var[c].is_infinite(),
                        "{path}: running var of {c} beyond f32"
                    );
                } else if r.var > 1e-30 || rv > 1e-30 {
                    assert!(
                        close(bn.running_var[c] as f64, rv, 2e-5 * (1e-30 + rv.abs())),
                        "{path}: running var of {c}: {} vs {rv}",
                        bn.running_var[c]
                    );
                }
            }
        }
        let mut in_place = layer.clone();
        let mut xy = x.clone();
        let saved2 = in_place
            .forward_train_in_place(&mut xy, shape, layout)
            .unwrap();
        assert!(bits(&xy) == bits(&y), "{path}: in-place training differs");
        assert_eq!(format!("{saved2:?}"), format!("{saved:?}"));
    });
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Inference: out-of-place and in-place identical bit for bit, for the layer and for the folded
/// scale and shift; the layer's output within the bound of the oracle where it is finite.
pub fn check_forward_eval(data: &[u8]) {
    let Some(case) = decode(data) else { return };
    let Case {
        shape,
        layout,
        ref layer,
        ref x,
        ..
    } = case;
    let want = oracle::forward_eval(layer, x, shape, layout);
    let (scale, shift) = layer.scale_shift().unwrap();
    on_paths(|path| {
        let mut y = vec![0.0f32; x.len()];
        layer.forward_eval(x, &mut y, shape, layout).unwrap();
        let mut xy = x.clone();
        layer.forward_eval_in_place(&mut xy, shape, layout).unwrap();
        assert!(bits(&xy) == bits(&y), "{path}: in-place inference differs");
        for (i, (g, w)) in y.iter().zip(&want).enumerate() {
            if x[i].is_finite() && w.is_finite() && w.abs() < 1e30 {
                assert!(
                    close(*g as f64, *w, 1e-5 * (1.0 + w.abs())),
                    "{path}: y[{i}] {g} vs {w}"
                );
            }
        }
        let mut folded = vec![0.0f32; x.len()];
        batchnorm::apply_scale_shift(x, &mut folded, &scale, &shift, shape, layout).unwrap();
        let mut xy = x.clone();
        batchnorm::apply_scale_shift_in_place(&mut xy, &scale, &shift, shape, layout).unwrap();
        assert!(
            bits(&xy) == bits(&folded),
            "{path}: in-place folded inference differs"
        );
    });
}

/// The moments of the two halves of a batch, merged, equal the moments of the whole.
pub fn check_moments_merge(data: &[u8]) {
    let Some(case) = decode(data) else { return };
    let Case {
        shape,
        layout,
        ref x,
        cut,
        ..
    } = case;
    let refs = channels(&case);
    // Both layouts keep a sample's values together, so a cut along N splits the buffer.
    let per_sample = shape.c * shape.spatial;
    let (a, b) = x.split_at(cut * per_sample);
    let sa = Shape::new(cut, shape.c, shape.spatial);
    let sb = Shape::new(shape.n - cut, shape.c, shape.spatial);
    on_paths(|path| {
        let whole = batchnorm::moments(x, shape, layout).unwrap();
        let ma = batchnorm::moments(a, sa, layout).unwrap();
        let mb = batchnorm::moments(b, sb, layout).unwrap();
        for c in 0..shape.c {
            let merged = ma[c].merge(mb[c]);
            assert_eq!(merged.count, whole[c].count);
            let r = &refs[c];
            if !r.representable {
                continue;
            }
            let std = r.var.sqrt();
            assert!(
                close(
                    merged.mean,
                    whole[c].mean,
                    2e-5 * std + 1e-12 * r.mean.abs()
                ),
                "{path}: merged mean of {c}"
            );
            if r.var > 1e-30 {
                assert!(
                    close(merged.variance(), whole[c].variance(), 4e-5 * r.var),
                    "{path}: merged variance of {c}"
                );
            }
        }
    });
}

/// The backward pass against the oracle, with the tolerances of `tests/backward.rs`: relative
/// to the terms that are summed, since the results may cancel.
pub fn check_backward(data: &[u8]) {
    let Some(case) = decode(data) else { return };
    let Case {
        shape,
        layout,
        ref layer,
        ref x,
        ref dy,
        ..
    } = case;
    if shape.n * shape.spatial < 2 {
        return;
    }
    let refs = channels(&case);
    let mut y = vec![0.0f32; x.len()];
    let saved = layer
        .clone()
        .forward_train(x, &mut y, shape, layout)
        .unwrap();
    let want = oracle::backward(layer, x, dy, &saved, shape, layout);
    let m = (shape.n * shape.spatial) as f64;
    on_paths(|path| {
        let mut dx = vec![0.0f32; x.len()];
        let g = layer
            .backward(x, dy, &saved, &mut dx, shape, layout)
            .unwrap();
        for (c, r) in refs.iter().enumerate() {
            let is = saved.invstd[c] as f64;
            if !r.representable || !is.is_finite() || r.var <= 1e-30 {
                continue;
            }
            let (xs, ds) = (
                oracle::channel(x, shape, layout, c),
                oracle::channel(dy, shape, layout, c),
            );
            let mean = saved.mean[c] as f64;
            let sum_dy: f64 = ds.iter().map(|d| d.abs()).sum();
            let sum_dy_xhat: f64 = xs
                .iter()
                .zip(&ds)
                .map(|(v, d)| (d * (v - mean) * is).abs())
                .sum();
            assert!(
                close(g.bias[c] as f64, want.bias[c], 1e-5 * (1.0 + sum_dy)),
                "{path}: dbias of {c}"
            );
            assert!(
                close(
                    g.weight[c] as f64,
                    want.weight[c],
                    1e-5 * (1.0 + sum_dy_xhat)
                ),
                "{path}: dweight of {c}"
            );
            let w = layer.weight[c] as f64;
            let got = oracle::channel(&dx, shape, layout, c);
            let wanted = oracle::channel(&want.dx, shape, layout, c);
            for (i, ((gv, wv), (v, d))) in
                got.iter().zip(&wanted).zip(xs.iter().zip(&ds)).enumerate()
            {
                let xhat = (v - mean) * is;
                let scale = (w * is * d).abs()
                    + (w * is / m * xhat * want.weight[c]).abs()
                    + (w * is / m * want.bias[c]).abs();
                assert!(
                    close(*gv, *wv, 1e-5 * (1.0 + scale)),
                    "{path}: dx[{i}] of {c}: {gv} vs {wv}"
                );
            }
        }
    });
}
