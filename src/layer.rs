//! The layer: parameters, running statistics, and the checks that keep them consistent.

use crate::element::{Data, Element};
use crate::error::{check_eps, check_len, check_xy, Error};
use crate::exec;
use crate::fuse::{relu_gradient, with_epilogue, Fuse, OverBuffers};
use crate::kernels::backward::{BackAffine, GradSums};
use crate::kernels::buffers::{Buffers, Grad, InPlace, Split};
use crate::kernels::normalize::{fill_affine, Affine};
use crate::moments::Moments;
use crate::shape::{Layout, Shape};

/// Batch normalization over the channel dimension, as PyTorch's `BatchNorm{1,2,3}d`.
///
/// Training normalizes each channel with the batch's mean and biased variance,
/// `y = (x - mean) / sqrt(var + eps) * weight + bias`, and moves the running statistics:
/// `running = (1 - m) * running + m * batch`, with the unbiased batch variance `M2 / (n - 1)`
/// unless [`unbiased_running_var`](Self::unbiased_running_var) is false (ONNX). With
/// `momentum: None`, `m = 1 / num_batches_tracked` (after incrementing it): the cumulative
/// average over all batches. Inference normalizes with the running statistics.
///
/// The fields are public, like a PyTorch module's parameters and buffers; every call checks
/// that their lengths agree with the shape it is given.
#[derive(Clone, Debug, PartialEq)]
pub struct BatchNorm<T> {
    /// Gamma, one per channel.
    pub weight: Vec<T>,
    /// Beta, one per channel.
    pub bias: Vec<T>,
    /// Running mean, one per channel.
    pub running_mean: Vec<T>,
    /// Running variance, one per channel.
    pub running_var: Vec<T>,
    /// Added to the variance before the square root. Default `1e-5`.
    pub eps: f64,
    /// Weight of the new batch in the running statistics. Default `Some(0.1)`; `None` is the
    /// cumulative average.
    pub momentum: Option<f64>,
    /// Whether `running_var` takes the unbiased batch variance (PyTorch, the default) or the
    /// biased one (ONNX).
    pub unbiased_running_var: bool,
    /// Training batches seen.
    pub num_batches_tracked: u64,
}

/// The parameter gradients of the backward pass, per channel.
#[derive(Clone, Debug, PartialEq)]
pub struct Gradients<T> {
    /// `dweight = Σ dy * xhat` (gamma's gradient).
    pub weight: Vec<T>,
    /// `dbias = Σ dy` (beta's gradient).
    pub bias: Vec<T>,
}

/// What training's forward pass saves for the backward pass: per channel, the batch mean and
/// `invstd = 1 / sqrt(biased var + eps)`.
#[derive(Clone, Debug, PartialEq)]
pub struct SavedStats<T> {
    /// Batch mean per channel.
    pub mean: Vec<T>,
    /// `1 / sqrt(var + eps)` per channel, with the biased batch variance.
    pub invstd: Vec<T>,
}

impl<T: Element> BatchNorm<T> {
    /// A layer of `channels` channels with PyTorch's defaults: weight 1, bias 0, running mean 0,
    /// running variance 1, eps 1e-5, momentum 0.1, unbiased running variance.
    pub fn new(channels: usize) -> Self {
        let one = T::from_f64(1.0);
        BatchNorm {
            weight: vec![one; channels],
            bias: vec![T::ZERO; channels],
            running_mean: vec![T::ZERO; channels],
            running_var: vec![one; channels],
            eps: 1e-5,
            momentum: Some(0.1),
            unbiased_running_var: true,
            num_batches_tracked: 0,
        }
    }

    /// A layer with ONNX `BatchNormalization`'s conventions: `momentum` weights the *old*
    /// running value (ONNX's default 0.9 is PyTorch's 0.1) and the running variance takes the
    /// biased batch variance. An invalid `momentum` is reported by the first training call.
    pub fn onnx(channels: usize, epsilon: f64, momentum: f64) -> Self {
        BatchNorm {
            eps: epsilon,
            momentum: Some(1.0 - momentum),
            unbiased_running_var: false,
            ..BatchNorm::new(channels)
        }
    }

