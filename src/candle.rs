//! A batch-norm layer for candle models (`candle` feature), in place of
//! `candle_nn::BatchNorm`: the same constructors and [`ModuleT`], with this crate's kernels
//! behind candle custom ops, so that training updates the running statistics and
//! `loss.backward()` runs this crate's backward pass.
//!
//! - Tensors: `f32`, `f16`, `bf16` on the CPU (another device is an error that says so);
//!   parameters and running statistics `f32` (16-bit parameters from a `VarBuilder` are
//!   converted, and their gradients flow back through the conversion).
//! - Layouts: any rank >= 2 with the channels on axis 1. A standard (NCHW) tensor, or a
//!   channels-last strided view (what `permute((0, 3, 1, 2))` makes of an NHWC tensor), runs
//!   on its memory as it is, and the output has the input's layout; any other strides are
//!   made contiguous first (one copy, as candle's own operations do).
//! - Semantics: PyTorch's (biased variance to normalize, unbiased for the running variance,
//!   `running = (1 - momentum) * running + momentum * batch`), which `candle_nn::BatchNorm`
//!   also follows; `remove_mean: false` is refused.
//! - Fused: [`BatchNorm::forward_t_fused`] adds a residual and a ReLU in the same pass
//!   (ResNet's `relu(bn(x) + shortcut)`), forward and backward.
//!
//! ```
//! use batchnorm::candle::batch_norm;
//! use candle_core::{DType, Device, ModuleT, Tensor};
//! use candle_nn::{VarBuilder, VarMap};
//!
//! let varmap = VarMap::new();
//! let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
//! let bn = batch_norm(4, 1e-5, vb.pp("bn"))?;
//! let x = Tensor::randn(0f32, 1.0, (2, 4, 3, 3), &Device::Cpu)?;
//! let y = bn.forward_t(&x, true)?; // batch statistics; running statistics move
//! let grads = y.sqr()?.sum_all()?.backward()?; // this crate's backward
//! let dx = grads.get(&x);
//! # let _ = dx;
//! # Ok::<(), candle_core::Error>(())
//! ```

use crate::element::Data;
use crate::fuse::{relu_gradient, Fuse};
use crate::half::{bf16, f16};
use crate::layer::{BatchNorm as Layer, Gradients, SavedStats};
use crate::shape::{Layout, Shape};
use candle_core::backend::BackendStorage;
use candle_core::{
    bail, CpuStorage, CustomOp3, DType, InplaceOp1, Layout as CandleLayout, ModuleT, Result,
    Tensor, Var,
};
use candle_nn::{BatchNormConfig, Init, VarBuilder};
use std::sync::{Arc, Mutex, MutexGuard};

/// Batch normalization for candle tensors, backed by this crate's kernels.
#[derive(Clone, Debug)]
pub struct BatchNorm {
    running_mean: Var,
    running_var: Var,
    weight_and_bias: Option<(Tensor, Tensor)>,
    eps: f64,
    momentum: f64,
}

/// A layer as `candle_nn::batch_norm` makes one: `running_mean`, `running_var` and (with
/// `affine`) `weight` and `bias` from the `VarBuilder`, initialized to 0, 1, 1 and 0.
pub fn batch_norm<C: Into<BatchNormConfig>>(
    num_features: usize,
    config: C,
    vb: VarBuilder,
) -> Result<BatchNorm> {
    let config = config.into();
    if !config.remove_mean {
        bail!("batchnorm::candle: remove_mean = false is not supported");
    }
    let running_mean = vb.get_with_hints(num_features, "running_mean", Init::Const(0.))?;
    let running_var = vb.get_with_hints(num_features, "running_var", Init::Const(1.))?;
    let weight_and_bias = if config.affine {
        let weight = vb.get_with_hints(num_features, "weight", Init::Const(1.))?;
        let bias = vb.get_with_hints(num_features, "bias", Init::Const(0.))?;
        Some((weight, bias))
    } else {
        None
    };
    BatchNorm::build(
        num_features,
        running_mean,
        running_var,
        weight_and_bias,
        config.eps,
        config.momentum,
    )
}

