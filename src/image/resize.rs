//! Crop + resize of interleaved RGB8 images: a port of Pillow's bicubic `ImagingResample`
//! (`src/libImaging/Resample.c`, 8 bits per channel), bit-exact, with the resizer's
//! coefficient tables and intermediate rows reused across calls (no allocation once warm).
//!
//! The algorithm, as in Pillow:
//! * per axis, `precompute_coeffs`: `scale = (in1 - in0) / out` (the box edges are
//!   `f32`, as Pillow parses them), `support = 2 * max(scale, 1)` (bicubic, `a = -0.5`,
//!   widened when downscaling), window `[(int)(center - support + 0.5),
//!   (int)(center + support + 0.5))` clamped to the image, weights normalised to sum 1,
//!   then fixed point with 22 fractional bits (`normalize_coeffs_8bpc`);
//! * horizontal pass first, over only the rows the vertical pass reads, each value
//!   rounded (`+ 2^21`, `>> 22`) and clamped to `0..=255` into an 8-bit intermediate;
//!   then the vertical pass, rounded and clamped the same way. Pillow 13 (the version
//!   the reference pipeline's fixtures come from) runs the vertical pass first instead
//!   when the image loses more than twice as many rows as columns
//!   (python-pillow/Pillow#9549); so does this port (`vertical_first`), and the
//!   two orders do give different bytes. A pass whose axis is the identity (same size,
//!   whole box) is skipped, as Pillow does (running it would give the same bytes anyway).
//!
//! This is what torchvision's `RandomResizedCrop(..., interpolation=BICUBIC)` and
//! `Resize(256, BICUBIC)` call on the PIL images the official ConMIM code loads.
//! (Torchvision's *tensor* bicubic path uses `a = -0.75` with `antialias=False`; with
//! `antialias=True`, the v2 default for tensors, it uses `a = -0.5` as PIL but its own
//! rounding. Neither is the path the reference pipeline takes.)
//!
//! A horizontal flip of the output can be folded into the horizontal pass (the
//! coefficient table is built for mirrored output columns): byte-identical to resizing
//! and then calling [`crate::augment::color::hflip`], without the extra pass.
//!
//! With AVX2 (detected at run time) the horizontal pass takes two taps per step and two
//! rows per vector (a 16-byte load per row, a byte shuffle into channel pairs and `madd`
//! with the 22-bit coefficients split into two 16-bit halves, which keeps the sums exact),
//! eight rows per coefficient load, and the vertical pass combines whole rows 32 values
//! at a time with 32-bit multiplies; with AVX-VNNI both passes use `vpdpwssd` (the
//! vertical one on interleaved row pairs; see `has_vnni`). The portable fallback is the
//! same integer arithmetic, scalar; all give the same bytes.
//!
//! Cropping semantics, all without copying the source region:
//! * [`Resizer::crop_resize`] (an integer box): torchvision's `resized_crop` =
//!   `img.crop(box).resize(size, BICUBIC)`; the filter never reads pixels outside the box.
//! * [`Resizer::crop_resize_frac`]: a fractional region inside an integer view, PIL
//!   `view.resize(size, box=region)`; the filter reads only the view.
//! * [`Resizer::resize_region`] (a fractional box): PIL's `resize(size, box=...)`; the
//!   filter may read pixels just outside the box (clamped to the image).
//! * [`Resizer::resize_window`]: a full resize followed by an integer crop of its output
//!   (torchvision `Resize` + `CenterCrop`), computing only the cropped outputs.
//!
//! The `fast_image_resize` implementation this replaced is kept as [`fir::FirResizer`] as
//! a reference for tests and benchmarks (it runs the vertical pass first and rounds
//! differently, so it is within a few levels of Pillow, not exact).

use super::ImageProblem;

/// A crop rectangle in pixels: rows `top..top + height`, columns `left..left + width`.
pub type CropBox = (u32, u32, u32, u32);

/// Pillow's `PRECISION_BITS` (`32 - 8 - 2`).
const PRECISION_BITS: u32 = 22;
/// The rounding term every accumulator starts from.
const HALF: i32 = 1 << (PRECISION_BITS - 1);
/// Bicubic support (Pillow's `BICUBIC.support`).
const SUPPORT: f64 = 2.0;
/// The coefficients are split as `k = (hi << SPLIT) + lo`, `lo` in `0..2^SPLIT`, so both
/// halves fit in `i16` for the AVX2 horizontal pass.
const SPLIT: u32 = 11;

fn problem(e: impl std::fmt::Display) -> ImageProblem {
    ImageProblem::Decode(format!("resize: {e}"))
}

fn check_len(what: &str, buf_len: usize, w: u32, h: u32) -> Result<(), ImageProblem> {
    let need = w as usize * h as usize * 3;
    if buf_len != need {
        return Err(ImageProblem::Decode(format!(
            "resize: {what} buffer has {buf_len} bytes, {w}x{h} RGB needs {need}"
        )));
    }
    Ok(())
}

/// Pillow's `bicubic_filter` (`a = -0.5`), operation for operation.
#[inline]
fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = if x < 0.0 { -x } else { x };
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// Pillow's `clip8`: the rounded accumulator to `0..=255`.
#[inline(always)]
fn clip8(acc: i32) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

#[cfg(target_arch = "x86_64")]
#[inline]
fn has_avx2() -> bool {
    std::arch::is_x86_feature_detected!("avx2")
}

/// AVX-VNNI (`vpdpwssd` on 256-bit vectors) for both passes where the CPU has it; the
/// environment variable `CONMIM_NO_VNNI` turns it off. Alone the resize is ~160 us per
/// 224 view with it and ~180 us without (the old `fast_image_resize` path: ~190 us). In
/// the loader both variants make the JPEG decode and strong ops that follow run slower
/// (`bench_decode_after_resize`; cause not found, no hardware counters on the VM), VNNI
/// less so in the loader, which is why it stays on.
#[cfg(target_arch = "x86_64")]
fn has_vnni() -> bool {
    use std::sync::OnceLock;
    static VNNI: OnceLock<bool> = OnceLock::new();
    *VNNI.get_or_init(|| {
        std::arch::is_x86_feature_detected!("avxvnni")
            && std::env::var_os("CONMIM_NO_VNNI").is_none()
    })
}

/// One axis of a resize: the input extent, the box `in0..in1` on it (Pillow's `f32`
/// box), the full output size, the output entries actually computed
/// (`first..first + count`) and where input index 0 sits in the source buffer.
#[derive(Debug, Clone, Copy)]
struct Geometry {
    in_size: usize,
    in0: f32,
    in1: f32,
    out_size: usize,
    first: usize,
    count: usize,
    offset: usize,
}

impl Geometry {
    /// An integer crop `offset..offset + len` resized to `out` (crop, then resize).
    fn crop(offset: u32, len: u32, out: u32) -> Self {
        Geometry {
            in_size: len as usize,
            in0: 0.0,
            in1: len as f32,
            out_size: out as usize,
            first: 0,
            count: out as usize,
            offset: offset as usize,
        }
    }

    /// Pillow skips a pass whose axis keeps its size over the whole box.
    fn is_identity(&self) -> bool {
        self.in_size == self.out_size && self.in0 == 0.0 && self.in1 == self.in_size as f32
    }
}

/// The filter of one axis: per computed output entry, the first source index (absolute,
/// the geometry's offset included), the tap count and `ksize` fixed-point coefficients
/// (zero past the tap count), exactly Pillow's `precompute_coeffs` +
/// `normalize_coeffs_8bpc`.
#[derive(Debug, Clone, Default)]
struct Axis {
    ksize: usize,
    bounds: Vec<(usize, usize)>,
    k: Vec<i32>,
    /// Scratch: one entry's `f64` weights.
    w: Vec<f64>,
}

impl Axis {
    /// Fills the table for `g`; with `mirror`, entry `d` holds output `first + count - 1
    /// - d` (the flipped output order).
    fn compute(&mut self, g: &Geometry, mirror: bool) {
        let scale = f64::from(g.in1 - g.in0) / g.out_size as f64;
        let filterscale = if scale < 1.0 { 1.0 } else { scale };
        let support = SUPPORT * filterscale;
        let ksize = support.ceil() as usize * 2 + 1;
        let ss = 1.0 / filterscale;
        let in_size = g.in_size as i64;
        self.ksize = ksize;
        self.bounds.clear();
        self.k.clear();
        self.w.clear();
        self.w.resize(ksize, 0.0);
        for d in 0..g.count {
            let xx = if mirror {
                g.first + g.count - 1 - d
            } else {
                g.first + d
            };
            let center = f64::from(g.in0) + (xx as f64 + 0.5) * scale;
            // C's `(int)` truncates toward zero, as `as` does.
            let xmin = ((center - support + 0.5) as i32 as i64).max(0);
            let xmax = ((center + support + 0.5) as i32 as i64).min(in_size);
            let n = (xmax - xmin).clamp(0, ksize as i64) as usize;
            let mut ww = 0.0;
            for (x, w) in self.w[..n].iter_mut().enumerate() {
                *w = bicubic(((x as i64 + xmin) as f64 - center + 0.5) * ss);
                ww += *w;
            }
            for x in 0..ksize {
                let mut w = if x < n { self.w[x] } else { 0.0 };
                if x < n && ww != 0.0 {
                    w /= ww;
                }
                let f = w * f64::from(1u32 << PRECISION_BITS);
                self.k.push(if w < 0.0 {
                    (-0.5 + f) as i32
                } else {
                    (0.5 + f) as i32
                });
            }
            self.bounds.push((xmin as usize + g.offset, n));
        }
    }

