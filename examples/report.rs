//! The main job: normalizes ResNet-sized tensors in both layouts, checks every result against
//! the f64 oracle, and prints time, GB/s and the ratio to a plain memory copy of the same bytes
//! measured in the same run, per shape, layout, operation, thread count and instruction set.
//!
//! `cargo run --release --example report [-- --quick] [--isa portable] [--threads N] [--csv]`
//!
//! `--csv` prints `shape,layout,op,GB/s` lines for the default instruction set only (for
//! `benches/compare/compare.sh`); `--threads N` measures N threads only.

use batchnorm::{oracle, with_isa, BatchNorm, Isa, Layout, Shape};
use rayon::prelude::*;
use std::time::{Duration, Instant};

const SHAPES: [(&str, Shape); 5] = [
    (
        "A 32x64x56x56",
        Shape {
            n: 32,
            c: 64,
            spatial: 56 * 56,
        },
    ),
    (
        "B 32x256x28x28",
        Shape {
            n: 32,
            c: 256,
            spatial: 28 * 28,
        },
    ),
    (
        "C 1x512x7x7",
        Shape {
            n: 1,
            c: 512,
            spatial: 7 * 7,
        },
    ),
    (
        "D 256x1024",
        Shape {
            n: 256,
            c: 1024,
            spatial: 1,
        },
    ),
    (
        "E 8x32x224x224",
        Shape {
            n: 8,
            c: 32,
            spatial: 224 * 224,
        },
    ),
];

/// Shortest times of `a` and `b`, called alternately (so that both see the same machine
/// load) until `budget` is spent: at least 3 calls each, after one warm-up.
fn time_pair(budget: Duration, mut a: impl FnMut(), mut b: impl FnMut()) -> (Duration, Duration) {
    a();
    b();
    let (mut best_a, mut best_b) = (Duration::MAX, Duration::MAX);
    let start = Instant::now();
    let mut calls = 0;
    while calls < 3 || (start.elapsed() < budget && calls < 200) {
        let t = Instant::now();
        a();
        best_a = best_a.min(t.elapsed());
        let t = Instant::now();
        b();
        best_b = best_b.min(t.elapsed());
        calls += 1;
    }
    (best_a, best_b)
}

