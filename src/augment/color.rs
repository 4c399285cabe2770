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
//! paths; the tensor semantics were chosen as the reference. Brightness, contrast,
//! saturation and grayscale (ImageEnhance) differ from them by at most one level. Hue
//! differs more: PIL's path shifts an 8-bit HSV hue by `int(factor * 255)` whole steps
//! (so |factor| < 1/255, about 4 % of the draws, changes nothing) and round-trips
//! through 8-bit HSV, which puts it a mean 0.4-2 levels and up to about 16 levels from
//! the float path on 224x224 images (torchvision 0.26, Pillow 13). Its blur is PIL's
//! `ImageFilter.GaussianBlur(radius=sigma)`, and [`gaussian_blur`] is that filter
//! exactly: three extended box blurs per direction (horizontal first) with PIL's
//! fractional box radius, Q24 fixed-point weights, rounding and edge extension.
//!
//! `tests/parity.rs` checks all of these bit for bit against torchvision / PIL outputs
//! (fixtures from `tools/parity/make_fixtures.py`).
//!
//! # Speed
//!
//! The results are bit-identical to a straightforward per-value evaluation of the
//! formulas above (kept as `reference` in the tests and checked against it), but
//! about ten times faster on the strong view (about 0.3 ms instead of 3 ms for a
//! 224x224 image on average ConMIM parameters; `bench_strong` in the tests):
//!
//! * a `Chain` collects the ops and runs them block by block (64 pixels,
//!   deinterleaved into `f32` planes) in as few passes over the image as possible: a
//!   pass ends only where contrast needs the mean gray level of the image so far (the
//!   pass sums it on the way), before a blur, and at the end;
//! * every op is written branch-free over the planes so that LLVM vectorises it, with
//!   the exact `f32` operations of the reference (for hue, only the two of torch's
//!   three hue quotients that the pixel uses, and only the one of `q`/`t` its sector
//!   uses); float-to-int conversions use `to_int_unchecked` on values proven in
//!   range, since the saturating `as` is scalarised;
//! * the kernels are built twice, for SSE2 (any x86-64) and for AVX2, picked at run
//!   time (`is_x86_feature_detected!`);
//! * the blur is PIL's box passes as direct small FIRs (box radius 0 or 1 for
//!   sigma <= 2.45, up to 3 specialised, larger radii with PIL's running sums), the
//!   vertical passes over whole rows, with no allocation once `scratch` has grown.

use super::params::{
    ColorJitterParams, JITTER_BRIGHTNESS, JITTER_CONTRAST, JITTER_HUE, JITTER_SATURATION,
    StrongParams,
};

/// Solarization threshold of the ConMIM/BEiT `Solarization` (PIL default).
pub const SOLARIZE_THRESHOLD: u8 = 128;

/// Box passes per direction of PIL's `GaussianBlur`.
const BLUR_PASSES: i32 = 3;

/// Pixels per block of the per-pixel kernels.
const BLOCK: usize = 64;
const BLOCK_BYTES: usize = 3 * BLOCK;

/// Most ops a [`Chain`] keeps pending; one more runs them first.
const MAX_OPS: usize = 8;

/// Largest blend weight magnitude the vectorised kernels take (larger ones, and NaN,
/// use the per-value path): with values in `[0, 255]`, `2 * 1e30 * 255` is far below
/// `f32::MAX`, so a blend is always finite.
const BLOCK_BLEND_LIMIT: f32 = 1e30;

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
    gray_f32(f32::from(r), f32::from(g), f32::from(b))
}

/// [`gray_u8`] on values already converted to `f32`.
#[inline(always)]
fn gray_f32(r: f32, g: f32, b: f32) -> u8 {
    (0.2989f32 * r + 0.587f32 * g + 0.114f32 * b) as u8
}

/// `_blend` for one value: `ratio * a + one_minus * b`, clamped and truncated.
#[inline(always)]
fn blend_f32(a: f32, b: f32, ratio: f32, one_minus: f32) -> u8 {
    // `as u8` saturates and truncates toward zero, like clamp(0, 255).to(uint8).
    (ratio * a + one_minus * b).clamp(0.0, 255.0) as u8
}

/// `(ratio, 1 - ratio)` as torch sees them: `1 - ratio` in double, then both in `f32`.
fn blend_weights(ratio: f32) -> (f32, f32) {
    (ratio, (1.0 - f64::from(ratio)) as f32)
}

/// Whether the vectorised kernels may blend with these weights.
fn block_weights(ratio: f32, one_minus: f32) -> bool {
    ratio.abs() <= BLOCK_BLEND_LIMIT && one_minus.abs() <= BLOCK_BLEND_LIMIT
}

/// `x as i32` (truncation toward zero) as one vector instruction: Rust's saturating
/// `as` is scalarised by LLVM on x86 (it must handle NaN and overflow). Callers
/// guarantee `-0 <= x < 2^31` (no NaN); each call site says why.
#[inline(always)]
fn trunc_nonneg(x: f32) -> i32 {
    debug_assert!((0.0..2_147_483_648.0).contains(&x), "{x}");
    // SAFETY: x is finite and in [-0, 2^31) (the callers' contract), so its
    // truncation is representable as i32.
    unsafe { x.to_int_unchecked::<i32>() }
}

/// [`gray_f32`] for the kernels: `r`, `g`, `b` are in `[0, 255]`, so the sum is in
/// `[0, 255)`.
#[inline(always)]
fn gray_block(r: f32, g: f32, b: f32) -> i32 {
    trunc_nonneg(0.2989f32 * r + 0.587f32 * g + 0.114f32 * b)
}

/// [`blend_f32`] for the kernels: `a` and `b` are in `[0, 255]` and the weights pass
/// [`block_weights`], so the blend is finite and the clamped value is in `[0, 255]`.
#[inline(always)]
fn blend_block(a: f32, b: f32, ratio: f32, one_minus: f32) -> i32 {
    trunc_nonneg((ratio * a + one_minus * b).clamp(0.0, 255.0))
}

#[cfg(target_arch = "x86_64")]
#[inline]
fn has_avx2() -> bool {
    std::arch::is_x86_feature_detected!("avx2")
}

// ------------------------------------------------------------------ per-value ops

/// A per-value op (brightness, contrast, solarize).
#[derive(Debug, Clone, Copy, PartialEq)]
enum ValueOp {
    /// `_blend(v, other, ratio)`; the weights pass [`block_weights`] and `other` is
    /// in `[0, 255]`.
    Blend {
        ratio: f32,
        one_minus: f32,
        other: f32,
    },
    /// `v >= threshold ? 255 - v : v`.
    Solarize { threshold: f32 },
}

impl ValueOp {
    /// The op on `u8` values held as `f32` (exactly what it does to the `u8`),
    /// vectorisable.
    #[inline(always)]
    fn apply<const N: usize>(self, x: &mut [f32; N]) {
        match self {
            ValueOp::Blend {
                ratio,
                one_minus,
                other,
            } => {
                for v in x.iter_mut() {
                    *v = blend_block(*v, other, ratio, one_minus) as f32;
                }
            }
            ValueOp::Solarize { threshold } => {
                for v in x.iter_mut() {
                    *v = if *v >= threshold { 255.0 - *v } else { *v };
                }
            }
        }
    }
}

// ----------------------------------------------------------------- per-pixel kernels

#[inline(always)]
fn blocks_generic(rgb: &mut [u8], pass: &mut Pass) {
    let (blocks, rest) = rgb.as_chunks_mut::<BLOCK_BYTES>();
    for px in blocks {
        pass.run(px, BLOCK);
    }
    if !rest.is_empty() {
        // The last pixels, padded to a full block.
        let mut tmp = [0u8; BLOCK_BYTES];
        tmp[..rest.len()].copy_from_slice(rest);
        pass.run(&mut tmp, rest.len() / 3);
        rest.copy_from_slice(&tmp[..rest.len()]);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn blocks_avx2(rgb: &mut [u8], pass: &mut Pass) {
    blocks_generic(rgb, pass);
}

/// Runs `pass` over all pixels, with the AVX2 build of the kernels when the CPU has
/// it (the SSE2 build is about 2.5 times slower).
fn run_blocks(rgb: &mut [u8], pass: &mut Pass) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU supports AVX2 (checked at run time).
        unsafe { blocks_avx2(rgb, pass) };
        return;
    }
    blocks_generic(rgb, pass);
}

