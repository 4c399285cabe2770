//! The pixel half of a ConMIM sample: decode once, crop + resize once, then derive the
//! two views (student "weak" = crop + flip; teacher "strong" = the same pixels plus
//! [`color::apply_strong`]). Also the evaluation transform (resize 256, centre crop 224).
//!
//! A [`ViewMaker`] owns every buffer it needs (decoded pixels, the libjpeg-turbo handle,
//! the resizer's internal buffers, the blur scratch) and callers pass the output slices, so
//! a worker that keeps its `ViewMaker` allocates nothing for outputs in steady state (the
//! JPEG decoders' internal working state and the `image` crate path for other formats
//! still allocate per image).
//!
//! Decoding ([`DecodeStrategy`]): by default a JPEG is decoded by libjpeg-turbo, only as
//! much as the crop needs: the crop parameters are sampled from the header's full-size
//! dimensions (so their distribution does not depend on how the image is decoded), then
//! the decoder inverse-transforms only the iMCU columns and rows around the crop box, at
//! the smallest DCT scale `n/8` (1/8, 1/4 or 1/2) at which the scaled box still has at
//! least `size` x `size` pixels, so the final resize stays a downscale exactly as at full
//! resolution. The box is mapped onto the decoded buffer as a fractional region and
//! resized with the same bicubic kernel. Everything libjpeg-turbo cannot do this way
//! (CMYK/YCCK, 12-bit, lossless, unusual subsampling) and every file it reports a
//! problem with (any libjpeg warning counts) goes through the zune-jpeg full decode
//! ([`Decoder`]), which keeps the error classification of [`crate::image::decode_check`];
//! so does everything that is not a JPEG. [`DecodeStrategy::Full`] forces that path.
//!
//! The fast path is not bit-identical to the full decode (a different IDCT and chroma
//! upsampling, and at reduced scales a DCT-domain downscale before the bicubic one);
//! the tests bound the difference (see `fast_path_agrees_with_full_decode`). Region
//! decoding itself is exact (a region equals the same pixels of a whole decode at that
//! scale). At full resolution the libjpeg-turbo pixels are, if anything, the closer ones
//! to the reference pipeline: PIL decodes with libjpeg(-turbo) using the same settings
//! (accurate integer IDCT, smooth chroma upsampling).
//!
//! Damage in a baseline JPEG's data *below* the decoded region is not seen by a region
//! decode (libjpeg-turbo stops reading there); the crop's pixels are still correct. Data
//! above and beside the region is entropy-decoded, and progressive files are read
//! completely, so damage there makes the image take the full-decode path.
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
use crate::image::turbo::{self, CropPlan, PlanOptions, Region, TurboDecoder};
use crate::image::{ImageFormat, ImageLimits, ImageProblem, probe_fast};

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

/// How a [`ViewMaker`] decodes JPEGs (other formats always go through [`Decoder`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodeStrategy {
    /// zune-jpeg decodes the whole image at full resolution (the reference path).
    Full,
    /// libjpeg-turbo, with the DCT scale numerators (over 8) in `scales` allowed for
    /// reduced-resolution decoding (empty: full resolution only) and, if `crop`, only the
    /// region around the crop decoded. Falls back to [`DecodeStrategy::Full`] per image
    /// where libjpeg-turbo cannot (or will not) decode it.
    Turbo { scales: &'static [u32], crop: bool },
}

impl DecodeStrategy {
    /// The default: libjpeg-turbo with region decoding and the SIMD-friendly scales
    /// (1/8, 1/4, 1/2).
    pub const FAST: DecodeStrategy = DecodeStrategy::Turbo {
        scales: turbo::FAST_SCALES,
        crop: true,
    };
}

impl Default for DecodeStrategy {
    fn default() -> Self {
        DecodeStrategy::FAST
    }
}

/// Which decoder produced the pixels of the last view (for tests and statistics).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DecodePath {
    /// Nothing decoded yet, or the last call failed.
    #[default]
    None,
    /// zune-jpeg or the `image` crate, whole image at full resolution.
    Full,
    /// libjpeg-turbo at scale `num / 8`, `cropped` if only a region was decoded.
    Turbo { num: u32, cropped: bool },
}

/// Extra pixels (in the decoded scale) decoded around the crop box, so that chroma
/// upsampling at the region's edges has its usual neighbours.
const REGION_MARGIN: u32 = 4;

/// Reusable per-worker state for building views.
#[derive(Debug, Default)]
pub struct ViewMaker {
    decoder: Decoder,
    /// Created on first use; `turbo_failed` if libjpeg-turbo could not create a handle.
    turbo: Option<TurboDecoder>,
    turbo_failed: bool,
    strategy: DecodeStrategy,
    resizer: Resizer,
    /// Gaussian-blur scratch for [`color::apply_strong`].
    scratch: Vec<f32>,
    times: StageTimes,
    last_path: DecodePath,
}

/// Where the pixels of the current view are.
enum Source {
    /// [`ViewMaker::decoder`]'s full image.
    Full,
    /// The turbo decoder's buffer, laid out by the plan.
    Turbo(CropPlan),
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
    /// A view maker with the default [`DecodeStrategy`].
    pub fn new() -> Self {
        Self::default()
    }

    /// A view maker that decodes JPEGs with `strategy`.
    pub fn with_strategy(strategy: DecodeStrategy) -> Self {
        ViewMaker {
            strategy,
            ..Self::default()
        }
    }

    /// The JPEG decoding strategy.
    pub fn strategy(&self) -> DecodeStrategy {
        self.strategy
    }

    /// Changes the JPEG decoding strategy for the following calls.
    pub fn set_strategy(&mut self, strategy: DecodeStrategy) {
        self.strategy = strategy;
    }

    /// Which decoder produced the last view.
    pub fn last_path(&self) -> DecodePath {
        self.last_path
    }

    /// Time spent per stage since the last [`ViewMaker::take_times`].
    pub fn times(&self) -> StageTimes {
        self.times
    }

    /// Returns the stage times and resets them to zero.
    pub fn take_times(&mut self) -> StageTimes {
        std::mem::take(&mut self.times)
    }