    /// The smallest and one past the largest source index any entry reads.
    fn span(&self) -> (usize, usize) {
        let lo = self.bounds.iter().map(|b| b.0).min().unwrap_or(0);
        let hi = self.bounds.iter().map(|b| b.0 + b.1).max().unwrap_or(lo);
        (lo, hi.max(lo))
    }

    fn coeffs(&self, d: usize) -> &[i32] {
        &self.k[d * self.ksize..][..self.bounds[d].1]
    }
}

/// Reusable RGB8 crop-and-resize worker (one per thread). Owns every buffer it uses; once
/// they have grown to the largest crop seen, a call allocates nothing.
#[derive(Debug, Clone, Default)]
pub struct Resizer {
    h: Axis,
    v: Axis,
    /// The horizontal coefficients in the AVX2 layout (see [`Resizer::build_simd`]).
    hk: Vec<[i16; 8]>,
    /// Steps of two taps per entry in `hk`.
    groups: usize,
    /// Horizontal pass output (the rows the vertical pass reads).
    tmp: Vec<u8>,
    /// Scalar vertical pass accumulators.
    acc: Vec<i32>,
    /// Never use the AVX2 kernels (tests and benchmarks of the portable path).
    portable: bool,
}

impl Resizer {
    pub fn new() -> Self {
        Self::default()
    }

    /// A resizer that never uses the AVX2 kernels (same bytes, slower; for tests and
    /// benchmarks of the portable path).
    #[doc(hidden)]
    pub fn portable() -> Self {
        Resizer {
            portable: true,
            ..Self::default()
        }
    }

    /// Crops `crop = (top, left, height, width)` from the `src_w` x `src_h` RGB8 image
    /// `src` and resizes it to `out_w` x `out_h` into `out` (bicubic, crop-then-resize:
    /// only pixels inside the box contribute). `src` and `out` must be exactly
    /// `w * h * 3` bytes; the box must be non-empty and inside the image. A box of the
    /// output size is a plain copy.
    #[allow(clippy::too_many_arguments)]
    pub fn crop_resize(
        &mut self,
        src: &[u8],
        src_w: u32,
        src_h: u32,
        crop: CropBox,
        out: &mut [u8],
        out_w: u32,
        out_h: u32,
    ) -> Result<(), ImageProblem> {
        self.crop_resize_flip(src, src_w, src_h, crop, false, out, out_w, out_h)
    }

    /// [`Resizer::crop_resize`], then (with `flip`) a horizontal flip of the output, done
    /// inside the horizontal pass: the same bytes as `crop_resize` followed by
    /// [`crate::augment::color::hflip`].
    #[allow(clippy::too_many_arguments)]
    pub fn crop_resize_flip(
        &mut self,
        src: &[u8],
        src_w: u32,
        src_h: u32,
        crop: CropBox,
        flip: bool,
        out: &mut [u8],
        out_w: u32,
        out_h: u32,
    ) -> Result<(), ImageProblem> {
        let (top, left, height, width) = crop;
        check_len("source", src.len(), src_w, src_h)?;
        check_len("output", out.len(), out_w, out_h)?;
        if width == 0 || height == 0 || out_w == 0 || out_h == 0 {
            return Err(problem(format!(
                "empty crop {width}x{height} or output {out_w}x{out_h}"
            )));
        }
        check_box(crop, src_w, src_h)?;
        let gx = Geometry::crop(left, width, out_w);
        let gy = Geometry::crop(top, height, out_h);
        self.run(src, src_w as usize, &gx, &gy, flip, out);
        Ok(())
    }

    /// Crop-then-resize of a fractional box: the integer box `view = (top, left, height,
    /// width)` of the `src_w` x `src_h` image is the only input (the filter never reads
    /// outside it, as in [`Resizer::crop_resize`]), and within it the fractional region
    /// `(left, top, width, height)` (relative to the view) is resized to `out_w` x `out_h`
    /// (PIL `view.resize(size, box=region)`), then flipped horizontally with `flip`.
    /// With the region equal to the whole view this is exactly
    /// [`Resizer::crop_resize`]`(view)`. Used to resize a crop box mapped onto a DCT-scaled
    /// decode, where its edges fall between pixels.
    #[allow(clippy::too_many_arguments)]
    pub fn crop_resize_frac(
        &mut self,
        src: &[u8],
        src_w: u32,
        src_h: u32,
        view: CropBox,
        region: (f64, f64, f64, f64),
        flip: bool,
        out: &mut [u8],
        out_w: u32,
        out_h: u32,
    ) -> Result<(), ImageProblem> {
        let (top, left, height, width) = view;
        let (rl, rt, rw, rh) = region;
        check_len("source", src.len(), src_w, src_h)?;
        check_len("output", out.len(), out_w, out_h)?;
        if width == 0 || height == 0 || !(rw > 0.0 && rh > 0.0) || out_w == 0 || out_h == 0 {
            return Err(problem(format!(
                "empty view {width}x{height}, region {rw}x{rh} or output {out_w}x{out_h}"
            )));
        }
        check_box(view, src_w, src_h)?;
        check_region(region, width, height)?;
        let axis = |offset: u32, len: u32, r0: f64, rlen: f64, out: u32| Geometry {
            in_size: len as usize,
            in0: r0 as f32,
            in1: (r0 + rlen) as f32,
            out_size: out as usize,
            first: 0,
            count: out as usize,
            offset: offset as usize,
        };
        let gx = axis(left, width, rl, rw, out_w);
        let gy = axis(top, height, rt, rh, out_h);
        self.run(src, src_w as usize, &gx, &gy, flip, out);
        Ok(())
    }

    /// Resizes the fractional source region `(left, top, width, height)` (pixels, may be
    /// non-integer) to `out_w` x `out_h` with PIL `resize(box=...)` semantics: the filter
    /// also reads source pixels just outside the region (clamped to the image).
    #[allow(clippy::too_many_arguments)]
    pub fn resize_region(
        &mut self,
        src: &[u8],
        src_w: u32,
        src_h: u32,
        region: (f64, f64, f64, f64),
        out: &mut [u8],
        out_w: u32,
        out_h: u32,
    ) -> Result<(), ImageProblem> {
        let (left, top, width, height) = region;
        check_len("source", src.len(), src_w, src_h)?;
        check_len("output", out.len(), out_w, out_h)?;
        if !(width > 0.0 && height > 0.0) || out_w == 0 || out_h == 0 {
            return Err(problem(format!(
                "empty region {width}x{height} or output {out_w}x{out_h}"
            )));
        }
        check_region(region, src_w, src_h)?;
        let axis = |len: u32, r0: f64, rlen: f64, out: u32| Geometry {
            in_size: len as usize,
            in0: r0 as f32,
            in1: (r0 + rlen) as f32,
            out_size: out as usize,
            first: 0,
            count: out as usize,
            offset: 0,
        };
        let gx = axis(src_w, left, width, out_w);
        let gy = axis(src_h, top, height, out_h);
        self.run(src, src_w as usize, &gx, &gy, false, out);
        Ok(())
    }

    /// Resizes the whole `src_w` x `src_h` image to `full_w` x `full_h` and writes only
    /// the `out_w` x `out_h` window at `(left, top)` of that result into `out`: exactly
    /// PIL `resize((full_w, full_h))` followed by `crop((left, top, left + out_w,
    /// top + out_h))` (torchvision `Resize` + `CenterCrop`), without computing the rest.
    #[allow(clippy::too_many_arguments)]
    pub fn resize_window(
        &mut self,
        src: &[u8],
        src_w: u32,
        src_h: u32,
        full: (u32, u32),
        window: (u32, u32),
        out: &mut [u8],
        out_w: u32,
        out_h: u32,
    ) -> Result<(), ImageProblem> {
        let ((full_w, full_h), (left, top)) = (full, window);
        check_len("source", src.len(), src_w, src_h)?;
        check_len("output", out.len(), out_w, out_h)?;
        if src_w == 0 || src_h == 0 || out_w == 0 || out_h == 0 {
            return Err(problem(format!(
                "empty source {src_w}x{src_h} or output {out_w}x{out_h}"
            )));
        }
        if u64::from(left) + u64::from(out_w) > u64::from(full_w)
            || u64::from(top) + u64::from(out_h) > u64::from(full_h)
        {
            return Err(problem(format!(
                "window {out_w}x{out_h} at ({left}, {top}) is outside {full_w}x{full_h}"
            )));
        }
        let axis = |len: u32, full: u32, first: u32, count: u32| Geometry {
            in_size: len as usize,
            in0: 0.0,
            in1: len as f32,
            out_size: full as usize,
            first: first as usize,
            count: count as usize,
            offset: 0,
        };
        let gx = axis(src_w, full_w, left, out_w);
        let gy = axis(src_h, full_h, top, out_h);
        self.run(src, src_w as usize, &gx, &gy, false, out);
        Ok(())
    }

