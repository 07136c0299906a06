//! The backward passes against the f64 oracle on random shapes (every path), against central
//! finite differences of a scalar loss, and on bad input.

use crate::common;

use batchnorm::{
    oracle, with_isa, with_parallel_threshold, with_stream_threshold, BatchNorm, Element, Error,
    Fuse, Layout, Shape,
};
use common::{assert_identical, layout, on_every_path, shape, test_isas, tol, two_pass_cases, Rng};
use proptest::prelude::*;

/// Asserts `|got - want| <= tol * (1 + scale)` element by element.
fn close<T: Element>(got: &[T], want: &[f64], scale: &[f64], tol: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    assert_eq!(scale.len(), want.len(), "{what}: scales");
    for (i, ((g, w), s)) in got.iter().zip(want).zip(scale).enumerate() {
        let g = g.to_f64();
        assert!(
            (g - w).abs() <= tol * (1.0 + s),
            "{what}[{i}]: got {g:e}, want {w:e}, scale {s:e}"
        );
    }
}

/// Training and inference backward against the oracle. The tolerances are relative to the
/// size of the terms that are summed, not to the result, since the result may cancel:
/// `Σ |dy|` for dbias, `Σ |dy * xhat|` for dweight, and for dx the three terms
/// `|a dy| + |b xc| + |c|` of `dx = a * dy + b * (x - mean) + c`.
fn check<T: Element>(shape: Shape, layout: Layout, seed: u64) {
    let mut rng = Rng::new(seed);
    let len = shape.numel().unwrap();
    let (offset, spread) = rng.offset_spread();
    let x: Vec<T> = rng.data(len, offset, spread);
    let dy: Vec<T> = rng.data(len, 0.0, 1.0);
    let tol = tol::<T>(offset.abs() / spread);
    let mut bn = BatchNorm::<T>::new(shape.c);
    bn.weight = rng.data(shape.c, 0.5, 1.0);
    bn.running_mean = rng.data(shape.c, offset, spread);
    let mut y = vec![T::ZERO; len];
    let saved = bn.clone().forward_train(&x, &mut y, shape, layout).unwrap();
    let want = oracle::backward(&bn, &x, &dy, &saved, shape, layout);
    let want_eval = oracle::backward_eval(&bn, &x, &dy, shape, layout);
    let m = (shape.n * shape.spatial) as f64;
    let mut dx_scale = vec![0.0; len];
    let (mut sum_dy, mut sum_dy_xhat) = (vec![0.0; shape.c], vec![0.0; shape.c]);
    for n in 0..shape.n {
        for c in 0..shape.c {
            for s in 0..shape.spatial {
                let i = shape.index(layout, n, c, s);
                let is = saved.invstd[c].to_f64();
                let xhat = (x[i].to_f64() - saved.mean[c].to_f64()) * is;
                let (d, w) = (dy[i].to_f64(), bn.weight[c].to_f64());
                sum_dy[c] += d.abs();
                sum_dy_xhat[c] += (d * xhat).abs();
                dx_scale[i] = (w * is * d).abs()
                    + (w * is / m * xhat * want.weight[c]).abs()
                    + (w * is / m * want.bias[c]).abs();
            }
        }
    }
    on_every_path(|path| {
        let mut dx = vec![T::ZERO; len];
        let g = bn
            .backward(&x, &dy, &saved, &mut dx, shape, layout)
            .unwrap();
        close(&dx, &want.dx, &dx_scale, tol, &format!("dx, {path}"));
        close(&g.bias, &want.bias, &sum_dy, tol, &format!("dbias, {path}"));
        close(
            &g.weight,
            &want.weight,
            &sum_dy_xhat,
            tol,
            &format!("dweight, {path}"),
        );
        let g = bn.backward_eval(&x, &dy, &mut dx, shape, layout).unwrap();
        let abs_want: Vec<f64> = want_eval.dx.iter().map(|v| v.abs()).collect();
        close(
            &dx,
            &want_eval.dx,
            &abs_want,
            tol,
            &format!("eval dx, {path}"),
        );
        close(
            &g.bias,
            &want_eval.bias,
            &sum_dy,
            tol,
            &format!("eval dbias, {path}"),
        );
        // dweight with the running statistics: xhat can be large, the sum cancels.
        let eval_scale: Vec<f64> = (0..shape.c)
            .map(|c| {
                let is = 1.0 / (bn.running_var[c].to_f64() + bn.eps).sqrt();
                oracle::channel(&x, shape, layout, c)
                    .iter()
                    .zip(oracle::channel(&dy, shape, layout, c))
                    .map(|(v, d)| (d * (v - bn.running_mean[c].to_f64()) * is).abs())
                    .sum()
            })
            .collect();
        close(
            &g.weight,
            &want_eval.weight,
            &eval_scale,
            tol,
            &format!("eval dweight, {path}"),
        );
    });
}