    /// Number of channels (the length of `weight`).
    pub fn channels(&self) -> usize {
        self.weight.len()
    }

    /// Training's forward pass: normalizes `x` into `y` with the batch statistics, updates the
    /// running statistics, and returns what the backward pass needs.
    pub fn forward_train<D: Data<Param = T>>(
        &mut self,
        x: &[D],
        y: &mut [D],
        shape: Shape,
        layout: Layout,
    ) -> Result<SavedStats<T>, Error> {
        self.forward_train_fused(x, y, shape, layout, Fuse::default())
    }

    /// [`forward_train`](Self::forward_train) writing over its input.
    pub fn forward_train_in_place<D: Data<Param = T>>(
        &mut self,
        xy: &mut [D],
        shape: Shape,
        layout: Layout,
    ) -> Result<SavedStats<T>, Error> {
        self.forward_train_fused_in_place(xy, shape, layout, Fuse::default())
    }

    /// [`forward_train`](Self::forward_train) followed, in the same pass, by what `fuse` asks
    /// for: `y = relu(bn(x) + residual)` (see [`Fuse`]). The statistics are those of `x`.
    pub fn forward_train_fused<D: Data<Param = T>>(
        &mut self,
        x: &[D],
        y: &mut [D],
        shape: Shape,
        layout: Layout,
        fuse: Fuse<'_, D>,
    ) -> Result<SavedStats<T>, Error> {
        check_xy(shape, x.len(), y.len())?;
        fuse.check(x.len())?;
        with_epilogue(Split::new(x, y), fuse, Train(self, shape, layout))
    }

    /// [`forward_train_fused`](Self::forward_train_fused) writing over its input (the residual
    /// is a separate buffer: safe Rust cannot make it alias `xy`).
    pub fn forward_train_fused_in_place<D: Data<Param = T>>(
        &mut self,
        xy: &mut [D],
        shape: Shape,
        layout: Layout,
        fuse: Fuse<'_, D>,
    ) -> Result<SavedStats<T>, Error> {
        fuse.check(xy.len())?;
        with_epilogue(InPlace::new(xy), fuse, Train(self, shape, layout))
    }

    /// Inference: normalizes `x` into `y` with the running statistics.
    pub fn forward_eval<D: Data<Param = T>>(
        &self,
        x: &[D],
        y: &mut [D],
        shape: Shape,
        layout: Layout,
    ) -> Result<(), Error> {
        self.forward_eval_fused(x, y, shape, layout, Fuse::default())
    }

    /// [`forward_eval`](Self::forward_eval) writing over its input.
    pub fn forward_eval_in_place<D: Data<Param = T>>(
        &self,
        xy: &mut [D],
        shape: Shape,
        layout: Layout,
    ) -> Result<(), Error> {
        self.forward_eval_fused_in_place(xy, shape, layout, Fuse::default())
    }

    /// [`forward_eval`](Self::forward_eval) followed, in the same pass, by what `fuse` asks
    /// for: `y = relu(bn(x) + residual)` (see [`Fuse`]).
    pub fn forward_eval_fused<D: Data<Param = T>>(
        &self,
        x: &[D],
        y: &mut [D],
        shape: Shape,
        layout: Layout,
        fuse: Fuse<'_, D>,
    ) -> Result<(), Error> {
        check_xy(shape, x.len(), y.len())?;
        fuse.check(x.len())?;
        with_epilogue(Split::new(x, y), fuse, Eval(self, shape, layout))
    }

    /// [`forward_eval_fused`](Self::forward_eval_fused) writing over its input.
    pub fn forward_eval_fused_in_place<D: Data<Param = T>>(
        &self,
        xy: &mut [D],
        shape: Shape,
        layout: Layout,
        fuse: Fuse<'_, D>,
    ) -> Result<(), Error> {
        fuse.check(xy.len())?;
        with_epilogue(InPlace::new(xy), fuse, Eval(self, shape, layout))
    }

