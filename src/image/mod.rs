//! Images: the checks used while sharding here, and the loader's pixel paths in the
//! submodules: [`pixels`] (the whole-image decoder with reused buffers, zune-jpeg and the
//! `image` crate), [`turbo`] (libjpeg-turbo region and DCT-scaled decodes) and
//! [`resize`] (Pillow's resampler, bit for bit).
//!
//! The sharding checks, three levels of scrutiny from cheap to expensive:
//!
//! * [`probe`] ("copy mode"): format from the magic bytes (never from the file name),
//!   dimensions from the header, the size limits, and a cheap end-of-file check (the JPEG
//!   `EOI` marker / the PNG `IEND` chunk must be near the end), and at most
//!   [`MAX_JPEG_SCANS`] scans in a progressive JPEG. No pixel buffer is ever allocated,
//!   so a header that claims 100000x100000 is rejected in microseconds.
//! * [`decode_check`] (`--decode`): [`probe`] first, then every pixel is decoded. JPEG goes
//!   through `zune-jpeg` (grayscale, CMYK/YCCK and progressive files work), everything else
//!   through the `image` crate.
//! * [`reencode`]: shrinks originals whose longer side exceeds a bound and stores them as
//!   baseline JPEG.
//!
//! Nothing here does I/O or uses random numbers; every function is a pure function of the
//! bytes passed in.

pub mod pixels;
pub mod resize;
pub mod turbo;

use std::io::Cursor;

use zune_jpeg::JpegDecoder;
use zune_jpeg::errors::DecodeErrors;
use zune_jpeg::zune_core::bytestream::ZCursor;
use zune_jpeg::zune_core::colorspace::ColorSpace;
use zune_jpeg::zune_core::options::DecoderOptions;

/// PIL's `DecompressionBombError` threshold (twice `Image.MAX_IMAGE_PIXELS`).
pub const DEFAULT_MAX_PIXELS: u64 = 178_956_970;
/// Longest side accepted by default (JPEG cannot exceed 65535; WebP stops at 16383).
pub const DEFAULT_MAX_SIDE: u32 = 65_500;
/// Shortest side accepted by default.
pub const DEFAULT_MIN_SIDE: u32 = 1;

/// Most scans a progressive JPEG may have (libjpeg-turbo's own fuzz targets set
/// `TJPARAM_SCANLIMIT` to this). Encoders write about 10; every scan costs a pass over
/// the image's blocks, so a small file of thousands of tiny scans would take minutes to
/// decode: a decompression bomb that the pixel limits do not see.
pub const MAX_JPEG_SCANS: usize = 500;

/// How far from the end of the file the JPEG `EOI` marker / PNG `IEND` chunk may sit.
/// Real-world files (ImageNet included) carry some trailing garbage or zero padding.
const TAIL_WINDOW: usize = 4096;

/// An image container format recognised by its magic bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageFormat {
    Jpeg,
    Png,
    Gif,
    Webp,
    Bmp,
    Tiff,
}

impl ImageFormat {
    /// All supported formats.
    pub const ALL: [ImageFormat; 6] = [
        ImageFormat::Jpeg,
        ImageFormat::Png,
        ImageFormat::Gif,
        ImageFormat::Webp,
        ImageFormat::Bmp,
        ImageFormat::Tiff,
    ];

