//! Random parameters of the ConMIM views (CONMIM_SPEC.md, "Augmentation").
//!
//! Both views share one crop and one flip; the teacher's view additionally gets the
//! "strong" photometric ops. All values are drawn from the per-sample stream
//! [`sample_rng`] in one fixed order (see [`ConMimParams::sample_from`]), and every
//! value is drawn whether or not its op ends up applied, so the number of draws before
//! the crop never changes.
//!
//! Floats come from [`uniform01`]: the top 53 bits of one `next_u64`, i.e. a uniform
//! `f64` in `[0, 1)`. Torch's generator is not reproduced (impossible without
//! libtorch); what is ported is each sampler's *algorithm* and distribution.

use crate::seed::SplitMix64;

/// `RandomResizedCrop` scale range (fraction of the image area).
pub const CROP_SCALE: (f64, f64) = (0.08, 1.0);
/// `RandomResizedCrop` aspect-ratio range (width / height).
pub const CROP_RATIO: (f64, f64) = (3.0 / 4.0, 4.0 / 3.0);
/// `RandomHorizontalFlip` probability.
pub const FLIP_P: f64 = 0.5;

/// Domain constant that separates augmentation streams from other users of
/// `SplitMix64::new` (shuffles, masks) with the same seed.
const AUGMENT_DOMAIN: u64 = 0x6175_676D_656E_7431; // "augment1"

/// SplitMix64's output function (a bijection on `u64`).
fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The random stream of one sample in one epoch.
///
/// `stream = mix64(mix64(epoch ^ DOMAIN) ^ sample)`, then
/// `SplitMix64::new(seed, stream)`. `mix64` is a bijection, so for a fixed seed and
/// epoch distinct samples get distinct streams, and the double mixing decorrelates
/// neighbouring `(epoch, sample)` pairs. The result depends only on the three
/// numbers, never on worker count or scheduling.
pub fn sample_rng(seed: u64, epoch: u64, sample: u64) -> SplitMix64 {
    let stream = mix64(mix64(epoch ^ AUGMENT_DOMAIN) ^ sample);
    SplitMix64::new(seed, stream)
}

