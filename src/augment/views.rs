//! The pixel half of a ConMIM sample: decode once, crop + resize once, then derive the
//! two views (student "weak" = crop + flip; teacher "strong" = the same pixels plus
//! [`color::apply_strong`]). Also the evaluation transform (resize 256, centre crop 224).
//!
//! A [`ViewMaker`] owns every buffer it needs (decoded pixels, the resizer's internal
//! buffers, the blur scratch) and callers pass the output slices, so a worker that keeps
//! its `ViewMaker` allocates nothing for outputs in steady state (JPEG; the `image` crate
//! path for other formats and zune's internal decoder state still allocate per image).
//!
//! Geometry follows the order in [`ConMimParams`]: the crop box is applied to the
//! decoded image, then the `size` x `size` result is flipped. Torchvision's official
//! pipeline flips the whole image before `RandomResizedCrop`; since the crop sampler is
//! symmetric in `left`, both orders give the same distribution of views.

use std::time::{Duration, Instant};

use crate::augment::color;
use crate::augment::params::ConMimParams;
use crate::image::pixels::Decoder;
use crate::image::resize::Resizer;
use crate::image::{ImageLimits, ImageProblem};

/// Time a [`ViewMaker`] spent per stage, summed over its calls (for the loader's
/// per-stage breakdown).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct StageTimes {
    /// Decoding to RGB8 (including header parsing).
    pub decode: Duration,
    /// Crop + resize (and the flip).
    pub resize: Duration,
    /// The strong view's photometric ops (and the copy from the weak view).
    pub strong: Duration,
}

impl StageTimes {
    /// Adds `other` to `self`.
    pub fn add(&mut self, other: &StageTimes) {
        self.decode += other.decode;
        self.resize += other.resize;
        self.strong += other.strong;
    }
}

/// Reusable per-worker state for building views.
#[derive(Debug, Default)]
pub struct ViewMaker {
    decoder: Decoder,
    resizer: Resizer,
    /// Gaussian-blur scratch for [`color::apply_strong`].
    scratch: Vec<f32>,
    times: StageTimes,
}

fn check_out(what: &str, len: usize, w: u32, h: u32) -> Result<(), ImageProblem> {
    let need = w as usize * h as usize * 3;
    if len != need || need == 0 {
        return Err(ImageProblem::Decode(format!(
            "{what} buffer has {len} bytes, a {w}x{h} RGB view needs {need} (non-zero)"
        )));
    }
    Ok(())
}

/// Python's `int(round(x))` for non-negative `x` (half to even).
fn py_round(x: f64) -> u32 {
    x.round_ties_even().max(0.0) as u32
}

impl ViewMaker {
    pub fn new() -> Self {
        Self::default()
    }

    /// Time spent per stage since the last [`ViewMaker::take_times`].
    pub fn times(&self) -> StageTimes {
        self.times
    }

    /// Returns the stage times and resets them to zero.
    pub fn take_times(&mut self) -> StageTimes {
        std::mem::take(&mut self.times)
    }

    /// The decoder (and its last decoded image).
    pub fn decoder(&self) -> &Decoder {
        &self.decoder
    }

