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
use crate::half::{bf16, f16};
use crate::layer::{BatchNorm as Layer, Gradients, SavedStats};
use crate::shape::{Layout, Shape};
use candle_core::backend::BackendStorage;
use candle_core::{
    bail, CpuStorage, CustomOp2, CustomOp3, DType, InplaceOp1, Layout as CandleLayout, ModuleT,
    Result, Tensor, Var,
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
    /// made contiguous), the layout, and the permutation that turns an output of that
    /// shape back into the input's axes.
    fn memory(&self, x: &Tensor) -> Result<(Tensor, Layout, Option<Vec<usize>>)> {
        self.check_input(x)?;
        let (mem, layout, back) = match layout_of(x) {
            Ok(Layout::Nhwc) => {
                let rank = x.rank();
                let to_memory: Vec<usize> = [0].into_iter().chain(2..rank).chain([1]).collect();
                let back: Vec<usize> = [0, rank - 1].into_iter().chain(1..rank - 1).collect();
                (x.permute(to_memory)?, Layout::Nhwc, Some(back))
            }
            Ok(Layout::Nchw) => (x.clone(), Layout::Nchw, None),
            Err(_) => (x.contiguous()?, Layout::Nchw, None),
        };
        // Dense memory that candle does not call contiguous (odd strides on axes of length
        // 1) is copied once, which changes nothing else.
        Ok((mem.contiguous()?, layout, back))
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

impl ModuleT for BatchNorm {
    /// Training (`train`: batch statistics, running statistics updated) or inference (running
    /// statistics); differentiable in `x`, weight and bias either way.
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let (mem, layout, back) = self.memory(x)?;
        let (w, b) = self.affine(x)?;
        let op = Forward {
            layer: self.layer(&w, &b)?,
            layout,
            train,
            saved: Arc::new(Mutex::new(None)),
        };
        let saved = op.saved.clone();
        let y = mem.apply_op3(&w, &b, op)?;
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
        match back {
            Some(back) => y.permute(back),
            None => Ok(y),
        }
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

/// `y = bn(x)` over (x, weight, bias): training or inference with the layer's parameters.
struct Forward {
    layer: Layer<f32>,
    layout: Layout,
    train: bool,
    /// Training: what the backward pass needs, and the layer with its running statistics moved.
    saved: Arc<Mutex<Option<Trained>>>,
}

impl Forward {
    fn run<D: Storable>(
        &self,
        x: &CpuStorage,
        l: &CandleLayout,
    ) -> Result<(CpuStorage, candle_core::Shape)> {
        let x = elements::<D>(x, l)?;
        let shape = shape_of(l.dims(), self.layout);
        let mut y = vec![D::default(); x.len()];
        if self.train {
            let mut layer = self.layer.clone();
            let saved = layer
                .forward_train(x, &mut y, shape, self.layout)
                .map_err(candle_core::Error::wrap)?;
            *lock(&self.saved) = Some((saved, layer));
        } else {
            self.layer
                .forward_eval(x, &mut y, shape, self.layout)
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
        _: &CpuStorage,
        _: &CandleLayout,
        _: &CpuStorage,
        _: &CandleLayout,
    ) -> Result<(CpuStorage, candle_core::Shape)> {
        by_storage!(x, run(self, x, l))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _bias: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let mut layer = self.layer.clone();
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
            grads: Mutex::new(None),
        };
        let dx = x.apply_op2_no_bwd(&dy.contiguous()?, &op)?;
        let grads = lock(&op.grads).take();
        let Some(g) = grads else {
            bail!("batchnorm::candle: the backward op did not run");
        };
        let c = g.weight.len();
        let dweight = Tensor::from_vec(g.weight, c, x.device())?;
        let dbias = Tensor::from_vec(g.bias, c, x.device())?;
        Ok((Some(dx), Some(dweight), Some(dbias)))
    }
}

/// `dx` over (x, dy), keeping the parameter gradients: training's backward with the saved
/// statistics, or inference's with the running ones.
struct Backward {
    layer: Layer<f32>,
    layout: Layout,
    saved: Option<SavedStats<f32>>,
    grads: Mutex<Option<Gradients<f32>>>,
}

impl Backward {
    fn run<D: Storable>(
        &self,
        x: &CpuStorage,
        lx: &CandleLayout,
        dy: &CpuStorage,
        ldy: &CandleLayout,
    ) -> Result<(CpuStorage, candle_core::Shape)> {
        let (x, dy) = (elements::<D>(x, lx)?, elements::<D>(dy, ldy)?);
        let shape = shape_of(lx.dims(), self.layout);
        let mut dx = vec![D::default(); x.len()];
        let grads = match &self.saved {
            Some(saved) => self
                .layer
                .backward(x, dy, saved, &mut dx, shape, self.layout),
            None => self.layer.backward_eval(x, dy, &mut dx, shape, self.layout),
        }
        .map_err(candle_core::Error::wrap)?;
        *lock(&self.grads) = Some(grads);
        Ok((D::storage(dx), lx.shape().clone()))
    }
}

impl CustomOp2 for Backward {
    fn name(&self) -> &'static str {
        "batchnorm-backward"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        lx: &CandleLayout,
        dy: &CpuStorage,
        ldy: &CandleLayout,
    ) -> Result<(CpuStorage, candle_core::Shape)> {
        if x.dtype() != dy.dtype() {
            bail!(
                "batchnorm::candle: dy is {:?}, x {:?}",
                dy.dtype(),
                x.dtype()
            );
        }
        by_storage!(x, run(self, x, lx, dy, ldy))
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
