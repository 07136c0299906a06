//! The C ABI (`capi` feature): a layer handle, f32 / f16 / bf16 forward and backward passes
//! with the fused epilogues, status codes and a thread-local error message, in the manner of
//! oneDNN's C API. The header `include/batchnorm.h` is generated from this file by `cbindgen`
//! (see `cbindgen.toml`; CI fails when the checked-in header is stale).
//!
//! Conventions:
//! - Every entry catches panics (`catch_unwind`): nothing unwinds into C; a caught panic is
//!   `BN_INTERNAL`.
//! - Buffers are the caller's. `x == y` (the same pointer) is the in-place call; any other
//!   overlap between the buffers of a call, a NULL or misaligned data pointer, a size that
//!   overflows, an unknown layout or data type, and every error of the Rust API are
//!   `BN_INVALID_ARGUMENT`, with the layer untouched and nothing written.
//! - `bn_last_error` gives the message of this thread's last failed call.
//! - Layouts and data types are integer typedefs with named constants, not C enums, so that
//!   an out-of-range value is an error rather than undefined behaviour.
//! - With the `rayon` feature, large tensors run in rayon's global pool (sized by
//!   `RAYON_NUM_THREADS`, else one thread per core), created on first use.
#![cfg(feature = "capi")]
#![allow(non_camel_case_types)]

use crate::half::{bf16, f16};
use crate::{BatchNorm, Data, Error, Fuse, Layout, SavedStats, Shape};
use std::cell::RefCell;
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};

/// The outcome of a call.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum bn_status {
    /// Success.
    BN_OK = 0,
    /// A pointer, size, layout, data type or parameter the call refuses; see `bn_last_error`.
    BN_INVALID_ARGUMENT = 2,
    /// A failure inside the library (a caught panic); see `bn_last_error`.
    BN_INTERNAL = 5,
}
use bn_status::{BN_INTERNAL, BN_INVALID_ARGUMENT, BN_OK};

/// Memory layout of a tensor: `BN_NCHW` (channels outside the spatial positions) or `BN_NHWC`
/// (channels innermost).
pub type bn_layout = u32;
/// `[n][c][spatial]`.
pub const BN_NCHW: bn_layout = 0;
/// `[n][spatial][c]`.
pub const BN_NHWC: bn_layout = 1;

/// Element type of the tensors `x`, `y`, `dy`, `dx`, residual (parameters and statistics are
/// always `float`): `float`, IEEE half or bfloat16 (the 16-bit types as `uint16_t` bits).
pub type bn_dtype = u32;
/// `float`.
pub const BN_F32: bn_dtype = 0;
/// IEEE 754 binary16, as `uint16_t` bits.
pub const BN_F16: bn_dtype = 1;
/// bfloat16, as `uint16_t` bits.
pub const BN_BF16: bn_dtype = 2;

/// Calls a generic method with the element type a `bn_dtype` names.
macro_rules! by_dtype {
    ($dtype:expr, $call:ident.$method:ident($($arg:expr),*)) => {
        match $dtype {
            BN_F32 => $call.$method::<f32>($($arg),*),
            BN_F16 => $call.$method::<f16>($($arg),*),
            BN_BF16 => $call.$method::<bf16>($($arg),*),
            other => Err(invalid(format!("unknown data type {other}"))),
        }
    };
}

/// A batch-norm layer: weight, bias, running statistics, eps, momentum (opaque).
pub struct bn_layer(BatchNorm<f32>);

/// A refused call: its status and message.
struct Fail(bn_status, String);

impl From<Error> for Fail {
    fn from(e: Error) -> Fail {
        Fail(BN_INVALID_ARGUMENT, e.to_string())
    }
}

fn invalid(msg: impl Into<String>) -> Fail {
    Fail(BN_INVALID_ARGUMENT, msg.into())
}

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_last_error(msg: &str) {
    let msg = CString::new(msg.replace('\0', " ")).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = msg);
}