    /// WebDataset member extension (lowercase): `jpg`, `png`, `gif`, `webp`, `bmp`, `tiff`.
    pub fn ext(self) -> &'static str {
        match self {
            ImageFormat::Jpeg => "jpg",
            ImageFormat::Png => "png",
            ImageFormat::Gif => "gif",
            ImageFormat::Webp => "webp",
            ImageFormat::Bmp => "bmp",
            ImageFormat::Tiff => "tiff",
        }
    }

    /// Name used in the index `format` column: `jpeg`, `png`, `gif`, `webp`, `bmp`, `tiff`.
    pub fn name(self) -> &'static str {
        match self {
            ImageFormat::Jpeg => "jpeg",
            ImageFormat::Png => "png",
            ImageFormat::Gif => "gif",
            ImageFormat::Webp => "webp",
            ImageFormat::Bmp => "bmp",
            ImageFormat::Tiff => "tiff",
        }
    }

    /// Format for a file extension, case-insensitive, with or without a leading dot.
    /// Accepts `jpg`, `jpeg`, `png`, `gif`, `webp`, `bmp`, `tif` and `tiff`.
    ///
    /// This is only for choosing which files to look at; the format of the bytes is always
    /// decided by [`sniff`].
    pub fn from_ext(ext: &str) -> Option<Self> {
        let ext = ext.strip_prefix('.').unwrap_or(ext);
        let known = [
            ("jpg", ImageFormat::Jpeg),
            ("jpeg", ImageFormat::Jpeg),
            ("png", ImageFormat::Png),
            ("gif", ImageFormat::Gif),
            ("webp", ImageFormat::Webp),
            ("bmp", ImageFormat::Bmp),
            ("tif", ImageFormat::Tiff),
            ("tiff", ImageFormat::Tiff),
        ];
        known
            .iter()
            .find(|(name, _)| ext.eq_ignore_ascii_case(name))
            .map(|&(_, format)| format)
    }

    fn to_image_crate(self) -> image::ImageFormat {
        match self {
            ImageFormat::Jpeg => image::ImageFormat::Jpeg,
            ImageFormat::Png => image::ImageFormat::Png,
            ImageFormat::Gif => image::ImageFormat::Gif,
            ImageFormat::Webp => image::ImageFormat::WebP,
            ImageFormat::Bmp => image::ImageFormat::Bmp,
            ImageFormat::Tiff => image::ImageFormat::Tiff,
        }
    }
}

impl std::fmt::Display for ImageFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What [`probe`] learned about an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageInfo {
    pub format: ImageFormat,
    pub width: u32,
    pub height: u32,
}

impl ImageInfo {
    /// `width * height` without overflow.
    pub fn pixels(&self) -> u64 {
        u64::from(self.width) * u64::from(self.height)
    }
}

/// Size limits an input image must satisfy.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ImageLimits {
    /// Largest accepted `width * height`.
    pub max_pixels: u64,
    /// Largest accepted width or height.
    pub max_side: u32,
    /// Smallest accepted width or height.
    pub min_side: u32,
}

impl Default for ImageLimits {
    fn default() -> Self {
        ImageLimits {
            max_pixels: DEFAULT_MAX_PIXELS,
            max_side: DEFAULT_MAX_SIDE,
            min_side: DEFAULT_MIN_SIDE,
        }
    }
}

impl ImageLimits {
    /// Checks dimensions against the limits (a zero side is a broken header, not "too small").
    pub fn check(&self, width: u32, height: u32) -> Result<(), ImageProblem> {
        if width == 0 || height == 0 {
            return Err(ImageProblem::BadHeader(format!(
                "header declares a zero dimension ({width}x{height})"
            )));
        }
        if width > self.max_side
            || height > self.max_side
            || u64::from(width) * u64::from(height) > self.max_pixels
        {
            return Err(ImageProblem::TooLarge { width, height });
        }
        if width < self.min_side || height < self.min_side {
            return Err(ImageProblem::TooSmall { width, height });
        }
        Ok(())
    }
}

