//! `f16` and `bf16` tensors with `f32` parameters: every operation, on every instruction set
//! and threading path, against the `f64` oracle computed from the same 16-bit inputs.
//!
//! The bound: every output is the correctly rounded value of the `f64` reference or one of its
//! two neighbours (within one unit in the last place of the 16-bit type) wherever it is at
//! least 1/256 of the terms it is computed from (`y = xhat * weight + bias`: `|xhat * weight|
//! + |bias|`, and in training `|weight|` besides: the batch mean is exact only to a few units
//! of `2^-24` of the channel's standard deviation, so `xhat` is off by that much in units of 1,
//! whatever its own size, and `y` by that times `|weight|`). An output that cancels further is beyond what the `f32` arithmetic before the
//! rounding can resolve (its error is a few units of `2^-24` of the terms, and the half unit in
//! the last place of such an output is smaller); there the `f32` tolerance of the other tests
//! applies, as it would to `f32` data. Statistics, running statistics and gradients of the
//! parameters are `f32` and held to the `f32` tolerance.

use crate::common;

use batchnorm::half::{bf16, f16};
use batchnorm::{oracle, with_parallel_threshold, BatchNorm, Data, Error, Layout, Shape};
use common::{assert_close, config, layout, on_every_path, shape, tol, Rng};
use proptest::prelude::*;

/// A 16-bit tensor type, with its values in order as integers (for counting units in the last
/// place).
trait Half: Data<Param = f32> {
    fn bits(self) -> u16;
    /// Consecutive values have consecutive numbers; both zeros are 0.
    fn ordered(self) -> i32 {
        let b = self.bits() as i32;
        if b & 0x8000 != 0 {
            -(b & 0x7fff)
        } else {
            b
        }
    }
}

impl Half for f16 {
    fn bits(self) -> u16 {
        self.to_bits()
    }
}

impl Half for bf16 {
    fn bits(self) -> u16 {
        self.to_bits()
    }
}

/// Asserts that every output is within one unit in the last place of `want` rounded to `D`
/// where `|want|` is at least 1/256 of `scale` (the size of the terms the output is computed
/// from), else within that or the `f32` bound `tol * (1 + scale)`.
fn assert_half<D: Half>(got: &[D], want: &[f64], scale: &[f64], tol: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, ((&g, &w), &s)) in got.iter().zip(want).zip(scale).enumerate() {
        if w.is_nan() {
            assert!(g.to_f64().is_nan(), "{what}[{i}]: got {g:?}, want NaN");
            continue;
        }
        let rounded = D::from_f64(w);
        if (g.ordered() - rounded.ordered()).abs() <= 1 && !g.to_f64().is_nan() {
            continue;
        }
        let msg = format!("{what}[{i}]: got {g:?}, want {w:e} (rounded {rounded:?}), terms {s:e}");
        assert!(
            w.abs() * 256.0 < s,
            "{msg}: beyond one unit in the last place"
        );
        assert!((g.to_f64() - w).abs() <= tol * (1.0 + s), "{msg}");
    }
}

/// A layer with random parameters and running statistics.
fn layer(rng: &mut Rng, c: usize) -> BatchNorm<f32> {
    let mut bn = BatchNorm::new(c);
    bn.weight = rng.data(c, 0.0, 2.0);
    bn.bias = rng.data(c, 0.0, 2.0);
    bn.running_mean = rng.data(c, 0.0, 1.0);
    bn.running_var = rng.data(c, 1.5, 1.0);
    bn.momentum = [Some(0.1), None][(rng.unit() * 2.0) as usize];
    bn.num_batches_tracked = (rng.unit() * 5.0) as u64;
    bn
}

/// Random 16-bit data for `shape`, the layer, and the `f32` tolerance for the statistics.
fn setup<D: Data>(shape: Shape, seed: u64) -> (Vec<D>, BatchNorm<f32>, f64) {
    let mut rng = Rng::new(seed);
    let (offset, spread) = rng.offset_spread();
    let x = rng.data::<D>(shape.numel().unwrap(), offset, spread);
    (
        x,
        layer(&mut rng, shape.c),
        tol::<f32>(offset.abs() / spread),
    )
}