/// Runs an entry's body: its status, with a failure's message kept for `bn_last_error`, and a
/// panic caught (`BN_INTERNAL`).
fn entry(body: impl FnOnce() -> Result<(), Fail>) -> bn_status {
    let Fail(status, msg) = match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(())) => return BN_OK,
        Ok(Err(fail)) => fail,
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            Fail(BN_INTERNAL, format!("internal error: {what}"))
        }
    };
    set_last_error(&msg);
    status
}

/// The message of this thread's last failed call, or `""`: valid until this thread's next
/// failed call.
#[no_mangle]
pub extern "C" fn bn_last_error() -> *const c_char {
    LAST_ERROR.with(|e| e.borrow().as_ptr())
}

/// The library's version, as `"major.minor.patch"`.
#[no_mangle]
pub extern "C" fn bn_version() -> *const c_char {
    static VERSION: &CStr =
        match CStr::from_bytes_with_nul(concat!(env!("CARGO_PKG_VERSION"), "\0").as_bytes()) {
            Ok(v) => v,
            Err(_) => panic!("version"),
        };
    VERSION.as_ptr()
}

/// A layer of `channels` channels with PyTorch's defaults (weight 1, bias 0, running mean 0,
/// running variance 1, eps 1e-5, momentum 0.1); `NULL` on failure. Free it with
/// `bn_layer_free`.
#[no_mangle]
pub extern "C" fn bn_layer_new(channels: usize) -> *mut bn_layer {
    let mut layer = std::ptr::null_mut();
    let status = entry(|| {
        // Allocated fallibly: a failed allocation would abort the process, not unwind.
        let filled = |value: f32| {
            let mut v = Vec::new();
            v.try_reserve_exact(channels)
                .map_err(|_| invalid(format!("no memory for {channels} channels")))?;
            v.resize(channels, value);
            Ok::<_, Fail>(v)
        };
        let bn = BatchNorm {
            weight: filled(1.0)?,
            bias: filled(0.0)?,
            running_mean: filled(0.0)?,
            running_var: filled(1.0)?,
            ..BatchNorm::new(0)
        };
        layer = Box::into_raw(Box::new(bn_layer(bn)));
        Ok(())
    });
    debug_assert!(status == BN_OK || layer.is_null());
    layer
}

/// Frees a layer made by `bn_layer_new`; `NULL` is a no-op.
///
/// # Safety
/// `layer` is `NULL` or a layer from `bn_layer_new` not yet freed, used by no other thread.
#[no_mangle]
pub unsafe extern "C" fn bn_layer_free(layer: *mut bn_layer) {
    if !layer.is_null() {
        // SAFETY: the caller passes a pointer from `Box::into_raw` in `bn_layer_new`, once.
        drop(unsafe { Box::from_raw(layer) });
    }
}

/// Sets the layer's parameters: each pointer (`channels` floats) may be `NULL` to leave that
/// field as it is; `eps` finite and >= 0; `momentum` in `[0, 1]`, or < 0 for the cumulative
/// average (PyTorch's `momentum=None`). On failure nothing changes.
///
/// # Safety
/// `layer` is a live layer used by no other thread; each non-NULL pointer points to
/// `channels` readable floats.
#[no_mangle]
pub unsafe extern "C" fn bn_layer_set(
    layer: *mut bn_layer,
    weight: *const f32,
    bias: *const f32,
    running_mean: *const f32,
    running_var: *const f32,
    eps: f64,
    momentum: f64,
) -> bn_status {
    entry(|| {
        // SAFETY: the caller's contract.
        let layer = &mut unsafe { layer_mut(layer) }?.0;
        let c = layer.channels();
        if !(eps.is_finite() && eps >= 0.0) {
            return Err(Error::Eps(eps).into());
        }
        let momentum = if momentum < 0.0 {
            None
        } else if momentum <= 1.0 {
            Some(momentum)
        } else {
            return Err(Error::Momentum(momentum).into());
        };
        let mut fields = [
            (weight, "weight", None),
            (bias, "bias", None),
            (running_mean, "running_mean", None),
            (running_var, "running_var", None),
        ];
        for (p, what, values) in &mut fields {
            if !p.is_null() {
                // SAFETY: non-NULL, `c` readable floats by the caller's contract.
                *values = Some(unsafe { slice(*p, c, what) }?.to_vec());
            }
        }
        let [w, b, m, v] = fields.map(|(_, _, values)| values);
        for (field, values) in [
            (&mut layer.weight, w),
            (&mut layer.bias, b),
            (&mut layer.running_mean, m),
            (&mut layer.running_var, v),
        ] {
            if let Some(values) = values {
                *field = values;
            }
        }
        layer.eps = eps;
        layer.momentum = momentum;
        Ok(())
    })
}