/// What is wrong with an input image. [`ImageProblem::code`] is a stable machine-readable
/// reason; `Display` is the human message.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ImageProblem {
    /// The file has 0 bytes.
    #[error("empty file (0 bytes)")]
    Empty,
    /// The leading bytes match no supported format.
    #[error("not an image: the leading bytes match none of JPEG, PNG, GIF, WebP, BMP, TIFF")]
    NotAnImage,
    /// The data ends before the image does.
    #[error("truncated image: {0}")]
    Truncated(String),
    /// A side exceeds `max_side` or the pixel count exceeds `max_pixels`.
    #[error(
        "image too large: {width}x{height} ({} pixels) exceeds the size limits",
        u64::from(*.width) * u64::from(*.height)
    )]
    TooLarge { width: u32, height: u32 },
    /// A side is below `min_side`.
    #[error("image too small: {width}x{height} has a side below the minimum")]
    TooSmall { width: u32, height: u32 },
    /// Re-encoding to the maximum side would leave a side below `min_side` (a long
    /// panorama, say). Code `too_small`, like [`ImageProblem::TooSmall`].
    #[error(
        "image too small once re-encoded: {from_width}x{from_height} fits the maximum side \
         as {width}x{height}, which has a side below the minimum"
    )]
    TooSmallReencoded {
        from_width: u32,
        from_height: u32,
        width: u32,
        height: u32,
    },
    /// The format was recognised but its header is unusable (or declares a zero dimension).
    #[error("bad image header: {0}")]
    BadHeader(String),
    /// The pixel data could not be decoded.
    #[error("cannot decode image: {0}")]
    Decode(String),
    /// Re-encoding failed.
    #[error("cannot encode image: {0}")]
    Encode(String),
}

impl ImageProblem {
    /// Every code [`ImageProblem::code`] can return.
    pub const CODES: [&'static str; 8] = [
        "empty",
        "not_image",
        "truncated",
        "too_large",
        "too_small",
        "bad_header",
        "decode_error",
        "encode_error",
    ];

    /// Stable machine-readable reason.
    pub fn code(&self) -> &'static str {
        match self {
            ImageProblem::Empty => "empty",
            ImageProblem::NotAnImage => "not_image",
            ImageProblem::Truncated(_) => "truncated",
            ImageProblem::TooLarge { .. } => "too_large",
            ImageProblem::TooSmall { .. } | ImageProblem::TooSmallReencoded { .. } => "too_small",
            ImageProblem::BadHeader(_) => "bad_header",
            ImageProblem::Decode(_) => "decode_error",
            ImageProblem::Encode(_) => "encode_error",
        }
    }
}

/// Format from the magic bytes alone (a PNG named `.JPEG` is a PNG).
pub fn sniff(bytes: &[u8]) -> Option<ImageFormat> {
    if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
        Some(ImageFormat::Jpeg)
    } else if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
        Some(ImageFormat::Png)
    } else if bytes.starts_with(b"GIF87a") || bytes.starts_with(b"GIF89a") {
        Some(ImageFormat::Gif)
    } else if is_webp(bytes) {
        Some(ImageFormat::Webp)
    } else if is_bmp(bytes) {
        Some(ImageFormat::Bmp)
    } else if bytes.starts_with(b"II*\0")
        || bytes.starts_with(b"MM\0*")
        || bytes.starts_with(b"II+\0")
        || bytes.starts_with(b"MM\0+")
    {
        Some(ImageFormat::Tiff)
    } else {
        None
    }
}

/// `RIFF <size> WEBP`; a file cut inside the 12-byte signature still counts once the
/// RIFF size is complete, so that it is reported as truncated rather than "not an image".
fn is_webp(bytes: &[u8]) -> bool {
    bytes.len() >= 8
        && bytes.starts_with(b"RIFF")
        && b"WEBP".starts_with(&bytes[8..bytes.len().min(12)])
}

/// "BM" is only two bytes (a text file may start with it), so also require a known DIB
/// header size when the bytes are long enough to hold one.
fn is_bmp(bytes: &[u8]) -> bool {
    if !bytes.starts_with(b"BM") {
        return false;
    }
    if bytes.len() < 18 {
        return true;
    }
    let dib = u32::from_le_bytes([bytes[14], bytes[15], bytes[16], bytes[17]]);
    matches!(dib, 12 | 16 | 40 | 52 | 56 | 64 | 108 | 124)
}