/// A block's channels as planar `f32` (each holding `u8` values).
type Planes = [[f32; BLOCK]; 3];

#[inline(always)]
fn deinterleave(px: &[u8; BLOCK_BYTES]) -> Planes {
    let mut out = [[0f32; BLOCK]; 3];
    for (i, p) in px.as_chunks::<3>().0.iter().enumerate() {
        out[0][i] = f32::from(p[0]);
        out[1][i] = f32::from(p[1]);
        out[2][i] = f32::from(p[2]);
    }
    out
}

/// Writes planes of `u8` values back as interleaved bytes.
#[inline(always)]
fn interleave(px: &mut [u8; BLOCK_BYTES], planes: &Planes) {
    for (i, p) in px.as_chunks_mut::<3>().0.iter_mut().enumerate() {
        // Every op maps u8 values to u8 values, so each x is in [0, 255].
        *p = [
            trunc_nonneg(planes[0][i]) as u8,
            trunc_nonneg(planes[1][i]) as u8,
            trunc_nonneg(planes[2][i]) as u8,
        ];
    }
}

/// Sum of the truncated gray levels of the first `valid` pixels of a block.
#[inline(always)]
fn block_gray_sum(x: &Planes, valid: usize) -> u64 {
    let [r, g, b] = x;
    let mut s = 0i32;
    for i in 0..BLOCK {
        if i < valid {
            s += gray_block(r[i], g[i], b[i]);
        }
    }
    s as u64
}

/// Sum of the truncated gray levels of all pixels.
#[inline(always)]
fn gray_sum_generic(rgb: &[u8]) -> u64 {
    let (blocks, rest) = rgb.as_chunks::<BLOCK_BYTES>();
    let mut sum = 0u64;
    for px in blocks {
        sum += block_gray_sum(&deinterleave(px), BLOCK);
    }
    for p in rest.as_chunks::<3>().0 {
        sum += u64::from(gray_u8(p[0], p[1], p[2]));
    }
    sum
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn gray_sum_avx2(rgb: &[u8]) -> u64 {
    gray_sum_generic(rgb)
}

/// [`gray_sum_generic`], AVX2 when available.
fn gray_sum(rgb: &[u8]) -> u64 {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU supports AVX2 (checked at run time).
        return unsafe { gray_sum_avx2(rgb) };
    }
    gray_sum_generic(rgb)
}

/// `sum / n` rounded once to `f32` (0 for no pixels).
fn mean_of(sum: u64, n: usize) -> f32 {
    if n == 0 {
        0.0
    } else {
        (sum as f64 / n as f64) as f32
    }
}

/// `max` / `min` as plain selects (the inputs are never NaN).
#[inline(always)]
fn fmax(a: f32, b: f32) -> f32 {
    if a > b { a } else { b }
}

#[inline(always)]
fn fmin(a: f32, b: f32) -> f32 {
    if a < b { a } else { b }
}

/// `adjust_hue` for one pixel (`u8` values as `f32`), branch-free; the same
/// operations, in the same order and precision, as torchvision's `_rgb2hsv`, shift and
/// `_hsv2rgb`. Every intermediate is finite (`hue` is in `[-0.5, 0.5]`).
#[inline(always)]
fn hue_pixel(r: f32, g: f32, b: f32, hue: f32) -> [i32; 3] {
    let (r, g, b) = (r / 255.0, g / 255.0, b / 255.0);
    // _rgb2hsv
    let maxc = fmax(fmax(r, g), b);
    let minc = fmin(fmin(r, g), b);
    let eqc = maxc == minc;
    let cr = maxc - minc;
    let s = cr / if eqc { 1.0 } else { maxc };
    let cr_divisor = if eqc { 1.0 } else { cr };
    // torchvision forms rc, gc, bc = (maxc - c) / cr_divisor and h = hr + hg + hb, of
    // which one term is non-zero: bc - gc if maxc == r, else 2 + rc - bc if
    // maxc == g, else 4 + gc - rc. Only that term's two quotients are computed here
    // (0 + bc is exactly bc; adding the zero terms changes nothing but the sign of a
    // zero h, which the `+ 1` below erases).
    let is_r = maxc == r;
    let is_g = maxc == g;
    let offset = if is_r {
        0.0
    } else if is_g {
        2.0
    } else {
        4.0
    };
    let plus = if is_r {
        b
    } else if is_g {
        r
    } else {
        g
    };
    let minus = if is_r {
        g
    } else if is_g {
        b
    } else {
        r
    };
    let h = (offset + (maxc - plus) / cr_divisor) - (maxc - minus) / cr_divisor;
    // fmod(h / 6 + 1, 1): the argument is in [0, 2), where fmod is exact.
    let x = h / 6.0 + 1.0;
    let h = if x >= 1.0 { x - 1.0 } else { x };
    // torch.remainder(h + hue, 1): h + hue is in [-0.5, 1.5).
    let x = h + hue;
    let m = if x >= 1.0 { x - 1.0 } else { x };
    let h = if m < 0.0 { m + 1.0 } else { m };
    // _hsv2rgb. h is in [0, 1] (or -0), so h6 is in [0, 6] and truncation is floor.
    let h6 = h * 6.0;
    let i = trunc_nonneg(h6);
    let f = h6 - i as f32;
    let i = if i >= 6 { i - 6 } else { i };
    let v = maxc;
    let p = (v * (1.0 - s)).clamp(0.0, 1.0);
    // Sectors 0 (v, t, p), 1 (q, v, p), 2 (p, v, t), 3 (p, q, v), 4 (t, p, v),
    // 5 (v, p, q): odd ones use q = v (1 - s f), even ones t = v (1 - s (1 - f)); only
    // the one needed is computed (the same operations on the same values).
    let odd = (i & 1) == 1;
    let mid = (v * (1.0 - s * if odd { f } else { 1.0 - f })).clamp(0.0, 1.0);
    let ro = if i == 0 || i == 5 {
        v
    } else if i == 1 || i == 4 {
        mid
    } else {
        p
    };
    let go = if i == 1 || i == 2 {
        v
    } else if i == 0 || i == 3 {
        mid
    } else {
        p
    };
    let bo = if i == 3 || i == 4 {
        v
    } else if i == 2 || i == 5 {
        mid
    } else {
        p
    };
    // convert_image_dtype(float -> uint8): (x * 255.999).to(uint8); x is in [0, 1].
    [
        trunc_nonneg(ro * 255.999f32),
        trunc_nonneg(go * 255.999f32),
        trunc_nonneg(bo * 255.999f32),
    ]
}

/// One op of a [`Chain`], applied to a block's planes.
#[derive(Debug, Clone, Copy, PartialEq)]
enum PixelOp {
    Value(ValueOp),
    /// `adjust_saturation`; the weights pass [`block_weights`].
    Saturation {
        ratio: f32,
        one_minus: f32,
    },
    /// `adjust_hue`, factor in `[-0.5, 0.5]`.
    Hue(f32),
    /// `rgb_to_grayscale(num_output_channels=3)`.
    Grayscale,
}

impl PixelOp {
    #[inline(always)]
    fn apply(self, x: &mut Planes) {
        let [r, g, b] = x;
        match self {
            PixelOp::Value(op) => {
                op.apply(r);
                op.apply(g);
                op.apply(b);
            }
            PixelOp::Saturation { ratio, one_minus } => {
                for i in 0..BLOCK {
                    let gray = gray_block(r[i], g[i], b[i]) as f32;
                    r[i] = blend_block(r[i], gray, ratio, one_minus) as f32;
                    g[i] = blend_block(g[i], gray, ratio, one_minus) as f32;
                    b[i] = blend_block(b[i], gray, ratio, one_minus) as f32;
                }
            }
            PixelOp::Hue(hue) => {
                // Two independent halves per iteration: the long dependency chain of
                // one pixel overlaps better (about 5 % faster).
                const H: usize = BLOCK / 2;
                for i in 0..H {
                    let [r0, g0, b0] = hue_pixel(r[i], g[i], b[i], hue);
                    let [r1, g1, b1] = hue_pixel(r[i + H], g[i + H], b[i + H], hue);
                    [r[i], g[i], b[i]] = [r0 as f32, g0 as f32, b0 as f32];
                    [r[i + H], g[i + H], b[i + H]] = [r1 as f32, g1 as f32, b1 as f32];
                }
            }
            PixelOp::Grayscale => {
                for i in 0..BLOCK {
                    let gray = gray_block(r[i], g[i], b[i]) as f32;
                    r[i] = gray;
                    g[i] = gray;
                    b[i] = gray;
                }
            }
        }
    }
}