/// Reads the layer's parameters and running statistics (`channels` floats each) and the
/// number of training batches seen; any pointer may be `NULL` to skip that field.
///
/// # Safety
/// `layer` is a live layer; each non-NULL pointer points to writable room for its field,
/// not overlapping the others.
#[no_mangle]
pub unsafe extern "C" fn bn_layer_get(
    layer: *const bn_layer,
    weight: *mut f32,
    bias: *mut f32,
    running_mean: *mut f32,
    running_var: *mut f32,
    num_batches_tracked: *mut u64,
) -> bn_status {
    entry(|| {
        // SAFETY: the caller's contract.
        let layer = &unsafe { layer_ref(layer) }?.0;
        let c = layer.channels();
        disjoint(&[
            Region::output(weight, floats(c), "weight"),
            Region::output(bias, floats(c), "bias"),
            Region::output(running_mean, floats(c), "running_mean"),
            Region::output(running_var, floats(c), "running_var"),
            Region::output(num_batches_tracked, 8, "num_batches_tracked"),
        ])?;
        // SAFETY: room for `c` floats (one u64) behind each non-NULL pointer by the caller's
        // contract; disjoint. All are checked before any is written.
        let (outputs, batches) = unsafe {
            (
                [
                    optional_mut(weight, c, "weight")?,
                    optional_mut(bias, c, "bias")?,
                    optional_mut(running_mean, c, "running_mean")?,
                    optional_mut(running_var, c, "running_var")?,
                ],
                optional_mut(num_batches_tracked, 1, "num_batches_tracked")?,
            )
        };
        let fields = [
            &layer.weight,
            &layer.bias,
            &layer.running_mean,
            &layer.running_var,
        ];
        for (out, values) in outputs.into_iter().zip(fields) {
            if let Some(out) = out {
                out.copy_from_slice(values);
            }
        }
        if let Some(batches) = batches {
            batches[0] = layer.num_batches_tracked;
        }
        Ok(())
    })
}

/// Training's forward pass on `float` tensors of `n * c * spatial` elements: normalizes `x`
/// into `y` (`x == y`: in place) with the batch statistics and updates the running
/// statistics; `saved_mean` and `saved_invstd` (`c` floats each, `NULL` to skip) receive what
/// `bn_backward_f32` needs.
///
/// # Safety
/// `layer` is a live layer used by no other thread; the pointers point to their sizes
/// (`x`, `y`: `n * c * spatial` floats; `saved_*`: `c`).
#[no_mangle]
pub unsafe extern "C" fn bn_forward_train_f32(
    layer: *mut bn_layer,
    x: *const f32,
    y: *mut f32,
    n: usize,
    c: usize,
    spatial: usize,
    layout: bn_layout,
    saved_mean: *mut f32,
    saved_invstd: *mut f32,
) -> bn_status {
    let tensor = bn_tensor::new(n, c, spatial, layout, BN_F32);
    let no_residual = std::ptr::null();
    // SAFETY: the caller's contract, which is that of `bn_forward_train`.
    unsafe {
        bn_forward_train(
            layer,
            tensor,
            x.cast(),
            y.cast(),
            no_residual,
            0,
            saved_mean,
            saved_invstd,
        )
    }
}

