//! Accuracy against a float64 two-pass reference where batch normalization is hard: a mean
//! 1e4 to 1e6 times the standard deviation, tiny spreads, subnormals, and non-finite values
//! that must stay in their own channel.

use crate::common;

use batchnorm::{oracle, BatchNorm, Layout, Shape};
use common::{assert_close, on_every_path, Rng};

/// f32 data of `shape` whose channel `c` has mean `offset * (c + 1)` and standard deviation
/// about `offset / ratio`.
fn offset_data(shape: Shape, offset: f64, ratio: f64, seed: u64) -> Vec<f32> {
    let mut rng = Rng::new(seed);
    let mut x = vec![0.0f32; shape.numel().unwrap()];
    let std = offset / ratio;
    for c in 0..shape.c {
        for n in 0..shape.n {
            for s in 0..shape.spatial {
                // Uniform in [-sqrt(3), sqrt(3)) has unit variance.
                let v = offset * (c + 1) as f64 + std * 3f64.sqrt() * rng.signed();
                x[shape.index(Layout::Nchw, n, c, s)] = v as f32;
            }
        }
    }
    x
}

fn relayout(x: &[f32], shape: Shape, to: Layout) -> Vec<f32> {
    let mut out = vec![0.0; x.len()];
    for n in 0..shape.n {
        for c in 0..shape.c {
            for s in 0..shape.spatial {
                out[shape.index(to, n, c, s)] = x[shape.index(Layout::Nchw, n, c, s)];
            }
        }
    }
    out
}

/// In both layouts and on every path: every channel's batch variance within `var_bound`
/// (relative) and training's output within `1e-5 * (1 + |y|)` of the f64 reference, for the
/// NCHW data `nchw` laid out as each layout wants.
fn check_both_layouts(nchw: &[f32], shape: Shape, var_bound: f64, what: &str) {
    for layout in [Layout::Nchw, Layout::Nhwc] {
        let x = relayout(nchw, shape, layout);
        let reference = oracle::mean_var(&x, shape, layout);
        let bn = BatchNorm::<f32>::new(shape.c);
        let want = oracle::forward_train(&bn, &x, shape, layout);
        on_every_path(|path| {
            let moments = batchnorm::moments(&x, shape, layout).unwrap();
            assert_eq!(moments.len(), shape.c, "{what} {layout:?} {path}: channels");
            for (c, m) in moments.iter().enumerate() {
                let rel = (m.variance() - reference[c].1).abs() / reference[c].1;
                assert!(
                    rel <= var_bound,
                    "{what} {layout:?} {path}: variance of {c} off by {rel:e}"
                );
            }
            let mut layer = bn.clone();
            let mut y = vec![0.0f32; x.len()];
            layer.forward_train(&x, &mut y, shape, layout).unwrap();
            assert_close(
                &y,
                &want.y,
                1e-5,
                &format!("y at {what}, {layout:?}, {path}"),
            );
        });
    }
}

/// The naive single-pass f32 variance, E[x²] - E[x]², for comparison.
fn naive_variance(values: &[f64]) -> f64 {
    let n = values.len() as f32;
    let (s, ss) = values.iter().fold((0f32, 0f32), |(s, ss), &v| {
        (s + v as f32, ss + (v as f32) * (v as f32))
    });
    ((ss / n) - (s / n) * (s / n)) as f64
}

/// The batch variance stays within 1e-4 relative and the output within 1e-5 * (1 + |y|) of
/// the f64 reference for offsets of 1e4 to 1e6 standard deviations, on every path and layout;
/// the naive f32 formula misses the variance bound by orders of magnitude on the same data.
#[test]
#[cfg_attr(miri, ignore = "too large for Miri's interpreter")]
fn huge_offset_tiny_spread() {
    let shape = Shape::new(8, 3, 1000);
    for ratio in [1e4, 1e5, 1e6] {
        let nchw = offset_data(shape, 1e3, ratio, ratio as u64);
        let naive_worst = (0..shape.c)
            .map(|c| {
                let v = oracle::channel(&nchw, shape, Layout::Nchw, c);
                let reference = oracle::mean_var(&nchw, shape, Layout::Nchw)[c].1;
                (naive_variance(&v) - reference).abs() / reference
            })
            .fold(0.0, f64::max);
        assert!(
            naive_worst > 1e-2,
            "naive f32 variance error {naive_worst:e}: the test is too easy"
        );
        check_both_layouts(&nchw, shape, 1e-4, &format!("ratio {ratio:e}"));
    }
}