    /// The inference normalization folded into one multiply-add per element,
    /// `y = x * scale[c] + shift[c]`, for [`crate::apply_scale_shift`]:
    /// `scale = weight / sqrt(running_var + eps)`, `shift = bias - running_mean * scale`.
    pub fn scale_shift(&self) -> Result<(Vec<T>, Vec<T>), Error> {
        let c = self.channels();
        let (mut scale, mut shift) = (vec![T::ZERO; c], vec![T::ZERO; c]);
        crate::ops::fold_scale_shift(
            &self.running_mean,
            &self.running_var,
            &self.weight,
            &self.bias,
            self.eps,
            &mut scale,
            &mut shift,
        )?;
        Ok((scale, shift))
    }

    /// Training's backward pass: given `x` and the `saved` statistics of the
    /// [`forward_train`](Self::forward_train) call on it, and the output gradient `dy`, writes
    /// the input gradient `dx` and returns the parameter gradients. Per channel, with `M`
    /// values and `xhat = (x - mean) * invstd`:
    ///
    /// `dbias = Σ dy`, `dweight = Σ dy * xhat`,
    /// `dx = weight * invstd / M * (M * dy - dbias - xhat * dweight)`.
    pub fn backward<D: Data<Param = T>>(
        &self,
        x: &[D],
        dy: &[D],
        saved: &SavedStats<T>,
        dx: &mut [D],
        shape: Shape,
        layout: Layout,
    ) -> Result<Gradients<T>, Error> {
        self.check_backward(x, dy, dx, shape)?;
        self.train_backward(Grad::new(x, dy, &[], dx), saved, shape, layout)
    }

    /// The backward pass of [`forward_train_fused`](Self::forward_train_fused), whose output
    /// was `y = act(bn(x) + residual)`: with `relu`, the gradient flows only where `y > 0`
    /// (`dz = if y <= 0 { 0 } else { dy }`, the rule of PyTorch's `threshold_backward`, so no
    /// mask needs keeping: `y` is read instead), then through the batch norm as
    /// [`backward`](Self::backward) with `dz` for `dy`. `d_residual`, when given, receives
    /// `dz`, the residual's gradient. `y` must be given whole even without `relu`.
    #[allow(clippy::too_many_arguments)]
    pub fn backward_fused<D: Data<Param = T>>(
        &self,
        x: &[D],
        y: &[D],
        dy: &[D],
        saved: &SavedStats<T>,
        dx: &mut [D],
        d_residual: Option<&mut [D]>,
        shape: Shape,
        layout: Layout,
        relu: bool,
    ) -> Result<Gradients<T>, Error> {
        self.check_backward(x, dy, dx, shape)?;
        check_len("y", x.len(), y.len())?;
        if let Some(dr) = &d_residual {
            check_len("d_residual", x.len(), dr.len())?;
        }
        check_len("saved.mean", shape.c, saved.mean.len())?;
        check_len("saved.invstd", shape.c, saved.invstd.len())?;
        let Some(dr) = d_residual else {
            // The gradient gated as it is read, in both passes: no buffer for it.
            let gate = if relu { y } else { &[] };
            return self.train_backward(Grad::new(x, dy, gate, dx), saved, shape, layout);
        };
        // The residual's gradient is written anyway: write it first and read it back as the
        // batch norm's `dy` (the same bytes moved as gating `dy` in both passes, and one
        // tensor fewer than writing it from the second).
        relu_gradient(dy, y, relu, dr);
        self.train_backward(Grad::new(x, dr, &[], dx), saved, shape, layout)
    }

    /// [`backward`](Self::backward) over `g` (whose `y`, when not empty, gates `dy`).
    fn train_backward<D: Data<Param = T>>(
        &self,
        g: Grad<'_, D>,
        saved: &SavedStats<T>,
        shape: Shape,
        layout: Layout,
    ) -> Result<Gradients<T>, Error> {
        check_len("saved.mean", shape.c, saved.mean.len())?;
        check_len("saved.invstd", shape.c, saved.invstd.len())?;
        let m = shape.per_channel() as f64;
        let invstd = |c: usize| saved.invstd[c].to_f64();
        let sums = exec::backward(g, shape, layout, &saved.mean, |c, s| {
            self.batch_back_affine(c, saved, s, m)
        });
        Ok(gradients(&sums, invstd))
    }