/// One pass over the image: per block, load, apply `ops` in order, optionally sum
/// the resulting gray levels, and store (if `store`).
struct Pass<'a> {
    ops: &'a [PixelOp],
    sum: Option<u64>,
    store: bool,
}

impl Pass<'_> {
    /// One block, of which the first `valid` pixels are real (the gray sum skips the
    /// padding of the last block).
    #[inline(always)]
    fn run(&mut self, px: &mut [u8; BLOCK_BYTES], valid: usize) {
        let mut x = deinterleave(px);
        for op in self.ops {
            op.apply(&mut x);
        }
        if let Some(sum) = &mut self.sum {
            *sum += block_gray_sum(&x, valid);
        }
        if self.store {
            interleave(px, &x);
        }
    }
}

/// A chain of colour ops on one image, run in as few passes as possible: ops are
/// collected and applied block by block in one pass, which ends only where a
/// contrast needs the mean gray level of the image so far (that pass also sums it),
/// before a blur, and at [`Chain::flush`].
struct Chain<'a> {
    rgb: &'a mut [u8],
    ops: [PixelOp; MAX_OPS],
    len: usize,
}

impl<'a> Chain<'a> {
    fn new(rgb: &'a mut [u8]) -> Self {
        pixels(rgb);
        Chain {
            rgb,
            ops: [PixelOp::Grayscale; MAX_OPS],
            len: 0,
        }
    }

    fn push(&mut self, op: PixelOp) {
        if self.len == MAX_OPS {
            self.flush();
        }
        self.ops[self.len] = op;
        self.len += 1;
    }

    /// `_blend(v, other, factor)` for every value; `other` is in `[0, 255]`.
    fn blend(&mut self, factor: f32, other: f32) {
        let (ratio, one_minus) = blend_weights(factor);
        if block_weights(ratio, one_minus) {
            self.push(PixelOp::Value(ValueOp::Blend {
                ratio,
                one_minus,
                other,
            }));
        } else {
            self.flush();
            for v in self.rgb.iter_mut() {
                *v = blend_f32(f32::from(*v), other, ratio, one_minus);
            }
        }
    }

    /// Factor 1 blends are the identity (`1 v + 0 other == v`).
    fn is_identity(factor: f32) -> bool {
        blend_weights(factor) == (1.0, 0.0)
    }

    fn brightness(&mut self, factor: f32) {
        if !Self::is_identity(factor) {
            self.blend(factor, 0.0);
        }
    }

    /// The mean gray level after the pending ops. If they include per-pixel ops, the
    /// summing pass also applies and stores them; per-value ops stay pending.
    fn gray_mean(&mut self) -> f32 {
        let ops = &self.ops[..self.len];
        let store = ops.iter().any(|op| !matches!(op, PixelOp::Value(_)));
        let mut pass = Pass {
            ops,
            sum: Some(0),
            store,
        };
        run_blocks(self.rgb, &mut pass);
        let sum = pass.sum.unwrap_or(0);
        if store {
            self.len = 0;
        }
        mean_of(sum, self.rgb.len() / 3)
    }

    fn contrast(&mut self, factor: f32) {
        if !Self::is_identity(factor) {
            let mean = self.gray_mean();
            self.blend(factor, mean);
        }
    }

    fn solarize(&mut self, threshold: u8) {
        self.push(PixelOp::Value(ValueOp::Solarize {
            threshold: f32::from(threshold),
        }));
    }

    fn saturation(&mut self, factor: f32) {
        let (ratio, one_minus) = blend_weights(factor);
        if block_weights(ratio, one_minus) {
            self.push(PixelOp::Saturation { ratio, one_minus });
        } else {
            // Not a meaningful factor (NaN, huge); keep the per-value semantics.
            self.flush();
            for p in self.rgb.as_chunks_mut::<3>().0 {
                let [r, g, b] = p.map(f32::from);
                let gray = f32::from(gray_f32(r, g, b));
                *p = [r, g, b].map(|v| blend_f32(v, gray, ratio, one_minus));
            }
        }
    }

    fn hue(&mut self, hue: f32) {
        assert!(
            (-0.5..=0.5).contains(&hue),
            "hue_factor {hue} is not in [-0.5, 0.5]"
        );
        self.push(PixelOp::Hue(hue));
    }

    fn grayscale(&mut self) {
        self.push(PixelOp::Grayscale);
    }

    fn jitter(&mut self, p: &ColorJitterParams) {
        for &op in &p.order {
            match op {
                JITTER_BRIGHTNESS => self.brightness(p.brightness),
                JITTER_CONTRAST => self.contrast(p.contrast),
                JITTER_SATURATION => self.saturation(p.saturation),
                JITTER_HUE => self.hue(p.hue),
                other => panic!("colour jitter op {other} is not 0..=3"),
            }
        }
    }

    /// Runs the pending ops.
    fn flush(&mut self) {
        if self.len > 0 {
            let ops = &self.ops[..self.len];
            run_blocks(
                self.rgb,
                &mut Pass {
                    ops,
                    sum: None,
                    store: true,
                },
            );
            self.len = 0;
        }
    }
}

// ------------------------------------------------------------------------ public ops

/// `adjust_brightness`: blend with black.
pub fn adjust_brightness(rgb: &mut [u8], factor: f32) {
    let mut chain = Chain::new(rgb);
    chain.brightness(factor);
    chain.flush();
}

/// Mean of the truncated grayscale image as `f32` (torch: `mean(rgb_to_grayscale(img)
/// .to(float32))`). The integer sum is exact; one rounding to `f32` follows, which
/// equals torch's `f32` result whenever the sum is below 2^24 (any 224x224 image).
pub fn gray_mean(rgb: &[u8]) -> f32 {
    mean_of(gray_sum(rgb), pixels(rgb))
}

/// `adjust_contrast`: blend with the mean gray level.
pub fn adjust_contrast(rgb: &mut [u8], factor: f32) {
    let mut chain = Chain::new(rgb);
    chain.contrast(factor);
    chain.flush();
}

/// `adjust_saturation`: blend each pixel with its own (truncated) gray level.
pub fn adjust_saturation(rgb: &mut [u8], factor: f32) {
    let mut chain = Chain::new(rgb);
    chain.saturation(factor);
    chain.flush();
}

/// `adjust_hue`: rotate the hue by `hue_factor` (in turns, `-0.5..=0.5`).
pub fn adjust_hue(rgb: &mut [u8], hue_factor: f32) {
    let mut chain = Chain::new(rgb);
    chain.hue(hue_factor);
    chain.flush();
}

/// `rgb_to_grayscale(num_output_channels=3)`: the gray level in all three channels.
pub fn grayscale(rgb: &mut [u8]) {
    let mut chain = Chain::new(rgb);
    chain.grayscale();
    chain.flush();
}

/// `solarize`: invert every value `>= threshold`.
pub fn solarize(rgb: &mut [u8], threshold: u8) {
    for v in rgb.iter_mut() {
        // A select, not a conditional store, so that it vectorises.
        *v = if *v >= threshold { 255 - *v } else { *v };
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
        row.as_chunks_mut::<3>().0.reverse();
    }
}

/// `ColorJitter.forward` with given parameters: the four ops in `p.order`. Ignores
/// `p.apply` (see [`apply_strong`]).
pub fn color_jitter(rgb: &mut [u8], p: &ColorJitterParams) {
    let mut chain = Chain::new(rgb);
    chain.jitter(p);
    chain.flush();
}

