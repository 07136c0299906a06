//! The kernels, written once over [`Lanes`] and instantiated per instruction set, and the one
//! place that picks the instruction set.
//!
//! The drivers in [`crate::exec`] are generic over [`Kernels`], the four leaf operations every
//! path needs. A lane type gets all four through [`Lanewise`]; an instruction set that must be
//! entered through `#[target_feature]` functions implements [`Kernels`] with such entries,
//! which is how it stays an addition, not a rewrite: rayon tasks run on other threads, so the
//! feature has to be switched on at the leaves, not around the driver.

pub(crate) mod backward;
pub(crate) mod buffers;
pub(crate) mod channels;
pub mod lanes;
pub(crate) mod normalize;
mod portable;
pub(crate) mod stats;
#[cfg(target_arch = "x86_64")]
pub(crate) mod x86;

use crate::element::Element;
use crate::moments::Moments;
use backward::{BackAffine, ChannelBack, GradSums};
use buffers::{Buffers, Grad};
use lanes::{Lanes, Scalar};
use normalize::{Affine, ChannelAffine};
use stats::PivotSums;
use std::cell::Cell;
use std::marker::PhantomData;
use std::ops::Range;
use std::sync::OnceLock;

/// An instruction set the kernels can run on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Isa {
    /// One element at a time: the reference every vector path is compared with.
    Scalar,
    /// `wide`'s portable vectors (`f32x8`, `f64x4`): SSE2 in a default x86-64 build, AVX
    /// and FMA when the build enables them, NEON on aarch64.
    Portable,
    /// AVX2 and FMA on x86-64, detected at run time: 8 `f32` or 4 `f64` lanes.
    Avx2,
    /// AVX-512F on x86-64, detected at run time: 16 `f32` or 8 `f64` lanes. [`Isa::best`]
    /// where the CPU has it (tested and measured on AMD Zen 5), except for the maps over
    /// rows (NHWC, `(N, C)`) of buffers not aligned to 64 bytes, where AVX2 is faster.
    Avx512,
}

impl Isa {
    /// Every instruction set this crate knows, slowest first.
    pub const ALL: [Isa; 4] = [Isa::Scalar, Isa::Portable, Isa::Avx2, Isa::Avx512];

    /// Whether this CPU can run `self`.
    pub fn is_available(self) -> bool {
        match self {
            Isa::Scalar | Isa::Portable => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => x86::Avx2::detect().is_some(),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => x86::Avx512::detect().is_some(),
            #[cfg(not(target_arch = "x86_64"))]
            Isa::Avx2 | Isa::Avx512 => false,
        }
    }

    /// The instruction sets this CPU can run, slowest first.
    pub fn available() -> Vec<Isa> {
        Isa::ALL.into_iter().filter(|i| i.is_available()).collect()
    }

    /// The instruction set calls use unless told otherwise: AVX-512 where the CPU has it
    /// (see [`Isa::Avx512`] for its one exception), else AVX2 with FMA, else the portable
    /// path.
    pub fn best() -> Isa {
        [Isa::Avx512, Isa::Avx2]
            .into_iter()
            .find(|i| i.is_available())
            .unwrap_or(Isa::Portable)
    }