    /// Channel `c`'s coefficients of training's `dx` from its sums `s` over `m` values:
    /// `dx = w·is·dy - w·is²·dweight/m·(x - mean) - w·is·Σdy/m`, `dweight = Σ dy·(x - mean)·is`.
    pub(crate) fn batch_back_affine(
        &self,
        c: usize,
        saved: &SavedStats<T>,
        s: GradSums,
        m: f64,
    ) -> BackAffine<T> {
        let (w, is) = (self.weight[c].to_f64(), saved.invstd[c].to_f64());
        let dweight = s.dy_xc * is;
        BackAffine {
            hi: saved.mean[c],
            a: T::from_f64(w * is),
            b: T::from_f64(-w * is * is * dweight / m),
            c: T::from_f64(-w * is * s.dy / m),
        }
    }

    /// The backward pass of inference mode, where the running statistics are constants (frozen
    /// batch norm in fine-tuning): `dx = dy * weight * invstd_running`, and the same `dweight`
    /// and `dbias` sums with `xhat` from the running statistics.
    pub fn backward_eval<D: Data<Param = T>>(
        &self,
        x: &[D],
        dy: &[D],
        dx: &mut [D],
        shape: Shape,
        layout: Layout,
    ) -> Result<Gradients<T>, Error> {
        self.check_backward(x, dy, dx, shape)?;
        let invstd = |c: usize| self.running_invstd(c);
        let sums = exec::backward(
            Grad::new(x, dy, &[], dx),
            shape,
            layout,
            &self.running_mean,
            |c, _| BackAffine {
                hi: self.running_mean[c],
                a: T::from_f64(self.weight[c].to_f64() * invstd(c)),
                b: T::ZERO,
                c: T::ZERO,
            },
        );
        Ok(gradients(&sums, invstd))
    }

    pub(crate) fn check_backward<D: Data>(
        &self,
        x: &[D],
        dy: &[D],
        dx: &[D],
        shape: Shape,
    ) -> Result<(), Error> {
        self.check(shape, x.len())?;
        check_len("dy", x.len(), dy.len())?;
        check_len("dx", x.len(), dx.len())
    }

    /// [`check`](Self::check) and the momentum: everything training checks but the count
    /// of values per channel.
    pub(crate) fn check_train(&self, shape: Shape, len: usize) -> Result<(), Error> {
        self.check(shape, len)?;
        match self.momentum {
            Some(m) if !(m.is_finite() && (0.0..=1.0).contains(&m)) => Err(Error::Momentum(m)),
            _ => Ok(()),
        }
    }

    /// Checks the parameters against `shape` and `len` input elements.
    pub(crate) fn check(&self, shape: Shape, len: usize) -> Result<(), Error> {
        let total = shape.numel()?;
        if shape.c != self.channels() {
            return Err(Error::Channels {
                expected: self.channels(),
                got: shape.c,
            });
        }
        check_len("bias", shape.c, self.bias.len())?;
        check_len("running_mean", shape.c, self.running_mean.len())?;
        check_len("running_var", shape.c, self.running_var.len())?;
        check_len("x", total, len)?;
        check_eps(self.eps)
    }

    fn train<B: Buffers<Data: Data<Param = T>>>(
        &mut self,
        buf: B,
        shape: Shape,
        layout: Layout,
    ) -> Result<SavedStats<T>, Error> {
        self.check_train(shape, buf.len())?;
        if shape.per_channel() < 2 {
            return Err(Error::TooFewValues {
                per_channel: shape.per_channel(),
            });
        }
        let (weight, bias, eps) = (&self.weight, &self.bias, self.eps);
        // Every channel holds the same count: multiply by its reciprocal rather than divide
        // (per-channel divisions cost more than the data of a 7x7 channel).
        let count = shape.per_channel() as f64;
        let inv_count = 1.0 / count;
        let invstd = move |m: &Moments| 1.0 / (m.m2 * inv_count + eps).sqrt();
        let moments = exec::train(buf, shape, layout, |c, m| {
            Affine::centered(m.mean, weight[c].to_f64() * invstd(m), bias[c].to_f64())
        });
        let running_var_of_m2 = if self.unbiased_running_var {
            1.0 / (count - 1.0)
        } else {
            inv_count
        };
        Ok(self.update_running(&moments, running_var_of_m2, invstd))
    }