/// `ColorJitter(b, c, s)` without hue (torchvision skips the hue op when its range is
/// 0): brightness, contrast and saturation in `p.order`, the hue's slot skipped.
/// Ignores `p.apply` and `p.hue`.
pub fn color_jitter_no_hue(rgb: &mut [u8], p: &ColorJitterParams) {
    let mut chain = Chain::new(rgb);
    for &op in &p.order {
        match op {
            JITTER_BRIGHTNESS => chain.brightness(p.brightness),
            JITTER_CONTRAST => chain.contrast(p.contrast),
            JITTER_SATURATION => chain.saturation(p.saturation),
            _ => {}
        }
    }
    chain.flush();
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
    let mut chain = Chain::new(rgb);
    if params.jitter.apply {
        chain.jitter(&params.jitter);
    }
    if params.grayscale {
        chain.grayscale();
    }
    if let Some(sigma) = params.blur {
        chain.flush();
        gaussian_blur(chain.rgb, width, height, sigma, scratch);
    }
    if params.solarize {
        chain.solarize(SOLARIZE_THRESHOLD);
    }
    chain.flush();
}

// ------------------------------------------------------------------------------ blur

/// PIL's `_gaussian_blur_radius`: the fractional radius of each of `passes` box blurs
/// whose composition has variance `radius^2` (Gwosdek et al., "Theoretical foundations
/// of Gaussian convolution by extended box filtering"), with C's float/double steps.
fn pil_box_radius(radius: f32, passes: i32) -> f32 {
    let sigma2 = radius * radius / passes as f32;
    let big_l = (12.0 * f64::from(sigma2) + 1.0).sqrt() as f32;
    let l = ((f64::from(big_l) - 1.0) / 2.0).floor() as f32;
    let mut a = (2.0 * l + 1.0) * (l * (l + 1.0) - 3.0 * sigma2);
    a /= 6.0 * (sigma2 - (l + 1.0) * (l + 1.0));
    l + a
}

/// One extended box pass (PIL's `ImagingHorizontalBoxBlur` parameters): the `2r + 1`
/// inner taps weigh `ww`, the two outer taps `fw`, in Q24 fixed point.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct BoxKernel {
    r: usize,
    ww: u32,
    fw: u32,
}

impl BoxKernel {
    fn new(float_radius: f32) -> Self {
        let r = float_radius as u32;
        let ww = ((1u32 << 24) as f32 / (float_radius * 2.0 + 1.0)) as u32;
        let fw = ((1u32 << 24) - (r * 2 + 1) * ww) / 2;
        BoxKernel {
            r: r as usize,
            ww,
            fw,
        }
    }

    /// `(inner * ww + (outer_a + outer_b) * fw + 2^23) >> 24`; cannot overflow, since
    /// `(2r + 1) ww + 2 fw <= 2^24` and every tap is at most 255.
    #[inline(always)]
    fn apply(self, inner: u32, outer: u32) -> u8 {
        ((inner * self.ww + outer * self.fw + (1 << 23)) >> 24) as u8
    }
}

/// One box pass over a run of values whose taps are given as equally long slices:
/// `dst[i] = k.apply(sum_t inner[t][i], outer_a[i] + outer_b[i])`.
#[inline(always)]
fn box_taps<const N: usize>(
    dst: &mut [u8],
    inner: [&[u8]; N],
    outer_a: &[u8],
    outer_b: &[u8],
    k: BoxKernel,
) {
    let n = dst.len();
    let inner: [&[u8]; N] = std::array::from_fn(|t| &inner[t][..n]);
    let (outer_a, outer_b) = (&outer_a[..n], &outer_b[..n]);
    for i in 0..n {
        let mut s = 0u32;
        for tap in &inner {
            s += u32::from(tap[i]);
        }
        dst[i] = k.apply(s, u32::from(outer_a[i]) + u32::from(outer_b[i]));
    }
}

/// One box pass at pixel `x`, channel `c` of a line of `len` pixels, element
/// `(x, c)` at `x * stride + c`, with the edge pixels extended.
#[inline(always)]
fn box_at(src: &[u8], len: usize, stride: usize, x: usize, c: usize, k: BoxKernel) -> u8 {
    let at = |p: isize| u32::from(src[p.clamp(0, len as isize - 1) as usize * stride + c]);
    let (x, r) = (x as isize, k.r as isize);
    let inner: u32 = (x - r..=x + r).map(at).sum();
    k.apply(inner, at(x - r - 1) + at(x + r + 1))
}

/// One horizontal box pass over a row of `width` RGB pixels (`N = 2r + 1`).
#[inline(always)]
fn box_row<const N: usize>(src: &[u8], dst: &mut [u8], width: usize, k: BoxKernel) {
    let r = N / 2;
    debug_assert_eq!(k.r, r);
    // Pixels whose taps all lie inside the row: r + 1 <= x < width - r - 1.
    let lo = (r + 1).min(width);
    let hi = width.saturating_sub(r + 1).max(lo);
    for x in (0..lo).chain(hi..width) {
        for c in 0..3 {
            dst[x * 3 + c] = box_at(src, width, 3, x, c, k);
        }
    }
    if hi > lo {
        let n = 3 * (hi - lo);
        let inner: [&[u8]; N] = std::array::from_fn(|t| &src[3 * (lo + t - r)..][..n]);
        box_taps(
            &mut dst[3 * lo..3 * hi],
            inner,
            &src[3 * (lo - r - 1)..][..n],
            &src[3 * (lo + r + 1)..][..n],
            k,
        );
    }
}

/// One vertical box pass over a `height`-row image of `stride` bytes per row.
#[inline(always)]
fn box_cols<const N: usize>(
    src: &[u8],
    dst: &mut [u8],
    stride: usize,
    height: usize,
    k: BoxKernel,
) {
    let r = N / 2;
    debug_assert_eq!(k.r, r);
    let row = |y: isize| {
        let y = y.clamp(0, height as isize - 1) as usize;
        &src[y * stride..][..stride]
    };
    for (y, out) in dst.chunks_exact_mut(stride).enumerate() {
        let y = y as isize;
        let inner: [&[u8]; N] = std::array::from_fn(|t| row(y + t as isize - r as isize));
        box_taps(
            out,
            inner,
            row(y - r as isize - 1),
            row(y + r as isize + 1),
            k,
        );
    }
}

/// PIL's `ImagingLineBoxBlur32` (running sums) on one line of `len` RGB pixels,
/// element `(x, c)` at `x * stride + c` of `src` and `dst`. Any radius.
fn box_line(src: &[u8], dst: &mut [u8], len: usize, stride: usize, k: BoxKernel) {
    let r = k.r as isize;
    let last = len as isize - 1;
    let edge_a = (r + 1).min(len as isize);
    let edge_b = (len as isize - r - 1).max(0);
    for c in 0..3 {
        let at = |x: isize| u32::from(src[x as usize * stride + c]);
        let mut acc = at(0) * (r + 1) as u32;
        for x in 0..edge_a - 1 {
            acc += at(x);
        }
        acc += at(last) * (r - edge_a + 1) as u32;
        let mut step = |x: isize, sub: isize, add: isize, left: isize, right: isize| {
            acc = acc + at(add) - at(sub);
            dst[x as usize * stride + c] = k.apply(acc, at(left) + at(right));
        };
        if edge_a <= edge_b {
            for x in 0..edge_a {
                step(x, 0, x + r, 0, x + r + 1);
            }
            for x in edge_a..edge_b {
                step(x, x - r - 1, x + r, x - r - 1, x + r + 1);
            }
            for x in edge_b..=last {
                step(x, x - r - 1, last, x - r - 1, last);
            }
        } else {
            for x in 0..edge_b {
                step(x, 0, x + r, 0, x + r + 1);
            }
            for x in edge_b..edge_a {
                step(x, 0, last, 0, last);
            }
            for x in edge_a..=last {
                step(x, x - r - 1, last, x - r - 1, last);
            }
        }
    }
}

/// The blur's buffers: a full image and two rows.
struct BlurBuffers<'a> {
    image: &'a mut [u8],
    row_a: &'a mut [u8],
    row_b: &'a mut [u8],
}

/// Three horizontal passes (per row: `rgb -> row_a -> row_b -> image`), then three
/// vertical ones (`image -> rgb -> image -> rgb`), with the FIR kernels (`N = 2r + 1`).
#[inline(always)]
fn blur_fir<const N: usize>(
    rgb: &mut [u8],
    width: usize,
    height: usize,
    k: BoxKernel,
    buf: BlurBuffers,
) {
    let stride = width * 3;
    for (src, out) in rgb
        .chunks_exact(stride)
        .zip(buf.image.chunks_exact_mut(stride))
    {
        box_row::<N>(src, buf.row_a, width, k);
        box_row::<N>(buf.row_a, buf.row_b, width, k);
        box_row::<N>(buf.row_b, out, width, k);
    }
    box_cols::<N>(buf.image, rgb, stride, height, k);
    box_cols::<N>(rgb, buf.image, stride, height, k);
    box_cols::<N>(buf.image, rgb, stride, height, k);
}