    /// The name `BATCHNORM_ISA` takes: `scalar`, `portable`, `avx2`, `avx512`.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Portable => "portable",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
        }
    }

    /// The instruction set called `name` (see [`Isa::name`]), in any case: `AVX512` is
    /// `avx512`.
    pub fn from_name(name: &str) -> Option<Isa> {
        Isa::ALL
            .into_iter()
            .find(|i| i.name().eq_ignore_ascii_case(name.trim()))
    }

    /// The instruction set the environment variable `BATCHNORM_ISA` asks for: `Ok(None)` when
    /// it is unset or empty, an error that says why when it names no instruction set or one
    /// this CPU lacks.
    pub fn from_env() -> Result<Option<Isa>, String> {
        Isa::from_setting(std::env::var("BATCHNORM_ISA").ok())
    }

    /// [`Isa::from_env`] of the variable's value.
    fn from_setting(value: Option<String>) -> Result<Option<Isa>, String> {
        let Some(value) = value else {
            return Ok(None);
        };
        if value.trim().is_empty() {
            return Ok(None);
        }
        let names = Isa::ALL.map(Isa::name).join(", ");
        match Isa::from_name(&value) {
            None => Err(format!(
                "BATCHNORM_ISA={value:?} names no instruction set (one of {names})"
            )),
            Some(isa) if !isa.is_available() => Err(format!(
                "BATCHNORM_ISA={value:?}: this CPU lacks {}",
                isa.name()
            )),
            Some(isa) => Ok(Some(isa)),
        }
    }

    /// The instruction set a call made now from this thread uses: the one [`with_isa`] set,
    /// else the one `BATCHNORM_ISA` names ([`Isa::from_env`], read once; a name that is
    /// unknown or unavailable is reported once on stderr and ignored), else [`Isa::best`].
    pub fn current() -> Isa {
        Isa::forced().unwrap_or_else(Isa::best)
    }

    /// The instruction set [`with_isa`] or `BATCHNORM_ISA` chose, if any.
    fn forced() -> Option<Isa> {
        if let Some(isa) = OVERRIDE.with(|o| o.get()) {
            return Some(isa);
        }
        static FROM_ENV: OnceLock<Option<Isa>> = OnceLock::new();
        *FROM_ENV.get_or_init(|| {
            Isa::from_env().unwrap_or_else(|e| {
                eprintln!("batchnorm: {e}; using {}", Isa::best().name());
                None
            })
        })
    }

    /// The instruction set of a call that maps rows (NHWC, `(N, C)`) over `buffers`:
    /// [`Isa::current`], except that where nothing forced AVX-512, it gives way to AVX2 when a
    /// buffer is not aligned to 64 bytes. There every AVX-512 access of data and parameters
    /// straddles two cache lines: measured on AMD Zen 5, 32x128x28x28 NHWC inference took 1.35x
    /// as long as with AVX2 on such buffers, and as long as AVX2 on aligned ones.
    pub(crate) fn for_rows<T>(buffers: &[&[T]]) -> Isa {
        let isa = Isa::current();
        let aligned = buffers.iter().all(|b| b.as_ptr().align_offset(64) == 0);
        if isa == Isa::Avx512 && Isa::forced().is_none() && !aligned && Isa::Avx2.is_available() {
            Isa::Avx2
        } else {
            isa
        }
    }
}

thread_local! {
    static OVERRIDE: Cell<Option<Isa>> = const { Cell::new(None) };
}

/// Runs `f` with every call made from this thread using `isa` (for tests and benchmarks; the
/// threads a call spreads its work to follow the calling thread's choice). An instruction set
/// this CPU lacks is replaced by [`Isa::best`]. The previous choice is restored when `f`
/// returns or panics.
///
/// The choice belongs to the calling thread: work that `f` hands to another thread is not
/// covered. In particular `with_isa(isa, || pool.install(|| bn.forward_eval(..)))` runs the
/// call on one of `pool`'s threads with the default instruction set; put `with_isa` inside:
/// `pool.install(|| with_isa(isa, || bn.forward_eval(..)))`.
pub fn with_isa<R>(isa: Isa, f: impl FnOnce() -> R) -> R {
    let isa = if isa.is_available() { isa } else { Isa::best() };
    let _restore = Restore::set(&OVERRIDE, Some(isa));
    f()
}

/// Sets a thread-local `Cell` and puts its old value back when dropped, so that an override
/// does not outlive its scope, even when the scope panics.
pub(crate) struct Restore<T: Copy + 'static> {
    key: &'static std::thread::LocalKey<Cell<T>>,
    old: T,
}

impl<T: Copy + 'static> Restore<T> {
    pub fn set(key: &'static std::thread::LocalKey<Cell<T>>, value: T) -> Self {
        Restore {
            key,
            old: key.with(|c| c.replace(value)),
        }
    }
}