/// Header-only validation ("copy mode"): format by magic, dimensions from the header,
/// limits, and a cheap truncation check (JPEG `EOI` / PNG `IEND` within the last 4 KiB,
/// WebP: the RIFF size must fit in the file; GIF, BMP, TIFF: header only); a progressive
/// JPEG's scans are counted ([`MAX_JPEG_SCANS`]). Never allocates a pixel buffer.
pub fn probe(bytes: &[u8], limits: &ImageLimits) -> Result<ImageInfo, ImageProblem> {
    if bytes.is_empty() {
        return Err(ImageProblem::Empty);
    }
    let format = sniff(bytes).ok_or(ImageProblem::NotAnImage)?;
    let (width, height) = match format {
        ImageFormat::Jpeg => check_jpeg(bytes, &jpeg_header(bytes)?, limits)?,
        other => {
            let (width, height) = generic_dimensions(bytes, other)?;
            limits.check(width, height)?;
            if other == ImageFormat::Png && !png_has_iend(bytes) {
                return Err(ImageProblem::Truncated(format!(
                    "PNG has no IEND chunk in its last {TAIL_WINDOW} bytes ({} bytes in all)",
                    bytes.len()
                )));
            }
            if other == ImageFormat::Webp {
                let declared =
                    u64::from(u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]])) + 8;
                if declared > bytes.len() as u64 {
                    return Err(ImageProblem::Truncated(format!(
                        "WebP RIFF header declares {declared} bytes, the file has {}",
                        bytes.len()
                    )));
                }
            }
            (width, height)
        }
    };
    Ok(ImageInfo {
        format,
        width,
        height,
    })
}

/// [`probe`] for the loader's libjpeg-turbo path, which parses the header fully right
/// after: a JPEG's dimensions and first scan come from a walk over its marker segments
/// (nothing allocated; EXIF / ICC segments are skipped by their lengths) instead of
/// zune's header parser, which allocates and copies those segments per image. The same
/// checks follow. What the walk cannot read goes through [`probe`], so a bad file gets
/// the same verdict.
pub fn probe_fast(bytes: &[u8], limits: &ImageLimits) -> Result<ImageInfo, ImageProblem> {
    if sniff(bytes) == Some(ImageFormat::Jpeg)
        && let Some(header) = jpeg_header_walk(bytes)
    {
        let (width, height) = check_jpeg(bytes, &header, limits)?;
        return Ok(ImageInfo {
            format: ImageFormat::Jpeg,
            width,
            height,
        });
    }
    probe(bytes, limits)
}

/// [`probe`]'s JPEG checks after the header: the limits, the scan count of a progressive
/// file and the end-of-image marker. The dimensions.
fn check_jpeg(
    bytes: &[u8],
    header: &JpegHeader,
    limits: &ImageLimits,
) -> Result<(u32, u32), ImageProblem> {
    limits.check(header.width, header.height)?;
    if let JpegScans::Progressive(n) = jpeg_scans(bytes, MAX_JPEG_SCANS + 1)
        && n > MAX_JPEG_SCANS
    {
        return Err(ImageProblem::BadHeader(format!(
            "progressive JPEG with more than {MAX_JPEG_SCANS} scans (real encoders \
             write about 10; so many would cost minutes of decoding)"
        )));
    }
    if !jpeg_has_eoi(bytes, header.scan_start) {
        return Err(ImageProblem::Truncated(format!(
            "JPEG has no end-of-image marker (FF D9) in its last {TAIL_WINDOW} bytes \
             ({} bytes in all)",
            bytes.len()
        )));
    }
    Ok((header.width, header.height))
}

/// Full decode ("`--decode`" validation): [`probe`] first (so the limits hold before any
/// allocation), then every pixel is decoded.
///
/// JPEG: `zune-jpeg` in strict mode, so running out of data is an error rather than grey
/// padding; if strict mode objects to something else (extra bytes before a marker, a
/// corrupt Huffman code...) the file is decoded again leniently and accepted if that works,
/// which matches what libjpeg/PIL accept with a warning.
/// Other formats: the `image` crate (GIF: the first frame, as PIL would show it).
pub fn decode_check(bytes: &[u8], limits: &ImageLimits) -> Result<ImageInfo, ImageProblem> {
    let info = probe(bytes, limits)?;
    match info.format {
        ImageFormat::Jpeg => {
            decode_jpeg(bytes, &info)?;
        }
        other => {
            decode_generic(bytes, other, &info)?;
        }
    }
    Ok(info)
}

