//! Fused epilogues (`y = relu(bn(x) + residual)`) against the `f64` oracle on every
//! instruction set and threading path, random shapes, both layouts, `f32` and `f16` tensors;
//! `Fuse::default()` bit for bit the plain calls; in-place twins identical; bad input refused
//! with the layer untouched; a NaN confined to its channel.

use crate::common;

use batchnorm::half::f16;
use batchnorm::{
    oracle, with_isa, with_stream_threshold, BatchNorm, Data, Error, Fuse, Layout, Shape,
};
use common::{
    assert_identical, config, layout, on_every_path, shape, test_isas, tol, two_pass_cases, Rng,
};
use proptest::prelude::*;

/// Asserts `|got - want| <= tol * (1 + terms)` element by element (`terms` the size of what was
/// added: the normalized value and the residual, since the sum may cancel), NaN matching NaN,
/// and for the 16-bit types one unit in the last place of `want` on top.
fn assert_fused<D: Data>(got: &[D], want: &[f64], terms: &[f64], tol: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let ulp = if std::mem::size_of::<D>() == 2 {
        2f64.powi(-10)
    } else {
        0.0
    };
    for (i, ((g, &w), &t)) in got.iter().zip(want).zip(terms).enumerate() {
        let g = g.to_f64();
        let ok = if w.is_nan() {
            g.is_nan()
        } else {
            (g - w).abs() <= tol * (1.0 + t) + ulp * w.abs()
        };
        assert!(ok, "{what}[{i}]: got {g:e}, want {w:e} (terms {t:e})");
    }
}

/// The sizes of the terms of `act(y + residual)`.
fn terms<D: Data>(y: &[f64], residual: Option<&[D]>) -> Vec<f64> {
    y.iter()
        .enumerate()
        .map(|(i, v)| v.abs() + residual.map_or(0.0, |r| r[i].to_f64().abs()))
        .collect()
}

fn layer(rng: &mut Rng, c: usize) -> BatchNorm<f32> {
    let mut bn = BatchNorm::new(c);
    bn.weight = rng.data(c, 0.0, 2.0);
    bn.bias = rng.data(c, 0.0, 2.0);
    bn.running_mean = rng.data(c, 0.0, 1.0);
    bn.running_var = rng.data(c, 1.5, 1.0);
    bn
}

/// Every fused forward operation against the oracle, with each of the four epilogues.
fn check_forward<D: Data<Param = f32>>(shape: Shape, layout: Layout, seed: u64) {
    let mut rng = Rng::new(seed);
    let len = shape.numel().unwrap();
    let (offset, spread) = rng.offset_spread();
    let x: Vec<D> = rng.data(len, offset, spread);
    let residual: Vec<D> = rng.data(len, 0.0, 1.5);
    let start = layer(&mut rng, shape.c);
    let tol = tol::<f32>(offset.abs() / spread);
    let (scale, shift) = start.scale_shift().unwrap();
    for (r, relu) in [
        (None, false),
        (None, true),
        (Some(&residual[..]), false),
        (Some(&residual[..]), true),
    ] {
        let fuse = Fuse { residual: r, relu };
        let train = oracle::forward_train(&start, &x, shape, layout);
        let want_train = oracle::epilogue(&train.y, r, relu);
        let eval = oracle::forward_eval(&start, &x, shape, layout);
        let want_eval = oracle::epilogue(&eval, r, relu);
        let folded = oracle::apply_scale_shift(&x, &scale, &shift, shape, layout);
        let want_folded = oracle::epilogue(&folded, r, relu);
        let (tt, te, tf) = (terms(&train.y, r), terms(&eval, r), terms(&folded, r));
        on_every_path(|path| {
            let what = |op: &str| format!("{op}, residual {}, relu {relu}, {path}", r.is_some());
            let mut bn = start.clone();
            let mut y = vec![D::default(); len];
            let saved = bn
                .forward_train_fused(&x, &mut y, shape, layout, fuse)
                .unwrap();
            assert_fused(&y, &want_train, &tt, tol, &what("train"));
            let mut in_place = start.clone();
            let mut xy = x.clone();
            let saved2 = in_place
                .forward_train_fused_in_place(&mut xy, shape, layout, fuse)
                .unwrap();
            assert_identical(&xy, &y, &what("train in place"));
            assert_eq!(
                (saved2, in_place),
                (saved, bn),
                "{}",
                what("train in place")
            );

            start
                .forward_eval_fused(&x, &mut y, shape, layout, fuse)
                .unwrap();
            assert_fused(&y, &want_eval, &te, tol, &what("eval"));
            let mut xy = x.clone();
            start
                .forward_eval_fused_in_place(&mut xy, shape, layout, fuse)
                .unwrap();
            assert_identical(&xy, &y, &what("eval in place"));

            batchnorm::apply_scale_shift_fused(&x, &mut y, &scale, &shift, shape, layout, fuse)
                .unwrap();
            // The folded form's error grows with the offset (see docs/FUSED.md): its own bound.
            let folded_tol = tol + 1e-7 * offset.abs() / spread;
            assert_fused(
                &y,
                &want_folded,
                &tf,
                folded_tol,
                &what("apply_scale_shift"),
            );
            let mut xy = x.clone();
            batchnorm::apply_scale_shift_fused_in_place(
                &mut xy, &scale, &shift, shape, layout, fuse,
            )
            .unwrap();
            assert_identical(&xy, &y, &what("apply_scale_shift in place"));
        });
    }
}