impl<T: Copy + 'static> Drop for Restore<T> {
    fn drop(&mut self) {
        self.key.with(|c| c.set(self.old));
    }
}

/// Orders this thread's streaming stores ([`Lanes::store_stream`]) before whatever follows:
/// they are weakly ordered, so every kernel that may have streamed ends with this, before
/// rayon hands its results to another thread.
#[inline(always)]
pub(crate) fn store_fence() {
    #[cfg(all(target_arch = "x86_64", not(miri)))]
    // SAFETY: SSE is part of the x86-64 baseline; a fence has no other requirement.
    unsafe {
        std::arch::x86_64::_mm_sfence()
    };
    // Miri lacks the instruction (and runs no streaming store): the portable fence, stronger.
    #[cfg(miri)]
    std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
}

/// The leaf operations of every driver.
pub(crate) trait Kernels<T: Element>: Copy + Send + Sync {
    /// Moments of `count` runs of `len` values, run `i` being `run(i)`.
    fn moments_runs<'a>(self, count: usize, len: usize, run: impl Fn(usize) -> &'a [T]) -> Moments;
    /// Sums rows `rows` of columns `cols` of the row-major `[_, c]` matrix `x` into `acc`.
    fn moments_rows(
        self,
        x: &[T],
        c: usize,
        rows: Range<usize>,
        cols: Range<usize>,
        acc: &mut [PivotSums],
    );
    /// Normalizes consecutive runs of `s` values, run `r` of `buf` with `affine(r)`.
    fn normalize_runs<B: Buffers<T>>(
        self,
        buf: &mut B,
        s: usize,
        affine: impl FnMut(usize) -> Affine<T>,
    );
    /// Normalizes whole rows of `c` channels.
    fn normalize_rows<B: Buffers<T>>(self, buf: &mut B, c: usize, p: &ChannelAffine<'_, T>);
    /// Backward sums of `count` runs of `len` values, run `i` being `run(i) = (x, dy)`.
    fn grad_sums_runs<'a>(
        self,
        count: usize,
        len: usize,
        run: impl Fn(usize) -> (&'a [T], &'a [T]),
        hi: T,
    ) -> GradSums;
    /// Adds the backward sums of rows `rows` of columns `cols` of `[_, c]` matrices to `out`.
    #[allow(clippy::too_many_arguments)]
    fn grad_sums_rows(
        self,
        x: &[T],
        dy: &[T],
        c: usize,
        rows: Range<usize>,
        cols: Range<usize>,
        hi: &[T],
        out: &mut [GradSums],
    );
    /// `dx` of consecutive runs of `s` values, run `r` with `params(r)`.
    fn backward_runs(
        self,
        g: &mut Grad<'_, T>,
        s: usize,
        params: impl FnMut(usize) -> BackAffine<T>,
    );
    /// `dx` of whole rows of `c` channels.
    fn backward_rows(self, g: &mut Grad<'_, T>, c: usize, p: &ChannelBack<'_, T>);
    /// Training's forward pass over a group of channels (see [`channels`]), the first being
    /// channel `first`, one span of `buf` per image; their moments go to `out`.
    fn train_channels<B: Buffers<T>>(
        self,
        buf: &mut [Option<B>],
        s: usize,
        first: usize,
        finish: &impl Fn(usize, &Moments) -> Affine<T>,
        out: &mut [Moments],
    );
    /// The backward pass over a group of channels, one span of `g` per image.
    #[allow(clippy::too_many_arguments)]
    fn backward_channels(
        self,
        g: &mut [Option<Grad<'_, T>>],
        s: usize,
        first: usize,
        center: &impl Fn(usize) -> T,
        finish: &impl Fn(usize, GradSums) -> BackAffine<T>,
        out: &mut [GradSums],
    );
}

/// The kernels instantiated for lane type `L`.
pub(crate) struct Lanewise<L>(PhantomData<L>);

impl<L> Clone for Lanewise<L> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<L> Copy for Lanewise<L> {}

