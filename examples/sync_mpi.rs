//! Synchronized batch norm over MPI (`--features mpi`): each rank trains its slice of a batch
//! with `forward_train_sync` and `backward_sync`, and checks its slice's outputs and
//! gradients, and the statistics, against one process's call on the whole batch (every rank
//! builds the same batch); rank 0 also checks that every rank got the same statistics and
//! parameter gradients, bit for bit. Slices are uneven: rank r holds r % 3 images, so rank 0
//! holds none (unless it is alone).
//!
//! ```sh
//! cargo build --release --features mpi --example sync_mpi
//! mpirun -n 4 target/release/examples/sync_mpi            # as root: --allow-run-as-root
//! mpirun -n 4 target/release/examples/sync_mpi --bench    # the collectives' cost
//! ```
//! `--bench`: ResNet-50's batch-norm shapes at 8 images per rank, one thread per rank: the
//! median time of the synchronized calls against the plain calls on the same slice.

#[path = "common/mod.rs"]
mod common;

use batchnorm::{BatchNorm, Layout, SavedStats, Shape};
use common::{grad, input, RESNET50};
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;
use std::time::{Duration, Instant};

fn main() {
    let universe = mpi::initialize().expect("MPI");
    let world = universe.world();
    let bench = std::env::args().any(|a| a == "--bench");
    let failures = if bench {
        run_bench(&world)
    } else {
        check(&world)
    };
    let mut total = 0u64;
    world.all_reduce_into(
        &failures,
        &mut total,
        mpi::collective::SystemOperation::sum(),
    );
    if world.rank() == 0 {
        if total == 0 {
            println!("sync_mpi: {} ranks, all checks passed", world.size());
        } else {
            println!("sync_mpi: {total} checks failed");
        }
    }
    if total != 0 {
        std::process::exit(1);
    }
}

/// |got - want| <= tol * (1 + |want|), counted and reported when not.
fn close(failures: &mut u64, what: &str, got: f32, want: f32, tol: f32) {
    // NaN fails too.
    let within = (got - want).abs() <= tol * (1.0 + want.abs());
    if !within {
        if *failures < 5 {
            eprintln!("{what}: {got} vs {want}");
        }
        *failures += 1;
    }
}

fn check(world: &SimpleCommunicator) -> u64 {
    let (rank, ranks) = (world.rank() as usize, world.size() as usize);
    let mut slices: Vec<usize> = (0..ranks).map(|r| r % 3).collect();
    if ranks == 1 {
        slices[0] = 2;
    }
    let n: usize = slices.iter().sum();
    let first: usize = slices[..rank].iter().sum();
    let mut failures = 0;
    for layout in [Layout::Nchw, Layout::Nhwc] {
        let (c, s) = (24, 7 * 7);
        let shape = Shape::new(n, c, s);
        let (x, dy) = (input(n * c * s, c), grad(n * c * s));
        let mut bn = BatchNorm::<f32>::new(c);
        bn.weight = (0..c).map(|i| 1.0 + 0.1 * i as f32).collect();
        // One process on the whole batch.
        let mut whole = bn.clone();
        let mut want_y = vec![0.0; x.len()];
        let want_saved = whole
            .forward_train(&x, &mut want_y, shape, layout)
            .expect("whole");
        let mut want_dx = vec![0.0; x.len()];
        let want_g = whole
            .backward(&x, &dy, &want_saved, &mut want_dx, shape, layout)
            .expect("whole backward");
        // This rank's slice, synchronized.
        let range = first * c * s..(first + slices[rank]) * c * s;
        let local = Shape::new(slices[rank], c, s);
        let (x, dy) = (&x[range.clone()], &dy[range.clone()]);
        let mut y = vec![0.0; x.len()];
        let saved = bn
            .forward_train_sync(x, &mut y, local, layout, world)
            .expect("forward_train_sync");
        let mut dx = vec![0.0; x.len()];
        let g = bn
            .backward_sync(x, dy, &saved, &mut dx, local, layout, world)
            .expect("backward_sync");
        let f = &mut failures;
        for (k, i) in range.enumerate() {
            close(f, &format!("y[{i}]"), y[k], want_y[i], 1e-5);
            close(f, &format!("dx[{i}]"), dx[k], want_dx[i], 1e-4);
        }
        for ch in 0..c {
            close(f, "mean", saved.mean[ch], want_saved.mean[ch], 1e-5);
            close(f, "invstd", saved.invstd[ch], want_saved.invstd[ch], 2e-5);
            close(
                f,
                "running mean",
                bn.running_mean[ch],
                whole.running_mean[ch],
                1e-5,
            );
            close(
                f,
                "running var",
                bn.running_var[ch],
                whole.running_var[ch],
                2e-5,
            );
            close(f, "dweight", g.weight[ch], want_g.weight[ch], 1e-4);
            close(f, "dbias", g.bias[ch], want_g.bias[ch], 1e-4);
        }
        // The same bits on every rank.
        failures += differs_across_ranks(world, &saved, &g.weight, &g.bias);
    }
    failures
}