    /// `1 / sqrt(running_var[c] + eps)`: inference's normalization of channel `c`.
    fn running_invstd(&self, c: usize) -> f64 {
        1.0 / (self.running_var[c].to_f64() + self.eps).sqrt()
    }

    /// Moves the running statistics towards the batch's `moments` (the running variance
    /// taking `M2 * running_var_of_m2`) and returns what backward needs, in one loop.
    pub(crate) fn update_running(
        &mut self,
        moments: &[Moments],
        running_var_of_m2: f64,
        invstd: impl Fn(&Moments) -> f64,
    ) -> SavedStats<T> {
        self.num_batches_tracked = self.num_batches_tracked.saturating_add(1);
        let factor = self
            .momentum
            .unwrap_or(1.0 / self.num_batches_tracked as f64);
        let mut saved = SavedStats {
            mean: Vec::with_capacity(moments.len()),
            invstd: Vec::with_capacity(moments.len()),
        };
        let stats = self
            .running_mean
            .iter_mut()
            .zip(self.running_var.iter_mut());
        for ((rm, rv), m) in stats.zip(moments) {
            saved.mean.push(T::from_f64(m.mean));
            saved.invstd.push(T::from_f64(invstd(m)));
            let var = m.m2 * running_var_of_m2;
            *rm = T::from_f64((1.0 - factor) * rm.to_f64() + factor * m.mean);
            *rv = T::from_f64((1.0 - factor) * rv.to_f64() + factor * var);
        }
        saved
    }

    fn eval<B: Buffers<Data: Data<Param = T>>>(
        &self,
        buf: B,
        shape: Shape,
        layout: Layout,
    ) -> Result<(), Error> {
        self.check(shape, buf.len())?;
        // The parameters go to a per-thread scratch buffer: no allocation on the inference
        // path once a thread has run a layer this wide.
        T::with_scratch(|storage| {
            let params = fill_affine(storage, shape.c, |c| {
                Affine::centered(
                    self.running_mean[c].to_f64(),
                    self.weight[c].to_f64() * self.running_invstd(c),
                    self.bias[c].to_f64(),
                )
            });
            exec::apply(buf, shape, layout, &params);
        });
        Ok(())
    }
}

/// `dweight = invstd * Σ dy (x - mean)` and `dbias = Σ dy` from the kernels' sums.
pub(crate) fn gradients<T: Element>(
    sums: &[GradSums],
    invstd: impl Fn(usize) -> f64,
) -> Gradients<T> {
    Gradients {
        weight: sums
            .iter()
            .enumerate()
            .map(|(c, s)| T::from_f64(s.dy_xc * invstd(c)))
            .collect(),
        bias: sums.iter().map(|s| T::from_f64(s.dy)).collect(),
    }
}

/// Training's forward pass over buffers of any epilogue.
struct Train<'l, T>(&'l mut BatchNorm<T>, Shape, Layout);

impl<T: Element, D: Data<Param = T>> OverBuffers<D> for Train<'_, T> {
    type Output = Result<SavedStats<T>, Error>;
    fn run<B: Buffers<Data = D>>(self, buf: B) -> Self::Output {
        self.0.train(buf, self.1, self.2)
    }
}

/// Inference over buffers of any epilogue.
struct Eval<'l, T>(&'l BatchNorm<T>, Shape, Layout);

impl<T: Element, D: Data<Param = T>> OverBuffers<D> for Eval<'_, T> {
    type Output = Result<(), Error>;
    fn run<B: Buffers<Data = D>>(self, buf: B) -> Self::Output {
        self.0.eval(buf, self.1, self.2)
    }
}
