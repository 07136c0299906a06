//! Ours against `candle_nn::BatchNorm` in a candle model's hands (`--features candle`):
//! training forward (`forward_t(x, true)`) and training forward plus backward
//! (`y.backward()`, which seeds `dy` with ones), f32, NCHW, on the report's shapes, both
//! layers called alternately in the same run (median call). Also inference, and ResNet's
//! block ending `relu(bn(x) + residual)`: ours fused (`forward_t_fused`) against candle_nn's
//! batch norm followed by candle's add and ReLU, training forward and forward plus backward
//! (the residual a variable too, so that its gradient is computed). Run:
//!
//! ```sh
//! cargo run --release --features candle --example candle
//! ```
//! `--quick`: shapes C and D only.

#[path = "common/mod.rs"]
mod common;

use batchnorm::candle as ours;
use candle_core::{DType, Device, ModuleT, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use common::{time_pair, Timing};
use std::time::Duration;

const SHAPES: [(&str, &[usize]); 5] = [
    ("A 32x64x56x56", &[32, 64, 56, 56]),
    ("B 32x256x28x28", &[32, 256, 28, 28]),
    ("C 1x512x7x7", &[1, 512, 7, 7]),
    ("D 256x1024", &[256, 1024]),
    ("E 8x32x224x224", &[8, 32, 224, 224]),
];

fn main() -> candle_core::Result<()> {
    let quick = std::env::args().any(|a| a == "--quick");
    let dev = Device::Cpu;
    println!(
        "candle BatchNorm layers, f32, NCHW, {} rayon threads; median call, both called alternately",
        rayon::current_num_threads()
    );
    println!("| shape | op | candle_nn ms | ours ms | ours faster | candle_nn GB/s | ours GB/s |");
    println!("|---|---|---|---|---|---|---|");
    let shapes = if quick { &SHAPES[2..4] } else { &SHAPES[..] };
    for (name, dims) in shapes {
        let c = dims[1];
        let maps = [VarMap::new(), VarMap::new()];
        let vb = |m: &VarMap| VarBuilder::from_varmap(m, DType::F32, &dev);
        let theirs = candle_nn::batch_norm(c, 1e-5, vb(&maps[0]))?;
        let mine = ours::batch_norm(c, 1e-5, vb(&maps[1]))?;
        let x = Var::from_tensor(&Tensor::randn(1f32, 2.0, *dims, &dev)?)?;
        let bytes = x.elem_count() as f64 * 4.0;
        let budget = Duration::from_secs(2);
        // (op, bytes it must move at least: x read and y written; backward also reads dy
        // and x again and writes dx).
        for (op, moved) in [("eval", 2.0), ("train", 2.0), ("train+backward", 5.0)] {
            let run = |layer: &dyn ModuleT| {
                let y = layer.forward_t(x.as_tensor(), op != "eval").unwrap();
                if op == "train+backward" {
                    y.backward().unwrap();
                }
            };
            let (t_mine, t_theirs): (Timing, Timing) =
                time_pair(budget, 5, || run(&mine), || run(&theirs));
            row(name, op, t_theirs, t_mine, bytes * moved);
        }
        let residual = Var::from_tensor(&Tensor::randn(0f32, 1.0, *dims, &dev)?)?;
        // (op, bytes: x and the residual read and y written; backward also reads dy, y and
        // x again and writes dx and the residual's gradient).
        for (op, moved) in [("train+add+relu", 3.0), ("train+add+relu+backward", 8.0)] {
            let backward = |y: Tensor| {
                if op != "train+add+relu" {
                    y.backward().unwrap();
                }
            };
            let r = residual.as_tensor();
            let (t_mine, t_theirs): (Timing, Timing) = time_pair(
                budget,
                5,
                || {
                    backward(
                        mine.forward_t_fused(x.as_tensor(), Some(r), true, true)
                            .unwrap(),
                    )
                },
                || {
                    let y = theirs.forward_t(x.as_tensor(), true).unwrap();
                    backward((y + r).unwrap().relu().unwrap())
                },
            );
            row(name, op, t_theirs, t_mine, bytes * moved);
        }
    }
    Ok(())
}

/// A row of the table: candle_nn's and our median times, their ratio and GB/s.
fn row(name: &str, op: &str, theirs: Timing, mine: Timing, bytes: f64) {
    let ms = |t: Timing| t.median.as_secs_f64() * 1e3;
    println!(
        "| {name} | {op} | {:.3} | {:.3} | {:.2}x | {:.1} | {:.1} |",
        ms(theirs),
        ms(mine),
        ms(theirs) / ms(mine),
        theirs.gbs(bytes),
        mine.gbs(bytes),
    );
}