/// Uniform `f64` in `[0, 1)` from the top 53 bits of one draw.
pub fn uniform01(rng: &mut SplitMix64) -> f64 {
    (rng.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

/// Uniform `f64` in `[lo, hi)` (one draw).
pub fn uniform(rng: &mut SplitMix64, lo: f64, hi: f64) -> f64 {
    lo + (hi - lo) * uniform01(rng)
}

/// `true` with probability `p` (one draw).
pub fn bernoulli(rng: &mut SplitMix64, p: f64) -> bool {
    uniform01(rng) < p
}

/// A crop rectangle in pixels: rows `top..top + height`, columns `left..left + width`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CropParams {
    pub top: u32,
    pub left: u32,
    pub height: u32,
    pub width: u32,
}

/// Python's `int(round(x))` for the non-negative values used here: round half to even.
fn py_round(x: f64) -> u64 {
    x.round_ties_even().max(0.0) as u64
}

/// Crop parameters for an image of `width` x `height`, ported from torchvision's
/// `RandomResizedCrop.get_params(img, scale, ratio)`:
///
/// ```text
/// area = H * W; log_ratio = log(ratio)
/// 10 times:
///     target_area  = area * U(scale)
///     aspect_ratio = exp(U(log_ratio))
///     w = round(sqrt(target_area * aspect_ratio)); h = round(sqrt(target_area / aspect_ratio))
///     if 0 < w <= W and 0 < h <= H:
///         i = randint(0, H - h + 1); j = randint(0, W - w + 1); return i, j, h, w
/// # fallback: centre crop
/// in_ratio = W / H
/// if in_ratio < min(ratio): w = W; h = round(w / min(ratio))
/// elif in_ratio > max(ratio): h = H; w = round(h * max(ratio))
/// else: w = W; h = H
/// i = (H - h) // 2; j = (W - w) // 2
/// ```
///
/// `round` is Python's (half to even). Torchvision draws `U(scale)` and the log-ratio in
/// float32 tensors; here both are `f64`, which changes nothing but the last bits. For
/// sane ranges the fallback always yields `1 <= h <= H` and `1 <= w <= W`; the sides
/// are additionally clamped to at least 1 so an absurd `ratio` cannot give an empty
/// crop (torchvision would return 0 there). A zero-sized image gives an all-zero crop.
pub fn sample_crop(
    rng: &mut SplitMix64,
    width: u32,
    height: u32,
    scale: (f64, f64),
    ratio: (f64, f64),
) -> CropParams {
    sample_crop_traced(rng, width, height, scale, ratio).0
}

/// [`sample_crop`] that also says whether the centre-crop fallback was taken.
pub fn sample_crop_traced(
    rng: &mut SplitMix64,
    width: u32,
    height: u32,
    scale: (f64, f64),
    ratio: (f64, f64),
) -> (CropParams, bool) {
    if width == 0 || height == 0 {
        let empty = CropParams {
            top: 0,
            left: 0,
            height: 0,
            width: 0,
        };
        return (empty, true);
    }
    let (w_img, h_img) = (u64::from(width), u64::from(height));
    let area = (w_img * h_img) as f64;
    let (log_lo, log_hi) = (ratio.0.ln(), ratio.1.ln());
    for _ in 0..10 {
        let target_area = area * uniform(rng, scale.0, scale.1);
        let aspect_ratio = uniform(rng, log_lo, log_hi).exp();
        let w = py_round((target_area * aspect_ratio).sqrt());
        let h = py_round((target_area / aspect_ratio).sqrt());
        if 0 < w && w <= w_img && 0 < h && h <= h_img {
            let i = rng.below(h_img - h + 1);
            let j = rng.below(w_img - w + 1);
            let crop = CropParams {
                top: i as u32,
                left: j as u32,
                height: h as u32,
                width: w as u32,
            };
            return (crop, false);
        }
    }
    let (min_ratio, max_ratio) = (ratio.0.min(ratio.1), ratio.0.max(ratio.1));
    let in_ratio = w_img as f64 / h_img as f64;
    let (w, h) = if in_ratio < min_ratio {
        (w_img, py_round(w_img as f64 / min_ratio))
    } else if in_ratio > max_ratio {
        (py_round(h_img as f64 * max_ratio), h_img)
    } else {
        (w_img, h_img)
    };
    let (w, h) = (w.clamp(1, w_img), h.clamp(1, h_img));
    let crop = CropParams {
        top: ((h_img - h) / 2) as u32,
        left: ((w_img - w) / 2) as u32,
        height: h as u32,
        width: w as u32,
    };
    (crop, true)
}

/// Strengths of the strong view's ops (ConMIM defaults via [`Default`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StrongConfig {
    /// `RandomApply(ColorJitter)` probability.
    pub jitter_p: f64,
    /// ColorJitter brightness: factor ~ U(max(0, 1 - x), 1 + x).
    pub brightness: f64,
    /// ColorJitter contrast: factor ~ U(max(0, 1 - x), 1 + x).
    pub contrast: f64,
    /// ColorJitter saturation: factor ~ U(max(0, 1 - x), 1 + x).
    pub saturation: f64,
    /// ColorJitter hue: shift ~ U(-x, x), `x <= 0.5`.
    pub hue: f64,
    /// `RandomGrayscale` probability.
    pub grayscale_p: f64,
    /// GaussianBlur probability.
    pub blur_p: f64,
    /// GaussianBlur radius (PIL's `radius`, the Gaussian's sigma) ~ U(min, max).
    pub blur_sigma: (f64, f64),
    /// Solarization probability.
    pub solarize_p: f64,
}

impl Default for StrongConfig {
    /// CONMIM_SPEC.md: ColorJitter(0.4, 0.4, 0.2, 0.1) with p=0.8, grayscale p=0.2,
    /// blur p=0.1 with radius U(0.1, 2.0), solarization p=0.2.
    fn default() -> Self {
        StrongConfig {
            jitter_p: 0.8,
            brightness: 0.4,
            contrast: 0.4,
            saturation: 0.2,
            hue: 0.1,
            grayscale_p: 0.2,
            blur_p: 0.1,
            blur_sigma: (0.1, 2.0),
            solarize_p: 0.2,
        }
    }
}

/// Index of each ColorJitter op in [`ColorJitterParams::order`] (torchvision's `fn_id`).
pub const JITTER_BRIGHTNESS: u8 = 0;
/// See [`JITTER_BRIGHTNESS`].
pub const JITTER_CONTRAST: u8 = 1;
/// See [`JITTER_BRIGHTNESS`].
pub const JITTER_SATURATION: u8 = 2;
/// See [`JITTER_BRIGHTNESS`].
pub const JITTER_HUE: u8 = 3;