/// A channel that holds NaN or an infinity becomes NaN; the other channels are exactly what
/// they would be without it, on every path and layout.
#[test]
#[cfg_attr(miri, ignore = "too large for Miri's interpreter")]
fn non_finite_values_stay_in_their_channel() {
    let shape = Shape::new(3, 11, 9);
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        for layout in [Layout::Nchw, Layout::Nhwc] {
            let mut rng = Rng::new(3);
            let clean: Vec<f32> = rng.data(shape.numel().unwrap(), 2.0, 1.0);
            let mut x = clean.clone();
            x[shape.index(layout, 1, 4, 5)] = bad;
            let bn = BatchNorm::<f32>::new(shape.c);
            let want = oracle::forward_train(&bn, &clean, shape, layout);
            on_every_path(|path| {
                let mut layer = bn.clone();
                let mut y = vec![0.0f32; x.len()];
                layer.forward_train(&x, &mut y, shape, layout).unwrap();
                for c in 0..shape.c {
                    let got = oracle::channel(&y, shape, layout, c);
                    let clean_y = oracle::channel(&want.y, shape, layout, c);
                    if c == 4 {
                        assert!(got.iter().all(|v| v.is_nan()), "{bad} {layout:?} {path}");
                        assert!(layer.running_mean[c].is_nan());
                    } else {
                        let got: Vec<f32> = got.iter().map(|&v| v as f32).collect();
                        assert_close(
                            &got,
                            &clean_y,
                            1e-5,
                            &format!("channel {c}, {bad}, {layout:?}, {path}"),
                        );
                        assert!(
                            layer.running_mean[c].is_finite() && layer.running_var[c].is_finite()
                        );
                    }
                }
                // Inference with a non-finite input leaves other elements alone as well.
                bn.forward_eval(&x, &mut y, shape, layout).unwrap();
                let finite = y.iter().filter(|v| v.is_finite()).count();
                assert_eq!(finite, y.len() - 1, "{bad} {layout:?} {path}");
            });
        }
    }
}

/// Subnormal inputs and a constant channel: the variance underflows or is zero, eps takes
/// over, and the output matches the reference (zero).
#[test]
#[cfg_attr(miri, ignore = "too large for Miri's interpreter")]
fn subnormals_and_constant_channels() {
    let shape = Shape::new(4, 5, 13);
    let mut rng = Rng::new(11);
    for layout in [Layout::Nchw, Layout::Nhwc] {
        let mut x: Vec<f32> = rng.data(shape.numel().unwrap(), 0.0, 1e-39);
        for n in 0..shape.n {
            for s in 0..shape.spatial {
                x[shape.index(layout, n, 2, s)] = 7.5;
            }
        }
        let bn = BatchNorm::<f32>::new(shape.c);
        let want = oracle::forward_train(&bn, &x, shape, layout);
        on_every_path(|path| {
            let mut layer = bn.clone();
            let mut y = vec![1.0f32; x.len()];
            let saved = layer.forward_train(&x, &mut y, shape, layout).unwrap();
            assert_close(&y, &want.y, 1e-5, &format!("{layout:?}, {path}"));
            assert_eq!(saved.mean[2], 7.5);
            assert_eq!(
                layer.running_var[2], 0.9,
                "constant channel: unbiased variance 0"
            );
        });
    }
}

