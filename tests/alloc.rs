//! Issue 3: the per-sample hot path allocates nothing in steady state. A counting global
//! allocator (this test binary only) counts Rust heap allocations while a warmed-up
//! `ViewMaker` builds ConMIM pairs and masks into caller-owned buffers.
//! (libjpeg-turbo's own working memory is C `malloc`, outside this count.)
//!
//! The crop + resize (its coefficient tables and intermediate rows are reused once grown
//! to the largest crop seen), the strong ops, the mask and the decode (libjpeg-turbo,
//! after a marker-walk `probe_fast`) allocate nothing. (The `fast_image_resize` path
//! used before built its tables per call: ~450 allocations per 224x224 view; zune-jpeg's
//! header parser, the probe before, one `Vec` per image and a copy of any EXIF / ICC
//! segment.)

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use conmim::augment::color;
use conmim::augment::params::{ConMimParams, StrongConfig, StrongParams};
use conmim::augment::views::ViewMaker;
use conmim::image::ImageLimits;
use conmim::image::pixels::Decoder;
use conmim::image::resize::Resizer;
use conmim::loader::{MaskConfig, mask_rng};
use conmim::testkit::{self, JpegSpec};

struct Counting;

static COUNT: AtomicU64 = AtomicU64::new(0);
static ARMED: AtomicBool = AtomicBool::new(false);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if ARMED.load(Ordering::Relaxed) {
            COUNT.fetch_add(1, Ordering::Relaxed);
        }
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if ARMED.load(Ordering::Relaxed) {
            COUNT.fetch_add(1, Ordering::Relaxed);
        }
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// The count is process-wide: the tests of this binary take turns.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn issue_3_view_pairs_and_masks_allocate_nothing_per_sample() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let images: Vec<Vec<u8>> = (0..4)
        .map(|i| testkit::jpeg(&JpegSpec::rgb(500 - i * 40, 375, i as u64)))
        .collect();
    let limits = ImageLimits::default();
    let n = 224 * 224 * 3;
    let (mut weak, mut strong, mut mask) = (vec![0u8; n], vec![0u8; n], vec![0u8; 196]);
    let masker = MaskConfig::default().build(224).unwrap();
    let mut vm = ViewMaker::new();
    let run =
        |vm: &mut ViewMaker, weak: &mut [u8], strong: &mut [u8], mask: &mut [u8], sample: u64| {
            let bytes = &images[(sample % 4) as usize];
            vm.conmim_pair(bytes, &limits, 5, 0, sample, 224, weak, strong)
                .unwrap();
            masker.generate(&mut mask_rng(5, 0, sample), mask);
        };
    // Warm up: buffers grow to the largest image and crop seen.
    for sample in 0..40 {
        run(&mut vm, &mut weak, &mut strong, &mut mask, sample);
    }
    COUNT.store(0, Ordering::Relaxed);
    ARMED.store(true, Ordering::Relaxed);
    for sample in 40..60 {
        run(&mut vm, &mut weak, &mut strong, &mut mask, sample);
    }
    ARMED.store(false, Ordering::Relaxed);
    let allocs = COUNT.load(Ordering::Relaxed);
    assert_eq!(allocs, 0, "{allocs} allocations in 20 samples");

    // The crop + resize (+ flip) alone: none at all once warm.
    let decoded: Vec<(Vec<u8>, u32, u32)> = images
        .iter()
        .map(|b| {
            let mut d = Decoder::new();
            let (w, h) = d.decode_rgb(b, &limits).unwrap();
            (d.rgb().to_vec(), w, h)
        })
        .collect();
    let mut resizer = Resizer::new();
    let resize = |r: &mut Resizer, weak: &mut [u8], sample: u64, full: bool| {
        let (px, w, h) = &decoded[(sample % 4) as usize];
        let p = ConMimParams::sample(5, 0, sample, *w, *h);
        let c = if full {
            (0, 0, *h, *w)
        } else {
            (p.crop.top, p.crop.left, p.crop.height, p.crop.width)
        };
        r.crop_resize_flip(px, *w, *h, c, p.flip, weak, 224, 224)
            .unwrap();
    };
    // Warm up: the whole image is the largest crop (most rows, widest kernels).
    for sample in 0..4 {
        resize(&mut resizer, &mut weak, sample, true);
    }
    COUNT.store(0, Ordering::Relaxed);
    ARMED.store(true, Ordering::Relaxed);
    for sample in 0..200 {
        resize(&mut resizer, &mut weak, sample, false);
    }
    ARMED.store(false, Ordering::Relaxed);
    assert_eq!(COUNT.load(Ordering::Relaxed), 0, "crop + resize");

    // Everything but the resize: none at all.
    let mut rng = conmim::augment::params::sample_rng(5, 0, 0);
    let params: Vec<StrongParams> = (0..20)
        .map(|_| StrongParams::sample_from(&mut rng, &StrongConfig::default()))
        .collect();
    let mut scratch = Vec::new();
    for p in &params {
        color::apply_strong(p, &mut strong, 224, 224, &mut scratch);
    }
    COUNT.store(0, Ordering::Relaxed);
    ARMED.store(true, Ordering::Relaxed);
    for (i, p) in params.iter().enumerate() {
        color::apply_strong(p, &mut strong, 224, 224, &mut scratch);
        masker.generate(&mut mask_rng(5, 1, i as u64), &mut mask);
    }
    ARMED.store(false, Ordering::Relaxed);
    assert_eq!(COUNT.load(Ordering::Relaxed), 0, "strong ops and masks");
}

