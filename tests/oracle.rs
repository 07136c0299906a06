//! Every public operation, on every instruction set and threading path, against the scalar
//! `f64` oracle, on random shapes: odd channel counts, channel counts that are not a multiple of
//! any vector width, N = 1, spatial = 1, and channels longer than a statistics block.

use crate::common;

use batchnorm::{oracle, BatchNorm, Element, Layout, Shape};
use common::{assert_close, assert_identical, layout, on_every_path, shape, tol, Rng};
use proptest::prelude::*;

/// Data with one of [`Rng::offset_spread`]'s offsets and spreads, and the tolerance for it.
fn data<T: Element>(rng: &mut Rng, len: usize) -> (Vec<T>, f64) {
    let (offset, spread) = rng.offset_spread();
    (
        rng.data(len, offset, spread),
        tol::<T>(offset.abs() / spread),
    )
}

fn layer<T: Element>(rng: &mut Rng, c: usize) -> BatchNorm<T> {
    let mut bn = BatchNorm::new(c);
    bn.weight = rng.data(c, 0.0, 2.0);
    bn.bias = rng.data(c, 0.0, 2.0);
    bn.running_mean = rng.data(c, 0.0, 1.0);
    bn.running_var = rng.data(c, 1.5, 1.0);
    bn.momentum = [Some(0.1), None, Some(1.0)][(rng.unit() * 3.0) as usize];
    bn.unbiased_running_var = rng.unit() < 0.5;
    bn.num_batches_tracked = (rng.unit() * 5.0) as u64;
    bn
}

fn check_train<T: Element>(shape: Shape, layout: Layout, seed: u64) {
    let mut rng = Rng::new(seed);
    let len = shape.numel().unwrap();
    let (x, tol) = data::<T>(&mut rng, len);
    let start = layer::<T>(&mut rng, shape.c);
    let want = oracle::forward_train(&start, &x, shape, layout);
    on_every_path(|path| {
        let mut bn = start.clone();
        let mut y = vec![T::ZERO; len];
        let saved = bn.forward_train(&x, &mut y, shape, layout).unwrap();
        assert_close(&y, &want.y, tol, &format!("y, {path}"));
        assert_close(&saved.mean, &want.mean, tol, &format!("mean, {path}"));
        assert_close(&saved.invstd, &want.invstd, tol, &format!("invstd, {path}"));
        assert_close(
            &bn.running_mean,
            &want.running_mean,
            tol,
            &format!("running_mean, {path}"),
        );
        assert_close(
            &bn.running_var,
            &want.running_var,
            tol,
            &format!("running_var, {path}"),
        );
        assert_eq!(bn.num_batches_tracked, want.num_batches_tracked);

        let mut in_place_bn = start.clone();
        let mut xy = x.clone();
        let saved2 = in_place_bn
            .forward_train_in_place(&mut xy, shape, layout)
            .unwrap();
        assert_identical(&xy, &y, &format!("in-place y, {path}"));
        assert_eq!(saved2, saved, "in-place saved stats, {path}");
        assert_eq!(in_place_bn, bn, "in-place layer state, {path}");
    });
}

fn check_eval<T: Element>(shape: Shape, layout: Layout, seed: u64) {
    let mut rng = Rng::new(seed);
    let len = shape.numel().unwrap();
    let (x, tol) = data::<T>(&mut rng, len);
    let bn = layer::<T>(&mut rng, shape.c);
    let want = oracle::forward_eval(&bn, &x, shape, layout);
    let (scale, shift) = bn.scale_shift().unwrap();
    let want_folded = oracle::apply_scale_shift(&x, &scale, &shift, shape, layout);
    on_every_path(|path| {
        let mut y = vec![T::ZERO; len];
        bn.forward_eval(&x, &mut y, shape, layout).unwrap();
        assert_close(&y, &want, tol, &format!("eval y, {path}"));
        let mut xy = x.clone();
        bn.forward_eval_in_place(&mut xy, shape, layout).unwrap();
        assert_identical(&xy, &y, &format!("in-place eval, {path}"));

        // The folded form rounds x * scale before adding shift: its error is relative to the
        // terms, |x * scale| + |shift|, not to the result.
        batchnorm::apply_scale_shift(&x, &mut y, &scale, &shift, shape, layout).unwrap();
        let terms = oracle::map(&x, shape, layout, |c, v| {
            (v * scale[c].to_f64()).abs() + shift[c].to_f64().abs()
        });
        assert_eq!(y.len(), want_folded.len(), "folded y: length, {path}");
        for (i, ((g, w), t)) in y.iter().zip(&want_folded).zip(&terms).enumerate() {
            let err = (g.to_f64() - w).abs();
            assert!(err <= tol * (1.0 + t), "folded y[{i}] {g:?} vs {w}, {path}");
        }
        let mut xy = x.clone();
        batchnorm::apply_scale_shift_in_place(&mut xy, &scale, &shift, shape, layout).unwrap();
        assert_identical(&xy, &y, &format!("in-place folded, {path}"));
    });
}

fn check_moments<T: Element>(shape: Shape, layout: Layout, seed: u64) {
    let mut rng = Rng::new(seed);
    let (x, tol) = data::<T>(&mut rng, shape.numel().unwrap());
    let want = oracle::mean_var(&x, shape, layout);
    on_every_path(|path| {
        let got = batchnorm::moments(&x, shape, layout).unwrap();
        assert_eq!(got.len(), want.len(), "moments: channels, {path}");
        for (c, (m, (mean, var))) in got.iter().zip(&want).enumerate() {
            assert_eq!(m.count as usize, shape.n * shape.spatial);
            // The moments are f64 but computed from f32 partial sums: the mean's error is
            // relative to the spread, the variance's to itself.
            let spread = var.sqrt();
            assert!(
                (m.mean - mean).abs() <= tol * spread,
                "mean of {c}, {path}: {} vs {mean}",
                m.mean
            );
            assert!(
                (m.variance() - var).abs() <= tol * var,
                "var of {c}, {path}: {} vs {var}",
                m.variance()
            );
        }
    });
}

proptest! {
    #![proptest_config(common::config(128))]

    #[test]
    fn train_f32(shape in shape(), layout in layout(), seed: u64) {
        check_train::<f32>(shape, layout, seed);
    }

    #[test]
    fn train_f64(shape in shape(), layout in layout(), seed: u64) {
        check_train::<f64>(shape, layout, seed);
    }

    #[test]
    fn eval_f32(shape in shape(), layout in layout(), seed: u64) {
        check_eval::<f32>(shape, layout, seed);
    }

    #[test]
    fn eval_f64(shape in shape(), layout in layout(), seed: u64) {
        check_eval::<f64>(shape, layout, seed);
    }

    #[test]
    fn moments_f32(shape in shape(), layout in layout(), seed: u64) {
        check_moments::<f32>(shape, layout, seed);
    }

    #[test]
    fn moments_f64(shape in shape(), layout in layout(), seed: u64) {
        check_moments::<f64>(shape, layout, seed);
    }
}

/// The instruction sets `BATCHNORM_TEST_ISA` names are detected (else this fails, as does
/// every test that runs on every path), and the tests run on each of them.
#[test]
fn required_instruction_sets_are_tested() {
    let isas = common::test_isas();
    assert!(isas.contains(&batchnorm::Isa::Scalar));
    assert!(isas.contains(&batchnorm::Isa::best()));
}
