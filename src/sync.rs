//! Synchronized batch norm: the statistics of a batch split over workers (data-parallel
//! training), exact.
//!
//! Each worker computes its slice's per-channel moments (count, mean, M2); the moments of all
//! workers are gathered and merged with Chan's formula in rank order, so every worker gets the
//! whole batch's statistics, bit for bit the same on each, as exact as one call on the
//! concatenated batch. (PyTorch's `SyncBatchNorm` gathers means and inverse standard
//! deviations and recovers the variance from them, on CUDA only.) The backward pass
//! all-reduces the per-channel sums `Σ dy` and `Σ dy·(x - mean)` with the values' count.
//!
//! What crosses between workers: forward, 3 numbers per channel per worker (gathered), with a
//! header of 3; backward, 2 per channel (summed), with a header of 2.
//!
//! Bad input on one worker: every worker takes part in the first (and, in the backward pass,
//! only) collective call whatever its input, with a status in the header; a worker whose
//! input is refused returns its own error, and every other worker [`Error::Peer`], all with
//! their layers untouched. No worker is left waiting. The workers' layers must agree on the
//! channel count: [`LocalGroup`] reports a disagreement as an error on every worker; over MPI
//! the message sizes then differ, which MPI does not allow.

use crate::element::{Data, Element};
use crate::error::{check_len, CollectiveError, Error};
use crate::exec;
use crate::kernels::backward::{fill_back, GradSums};
use crate::kernels::buffers::{Grad, Split};
use crate::kernels::normalize::{fill_affine, Affine};
use crate::layer::{gradients, BatchNorm, Gradients, SavedStats};
use crate::moments::Moments;
use crate::shape::{Layout, Shape};
use std::sync::{Arc, Barrier, Mutex};

/// Turns this worker's per-channel values into the values of all workers: what synchronized
/// batch norm needs from a communication library. Every worker must make the same calls in
/// the same order.
pub trait Collective {
    /// Why a collective call failed.
    type Error: std::error::Error + Send + Sync + 'static;
    /// All workers' `local` moments, each worker's vector in rank order, to every worker.
    fn all_gather_moments(&self, local: &[Moments]) -> Result<Vec<Vec<Moments>>, Self::Error>;
    /// Element-wise sum over all workers, in place, identical on every worker.
    fn all_reduce_sum(&self, values: &mut [f64]) -> Result<(), Self::Error>;
}

/// A worker's tensors for [`BatchNorm::forward_train_sync`] (x, y, shape, layout), or why its
/// caller refused them before the call.
pub(crate) type TrainTensors<'a, D> = Result<(&'a [D], &'a mut [D], Shape, Layout), Error>;

/// A worker's tensors for [`BatchNorm::backward_sync`] (x, dy, dx, shape, layout), or why its
/// caller refused them before the call.
pub(crate) type BackTensors<'a, D> = Result<(&'a [D], &'a [D], &'a mut [D], Shape, Layout), Error>;

impl<T: Element> BatchNorm<T> {
    /// [`forward_train`](Self::forward_train) of this worker's slice `x` of a batch split
    /// over the workers of `comm` (along N; a worker may hold none, `n = 0`): the statistics
    /// are the whole batch's, merged from every worker's moments in rank order (identical on
    /// every worker); `y` is this slice normalized with them; the running statistics move
    /// with the whole batch (the unbiased variance with its count). See the
    /// [module](crate::sync) for what crosses and how errors stay local.
    pub fn forward_train_sync<D: Data<Param = T>, C: Collective>(
        &mut self,
        x: &[D],
        y: &mut [D],
        shape: Shape,
        layout: Layout,
        comm: &C,
    ) -> Result<SavedStats<T>, Error> {
        self.forward_train_sync_of(Ok((x, y, shape, layout)), comm)
    }