/// Inference on `float` tensors: normalizes `x` into `y` (`x == y`: in place) with the running
/// statistics.
///
/// # Safety
/// `layer` is a live layer; `x` and `y` point to `n * c * spatial` floats.
#[no_mangle]
pub unsafe extern "C" fn bn_forward_eval_f32(
    layer: *const bn_layer,
    x: *const f32,
    y: *mut f32,
    n: usize,
    c: usize,
    spatial: usize,
    layout: bn_layout,
) -> bn_status {
    let tensor = bn_tensor::new(n, c, spatial, layout, BN_F32);
    // SAFETY: the caller's contract, which is that of `bn_forward_eval`.
    unsafe { bn_forward_eval(layer, tensor, x.cast(), y.cast(), std::ptr::null(), 0) }
}

/// Training's backward pass on `float` tensors: from `x`, the output gradient `dy` and the
/// statistics saved by `bn_forward_train_f32` (`c` floats each), writes `dx` and the
/// parameter gradients `dweight`, `dbias` (`c` floats each, `NULL` to skip). `dx` may not
/// overlap `x` or `dy`.
///
/// # Safety
/// `layer` is a live layer; the pointers point to their sizes.
#[no_mangle]
pub unsafe extern "C" fn bn_backward_f32(
    layer: *const bn_layer,
    x: *const f32,
    dy: *const f32,
    saved_mean: *const f32,
    saved_invstd: *const f32,
    dx: *mut f32,
    dweight: *mut f32,
    dbias: *mut f32,
    n: usize,
    c: usize,
    spatial: usize,
    layout: bn_layout,
) -> bn_status {
    let tensor = bn_tensor::new(n, c, spatial, layout, BN_F32);
    let saved = bn_saved {
        mean: saved_mean,
        invstd: saved_invstd,
    };
    let grads = bn_grads {
        dweight,
        dbias,
        d_residual: std::ptr::null_mut(),
    };
    // SAFETY: the caller's contract, which is that of `bn_backward` without `y` and `relu`.
    unsafe {
        bn_backward(
            layer,
            tensor,
            x.cast(),
            std::ptr::null(),
            dy.cast(),
            dx.cast(),
            saved,
            grads,
            0,
        )
    }
}

/// The shape, layout and element type of a call's tensors.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct bn_tensor {
    /// Batch size.
    pub n: usize,
    /// Channels.
    pub c: usize,
    /// Spatial positions per channel and image (`H * W`, `D * H * W`, `L`, or 1).
    pub spatial: usize,
    /// `BN_NCHW` or `BN_NHWC`.
    pub layout: bn_layout,
    /// `BN_F32`, `BN_F16` or `BN_BF16`.
    pub dtype: bn_dtype,
}

impl bn_tensor {
    fn new(n: usize, c: usize, spatial: usize, layout: bn_layout, dtype: bn_dtype) -> bn_tensor {
        bn_tensor {
            n,
            c,
            spatial,
            layout,
            dtype,
        }
    }

    /// `Error::Channels` unless the layer has `c` channels: checked before any slice is made
    /// from the caller's pointers, whose sizes follow from `c`.
    fn check_channels(&self, layer: &BatchNorm<f32>) -> Result<(), Fail> {
        if self.c == layer.channels() {
            Ok(())
        } else {
            Err(Error::Channels {
                expected: layer.channels(),
                got: self.c,
            }
            .into())
        }
    }

    fn shape_layout(&self) -> Result<(Shape, Layout), Fail> {
        let layout = match self.layout {
            BN_NCHW => Layout::Nchw,
            BN_NHWC => Layout::Nhwc,
            other => return Err(invalid(format!("unknown layout {other}"))),
        };
        Ok((Shape::new(self.n, self.c, self.spatial), layout))
    }
}