/// Optional re-encoding of large originals.
///
/// If `max(width, height) > max_side` the image is decoded, resized so that the longer
/// side is exactly `max_side` (aspect ratio kept; a box pre-shrink then Lanczos3), converted
/// to RGB8 (grayscale stays Luma8; alpha is dropped, CMYK converted) and encoded as baseline
/// JPEG at `quality` (clamped to 1..=100). Returns `Ok(None)` when the image already fits,
/// in which case the caller keeps the original bytes. Orientation metadata and ICC profiles
/// are not carried over.
pub fn reencode(
    bytes: &[u8],
    limits: &ImageLimits,
    max_side: u32,
    quality: u8,
) -> Result<Option<(Vec<u8>, ImageInfo)>, ImageProblem> {
    let info = probe(bytes, limits)?;
    if info.width.max(info.height) <= max_side {
        return Ok(None);
    }
    if max_side == 0 {
        return Err(ImageProblem::Encode("max_side must be at least 1".into()));
    }
    let (new_w, new_h) = fit_within(info.width, info.height, max_side);
    if new_w > u32::from(u16::MAX) || new_h > u32::from(u16::MAX) {
        return Err(ImageProblem::Encode(format!(
            "{new_w}x{new_h} does not fit in a JPEG (65535 pixels per side at most)"
        )));
    }

    let decoded = match info.format {
        ImageFormat::Jpeg => {
            let jpeg = decode_jpeg(bytes, &info)?;
            if jpeg.gray {
                Pixels::Gray(
                    image::GrayImage::from_raw(info.width, info.height, jpeg.pixels)
                        .ok_or_else(|| ImageProblem::Decode("short pixel buffer".into()))?,
                )
            } else {
                Pixels::Rgb(
                    image::RgbImage::from_raw(info.width, info.height, jpeg.pixels)
                        .ok_or_else(|| ImageProblem::Decode("short pixel buffer".into()))?,
                )
            }
        }
        other => {
            let img = decode_generic(bytes, other, &info)?;
            if img.color().has_color() {
                Pixels::Rgb(img.to_rgb8())
            } else {
                Pixels::Gray(img.to_luma8())
            }
        }
    };

    let quality = quality.clamp(1, 100);
    let mut out = Vec::new();
    let encoder = jpeg_encoder::Encoder::new(&mut out, quality);
    let result = match decoded {
        Pixels::Rgb(img) => {
            let small = shrink(&img, new_w, new_h);
            encoder.encode(
                small.as_raw(),
                new_w as u16,
                new_h as u16,
                jpeg_encoder::ColorType::Rgb,
            )
        }
        Pixels::Gray(img) => {
            let small = shrink(&img, new_w, new_h);
            encoder.encode(
                small.as_raw(),
                new_w as u16,
                new_h as u16,
                jpeg_encoder::ColorType::Luma,
            )
        }
    };
    result.map_err(|e| ImageProblem::Encode(e.to_string()))?;
    Ok(Some((
        out,
        ImageInfo {
            format: ImageFormat::Jpeg,
            width: new_w,
            height: new_h,
        },
    )))
}

/// Dimensions with the longer side equal to `max_side`, aspect ratio kept (rounded, >= 1).
fn fit_within(width: u32, height: u32, max_side: u32) -> (u32, u32) {
    let scale = |short: u32, long: u32| -> u32 {
        let v = (u64::from(short) * u64::from(max_side) + u64::from(long) / 2) / u64::from(long);
        v.clamp(1, u64::from(max_side)) as u32
    };
    if width >= height {
        (max_side, scale(height, width))
    } else {
        (scale(width, height), max_side)
    }
}

enum Pixels {
    Rgb(image::RgbImage),
    Gray(image::GrayImage),
}

/// Downscale: an area-average pre-shrink to about twice the target (cheap, exact box
/// filter) when the factor is large, then Lanczos3 for the final step.
fn shrink<P>(
    img: &image::ImageBuffer<P, Vec<u8>>,
    new_w: u32,
    new_h: u32,
) -> image::ImageBuffer<P, Vec<u8>>
where
    P: image::Pixel<Subpixel = u8> + 'static,
{
    use image::imageops::{FilterType, resize, thumbnail};
    let (w, h) = img.dimensions();
    let (mid_w, mid_h) = (new_w.saturating_mul(2), new_h.saturating_mul(2));
    if w >= new_w.saturating_mul(4) && h >= new_h.saturating_mul(4) {
        let mid = thumbnail(img, mid_w, mid_h);
        resize(&mid, new_w, new_h, FilterType::Lanczos3)
    } else {
        resize(img, new_w, new_h, FilterType::Lanczos3)
    }
}