    /// [`forward_train_sync`](Self::forward_train_sync) of `tensors` (x, y, shape, layout),
    /// or of nothing when the caller already refused them (the error is this worker's part
    /// in the collective call, then its result).
    pub(crate) fn forward_train_sync_of<D: Data<Param = T>, C: Collective>(
        &mut self,
        tensors: TrainTensors<'_, D>,
        comm: &C,
    ) -> Result<SavedStats<T>, Error> {
        let c = self.channels();
        let local = tensors.and_then(|(x, y, shape, layout)| {
            self.check_train(shape, x.len())?;
            check_len("y", x.len(), y.len())?;
            Ok((x, y, shape, layout))
        });
        // A header as a first "channel": count = 1 if this worker's input was refused, mean =
        // its channel count, m2 = its values per channel (exact in f64 up to 2^53).
        let mut message = vec![Moments {
            count: local.is_err() as u64,
            mean: c as f64,
            m2: local.as_ref().map_or(0.0, |t| t.2.per_channel() as f64),
        }];
        match &local {
            Ok((x, _, shape, layout)) => message.extend(exec::moments(x, *shape, *layout)),
            Err(_) => message.resize(c + 1, Moments::default()),
        }
        let all = comm
            .all_gather_moments(&message)
            .map_err(CollectiveError::of)?;
        let (x, y, shape, layout) = local?;
        let mut count = 0.0;
        for (rank, m) in all.iter().enumerate() {
            if m.len() != c + 1 || m[0].count != 0 || m[0].mean != c as f64 {
                return Err(Error::Peer { rank: Some(rank) });
            }
            count += m[0].m2;
        }
        if count < 2.0 {
            return Err(Error::TooFewValues {
                per_channel: count as usize,
            });
        }
        let merged: Vec<Moments> = (1..=c)
            .map(|ch| {
                all.iter()
                    .fold(Moments::default(), |acc, m| acc.merge(m[ch]))
            })
            .collect();
        let (weight, bias, eps) = (&self.weight, &self.bias, self.eps);
        let inv_count = 1.0 / count;
        let invstd = move |m: &Moments| 1.0 / (m.m2 * inv_count + eps).sqrt();
        T::with_scratch(|storage| {
            let params = fill_affine(storage, c, |ch| {
                let m = &merged[ch];
                Affine::centered(m.mean, weight[ch].to_f64() * invstd(m), bias[ch].to_f64())
            });
            exec::apply(Split::new(x, y), shape, layout, &params);
        });
        let running_var_of_m2 = if self.unbiased_running_var {
            1.0 / (count - 1.0)
        } else {
            inv_count
        };
        Ok(self.update_running(&merged, running_var_of_m2, invstd))
    }

    /// [`backward`](Self::backward) of [`forward_train_sync`](Self::forward_train_sync):
    /// this worker's `dx` from its `x` and `dy` and the `saved` statistics that call returned;
    /// the per-channel sums `Σ dy` and `Σ dy·(x - mean)` and the count are summed over all
    /// workers, so the returned parameter gradients are the whole batch's (identical on every
    /// worker).
    #[allow(clippy::too_many_arguments)]
    pub fn backward_sync<D: Data<Param = T>, C: Collective>(
        &self,
        x: &[D],
        dy: &[D],
        saved: &SavedStats<T>,
        dx: &mut [D],
        shape: Shape,
        layout: Layout,
        comm: &C,
    ) -> Result<Gradients<T>, Error> {
        self.backward_sync_of(Ok((x, dy, dx, shape, layout)), saved, comm)
    }