impl BatchNorm {
    /// A layer with these running statistics, weight and bias (`[num_features]` each),
    /// momentum 0.1.
    pub fn new(
        num_features: usize,
        running_mean: Tensor,
        running_var: Tensor,
        weight: Tensor,
        bias: Tensor,
        eps: f64,
    ) -> Result<Self> {
        let wb = Some((weight, bias));
        Self::build(num_features, running_mean, running_var, wb, eps, 0.1)
    }

    /// [`new`](Self::new) with a momentum.
    pub fn new_with_momentum(
        num_features: usize,
        running_mean: Tensor,
        running_var: Tensor,
        weight: Tensor,
        bias: Tensor,
        eps: f64,
        momentum: f64,
    ) -> Result<Self> {
        let wb = Some((weight, bias));
        Self::build(num_features, running_mean, running_var, wb, eps, momentum)
    }

    /// A layer without weight and bias (1 and 0).
    pub fn new_no_bias(
        num_features: usize,
        running_mean: Tensor,
        running_var: Tensor,
        eps: f64,
    ) -> Result<Self> {
        Self::build(num_features, running_mean, running_var, None, eps, 0.1)
    }

    fn build(
        num_features: usize,
        running_mean: Tensor,
        running_var: Tensor,
        weight_and_bias: Option<(Tensor, Tensor)>,
        eps: f64,
        momentum: f64,
    ) -> Result<Self> {
        crate::error::check_eps(eps).map_err(candle_core::Error::wrap)?;
        if !(0.0..=1.0).contains(&momentum) {
            bail!("batchnorm::candle: momentum must be in [0, 1], got {momentum}");
        }
        let mut shaped = vec![
            ("running_mean", &running_mean),
            ("running_var", &running_var),
        ];
        if let Some((w, b)) = &weight_and_bias {
            shaped.extend([("weight", w), ("bias", b)]);
        }
        for (what, t) in shaped {
            if t.dims() != [num_features] {
                bail!(
                    "batchnorm::candle: {what} has shape {:?}, expected [{num_features}]",
                    t.shape()
                );
            }
        }
        Ok(BatchNorm {
            running_mean: Var::from_tensor(&running_mean.to_dtype(DType::F32)?)?,
            running_var: Var::from_tensor(&running_var.to_dtype(DType::F32)?)?,
            weight_and_bias,
            eps,
            momentum,
        })
    }

    /// The running mean (`f32`).
    pub fn running_mean(&self) -> &Tensor {
        self.running_mean.as_tensor()
    }

    /// The running variance (`f32`).
    pub fn running_var(&self) -> &Tensor {
        self.running_var.as_tensor()
    }

    /// The weight and bias, if the layer has them.
    pub fn weight_and_bias(&self) -> Option<(&Tensor, &Tensor)> {
        self.weight_and_bias.as_ref().map(|(w, b)| (w, b))
    }

    /// Added to the variance before the square root.
    pub fn eps(&self) -> f64 {
        self.eps
    }

    /// Weight of a new batch in the running statistics.
    pub fn momentum(&self) -> f64 {
        self.momentum
    }

    fn channels(&self) -> usize {
        self.running_mean.as_tensor().dims()[0]
    }

    /// Weight and bias as `f32` tensors (ones and zeros without them), differentiable.
    fn affine(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        match &self.weight_and_bias {
            Some((w, b)) => Ok((w.to_dtype(DType::F32)?, b.to_dtype(DType::F32)?)),
            None => {
                let c = self.channels();
                Ok((
                    Tensor::ones(c, DType::F32, x.device())?,
                    Tensor::zeros(c, DType::F32, x.device())?,
                ))
            }
        }
    }

    /// This crate's layer with the current parameters and running statistics.
    fn layer(&self, weight: &Tensor, bias: &Tensor) -> Result<Layer<f32>> {
        let mut layer = Layer::new(self.channels());
        layer.weight = weight.to_vec1()?;
        layer.bias = bias.to_vec1()?;
        layer.running_mean = self.running_mean.as_tensor().to_vec1()?;
        layer.running_var = self.running_var.as_tensor().to_vec1()?;
        layer.eps = self.eps;
        layer.momentum = Some(self.momentum);
        Ok(layer)
    }

