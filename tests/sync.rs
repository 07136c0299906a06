//! Synchronized batch norm over `LocalGroup`: 1 to 5 workers with uneven slices (empty ones
//! included), both layouts, every instruction set, on the calling thread and with threads:
//! outputs, saved and running statistics and gradients equal to one call on the concatenated
//! batch within the accuracy bounds, identical across workers bit for bit; bad input on one
//! worker an error there and on the others, without deadlock and with every layer untouched;
//! a failing collective an error.

use crate::common;

use batchnorm::half::f16;
use batchnorm::{
    with_isa, with_parallel_threshold, with_stream_threshold, BatchNorm, Collective, Data, Error,
    Gradients, Isa, Layout, LocalGroup, Moments, SavedStats, Shape,
};
use common::{config, layout, test_isas, tol, Rng};
use proptest::prelude::*;

/// What one worker ends with.
struct Worker<D> {
    y: Vec<D>,
    saved: SavedStats<f32>,
    layer: BatchNorm<f32>,
    dx: Vec<D>,
    grads: Gradients<f32>,
}

/// The batch `x` (n = Σ slices) cut into `slices` along N, each worker training its slice and
/// running backward on `dy`'s, on `isa`, with threads or not.
fn run_workers<D: Data<Param = f32>>(
    bn: &BatchNorm<f32>,
    x: &[D],
    dy: &[D],
    slices: &[usize],
    shape: Shape,
    layout: Layout,
    (isa, threads): (Isa, bool),
) -> Vec<Worker<D>> {
    let per_image = shape.c * shape.spatial;
    let groups = LocalGroup::new(slices.len());
    std::thread::scope(|scope| {
        let mut start = 0;
        let handles: Vec<_> = groups
            .into_iter()
            .zip(slices)
            .map(|(comm, &n)| {
                let range = start * per_image..(start + n) * per_image;
                start += n;
                let (x, dy) = (&x[range.clone()], &dy[range]);
                let mut layer = bn.clone();
                scope.spawn(move || {
                    let work = || {
                        let shape = Shape::new(n, shape.c, shape.spatial);
                        let mut y = vec![D::default(); x.len()];
                        let saved = layer
                            .forward_train_sync(x, &mut y, shape, layout, &comm)
                            .unwrap();
                        let mut dx = vec![D::default(); x.len()];
                        let grads = layer
                            .backward_sync(x, dy, &saved, &mut dx, shape, layout, &comm)
                            .unwrap();
                        Worker {
                            y,
                            saved,
                            layer,
                            dx,
                            grads,
                        }
                    };
                    // Threads: the kernels split even tiny tensors over rayon's global pool
                    // (the collective itself waits on this worker's own thread).
                    with_isa(isa, || {
                        if threads {
                            with_parallel_threshold(0, || with_stream_threshold(0, work))
                        } else {
                            work()
                        }
                    })
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

fn close(got: f64, want: f64, tol: f64, what: &str) {
    assert!(
        (got - want).abs() <= tol,
        "{what}: {got:e} vs {want:e} (tol {tol:e})"
    );
}

fn check<D: Data<Param = f32>>(shape: Shape, layout: Layout, slices: &[usize], seed: u64) {
    let mut rng = Rng::new(seed);
    let len = shape.numel().unwrap();
    let (offset, spread) = rng.offset_spread();
    let x: Vec<D> = rng.data(len, offset, spread);
    let dy: Vec<D> = rng.data(len, 0.0, 1.0);
    let mut bn = BatchNorm::<f32>::new(shape.c);
    bn.weight = rng.data(shape.c, 1.0, 0.5);
    bn.bias = rng.data(shape.c, 0.0, 1.0);
    bn.momentum = if seed.is_multiple_of(3) {
        None
    } else {
        Some(0.25)
    };
    bn.unbiased_running_var = seed.is_multiple_of(2);
    // The reference: one call on the whole batch.
    let mut whole = bn.clone();
    let mut want_y = vec![D::default(); len];
    let want_saved = whole.forward_train(&x, &mut want_y, shape, layout).unwrap();
    let mut want_dx = vec![D::default(); len];
    let want_g = whole
        .backward(&x, &dy, &want_saved, &mut want_dx, shape, layout)
        .unwrap();
    let half = std::mem::size_of::<D>() == 2;
    let t = tol::<f32>(offset.abs() / spread) + if half { 2e-3 } else { 0.0 };
    let m = shape.per_channel() as f64;
    for isa in test_isas() {
        for threads in [false, true] {
            let what = format!("{slices:?} {shape:?} {layout:?} {isa:?} threads {threads}");
            let workers = run_workers(&bn, &x, &dy, slices, shape, layout, (isa, threads));
            // Identical across workers.
            for w in &workers[1..] {
                assert_eq!(w.saved, workers[0].saved, "saved, {what}");
                assert_eq!(w.layer, workers[0].layer, "layer, {what}");
                assert_eq!(w.grads, workers[0].grads, "gradients, {what}");
            }
            // Against the whole batch.
            let w0 = &workers[0];
            for ch in 0..shape.c {
                let std = 1.0 / want_saved.invstd[ch] as f64;
                let what = format!("channel {ch}, {what}");
                close(
                    w0.saved.mean[ch] as f64,
                    want_saved.mean[ch] as f64,
                    t * std,
                    &format!("mean {what}"),
                );
                let rel = |a: f32, b: f32, tol: f64, name: &str| {
                    close(a as f64, b as f64, tol * (1.0 + (b as f64).abs()), name)
                };
                rel(
                    w0.saved.invstd[ch],
                    want_saved.invstd[ch],
                    2e-5,
                    &format!("invstd {what}"),
                );
                close(
                    w0.layer.running_mean[ch] as f64,
                    whole.running_mean[ch] as f64,
                    t * (1.0 + std + (whole.running_mean[ch] as f64).abs()),
                    &format!("running mean {what}"),
                );
                rel(
                    w0.layer.running_var[ch],
                    whole.running_var[ch],
                    2e-5,
                    &format!("running var {what}"),
                );
                let sum_abs_dy: f64 = (0..len)
                    .filter(|i| shape_channel(shape, layout, *i) == ch)
                    .map(|i| dy[i].to_f64().abs())
                    .sum();
                let scale = (1.0 + sum_abs_dy) * (1.0 + std * want_saved.invstd[ch] as f64);
                close(
                    w0.grads.bias[ch] as f64,
                    want_g.bias[ch] as f64,
                    t * scale,
                    &format!("dbias {what}"),
                );
                close(
                    w0.grads.weight[ch] as f64,
                    want_g.weight[ch] as f64,
                    t * scale * (1.0 + offset.abs() / spread),
                    &format!("dweight {what}"),
                );
            }
            assert_eq!(w0.layer.num_batches_tracked, 1);
            // Each worker's outputs against its slice of the whole batch's.
            let mut start = 0;
            for (w, &n) in workers.iter().zip(slices) {
                let range = start..start + n * shape.c * shape.spatial;
                start = range.end;
                for (k, i) in range.enumerate() {
                    let ch = shape_channel(shape, layout, i);
                    let (got, want) = (w.y[k].to_f64(), want_y[i].to_f64());
                    close(got, want, t * (1.0 + want.abs()), &format!("y[{i}] {what}"));
                    let wi = (bn.weight[ch] * want_saved.invstd[ch]) as f64;
                    let terms = wi
                        * (dy[i].to_f64().abs()
                            + (want_g.bias[ch] as f64).abs() / m
                            + (want_g.weight[ch] as f64).abs() * 4.0 / m);
                    let (got, want) = (w.dx[k].to_f64(), want_dx[i].to_f64());
                    close(
                        got,
                        want,
                        t * (1.0 + terms) * 4.0,
                        &format!("dx[{i}] {what}"),
                    );
                }
            }
        }
    }
}

/// The channel of flat index `i`.
fn shape_channel(shape: Shape, layout: Layout, i: usize) -> usize {
    match layout {
        Layout::Nchw => i / shape.spatial % shape.c,
        Layout::Nhwc => i % shape.c,
    }
}

/// Slices of a batch of `n` for `workers` workers, some empty.
fn slices(rng: &mut Rng, n: usize, workers: usize) -> Vec<usize> {
    let mut s = vec![0; workers];
    for _ in 0..n {
        s[(rng.unit() * workers as f64) as usize] += 1;
    }
    s
}

proptest! {
    #![proptest_config(config(24))]
    // Under Miri the refusal tests below run the group's threads and barrier; the numbers
    // are the same kernels as the single calls, checked natively.
    #[test]
    #[cfg_attr(miri, ignore = "the refusal tests exercise the threads and barrier under Miri")]
    fn sync_equals_one_call_on_the_whole_batch(
        (n, c, s) in (2usize..9, 1usize..12, 1usize..30),
        workers in 1usize..6,
        layout in layout(),
        seed: u64,
    ) {
        let mut rng = Rng::new(seed);
        let slices = slices(&mut rng, n, workers);
        check::<f32>(Shape::new(n, c, s), layout, &slices, seed);
    }
}

#[test]
#[cfg_attr(
    miri,
    ignore = "the same kernels as the single calls, checked natively"
)]
fn uneven_and_empty_slices() {
    let cases: [(&[usize], (usize, usize)); 5] = [
        (&[4], (5, 9)),
        (&[0, 3], (7, 16)),
        (&[1, 0, 2, 0, 1], (3, 33)),
        (&[2, 2, 2], (17, 1)),
        (&[0, 0, 5, 0], (64, 49)),
    ];
    for (k, (slices, (c, s))) in cases.iter().enumerate() {
        let n = slices.iter().sum();
        for layout in [Layout::Nchw, Layout::Nhwc] {
            check::<f32>(Shape::new(n, *c, *s), layout, slices, k as u64);
            check::<f16>(Shape::new(n, *c, *s), layout, slices, 10 + k as u64);
        }
    }
}

/// Each worker's result of a training call, in rank order.
fn train_all(
    bns: &mut [BatchNorm<f32>],
    inputs: &[(Vec<f32>, usize, Shape)],
) -> Vec<Result<SavedStats<f32>, Error>> {
    let groups = LocalGroup::new(bns.len());
    std::thread::scope(|scope| {
        let handles: Vec<_> = groups
            .into_iter()
            .zip(bns.iter_mut())
            .zip(inputs)
            .map(|((comm, bn), (x, y_len, shape))| {
                scope.spawn(move || {
                    let mut y = vec![0.0f32; *y_len];
                    bn.forward_train_sync(x, &mut y, *shape, Layout::Nchw, &comm)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

#[test]
fn bad_input_on_one_worker_fails_everywhere_without_deadlock() {
    let shape = Shape::new(2, 3, 4);
    let x = vec![1.5f32; 24];
    let bns = vec![BatchNorm::<f32>::new(3); 3];
    // Worker 1's y is short.
    let mut layers = bns.clone();
    let inputs = [
        (x.clone(), 24, shape),
        (x.clone(), 23, shape),
        (x.clone(), 24, shape),
    ];
    let r = train_all(&mut layers, &inputs);
    assert!(
        matches!(r[1], Err(Error::Length { what: "y", .. })),
        "{:?}",
        r[1]
    );
    assert_eq!(r[0], Err(Error::Peer { rank: Some(1) }));
    assert_eq!(r[2], Err(Error::Peer { rank: Some(1) }));
    assert_eq!(layers, bns, "a refused call moved a layer");
    // Worker 2's layer has another channel count.
    let mut layers = vec![bns[0].clone(), bns[0].clone(), BatchNorm::new(2)];
    let before = layers.clone();
    let inputs = [
        (x.clone(), 24, shape),
        (x.clone(), 24, shape),
        (vec![1.0; 16], 16, Shape::new(2, 2, 4)),
    ];
    let r = train_all(&mut layers, &inputs);
    assert!(r.iter().all(|r| r.is_err()), "{r:?}");
    assert_eq!(r[0], Err(Error::Peer { rank: Some(2) }));
    assert_eq!(layers, before);
    // Too few values in the whole batch (one, on one worker; none elsewhere).
    let mut layers = bns.clone();
    let one = Shape::new(1, 3, 1);
    let none = Shape::new(0, 3, 1);
    let inputs = [(vec![], 0, none), (vec![1.0; 3], 3, one), (vec![], 0, none)];
    let r = train_all(&mut layers, &inputs);
    for r in r {
        assert_eq!(r, Err(Error::TooFewValues { per_channel: 1 }));
    }
    assert_eq!(layers, bns);

    // Backward: worker 0's dx is short.
    let groups = LocalGroup::new(2);
    let saved = SavedStats {
        mean: vec![1.5; 3],
        invstd: vec![1.0; 3],
    };
    let results: Vec<_> = std::thread::scope(|scope| {
        let handles: Vec<_> = groups
            .into_iter()
            .enumerate()
            .map(|(rank, comm)| {
                let (bn, x, saved) = (&bns[0], &x, &saved);
                scope.spawn(move || {
                    let mut dx = vec![0.0f32; 24 - (rank == 0) as usize];
                    bn.backward_sync(x, x, saved, &mut dx, shape, Layout::Nhwc, &comm)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(matches!(results[0], Err(Error::Length { what: "dx", .. })));
    assert_eq!(results[1], Err(Error::Peer { rank: None }));
}

/// A collective that fails.
struct Broken;

#[derive(Debug)]
struct Down;

impl std::fmt::Display for Down {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the network is down")
    }
}

impl std::error::Error for Down {}

impl Collective for Broken {
    type Error = Down;
    fn all_gather_moments(&self, _: &[Moments]) -> Result<Vec<Vec<Moments>>, Down> {
        Err(Down)
    }
    fn all_reduce_sum(&self, _: &mut [f64]) -> Result<(), Down> {
        Err(Down)
    }
}

#[test]
fn a_failing_collective_is_an_error() {
    let shape = Shape::new(2, 3, 4);
    let x: Vec<f32> = Rng::new(1).data(24, 0.0, 1.0);
    let mut bn = BatchNorm::<f32>::new(3);
    let before = bn.clone();
    let mut y = vec![7.0f32; 24];
    let e = bn
        .forward_train_sync(&x, &mut y, shape, Layout::Nchw, &Broken)
        .unwrap_err();
    assert!(matches!(e, Error::Collective(_)));
    assert!(e.to_string().contains("the network is down"));
    assert!(std::error::Error::source(&e).is_some());
    assert_eq!(bn, before);
    assert!(y.iter().all(|&v| v == 7.0));
    let saved = SavedStats {
        mean: vec![0.0; 3],
        invstd: vec![1.0; 3],
    };
    let mut dx = vec![7.0f32; 24];
    let e = bn
        .backward_sync(&x, &x, &saved, &mut dx, shape, Layout::Nchw, &Broken)
        .unwrap_err();
    assert!(matches!(e, Error::Collective(_)));
    assert!(dx.iter().all(|&v| v == 7.0));
}

/// The handles know their place.
#[test]
fn handles_have_ranks() {
    let groups = LocalGroup::new(4);
    for (k, g) in groups.iter().enumerate() {
        assert_eq!((g.rank(), g.workers()), (k, 4));
    }
}
