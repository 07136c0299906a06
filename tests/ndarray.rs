//! `ndarray` views (`ndarray` feature): every dimension from 2 to 5, standard (NCHW) and
//! channels-last (NHWC) arrays give the slice API's results bit for bit, fused epilogues
//! included; other strides, ranks
//! and mismatched outputs are refused with the layer untouched.

mod common;

use batchnorm::half::f16;
use batchnorm::{BatchNorm, Data, Error, Fuse, Gradients, Layout, LocalGroup, SavedStats, Shape};
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

/// What one worker of a synchronized call returns: the statistics, `y`, the gradients, `dx`
/// (memory order) and its layer after the calls.
type WorkerResult = (
    Result<SavedStats<f32>, Error>,
    Vec<f32>,
    Result<Gradients<f32>, Error>,
    Vec<f32>,
    BatchNorm<f32>,
);

/// Each worker's `(x, permutation, dy)` through the synchronized calls, every worker on its
/// own thread over a `LocalGroup`: the array calls with `arrays`, else the slice calls on
/// the arrays' memory. `gapped` makes worker 0 pass `x` with gaps (refused as strides).
fn sync_workers(
    bn: &BatchNorm<f32>,
    workers: &[(ArrayD<f32>, Vec<usize>, ArrayD<f32>)],
    layout: Layout,
    arrays: bool,
    gapped: bool,
) -> Vec<WorkerResult> {
    let groups = LocalGroup::new(workers.len());
    std::thread::scope(|scope| {
        let handles: Vec<_> = groups
            .into_iter()
            .zip(workers)
            .enumerate()
            .map(|(rank, (comm, (x, perm, dy)))| {
                let mut layer = bn.clone();
                scope.spawn(move || {
                    let mut y = x.clone();
                    let mut dx = x.clone();
                    let (saved, grads) = if arrays {
                        let xv = view(x, perm);
                        let xv = if gapped && rank == 0 {
                            xv.slice_move(s![.., .., ..;2, ..]).into_dyn()
                        } else {
                            xv
                        };
                        let y_view = y.view_mut().permuted_axes_if(perm);
                        let saved = layer.forward_train_sync_array(xv.view(), y_view, &comm);
                        let probe = saved.clone().unwrap_or(SavedStats {
                            mean: vec![0.0; bn.channels()],
                            invstd: vec![1.0; bn.channels()],
                        });
                        let dx_view = dx.view_mut().permuted_axes_if(perm);
                        let grads =
                            layer.backward_sync_array(xv, view(dy, perm), &probe, dx_view, &comm);
                        (saved, grads)
                    } else {
                        let d = x.shape();
                        let (n, c) = (d[0], bn.channels());
                        let shape = Shape::new(n, c, x.len() / (n * c).max(1));
                        let xs = x.as_slice().unwrap();
                        let ys = y.as_slice_mut().unwrap();
                        let saved = layer.forward_train_sync(xs, ys, shape, layout, &comm);
                        let s = saved.as_ref().unwrap();
                        let dys = dy.as_slice().unwrap();
                        let dxs = dx.as_slice_mut().unwrap();
                        let grads = layer.backward_sync(xs, dys, s, dxs, shape, layout, &comm);
                        (saved, grads)
                    };
                    let y = y.as_slice().unwrap().to_vec();
                    let dx = dx.as_slice().unwrap().to_vec();
                    (saved, y, grads, dx, layer)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// Synchronized calls on arrays: two workers holding 2 and 4 images of a batch, NCHW and
/// channels-last, give the slice calls' results bit for bit (statistics, outputs, gradients,
/// running statistics); a worker whose view is refused gets its own error and the other
/// `Error::Peer`, in both calls, with neither waiting and both layers untouched.
#[test]
fn synchronized_arrays_are_the_slice_calls() {
    for layout in [Layout::Nchw, Layout::Nhwc] {
        let mut rng = Rng::new(11);
        let bn = layer(&mut rng, 5);
        let workers: Vec<_> = [2, 4]
            .iter()
            .map(|&n| {
                let (x, perm) = array::<f32>(&mut rng, &[n, 5, 3, 4], layout);
                let (dy, _) = array::<f32>(&mut rng, &[n, 5, 3, 4], layout);
                (x, perm, dy)
            })
            .collect();
        let got = sync_workers(&bn, &workers, layout, true, false);
        let want = sync_workers(&bn, &workers, layout, false, false);
        for (rank, (g, w)) in got.iter().zip(&want).enumerate() {
            let what = format!("{layout:?} worker {rank}");
            assert_eq!(g.0, w.0, "{what}: statistics");
            assert!(g.0.is_ok(), "{what}");
            assert_identical(&g.1, &w.1, &format!("{what}: y"));
            assert_eq!(g.2, w.2, "{what}: gradients");
            assert_identical(&g.3, &w.3, &format!("{what}: dx"));
            assert_eq!(g.4, w.4, "{what}: layer");
        }
        // Running statistics moved with the whole batch, the same on both workers.
        assert_eq!(got[0].4, got[1].4);
        assert_ne!(got[0].4, bn);

        let refused = sync_workers(&bn, &workers, layout, true, true);
        assert!(
            is_strides(refused[0].0.clone()),
            "{layout:?}: {:?}",
            refused[0].0
        );
        assert_eq!(refused[1].0, Err(Error::Peer { rank: Some(0) }));
        assert!(
            is_strides(refused[0].2.clone()),
            "{layout:?}: {:?}",
            refused[0].2
        );
        assert_eq!(refused[1].2, Err(Error::Peer { rank: None }));
        for r in &refused {
            assert_eq!(r.4, bn, "{layout:?}: a layer moved");
        }
    }
}
