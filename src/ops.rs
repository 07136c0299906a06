//! The lower-level operations an inference engine calls directly.

use crate::element::{Data, Element};
use crate::error::{check_eps, check_len, check_xy, Error};
use crate::exec;
use crate::fuse::{with_epilogue, Fuse, OverBuffers};
use crate::kernels::buffers::{Buffers, InPlace, Param, Split};
use crate::kernels::normalize::ChannelAffine;
use crate::moments::Moments;
use crate::shape::{Layout, Shape};

/// Per-channel moments (count, mean, M2) of `x`, in one pass over memory. They merge exactly
/// with the moments of other data ([`Moments::merge`]), so statistics can be accumulated over
/// micro-batches or devices.
pub fn moments<D: Data>(x: &[D], shape: Shape, layout: Layout) -> Result<Vec<Moments>, Error> {
    check_len("x", shape.numel()?, x.len())?;
    Ok(exec::moments(x, shape, layout))
}

/// Folds running statistics and the affine parameters into one scale and shift per channel:
/// `scale = weight / sqrt(var + eps)`, `shift = bias - mean * scale` (computed in `f64`).
pub fn fold_scale_shift<T: Element>(
    mean: &[T],
    var: &[T],
    weight: &[T],
    bias: &[T],
    eps: f64,
    scale: &mut [T],
    shift: &mut [T],
) -> Result<(), Error> {
    let c = mean.len();
    for (what, len) in [
        ("var", var.len()),
        ("weight", weight.len()),
        ("bias", bias.len()),
        ("scale", scale.len()),
        ("shift", shift.len()),
    ] {
        check_len(what, c, len)?;
    }
    check_eps(eps)?;
    for i in 0..c {
        let s = weight[i].to_f64() / (var[i].to_f64() + eps).sqrt();
        scale[i] = T::from_f64(s);
        shift[i] = T::from_f64(bias[i].to_f64() - mean[i].to_f64() * s);
    }
    Ok(())
}

/// `y = x * scale[c] + shift[c]` for every element of channel `c`: inference with folded
/// statistics ([`fold_scale_shift`]), one multiply-add per element.
pub fn apply_scale_shift<D: Data>(
    x: &[D],
    y: &mut [D],
    scale: &[D::Param],
    shift: &[D::Param],
    shape: Shape,
    layout: Layout,
) -> Result<(), Error> {
    apply_scale_shift_fused(x, y, scale, shift, shape, layout, Fuse::default())
}

/// [`apply_scale_shift`] writing over its input.
pub fn apply_scale_shift_in_place<D: Data>(
    xy: &mut [D],
    scale: &[D::Param],
    shift: &[D::Param],
    shape: Shape,
    layout: Layout,
) -> Result<(), Error> {
    apply_scale_shift_fused_in_place(xy, scale, shift, shape, layout, Fuse::default())
}

/// [`apply_scale_shift`] followed, in the same pass, by what `fuse` asks for:
/// `y = relu(x * scale[c] + shift[c] + residual)` (see [`Fuse`]), for engines that fold the
/// statistics themselves.
pub fn apply_scale_shift_fused<D: Data>(
    x: &[D],
    y: &mut [D],
    scale: &[D::Param],
    shift: &[D::Param],
    shape: Shape,
    layout: Layout,
    fuse: Fuse<'_, D>,
) -> Result<(), Error> {
    check_xy(shape, x.len(), y.len())?;
    fuse.check(x.len())?;
    check_apply(x.len(), scale, shift, shape)?;
    with_epilogue(Split::new(x, y), fuse, Apply(scale, shift, shape, layout))
}

/// [`apply_scale_shift_fused`] writing over its input.
pub fn apply_scale_shift_fused_in_place<D: Data>(
    xy: &mut [D],
    scale: &[D::Param],
    shift: &[D::Param],
    shape: Shape,
    layout: Layout,
    fuse: Fuse<'_, D>,
) -> Result<(), Error> {
    fuse.check(xy.len())?;
    check_apply(xy.len(), scale, shift, shape)?;
    with_epilogue(InPlace::new(xy), fuse, Apply(scale, shift, shape, layout))
}

/// The checks of [`apply_scale_shift`] beyond the output's length.
fn check_apply<T>(len: usize, scale: &[T], shift: &[T], shape: Shape) -> Result<(), Error> {
    check_len("x", shape.numel()?, len)?;
    check_len("scale", shape.c, scale.len())?;
    check_len("shift", shape.c, shift.len())
}

/// `apply_scale_shift` over buffers of any epilogue.
struct Apply<'p, T>(&'p [T], &'p [T], Shape, Layout);

impl<D: Data> OverBuffers<D> for Apply<'_, D::Param> {
    type Output = Result<(), Error>;
    fn run<B: Buffers<Data = D>>(self, buf: B) -> Self::Output {
        apply(buf, self.0, self.1, self.2, self.3)
    }
}

fn apply<B: Buffers>(
    buf: B,
    scale: &[Param<B>],
    shift: &[Param<B>],
    shape: Shape,
    layout: Layout,
) -> Result<(), Error> {
    let p = ChannelAffine {
        hi: &[],
        scale,
        shift,
    };
    exec::apply(buf, shape, layout, &p);
    Ok(())
}