    /// The full-decode path's decoder (and its last decoded image: only meaningful when
    /// [`ViewMaker::last_path`] is [`DecodePath::Full`]).
    pub fn decoder(&self) -> &Decoder {
        &self.decoder
    }

    /// The libjpeg-turbo decoder, once it has been used.
    pub fn turbo_decoder(&self) -> Option<&TurboDecoder> {
        self.turbo.as_ref()
    }

    fn turbo(&mut self) -> Option<&mut TurboDecoder> {
        if self.turbo.is_none() && !self.turbo_failed {
            match TurboDecoder::new() {
                Ok(t) => self.turbo = Some(t),
                Err(_) => self.turbo_failed = true,
            }
        }
        self.turbo.as_mut()
    }

    /// Decodes `bytes` for the crop of `params_of(width, height)` resized to
    /// `out_w` x `out_h`: through libjpeg-turbo when the strategy and the file allow,
    /// else the whole image through [`Decoder`].
    fn decode_for_crop(
        &mut self,
        bytes: &[u8],
        limits: &ImageLimits,
        params_of: impl Fn(u32, u32) -> ConMimParams,
        out_w: u32,
        out_h: u32,
    ) -> Result<(ConMimParams, Source), ImageProblem> {
        self.last_path = DecodePath::None;
        if let DecodeStrategy::Turbo { scales, crop } = self.strategy {
            let info = probe_fast(bytes, limits)?;
            if info.format == ImageFormat::Jpeg
                && let Some(t) = self.turbo()
                && let Ok(header) = t.read_header(bytes)
                && header.supports_fast_path()
                && (header.width, header.height) == (info.width, info.height)
                && let Some(mcu_w) = header.mcu_width()
            {
                let params = params_of(info.width, info.height);
                let c = params.crop;
                let opts = PlanOptions {
                    scales,
                    crop,
                    margin: REGION_MARGIN,
                };
                let plan = turbo::plan_crop(
                    info.width,
                    info.height,
                    mcu_w,
                    (c.top, c.left, c.height, c.width),
                    out_w,
                    out_h,
                    &opts,
                );
                if t.decode(&header, plan.num, plan.region).is_ok() {
                    let whole = plan.region.x == 0
                        && plan.region.y == 0
                        && plan.region.w == turbo::scaled(info.width, plan.num)
                        && plan.region.h == turbo::scaled(info.height, plan.num);
                    self.last_path = DecodePath::Turbo {
                        num: plan.num,
                        cropped: !whole,
                    };
                    return Ok((params, Source::Turbo(plan)));
                }
                // Any libjpeg-turbo problem: the full decode below decides (and classifies).
            }
        }
        let (w, h) = self.decoder.decode_rgb(bytes, limits)?;
        self.last_path = DecodePath::Full;
        Ok((params_of(w, h), Source::Full))
    }

    /// Resizes the crop of `params` from the decoded pixels in `source` into `out`,
    /// flipped horizontally if `params.flip` (the flip is part of the resize's
    /// horizontal pass).
    fn resize_crop(
        &mut self,
        params: &ConMimParams,
        source: &Source,
        out: &mut [u8],
        out_w: u32,
        out_h: u32,
    ) -> Result<(), ImageProblem> {
        let flip = params.flip;
        match source {
            Source::Full => {
                let (w, h) = self.decoder.dimensions();
                let c = params.crop;
                self.resizer.crop_resize_flip(
                    self.decoder.rgb(),
                    w,
                    h,
                    (c.top, c.left, c.height, c.width),
                    flip,
                    out,
                    out_w,
                    out_h,
                )
            }
            Source::Turbo(plan) => {
                let t = self
                    .turbo
                    .as_ref()
                    .ok_or_else(|| ImageProblem::Decode("turbo decoder missing".into()))?;
                let (w, h) = t.dimensions();
                if plan.num == 8 {
                    self.resizer
                        .crop_resize_flip(t.rgb(), w, h, plan.view, flip, out, out_w, out_h)
                } else {
                    self.resizer.crop_resize_frac(
                        t.rgb(),
                        w,
                        h,
                        plan.view,
                        plan.frac,
                        flip,
                        out,
                        out_w,
                        out_h,
                    )
                }
            }
        }
    }

    /// Decode + crop + resize + flip into `out` (`size` x `size`); the shared geometry of
    /// [`ViewMaker::conmim_pair`] and [`ViewMaker::train_view`].
    #[allow(clippy::too_many_arguments)]
    fn weak_view(
        &mut self,
        bytes: &[u8],
        limits: &ImageLimits,
        seed: u64,
        epoch: u64,
        sample: u64,
        size: u32,
        out: &mut [u8],
    ) -> Result<ConMimParams, ImageProblem> {
        let t0 = Instant::now();
        let decoded = self.decode_for_crop(
            bytes,
            limits,
            |w, h| ConMimParams::sample(seed, epoch, sample, w, h),
            size,
            size,
        );
        let t1 = Instant::now();
        self.times.decode += t1 - t0;
        let (params, source) = decoded?;
        let resized = self.resize_crop(&params, &source, out, size, size);
        self.times.resize += t1.elapsed();
        resized.map(|()| params)
    }

