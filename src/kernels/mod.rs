//! The kernels, written once over [`Lanes`](lanes::Lanes) and instantiated per instruction
//! set and tensor type, and the one place that picks the instruction set ([`dispatch`]).
//!
//! The drivers in [`crate::exec`] are generic over the instruction-set token
//! ([`simd::Simd`]). Each leaf kernel is a type implementing [`WithSimd`] (`MomentsRuns`,
//! `NormalizeRows`, ...), which the driver hands to [`simd::Simd::vectorize`]: the instruction
//! set's one `#[target_feature]` entry. The kernel picks its lanes from the token and the
//! tensor type ([`crate::element::Data::Lanes`]): `S::F32` for `f32`, `Stored<S::F32, f16>`
//! for `f16`. Rayon tasks run on other threads, so the features are switched on at the
//! leaves, not around the driver.
//!
//! # The inlining rule
//! An intrinsic is inlined only into a function compiled with its target features. Only the
//! entry has them (a `#[target_feature]` function cannot be generic over the instruction
//! set); a helper or closure that the compiler leaves out of line is compiled without them,
//! and each intrinsic in it becomes a call that passes its vectors through memory (`bf16`
//! inference ran 45x slower so). Which helpers are left out of line is decided in the crate
//! that instantiates the kernels, the user's, so the kernels leave nothing to that decision:
//! - every function and method below an entry is `#[inline(always)]`;
//! - every closure below an entry is `#[inline(always)]` too: in argument position
//!   (`f(#[inline(always)] |j| ..)`) or as a block's value (`let f = { #[inline(always)]
//!   |j| .. };`), the two places stable Rust takes the attribute;
//! - a closure that touches lanes is called only by the crate's own `#[inline(always)]`
//!   functions, never by std's `Iterator::map`, `Option::map` or `array::from_fn`, whose
//!   `#[inline]` is a hint ([`lanes::array_fn`] replaces the last; a `match` the second).
//!
//! `scripts/check_inlining.sh`, run in CI, builds two users' crates in release (the report
//! example and `examples/every_path.rs`, every public call on every data type) and fails if
//! either holds a `core::core_arch` function out of line.

pub(crate) mod backward;
pub(crate) mod buffers;
pub(crate) mod channels;
pub mod lanes;
pub(crate) mod normalize;
mod portable;
pub mod simd;
pub(crate) mod stats;
#[cfg(target_arch = "x86_64")]
pub(crate) mod x86;

use simd::WithSimd;
use std::cell::Cell;
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
    /// where the CPU has it (tested and measured on AMD Zen 5 and Zen 4), except for the maps
    /// over rows (NHWC, `(N, C)`) of buffers not aligned to 64 bytes on CPUs with full-width
    /// AVX-512 units, where AVX2 is faster.
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

    /// The instruction set of a call that maps rows (NHWC, `(N, C)`) of `c` channels over
    /// `buffers` (the output last): [`Isa::current`], except that where nothing forced
    /// AVX-512, it gives way to AVX2 when the rows' vectors would straddle cache lines. There
    /// every AVX-512 access of data and parameters straddles two lines: measured on AMD Zen 5,
    /// 32x128x28x28 NHWC inference took 1.35x as long as with AVX2 on such buffers, and as
    /// long as AVX2 on aligned ones. Vectors stay within lines when every buffer is aligned,
    /// or when rows are whole lines and every buffer is as far into its line as the output
    /// (the rows are then mapped from the output's first line, [`buffers::row_pieces`]): so
    /// for plain `Vec`s, which the allocator starts alike.
    ///
    /// Only for 4-byte elements and wider: an AVX-512 vector of 16-bit elements is 32 bytes, a
    /// line holds two, and AVX-512 is faster there whatever the alignment (32x64x56x56 NHWC
    /// `f16` inference 1.3x, `bf16` 1.9x, on Zen 5). And not where AVX-512 runs in 256-bit
    /// halves (Zen 4, [`Isa::avx512_in_halves`]): there it stays the faster whatever the
    /// alignment. Measured on Zen 4, 32x64x56x56 NHWC inference with residual and ReLU, the
    /// input 32 bytes off the output in its line, one thread, means of 5 alternated runs:
    /// AVX2 3.05 ms, AVX-512 2.32 ms (its rows paired, [`normalize::normalize_rows`]), as
    /// fast as on buffers alike in lines (2.34 ms).
    pub(crate) fn for_rows<T>(buffers: &[&[T]], c: usize) -> Isa {
        let isa = Isa::current();
        let keep = isa != Isa::Avx512
            || Isa::forced().is_some()
            || std::mem::size_of::<T>() < 4
            || !Isa::Avx2.is_available()
            || Isa::avx512_in_halves();
        if keep {
            return isa;
        }
        let (out, inputs) = buffers
            .split_last()
            .map_or((&[][..], &[][..]), |(o, i)| (*o, i));
        // Within lines: every buffer where the output is in its line, and that at its start
        // or with rows of whole lines mapped from its first line on.
        let within = buffers::alike_in_lines(out, inputs)
            && (out.as_ptr().align_offset(64) == 0 || buffers::rotation_of(out, c) > 0);
        if within {
            isa
        } else {
            Isa::Avx2
        }
    }

    /// Whether this CPU runs AVX-512 on 256-bit units, each 512-bit access as two 256-bit
    /// halves: Zen 4 ([`zen4`]). There a 64-byte access 32 bytes into a line is two accesses
    /// within lines, and one at any other offset straddles as often as AVX2's, so AVX-512
    /// stays on buffers not alike in lines ([`Isa::for_rows`]). Zen 5's units are full-width.
    pub(crate) fn avx512_in_halves() -> bool {
        zen4()
    }
}