/// `RandomApply(ColorJitter(...))` parameters, as `ColorJitter.get_params` returns them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ColorJitterParams {
    /// Whether the jitter is applied at all.
    pub apply: bool,
    /// `fn_idx = randperm(4)`: the ops in application order, 0 brightness, 1 contrast,
    /// 2 saturation, 3 hue.
    pub order: [u8; 4],
    pub brightness: f32,
    pub contrast: f32,
    pub saturation: f32,
    pub hue: f32,
}

impl ColorJitterParams {
    /// timm's fine-tuning `ColorJitter(s, s, s)` (`create_transform(color_jitter=s)`
    /// without RandAugment): always applied, brightness, contrast and saturation
    /// factors in `[max(0, 1 - s), 1 + s]`, the ops in a random order, and no hue
    /// (torchvision skips a hue of 0; apply with [`crate::augment::color::color_jitter_no_hue`]).
    /// Draws 6 values from `rng`: the permutation (3), then the three factors.
    pub fn sample_no_hue(rng: &mut SplitMix64, strength: f64) -> ColorJitterParams {
        let mut order = [0u8, 1, 2, 3];
        rng.shuffle(&mut order);
        let mut factor = || uniform(rng, (1.0 - strength).max(0.0), 1.0 + strength) as f32;
        let (brightness, contrast, saturation) = (factor(), factor(), factor());
        ColorJitterParams {
            apply: true,
            order,
            brightness,
            contrast,
            saturation,
            hue: 0.0,
        }
    }

    /// Parameters that leave an image unchanged.
    pub const IDENTITY: ColorJitterParams = ColorJitterParams {
        apply: false,
        order: [0, 1, 2, 3],
        brightness: 1.0,
        contrast: 1.0,
        saturation: 1.0,
        hue: 0.0,
    };
}

/// The teacher view's extra photometric ops, applied in this order:
/// jitter (if `apply`), grayscale, blur, solarize.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StrongParams {
    pub jitter: ColorJitterParams,
    pub grayscale: bool,
    /// Gaussian blur sigma (PIL radius), `None` when not applied.
    pub blur: Option<f32>,
    /// Solarize with threshold 128.
    pub solarize: bool,
}

impl StrongParams {
    /// Parameters that leave an image unchanged.
    pub const IDENTITY: StrongParams = StrongParams {
        jitter: ColorJitterParams::IDENTITY,
        grayscale: false,
        blur: None,
        solarize: false,
    };

    /// Draws the strong parameters; always exactly 12 values from `rng`, in this
    /// order: jitter apply, the permutation (Fisher–Yates, 3 draws), brightness,
    /// contrast, saturation, hue, grayscale, blur apply, blur sigma, solarize.
    pub fn sample_from(rng: &mut SplitMix64, cfg: &StrongConfig) -> StrongParams {
        let apply = bernoulli(rng, cfg.jitter_p);
        let mut order = [0u8, 1, 2, 3];
        rng.shuffle(&mut order);
        let factor =
            |rng: &mut SplitMix64, x: f64| uniform(rng, (1.0 - x).max(0.0), 1.0 + x) as f32;
        let brightness = factor(rng, cfg.brightness);
        let contrast = factor(rng, cfg.contrast);
        let saturation = factor(rng, cfg.saturation);
        let hue = uniform(rng, -cfg.hue, cfg.hue) as f32;
        let grayscale = bernoulli(rng, cfg.grayscale_p);
        let blur_on = bernoulli(rng, cfg.blur_p);
        let sigma = uniform(rng, cfg.blur_sigma.0, cfg.blur_sigma.1) as f32;
        let solarize = bernoulli(rng, cfg.solarize_p);
        StrongParams {
            jitter: ColorJitterParams {
                apply,
                order,
                brightness,
                contrast,
                saturation,
                hue,
            },
            grayscale,
            blur: blur_on.then_some(sigma),
            solarize,
        }
    }
}

/// Everything random about one ConMIM training pair: the shared crop and flip (both
/// views) and the teacher's strong extras.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ConMimParams {
    pub crop: CropParams,
    /// Horizontal flip (applied with the crop, to both views).
    pub flip: bool,
    pub strong: StrongParams,
}