/// Implements [`Kernels`] for a type by calling every generic kernel with one lane type, each
/// through an entry function that carries the given attribute: `#[target_feature(..)]` for the
/// instruction sets detected at run time (the entry is where the compiler switches them on),
/// `#[inline(always)]` for the others. Written once so that the four implementations cannot
/// drift apart.
macro_rules! impl_kernels {
    (impl[$($gen:tt)*] Kernels<$t:ty> for $ty:ty, lanes $lanes:ty, entry #[$attr:meta]) => {
        impl<$($gen)*> $crate::kernels::Kernels<$t> for $ty {
            fn moments_runs<'a>(
                self,
                count: usize,
                len: usize,
                run: impl Fn(usize) -> &'a [$t],
            ) -> $crate::moments::Moments {
                /// # Safety
                /// The CPU must have the instruction set of the lane type `L` (its kernels
                /// value exists only after detection).
                #[$attr]
                unsafe fn entry<'a, L: $crate::kernels::lanes::Lanes>(
                    count: usize,
                    len: usize,
                    run: impl Fn(usize) -> &'a [L::Elem],
                ) -> $crate::moments::Moments {
                    $crate::kernels::stats::moments_runs::<L>(count, len, run)
                }
                // SAFETY: a type whose entries enable target features exists only once they
                // were detected (see its `detect`); other entries need nothing.
                unsafe { entry::<$lanes>(count, len, run) }
            }

            fn moments_rows(
                self,
                x: &[$t],
                c: usize,
                rows: ::std::ops::Range<usize>,
                cols: ::std::ops::Range<usize>,
                acc: &mut [$crate::kernels::stats::PivotSums],
            ) {
                /// # Safety
                /// The CPU must have the instruction set of the lane type `L` (its kernels
                /// value exists only after detection).
                #[$attr]
                unsafe fn entry<L: $crate::kernels::lanes::Lanes>(
                    x: &[L::Elem],
                    c: usize,
                    rows: ::std::ops::Range<usize>,
                    cols: ::std::ops::Range<usize>,
                    acc: &mut [$crate::kernels::stats::PivotSums],
                ) {
                    $crate::kernels::stats::moments_rows::<L>(x, c, rows, cols, acc)
                }
                // SAFETY: as in `moments_runs`.
                unsafe { entry::<$lanes>(x, c, rows, cols, acc) }
            }

            fn normalize_runs<B: $crate::kernels::buffers::Buffers<$t>>(
                self,
                buf: &mut B,
                s: usize,
                affine: impl FnMut(usize) -> $crate::kernels::normalize::Affine<$t>,
            ) {
                /// # Safety
                /// The CPU must have the instruction set of the lane type `L` (its kernels
                /// value exists only after detection).
                #[$attr]
                unsafe fn entry<L: $crate::kernels::lanes::Lanes, B: $crate::kernels::buffers::Buffers<L::Elem>>(
                    buf: &mut B,
                    s: usize,
                    affine: impl FnMut(usize) -> $crate::kernels::normalize::Affine<L::Elem>,
                ) {
                    $crate::kernels::normalize::normalize_runs::<L, B>(buf, s, affine)
                }
                // SAFETY: as in `moments_runs`.
                unsafe { entry::<$lanes, B>(buf, s, affine) }
            }

            fn normalize_rows<B: $crate::kernels::buffers::Buffers<$t>>(self, buf: &mut B, c: usize, p: &$crate::kernels::normalize::ChannelAffine<'_, $t>) {
                /// # Safety
                /// The CPU must have the instruction set of the lane type `L` (its kernels
                /// value exists only after detection).
                #[$attr]
                unsafe fn entry<L: $crate::kernels::lanes::Lanes, B: $crate::kernels::buffers::Buffers<L::Elem>>(
                    buf: &mut B,
                    c: usize,
                    p: &$crate::kernels::normalize::ChannelAffine<'_, L::Elem>,
                ) {
                    $crate::kernels::normalize::normalize_rows::<L, B>(buf, c, p)
                }
                // SAFETY: as in `moments_runs`.
                unsafe { entry::<$lanes, B>(buf, c, p) }
            }

            fn grad_sums_runs<'a>(
                self,
                count: usize,
                len: usize,
                run: impl Fn(usize) -> (&'a [$t], &'a [$t]),
                hi: $t,
            ) -> $crate::kernels::backward::GradSums {
                /// # Safety
                /// The CPU must have the instruction set of the lane type `L` (its kernels
                /// value exists only after detection).
                #[$attr]
                unsafe fn entry<'a, L: $crate::kernels::lanes::Lanes>(
                    count: usize,
                    len: usize,
                    run: impl Fn(usize) -> (&'a [L::Elem], &'a [L::Elem]),
                    hi: L::Elem,
                ) -> $crate::kernels::backward::GradSums {
                    $crate::kernels::backward::grad_sums_runs::<L>(count, len, run, hi)
                }
                // SAFETY: as in `moments_runs`.
                unsafe { entry::<$lanes>(count, len, run, hi) }
            }

            fn grad_sums_rows(
                self,
                x: &[$t],
                dy: &[$t],
                c: usize,
                rows: ::std::ops::Range<usize>,
                cols: ::std::ops::Range<usize>,
                hi: &[$t],
                out: &mut [$crate::kernels::backward::GradSums],
            ) {
                #[$attr]
                #[allow(clippy::too_many_arguments)]
                unsafe fn entry<L: $crate::kernels::lanes::Lanes>(
                    x: &[L::Elem],
                    dy: &[L::Elem],
                    c: usize,
                    rows: ::std::ops::Range<usize>,
                    cols: ::std::ops::Range<usize>,
                    hi: &[L::Elem],
                    out: &mut [$crate::kernels::backward::GradSums],
                ) {
                    $crate::kernels::backward::grad_sums_rows::<L>(x, dy, c, rows, cols, hi, out)
                }
                // SAFETY: as in `moments_runs`.
                unsafe { entry::<$lanes>(x, dy, c, rows, cols, hi, out) }
            }

            fn backward_runs(
                self,
                g: &mut $crate::kernels::buffers::Grad<'_, $t>,
                s: usize,
                params: impl FnMut(usize) -> $crate::kernels::backward::BackAffine<$t>,
            ) {
                /// # Safety
                /// The CPU must have the instruction set of the lane type `L` (its kernels
                /// value exists only after detection).
                #[$attr]
                unsafe fn entry<L: $crate::kernels::lanes::Lanes>(
                    g: &mut $crate::kernels::buffers::Grad<'_, L::Elem>,
                    s: usize,
                    params: impl FnMut(usize) -> $crate::kernels::backward::BackAffine<L::Elem>,
                ) {
                    $crate::kernels::backward::backward_runs::<L>(g, s, params)
                }
                // SAFETY: as in `moments_runs`.
                unsafe { entry::<$lanes>(g, s, params) }
            }

            fn backward_rows(self, g: &mut $crate::kernels::buffers::Grad<'_, $t>, c: usize, p: &$crate::kernels::backward::ChannelBack<'_, $t>) {
                /// # Safety
                /// The CPU must have the instruction set of the lane type `L` (its kernels
                /// value exists only after detection).
                #[$attr]
                unsafe fn entry<L: $crate::kernels::lanes::Lanes>(g: &mut $crate::kernels::buffers::Grad<'_, L::Elem>, c: usize, p: &$crate::kernels::backward::ChannelBack<'_, L::Elem>) {
                    $crate::kernels::backward::backward_rows::<L>(g, c, p)
                }
                // SAFETY: as in `moments_runs`.
                unsafe { entry::<$lanes>(g, c, p) }
            }

            fn train_channels<B: $crate::kernels::buffers::Buffers<$t>>(
                self,
                buf: &mut [Option<B>],
                s: usize,
                first: usize,
                finish: &impl Fn(usize, &$crate::moments::Moments) -> $crate::kernels::normalize::Affine<$t>,
                out: &mut [$crate::moments::Moments],
            ) {
                /// # Safety
                /// The CPU must have the instruction set of the lane type `L` (its kernels
                /// value exists only after detection).
                #[$attr]
                unsafe fn entry<L: $crate::kernels::lanes::Lanes, B: $crate::kernels::buffers::Buffers<L::Elem>>(
                    buf: &mut [Option<B>],
                    s: usize,
                    first: usize,
                    finish: &impl Fn(usize, &$crate::moments::Moments) -> $crate::kernels::normalize::Affine<L::Elem>,
                    out: &mut [$crate::moments::Moments],
                ) {
                    $crate::kernels::channels::train_channels::<L, B>(buf, s, first, finish, out)
                }
                // SAFETY: as in `moments_runs`.
                unsafe { entry::<$lanes, B>(buf, s, first, finish, out) }
            }

            fn backward_channels(
                self,
                g: &mut [Option<$crate::kernels::buffers::Grad<'_, $t>>],
                s: usize,
                first: usize,
                center: &impl Fn(usize) -> $t,
                finish: &impl Fn(usize, $crate::kernels::backward::GradSums) -> $crate::kernels::backward::BackAffine<$t>,
                out: &mut [$crate::kernels::backward::GradSums],
            ) {
                #[$attr]
                #[allow(clippy::too_many_arguments)]
                unsafe fn entry<L: $crate::kernels::lanes::Lanes>(
                    g: &mut [Option<$crate::kernels::buffers::Grad<'_, L::Elem>>],
                    s: usize,
                    first: usize,
                    center: &impl Fn(usize) -> L::Elem,
                    finish: &impl Fn(usize, $crate::kernels::backward::GradSums) -> $crate::kernels::backward::BackAffine<L::Elem>,
                    out: &mut [$crate::kernels::backward::GradSums],
                ) {
                    $crate::kernels::channels::backward_channels::<L>(g, s, first, center, finish, out)
                }
                // SAFETY: as in `moments_runs`.
                unsafe { entry::<$lanes>(g, s, first, center, finish, out) }
            }
        }
    };
}
// The x86 instruction sets use it from their module; elsewhere only `Lanewise` below does.
#[cfg(target_arch = "x86_64")]
pub(crate) use impl_kernels;

