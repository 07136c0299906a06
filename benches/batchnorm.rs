//! criterion benchmarks of the forward and backward passes, both layouts, beside a memory copy
//! of the same bytes on the same threads: the report's shapes (A to E) and the distinct
//! batch-norm shapes of ResNet-50 at batch 1 (`BENCH_BATCH=32` for batch 32). Throughput
//! counts 8 bytes per element (x read, y written; 12 for backward: x and dy read, dx
//! written), so criterion prints GB/s.
//!
//! Every benchmark, the copy included, runs on rayon's global pool of `BENCH_THREADS` threads
//! (default: all), so that an operation and its copy always use the same threads.
//! `BATCHNORM_ISA=scalar|portable|avx2|avx512` picks the instruction set.

#[path = "../examples/common/mod.rs"]
mod common;

use batchnorm::{BatchNorm, Layout, Shape};
use common::{copy, grad, input, RESNET50};
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
fn bench_shape(c: &mut Criterion, name: &str, shape: Shape, threads: usize) {
    let len = shape.numel().unwrap();
    let x = input(len, shape.c);
    let dy = grad(len);
    let (mut y, mut dx) = (vec![0.0f32; len], vec![0.0f32; len]);
    let layouts: &[Layout] = if shape.spatial == 1 {
        &[Layout::Nchw] // (N, C): both layouts are the same memory
    } else {
        &[Layout::Nchw, Layout::Nhwc]
    };
    let mut group = c.benchmark_group(name);
    group.throughput(Throughput::Bytes(8 * len as u64));
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
    group.throughput(Throughput::Bytes(12 * len as u64));
    group.sample_size(20);
    group.measurement_time(Duration::from_secs(1));
    group.warm_up_time(Duration::from_millis(300));
    let src: Vec<f32> = x.iter().chain(&x[..len / 2]).copied().collect();
    let mut dst = vec![0.0f32; src.len()];
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
        bench_shape(c, name, shape, threads);
    }
    for (ch, hw, _) in RESNET50 {
        let name = format!("resnet50_{batch}x{ch}x{hw}x{hw}");
        bench_shape(c, &name, Shape::new(batch, ch, hw * hw), threads);
    }
}

criterion_group!(batchnorm_benches, benches);
criterion_main!(batchnorm_benches);
