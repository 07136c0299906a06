//! Helpers shared by the integration tests: data generators, tolerances, and a runner that
//! repeats a check on every instruction set and threading path.
#![allow(dead_code)]

use batchnorm::{
    with_isa, with_parallel_threshold, with_stream_threshold, Data, Element, Isa, Layout, Shape,
};
use proptest::prelude::*;
use std::sync::OnceLock;

/// A small deterministic generator (xorshift64*), so that a proptest seed reproduces its data.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Uniform in [-1, 1).
    pub fn signed(&mut self) -> f64 {
        2.0 * self.unit() - 1.0
    }
    /// One of a few offsets and spreads, hard cases included (offset up to 1e5 spreads): returns
    /// `(offset, spread)`.
    pub fn offset_spread(&mut self) -> (f64, f64) {
        let offset = [0.0, 1.0, -30.0, 1e3][(self.unit() * 4.0) as usize];
        let spread = [1e-2, 1.0, 50.0][(self.unit() * 3.0) as usize];
        (offset, spread)
    }
    /// `n` values `offset + spread * u`, u uniform in [-1, 1), rounded to `T`.
    pub fn data<T: Data>(&mut self, n: usize, offset: f64, spread: f64) -> Vec<T> {
        (0..n)
            .map(|_| T::from_f64(offset + spread * self.signed()))
            .collect()
    }
}

/// The instruction sets the tests run on: every one this CPU has. `BATCHNORM_TEST_ISA` (names
/// separated by commas, e.g. `avx512` or `avx2,avx512`) makes every test that runs on them
/// fail when one of those instruction sets is not detected, so that a CI machine with it can
/// insist on its being tested (as matrixmultiply's `MMTEST_FEATURE`).
pub fn test_isas() -> Vec<Isa> {
    if let Ok(names) = std::env::var("BATCHNORM_TEST_ISA") {
        for name in names.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            let isa = Isa::from_name(name)
                .unwrap_or_else(|| panic!("BATCHNORM_TEST_ISA: no instruction set {name:?}"));
            assert!(
                isa.is_available(),
                "BATCHNORM_TEST_ISA={names}: this CPU lacks {name}, which must be tested"
            );
        }
    }
    Isa::available()
}

/// Runs `f` on every available instruction set, each on the calling thread and in a 3-thread
/// pool with the parallel threshold at 0 (so even tiny tensors take the parallel paths: the
/// channel-split and the fused ones, depending on the channel count). `f` gets a label for
/// assertion messages.
pub fn on_every_path(mut f: impl FnMut(&str) + Send) {
    static POOL: OnceLock<rayon::ThreadPool> = OnceLock::new();
    let pool = POOL.get_or_init(|| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .expect("thread pool")
    });
    for isa in test_isas() {
        with_isa(isa, || f(&format!("{isa:?}, calling thread")));
        pool.install(|| {
            with_isa(isa, || {
                with_parallel_threshold(0, || {
                    // Streaming stores everywhere, so that their path is checked as well.
                    with_stream_threshold(0, || f(&format!("{isa:?}, 3 threads, streaming")))
                })
            })
        });
    }
}

/// The relative tolerance of an output of type `T` against the `f64` oracle, as
/// `|got - want| <= tol * (1 + |want|)`, for data whose mean is `ratio` times its spread.
///
/// f32: the normalization rounds 3 to 4 times at 2^-24 each (`x - hi`, `- lo`, the scale, the
/// fused multiply-add) and the statistics add a relative error of at most a few 1e-7 (blocks of
/// at most 128 values per f32 accumulator lane, merged in f64); 1e-5 leaves a margin of about
/// ten over that and is the bound the accuracy issue sets. f64: the same count at 2^-53, plus
/// what no f64 computation avoids, the oracle's included: the mean itself is rounded to
/// `2^-53 * |mean|`, which is `2^-53 * ratio` standard deviations, and each Chan merge of
/// blocks rounds the difference of two such means again (a few dozen merges at most here).
pub fn tol<T: Element>(ratio: f64) -> f64 {
    let base = if std::mem::size_of::<T>() == 4 {
        1e-5
    } else {
        1e-12
    };
    base + 64.0 * f64::EPSILON * ratio
}

