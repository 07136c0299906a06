//! `ndarray` views (`ndarray` feature): every dimension from 2 to 5, standard (NCHW) and
//! channels-last (NHWC) arrays give the slice API's results bit for bit, fused epilogues
//! included; other strides, ranks
//! and mismatched outputs are refused with the layer untouched.
#![cfg(feature = "ndarray")]

mod common;

use batchnorm::half::f16;
use batchnorm::{BatchNorm, Data, Error, Fuse, Layout, Shape};
use common::{assert_identical, Rng};
use ndarray::{s, ArrayD, ArrayViewD, IxDyn};

fn layer(rng: &mut Rng, c: usize) -> BatchNorm<f32> {
    let mut bn = BatchNorm::new(c);
    bn.weight = rng.data(c, 1.0, 0.5);
    bn.bias = rng.data(c, 0.0, 1.0);
    bn.running_mean = rng.data(c, 0.0, 1.0);
    bn.running_var = rng.data(c, 2.0, 1.0);
    bn
}

/// `dims` = (N, C, spatial...): the array in `layout`'s memory seen as (N, C, spatial...).
fn array<E: Data>(rng: &mut Rng, dims: &[usize], layout: Layout) -> (ArrayD<E>, Vec<usize>) {
    let len = dims.iter().product();
    let data: Vec<E> = rng.data(len, 1.0, 2.0);
    match layout {
        Layout::Nchw => (ArrayD::from_shape_vec(IxDyn(dims), data).unwrap(), vec![]),
        Layout::Nhwc => {
            // Memory (N, spatial..., C); the view's axes permuted back to (N, C, spatial...).
            let mut mem_dims = vec![dims[0]];
            mem_dims.extend_from_slice(&dims[2..]);
            mem_dims.push(dims[1]);
            let mut perm = vec![0, dims.len() - 1];
            perm.extend(1..dims.len() - 1);
            (
                ArrayD::from_shape_vec(IxDyn(&mem_dims), data).unwrap(),
                perm,
            )
        }
    }
}

fn view<'a, E>(a: &'a ArrayD<E>, perm: &[usize]) -> ArrayViewD<'a, E> {
    if perm.is_empty() {
        a.view()
    } else {
        a.view().permuted_axes(IxDyn(perm))
    }
}

