//! Every kind of bad input returns its `Err`, leaves the layer and the output untouched, and
//! nothing panics, whatever the shape and lengths.

use crate::common;

use batchnorm::{BatchNorm, Error, Layout, Shape};
use proptest::prelude::*;

const SENTINEL: f32 = 12345.0;

/// A layer that has seen a batch (so its state is not the default one).
fn trained(c: usize) -> BatchNorm<f32> {
    let mut bn = BatchNorm::new(c);
    let shape = Shape::new(2, c, 3);
    let x: Vec<f32> = (0..shape.numel().unwrap())
        .map(|i| (i % 7) as f32)
        .collect();
    let mut y = vec![0.0; x.len()];
    bn.forward_train(&x, &mut y, shape, Layout::Nchw).unwrap();
    bn
}

/// Runs the four forward calls on `bn` and asserts each returns `err` and changes nothing.
fn all_refuse(bn: &BatchNorm<f32>, x_len: usize, y_len: usize, shape: Shape, err: &Error) {
    for layout in [Layout::Nchw, Layout::Nhwc] {
        let x = vec![1.0f32; x_len];
        let mut y = vec![SENTINEL; y_len];
        let mut layer = bn.clone();
        assert_eq!(
            layer.forward_train(&x, &mut y, shape, layout).unwrap_err(),
            *err
        );
        assert_eq!(&layer, bn, "training changed the layer");
        assert_eq!(
            layer.forward_eval(&x, &mut y, shape, layout).unwrap_err(),
            *err
        );
        assert!(y.iter().all(|&v| v == SENTINEL), "output written");
        if x_len == y_len {
            let mut xy = vec![SENTINEL; x_len];
            assert_eq!(
                layer
                    .forward_train_in_place(&mut xy, shape, layout)
                    .unwrap_err(),
                *err
            );
            assert_eq!(
                layer
                    .forward_eval_in_place(&mut xy, shape, layout)
                    .unwrap_err(),
                *err
            );
            assert!(xy.iter().all(|&v| v == SENTINEL), "in-place buffer written");
            assert_eq!(&layer, bn);
        }
    }
}

#[test]
fn wrong_lengths() {
    let bn = trained(3);
    let shape = Shape::new(2, 3, 4);
    let len = Error::Length {
        what: "x",
        expected: 24,
        got: 23,
    };
    all_refuse(&bn, 23, 23, shape, &len);
    let y_len = Error::Length {
        what: "y",
        expected: 24,
        got: 25,
    };
    let x = vec![0.0f32; 24];
    let mut y = vec![SENTINEL; 25];
    let mut layer = bn.clone();
    assert_eq!(
        layer
            .forward_train(&x, &mut y, shape, Layout::Nchw)
            .unwrap_err(),
        y_len
    );
    assert_eq!(
        layer
            .forward_eval(&x, &mut y, shape, Layout::Nhwc)
            .unwrap_err(),
        y_len
    );
    assert_eq!(layer, bn);
}

#[test]
fn wrong_channels_and_parameters() {
    let bn = trained(3);
    all_refuse(
        &bn,
        16,
        16,
        Shape::new(2, 4, 2),
        &Error::Channels {
            expected: 3,
            got: 4,
        },
    );
    let shape = Shape::new(2, 3, 4);
    for what in ["bias", "running_mean", "running_var"] {
        let mut broken = bn.clone();
        let v = match what {
            "bias" => &mut broken.bias,
            "running_mean" => &mut broken.running_mean,
            _ => &mut broken.running_var,
        };
        v.resize([2, 4, 0][v.len() % 3], 0.0);
        let got = v.len();
        all_refuse(
            &broken,
            24,
            24,
            shape,
            &Error::Length {
                what,
                expected: 3,
                got,
            },
        );
    }
}