    /// The two passes for geometries `gx`, `gy` on a source `src_w` pixels wide; `out` is
    /// `gx.count` x `gy.count` RGB.
    fn run(
        &mut self,
        src: &[u8],
        src_w: usize,
        gx: &Geometry,
        gy: &Geometry,
        flip: bool,
        out: &mut [u8],
    ) {
        let stride = src_w * 3;
        let row_len = gx.count * 3;
        debug_assert_eq!(out.len(), row_len * gy.count);
        let need_h = flip || !gx.is_identity();
        let need_v = !gy.is_identity();
        if !need_h && !need_v {
            // Same size both ways: a copy of the box.
            let col = (gx.offset + gx.first) * 3;
            let row0 = gy.offset + gy.first;
            for (d, o) in out.chunks_exact_mut(row_len).enumerate() {
                let s = (row0 + d) * stride + col;
                o.copy_from_slice(&src[s..s + row_len]);
            }
            return;
        }
        let simd = self.simd_available();
        if need_h && need_v && vertical_first(gx, gy) {
            // Pillow 13: vertical pass first (over the columns the horizontal pass
            // reads), then the horizontal pass on its rows.
            self.v.compute(gy, false);
            self.h.compute(gx, flip);
            let (x0, x1) = self.h.span();
            for b in &mut self.h.bounds {
                b.0 -= x0;
            }
            if simd {
                self.build_simd();
            }
            let mid_len = (x1 - x0) * 3;
            let need = mid_len * gy.count;
            if self.tmp.len() < need {
                self.tmp.resize(need, 0);
            }
            let mut tmp = std::mem::take(&mut self.tmp);
            self.v_pass(src, x0 * 3, stride, 0, mid_len, simd, &mut tmp[..need]);
            self.h_pass(&tmp[..need], mid_len, 0..gy.count, simd, out, row_len);
            self.tmp = tmp;
            return;
        }
        if need_h {
            self.h.compute(gx, flip);
            if simd {
                self.build_simd();
            }
        }
        if !need_v {
            let row0 = gy.offset + gy.first;
            self.h_pass(src, stride, row0..row0 + gy.count, simd, out, row_len);
            return;
        }
        self.v.compute(gy, false);
        if need_h {
            let (y0, y1) = self.v.span();
            let need = (y1 - y0) * row_len;
            if self.tmp.len() < need {
                self.tmp.resize(need, 0);
            }
            let mut tmp = std::mem::take(&mut self.tmp);
            self.h_pass(src, stride, y0..y1, simd, &mut tmp[..need], row_len);
            self.v_pass(&tmp[..need], 0, row_len, y0, row_len, simd, out);
            self.tmp = tmp;
        } else {
            let col = (gx.offset + gx.first) * 3;
            self.v_pass(src, col, stride, 0, row_len, simd, out);
        }
    }

    #[cfg(target_arch = "x86_64")]
    fn simd_available(&self) -> bool {
        !self.portable && has_avx2()
    }

    #[cfg(not(target_arch = "x86_64"))]
    fn simd_available(&self) -> bool {
        false
    }

    /// Lays the horizontal coefficients out for the AVX2 pass: per entry, per step of
    /// two taps `t, t+1`, two 128-bit vectors (high then low halves of the
    /// coefficients), each `[c0, c1, c0, c1, c0, c1, 0, 0]` to match the pixel shuffle
    /// (the channel pairs `R R G G B B` of taps `t, t+1`, then a zero pair).
    fn build_simd(&mut self) {
        let ksize = self.h.ksize;
        let steps = ksize.div_ceil(2);
        self.groups = steps;
        self.hk.clear();
        for d in 0..self.h.bounds.len() {
            let k = &self.h.k[d * ksize..][..ksize];
            for st in 0..steps {
                let tap = |t: usize| if t < ksize { k[t] } else { 0 };
                let c = [tap(2 * st), tap(2 * st + 1)];
                let hi = c.map(|v| (v >> SPLIT) as i16);
                let lo = c.map(|v| (v & ((1 << SPLIT) - 1)) as i16);
                for [a, b] in [hi, lo] {
                    self.hk.push([a, b, a, b, a, b, 0, 0]);
                }
            }
        }
    }

    /// Horizontal pass of source rows `rows` (stride `stride`) into consecutive rows of
    /// `dst` (`row_len` bytes each).
    fn h_pass(
        &self,
        src: &[u8],
        stride: usize,
        rows: std::ops::Range<usize>,
        simd: bool,
        dst: &mut [u8],
        row_len: usize,
    ) {
        debug_assert_eq!(dst.len(), rows.len() * row_len);
        #[cfg(target_arch = "x86_64")]
        if simd {
            let (h, hk, steps) = (&self.h, &self.hk[..], self.groups);
            if has_vnni() {
                // SAFETY: AVX2 and AVX-VNNI are available (checked at run time).
                unsafe { avx2::h_pass_vnni(src, stride, rows, h, hk, steps, dst) };
            } else {
                // SAFETY: AVX2 is available (checked by the caller through `has_avx2`).
                unsafe { avx2::h_pass(src, stride, rows, h, hk, steps, dst) };
            }
            return;
        }
        let _ = simd;
        for (r, d) in rows.zip(dst.chunks_exact_mut(row_len)) {
            h_row_scalar(src, r * stride, &self.h, d);
        }
    }

    /// Vertical pass: output row `d` combines the rows `bounds[d]` (minus `shift`) of
    /// `src` (rows `stride` bytes apart, starting at byte `base`, `row_len` bytes used).
    #[allow(clippy::too_many_arguments)]
    fn v_pass(
        &mut self,
        src: &[u8],
        base: usize,
        stride: usize,
        shift: usize,
        row_len: usize,
        simd: bool,
        out: &mut [u8],
    ) {
        #[cfg(target_arch = "x86_64")]
        if simd {
            let v = &self.v;
            if has_vnni() {
                // SAFETY: AVX2 and AVX-VNNI are available (checked at run time).
                unsafe { avx2::v_pass_vnni(src, base, stride, shift, row_len, v, out) };
            } else {
                // SAFETY: AVX2 is available (checked by the caller through `has_avx2`).
                unsafe { avx2::v_pass(src, base, stride, shift, row_len, v, out) };
            }
            return;
        }
        let _ = simd;
        self.acc.clear();
        self.acc.resize(row_len, 0);
        for (d, o) in out.chunks_exact_mut(row_len).enumerate() {
            let (min, _) = self.v.bounds[d];
            v_row_scalar(
                src,
                base + (min - shift) * stride,
                stride,
                self.v.coeffs(d),
                &mut self.acc,
                o,
            );
        }
    }
}

/// Pillow 13's order of the two passes (python-pillow/Pillow#9549, "if height is scaled
/// down significantly more than width, resize vertically first"): vertical first when
/// the image loses more than twice as many rows as columns. Pillow <= 12 always runs the
/// horizontal pass first. (Inferred from Pillow 13.0's output: it matches this rule on
/// every shape tried, and the other order differs.)
fn vertical_first(gx: &Geometry, gy: &Geometry) -> bool {
    let (w, h) = (gx.in_size as i64, gy.in_size as i64);
    let (ow, oh) = (gx.out_size as i64, gy.out_size as i64);
    oh < h && h - oh > 2 * (w - ow)
}

fn check_box(b: CropBox, w: u32, h: u32) -> Result<(), ImageProblem> {
    let (top, left, height, width) = b;
    if u64::from(top) + u64::from(height) > u64::from(h)
        || u64::from(left) + u64::from(width) > u64::from(w)
    {
        return Err(problem(format!(
            "box {width}x{height} at ({left}, {top}) is outside the {w}x{h} image"
        )));
    }
    Ok(())
}

/// A fractional region `(left, top, width, height)` must be finite and lie inside the
/// `w` x `h` image (PIL: "box can't exceed original image size"), up to float noise.
/// Outside, the filter windows would index past the source rows.
fn check_region(r: (f64, f64, f64, f64), w: u32, h: u32) -> Result<(), ImageProblem> {
    if ![r.0, r.1, r.2, r.3].iter().all(|v| v.is_finite()) {
        return Err(problem(format!("region {r:?} is not finite")));
    }
    let eps = 1e-6 * f64::from(w.max(h).max(1));
    let (w, h) = (f64::from(w), f64::from(h));
    if r.0 < -eps || r.1 < -eps || r.0 + r.2 > w + eps || r.1 + r.3 > h + eps {
        return Err(problem(format!(
            "region {r:?} (left, top, width, height) exceeds the {w}x{h} image"
        )));
    }
    Ok(())
}

/// One output pixel of the horizontal pass: taps `min..min + k.len()` of the row at
/// byte `row` of `src`.
#[inline(always)]
fn h_pixel_scalar(src: &[u8], row: usize, min: usize, k: &[i32]) -> [u8; 3] {
    let px = &src[row + 3 * min..][..3 * k.len()];
    let mut acc = [HALF; 3];
    for (p, &c) in px.chunks_exact(3).zip(k) {
        for ch in 0..3 {
            acc[ch] = acc[ch].wrapping_add(i32::from(p[ch]).wrapping_mul(c));
        }
    }
    acc.map(clip8)
}

fn h_row_scalar(src: &[u8], row: usize, axis: &Axis, dst: &mut [u8]) {
    for (d, o) in dst.chunks_exact_mut(3).enumerate() {
        let (min, _) = axis.bounds[d];
        o.copy_from_slice(&h_pixel_scalar(src, row, min, axis.coeffs(d)));
    }
}

