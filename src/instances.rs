//! The public entries compiled once, in this crate, for each data type.
//!
//! The kernels are generic over the data type, the buffers (out of place or in place), the
//! epilogue and the instruction set, and Rust compiles a generic function in the crate that
//! calls it: every test binary, example, fuzz target and dependent crate compiled all of
//! them again (a clean `cargo test` build took 7 minutes on two cores, 4 of them the examples).
//! So each generic public call forwards to a method of [`Instances`], which every [`Data`]
//! type implements here without generics ([`instances!`]): the kernels are compiled with the
//! library, and a caller compiles a call. One call per tensor, not per element, crosses.

use crate::element::Data;
use crate::error::{check_len, check_xy, CollectiveError, Error};
use crate::exec;
use crate::fuse::{with_epilogue, Fuse};
use crate::kernels::buffers::{Grad, InPlace, Split};
use crate::layer::{BatchNorm, Eval, Gradients, SavedStats, Train};
use crate::moments::Moments;
use crate::ops::{check_apply, Apply};
use crate::shape::{Layout, Shape};
use crate::sync::{BackTensors, Collective, TrainTensors};
use half::{bf16, f16};

/// The parameter type of data type `D`.
type P<D> = <D as Data>::Param;

/// The library's entries for one data type, each the body of the public generic call of the
/// same name (checks, then the kernels), compiled here for every [`Data`] type. Sealed with
/// [`Data`], whose supertrait it is.
pub trait Instances: Sized {
    /// [`BatchNorm::forward_train_fused`].
    fn forward_train_fused(
        bn: &mut BatchNorm<P<Self>>,
        x: &[Self],
        y: &mut [Self],
        shape: Shape,
        layout: Layout,
        fuse: Fuse<'_, Self>,
    ) -> Result<SavedStats<P<Self>>, Error>
    where
        Self: Data;

    /// [`BatchNorm::forward_train_fused_in_place`].
    fn forward_train_fused_in_place(
        bn: &mut BatchNorm<P<Self>>,
        xy: &mut [Self],
        shape: Shape,
        layout: Layout,
        fuse: Fuse<'_, Self>,
    ) -> Result<SavedStats<P<Self>>, Error>
    where
        Self: Data;

    /// [`BatchNorm::forward_eval_fused`].
    fn forward_eval_fused(
        bn: &BatchNorm<P<Self>>,
        x: &[Self],
        y: &mut [Self],
        shape: Shape,
        layout: Layout,
        fuse: Fuse<'_, Self>,
    ) -> Result<(), Error>
    where
        Self: Data;

    /// [`BatchNorm::forward_eval_fused_in_place`].
    fn forward_eval_fused_in_place(
        bn: &BatchNorm<P<Self>>,
        xy: &mut [Self],
        shape: Shape,
        layout: Layout,
        fuse: Fuse<'_, Self>,
    ) -> Result<(), Error>
    where
        Self: Data;

    /// [`BatchNorm::backward`].
    #[allow(clippy::too_many_arguments)]
    fn backward(
        bn: &BatchNorm<P<Self>>,
        x: &[Self],
        dy: &[Self],
        saved: &SavedStats<P<Self>>,
        dx: &mut [Self],
        shape: Shape,
        layout: Layout,
    ) -> Result<Gradients<P<Self>>, Error>
    where
        Self: Data;

    /// [`BatchNorm::backward_fused`].
    #[allow(clippy::too_many_arguments)]
    fn backward_fused(
        bn: &BatchNorm<P<Self>>,
        x: &[Self],
        y: &[Self],
        dy: &[Self],
        saved: &SavedStats<P<Self>>,
        dx: &mut [Self],
        d_residual: Option<&mut [Self]>,
        shape: Shape,
        layout: Layout,
        relu: bool,
    ) -> Result<Gradients<P<Self>>, Error>
    where
        Self: Data;