/// `Fuse::default()` is the plain call, bit for bit, in every mode.
fn check_default_is_plain(shape: Shape, layout: Layout, seed: u64) {
    let mut rng = Rng::new(seed);
    let len = shape.numel().unwrap();
    let x: Vec<f32> = rng.data(len, 1.0, 3.0);
    let start = layer(&mut rng, shape.c);
    on_every_path(|path| {
        let (mut a, mut b) = (vec![0.0f32; len], vec![0.0f32; len]);
        let (mut bn_a, mut bn_b) = (start.clone(), start.clone());
        let sa = bn_a.forward_train(&x, &mut a, shape, layout).unwrap();
        let sb = bn_b
            .forward_train_fused(&x, &mut b, shape, layout, Fuse::default())
            .unwrap();
        assert_identical(&a, &b, &format!("train, {path}"));
        assert_eq!((sa, bn_a), (sb, bn_b));
        start.forward_eval(&x, &mut a, shape, layout).unwrap();
        start
            .forward_eval_fused(&x, &mut b, shape, layout, Fuse::default())
            .unwrap();
        assert_identical(&a, &b, &format!("eval, {path}"));
    });
}

proptest! {
    #![proptest_config(config(48))]

    #[test]
    fn fused_forward_f32(shape in shape(), layout in layout(), seed: u64) {
        check_forward::<f32>(shape, layout, seed);
    }

    #[test]
    // Under Miri the f32 twins cover the same code (it interprets every operation).
    #[cfg_attr(miri, ignore)]
    fn fused_forward_f16(shape in shape(), layout in layout(), seed: u64) {
        check_forward::<f16>(shape, layout, seed);
    }

    #[test]
    fn default_fuse_is_the_plain_call(shape in shape(), layout in layout(), seed: u64) {
        check_default_is_plain(shape, layout, seed);
    }
}

/// A residual of the wrong length is refused before anything is written, and the layer's
/// state is left as it was; so is the folded form's.
#[test]
fn bad_residual_is_refused() {
    let shape = Shape::new(2, 3, 4);
    let x = vec![1.5f32; 24];
    let short = [0.0f32; 23];
    let mut bn = BatchNorm::<f32>::new(3);
    let start = bn.clone();
    let mut y = vec![7.0f32; 24];
    let fuse = Fuse::add_relu(&short[..]);
    let err = bn.forward_train_fused(&x, &mut y, shape, Layout::Nchw, fuse);
    assert!(matches!(err, Err(Error::Length { .. })), "{err:?}");
    let err = bn.forward_eval_fused(&x, &mut y, shape, Layout::Nhwc, fuse);
    assert!(matches!(err, Err(Error::Length { .. })), "{err:?}");
    let mut xy = x.clone();
    let err = bn.forward_train_fused_in_place(&mut xy, shape, Layout::Nchw, fuse);
    assert!(matches!(err, Err(Error::Length { .. })), "{err:?}");
    let (scale, shift) = bn.scale_shift().unwrap();
    let err =
        batchnorm::apply_scale_shift_fused(&x, &mut y, &scale, &shift, shape, Layout::Nchw, fuse);
    assert!(matches!(err, Err(Error::Length { .. })), "{err:?}");
    assert_eq!(bn, start);
    assert!(
        y.iter().all(|&v| v == 7.0) && xy == x,
        "written before the refusal"
    );
}