/// One output row of the vertical pass: `k.len()` rows from byte `first` of `src`,
/// `stride` apart.
fn v_row_scalar(
    src: &[u8],
    first: usize,
    stride: usize,
    k: &[i32],
    acc: &mut [i32],
    out: &mut [u8],
) {
    let n = out.len();
    acc.fill(HALF);
    for (j, &c) in k.iter().enumerate() {
        let row = &src[first + j * stride..][..n];
        for (a, &v) in acc.iter_mut().zip(row) {
            *a = a.wrapping_add(i32::from(v).wrapping_mul(c));
        }
    }
    for (o, &a) in out.iter_mut().zip(acc.iter()) {
        *o = clip8(a);
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{Axis, HALF, PRECISION_BITS, SPLIT, h_pixel_scalar, v_row_scalar};

    /// Rows per block of the horizontal pass (two per vector).
    const ROWS: usize = 8;

    /// `acc + madd(v, c)`: the AVX2 sequence.
    #[target_feature(enable = "avx2")]
    #[inline]
    fn dot_avx2(acc: __m256i, v: __m256i, c: __m256i) -> __m256i {
        _mm256_add_epi32(acc, _mm256_madd_epi16(v, c))
    }

    /// `acc + madd(v, c)` in one AVX-VNNI instruction (same result).
    #[target_feature(enable = "avx2,avxvnni")]
    #[inline]
    fn dot_vnni(acc: __m256i, v: __m256i, c: __m256i) -> __m256i {
        _mm256_dpwssd_avx_epi32(acc, v, c)
    }

    /// The horizontal pass kernels, once per instruction set.
    macro_rules! h_kernels {
        ($pass:ident, $block:ident, $features:literal, $dot:ident) => {
            /// The horizontal pass of source rows `rows` into consecutive `dst` rows, [`ROWS`]
            /// rows at a time (two per vector; a last partial block repeats its last row).
            #[target_feature(enable = $features)]
            pub(super) fn $pass(
                src: &[u8],
                stride: usize,
                rows: std::ops::Range<usize>,
                axis: &Axis,
                hk: &[[i16; 8]],
                steps: usize,
                dst: &mut [u8],
            ) {
                let row_len = axis.bounds.len() * 3;
                let mut r = rows.start;
                let mut o = 0;
                while r < rows.end {
                    let valid = (rows.end - r).min(ROWS);
                    let offs: [usize; ROWS] =
                        std::array::from_fn(|i| (r + i.min(valid - 1)) * stride);
                    let douts: [usize; ROWS] =
                        std::array::from_fn(|i| o + i.min(valid - 1) * row_len);
                    $block(src, offs, valid, axis, hk, steps, dst, douts);
                    r += valid;
                    o += valid * row_len;
                }
            }

            /// Rows at byte offsets `offs` (ascending) of `src` into `dst` at `douts`; only the
            /// first `valid` rows are stored.
            #[target_feature(enable = $features)]
            #[inline]
            #[allow(clippy::too_many_arguments)]
            fn $block(
                src: &[u8],
                offs: [usize; ROWS],
                valid: usize,
                axis: &Axis,
                hk: &[[i16; 8]],
                steps: usize,
                dst: &mut [u8],
                douts: [usize; ROWS],
            ) {
                const PAIRS: usize = ROWS / 2;
                // Per 128-bit lane (one row each): taps t, t+1 (bytes 0..6 of the load) as i16
                // channel pairs R R G G B B, then a zero pair.
                let mask = _mm256_setr_epi8(
                    0, -128, 3, -128, 1, -128, 4, -128, 2, -128, 5, -128, -128, -128, -128,
                    -128, //
                    0, -128, 3, -128, 1, -128, 4, -128, 2, -128, 5, -128, -128, -128, -128, -128,
                );
                let half = _mm256_set1_epi32(HALF);
                let last = offs[ROWS - 1];
                let count = axis.bounds.len();
                assert!(hk.len() >= count * steps * 2);
                assert!(douts[ROWS - 1] + 3 * count <= dst.len());
                let base = src.as_ptr();
                let out = dst.as_mut_ptr();
                for (d, &(min, n)) in axis.bounds.iter().enumerate() {
                    let sd = n.div_ceil(2);
                    // Each step loads 16 bytes from pixel `min + 2s`; near the end of the buffer
                    // (and for an empty window) fall back to the scalar pixel.
                    if n == 0 || last + 3 * (min + 2 * (sd - 1)) + 16 > src.len() {
                        let k = axis.coeffs(d);
                        for i in 0..valid {
                            let px = h_pixel_scalar(src, offs[i], min, k);
                            dst[douts[i] + 3 * d..][..3].copy_from_slice(&px);
                        }
                        continue;
                    }
                    let mut hi = [_mm256_setzero_si256(); PAIRS];
                    let mut lo = [_mm256_setzero_si256(); PAIRS];
                    // SAFETY: `hk` holds `steps >= sd` steps of two entries per output entry.
                    let ck = unsafe { hk.as_ptr().add(d * steps * 2) };
                    for st in 0..sd {
                        // SAFETY: as above; 16-byte entries.
                        let (ch, cl) = unsafe {
                            (
                                _mm256_broadcastsi128_si256(_mm_loadu_si128(ck.add(2 * st).cast())),
                                _mm256_broadcastsi128_si256(_mm_loadu_si128(
                                    ck.add(2 * st + 1).cast(),
                                )),
                            )
                        };
                        let at = 3 * (min + 2 * st);
                        for q in 0..PAIRS {
                            // SAFETY: `offs[i] + at + 16 <= src.len()` for every row (checked
                            // above for the largest offset and step).
                            let v = unsafe {
                                _mm256_loadu2_m128i(
                                    base.add(offs[2 * q + 1] + at).cast(),
                                    base.add(offs[2 * q] + at).cast(),
                                )
                            };
                            let v = _mm256_shuffle_epi8(v, mask);
                            hi[q] = $dot(hi[q], v, ch);
                            lo[q] = $dot(lo[q], v, cl);
                        }
                    }
                    let fin = |h, l| {
                        let t = _mm256_add_epi32(_mm256_slli_epi32::<{ SPLIT as i32 }>(h), l);
                        _mm256_srai_epi32::<{ PRECISION_BITS as i32 }>(_mm256_add_epi32(t, half))
                    };
                    let mut px = [0i32; ROWS];
                    for q in 0..PAIRS / 2 {
                        // Lane 0: rows 4q then 4q+2, lane 1: rows 4q+1 then 4q+3, as RGBx bytes.
                        let p = _mm256_packs_epi32(
                            fin(hi[2 * q], lo[2 * q]),
                            fin(hi[2 * q + 1], lo[2 * q + 1]),
                        );
                        let p = _mm256_packus_epi16(p, p);
                        let (q0, q1) =
                            (_mm256_castsi256_si128(p), _mm256_extracti128_si256::<1>(p));
                        px[4 * q] = _mm_cvtsi128_si32(q0);
                        px[4 * q + 1] = _mm_cvtsi128_si32(q1);
                        px[4 * q + 2] = _mm_extract_epi32::<1>(q0);
                        px[4 * q + 3] = _mm_extract_epi32::<1>(q1);
                    }
                    for i in 0..valid {
                        let bytes = px[i].to_le_bytes();
                        let at = douts[i] + 3 * d;
                        // SAFETY: `at + 3 <= dst.len()` (asserted above: `douts` ascend and each
                        // row holds `count` pixels); the fourth byte, written only before the
                        // row's last pixel, is the next pixel's first, written after this one.
                        unsafe {
                            if d + 1 < count {
                                out.add(at).cast::<[u8; 4]>().write_unaligned(bytes);
                            } else {
                                out.add(at)
                                    .cast::<[u8; 3]>()
                                    .write_unaligned([bytes[0], bytes[1], bytes[2]]);
                            }
                        }
                    }
                }
            }
        };
    }

    h_kernels!(h_pass, h_block, "avx2", dot_avx2);
    h_kernels!(h_pass_vnni, h_block_vnni, "avx2,avxvnni", dot_vnni);

    /// The vertical pass with AVX-VNNI (see [`super::Resizer::v_pass`]): rows are taken
    /// in pairs, their bytes interleaved into i16 pairs and
    /// multiplied with the pair's coefficients split into 16-bit halves (`madd`), 32
    /// output values at a time; the order of the i32 lanes stays that of the bytes.
    macro_rules! v_kernels {
        ($pass:ident, $features:literal, $dot:ident) => {
            #[target_feature(enable = $features)]
            #[allow(clippy::too_many_arguments)]
            pub(super) fn $pass(
                src: &[u8],
                base: usize,
                stride: usize,
                shift: usize,
                row_len: usize,
                axis: &Axis,
                out: &mut [u8],
            ) {
                let half = _mm256_set1_epi32(HALF);
                let zero = _mm256_setzero_si256();
                let mut acc = [0i32; 32];
                // Per pair of taps: (hi, lo) halves of (k_j, k_j+1) as i16 pairs.
                let mut pairs = [(zero, zero); 64];
                for (d, o) in out.chunks_exact_mut(row_len).enumerate() {
                    let (min, n) = axis.bounds[d];
                    let k = axis.coeffs(d);
                    let first = base + (min - shift) * stride;
                    if n == 0 || n > 2 * pairs.len() {
                        // No taps, or a kernel wider than 128 taps (a > 32x downscale):
                        // the scalar row, 32 values at a time.
                        for x in (0..row_len).step_by(32) {
                            let len = (row_len - x).min(32);
                            let o = &mut o[x..x + len];
                            v_row_scalar(src, first + x, stride, k, &mut acc[..len], o);
                        }
                        continue;
                    }
                    // Every row read lies inside `src`.
                    assert!(first + (n - 1) * stride + row_len <= src.len());
                    let np = n.div_ceil(2);
                    for (p, c) in pairs[..np].iter_mut().enumerate() {
                        let k0 = k[2 * p];
                        let k1 = if 2 * p + 1 < n { k[2 * p + 1] } else { 0 };
                        let pack = |a: i32, b: i32| (b << 16) | (a & 0xffff);
                        let (h0, h1) = (k0 >> SPLIT, k1 >> SPLIT);
                        let (l0, l1) = (k0 & ((1 << SPLIT) - 1), k1 & ((1 << SPLIT) - 1));
                        *c = (
                            _mm256_set1_epi32(pack(h0, h1)),
                            _mm256_set1_epi32(pack(l0, l1)),
                        );
                    }
                    let mut x = 0;
                    while x + 32 <= row_len {
                        let mut hi = [zero; 4];
                        let mut lo = [zero; 4];
                        for (p, &(ch, cl)) in pairs[..np].iter().enumerate() {
                            let j = 2 * p;
                            // The odd last tap pairs its row with itself (coefficient 0).
                            let j1 = if j + 1 < n { j + 1 } else { j };
                            // SAFETY: rows `first + j * stride` for `j < n` hold
                            // `row_len >= x + 32` bytes inside `src` (asserted above).
                            let (a, b) = unsafe {
                                (
                                    _mm256_loadu_si256(
                                        src.as_ptr().add(first + j * stride + x).cast(),
                                    ),
                                    _mm256_loadu_si256(
                                        src.as_ptr().add(first + j1 * stride + x).cast(),
                                    ),
                                )
                            };
                            let (a0, a1) =
                                (_mm256_unpacklo_epi8(a, zero), _mm256_unpackhi_epi8(a, zero));
                            let (b0, b1) =
                                (_mm256_unpacklo_epi8(b, zero), _mm256_unpackhi_epi8(b, zero));
                            let v = [
                                _mm256_unpacklo_epi16(a0, b0),
                                _mm256_unpackhi_epi16(a0, b0),
                                _mm256_unpacklo_epi16(a1, b1),
                                _mm256_unpackhi_epi16(a1, b1),
                            ];
                            for q in 0..4 {
                                hi[q] = $dot(hi[q], v[q], ch);
                                lo[q] = $dot(lo[q], v[q], cl);
                            }
                        }
                        let r: [__m256i; 4] = std::array::from_fn(|q| {
                            let t = _mm256_add_epi32(
                                _mm256_slli_epi32::<{ SPLIT as i32 }>(hi[q]),
                                lo[q],
                            );
                            _mm256_srai_epi32::<{ PRECISION_BITS as i32 }>(_mm256_add_epi32(
                                t, half,
                            ))
                        });
                        let b = _mm256_packus_epi16(
                            _mm256_packs_epi32(r[0], r[1]),
                            _mm256_packs_epi32(r[2], r[3]),
                        );
                        // SAFETY: `x + 32 <= row_len == o.len()`.
                        unsafe { _mm256_storeu_si256(o.as_mut_ptr().add(x).cast(), b) };
                        x += 32;
                    }
                    if x < row_len {
                        let n_tail = row_len - x;
                        v_row_scalar(src, first + x, stride, k, &mut acc[..n_tail], &mut o[x..]);
                    }
                }
            }
        };
    }

    v_kernels!(v_pass_vnni, "avx2,avxvnni", dot_vnni);

    /// The vertical pass (see [`super::Resizer::v_pass`]) without AVX-VNNI: 32-bit
    /// multiplies of zero-extended bytes (faster there than the `madd` pairs, whose
    /// extra shuffles the fused multiply-add of VNNI pays for).
    #[target_feature(enable = "avx2")]
    pub(super) fn v_pass(
        src: &[u8],
        base: usize,
        stride: usize,
        shift: usize,
        row_len: usize,
        axis: &Axis,
        out: &mut [u8],
    ) {
        let half = _mm256_set1_epi32(HALF);
        let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
        let mut acc = [0i32; 32];
        for (d, o) in out.chunks_exact_mut(row_len).enumerate() {
            let (min, n) = axis.bounds[d];
            let k = axis.coeffs(d);
            let first = base + (min - shift) * stride;
            if n > 0 {
                // Every row read lies inside `src`.
                assert!(first + (n - 1) * stride + row_len <= src.len());
            }
            let mut x = 0;
            while x + 32 <= row_len {
                let mut a = [half; 4];
                for (j, &c) in k.iter().enumerate() {
                    let kv = _mm256_set1_epi32(c);
                    // SAFETY: `first + j * stride + x + 32 <= src.len()` (asserted above).
                    let p = unsafe { src.as_ptr().add(first + j * stride + x) };
                    for (q, a) in a.iter_mut().enumerate() {
                        // SAFETY: as above, 8 bytes at `p + 8q`, `q < 4`.
                        let v = unsafe { _mm_loadl_epi64(p.add(8 * q).cast()) };
                        let v = _mm256_cvtepu8_epi32(v);
                        *a = _mm256_add_epi32(*a, _mm256_mullo_epi32(v, kv));
                    }
                }
                let a = a.map(|v| _mm256_srai_epi32::<{ PRECISION_BITS as i32 }>(v));
                let p01 = _mm256_packs_epi32(a[0], a[1]);
                let p23 = _mm256_packs_epi32(a[2], a[3]);
                let b = _mm256_permutevar8x32_epi32(_mm256_packus_epi16(p01, p23), order);
                // SAFETY: `x + 32 <= row_len == o.len()`.
                unsafe { _mm256_storeu_si256(o.as_mut_ptr().add(x).cast(), b) };
                x += 32;
            }
            if x < row_len {
                let n_tail = row_len - x;
                v_row_scalar(src, first + x, stride, k, &mut acc[..n_tail], &mut o[x..]);
            }
        }
    }
}

/// The `fast_image_resize` crop + resize this module used before (reference for tests and
/// benchmarks only; within a few levels of Pillow, not exact).
#[doc(hidden)]
pub mod fir {
    use super::{CropBox, check_len, problem};
    use crate::image::ImageProblem;
    use fast_image_resize as fr;
    use fr::images::{CroppedImage, Image, ImageRef};
    use fr::{FilterType, PixelType, ResizeAlg, ResizeOptions};

    /// The bicubic convolution used everywhere (PIL's `BICUBIC`, a = -0.5).
    const ALG: ResizeAlg = ResizeAlg::Convolution(FilterType::CatmullRom);

    /// The old `fast_image_resize` worker.
    #[derive(Debug, Clone, Default)]
    pub struct FirResizer {
        inner: fr::Resizer,
    }

    impl FirResizer {
        pub fn new() -> Self {
            Self::default()
        }

        /// Crops `crop = (top, left, height, width)` from the `src_w` x `src_h` RGB8 image
        /// `src` and resizes it to `out_w` x `out_h` into `out` (bicubic, crop-then-resize:
        /// only pixels inside the box contribute). `src` and `out` must be exactly
        /// `w * h * 3` bytes; the box must be non-empty and inside the image. A box of the
        /// output size is a plain copy.
        #[allow(clippy::too_many_arguments)]
        pub fn crop_resize(
            &mut self,
            src: &[u8],
            src_w: u32,
            src_h: u32,
            crop: CropBox,
            out: &mut [u8],
            out_w: u32,
            out_h: u32,
        ) -> Result<(), ImageProblem> {
            let (top, left, height, width) = crop;
            check_len("source", src.len(), src_w, src_h)?;
            check_len("output", out.len(), out_w, out_h)?;
            if width == 0 || height == 0 || out_w == 0 || out_h == 0 {
                return Err(problem(format!(
                    "empty crop {width}x{height} or output {out_w}x{out_h}"
                )));
            }
            let src_img = ImageRef::new(src_w, src_h, src, PixelType::U8x3).map_err(problem)?;
            let view = CroppedImage::new(&src_img, left, top, width, height).map_err(problem)?;
            let mut dst =
                Image::from_slice_u8(out_w, out_h, out, PixelType::U8x3).map_err(problem)?;
            let options = ResizeOptions::new().resize_alg(ALG);
            self.inner
                .resize(&view, &mut dst, &options)
                .map_err(problem)
        }

        /// Crop-then-resize of a fractional box: the integer box `view = (top, left, height,
        /// width)` of the `src_w` x `src_h` image is the only input (the filter never reads
        /// outside it, as in [`FirResizer::crop_resize`]), and within it the fractional region
        /// `(left, top, width, height)` (relative to the view) is resized to `out_w` x `out_h`.
        /// With the region equal to the whole view this is exactly
        /// [`FirResizer::crop_resize`]`(view)`. Used to resize a crop box mapped onto a DCT-scaled
        /// decode, where its edges fall between pixels.
        #[allow(clippy::too_many_arguments)]
        pub fn crop_resize_frac(
            &mut self,
            src: &[u8],
            src_w: u32,
            src_h: u32,
            view: CropBox,
            region: (f64, f64, f64, f64),
            out: &mut [u8],
            out_w: u32,
            out_h: u32,
        ) -> Result<(), ImageProblem> {
            let (top, left, height, width) = view;
            let (rl, rt, rw, rh) = region;
            check_len("source", src.len(), src_w, src_h)?;
            check_len("output", out.len(), out_w, out_h)?;
            if width == 0 || height == 0 || !(rw > 0.0 && rh > 0.0) || out_w == 0 || out_h == 0 {
                return Err(problem(format!(
                    "empty view {width}x{height}, region {rw}x{rh} or output {out_w}x{out_h}"
                )));
            }
            let src_img = ImageRef::new(src_w, src_h, src, PixelType::U8x3).map_err(problem)?;
            let view = CroppedImage::new(&src_img, left, top, width, height).map_err(problem)?;
            let mut dst =
                Image::from_slice_u8(out_w, out_h, out, PixelType::U8x3).map_err(problem)?;
            let options = ResizeOptions::new().resize_alg(ALG).crop(rl, rt, rw, rh);
            self.inner
                .resize(&view, &mut dst, &options)
                .map_err(problem)
        }

        /// Resizes the fractional source region `(left, top, width, height)` (pixels, may be
        /// non-integer) to `out_w` x `out_h` with PIL `resize(box=...)` semantics: the filter
        /// also reads source pixels just outside the region (clamped to the image).
        #[allow(clippy::too_many_arguments)]
        pub fn resize_region(
            &mut self,
            src: &[u8],
            src_w: u32,
            src_h: u32,
            region: (f64, f64, f64, f64),
            out: &mut [u8],
            out_w: u32,
            out_h: u32,
        ) -> Result<(), ImageProblem> {
            let (left, top, width, height) = region;
            check_len("source", src.len(), src_w, src_h)?;
            check_len("output", out.len(), out_w, out_h)?;
            if !(width > 0.0 && height > 0.0) || out_w == 0 || out_h == 0 {
                return Err(problem(format!(
                    "empty region {width}x{height} or output {out_w}x{out_h}"
                )));
            }
            let src_img = ImageRef::new(src_w, src_h, src, PixelType::U8x3).map_err(problem)?;
            let mut dst =
                Image::from_slice_u8(out_w, out_h, out, PixelType::U8x3).map_err(problem)?;
            let options = ResizeOptions::new()
                .resize_alg(ALG)
                .crop(left, top, width, height);
            self.inner
                .resize(&src_img, &mut dst, &options)
                .map_err(problem)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit;

    /// A literal transcription of Pillow's `ImagingResample` for RGB8 (`precompute_coeffs`,
    /// `normalize_coeffs_8bpc`, `ImagingResampleInner`), with Pillow 13's choice of the
    /// vertical pass first: one resize of the whole `w` x `h` image with
    /// `box = [x0, y0, x1, y1]` to `xsize` x `ysize`.
    #[allow(clippy::needless_range_loop)]
    fn pil_resample(
        src: &[u8],
        w: usize,
        h: usize,
        b: [f32; 4],
        xsize: usize,
        ysize: usize,
    ) -> Vec<u8> {
        fn filter(x: f64) -> f64 {
            let a = -0.5;
            let x = x.abs();
            if x < 1.0 {
                ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
            } else if x < 2.0 {
                (((x - 5.0) * x + 8.0) * x - 4.0) * a
            } else {
                0.0
            }
        }
        fn precompute(
            in_size: i32,
            in0: f32,
            in1: f32,
            out_size: usize,
        ) -> (usize, Vec<i32>, Vec<i32>) {
            let scale = (in1 - in0) as f64 / out_size as f64;
            let mut filterscale = scale;
            if filterscale < 1.0 {
                filterscale = 1.0;
            }
            let support = 2.0 * filterscale;
            let ksize = support.ceil() as usize * 2 + 1;
            let mut kk = vec![0f64; out_size * ksize];
            let mut bounds = vec![0i32; out_size * 2];
            for xx in 0..out_size {
                let center = in0 as f64 + (xx as f64 + 0.5) * scale;
                let mut ww = 0.0;
                let ss = 1.0 / filterscale;
                let mut xmin = (center - support + 0.5) as i32;
                if xmin < 0 {
                    xmin = 0;
                }
                let mut xmax = (center + support + 0.5) as i32;
                if xmax > in_size {
                    xmax = in_size;
                }
                xmax -= xmin;
                let k = &mut kk[xx * ksize..];
                for x in 0..xmax.max(0) as usize {
                    let wt = filter(((x as i32 + xmin) as f64 - center + 0.5) * ss);
                    k[x] = wt;
                    ww += wt;
                }
                for x in 0..xmax.max(0) as usize {
                    if ww != 0.0 {
                        k[x] /= ww;
                    }
                }
                bounds[xx * 2] = xmin;
                bounds[xx * 2 + 1] = xmax;
            }
            let k = kk
                .iter()
                .map(|&v| {
                    if v < 0.0 {
                        (-0.5 + v * (1 << 22) as f64) as i32
                    } else {
                        (0.5 + v * (1 << 22) as f64) as i32
                    }
                })
                .collect();
            (ksize, bounds, k)
        }
        let clip = |v: i32| (v >> 22).clamp(0, 255) as u8;
        let need_h = xsize != w || b[0] != 0.0 || b[2] != xsize as f32;
        let need_v = ysize != h || b[1] != 0.0 || b[3] != ysize as f32;
        if need_h && need_v && ysize < h && (h - ysize) as i64 > 2 * (w as i64 - xsize as i64) {
            // Pillow 13 (#9549): the vertical pass first, i.e. a vertical-only resize of
            // the box's rows, then a horizontal-only one of its columns.
            let v = pil_resample(src, w, h, [0.0, b[1], w as f32, b[3]], w, ysize);
            return pil_resample(&v, w, ysize, [b[0], 0.0, b[2], ysize as f32], xsize, ysize);
        }
        let (kv, mut bv, cv) = precompute(h as i32, b[1], b[3], ysize);
        let y_first = bv[0];
        let y_last = bv[ysize * 2 - 2] + bv[ysize * 2 - 1];
        let (mut img, mut iw, mut ih) = (src.to_vec(), w, h);
        if need_h {
            let (kh, bh, ch) = precompute(w as i32, b[0], b[2], xsize);
            for i in 0..ysize {
                bv[i * 2] -= y_first;
            }
            let rows = (y_last - y_first) as usize;
            let mut t = vec![0u8; xsize * rows * 3];
            for yy in 0..rows {
                for xx in 0..xsize {
                    let (xmin, xmax) = (bh[xx * 2] as usize, bh[xx * 2 + 1] as usize);
                    let k = &ch[xx * kh..];
                    let mut ss = [1i32 << 21; 3];
                    for x in 0..xmax {
                        for c in 0..3 {
                            ss[c] +=
                                i32::from(img[((yy + y_first as usize) * iw + x + xmin) * 3 + c])
                                    * k[x];
                        }
                    }
                    for c in 0..3 {
                        t[(yy * xsize + xx) * 3 + c] = clip(ss[c]);
                    }
                }
            }
            (img, iw, ih) = (t, xsize, rows);
        }
        if need_v {
            let mut o = vec![0u8; iw * ysize * 3];
            for yy in 0..ysize {
                let k = &cv[yy * kv..];
                let (ymin, ymax) = (bv[yy * 2] as usize, bv[yy * 2 + 1] as usize);
                for xx in 0..iw {
                    let mut ss = [1i32 << 21; 3];
                    for y in 0..ymax {
                        for c in 0..3 {
                            ss[c] += i32::from(img[((y + ymin) * iw + xx) * 3 + c]) * k[y];
                        }
                    }
                    for c in 0..3 {
                        o[(yy * iw + xx) * 3 + c] = clip(ss[c]);
                    }
                }
            }
            (img, ih) = (o, ysize);
        }
        assert_eq!(img.len(), iw * ih * 3);
        img
    }

    /// PIL `img.crop((left, top, left + width, top + height))`.
    fn pil_crop(src: &[u8], w: usize, b: (usize, usize, usize, usize)) -> Vec<u8> {
        let (top, left, height, width) = b;
        let mut out = Vec::with_capacity(width * height * 3);
        for y in top..top + height {
            out.extend_from_slice(&src[(y * w + left) * 3..(y * w + left + width) * 3]);
        }
        out
    }

    fn flipped(mut v: Vec<u8>, w: usize, h: usize) -> Vec<u8> {
        crate::augment::color::hflip(&mut v, w, h);
        v
    }

    /// Small deterministic generator for the random geometries.
    struct Lcg(u64);
    impl Lcg {
        fn below(&mut self, n: u64) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (self.0 >> 33) % n
        }
    }

    /// High-contrast content (saturated edges and noise), where intermediate rounding and
    /// clamping differences show most.
    fn harsh_pixels(w: u32, h: u32, seed: u64) -> Vec<u8> {
        let mut g = Lcg(seed);
        let mut px = testkit::photo_pixels(w, h, seed);
        for (i, v) in px.iter_mut().enumerate() {
            let x = (i / 3) % w as usize;
            let y = (i / 3) / w as usize;
            if (x / 7 + y / 5).is_multiple_of(3) {
                *v = if (x + y).is_multiple_of(2) { 255 } else { 0 };
            } else if g.below(8) == 0 {
                *v = g.below(256) as u8;
            }
        }
        px
    }

    #[test]
    fn crop_resize_is_pillow_exactly() {
        let mut g = Lcg(7);
        let (mut simd, mut portable) = (Resizer::new(), Resizer::portable());
        for case in 0..160u64 {
            let (w, h) = (20 + g.below(300) as u32, 20 + g.below(300) as u32);
            let src = if case % 2 == 0 {
                harsh_pixels(w, h, case)
            } else {
                testkit::photo_pixels(w, h, case)
            };
            let cw = 1 + g.below(u64::from(w)) as u32;
            let ch = 1 + g.below(u64::from(h)) as u32;
            let left = g.below(u64::from(w - cw + 1)) as u32;
            let top = g.below(u64::from(h - ch + 1)) as u32;
            let (ow, oh) = match case % 4 {
                0 => (224, 224),
                1 => (1 + g.below(64) as u32, 1 + g.below(64) as u32),
                2 => (cw, 1 + g.below(300) as u32),
                _ => (1 + g.below(300) as u32, ch),
            };
            let c = (top as usize, left as usize, ch as usize, cw as usize);
            let expect = pil_resample(
                &pil_crop(&src, w as usize, c),
                cw as usize,
                ch as usize,
                [0.0, 0.0, cw as f32, ch as f32],
                ow as usize,
                oh as usize,
            );
            let expect_flip = flipped(expect.clone(), ow as usize, oh as usize);
            let mut out = vec![0u8; (ow * oh * 3) as usize];
            for r in [&mut simd, &mut portable] {
                for (flip, want) in [(false, &expect), (true, &expect_flip)] {
                    out.fill(7);
                    r.crop_resize_flip(&src, w, h, (top, left, ch, cw), flip, &mut out, ow, oh)
                        .unwrap();
                    assert!(
                        out == *want,
                        "case {case}: {w}x{h} crop {cw}x{ch}+{left}+{top} -> {ow}x{oh}, flip {flip}, portable {}",
                        r.portable
                    );
                }
            }
        }
    }

    #[test]
    fn boxes_and_windows_are_pillow_exactly() {
        let mut g = Lcg(11);
        let (mut simd, mut portable) = (Resizer::new(), Resizer::portable());
        for case in 0..80u64 {
            let (w, h) = (16 + g.below(200) as u32, 16 + g.below(200) as u32);
            let src = harsh_pixels(w, h, 100 + case);
            // A fractional box (PIL `resize(box=...)`).
            let bw = 1.0 + g.below(u64::from(w) * 8 - 8) as f64 / 8.0;
            let bh = 1.0 + g.below(u64::from(h) * 8 - 8) as f64 / 8.0;
            let bl = g.below(((f64::from(w) - bw) * 4.0) as u64 + 1) as f64 / 4.0;
            let bt = g.below(((f64::from(h) - bh) * 4.0) as u64 + 1) as f64 / 4.0;
            let (ow, oh) = (1 + g.below(120) as u32, 1 + g.below(120) as u32);
            let b = [bl as f32, bt as f32, (bl + bw) as f32, (bt + bh) as f32];
            let expect = pil_resample(&src, w as usize, h as usize, b, ow as usize, oh as usize);
            let mut out = vec![0u8; (ow * oh * 3) as usize];
            for r in [&mut simd, &mut portable] {
                r.resize_region(&src, w, h, (bl, bt, bw, bh), &mut out, ow, oh)
                    .unwrap();
                assert!(out == expect, "region case {case}");
                // The same box inside a view = the view resized with that box.
                let view = (
                    1u32.min(h - 1),
                    2u32.min(w - 1),
                    h - 1u32.min(h - 1),
                    w - 2u32.min(w - 1),
                );
                let (vt, vl, vh, vw) = view;
                let vsrc = pil_crop(
                    &src,
                    w as usize,
                    (vt as usize, vl as usize, vh as usize, vw as usize),
                );
                let rb = (
                    bl.min(f64::from(vw) - 1.0),
                    bt.min(f64::from(vh) - 1.0),
                    1.0f64.max(bw.min(f64::from(vw) - bl.min(f64::from(vw) - 1.0))),
                    1.0f64.max(bh.min(f64::from(vh) - bt.min(f64::from(vh) - 1.0))),
                );
                let vb = [
                    rb.0 as f32,
                    rb.1 as f32,
                    (rb.0 + rb.2) as f32,
                    (rb.1 + rb.3) as f32,
                ];
                let expect = pil_resample(
                    &vsrc,
                    vw as usize,
                    vh as usize,
                    vb,
                    ow as usize,
                    oh as usize,
                );
                for flip in [false, true] {
                    r.crop_resize_frac(&src, w, h, view, rb, flip, &mut out, ow, oh)
                        .unwrap();
                    let want = if flip {
                        flipped(expect.clone(), ow as usize, oh as usize)
                    } else {
                        expect.clone()
                    };
                    assert!(out == want, "frac case {case}, flip {flip}");
                }
            }
            // A full resize, then a window of its output (Resize + CenterCrop).
            let (fw, fh) = (1 + g.below(300) as u32, 1 + g.below(300) as u32);
            let full = pil_resample(
                &src,
                w as usize,
                h as usize,
                [0.0, 0.0, w as f32, h as f32],
                fw as usize,
                fh as usize,
            );
            let (cw, ch) = (
                1 + g.below(u64::from(fw)) as u32,
                1 + g.below(u64::from(fh)) as u32,
            );
            let (cl, ct) = (
                g.below(u64::from(fw - cw + 1)) as u32,
                g.below(u64::from(fh - ch + 1)) as u32,
            );
            let expect = pil_crop(
                &full,
                fw as usize,
                (ct as usize, cl as usize, ch as usize, cw as usize),
            );
            let mut out = vec![0u8; (cw * ch * 3) as usize];
            for r in [&mut simd, &mut portable] {
                r.resize_window(&src, w, h, (fw, fh), (cl, ct), &mut out, cw, ch)
                    .unwrap();
                assert!(
                    out == expect,
                    "window case {case}: {w}x{h} -> {fw}x{fh}, {cw}x{ch}+{cl}+{ct}"
                );
            }
        }
    }

    #[test]
    fn large_downscales_are_pillow_exactly() {
        // Wide kernels (many steps; over 128 taps), and the last rows of the buffer.
        let (w, h) = (1500u32, 900u32);
        let src = harsh_pixels(w, h, 3);
        for (crop, ow, oh) in [
            ((0, 0, 900, 1500), 224, 224),
            ((850, 1400, 50, 100), 7, 5),
            ((0, 0, 900, 1500), 13, 300),
            ((0, 0, 900, 1500), 40, 6),
        ] {
            let (t, l, ch, cw) = crop;
            let expect = pil_resample(
                &pil_crop(
                    &src,
                    w as usize,
                    (t as usize, l as usize, ch as usize, cw as usize),
                ),
                cw as usize,
                ch as usize,
                [0.0, 0.0, cw as f32, ch as f32],
                ow,
                oh,
            );
            let mut out = vec![0u8; ow * oh * 3];
            for mut r in [Resizer::new(), Resizer::portable()] {
                r.crop_resize(&src, w, h, crop, &mut out, ow as u32, oh as u32)
                    .unwrap();
                assert!(out == expect, "{crop:?} -> {ow}x{oh}");
            }
        }
    }

    /// Crop + resize (+ flip) to 224 over the RandomResizedCrop distribution on 500x375
    /// sources: the Pillow port (AVX2, portable) against the old `fast_image_resize`
    /// path plus a separate flip. `CONMIM_BENCH_ITERS` calls per variant (default 2000).
    #[test]
    #[ignore]
    fn bench_crop_resize() {
        use crate::augment::params::ConMimParams;
        use std::time::Instant;
        let iters: u64 = std::env::var("CONMIM_BENCH_ITERS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(2000);
        let only = std::env::var("CONMIM_BENCH_ONLY").unwrap_or_default();
        let srcs: Vec<(Vec<u8>, u32, u32)> = [(500u32, 375u32), (375, 500), (500, 333)]
            .iter()
            .enumerate()
            .map(|(i, &(w, h))| (testkit::photo_pixels(w, h, i as u64), w, h))
            .collect();
        let mut out = vec![0u8; 224 * 224 * 3];
        for variant in ["new", "portable", "old"] {
            if !only.is_empty() && only != variant {
                continue;
            }
            let mut r = if variant == "portable" {
                Resizer::portable()
            } else {
                Resizer::new()
            };
            let mut old = fir::FirResizer::new();
            let mut run = |i: u64| {
                let (src, w, h) = &srcs[i as usize % srcs.len()];
                let p = ConMimParams::sample(0, 0, i, *w, *h);
                let c = (p.crop.top, p.crop.left, p.crop.height, p.crop.width);
                if variant == "old" {
                    old.crop_resize(src, *w, *h, c, &mut out, 224, 224).unwrap();
                    if p.flip {
                        crate::augment::color::hflip(&mut out, 224, 224);
                    }
                } else {
                    r.crop_resize_flip(src, *w, *h, c, p.flip, &mut out, 224, 224)
                        .unwrap();
                }
            };
            for i in 0..50 {
                run(i);
            }
            let t = Instant::now();
            for i in 0..iters {
                run(i);
            }
            let us = t.elapsed().as_secs_f64() * 1e6 / iters as f64;
            println!("{variant:<10} {us:8.1} us per 224x224 view");
        }
    }

    /// Whether the resize slows the decode that follows it (cache or frequency effects):
    /// per variant, decode a JPEG then crop + resize it, timing the two separately.
    #[test]
    #[ignore]
    fn bench_decode_after_resize() {
        use crate::augment::params::ConMimParams;
        use crate::image::pixels::Decoder;
        use std::time::{Duration, Instant};
        let lim = crate::image::ImageLimits::default();
        let jpegs: Vec<Vec<u8>> = (0..4u64)
            .map(|i| testkit::jpeg(&testkit::JpegSpec::rgb(500, 375, i)))
            .collect();
        let mut out = vec![0u8; 224 * 224 * 3];
        for round in 0..3 {
            for variant in ["new", "old", "portable", "none"] {
                let mut d = Decoder::new();
                let mut r = if variant == "portable" {
                    Resizer::portable()
                } else {
                    Resizer::new()
                };
                let mut old = fir::FirResizer::new();
                let (mut td, mut tr) = (Duration::ZERO, Duration::ZERO);
                for i in 0..600u64 {
                    let t0 = Instant::now();
                    let (w, h) = d.decode_rgb(&jpegs[i as usize % 4], &lim).unwrap();
                    let t1 = Instant::now();
                    let p = ConMimParams::sample(0, 0, i, w, h);
                    let c = (p.crop.top, p.crop.left, p.crop.height, p.crop.width);
                    if variant == "none" {
                    } else if variant == "old" {
                        old.crop_resize(d.rgb(), w, h, c, &mut out, 224, 224)
                            .unwrap();
                        if p.flip {
                            crate::augment::color::hflip(&mut out, 224, 224);
                        }
                    } else {
                        r.crop_resize_flip(d.rgb(), w, h, c, p.flip, &mut out, 224, 224)
                            .unwrap();
                    }
                    if i >= 100 {
                        td += t1 - t0;
                        tr += t1.elapsed();
                    }
                }
                println!(
                    "round {round} {variant}: decode {:.1} us, resize {:.1} us",
                    td.as_secs_f64() * 2e3,
                    tr.as_secs_f64() * 2e3
                );
            }
        }
    }

    #[test]
    fn old_fast_image_resize_path_is_close() {
        let (w, h) = (320u32, 240u32);
        let src = testkit::photo_pixels(w, h, 9);
        let (mut new, mut old) = (Resizer::new(), fir::FirResizer::new());
        let (mut a, mut b) = (vec![0u8; 224 * 224 * 3], vec![0u8; 224 * 224 * 3]);
        new.crop_resize(&src, w, h, (10, 20, 200, 290), &mut a, 224, 224)
            .unwrap();
        old.crop_resize(&src, w, h, (10, 20, 200, 290), &mut b, 224, 224)
            .unwrap();
        let max = a.iter().zip(&b).map(|(x, y)| x.abs_diff(*y)).max().unwrap();
        assert!(max <= 16, "max diff {max}");
    }

    #[test]
    fn constant_colour_stays_constant() {
        let (w, h) = (57, 41);
        let src: Vec<u8> = [10u8, 200, 77].repeat(w * h);
        let mut r = Resizer::new();
        for (crop, ow, oh) in [
            ((0, 0, 41, 57), 224, 224),
            ((5, 7, 20, 30), 13, 9),
            ((3, 2, 38, 55), 57, 41),
        ] {
            let mut out = vec![0u8; ow * oh * 3];
            r.crop_resize(
                &src, w as u32, h as u32, crop, &mut out, ow as u32, oh as u32,
            )
            .unwrap();
            assert!(out.chunks_exact(3).all(|p| p == [10, 200, 77]), "{crop:?}");
            r.resize_region(
                &src,
                w as u32,
                h as u32,
                (1.5, 2.25, 40.0, 30.5),
                &mut out,
                ow as u32,
                oh as u32,
            )
            .unwrap();
            assert!(out.chunks_exact(3).all(|p| p == [10, 200, 77]), "{crop:?}");
        }
    }

    #[test]
    fn identity_and_same_size_crop_copy() {
        let (w, h) = (33u32, 21u32);
        let src = testkit::photo_pixels(w, h, 3);
        let mut r = Resizer::new();
        let mut out = vec![0u8; src.len()];
        r.crop_resize(&src, w, h, (0, 0, h, w), &mut out, w, h)
            .unwrap();
        assert_eq!(out, src);
        // A same-size crop is a copy of the box.
        let mut small = vec![0u8; 10 * 5 * 3];
        r.crop_resize(&src, w, h, (4, 6, 5, 10), &mut small, 10, 5)
            .unwrap();
        for row in 0..5usize {
            let s = ((4 + row) * w as usize + 6) * 3;
            assert_eq!(&small[row * 30..row * 30 + 30], &src[s..s + 30]);
        }
    }

    #[test]
    fn fractional_crop_of_a_whole_view_is_crop_resize() {
        let (w, h) = (61u32, 47u32);
        let src = testkit::photo_pixels(w, h, 5);
        let mut r = Resizer::new();
        let view = (3, 5, 40, 50);
        let (mut a, mut b) = (vec![0u8; 19 * 23 * 3], vec![0u8; 19 * 23 * 3]);
        r.crop_resize(&src, w, h, view, &mut a, 19, 23).unwrap();
        r.crop_resize_frac(
            &src,
            w,
            h,
            view,
            (0.0, 0.0, 50.0, 40.0),
            false,
            &mut b,
            19,
            23,
        )
        .unwrap();
        assert_eq!(a, b);
        // A fractional region inside the view differs, and never reads outside the view:
        // a view over a black half stays black whatever the region.
        let mut half = vec![0u8; (w * h * 3) as usize];
        for y in 0..h as usize {
            for x in 30..w as usize {
                half[(y * w as usize + x) * 3..][..3].copy_from_slice(&[255; 3]);
            }
        }
        r.crop_resize_frac(
            &half,
            w,
            h,
            (0, 0, h, 30),
            (0.5, 0.25, 29.25, 40.5),
            false,
            &mut b,
            19,
            23,
        )
        .unwrap();
        assert!(b.iter().all(|&v| v == 0));
        r.crop_resize_frac(
            &src,
            w,
            h,
            view,
            (0.5, 0.25, 49.25, 39.5),
            false,
            &mut b,
            19,
            23,
        )
        .unwrap();
        assert_ne!(a, b);
        assert!(
            r.crop_resize_frac(
                &src,
                w,
                h,
                view,
                (0.0, 0.0, 0.0, 39.5),
                false,
                &mut b,
                19,
                23
            )
            .is_err()
        );
    }

    #[test]
    fn crop_does_not_read_outside_the_box() {
        // Left half black, right half white; a crop of the left half must stay black.
        let (w, h) = (40u32, 20u32);
        let mut src = vec![0u8; (w * h * 3) as usize];
        for y in 0..h as usize {
            for x in 20..w as usize {
                src[(y * w as usize + x) * 3..][..3].copy_from_slice(&[255; 3]);
            }
        }
        let mut r = Resizer::new();
        let mut out = vec![1u8; 7 * 7 * 3];
        r.crop_resize(&src, w, h, (0, 0, 20, 20), &mut out, 7, 7)
            .unwrap();
        assert!(out.iter().all(|&v| v == 0));
    }

    #[test]
    fn bad_arguments_are_errors() {
        let src = vec![0u8; 10 * 10 * 3];
        let mut out = vec![0u8; 4 * 4 * 3];
        let mut r = Resizer::new();
        assert!(
            r.crop_resize(&src, 10, 10, (5, 5, 6, 2), &mut out, 4, 4)
                .is_err()
        );
        assert!(
            r.crop_resize(&src, 10, 10, (0, 0, 0, 2), &mut out, 4, 4)
                .is_err()
        );
        assert!(
            r.crop_resize(&src, 10, 9, (0, 0, 2, 2), &mut out, 4, 4)
                .is_err()
        );
        assert!(
            r.crop_resize(&src, 10, 10, (0, 0, 2, 2), &mut out, 4, 5)
                .is_err()
        );
        // Fractional regions past the image (or the view) are errors, not a panic on
        // rows past the source (PIL: "box can't exceed original image size").
        for region in [
            (0.0, 0.0, 20.0, 30.0),
            (-0.5, 0.0, 4.0, 4.0),
            (7.5, 0.0, 3.0, 2.0),
        ] {
            let err = r.resize_region(&src, 10, 10, region, &mut out, 4, 4);
            assert!(err.is_err(), "{region:?}");
        }
        r.resize_region(&src, 10, 10, (0.5, 0.25, 9.5, 9.75), &mut out, 4, 4)
            .unwrap();
        let view = (2, 2, 6, 6);
        assert!(
            r.crop_resize_frac(
                &src,
                10,
                10,
                view,
                (1.0, 0.0, 5.5, 2.0),
                false,
                &mut out,
                4,
                4
            )
            .is_err()
        );
        r.crop_resize_frac(
            &src,
            10,
            10,
            view,
            (1.0, 0.0, 5.0, 6.0),
            false,
            &mut out,
            4,
            4,
        )
        .unwrap();
    }
}
