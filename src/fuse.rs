//! Fused epilogues: `y = relu(bn(x) + residual)` in the pass that normalizes, as ResNets use
//! every batch norm (with its ReLU, and the last of each block with the residual too).

use crate::element::{Data, Element};
use crate::error::{check_len, Error};
use crate::kernels::buffers::{Buffers, Relu, Residual, Then};

/// What happens after the normalization, in the same pass: `y = act(bn(x) + residual)`, with
/// `act` a ReLU (`max(v, 0)`; NaN stays NaN) when `relu` is on, the identity otherwise.
/// `Fuse::default()` is the plain normalization, bit for bit.
#[derive(Clone, Copy, Debug)]
pub struct Fuse<'a, D> {
    /// Added to the normalized output before the activation: same shape and layout as `x`.
    pub residual: Option<&'a [D]>,
    /// A ReLU after the normalization (and the residual).
    pub relu: bool,
}

impl<D> Default for Fuse<'_, D> {
    fn default() -> Self {
        Fuse {
            residual: None,
            relu: false,
        }
    }
}

impl<'a, D> Fuse<'a, D> {
    /// `y = relu(bn(x))`.
    pub fn relu() -> Self {
        Fuse {
            residual: None,
            relu: true,
        }
    }

    /// `y = relu(bn(x) + residual)`: the last batch norm of a ResNet block.
    pub fn add_relu(residual: &'a [D]) -> Self {
        Fuse {
            residual: Some(residual),
            relu: true,
        }
    }

    /// Checks the residual's length against the tensor's.
    pub(crate) fn check(&self, len: usize) -> Result<(), Error> {
        match self.residual {
            Some(r) => check_len("residual", len, r.len()),
            None => Ok(()),
        }
    }
}

/// An operation over buffers of any epilogue (a closure cannot be generic over them).
pub(crate) trait OverBuffers<D: Data> {
    type Output;
    fn run<B: Buffers<Data = D>>(self, buf: B) -> Self::Output;
}

/// Runs `op` on `buf` with the epilogue `fuse` asks for: the plain buffers when it asks for
/// nothing, so that the plain path is the same code.
pub(crate) fn with_epilogue<D: Data, B: Buffers<Data = D>, O: OverBuffers<D>>(
    buf: B,
    fuse: Fuse<'_, D>,
    op: O,
) -> O::Output {
    match (fuse.residual, fuse.relu) {
        (None, false) => op.run(buf),
        (None, true) => op.run(Then {
            buf,
            epilogue: Relu,
        }),
        (Some(residual), false) => op.run(Then {
            buf,
            epilogue: Residual::<D, false>::new(residual),
        }),
        (Some(residual), true) => op.run(Then {
            buf,
            epilogue: Residual::<D, true>::new(residual),
        }),
    }
}

/// `dz = relu'(y) · dy`: `dy` where the output `y > 0`, 0 where `y <= 0` (PyTorch's
/// `threshold_backward` rule, so a NaN output passes its gradient); `dy` itself without
/// `relu`. The backward of the fused epilogue before the batch norm's own.
pub(crate) fn relu_gradient<D: Data>(dy: &[D], y: &[D], relu: bool, dz: &mut [D]) {
    let zero = <D::Param as Element>::ZERO;
    for ((o, &d), &y) in dz.iter_mut().zip(dy).zip(y) {
        *o = if relu && y.to_param() <= zero {
            D::from_param(zero)
        } else {
            d
        };
    }
}
