//! The yardstick: the 53 batch-norm layers of torchvision's ResNet-50 (224x224 input), at
//! batch 1 and 32, both layouts, inference, training forward and backward, one thread and all
//! threads. Each distinct shape is timed alternately with a memory copy of the same bytes on
//! the same threads (median of the calls, minimum beside it), its result checked against the
//! f64 oracle; totals weigh each shape by how often it occurs.
//!
//! `cargo run --release --example resnet50 [-- --quick] [--batch 1,32] [--threads 1,2]
//! [--isa avx2] [--layers] [--csv] [--fused]`
//!
//! `--fused` times the network's batch norms as it runs them: each with its ReLU fused
//! (`Fuse::relu()`, and `backward_fused`), the last of each bottleneck block with the residual
//! too (`Fuse::add_relu`, the residual's gradient written), the downsampling ones plain.
//!
//! `--layers` adds a row per distinct shape; `--csv` prints
//! `resnet50 bN,layout,op,threads,median_ms,min_ms,copy_ms,bytes` lines of the totals instead
//! of the table (for `benches/compare/compare.sh`).

mod common;

use batchnorm::{with_isa, Isa, Layout, Shape};
use common::{arg, Case, Timing, FUSED_OPS, OPS, RESNET50};
use std::time::Duration;

fn list(args: &[String], flag: &str, default: Vec<usize>) -> Vec<usize> {
    arg::<String>(args, flag)
        .map(|s| s.split(',').filter_map(|v| v.trim().parse().ok()).collect())
        .unwrap_or(default)
}