/// Statistics saved by training's forward pass (`c` floats each).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct bn_saved {
    /// Batch mean per channel.
    pub mean: *const f32,
    /// `1 / sqrt(biased variance + eps)` per channel.
    pub invstd: *const f32,
}

/// Where the backward pass writes its other gradients; each may be `NULL` to skip it.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct bn_grads {
    /// `c` floats: `Σ dz * xhat`.
    pub dweight: *mut f32,
    /// `c` floats: `Σ dz`.
    pub dbias: *mut f32,
    /// A tensor like `dy`: the residual's gradient `dz` (`dy` masked by the ReLU).
    pub d_residual: *mut c_void,
}

/// Training's forward pass of any element type with a fused epilogue,
/// `y = relu?(bn(x) + residual?)`: `residual` (a tensor like `x`, not overlapping `y`) may be
/// `NULL`; `relu` nonzero applies the ReLU. `x == y`: in place. `saved_mean`,
/// `saved_invstd`: as `bn_forward_train_f32`.
///
/// # Safety
/// `layer` is a live layer used by no other thread; the pointers point to their sizes.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn bn_forward_train(
    layer: *mut bn_layer,
    tensor: bn_tensor,
    x: *const c_void,
    y: *mut c_void,
    residual: *const c_void,
    relu: c_int,
    saved_mean: *mut f32,
    saved_invstd: *mut f32,
) -> bn_status {
    entry(|| {
        // SAFETY: the caller's contract.
        let layer = &mut unsafe { layer_mut(layer) }?.0;
        tensor.check_channels(layer)?;
        let call = Call {
            tensor,
            x,
            y,
            residual,
            relu: relu != 0,
        };
        let c = tensor.c;
        let mut regions = call.regions()?;
        regions.push(Region::output(saved_mean, floats(c), "saved_mean"));
        regions.push(Region::output(saved_invstd, floats(c), "saved_invstd"));
        disjoint(&regions)?;
        // SAFETY: room for `c` floats behind each non-NULL pointer by the caller's contract;
        // disjoint from the tensors and each other.
        let outputs = unsafe {
            [
                optional_mut(saved_mean, c, "saved_mean")?,
                optional_mut(saved_invstd, c, "saved_invstd")?,
            ]
        };
        let saved = by_dtype!(tensor.dtype, call.train(layer))?;
        let [mean, invstd] = outputs;
        for (out, values) in [(mean, &saved.mean), (invstd, &saved.invstd)] {
            if let Some(out) = out {
                out.copy_from_slice(values);
            }
        }
        Ok(())
    })
}

/// Inference of any element type with a fused epilogue, `y = relu?(bn(x) + residual?)`:
/// as `bn_forward_train` with the running statistics.
///
/// # Safety
/// `layer` is a live layer; the pointers point to their sizes.
#[no_mangle]
pub unsafe extern "C" fn bn_forward_eval(
    layer: *const bn_layer,
    tensor: bn_tensor,
    x: *const c_void,
    y: *mut c_void,
    residual: *const c_void,
    relu: c_int,
) -> bn_status {
    entry(|| {
        // SAFETY: the caller's contract.
        let layer = &unsafe { layer_ref(layer) }?.0;
        tensor.check_channels(layer)?;
        let call = Call {
            tensor,
            x,
            y,
            residual,
            relu: relu != 0,
        };
        disjoint(&call.regions()?)?;
        by_dtype!(tensor.dtype, call.eval(layer))
    })
}

