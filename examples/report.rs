//! The main job: normalizes ResNet-sized tensors in both layouts, checks every result against
//! the f64 oracle, and prints time, GB/s and the ratio to a plain memory copy of the same bytes
//! measured in the same run, per shape, layout, operation, thread count and instruction set.
//!
//! `cargo run --release --example report [-- --quick] [--isa portable | --isas] [--threads N]
//! [--csv] [--dtype f64 | f16 | bf16] [--fused] [--shapes ABF] [--layout nchw | nhwc]`
//!
//! Each operation is timed alternately with a memory copy of the same bytes on the same
//! threads (median of the calls, minimum beside it). Without `--isa`, calls choose their
//! instruction set as any caller's would; `--isas` adds a row for every instruction set this
//! CPU has. `--csv` prints `name,layout,op,threads,median_ms,min_ms,copy_ms,bytes` lines
//! instead of the table (for `benches/compare/compare.sh`); `--threads N` measures N threads
//! only. `--dtype f16` or `bf16` measures 16-bit tensors (parameters and statistics `f32`),
//! with a column for the time the same call takes on `f32` tensors, measured in the same run;
//! `--dtype f64` likewise, its parameters `f64`.
//! `train in place` is training with the output over the input.
//! `--fused` adds ResNet's fused blocks (`y = relu(bn(x) + residual)` in inference and
//! training, and its backward with the residual's gradient) beside the same work done as
//! separate passes (the batch norm, then an add loop, then a ReLU loop), and a read of the
//! residual's bytes alone (`read residual`: what the residual adds to training's memory
//! traffic, read from memory after the caches are emptied, against a copy of as many bytes,
//! half each way) and the plain training followed
//! by that read (`train, read residual`, timed as one). `--shapes` keeps the
//! shapes whose letters it lists, `--layout` one layout.
//!
//! `--svg FILE` (with `--features chart`) also draws the table as a chart: one bar per row, its
//! ratio to the copy, the copy's speed marked at 1.

mod common;

use batchnorm::half::{bf16, f16};
use batchnorm::{with_isa, Data, Isa, Layout, Shape};
use common::{arg, error_bound, type_name, Case, Timing, FUSED_OPS, IN_PLACE_OPS, OPS};
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
    match arg::<String>(&args, "--dtype").as_deref() {
        None | Some("f32") => report::<f32>(&args),
        Some("f16") => report::<f16>(&args),
        Some("bf16") => report::<bf16>(&args),
        Some("f64") => report::<f64>(&args),
        Some(other) => panic!("--dtype {other}: f32, f64, f16 or bf16"),
    }
}

/// Times one operation of `case` (on the instruction set `isa`, or the default) and checks its
/// result: (op, copy, largest error).
fn measure<D: Data>(
    case: &mut Case<D>,
    pool: &rayon::ThreadPool,
    isa: Option<Isa>,
    op: &str,
    threads: usize,
    budget: Duration,
) -> (Timing, Timing, f64) {
    let fused = FUSED_OPS.iter().any(|f| f.0 == op);
    let mut run = || {
        if fused {
            case.time_fused(op, threads, budget, 3)
        } else {
            case.time(op, threads, budget, 3)
        }
    };
    pool.install(|| match isa {
        Some(isa) => with_isa(isa, &mut run),
        None => run(),
    })
}