// ---------------------------------------------------------------- JPEG

struct JpegHeader {
    width: u32,
    height: u32,
    /// Offset of the first entropy-coded byte (just after the first SOS segment).
    scan_start: usize,
}

fn jpeg_options() -> DecoderOptions {
    // zune's default limit is 16384 per side; the caller's ImageLimits decide instead.
    DecoderOptions::default()
        .set_max_width(usize::from(u16::MAX))
        .set_max_height(usize::from(u16::MAX))
}

/// Parses the JPEG markers up to and including the first SOS: no pixel data is touched.
fn jpeg_header(bytes: &[u8]) -> Result<JpegHeader, ImageProblem> {
    let mut cursor = Cursor::new(bytes);
    let (width, height) = {
        // `&mut Cursor` is BufRead + Seek, so zune reads through it and leaves the
        // position right after the SOS header.
        let mut decoder = JpegDecoder::new_with_options(&mut cursor, jpeg_options());
        decoder
            .decode_headers()
            .map_err(|e| jpeg_problem(e, true))?;
        decoder
            .dimensions()
            .ok_or_else(|| ImageProblem::BadHeader("JPEG header without dimensions".into()))?
    };
    let scan_start = usize::try_from(cursor.position()).unwrap_or(bytes.len());
    Ok(JpegHeader {
        width: width as u32,
        height: height as u32,
        scan_start,
    })
}

/// The next marker segment of a JPEG at or after byte `i` (the walk starts after SOI, at
/// 2): `(marker, length field)`, with `i` left on the segment's `FF`; `None` at EOI or
/// where the data ends. Garbage between segments, fill bytes and the markers without a
/// length (TEM, RSTn, SOI) are stepped over, as libjpeg does. The caller moves on by
/// `2 + length` (and, after an SOS, over the entropy-coded data).
pub(crate) fn next_segment(bytes: &[u8], i: &mut usize) -> Option<(u8, usize)> {
    while *i + 1 < bytes.len() {
        if bytes[*i] != 0xFF {
            // Garbage between segments (libjpeg skips it with a warning).
            *i += 1;
            continue;
        }
        let marker = bytes[*i + 1];
        match marker {
            0xFF => {
                *i += 1; // fill byte
                continue;
            }
            0x00 | 0x01 | 0xD0..=0xD8 => {
                *i += 2; // no length field
                continue;
            }
            0xD9 => return None, // EOI
            _ => {}
        }
        let len = bytes.get(*i + 2..*i + 4)?;
        return Some((marker, usize::from(u16::from_be_bytes([len[0], len[1]]))));
    }
    None
}

/// [`jpeg_header`] from the marker segments alone: the dimensions of the first frame
/// header (SOFn) and the end of the first scan header. `None` where the walk finds no
/// frame before a scan, a zero dimension (a height defined later by DNL) or a cut
/// segment: [`jpeg_header`] decides those.
fn jpeg_header_walk(bytes: &[u8]) -> Option<JpegHeader> {
    let mut i = 2; // after SOI
    let mut dims = None;
    while let Some((marker, len)) = next_segment(bytes, &mut i) {
        match marker {
            0xC0..=0xC3 | 0xC5..=0xC7 | 0xC9..=0xCB | 0xCD..=0xCF if dims.is_none() => {
                // P, Y (height), X (width), ...
                let seg = bytes.get(i + 4..i + 2 + len)?;
                let height = u32::from(u16::from_be_bytes([*seg.get(1)?, *seg.get(2)?]));
                let width = u32::from(u16::from_be_bytes([*seg.get(3)?, *seg.get(4)?]));
                if width == 0 || height == 0 {
                    return None;
                }
                dims = Some((width, height));
            }
            0xDA => {
                let (width, height) = dims?;
                let scan_start = i + 2 + len;
                return (scan_start <= bytes.len()).then_some(JpegHeader {
                    width,
                    height,
                    scan_start,
                });
            }
            _ => {}
        }
        i += 2 + len;
    }
    None
}