/// A NaN in the input or in the residual makes its output NaN and leaves every other output
/// finite and right; a NaN input still makes its whole channel NaN in training (its
/// statistics), which the ReLU does not hide.
#[test]
#[cfg_attr(miri, ignore)]
fn nan_stays_in_its_place() {
    let shape = Shape::new(2, 3, 17);
    for layout in [Layout::Nchw, Layout::Nhwc] {
        let mut rng = Rng::new(3);
        let len = shape.numel().unwrap();
        let mut x: Vec<f32> = rng.data(len, 0.0, 1.0);
        let mut residual: Vec<f32> = rng.data(len, 0.0, 1.0);
        x[shape.index(layout, 1, 0, 5)] = f32::NAN;
        residual[shape.index(layout, 0, 2, 3)] = f32::NAN;
        let bn = layer(&mut rng, shape.c);
        let fuse = Fuse::add_relu(&residual[..]);
        let train = oracle::forward_train(&bn, &x, shape, layout);
        let want = oracle::epilogue(&train.y, Some(&residual[..]), true);
        let tt = terms(&train.y, Some(&residual[..]));
        on_every_path(|path| {
            let mut y = vec![0.0f32; len];
            bn.clone()
                .forward_train_fused(&x, &mut y, shape, layout, fuse)
                .unwrap();
            for n in 0..shape.n {
                for s in 0..shape.spatial {
                    assert!(
                        y[shape.index(layout, n, 0, s)].is_nan(),
                        "channel 0, {path}"
                    );
                }
            }
            assert!(y[shape.index(layout, 0, 2, 3)].is_nan());
            assert_fused(&y, &want, &tt, 1e-5, &format!("NaN, {layout:?}, {path}"));
        });
    }
}

/// The fused backward against the oracle's, after a fused forward with each epilogue: `dx`
/// within the tolerance relative to its three terms, `dbias` and `dweight` relative to the
/// terms summed, `d_residual` exactly (it is `dy` or 0).
fn check_backward<D: Data<Param = f32>>(shape: Shape, layout: Layout, seed: u64) {
    let mut rng = Rng::new(seed);
    let len = shape.numel().unwrap();
    let (offset, spread) = rng.offset_spread();
    let x: Vec<D> = rng.data(len, offset, spread);
    let residual: Vec<D> = rng.data(len, 0.0, 1.0);
    let dy: Vec<D> = rng.data(len, 0.0, 1.0);
    let bn = layer(&mut rng, shape.c);
    let tol = tol::<f32>(offset.abs() / spread)
        + if std::mem::size_of::<D>() == 2 {
            1e-3
        } else {
            0.0
        };
    let m = (shape.n * shape.spatial) as f64;
    for (r, relu) in [
        (None, true),
        (Some(&residual[..]), true),
        (Some(&residual[..]), false),
    ] {
        let mut y = vec![D::default(); len];
        let fuse = Fuse { residual: r, relu };
        let saved = bn
            .clone()
            .forward_train_fused(&x, &mut y, shape, layout, fuse)
            .unwrap();
        let (want, dz) = oracle::backward_fused(&bn, &x, &y, &dy, &saved, shape, layout, relu);
        let (mut dx_terms, mut sum_dz, mut sum_dz_xhat) =
            (vec![0.0; len], vec![0.0; shape.c], vec![0.0; shape.c]);
        for n in 0..shape.n {
            for c in 0..shape.c {
                let (is, w) = (saved.invstd[c] as f64, bn.weight[c] as f64);
                for s in 0..shape.spatial {
                    let i = shape.index(layout, n, c, s);
                    let xhat = (x[i].to_f64() - saved.mean[c] as f64) * is;
                    sum_dz[c] += dz[i].abs();
                    sum_dz_xhat[c] += (dz[i] * xhat).abs();
                    dx_terms[i] = (w * is * dz[i]).abs()
                        + (w * is / m * xhat * want.weight[c]).abs()
                        + (w * is / m * want.bias[c]).abs();
                }
            }
        }
        on_every_path(|path| {
            let what = format!("residual {}, relu {relu}, {path}", r.is_some());
            let mut dx = vec![D::default(); len];
            let mut dr = vec![D::default(); len];
            let g = bn
                .backward_fused(
                    &x,
                    &y,
                    &dy,
                    &saved,
                    &mut dx,
                    Some(&mut dr),
                    shape,
                    layout,
                    relu,
                )
                .unwrap();
            for i in 0..len {
                let (got, w) = (dx[i].to_f64(), want.dx[i]);
                assert!(
                    (got - w).abs() <= tol * (1.0 + dx_terms[i]),
                    "dx[{i}] {got} vs {w}, {what}"
                );
                assert_eq!(dr[i].to_f64(), dz[i], "d_residual[{i}], {what}");
            }
            for c in 0..shape.c {
                let (db, dw) = (g.bias[c] as f64, g.weight[c] as f64);
                assert!(
                    (db - want.bias[c]).abs() <= tol * (1.0 + sum_dz[c]),
                    "dbias {c}, {what}"
                );
                assert!(
                    (dw - want.weight[c]).abs() <= tol * (1.0 + sum_dz_xhat[c]),
                    "dweight {c}, {what}"
                );
            }
            // Without the residual's gradient: the same dx and gradients.
            let mut dx2 = vec![D::default(); len];
            let g2 = bn
                .backward_fused(&x, &y, &dy, &saved, &mut dx2, None, shape, layout, relu)
                .unwrap();
            assert_identical(&dx2, &dx, &format!("dx without d_residual, {what}"));
            assert_eq!(g2, g);
        });
    }
}