/// eps = 0 on a constant channel divides 0 by 0: NaN there, as in PyTorch, and nowhere else.
#[test]
fn zero_eps_constant_channel_is_nan() {
    let shape = Shape::new(2, 2, 3);
    let x = [
        1.0f64, 1.0, 1.0, 0.0, 1.0, 2.0, 1.0, 1.0, 1.0, 3.0, 4.0, 5.0,
    ];
    let mut bn = BatchNorm::<f64>::new(2);
    bn.eps = 0.0;
    let mut y = [0.0; 12];
    bn.forward_train(&x, &mut y, shape, Layout::Nchw).unwrap();
    for (i, v) in y.iter().enumerate() {
        let channel = (i / 3) % 2;
        assert_eq!(v.is_nan(), channel == 0, "y[{i}] = {v}");
    }
}

/// Values near `f32::MAX` of both signs: the squared deviations overflow f32, so the
/// statistics kernels redo those blocks in f64, and the channel comes out right (its variance,
/// about 1e77, only exists in f64, but `invstd` and the output fit in f32).
#[test]
#[cfg_attr(miri, ignore = "too large for Miri's interpreter")]
fn variance_beyond_f32_range() {
    let shape = Shape::new(4, 3, 5);
    for layout in [Layout::Nchw, Layout::Nhwc] {
        let mut rng = Rng::new(13);
        let mut x: Vec<f32> = rng.data(shape.numel().unwrap(), 1.0, 1.0);
        for n in 0..shape.n {
            for s in 0..shape.spatial {
                let sign = if (n + s).is_multiple_of(2) { 1.0 } else { -1.0 };
                x[shape.index(layout, n, 1, s)] = sign * (3.0e38 - 1e37 * s as f32);
            }
        }
        let mut bn = BatchNorm::<f32>::new(shape.c);
        bn.bias = vec![0.25; 3];
        let want = oracle::forward_train(&bn, &x, shape, layout);
        let reference = oracle::mean_var(&x, shape, layout);
        assert!(reference[1].1 > 1e76);
        on_every_path(|path| {
            let mut layer = bn.clone();
            let mut y = vec![0.0f32; x.len()];
            layer.forward_train(&x, &mut y, shape, layout).unwrap();
            assert_close(&y, &want.y, 1e-5, &format!("{layout:?}, {path}"));
            let m = batchnorm::moments(&x, shape, layout).unwrap();
            let rel = (m[1].variance() - reference[1].1).abs() / reference[1].1;
            assert!(rel < 1e-12, "{layout:?}, {path}: variance off by {rel:e}");
        });
    }
}

/// Channel means that drift from image to image (NHWC rows of one image after another), on
/// top of an offset of 1e4 standard deviations: after its first block of rows, NHWC
/// statistics read each block once, around the channel's running mean (and twice when a
/// block's mean strays more than a standard deviation from it). The variance stays within
/// 2e-5 and the output within 1e-5 * (1 + |y|) of the f64 reference, on every path and layout.
/// Fused NCHW training reads a channel once, around the mean of its first image's run, and
/// again where the channel's mean strays more than a standard deviation from that: the larger
/// drifts here.
#[test]
#[cfg_attr(miri, ignore = "too large for Miri's interpreter")]
fn drifting_means_across_images() {
    let shape = Shape::new(5, 7, 97);
    let std = 0.5;
    for drift in [0.0, 0.3, 2.0, 50.0, 1e4] {
        let mut rng = Rng::new(drift as u64 + 7);
        let mut nchw = vec![0.0f32; shape.numel().unwrap()];
        for n in 0..shape.n {
            for c in 0..shape.c {
                // Image n's mean moves by `drift` deviations, up and down.
                let sign = if n % 2 == 0 { 1.0 } else { -1.0 };
                let mean = 1e4 * std * (c + 1) as f64 + sign * drift * std * n as f64;
                for s in 0..shape.spatial {
                    let v = mean + std * 3f64.sqrt() * rng.signed();
                    nchw[shape.index(Layout::Nchw, n, c, s)] = v as f32;
                }
            }
        }
        check_both_layouts(&nchw, shape, 2e-5, &format!("drift {drift}"));
    }
}