    /// The device, element type, rank and channel count of an input, or why not.
    fn check_input(&self, x: &Tensor) -> Result<()> {
        if !x.device().is_cpu() {
            bail!(
                "batchnorm::candle runs on the CPU; this tensor is on {:?}",
                x.device().location()
            );
        }
        if !matches!(x.dtype(), DType::F32 | DType::F16 | DType::BF16) {
            bail!(
                "batchnorm::candle: {:?} tensors are not supported (f32, f16, bf16)",
                x.dtype()
            );
        }
        if x.rank() < 2 || x.dim(1)? != self.channels() {
            bail!(
                "batchnorm::candle: input of shape {:?} for {} channels (expected (N, C, ...))",
                x.shape(),
                self.channels()
            );
        }
        Ok(())
    }

    /// Checks the input and returns it as the op sees it: its memory as a standard tensor
    /// (NCHW as it is; a channels-last view permuted to `(N, spatial..., C)`; other strides
    /// made contiguous), and the layout.
    fn memory(&self, x: &Tensor) -> Result<(Tensor, Layout)> {
        self.check_input(x)?;
        let layout = layout_of(x).unwrap_or(Layout::Nchw);
        Ok((in_memory_order(x, layout)?, layout))
    }

    /// Normalizes `x` in place with the running statistics (inference). `x` must be a
    /// standard (NCHW) or channels-last tensor that no other tensor's graph needs: candle's
    /// in-place operations are not tracked by autograd.
    pub fn forward_inplace(&self, x: &Tensor) -> Result<()> {
        self.check_input(x)?;
        let layout = layout_of(x).map_err(candle_core::Error::wrap)?;
        let (w, b) = self.affine(x)?;
        x.inplace_op1(&EvalInPlace {
            layer: self.layer(&w, &b)?,
            layout,
        })
    }
}

impl BatchNorm {
    /// `y = relu(bn(x) + residual)` in one pass, the residual and the ReLU each optional
    /// (ResNet's blocks: [`Fuse`](crate::Fuse)), training (`train`) or inference as
    /// [`forward_t`](ModuleT::forward_t); differentiable in `x`, the residual, weight and bias.
    /// The backward pass gates the gradient with the output (`y > 0`, as PyTorch's
    /// `threshold_backward`) and runs this crate's fused backward. The residual has `x`'s
    /// shape and type; in `x`'s memory layout it is read as it lies, in another it is copied
    /// into that layout first.
    ///
    /// ```
    /// use batchnorm::candle::batch_norm;
    /// use candle_core::{DType, Device, Tensor};
    /// use candle_nn::{VarBuilder, VarMap};
    ///
    /// let varmap = VarMap::new();
    /// let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    /// let bn = batch_norm(4, 1e-5, vb.pp("bn"))?;
    /// let x = Tensor::randn(0f32, 1.0, (2, 4, 3, 3), &Device::Cpu)?;
    /// let shortcut = Tensor::randn(0f32, 1.0, (2, 4, 3, 3), &Device::Cpu)?;
    /// let y = bn.forward_t_fused(&x, Some(&shortcut), true, true)?; // relu(bn(x) + shortcut)
    /// let grads = y.sum_all()?.backward()?;
    /// let d_shortcut = grads.get(&shortcut);
    /// # let _ = d_shortcut;
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn forward_t_fused(
        &self,
        x: &Tensor,
        residual: Option<&Tensor>,
        relu: bool,
        train: bool,
    ) -> Result<Tensor> {
        let (mem, layout) = self.memory(x)?;
        let (w, b) = self.affine(x)?;
        let op = Forward {
            layer: self.layer(&w, &b)?,
            layout,
            train,
            saved: Arc::new(Mutex::new(None)),
            relu,
            residual: residual.is_some(),
        };
        let saved = op.saved.clone();
        let y = match residual {
            Some(r) => {
                if r.dims() != x.dims() || r.dtype() != x.dtype() {
                    bail!(
                        "batchnorm::candle: residual of shape {:?} and type {:?} for an input \
                         of shape {:?} and type {:?}",
                        r.shape(),
                        r.dtype(),
                        x.shape(),
                        x.dtype()
                    );
                }
                if !r.device().same_device(x.device()) {
                    bail!("batchnorm::candle: the residual is on another device");
                }
                // The weight and bias end to end: a custom op takes at most three tensors.
                let wb = Tensor::cat(&[&w, &b], 0)?;
                mem.apply_op3(&in_memory_order(r, layout)?, &wb, op)?
            }
            None => mem.apply_op3(&w, &b, op)?,
        };
        if train {
            let trained = lock(&saved);
            let Some((_, layer)) = trained.as_ref() else {
                bail!("batchnorm::candle: the training op did not run");
            };
            let c = layer.channels();
            let device = x.device();
            self.running_mean
                .set(&Tensor::from_slice(&layer.running_mean, c, device)?)?;
            self.running_var
                .set(&Tensor::from_slice(&layer.running_var, c, device)?)?;
        }
        match layout {
            // Back from `(N, spatial..., C)` to `(N, C, spatial...)`, channels-last strides.
            Layout::Nhwc => {
                let rank = y.rank();
                y.permute(
                    [0, rank - 1]
                        .into_iter()
                        .chain(1..rank - 1)
                        .collect::<Vec<_>>(),
                )
            }
            Layout::Nchw => Ok(y),
        }
    }
}

