//! criterion benchmarks of the forward and backward passes, both layouts, beside a memory copy
//! of the same bytes on the same threads: the report's shapes (A to E) and the distinct
//! batch-norm shapes of ResNet-50 at batch 1 (`BENCH_BATCH=32` for batch 32). The report's
//! shapes also run on `f16` and `bf16` tensors (groups suffixed `_f16`, `_bf16`; parameters
//! `f32`). Throughput counts two tensors' bytes per element (x read, y written: 8 for `f32`,
//! 4 for the 16-bit types), three for backward (x and dy read, dx written), so criterion
//! prints GB/s. The report's shapes also run ResNet's fused blocks (groups suffixed `_fused`:
//! `y = relu(bn(x) + residual)` in inference and training, three tensors per element, and the
//! fused backward with the residual's gradient, five).
//!
//! Every benchmark, the copy included, runs on rayon's global pool of `BENCH_THREADS` threads
//! (default: all), so that an operation and its copy always use the same threads.
//! `BATCHNORM_ISA=scalar|portable|avx2|avx512` picks the instruction set.

#[path = "../examples/common/mod.rs"]
mod common;

use batchnorm::half::{bf16, f16};
use batchnorm::{BatchNorm, Data, Fuse, Layout, Shape};
use common::{copy, grad, input, type_name, RESNET50};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use std::hint::black_box;
use std::time::Duration;

const SHAPES: [(&str, Shape); 5] = [
    (
        "A_32x64x56x56",
        Shape {
            n: 32,
            c: 64,
            spatial: 56 * 56,
        },
    ),
    (
        "B_32x256x28x28",
        Shape {
            n: 32,
            c: 256,
            spatial: 28 * 28,
        },
    ),
    (
        "C_1x512x7x7",
        Shape {
            n: 1,
            c: 512,
            spatial: 7 * 7,
        },
    ),
    (
        "D_256x1024",
        Shape {
            n: 256,
            c: 1024,
            spatial: 1,
        },
    ),
    (
        "E_8x32x224x224",
        Shape {
            n: 8,
            c: 32,
            spatial: 224 * 224,
        },
    ),
];

fn env(name: &str) -> Option<usize> {
    std::env::var(name).ok()?.parse().ok()
}