/// [`blur_fir`] with PIL's running-sum lines, for any radius.
fn blur_lines(rgb: &mut [u8], width: usize, height: usize, k: BoxKernel, buf: BlurBuffers) {
    let stride = width * 3;
    for (src, out) in rgb
        .chunks_exact(stride)
        .zip(buf.image.chunks_exact_mut(stride))
    {
        box_line(src, buf.row_a, width, 3, k);
        box_line(buf.row_a, buf.row_b, width, 3, k);
        box_line(buf.row_b, out, width, 3, k);
    }
    let columns = |src: &[u8], dst: &mut [u8]| {
        for x in 0..width {
            box_line(&src[x * 3..], &mut dst[x * 3..], height, stride, k);
        }
    };
    columns(buf.image, rgb);
    columns(rgb, buf.image);
    columns(buf.image, rgb);
}

#[inline(always)]
fn blur_generic(rgb: &mut [u8], width: usize, height: usize, k: BoxKernel, buf: BlurBuffers) {
    match k.r {
        0 => blur_fir::<1>(rgb, width, height, k, buf),
        1 => blur_fir::<3>(rgb, width, height, k, buf),
        2 => blur_fir::<5>(rgb, width, height, k, buf),
        3 => blur_fir::<7>(rgb, width, height, k, buf),
        _ => blur_lines(rgb, width, height, k, buf),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn blur_avx2(rgb: &mut [u8], width: usize, height: usize, k: BoxKernel, buf: BlurBuffers) {
    blur_generic(rgb, width, height, k, buf);
}

/// `len` bytes of `scratch`'s storage (grown, never shrunk).
fn scratch_bytes(scratch: &mut Vec<f32>, len: usize) -> &mut [u8] {
    let words = len.div_ceil(4);
    if scratch.len() < words {
        scratch.resize(words, 0.0);
    }
    let words = &mut scratch[..words];
    // SAFETY: `f32` is 4 bytes without padding and any byte pattern is a valid `f32`
    // and `u8`; `u8` has alignment 1; the slice covers exactly `words`, borrowed
    // mutably for the result's lifetime.
    let bytes =
        unsafe { std::slice::from_raw_parts_mut(words.as_mut_ptr().cast::<u8>(), words.len() * 4) };
    &mut bytes[..len]
}

/// PIL's `ImageFilter.GaussianBlur(radius=sigma)` on a `width` x `height` RGB image:
/// per direction (horizontal first) three extended box blurs of radius
/// `pil_box_radius(sigma, 3)`, each rounded to `u8`, edge pixels extended; bit
/// exact. `sigma <= 0` (or NaN) leaves the image unchanged.
///
/// `scratch` grows to `(width * height + 2 * width) * 3` bytes once and is reused.
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
    // PIL returns a copy for radius 0; NaN and negative radii are not meaningful here.
    if rgb.is_empty() || sigma.is_nan() || sigma <= 0.0 {
        return;
    }
    let k = BoxKernel::new(pil_box_radius(sigma, BLUR_PASSES));
    let stride = width * 3;
    let bytes = scratch_bytes(scratch, rgb.len() + 2 * stride);
    let (image, rows) = bytes.split_at_mut(rgb.len());
    let (row_a, row_b) = rows.split_at_mut(stride);
    let buf = BlurBuffers {
        image,
        row_a,
        row_b,
    };
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU supports AVX2 (checked at run time).
        unsafe { blur_avx2(rgb, width, height, k, buf) };
        return;
    }
    blur_generic(rgb, width, height, k, buf);
}

/// The previous scalar implementation (per value, straight from the formulas), kept
/// to check that the fast paths give the same bytes and to time them against.
/// Its `gaussian_blur` is the old sampled Gaussian (not PIL's filter): timing only.
#[cfg(test)]
mod reference {
    #![allow(dead_code)]
    use super::SOLARIZE_THRESHOLD;
    use crate::augment::params::{
        ColorJitterParams, JITTER_BRIGHTNESS, JITTER_CONTRAST, JITTER_HUE, JITTER_SATURATION,
        StrongParams,
    };

    /// Kernel half-width in sigmas for [`gaussian_blur`].
    const BLUR_TRUNCATE: f32 = 3.0;

    pub(super) fn pixels(rgb: &[u8]) -> usize {
        assert!(
            rgb.len().is_multiple_of(3),
            "RGB buffer length {} is not a multiple of 3",
            rgb.len()
        );
        rgb.len() / 3
    }

    /// torchvision's `rgb_to_grayscale` for one uint8 pixel (truncating).
    #[inline]
    pub(super) fn gray_u8(r: u8, g: u8, b: u8) -> u8 {
        (0.2989f32 * f32::from(r) + 0.587f32 * f32::from(g) + 0.114f32 * f32::from(b)) as u8
    }

    /// `_blend` for one value: `ratio * a + one_minus * b`, clamped and truncated.
    #[inline]
    pub(super) fn blend(a: u8, b: f32, ratio: f32, one_minus: f32) -> u8 {
        // `as u8` saturates and truncates toward zero, like clamp(0, 255).to(uint8).
        (ratio * f32::from(a) + one_minus * b).clamp(0.0, 255.0) as u8
    }

    /// `(ratio, 1 - ratio)` as torch sees them: `1 - ratio` in double, then both in `f32`.
    pub(super) fn blend_weights(ratio: f32) -> (f32, f32) {
        (ratio, (1.0 - f64::from(ratio)) as f32)
    }

    /// `adjust_brightness`: blend with black.
    pub(super) fn adjust_brightness(rgb: &mut [u8], factor: f32) {
        let (r, m) = blend_weights(factor);
        for v in rgb.iter_mut() {
            *v = blend(*v, 0.0, r, m);
        }
    }

