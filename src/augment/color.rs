//! Photometric ops, in place on interleaved RGB8 buffers (`r g b r g b ...`).
//!
//! The colour ops follow torchvision's tensor implementation for `uint8` images
//! (`torchvision/transforms/_functional_tensor.py`), op for op in `f32`:
//!
//! * `_blend(img1, img2, ratio) = (ratio * img1 + (1 - ratio) * img2).clamp(0, 255)`
//!   then `.to(uint8)`, which truncates toward zero. `ratio` is a Python float: torch
//!   multiplies in `f32`, and `1 - ratio` is formed before the cast; the sum is two
//!   separately rounded `f32` products added in `f32` (no fused multiply-add).
//! * `rgb_to_grayscale`: `(0.2989 r + 0.587 g + 0.114 b).to(uint8)`, again truncated, so
//!   white becomes 254, not 255.
//! * `adjust_brightness` blends with zeros; `adjust_saturation` blends with the
//!   (truncated) grayscale; `adjust_contrast` blends with the mean of the truncated
//!   grayscale, taken in `f32`.
//! * `adjust_hue` converts to float (`x / 255`), to HSV, shifts `h` by the factor
//!   modulo 1, back to RGB, and to `uint8` as `floor(x * 255.999)`.
//! * `solarize(threshold)`: `where(img >= threshold, 255 - img, img)` (PIL's
//!   `ImageOps.solarize` is the same table).
//!
//! The official ConMIM/BEiT code runs these on PIL images, so it uses the `F_pil`
//! (ImageEnhance) paths whose rounding differs by about one level; the tensor
//! semantics were chosen as the reference. Its blur is PIL's
//! `ImageFilter.GaussianBlur(radius=sigma)`, three extended box blurs that approximate
//! a Gaussian of standard deviation `radius`; [`gaussian_blur`] is a true separable
//! Gaussian with the same sigma and PIL's edge handling (edge pixels extended), so
//! parity is approximate: expect a few levels of difference on sharp edges and
//! identical results on flat areas.

use super::params::{
    ColorJitterParams, JITTER_BRIGHTNESS, JITTER_CONTRAST, JITTER_HUE, JITTER_SATURATION,
    StrongParams,
};

/// Solarization threshold of the ConMIM/BEiT `Solarization` (PIL default).
pub const SOLARIZE_THRESHOLD: u8 = 128;

/// Kernel half-width in sigmas for [`gaussian_blur`].
const BLUR_TRUNCATE: f32 = 3.0;

fn pixels(rgb: &[u8]) -> usize {
    assert!(
        rgb.len().is_multiple_of(3),
        "RGB buffer length {} is not a multiple of 3",
        rgb.len()
    );
    rgb.len() / 3
}

/// torchvision's `rgb_to_grayscale` for one uint8 pixel (truncating).
#[inline]
pub fn gray_u8(r: u8, g: u8, b: u8) -> u8 {
    (0.2989f32 * f32::from(r) + 0.587f32 * f32::from(g) + 0.114f32 * f32::from(b)) as u8
}

/// `_blend` for one value: `ratio * a + one_minus * b`, clamped and truncated.
#[inline]
fn blend(a: u8, b: f32, ratio: f32, one_minus: f32) -> u8 {
    // `as u8` saturates and truncates toward zero, like clamp(0, 255).to(uint8).
    (ratio * f32::from(a) + one_minus * b).clamp(0.0, 255.0) as u8
}

/// `(ratio, 1 - ratio)` as torch sees them: `1 - ratio` in double, then both in `f32`.
fn blend_weights(ratio: f32) -> (f32, f32) {
    (ratio, (1.0 - f64::from(ratio)) as f32)
}

/// `adjust_brightness`: blend with black.
pub fn adjust_brightness(rgb: &mut [u8], factor: f32) {
    let (r, m) = blend_weights(factor);
    for v in rgb.iter_mut() {
        *v = blend(*v, 0.0, r, m);
    }
}