fn check<E: Data<Param = f32>>(dims: &[usize], layout: Layout, seed: u64) {
    let mut rng = Rng::new(seed);
    let (x, perm) = array::<E>(&mut rng, dims, layout);
    let (dy, _) = array::<E>(&mut rng, dims, layout);
    let (r, _) = array::<E>(&mut rng, dims, layout);
    let shape = Shape::new(dims[0], dims[1], dims[2..].iter().product());
    let xs = x.as_slice().unwrap();
    // Where both orders describe the memory (one channel or one position), it is NCHW.
    let layout = if shape.c == 1 || shape.spatial == 1 {
        Layout::Nchw
    } else {
        layout
    };
    let mut bn = layer(&mut rng, dims[1]);
    let mut plain = bn.clone();
    let what = format!("{dims:?} {layout:?}");

    let mut y = x.clone();
    let saved = bn
        .forward_train_array(view(&x, &perm), y.view_mut().permuted_axes_if(&perm))
        .unwrap();
    let mut want = vec![E::default(); xs.len()];
    let want_saved = plain.forward_train(xs, &mut want, shape, layout).unwrap();
    assert_identical(y.as_slice().unwrap(), &want, &format!("train {what}"));
    assert_eq!((saved.clone(), &bn), (want_saved.clone(), &plain), "{what}");

    let mut xy = x.clone();
    bn.forward_train_array_in_place(xy.view_mut().permuted_axes_if(&perm))
        .unwrap();
    plain.forward_train(xs, &mut want, shape, layout).unwrap();
    assert_identical(
        xy.as_slice().unwrap(),
        &want,
        &format!("train in place {what}"),
    );

    bn.forward_eval_array(view(&x, &perm), y.view_mut().permuted_axes_if(&perm))
        .unwrap();
    plain.forward_eval(xs, &mut want, shape, layout).unwrap();
    assert_identical(y.as_slice().unwrap(), &want, &format!("eval {what}"));
    let mut xy = x.clone();
    bn.forward_eval_array_in_place(xy.view_mut().permuted_axes_if(&perm))
        .unwrap();
    assert_identical(
        xy.as_slice().unwrap(),
        &want,
        &format!("eval in place {what}"),
    );

    // Fused: residual and ReLU, training, inference and backward with the residual's gradient.
    let fuse = Fuse {
        residual: Some(r.as_slice().unwrap()),
        relu: true,
    };
    let mut yf = x.clone();
    let saved_f = bn
        .forward_train_array_fused(
            view(&x, &perm),
            yf.view_mut().permuted_axes_if(&perm),
            Some(view(&r, &perm)),
            true,
        )
        .unwrap();
    let mut want_f = vec![E::default(); xs.len()];
    let want_saved_f = plain
        .forward_train_fused(xs, &mut want_f, shape, layout, fuse)
        .unwrap();
    assert_identical(
        yf.as_slice().unwrap(),
        &want_f,
        &format!("fused train {what}"),
    );
    assert_eq!((&saved_f, &bn), (&want_saved_f, &plain), "{what}");
    let mut ye = x.clone();
    bn.forward_eval_array_fused(
        view(&x, &perm),
        ye.view_mut().permuted_axes_if(&perm),
        Some(view(&r, &perm)),
        true,
    )
    .unwrap();
    plain
        .forward_eval_fused(xs, &mut want, shape, layout, fuse)
        .unwrap();
    assert_identical(ye.as_slice().unwrap(), &want, &format!("fused eval {what}"));
    let (mut dxf, mut dr) = (x.clone(), x.clone());
    let gf = bn
        .backward_array_fused(
            view(&x, &perm),
            view(&yf, &perm),
            view(&dy, &perm),
            &saved_f,
            dxf.view_mut().permuted_axes_if(&perm),
            Some(dr.view_mut().permuted_axes_if(&perm)),
            true,
        )
        .unwrap();
    let mut want_dr = vec![E::default(); xs.len()];
    let want_gf = plain
        .backward_fused(
            xs,
            yf.as_slice().unwrap(),
            dy.as_slice().unwrap(),
            &saved_f,
            &mut want,
            Some(&mut want_dr),
            shape,
            layout,
            true,
        )
        .unwrap();
    assert_identical(dxf.as_slice().unwrap(), &want, &format!("fused dx {what}"));
    assert_identical(
        dr.as_slice().unwrap(),
        &want_dr,
        &format!("d_residual {what}"),
    );
    assert_eq!(gf, want_gf, "{what}");

    let mut dx = x.clone();
    let g = bn
        .backward_array(
            view(&x, &perm),
            view(&dy, &perm),
            &saved,
            dx.view_mut().permuted_axes_if(&perm),
        )
        .unwrap();
    let want_g = plain
        .backward(xs, dy.as_slice().unwrap(), &saved, &mut want, shape, layout)
        .unwrap();
    assert_identical(dx.as_slice().unwrap(), &want, &format!("dx {what}"));
    assert_eq!(g, want_g, "{what}");
}

/// `permuted_axes` when a permutation is given.
trait PermutedIf {
    fn permuted_axes_if(self, perm: &[usize]) -> Self;
}

impl<E> PermutedIf for ndarray::ArrayViewMutD<'_, E> {
    fn permuted_axes_if(self, perm: &[usize]) -> Self {
        if perm.is_empty() {
            self
        } else {
            self.permuted_axes(IxDyn(perm))
        }
    }
}

#[test]
fn arrays_are_the_slice_calls() {
    let shapes: [&[usize]; 7] = [
        &[4, 3],
        &[5, 7, 9],
        &[2, 3, 4, 5],
        &[1, 16, 7, 7],
        &[3, 1, 2, 2],
        &[2, 5, 3, 1, 4],
        &[2, 9, 1, 1],
    ];
    for (i, dims) in shapes.iter().enumerate() {
        for layout in [Layout::Nchw, Layout::Nhwc] {
            check::<f32>(dims, layout, i as u64);
            check::<f16>(dims, layout, 100 + i as u64);
        }
    }
}

/// Fixed-dimension views work the same (`Ix2`, `Ix4`).
#[test]
fn fixed_dimensions() {
    let mut bn = BatchNorm::<f32>::new(3);
    let x = ndarray::Array2::from_shape_fn((4, 3), |(n, c)| (n * 3 + c) as f32);
    let mut y = ndarray::Array2::zeros((4, 3));
    bn.forward_train_array(x.view(), y.view_mut()).unwrap();
    let mut want = vec![0.0f32; 12];
    BatchNorm::<f32>::new(3)
        .forward_train(
            x.as_slice().unwrap(),
            &mut want,
            Shape::new(4, 3, 1),
            Layout::Nchw,
        )
        .unwrap();
    assert_eq!(y.as_slice().unwrap(), &want[..]);
}

