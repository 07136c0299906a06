//! Streaming stores over rows (NHWC, `(N, C)`): where a row is a whole number of cache lines,
//! large outputs are written with streaming stores, the rows walked shifted onto the output's
//! first line and the parameters rotated to match. Streaming only changes how the values are
//! stored, so every output must equal, bit for bit, the same call without streaming (which the
//! other suites hold to the oracle): here for every output alignment within a line, input
//! alignments that differ from it, both thread paths and every instruction set, every
//! operation that writes rows (training, inference, `apply_scale_shift`, their fused
//! epilogues, backward plain and fused with `d_residual`).

use crate::common;

use batchnorm::half::{bf16, f16};
use batchnorm::{
    apply_scale_shift_fused, with_isa, with_parallel_threshold, with_stream_threshold, BatchNorm,
    Data, Fuse, Layout, Shape,
};
use common::{assert_identical, test_isas, Rng};

/// A buffer of `len` elements starting `offset` elements past a 64-byte boundary.
struct At<D> {
    storage: Vec<D>,
    start: usize,
    len: usize,
}

impl<D: Data> At<D> {
    fn new(values: &[D], offset: usize) -> Self {
        let line = 64 / std::mem::size_of::<D>();
        let mut storage = vec![D::default(); values.len() + 2 * line];
        let start = storage.as_ptr().align_offset(64) + offset;
        storage[start..start + values.len()].copy_from_slice(values);
        At {
            storage,
            start,
            len: values.len(),
        }
    }
    fn get(&self) -> &[D] {
        &self.storage[self.start..self.start + self.len]
    }
    fn get_mut(&mut self) -> &mut [D] {
        &mut self.storage[self.start..self.start + self.len]
    }
}

/// Every output of every row-writing call, with `x`, `residual` and `dy` at `in_offset` and
/// the outputs at `out_offset` elements past a line.
fn outputs<D: Data>(
    bn: &BatchNorm<D::Param>,
    x: &[D],
    residual: &[D],
    dy: &[D],
    shape: Shape,
    layout: Layout,
    (in_offset, out_offset): (usize, usize),
) -> Vec<Vec<D>> {
    let (x, residual, dy) = (
        At::new(x, in_offset),
        At::new(residual, in_offset),
        At::new(dy, in_offset),
    );
    let zeros = vec![D::default(); x.len];
    let mut outs = Vec::new();
    let out = || At::new(&zeros, out_offset);
    let fuses = [Fuse::default(), Fuse::add_relu(residual.get())];
    for fuse in fuses {
        let mut layer = bn.clone();
        let (mut y, mut e, mut a) = (out(), out(), out());
        let saved = layer
            .forward_train_fused(x.get(), y.get_mut(), shape, layout, fuse)
            .unwrap();
        bn.forward_eval_fused(x.get(), e.get_mut(), shape, layout, fuse)
            .unwrap();
        let (scale, shift) = bn.scale_shift().unwrap();
        apply_scale_shift_fused(x.get(), a.get_mut(), &scale, &shift, shape, layout, fuse).unwrap();
        let (mut dx, mut dr) = (out(), out());
        let relu = fuse.relu;
        let d_residual = relu.then_some(dr.get_mut());
        bn.backward_fused(
            x.get(),
            y.get(),
            dy.get(),
            &saved,
            dx.get_mut(),
            d_residual,
            shape,
            layout,
            relu,
        )
        .unwrap();
        let stats = [
            saved.mean,
            saved.invstd,
            layer.running_mean,
            layer.running_var,
        ]
        .concat()
        .into_iter()
        .map(D::from_param)
        .collect();
        outs.extend([y, e, a, dx, dr].iter().map(|b| b.get().to_vec()));
        outs.push(stats);
    }
    outs
}

/// Streaming against not, for row widths of 1 to 3 lines of `D` and every alignment.
fn check<D: Data>() {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(3)
        .build()
        .unwrap();
    let line = 64 / std::mem::size_of::<D>();
    let mut rng = Rng::new(line as u64);
    let cases = [
        (Shape::new(3, line, 5), Layout::Nhwc),
        (Shape::new(2, 2 * line, 3), Layout::Nhwc),
        (Shape::new(7, 3 * line, 1), Layout::Nchw),
        (Shape::new(1, line, 9), Layout::Nhwc),
    ];
    for (shape, layout) in cases {
        let len = shape.numel().unwrap();
        let x: Vec<D> = rng.data(len, 3.0, 2.0);
        let residual: Vec<D> = rng.data(len, 0.0, 1.5);
        let dy: Vec<D> = rng.data(len, 0.0, 1.0);
        let mut bn = BatchNorm::<D::Param>::new(shape.c);
        bn.weight = rng.data(shape.c, 0.5, 1.0);
        bn.bias = rng.data(shape.c, 0.0, 1.0);
        bn.running_mean = rng.data(shape.c, 3.0, 1.0);
        bn.running_var = rng.data(shape.c, 4.0, 1.0);
        for isa in test_isas() {
            for threads in [false, true] {
                let run = |offsets, bytes| {
                    let f = || {
                        with_isa(isa, || {
                            with_stream_threshold(bytes, || {
                                outputs(&bn, &x, &residual, &dy, shape, layout, offsets)
                            })
                        })
                    };
                    if threads {
                        pool.install(|| with_parallel_threshold(0, f))
                    } else {
                        f()
                    }
                };
                let want = run((0, 0), usize::MAX);
                for out_offset in 0..line {
                    for in_offset in [out_offset, (out_offset + 3) % line] {
                        let got = run((in_offset, out_offset), 0);
                        for (k, (g, w)) in got.iter().zip(&want).enumerate() {
                            let what = format!(
                                "output {k}, {shape:?} {layout:?}, {isa:?}, threads {threads}, \
                                 offsets {in_offset} {out_offset}"
                            );
                            assert_identical(g, w, &what);
                        }
                    }
                }
            }
        }
    }
}