/// The forward and backward benchmarks of one shape, with their copies.
fn bench_shape<D: Data<Param = f32>>(c: &mut Criterion, name: &str, shape: Shape, threads: usize) {
    let len = shape.numel().unwrap();
    let of = |v: Vec<f32>| -> Vec<D> { v.into_iter().map(|v| D::from_f64(v as f64)).collect() };
    let x = of(input(len, shape.c));
    let dy = of(grad(len));
    let (mut y, mut dx) = (vec![D::default(); len], vec![D::default(); len]);
    let size = std::mem::size_of::<D>() as u64;
    let name = match type_name::<D>() {
        "f32" => name.to_string(),
        t => format!("{name}_{t}"),
    };
    let layouts: &[Layout] = if shape.spatial == 1 {
        &[Layout::Nchw] // (N, C): both layouts are the same memory
    } else {
        &[Layout::Nchw, Layout::Nhwc]
    };
    let mut group = c.benchmark_group(&name);
    group.throughput(Throughput::Bytes(2 * size * len as u64));
    group.sample_size(20);
    group.measurement_time(Duration::from_secs(1));
    group.warm_up_time(Duration::from_millis(300));
    group.bench_function("copy", |b| b.iter(|| copy(black_box(&x), &mut y, threads)));
    for &layout in layouts {
        let mut bn = BatchNorm::<f32>::new(shape.c);
        group.bench_function(BenchmarkId::new("eval", format!("{layout:?}")), |b| {
            b.iter(|| {
                bn.forward_eval(black_box(&x), &mut y, shape, layout)
                    .unwrap()
            })
        });
        group.bench_function(BenchmarkId::new("train", format!("{layout:?}")), |b| {
            b.iter(|| {
                bn.forward_train(black_box(&x), &mut y, shape, layout)
                    .unwrap()
            })
        });
    }
    group.finish();
    let mut group = c.benchmark_group(format!("{name}_backward"));
    group.throughput(Throughput::Bytes(3 * size * len as u64));
    group.sample_size(20);
    group.measurement_time(Duration::from_secs(1));
    group.warm_up_time(Duration::from_millis(300));
    let src: Vec<D> = x.iter().chain(&x[..len / 2]).copied().collect();
    let mut dst = vec![D::default(); src.len()];
    group.bench_function("copy", |b| {
        b.iter(|| copy(black_box(&src), &mut dst, threads))
    });
    for &layout in layouts {
        let bn = BatchNorm::<f32>::new(shape.c);
        let saved = bn.clone().forward_train(&x, &mut y, shape, layout).unwrap();
        group.bench_function(BenchmarkId::new("backward", format!("{layout:?}")), |b| {
            b.iter(|| {
                bn.backward(black_box(&x), &dy, &saved, &mut dx, shape, layout)
                    .unwrap()
            })
        });
    }
    group.finish();
    if std::env::var("BENCH_FUSED").as_deref() == Ok("0") {
        return;
    }
    let mut group = c.benchmark_group(format!("{name}_fused"));
    group.throughput(Throughput::Bytes(3 * size * len as u64));
    group.sample_size(20);
    group.measurement_time(Duration::from_secs(1));
    group.warm_up_time(Duration::from_millis(300));
    let residual = of(grad(len));
    let src: Vec<D> = x.iter().chain(&x[..len / 2]).copied().collect();
    let mut dst = vec![D::default(); src.len()];
    group.bench_function("copy", |b| {
        b.iter(|| copy(black_box(&src), &mut dst, threads))
    });
    for &layout in layouts {
        let mut bn = BatchNorm::<f32>::new(shape.c);
        let fuse = Fuse::add_relu(&residual[..]);
        group.bench_function(
            BenchmarkId::new("eval+add+relu", format!("{layout:?}")),
            |b| {
                b.iter(|| {
                    bn.forward_eval_fused(black_box(&x), &mut y, shape, layout, fuse)
                        .unwrap()
                })
            },
        );
        group.bench_function(
            BenchmarkId::new("train+add+relu", format!("{layout:?}")),
            |b| {
                b.iter(|| {
                    bn.forward_train_fused(black_box(&x), &mut y, shape, layout, fuse)
                        .unwrap()
                })
            },
        );
        let saved = bn
            .clone()
            .forward_train_fused(&x, &mut y, shape, layout, fuse)
            .unwrap();
        let mut dr = vec![D::default(); len];
        group.bench_function(
            BenchmarkId::new("backward+relu", format!("{layout:?}")),
            |b| {
                b.iter(|| {
                    bn.backward_fused(
                        black_box(&x),
                        &y,
                        &dy,
                        &saved,
                        &mut dx,
                        Some(&mut dr),
                        shape,
                        layout,
                        true,
                    )
                    .unwrap()
                })
            },
        );
    }
    group.finish();
}

fn benches(c: &mut Criterion) {
    let all = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = env("BENCH_THREADS").unwrap_or(all).max(1);
    let batch = env("BENCH_BATCH").unwrap_or(1).max(1);
    // The global pool, which the operations and the parallel copy both use (criterion
    // itself cannot move into a pool's thread).
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()
        .expect("the global thread pool, built once");
    for (name, shape) in SHAPES {
        bench_shape::<f32>(c, name, shape, threads);
        bench_shape::<f16>(c, name, shape, threads);
        bench_shape::<bf16>(c, name, shape, threads);
    }
    for (ch, hw, _) in RESNET50 {
        let name = format!("resnet50_{batch}x{ch}x{hw}x{hw}");
        bench_shape::<f32>(c, &name, Shape::new(batch, ch, hw * hw), threads);
    }
}

criterion_group!(batchnorm_benches, benches);
criterion_main!(batchnorm_benches);
