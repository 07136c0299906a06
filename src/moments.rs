//! Per-channel statistics that merge exactly: Welford moments and Chan's formula.

/// The moments of a set of values: how many, their mean, and `M2 = Σ (x - mean)²`.
///
/// Two sets merge with Chan et al.'s formula, so moments computed over any split of the data
/// (blocks, threads, batches) combine into the moments of the whole without a second pass:
///
/// `n = na + nb`, `d = mean_b - mean_a`, `mean = mean_a + d * nb / n`,
/// `M2 = M2a + M2b + d² * na * nb / n`.
///
/// Kept in `f64` whatever the element type, so merging thousands of blocks loses nothing that
/// matters at `f32` precision.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Moments {
    /// Number of values.
    pub count: u64,
    /// Their mean (0 when `count == 0`).
    pub mean: f64,
    /// Sum of squared deviations from the mean.
    pub m2: f64,
}

impl Moments {
    /// The moments of no values.
    pub const EMPTY: Moments = Moments {
        count: 0,
        mean: 0.0,
        m2: 0.0,
    };

    /// The moments of `values`, by Welford's update one value at a time (a reference, not a
    /// kernel: the kernels reduce whole blocks and merge them).
    pub fn of(values: &[f64]) -> Moments {
        values.iter().fold(Moments::EMPTY, |acc, &x| {
            let count = acc.count + 1;
            let d = x - acc.mean;
            let mean = acc.mean + d / count as f64;
            Moments {
                count,
                mean,
                m2: acc.m2 + d * (x - mean),
            }
        })
    }

    /// Moments from sums taken around a shift `k`: `s1 = Σ (x - k)`, `s2 = Σ (x - k)²`.
    ///
    /// `mean = k + s1 / n` and `M2 = s2 - s1² / n`. With `k` close to the mean (the kernels use
    /// a block's own rounded mean) `s1` is tiny and the subtraction loses nothing.
    pub fn from_shifted_sums(count: u64, k: f64, s1: f64, s2: f64) -> Moments {
        if count == 0 {
            return Moments::EMPTY;
        }
        let n = count as f64;
        let m2 = s2 - s1 * (s1 / n);
        Moments {
            count,
            mean: k + s1 / n,
            // Rounding can leave a tiny negative M2 for constant data; NaN must stay NaN.
            m2: if m2 < 0.0 { 0.0 } else { m2 },
        }
    }

    /// The moments of both sets together (Chan et al.).
    pub fn merge(self, other: Moments) -> Moments {
        if other.count == 0 {
            return self;
        }
        if self.count == 0 {
            return other;
        }
        let count = self.count + other.count;
        let (na, nb, n) = (self.count as f64, other.count as f64, count as f64);
        let d = other.mean - self.mean;
        Moments {
            count,
            mean: self.mean + d * (nb / n),
            m2: self.m2 + other.m2 + d * d * (na * (nb / n)),
        }
    }

    /// Biased (population) variance `M2 / n`, the one batch normalization divides by.
    pub fn variance(&self) -> f64 {
        self.m2 / self.count as f64
    }

    /// Unbiased (sample) variance `M2 / (n - 1)`, the one PyTorch stores in `running_var`.
    pub fn sample_variance(&self) -> f64 {
        self.m2 / (self.count as f64 - 1.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_of_any_split_matches_the_whole() {
        let xs: Vec<f64> = (0..101)
            .map(|i| ((i * 37) % 101) as f64 * 0.25 - 3.0)
            .collect();
        let whole = Moments::of(&xs);
        for cut in [0, 1, 50, 100, 101] {
            let (a, b) = xs.split_at(cut);
            let merged = Moments::of(a).merge(Moments::of(b));
            assert_eq!(merged.count, whole.count);
            assert!((merged.mean - whole.mean).abs() < 1e-12);
            assert!((merged.m2 - whole.m2).abs() < 1e-9 * whole.m2);
        }
    }

    #[test]
    fn shifted_sums_recover_the_moments() {
        let xs = [1e6 + 1.0, 1e6 + 2.0, 1e6 + 4.0];
        let k = 1e6 + 2.0;
        let s1: f64 = xs.iter().map(|x| x - k).sum();
        let s2: f64 = xs.iter().map(|x| (x - k) * (x - k)).sum();
        let m = Moments::from_shifted_sums(3, k, s1, s2);
        let reference = Moments::of(&xs);
        assert!((m.mean - reference.mean).abs() < 1e-9);
        assert!((m.m2 - 14.0 / 3.0).abs() < 1e-9);
        assert!(Moments::from_shifted_sums(1, 0.0, f64::NAN, f64::NAN)
            .m2
            .is_nan());
    }
}