/// Sums over the layers for one (threads, op).
#[derive(Clone, Copy, Default)]
struct Total {
    op: Timing,
    copy: Duration,
    bytes: f64,
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let has = |f: &str| args.iter().any(|a| a == f);
    let (quick, csv, per_layer) = (has("--quick"), has("--csv"), has("--layers"));
    let fused = has("--fused");
    let all = std::thread::available_parallelism().map_or(1, |n| n.get());
    let batches = list(&args, "--batch", vec![1, 32]);
    let mut threads = list(&args, "--threads", vec![1, all]);
    threads.dedup();
    // Without --isa, each call picks its instruction set as any caller's would.
    let isa = arg::<String>(&args, "--isa").and_then(|n| Isa::from_name(&n));
    let on_isa = |f: &mut dyn FnMut() -> (Timing, Timing, f64)| match isa {
        Some(isa) => with_isa(isa, f),
        None => f(),
    };
    let budget = Duration::from_millis(if quick { 40 } else { 250 });
    let min_calls = if quick { 3 } else { 7 };
    if !csv {
        println!(
            "ResNet-50 batch norms (53 layers{}), f32, isa {}, {all} hardware threads",
            if fused {
                ", each with its ReLU and residual fused"
            } else {
                ""
            },
            isa.map_or(format!("default ({})", Isa::current().name()), |i| i
                .name()
                .to_string())
        );
        println!(
            "time = Σ over layers of the median call (min beside it); copy = memcpy of the same"
        );
        println!("bytes on the same threads, timed alternately; GB/s at 8 bytes per element (12 backward).\n");
        println!("| batch | layout | op | threads | time | min | GB/s | copy GB/s | ratio to copy | vs 1 thread |");
        println!("|---|---|---|---|---|---|---|---|---|---|");
    }
    for &batch in &batches {
        for layout in [Layout::Nchw, Layout::Nhwc] {
            let mut totals = vec![[Total::default(); 3]; threads.len()];
            for &(c, hw, count) in &RESNET50 {
                let shape = Shape::new(batch, c, hw * hw);
                let mut case = Case::<f32>::new(shape, layout);
                for (ti, &t) in threads.iter().enumerate() {
                    let pool = rayon::ThreadPoolBuilder::new()
                        .num_threads(t)
                        .build()
                        .expect("thread pool");
                    let ops = OPS.into_iter().enumerate().flat_map(|(oi, (plain, _))| {
                        layer_ops(fused, c, hw, count, oi, plain)
                            .into_iter()
                            .map(move |(op, n)| (oi, op, n))
                    });
                    for (oi, op, count) in ops {
                        let all_ops = OPS.iter().chain(&FUSED_OPS);
                        let tensors = all_ops.clone().find(|o| o.0 == op).expect("an op").1;
                        let bytes = tensors * 4.0 * case.len() as f64;
                        let is_fused = FUSED_OPS.iter().any(|f| f.0 == op);
                        let (timing, copy_t, err) = pool.install(|| {
                            on_isa(&mut || {
                                if is_fused {
                                    case.time_fused(op, t, budget, min_calls)
                                } else {
                                    case.time(op, t, budget, min_calls)
                                }
                            })
                        });
                        assert!(
                            err < 1e-5,
                            "{batch}x{c}x{hw}x{hw} {layout:?} {op}: error {err:e}"
                        );
                        let tot = &mut totals[ti][oi];
                        let k = count as u32;
                        tot.op.median += timing.median * k;
                        tot.op.min += timing.min * k;
                        tot.copy += copy_t.median * k;
                        tot.bytes += bytes * count as f64;
                        if per_layer && !csv {
                            println!(
                                "| {batch}x{c}x{hw}x{hw} (x{count}) | {layout:?} | {op} | {t} | {:.3} ms | {:.3} ms | {:.1} | {:.1} | {:.2} | |",
                                ms(timing.median),
                                ms(timing.min),
                                timing.gbs(bytes),
                                copy_t.gbs(bytes),
                                copy_t.median.as_secs_f64() / timing.median.as_secs_f64(),
                            );
                        }
                    }
                }
            }
            for (ti, &t) in threads.iter().enumerate() {
                for (oi, (op, _)) in OPS.into_iter().enumerate() {
                    let tot = totals[ti][oi];
                    let one = totals[0][oi].op.median.as_secs_f64();
                    let secs = tot.op.median.as_secs_f64();
                    if csv {
                        println!(
                            "resnet50 b{batch},{layout:?},{op},{t},{:.4},{:.4},{:.4},{}",
                            ms(tot.op.median),
                            ms(tot.op.min),
                            ms(tot.copy),
                            tot.bytes
                        );
                    } else {
                        println!(
                            "| {batch} | {layout:?} | {op} | {t} | {:.2} ms | {:.2} ms | {:.1} | {:.1} | {:.2} | {:.2}x |",
                            ms(tot.op.median),
                            ms(tot.op.min),
                            tot.bytes / secs / 1e9,
                            tot.bytes / tot.copy.as_secs_f64() / 1e9,
                            tot.copy.as_secs_f64() / secs,
                            one / secs,
                        );
                    }
                }
            }
        }
    }
}

/// The operations the `count` layers of shape (`c`, `hw`) run for op `oi` of [`OPS`], and how
/// many layers run each: `plain` for all of them, or with `fused` as the network runs them. In
/// torchvision's bottlenecks the layers of 4x width (256 at 56, 512 at 28, 1024 at 14, 2048 at
/// 7) are each block's last batch norm (residual and ReLU) but one, the downsampling branch's
/// (no ReLU); every other batch norm has a ReLU.
fn layer_ops(
    fused: bool,
    c: usize,
    hw: usize,
    count: usize,
    oi: usize,
    plain: &'static str,
) -> Vec<(&'static str, usize)> {
    if !fused {
        return vec![(plain, count)];
    }
    let last = [(256, 56), (512, 28), (1024, 14), (2048, 7)].contains(&(c, hw));
    let (relu, add_relu) = match oi {
        0 => ("eval+relu", "eval+add+relu"),
        1 => ("train+relu", "train+add+relu"),
        _ => ("backward+relu", "backward+add+relu"),
    };
    if last {
        vec![(add_relu, count - 1), (plain, 1)]
    } else {
        vec![(relu, count)]
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