/// Without a ReLU, `backward_fused` is the plain backward, bit for bit.
fn check_backward_plain(shape: Shape, layout: Layout, seed: u64) {
    let mut rng = Rng::new(seed);
    let len = shape.numel().unwrap();
    let x: Vec<f32> = rng.data(len, 1.0, 2.0);
    let dy: Vec<f32> = rng.data(len, 0.0, 1.0);
    let bn = layer(&mut rng, shape.c);
    let mut y = vec![0.0f32; len];
    let saved = bn.clone().forward_train(&x, &mut y, shape, layout).unwrap();
    on_every_path(|path| {
        let (mut a, mut b) = (vec![0.0f32; len], vec![0.0f32; len]);
        let ga = bn.backward(&x, &dy, &saved, &mut a, shape, layout).unwrap();
        let gb = bn
            .backward_fused(&x, &y, &dy, &saved, &mut b, None, shape, layout, false)
            .unwrap();
        assert_identical(&a, &b, &format!("dx, {path}"));
        assert_eq!(ga, gb, "{path}");
    });
}

proptest! {
    #![proptest_config(config(32))]

    #[test]
    fn fused_backward_f32(shape in shape(), layout in layout(), seed: u64) {
        check_backward::<f32>(shape, layout, seed);
    }

    #[test]
    // Under Miri the f32 twins cover the same code (it interprets every operation).
    #[cfg_attr(miri, ignore)]
    fn fused_backward_f16(shape in shape(), layout in layout(), seed: u64) {
        check_backward::<f16>(shape, layout, seed);
    }

    #[test]
    // Under Miri the f32 twins cover the same code (it interprets every operation).
    #[cfg_attr(miri, ignore)]
    fn fused_backward_without_relu_is_plain(shape in shape(), layout in layout(), seed: u64) {
        check_backward_plain(shape, layout, seed);
    }
}

/// The fused backward is the derivative of the fused forward: `L = Σ c_i y_i` with
/// `y = relu(bn(x) + residual)` (f64, training statistics), differentiated by central
/// differences in each input, away from the ReLU's kink, against `dx` (and `d_residual` for
/// the residual's derivative).
#[test]
#[cfg_attr(miri, ignore)]
fn fused_backward_is_the_derivative() {
    let shape = Shape::new(3, 2, 5);
    for layout in [Layout::Nchw, Layout::Nhwc] {
        let mut rng = Rng::new(17);
        let len = shape.numel().unwrap();
        let x: Vec<f64> = rng.data(len, 0.5, 2.0);
        let residual: Vec<f64> = rng.data(len, 0.0, 1.0);
        let coef: Vec<f64> = rng.data(len, 0.0, 1.0);
        let mut bn = BatchNorm::<f64>::new(shape.c);
        bn.weight = vec![1.3, -0.7];
        bn.bias = vec![0.2, 0.1];
        let loss = |x: &[f64], r: &[f64]| -> (f64, Vec<f64>) {
            let mut y = vec![0.0; len];
            bn.clone()
                .forward_train_fused(x, &mut y, shape, layout, Fuse::add_relu(r))
                .unwrap();
            (y.iter().zip(&coef).map(|(y, c)| y * c).sum(), y)
        };
        let (_, y) = loss(&x, &residual);
        let mut yy = vec![0.0; len];
        let saved = bn
            .clone()
            .forward_train_fused(&x, &mut yy, shape, layout, Fuse::add_relu(&residual))
            .unwrap();
        let (mut dx, mut dr) = (vec![0.0; len], vec![0.0; len]);
        bn.backward_fused(
            &x,
            &y,
            &coef,
            &saved,
            &mut dx,
            Some(&mut dr),
            shape,
            layout,
            true,
        )
        .unwrap();
        let h = 1e-6;
        let mut checked = 0;
        for i in 0..len {
            let (mut xp, mut xm) = (x.clone(), x.clone());
            xp[i] += h;
            xm[i] -= h;
            let (lp, yp) = loss(&xp, &residual);
            let (lm, ym) = loss(&xm, &residual);
            // Away from the kink: no output changes sides of 0 between the two evaluations.
            if yp.iter().zip(&ym).any(|(a, b)| (*a > 0.0) != (*b > 0.0)) {
                continue;
            }
            let fd = (lp - lm) / (2.0 * h);
            assert!(
                (fd - dx[i]).abs() <= 1e-6 * (1.0 + fd.abs()),
                "dx[{i}] {} vs {fd}, {layout:?}",
                dx[i]
            );
            let (mut rp, mut rm) = (residual.clone(), residual.clone());
            rp[i] += h;
            rm[i] -= h;
            let fd = (loss(&x, &rp).0 - loss(&x, &rm).0) / (2.0 * h);
            assert!(
                (fd - dr[i]).abs() <= 1e-6 * (1.0 + fd.abs()),
                "d_residual[{i}] {} vs {fd}",
                dr[i]
            );
            checked += 1;
        }
        assert!(checked > len / 2, "{checked} of {len} checked");
    }
}

