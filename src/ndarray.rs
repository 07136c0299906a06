//! `ndarray` views (`ndarray` feature): the layer's calls on arrays of any dimension >= 2
//! with the channels on axis 1, as PyTorch holds them (`(N, C)`, `(N, C, L)`,
//! `(N, C, H, W)`, `(N, C, D, H, W)`), the layout read from the strides:
//!
//! - standard (row-major) order is NCHW;
//! - channels-last order, axis 1 the fastest and the others row-major (what
//!   `permuted_axes([0, 3, 1, 2])` makes of a standard `(N, H, W, C)` array), is NHWC;
//! - anything else (a slice with gaps, broadcast or negative strides, another axis order) is
//!   [`Error::Strides`]: never a copy behind the caller's back.
//!
//! Axes of length 1 may have any stride, as ndarray allows. When both orders describe the
//! memory (`c == 1`, or one spatial position), they are the same order and NCHW is used.
//!
//! ```
//! use batchnorm::BatchNorm;
//! use ndarray::{Array4, ArrayView4};
//!
//! let mut bn = BatchNorm::<f32>::new(3);
//! // NCHW
//! let x = Array4::from_shape_fn((2, 3, 4, 5), |(n, c, h, w)| (n + c * h + w) as f32);
//! let mut y = Array4::zeros(x.raw_dim());
//! let saved = bn.forward_train_array(x.view(), y.view_mut())?;
//! // NHWC memory seen as (N, C, H, W)
//! let nhwc = Array4::from_shape_fn((2, 4, 5, 3), |(n, h, w, c)| (n + c * h + w) as f32);
//! let x_cl: ArrayView4<f32> = nhwc.view().permuted_axes([0, 3, 1, 2]);
//! let mut y_cl = Array4::<f32>::zeros((2, 4, 5, 3));
//! bn.forward_eval_array(x_cl, y_cl.view_mut().permuted_axes([0, 3, 1, 2]))?;
//! # let _ = saved;
//! # Ok::<(), batchnorm::Error>(())
//! ```

use crate::element::{Data, Element};
use crate::error::Error;
use crate::fuse::Fuse;
use crate::layer::{BatchNorm, Gradients, SavedStats};
use crate::shape::{Layout, Shape};
use crate::sync::Collective;
use ::ndarray::{ArrayView, ArrayViewMut, Dimension};

fn layout_of(
    dims: &[usize],
    strides: &[isize],
    what: &'static str,
    want: Option<(Shape, Layout)>,
) -> Result<(Shape, Layout), Error> {
    let found = Shape::from_strides(dims, strides)?;
    match want {
        Some(want) if want != found => Err(Error::Mismatch { what }),
        _ => Ok(found),
    }
}

/// An input view's elements in memory order, with its shape and layout (the same as
/// `want`'s, when given).
fn input<'a, E, I: Dimension>(
    a: &ArrayView<'a, E, I>,
    what: &'static str,
    want: Option<(Shape, Layout)>,
) -> Result<(&'a [E], Shape, Layout), Error> {
    let (shape, layout) = layout_of(a.shape(), a.strides(), what, want)?;
    let data = a.to_slice_memory_order().ok_or(Error::Strides {
        dims: a.shape().to_vec(),
        strides: a.strides().to_vec(),
    })?;
    Ok((data, shape, layout))
}

/// [`input`] for an output view.
fn output<'a, E, I: Dimension>(
    a: ArrayViewMut<'a, E, I>,
    what: &'static str,
    want: Option<(Shape, Layout)>,
) -> Result<&'a mut [E], Error> {
    let (dims, strides) = (a.shape().to_vec(), a.strides().to_vec());
    layout_of(&dims, &strides, what, want)?;
    a.into_slice_memory_order()
        .ok_or(Error::Strides { dims, strides })
}

impl<T: Element> BatchNorm<T> {
    /// [`forward_train`](Self::forward_train) on arrays: `y` of the same shape and layout as
    /// `x` (see the [module](crate::ndarray) for the layouts).
    pub fn forward_train_array<E: Data<Param = T>, I: Dimension>(
        &mut self,
        x: ArrayView<'_, E, I>,
        y: ArrayViewMut<'_, E, I>,
    ) -> Result<SavedStats<T>, Error> {
        self.forward_train_array_fused(x, y, None, false)
    }

    /// [`forward_train_fused`](Self::forward_train_fused) on arrays:
    /// `y = relu?(bn(x) + residual?)`, the residual of the same shape and layout as `x`.
    pub fn forward_train_array_fused<E: Data<Param = T>, I: Dimension>(
        &mut self,
        x: ArrayView<'_, E, I>,
        y: ArrayViewMut<'_, E, I>,
        residual: Option<ArrayView<'_, E, I>>,
        relu: bool,
    ) -> Result<SavedStats<T>, Error> {
        let (x, shape, layout) = input(&x, "x", None)?;
        let fuse = fuse(residual, relu, (shape, layout))?;
        let y = output(y, "y", Some((shape, layout)))?;
        self.forward_train_fused(x, y, shape, layout, fuse)
    }

    /// [`forward_train_in_place`](Self::forward_train_in_place) on an array.
    pub fn forward_train_array_in_place<E: Data<Param = T>, I: Dimension>(
        &mut self,
        xy: ArrayViewMut<'_, E, I>,
    ) -> Result<SavedStats<T>, Error> {
        let (shape, layout) = Shape::from_strides(xy.shape(), xy.strides())?;
        let xy = output(xy, "x", None)?;
        self.forward_train_in_place(xy, shape, layout)
    }