impl ConMimParams {
    /// The parameters of `sample` in `epoch` for an image of `width` x `height`, with
    /// the ConMIM defaults, from [`sample_rng`]`(seed, epoch, sample)`.
    pub fn sample(seed: u64, epoch: u64, sample: u64, width: u32, height: u32) -> ConMimParams {
        let mut rng = sample_rng(seed, epoch, sample);
        Self::sample_from(&mut rng, width, height, &StrongConfig::default())
    }

    /// Draws, in this fixed order: flip (1 value), the strong parameters (12 values,
    /// see [`StrongParams::sample_from`]), then the crop ([`sample_crop`] with
    /// [`CROP_SCALE`] and [`CROP_RATIO`]). The crop uses a variable number of draws, so
    /// it comes last: flip and strong parameters do not depend on the image size.
    pub fn sample_from(
        rng: &mut SplitMix64,
        width: u32,
        height: u32,
        cfg: &StrongConfig,
    ) -> ConMimParams {
        let flip = bernoulli(rng, FLIP_P);
        let strong = StrongParams::sample_from(rng, cfg);
        let crop = sample_crop(rng, width, height, CROP_SCALE, CROP_RATIO);
        ConMimParams { crop, flip, strong }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn in_bounds(c: CropParams, w: u32, h: u32) -> bool {
        c.width >= 1 && c.height >= 1 && c.left + c.width <= w && c.top + c.height <= h
    }

    #[test]
    fn crops_stay_in_bounds_and_in_range() {
        let sizes = [
            (224, 224),
            (500, 375),
            (375, 500),
            (1024, 768),
            (64, 300),
            (300, 64),
            (7, 5),
        ];
        for &(w, h) in &sizes {
            let mut accepted = 0;
            for sample in 0..2000 {
                let mut rng = sample_rng(11, 0, sample);
                let (c, fallback) = sample_crop_traced(&mut rng, w, h, CROP_SCALE, CROP_RATIO);
                assert!(in_bounds(c, w, h), "{c:?} outside {w}x{h}");
                if !fallback && w >= 100 && h >= 100 {
                    accepted += 1;
                    // Rounding w and h moves area and ratio slightly outside the ranges.
                    let area = f64::from(c.width * c.height) / f64::from(w * h);
                    assert!((0.08 * 0.9..=1.0).contains(&area), "area {area} for {c:?}");
                    let r = f64::from(c.width) / f64::from(c.height);
                    assert!((0.75 * 0.95..=4.0 / 3.0 * 1.05).contains(&r), "ratio {r}");
                }
            }
            if w >= 100 && h >= 100 && w.max(h) < 4 * w.min(h) {
                assert!(accepted > 1900, "{w}x{h}: only {accepted} accepted");
            }
        }
    }

    #[test]
    fn crop_positions_cover_the_image() {
        let (mut min_left, mut max_right) = (u32::MAX, 0);
        for sample in 0..2000 {
            let mut rng = sample_rng(3, 1, sample);
            let c = sample_crop(&mut rng, 300, 200, CROP_SCALE, CROP_RATIO);
            min_left = min_left.min(c.left);
            max_right = max_right.max(c.left + c.width);
        }
        assert_eq!(min_left, 0);
        assert_eq!(max_right, 300);
    }

    #[test]
    fn extreme_images_fall_back_to_a_centre_crop_with_clamped_ratio() {
        let mut rng = sample_rng(1, 2, 3);
        // Wide 1000x1: h = 1, w = round(1 * 4/3) = 1, centred.
        let (c, fb) = sample_crop_traced(&mut rng, 1000, 1, CROP_SCALE, CROP_RATIO);
        assert!(fb);
        let want = CropParams {
            top: 0,
            left: 499,
            height: 1,
            width: 1,
        };
        assert_eq!(c, want);
        // Tall 1x1000: w = 1, h = round(1 / 0.75) = 1, centred.
        let (c, fb) = sample_crop_traced(&mut rng, 1, 1000, CROP_SCALE, CROP_RATIO);
        assert!(fb);
        let want = CropParams {
            top: 499,
            left: 0,
            height: 1,
            width: 1,
        };
        assert_eq!(c, want);
        // 1000x10: h = 10, w = round(13.33) = 13, left = (1000 - 13) / 2 = 493.
        let (c, fb) = sample_crop_traced(&mut rng, 1000, 10, CROP_SCALE, CROP_RATIO);
        assert!(fb);
        let want = CropParams {
            top: 0,
            left: 493,
            height: 10,
            width: 13,
        };
        assert_eq!(c, want);
        // 6x1000: w = 6, h = round(6 / 0.75) = 8, top = (1000 - 8) / 2 = 496.
        let (c, fb) = sample_crop_traced(&mut rng, 6, 1000, CROP_SCALE, CROP_RATIO);
        assert!(fb);
        let want = CropParams {
            top: 496,
            left: 0,
            height: 8,
            width: 6,
        };
        assert_eq!(c, want);
        // In-range ratio but every attempt failing (scale above 1): the whole image.
        let (c, fb) = sample_crop_traced(&mut rng, 40, 30, (2.0, 3.0), CROP_RATIO);
        assert!(fb);
        let want = CropParams {
            top: 0,
            left: 0,
            height: 30,
            width: 40,
        };
        assert_eq!(c, want);
    }

    #[test]
    fn python_round_is_half_to_even() {
        assert_eq!(py_round(0.5), 0);
        assert_eq!(py_round(1.5), 2);
        assert_eq!(py_round(2.5), 2);
        assert_eq!(py_round(2.4999), 2);
        assert_eq!(py_round(2.5001), 3);
    }

    #[test]
    fn params_are_deterministic_per_seed_epoch_sample() {
        let a = ConMimParams::sample(5, 2, 77, 640, 480);
        assert_eq!(a, ConMimParams::sample(5, 2, 77, 640, 480));
        let others = [
            ConMimParams::sample(6, 2, 77, 640, 480),
            ConMimParams::sample(5, 3, 77, 640, 480),
            ConMimParams::sample(5, 2, 78, 640, 480),
        ];
        for o in others {
            assert_ne!(a, o);
        }
        // Flip and strong parameters do not depend on the image size.
        let b = ConMimParams::sample(5, 2, 77, 33, 4000);
        assert_eq!((a.flip, a.strong), (b.flip, b.strong));
        // Epoch and sample are not interchangeable.
        let mut x = sample_rng(9, 1, 2);
        let mut y = sample_rng(9, 2, 1);
        assert_ne!(x.next_u64(), y.next_u64());
    }

    #[test]
    fn strong_params_use_a_fixed_number_of_draws() {
        let cfg = StrongConfig::default();
        for sample in 0..100 {
            let mut a = sample_rng(1, 0, sample);
            let mut b = a.clone();
            StrongParams::sample_from(&mut a, &cfg);
            for _ in 0..9 {
                b.next_u64();
            }
            let mut order = [0u8; 4];
            b.shuffle(&mut order);
            assert_eq!(a.next_u64(), b.next_u64());
        }
    }

    #[test]
    fn probabilities_and_ranges() {
        let n = 20_000u32;
        let (mut flip, mut jitter, mut gray, mut blur, mut sol) = (0u32, 0u32, 0u32, 0u32, 0u32);
        let mut first_op = [0u32; 4];
        for sample in 0..u64::from(n) {
            let p = ConMimParams::sample(42, 0, sample, 256, 256);
            let s = p.strong;
            let j = s.jitter;
            flip += u32::from(p.flip);
            jitter += u32::from(j.apply);
            gray += u32::from(s.grayscale);
            blur += u32::from(s.blur.is_some());
            sol += u32::from(s.solarize);
            first_op[usize::from(j.order[0])] += 1;
            let mut sorted = j.order;
            sorted.sort();
            assert_eq!(sorted, [0, 1, 2, 3]);
            assert!((0.6..=1.4).contains(&j.brightness));
            assert!((0.6..=1.4).contains(&j.contrast));
            assert!((0.8..=1.2).contains(&j.saturation));
            assert!((-0.1..=0.1).contains(&j.hue));
            if let Some(sigma) = s.blur {
                assert!((0.1..=2.0).contains(&sigma));
            }
        }
        let frac = |k: u32| f64::from(k) / f64::from(n);
        let near = |k: u32, p: f64| (frac(k) - p).abs() < 0.02;
        assert!(near(flip, 0.5), "flip {}", frac(flip));
        assert!(near(jitter, 0.8), "jitter {}", frac(jitter));
        assert!(near(gray, 0.2), "grayscale {}", frac(gray));
        assert!(near(blur, 0.1), "blur {}", frac(blur));
        assert!(near(sol, 0.2), "solarize {}", frac(sol));
        for k in first_op {
            assert!(near(k, 0.25), "first op {first_op:?}");
        }
    }
}
