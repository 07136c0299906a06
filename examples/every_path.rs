//! A user's crate in miniature: every public call that reaches a kernel, on `f32`, `f64`,
//! `f16` and `bf16` tensors, both layouts, every instruction set this CPU has, on the calling
//! thread and split over a pool. Each result is checked to be finite and each layer's
//! statistics to match `f64` ones computed here.
//!
//! `cargo run --release --example every_path`
//!
//! Its purpose is the build more than the run: generic kernels are compiled in the crate that
//! calls them, with that crate's inlining decisions. `scripts/check_inlining.sh` (run in CI)
//! builds this example and the report in release and fails if either holds an intrinsic
//! compiled out of line (a function from `core::core_arch`), which would make every vector
//! operation a call (issue 27: bf16 inference 45x slower than f16).

use batchnorm::half::{bf16, f16};
use batchnorm::{
    apply_scale_shift, apply_scale_shift_fused, apply_scale_shift_in_place, moments, with_isa,
    BatchNorm, Data, Fuse, Isa, Layout, LocalGroup, Shape,
};

/// Runs every call on tensors of `D` (parameters `D::Param`) of `shape` in `layout`, and
/// returns how many calls ran.
fn every_call<D: Data>(shape: Shape, layout: Layout) -> usize {
    let len = shape.numel().expect("shape");
    let x: Vec<D> = (0..len)
        .map(|i| D::from_f64(((i * 7919) % 101) as f64 / 10.0 - 3.0))
        .collect();
    let r: Vec<D> = (0..len)
        .map(|i| D::from_f64(((i * 31) % 13) as f64 / 4.0 - 1.5))
        .collect();
    let dy = r.clone();
    let (mut y, mut dx, mut dr) = (vec![D::default(); len], x.clone(), x.clone());
    let mut bn = BatchNorm::<D::Param>::new(shape.c);
    let mut calls = 0;
    let mut ok = |what: &str, out: &[D]| {
        calls += 1;
        assert!(
            out.iter().all(|v| v.to_f64().is_finite()),
            "{what}: a non-finite output"
        );
    };

    let saved = bn.forward_train(&x, &mut y, shape, layout).expect("train");
    ok("train", &y);
    check_mean(&x, shape, layout, &saved.mean);
    bn.forward_train_fused(&x, &mut y, shape, layout, Fuse::relu())
        .expect("train relu");
    ok("train relu", &y);
    bn.forward_train_fused(&x, &mut y, shape, layout, Fuse::add_relu(&r))
        .expect("train add relu");
    ok("train add relu", &y);
    let mut xy = x.clone();
    bn.forward_train_in_place(&mut xy, shape, layout)
        .expect("train in place");
    ok("train in place", &xy);
    let mut xy = x.clone();
    bn.forward_train_fused_in_place(&mut xy, shape, layout, Fuse::add_relu(&r))
        .expect("train add relu in place");
    ok("train add relu in place", &xy);

    bn.forward_eval(&x, &mut y, shape, layout).expect("eval");
    ok("eval", &y);
    bn.forward_eval_fused(&x, &mut y, shape, layout, Fuse::relu())
        .expect("eval relu");
    ok("eval relu", &y);
    bn.forward_eval_fused(&x, &mut y, shape, layout, Fuse::add_relu(&r))
        .expect("eval add relu");
    ok("eval add relu", &y);
    let mut xy = x.clone();
    bn.forward_eval_in_place(&mut xy, shape, layout)
        .expect("eval in place");
    ok("eval in place", &xy);
    let mut xy = x.clone();
    bn.forward_eval_fused_in_place(&mut xy, shape, layout, Fuse::add_relu(&r))
        .expect("eval add relu in place");
    ok("eval add relu in place", &xy);

    let (scale, shift) = bn.scale_shift().expect("fold");
    apply_scale_shift(&x, &mut y, &scale, &shift, shape, layout).expect("apply");
    ok("apply", &y);
    apply_scale_shift_fused(
        &x,
        &mut y,
        &scale,
        &shift,
        shape,
        layout,
        Fuse::add_relu(&r),
    )
    .expect("apply add relu");
    ok("apply add relu", &y);
    let mut xy = x.clone();
    apply_scale_shift_in_place(&mut xy, &scale, &shift, shape, layout).expect("apply in place");
    ok("apply in place", &xy);

    let saved = bn
        .forward_train_fused(&x, &mut y, shape, layout, Fuse::add_relu(&r))
        .expect("train");
    bn.backward(&x, &dy, &saved, &mut dx, shape, layout)
        .expect("backward");
    ok("backward", &dx);
    for relu in [false, true] {
        bn.backward_fused(&x, &y, &dy, &saved, &mut dx, None, shape, layout, relu)
            .expect("backward fused");
        ok("backward fused", &dx);
        bn.backward_fused(
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
        .expect("backward fused, residual's gradient");
        ok("backward fused, residual's gradient", &dx);
    }
    bn.backward_eval(&x, &dy, &mut dx, shape, layout)
        .expect("backward eval");
    ok("backward eval", &dx);

    let m = moments(&x, shape, layout).expect("moments");
    assert_eq!(m.len(), shape.c);
    // One worker: the synchronized calls' own path, with nothing to wait for.
    let group = LocalGroup::new(1);
    let saved = bn
        .forward_train_sync(&x, &mut y, shape, layout, &group[0])
        .expect("train sync");
    ok("train sync", &y);
    bn.backward_sync(&x, &dy, &saved, &mut dx, shape, layout, &group[0])
        .expect("backward sync");
    ok("backward sync", &dx);
    calls
}

/// Checks the batch means against ones computed here in `f64`.
fn check_mean<D: Data>(x: &[D], shape: Shape, layout: Layout, mean: &[D::Param]) {
    for (c, &got) in mean.iter().enumerate() {
        let mut sum = 0.0;
        for n in 0..shape.n {
            for s in 0..shape.spatial {
                sum += x[shape.index(layout, n, c, s)].to_f64();
            }
        }
        let want = sum / shape.per_channel() as f64;
        assert!(
            (got.to_f64() - want).abs() <= 1e-5 * (1.0 + want.abs()),
            "channel {c}: mean {} against {want}",
            got.to_f64()
        );
    }
}

fn every_type(shape: Shape, layout: Layout) -> usize {
    every_call::<f32>(shape, layout)
        + every_call::<f64>(shape, layout)
        + every_call::<f16>(shape, layout)
        + every_call::<bf16>(shape, layout)
}

fn main() {
    // Short and long channel runs, channel counts off the vector widths, one image, and a
    // tensor past the parallel threshold.
    let shapes = [
        Shape::new(2, 3, 5),
        Shape::new(1, 19, 7 * 7),
        Shape::new(3, 37, 17),
        Shape::new(4, 64, 28 * 28),
    ];
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .expect("a pool");
    let mut calls = 0;
    for isa in Isa::available() {
        for shape in shapes {
            for layout in [Layout::Nchw, Layout::Nhwc] {
                calls += with_isa(isa, || every_type(shape, layout));
                calls += pool.install(|| with_isa(isa, || every_type(shape, layout)));
            }
        }
    }
    println!(
        "{calls} calls on {} instruction sets: every output finite, every mean as computed here",
        Isa::available().len()
    );
}