    /// [`BatchNorm::backward_eval`].
    fn backward_eval(
        bn: &BatchNorm<P<Self>>,
        x: &[Self],
        dy: &[Self],
        dx: &mut [Self],
        shape: Shape,
        layout: Layout,
    ) -> Result<Gradients<P<Self>>, Error>
    where
        Self: Data;

    /// [`BatchNorm::forward_train_sync`] of `tensors`, or of nothing when the caller refused
    /// them (the collective's types erased: one call per exchange crosses `dyn`).
    fn forward_train_sync(
        bn: &mut BatchNorm<P<Self>>,
        tensors: TrainTensors<'_, Self>,
        comm: &dyn Exchange,
    ) -> Result<SavedStats<P<Self>>, Error>
    where
        Self: Data;

    /// [`BatchNorm::backward_sync`] of `tensors`, or of nothing when the caller refused them.
    fn backward_sync(
        bn: &BatchNorm<P<Self>>,
        tensors: BackTensors<'_, Self>,
        saved: &SavedStats<P<Self>>,
        comm: &dyn Exchange,
    ) -> Result<Gradients<P<Self>>, Error>
    where
        Self: Data;

    /// [`crate::moments`].
    fn moments(x: &[Self], shape: Shape, layout: Layout) -> Result<Vec<Moments>, Error>
    where
        Self: Data;

    /// [`crate::apply_scale_shift_fused`].
    fn apply_scale_shift_fused(
        x: &[Self],
        y: &mut [Self],
        scale: &[P<Self>],
        shift: &[P<Self>],
        shape: Shape,
        layout: Layout,
        fuse: Fuse<'_, Self>,
    ) -> Result<(), Error>
    where
        Self: Data;

    /// [`crate::apply_scale_shift_fused_in_place`].
    fn apply_scale_shift_fused_in_place(
        xy: &mut [Self],
        scale: &[P<Self>],
        shift: &[P<Self>],
        shape: Shape,
        layout: Layout,
        fuse: Fuse<'_, Self>,
    ) -> Result<(), Error>
    where
        Self: Data;
}

/// A [`Collective`] with its error type erased into [`Error::Collective`]: what the
/// synchronized calls take, so that they are compiled once per data type, not per collective
/// (the module's doc).
pub trait Exchange {
    /// [`Collective::all_gather_moments`].
    fn all_gather_moments(&self, local: &[Moments]) -> Result<Vec<Vec<Moments>>, Error>;
    /// [`Collective::all_reduce_sum`].
    fn all_reduce_sum(&self, values: &mut [f64]) -> Result<(), Error>;
}

impl<C: Collective> Exchange for C {
    fn all_gather_moments(&self, local: &[Moments]) -> Result<Vec<Vec<Moments>>, Error> {
        Collective::all_gather_moments(self, local).map_err(CollectiveError::of)
    }
    fn all_reduce_sum(&self, values: &mut [f64]) -> Result<(), Error> {
        Collective::all_reduce_sum(self, values).map_err(CollectiveError::of)
    }
}