    /// Builds one ConMIM training pair from encoded `bytes`.
    ///
    /// Decodes to RGB8, samples [`ConMimParams::sample`]`(seed, epoch, sample, w, h)`,
    /// crops `params.crop` and resizes it (bicubic, PIL's kernel) to `size` x `size`
    /// into `weak`, flips it if `params.flip`, copies it to `strong` and applies
    /// [`color::apply_strong`] there. `weak` and `strong` must each hold
    /// `size * size * 3` bytes. Returns the parameters used.
    #[allow(clippy::too_many_arguments)]
    pub fn conmim_pair(
        &mut self,
        bytes: &[u8],
        limits: &ImageLimits,
        seed: u64,
        epoch: u64,
        sample: u64,
        size: u32,
        weak: &mut [u8],
        strong: &mut [u8],
    ) -> Result<ConMimParams, ImageProblem> {
        check_out("weak", weak.len(), size, size)?;
        check_out("strong", strong.len(), size, size)?;
        let t0 = Instant::now();
        let decoded = self.decoder.decode_rgb(bytes, limits);
        let t1 = Instant::now();
        self.times.decode += t1 - t0;
        let (w, h) = decoded?;
        let params = ConMimParams::sample(seed, epoch, sample, w, h);
        let c = params.crop;
        self.resizer.crop_resize(
            self.decoder.rgb(),
            w,
            h,
            (c.top, c.left, c.height, c.width),
            weak,
            size,
            size,
        )?;
        let side = size as usize;
        if params.flip {
            color::hflip(weak, side, side);
        }
        let t2 = Instant::now();
        self.times.resize += t2 - t1;
        strong.copy_from_slice(weak);
        color::apply_strong(&params.strong, strong, side, side, &mut self.scratch);
        self.times.strong += t2.elapsed();
        Ok(params)
    }

    /// The single-view training transform of classification: the same shared crop and
    /// flip as [`ViewMaker::conmim_pair`] (so `out` equals that pair's weak view for the
    /// same `(seed, epoch, sample)`), without the strong ops. `out` holds
    /// `size * size * 3` bytes.
    #[allow(clippy::too_many_arguments)]
    pub fn train_view(
        &mut self,
        bytes: &[u8],
        limits: &ImageLimits,
        seed: u64,
        epoch: u64,
        sample: u64,
        size: u32,
        out: &mut [u8],
    ) -> Result<ConMimParams, ImageProblem> {
        check_out("train", out.len(), size, size)?;
        let t0 = Instant::now();
        let decoded = self.decoder.decode_rgb(bytes, limits);
        let t1 = Instant::now();
        self.times.decode += t1 - t0;
        let (w, h) = decoded?;
        let params = ConMimParams::sample(seed, epoch, sample, w, h);
        let c = params.crop;
        self.resizer.crop_resize(
            self.decoder.rgb(),
            w,
            h,
            (c.top, c.left, c.height, c.width),
            out,
            size,
            size,
        )?;
        if params.flip {
            color::hflip(out, size as usize, size as usize);
        }
        self.times.resize += t1.elapsed();
        Ok(params)
    }

    /// The evaluation transform: torchvision `Resize(resize_short, BICUBIC)` (shorter side
    /// to `resize_short`, longer side `int(resize_short * long / short)`) then
    /// `CenterCrop(crop)` (offsets `int(round((side - crop) / 2))`), computed as one
    /// resize of the matching fractional source region (PIL `box` semantics, so the
    /// result equals resizing the whole image and then cropping). `out` holds
    /// `crop * crop * 3` bytes; `crop <= resize_short` is required.
    pub fn eval_view(
        &mut self,
        bytes: &[u8],
        limits: &ImageLimits,
        resize_short: u32,
        crop: u32,
        out: &mut [u8],
    ) -> Result<(), ImageProblem> {
        check_out("eval", out.len(), crop, crop)?;
        if crop > resize_short {
            return Err(ImageProblem::Decode(format!(
                "centre crop {crop} is larger than the resized shorter side {resize_short}"
            )));
        }
        let t0 = Instant::now();
        let decoded = self.decoder.decode_rgb(bytes, limits);
        let t1 = Instant::now();
        self.times.decode += t1 - t0;
        let (w, h) = decoded?;
        let (rw, rh) = eval_resized_size(w, h, resize_short);
        let top = py_round(f64::from(rh - crop) / 2.0);
        let left = py_round(f64::from(rw - crop) / 2.0);
        let sx = f64::from(w) / f64::from(rw);
        let sy = f64::from(h) / f64::from(rh);
        let region = (
            f64::from(left) * sx,
            f64::from(top) * sy,
            f64::from(crop) * sx,
            f64::from(crop) * sy,
        );
        let r = self
            .resizer
            .resize_region(self.decoder.rgb(), w, h, region, out, crop, crop);
        self.times.resize += t1.elapsed();
        r
    }
}