/// Each channel's standard deviation.
fn spreads<D: Data>(x: &[D], shape: Shape, layout: Layout) -> Vec<f64> {
    let stats = oracle::mean_var(x, shape, layout);
    stats.into_iter().map(|(_, var)| var.sqrt()).collect()
}

/// Means (batch or running) within `tol` standard deviations of the channel, the crate's
/// bound for the mean (the `f32` partial sums' error is relative to the spread).
fn assert_means(got: &[f32], want: &[f64], spread: &[f64], tol: f64, what: &str) {
    for (c, ((&g, &w), &s)) in got.iter().zip(want).zip(spread).enumerate() {
        let ok =
            (g as f64 - w).abs() <= tol * (s + 1e-12 * w.abs()) + f32::EPSILON as f64 * w.abs();
        assert!(ok, "{what}[{c}]: got {g:e}, want {w:e} (spread {s:e})");
    }
}

/// The size of the terms of `y = xhat * weight + bias`: `|y - bias| + |bias|`, and where the
/// statistics are the batch's own (`batch_stats`), `|weight|` for the error of the batch mean
/// (relative to the standard deviation, which is 1 in units of `xhat`).
fn terms(
    y: &[f64],
    bn: &BatchNorm<f32>,
    shape: Shape,
    layout: Layout,
    batch_stats: bool,
) -> Vec<f64> {
    let mut scale = vec![0.0; y.len()];
    for n in 0..shape.n {
        for c in 0..shape.c {
            let b = bn.bias[c] as f64;
            let mean_error = if batch_stats {
                bn.weight[c].abs() as f64
            } else {
                0.0
            };
            for s in 0..shape.spatial {
                let i = shape.index(layout, n, c, s);
                scale[i] = (y[i] - b).abs() + b.abs() + mean_error;
            }
        }
    }
    scale
}

fn check_train<D: Half>(shape: Shape, layout: Layout, seed: u64) {
    let (x, start, tol) = setup::<D>(shape, seed);
    let want = oracle::forward_train(&start, &x, shape, layout);
    let scale = terms(&want.y, &start, shape, layout, true);
    let spread = spreads(&x, shape, layout);
    on_every_path(|path| {
        let mut bn = start.clone();
        let mut y = vec![D::default(); x.len()];
        let saved = bn.forward_train(&x, &mut y, shape, layout).unwrap();
        assert_half(&y, &want.y, &scale, tol, &format!("y, {path}"));
        assert_means(
            &saved.mean,
            &want.mean,
            &spread,
            tol,
            &format!("mean, {path}"),
        );
        assert_close(&saved.invstd, &want.invstd, tol, &format!("invstd, {path}"));
        let what = format!("running stats, {path}");
        assert_means(&bn.running_mean, &want.running_mean, &spread, tol, &what);
        assert_close(&bn.running_var, &want.running_var, tol, &what);
        let mut in_place = start.clone();
        let mut xy = x.clone();
        let saved2 = in_place
            .forward_train_in_place(&mut xy, shape, layout)
            .unwrap();
        assert_eq!(xy, y, "in place, {path}");
        assert_eq!((saved2, in_place), (saved, bn), "in place, {path}");
    });
}

fn check_eval<D: Half>(shape: Shape, layout: Layout, seed: u64) {
    let (x, bn, tol) = setup::<D>(shape, seed);
    let want = oracle::forward_eval(&bn, &x, shape, layout);
    let scale = terms(&want, &bn, shape, layout, false);
    let (scale_c, shift_c) = bn.scale_shift().unwrap();
    let want_folded = oracle::apply_scale_shift(&x, &scale_c, &shift_c, shape, layout);
    let folded_terms: Vec<f64> = want_folded.iter().map(|v| v.abs() + 1.0).collect();
    on_every_path(|path| {
        let mut y = vec![D::default(); x.len()];
        bn.forward_eval(&x, &mut y, shape, layout).unwrap();
        assert_half(&y, &want, &scale, tol, &format!("eval y, {path}"));
        let mut xy = x.clone();
        bn.forward_eval_in_place(&mut xy, shape, layout).unwrap();
        assert_eq!(xy, y, "eval in place, {path}");
        batchnorm::apply_scale_shift(&x, &mut y, &scale_c, &shift_c, shape, layout).unwrap();
        let what = format!("apply_scale_shift, {path}");
        assert_half(&y, &want_folded, &folded_terms, tol, &what);
        let mut xy = x.clone();
        batchnorm::apply_scale_shift_in_place(&mut xy, &scale_c, &shift_c, shape, layout).unwrap();
        assert_eq!(xy, y, "apply_scale_shift in place, {path}");
        let moments = batchnorm::moments(&x, shape, layout).unwrap();
        let stats = oracle::mean_var(&x, shape, layout);
        for (c, (m, (mean, var))) in moments.iter().zip(stats).enumerate() {
            let ok = (m.mean - mean).abs() <= tol * var.sqrt()
                && (m.variance() - var).abs() <= tol * var;
            assert!(ok, "moments of {c}, {path}: {m:?} vs {mean}, {var}");
        }
    });
}