/// The backward pass of `bn_forward_train` (any element type, fused epilogue): `y` is that
/// call's output (read for the ReLU's mask `y > 0`; may be `NULL` when `relu` is 0), `dy`
/// the output gradient; writes `dx` and the gradients in `grads`. No output may overlap an
/// input or another output.
///
/// # Safety
/// `layer` is a live layer; the pointers point to their sizes.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn bn_backward(
    layer: *const bn_layer,
    tensor: bn_tensor,
    x: *const c_void,
    y: *const c_void,
    dy: *const c_void,
    dx: *mut c_void,
    saved: bn_saved,
    grads: bn_grads,
    relu: c_int,
) -> bn_status {
    entry(|| {
        // SAFETY: the caller's contract.
        let layer = &unsafe { layer_ref(layer) }?.0;
        tensor.check_channels(layer)?;
        let back = Back {
            tensor,
            x,
            y,
            dy,
            dx,
            saved,
            grads,
            relu: relu != 0,
        };
        by_dtype!(tensor.dtype, back.run(layer))
    })
}

/// A forward call's tensors.
struct Call {
    tensor: bn_tensor,
    x: *const c_void,
    y: *mut c_void,
    residual: *const c_void,
    relu: bool,
}

impl Call {
    fn len(&self) -> Result<usize, Fail> {
        Ok(self.tensor.shape_layout()?.0.numel()?)
    }

    /// The call's memory regions, `x` left out when it is `y` (in place).
    fn regions(&self) -> Result<Vec<Region>, Fail> {
        let (len, size) = (self.len()?, elem_size(self.tensor.dtype)?);
        let mut r = vec![
            Region::output(self.y, len.saturating_mul(size), "y"),
            Region::input(self.residual, len.saturating_mul(size), "residual"),
        ];
        if self.x != self.y.cast_const() {
            r.push(Region::input(self.x, len.saturating_mul(size), "x"));
        }
        Ok(r)
    }

    /// The call's tensors as slices: `x` and `y`, or `y` alone (in place), and the fuse. The
    /// caller has checked [`regions`](Self::regions) disjoint (with any other outputs).
    fn tensors<D: Data>(&self) -> Result<(Io<'_, D>, Fuse<'_, D>), Fail> {
        let len = self.len()?;
        let residual = if self.residual.is_null() {
            None
        } else {
            // SAFETY: the caller's contract gives `len` elements behind each
            // non-NULL pointer; the regions were checked disjoint but for `x == y`, one buffer.
            Some(unsafe { slice(self.residual.cast::<D>(), len, "residual") }?)
        };
        let fuse = Fuse {
            residual,
            relu: self.relu,
        };
        // SAFETY: as above.
        let y = unsafe { slice_mut(self.y.cast::<D>(), len, "y") }?;
        if self.x == self.y.cast_const() {
            Ok((Io::InPlace(y), fuse))
        } else {
            // SAFETY: as above; `x` is not `y`.
            let x = unsafe { slice(self.x.cast::<D>(), len, "x") }?;
            Ok((Io::Apart(x, y), fuse))
        }
    }

    fn train<D: Data<Param = f32>>(
        &self,
        layer: &mut BatchNorm<f32>,
    ) -> Result<SavedStats<f32>, Fail> {
        let (shape, layout) = self.tensor.shape_layout()?;
        Ok(match self.tensors::<D>()? {
            (Io::Apart(x, y), fuse) => layer.forward_train_fused(x, y, shape, layout, fuse),
            (Io::InPlace(xy), fuse) => layer.forward_train_fused_in_place(xy, shape, layout, fuse),
        }?)
    }

    fn eval<D: Data<Param = f32>>(&self, layer: &BatchNorm<f32>) -> Result<(), Fail> {
        let (shape, layout) = self.tensor.shape_layout()?;
        Ok(match self.tensors::<D>()? {
            (Io::Apart(x, y), fuse) => layer.forward_eval_fused(x, y, shape, layout, fuse),
            (Io::InPlace(xy), fuse) => layer.forward_eval_fused_in_place(xy, shape, layout, fuse),
        }?)
    }
}

