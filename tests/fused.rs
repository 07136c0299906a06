//! Fused epilogues (`y = relu(bn(x) + residual)`) against the `f64` oracle on every
//! instruction set and threading path, random shapes, both layouts, `f32` and `f16` tensors;
//! `Fuse::default()` bit for bit the plain calls; in-place twins identical; bad input refused
//! with the layer untouched; a NaN confined to its channel.

mod common;

use batchnorm::half::f16;
use batchnorm::{oracle, BatchNorm, Data, Error, Fuse, Layout, Shape};
use common::{assert_identical, config, layout, on_every_path, shape, tol, Rng};
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

fn data<D: Data>(rng: &mut Rng, n: usize, offset: f64, spread: f64) -> Vec<D> {
    (0..n)
        .map(|_| D::from_f64(offset + spread * rng.signed()))
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
    let x: Vec<D> = data(&mut rng, len, offset, spread);
    let residual: Vec<D> = data(&mut rng, len, 0.0, 1.5);
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
            // The folded form's error grows with the offset (see the README): its own bound.
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
    let x: Vec<f32> = data(&mut rng, len, 1.0, 3.0);
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
        let mut x: Vec<f32> = data(&mut rng, len, 0.0, 1.0);
        let mut residual: Vec<f32> = data(&mut rng, len, 0.0, 1.0);
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