#[test]
fn invalid_eps_and_momentum() {
    let shape = Shape::new(2, 3, 4);
    for eps in [-1e-5, f64::NAN, f64::INFINITY] {
        let mut bn = trained(3);
        bn.eps = eps;
        let err = Error::Eps(eps);
        // NaN != NaN: compare the messages instead.
        let mut y = vec![0.0f32; 24];
        let got = bn
            .clone()
            .forward_train(&[0.0; 24], &mut y, shape, Layout::Nchw)
            .unwrap_err();
        assert_eq!(got.to_string(), err.to_string());
        if !eps.is_nan() {
            all_refuse(&bn, 24, 24, shape, &err);
        }
    }
    for m in [-0.1, 1.5, f64::INFINITY] {
        let mut bn = trained(3);
        bn.momentum = Some(m);
        let before = bn.clone();
        let mut y = vec![SENTINEL; 24];
        assert_eq!(
            bn.forward_train(&[0.0; 24], &mut y, shape, Layout::Nhwc)
                .unwrap_err(),
            Error::Momentum(m)
        );
        assert_eq!(bn, before);
        assert!(y.iter().all(|&v| v == SENTINEL));
        // Inference does not use the momentum.
        bn.forward_eval(&[0.0; 24], &mut y, shape, Layout::Nhwc)
            .unwrap();
    }
    let mut bn = trained(3);
    bn.momentum = Some(f64::NAN);
    let mut y = vec![0.0f32; 24];
    assert!(
        matches!(bn.forward_train(&[0.0; 24], &mut y, shape, Layout::Nchw), Err(Error::Momentum(m)) if m.is_nan())
    );
}

#[test]
fn too_few_values_per_channel() {
    let bn = trained(3);
    for shape in [
        Shape::new(1, 3, 1),
        Shape::new(0, 3, 5),
        Shape::new(4, 3, 0),
    ] {
        let len = shape.numel().unwrap();
        let mut layer = bn.clone();
        let mut y = vec![SENTINEL; len];
        let err = Error::TooFewValues {
            per_channel: shape.n * shape.spatial,
        };
        assert_eq!(
            layer
                .forward_train(&vec![1.0; len], &mut y, shape, Layout::Nchw)
                .unwrap_err(),
            err
        );
        assert_eq!(layer, bn);
        // Inference is fine with a single value.
        layer
            .forward_eval(&vec![1.0; len], &mut y, shape, Layout::Nchw)
            .unwrap();
    }
}

#[test]
fn overflowing_shape() {
    let bn = trained(3);
    let shape = Shape::new(usize::MAX / 2, 3, 2);
    let err = Error::Overflow {
        n: usize::MAX / 2,
        c: 3,
        spatial: 2,
    };
    all_refuse(&bn, 6, 6, shape, &err);
    assert_eq!(
        batchnorm::moments(&[0.0f32; 6], shape, Layout::Nchw).unwrap_err(),
        err
    );
}

#[test]
fn lower_level_operations() {
    let shape = Shape::new(2, 3, 2);
    let x = [1.0f32; 12];
    let mut y = [SENTINEL; 12];
    let err = Error::Length {
        what: "scale",
        expected: 3,
        got: 2,
    };
    assert_eq!(
        batchnorm::apply_scale_shift(&x, &mut y, &[1.0; 2], &[0.0; 3], shape, Layout::Nchw)
            .unwrap_err(),
        err
    );
    assert_eq!(
        batchnorm::apply_scale_shift_in_place(&mut y, &[1.0; 3], &[0.0; 4], shape, Layout::Nhwc)
            .unwrap_err(),
        Error::Length {
            what: "shift",
            expected: 3,
            got: 4
        }
    );
    assert!(y.iter().all(|&v| v == SENTINEL));
    assert_eq!(
        batchnorm::moments(&x[..11], shape, Layout::Nchw).unwrap_err(),
        Error::Length {
            what: "x",
            expected: 12,
            got: 11
        }
    );
    let (mut scale, mut shift) = ([0.0f32; 3], [0.0f32; 3]);
    assert_eq!(
        batchnorm::fold_scale_shift(
            &[0.0; 3], &[1.0; 2], &[1.0; 3], &[0.0; 3], 1e-5, &mut scale, &mut shift
        )
        .unwrap_err(),
        Error::Length {
            what: "var",
            expected: 3,
            got: 2
        }
    );
    assert_eq!(
        batchnorm::fold_scale_shift(
            &[0.0; 3], &[1.0; 3], &[1.0; 3], &[0.0; 3], -1.0, &mut scale, &mut shift
        )
        .unwrap_err(),
        Error::Eps(-1.0)
    );
    assert_eq!((scale, shift), ([0.0; 3], [0.0; 3]));
}