/// A forward call's input and output.
enum Io<'a, D> {
    Apart(&'a [D], &'a mut [D]),
    InPlace(&'a mut [D]),
}

/// A backward call's tensors.
struct Back {
    tensor: bn_tensor,
    x: *const c_void,
    y: *const c_void,
    dy: *const c_void,
    dx: *mut c_void,
    saved: bn_saved,
    grads: bn_grads,
    relu: bool,
}

impl Back {
    fn run<D: Data<Param = f32>>(&self, layer: &BatchNorm<f32>) -> Result<(), Fail> {
        let (shape, layout) = self.tensor.shape_layout()?;
        let len = shape.numel()?;
        let bytes = len.saturating_mul(std::mem::size_of::<D>());
        let c = shape.c;
        let (g, s) = (self.grads, self.saved);
        disjoint(&[
            Region::input(self.x, bytes, "x"),
            Region::input(self.y, bytes, "y"),
            Region::input(self.dy, bytes, "dy"),
            Region::output(self.dx, bytes, "dx"),
            Region::output(g.d_residual, bytes, "d_residual"),
            Region::output(g.dweight, floats(c), "dweight"),
            Region::output(g.dbias, floats(c), "dbias"),
            Region::input(s.mean, floats(c), "saved_mean"),
            Region::input(s.invstd, floats(c), "saved_invstd"),
        ])?;
        // SAFETY: the caller's contract gives each pointer its size (`y` too with `relu`);
        // the regions were just found disjoint (no written one overlaps another).
        let (mean, invstd, x, dy, dx, dr, dweight, dbias, y) = unsafe {
            (
                slice(s.mean, c, "saved_mean")?,
                slice(s.invstd, c, "saved_invstd")?,
                slice(self.x.cast::<D>(), len, "x")?,
                slice(self.dy.cast::<D>(), len, "dy")?,
                slice_mut(self.dx.cast::<D>(), len, "dx")?,
                optional_mut(g.d_residual.cast::<D>(), len, "d_residual")?,
                optional_mut(g.dweight, c, "dweight")?,
                optional_mut(g.dbias, c, "dbias")?,
                if self.relu {
                    Some(slice(self.y.cast::<D>(), len, "y")?)
                } else {
                    None
                },
            )
        };
        let saved = SavedStats {
            mean: mean.to_vec(),
            invstd: invstd.to_vec(),
        };
        let grads = if let Some(y) = y {
            layer.backward_fused(x, y, dy, &saved, dx, dr, shape, layout, true)?
        } else {
            // Without the ReLU, the residual's gradient is `dy` itself.
            let grads = layer.backward(x, dy, &saved, dx, shape, layout)?;
            if let Some(dr) = dr {
                dr.copy_from_slice(dy);
            }
            grads
        };
        for (out, values) in [(dweight, &grads.weight), (dbias, &grads.bias)] {
            if let Some(out) = out {
                out.copy_from_slice(values);
            }
        }
        Ok(())
    }
}

fn elem_size(dtype: bn_dtype) -> Result<usize, Fail> {
    match dtype {
        BN_F32 => Ok(4),
        BN_F16 | BN_BF16 => Ok(2),
        other => Err(invalid(format!("unknown data type {other}"))),
    }
}

/// A buffer's bytes, for the overlap check (`NULL` buffers take no room).
struct Region {
    start: usize,
    bytes: usize,
    written: bool,
    what: &'static str,
}

impl Region {
    /// A buffer the call reads: inputs may overlap each other.
    fn input<T>(p: *const T, bytes: usize, what: &'static str) -> Region {
        Region {
            start: p as usize,
            bytes: if p.is_null() { 0 } else { bytes },
            written: false,
            what,
        }
    }

    /// A buffer the call writes: it may overlap nothing.
    fn output<T>(p: *mut T, bytes: usize, what: &'static str) -> Region {
        Region {
            written: true,
            ..Region::input(p, bytes, what)
        }
    }
}

