//! Crop + resize of interleaved RGB8 images with `fast_image_resize`, reusing the
//! resizer's internal buffers across calls (no per-call allocation once warm).
//!
//! Filter: bicubic convolution with `FilterType::CatmullRom`, whose kernel uses
//! `a = -0.5`: the same kernel as PIL's `Image.BICUBIC`, which is what torchvision's
//! `RandomResizedCrop(..., interpolation=BICUBIC)` and `Resize(256, BICUBIC)` call on the
//! PIL images the official ConMIM code loads. (Torchvision's *tensor* bicubic path uses
//! `a = -0.75`, as OpenCV does; that path is not the one the reference pipeline takes.)
//! Like PIL, the kernel is widened by the scale factor when downscaling (antialiasing).
//!
//! Two cropping semantics, both without copying the source region:
//! * [`Resizer::crop_resize`] (an integer box): torchvision's `resized_crop` = crop, then
//!   resize; the filter never reads pixels outside the box (a zero-copy sub-view).
//! * [`Resizer::resize_region`] (a fractional box via `ResizeOptions::crop`): PIL's
//!   `resize(box=...)`; the filter may read pixels just outside the box, which makes it
//!   exactly "resize the whole image, then crop the output" (used by the eval transform).

use fast_image_resize as fr;
use fr::images::{CroppedImage, Image, ImageRef};
use fr::{FilterType, PixelType, ResizeAlg, ResizeOptions};

use super::ImageProblem;

/// The bicubic convolution used everywhere (PIL's `BICUBIC`, a = -0.5).
const ALG: ResizeAlg = ResizeAlg::Convolution(FilterType::CatmullRom);

/// A crop rectangle in pixels: rows `top..top + height`, columns `left..left + width`.
pub type CropBox = (u32, u32, u32, u32);

/// Reusable RGB8 crop-and-resize worker (one per thread).
#[derive(Debug, Clone, Default)]
pub struct Resizer {
    inner: fr::Resizer,
}

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

impl Resizer {
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
        let mut dst = Image::from_slice_u8(out_w, out_h, out, PixelType::U8x3).map_err(problem)?;
        let options = ResizeOptions::new().resize_alg(ALG);
        self.inner
            .resize(&view, &mut dst, &options)
            .map_err(problem)
    }

    /// Crop-then-resize of a fractional box: the integer box `view = (top, left, height,
    /// width)` of the `src_w` x `src_h` image is the only input (the filter never reads
    /// outside it, as in [`Resizer::crop_resize`]), and within it the fractional region
    /// `(left, top, width, height)` (relative to the view) is resized to `out_w` x `out_h`.
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
        let mut dst = Image::from_slice_u8(out_w, out_h, out, PixelType::U8x3).map_err(problem)?;
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
        let mut dst = Image::from_slice_u8(out_w, out_h, out, PixelType::U8x3).map_err(problem)?;
        let options = ResizeOptions::new()
            .resize_alg(ALG)
            .crop(left, top, width, height);
        self.inner
            .resize(&src_img, &mut dst, &options)
            .map_err(problem)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit;

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
        r.crop_resize_frac(&src, w, h, view, (0.0, 0.0, 50.0, 40.0), &mut b, 19, 23)
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
            &mut b,
            19,
            23,
        )
        .unwrap();
        assert!(b.iter().all(|&v| v == 0));
        r.crop_resize_frac(&src, w, h, view, (0.5, 0.25, 49.25, 39.5), &mut b, 19, 23)
            .unwrap();
        assert_ne!(a, b);
        assert!(
            r.crop_resize_frac(&src, w, h, view, (0.0, 0.0, 0.0, 39.5), &mut b, 19, 23)
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
    }
}