proptest! {
    #![proptest_config(common::config(96))]

    #[test]
    fn backward_f32(shape in shape(), layout in layout(), seed: u64) {
        check::<f32>(shape, layout, seed);
    }

    #[test]
    fn backward_f64(shape in shape(), layout in layout(), seed: u64) {
        check::<f64>(shape, layout, seed);
    }
}

/// The loss `L = Σ y * g` of training's forward pass, in f64.
fn loss(bn: &BatchNorm<f64>, x: &[f64], g: &[f64], shape: Shape, layout: Layout) -> f64 {
    let mut y = vec![0.0; x.len()];
    bn.clone().forward_train(x, &mut y, shape, layout).unwrap();
    assert_eq!(y.len(), g.len(), "loss weights");
    y.iter().zip(g).map(|(a, b)| a * b).sum()
}

/// dx, dweight and dbias match central differences of `L = Σ y * g` (so `dy = g`).
#[test]
#[cfg_attr(miri, ignore = "too large for Miri's interpreter")]
fn finite_differences() {
    for (shape, layout) in [
        (Shape::new(3, 2, 5), Layout::Nchw),
        (Shape::new(2, 3, 4), Layout::Nhwc),
        (Shape::new(7, 3, 1), Layout::Nchw),
    ] {
        let mut rng = Rng::new(5);
        let len = shape.numel().unwrap();
        let x: Vec<f64> = rng.data(len, 1.0, 2.0);
        let g: Vec<f64> = rng.data(len, 0.0, 1.0);
        let mut bn = BatchNorm::<f64>::new(shape.c);
        bn.weight = rng.data(shape.c, 1.0, 0.5);
        bn.bias = rng.data(shape.c, 0.0, 0.5);
        let mut y = vec![0.0; len];
        let saved = bn.clone().forward_train(&x, &mut y, shape, layout).unwrap();
        let mut dx = vec![0.0; len];
        let grads = bn.backward(&x, &g, &saved, &mut dx, shape, layout).unwrap();
        let h = 1e-6;
        let central = |f: &dyn Fn(f64) -> f64| (f(h) - f(-h)) / (2.0 * h);
        for i in 0..len {
            let numeric = central(&|e| {
                let mut xe = x.clone();
                xe[i] += e;
                loss(&bn, &xe, &g, shape, layout)
            });
            assert!(
                (dx[i] - numeric).abs() < 1e-6 * (1.0 + numeric.abs()),
                "dx[{i}] {} vs {numeric}",
                dx[i]
            );
        }
        for c in 0..shape.c {
            let dw = central(&|e| {
                let mut b = bn.clone();
                b.weight[c] += e;
                loss(&b, &x, &g, shape, layout)
            });
            let db = central(&|e| {
                let mut b = bn.clone();
                b.bias[c] += e;
                loss(&b, &x, &g, shape, layout)
            });
            assert!(
                (grads.weight[c] - dw).abs() < 1e-6 * (1.0 + dw.abs()),
                "dweight[{c}]"
            );
            assert!(
                (grads.bias[c] - db).abs() < 1e-6 * (1.0 + db.abs()),
                "dbias[{c}]"
            );
        }
    }
}

#[test]
fn bad_input() {
    let shape = Shape::new(2, 3, 4);
    let bn = BatchNorm::<f32>::new(3);
    let x = vec![1.0f32; 24];
    let mut y = vec![0.0f32; 24];
    let saved = bn
        .clone()
        .forward_train(&x, &mut y, shape, Layout::Nchw)
        .unwrap();
    let mut dx = vec![7.0f32; 24];
    let short = vec![0.0f32; 23];
    assert_eq!(
        bn.backward(&x, &short, &saved, &mut dx, shape, Layout::Nchw)
            .unwrap_err(),
        Error::Length {
            what: "dy",
            expected: 24,
            got: 23
        }
    );
    let mut short_dx = vec![0.0f32; 25];
    assert_eq!(
        bn.backward_eval(&x, &x, &mut short_dx, shape, Layout::Nhwc)
            .unwrap_err(),
        Error::Length {
            what: "dx",
            expected: 24,
            got: 25
        }
    );
    let mut bad = saved.clone();
    bad.invstd.pop();
    assert_eq!(
        bn.backward(&x, &x, &bad, &mut dx, shape, Layout::Nchw)
            .unwrap_err(),
        Error::Length {
            what: "saved.invstd",
            expected: 3,
            got: 2
        }
    );
    assert_eq!(
        bn.backward(
            &x[..20],
            &x[..20],
            &saved,
            &mut dx[..20],
            shape,
            Layout::Nchw
        )
        .unwrap_err(),
        Error::Length {
            what: "x",
            expected: 24,
            got: 20
        }
    );
    assert!(dx.iter().all(|&v| v == 7.0), "dx written on error");
}

