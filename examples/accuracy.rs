//! Measures the worst relative error of the batch variance against a float64 two-pass
//! reference, for offset/std ratios 1 to 1e6 and counts 1e3 to 1e7, for this crate beside a
//! naive single-pass f32 `E[x²] - E[x]²` and an f32 two-pass; and the largest output error of
//! training's forward pass, `|y - y_ref| / (1 + |y_ref|)`, in both layouts; the error of
//! inference and of the folded form; and, for `f16` and `bf16` tensors, how many outputs of
//! training, inference and backward are the correctly rounded reference, one unit in the last
//! place from it, or further. The accuracy tables of docs/ACCURACY.md are this program's output.
//!
//! `cargo run --release --example accuracy [-- --quick]`

use batchnorm::half::{bf16, f16};
use batchnorm::{oracle, BatchNorm, Data, Layout, Shape};

/// xorshift64*: uniform in [-1, 1).
struct Rng(u64);
impl Rng {
    fn signed(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 52) as f64 - 1.0
    }
}

/// `count` f32 values with mean `ratio` and standard deviation 1.
fn data(count: usize, ratio: f64, seed: u64) -> Vec<f32> {
    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    (0..count)
        .map(|_| (ratio + 3f64.sqrt() * rng.signed()) as f32)
        .collect()
}

fn naive_f32(x: &[f32]) -> f64 {
    let n = x.len() as f32;
    let (s, ss) = x
        .iter()
        .fold((0f32, 0f32), |(s, ss), &v| (s + v, ss + v * v));
    ((ss / n) - (s / n) * (s / n)) as f64
}

fn two_pass_f32(x: &[f32]) -> f64 {
    let n = x.len() as f32;
    let m = x.iter().sum::<f32>() / n;
    (x.iter().map(|&v| (v - m) * (v - m)).sum::<f32>() / n) as f64
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let counts: &[usize] = if quick {
        &[1_000, 100_000]
    } else {
        &[1_000, 10_000, 100_000, 1_000_000, 10_000_000]
    };
    let ratios = [1.0, 1e2, 1e4, 1e6];
    let seeds = 3;
    println!("Worst relative error of the batch variance over {seeds} seeds (f32 data, std 1):\n");
    println!("| offset/std | count | batchnorm | naive f32 `E[x²]-E[x]²` | f32 two-pass |");
    println!("|---|---|---|---|---|");
    for &ratio in &ratios {
        for &count in counts {
            let mut worst = [0.0f64; 3];
            for seed in 0..seeds {
                let x = data(count, ratio, seed + 1);
                let shape = Shape::new(1, 1, count);
                let reference = oracle::mean_var(&x, shape, Layout::Nchw)[0].1;
                let ours = batchnorm::moments(&x, shape, Layout::Nchw).unwrap()[0].variance();
                for (w, v) in worst
                    .iter_mut()
                    .zip([ours, naive_f32(&x), two_pass_f32(&x)])
                {
                    *w = w.max((v - reference).abs() / reference);
                }
            }
            println!(
                "| {ratio:.0e} | {count:.0e} | {:.1e} | {:.1e} | {:.1e} |",
                worst[0], worst[1], worst[2]
            );
        }
    }
    println!("\nLargest output error of forward_train, |y - y_ref| / (1 + |y_ref|), 8 x 16 x 4096 values:\n");
    println!("| offset/std | NCHW | NHWC |");
    println!("|---|---|---|");
    let shape = Shape::new(8, 16, 4096);
    for &ratio in &ratios {
        let mut row = Vec::new();
        for layout in [Layout::Nchw, Layout::Nhwc] {
            let x = data(shape.numel().unwrap(), ratio, 7);
            let mut bn = BatchNorm::<f32>::new(shape.c);
            let want = oracle::forward_train(&bn, &x, shape, layout).y;
            let mut y = vec![0.0f32; x.len()];
            bn.forward_train(&x, &mut y, shape, layout).unwrap();
            let err = y
                .iter()
                .zip(&want)
                .map(|(&g, &w)| (g as f64 - w).abs() / (1.0 + w.abs()))
                .fold(0.0, f64::max);
            row.push(format!("{err:.1e}"));
        }
        println!("| {ratio:.0e} | {} | {} |", row[0], row[1]);
    }

    println!(
        "\nLargest output error of inference, |y - y_ref| / (1 + |y_ref|), 8 x 16 x 4096 values \
         whose running statistics are their own (outputs of order 1): forward_eval, and the \
         folded form engines use (scale_shift, then apply_scale_shift):\n"
    );
    println!("| offset/std | forward_eval | folded: y = x * scale + shift |");
    println!("|---|---|---|");
    for &ratio in &[1.0, 1e2, 1e4, 1e5, 1e6, 1e7] {
        let layout = Layout::Nchw;
        let x = data(shape.numel().unwrap(), ratio, 9);
        let mut bn = BatchNorm::<f32>::new(shape.c);
        for (c, (mean, var)) in oracle::mean_var(&x, shape, layout).into_iter().enumerate() {
            bn.running_mean[c] = mean as f32;
            bn.running_var[c] = var as f32;
        }
        let want = oracle::forward_eval(&bn, &x, shape, layout);
        let err = |y: &[f32]| {
            y.iter()
                .zip(&want)
                .map(|(&g, &w)| (g as f64 - w).abs() / (1.0 + w.abs()))
                .fold(0.0, f64::max)
        };
        let mut y = vec![0.0f32; x.len()];
        bn.forward_eval(&x, &mut y, shape, layout).unwrap();
        let eval = err(&y);
        let (scale, shift) = bn.scale_shift().unwrap();
        batchnorm::apply_scale_shift(&x, &mut y, &scale, &shift, shape, layout).unwrap();
        println!("| {ratio:.0e} | {eval:.1e} | {:.1e} |", err(&y));
    }
    half_table::<f16>("f16", |v| v.to_bits(), quick);
    half_table::<bf16>("bf16", |v| v.to_bits(), quick);
}