/// RandAugment (the fine-tuning loader's `ClassifyTrain` path): drawing the parameters
/// and applying every op allocates nothing once the caller's scratch has grown. (Before,
/// each draw built a `Vec` of ops and each equalize collected a `Vec` per channel.)
#[test]
fn randaugment_draws_and_ops_allocate_nothing_per_sample() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    use conmim::augment::randaug::{
        self, AppliedOp, Interp, RAND_INCREASING_OPS, RandAugConfig, RandAugParams,
    };
    let (w, h) = (64usize, 48usize);
    let src: Vec<u8> = (0..w * h * 3).map(|i| (i * 37 % 251) as u8).collect();
    let mut img = src.clone();
    let mut scratch = Vec::new();
    let cfg = RandAugConfig::from_policy("rand-m9-mstd0.5-inc1").unwrap();
    // Every op once, at full magnitude (the scratch grows to what the geometric ops and
    // sharpness need), through the same fixed-size parameters the loader draws.
    let every: Vec<RandAugParams> = RAND_INCREASING_OPS
        .iter()
        .map(|&op| {
            let applied = AppliedOp {
                op,
                magnitude: 9.0,
                arg: randaug::level_to_arg(op, 9.0, false, 0.45),
                interp: Interp::Bilinear,
            };
            RandAugParams::with_ops(&[applied], cfg.fill)
        })
        .collect();
    let round = |img: &mut Vec<u8>, scratch: &mut Vec<u8>, s: u64| {
        img.copy_from_slice(&src);
        let mut rng = conmim::augment::params::sample_rng(3, 0, s);
        let p = RandAugParams::sample_from(&mut rng, &cfg);
        randaug::apply(&p, img, w, h, scratch);
        randaug::apply(&every[s as usize % every.len()], img, w, h, scratch);
    };
    for s in 0..2 * every.len() as u64 {
        round(&mut img, &mut scratch, s);
    }
    COUNT.store(0, Ordering::Relaxed);
    ARMED.store(true, Ordering::Relaxed);
    for s in 0..200 {
        round(&mut img, &mut scratch, s);
    }
    ARMED.store(false, Ordering::Relaxed);
    assert_eq!(COUNT.load(Ordering::Relaxed), 0, "RandAugment");
}