/// [`Instances`] for each data type `$t` (parameters `$p`): the same bodies, stamped per type
/// so that they are not generic.
macro_rules! instances {
    ($($t:ty => $p:ty),* $(,)?) => {$(
        impl Instances for $t {
            fn forward_train_fused(
                bn: &mut BatchNorm<$p>,
                x: &[$t],
                y: &mut [$t],
                shape: Shape,
                layout: Layout,
                fuse: Fuse<'_, $t>,
            ) -> Result<SavedStats<$p>, Error> {
                check_xy(shape, x.len(), y.len())?;
                fuse.check(x.len())?;
                with_epilogue(Split::new(x, y), fuse, Train(bn, shape, layout))
            }

            fn forward_train_fused_in_place(
                bn: &mut BatchNorm<$p>,
                xy: &mut [$t],
                shape: Shape,
                layout: Layout,
                fuse: Fuse<'_, $t>,
            ) -> Result<SavedStats<$p>, Error> {
                fuse.check(xy.len())?;
                with_epilogue(InPlace::new(xy), fuse, Train(bn, shape, layout))
            }

            fn forward_eval_fused(
                bn: &BatchNorm<$p>,
                x: &[$t],
                y: &mut [$t],
                shape: Shape,
                layout: Layout,
                fuse: Fuse<'_, $t>,
            ) -> Result<(), Error> {
                check_xy(shape, x.len(), y.len())?;
                fuse.check(x.len())?;
                with_epilogue(Split::new(x, y), fuse, Eval(bn, shape, layout))
            }

            fn forward_eval_fused_in_place(
                bn: &BatchNorm<$p>,
                xy: &mut [$t],
                shape: Shape,
                layout: Layout,
                fuse: Fuse<'_, $t>,
            ) -> Result<(), Error> {
                fuse.check(xy.len())?;
                with_epilogue(InPlace::new(xy), fuse, Eval(bn, shape, layout))
            }

            fn backward(
                bn: &BatchNorm<$p>,
                x: &[$t],
                dy: &[$t],
                saved: &SavedStats<$p>,
                dx: &mut [$t],
                shape: Shape,
                layout: Layout,
            ) -> Result<Gradients<$p>, Error> {
                bn.check_backward(x, dy, dx, shape)?;
                bn.train_backward(Grad::new(x, dy, &[], dx), saved, shape, layout)
            }

            fn backward_fused(
                bn: &BatchNorm<$p>,
                x: &[$t],
                y: &[$t],
                dy: &[$t],
                saved: &SavedStats<$p>,
                dx: &mut [$t],
                d_residual: Option<&mut [$t]>,
                shape: Shape,
                layout: Layout,
                relu: bool,
            ) -> Result<Gradients<$p>, Error> {
                bn.backward_fused_of(x, y, dy, saved, dx, d_residual, shape, layout, relu)
            }

            fn backward_eval(
                bn: &BatchNorm<$p>,
                x: &[$t],
                dy: &[$t],
                dx: &mut [$t],
                shape: Shape,
                layout: Layout,
            ) -> Result<Gradients<$p>, Error> {
                bn.backward_eval_of(x, dy, dx, shape, layout)
            }

            fn forward_train_sync(
                bn: &mut BatchNorm<$p>,
                tensors: TrainTensors<'_, $t>,
                comm: &dyn Exchange,
            ) -> Result<SavedStats<$p>, Error> {
                bn.forward_train_sync_of(tensors, comm)
            }

            fn backward_sync(
                bn: &BatchNorm<$p>,
                tensors: BackTensors<'_, $t>,
                saved: &SavedStats<$p>,
                comm: &dyn Exchange,
            ) -> Result<Gradients<$p>, Error> {
                bn.backward_sync_of(tensors, saved, comm)
            }

            fn moments(x: &[$t], shape: Shape, layout: Layout) -> Result<Vec<Moments>, Error> {
                check_len("x", shape.numel()?, x.len())?;
                Ok(exec::moments(x, shape, layout))
            }

            fn apply_scale_shift_fused(
                x: &[$t],
                y: &mut [$t],
                scale: &[$p],
                shift: &[$p],
                shape: Shape,
                layout: Layout,
                fuse: Fuse<'_, $t>,
            ) -> Result<(), Error> {
                check_xy(shape, x.len(), y.len())?;
                fuse.check(x.len())?;
                check_apply(x.len(), scale, shift, shape)?;
                with_epilogue(Split::new(x, y), fuse, Apply(scale, shift, shape, layout))
            }

            fn apply_scale_shift_fused_in_place(
                xy: &mut [$t],
                scale: &[$p],
                shift: &[$p],
                shape: Shape,
                layout: Layout,
                fuse: Fuse<'_, $t>,
            ) -> Result<(), Error> {
                fuse.check(xy.len())?;
                check_apply(xy.len(), scale, shift, shape)?;
                with_epilogue(InPlace::new(xy), fuse, Apply(scale, shift, shape, layout))
            }
        }
    )*};
}

instances!(f32 => f32, f64 => f64, f16 => f32, bf16 => f32);