/// `y` and `d_residual` of the wrong length are refused before anything is written.
#[test]
fn fused_backward_bad_input() {
    let shape = Shape::new(2, 3, 4);
    let x = vec![1.5f32; 24];
    let bn = BatchNorm::<f32>::new(3);
    let mut y = vec![0.0f32; 24];
    let saved = bn
        .clone()
        .forward_train(&x, &mut y, shape, Layout::Nchw)
        .unwrap();
    let mut dx = vec![7.0f32; 24];
    let mut short = vec![7.0f32; 23];
    let err = bn.backward_fused(
        &x,
        &y[..23],
        &x,
        &saved,
        &mut dx,
        None,
        shape,
        Layout::Nchw,
        true,
    );
    assert!(matches!(err, Err(Error::Length { .. })), "{err:?}");
    let err = bn.backward_fused(
        &x,
        &y,
        &x,
        &saved,
        &mut dx,
        Some(&mut short),
        shape,
        Layout::Nchw,
        true,
    );
    assert!(matches!(err, Err(Error::Length { .. })), "{err:?}");
    assert!(
        dx.iter().chain(&short).all(|&v| v == 7.0),
        "written before the refusal"
    );
}

/// Channels of more than half of L2 each (a 1.1 MB channel, for caches of up to 2.2 MB):
/// training with a residual takes the two-pass path there (the statistics by channel groups,
/// then one map over the tensor), checked against the oracle as on every other shape.
#[test]
#[cfg_attr(miri, ignore = "a tensor of megabytes")]
fn channels_beyond_l2() {
    let shape = Shape::new(2, 2, 140_000);
    check_forward::<f32>(shape, Layout::Nchw, 41);
    check_backward::<f32>(shape, Layout::Nchw, 43);
}

/// On one thread, a training forward with a residual whose output streams takes two passes
/// over NCHW (the statistics by channel groups, then one map over the tensor); otherwise each
/// channel group is reduced and mapped in turn. Both give the same bits: the same moments per
/// channel, the same map; the same saved and running statistics. With and without ReLU,
/// including a channel whose squares overflow `f32` (summed again in `f64`) and more channels
/// than one group holds.
#[test]
fn two_passes_are_the_channel_groups() {
    for (shape, x, mut rng) in two_pass_cases(60) {
        let len = x.len();
        let residual: Vec<f32> = rng.data(len, 0.0, 1.0);
        let bn = layer(&mut rng, shape.c);
        let run = |threshold: usize, relu: bool| {
            with_stream_threshold(threshold, || {
                let (mut layer, mut y) = (bn.clone(), vec![0.0; len]);
                let fuse = Fuse {
                    residual: Some(&residual[..]),
                    relu,
                };
                let saved = layer
                    .forward_train_fused(&x, &mut y, shape, Layout::Nchw, fuse)
                    .unwrap();
                (saved, layer.running_mean, layer.running_var, y)
            })
        };
        for isa in test_isas() {
            for relu in [false, true] {
                with_isa(isa, || {
                    let what = format!("{shape:?}, {isa:?}, relu {relu}");
                    let (two, groups) = (run(0, relu), run(usize::MAX, relu));
                    assert_eq!(two.0, groups.0, "saved statistics, {what}");
                    assert_identical(&two.1, &groups.1, &format!("running mean, {what}"));
                    assert_identical(&two.2, &groups.2, &format!("running variance, {what}"));
                    assert_identical(&two.3, &groups.3, &format!("y, {what}"));
                });
            }
        }
    }
}