impl_kernels!(impl[L: Lanes] Kernels<L::Elem> for Lanewise<L>, lanes L, entry #[inline(always)]);

/// A computation generic over the kernels, run by [`dispatch`].
pub(crate) trait Job<T: Element> {
    type Output;
    fn run<K: Kernels<T>>(self, k: K) -> Self::Output;
}

/// Runs `job` on the kernels of `isa`: the one place an instruction set is chosen.
pub(crate) fn dispatch<T: Element, J: Job<T>>(isa: Isa, job: J) -> J::Output {
    let portable = Lanewise::<T::Wide>(PhantomData);
    match isa {
        Isa::Scalar => job.run(Lanewise::<Scalar<T>>(PhantomData)),
        Isa::Portable => job.run(portable),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => match x86::Avx2::detect() {
            Some(k) => job.run(k),
            None => job.run(portable),
        },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => match x86::Avx512::detect() {
            Some(k) => job.run(k),
            None => job.run(portable),
        },
        #[cfg(not(target_arch = "x86_64"))]
        Isa::Avx2 | Isa::Avx512 => job.run(portable),
    }
}

#[cfg(test)]
mod tests {
    use super::lanes::{Lanes, Scalar};
    use crate::element::Element;

    /// Every lane operation of `L`, partial loads and stores at every length included.
    fn check_lanes<L: Lanes>() {
        let w = L::WIDTH;
        let e = |v: f64| L::Elem::from_f64(v);
        let src: Vec<L::Elem> = (0..w).map(|i| e(i as f64 + 1.0)).collect();
        let mut dst = vec![e(0.0); w];
        L::load(&src).store(&mut dst);
        assert_eq!(dst, src);
        let v = L::load(&src);
        let total: f64 = (1..=w).map(|i| i as f64).sum();
        assert_eq!(v.sum(), e(total));
        assert_eq!(v.add(v).sum(), e(2.0 * total));
        assert_eq!(v.sub(L::splat(e(1.0))).sum(), e(total - w as f64));
        assert_eq!(v.mul(L::splat(e(2.0))).sum(), e(2.0 * total));
        assert_eq!(
            v.mul_add(L::splat(e(3.0)), L::splat(e(1.0))).sum(),
            e(3.0 * total + w as f64)
        );
        for k in 0..=w {
            let spliced = L::splat(e(1.0)).splice(k, L::splat(e(2.0)));
            assert_eq!(spliced.sum(), e((k + 2 * (w - k)) as f64), "splice at {k}");
        }
        for n in 0..w {
            let loaded = L::load_partial(&src[..n], e(-1.0));
            let want: f64 = (1..=n).map(|i| i as f64).sum::<f64>() - (w - n) as f64;
            assert_eq!(loaded.sum(), e(want), "load_partial of {n}");
            let mut out = vec![e(7.0); w];
            L::splat(e(5.0)).store_partial(&mut out[..n]);
            for (i, o) in out.iter().enumerate() {
                assert_eq!(*o, e(if i < n { 5.0 } else { 7.0 }), "store_partial of {n}");
            }
        }
    }

    fn check_all<T: Element>() {
        check_lanes::<Scalar<T>>();
        check_lanes::<T::Wide>();
        #[cfg(target_arch = "x86_64")]
        {
            if super::x86::Avx2::detect().is_some() {
                check_lanes::<T::Avx2>();
            }
            if super::x86::Avx512::detect().is_some() {
                check_lanes::<T::Avx512>();
            }
        }
    }

    #[test]
    fn lanes_f32() {
        check_all::<f32>();
    }

    #[test]
    fn lanes_f64() {
        check_all::<f64>();
    }

    #[test]
    fn isa_names_round_trip() {
        for isa in super::Isa::ALL {
            assert_eq!(super::Isa::from_name(isa.name()), Some(isa));
            let upper = isa.name().to_ascii_uppercase();
            assert_eq!(super::Isa::from_name(&format!(" {upper} ")), Some(isa));
        }
        assert!(super::Isa::available().contains(&super::Isa::best()));
        for isa in super::Isa::available() {
            assert_eq!(super::with_isa(isa, super::Isa::current), isa);
        }
    }

    /// `BATCHNORM_ISA`'s value: unset or empty is no choice, a known and available name (in
    /// any case) is that instruction set, anything else an error that names the problem.
    #[test]
    fn isa_from_environment_value() {
        use super::Isa;
        assert_eq!(Isa::from_setting(None), Ok(None));
        assert_eq!(Isa::from_setting(Some(" ".into())), Ok(None));
        assert_eq!(
            Isa::from_setting(Some("Scalar".into())),
            Ok(Some(Isa::Scalar))
        );
        let unknown = Isa::from_setting(Some("avx-512".into())).unwrap_err();
        assert!(unknown.contains("names no instruction set"), "{unknown}");
        for isa in Isa::ALL {
            let got = Isa::from_setting(Some(isa.name().to_uppercase()));
            if isa.is_available() {
                assert_eq!(got, Ok(Some(isa)));
            } else {
                assert!(got.unwrap_err().contains("lacks"));
            }
        }
    }

    /// An override ends with its scope, also when the scope panics.
    #[test]
    fn overrides_restored_after_a_panic() {
        use super::{with_isa, Isa};
        use crate::parallel::{parallel_threshold, stream_threshold};
        let (isa, threshold, stream) = (Isa::current(), parallel_threshold(), stream_threshold());
        let panicked = std::panic::catch_unwind(|| {
            with_isa(Isa::Scalar, || {
                crate::with_parallel_threshold(3, || {
                    crate::with_stream_threshold(5, || {
                        assert_eq!(
                            (Isa::current(), parallel_threshold(), stream_threshold()),
                            (Isa::Scalar, 3, 5)
                        );
                        panic!("inside the overrides")
                    })
                })
            })
        });
        assert!(panicked.is_err());
        assert_eq!(
            (Isa::current(), parallel_threshold(), stream_threshold()),
            (isa, threshold, stream)
        );
    }
}
