//! Training and backward over NCHW a group of channels at a time, fused: a task owns some
//! consecutive channels, reduces them, computes their parameters, and maps them while their
//! data is still in cache (the group is sized for that by the caller).
//!
//! A group's data is `n` spans, one per image, each holding the group's runs of `s` values
//! side by side. Reading and writing them span by span keeps memory access in long
//! sequential stretches, where a channel-by-channel order would jump between runs of a few
//! KiB each (7x7 to 28x28 activations) and defeat the prefetchers.
//!
//! The per-channel work is arranged to overlap: one kernel entry for the whole group, the
//! reductions of all its channels first, then their parameters (independent iterations, so
//! the divisions and square roots of one channel overlap those of the next), then the maps.
//! With one image, channels that fit in L1 go in sub-groups of one statistics block.

use super::backward::{grad_sums_runs, BackAffine, GradSums};
use super::buffers::{Buffers, Grad};
use super::lanes::Lanes;
use super::normalize::{normalize_group, Affine};
use super::stats::{block_len, moments_each, moments_runs};
use crate::moments::Moments;
use std::mem::size_of;

/// The most channels in a group: their parameters live on the stack.
pub(crate) const GROUP: usize = 64;

/// Runs at least this long, in groups of several channels, are reduced span by span (one
/// statistics block per run, merged); shorter ones, or a channel alone, channel by channel,
/// several runs of a channel to a block.
const SPAN_ORDER_BYTES: usize = 2048;

/// The span of image `i` (every slot is filled by the caller).
#[inline(always)]
fn span<B>(spans: &mut [Option<B>], i: usize) -> &mut B {
    spans[i]
        .as_mut()
        .expect("every image's span of a channel group")
}

/// Channels per L1 sub-group for channels of `s` values.
#[inline(always)]
fn sub_group<L: Lanes>(s: usize) -> usize {
    (block_len::<L>() / s.max(1)).clamp(1, GROUP)
}

/// Training's forward pass over a group of `out.len() <= GROUP` channels of `s` values per
/// image, the first being channel `first`, in `spans` (one per image): `out[j]` gets channel
/// `first + j`'s moments, and the channel is normalized with `finish(first + j, &out[j])`.
#[inline(always)]
pub(crate) fn train_channels<L: Lanes, B: Buffers<L::Elem>>(
    spans: &mut [Option<B>],
    s: usize,
    first: usize,
    finish: &impl Fn(usize, &Moments) -> Affine<L::Elem>,
    out: &mut [Moments],
) {
    let mut params = [Affine::default(); GROUP];
    if spans.len() == 1 {
        // One image: sub-groups that fit in L1, each reduced, finished and mapped in turn.
        let buf = span(spans, 0);
        let sub = sub_group::<L>(s);
        for (g, moments) in out.chunks_mut(sub).enumerate() {
            let at = g * sub;
            moments_each::<L>(&buf.input()[at * s..][..moments.len() * s], s, moments);
            for (j, (p, m)) in params.iter_mut().zip(moments.iter()).enumerate() {
                *p = finish(first + at + j, m);
            }
            normalize_group::<L, B>(buf, at * s, s, &params[..moments.len()]);
        }
    } else {
        if out.len() > 1 && s * size_of::<L::Elem>() >= SPAN_ORDER_BYTES {
            let mut part = [Moments::EMPTY; GROUP];
            out.fill(Moments::EMPTY);
            for i in 0..spans.len() {
                let x = span(spans, i).input();
                let part = &mut part[..out.len()];
                moments_each::<L>(x, s, part);
                for (o, m) in out.iter_mut().zip(part.iter()) {
                    *o = o.merge(*m);
                }
            }
        } else {
            let n = spans.len();
            for (j, o) in out.iter_mut().enumerate() {
                let run = |i: usize| {
                    let x = spans[i].as_ref().expect("every image's span").input();
                    &x[j * s..][..s]
                };
                *o = moments_runs::<L>(n, s, run);
            }
        }
        for (j, (p, m)) in params.iter_mut().zip(out.iter()).enumerate() {
            *p = finish(first + j, m);
        }
        for i in 0..spans.len() {
            normalize_group::<L, B>(span(spans, i), 0, s, &params[..out.len()]);
        }
    }
    if spans
        .iter()
        .any(|b| b.as_ref().is_some_and(|b| b.streaming()))
    {
        super::store_fence();
    }
}

/// The backward pass over a group of `out.len() <= GROUP` channels of `s` values per image,
/// the first being channel `first`, in `spans` (one per image): `out[j]` gets channel
/// `first + j`'s sums around `center(first + j)`, and its `dx` is written with
/// `finish(first + j, out[j])`.
#[inline(always)]
pub(crate) fn backward_channels<L: Lanes>(
    spans: &mut [Option<Grad<'_, L::Elem>>],
    s: usize,
    first: usize,
    center: &impl Fn(usize) -> L::Elem,
    finish: &impl Fn(usize, GradSums) -> BackAffine<L::Elem>,
    out: &mut [GradSums],
) {
    let mut params = [BackAffine::default(); GROUP];
    let mut centers = [L::Elem::default(); GROUP];
    for (j, c) in centers[..out.len()].iter_mut().enumerate() {
        *c = center(first + j);
    }
    // One image: sub-groups that fit in L1; more: the whole group, span by span.
    let sub = if spans.len() == 1 {
        sub_group::<L>(s)
    } else {
        GROUP
    };
    for (g, sums) in out.chunks_mut(sub).enumerate() {
        let at = g * sub;
        if spans.len() > 1 && s * size_of::<L::Elem>() < SPAN_ORDER_BYTES {
            // Short runs: channel by channel, all images' runs in blocks.
            for (j, o) in sums.iter_mut().enumerate() {
                let k = (at + j) * s;
                let run = |i: usize| {
                    let grad = spans[i].as_ref().expect("every image's span");
                    (&grad.x[k..k + s], &grad.dy[k..k + s])
                };
                *o = grad_sums_runs::<L>(spans.len(), s, run, centers[at + j]);
            }
        } else {
            sums.fill(GradSums::default());
            for i in 0..spans.len() {
                let grad = span(spans, i);
                for (j, o) in sums.iter_mut().enumerate() {
                    let k = (at + j) * s;
                    let (x, dy) = (&grad.x[k..k + s], &grad.dy[k..k + s]);
                    *o = o.add(grad_sums_runs::<L>(1, s, |_| (x, dy), centers[at + j]));
                }
            }
        }
        for (j, (p, o)) in params.iter_mut().zip(sums.iter()).enumerate() {
            *p = finish(first + at + j, *o);
        }
        for i in 0..spans.len() {
            let grad = span(spans, i);
            for (j, p) in params[..sums.len()].iter().enumerate() {
                super::backward::backward_run::<L>(grad, (at + j) * s, s, p);
            }
        }
    }
}
