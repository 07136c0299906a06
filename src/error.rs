//! The one error type of the crate.

use std::fmt;

/// Why a call was refused. Every check runs before any output or layer state is written, so an
/// `Err` leaves the layer (running statistics, counter) and the output buffer untouched.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum Error {
    /// A buffer or parameter vector has the wrong number of elements.
    Length {
        /// Which buffer: `"x"`, `"y"`, `"weight"`, `"running_mean"`, ...
        what: &'static str,
        /// The length the shape (or the layer's channel count) requires.
        expected: usize,
        /// The length that was passed.
        got: usize,
    },
    /// `shape.c` differs from the layer's channel count.
    Channels {
        /// The layer's channel count.
        expected: usize,
        /// `shape.c`.
        got: usize,
    },
    /// `eps` must be finite and non-negative.
    Eps(f64),
    /// `momentum` must be finite and within `[0, 1]`.
    Momentum(f64),
    /// Training needs at least two values per channel (`n * spatial >= 2`), as in PyTorch.
    TooFewValues {
        /// `n * spatial` of the shape that was passed.
        per_channel: usize,
    },
    /// `n * c * spatial` does not fit in `usize`.
    Overflow {
        /// Batch size.
        n: usize,
        /// Channels.
        c: usize,
        /// Spatial size.
        spatial: usize,
    },
    /// An array (`ndarray` views, candle tensors) has fewer than two dimensions: batch and
    /// channels come first.
    Rank {
        /// Its number of dimensions.
        ndim: usize,
    },
    /// An array's strides are neither the standard order (NCHW) nor channels-last (NHWC)
    /// over dense memory: a slice with gaps, a broadcast, negative strides, another order.
    Strides {
        /// Its dimensions.
        dims: Vec<usize>,
        /// Its strides, in elements.
        strides: Vec<isize>,
    },
    /// A synchronized call's collective failed (see [`crate::Collective`]); the layer is
    /// untouched.
    Collective(CollectiveError),
    /// A synchronized call was abandoned because another worker's input was refused (that
    /// worker gets the reason), or because the workers' layers disagree on the channel count;
    /// the layer is untouched. `rank`: the worker, where the collective tells.
    Peer {
        /// The worker's rank, where known.
        rank: Option<usize>,
    },
    /// An array's shape or layout differs from the input's.
    Mismatch {
        /// Which array: `"y"`, `"dy"`, `"dx"`, ...
        what: &'static str,
    },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Length {
                what,
                expected,
                got,
            } => write!(f, "`{what}` has {got} elements, expected {expected}"),
            Error::Channels { expected, got } => {
                write!(f, "shape has {got} channels, but the layer has {expected}")
            }
            Error::Eps(eps) => write!(f, "eps must be finite and >= 0, got {eps}"),
            Error::Momentum(m) => write!(f, "momentum must be finite and in [0, 1], got {m}"),
            Error::TooFewValues { per_channel } => write!(
                f,
                "training needs more than 1 value per channel (n * spatial), got {per_channel}"
            ),
            Error::Overflow { n, c, spatial } => write!(
                f,
                "shape {n} x {c} x {spatial} has more elements than usize can count"
            ),
            Error::Rank { ndim } => write!(
                f,
                "an array of {ndim} dimensions: batch and channels need at least 2"
            ),
            Error::Strides { dims, strides } => write!(
                f,
                "an array of shape {dims:?} and strides {strides:?} is neither standard \
                 (NCHW) nor channels-last (NHWC) contiguous; make it so (for example with \
                 `as_standard_layout`) before the call"
            ),
            Error::Collective(e) => write!(f, "the collective failed: {}", e.0),
            Error::Peer { rank: Some(rank) } => write!(
                f,
                "worker {rank} refused its input or has another channel count; nothing done"
            ),
            Error::Peer { rank: None } => {
                write!(f, "another worker refused its input; nothing done")
            }
            Error::Mismatch { what } => {
                write!(f, "`{what}` has a different shape or layout from `x`")
            }
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Collective(e) => Some(&*e.0),
            _ => None,
        }
    }
}

/// The error of a [`crate::Collective`], kept as its source. Two are equal when they are the
/// same error or say the same.
#[derive(Clone, Debug)]
pub struct CollectiveError(pub std::sync::Arc<dyn std::error::Error + Send + Sync>);

impl PartialEq for CollectiveError {
    fn eq(&self, other: &Self) -> bool {
        std::sync::Arc::ptr_eq(&self.0, &other.0) || self.0.to_string() == other.0.to_string()
    }
}

impl CollectiveError {
    pub(crate) fn of(e: impl std::error::Error + Send + Sync + 'static) -> Error {
        Error::Collective(CollectiveError(std::sync::Arc::new(e)))
    }
}

/// `Err(Error::Length)` unless `got == expected`.
pub(crate) fn check_len(what: &'static str, expected: usize, got: usize) -> Result<(), Error> {
    if got == expected {
        Ok(())
    } else {
        Err(Error::Length {
            what,
            expected,
            got,
        })
    }
}

/// Checks that input and output both hold the `shape.numel()` elements of `shape`.
pub(crate) fn check_xy(shape: crate::Shape, x: usize, y: usize) -> Result<(), Error> {
    let total = shape.numel()?;
    check_len("x", total, x)?;
    check_len("y", total, y)
}

/// `Err(Error::Eps)` unless eps is finite and non-negative.
pub(crate) fn check_eps(eps: f64) -> Result<(), Error> {
    if eps.is_finite() && eps >= 0.0 {
        Ok(())
    } else {
        Err(Error::Eps(eps))
    }
}