/// How many of the statistics' and gradients' bits differ from rank 0's (on rank 0).
fn differs_across_ranks(
    world: &SimpleCommunicator,
    saved: &SavedStats<f32>,
    dweight: &[f32],
    dbias: &[f32],
) -> u64 {
    let mine: Vec<u32> = [&saved.mean[..], &saved.invstd, dweight, dbias]
        .concat()
        .iter()
        .map(|v| v.to_bits())
        .collect();
    let mut all = vec![0u32; mine.len() * world.size() as usize];
    world.all_gather_into(&mine[..], &mut all[..]);
    if world.rank() != 0 {
        return 0;
    }
    let differing = all
        .chunks_exact(mine.len().max(1))
        .filter(|other| *other != &mine[..])
        .count() as u64;
    if differing > 0 {
        eprintln!("{differing} ranks got other statistics or gradients than rank 0");
    }
    differing
}

/// Median time of `f` over `runs` calls, after one warm-up call; every rank calls together.
fn median(world: &SimpleCommunicator, runs: usize, mut f: impl FnMut()) -> Duration {
    f();
    let mut t: Vec<Duration> = (0..runs)
        .map(|_| {
            world.barrier();
            let start = Instant::now();
            f();
            start.elapsed()
        })
        .collect();
    t.sort();
    t[runs / 2]
}

fn run_bench(world: &SimpleCommunicator) -> u64 {
    let per_rank = 8;
    if world.rank() == 0 {
        println!(
            "{} ranks x {per_rank} images, NCHW f32, one thread each; median of 15 (us)",
            world.size()
        );
        println!("| layer | train | train_sync | backward | backward_sync |");
        println!("|---|---|---|---|---|");
    }
    for &(c, hw, _) in &RESNET50 {
        let shape = Shape::new(per_rank, c, hw * hw);
        let len = shape.numel().expect("size");
        let (x, dy) = (input(len, c), grad(len));
        let (mut y, mut dx) = (vec![0.0; len], vec![0.0; len]);
        let mut bn = BatchNorm::<f32>::new(c);
        let layout = Layout::Nchw;
        let saved = bn.forward_train(&x, &mut y, shape, layout).expect("train");
        let us = |d: Duration| d.as_secs_f64() * 1e6;
        let plain = median(world, 15, || {
            bn.forward_train(&x, &mut y, shape, layout).expect("train");
        });
        let sync = median(world, 15, || {
            bn.forward_train_sync(&x, &mut y, shape, layout, world)
                .expect("sync");
        });
        let back = median(world, 15, || {
            bn.backward(&x, &dy, &saved, &mut dx, shape, layout)
                .expect("backward");
        });
        let back_sync = median(world, 15, || {
            bn.backward_sync(&x, &dy, &saved, &mut dx, shape, layout, world)
                .expect("backward_sync");
        });
        if world.rank() == 0 {
            println!(
                "| {per_rank}x{c}x{hw}x{hw} | {:.0} | {:.0} | {:.0} | {:.0} |",
                us(plain),
                us(sync),
                us(back),
                us(back_sync)
            );
        }
    }
    0
}