/// Mean of the truncated grayscale image as `f32` (torch: `mean(rgb_to_grayscale(img)
/// .to(float32))`). The integer sum is exact; one rounding to `f32` follows, which
/// equals torch's `f32` result whenever the sum is below 2^24 (any 224x224 image).
pub fn gray_mean(rgb: &[u8]) -> f32 {
    let n = pixels(rgb);
    if n == 0 {
        return 0.0;
    }
    let sum: u64 = rgb
        .chunks_exact(3)
        .map(|p| u64::from(gray_u8(p[0], p[1], p[2])))
        .sum();
    (sum as f64 / n as f64) as f32
}

/// `adjust_contrast`: blend with the mean gray level.
pub fn adjust_contrast(rgb: &mut [u8], factor: f32) {
    let mean = gray_mean(rgb);
    let (r, m) = blend_weights(factor);
    for v in rgb.iter_mut() {
        *v = blend(*v, mean, r, m);
    }
}

/// `adjust_saturation`: blend each pixel with its own (truncated) gray level.
pub fn adjust_saturation(rgb: &mut [u8], factor: f32) {
    pixels(rgb);
    let (r, m) = blend_weights(factor);
    for p in rgb.chunks_exact_mut(3) {
        let g = f32::from(gray_u8(p[0], p[1], p[2]));
        for v in p.iter_mut() {
            *v = blend(*v, g, r, m);
        }
    }
}

/// `torch.remainder` for floats: the result takes the sign of the divisor.
#[inline]
fn remainder(a: f32, b: f32) -> f32 {
    let m = a % b;
    if m != 0.0 && ((b < 0.0) != (m < 0.0)) {
        m + b
    } else {
        m
    }
}

/// `_rgb2hsv` for one pixel in `[0, 1]`.
#[inline]
fn rgb2hsv(r: f32, g: f32, b: f32) -> (f32, f32, f32) {
    let maxc = r.max(g).max(b);
    let minc = r.min(g).min(b);
    let eqc = maxc == minc;
    let cr = maxc - minc;
    let s = cr / if eqc { 1.0 } else { maxc };
    let cr_divisor = if eqc { 1.0 } else { cr };
    let rc = (maxc - r) / cr_divisor;
    let gc = (maxc - g) / cr_divisor;
    let bc = (maxc - b) / cr_divisor;
    let hr = if maxc == r { bc - gc } else { 0.0 };
    let hg = if maxc == g && maxc != r {
        2.0 + rc - bc
    } else {
        0.0
    };
    let hb = if maxc != g && maxc != r {
        4.0 + gc - rc
    } else {
        0.0
    };
    let h = hr + hg + hb;
    let h = (h / 6.0 + 1.0) % 1.0;
    (h, s, maxc)
}

/// `_hsv2rgb` for one pixel.
#[inline]
fn hsv2rgb(h: f32, s: f32, v: f32) -> (f32, f32, f32) {
    let i = (h * 6.0).floor();
    let f = h * 6.0 - i;
    let i = (i as i32).rem_euclid(6);
    let p = (v * (1.0 - s)).clamp(0.0, 1.0);
    let q = (v * (1.0 - s * f)).clamp(0.0, 1.0);
    let t = (v * (1.0 - s * (1.0 - f))).clamp(0.0, 1.0);
    match i {
        0 => (v, t, p),
        1 => (q, v, p),
        2 => (p, v, t),
        3 => (p, q, v),
        4 => (t, p, v),
        _ => (v, p, q),
    }
}

/// `convert_image_dtype(float -> uint8)`: `(x * (255 + 1 - 1e-3)).to(uint8)`.
#[inline]
fn float_to_u8(x: f32) -> u8 {
    (x * 255.999f32) as u8
}

