//! How work is spread over threads: rayon's `join` and parallel iterators in whatever pool
//! the caller runs in (`pool.install(..)`), or the calling thread alone below a size
//! threshold or without the `rayon` feature.

use crate::kernels::buffers::Span;
use crate::kernels::Restore;
use std::cell::Cell;

/// Calls with less work than this run on the calling thread: below it, waking other threads
/// costs more than they save. Work counts elements weighted by what a call does to each
/// (1 for inference's one read, multiply-add and write; 4 for training and backward, which
/// reduce before they map) plus a fixed cost per channel (its parameters, its reductions):
/// inference of a 1x128x28x28 activation (100 352 elements) is worth two threads, training of a
/// 1x512x7x7 one (25 088 elements, 512 short channels) too, its inference not.
pub const DEFAULT_PARALLEL_THRESHOLD: usize = 1 << 16;

/// The work of an operation per element and per channel, in units of inference's
/// per-element work, for [`DEFAULT_PARALLEL_THRESHOLD`].
#[derive(Clone, Copy, Debug)]
pub(crate) struct Cost {
    pub per_element: usize,
    pub per_channel: usize,
}

/// Inference and `apply_scale_shift`: one read, one multiply-add, one write per element.
pub(crate) const MAP: Cost = Cost {
    per_element: 1,
    per_channel: 16,
};

/// Statistics alone: two reads from cache per element, no write.
pub(crate) const REDUCE: Cost = Cost {
    per_element: 3,
    per_channel: 48,
};

/// Training's forward pass and backward: a reduction, then a map.
pub(crate) const REDUCE_MAP: Cost = Cost {
    per_element: 4,
    per_channel: 64,
};

thread_local! {
    static THRESHOLD: Cell<Option<usize>> = const { Cell::new(None) };
    static STREAM_THRESHOLD: Cell<Option<usize>> = const { Cell::new(None) };
}

/// Normalizations and backward passes that move at least this many bytes (inputs and output
/// together) write their output with streaming (non-temporal) stores, which skip reading the
/// destination lines and do not keep them in cache: three quarters of the last-level cache
/// (else 24 MiB), beyond which the output would not stay there for its reader anyway.
/// Measured on Zen 5 (32 MiB L3), one thread, streaming against plain stores: training
/// 1.6x faster at 25.6 MB moved (32x2048x7x7) and 1.2x at 25.6 MB (8x512x28x28), 8% slower
/// at 12.8 MB (32x256x14x14); backward 1.3x faster at 38.5 MB (32x2048x7x7), 15% slower at
/// 19.2 MB (32x256x14x14).
pub(crate) fn stream_threshold() -> usize {
    STREAM_THRESHOLD
        .with(|t| t.get())
        .unwrap_or_else(|| caches().last / 4 * 3)
}

/// The data caches of this machine, as far as they matter here.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Caches {
    /// Bytes of the level-2 cache of a core (256 KiB when unknown).
    pub l2: usize,
    /// Bytes of the largest cache (32 MiB when unknown).
    pub last: usize,
}

/// The caches of CPU 0 as Linux's sysfs lists them, read once; defaults elsewhere.
pub(crate) fn caches() -> Caches {
    static CACHES: std::sync::OnceLock<Caches> = std::sync::OnceLock::new();
    *CACHES.get_or_init(|| {
        let sizes = cache_sizes();
        Caches {
            l2: sizes
                .iter()
                .find(|(level, _)| *level == 2)
                .map_or(256 << 10, |(_, size)| *size),
            last: sizes
                .iter()
                .map(|(_, size)| *size)
                .max()
                .unwrap_or(32 << 20),
        }
    })
}

/// `(level, bytes)` of every data or unified cache sysfs lists for CPU 0.
fn cache_sizes() -> Vec<(u32, usize)> {
    // Miri runs isolated from the file system: the defaults.
    if cfg!(miri) {
        return Vec::new();
    }
    let Ok(dir) = std::fs::read_dir("/sys/devices/system/cpu/cpu0/cache") else {
        return Vec::new();
    };
    let read = |path: std::path::PathBuf| std::fs::read_to_string(path).ok();
    dir.filter_map(|e| {
        let path = e.ok()?.path();
        if read(path.join("type"))?.trim() == "Instruction" {
            return None;
        }
        let level = read(path.join("level"))?.trim().parse().ok()?;
        let size = read(path.join("size"))?;
        let size = size.trim();
        let (digits, unit) = size.split_at(size.find(|c: char| !c.is_ascii_digit())?);
        let mult = match unit {
            "K" => 1 << 10,
            "M" => 1 << 20,
            "G" => 1 << 30,
            _ => return None,
        };
        Some((level, digits.parse::<usize>().ok()?.checked_mul(mult)?))
    })
    .collect()
}

/// The work from which a call goes parallel: [`with_parallel_threshold`]'s, else
/// [`DEFAULT_PARALLEL_THRESHOLD`].
pub(crate) fn parallel_threshold() -> usize {
    THRESHOLD
        .with(|t| t.get())
        .unwrap_or(DEFAULT_PARALLEL_THRESHOLD)
}

/// Runs `f` with outputs of at least `bytes` bytes written by streaming stores (0: all of
/// them), for tests that must reach that path and for tuning. Per thread, restored when `f`
/// returns or panics (see [`crate::with_isa`] for what that means with thread pools).
#[doc(hidden)]
pub fn with_stream_threshold<R>(bytes: usize, f: impl FnOnce() -> R) -> R {
    let _restore = Restore::set(&STREAM_THRESHOLD, Some(bytes));
    f()
}