/// Backward in training and inference: `dx` in `D` to one unit in the last place (or the
/// `f32` bound relative to its three terms), `dweight` and `dbias` to the `f32` bound relative
/// to the terms summed.
fn check_backward<D: Half>(shape: Shape, layout: Layout, seed: u64) {
    let (x, bn, tol) = setup::<D>(shape, seed);
    let mut rng = Rng::new(seed ^ 1);
    let dy = rng.data::<D>(x.len(), 0.0, 1.0);
    let mut y = vec![D::default(); x.len()];
    let saved = bn.clone().forward_train(&x, &mut y, shape, layout).unwrap();
    let want = oracle::backward(&bn, &x, &dy, &saved, shape, layout);
    let want_eval = oracle::backward_eval(&bn, &x, &dy, shape, layout);
    let m = (shape.n * shape.spatial) as f64;
    let (mut dx_terms, mut eval_terms) = (vec![0.0; x.len()], vec![0.0; x.len()]);
    let (mut sum_dy, mut sum_dy_xhat) = (vec![0.0; shape.c], vec![0.0; shape.c]);
    let mut eval_dy_xhat = vec![0.0; shape.c];
    for n in 0..shape.n {
        for c in 0..shape.c {
            let (is, w) = (saved.invstd[c] as f64, bn.weight[c] as f64);
            let eval_is = 1.0 / (bn.running_var[c] as f64 + bn.eps).sqrt();
            for s in 0..shape.spatial {
                let i = shape.index(layout, n, c, s);
                let xhat = (x[i].to_f64() - saved.mean[c] as f64) * is;
                let d = dy[i].to_f64();
                sum_dy[c] += d.abs();
                sum_dy_xhat[c] += (d * xhat).abs();
                eval_dy_xhat[c] +=
                    (d * (x[i].to_f64() - bn.running_mean[c] as f64) * eval_is).abs();
                dx_terms[i] = (w * is * d).abs()
                    + (w * is / m * xhat * want.weight[c]).abs()
                    + (w * is / m * want.bias[c]).abs();
                eval_terms[i] = want_eval.dx[i].abs();
            }
        }
    }
    on_every_path(|path| {
        let mut dx = vec![D::default(); x.len()];
        let g = bn
            .backward(&x, &dy, &saved, &mut dx, shape, layout)
            .unwrap();
        assert_half(&dx, &want.dx, &dx_terms, tol, &format!("dx, {path}"));
        let close = |got: &[f32], want: &[f64], terms: &[f64], what: &str| {
            for (c, ((&g, &w), &t)) in got.iter().zip(want).zip(terms).enumerate() {
                let ok = (g as f64 - w).abs() <= tol * (1.0 + t);
                assert!(ok, "{what}[{c}], {path}: got {g:e}, want {w:e}");
            }
        };
        close(&g.bias, &want.bias, &sum_dy, "dbias");
        close(&g.weight, &want.weight, &sum_dy_xhat, "dweight");
        let g = bn.backward_eval(&x, &dy, &mut dx, shape, layout).unwrap();
        assert_half(
            &dx,
            &want_eval.dx,
            &eval_terms,
            tol,
            &format!("eval dx, {path}"),
        );
        close(&g.bias, &want_eval.bias, &sum_dy, "eval dbias");
        close(&g.weight, &want_eval.weight, &eval_dy_xhat, "eval dweight");
    });
}

