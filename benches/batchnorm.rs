//! criterion benchmarks of the forward and backward passes on ResNet-like shapes, both layouts, beside a
//! memory copy of the same bytes. Throughput counts 8 bytes per element (x read, y written;
//! 12 for backward: x and dy read, dx written),
//! so criterion prints GB/s. `BATCHNORM_ISA=scalar|portable` picks the instruction set;
//! `RAYON_NUM_THREADS=1` measures one thread.

use batchnorm::{BatchNorm, Layout, Shape};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use std::hint::black_box;

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

fn forward(c: &mut Criterion) {
    for (name, shape) in SHAPES {
        let len = shape.numel().unwrap();
        let x: Vec<f32> = (0..len)
            .map(|i| ((i * 7919) % 1009) as f32 * 0.01)
            .collect();
        let mut y = vec![0.0f32; len];
        let mut group = c.benchmark_group(name);
        group.throughput(Throughput::Bytes(8 * len as u64));
        group.sample_size(20);
        group.bench_function("copy", |b| b.iter(|| y.copy_from_slice(black_box(&x))));
        for layout in [Layout::Nchw, Layout::Nhwc] {
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
        let dy: Vec<f32> = (0..len).map(|i| ((i * 31) % 17) as f32 * 0.1).collect();
        let mut dx = vec![0.0f32; len];
        let src: Vec<f32> = x.iter().chain(&x[..len / 2]).copied().collect();
        let mut dst = vec![0.0f32; src.len()];
        group.bench_function("copy", |b| b.iter(|| dst.copy_from_slice(black_box(&src))));
        for layout in [Layout::Nchw, Layout::Nhwc] {
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
}

criterion_group!(benches, forward);
criterion_main!(benches);