impl ModuleT for BatchNorm {
    /// Training (`train`: batch statistics, running statistics updated) or inference (running
    /// statistics); differentiable in `x`, weight and bias either way.
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.forward_t_fused(x, None, false, train)
    }
}

/// `x`'s memory in `layout` as a standard tensor: `(N, spatial..., C)` for channels-last (a
/// permuted view of a channels-last tensor, copied if `x` lies otherwise), `x` contiguous for
/// NCHW. Dense memory that candle does not call contiguous (odd strides on axes of length 1)
/// is copied once, which changes nothing else.
fn in_memory_order(x: &Tensor, layout: Layout) -> Result<Tensor> {
    match layout {
        Layout::Nhwc => {
            let rank = x.rank();
            let order: Vec<usize> = [0].into_iter().chain(2..rank).chain([1]).collect();
            x.permute(order)?.contiguous()
        }
        Layout::Nchw => x.contiguous(),
    }
}

/// The mutex's value; a panic elsewhere while it was held leaves nothing half-written here.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The layout of a tensor's memory (see [`Shape::from_strides`]).
fn layout_of(x: &Tensor) -> std::result::Result<Layout, crate::Error> {
    let strides: Vec<isize> = x.stride().iter().map(|&s| s as isize).collect();
    Shape::from_strides(x.dims(), &strides).map(|(_, layout)| layout)
}

/// The elements of a contiguous tensor's storage.
fn elements<'a, D: candle_core::WithDType>(s: &'a CpuStorage, l: &CandleLayout) -> Result<&'a [D]> {
    match l.contiguous_offsets() {
        Some((start, end)) => Ok(&s.as_slice::<D>()?[start..end]),
        None => bail!("batchnorm::candle: expected a contiguous tensor"),
    }
}

/// The shape of a standard tensor holding a tensor's memory in `layout` (`dims` as the op
/// sees them: `(N, C, spatial...)` or `(N, spatial..., C)`).
fn shape_of(dims: &[usize], layout: Layout) -> Shape {
    let n = dims[0];
    let (c, spatial) = match layout {
        Layout::Nchw => (dims[1], &dims[2..]),
        Layout::Nhwc => (dims[dims.len() - 1], &dims[1..dims.len() - 1]),
    };
    Shape::new(n, c, spatial.iter().product())
}

/// Calls `Self::$f::<D>(...)` with the element type of a storage.
macro_rules! by_storage {
    ($storage:expr, $f:ident($($arg:expr),*)) => {
        match $storage {
            CpuStorage::F32(_) => Self::$f::<f32>($($arg),*),
            CpuStorage::F16(_) => Self::$f::<f16>($($arg),*),
            CpuStorage::BF16(_) => Self::$f::<bf16>($($arg),*),
            other => bail!("batchnorm::candle: {:?} tensors are not supported", other.dtype()),
        }
    };
}

/// A vector of `D` as candle storage.
trait Storable: Data<Param = f32> + candle_core::WithDType {
    fn storage(v: Vec<Self>) -> CpuStorage;
}
impl Storable for f32 {
    fn storage(v: Vec<f32>) -> CpuStorage {
        CpuStorage::F32(v)
    }
}
impl Storable for f16 {
    fn storage(v: Vec<f16>) -> CpuStorage {
        CpuStorage::F16(v)
    }
}
impl Storable for bf16 {
    fn storage(v: Vec<bf16>) -> CpuStorage {
        CpuStorage::BF16(v)
    }
}