/// `adjust_hue`: rotate the hue by `hue_factor` (in turns, `-0.5..=0.5`).
pub fn adjust_hue(rgb: &mut [u8], hue_factor: f32) {
    assert!(
        (-0.5..=0.5).contains(&hue_factor),
        "hue_factor {hue_factor} is not in [-0.5, 0.5]"
    );
    pixels(rgb);
    for p in rgb.chunks_exact_mut(3) {
        let [r, g, b] = [p[0], p[1], p[2]].map(|v| f32::from(v) / 255.0);
        let (h, s, v) = rgb2hsv(r, g, b);
        let h = remainder(h + hue_factor, 1.0);
        let (r, g, b) = hsv2rgb(h, s, v);
        p[0] = float_to_u8(r);
        p[1] = float_to_u8(g);
        p[2] = float_to_u8(b);
    }
}

/// `rgb_to_grayscale(num_output_channels=3)`: the gray level in all three channels.
pub fn grayscale(rgb: &mut [u8]) {
    pixels(rgb);
    for p in rgb.chunks_exact_mut(3) {
        let g = gray_u8(p[0], p[1], p[2]);
        p.fill(g);
    }
}

/// `solarize`: invert every value `>= threshold`.
pub fn solarize(rgb: &mut [u8], threshold: u8) {
    for v in rgb.iter_mut() {
        if *v >= threshold {
            *v = 255 - *v;
        }
    }
}

/// Horizontal flip of a `width` x `height` RGB image.
pub fn hflip(rgb: &mut [u8], width: usize, height: usize) {
    assert_eq!(
        rgb.len(),
        width * height * 3,
        "buffer is not {width}x{height} RGB"
    );
    if width == 0 {
        return;
    }
    for row in rgb.chunks_exact_mut(width * 3) {
        let (mut a, mut b) = (0, width - 1);
        while a < b {
            for c in 0..3 {
                row.swap(a * 3 + c, b * 3 + c);
            }
            a += 1;
            b -= 1;
        }
    }
}

/// Separable Gaussian blur with standard deviation `sigma` (PIL's `radius`).
///
/// The kernel spans `ceil(3 sigma)` pixels each side and is normalised to sum 1; pixels
/// beyond the border repeat the edge pixel (as PIL's box blur does). The horizontal
/// pass writes `f32` into `scratch`, the vertical pass rounds to nearest into `rgb`.
/// `scratch` grows to `kernel + width * height * 3` floats once and is reused.
pub fn gaussian_blur(
    rgb: &mut [u8],
    width: usize,
    height: usize,
    sigma: f32,
    scratch: &mut Vec<f32>,
) {
    assert_eq!(
        rgb.len(),
        width * height * 3,
        "buffer is not {width}x{height} RGB"
    );
    if rgb.is_empty() || sigma.is_nan() || sigma <= 0.0 {
        return;
    }
    let radius = (BLUR_TRUNCATE * sigma).ceil().max(1.0) as usize;
    let taps = 2 * radius + 1;
    let need = taps + rgb.len();
    if scratch.len() < need {
        scratch.resize(need, 0.0);
    }
    let (kernel, plane) = scratch[..need].split_at_mut(taps);
    let denom = 2.0 * sigma * sigma;
    for (k, w) in kernel.iter_mut().enumerate() {
        let x = k as f32 - radius as f32;
        *w = (-x * x / denom).exp();
    }
    let total: f32 = kernel.iter().sum();
    for w in kernel.iter_mut() {
        *w /= total;
    }
    let kernel = &*kernel;
    let r = radius as isize;
    let (wi, hi) = (width as isize, height as isize);

    // Horizontal: rgb -> plane.
    let stride = width * 3;
    for (src, dst) in rgb.chunks_exact(stride).zip(plane.chunks_exact_mut(stride)) {
        for x in 0..wi {
            let mut acc = [0.0f32; 3];
            for (k, &w) in kernel.iter().enumerate() {
                let sx = (x + k as isize - r).clamp(0, wi - 1) as usize * 3;
                for c in 0..3 {
                    acc[c] += w * f32::from(src[sx + c]);
                }
            }
            let o = x as usize * 3;
            dst[o..o + 3].copy_from_slice(&acc);
        }
    }
    // Vertical: plane -> rgb.
    for y in 0..hi {
        let out = &mut rgb[y as usize * stride..(y as usize + 1) * stride];
        for (i, o) in out.iter_mut().enumerate() {
            let mut acc = 0.0f32;
            for (k, &w) in kernel.iter().enumerate() {
                let sy = (y + k as isize - r).clamp(0, hi - 1) as usize;
                acc += w * plane[sy * stride + i];
            }
            *o = (acc + 0.5).clamp(0.0, 255.0) as u8;
        }
    }
}