// Under Miri only `f16`: `bf16` takes the same lanes, buffers and threads, and differs only in
// the conversion (the `half` crate's by element on the scalar path, integer lanes of `wide` on
// the portable one: safe code both), so it adds 80 s by Miri's clock (a third of the larger
// half of CI's Miri stage) and no unsafe path; it runs natively on every path.
proptest! {
    #![proptest_config(config(64))]

    #[test]
    fn train_f16(shape in shape(), layout in layout(), seed: u64) {
        check_train::<f16>(shape, layout, seed);
    }

    #[test]
    #[cfg_attr(miri, ignore = "under Miri, f16 runs the same code")]
    fn train_bf16(shape in shape(), layout in layout(), seed: u64) {
        check_train::<bf16>(shape, layout, seed);
    }

    #[test]
    fn eval_f16(shape in shape(), layout in layout(), seed: u64) {
        check_eval::<f16>(shape, layout, seed);
    }

    #[test]
    #[cfg_attr(miri, ignore = "under Miri, f16 runs the same code")]
    fn eval_bf16(shape in shape(), layout in layout(), seed: u64) {
        check_eval::<bf16>(shape, layout, seed);
    }

    #[test]
    fn backward_f16(shape in shape(), layout in layout(), seed: u64) {
        check_backward::<f16>(shape, layout, seed);
    }

    #[test]
    #[cfg_attr(miri, ignore = "under Miri, f16 runs the same code")]
    fn backward_bf16(shape in shape(), layout in layout(), seed: u64) {
        check_backward::<bf16>(shape, layout, seed);
    }
}

/// Adversarial values: NaN and infinities stay non-finite in their channel only, values near
/// the largest of the type overflow to infinity as IEEE rounding says, subnormal inputs and
/// outputs keep their precision, and `bf16`'s range (that of `f32`) takes the statistics' `f64`
/// fallback for squares beyond `f32`.
fn check_adversarial<D: Half>(huge: f64) {
    let shape = Shape::new(3, 5, 37);
    for layout in [Layout::Nchw, Layout::Nhwc] {
        let mut rng = Rng::new(7);
        let mut x = rng.data::<D>(shape.numel().unwrap(), 0.0, 1.0);
        let at = |c: usize, i: usize| shape.index(layout, i % 3, c, i % 37);
        x[at(1, 4)] = D::from_f64(f64::NAN);
        x[at(2, 9)] = D::from_f64(f64::INFINITY);
        for i in 0..37 {
            // Channel 3: values spread over the whole range; channel 4: subnormal values.
            x[at(3, i)] = D::from_f64(huge * rng.signed());
            x[at(4, i)] = D::from_f64(1e-7 * rng.signed() * if huge > 1e6 { 1e-31 } else { 1.0 });
        }
        let mut bn = layer(&mut rng, shape.c);
        bn.weight[0] = 1e30; // Channel 0's outputs overflow to infinity.
        let want = oracle::forward_train(&bn, &x, shape, layout);
        let scale = terms(&want.y, &bn, shape, layout, true);
        let tol = tol::<f32>(1.0);
        let want_eval = oracle::forward_eval(&bn, &x, shape, layout);
        let eval_scale = terms(&want_eval, &bn, shape, layout, false);
        on_every_path(|path| {
            let mut y = vec![D::default(); x.len()];
            let mut trained = bn.clone();
            trained.forward_train(&x, &mut y, shape, layout).unwrap();
            assert_half(&y, &want.y, &scale, tol, &format!("y, {layout:?}, {path}"));
            assert_close(
                &trained.running_mean,
                &want.running_mean,
                tol,
                &format!("running_mean, {layout:?}, {path}"),
            );
            bn.forward_eval(&x, &mut y, shape, layout).unwrap();
            let what = format!("eval y, {layout:?}, {path}");
            assert_half(&y, &want_eval, &eval_scale, tol, &what);
        });
    }
}

#[test]
#[cfg_attr(miri, ignore)]
fn adversarial_f16() {
    check_adversarial::<f16>(6e4);
}