fn report<D: Data>(args: &[String]) {
    let args = args.to_vec();
    let dtype = type_name::<D>();
    // Another type than f32: a column for the same call on f32 tensors.
    let half = dtype != "f32";
    let size = std::mem::size_of::<D>() as f64;
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
        "batchnorm report: {dtype} tensors, {all} hardware threads, default instruction set {}",
        Isa::current().name()
    );
    say!(
        "GB/s counts {} bytes per element (x read, y written), {} for backward (x, dy read, dx written);",
        2.0 * size,
        3.0 * size
    );
    say!("copy = memcpy of the same bytes on the same threads, timed alternately with the op;");
    say!("time = median call (min beside it); error = max |y - y_f64| / (1 + |y_f64|) against the oracle.");
    if half {
        say!("f32 / {dtype} = the same call on f32 tensors, timed in the same run, over this one's time.");
    }
    say!("");
    say!("| shape | layout | op | threads | isa | time | min | GB/s | copy GB/s | ratio to copy | error |{}", if half { " f32 / this |" } else { "" });
    say!(
        "|---|---|---|---|---|---|---|---|---|---|---|{}",
        if half { "---|" } else { "" }
    );
    // (label, ratio to copy) of every row, for `--svg`.
    let mut bars: Vec<(String, f64)> = Vec::new();
    let shapes = if quick { &SHAPES[2..4] } else { &SHAPES[..] };
    let letters = arg::<String>(&args, "--shapes");
    let only = arg::<String>(&args, "--layout").map(|l| l.to_lowercase());
    for &(name, shape) in shapes {
        if letters.as_ref().is_some_and(|l| !l.contains(&name[..1])) {
            continue;
        }
        let layouts: &[Layout] = if shape.spatial == 1 {
            &[Layout::Nchw] // (N, C): both layouts are the same memory
        } else {
            &[Layout::Nchw, Layout::Nhwc]
        };
        let wanted = |l: &&Layout| {
            only.as_deref()
                .is_none_or(|o| format!("{l:?}").to_lowercase() == o)
        };
        for &layout in layouts.iter().filter(wanted) {
            let mut case = Case::<D>::new(shape, layout);
            let mut single = half.then(|| Case::<f32>::new(shape, layout));
            for &t in &threads {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(t)
                    .build()
                    .expect("thread pool");
                for &isa in &isas {
                    let ops = OPS.iter().chain(&IN_PLACE_OPS).chain(if has("--fused") {
                        &FUSED_OPS[..]
                    } else {
                        &[]
                    });
                    for &(op, tensors) in ops {
                        let bytes = tensors * size * case.len() as f64;
                        let (timing, copy_t, err) = measure(&mut case, &pool, isa, op, t, budget);
                        let bound = error_bound::<D>();
                        assert!(
                            err <= bound,
                            "{name} {layout:?} {op} {isa:?}: error {err:e}"
                        );
                        let vs_f32 = match single.as_mut() {
                            Some(c) => {
                                let (f32_t, _, _) = measure(c, &pool, isa, op, t, budget);
                                format!(
                                    " {:.2} |",
                                    f32_t.median.as_secs_f64() / timing.median.as_secs_f64()
                                )
                            }
                            None => String::new(),
                        };
                        let ms = |d: Duration| d.as_secs_f64() * 1e3;
                        bars.push((
                            format!("{} {layout:?} {op} {t}t {}", &name[..1], isa_name(isa)),
                            timing.gbs(bytes) / copy_t.gbs(bytes),
                        ));
                        if csv {
                            println!(
                                "{name},{layout:?},{op},{t},{:.4},{:.4},{:.4},{bytes}",
                                ms(timing.median),
                                ms(timing.min),
                                ms(copy_t.median)
                            );
                        }
                        say!(
                            "| {name} | {layout:?} | {op} | {t} | {} | {:.3} ms | {:.3} ms | {:.1} | {:.1} | {:.2} | {err:.1e} |{vs_f32}",
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
    if let Some(path) = arg::<String>(&args, "--svg") {
        let title = format!(
            "batchnorm, {dtype} tensors: ratio to a copy of the same bytes (default isa {})",
            Isa::current().name()
        );
        chart(&path, &title, &bars);
    }
}

/// Draws `bars` (label, ratio to copy) as horizontal bars into the SVG file `path`, with a line
/// at 1 (as fast as the copy).
#[cfg(feature = "chart")]
fn chart(path: &str, title: &str, bars: &[(String, f64)]) {
    use plotters::prelude::*;
    let n = bars.len().max(1);
    let height = 80 + 18 * n as u32;
    let root = SVGBackend::new(path, (900, height)).into_drawing_area();
    root.fill(&WHITE).expect("svg");
    let top = bars.iter().map(|b| b.1).fold(1.2, f64::max) * 1.05;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 16))
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(230)
        .build_cartesian_2d(0.0..top, (0..n).into_segmented())
        .expect("chart");
    let label = |v: &SegmentValue<usize>| match v {
        // The first row at the top.
        SegmentValue::CenterOf(j) => bars.get(n - 1 - j).map_or(String::new(), |b| b.0.clone()),
        _ => String::new(),
    };
    chart
        .configure_mesh()
        .y_labels(n)
        .y_label_formatter(&label)
        .x_desc("ratio to a copy of the same bytes (1 = as fast as the copy)")
        .disable_y_mesh()
        .draw()
        .expect("mesh");
    chart
        .draw_series(bars.iter().enumerate().map(|(i, (_, r))| {
            let j = n - 1 - i;
            let (a, b) = (SegmentValue::Exact(j), SegmentValue::Exact(j + 1));
            let mut bar = Rectangle::new([(0.0, a), (*r, b)], BLUE.mix(0.6).filled());
            bar.set_margin(2, 2, 0, 0);
            bar
        }))
        .expect("bars");
    chart
        .draw_series(std::iter::once(PathElement::new(
            [(1.0, SegmentValue::Exact(0)), (1.0, SegmentValue::Exact(n))],
            RED,
        )))
        .expect("the copy's line");
    root.present().expect("svg written");
    eprintln!("chart written to {path}");
}

#[cfg(not(feature = "chart"))]
fn chart(path: &str, _: &str, _: &[(String, f64)]) {
    eprintln!("--svg {path}: build with --features chart (plotters) to draw the chart");
}