    /// [`forward_eval`](Self::forward_eval) on arrays: `y` of the same shape and layout as
    /// `x`.
    pub fn forward_eval_array<E: Data<Param = T>, I: Dimension>(
        &self,
        x: ArrayView<'_, E, I>,
        y: ArrayViewMut<'_, E, I>,
    ) -> Result<(), Error> {
        self.forward_eval_array_fused(x, y, None, false)
    }

    /// [`forward_eval_fused`](Self::forward_eval_fused) on arrays:
    /// `y = relu?(bn(x) + residual?)`, the residual of the same shape and layout as `x`.
    pub fn forward_eval_array_fused<E: Data<Param = T>, I: Dimension>(
        &self,
        x: ArrayView<'_, E, I>,
        y: ArrayViewMut<'_, E, I>,
        residual: Option<ArrayView<'_, E, I>>,
        relu: bool,
    ) -> Result<(), Error> {
        let (x, shape, layout) = input(&x, "x", None)?;
        let fuse = fuse(residual, relu, (shape, layout))?;
        let y = output(y, "y", Some((shape, layout)))?;
        self.forward_eval_fused(x, y, shape, layout, fuse)
    }

    /// [`forward_eval_in_place`](Self::forward_eval_in_place) on an array.
    pub fn forward_eval_array_in_place<E: Data<Param = T>, I: Dimension>(
        &self,
        xy: ArrayViewMut<'_, E, I>,
    ) -> Result<(), Error> {
        let (shape, layout) = Shape::from_strides(xy.shape(), xy.strides())?;
        let xy = output(xy, "x", None)?;
        self.forward_eval_in_place(xy, shape, layout)
    }

    /// [`backward`](Self::backward) on arrays: `dy` and `dx` of the same shape and layout as
    /// `x`.
    pub fn backward_array<E: Data<Param = T>, I: Dimension>(
        &self,
        x: ArrayView<'_, E, I>,
        dy: ArrayView<'_, E, I>,
        saved: &SavedStats<T>,
        dx: ArrayViewMut<'_, E, I>,
    ) -> Result<Gradients<T>, Error> {
        let (x, shape, layout) = input(&x, "x", None)?;
        let (dy, ..) = input(&dy, "dy", Some((shape, layout)))?;
        let dx = output(dx, "dx", Some((shape, layout)))?;
        self.backward(x, dy, saved, dx, shape, layout)
    }

    /// [`backward_fused`](Self::backward_fused) on arrays: `y` the fused training's output,
    /// `dy`, `dx` and `d_residual` of the same shape and layout as `x`.
    #[allow(clippy::too_many_arguments)]
    pub fn backward_array_fused<E: Data<Param = T>, I: Dimension>(
        &self,
        x: ArrayView<'_, E, I>,
        y: ArrayView<'_, E, I>,
        dy: ArrayView<'_, E, I>,
        saved: &SavedStats<T>,
        dx: ArrayViewMut<'_, E, I>,
        d_residual: Option<ArrayViewMut<'_, E, I>>,
        relu: bool,
    ) -> Result<Gradients<T>, Error> {
        let (x, shape, layout) = input(&x, "x", None)?;
        let want = Some((shape, layout));
        let (y, ..) = input(&y, "y", want)?;
        let (dy, ..) = input(&dy, "dy", want)?;
        let dx = output(dx, "dx", want)?;
        let dr = d_residual
            .map(|d| output(d, "d_residual", want))
            .transpose()?;
        self.backward_fused(x, y, dy, saved, dx, dr, shape, layout, relu)
    }

    /// [`forward_train_sync`](Self::forward_train_sync) on arrays: this worker's slice `x`
    /// of the batch and `y` of the same shape and layout. Views refused here (strides, a
    /// mismatch) are this worker's error in the collective call, which it still makes, so
    /// that no other worker waits (they get [`Error::Peer`]).
    pub fn forward_train_sync_array<E: Data<Param = T>, I: Dimension, C: Collective>(
        &mut self,
        x: ArrayView<'_, E, I>,
        y: ArrayViewMut<'_, E, I>,
        comm: &C,
    ) -> Result<SavedStats<T>, Error> {
        let tensors = input(&x, "x", None).and_then(|(x, shape, layout)| {
            let y = output(y, "y", Some((shape, layout)))?;
            Ok((x, y, shape, layout))
        });
        self.forward_train_sync_of(tensors, comm)
    }

    /// [`backward_sync`](Self::backward_sync) on arrays: `dy` and `dx` of the same shape and
    /// layout as `x`; refused views as in
    /// [`forward_train_sync_array`](Self::forward_train_sync_array).
    pub fn backward_sync_array<E: Data<Param = T>, I: Dimension, C: Collective>(
        &self,
        x: ArrayView<'_, E, I>,
        dy: ArrayView<'_, E, I>,
        saved: &SavedStats<T>,
        dx: ArrayViewMut<'_, E, I>,
        comm: &C,
    ) -> Result<Gradients<T>, Error> {
        let tensors = input(&x, "x", None).and_then(|(x, shape, layout)| {
            let want = Some((shape, layout));
            let (dy, ..) = input(&dy, "dy", want)?;
            let dx = output(dx, "dx", want)?;
            Ok((x, dy, dx, shape, layout))
        });
        self.backward_sync_of(tensors, saved, comm)
    }
}

/// The [`Fuse`] of an optional residual array (of the input's shape and layout `want`).
fn fuse<E, I: Dimension>(
    residual: Option<ArrayView<'_, E, I>>,
    relu: bool,
    want: (Shape, Layout),
) -> Result<Fuse<'_, E>, Error> {
    let residual = match residual {
        Some(r) => Some(input(&r, "residual", Some(want))?.0),
        None => None,
    };
    Ok(Fuse { residual, relu })
}