/// Whether this CPU is AMD's Zen 4 (family 19h with AVX-512; x86-64 only), where two choices
/// measured on Zen 5 go the other way: the instruction set of rows not alike in lines
/// ([`Isa::avx512_in_halves`]) and the plain NCHW training's passes
/// ([`crate::exec`]'s `TrainJob`).
pub(crate) fn zen4() -> bool {
    #[cfg(target_arch = "x86_64")]
    return x86::zen4();
    #[cfg(not(target_arch = "x86_64"))]
    false
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

/// Orders this thread's streaming stores ([`lanes::Lanes::write_stream`]) before whatever follows:
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

/// Runs `job` with the token of `isa` (not entering its features: a driver enters them at
/// its leaves with [`simd::Simd::vectorize`]): the one place an instruction set is chosen. An
/// instruction set this CPU lacks falls back to the portable path.
pub(crate) fn dispatch<J: WithSimd>(isa: Isa, job: J) -> J::Output {
    match isa {
        Isa::Scalar => job.with_simd(simd::Scalar),
        Isa::Portable => job.with_simd(simd::Portable),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => match x86::Avx2::detect() {
            Some(token) => job.with_simd(token),
            None => job.with_simd(simd::Portable),
        },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => match x86::Avx512::detect() {
            Some(token) => job.with_simd(token),
            None => job.with_simd(simd::Portable),
        },
        #[cfg(not(target_arch = "x86_64"))]
        Isa::Avx2 | Isa::Avx512 => job.with_simd(simd::Portable),
    }
}

#[cfg(test)]
mod tests {
    use super::lanes::Lanes;
    use super::simd::{Simd, WithSimd};
    use crate::element::Data;
    use half::{bf16, f16};

    /// Every lane operation of `L`, partial loads, stores, reads and writes at every length
    /// included.
    fn check_lanes<L: Lanes>() {
        let w = L::WIDTH;
        let e = |v: f64| L::Elem::from_f64(v);
        let m = |v: f64| L::Mem::from_f64(v);
        let src: Vec<L::Elem> = (0..w).map(|i| e(i as f64 + 1.0)).collect();
        let mut dst = vec![e(0.0); w];
        L::load(&src).store(&mut dst);
        assert_eq!(dst, src);
        let mem: Vec<L::Mem> = (0..w).map(|i| m(i as f64 + 1.0)).collect();
        let mut out = vec![m(0.0); w];
        L::read(&mem).write(&mut out);
        assert_eq!(out, mem);
        L::read(&mem).write_stream(&mut out);
        assert_eq!(out, mem);
        let v = L::load(&src);
        let total: f64 = (1..=w).map(|i| i as f64).sum();
        assert_eq!(L::read(&mem).sum(), e(total));
        assert_eq!(v.sum(), e(total));
        assert_eq!(v.add(v).sum(), e(2.0 * total));
        assert_eq!(v.sub(L::splat(e(1.0))).sum(), e(total - w as f64));
        assert_eq!(v.mul(L::splat(e(2.0))).sum(), e(2.0 * total));
        assert_eq!(
            v.mul_add(L::splat(e(3.0)), L::splat(e(1.0))).sum(),
            e(3.0 * total + w as f64)
        );
        // relu keeps NaN and -0 and zeroes negatives; relu_grad passes the gradient where the
        // ReLU's output is not <= 0 (NaN included).
        let pattern = [-1.5, 2.0, -0.0, f64::NAN, 0.0];
        let vals: Vec<L::Elem> = (0..w).map(|i| e(pattern[i % 5])).collect();
        let mut out = vec![e(9.0); w];
        L::load(&vals).relu().store(&mut out);
        for (i, (&o, &v)) in out.iter().zip(&vals).enumerate() {
            let want = if v < e(0.0) { e(0.0) } else { v };
            let same = (o.to_f64().is_nan() && want.to_f64().is_nan())
                || o.to_f64().to_bits() == want.to_f64().to_bits();
            assert!(same, "relu lane {i}: {o:?}, want {want:?}");
        }
        L::splat(e(4.0)).relu_grad(L::load(&vals)).store(&mut out);
        for (i, (&o, &v)) in out.iter().zip(&vals).enumerate() {
            let want = if v <= e(0.0) { 0.0 } else { 4.0 };
            assert_eq!(o, e(want), "relu_grad lane {i} (y = {v:?})");
        }
        for k in 0..=w {
            let spliced = L::splat(e(1.0)).splice(k, L::splat(e(2.0)));
            assert_eq!(spliced.sum(), e((k + 2 * (w - k)) as f64), "splice at {k}");
        }
        for n in 0..w {
            let want: f64 = (1..=n).map(|i| i as f64).sum::<f64>() - (w - n) as f64;
            let loaded = L::load_partial(&src[..n], e(-1.0));
            assert_eq!(loaded.sum(), e(want), "load_partial of {n}");
            let read = L::read_partial(&mem[..n], e(-1.0));
            assert_eq!(read.sum(), e(want), "read_partial of {n}");
            let mut out = vec![e(7.0); w];
            L::splat(e(5.0)).store_partial(&mut out[..n]);
            for (i, o) in out.iter().enumerate() {
                assert_eq!(*o, e(if i < n { 5.0 } else { 7.0 }), "store_partial of {n}");
            }
            let mut out = vec![m(7.0); w];
            L::splat(e(5.0)).write_partial(&mut out[..n]);
            for (i, o) in out.iter().enumerate() {
                assert_eq!(*o, m(if i < n { 5.0 } else { 7.0 }), "write_partial of {n}");
            }
        }
    }

    /// The same bits, or both NaN.
    fn same<D: Data>(a: D, b: D) -> bool {
        let (x, y) = (a.to_f64(), b.to_f64());
        (x.is_nan() && y.is_nan()) || x.to_bits() == y.to_bits()
    }

    /// `D`'s lanes on `S` widen every one of the 65536 values exactly, and round `f32` values
    /// as the `half` crate does (to nearest even, from `f64`: one rounding): at, between and
    /// around every tie, beyond the largest value, among subnormals, NaN and infinities
    /// included, and at random.
    fn check_conversions<S: Simd, D: Data<Param = f32>>(to_bits: fn(D) -> u16, of: fn(u16) -> D) {
        type V<S, D> = <D as Data>::Lanes<S>;
        let w = V::<S, D>::WIDTH;
        let all: Vec<D> = (0..=u16::MAX).map(of).collect();
        let mut wide = vec![0.0f32; w];
        for chunk in all.chunks_exact(w) {
            V::<S, D>::read(chunk).store(&mut wide);
            for (&d, &f) in chunk.iter().zip(&wide) {
                let exact = d.to_f64();
                assert!(
                    (exact.is_nan() && f.is_nan()) || exact.to_bits() == (f as f64).to_bits(),
                    "widening {:#06x}",
                    to_bits(d)
                );
            }
        }
        let mut inputs = Vec::new();
        for pair in all.windows(2) {
            let (a, b) = (pair[0].to_f64(), pair[1].to_f64());
            let mid = (a + b) / 2.0;
            for v in [
                a,
                mid,
                mid.next_up(),
                mid.next_down(),
                a.next_up(),
                a.next_down(),
            ] {
                inputs.push(v as f32);
            }
        }
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..200_000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            inputs.push(f32::from_bits(seed as u32));
        }
        let special = [
            f32::MAX,
            f32::MIN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::from_bits(0x7f80_0001),
            f32::from_bits(0xffc0_0001),
            f32::from_bits(1),
            f32::MIN_POSITIVE,
            -0.0,
            65520.0,
            65519.99,
        ];
        inputs.extend(special);
        inputs.resize(inputs.len().next_multiple_of(w), 1.0);
        let mut out = vec![D::default(); w];
        for chunk in inputs.chunks_exact(w) {
            V::<S, D>::load(chunk).write(&mut out);
            for (&v, &d) in chunk.iter().zip(&out) {
                let want = D::from_f64(v as f64);
                assert!(
                    same(d, want),
                    "{v:e} ({:#010x}) narrowed to {:#06x}, not {:#06x}",
                    v.to_bits(),
                    to_bits(d),
                    to_bits(want)
                );
            }
        }
    }

    #[derive(Clone, Copy)]
    struct CheckLanes;

    impl WithSimd for CheckLanes {
        type Output = ();
        fn with_simd<S: Simd>(self, _: S) {
            check_lanes::<S::F32>();
            check_lanes::<S::F64>();
            check_lanes::<<f16 as Data>::Lanes<S>>();
            check_lanes::<<bf16 as Data>::Lanes<S>>();
        }
    }

    #[derive(Clone, Copy)]
    struct CheckConversions;

    impl WithSimd for CheckConversions {
        type Output = ();
        fn with_simd<S: Simd>(self, _: S) {
            check_conversions::<S, f16>(f16::to_bits, f16::from_bits);
            check_conversions::<S, bf16>(bf16::to_bits, bf16::from_bits);
        }
    }

    /// Runs `op` on every instruction set this CPU has, inside its entry.
    fn on_every_isa<Op: WithSimd + Copy>(op: Op) {
        use super::simd::{Portable, Scalar};
        Scalar.vectorize(op);
        Portable.vectorize(op);
        #[cfg(target_arch = "x86_64")]
        {
            if let Some(token) = super::x86::Avx2::detect() {
                token.vectorize(op);
            }
            if let Some(token) = super::x86::Avx512::detect() {
                token.vectorize(op);
            }
        }
    }

    #[test]
    fn lanes_of_every_type() {
        on_every_isa(CheckLanes);
    }

    #[test]
    #[cfg_attr(miri, ignore)]
    fn half_conversions_round_to_nearest_even() {
        on_every_isa(CheckConversions);
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

    /// The rows' instruction set: AVX-512 stays on buffers alike in lines, gives way to AVX2
    /// on others only where nothing forced it, the elements are 4 bytes or wider and the CPU
    /// has full-width AVX-512 units.
    #[test]
    fn rows_instruction_set() {
        use super::{with_isa, Isa};
        // Rows of 64 channels; the output 2 KiB past the input (alike in lines), or 32 bytes
        // further.
        let data = vec![0f32; 1024];
        let x = &data[..512];
        let halves = vec![half::f16::ZERO; 2048];
        let aligned = Isa::for_rows(&[x, &data[512..]], 64);
        let offset = Isa::for_rows(&[x, &data[520..1016]], 64);
        let offset_half = Isa::for_rows(&[&halves[..1024], &halves[1040..2032]], 64);
        let best = Isa::current();
        assert_eq!((aligned, offset_half), (best, best));
        let gives_way = best == Isa::Avx512
            && Isa::from_env() == Ok(None)
            && Isa::Avx2.is_available()
            && !Isa::avx512_in_halves();
        assert_eq!(offset, if gives_way { Isa::Avx2 } else { best });
        for isa in Isa::available() {
            assert_eq!(with_isa(isa, || Isa::for_rows(&[x, &data[520..]], 64)), isa);
        }
    }

    /// Zen 4 as the kernel names it in `/proc/cpuinfo`: an AMD CPU of family 25 (19h) with
    /// AVX-512.
    #[test]
    #[cfg(all(target_os = "linux", target_arch = "x86_64"))]
    #[cfg_attr(miri, ignore)]
    fn zen4_as_the_kernel_names_it() {
        let Ok(info) = std::fs::read_to_string("/proc/cpuinfo") else {
            return;
        };
        let field = |name: &str| {
            info.lines()
                .find(|l| l.split(':').next().is_some_and(|k| k.trim() == name))
                .and_then(|l| l.split(':').nth(1))
                .map(str::trim)
                .unwrap_or_default()
        };
        let zen4 = field("vendor_id") == "AuthenticAMD"
            && field("cpu family") == "25"
            && field("flags").split(' ').any(|f| f == "avx512f");
        assert_eq!(
            (super::zen4(), super::Isa::avx512_in_halves()),
            (zen4, zen4)
        );
    }
}
