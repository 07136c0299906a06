//! The C ABI (`capi` feature) called as C would call it: every data type and epilogue against
//! the Rust API bit for bit, in place, and the refusals (NULL, misaligned, overlapping,
//! unknown layout or type, bad parameters) with their status, message and nothing written.

mod common;

use batchnorm::capi::*;
use batchnorm::half::{bf16, f16};
use batchnorm::{BatchNorm, Data, Fuse, Layout, SavedStats, Shape};
use common::{assert_identical, Rng};
use std::ffi::CStr;
use std::ptr::{null, null_mut};

fn last_error() -> String {
    // SAFETY: bn_last_error returns a NUL-terminated string valid until the next failure.
    unsafe { CStr::from_ptr(bn_last_error()) }
        .to_string_lossy()
        .into_owned()
}

/// A C layer and the same Rust one.
fn layers(rng: &mut Rng, c: usize) -> (*mut bn_layer, BatchNorm<f32>) {
    let mut bn = BatchNorm::<f32>::new(c);
    for v in [&mut bn.weight, &mut bn.bias, &mut bn.running_mean] {
        *v = rng.data(c, 0.0, 1.0);
    }
    bn.running_var = rng.data(c, 2.0, 1.0);
    bn.momentum = None;
    bn.eps = 1e-3;
    let layer = bn_layer_new(c);
    assert!(!layer.is_null());
    // SAFETY: a live layer and c floats each.
    let status = unsafe {
        bn_layer_set(
            layer,
            bn.weight.as_ptr(),
            bn.bias.as_ptr(),
            bn.running_mean.as_ptr(),
            bn.running_var.as_ptr(),
            bn.eps,
            -1.0,
        )
    };
    assert_eq!(status, bn_status::BN_OK);
    (layer, bn)
}

/// The C layer's state.
fn state(layer: *const bn_layer, c: usize) -> (Vec<Vec<f32>>, u64) {
    let mut v = vec![vec![0.0f32; c]; 4];
    let mut batches = 0;
    // SAFETY: room for c floats each.
    let status = unsafe {
        bn_layer_get(
            layer,
            v[0].as_mut_ptr(),
            v[1].as_mut_ptr(),
            v[2].as_mut_ptr(),
            v[3].as_mut_ptr(),
            &mut batches,
        )
    };
    assert_eq!(status, bn_status::BN_OK);
    (v, batches)
}

