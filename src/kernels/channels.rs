//! Whole channels that fit in L1, laid end to end (NCHW with batch 1, the shape inference and
//! small-batch training see most): reduce, finish and map in one call, a group of channels at
//! a time.
//!
//! The general fused path pays per channel for a kernel entry, its gathering of the channel's
//! runs, and a chain of dependent `f64` divisions and square roots between the reduction and
//! the map; for a 7x7 channel (49 values) that costs more than the arithmetic on the data. Here
//! one entry covers every channel of a span, and each group of channels (at most
//! [`GROUP`], together at most one statistics block) runs in three loops: the reductions of all
//! its channels, then their parameters (independent iterations, so the divisions of one
//! channel overlap those of the next), then the maps, the group's data still in L1.

use super::backward::{grad_sums_runs, BackAffine, GradSums};
use super::buffers::{Buffers, Grad};
use super::lanes::Lanes;
use super::normalize::{normalize_run, Affine};
use super::stats::{block_len, moments_each, moments_runs};
use crate::moments::Moments;

/// Channels per group: the parameters of a group live on the stack.
const GROUP: usize = 64;

/// Channels per group for channels of `s` values: as many as fit in one statistics block.
#[inline(always)]
fn group_len<L: Lanes>(s: usize) -> usize {
    (block_len::<L>() / s.max(1)).clamp(1, GROUP)
}

/// Training's forward pass over the whole channels of `s` values that make up `buf`, the
/// first being channel `first`: `out[j]` gets channel `first + j`'s moments, and the channel
/// is normalized with `finish(first + j, &out[j])`.
#[inline(always)]
pub(crate) fn train_channels<L: Lanes, B: Buffers<L::Elem>>(
    buf: &mut B,
    s: usize,
    first: usize,
    finish: &impl Fn(usize, &Moments) -> Affine<L::Elem>,
    out: &mut [Moments],
) {
    let group = group_len::<L>(s);
    let mut params = [Affine::default(); GROUP];
    for (g, moments) in out.chunks_mut(group).enumerate() {
        let at = g * group;
        let x = &buf.input()[at * s..][..moments.len() * s];
        if s <= block_len::<L>() {
            moments_each::<L>(x, s, moments);
        } else {
            for (m, run) in moments.iter_mut().zip(x.chunks_exact(s)) {
                *m = moments_runs::<L>(1, s, |_| run);
            }
        }
        for (j, (p, m)) in params.iter_mut().zip(moments.iter()).enumerate() {
            *p = finish(first + at + j, m);
        }
        for (j, p) in params[..moments.len()].iter().enumerate() {
            normalize_run::<L, B>(buf, (at + j) * s, s, p);
        }
    }
    if buf.streaming() {
        super::store_fence();
    }
}

/// The backward pass over the whole channels of `s` values that make up `g`, the first being
/// channel `first`: `out[j]` gets channel `first + j`'s sums around `center(first + j)`, and
/// its `dx` is written with `finish(first + j, out[j])`.
#[inline(always)]
pub(crate) fn backward_channels<L: Lanes>(
    g: &mut Grad<'_, L::Elem>,
    s: usize,
    first: usize,
    center: &impl Fn(usize) -> L::Elem,
    finish: &impl Fn(usize, GradSums) -> BackAffine<L::Elem>,
    out: &mut [GradSums],
) {
    let group = group_len::<L>(s);
    let mut params = [BackAffine::default(); GROUP];
    for (gi, sums) in out.chunks_mut(group).enumerate() {
        let at = gi * group;
        for (j, o) in sums.iter_mut().enumerate() {
            let i = (at + j) * s;
            let (x, dy) = (&g.x[i..i + s], &g.dy[i..i + s]);
            *o = grad_sums_runs::<L>(1, s, |_| (x, dy), center(first + at + j));
        }
        for (j, (p, o)) in params.iter_mut().zip(sums.iter()).enumerate() {
            *p = finish(first + at + j, *o);
        }
        for (j, p) in params[..sums.len()].iter().enumerate() {
            super::backward::backward_run::<L>(g, (at + j) * s, s, p);
        }
    }
    if g.stream {
        super::store_fence();
    }
}