/// Units in the last place between two 16-bit values (`bits` their encodings), NaN as far.
fn ulps(a: u16, b: u16) -> u32 {
    let ordered = |b: u16| {
        let b = b as i32;
        if b & 0x8000 != 0 {
            -(b & 0x7fff)
        } else {
            b
        }
    };
    (ordered(a) - ordered(b)).unsigned_abs()
}

/// For 16-bit tensors of 8 x 16 x 4096 values (`f32` layer), the share of outputs that are the
/// correctly rounded `f64` reference, that are one unit in the last place from it, and the
/// largest distance in units, for training, inference and backward, both layouts, with
/// outputs of order 1 (weight 1.5, bias 0.25, so that some outputs cancel).
fn half_table<D: Data<Param = f32>>(name: &str, bits: fn(D) -> u16, quick: bool) {
    let shape = Shape::new(8, 16, if quick { 512 } else { 4096 });
    println!(
        "\n{name} tensors, {} values: share of outputs correctly rounded / one unit in the last \
         place off / largest distance in units, against the f64 reference of the same {name} \
         inputs rounded once:\n",
        shape.numel().unwrap()
    );
    println!("| offset/std | layout | forward_train | forward_eval | backward dx |");
    println!("|---|---|---|---|---|");
    let ratios: &[f64] = if name == "f16" {
        &[0.0, 10.0, 100.0]
    } else {
        &[0.0, 10.0, 1e3]
    };
    for &ratio in ratios {
        for layout in [Layout::Nchw, Layout::Nhwc] {
            let x: Vec<D> = data(shape.numel().unwrap(), ratio, 11)
                .into_iter()
                .map(|v| D::from_f64(v as f64))
                .collect();
            let dy: Vec<D> = data(x.len(), 0.0, 12)
                .into_iter()
                .map(|v| D::from_f64(v as f64))
                .collect();
            let mut bn = BatchNorm::<f32>::new(shape.c);
            bn.weight.fill(1.5);
            bn.bias.fill(0.25);
            for (c, (mean, var)) in oracle::mean_var(&x, shape, layout).into_iter().enumerate() {
                bn.running_mean[c] = mean as f32;
                bn.running_var[c] = var as f32;
            }
            let summary = |got: &[D], want: &[f64]| {
                let (mut exact, mut one, mut worst) = (0usize, 0usize, 0u32);
                for (&g, &w) in got.iter().zip(want) {
                    let d = ulps(bits(g), bits(D::from_f64(w)));
                    exact += (d == 0) as usize;
                    one += (d == 1) as usize;
                    worst = worst.max(d);
                }
                let pct = |k: usize| 100.0 * k as f64 / got.len() as f64;
                format!("{:.2}% / {:.2}% / {worst}", pct(exact), pct(one))
            };
            let mut y = vec![D::default(); x.len()];
            let saved = bn.clone().forward_train(&x, &mut y, shape, layout).unwrap();
            let train = summary(&y, &oracle::forward_train(&bn, &x, shape, layout).y);
            bn.forward_eval(&x, &mut y, shape, layout).unwrap();
            let eval = summary(&y, &oracle::forward_eval(&bn, &x, shape, layout));
            bn.backward(&x, &dy, &saved, &mut y, shape, layout).unwrap();
            let back = summary(
                &y,
                &oracle::backward(&bn, &x, &dy, &saved, shape, layout).dx,
            );
            println!("| {ratio:.0e} | {layout:?} | {train} | {eval} | {back} |");
        }
    }
}
