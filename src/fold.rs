//! Folding a layer's inference into the convolution or linear layer before it.

use crate::element::{Data, Element};
use crate::error::{check_eps, check_len, Error};
use crate::layer::BatchNorm;

impl<T: Element> BatchNorm<T> {
    /// Folds inference into the preceding convolution or linear layer, whose `weight` has the
    /// output channel as its slowest dimension (OIHW, OHWI, `[out, in]`, any rank): with
    /// `s = weight_bn / sqrt(running_var + eps)`,
    ///
    /// `w'[o, ..] = w[o, ..] * s[o]` and `b'[o] = (b[o] - running_mean[o]) * s[o] + bias_bn[o]`,
    ///
    /// so that `conv'(x) = bn(conv(x))` in inference. Each result is computed in f64 from the
    /// stored values and rounded once to `D` (PyTorch's `fuse_conv_bn_eval` computes in the
    /// weight's own type). A layer without a bias passes zeros.
    ///
    /// `weight.len()` must be a multiple of the channel count (`bias.len()` equal to it); on
    /// `Err` nothing is written. Products beyond `D`'s range become infinite, as the
    /// arithmetic says.
    ///
    /// ```
    /// # use batchnorm::BatchNorm;
    /// let mut bn = BatchNorm::<f32>::new(2);
    /// bn.running_var = vec![4.0, 0.25];
    /// bn.running_mean = vec![1.0, -1.0];
    /// bn.eps = 0.0;
    /// let mut weight = vec![1.0f32, 2.0, 3.0, 4.0]; // [out = 2, in = 2]
    /// let mut bias = vec![0.0f32; 2];
    /// bn.fold_into(&mut weight, &mut bias)?;
    /// assert_eq!(weight, [0.5, 1.0, 6.0, 8.0]);
    /// assert_eq!(bias, [-0.5, 2.0]);
    /// # Ok::<(), batchnorm::Error>(())
    /// ```
    pub fn fold_into<D: Data<Param = T>>(
        &self,
        weight: &mut [D],
        bias: &mut [D],
    ) -> Result<(), Error> {
        let c = self.channels();
        for (what, len) in [
            ("bias", self.bias.len()),
            ("running_mean", self.running_mean.len()),
            ("running_var", self.running_var.len()),
            ("conv bias", bias.len()),
        ] {
            check_len(what, c, len)?;
        }
        check_eps(self.eps)?;
        let per_channel = weight.len().checked_div(c).unwrap_or(0);
        check_len("conv weight", per_channel * c, weight.len())?;
        for (o, b) in bias.iter_mut().enumerate() {
            let s = self.weight[o].to_f64() / (self.running_var[o].to_f64() + self.eps).sqrt();
            for w in &mut weight[o * per_channel..(o + 1) * per_channel] {
                *w = D::from_f64(w.to_f64() * s);
            }
            let shifted = (b.to_f64() - self.running_mean[o].to_f64()) * s;
            *b = D::from_f64(shifted + self.bias[o].to_f64());
        }
        Ok(())
    }
}
