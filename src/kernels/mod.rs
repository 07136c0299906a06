//! The kernels, written once over [`Lanes`] and instantiated per instruction set, and the one
//! place that picks the instruction set.
//!
//! The drivers in [`crate::exec`] are generic over [`Kernels`], the four leaf operations every
//! path needs. A lane type gets all four through [`Lanewise`]; an instruction set that must be
//! entered through `#[target_feature]` functions implements [`Kernels`] with such entries,
//! which is how it stays an addition, not a rewrite: rayon tasks run on other threads, so the
//! feature has to be switched on at the leaves, not around the driver.

pub(crate) mod buffers;
pub mod lanes;
pub(crate) mod normalize;
mod portable;
pub(crate) mod stats;

use crate::element::Element;
use crate::moments::Moments;
use buffers::Buffers;
use lanes::{Lanes, Scalar};
use normalize::{Affine, ChannelAffine};
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
}

impl Isa {
    /// Every instruction set this crate knows, slowest first.
    pub const ALL: [Isa; 2] = [Isa::Scalar, Isa::Portable];

    /// Whether this CPU can run `self`.
    pub fn is_available(self) -> bool {
        match self {
            Isa::Scalar | Isa::Portable => true,
        }
    }

    /// The instruction sets this CPU can run, slowest first.
    pub fn available() -> Vec<Isa> {
        Isa::ALL.into_iter().filter(|i| i.is_available()).collect()
    }

    /// The fastest available instruction set.
    pub fn best() -> Isa {
        *Isa::available().last().unwrap_or(&Isa::Scalar)
    }

    /// The name `BATCHNORM_ISA` takes: `scalar`, `portable`.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Portable => "portable",
        }
    }

    /// The instruction set called `name` (see [`Isa::name`]).
    pub fn from_name(name: &str) -> Option<Isa> {
        Isa::ALL.into_iter().find(|i| i.name() == name.trim())
    }

    /// The instruction set a call made now from this thread uses: the one [`with_isa`] set,
    /// else the environment variable `BATCHNORM_ISA` (read once) if it names an available
    /// one, else [`Isa::best`].
    pub fn current() -> Isa {
        if let Some(isa) = OVERRIDE.with(|o| o.get()) {
            return isa;
        }
        static FROM_ENV: OnceLock<Isa> = OnceLock::new();
        *FROM_ENV.get_or_init(|| {
            std::env::var("BATCHNORM_ISA")
                .ok()
                .and_then(|v| Isa::from_name(&v))
                .filter(|i| i.is_available())
                .unwrap_or_else(Isa::best)
        })
    }
}

thread_local! {
    static OVERRIDE: Cell<Option<Isa>> = const { Cell::new(None) };
}

/// Runs `f` with every call made from this thread using `isa` (for tests and benchmarks; the
/// threads a call spreads its work to follow the calling thread's choice). An instruction set
/// this CPU lacks is replaced by [`Isa::best`].
pub fn with_isa<R>(isa: Isa, f: impl FnOnce() -> R) -> R {
    let isa = if isa.is_available() { isa } else { Isa::best() };
    let old = OVERRIDE.with(|o| o.replace(Some(isa)));
    let r = f();
    OVERRIDE.with(|o| o.set(old));
    r
}

/// The leaf operations of every driver.
pub(crate) trait Kernels<T: Element>: Copy + Send + Sync {
    /// Moments of `count` runs of `len` values, run `i` being `run(i)`.
    fn moments_runs<'a>(self, count: usize, len: usize, run: impl Fn(usize) -> &'a [T]) -> Moments;
    /// Adds the moments of rows `rows` of the row-major `[_, c]` matrix `x` to `out`.
    fn moments_rows(self, x: &[T], c: usize, rows: Range<usize>, out: &mut [Moments]);
    /// Normalizes a run of one channel.
    fn normalize_run<B: Buffers<T>>(self, buf: &mut B, a: Affine<T>);
    /// Normalizes whole rows of `c` channels.
    fn normalize_rows<B: Buffers<T>>(self, buf: &mut B, c: usize, p: &ChannelAffine<'_, T>);
}

/// The kernels instantiated for lane type `L`.
pub(crate) struct Lanewise<L>(PhantomData<L>);

impl<L> Clone for Lanewise<L> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<L> Copy for Lanewise<L> {}

impl<L: Lanes> Kernels<L::Elem> for Lanewise<L> {
    fn moments_runs<'a>(
        self,
        count: usize,
        len: usize,
        run: impl Fn(usize) -> &'a [L::Elem],
    ) -> Moments {
        stats::moments_runs::<L>(count, len, run)
    }
    fn moments_rows(self, x: &[L::Elem], c: usize, rows: Range<usize>, out: &mut [Moments]) {
        stats::moments_rows::<L>(x, c, rows, out)
    }
    fn normalize_run<B: Buffers<L::Elem>>(self, buf: &mut B, a: Affine<L::Elem>) {
        normalize::normalize_run::<L, B>(buf, a)
    }
    fn normalize_rows<B: Buffers<L::Elem>>(
        self,
        buf: &mut B,
        c: usize,
        p: &ChannelAffine<'_, L::Elem>,
    ) {
        normalize::normalize_rows::<L, B>(buf, c, p)
    }
}

/// A computation generic over the kernels, run by [`dispatch`].
pub(crate) trait Job<T: Element> {
    type Output;
    fn run<K: Kernels<T>>(self, k: K) -> Self::Output;
}

/// Runs `job` on the kernels of `isa`: the one place an instruction set is chosen.
pub(crate) fn dispatch<T: Element, J: Job<T>>(isa: Isa, job: J) -> J::Output {
    match isa {
        Isa::Scalar => job.run(Lanewise::<Scalar<T>>(PhantomData)),
        Isa::Portable => job.run(Lanewise::<T::Wide>(PhantomData)),
    }
}
