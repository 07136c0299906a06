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

    /// The shape and layout of an array with the channels on axis 1 (`(N, C, spatial...)`, as
    /// PyTorch, ndarray and candle hold them), from its dimensions and strides in elements:
    /// standard order is NCHW; channels-last (axis 1 the fastest, the others in order) is NHWC;
    /// axes of length 1 may have any stride, and where both orders fit (one channel or one
    /// position: the same memory) it is NCHW. Anything else is [`Error::Strides`]; fewer than
    /// two dimensions [`Error::Rank`].
    pub fn from_strides(dims: &[usize], strides: &[isize]) -> Result<(Shape, Layout), Error> {
        if dims.len() < 2 {
            return Err(Error::Rank { ndim: dims.len() });
        }
        if strides.len() != dims.len() {
            return Err(Error::Strides {
                dims: dims.to_vec(),
                strides: strides.to_vec(),
            });
        }
        let (n, c) = (dims[0], dims[1]);
        let spatial = dims[2..]
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .ok_or(Error::Overflow { n, c, spatial: 0 })?;
        let shape = Shape::new(n, c, spatial);
        shape.numel()?;
        // Axes from the slowest to the fastest in each layout.
        let spatial_axes = 2..dims.len();
        let nchw: Vec<usize> = [0, 1].into_iter().chain(spatial_axes.clone()).collect();
        let nhwc: Vec<usize> = [0].into_iter().chain(spatial_axes).chain([1]).collect();
        for (order, layout) in [(nchw, Layout::Nchw), (nhwc, Layout::Nhwc)] {
            if dense_in(&order, dims, strides) {
                return Ok((shape, layout));
            }
        }
        Err(Error::Strides {
            dims: dims.to_vec(),
            strides: strides.to_vec(),
        })
    }
}

/// Whether the axes, taken in `order` from the slowest to the fastest, tile memory densely:
/// each axis's stride the product of the lengths of the faster ones (axes of length 1 free).
/// An empty array is dense in any order.
fn dense_in(order: &[usize], dims: &[usize], strides: &[isize]) -> bool {
    if dims.contains(&0) {
        return true;
    }
    let mut expected = 1usize;
    for &axis in order.iter().rev() {
        if dims[axis] != 1 && usize::try_from(strides[axis]).ok() != Some(expected) {
            return false;
        }
        expected = expected.saturating_mul(dims[axis]);
    }
    true
}