/// A NaN in one channel's dy makes that channel's gradients NaN and no other's.
#[test]
#[cfg_attr(miri, ignore = "too large for Miri's interpreter")]
fn non_finite_confined() {
    let shape = Shape::new(3, 5, 7);
    for layout in [Layout::Nchw, Layout::Nhwc] {
        let mut rng = Rng::new(9);
        let x: Vec<f32> = rng.data(shape.numel().unwrap(), 1.0, 1.0);
        let mut dy: Vec<f32> = rng.data(shape.numel().unwrap(), 0.0, 1.0);
        dy[shape.index(layout, 1, 2, 3)] = f32::NAN;
        let bn = BatchNorm::<f32>::new(shape.c);
        let mut y = vec![0.0; x.len()];
        let saved = bn.clone().forward_train(&x, &mut y, shape, layout).unwrap();
        on_every_path(|path| {
            let mut dx = vec![0.0; x.len()];
            let g = bn
                .backward(&x, &dy, &saved, &mut dx, shape, layout)
                .unwrap();
            for c in 0..shape.c {
                let dxc = oracle::channel(&dx, shape, layout, c);
                assert_eq!(g.bias[c].is_nan(), c == 2, "{layout:?} {path}");
                assert_eq!(dxc.iter().any(|v| v.is_nan()), c == 2, "{layout:?} {path}");
            }
        });
    }
}

/// Inputs near `f32::MAX` of both signs in one channel, with `dy` of 4: `Σ dy * (x - mean)`
/// overflows f32, so the kernels redo that channel's sums in f64 and the gradients come out
/// finite and right (within 1e-5 of the terms summed), on every path and layout, for one image
/// (channels in L1) and several (channel groups read image by image).
#[test]
#[cfg_attr(miri, ignore = "too large for Miri's interpreter")]
fn sums_beyond_f32_range() {
    for shape in [Shape::new(4, 3, 37), Shape::new(1, 3, 37)] {
        for layout in [Layout::Nchw, Layout::Nhwc] {
            let mut rng = Rng::new(17);
            let len = shape.numel().unwrap();
            let mut x: Vec<f32> = rng.data(len, 1.0, 1.0);
            for n in 0..shape.n {
                for s in 0..shape.spatial {
                    let sign = if (n + s).is_multiple_of(2) { 1.0 } else { -1.0 };
                    x[shape.index(layout, n, 1, s)] = sign * (3.0e38 - 1e37 * (s % 7) as f32);
                }
            }
            let dy: Vec<f32> = rng.data(len, 4.0, 1.0);
            let bn = BatchNorm::<f32>::new(shape.c);
            let mut y = vec![0.0; len];
            let saved = bn.clone().forward_train(&x, &mut y, shape, layout).unwrap();
            let want = oracle::backward(&bn, &x, &dy, &saved, shape, layout);
            let sum_dy: Vec<f64> = (0..shape.c)
                .map(|c| {
                    oracle::channel(&dy, shape, layout, c)
                        .iter()
                        .map(|d| d.abs())
                        .sum()
                })
                .collect();
            on_every_path(|path| {
                let mut dx = vec![0.0; len];
                let g = bn
                    .backward(&x, &dy, &saved, &mut dx, shape, layout)
                    .unwrap();
                let what = format!("{shape:?} {layout:?}, {path}");
                assert!(g.weight.iter().all(|w| w.is_finite()), "{what}: {g:?}");
                close(
                    &g.bias,
                    &want.bias,
                    &sum_dy,
                    1e-5,
                    &format!("dbias, {what}"),
                );
                close(
                    &g.weight,
                    &want.weight,
                    &sum_dy,
                    1e-5,
                    &format!("dweight, {what}"),
                );
                let dx_scale: Vec<f64> = want.dx.iter().map(|v| v.abs() + 1.0).collect();
                close(&dx, &want.dx, &dx_scale, 1e-5, &format!("dx, {what}"));
            });
        }
    }
}