/// Torchvision's `Resize(size)` output for an int `size`: shorter side `size`, longer
/// side `int(size * long / short)`.
fn eval_resized_size(w: u32, h: u32, size: u32) -> (u32, u32) {
    let long_of = |long: u32, short: u32| -> u32 {
        ((u64::from(size) * u64::from(long)) / u64::from(short)) as u32
    };
    if w <= h {
        (size, long_of(h, w))
    } else {
        (long_of(w, h), size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::augment::params::StrongParams;
    use crate::testkit::{self, JpegSpec};

    fn limits() -> ImageLimits {
        ImageLimits::default()
    }

    #[test]
    fn weak_view_is_crop_resize_then_flip() {
        let bytes = testkit::jpeg(&JpegSpec::rgb(90, 70, 3));
        let size = 32u32;
        let n = (size * size * 3) as usize;
        let mut vm = ViewMaker::new();
        let mut flips = [false; 2];
        for sample in 0..12 {
            let (mut weak, mut strong) = (vec![0u8; n], vec![0u8; n]);
            let p = vm
                .conmim_pair(
                    &bytes,
                    &limits(),
                    7,
                    1,
                    sample,
                    size,
                    &mut weak,
                    &mut strong,
                )
                .unwrap();
            flips[usize::from(p.flip)] = true;

            let mut d = Decoder::new();
            let (w, h) = d.decode_rgb(&bytes, &limits()).unwrap();
            let c = p.crop;
            let mut expect = vec![0u8; n];
            Resizer::new()
                .crop_resize(
                    d.rgb(),
                    w,
                    h,
                    (c.top, c.left, c.height, c.width),
                    &mut expect,
                    size,
                    size,
                )
                .unwrap();
            if p.flip {
                color::hflip(&mut expect, size as usize, size as usize);
            }
            assert_eq!(weak, expect, "sample {sample}");
            let mut s = expect.clone();
            color::apply_strong(
                &p.strong,
                &mut s,
                size as usize,
                size as usize,
                &mut Vec::new(),
            );
            assert_eq!(strong, s, "sample {sample}");
        }
        assert!(
            flips[0] && flips[1],
            "both flip outcomes should occur in 12 samples"
        );
    }

    #[test]
    fn identity_strong_params_give_equal_views() {
        let bytes = testkit::jpeg(&JpegSpec::rgb(40, 30, 2));
        let n = 16 * 16 * 3;
        let mut vm = ViewMaker::new();
        let mut found = 0;
        for sample in 0..300 {
            let (mut weak, mut strong) = (vec![0u8; n], vec![0u8; n]);
            let p = vm
                .conmim_pair(&bytes, &limits(), 1, 0, sample, 16, &mut weak, &mut strong)
                .unwrap();
            let s = p.strong;
            let identity = !s.jitter.apply && !s.grayscale && s.blur.is_none() && !s.solarize;
            if identity {
                assert_eq!(
                    p.strong,
                    StrongParams {
                        jitter: s.jitter,
                        ..StrongParams::IDENTITY
                    }
                );
                assert_eq!(weak, strong, "sample {sample}");
                found += 1;
            } else if s.solarize || s.grayscale {
                assert_ne!(weak, strong, "sample {sample}");
            }
        }
        assert!(found > 5, "only {found} identity samples");
    }

    #[test]
    fn deterministic_and_buffers_reused() {
        let bytes = testkit::jpeg(&JpegSpec::rgb(80, 60, 4));
        let other = testkit::jpeg(&JpegSpec::rgb(80, 60, 5));
        let n = 24 * 24 * 3;
        let run = |vm: &mut ViewMaker, b: &[u8], sample| {
            let (mut weak, mut strong) = (vec![0u8; n], vec![0u8; n]);
            let p = vm
                .conmim_pair(b, &limits(), 11, 2, sample, 24, &mut weak, &mut strong)
                .unwrap();
            (p, weak, strong)
        };
        let mut vm = ViewMaker::new();
        let first = run(&mut vm, &bytes, 5);
        let (ptr, cap) = (vm.decoder().rgb().as_ptr(), vm.decoder().capacity());
        let mut fresh = ViewMaker::new();
        assert_eq!(run(&mut fresh, &bytes, 5), first);
        for sample in 0..20 {
            run(&mut vm, &other, sample);
            assert_eq!(
                (vm.decoder().rgb().as_ptr(), vm.decoder().capacity()),
                (ptr, cap)
            );
        }
        assert_eq!(run(&mut vm, &bytes, 5), first);
        assert_ne!(run(&mut vm, &bytes, 6).0, first.0);
        // A different epoch gives different parameters.
        let (mut w, mut st) = (vec![0u8; n], vec![0u8; n]);
        let p = vm
            .conmim_pair(&bytes, &limits(), 11, 3, 5, 24, &mut w, &mut st)
            .unwrap();
        assert_ne!(p, first.0);
    }

    #[test]
    fn eval_view_matches_resize_then_crop() {
        assert_eq!(eval_resized_size(500, 375, 256), (341, 256));
        assert_eq!(eval_resized_size(375, 500, 256), (256, 341));
        let (w, h) = (100u32, 75u32);
        let bytes = testkit::png(w, h, 6);
        let mut vm = ViewMaker::new();
        let mut out = vec![0u8; 40 * 40 * 3];
        vm.eval_view(&bytes, &limits(), 48, 40, &mut out).unwrap();

        // Reference: full resize to 64x48, then crop 40x40 at (top 4, left 12).
        let (rw, rh) = eval_resized_size(w, h, 48);
        assert_eq!((rw, rh), (64, 48));
        let mut d = Decoder::new();
        d.decode_rgb(&bytes, &limits()).unwrap();
        let mut full = vec![0u8; (rw * rh * 3) as usize];
        Resizer::new()
            .crop_resize(d.rgb(), w, h, (0, 0, h, w), &mut full, rw, rh)
            .unwrap();
        let mut max_diff = 0u8;
        for y in 0..40usize {
            for x in 0..40usize {
                for c in 0..3 {
                    let a = out[(y * 40 + x) * 3 + c];
                    let b = full[((y + 4) * rw as usize + x + 12) * 3 + c];
                    max_diff = max_diff.max(a.abs_diff(b));
                }
            }
        }
        assert!(max_diff <= 1, "max diff {max_diff}");
        assert!(vm.eval_view(&bytes, &limits(), 32, 40, &mut out).is_err());
    }

    /// `cargo test --release --lib augment::views::tests::bench_pair -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn bench_pair() {
        let bytes = testkit::jpeg(&JpegSpec::rgb(500, 375, 1));
        let n = 224 * 224 * 3;
        let (mut weak, mut strong) = (vec![0u8; n], vec![0u8; n]);
        let mut vm = ViewMaker::new();
        let mut d = Decoder::new();
        let iters = 300u64;
        let t = std::time::Instant::now();
        for i in 0..iters {
            d.decode_rgb(&bytes, &limits()).unwrap();
            std::hint::black_box(i);
        }
        let decode = t.elapsed() / iters as u32;
        let t = std::time::Instant::now();
        for i in 0..iters {
            vm.conmim_pair(&bytes, &limits(), 0, 0, i, 224, &mut weak, &mut strong)
                .unwrap();
        }
        let pair = t.elapsed() / iters as u32;
        let t = std::time::Instant::now();
        for _ in 0..iters {
            vm.eval_view(&bytes, &limits(), 256, 224, &mut weak)
                .unwrap();
        }
        let eval = t.elapsed() / iters as u32;
        println!("500x375 JPEG: decode {decode:?}, conmim_pair {pair:?}, eval_view {eval:?}");
    }
}