/// Deviations far below 1e-19, whose squares are subnormal or zero in f32: the statistics redo
/// such blocks in f64, so that with eps = 0 (the normalization then scales by up to 1e38) the
/// variance stays within 2e-5 and the output within 1e-5 * (1 + |y|), in both layouts, for one
/// image (channels in L1), several (channel groups) and long channels.
#[test]
#[cfg_attr(miri, ignore = "too large for Miri's interpreter")]
fn tiny_variances_with_zero_eps() {
    for shape in [
        Shape::new(1, 5, 49),
        Shape::new(6, 5, 33),
        Shape::new(2, 3, 3000),
    ] {
        for (offset, spread) in [(0.0, 1e-30), (1e-25, 1e-33), (-3e-36, 1e-37), (1.0, 0.0)] {
            let mut rng = Rng::new(23);
            let nchw: Vec<f32> = rng.data(shape.numel().unwrap(), offset, spread);
            for layout in [Layout::Nchw, Layout::Nhwc] {
                let x = relayout(&nchw, shape, layout);
                let reference = oracle::mean_var(&x, shape, layout);
                let mut bn = BatchNorm::<f32>::new(shape.c);
                bn.eps = 0.0;
                let want = oracle::forward_train(&bn, &x, shape, layout);
                let what = format!("{shape:?} {layout:?} offset {offset:e} spread {spread:e}");
                on_every_path(|path| {
                    let moments = batchnorm::moments(&x, shape, layout).unwrap();
                    for (c, m) in moments.iter().enumerate() {
                        let var = reference[c].1;
                        assert!(
                            (m.variance() - var).abs() <= 2e-5 * var,
                            "{what}, {path}: variance of {c}: {:e} vs {var:e}",
                            m.variance()
                        );
                    }
                    if spread == 0.0 {
                        return; // eps = 0 on constant channels: NaN, as tested elsewhere
                    }
                    let mut y = vec![0.0f32; x.len()];
                    bn.clone().forward_train(&x, &mut y, shape, layout).unwrap();
                    assert_close(&y, &want.y, 1e-5, &format!("y, {what}, {path}"));
                });
            }
        }
    }
}

/// Below a variance of about 1e-77, `1 / sqrt(var)` exceeds f32's range: with eps = 0, the
/// saved `invstd` is infinite and every output of the channel non-finite (infinite or NaN: the
/// scale and the shift that absorbs the mean's rounding are both infinite), while the
/// statistics themselves stay right and the running statistics finite.
#[test]
fn invstd_beyond_f32_is_infinite() {
    // Subnormals of 164, -100, 5 and -70 units of 2^-149: mean -0.25 units (0 in f32),
    // variance about 1.7e-86.
    let x = [2.3e-43f32, -1.4e-43, 7e-45, -9.8e-44];
    let shape = Shape::new(1, 1, 4);
    let reference = oracle::mean_var(&x, shape, Layout::Nchw)[0];
    assert!(reference.1 > 1e-87 && reference.1 < 1e-85);
    on_every_path(|path| {
        let m = batchnorm::moments(&x, shape, Layout::Nchw).unwrap()[0];
        assert!(
            (m.variance() - reference.1).abs() <= 2e-5 * reference.1,
            "{path}: variance {:e} vs {:e}",
            m.variance(),
            reference.1
        );
        let mut bn = BatchNorm::<f32>::new(1);
        bn.eps = 0.0;
        let mut y = [0.0f32; 4];
        let saved = bn.forward_train(&x, &mut y, shape, Layout::Nchw).unwrap();
        assert_eq!(saved.invstd[0], f32::INFINITY, "{path}");
        assert!(y.iter().all(|v| !v.is_finite()), "{path}: {y:?}");
        assert!(bn.running_var[0].is_finite() && bn.running_mean[0].is_finite());
    });
}