    /// Builds one ConMIM training pair from encoded `bytes`.
    ///
    /// Decodes (see [`DecodeStrategy`]), samples [`ConMimParams::sample`]`(seed, epoch,
    /// sample, w, h)` from the full image size, crops `params.crop` and resizes it
    /// (bicubic, PIL's kernel) to `size` x `size` into `weak`, flips it if `params.flip`,
    /// copies it to `strong` and applies [`color::apply_strong`] there. `weak` and
    /// `strong` must each hold `size * size * 3` bytes. Returns the parameters used.
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
        let params = self.weak_view(bytes, limits, seed, epoch, sample, size, weak)?;
        let t2 = Instant::now();
        let side = size as usize;
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
        self.weak_view(bytes, limits, seed, epoch, sample, size, out)
    }

    /// The evaluation transform: torchvision `Resize(resize_short, BICUBIC)` (shorter side
    /// to `resize_short`, longer side `int(resize_short * long / short)`) then
    /// `CenterCrop(crop)` (offsets `int(round((side - crop) / 2))`). At full resolution
    /// this is exactly PIL's resize followed by the crop (only the cropped outputs are
    /// computed); from a DCT-scaled decode it is one resize of the matching fractional
    /// source region (PIL `box` semantics, which reads just outside the region as the
    /// full resize would). `out` holds `crop * crop * 3` bytes; `crop <= resize_short` is
    /// required.
    ///
    /// With a libjpeg-turbo strategy that allows scaling, a JPEG is decoded at the smallest
    /// allowed DCT scale at which the source region still spans at least `crop` x `crop`
    /// pixels (with the default scales: when the region is at least twice `crop`, i.e. a
    /// shorter side of about `2 * resize_short` or more); the whole scaled image is
    /// decoded, so the filter can still read just outside the region.
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
        self.last_path = DecodePath::None;
        let mut scaled = None;
        if let DecodeStrategy::Turbo { scales, .. } = self.strategy
            && !scales.is_empty()
        {
            let info = probe_fast(bytes, limits)?;
            if info.format == ImageFormat::Jpeg
                && let Some(t) = self.turbo()
                && let Ok(header) = t.read_header(bytes)
                && header.supports_fast_path()
                && (header.width, header.height) == (info.width, info.height)
            {
                let (w, h) = (info.width, info.height);
                let (_, region) = eval_region(w, h, resize_short, crop);
                // Smallest allowed n/8 with the scaled region still >= crop both ways.
                let num = scales
                    .iter()
                    .copied()
                    .filter(|&n| (1..8).contains(&n))
                    .filter(|&n| {
                        let s = f64::from(n) / 8.0;
                        region.2 * s >= f64::from(crop) && region.3 * s >= f64::from(crop)
                    })
                    .min();
                if let Some(num) = num {
                    let (sw, sh) = (turbo::scaled(w, num), turbo::scaled(h, num));
                    let whole = Region {
                        x: 0,
                        y: 0,
                        w: sw,
                        h: sh,
                    };
                    if t.decode(&header, num, whole).is_ok() {
                        scaled = Some((num, sw, sh, region));
                    }
                }
            }
        }
        let decoded = match scaled {
            Some(found) => Ok(found),
            None => self
                .decoder
                .decode_rgb(bytes, limits)
                .map(|(w, h)| (8, w, h, eval_region(w, h, resize_short, crop).1)),
        };
        let t1 = Instant::now();
        self.times.decode += t1 - t0;
        let (num, w, h, region) = decoded?;
        let r = if num == 8 {
            self.last_path = DecodePath::Full;
            // Exactly PIL's resize of the whole image, then the crop of its output.
            let (full, window) = eval_window(w, h, resize_short, crop);
            self.resizer
                .resize_window(self.decoder.rgb(), w, h, full, window, out, crop, crop)
        } else {
            self.last_path = DecodePath::Turbo {
                num,
                cropped: false,
            };
            let s = f64::from(num) / 8.0;
            let region = (region.0 * s, region.1 * s, region.2 * s, region.3 * s);
            let t = self
                .turbo
                .as_ref()
                .ok_or_else(|| ImageProblem::Decode("turbo decoder missing".into()))?;
            self.resizer
                .resize_region(t.rgb(), w, h, region, out, crop, crop)
        };
        self.times.resize += t1.elapsed();
        r
    }
}

/// The eval transform's geometry for a `w` x `h` image: the resized size and the source
/// region `(left, top, width, height)` (full-resolution pixels, fractional) that becomes
/// the centre crop.
fn eval_region(w: u32, h: u32, resize_short: u32, crop: u32) -> ((u32, u32), (f64, f64, f64, f64)) {
    let ((rw, rh), (left, top)) = eval_window(w, h, resize_short, crop);
    let sx = f64::from(w) / f64::from(rw);
    let sy = f64::from(h) / f64::from(rh);
    let region = (
        f64::from(left) * sx,
        f64::from(top) * sy,
        f64::from(crop) * sx,
        f64::from(crop) * sy,
    );
    ((rw, rh), region)
}

