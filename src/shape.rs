//! Tensor shapes and memory layouts.

use crate::error::Error;

/// Where channel `c` of sample `n` at spatial position `s` lives in memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Layout {
    /// Channels-first (PyTorch's default): index `(n * C + c) * S + s`. A channel is `N`
    /// contiguous runs of `S` values.
    Nchw,
    /// Channels-last (`torch.channels_last`, TensorFlow's default): index `(n * S + s) * C + c`.
    /// A channel is a strided column of `N * S` values.
    Nhwc,
}

/// A batch of `n` samples with `c` channels and `spatial` positions each.
///
/// `spatial` is the product of every dimension after the channel one: `H * W` for
/// `BatchNorm2d`, `D * H * W` for `BatchNorm3d`, `L` for a `(N, C, L)` `BatchNorm1d` input and
/// `1` for a `(N, C)` one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Shape {
    /// Batch size N.
    pub n: usize,
    /// Channels C.
    pub c: usize,
    /// Product of the dimensions after C.
    pub spatial: usize,
}

impl Shape {
    /// A shape of `n` samples, `c` channels and `spatial` positions.
    pub const fn new(n: usize, c: usize, spatial: usize) -> Shape {
        Shape { n, c, spatial }
    }

    /// `n * c * spatial`, or `Err(Error::Overflow)` if it, or the per-channel count
    /// `n * spatial`, does not fit in `usize`.
    pub fn numel(&self) -> Result<usize, Error> {
        self.n
            .checked_mul(self.spatial)
            .and_then(|per_channel| per_channel.checked_mul(self.c))
            .ok_or(Error::Overflow {
                n: self.n,
                c: self.c,
                spatial: self.spatial,
            })
    }

    /// Number of values that make up one channel: `n * spatial` (saturating; exact once
    /// [`Shape::numel`] has succeeded).
    pub fn per_channel(&self) -> usize {
        self.n.saturating_mul(self.spatial)
    }

    /// Memory index of element `(n, c, s)` in `layout`.
    pub fn index(&self, layout: Layout, n: usize, c: usize, s: usize) -> usize {
        match layout {
            Layout::Nchw => (n * self.c + c) * self.spatial + s,
            Layout::Nhwc => (n * self.spatial + s) * self.c + c,
        }
    }
}