fn is_strides<R>(r: Result<R, Error>) -> bool {
    matches!(r, Err(Error::Strides { .. }))
}

#[test]
fn other_strides_are_refused_untouched() {
    let mut rng = Rng::new(9);
    let bn = layer(&mut rng, 4);
    let x = ArrayD::<f32>::from_shape_vec(IxDyn(&[2, 4, 6, 5]), rng.data(240, 0.0, 1.0)).unwrap();
    let mut out = ArrayD::<f32>::from_elem(IxDyn(&[2, 4, 6, 5]), 7.0);
    let mut trained = bn.clone();
    // A slice with gaps, a broadcast, a reversed axis, H and W swapped, axis order (N, H, C, W).
    let gaps = x.slice(s![.., .., ..;2, ..]).into_dyn();
    let mut out_gaps = ArrayD::<f32>::zeros(gaps.raw_dim());
    assert!(is_strides(
        trained.forward_train_array(gaps.view(), out_gaps.view_mut())
    ));
    let row = ArrayD::<f32>::zeros(IxDyn(&[1, 4, 6, 5]));
    let broadcast = row.broadcast(IxDyn(&[2, 4, 6, 5])).unwrap();
    assert!(is_strides(
        trained.forward_train_array(broadcast, out.view_mut())
    ));
    let mut reversed = x.view();
    reversed.invert_axis(ndarray::Axis(2));
    assert!(is_strides(
        trained.forward_eval_array(reversed, out.view_mut())
    ));
    let swapped = x.view().permuted_axes(IxDyn(&[0, 1, 3, 2]));
    let mut out_swapped = out.view_mut().permuted_axes(IxDyn(&[0, 1, 3, 2]));
    assert!(is_strides(
        trained.forward_eval_array(swapped, out_swapped.view_mut())
    ));
    let nhcw = ArrayD::<f32>::zeros(IxDyn(&[2, 6, 4, 5]));
    let nhcw = nhcw.view().permuted_axes(IxDyn(&[0, 2, 1, 3]));
    assert!(is_strides(trained.forward_eval_array(nhcw, out.view_mut())));
    // A Fortran-order (N, C) array.
    let f = ndarray::Array2::<f32>::zeros((4, 2))
        .reversed_axes()
        .into_dyn();
    let mut out2 = ArrayD::<f32>::zeros(IxDyn(&[2, 4]));
    let mut bn2 = BatchNorm::<f32>::new(4);
    assert!(is_strides(
        bn2.forward_train_array(f.view(), out2.view_mut())
    ));
    // Rank 1.
    let one = ArrayD::<f32>::zeros(IxDyn(&[4]));
    let mut out1 = ArrayD::<f32>::zeros(IxDyn(&[4]));
    assert_eq!(
        trained.forward_train_array(one.view(), out1.view_mut()),
        Err(Error::Rank { ndim: 1 })
    );
    // An output in the other layout, or of another shape.
    let mut nhwc = ArrayD::<f32>::zeros(IxDyn(&[2, 6, 5, 4]));
    assert_eq!(
        trained.forward_train_array(
            x.view(),
            nhwc.view_mut().permuted_axes(IxDyn(&[0, 3, 1, 2]))
        ),
        Err(Error::Mismatch { what: "y" })
    );
    let mut small = ArrayD::<f32>::zeros(IxDyn(&[2, 4, 6, 4]));
    assert_eq!(
        trained.forward_train_array(x.view(), small.view_mut()),
        Err(Error::Mismatch { what: "y" })
    );
    // A residual in the other layout.
    let r_nhwc = ArrayD::<f32>::zeros(IxDyn(&[2, 6, 5, 4]));
    let r_view = r_nhwc.view().permuted_axes(IxDyn(&[0, 3, 1, 2]));
    assert_eq!(
        trained.forward_train_array_fused(x.view(), out.view_mut(), Some(r_view), true),
        Err(Error::Mismatch { what: "residual" })
    );
    assert_eq!(trained, bn, "a refused call trained");
    assert!(out.iter().all(|&v| v == 7.0), "a refused call wrote");
    assert!(Error::Strides {
        dims: vec![1],
        strides: vec![2]
    }
    .to_string()
    .contains("channels-last"));
}