/// Runs `f` with calls made from this thread going parallel from `min_len` elements on instead
/// of [`DEFAULT_PARALLEL_THRESHOLD`]. For tests that must reach the parallel paths with small
/// tensors, and for tuning; results do not depend on it beyond rounding. Per thread, restored
/// when `f` returns or panics (see [`crate::with_isa`] for what that means with thread pools).
#[doc(hidden)]
pub fn with_parallel_threshold<R>(min_len: usize, f: impl FnOnce() -> R) -> R {
    let _restore = Restore::set(&THRESHOLD, Some(min_len));
    f()
}

/// The threading decisions of one call, taken once at its start on the calling thread.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Par {
    /// Threads of the current rayon pool (1 without the `rayon` feature).
    pub threads: usize,
    /// Whether this call spreads its work over them.
    pub on: bool,
}

impl Par {
    /// The decision for a call of `cost` over `len` elements in `c` channels.
    pub fn for_work(len: usize, c: usize, cost: Cost) -> Par {
        let threads = threads();
        let min = parallel_threshold();
        let work = len
            .saturating_mul(cost.per_element)
            .saturating_add(c.saturating_mul(cost.per_channel));
        Par {
            threads,
            on: threads > 1 && len >= 2 && work >= min,
        }
    }

    /// Elements per task when a buffer of `len` elements is split into spans of whole `unit`s:
    /// about four tasks a thread, for balance.
    pub fn grain(&self, len: usize, unit: usize) -> usize {
        if !self.on {
            return usize::MAX;
        }
        let per_task = len.div_ceil(4 * self.threads).max(4096);
        per_task.div_ceil(unit.max(1)) * unit.max(1)
    }
}

#[cfg(feature = "rayon")]
fn threads() -> usize {
    rayon::current_num_threads()
}

#[cfg(not(feature = "rayon"))]
fn threads() -> usize {
    1
}

#[cfg(feature = "rayon")]
fn join<A: FnOnce() + Send, B: FnOnce() + Send>(a: A, b: B) {
    rayon::join(a, b);
}

#[cfg(not(feature = "rayon"))]
fn join<A: FnOnce(), B: FnOnce()>(a: A, b: B) {
    a();
    b();
}

/// Calls `f(first_unit, span)` on spans of `buf` that hold whole `unit`s and about `grain`
/// elements, as parallel tasks (one span of everything when `grain` covers it).
pub(crate) fn for_each_span<B: Span>(
    buf: B,
    unit: usize,
    grain: usize,
    first_unit: usize,
    f: &(impl Fn(usize, B) + Sync),
) {
    let units = buf.len().checked_div(unit).unwrap_or(0);
    if buf.len() <= grain || units < 2 {
        f(first_unit, buf);
        return;
    }
    let half = units / 2;
    let (a, b) = buf.split_at(half * unit);
    join(
        || for_each_span(a, unit, grain, first_unit, f),
        || for_each_span(b, unit, grain, first_unit + half, f),
    );
}

/// `(0..n).map(f).collect()`, in parallel when `on`.
pub(crate) fn map<R: Send>(n: usize, on: bool, f: impl Fn(usize) -> R + Sync + Send) -> Vec<R> {
    #[cfg(feature = "rayon")]
    if on {
        use rayon::prelude::*;
        return (0..n).into_par_iter().map(f).collect();
    }
    let _ = on;
    (0..n).map(f).collect()
}

/// Calls `f(i, chunk)` for the chunks of `size` items of `items` (the last one may be
/// shorter), in parallel when `on`.
pub(crate) fn for_each_chunk<X: Send>(
    items: &mut [X],
    size: usize,
    on: bool,
    f: impl Fn(usize, &mut [X]) + Sync + Send,
) {
    if size == 0 {
        return;
    }
    #[cfg(feature = "rayon")]
    if on {
        use rayon::prelude::*;
        items
            .par_chunks_mut(size)
            .enumerate()
            .for_each(|(i, chunk)| f(i, chunk));
        return;
    }
    let _ = on;
    for (i, chunk) in items.chunks_mut(size).enumerate() {
        f(i, chunk);
    }
}

/// Calls `f(i, &mut groups[i * size ..][..size], &mut out[i * out_size ..][..out_size])`
/// for every group (the last `out` chunk may be shorter), in parallel when `on`.
pub(crate) fn for_each_group<X: Send, Y: Send>(
    groups: &mut [X],
    size: usize,
    out: &mut [Y],
    out_size: usize,
    on: bool,
    f: impl Fn(usize, &mut [X], &mut [Y]) + Sync + Send,
) {
    if size == 0 || out_size == 0 {
        return;
    }
    #[cfg(feature = "rayon")]
    if on {
        use rayon::prelude::*;
        groups
            .par_chunks_mut(size)
            .zip(out.par_chunks_mut(out_size))
            .enumerate()
            .for_each(|(i, (g, o))| f(i, g, o));
        return;
    }
    let _ = on;
    let chunks = groups.chunks_mut(size).zip(out.chunks_mut(out_size));
    for (i, (g, o)) in chunks.enumerate() {
        f(i, g, o);
    }
}