/// Largest `|y - want| / (1 + |want|)`.
fn max_error(y: &[f32], want: &[f64]) -> f64 {
    y.iter()
        .zip(want)
        .map(|(&g, &w)| (g as f64 - w).abs() / (1.0 + w.abs()))
        .fold(0.0, f64::max)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    let only_isa = args
        .iter()
        .position(|a| a == "--isa")
        .and_then(|i| args.get(i + 1))
        .and_then(|name| Isa::from_name(name));
    let csv = args.iter().any(|a| a == "--csv");
    let only_threads = args
        .iter()
        .position(|a| a == "--threads")
        .and_then(|i| args.get(i + 1))
        .and_then(|n| n.parse::<usize>().ok());
    let only_isa = if csv { Some(Isa::best()) } else { only_isa };
    let budget = Duration::from_millis(if quick { 60 } else { 400 });
    let all = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut threads = vec![1];
    if all > 1 {
        threads.push(all);
    }
    if let Some(t) = only_threads {
        threads = vec![t.max(1)];
    }
    let isas: Vec<Isa> = Isa::available()
        .into_iter()
        .filter(|i| only_isa.is_none_or(|o| o == *i))
        .collect();
    // Table text goes to stdout unless --csv, where only the csv lines do.
    macro_rules! say {
        ($($t:tt)*) => {
            if !csv {
                println!($($t)*);
            }
        };
    }

    say!("batchnorm report: f32, {all} hardware threads, instruction sets {isas:?}");
    say!("GB/s counts 8 bytes per element (x read, y written), 12 for backward (x, dy read, dx written);");
    say!("copy = memcpy of the same bytes (8 or 12 per element), timed alternately with the op.");
    say!("error = max |y - y_f64| / (1 + |y_f64|) against the oracle.\n");
    say!(
        "| shape | layout | op | threads | isa | time | GB/s | copy GB/s | ratio to copy | error |"
    );
    say!("|---|---|---|---|---|---|---|---|---|---|");
    let shapes = if quick { &SHAPES[2..4] } else { &SHAPES[..] };
    for &(name, shape) in shapes {
        let len = shape.numel().expect("shape fits");
        let layouts: &[Layout] = if shape.spatial == 1 {
            &[Layout::Nchw] // (N, C): both layouts are the same memory
        } else {
            &[Layout::Nchw, Layout::Nhwc]
        };
        for &layout in layouts {
            let x: Vec<f32> = (0..len)
                .map(|i| ((i * 7919) % 1009) as f32 * 0.01 - 3.0 + (i % shape.c) as f32)
                .collect();
            let mut y = vec![0.0f32; len];
            let mut bn = BatchNorm::<f32>::new(shape.c);
            bn.running_mean = (0..shape.c).map(|c| c as f32).collect();
            bn.running_var = vec![2.0; shape.c];
            let want_train = oracle::forward_train(&bn, &x, shape, layout).y;
            let want_eval = oracle::forward_eval(&bn, &x, shape, layout);
            let dy: Vec<f32> = (0..len)
                .map(|i| ((i * 31) % 17) as f32 * 0.1 - 0.8)
                .collect();
            let saved = bn.clone().forward_train(&x, &mut y, shape, layout).unwrap();
            let want_back = oracle::backward(&bn, &x, &dy, &saved, shape, layout).dx;
            let mut dx = vec![0.0f32; len];
            // The backward copy moves 12 bytes per element: one and a half tensors.
            let back_src: Vec<f32> = x.iter().chain(&x[..len / 2]).copied().collect();
            let mut back_dst = vec![0.0f32; back_src.len()];
            for &t in &threads {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(t)
                    .build()
                    .unwrap();
                let mut dst = vec![0.0f32; len];
                let copy = |src: &[f32], dst: &mut [f32]| {
                    if t == 1 {
                        dst.copy_from_slice(src)
                    } else {
                        dst.par_chunks_mut(1 << 16)
                            .zip(src.par_chunks(1 << 16))
                            .for_each(|(d, s)| d.copy_from_slice(s))
                    }
                };
                for &isa in &isas {
                    for op in ["eval", "train", "backward"] {
                        let bytes = if op == "backward" { 12.0 } else { 8.0 } * len as f64;
                        let (copy_time, elapsed, err) = pool.install(|| {
                            with_isa(isa, || {
                                let mut layer = bn.clone();
                                let (copy_time, elapsed) = time_pair(
                                    budget,
                                    || {
                                        if op == "backward" {
                                            copy(&back_src, &mut back_dst)
                                        } else {
                                            copy(&x, &mut dst)
                                        }
                                    },
                                    || match op {
                                        "eval" => {
                                            bn.forward_eval(&x, &mut y, shape, layout).unwrap()
                                        }
                                        "train" => {
                                            layer.forward_train(&x, &mut y, shape, layout).unwrap();
                                        }
                                        _ => {
                                            bn.backward(&x, &dy, &saved, &mut dx, shape, layout)
                                                .unwrap();
                                        }
                                    },
                                );
                                let err = match op {
                                    "eval" => max_error(&y, &want_eval),
                                    "train" => max_error(&y, &want_train),
                                    _ => max_error(&dx, &want_back),
                                };
                                (copy_time, elapsed, err)
                            })
                        });
                        let copy_gbs = bytes / copy_time.as_secs_f64() / 1e9;
                        assert!(err < 1e-5, "{name} {layout:?} {op} {isa:?}: error {err:e}");
                        let gbs = bytes / elapsed.as_secs_f64() / 1e9;
                        if csv {
                            println!("{name},{layout:?},{op},{gbs:.1}");
                        }
                        say!(
                            "| {name} | {layout:?} | {op} | {t} | {} | {:.3} ms | {gbs:.1} | {copy_gbs:.1} | {:.2} | {err:.1e} |",
                            isa.name(),
                            elapsed.as_secs_f64() * 1e3,
                            gbs / copy_gbs,
                        );
                    }
                }
            }
        }
    }
}