/// What [`jpeg_scans`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum JpegScans {
    /// A sequential (baseline, extended or lossless) frame: not counted.
    Sequential,
    /// A progressive frame (SOF2, 6, 10, 14) with this many scans (`SOS` markers), up to
    /// the count asked for.
    Progressive(usize),
    /// No frame header before the data ends.
    Unknown,
}

/// The frame kind of a JPEG and, when progressive, its scans, counted up to `most`, from
/// the markers: segments are skipped by their lengths (so bytes inside an EXIF block or
/// a thumbnail never count) and the entropy-coded data after each scan header up to the
/// next marker (0xFF in it is always followed by 0x00 or a restart marker). A sequential
/// frame returns at its header; only progressive files are walked to the end.
fn jpeg_scans(bytes: &[u8], most: usize) -> JpegScans {
    let mut i = 2; // after SOI
    let mut scans = 0;
    let mut progressive = false;
    while let Some((marker, len)) = next_segment(bytes, &mut i) {
        match marker {
            0xC2 | 0xC6 | 0xCA | 0xCE => progressive = true,
            0xC0 | 0xC1 | 0xC3 | 0xC5 | 0xC7 | 0xC9 | 0xCB | 0xCD | 0xCF => {
                return JpegScans::Sequential;
            }
            _ => {}
        }
        i += 2 + len;
        if marker != 0xDA {
            continue;
        }
        scans += 1;
        if scans >= most {
            break;
        }
        // The entropy-coded data: on to the next real marker.
        loop {
            match bytes.get(i..).and_then(|rest| memchr::memchr(0xFF, rest)) {
                Some(at) => i += at,
                None => {
                    i = bytes.len();
                    break;
                }
            }
            match bytes.get(i + 1) {
                Some(0x00 | 0xD0..=0xD7) => i += 2,
                _ => break,
            }
        }
    }
    if progressive {
        JpegScans::Progressive(scans)
    } else {
        JpegScans::Unknown
    }
}

/// Is there an `FF D9` after the first scan header, at most [`TAIL_WINDOW`] bytes before
/// the end? (Entropy-coded data never contains `FF D9`: 0xFF is stuffed as `FF 00`. An EXIF
/// thumbnail's EOI sits before the first SOS, so it cannot fake a complete file.)
fn jpeg_has_eoi(bytes: &[u8], scan_start: usize) -> bool {
    let from = bytes
        .len()
        .saturating_sub(TAIL_WINDOW + 2)
        .max(scan_start.min(bytes.len()));
    bytes[from..].windows(2).any(|w| w == [0xFF, 0xD9])
}

struct DecodedJpeg {
    pixels: Vec<u8>,
    gray: bool,
}

fn decode_jpeg(bytes: &[u8], info: &ImageInfo) -> Result<DecodedJpeg, ImageProblem> {
    // Learn the input colour space to keep grayscale as one channel.
    let gray = {
        let mut decoder = JpegDecoder::new_with_options(ZCursor::new(bytes), jpeg_options());
        decoder
            .decode_headers()
            .map_err(|e| jpeg_problem(e, true))?;
        matches!(decoder.input_colorspace(), Some(ColorSpace::Luma))
    };
    let out = if gray {
        ColorSpace::Luma
    } else {
        ColorSpace::RGB
    };
    let options = jpeg_options().jpeg_set_out_colorspace(out);
    let pixels =
        match JpegDecoder::new_with_options(ZCursor::new(bytes), options.set_strict_mode(true))
            .decode()
        {
            Ok(pixels) => pixels,
            Err(strict) if is_jpeg_truncation(&strict) => {
                return Err(ImageProblem::Truncated(strict.to_string()));
            }
            // Non-conformance strict mode rejects but libjpeg/PIL accept with a warning.
            Err(_) => JpegDecoder::new_with_options(ZCursor::new(bytes), options)
                .decode()
                .map_err(|e| jpeg_problem(e, false))?,
        };
    let expected = info.pixels() as usize * out.num_components();
    if pixels.len() != expected {
        return Err(ImageProblem::Decode(format!(
            "decoder returned {} bytes, expected {expected}",
            pixels.len()
        )));
    }
    Ok(DecodedJpeg { pixels, gray })
}