    /// [`backward_sync`](Self::backward_sync) of `tensors` (x, dy, dx, shape, layout), or of
    /// nothing when the caller already refused them (as
    /// [`forward_train_sync_of`](Self::forward_train_sync_of)).
    pub(crate) fn backward_sync_of<D: Data<Param = T>, C: Collective>(
        &self,
        tensors: BackTensors<'_, D>,
        saved: &SavedStats<T>,
        comm: &C,
    ) -> Result<Gradients<T>, Error> {
        let c = self.channels();
        let mut local = tensors.and_then(|(x, dy, dx, shape, layout)| {
            self.check_backward(x, dy, dx, shape)?;
            check_len("saved.mean", c, saved.mean.len())?;
            check_len("saved.invstd", c, saved.invstd.len())?;
            Ok((x, dy, dx, shape, layout))
        });
        // [refused workers, values per channel, Σ dy per channel, Σ dy·(x - mean) per channel]
        let mut values = vec![0.0; 2 + 2 * c];
        values[0] = local.is_err() as u8 as f64;
        if let Ok((x, dy, dx, shape, layout)) = &mut local {
            values[1] = shape.per_channel() as f64;
            let g = Grad::new(x, dy, &[], dx);
            let sums = exec::grad_sums(&g, *shape, *layout, &saved.mean);
            for (ch, s) in sums.iter().enumerate() {
                (values[2 + ch], values[2 + c + ch]) = (s.dy, s.dy_xc);
            }
        }
        comm.all_reduce_sum(&mut values)
            .map_err(CollectiveError::of)?;
        let (x, dy, dx, shape, layout) = local?;
        if values[0] != 0.0 {
            return Err(Error::Peer { rank: None });
        }
        let m = values[1];
        let sums: Vec<_> = (0..c)
            .map(|ch| GradSums {
                dy: values[2 + ch],
                dy_xc: values[2 + c + ch],
            })
            .collect();
        let invstd = |ch: usize| saved.invstd[ch].to_f64();
        let mut storage = Vec::new();
        let p = fill_back(&mut storage, c, |ch| {
            self.batch_back_affine(ch, saved, sums[ch], m)
        });
        exec::backward_map(Grad::new(x, dy, &[], dx), shape, layout, &p);
        Ok(gradients(&sums, invstd))
    }
}

/// An in-process [`Collective`] over threads: [`LocalGroup::new`] gives one handle per
/// worker; each worker thread calls with its own handle. For tests anywhere and for
/// data-parallel training on one machine without processes. Results are combined in rank
/// order, so every worker gets the same bits.
///
/// A worker that stops calling (returns early, panics) leaves the others waiting at the next
/// call: the workers must make the same calls, as with any collective.
#[derive(Debug)]
pub struct LocalGroup {
    rank: usize,
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    barrier: Barrier,
    moments: Mutex<Vec<Vec<Moments>>>,
    sums: Mutex<Vec<Vec<f64>>>,
}

/// Why a [`LocalGroup`] call failed: the workers sent vectors of different lengths.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LengthMismatch {
    /// Each worker's length, in rank order.
    pub lengths: Vec<usize>,
}

impl std::fmt::Display for LengthMismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the workers sent vectors of lengths {:?}", self.lengths)
    }
}

impl std::error::Error for LengthMismatch {}

impl LocalGroup {
    /// One handle per worker, ranks `0..workers` in order (`Send`: move each to its thread).
    pub fn new(workers: usize) -> Vec<LocalGroup> {
        let shared = Arc::new(Shared {
            barrier: Barrier::new(workers),
            moments: Mutex::new(vec![Vec::new(); workers]),
            sums: Mutex::new(vec![Vec::new(); workers]),
        });
        (0..workers)
            .map(|rank| LocalGroup {
                rank,
                shared: shared.clone(),
            })
            .collect()
    }

    /// This handle's rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Number of workers.
    pub fn workers(&self) -> usize {
        lock(&self.shared.sums).len()
    }

    /// Puts `local` in this worker's slot, waits for all, reads every slot with `read`, and
    /// waits again (so that no slot is overwritten before everyone has read).
    fn exchange<V: Clone, R>(
        &self,
        slots: &Mutex<Vec<V>>,
        local: V,
        read: impl FnOnce(&[V]) -> R,
    ) -> R {
        lock(slots)[self.rank] = local;
        self.shared.barrier.wait();
        let result = read(&lock(slots));
        self.shared.barrier.wait();
        result
    }
}

/// The mutex's value: a worker that panicked holding it wrote its slot whole or not at all.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Collective for LocalGroup {
    type Error = LengthMismatch;

    fn all_gather_moments(&self, local: &[Moments]) -> Result<Vec<Vec<Moments>>, LengthMismatch> {
        Ok(self.exchange(&self.shared.moments, local.to_vec(), |all| all.to_vec()))
    }

    fn all_reduce_sum(&self, values: &mut [f64]) -> Result<(), LengthMismatch> {
        self.exchange(&self.shared.sums, values.to_vec(), |all| {
            if all.iter().any(|v| v.len() != values.len()) {
                return Err(LengthMismatch {
                    lengths: all.iter().map(Vec::len).collect(),
                });
            }
            for (i, out) in values.iter_mut().enumerate() {
                *out = all.iter().map(|v| v[i]).sum();
            }
            Ok(())
        })
    }
}