/// Asserts `|got - want| <= tol * (1 + |want|)` element by element, NaN matching NaN only.
pub fn assert_close<T: Element>(got: &[T], want: &[f64], tol: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let g = g.to_f64();
        let ok = if w.is_nan() {
            g.is_nan()
        } else if w.is_infinite() {
            g == *w
        } else {
            (g - w).abs() <= tol * (1.0 + w.abs())
        };
        assert!(ok, "{what}[{i}]: got {g:e}, want {w:e} (tol {tol:e})");
    }
}

/// Bit-for-bit equality, every NaN equal to every other: a NaN's payload is not specified
/// (the compiler may commute the operands of an addition or multiplication, and x86
/// propagates the first operand's payload), so two correct results may differ there.
pub fn assert_identical<T: Data>(a: &[T], b: &[T], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: length");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        let (x, y) = (x.to_f64(), y.to_f64());
        let same = (x.is_nan() && y.is_nan()) || x.to_bits() == y.to_bits();
        assert!(same, "{what}[{i}]: {x:?} vs {y:?}");
    }
}

/// Either layout.
pub fn layout() -> impl Strategy<Value = Layout> {
    prop_oneof![Just(Layout::Nchw), Just(Layout::Nhwc)]
}

/// Training shapes: mostly small ones (every tail and split case: odd channel counts, counts
/// that are no multiple of a vector width, N = 1, spatial = 1), sometimes channels of thousands
/// of values (several statistics blocks), sometimes rows of hundreds of channels.
pub fn shape() -> BoxedStrategy<Shape> {
    if cfg!(miri) {
        // Miri interprets every operation: small shapes, still odd sizes and both paths of
        // rows (NCHW runs, NHWC and BatchNorm1d rows) and a channel longer than a vector.
        return (1usize..4, 1usize..6, 1usize..24)
            .prop_map(|(n, c, s)| Shape::new(n, c, s))
            .prop_filter("training needs two values per channel", |s| {
                s.n * s.spatial >= 2
            })
            .boxed();
    }
    prop_oneof![
        4 => (1usize..6, 1usize..20, 1usize..40),
        1 => (1usize..3, 1usize..4, 1usize..6000),
        1 => (1usize..300, 1usize..40, Just(1usize)),
        // Wide rows (NHWC, BatchNorm1d): split by blocks of columns among threads.
        1 => (1usize..5, 60usize..300, 1usize..4),
        // Rows wide and many enough to be mapped two at a time (NHWC).
        1 => (2usize..5, 256usize..320, 8usize..24),
    ]
    .prop_map(|(n, c, s)| Shape::new(n, c, s))
    .prop_filter("training needs two values per channel", |s| {
        s.n * s.spatial >= 2
    })
    .boxed()
}

/// Proptest's configuration with `cases` cases natively; under Miri, which interprets every
/// operation, two cases and no failure files (it runs isolated from the file system).
pub fn config(cases: u32) -> ProptestConfig {
    if cfg!(miri) {
        ProptestConfig {
            cases: 2,
            failure_persistence: None,
            ..ProptestConfig::default()
        }
    } else {
        // `PROPTEST_CASES` overrides every test's count (for a longer soak than CI's).
        let cases = std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(cases);
        ProptestConfig {
            cases,
            ..ProptestConfig::default()
        }
    }
}

/// The cases of the tests that the one-thread two-pass schedules give the channel groups'
/// bits: small NCHW shapes, one of more channels than a group holds (under Miri, which
/// interprets every operation, the first and that one: 75 s a suite instead of 150), each
/// with an input whose channel 1 in image 1 has squares that overflow `f32` (summed again in
/// `f64`), and the generator that made it, for the rest of the case's data.
pub fn two_pass_cases(seed: u64) -> impl Iterator<Item = (Shape, Vec<f32>, Rng)> {
    let shapes = [
        Shape::new(3, 5, 37),
        Shape::new(2, 17, 64),
        Shape::new(4, 3, 100),
        Shape::new(2, 70, 16),
    ];
    let miri_skips = |k: usize| cfg!(miri) && k != 0 && k != 3;
    let cases = shapes
        .into_iter()
        .enumerate()
        .filter(move |&(k, _)| !miri_skips(k));
    cases.map(move |(k, shape)| {
        let mut rng = Rng::new(seed + k as u64);
        let mut x: Vec<f32> = rng.data(shape.numel().unwrap(), 1.0, 2.0);
        for s in 0..shape.spatial {
            x[shape.index(Layout::Nchw, 1, 1, s)] = 3.0e38 - 1e37 * (s % 7) as f32;
        }
        (shape, x, rng)
    })
}