#[test]
fn messages_say_what_was_expected_and_given() {
    let msg = Error::Length {
        what: "x",
        expected: 24,
        got: 23,
    }
    .to_string();
    assert!(
        msg.contains("24") && msg.contains("23") && msg.contains('x'),
        "{msg}"
    );
    let msg = Error::Channels {
        expected: 3,
        got: 4,
    }
    .to_string();
    assert!(msg.contains('3') && msg.contains('4'), "{msg}");
    let e: Box<dyn std::error::Error> = Box::new(Error::TooFewValues { per_channel: 1 });
    assert!(e.to_string().contains("more than 1 value"));
}

proptest! {
    #![proptest_config(common::config(256))]

    /// Arbitrary shapes (huge ones included), lengths, parameters and layouts: every call
    /// returns, none panics, and a refused call changes nothing.
    #[test]
    fn never_panics(
        n in prop_oneof![0usize..5, Just(usize::MAX), Just(usize::MAX / 3)],
        c in 0usize..6,
        s in prop_oneof![0usize..5, Just(usize::MAX / 2)],
        layer_c in 0usize..6,
        x_len in 0usize..80,
        y_delta in 0usize..2,
        eps in prop_oneof![Just(1e-5), Just(0.0), Just(-1.0), Just(f64::NAN)],
        momentum in prop_oneof![Just(Some(0.1)), Just(None), Just(Some(2.0))],
        nhwc: bool,
    ) {
        let layout = if nhwc { Layout::Nhwc } else { Layout::Nchw };
        let shape = Shape::new(n, c, s);
        let mut bn = BatchNorm::<f32>::new(layer_c);
        bn.eps = eps;
        bn.momentum = momentum;
        let x: Vec<f32> = (0..x_len).map(|i| i as f32).collect();
        let mut y = vec![0.0f32; x_len + y_delta];
        let before = bn.clone();
        if bn.forward_train(&x, &mut y, shape, layout).is_err() {
            // Debug text, since a NaN eps is not equal to itself.
            prop_assert_eq!(format!("{bn:?}"), format!("{before:?}"));
        }
        let _ = bn.forward_eval(&x, &mut y, shape, layout);
        let mut xy = x.clone();
        let _ = bn.forward_train_in_place(&mut xy, shape, layout);
        let _ = bn.forward_eval_in_place(&mut xy, shape, layout);
        let _ = batchnorm::moments(&x, shape, layout);
        let scale = vec![1.0f32; c];
        let _ = batchnorm::apply_scale_shift(&x, &mut y, &scale, &scale, shape, layout);
        let _ = bn.scale_shift();
    }
}

/// No channels but `n * spatial` beyond `usize`: the shape is refused, not multiplied out.
#[test]
fn overflowing_per_channel_count_without_channels() {
    let shape = Shape::new(usize::MAX, 0, 2);
    let err = Error::Overflow {
        n: usize::MAX,
        c: 0,
        spatial: 2,
    };
    assert_eq!(
        batchnorm::moments::<f32>(&[], shape, Layout::Nhwc).unwrap_err(),
        err
    );
    all_refuse(&BatchNorm::new(0), 0, 0, shape, &err);
}

/// No channels and a huge image count whose product with `spatial` still fits: an empty,
/// valid tensor, whose calls return at once (the channel-group paths once looped over every
/// image of it, `usize::MAX / 3` of them). On a thread, so that a hang fails the test.
#[test]
fn no_channels_many_images_returns_at_once() {
    let (done, finished) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let shape = Shape::new(usize::MAX / 3, 0, 2);
        let stats = batchnorm::moments::<f32>(&[], shape, Layout::Nchw);
        let mut bn = BatchNorm::<f32>::new(0);
        let (x, mut y) = (Vec::<f32>::new(), Vec::<f32>::new());
        let _ = bn.forward_eval(&x, &mut y, shape, Layout::Nchw);
        if let Ok(saved) = bn.forward_train(&x, &mut y, shape, Layout::Nchw) {
            let mut dx = Vec::new();
            let _ = bn.backward(&x, &y, &saved, &mut dx, shape, Layout::Nchw);
        }
        done.send(stats).unwrap();
    });
    let stats = finished
        .recv_timeout(std::time::Duration::from_secs(30))
        .expect("the calls return");
    assert_eq!(stats.unwrap(), vec![]);
}