fn check_type<D: Data<Param = f32>>(dtype: bn_dtype, layout: Layout, seed: u64) {
    let mut rng = Rng::new(seed);
    // Under Miri (which checks the entries' pointer handling), a smaller tensor.
    let shape = if cfg!(miri) {
        Shape::new(2, 3, 5)
    } else {
        Shape::new(3, 11, 13)
    };
    let len = shape.numel().unwrap();
    let x: Vec<D> = rng.data(len, 1.0, 2.0);
    let residual: Vec<D> = rng.data(len, 0.0, 1.0);
    let dy: Vec<D> = rng.data(len, 0.0, 1.0);
    let (layer, mut bn) = layers(&mut rng, shape.c);
    let tensor = bn_tensor {
        n: shape.n,
        c: shape.c,
        spatial: shape.spatial,
        layout: match layout {
            Layout::Nchw => BN_NCHW,
            Layout::Nhwc => BN_NHWC,
        },
        dtype,
    };
    for (r, relu) in [(None, false), (None, true), (Some(&residual[..]), true)] {
        let fuse = Fuse { residual: r, relu };
        let r_ptr = r.map_or(null(), |r| r.as_ptr().cast());
        // Training: out of place, then in place on a second layer state.
        let mut want = vec![D::default(); len];
        let saved = bn
            .forward_train_fused(&x, &mut want, shape, layout, fuse)
            .unwrap();
        let (mut y, mut mean, mut invstd) = (
            vec![D::default(); len],
            vec![0f32; shape.c],
            vec![0f32; shape.c],
        );
        // SAFETY: every buffer has its size.
        let status = unsafe {
            bn_forward_train(
                layer,
                tensor,
                x.as_ptr().cast(),
                y.as_mut_ptr().cast(),
                r_ptr,
                relu as i32,
                mean.as_mut_ptr(),
                invstd.as_mut_ptr(),
            )
        };
        assert_eq!(status, bn_status::BN_OK, "{}", last_error());
        assert_identical(&y, &want, "train");
        assert_eq!(
            (mean.clone(), invstd.clone()),
            (saved.mean.clone(), saved.invstd.clone())
        );
        let (v, batches) = state(layer, shape.c);
        assert_eq!(v[2], bn.running_mean);
        assert_eq!(v[3], bn.running_var);
        assert_eq!(batches, bn.num_batches_tracked);

        // Inference in place.
        let mut xy = x.clone();
        // SAFETY: as above; x == y is the in-place call.
        let status = unsafe {
            bn_forward_eval(
                layer,
                tensor,
                xy.as_ptr().cast(),
                xy.as_mut_ptr().cast(),
                r_ptr,
                relu as i32,
            )
        };
        assert_eq!(status, bn_status::BN_OK, "{}", last_error());
        bn.forward_eval_fused(&x, &mut want, shape, layout, fuse)
            .unwrap();
        assert_identical(&xy, &want, "eval in place");

        // Backward with the residual's gradient.
        let (mut dx, mut dr) = (vec![D::default(); len], vec![D::default(); len]);
        let (mut dw, mut db) = (vec![0f32; shape.c], vec![0f32; shape.c]);
        let saved_c = bn_saved {
            mean: mean.as_ptr(),
            invstd: invstd.as_ptr(),
        };
        let grads = bn_grads {
            dweight: dw.as_mut_ptr(),
            dbias: db.as_mut_ptr(),
            d_residual: dr.as_mut_ptr().cast(),
        };
        // SAFETY: as above.
        let status = unsafe {
            bn_backward(
                layer,
                tensor,
                x.as_ptr().cast(),
                y.as_ptr().cast(),
                dy.as_ptr().cast(),
                dx.as_mut_ptr().cast(),
                saved_c,
                grads,
                relu as i32,
            )
        };
        assert_eq!(status, bn_status::BN_OK, "{}", last_error());
        let (mut want_dx, mut want_dr) = (vec![D::default(); len], vec![D::default(); len]);
        let saved = SavedStats { mean, invstd };
        let g = bn
            .backward_fused(
                &x,
                &y,
                &dy,
                &saved,
                &mut want_dx,
                Some(&mut want_dr),
                shape,
                layout,
                relu,
            )
            .unwrap();
        assert_identical(&dx, &want_dx, "dx");
        assert_identical(&dr, &want_dr, "d_residual");
        assert_eq!((dw, db), (g.weight, g.bias));
    }
    // SAFETY: made by bn_layer_new, freed once.
    unsafe { bn_layer_free(layer) };
}

#[test]
fn every_type_and_epilogue_is_the_rust_call() {
    for (i, layout) in [Layout::Nchw, Layout::Nhwc].into_iter().enumerate() {
        check_type::<f32>(BN_F32, layout, 10 + i as u64);
        check_type::<f16>(BN_F16, layout, 20 + i as u64);
        check_type::<bf16>(BN_BF16, layout, 30 + i as u64);
    }
}

