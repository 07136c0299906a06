//! The main job: normalizes ResNet-sized tensors in both layouts, checks every result against
//! the f64 oracle, and prints time, GB/s and the ratio to a plain memory copy of the same bytes
//! measured in the same run, per shape, layout, operation, thread count and instruction set.
//!
//! `cargo run --release --example report [-- --quick] [--isa portable | --isas] [--threads N]
//! [--csv]`
//!
//! Each operation is timed alternately with a memory copy of the same bytes on the same
//! threads (median of the calls, minimum beside it). Without `--isa`, calls choose their
//! instruction set as any caller's would; `--isas` adds a row for every instruction set this
//! CPU has. `--csv` prints `name,layout,op,threads,median_ms,min_ms,copy_ms,bytes` lines
//! instead of the table (for `benches/compare/compare.sh`); `--threads N` measures N threads
//! only.

mod common;

use batchnorm::{with_isa, Isa, Layout, Shape};
use common::{arg, Case, OPS};
use std::time::Duration;

const SHAPES: [(&str, Shape); 6] = [
    ("A 32x64x56x56", Shape::new(32, 64, 56 * 56)),
    ("B 32x256x28x28", Shape::new(32, 256, 28 * 28)),
    ("C 1x512x7x7", Shape::new(1, 512, 7 * 7)),
    ("D 256x1024", Shape::new(256, 1024, 1)),
    ("E 8x32x224x224", Shape::new(8, 32, 224 * 224)),
    // Far larger than any last-level cache (205 MB a tensor).
    ("F 256x64x56x56", Shape::new(256, 64, 56 * 56)),
];

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let has = |f: &str| args.iter().any(|a| a == f);
    let (quick, csv) = (has("--quick"), has("--csv"));
    let budget = Duration::from_millis(if quick { 60 } else { 400 });
    let all = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = match arg::<usize>(&args, "--threads") {
        Some(t) => vec![t.max(1)],
        None if all > 1 => vec![1, all],
        None => vec![1],
    };
    // `None`: the instruction set each call picks by default.
    let mut isas: Vec<Option<Isa>> = match arg::<String>(&args, "--isa") {
        Some(name) => vec![Some(
            Isa::from_name(&name).expect("--isa: scalar, portable, avx2 or avx512"),
        )],
        None => vec![None],
    };
    if has("--isas") {
        isas.extend(Isa::available().into_iter().map(Some));
    }
    let isa_name = |isa: Option<Isa>| isa.map_or("default", Isa::name);
    // Table text goes to stdout unless --csv, where only the csv lines do.
    macro_rules! say {
        ($($t:tt)*) => {
            if !csv {
                println!($($t)*);
            }
        };
    }

    say!(
        "batchnorm report: f32, {all} hardware threads, default instruction set {}",
        Isa::current().name()
    );
    say!("GB/s counts 8 bytes per element (x read, y written), 12 for backward (x, dy read, dx written);");
    say!("copy = memcpy of the same bytes on the same threads, timed alternately with the op;");
    say!("time = median call (min beside it); error = max |y - y_f64| / (1 + |y_f64|) against the oracle.\n");
    say!("| shape | layout | op | threads | isa | time | min | GB/s | copy GB/s | ratio to copy | error |");
    say!("|---|---|---|---|---|---|---|---|---|---|---|");
    let shapes = if quick { &SHAPES[2..4] } else { &SHAPES[..] };
    for &(name, shape) in shapes {
        let layouts: &[Layout] = if shape.spatial == 1 {
            &[Layout::Nchw] // (N, C): both layouts are the same memory
        } else {
            &[Layout::Nchw, Layout::Nhwc]
        };
        for &layout in layouts {
            let mut case = Case::new(shape, layout);
            for &t in &threads {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(t)
                    .build()
                    .expect("thread pool");
                for &isa in &isas {
                    for (op, per_element) in OPS {
                        let bytes = per_element * case.len() as f64;
                        let mut run = || case.time(op, t, budget, 3);
                        let (timing, copy_t, err) = pool.install(|| match isa {
                            Some(isa) => with_isa(isa, &mut run),
                            None => run(),
                        });
                        assert!(err < 1e-5, "{name} {layout:?} {op} {isa:?}: error {err:e}");
                        let ms = |d: Duration| d.as_secs_f64() * 1e3;
                        if csv {
                            println!(
                                "{name},{layout:?},{op},{t},{:.4},{:.4},{:.4},{bytes}",
                                ms(timing.median),
                                ms(timing.min),
                                ms(copy_t.median)
                            );
                        }
                        say!(
                            "| {name} | {layout:?} | {op} | {t} | {} | {:.3} ms | {:.3} ms | {:.1} | {:.1} | {:.2} | {err:.1e} |",
                            isa_name(isa),
                            ms(timing.median),
                            ms(timing.min),
                            timing.gbs(bytes),
                            copy_t.gbs(bytes),
                            timing.gbs(bytes) / copy_t.gbs(bytes),
                        );
                    }
                }
            }
        }
    }
}