/// What a training call leaves: the saved statistics, and the layer with its running
/// statistics moved.
type Trained = (SavedStats<f32>, Layer<f32>);

/// `y = relu(bn(x) + residual)` (each part of the epilogue optional) over (x, weight, bias),
/// or (x, residual, weight and bias end to end) with a residual: training or inference with
/// the layer's parameters, which it holds (the parameter tensors are inputs for autograd).
struct Forward {
    layer: Layer<f32>,
    layout: Layout,
    train: bool,
    /// Training: what the backward pass needs, and the layer with its running statistics moved.
    saved: Arc<Mutex<Option<Trained>>>,
    relu: bool,
    /// Whether the second input is a residual.
    residual: bool,
}

impl Forward {
    fn run<D: Storable>(
        &self,
        x: &CpuStorage,
        l: &CandleLayout,
        residual: Option<(&CpuStorage, &CandleLayout)>,
    ) -> Result<(CpuStorage, candle_core::Shape)> {
        let x = elements::<D>(x, l)?;
        let residual = match residual {
            Some((r, lr)) => Some(elements::<D>(r, lr)?),
            None => None,
        };
        let fuse = Fuse {
            residual,
            relu: self.relu,
        };
        let shape = shape_of(l.dims(), self.layout);
        let mut y = vec![D::default(); x.len()];
        if self.train {
            let mut layer = self.layer.clone();
            let saved = layer
                .forward_train_fused(x, &mut y, shape, self.layout, fuse)
                .map_err(candle_core::Error::wrap)?;
            *lock(&self.saved) = Some((saved, layer));
        } else {
            self.layer
                .forward_eval_fused(x, &mut y, shape, self.layout, fuse)
                .map_err(candle_core::Error::wrap)?;
        }
        Ok((D::storage(y), l.shape().clone()))
    }
}

impl CustomOp3 for Forward {
    fn name(&self) -> &'static str {
        "batchnorm"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        l: &CandleLayout,
        second: &CpuStorage,
        l2: &CandleLayout,
        _: &CpuStorage,
        _: &CandleLayout,
    ) -> Result<(CpuStorage, candle_core::Shape)> {
        // (`forward_t_fused` checked the residual's shape and type.)
        let residual = self.residual.then_some((second, l2));
        by_storage!(x, run(self, x, l, residual))
    }

    fn bwd(
        &self,
        x: &Tensor,
        second: &Tensor,
        third: &Tensor,
        y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let mut layer = self.layer.clone();
        let c = layer.channels();
        let weight = if self.residual {
            third.narrow(0, 0, c)?
        } else {
            second.clone()
        };
        layer.weight = weight.to_vec1()?;
        let saved = if self.train {
            let saved = lock(&self.saved);
            match saved.as_ref() {
                Some((saved, _)) => Some(saved.clone()),
                None => bail!("batchnorm::candle: backward before forward"),
            }
        } else {
            None
        };
        let op = Backward {
            layer,
            layout: self.layout,
            saved,
            relu: self.relu,
            residual: self.residual,
            grads: Mutex::new(None),
        };
        let dx = x.apply_op3_no_bwd(&dy.contiguous()?, &y.contiguous()?, &op)?;
        let grads = lock(&op.grads).take();
        let Some((g, d_residual)) = grads else {
            bail!("batchnorm::candle: the backward op did not run");
        };
        let dweight = Tensor::from_vec(g.weight, c, x.device())?;
        let dbias = Tensor::from_vec(g.bias, c, x.device())?;
        Ok(match d_residual {
            Some(dr) => (
                Some(dx),
                Some(dr),
                Some(Tensor::cat(&[&dweight, &dbias], 0)?),
            ),
            None => (Some(dx), Some(dweight), Some(dbias)),
        })
    }
}

/// `dx` over (x, dy, y), keeping the parameter gradients and, with a residual, its gradient:
/// training's backward with the saved statistics, or inference's with the running ones,
/// `dy` gated by `y > 0` with a ReLU.
struct Backward {
    layer: Layer<f32>,
    layout: Layout,
    saved: Option<SavedStats<f32>>,
    relu: bool,
    residual: bool,
    grads: Mutex<Option<(Gradients<f32>, Option<Tensor>)>>,
}