/// The backward's sums over NCHW runs longer than an accumulator lane's chain: the channel
/// groups on one thread sum each run in parts (each lane at most 128 values before `f64`), as
/// the statistics do. `dy` is one value, 1.2521667 (16 significant bits), so that the `f32`
/// sum of 128 of them, and of the lanes, is exact: `Σ dy` is exact but for the rounding of
/// the result to `f32` (6e-8). The code that summed whole runs put 784 to 12544 values of
/// 224x224 runs into each lane (AVX-512 to scalar), and its `dbias` came out 1.2e-5 (AVX-512)
/// to 1.2e-4 (scalar) off; this test failed on it on every instruction set.
#[test]
#[cfg_attr(miri, ignore = "too large for Miri's interpreter")]
fn sums_of_runs_longer_than_a_chain() {
    let t = f32::from_bits(0x3fa0_4700);
    for (n, s) in [(2, 50176), (3, 5037)] {
        let shape = Shape::new(n, 2, s);
        let len = shape.numel().unwrap();
        let x: Vec<f32> = Rng::new(s as u64).data(len, 3.0, 1.0);
        let dy = vec![t; len];
        let bn = BatchNorm::<f32>::new(2);
        let saved = bn
            .clone()
            .forward_train(&x, &mut vec![0.0; len], shape, Layout::Nchw)
            .unwrap();
        let want = oracle::backward(&bn, &x, &dy, &saved, shape, Layout::Nchw);
        let sum_dy_xhat: Vec<f64> = (0..2)
            .map(|c| {
                let (mean, invstd) = (saved.mean[c] as f64, saved.invstd[c] as f64);
                let x = oracle::channel(&x, shape, Layout::Nchw, c);
                x.iter()
                    .map(|v| (t as f64 * (v - mean) * invstd).abs())
                    .sum()
            })
            .collect();
        // The calling thread's calls on one thread (the pool's go parallel from 0 elements).
        with_parallel_threshold(usize::MAX, || {
            on_every_path(|path| {
                let what = format!("{shape:?}, {path}");
                let mut dx = vec![0.0; len];
                let g = bn
                    .backward(&x, &dy, &saved, &mut dx, shape, Layout::Nchw)
                    .unwrap();
                for (c, (&got, want)) in g.bias.iter().zip(&want.bias).enumerate() {
                    let rel = (got as f64 - want).abs() / want;
                    assert!(rel <= 1e-6, "dbias of {c}, {what}: off by {rel:e}");
                }
                let dweight = format!("dweight, {what}");
                close(&g.weight, &want.weight, &sum_dy_xhat, 1e-5, &dweight);
            })
        });
    }
}

/// On one thread, a backward whose `dx` streams takes two passes over NCHW (the sums by
/// channel groups, then one map over the tensor); otherwise each channel group is reduced and
/// mapped in turn. Both give the same bits: the same sums per channel, the same map. Plain
/// and gated (`backward_fused` with ReLU and the residual's gradient), including a channel
/// whose sums overflow `f32` (summed again in `f64`) and more channels than one group holds.
#[test]
fn two_passes_are_the_channel_groups() {
    for (shape, x, mut rng) in two_pass_cases(50) {
        let len = x.len();
        let dy: Vec<f32> = rng.data(len, 0.5, 1.0);
        let residual: Vec<f32> = rng.data(len, 0.0, 1.0);
        let mut bn = BatchNorm::<f32>::new(shape.c);
        let mut y = vec![0.0; len];
        let fuse = Fuse::add_relu(&residual);
        let saved = bn
            .forward_train_fused(&x, &mut y, shape, Layout::Nchw, fuse)
            .unwrap();
        let run = |threshold: usize| {
            with_stream_threshold(threshold, || {
                let (mut dx, mut dxg, mut dr) = (vec![0.0; len], vec![0.0; len], vec![0.0; len]);
                let g = bn.backward(&x, &dy, &saved, &mut dx, shape, Layout::Nchw);
                let gated = bn.backward_fused(
                    &x,
                    &y,
                    &dy,
                    &saved,
                    &mut dxg,
                    Some(&mut dr),
                    shape,
                    Layout::Nchw,
                    true,
                );
                (g.unwrap(), gated.unwrap(), dx, dxg, dr)
            })
        };
        for isa in test_isas() {
            with_isa(isa, || {
                let what = format!("{shape:?}, {isa:?}");
                let (two, groups) = (run(0), run(usize::MAX));
                assert_eq!(two.0, groups.0, "gradients, {what}");
                assert_eq!(two.1, groups.1, "gated gradients, {what}");
                assert_identical(&two.2, &groups.2, &format!("dx, {what}"));
                assert_identical(&two.3, &groups.3, &format!("gated dx, {what}"));
                assert_identical(&two.4, &groups.4, &format!("d_residual, {what}"));
            });
        }
    }
}