    /// Mean of the truncated grayscale image as `f32` (torch: `mean(rgb_to_grayscale(img)
    /// .to(float32))`). The integer sum is exact; one rounding to `f32` follows, which
    /// equals torch's `f32` result whenever the sum is below 2^24 (any 224x224 image).
    pub(super) fn gray_mean(rgb: &[u8]) -> f32 {
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
    pub(super) fn adjust_contrast(rgb: &mut [u8], factor: f32) {
        let mean = gray_mean(rgb);
        let (r, m) = blend_weights(factor);
        for v in rgb.iter_mut() {
            *v = blend(*v, mean, r, m);
        }
    }

    /// `adjust_saturation`: blend each pixel with its own (truncated) gray level.
    pub(super) fn adjust_saturation(rgb: &mut [u8], factor: f32) {
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
    pub(super) fn remainder(a: f32, b: f32) -> f32 {
        let m = a % b;
        if m != 0.0 && ((b < 0.0) != (m < 0.0)) {
            m + b
        } else {
            m
        }
    }

    /// `_rgb2hsv` for one pixel in `[0, 1]`.
    #[inline]
    pub(super) fn rgb2hsv(r: f32, g: f32, b: f32) -> (f32, f32, f32) {
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
    pub(super) fn hsv2rgb(h: f32, s: f32, v: f32) -> (f32, f32, f32) {
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
    pub(super) fn float_to_u8(x: f32) -> u8 {
        (x * 255.999f32) as u8
    }

    /// `adjust_hue`: rotate the hue by `hue_factor` (in turns, `-0.5..=0.5`).
    pub(super) fn adjust_hue(rgb: &mut [u8], hue_factor: f32) {
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
    pub(super) fn grayscale(rgb: &mut [u8]) {
        pixels(rgb);
        for p in rgb.chunks_exact_mut(3) {
            let g = gray_u8(p[0], p[1], p[2]);
            p.fill(g);
        }
    }

    /// `solarize`: invert every value `>= threshold`.
    pub(super) fn solarize(rgb: &mut [u8], threshold: u8) {
        for v in rgb.iter_mut() {
            if *v >= threshold {
                *v = 255 - *v;
            }
        }
    }

    /// Horizontal flip of a `width` x `height` RGB image.
    pub(super) fn hflip(rgb: &mut [u8], width: usize, height: usize) {
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
    pub(super) fn gaussian_blur(
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
    pub(super) fn color_jitter(rgb: &mut [u8], p: &ColorJitterParams) {
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

    /// The old `apply_strong`, with the blur passed in.
    pub(super) fn apply_strong(
        params: &StrongParams,
        rgb: &mut [u8],
        width: usize,
        height: usize,
        mut blur: impl FnMut(&mut [u8], usize, usize, f32),
    ) {
        if params.jitter.apply {
            color_jitter(rgb, &params.jitter);
        }
        if params.grayscale {
            grayscale(rgb);
        }
        if let Some(sigma) = params.blur {
            blur(rgb, width, height, sigma);
        }
        if params.solarize {
            solarize(rgb, SOLARIZE_THRESHOLD);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::augment::params::{StrongConfig, sample_rng};

    fn random_image(seed: u64, n: usize) -> Vec<u8> {
        let mut rng = sample_rng(seed, 0, 0);
        (0..n * 3).map(|_| rng.next_u64() as u8).collect()
    }

    /// The fine-tuning jitter (no hue) is the three ops one after another, in the drawn
    /// order, and never touches the hue.
    #[test]
    fn color_jitter_no_hue_is_the_three_ops_in_order() {
        let img = edge_pixels(3);
        for sample in 0..40 {
            let p = ColorJitterParams::sample_no_hue(&mut sample_rng(9, 1, sample), 0.4);
            assert!(p.apply && p.hue == 0.0);
            for f in [p.brightness, p.contrast, p.saturation] {
                assert!((0.6..1.4).contains(&f), "{f}");
            }
            let mut want = img.clone();
            for &op in &p.order {
                match op {
                    JITTER_BRIGHTNESS => adjust_brightness(&mut want, p.brightness),
                    JITTER_CONTRAST => adjust_contrast(&mut want, p.contrast),
                    JITTER_SATURATION => adjust_saturation(&mut want, p.saturation),
                    _ => {}
                }
            }
            let mut got = img.clone();
            color_jitter_no_hue(&mut got, &p);
            assert_eq!(got, want, "sample {sample}, {p:?}");
        }
    }

    /// Pixels that stress the hue and saturation paths: every gray, every max/min tie
    /// pattern of a few levels, primaries, near-grays, a strided walk through the
    /// colour cube and random pixels.
    fn edge_pixels(seed: u64) -> Vec<u8> {
        let mut px: Vec<u8> = (0..=255u8).flat_map(|v| [v, v, v]).collect();
        let levels = [0u8, 1, 2, 63, 64, 127, 128, 129, 191, 200, 253, 254, 255];
        for &a in &levels {
            for &b in &levels {
                px.extend([a, a, b, a, b, a, b, a, a, a, b, b, b, a, b, b, b, a]);
                for &c in &levels {
                    px.extend([a, b, c]);
                }
            }
        }
        for v in (0..=255u32).step_by(7) {
            for w in (3..=255u32).step_by(11) {
                for x in (5..=255u32).step_by(13) {
                    px.extend([v as u8, w as u8, x as u8]);
                }
            }
        }
        px.extend(random_image(seed, 20_000));
        px
    }

    /// PIL's `GaussianBlur` structure literally: horizontal line blurs, transpose,
    /// horizontal line blurs, transpose back (PIL's `ImagingBoxBlur`).
    fn pil_blur_reference(rgb: &mut [u8], w: usize, h: usize, sigma: f32) {
        let k = BoxKernel::new(pil_box_radius(sigma, BLUR_PASSES));
        let lines = |img: &mut [u8], len: usize| {
            let mut out = vec![0u8; len * 3];
            for line in img.chunks_exact_mut(len * 3) {
                for _ in 0..BLUR_PASSES {
                    box_line(line, &mut out, len, 3, k);
                    line.copy_from_slice(&out);
                }
            }
        };
        let transpose = |src: &[u8], sw: usize, sh: usize| {
            let mut t = vec![0u8; src.len()];
            for y in 0..sh {
                for x in 0..sw {
                    t[(x * sh + y) * 3..][..3].copy_from_slice(&src[(y * sw + x) * 3..][..3]);
                }
            }
            t
        };
        lines(rgb, w);
        let mut t = transpose(rgb, w, h);
        lines(&mut t, h);
        rgb.copy_from_slice(&transpose(&t, h, w));
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
    #[should_panic(expected = "not in [-0.5, 0.5]")]
    fn hue_out_of_range_panics() {
        adjust_hue(&mut [1, 2, 3], 0.6);
    }

    #[test]
    fn hflip_reverses_rows() {
        let mut px = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12];
        hflip(&mut px, 2, 2);
        assert_eq!(px, [4, 5, 6, 1, 2, 3, 10, 11, 12, 7, 8, 9]);
        let img = random_image(9, 7 * 5);
        let (mut a, mut b) = (img.clone(), img.clone());
        hflip(&mut a, 7, 5);
        reference::hflip(&mut b, 7, 5);
        assert_eq!(a, b);
    }

    /// Every fast path against the per-value reference, on stress pixels, for many
    /// factors, alone and after other ops in the same pass, in the generic and the
    /// dispatched (AVX2 where available) builds.
    #[test]
    fn fast_ops_match_the_reference() {
        let img = edge_pixels(6);
        let check = |name: &str, f: f32, fast: &dyn Fn(&mut [u8]), slow: &dyn Fn(&mut [u8])| {
            let (mut a, mut b) = (img.clone(), img.clone());
            fast(&mut a);
            slow(&mut b);
            if let Some(i) = a.iter().zip(&b).position(|(x, y)| x != y) {
                let p = i / 3 * 3;
                panic!(
                    "{name}({f}): pixel {:?} -> {:?}, reference {:?}",
                    &img[p..p + 3],
                    &a[p..p + 3],
                    &b[p..p + 3]
                );
            }
        };
        let mut rng = sample_rng(7, 0, 0);
        let mut factors = vec![0.0f32, 0.5, 0.6, 0.999_999_9, 1.0, 1.000_001, 1.2, 1.4, 2.0];
        factors.extend((0..12).map(|_| (rng.next_u64() % 2_000_000) as f32 / 1e6));
        for &f in &factors {
            check("brightness", f, &|x| adjust_brightness(x, f), &|x| {
                reference::adjust_brightness(x, f)
            });
            check("contrast", f, &|x| adjust_contrast(x, f), &|x| {
                reference::adjust_contrast(x, f)
            });
            check("saturation", f, &|x| adjust_saturation(x, f), &|x| {
                reference::adjust_saturation(x, f)
            });
            // Several ops sharing passes.
            check(
                "brightness+saturation",
                f,
                &|x| {
                    color_jitter(
                        x,
                        &ColorJitterParams {
                            apply: true,
                            order: [0, 2, 1, 3],
                            brightness: 1.1,
                            saturation: f,
                            contrast: f,
                            hue: f / 4.0 - 0.25,
                        },
                    )
                },
                &|x| {
                    reference::adjust_brightness(x, 1.1);
                    reference::adjust_saturation(x, f);
                    reference::adjust_contrast(x, f);
                    reference::adjust_hue(x, f / 4.0 - 0.25);
                },
            );
        }
        // Degenerate factors take the per-value path for saturation.
        for f in [
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            1e31,
            -1e31,
            -3.0,
            1e29,
        ] {
            check("brightness", f, &|x| adjust_brightness(x, f), &|x| {
                reference::adjust_brightness(x, f)
            });
            check("contrast", f, &|x| adjust_contrast(x, f), &|x| {
                reference::adjust_contrast(x, f)
            });
            check("saturation", f, &|x| adjust_saturation(x, f), &|x| {
                reference::adjust_saturation(x, f)
            });
        }
        let mut hues = vec![
            -0.5f32,
            0.5,
            -0.499_999_97,
            0.499_999_97,
            -0.25,
            0.25,
            -0.1,
            0.1,
            -1.0 / 3.0,
            1.0 / 3.0,
            1.0 / 6.0,
            -1.0 / 6.0,
            0.0,
            -0.0,
            1e-8,
            -1e-8,
        ];
        hues.extend((0..16).map(|_| (rng.next_u64() % 1_000_001) as f32 / 1e6 - 0.5));
        for &h in &hues {
            check("hue", h, &|x| adjust_hue(x, h), &|x| {
                reference::adjust_hue(x, h)
            });
            check(
                "hue(generic)",
                h,
                &|x| {
                    blocks_generic(
                        x,
                        &mut Pass {
                            ops: &[PixelOp::Hue(h)],
                            sum: None,
                            store: true,
                        },
                    )
                },
                &|x| reference::adjust_hue(x, h),
            );
            check(
                "solarize+hue",
                h,
                &|x| {
                    let mut chain = Chain::new(x);
                    chain.solarize(100);
                    chain.hue(h);
                    chain.flush();
                },
                &|x| {
                    reference::solarize(x, 100);
                    reference::adjust_hue(x, h);
                },
            );
        }
        check("grayscale", 0.0, &|x| grayscale(x), &|x| {
            reference::grayscale(x)
        });
        check(
            "grayscale(generic)",
            0.0,
            &|x| {
                blocks_generic(
                    x,
                    &mut Pass {
                        ops: &[PixelOp::Grayscale],
                        sum: None,
                        store: true,
                    },
                )
            },
            &|x| reference::grayscale(x),
        );
        // Every kind of op in one pass of the generic (SSE2) build.
        let (br, bm) = blend_weights(1.3);
        let (sr, sm) = blend_weights(0.7);
        check(
            "brightness+saturation+hue+solarize(generic)",
            0.0,
            &|x| {
                blocks_generic(
                    x,
                    &mut Pass {
                        ops: &[
                            PixelOp::Value(ValueOp::Blend {
                                ratio: br,
                                one_minus: bm,
                                other: 0.0,
                            }),
                            PixelOp::Saturation {
                                ratio: sr,
                                one_minus: sm,
                            },
                            PixelOp::Hue(0.09),
                            PixelOp::Value(ValueOp::Solarize { threshold: 128.0 }),
                        ],
                        sum: None,
                        store: true,
                    },
                )
            },
            &|x| {
                reference::adjust_brightness(x, 1.3);
                reference::adjust_saturation(x, 0.7);
                reference::adjust_hue(x, 0.09);
                reference::solarize(x, 128);
            },
        );
        for t in [0u8, 1, 128, 255] {
            check("solarize", f32::from(t), &|x| solarize(x, t), &|x| {
                reference::solarize(x, t)
            });
        }
        // Odd lengths: the last partial block.
        for n in [0usize, 1, 2, 63, 64, 65, 130] {
            let img = random_image(n as u64, n);
            assert_eq!(gray_mean(&img), reference::gray_mean(&img), "n {n}");
            let (mut a, mut b) = (img.clone(), img.clone());
            adjust_hue(&mut a, 0.3);
            reference::adjust_hue(&mut b, 0.3);
            assert_eq!(a, b, "n {n}");
        }
    }

    /// Runs of per-value ops (more than fit pending), then each per-pixel op, on
    /// image sizes with partial blocks.
    #[test]
    fn pending_value_ops_match_the_reference() {
        type Step = (&'static str, f32);
        let runs: [&[Step]; 5] = [
            &[("b", 1.3), ("c", 0.7), ("sol", 128.0)],
            &[
                ("c", 1.4),
                ("b", 0.6),
                ("c", 1.1),
                ("b", 1.2),
                ("sol", 200.0),
                ("c", 0.9),
            ],
            &[("sol", 1.0), ("sol", 254.0)],
            &[("b", 1.0), ("c", 1.0)],
            &[],
        ];
        for (k, run) in runs.iter().enumerate() {
            for last in ["none", "sat", "hue", "gray", "mean"] {
                for n in [1usize, 63, 64, 65, 200] {
                    let img = random_image(100 + n as u64, n);
                    let mut fast = img.clone();
                    let mut slow = img.clone();
                    let mut chain = Chain::new(&mut fast);
                    for &(op, f) in *run {
                        match op {
                            "b" => {
                                chain.brightness(f);
                                reference::adjust_brightness(&mut slow, f);
                            }
                            "c" => {
                                chain.contrast(f);
                                reference::adjust_contrast(&mut slow, f);
                            }
                            _ => {
                                chain.solarize(f as u8);
                                reference::solarize(&mut slow, f as u8);
                            }
                        }
                    }
                    match last {
                        "sat" => {
                            chain.saturation(1.3);
                            reference::adjust_saturation(&mut slow, 1.3);
                        }
                        "hue" => {
                            chain.hue(-0.2);
                            reference::adjust_hue(&mut slow, -0.2);
                        }
                        "gray" => {
                            chain.grayscale();
                            reference::grayscale(&mut slow);
                        }
                        "mean" => {
                            let m = chain.gray_mean();
                            assert_eq!(m, reference::gray_mean(&slow), "run {k}, {n} px");
                        }
                        _ => {}
                    }
                    chain.flush();
                    assert_eq!(fast, slow, "run {k} then {last}, {n} px");
                }
            }
        }
    }

    /// The full strong view on sampled parameters against the reference ops (with
    /// PIL's blur), on sizes that are not multiples of the block size.
    #[test]
    fn apply_strong_matches_the_reference_on_sampled_params() {
        let cfg = StrongConfig {
            blur_p: 0.5,
            ..StrongConfig::default()
        };
        let mut scratch = Vec::new();
        for sample in 0..150u64 {
            let mut rng = sample_rng(21, 0, sample);
            let p = StrongParams::sample_from(&mut rng, &cfg);
            let (w, h) = (
                1 + (sample as usize * 7) % 40,
                1 + (sample as usize * 5) % 23,
            );
            let img = crate::testkit::photo_pixels(w as u32, h as u32, sample);
            let mut fast = img.clone();
            apply_strong(&p, &mut fast, w, h, &mut scratch);
            let mut slow = img.clone();
            reference::apply_strong(&p, &mut slow, w, h, |x, w, h, s| {
                pil_blur_reference(x, w, h, s)
            });
            assert_eq!(fast, slow, "sample {sample} {w}x{h} {p:?}");
        }
    }

    #[test]
    fn pil_box_radius_and_weights() {
        // r = (int)radius; (2r + 1) ww + 2 fw is 2^24 up to the halving's rounding.
        for sigma in [0.05f32, 0.1, 0.3, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 5.0, 10.0] {
            let fr = pil_box_radius(sigma, 3);
            let k = BoxKernel::new(fr);
            assert_eq!(k.r, fr as usize);
            let total = (2 * k.r as u32 + 1) * k.ww + 2 * k.fw;
            assert!((1 << 24) - total <= 1, "sigma {sigma}: {k:?}");
            // Three boxes of variance ~ sigma^2 / 3 each.
            let w = f64::from(k.ww) / f64::from(1u32 << 24);
            let f = f64::from(k.fw) / f64::from(1u32 << 24);
            let var: f64 = (1..=k.r).map(|i| 2.0 * w * (i * i) as f64).sum::<f64>()
                + 2.0 * f * ((k.r + 1) * (k.r + 1)) as f64;
            let want = f64::from(sigma * sigma) / 3.0;
            assert!(
                (var - want).abs() < 0.02 * want + 1e-6,
                "sigma {sigma}: {var} vs {want}"
            );
        }
        // The ConMIM range needs only the radius-0 and radius-1 kernels.
        assert_eq!(BoxKernel::new(pil_box_radius(0.1, 3)).r, 0);
        assert_eq!(BoxKernel::new(pil_box_radius(2.0, 3)).r, 1);
    }

    /// The FIR passes (all radii they serve) equal PIL's running-sum algorithm, on
    /// images narrower and shorter than the kernel too.
    #[test]
    fn blur_matches_pil_line_reference() {
        let mut scratch = Vec::new();
        let sizes = [
            (1, 1),
            (1, 9),
            (9, 1),
            (2, 3),
            (3, 2),
            (5, 4),
            (8, 8),
            (17, 11),
            (64, 48),
            (33, 65),
        ];
        let sigmas = [
            0.05f32, 0.1, 0.37, 0.5, 1.0, 1.37, 2.0, 2.6, 3.1, 4.0, 5.2, 9.0,
        ];
        for (i, &(w, h)) in sizes.iter().enumerate() {
            let img = crate::testkit::photo_pixels(w as u32, h as u32, i as u64);
            for &sigma in &sigmas {
                let mut fast = img.clone();
                gaussian_blur(&mut fast, w, h, sigma, &mut scratch);
                let mut slow = img.clone();
                pil_blur_reference(&mut slow, w, h, sigma);
                assert_eq!(fast, slow, "{w}x{h} sigma {sigma}");
                // The generic (non-AVX2) build too.
                let k = BoxKernel::new(pil_box_radius(sigma, BLUR_PASSES));
                let mut generic = img.clone();
                let (mut image, mut a, mut b) =
                    (vec![0u8; img.len()], vec![0u8; w * 3], vec![0u8; w * 3]);
                blur_generic(
                    &mut generic,
                    w,
                    h,
                    k,
                    BlurBuffers {
                        image: &mut image,
                        row_a: &mut a,
                        row_b: &mut b,
                    },
                );
                assert_eq!(generic, slow, "generic {w}x{h} sigma {sigma}");
            }
        }
    }

    #[test]
    fn blur_keeps_flat_images_and_mass() {
        let (w, h) = (17, 11);
        let mut scratch = Vec::new();
        for v in [0u8, 1, 123, 254, 255] {
            let mut flat = vec![v; w * h * 3];
            gaussian_blur(&mut flat, w, h, 1.7, &mut scratch);
            assert!(flat.iter().all(|&x| x == v));
        }

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
    fn tiny_blur_is_nearly_identity_and_scratch_is_reused() {
        let (w, h) = (32, 24);
        let img = random_image(4, w * h);
        let mut out = img.clone();
        let mut scratch = Vec::new();
        // PIL's radius-0.1 blur still gives each neighbour 0.17% of the weight per
        // pass: at most about one level per pass on this noise.
        gaussian_blur(&mut out, w, h, 0.1, &mut scratch);
        assert_ne!(out, img);
        assert!(img.iter().zip(&out).all(|(a, b)| a.abs_diff(*b) <= 6));
        let mut same = img.clone();
        gaussian_blur(&mut same, w, h, 0.0, &mut scratch);
        gaussian_blur(&mut same, w, h, f32::NAN, &mut scratch);
        assert_eq!(same, img);
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

    /// On-CPU time of this thread (`CLOCK_THREAD_CPUTIME_ID`), so that time slices
    /// lost to other processes on a shared machine do not count; wall clock off
    /// 64-bit Linux.
    fn cpu_time() -> std::time::Duration {
        #[cfg(all(target_os = "linux", target_pointer_width = "64"))]
        {
            unsafe extern "C" {
                // `struct timespec` on 64-bit Linux: two 64-bit fields.
                fn clock_gettime(clock: i32, ts: *mut [i64; 2]) -> i32;
            }
            const CLOCK_THREAD_CPUTIME_ID: i32 = 3;
            let mut ts = [0i64; 2];
            // SAFETY: libc's clock_gettime with a valid clock id and a pointer to a
            // live timespec.
            if unsafe { clock_gettime(CLOCK_THREAD_CPUTIME_ID, &mut ts) } == 0 {
                return std::time::Duration::new(ts[0] as u64, ts[1] as u32);
            }
        }
        use std::sync::OnceLock;
        static START: OnceLock<std::time::Instant> = OnceLock::new();
        START.get_or_init(std::time::Instant::now).elapsed()
    }

    /// Per-op and average strong-view times (224x224), the old per-value code
    /// (`reference`, with its sampled-Gaussian blur) against the current one:
    /// `cargo test --release --lib augment::color::tests::bench -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn bench_strong() {
        use std::hint::black_box;
        use std::time::Duration;
        let (w, h) = (224usize, 224usize);
        let img = crate::testkit::photo_pixels(w as u32, h as u32, 1);
        let mut buf = img.clone();
        // Best of 15 rounds of 10 calls (each on a fresh copy, copy time included).
        let mut time = |f: &mut dyn FnMut(&mut [u8])| -> Duration {
            let mut best = Duration::MAX;
            for _ in 0..15 {
                let t = cpu_time();
                for _ in 0..10 {
                    buf.copy_from_slice(&img);
                    f(black_box(&mut buf));
                }
                best = best.min((cpu_time() - t) / 10);
            }
            best
        };
        let copy = time(&mut |_| {});
        type Op<'a> = (
            &'a str,
            Box<dyn FnMut(&mut [u8]) + 'a>,
            Box<dyn FnMut(&mut [u8]) + 'a>,
        );
        let (mut s_old, mut s_new) = (Vec::new(), Vec::new());
        let ops: Vec<Op> = vec![
            (
                "brightness 1.2",
                Box::new(|x| reference::adjust_brightness(x, 1.2)),
                Box::new(|x| adjust_brightness(x, 1.2)),
            ),
            (
                "contrast 0.8",
                Box::new(|x| reference::adjust_contrast(x, 0.8)),
                Box::new(|x| adjust_contrast(x, 0.8)),
            ),
            (
                "saturation 1.1",
                Box::new(|x| reference::adjust_saturation(x, 1.1)),
                Box::new(|x| adjust_saturation(x, 1.1)),
            ),
            (
                "hue 0.07",
                Box::new(|x| reference::adjust_hue(x, 0.07)),
                Box::new(|x| adjust_hue(x, 0.07)),
            ),
            (
                "grayscale",
                Box::new(reference::grayscale),
                Box::new(grayscale),
            ),
            (
                "solarize",
                Box::new(|x| reference::solarize(x, 128)),
                Box::new(|x| solarize(x, 128)),
            ),
            (
                "hflip",
                Box::new(|x| reference::hflip(x, 224, 224)),
                Box::new(|x| hflip(x, 224, 224)),
            ),
            (
                "blur 1.05 (old: Gaussian)",
                Box::new(|x| reference::gaussian_blur(x, 224, 224, 1.05, &mut s_old)),
                Box::new(|x| gaussian_blur(x, 224, 224, 1.05, &mut s_new)),
            ),
            (
                "jitter [2, 1, 3, 0]",
                Box::new(|x| {
                    reference::adjust_saturation(x, 1.1);
                    reference::adjust_contrast(x, 0.8);
                    reference::adjust_hue(x, 0.07);
                    reference::adjust_brightness(x, 1.2);
                }),
                Box::new(|x| {
                    color_jitter(
                        x,
                        &ColorJitterParams {
                            apply: true,
                            order: [2, 1, 3, 0],
                            brightness: 1.2,
                            contrast: 0.8,
                            saturation: 1.1,
                            hue: 0.07,
                        },
                    )
                }),
            ),
        ];
        println!("224x224, per call, on-CPU time (copying the image, {copy:?}, subtracted):");
        for (name, mut old, mut new) in ops {
            let t_old = time(&mut *old).saturating_sub(copy);
            let t_new = time(&mut *new).saturating_sub(copy);
            println!(
                "  {name:<26} old {t_old:>10.1?}  new {t_new:>10.1?}  x{:.1}",
                t_old.as_secs_f64() / t_new.as_secs_f64().max(1e-9)
            );
        }

        let cfg = StrongConfig::default();
        let params: Vec<StrongParams> = (0..200)
            .map(|i| StrongParams::sample_from(&mut sample_rng(0, 0, i), &cfg))
            .collect();
        // Best of 5 rounds over all parameter sets, per set.
        let mut run = |f: &mut dyn FnMut(&StrongParams, &mut [u8])| -> Duration {
            let mut best = Duration::MAX;
            for _ in 0..5 {
                let t = cpu_time();
                for p in &params {
                    buf.copy_from_slice(&img);
                    f(p, black_box(&mut buf));
                }
                best = best.min((cpu_time() - t) / params.len() as u32);
            }
            best.saturating_sub(copy)
        };
        let (mut s_old, mut s_new) = (Vec::new(), Vec::new());
        let old = run(&mut |p, x| {
            reference::apply_strong(p, x, w, h, |x, w, h, s| {
                reference::gaussian_blur(x, w, h, s, &mut s_old)
            })
        });
        let new = run(&mut |p, x| apply_strong(p, x, w, h, &mut s_new));
        println!(
            "apply_strong, mean over {} sampled parameter sets (default StrongConfig): \
             old {old:.1?}, new {new:.1?}, x{:.1}",
            params.len(),
            old.as_secs_f64() / new.as_secs_f64()
        );
    }
}