#[test]
#[cfg_attr(miri, ignore)]
fn adversarial_bf16() {
    check_adversarial::<bf16>(3e38);
}

/// Runs longer than an accumulator lane's chain (128 values a lane: 512 values a run on the
/// scalar path, 8192 with AVX-512) in more than one image: the statistics by channel groups
/// (NCHW on one thread) sum each run in parts. Summed whole, runs of 5037 `f16` values in
/// [999, 1001) (five values, 0.5 apart) gave variances 1.6e-5 too small on the scalar path (a
/// case proptest found), against the few 1e-7 that chains of 128 keep to.
#[test]
#[cfg_attr(miri, ignore = "too large for Miri's interpreter")]
fn runs_longer_than_a_chain() {
    for (n, s) in [(2, 5037), (3, 8200)] {
        let shape = Shape::new(n, 2, s);
        let x: Vec<f16> = Rng::new(s as u64).data(shape.numel().unwrap(), 1e3, 1.0);
        let want = oracle::mean_var(&x, shape, Layout::Nchw);
        let check = |m: &[batchnorm::Moments], what: &str| {
            for (c, (m, (_, var))) in m.iter().zip(&want).enumerate() {
                let rel = (m.variance() - var).abs() / var;
                assert!(rel <= 2e-6, "{what}: variance of {c} off by {rel:e}");
            }
        };
        // The calling thread's calls on one thread (the pool's go parallel from 0 elements).
        with_parallel_threshold(usize::MAX, || {
            on_every_path(|path| {
                let what = format!("{shape:?}, {path}");
                check(&batchnorm::moments(&x, shape, Layout::Nchw).unwrap(), &what);
                let mut bn = BatchNorm::<f32>::new(2);
                let mut y = vec![f16::ZERO; x.len()];
                let saved = bn.forward_train(&x, &mut y, shape, Layout::Nchw).unwrap();
                for (c, (&invstd, (_, var))) in saved.invstd.iter().zip(&want).enumerate() {
                    let rel = (invstd as f64 * (var + bn.eps).sqrt() - 1.0).abs();
                    assert!(
                        rel <= 1e-6,
                        "training, {what}: invstd of {c} off by {rel:e}"
                    );
                }
            })
        });
    }
}

/// The new signatures check their input as the `f32` ones do, and a refused call leaves the
/// layer as it was.
#[test]
fn bad_input_leaves_the_layer_untouched() {
    let shape = Shape::new(2, 3, 4);
    let x = vec![f16::from_f32(1.5); 24];
    let mut bn = BatchNorm::<f32>::new(3);
    let start = bn.clone();
    let mut short = vec![f16::ZERO; 23];
    assert!(matches!(
        bn.forward_train(&x, &mut short, shape, Layout::Nchw),
        Err(Error::Length { .. })
    ));
    assert!(matches!(
        bn.forward_train(&x[..23], &mut short, shape, Layout::Nchw),
        Err(Error::Length { .. })
    ));
    let mut y = vec![bf16::ZERO; 24];
    let xb = vec![bf16::ZERO; 24];
    assert!(matches!(
        bn.forward_train(&xb, &mut y, Shape::new(2, 4, 3), Layout::Nchw),
        Err(Error::Channels { .. })
    ));
    assert!(matches!(
        bn.forward_train(&xb[..3], &mut y[..3], Shape::new(1, 3, 1), Layout::Nchw),
        Err(Error::TooFewValues { .. })
    ));
    assert_eq!(bn, start);
    let saved = bn
        .clone()
        .forward_train(&x, &mut [f16::ZERO; 24], shape, Layout::Nhwc);
    let saved = saved.unwrap();
    let mut dx = vec![f16::ZERO; 24];
    assert!(matches!(
        bn.backward(&x, &x[..20], &saved, &mut dx, shape, Layout::Nhwc),
        Err(Error::Length { .. })
    ));
    assert!(matches!(
        batchnorm::apply_scale_shift(&x, &mut dx, &[1.0; 2], &[0.0; 3], shape, Layout::Nchw),
        Err(Error::Length { .. })
    ));
    assert!(batchnorm::moments(&x[..5], shape, Layout::Nchw).is_err());
    assert_eq!(bn, start);
}