#[test]
#[cfg_attr(miri, ignore)]
fn f32_rows() {
    check::<f32>();
}

#[test]
#[cfg_attr(miri, ignore)]
fn f64_rows() {
    check::<f64>();
}

#[test]
#[cfg_attr(miri, ignore)]
fn f16_rows() {
    check::<f16>();
}

#[test]
#[cfg_attr(miri, ignore)]
fn bf16_rows() {
    check::<bf16>();
}

/// A call over `x` (and its residual) into `y`, for a whole tensor or one row.
type Call<'a, D> = &'a (dyn Fn(&[D], &[D], &mut [D], Shape) + Sync);

/// Many rows: the whole-tensor maps take narrow rows several at a time (as one row of repeated
/// parameters), and wide ones as two stretches side by side (each vector's parameters loaded
/// once for a row of each), which must give, bit for bit, what the same calls give one row at
/// a time. For inference, fused inference and `apply_scale_shift`, out of place and in place,
/// with rows of whole lines (streamed, with the output at every third alignment) and rows with
/// a tail, on every path.
fn together<D: Data>(c: usize, rows: usize) {
    let line = 64 / std::mem::size_of::<D>();
    let mut rng = Rng::new((c * rows) as u64);
    let shape = Shape::new(rows / 4, c, 4);
    let row = Shape::new(1, c, 1);
    let len = shape.numel().unwrap();
    let x: Vec<D> = rng.data(len, 3.0, 2.0);
    let residual: Vec<D> = rng.data(len, 0.0, 1.5);
    let mut bn = BatchNorm::<D::Param>::new(c);
    bn.weight = rng.data(c, 0.5, 1.0);
    bn.bias = rng.data(c, 0.0, 1.0);
    bn.running_mean = rng.data(c, 3.0, 1.0);
    bn.running_var = rng.data(c, 4.0, 1.0);
    let (scale, shift) = bn.scale_shift().unwrap();
    let nhwc = Layout::Nhwc;
    let calls: [Call<D>; 4] = [
        &|x, _, y, s| bn.forward_eval(x, y, s, nhwc).unwrap(),
        &|x, r, y, s| {
            bn.forward_eval_fused(x, y, s, nhwc, Fuse::add_relu(r))
                .unwrap()
        },
        &|x, r, y, s| {
            apply_scale_shift_fused(x, y, &scale, &shift, s, nhwc, Fuse::add_relu(r)).unwrap()
        },
        &|x, r, y, s| {
            y.copy_from_slice(x);
            bn.forward_eval_fused_in_place(y, s, nhwc, Fuse::add_relu(r))
                .unwrap()
        },
    ];
    let check = |path: &str| {
        for (k, call) in calls.iter().enumerate() {
            let mut want = vec![D::default(); len];
            for ((x, r), y) in x.chunks(c).zip(residual.chunks(c)).zip(want.chunks_mut(c)) {
                call(x, r, y, row);
            }
            for offset in (0..line).step_by(3) {
                // Inputs as far into their lines as the output, and not (rows pair so only
                // where AVX-512 runs in 256-bit halves, as on Zen 4).
                for in_offset in [offset, (offset + 1) % line] {
                    let (xa, ra) = (At::new(&x, in_offset), At::new(&residual, in_offset));
                    let mut y = At::new(&vec![D::default(); len], offset);
                    call(xa.get(), ra.get(), y.get_mut(), shape);
                    let what = format!("call {k}, {shape:?}, offsets {in_offset} {offset}, {path}");
                    assert_identical(y.get(), &want, &what);
                }
            }
        }
    };
    common::on_every_path(check);
}

#[test]
#[cfg_attr(miri, ignore)]
fn rows_mapped_together_match_single_rows() {
    // f32: 1 KiB of parameters a row and more, 64 rows (two stretches of 32 KiB or more).
    together::<f32>(256, 64);
    together::<f32>(300, 64);
    // f64: parameters of 8 bytes; 16-bit data: parameters in f32, rows of half the bytes.
    together::<f64>(136, 32);
    together::<f16>(264, 128);
    together::<bf16>(256, 128);
    // Narrow rows, taken 4, 13 and 86 at a time: whole lines (then also paired), a tail
    // after the last whole vector of each group, and a group that ends mid-vector.
    together::<f32>(64, 256);
    together::<f32>(20, 200);
    together::<f32>(3, 400);
    together::<f16>(24, 400);
    together::<f64>(10, 120);
}