#[test]
fn refusals_write_nothing() {
    let mut rng = Rng::new(5);
    let (n, c, s) = (2usize, 3usize, 4usize);
    let len = n * c * s;
    let (layer, _) = layers(&mut rng, c);
    let x: Vec<f32> = rng.data(len + 1, 0.0, 1.0);
    let before = state(layer, c);
    let mut y = vec![7.0f32; len + 1];
    let mut saved = vec![7.0f32; 2 * c];
    let t = |layout, dtype| bn_tensor {
        n,
        c,
        spatial: s,
        layout,
        dtype,
    };
    let invalid = bn_status::BN_INVALID_ARGUMENT;
    // SAFETY (every call): buffers of at least their sizes, or NULL / misaligned on purpose,
    // which the entries check before any access.
    unsafe {
        let xp = x.as_ptr();
        let yp = y.as_mut_ptr();
        // Each refusal: its status, and its own message in bn_last_error.
        macro_rules! refused {
            ($what:expr, $call:expr, $message:expr) => {
                assert_eq!($call, invalid, "{}", $what);
                let e = last_error();
                assert!(e.contains($message), "{}: message {e:?}", $what);
            };
        }
        refused!(
            "NULL x",
            bn_forward_train_f32(layer, null(), yp, n, c, s, BN_NCHW, null_mut(), null_mut()),
            "NULL"
        );
        refused!(
            "NULL layer",
            bn_forward_eval_f32(null(), xp, yp, n, c, s, BN_NCHW),
            "NULL"
        );
        refused!(
            "misaligned x",
            bn_forward_eval_f32(layer, xp.cast::<u8>().add(1).cast(), yp, n, c, s, BN_NCHW),
            "aligned"
        );
        refused!(
            "x overlapping y",
            bn_forward_train_f32(
                layer,
                xp,
                xp.add(1).cast_mut(),
                n,
                c,
                s,
                BN_NCHW,
                null_mut(),
                null_mut()
            ),
            "overlaps"
        );
        refused!(
            "saved over y",
            bn_forward_train_f32(layer, xp, yp, n, c, s, BN_NCHW, yp, null_mut()),
            "overlaps"
        );
        refused!(
            "saved over itself",
            bn_forward_train_f32(
                layer,
                xp,
                yp,
                n,
                c,
                s,
                BN_NCHW,
                saved.as_mut_ptr(),
                saved.as_mut_ptr().add(1)
            ),
            "overlaps"
        );
        refused!(
            "layout 2",
            bn_forward_eval_f32(layer, xp, yp, n, c, s, 2),
            "layout"
        );
        refused!(
            "dtype 9",
            bn_forward_eval(layer, t(BN_NCHW, 9), xp.cast(), yp.cast(), null(), 0),
            "data type"
        );
        refused!(
            "channels",
            bn_forward_train_f32(layer, xp, yp, n, c + 1, s, BN_NHWC, null_mut(), null_mut()),
            "channels"
        );
        refused!(
            "overflow",
            bn_forward_eval_f32(layer, xp, yp, usize::MAX, c, s, BN_NCHW),
            "usize"
        );
        refused!(
            "one value",
            bn_forward_train_f32(layer, xp, yp, 1, c, 1, BN_NCHW, null_mut(), null_mut()),
            "value"
        );
        refused!(
            "residual over y",
            bn_forward_eval(
                layer,
                t(BN_NHWC, BN_F32),
                xp.cast(),
                yp.cast(),
                yp.cast_const().cast(),
                1
            ),
            "overlaps"
        );
        refused!(
            "eps",
            bn_layer_set(layer, null(), null(), null(), null(), f64::NAN, 0.1),
            "eps"
        );
        refused!(
            "momentum",
            bn_layer_set(layer, xp, null(), null(), null(), 1e-5, 1.5),
            "momentum"
        );
        refused!(
            "dx over dy",
            bn_backward_f32(
                layer,
                xp,
                xp,
                xp,
                xp,
                xp.add(2).cast_mut(),
                null_mut(),
                null_mut(),
                n,
                c,
                s,
                BN_NCHW
            ),
            "overlaps"
        );
        refused!(
            "NULL saved",
            bn_backward_f32(
                layer,
                xp,
                xp.add(1),
                null(),
                xp,
                yp,
                null_mut(),
                null_mut(),
                1,
                c,
                1,
                BN_NCHW
            ),
            "NULL"
        );
    }
    assert!(y.iter().all(|&v| v == 7.0), "a refused call wrote y");
    assert!(
        saved.iter().all(|&v| v == 7.0),
        "a refused call wrote saved"
    );
    assert_eq!(state(layer, c), before, "a refused call changed the layer");
    // SAFETY: made by bn_layer_new, freed once; NULL is a no-op.
    unsafe {
        bn_layer_free(layer);
        bn_layer_free(null_mut());
    }
    // Channels beyond memory: NULL and a message, not an abort (Miri stops at such an
    // allocation instead of failing it).
    if !cfg!(miri) {
        assert!(bn_layer_new(usize::MAX / 8).is_null());
        assert!(last_error().contains("no memory"), "{}", last_error());
    }
    // SAFETY: a NUL-terminated static string.
    let version = unsafe { CStr::from_ptr(bn_version()) }.to_str().unwrap();
    assert_eq!(version, env!("CARGO_PKG_VERSION"));
}