/// `c` floats.
fn floats(c: usize) -> usize {
    c.saturating_mul(4)
}

/// `BN_INVALID_ARGUMENT` when a written region overlaps another region.
fn disjoint(regions: &[Region]) -> Result<(), Fail> {
    for (i, a) in regions.iter().enumerate() {
        for b in &regions[i + 1..] {
            let overlap = (a.written || b.written)
                && a.bytes > 0
                && b.bytes > 0
                && a.start < b.start.saturating_add(b.bytes)
                && b.start < a.start.saturating_add(a.bytes);
            if overlap {
                return Err(invalid(format!("`{}` overlaps `{}`", a.what, b.what)));
            }
        }
    }
    Ok(())
}

/// `p` as a reference, or `BN_INVALID_ARGUMENT` when it is NULL or misaligned.
fn aligned<T>(p: *mut T, what: &str) -> Result<*mut T, Fail> {
    if p.is_null() {
        Err(invalid(format!("`{what}` is NULL")))
    } else if !p.is_aligned() {
        Err(invalid(format!("`{what}` is not aligned for its type")))
    } else {
        Ok(p)
    }
}

/// The `len` elements at `p`, after checking that `p` is non-NULL and aligned and that the
/// bytes fit in `isize`.
///
/// # Safety
/// A non-NULL `p` points to `len` initialized elements that nothing writes for `'a`.
unsafe fn slice<'a, T>(p: *const T, len: usize, what: &str) -> Result<&'a [T], Fail> {
    let p = checked(p.cast_mut(), len, what)?;
    // SAFETY: non-NULL, aligned, `len` elements by the caller's contract, size within isize.
    Ok(unsafe { std::slice::from_raw_parts(p, len) })
}

/// [`slice`], mutable.
///
/// # Safety
/// A non-NULL `p` points to `len` initialized elements that nothing else reads or writes for
/// `'a`.
unsafe fn slice_mut<'a, T>(p: *mut T, len: usize, what: &str) -> Result<&'a mut [T], Fail> {
    let p = checked(p, len, what)?;
    // SAFETY: as `slice`, and exclusive by the caller's contract (made from the caller's
    // mutable pointer itself, so that writes through it are allowed).
    Ok(unsafe { std::slice::from_raw_parts_mut(p, len) })
}

/// `p` after checking that it is non-NULL and aligned and that `len` elements fit in `isize`.
fn checked<T>(p: *mut T, len: usize, what: &str) -> Result<*mut T, Fail> {
    let p = aligned(p, what)?;
    if len > isize::MAX as usize / std::mem::size_of::<T>().max(1) {
        return Err(invalid(format!("`{what}` is larger than memory")));
    }
    Ok(p)
}

/// [`slice_mut`], or `None` for a NULL `p`.
///
/// # Safety
/// As [`slice_mut`].
unsafe fn optional_mut<'a, T>(
    p: *mut T,
    len: usize,
    what: &str,
) -> Result<Option<&'a mut [T]>, Fail> {
    if p.is_null() {
        Ok(None)
    } else {
        // SAFETY: the caller's contract.
        unsafe { slice_mut(p, len, what) }.map(Some)
    }
}

/// # Safety
/// `p` is NULL or a live layer.
unsafe fn layer_ref<'a>(p: *const bn_layer) -> Result<&'a bn_layer, Fail> {
    // SAFETY: a live layer by the caller's contract.
    Ok(unsafe { &*aligned(p.cast_mut(), "layer")? })
}

/// # Safety
/// `p` is NULL or a live layer that nothing else uses for `'a`.
unsafe fn layer_mut<'a>(p: *mut bn_layer) -> Result<&'a mut bn_layer, Fail> {
    // SAFETY: a live layer, exclusive by the caller's contract.
    Ok(unsafe { &mut *aligned(p, "layer")? })
}
