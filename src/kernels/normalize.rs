//! The element-wise pass: `y = ((x - hi) - lo) * scale + shift` per channel.
//!
//! `hi + lo` is the channel's mean split into two parts of the element type, so that a mean of
//! 1e6 (whose `f32` rounding alone is 0.03) still centers the data exactly; `x - hi` is exact
//! for `x` near the mean. Without a center (`hi = lo = 0`) this is the inference engines'
//! `y = x * scale + shift`.

use super::buffers::Buffers;
use super::lanes::{load_upto, Lanes, MapLanes};
use crate::element::Element;

/// One channel's normalization: `y = ((x - hi) - lo) * scale + shift`.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct Affine<T> {
    pub hi: T,
    pub lo: T,
    pub scale: T,
    pub shift: T,
}

impl<T: Element> Affine<T> {
    /// The normalization of a channel with mean `mean` (split into `hi + lo`), multiplier
    /// `scale` and offset `shift`.
    pub fn centered(mean: f64, scale: f64, shift: f64) -> Self {
        let hi = T::from_f64(mean);
        Affine {
            hi,
            lo: T::from_f64(mean - hi.to_f64()),
            scale: T::from_f64(scale),
            shift: T::from_f64(shift),
        }
    }
}

/// Every channel's [`Affine`], as arrays (lanes load the parameters of neighbouring
/// channels together). Empty `hi` and `lo` mean no centering.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ChannelAffine<'a, T> {
    pub hi: &'a [T],
    pub lo: &'a [T],
    pub scale: &'a [T],
    pub shift: &'a [T],
}

impl<T: Element> ChannelAffine<'_, T> {
    /// Channel `c`'s parameters.
    #[inline(always)]
    pub fn get(&self, c: usize) -> Affine<T> {
        let center = |v: &[T]| v.get(c).copied().unwrap_or(T::ZERO);
        Affine {
            hi: center(self.hi),
            lo: center(self.lo),
            scale: self.scale[c],
            shift: self.shift[c],
        }
    }
}

/// [`Affine`] in lanes: `((v - hi) - lo) * scale + shift`.
#[derive(Clone, Copy)]
struct AffineLanes<L> {
    hi: L,
    lo: L,
    scale: L,
    shift: L,
}

impl<L: Lanes> MapLanes<L> for AffineLanes<L> {
    #[inline(always)]
    fn apply(&self, v: L) -> L {
        v.sub(self.hi).sub(self.lo).mul_add(self.scale, self.shift)
    }
}

/// Normalizes consecutive runs of `s` values (NCHW), run `r` of `buf` with `affine(r)`.
#[inline(always)]
pub(crate) fn normalize_runs<L: Lanes, B: Buffers<L::Elem>>(
    buf: &mut B,
    s: usize,
    mut affine: impl FnMut(usize) -> Affine<L::Elem>,
) {
    let runs = buf.len().checked_div(s).unwrap_or(0);
    for r in 0..runs {
        normalize_run::<L, B>(buf, r * s, s, &affine(r));
    }
}

/// Normalizes the `s` values of `buf` from `start` with `a`.
#[inline(always)]
pub(crate) fn normalize_run<L: Lanes, B: Buffers<L::Elem>>(
    buf: &mut B,
    start: usize,
    s: usize,
    a: &Affine<L::Elem>,
) {
    let f = AffineLanes {
        hi: L::splat(a.hi),
        lo: L::splat(a.lo),
        scale: L::splat(a.scale),
        shift: L::splat(a.shift),
    };
    if s >= L::WIDTH {
        buf.map_overlapping(start, start + s, &f);
    } else {
        buf.map(start, s, &f);
    }
}

/// Normalizes whole rows of `c` channels each (NHWC), lane `j` of a vector being channel
/// `c0 + j`.
#[inline(always)]
pub(crate) fn normalize_rows<L: Lanes, B: Buffers<L::Elem>>(
    buf: &mut B,
    c: usize,
    p: &ChannelAffine<'_, L::Elem>,
) {
    let w = L::WIDTH;
    let zero = L::splat(L::Elem::ZERO);
    let centered = !p.hi.is_empty();
    let rows = buf.len().checked_div(c).unwrap_or(0);
    let full = c - c % w;
    // Whole-vector parameters as exact chunks, so their loads need no bounds checks.
    let (hi, lo) = if centered {
        (&p.hi[..full], &p.lo[..full])
    } else {
        (&p.scale[..0], &p.scale[..0])
    };
    let (scale, shift) = (&p.scale[..full], &p.shift[..full]);
    // A row tail shorter than a vector, in rows at least a vector wide, is done as an
    // overlapping last vector (masked stores are slow on some CPUs), computed from the input
    // as it was before the row was written, so in place too.
    let overlap = full < c && c >= w;
    let last = if overlap {
        let at = c - w;
        AffineLanes {
            hi: if centered {
                L::load(&p.hi[at..c])
            } else {
                zero
            },
            lo: if centered {
                L::load(&p.lo[at..c])
            } else {
                zero
            },
            scale: L::load(&p.scale[at..c]),
            shift: L::load(&p.shift[at..c]),
        }
    } else {
        AffineLanes {
            hi: zero,
            lo: zero,
            scale: zero,
            shift: zero,
        }
    };
    for r in 0..rows {
        let row = r * c;
        let tail = if overlap {
            Some(buf.load::<L>(row + c - w))
        } else {
            None
        };
        let params = scale.chunks_exact(w).zip(shift.chunks_exact(w)).enumerate();
        for (j, (sc, sh)) in params {
            let (h, l) = if centered {
                (
                    L::load(&hi[j * w..j * w + w]),
                    L::load(&lo[j * w..j * w + w]),
                )
            } else {
                (zero, zero)
            };
            let f = AffineLanes {
                hi: h,
                lo: l,
                scale: L::load(sc),
                shift: L::load(sh),
            };
            buf.map(row + j * w, w, &f);
        }
        if let Some(v) = tail {
            buf.store(row + c - w, last.apply(v));
        } else if full < c {
            let n = c - full;
            let (hi, lo) = if centered {
                (load_upto(p.hi, full, n), load_upto(p.lo, full, n))
            } else {
                (zero, zero)
            };
            let f = AffineLanes {
                hi,
                lo,
                scale: load_upto(p.scale, full, n),
                shift: load_upto(p.shift, full, n),
            };
            buf.map(row + full, n, &f);
        }
    }
}

/// Writes every channel's [`Affine`] into `buf`, laid out `[hi | lo | scale | shift]`, and
/// returns the kernels' view of it. `buf` is reused storage: no allocation once it has grown.
pub(crate) fn fill_affine<T: Element>(
    buf: &mut Vec<T>,
    c: usize,
    affine: impl Fn(usize) -> Affine<T>,
) -> ChannelAffine<'_, T> {
    buf.clear();
    buf.resize(4 * c, T::ZERO);
    let (hi, rest) = buf.split_at_mut(c);
    let (lo, rest) = rest.split_at_mut(c);
    let (scale, shift) = rest.split_at_mut(c);
    for i in 0..c {
        let a = affine(i);
        (hi[i], lo[i], scale[i], shift[i]) = (a.hi, a.lo, a.scale, a.shift);
    }
    ChannelAffine {
        hi,
        lo,
        scale,
        shift,
    }
}
