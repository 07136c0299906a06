//! `BatchNorm::fold_into` as inference engines use it: a convolution followed by batch norm
//! against the folded convolution, within rounding; the folded values against a float64
//! reference; bad input refused with nothing written.

use crate::common;

use batchnorm::half::f16;
use batchnorm::{BatchNorm, Data, Error, Layout, Shape};
use common::Rng;

/// A direct 2-D convolution, stride 1, zero padding `k / 2`, OIHW weight, NCHW tensors,
/// accumulated in f64: `out[n, o, i, j] = b[o] + Σ w[o, c, di, dj] * x[n, c, i + di - p, j + dj - p]`.
/// Also returns, per output, `Σ |w * x| + |b|` (the size of the terms, for the tolerance).
#[allow(clippy::too_many_arguments)]
fn conv<D: Data>(
    x: &[f32],
    w: &[D],
    b: &[D],
    n: usize,
    c_in: usize,
    c_out: usize,
    hw: usize,
    k: usize,
) -> (Vec<f64>, Vec<f64>) {
    let p = k / 2;
    let mut out = vec![0.0; n * c_out * hw * hw];
    let mut terms = vec![0.0; out.len()];
    for img in 0..n {
        for o in 0..c_out {
            for i in 0..hw {
                for j in 0..hw {
                    let (mut acc, mut size) = (b[o].to_f64(), b[o].to_f64().abs());
                    for c in 0..c_in {
                        for di in 0..k {
                            for dj in 0..k {
                                let (si, sj) = ((i + di).wrapping_sub(p), (j + dj).wrapping_sub(p));
                                if si < hw && sj < hw {
                                    let v = x[((img * c_in + c) * hw + si) * hw + sj] as f64;
                                    let t = w[((o * c_in + c) * k + di) * k + dj].to_f64() * v;
                                    acc += t;
                                    size += t.abs();
                                }
                            }
                        }
                    }
                    let at = ((img * c_out + o) * hw + i) * hw + j;
                    out[at] = acc;
                    terms[at] = size;
                }
            }
        }
    }
    (out, terms)
}

fn layer(rng: &mut Rng, c: usize) -> BatchNorm<f32> {
    let mut bn = BatchNorm::new(c);
    for o in 0..c {
        bn.weight[o] = rng.signed() as f32 * 2.0;
        bn.bias[o] = rng.signed() as f32;
        bn.running_mean[o] = rng.signed() as f32 * 3.0;
        bn.running_var[o] = (0.01 + 4.0 * rng.unit()) as f32;
    }
    bn
}

/// Conv (f32 out) then our batch norm against the folded conv: equal within the rounding of
/// the folded weights and of the two f32 outputs, relative to the size of the terms.
fn check_conv_then_bn(seed: u64, n: usize, c_in: usize, c_out: usize, hw: usize, k: usize) {
    let mut rng = Rng::new(seed);
    let x: Vec<f32> = rng.data(n * c_in * hw * hw, 0.5, 1.0);
    let w: Vec<f32> = rng.data(c_out * c_in * k * k, 0.0, 0.3);
    let b: Vec<f32> = rng.data(c_out, 0.0, 0.5);
    let bn = layer(&mut rng, c_out);
    let shape = Shape::new(n, c_out, hw * hw);

    let (z, terms) = conv(&x, &w, &b, n, c_in, c_out, hw, k);
    let z32: Vec<f32> = z.iter().map(|&v| v as f32).collect();
    let mut y = vec![0.0f32; z32.len()];
    bn.forward_eval(&z32, &mut y, shape, Layout::Nchw).unwrap();

    let (mut wf, mut bf) = (w.clone(), b.clone());
    bn.fold_into(&mut wf, &mut bf).unwrap();
    let (folded, _) = conv(&x, &wf, &bf, n, c_in, c_out, hw, k);

    for (i, (&got, &want)) in folded.iter().zip(&y).enumerate() {
        let o = i / (hw * hw) % c_out;
        let s = (bn.weight[o] as f64 / (bn.running_var[o] as f64 + bn.eps).sqrt()).abs();
        // The folded terms carry one f32 rounding each; the unfolded path rounds z and y.
        let scale = s * (terms[i] + bn.running_mean[o].abs() as f64) + bn.bias[o].abs() as f64;
        let tol = 4.0 * f32::EPSILON as f64 * scale;
        assert!(
            (got - want as f64).abs() <= tol,
            "output {i}: folded {got} vs conv+bn {want} (tol {tol:e})"
        );
    }
}

