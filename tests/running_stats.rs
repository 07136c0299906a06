//! Running statistics over several training steps: both momentum modes, both variance
//! conventions, against hand-worked PyTorch/ONNX values and against the oracle chained step by
//! step.

use crate::common;

use approx::assert_relative_eq;
use batchnorm::{oracle, BatchNorm, Element, Layout, Shape};
use common::{on_every_path, tol, Rng};

/// One channel, N = 4, spatial = 1: x = [1, 2, 3, 4] then [0, 0, 2, 2].
/// Batch 1: mean 2.5, biased var 1.25, unbiased 5/3. Batch 2: mean 1, biased 1, unbiased 4/3.
fn two_steps(bn: &mut BatchNorm<f64>) {
    let shape = Shape::new(4, 1, 1);
    let mut y = [0.0; 4];
    for x in [[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 2.0, 2.0]] {
        bn.forward_train(&x, &mut y, shape, Layout::Nchw).unwrap();
    }
}

#[test]
fn pytorch_momentum() {
    let mut bn = BatchNorm::<f64>::new(1);
    two_steps(&mut bn);
    // mean: 0.9 * (0.9 * 0 + 0.1 * 2.5) + 0.1 * 1; var: 0.9 * (0.9 * 1 + 0.1 * 5/3) + 0.1 * 4/3
    assert_relative_eq!(bn.running_mean[0], 0.325, max_relative = 1e-15);
    assert_relative_eq!(
        bn.running_var[0],
        0.9 * (0.9 + 0.5 / 3.0) + 0.4 / 3.0,
        max_relative = 1e-15
    );
    assert_eq!(bn.num_batches_tracked, 2);
}

#[test]
fn pytorch_cumulative_average() {
    let mut bn = BatchNorm::<f64>::new(1);
    bn.momentum = None;
    two_steps(&mut bn);
    // factor 1, then 1/2: the plain average of the two batches' statistics.
    assert_relative_eq!(bn.running_mean[0], 1.75, max_relative = 1e-15);
    assert_relative_eq!(bn.running_var[0], 1.5, max_relative = 1e-15);
}

#[test]
fn onnx_conventions() {
    // ONNX momentum 0.9 weights the old value; the running variance is the biased one.
    let mut bn = BatchNorm::<f64>::onnx(1, 1e-5, 0.9);
    two_steps(&mut bn);
    assert_relative_eq!(bn.running_mean[0], 0.325, max_relative = 1e-12);
    assert_relative_eq!(
        bn.running_var[0],
        0.9 * (0.9 + 0.125) + 0.1,
        max_relative = 1e-12
    );
}

#[test]
fn momentum_zero_keeps_and_one_replaces() {
    let mut keep = BatchNorm::<f64>::new(1);
    keep.momentum = Some(0.0);
    two_steps(&mut keep);
    assert_eq!((keep.running_mean[0], keep.running_var[0]), (0.0, 1.0));
    let mut replace = BatchNorm::<f64>::new(1);
    replace.momentum = Some(1.0);
    two_steps(&mut replace);
    assert_relative_eq!(replace.running_mean[0], 1.0, max_relative = 1e-15);
    assert_relative_eq!(replace.running_var[0], 4.0 / 3.0, max_relative = 1e-15);
}

/// Five steps on random batches, every path, against the oracle chained in f64.
fn chained<T: Element>(momentum: Option<f64>, unbiased: bool, layout: Layout) {
    let shape = Shape::new(3, 5, 7);
    let mut rng = Rng::new(7);
    let batches: Vec<(Vec<T>, f64)> = (0..5)
        .map(|i| {
            let spread = 1.0 + i as f64;
            (
                rng.data(shape.numel().unwrap(), i as f64 * 3.0, spread),
                tol::<T>(3.0 * i as f64 / spread),
            )
        })
        .collect();
    let mut start = BatchNorm::<T>::new(shape.c);
    start.momentum = momentum;
    start.unbiased_running_var = unbiased;
    on_every_path(|path| {
        let mut bn = start.clone();
        let mut reference = BatchNorm::<f64>::new(shape.c);
        reference.momentum = momentum;
        reference.unbiased_running_var = unbiased;
        let mut y = vec![T::ZERO; shape.numel().unwrap()];
        for (x, tol) in &batches {
            bn.forward_train(x, &mut y, shape, layout).unwrap();
            let x64: Vec<f64> = x.iter().map(|v| v.to_f64()).collect();
            let want = oracle::forward_train(&reference, &x64, shape, layout);
            reference.running_mean = want.running_mean;
            reference.running_var = want.running_var;
            reference.num_batches_tracked = want.num_batches_tracked;
            for c in 0..shape.c {
                let (m, v) = (bn.running_mean[c].to_f64(), bn.running_var[c].to_f64());
                let (wm, wv) = (reference.running_mean[c], reference.running_var[c]);
                assert!(
                    (m - wm).abs() <= tol * (1.0 + wm.abs()),
                    "running_mean[{c}] {m} vs {wm}, {path}"
                );
                assert!(
                    (v - wv).abs() <= tol * (1.0 + wv.abs()),
                    "running_var[{c}] {v} vs {wv}, {path}"
                );
            }
        }
        assert_eq!(bn.num_batches_tracked, 5);
    });
}

#[test]
#[cfg_attr(miri, ignore = "too large for Miri's interpreter")]
fn chained_against_oracle() {
    for momentum in [Some(0.1), Some(0.75), None] {
        for unbiased in [true, false] {
            for layout in [Layout::Nchw, Layout::Nhwc] {
                chained::<f32>(momentum, unbiased, layout);
                chained::<f64>(momentum, unbiased, layout);
            }
        }
    }
}