fn is_jpeg_truncation(e: &DecodeErrors) -> bool {
    match e {
        DecodeErrors::ExhaustedData => true,
        DecodeErrors::IoErrors(io) => io.is_recoverable_eof(),
        other => {
            let msg = other.to_string().to_ascii_lowercase();
            // "Code length N more than bits left M": a Huffman code cut off by the end of data.
            msg.contains("premature end") || msg.contains("more than bits left")
        }
    }
}

fn jpeg_problem(e: DecodeErrors, in_header: bool) -> ImageProblem {
    if is_jpeg_truncation(&e) {
        ImageProblem::Truncated(e.to_string())
    } else if in_header {
        ImageProblem::BadHeader(e.to_string())
    } else {
        ImageProblem::Decode(e.to_string())
    }
}

// ---------------------------------------------------------------- PNG and the rest

/// `IEND` chunk type within the last [`TAIL_WINDOW`] bytes (and after the 8-byte
/// signature + IHDR chunk).
fn png_has_iend(bytes: &[u8]) -> bool {
    const HEADER: usize = 8 + 25;
    if bytes.len() < HEADER + 12 {
        return false;
    }
    let from = bytes.len().saturating_sub(TAIL_WINDOW + 12).max(HEADER);
    bytes[from..].windows(4).any(|w| w == b"IEND")
}

/// Header-only dimensions through the `image` crate (the decoders read their headers on
/// construction and allocate no pixels).
fn generic_dimensions(bytes: &[u8], format: ImageFormat) -> Result<(u32, u32), ImageProblem> {
    let mut reader = image::ImageReader::with_format(Cursor::new(bytes), format.to_image_crate());
    // Our own limits are applied afterwards; the crate's defaults must not interfere.
    reader.no_limits();
    reader.into_dimensions().map_err(|e| image_problem(e, true))
}

fn decode_generic(
    bytes: &[u8],
    format: ImageFormat,
    info: &ImageInfo,
) -> Result<image::DynamicImage, ImageProblem> {
    let mut reader = image::ImageReader::with_format(Cursor::new(bytes), format.to_image_crate());
    let mut crate_limits = image::Limits::default();
    crate_limits.max_image_width = Some(info.width);
    crate_limits.max_image_height = Some(info.height);
    // 16-bit RGBA (8 bytes per pixel) plus room for the decoder's own buffers.
    crate_limits.max_alloc = Some(info.pixels().saturating_mul(8).saturating_add(64 << 20));
    reader.limits(crate_limits);
    let img = reader.decode().map_err(|e| image_problem(e, false))?;
    if (img.width(), img.height()) != (info.width, info.height) {
        return Err(ImageProblem::Decode(format!(
            "decoded {}x{} but the header says {}x{}",
            img.width(),
            img.height(),
            info.width,
            info.height
        )));
    }
    Ok(img)
}

fn image_problem(e: image::ImageError, in_header: bool) -> ImageProblem {
    use image::ImageError;
    let msg = e.to_string();
    let lower = msg.to_ascii_lowercase();
    let eof = match &e {
        ImageError::IoError(io) => io.kind() == std::io::ErrorKind::UnexpectedEof,
        _ => false,
    } || lower.contains("unexpected end")
        || lower.contains("unexpected eof")
        || lower.contains("end of file")
        || lower.contains("truncated")
        || lower.contains("failed to fill whole buffer");
    if eof {
        ImageProblem::Truncated(msg)
    } else if in_header {
        ImageProblem::BadHeader(msg)
    } else {
        ImageProblem::Decode(msg)
    }
}

#[cfg(test)]
mod tests;
