//! [`Collective`] over MPI (`mpi` feature), with the `mpi` crate (rsmpi) and the system's MPI
//! (Open MPI or MPICH; building needs libclang for rsmpi's bindings).
//!
//! Both calls gather every rank's vector with `MPI_Allgatherv` (after an `MPI_Allgather` of
//! the lengths) and combine them on each rank in rank order: every rank gets the same bits
//! (an `MPI_Allreduce` need not sum in the same order on every rank), and ranks whose
//! vectors differ in length all get [`LengthMismatch`] instead of a hang. The messages are
//! small (3 numbers per channel forward, 2 backward, per rank), so gathering costs little
//! more than reducing.
//!
//! An error inside MPI itself aborts the program (MPI's default error handler, which rsmpi
//! keeps); what this module returns as an error is the length mismatch.
//!
//! ```no_run
//! use batchnorm::{BatchNorm, Layout, Shape};
//! let universe = mpi::initialize().unwrap();
//! let world = universe.world();
//! let mut bn = BatchNorm::<f32>::new(64);
//! let (x, mut y) = (vec![0.5f32; 2 * 64 * 49], vec![0.0f32; 2 * 64 * 49]);
//! let saved = bn.forward_train_sync(&x, &mut y, Shape::new(2, 64, 49), Layout::Nchw, &world)?;
//! # let _ = saved;
//! # Ok::<(), batchnorm::Error>(())
//! ```

use crate::moments::Moments;
use crate::sync::{Collective, LengthMismatch};
use ::mpi::datatype::PartitionMut;
use ::mpi::topology::SimpleCommunicator;
use ::mpi::traits::*;
use ::mpi::Count;

/// Every rank's `local` in rank order, and each rank's length.
fn all_gather(
    comm: &SimpleCommunicator,
    local: &[f64],
) -> Result<(Vec<f64>, Vec<usize>), LengthMismatch> {
    let ranks = comm.size() as usize;
    let mut lengths = vec![0u64; ranks];
    comm.all_gather_into(&(local.len() as u64), &mut lengths[..]);
    let lengths: Vec<usize> = lengths.into_iter().map(|l| l as usize).collect();
    let counts: Vec<Count> = lengths
        .iter()
        .map(|&l| Count::try_from(l))
        .collect::<Result<_, _>>()
        .map_err(|_| LengthMismatch {
            lengths: lengths.clone(),
        })?;
    let displs: Vec<Count> = counts
        .iter()
        .scan(0 as Count, |at, &n| {
            let d = *at;
            *at = at.saturating_add(n);
            Some(d)
        })
        .collect();
    let mut all = vec![0.0f64; lengths.iter().sum()];
    let mut partition = PartitionMut::new(&mut all[..], counts, displs);
    comm.all_gather_varcount_into(local, &mut partition);
    Ok((all, lengths))
}

impl Collective for SimpleCommunicator {
    type Error = LengthMismatch;

    /// Each `Moments` travels as 3 f64 (the count exactly, below 2^53).
    fn all_gather_moments(&self, local: &[Moments]) -> Result<Vec<Vec<Moments>>, LengthMismatch> {
        let flat: Vec<f64> = local
            .iter()
            .flat_map(|m| [m.count as f64, m.mean, m.m2])
            .collect();
        let (all, lengths) = all_gather(self, &flat)?;
        let mut at = 0;
        Ok(lengths
            .iter()
            .map(|&len| {
                let part = &all[at..at + len];
                at += len;
                part.chunks_exact(3)
                    .map(|m| Moments {
                        count: m[0] as u64,
                        mean: m[1],
                        m2: m[2],
                    })
                    .collect()
            })
            .collect())
    }

    fn all_reduce_sum(&self, values: &mut [f64]) -> Result<(), LengthMismatch> {
        let (all, lengths) = all_gather(self, values)?;
        if lengths.iter().any(|&l| l != values.len()) {
            return Err(LengthMismatch { lengths });
        }
        let len = values.len().max(1);
        for (i, out) in values.iter_mut().enumerate() {
            *out = all.chunks_exact(len).map(|v| v[i]).sum();
        }
        Ok(())
    }
}