impl Backward {
    fn run<D: Storable>(
        &self,
        (x, lx): (&CpuStorage, &CandleLayout),
        (dy, ldy): (&CpuStorage, &CandleLayout),
        (y, ly): (&CpuStorage, &CandleLayout),
    ) -> Result<(CpuStorage, candle_core::Shape)> {
        let (x, dy, y) = (
            elements::<D>(x, lx)?,
            elements::<D>(dy, ldy)?,
            elements::<D>(y, ly)?,
        );
        let shape = shape_of(lx.dims(), self.layout);
        let mut dx = vec![D::default(); x.len()];
        let mut dr = if self.residual {
            vec![D::default(); x.len()]
        } else {
            Vec::new()
        };
        let (layer, layout) = (&self.layer, self.layout);
        let grads = match &self.saved {
            Some(saved) => {
                let d_residual = self.residual.then_some(&mut dr[..]);
                layer.backward_fused(
                    x, y, dy, saved, &mut dx, d_residual, shape, layout, self.relu,
                )
            }
            None if self.relu || self.residual => {
                // Inference's backward has no fused twin: the gated gradient first, written
                // as the residual's gradient when there is a residual.
                let mut scratch = Vec::new();
                let dz = if self.residual {
                    &mut dr
                } else {
                    scratch.resize(x.len(), D::default());
                    &mut scratch
                };
                relu_gradient(dy, y, self.relu, dz);
                layer.backward_eval(x, dz, &mut dx, shape, layout)
            }
            None => layer.backward_eval(x, dy, &mut dx, shape, layout),
        }
        .map_err(candle_core::Error::wrap)?;
        let d_residual = if self.residual {
            Some(Tensor::from_vec(
                dr,
                lx.shape().clone(),
                &candle_core::Device::Cpu,
            )?)
        } else {
            None
        };
        *lock(&self.grads) = Some((grads, d_residual));
        Ok((D::storage(dx), lx.shape().clone()))
    }
}

impl CustomOp3 for Backward {
    fn name(&self) -> &'static str {
        "batchnorm-backward"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        lx: &CandleLayout,
        dy: &CpuStorage,
        ldy: &CandleLayout,
        y: &CpuStorage,
        ly: &CandleLayout,
    ) -> Result<(CpuStorage, candle_core::Shape)> {
        if x.dtype() != dy.dtype() || x.dtype() != y.dtype() {
            bail!(
                "batchnorm::candle: dy is {:?}, y {:?}, x {:?}",
                dy.dtype(),
                y.dtype(),
                x.dtype()
            );
        }
        by_storage!(x, run(self, (x, lx), (dy, ldy), (y, ly)))
    }
}

/// Inference in place on a tensor's storage.
struct EvalInPlace {
    layer: Layer<f32>,
    layout: Layout,
}

impl EvalInPlace {
    fn run<D: Storable>(&self, xy: &mut [D], l: &CandleLayout) -> Result<()> {
        let strides: Vec<isize> = l.stride().iter().map(|&s| s as isize).collect();
        let (shape, _) =
            Shape::from_strides(l.dims(), &strides).map_err(candle_core::Error::wrap)?;
        let len = shape.numel().map_err(candle_core::Error::wrap)?;
        let start = l.start_offset();
        let Some(xy) = xy.get_mut(start..start + len) else {
            bail!("batchnorm::candle: the tensor's storage is shorter than its layout");
        };
        self.layer
            .forward_eval_in_place(xy, shape, self.layout)
            .map_err(candle_core::Error::wrap)
    }
}

impl InplaceOp1 for EvalInPlace {
    fn name(&self) -> &'static str {
        "batchnorm-inplace"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, l: &CandleLayout) -> Result<()> {
        match storage {
            CpuStorage::F32(v) => self.run(v, l),
            CpuStorage::F16(v) => self.run(v, l),
            CpuStorage::BF16(v) => self.run(v, l),
            other => bail!(
                "batchnorm::candle: {:?} tensors are not supported",
                other.dtype()
            ),
        }
    }
}