/// `ColorJitter.forward` with given parameters: the four ops in `p.order`. Ignores
/// `p.apply` (see [`apply_strong`]).
pub fn color_jitter(rgb: &mut [u8], p: &ColorJitterParams) {
    for &op in &p.order {
        match op {
            JITTER_BRIGHTNESS => adjust_brightness(rgb, p.brightness),
            JITTER_CONTRAST => adjust_contrast(rgb, p.contrast),
            JITTER_SATURATION => adjust_saturation(rgb, p.saturation),
            JITTER_HUE => adjust_hue(rgb, p.hue),
            other => panic!("colour jitter op {other} is not 0..=3"),
        }
    }
}

/// The teacher view's strong ops on a `width` x `height` RGB image, in the spec's
/// order: colour jitter (if `jitter.apply`), grayscale, Gaussian blur, solarize
/// (threshold 128). `scratch` is only used by the blur and is reused across calls.
pub fn apply_strong(
    params: &StrongParams,
    rgb: &mut [u8],
    width: usize,
    height: usize,
    scratch: &mut Vec<f32>,
) {
    assert_eq!(
        rgb.len(),
        width * height * 3,
        "buffer is not {width}x{height} RGB"
    );
    if params.jitter.apply {
        color_jitter(rgb, &params.jitter);
    }
    if params.grayscale {
        grayscale(rgb);
    }
    if let Some(sigma) = params.blur {
        gaussian_blur(rgb, width, height, sigma, scratch);
    }
    if params.solarize {
        solarize(rgb, SOLARIZE_THRESHOLD);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::augment::params::sample_rng;

    fn random_image(seed: u64, n: usize) -> Vec<u8> {
        let mut rng = sample_rng(seed, 0, 0);
        (0..n * 3).map(|_| rng.next_u64() as u8).collect()
    }

    #[test]
    fn brightness_scales_and_truncates() {
        let mut px = [200, 100, 50];
        adjust_brightness(&mut px, 0.5);
        assert_eq!(px, [100, 50, 25]);
        let mut px = [201, 3, 255];
        adjust_brightness(&mut px, 0.5);
        assert_eq!(px, [100, 1, 127]);
        let mut px = [200, 100, 50];
        adjust_brightness(&mut px, 1.4);
        assert_eq!(px, [255, 140, 70]);
        let img = random_image(1, 500);
        let mut same = img.clone();
        adjust_brightness(&mut same, 1.0);
        assert_eq!(same, img);
    }

    #[test]
    fn grayscale_truncates_like_torchvision() {
        assert_eq!(gray_u8(255, 0, 0), 76); // 0.2989 * 255 = 76.22
        assert_eq!(gray_u8(0, 255, 0), 149); // 149.69
        assert_eq!(gray_u8(0, 0, 255), 29); // 29.07
        assert_eq!(gray_u8(255, 255, 255), 254); // weights sum to 0.9999
        let mut px = [255, 0, 0, 10, 20, 30];
        grayscale(&mut px);
        // 0.2989 * 10 + 0.587 * 20 + 0.114 * 30 = 18.149
        assert_eq!(px, [76, 76, 76, 18, 18, 18]);
    }

    #[test]
    fn solarize_boundary() {
        let mut px = [0, 127, 128, 200, 255, 1];
        solarize(&mut px, SOLARIZE_THRESHOLD);
        assert_eq!(px, [0, 127, 127, 55, 0, 1]);
    }

    #[test]
    fn contrast_blends_with_the_gray_mean() {
        // Gray levels 76 and 0: mean 38.
        let img = [255, 0, 0, 0, 0, 0];
        assert_eq!(gray_mean(&img), 38.0);
        let mut px = img;
        adjust_contrast(&mut px, 0.5);
        // 0.5 * 255 + 0.5 * 38 = 146.5 -> 146; 0.5 * 0 + 19 = 19.
        assert_eq!(px, [146, 19, 19, 19, 19, 19]);
        let mut px = img;
        adjust_contrast(&mut px, 0.0);
        assert_eq!(px, [38; 6]);
        let mut px = img;
        adjust_contrast(&mut px, 1.5);
        // 1.5 * 255 - 0.5 * 38 = 363.5 -> 255; 0 - 19 -> 0.
        assert_eq!(px, [255, 0, 0, 0, 0, 0]);
        // Gray of 100 is 99 (99.99): mean 49.5; 2 * 100 - 49.5 = 150.5 -> 150.
        let mut px = [0, 0, 0, 100, 100, 100];
        adjust_contrast(&mut px, 2.0);
        assert_eq!(px, [0, 0, 0, 150, 150, 150]);
    }

    #[test]
    fn saturation_zero_is_grayscale_and_one_is_identity() {
        let img = random_image(2, 1000);
        let mut a = img.clone();
        adjust_saturation(&mut a, 0.0);
        let mut b = img.clone();
        grayscale(&mut b);
        assert_eq!(a, b);
        let mut c = img.clone();
        adjust_saturation(&mut c, 1.0);
        assert_eq!(c, img);
        // 1.2 * 200 - 0.2 * gray(200, 100, 50) = 240 - 0.2 * 124 = 215.2 -> 215.
        let mut px = [200, 100, 50];
        assert_eq!(gray_u8(200, 100, 50), 124); // 59.78 + 58.7 + 5.7 = 124.18
        adjust_saturation(&mut px, 1.2);
        assert_eq!(px, [215, 95, 35]);
    }

    #[test]
    fn hue_zero_is_identity_within_one() {
        let img = random_image(3, 20_000);
        let mut out = img.clone();
        adjust_hue(&mut out, 0.0);
        for (a, b) in img.iter().zip(&out) {
            assert!(a.abs_diff(*b) <= 1, "{a} -> {b}");
        }
        let mut grays: Vec<u8> = (0..=255u8).flat_map(|v| [v, v, v]).collect();
        let before = grays.clone();
        adjust_hue(&mut grays, 0.3);
        assert_eq!(grays, before, "gray has no hue");
    }

    #[test]
    fn hue_rotations_of_primaries() {
        let mut px = [255, 0, 0];
        adjust_hue(&mut px, 0.5);
        assert_eq!(px, [0, 255, 255]);
        let mut px = [255, 0, 0];
        adjust_hue(&mut px, -0.5);
        assert_eq!(px, [0, 255, 255]);
        // A third of a turn from red is green, and back from green is red.
        let mut px = [0, 255, 0];
        adjust_hue(&mut px, -1.0 / 3.0);
        assert_eq!(px, [255, 0, 0]);
        let mut px = [0, 0, 255];
        adjust_hue(&mut px, 1.0 / 6.0);
        assert_eq!(px, [255, 0, 255]);
    }

    #[test]
    fn hflip_reverses_rows() {
        let mut px = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12];
        hflip(&mut px, 2, 2);
        assert_eq!(px, [4, 5, 6, 1, 2, 3, 10, 11, 12, 7, 8, 9]);
    }

    #[test]
    fn blur_keeps_flat_images_and_mass() {
        let (w, h) = (17, 11);
        let mut scratch = Vec::new();
        let mut flat = vec![123u8; w * h * 3];
        gaussian_blur(&mut flat, w, h, 1.7, &mut scratch);
        assert!(flat.iter().all(|&v| v == 123));

        // An impulse in the middle spreads symmetrically and keeps its mass.
        let mut img = vec![0u8; w * h * 3];
        let centre = (5 * w + 8) * 3;
        img[centre] = 255;
        gaussian_blur(&mut img, w, h, 1.0, &mut scratch);
        assert!(img[centre] < 255 && img[centre] > 0);
        let at = |x: usize, y: usize| img[(y * w + x) * 3];
        assert_eq!(at(7, 5), at(9, 5));
        assert_eq!(at(8, 4), at(8, 6));
        assert_eq!(at(7, 5), at(8, 4));
        assert!(at(7, 5) < at(8, 5));
        let mass: u32 = img.iter().step_by(3).map(|&v| u32::from(v)).sum();
        assert!(mass.abs_diff(255) <= 20, "mass {mass}");
        assert!(
            img.iter().skip(1).step_by(3).all(|&v| v == 0),
            "other channels untouched"
        );
    }

    #[test]
    fn tiny_blur_is_identity_and_scratch_is_reused() {
        let (w, h) = (32, 24);
        let img = random_image(4, w * h);
        let mut out = img.clone();
        let mut scratch = Vec::new();
        gaussian_blur(&mut out, w, h, 0.1, &mut scratch);
        assert_eq!(out, img);
        gaussian_blur(&mut out, w, h, 2.0, &mut scratch);
        let (ptr, cap) = (scratch.as_ptr(), scratch.capacity());
        for _ in 0..3 {
            gaussian_blur(&mut out, w, h, 2.0, &mut scratch);
            gaussian_blur(&mut out, w, h, 0.5, &mut scratch);
        }
        assert_eq!((scratch.as_ptr(), scratch.capacity()), (ptr, cap));
    }

    #[test]
    fn blur_replicates_edges() {
        // A single column image: a step from 0 to 200 at the bottom edge stays 200 there.
        let (w, h) = (1, 9);
        let mut img: Vec<u8> = (0..h)
            .flat_map(|y| if y >= 6 { [200; 3] } else { [0; 3] })
            .collect();
        let mut scratch = Vec::new();
        gaussian_blur(&mut img, w, h, 0.5, &mut scratch);
        assert_eq!(img[(h - 1) * 3], 200);
        assert_eq!(img[0], 0);
    }

    #[test]
    fn apply_strong_order_and_identity() {
        let (w, h) = (20, 10);
        let img = random_image(5, w * h);
        let mut scratch = Vec::new();

        let mut out = img.clone();
        apply_strong(&StrongParams::IDENTITY, &mut out, w, h, &mut scratch);
        assert_eq!(out, img);

        // Jitter not applied: its factors are ignored.
        let mut p = StrongParams::IDENTITY;
        p.jitter.brightness = 0.1;
        let mut out = img.clone();
        apply_strong(&p, &mut out, w, h, &mut scratch);
        assert_eq!(out, img);

        // Jitter in the given order, then grayscale, blur and solarize.
        p.jitter = ColorJitterParams {
            apply: true,
            order: [3, 0, 2, 1],
            brightness: 0.9,
            contrast: 1.3,
            saturation: 0.8,
            hue: 0.05,
        };
        p.grayscale = true;
        p.blur = Some(1.2);
        p.solarize = true;
        let mut want = img.clone();
        adjust_hue(&mut want, 0.05);
        adjust_brightness(&mut want, 0.9);
        adjust_saturation(&mut want, 0.8);
        adjust_contrast(&mut want, 1.3);
        grayscale(&mut want);
        let mut blur_scratch = Vec::new();
        gaussian_blur(&mut want, w, h, 1.2, &mut blur_scratch);
        solarize(&mut want, 128);
        let mut out = img.clone();
        apply_strong(&p, &mut out, w, h, &mut scratch);
        assert_eq!(out, want);
        assert!(
            out.chunks_exact(3)
                .all(|px| px[0] == px[1] && px[1] == px[2])
        );
    }
}