#[test]
fn folded_conv_equals_conv_then_batch_norm() {
    check_conv_then_bn(1, 2, 3, 5, 7, 3);
    check_conv_then_bn(2, 1, 1, 1, 1, 1);
    if !cfg!(miri) {
        // Larger ones natively: Miri interprets every multiply of the direct convolution.
        check_conv_then_bn(3, 3, 4, 17, 5, 1);
        check_conv_then_bn(4, 1, 2, 8, 9, 5);
    }
}

/// Every folded value is the float64 formula rounded once to the weight's type, for a
/// linear layer (`[out, in]`) in f32 and an OHWI convolution in f16.
fn check_exact<D: Data<Param = f32>>(seed: u64, c_out: usize, per_out: usize) {
    let mut rng = Rng::new(seed);
    let mut bn = layer(&mut rng, c_out);
    bn.eps = 1e-3;
    let w: Vec<D> = rng.data(c_out * per_out, 0.0, 1.0);
    let b: Vec<D> = rng.data(c_out, 0.0, 1.0);
    let (mut wf, mut bf) = (w.clone(), b.clone());
    bn.fold_into(&mut wf, &mut bf).unwrap();
    for o in 0..c_out {
        let s = bn.weight[o] as f64 / (bn.running_var[o] as f64 + bn.eps).sqrt();
        for i in o * per_out..(o + 1) * per_out {
            assert_eq!(wf[i], D::from_f64(w[i].to_f64() * s), "weight {i}");
        }
        let want = (b[o].to_f64() - bn.running_mean[o] as f64) * s + bn.bias[o] as f64;
        assert_eq!(bf[o], D::from_f64(want), "bias {o}");
    }
}

#[test]
fn folded_values_are_rounded_once() {
    check_exact::<f32>(5, 7, 13);
    check_exact::<f32>(6, 1, 1);
    check_exact::<f16>(7, 16, 3 * 3 * 5);
    // No weights per output channel: only the bias folds.
    check_exact::<f32>(8, 4, 0);
}

#[test]
fn bad_input_is_refused_untouched() {
    let bn = BatchNorm::<f32>::new(3);
    let (w0, b0) = (vec![1.5f32; 10], vec![0.5f32; 3]);
    let try_fold = |bn: &BatchNorm<f32>, wl: usize, bl: usize| {
        let (mut w, mut b) = (w0[..wl].to_vec(), b0[..bl].to_vec());
        let r = bn.fold_into(&mut w, &mut b);
        if r.is_err() {
            assert_eq!((w.as_slice(), b.as_slice()), (&w0[..wl], &b0[..bl]));
        }
        r
    };
    assert!(matches!(
        try_fold(&bn, 10, 3),
        Err(Error::Length {
            what: "conv weight",
            expected: 9,
            got: 10
        })
    ));
    assert!(matches!(
        try_fold(&bn, 9, 2),
        Err(Error::Length {
            what: "conv bias",
            expected: 3,
            got: 2
        })
    ));
    assert!(matches!(try_fold(&bn, 2, 3), Err(Error::Length { .. })));
    let mut bad = bn.clone();
    bad.eps = -1.0;
    assert_eq!(try_fold(&bad, 9, 3), Err(Error::Eps(-1.0)));
    let mut bad = bn.clone();
    bad.running_var.pop();
    assert!(matches!(
        try_fold(&bad, 9, 3),
        Err(Error::Length {
            what: "running_var",
            ..
        })
    ));
    let empty = BatchNorm::<f32>::new(0);
    assert!(matches!(try_fold(&empty, 1, 0), Err(Error::Length { .. })));
    assert_eq!(try_fold(&empty, 0, 0), Ok(()));
    assert_eq!(try_fold(&bn, 9, 3), Ok(()));
}
