//! Issue 3: the whole loader (reader, workers, collator) in steady state allocates no
//! output buffers: no view, mask or batch buffer per sample or per batch. A counting
//! global allocator (this test binary only) counts Rust heap allocations on every
//! thread while a warmed-up loader runs, and sorts them by size.
//!
//! What is left is small and bounded per sample: the tar reader's fresh buffers for
//! each sample's key and member bytes, the stream's bookkeeping (the decode path itself
//! allocates nothing: `tests/alloc.rs`). Large allocations happen per shard (the 1 MiB read buffer of
//! each opened shard), not per sample. (libjpeg-turbo's working memory is C `malloc`,
//! outside this count.)

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use conmim::loader::{Loader, LoaderConfig, MaskConfig};
use conmim::stream::{SourceOptions, StreamConfig};
use conmim::testkit::{self, JpegSpec};

struct Counting;

static SMALL: AtomicU64 = AtomicU64::new(0);
static LARGE: AtomicU64 = AtomicU64::new(0);
static ARMED: AtomicBool = AtomicBool::new(false);

/// Allocations at least this big are "large": a 64-px view is 12,288 bytes, a batch
/// of them 98,304; the test JPEGs are about 1.5 KB.
const LARGE_BYTES: usize = 12_288;

fn count(size: usize) {
    if ARMED.load(Ordering::Relaxed) {
        if size >= LARGE_BYTES {
            LARGE.fetch_add(1, Ordering::Relaxed);
        } else {
            SMALL.fetch_add(1, Ordering::Relaxed);
        }
    }
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count(layout.size());
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count(new_size);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Samples per shard.
const SHARD: u64 = 100;

#[test]
fn issue3_the_loader_allocates_no_output_buffers_in_steady_state() {
    let dir = tempfile::tempdir().unwrap();
    testkit::write_sharded(dir.path(), "train", &[SHARD; 4], |i, j| {
        let jpg = testkit::jpeg(&JpegSpec::rgb(
            48 + (j as u32 % 3) * 8,
            40,
            (i as u64) * 1000 + j,
        ));
        (
            format!("s{i}_{j:03}"),
            vec![("jpg".to_owned(), jpg), ("cls".to_owned(), b"3".to_vec())],
        )
    })
    .unwrap();
    let cfg = LoaderConfig {
        stream: StreamConfig {
            seed: 1,
            shuffle_buffer: 32,
            epochs: None,
            ..Default::default()
        },
        threads: 2,
        batch_size: 8,
        image_size: 64,
        mask: MaskConfig {
            patch_size: 16,
            ..MaskConfig::default()
        },
        prefetch: 2,
        ..Default::default()
    };
    let mut loader =
        Loader::open(dir.path().to_str().unwrap(), &SourceOptions::default(), cfg).unwrap();
    // Warm up: every buffer has grown to its steady size (two epochs).
    for b in (&mut loader).take(100) {
        b.unwrap();
    }
    let before = loader.stats().samples;
    ARMED.store(true, Ordering::Relaxed);
    for b in (&mut loader).take(200) {
        b.unwrap();
    }
    ARMED.store(false, Ordering::Relaxed);
    let samples = loader.stats().samples - before;
    let (small, large) = (SMALL.load(Ordering::Relaxed), LARGE.load(Ordering::Relaxed));
    let grown = loader.stats().grown_buffers;
    drop(loader);
    let shards = samples.div_ceil(SHARD);
    eprintln!(
        "{samples} samples ({shards} shards): {small} small allocations ({:.1} per sample), \
         {large} large",
        small as f64 / samples as f64
    );
    assert_eq!(
        grown, 0,
        "a consumer that drops its batches needs no extra buffers"
    );
    // The reader runs ahead of the consumer by up to a few shards.
    assert!(
        large <= shards + 4,
        "{large} allocations of >= {LARGE_BYTES} bytes for {samples} samples in {shards} \
         shards: output buffers are being allocated"
    );
    assert!(
        small <= MAX_SMALL_PER_SAMPLE * samples,
        "{small} small allocations for {samples} samples"
    );
}

/// Measured: 12.1 per sample (the tar reader's key, member names and bytes, the
/// sample's member list and shard URL, ...; 13.1 while zune's header parser was the
/// probe), each under 12 KB; the bound
/// leaves room for changes in dependencies, not for a per-sample buffer.
const MAX_SMALL_PER_SAMPLE: u64 = 20;