/// The eval transform's resized size `(rw, rh)` and the centre crop's `(left, top)` in it.
fn eval_window(w: u32, h: u32, resize_short: u32, crop: u32) -> ((u32, u32), (u32, u32)) {
    let (rw, rh) = eval_resized_size(w, h, resize_short);
    let top = py_round(f64::from(rh - crop) / 2.0);
    let left = py_round(f64::from(rw - crop) / 2.0);
    ((rw, rh), (left, top))
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
    use crate::testkit::{self, JpegColor, JpegSpec};
    use jpeg_encoder::SamplingFactor;

    fn limits() -> ImageLimits {
        ImageLimits::default()
    }

    /// A photo-like RGB JPEG with explicit chroma subsampling (jpeg-encoder's default
    /// switches to 4:4:4 at quality 90 and up).
    fn jpeg_with(
        w: u32,
        h: u32,
        seed: u64,
        quality: u8,
        sampling: SamplingFactor,
        progressive: bool,
    ) -> Vec<u8> {
        let rgb = testkit::photo_pixels(w, h, seed);
        let mut out = Vec::new();
        let mut enc = jpeg_encoder::Encoder::new(&mut out, quality);
        enc.set_sampling_factor(sampling);
        enc.set_progressive(progressive);
        enc.encode(&rgb, w as u16, h as u16, jpeg_encoder::ColorType::Rgb)
            .unwrap();
        out
    }

    /// Reference: zune full decode, `crop_resize`, flip.
    fn reference_weak(bytes: &[u8], p: &ConMimParams, size: u32) -> Vec<u8> {
        let mut d = Decoder::new();
        let (w, h) = d.decode_rgb(bytes, &limits()).unwrap();
        let c = p.crop;
        let mut expect = vec![0u8; (size * size * 3) as usize];
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
        expect
    }

    #[test]
    fn weak_view_is_crop_resize_then_flip() {
        let bytes = testkit::jpeg(&JpegSpec::rgb(90, 70, 3));
        let size = 32u32;
        let n = (size * size * 3) as usize;
        let mut vm = ViewMaker::with_strategy(DecodeStrategy::Full);
        let mut fast = ViewMaker::new();
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
            assert_eq!(vm.last_path(), DecodePath::Full);
            flips[usize::from(p.flip)] = true;
            let expect = reference_weak(&bytes, &p, size);
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

            // The default (libjpeg-turbo) path: same parameters, close pixels.
            let (mut fw, mut fs) = (vec![0u8; n], vec![0u8; n]);
            let fp = fast
                .conmim_pair(&bytes, &limits(), 7, 1, sample, size, &mut fw, &mut fs)
                .unwrap();
            assert_eq!(fp, p);
            // A 32-pixel view of a 90x70 image shows the 8x8-block DCT reduction more
            // than a 224-pixel one: twice the usual mean tolerance when scaled.
            let tol = match fast.last_path() {
                DecodePath::Turbo { num: 8, .. } => FULL_RES_TOL.0,
                DecodePath::Turbo { .. } => 2.0 * SCALED_TOL.0,
                other => panic!("{other:?}"),
            };
            let mut stats = DiffStats::default();
            stats.add(&fw, &weak);
            assert!(stats.mean() <= tol, "sample {sample}: {}", stats.mean());
            // train_view is the pair's weak view.
            let mut t = vec![0u8; n];
            fast.train_view(&bytes, &limits(), 7, 1, sample, size, &mut t)
                .unwrap();
            assert_eq!(t, fw);
        }
        assert!(
            flips[0] && flips[1],
            "both flip outcomes should occur in 12 samples"
        );
    }

    /// A JPEG whose components are all sampled 2x1 (TurboJPEG calls it 4:4:4, but its
    /// iMCU is 16 pixels wide; `cjpeg -sample 2x1,2x1,2x1`): every crop decodes as a
    /// region, as for ordinary files. Before, a crop starting at an odd multiple of 8
    /// failed in libjpeg-turbo and fell back to a full zune decode (about half of them).
    #[test]
    fn jpegs_with_uniformly_scaled_sampling_decode_by_region() {
        let bytes = include_bytes!("../../tests/fixtures/jpeg/sampling-2x1-all.jpg");
        let mut t = TurboDecoder::new().unwrap();
        let h = t.read_header(bytes).unwrap();
        assert_eq!((h.width, h.height, h.max_h_samp), (160, 120, 2));
        assert_eq!(h.mcu_width(), Some(16));
        let size = 32u32;
        let n = (size * size * 3) as usize;
        let mut full = ViewMaker::with_strategy(DecodeStrategy::Full);
        let mut fast = ViewMaker::new();
        let (mut a, mut b) = (vec![0u8; n], vec![0u8; n]);
        let mut cropped = 0;
        for sample in 0..40 {
            full.train_view(bytes, &limits(), 3, 0, sample, size, &mut a)
                .unwrap();
            fast.train_view(bytes, &limits(), 3, 0, sample, size, &mut b)
                .unwrap();
            match fast.last_path() {
                DecodePath::Turbo { cropped: c, .. } => cropped += usize::from(c),
                other => panic!("sample {sample}: {other:?}"),
            }
            let mut stats = DiffStats::default();
            stats.add(&b, &a);
            assert!(
                stats.mean() <= 2.0 * SCALED_TOL.0,
                "sample {sample}: {}",
                stats.mean()
            );
        }
        assert!(cropped >= 30, "{cropped} of 40 decoded a region");
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
        for strategy in [DecodeStrategy::Full, DecodeStrategy::FAST] {
            let mut vm = ViewMaker::with_strategy(strategy);
            let first = run(&mut vm, &bytes, 5);
            let mut fresh = ViewMaker::with_strategy(strategy);
            assert_eq!(run(&mut fresh, &bytes, 5), first);
            let buffers = |vm: &ViewMaker| match vm.last_path() {
                DecodePath::Full => (vm.decoder().rgb().as_ptr(), vm.decoder().capacity()),
                _ => {
                    let t = vm.turbo_decoder().unwrap();
                    (t.rgb().as_ptr(), t.capacity())
                }
            };
            // Warm up on every crop, then nothing may be reallocated.
            for sample in 0..20 {
                run(&mut vm, &other, sample);
            }
            let (ptr, cap) = buffers(&vm);
            for sample in 0..20 {
                run(&mut vm, &other, sample);
                assert_eq!(buffers(&vm), (ptr, cap), "{strategy:?}");
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
        assert_eq!(vm.last_path(), DecodePath::Full);

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
        assert_eq!(max_diff, 0, "max diff {max_diff}");
        assert!(vm.eval_view(&bytes, &limits(), 32, 40, &mut out).is_err());
    }

    /// Mean and 99.9th percentile of |a - b| over u8 samples, and the maximum.
    #[derive(Debug)]
    struct DiffStats {
        hist: [u64; 256],
    }

    impl Default for DiffStats {
        fn default() -> Self {
            DiffStats { hist: [0; 256] }
        }
    }

    impl DiffStats {
        fn add(&mut self, a: &[u8], b: &[u8]) {
            assert_eq!(a.len(), b.len());
            for (x, y) in a.iter().zip(b) {
                self.hist[usize::from(x.abs_diff(*y))] += 1;
            }
        }
        fn count(&self) -> u64 {
            self.hist.iter().sum()
        }
        fn mean(&self) -> f64 {
            let sum: u64 = self
                .hist
                .iter()
                .enumerate()
                .map(|(d, &n)| d as u64 * n)
                .sum();
            sum as f64 / self.count().max(1) as f64
        }
        fn quantile(&self, q: f64) -> usize {
            let target = (q * self.count() as f64).ceil() as u64;
            let mut seen = 0;
            for (d, &n) in self.hist.iter().enumerate() {
                seen += n;
                if seen >= target {
                    return d;
                }
            }
            255
        }
        fn max(&self) -> usize {
            self.hist.iter().rposition(|&n| n > 0).unwrap_or(0)
        }
    }

    /// Runs `samples` random crops of `bytes` through the default fast path and the forced
    /// full decode; returns the difference statistics and how often each scale was used.
    /// Statistics `[full resolution, DCT-scaled]`.
    fn compare_paths(bytes: &[u8], samples: u64, size: u32) -> ([DiffStats; 2], [u32; 9]) {
        let n = (size * size * 3) as usize;
        let mut fast = ViewMaker::new();
        let mut full = ViewMaker::with_strategy(DecodeStrategy::Full);
        let (mut a, mut b) = (vec![0u8; n], vec![0u8; n]);
        let mut stats = [DiffStats::default(), DiffStats::default()];
        let mut scales = [0u32; 9];
        for sample in 0..samples {
            let pa = fast
                .train_view(bytes, &limits(), 3, 0, sample, size, &mut a)
                .unwrap();
            let pb = full
                .train_view(bytes, &limits(), 3, 0, sample, size, &mut b)
                .unwrap();
            assert_eq!(pa, pb);
            let num = match fast.last_path() {
                DecodePath::Turbo { num, .. } => num,
                other => panic!("fast path not taken: {other:?}"),
            };
            scales[num as usize] += 1;
            stats[usize::from(num < 8)].add(&a, &b);
        }
        (stats, scales)
    }

    /// Tolerance `(mean |diff|, 99.9th percentile of |diff|)` on u8 samples between the
    /// libjpeg-turbo path and the zune full decode, at full resolution: the decoders
    /// differ only in IDCT rounding and chroma upsampling (region decoding itself is
    /// exact: a region decode equals the same rows and columns of a whole decode).
    const FULL_RES_TOL: (f64, usize) = (0.6, 4);
    /// The same for DCT-scaled decodes: the DCT-domain reduction pre-filters differently
    /// from one wide bicubic kernel, which shows at hard edges.
    const SCALED_TOL: (f64, usize) = (1.5, 16);

    /// The libjpeg-turbo path (scaled / region decode) against the zune full decode over
    /// many random crops, per kind of decode ([`FULL_RES_TOL`], [`SCALED_TOL`]).
    #[test]
    fn fast_path_agrees_with_full_decode() {
        use SamplingFactor::*;
        struct Case {
            name: &'static str,
            bytes: Vec<u8>,
            size: u32,
        }
        let mut cases = vec![
            Case {
                name: "500x375 q75 4:2:0",
                bytes: jpeg_with(500, 375, 1, 75, R_4_2_0, false),
                size: 224,
            },
            Case {
                name: "500x375 q95 4:2:0",
                bytes: jpeg_with(500, 375, 2, 95, R_4_2_0, false),
                size: 224,
            },
            Case {
                name: "375x500 q95 4:4:4",
                bytes: jpeg_with(375, 500, 3, 95, R_4_4_4, false),
                size: 224,
            },
            Case {
                name: "333x251 q90 4:2:2",
                bytes: jpeg_with(333, 251, 4, 90, R_4_2_2, false),
                size: 224,
            },
            Case {
                name: "333x251 q85 4:2:0 progressive",
                bytes: jpeg_with(333, 251, 5, 85, R_4_2_0, true),
                size: 224,
            },
            Case {
                name: "960x720 q85 4:2:0 (scaled decodes)",
                bytes: jpeg_with(960, 720, 6, 85, R_4_2_0, false),
                size: 224,
            },
            Case {
                name: "1001x777 q90 4:2:0 progressive (scaled decodes)",
                bytes: jpeg_with(1001, 777, 7, 90, R_4_2_0, true),
                size: 128,
            },
        ];
        cases.push(Case {
            name: "353x267 gray",
            bytes: testkit::jpeg(&JpegSpec {
                color: JpegColor::Gray,
                quality: 85,
                ..JpegSpec::rgb(353, 267, 8)
            }),
            size: 224,
        });
        cases.push(Case {
            name: "640x480 gray progressive",
            bytes: testkit::jpeg(&JpegSpec {
                color: JpegColor::Gray,
                progressive: true,
                quality: 80,
                ..JpegSpec::rgb(640, 480, 9)
            }),
            size: 96,
        });
        let samples = if cfg!(debug_assertions) { 12 } else { 96 };
        let mut used = [0u32; 9];
        for case in &cases {
            let (stats, scales) = compare_paths(&case.bytes, samples, case.size);
            for (kind, st, (tol_mean, tol_p999)) in [
                ("full-res", &stats[0], FULL_RES_TOL),
                ("scaled", &stats[1], SCALED_TOL),
            ] {
                if st.count() == 0 {
                    continue;
                }
                let (mean, p999, max) = (st.mean(), st.quantile(0.999), st.max());
                println!(
                    "{:<48} {kind:<8} mean {mean:.3} p99.9 {p999:>2} max {max:>3}",
                    case.name
                );
                assert!(mean <= tol_mean, "{} {kind}: mean |diff| {mean}", case.name);
                assert!(
                    p999 <= tol_p999,
                    "{} {kind}: p99.9 |diff| {p999}",
                    case.name
                );
            }
            println!(
                "{:<48} crops per scale (n/8, count): {:?}",
                case.name,
                scales
                    .iter()
                    .enumerate()
                    .filter(|(_, c)| **c > 0)
                    .collect::<Vec<_>>()
            );
            for (u, s) in used.iter_mut().zip(scales) {
                *u += s;
            }
        }
        assert!(
            used[8] > 0 && used[4] > 0 && used[2] > 0,
            "scales used: {used:?}"
        );
    }

    /// Region decoding is exact: with the same scales, decoding only the crop's region
    /// (plus [`REGION_MARGIN`]) gives the same views, bit for bit, as decoding the whole
    /// image. With `tests/parity.rs` (libjpeg-turbo's full decode equals PIL's, and the
    /// resize equals Pillow's) this makes the default full-resolution path equal to
    /// PIL decode + `resized_crop` end to end; only DCT-scaled decodes differ
    /// ([`SCALED_TOL`]).
    #[test]
    fn region_decode_equals_whole_image_decode() {
        use SamplingFactor::*;
        let files = [
            jpeg_with(500, 375, 1, 75, R_4_2_0, false),
            jpeg_with(375, 500, 3, 95, R_4_4_4, false),
            jpeg_with(333, 251, 4, 90, R_4_2_2, false),
            jpeg_with(333, 251, 5, 85, R_4_2_0, true),
            jpeg_with(960, 720, 6, 85, R_4_2_0, false),
        ];
        let samples = if cfg!(debug_assertions) { 8 } else { 48 };
        let size = 224;
        let n = (size * size * 3) as usize;
        let (mut a, mut b) = (vec![0u8; n], vec![0u8; n]);
        let mut regions = 0;
        for scales in [&[][..], turbo::FAST_SCALES] {
            let mut region = ViewMaker::with_strategy(DecodeStrategy::Turbo { scales, crop: true });
            let mut whole = ViewMaker::with_strategy(DecodeStrategy::Turbo {
                scales,
                crop: false,
            });
            for (f, bytes) in files.iter().enumerate() {
                for sample in 0..samples {
                    region
                        .train_view(bytes, &limits(), 11, 0, sample, size, &mut a)
                        .unwrap();
                    let path = region.last_path();
                    whole
                        .train_view(bytes, &limits(), 11, 0, sample, size, &mut b)
                        .unwrap();
                    let num = |p| match p {
                        DecodePath::Turbo { num, .. } => num,
                        other => panic!("file {f}: {other:?}"),
                    };
                    assert_eq!(num(path), num(whole.last_path()), "file {f}");
                    if let DecodePath::Turbo { cropped: true, .. } = path {
                        regions += 1;
                    }
                    let max = a.iter().zip(&b).map(|(x, y)| x.abs_diff(*y)).max();
                    assert_eq!(max, Some(0), "file {f} sample {sample} ({path:?})");
                }
            }
        }
        assert!(regions > 0, "no crop took the region path");
    }

    #[test]
    fn eval_view_fast_path_agrees_with_full_decode() {
        let mut fast = ViewMaker::new();
        let mut full = ViewMaker::with_strategy(DecodeStrategy::Full);
        for (bytes, expect) in [
            (
                jpeg_with(1200, 900, 1, 90, SamplingFactor::R_4_2_0, false),
                4,
            ),
            (
                jpeg_with(600, 1100, 2, 80, SamplingFactor::R_4_2_2, true),
                4,
            ),
            (
                jpeg_with(2100, 1500, 3, 80, SamplingFactor::R_4_2_0, false),
                2,
            ),
            (
                jpeg_with(500, 375, 4, 90, SamplingFactor::R_4_2_0, false),
                8,
            ),
        ] {
            let (mut a, mut b) = (vec![0u8; 224 * 224 * 3], vec![0u8; 224 * 224 * 3]);
            fast.eval_view(&bytes, &limits(), 256, 224, &mut a).unwrap();
            full.eval_view(&bytes, &limits(), 256, 224, &mut b).unwrap();
            let num = match fast.last_path() {
                DecodePath::Turbo { num, .. } => num,
                _ => 8,
            };
            assert_eq!(num, expect);
            let mut stats = DiffStats::default();
            stats.add(&a, &b);
            let (tol_mean, tol_p999) = if num == 8 { FULL_RES_TOL } else { SCALED_TOL };
            assert!(
                stats.mean() <= tol_mean && stats.quantile(0.999) <= tol_p999,
                "num {num}: mean {} p99.9 {}",
                stats.mean(),
                stats.quantile(0.999)
            );
        }
    }

    #[test]
    fn every_kind_of_jpeg_still_makes_views() {
        let size = 32u32;
        let n = (size * size * 3) as usize;
        for color in [JpegColor::Rgb, JpegColor::Gray, JpegColor::Cmyk] {
            for progressive in [false, true] {
                let bytes = testkit::jpeg(&JpegSpec {
                    color,
                    progressive,
                    ..JpegSpec::rgb(67, 45, 9)
                });
                let mut fast = ViewMaker::new();
                let mut full = ViewMaker::with_strategy(DecodeStrategy::Full);
                let (mut a, mut b) = (vec![0u8; n], vec![0u8; n]);
                for sample in 0..4 {
                    fast.train_view(&bytes, &limits(), 0, 0, sample, size, &mut a)
                        .unwrap();
                    full.train_view(&bytes, &limits(), 0, 0, sample, size, &mut b)
                        .unwrap();
                    if color == JpegColor::Cmyk {
                        // libjpeg-turbo does not convert CMYK to RGB: the zune path runs.
                        assert_eq!(fast.last_path(), DecodePath::Full);
                        assert_eq!(a, b);
                    } else {
                        assert!(matches!(fast.last_path(), DecodePath::Turbo { .. }));
                        let mut stats = DiffStats::default();
                        stats.add(&a, &b);
                        assert!(stats.mean() <= SCALED_TOL.0, "{color:?} {progressive}");
                    }
                    if color == JpegColor::Gray {
                        assert!(a.chunks_exact(3).all(|p| p[0] == p[1] && p[1] == p[2]));
                    }
                }
            }
        }
        // Other formats: always the full path.
        let png = testkit::png(50, 40, 1);
        let mut vm = ViewMaker::new();
        vm.train_view(&png, &limits(), 0, 0, 0, size, &mut vec![0u8; n])
            .unwrap();
        assert_eq!(vm.last_path(), DecodePath::Full);
    }

    #[test]
    fn broken_jpegs_fail_as_with_the_full_decode() {
        let bytes = jpeg_with(320, 240, 5, 90, SamplingFactor::R_4_2_0, false);
        let n = 32 * 32 * 3;
        // Cut in half (no EOI): probe says truncated.
        let cut = bytes[..bytes.len() / 2].to_vec();
        // Cut in half with an EOI appended, so only decoding can tell.
        let mut cut_eoi = cut.clone();
        cut_eoi.extend_from_slice(&[0xFF, 0xD9]);
        // Garbage over a stretch of the entropy-coded data.
        let mut garbage = bytes.clone();
        let mid = garbage.len() / 3;
        for (i, b) in garbage[mid..mid + 200].iter_mut().enumerate() {
            *b = (i as u8).wrapping_mul(37) | 1;
        }
        // A header that lies about the size.
        let mut bigger = bytes.clone();
        assert!(testkit::patch_jpeg_dimensions(&mut bigger, 640, 480));
        for (name, b) in [
            ("cut", &cut),
            ("cut+eoi", &cut_eoi),
            ("garbage", &garbage),
            ("bigger", &bigger),
        ] {
            for sample in 0..16 {
                let mut fast = ViewMaker::new();
                let mut full = ViewMaker::with_strategy(DecodeStrategy::Full);
                let (mut a, mut b2) = (vec![0u8; n], vec![0u8; n]);
                let ra = fast.train_view(b, &limits(), 1, 0, sample, 32, &mut a);
                let rb = full.train_view(b, &limits(), 1, 0, sample, 32, &mut b2);
                match (&ra, &rb) {
                    (Err(ea), Err(eb)) => assert_eq!(ea.code(), eb.code(), "{name}"),
                    (Ok(_), Ok(_)) => {}
                    _ => panic!("{name} sample {sample}: fast {ra:?} vs full {rb:?}"),
                }
            }
        }
    }

    /// CPU time of the calling thread (wall time where that is not available).
    fn thread_cpu() -> std::time::Duration {
        #[cfg(target_os = "linux")]
        {
            unsafe extern "C" {
                fn clock_gettime(clock: i32, ts: *mut [i64; 2]) -> i32;
            }
            const CLOCK_THREAD_CPUTIME_ID: i32 = 3;
            let mut ts = [0i64; 2];
            // SAFETY: `ts` has the layout of a 64-bit Linux `struct timespec`.
            if unsafe { clock_gettime(CLOCK_THREAD_CPUTIME_ID, &mut ts) } == 0 {
                return std::time::Duration::new(ts[0] as u64, ts[1] as u32);
            }
        }
        use std::sync::OnceLock;
        static START: OnceLock<Instant> = OnceLock::new();
        START.get_or_init(Instant::now).elapsed()
    }

    /// `cargo test --release --lib augment::views::tests::bench_pair -- --ignored --nocapture`
    ///
    /// Decode-only and whole weak-view (decode + RandomResizedCrop to 224 + flip) img/s,
    /// one thread, per strategy, on ImageNet-like JPEGs. `CONMIM_BENCH_ROUNDS` (default 3)
    /// rounds, strategies interleaved; prints the best round by wall time (and as a
    /// percentage of the zune full decode's best round) and the median round by thread
    /// CPU time. On a shared machine, the best wall-clock round is the most stable.
    #[test]
    #[ignore]
    fn bench_pair() {
        let rounds: usize = std::env::var("CONMIM_BENCH_ROUNDS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(3);
        let iters = 240u64;
        let sizes = [(500, 375), (500, 375), (375, 500), (500, 333)];
        // CONMIM_BENCH_SETS: any of q75, q95, big (default: all three).
        let wanted = std::env::var("CONMIM_BENCH_SETS").unwrap_or("q75,q95,big".into());
        let sets: Vec<(String, Vec<Vec<u8>>)> =
            [("q75", 75u8, 1u32), ("q95", 95, 1), ("big", 85, 2)]
                .iter()
                .filter(|(key, ..)| wanted.split(',').any(|w| w.trim() == *key))
                .map(|&(_, q, mult)| {
                    let imgs = (0..8u64)
                        .map(|i| {
                            let (w, h) = sizes[i as usize % sizes.len()];
                            jpeg_with(
                                w * mult,
                                h * mult,
                                100 + i,
                                q,
                                SamplingFactor::R_4_2_0,
                                false,
                            )
                        })
                        .collect::<Vec<_>>();
                    let kb = imgs.iter().map(Vec::len).sum::<usize>() / imgs.len() / 1024;
                    let name = format!("{}x{} q{q} 4:2:0 (~{kb} KiB)", 500 * mult, 375 * mult);
                    (name, imgs)
                })
                .collect();

        type Job<'a> = Box<dyn FnMut(&[u8], u64) + 'a>;
        let lim = limits();
        let view_len = 224 * 224 * 3;
        for (set_name, imgs) in &sets {
            println!("\n== {set_name}, {iters} images per round, {rounds} rounds");
            let mut jobs: Vec<(String, Job)> = Vec::new();
            // Decode only.
            let mut zune = Decoder::new();
            jobs.push((
                "decode: zune full".into(),
                Box::new(move |b, _| {
                    zune.decode_rgb(b, &lim).unwrap();
                }),
            ));
            for num in [8u32, 7, 6, 5, 4, 3, 2, 1] {
                let mut t = TurboDecoder::new().unwrap();
                jobs.push((
                    format!("decode: turbo {num}/8 whole"),
                    Box::new(move |b, _| {
                        let h = t.read_header(b).unwrap();
                        let r = Region {
                            x: 0,
                            y: 0,
                            w: turbo::scaled(h.width, num),
                            h: turbo::scaled(h.height, num),
                        };
                        t.decode(&h, num, r).unwrap();
                    }),
                ));
            }
            for (label, scales, to_bottom) in [
                ("decode: turbo region (RRC crop), full res", &[][..], false),
                (
                    "decode: turbo region (RRC crop), 1/8,1/4,1/2",
                    turbo::FAST_SCALES,
                    false,
                ),
                (
                    "decode: turbo region (RRC crop), all n/8",
                    turbo::ALL_SCALES,
                    false,
                ),
                (
                    "decode: turbo region to bottom, 1/8,1/4,1/2",
                    turbo::FAST_SCALES,
                    true,
                ),
            ] {
                let mut t = TurboDecoder::new().unwrap();
                jobs.push((
                    label.into(),
                    Box::new(move |b, sample| {
                        let h = t.read_header(b).unwrap();
                        let p = ConMimParams::sample(0, 0, sample, h.width, h.height);
                        let c = p.crop;
                        let opts = PlanOptions {
                            scales,
                            crop: true,
                            margin: REGION_MARGIN,
                        };
                        let mut plan = turbo::plan_crop(
                            h.width,
                            h.height,
                            h.mcu_width().unwrap(),
                            (c.top, c.left, c.height, c.width),
                            224,
                            224,
                            &opts,
                        );
                        if to_bottom {
                            plan.region.h = turbo::scaled(h.height, plan.num) - plan.region.y;
                        }
                        t.decode(&h, plan.num, plan.region).unwrap();
                    }),
                ));
            }
            // The other stages alone: probe (header + EOI check), crop + resize of a
            // decoded image over the same crop distribution.
            jobs.push((
                "probe only".into(),
                Box::new(move |b, _| {
                    probe_fast(b, &lim).unwrap();
                }),
            ));
            let decoded: Vec<(Vec<u8>, u32, u32)> = imgs
                .iter()
                .map(|b| {
                    let mut d = Decoder::new();
                    let (w, h) = d.decode_rgb(b, &lim).unwrap();
                    (d.rgb().to_vec(), w, h)
                })
                .collect();
            // Crop + resize (+ flip when the sample flips) to 224 from a full-res decode:
            // the Pillow port (AVX2 and portable) and the old fast_image_resize path
            // with the separate flip pass.
            let resize_jobs: [(&str, u8); 4] = [
                ("resize only: crop_resize to 224, no flip", 0),
                ("resize only: crop_resize + flip (fused)", 1),
                ("resize only: same, portable (no AVX2)", 2),
                ("resize only: old fast_image_resize + hflip", 3),
            ];
            for (label, kind) in resize_jobs {
                let decoded = decoded.clone();
                let mut resizer = if kind == 2 {
                    Resizer::portable()
                } else {
                    Resizer::new()
                };
                let mut old = crate::image::resize::fir::FirResizer::new();
                let mut o = vec![0u8; view_len];
                let mut next = 0usize;
                jobs.push((
                    label.into(),
                    Box::new(move |_, sample| {
                        let (px, w, h) = &decoded[next % decoded.len()];
                        next += 1;
                        let p = ConMimParams::sample(0, 0, sample, *w, *h);
                        let c = (p.crop.top, p.crop.left, p.crop.height, p.crop.width);
                        let flip = kind != 0 && p.flip;
                        if kind == 3 {
                            old.crop_resize(px, *w, *h, c, &mut o, 224, 224).unwrap();
                            if flip {
                                color::hflip(&mut o, 224, 224);
                            }
                        } else {
                            resizer
                                .crop_resize_flip(px, *w, *h, c, flip, &mut o, 224, 224)
                                .unwrap();
                        }
                    }),
                ));
            }
            // Whole weak view (train_view = decode + crop/resize to 224 + flip).
            let strategies: [(&str, DecodeStrategy); 7] = [
                ("zune full", DecodeStrategy::Full),
                (
                    "turbo full",
                    DecodeStrategy::Turbo {
                        scales: &[],
                        crop: false,
                    },
                ),
                (
                    "turbo scaled 1/8,1/4,1/2",
                    DecodeStrategy::Turbo {
                        scales: turbo::FAST_SCALES,
                        crop: false,
                    },
                ),
                (
                    "turbo scaled all n/8",
                    DecodeStrategy::Turbo {
                        scales: turbo::ALL_SCALES,
                        crop: false,
                    },
                ),
                (
                    "turbo region",
                    DecodeStrategy::Turbo {
                        scales: &[],
                        crop: true,
                    },
                ),
                ("turbo region + 1/8,1/4,1/2 (default)", DecodeStrategy::FAST),
                (
                    "turbo region + all n/8",
                    DecodeStrategy::Turbo {
                        scales: turbo::ALL_SCALES,
                        crop: true,
                    },
                ),
            ];
            for (label, strategy) in strategies {
                let mut vm = ViewMaker::with_strategy(strategy);
                let mut o = vec![0u8; view_len];
                jobs.push((
                    format!("weak view: {label}"),
                    Box::new(move |b, sample| {
                        vm.train_view(b, &lim, 0, 0, sample, 224, &mut o).unwrap();
                    }),
                ));
            }
            for (label, strategy) in [
                ("zune full", DecodeStrategy::Full),
                ("default", DecodeStrategy::FAST),
            ] {
                let mut vm = ViewMaker::with_strategy(strategy);
                let (mut w, mut s) = (vec![0u8; view_len], vec![0u8; view_len]);
                jobs.push((
                    format!("conmim_pair: {label}"),
                    Box::new(move |b, sample| {
                        vm.conmim_pair(b, &lim, 0, 0, sample, 224, &mut w, &mut s)
                            .unwrap();
                    }),
                ));
            }
            // Per job and round: img/s by wall clock and by this thread's CPU time (the
            // latter ignores time the thread spent descheduled on a busy machine).
            let mut wall: Vec<Vec<f64>> = vec![Vec::new(); jobs.len()];
            let mut cpu: Vec<Vec<f64>> = vec![Vec::new(); jobs.len()];
            for round in 0..rounds {
                for (j, (_, job)) in jobs.iter_mut().enumerate() {
                    // Warm-up, then time.
                    for i in 0..8 {
                        job(&imgs[i % imgs.len()], i as u64);
                    }
                    let (t, c) = (Instant::now(), thread_cpu());
                    for i in 0..iters {
                        let sample = round as u64 * iters + i;
                        job(&imgs[i as usize % imgs.len()], sample);
                    }
                    wall[j].push(iters as f64 / t.elapsed().as_secs_f64());
                    cpu[j].push(iters as f64 / (thread_cpu() - c).as_secs_f64());
                }
            }
            let best = |r: &[f64]| r.iter().cloned().fold(0.0, f64::max);
            let median = |r: &mut Vec<f64>| {
                r.sort_by(|a, b| a.partial_cmp(b).unwrap());
                r[r.len() / 2]
            };
            let zune_wall = best(&wall[0]);
            println!(
                "{:<52} {:>17} {:>12}",
                "img/s, one thread", "best round, wall", "median, CPU"
            );
            for (j, (label, _)) in jobs.iter().enumerate() {
                let w = best(&wall[j]);
                println!(
                    "{label:<52} {w:>7.0} ({:>4.0}%) {:>12.0}",
                    100.0 * w / zune_wall,
                    median(&mut cpu[j])
                );
            }
        }
    }
}
