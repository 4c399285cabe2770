//! Reduced-resolution and region JPEG decoding with libjpeg-turbo (the TurboJPEG 3 API
//! through `turbojpeg-sys`, which builds the bundled libjpeg-turbo 3.1 with cmake + nasm).
//!
//! Two libjpeg-turbo features make a random-resized crop cheaper than "decode everything,
//! then crop":
//! * **DCT scaling** (`tj3SetScalingFactor`): the inverse DCT produces `n/8` of the pixels
//!   of each block directly (n = 1..8), so a crop that will be shrunk anyway can be decoded
//!   at, e.g., half resolution. The scaled image is `ceil(W * n / 8)` x `ceil(H * n / 8)`,
//!   and scaled pixel `i` covers full-resolution pixels `[i * 8 / n, (i + 1) * 8 / n)`, so a
//!   full-resolution coordinate `x` maps to `x * n / 8`.
//! * **Cropping** (`tj3SetCroppingRegion`): only the iMCU columns that overlap the region
//!   are inverse-transformed, upsampled and colour-converted, and rows above / below it are
//!   skipped. Entropy (Huffman) decoding still covers the whole width, and the rows above
//!   the region; rows below it are not read at all for a baseline JPEG (progressive files
//!   are entropy-decoded completely before any row comes out).
//!
//! [`TurboDecoder`] is a small safe wrapper: one TurboJPEG handle and one output buffer,
//! both reused across images (libjpeg-turbo still allocates its per-image working memory
//! internally, as zune does). Warnings are errors (`TJPARAM_STOPONWARNING`), so corrupt or
//! truncated data never comes back as grey padding; callers fall back to the zune path,
//! which classifies the problem (see [`super::pixels`]).
//!
//! [`plan_crop`] turns a full-resolution crop box and an output size into a scale factor,
//! a decode region and the (fractional) box to resize inside the decoded buffer.

use std::ffi::{CStr, c_int};
use std::fmt;

use turbojpeg_sys as tj;

use super::resize::CropBox;

/// A header read by [`TurboDecoder::read_header`], borrowing the bytes it was read from
/// until [`TurboDecoder::decode`] decodes them: the region and the buffer size are
/// planned from this header, so the bytes must not change in between (a reused buffer
/// refilled with another image of the same length would otherwise be decoded past the
/// end of the pixel buffer). Dereferences to the [`TurboHeader`].
#[derive(Debug, Clone, Copy)]
pub struct ParsedHeader<'b> {
    header: TurboHeader,
    bytes: &'b [u8],
    seq: u64,
}

impl std::ops::Deref for ParsedHeader<'_> {
    type Target = TurboHeader;
    fn deref(&self) -> &TurboHeader {
        &self.header
    }
}

/// What [`TurboDecoder::read_header`] learned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TurboHeader {
    pub width: u32,
    pub height: u32,
    /// `TJSAMP_*` (-1 = unknown / unusual sampling factors).
    pub subsamp: i32,
    /// `TJCS_*`.
    pub colorspace: i32,
    /// Bits per sample (8 for ordinary JPEGs).
    pub precision: i32,
    pub lossless: bool,
    pub progressive: bool,
    /// The largest horizontal sampling factor of the frame's components (from the SOF
    /// segment; 1 when it cannot be read).
    pub max_h_samp: u32,
}

/// The largest horizontal sampling factor in the frame header (SOFn) of `bytes`, found by
/// walking the marker segments by their lengths; `None` without a readable SOF before the
/// first scan.
pub fn sof_max_h_samp(bytes: &[u8]) -> Option<u32> {
    let mut i = 2; // after SOI
    while let Some((marker, len)) = super::next_segment(bytes, &mut i) {
        match marker {
            0xDA => return None, // a scan before any frame header
            0xC0..=0xC3 | 0xC5..=0xC7 | 0xC9..=0xCB | 0xCD..=0xCF => {
                let seg = bytes.get(i + 4..i + 2 + len)?;
                let n = usize::from(*seg.get(5)?);
                let comps = seg.get(6..6 + 3 * n)?;
                return comps.chunks_exact(3).map(|c| u32::from(c[1] >> 4)).max();
            }
            _ => i += 2 + len,
        }
    }
    None
}

impl TurboHeader {
    /// Can this file be decoded to RGB8 with scaling and cropping? (8-bit lossy YCbCr, RGB
    /// or grayscale with known subsampling; CMYK/YCCK, 12-bit and lossless files are left
    /// to zune.)
    pub fn supports_fast_path(&self) -> bool {
        let cs = self.colorspace as u32;
        self.precision == 8
            && !self.lossless
            && self.mcu_width().is_some()
            && (cs == tj::TJCS_TJCS_YCbCr || cs == tj::TJCS_TJCS_RGB || cs == tj::TJCS_TJCS_GRAY)
    }

    /// Width of an iMCU in full-resolution pixels, `None` when unknown: what libjpeg aligns
    /// a crop's left edge to (`jpeg_crop_scanline`: the DCT size times the largest
    /// horizontal sampling factor, one DCT block for grayscale). That is `tjMCUWidth` of
    /// the subsampling, except for frames whose factors are all scaled alike (e.g. every
    /// component 2x1): TurboJPEG names them by their ratios (4:4:4) while the iMCU is
    /// wider, and a crop aligned to the ratio's width failed.
    pub fn mcu_width(&self) -> Option<u32> {
        let table = match self.subsamp {
            0 => Some(8),  // 4:4:4
            1 => Some(16), // 4:2:2
            2 => Some(16), // 4:2:0
            3 => Some(8),  // gray
            4 => Some(8),  // 4:4:0
            5 => Some(32), // 4:1:1
            6 => Some(8),  // 4:4:1
            _ => None,
        };
        if self.subsamp == 3 {
            return table;
        }
        table.map(|w| w.max(8 * self.max_h_samp))
    }
}

/// `TJSCALED(dim, n/8)`: `ceil(dim * n / 8)`.
pub fn scaled(dim: u32, num: u32) -> u32 {
    ((u64::from(dim) * u64::from(num)).div_ceil(8)) as u32
}

/// A rectangle in the scaled image: columns `x..x + w`, rows `y..y + h`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    pub x: u32,
    pub y: u32,
    pub w: u32,
    pub h: u32,
}

/// How to decode and resize one crop (see [`plan_crop`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CropPlan {
    /// Scale factor `num / 8`, `num` in `1..=8`.
    pub num: u32,
    /// The part of the scaled image to decode (the whole scaled image when not cropping).
    pub region: Region,
    /// Integer box `(top, left, height, width)` inside the decoded buffer that contains
    /// the crop (the crop's outward-rounded hull); the resize filter reads nothing outside.
    pub view: CropBox,
    /// The exact crop inside `view`: `(left, top, width, height)`, fractional when
    /// `num < 8`, `(0, 0, view width, view height)` when `num == 8`.
    pub frac: (f64, f64, f64, f64),
}

/// Which reductions [`plan_crop`] may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlanOptions {
    /// Allowed scale numerators (over 8) below 8, tried from the smallest.
    pub scales: &'static [u32],
    /// Decode only the region around the crop.
    pub crop: bool,
    /// Extra scaled pixels decoded on each side of the crop, so that chroma upsampling at
    /// the edges of the decoded region sees the same neighbours as in a full decode.
    pub margin: u32,
}

/// The scale factors libjpeg-turbo's SIMD code covers best (the 8x8, 4x4, 2x2 and 1x1
/// inverse DCTs); 7/8, 3/4, 5/8 and 3/8 use scalar IDCTs.
pub const FAST_SCALES: &[u32] = &[1, 2, 4];
/// Every reduction libjpeg-turbo offers.
pub const ALL_SCALES: &[u32] = &[1, 2, 3, 4, 5, 6, 7];

/// Plans the decode of the full-resolution crop `crop = (top, left, height, width)` of a
/// `width` x `height` JPEG whose iMCU is `mcu_w` pixels wide, for an `out_w` x `out_h`
/// output.
///
/// The scale is the smallest allowed `n/8` for which the scaled crop still has at least
/// `out_w` x `out_h` pixels (so the resize stays a downscale, as at full resolution); 8/8
/// when none qualifies. With `opts.crop`, the decoded region is the crop's scaled hull plus
/// `opts.margin` pixels on each side, its left edge rounded down to the scaled iMCU width
/// (libjpeg-turbo's requirement), clamped to the image.
#[allow(clippy::too_many_arguments)]
pub fn plan_crop(
    width: u32,
    height: u32,
    mcu_w: u32,
    crop: CropBox,
    out_w: u32,
    out_h: u32,
    opts: &PlanOptions,
) -> CropPlan {
    let (top, left, ch, cw) = crop;
    let num = opts
        .scales
        .iter()
        .copied()
        .filter(|&n| (1..8).contains(&n))
        .filter(|&n| u64::from(cw) * u64::from(n) >= u64::from(out_w) * 8)
        .filter(|&n| u64::from(ch) * u64::from(n) >= u64::from(out_h) * 8)
        .min()
        .unwrap_or(8);
    let (sw, sh) = (scaled(width, num), scaled(height, num));
    let s = f64::from(num) / 8.0;
    // The crop in scaled coordinates (exact), and its integer hull.
    let (fl, ft) = (f64::from(left) * s, f64::from(top) * s);
    let (fw, fh) = (f64::from(cw) * s, f64::from(ch) * s);
    let hx0 = (fl.floor() as u32).min(sw.saturating_sub(1));
    let hy0 = (ft.floor() as u32).min(sh.saturating_sub(1));
    let hx1 = ((fl + fw).ceil() as u32).clamp(hx0 + 1, sw);
    let hy1 = ((ft + fh).ceil() as u32).clamp(hy0 + 1, sh);
    let region = if opts.crop {
        let align = scaled(mcu_w, num).max(1);
        let x0 = hx0.saturating_sub(opts.margin) / align * align;
        let y0 = hy0.saturating_sub(opts.margin);
        let x1 = (hx1 + opts.margin).min(sw);
        let y1 = (hy1 + opts.margin).min(sh);
        Region {
            x: x0,
            y: y0,
            w: x1 - x0,
            h: y1 - y0,
        }
    } else {
        Region {
            x: 0,
            y: 0,
            w: sw,
            h: sh,
        }
    };
    let view = (hy0 - region.y, hx0 - region.x, hy1 - hy0, hx1 - hx0);
    let frac = if num == 8 {
        (0.0, 0.0, f64::from(hx1 - hx0), f64::from(hy1 - hy0))
    } else {
        (fl - f64::from(hx0), ft - f64::from(hy0), fw, fh)
    };
    CropPlan {
        num,
        region,
        view,
        frac,
    }
}

/// A TurboJPEG decompression handle plus a reusable RGB8 output buffer.
pub struct TurboDecoder {
    handle: tj::tjhandle,
    buf: Vec<u8>,
    len: usize,
    width: u32,
    height: u32,
    /// Number of the last [`TurboDecoder::read_header`] call, while its header is the
    /// one libjpeg-turbo holds (`None` once a decode used it or a read failed): a
    /// [`ParsedHeader`] of any other call, of this decoder or another, is refused.
    header_seq: Option<u64>,
}

/// Numbers every [`TurboDecoder::read_header`] call of the process, so that a header read
/// by one decoder can never pass for the one another decoder holds.
static HEADER_READS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

// SAFETY: a TurboJPEG handle may be used from any thread, one thread at a time; the
// wrapper needs `&mut self` for every call.
unsafe impl Send for TurboDecoder {}

impl fmt::Debug for TurboDecoder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TurboDecoder")
            .field("capacity", &self.buf.capacity())
            .field("width", &self.width)
            .field("height", &self.height)
            .finish_non_exhaustive()
    }
}

impl Drop for TurboDecoder {
    fn drop(&mut self) {
        // SAFETY: the handle came from tj3Init and is destroyed once.
        unsafe { tj::tj3Destroy(self.handle) };
    }
}

impl TurboDecoder {
    /// A decompressor that treats every libjpeg warning (corrupt or missing data) as an
    /// error. Fails only if libjpeg-turbo cannot allocate its handle.
    pub fn new() -> Result<Self, String> {
        // SAFETY: plain FFI constructor; a null result is handled.
        let handle = unsafe { tj::tj3Init(tj::TJINIT_TJINIT_DECOMPRESS as c_int) };
        if handle.is_null() {
            return Err("tj3Init failed".into());
        }
        let mut d = TurboDecoder {
            handle,
            buf: Vec::new(),
            len: 0,
            width: 0,
            height: 0,
            header_seq: None,
        };
        d.set(tj::TJPARAM_TJPARAM_STOPONWARNING, 1)?;
        Ok(d)
    }

    fn error(&self) -> String {
        // SAFETY: tj3GetErrorStr returns a NUL-terminated string owned by the handle.
        unsafe { CStr::from_ptr(tj::tj3GetErrorStr(self.handle)) }
            .to_string_lossy()
            .trim()
            .to_string()
    }

    fn check(&self, rc: c_int) -> Result<(), String> {
        if rc == 0 { Ok(()) } else { Err(self.error()) }
    }

    fn set(&mut self, param: tj::TJPARAM, value: c_int) -> Result<(), String> {
        // SAFETY: valid handle; the parameter ids come from the bindings.
        let rc = unsafe { tj::tj3Set(self.handle, param as c_int, value) };
        self.check(rc)
    }

    fn get(&self, param: tj::TJPARAM) -> c_int {
        // SAFETY: valid handle.
        unsafe { tj::tj3Get(self.handle, param as c_int) }
    }

    /// Parses the JPEG header of `bytes` (no pixel data). The result borrows `bytes`, so
    /// they cannot change before [`TurboDecoder::decode`] decodes them.
    pub fn read_header<'b>(&mut self, bytes: &'b [u8]) -> Result<ParsedHeader<'b>, String> {
        self.header_seq = None;
        if bytes.is_empty() {
            return Err("empty JPEG".into());
        }
        // SAFETY: the pointer/length pair describes `bytes`, which outlives the call.
        let rc = unsafe {
            tj::tj3DecompressHeader(self.handle, bytes.as_ptr(), bytes.len() as tj::size_t)
        };
        self.check(rc)?;
        let dim = |v: c_int, what: &str| {
            u32::try_from(v)
                .ok()
                .filter(|&v| v > 0)
                .ok_or_else(|| format!("bad JPEG {what} {v}"))
        };
        let header = TurboHeader {
            width: dim(self.get(tj::TJPARAM_TJPARAM_JPEGWIDTH), "width")?,
            height: dim(self.get(tj::TJPARAM_TJPARAM_JPEGHEIGHT), "height")?,
            subsamp: self.get(tj::TJPARAM_TJPARAM_SUBSAMP),
            colorspace: self.get(tj::TJPARAM_TJPARAM_COLORSPACE),
            precision: self.get(tj::TJPARAM_TJPARAM_PRECISION),
            lossless: self.get(tj::TJPARAM_TJPARAM_LOSSLESS) != 0,
            progressive: self.get(tj::TJPARAM_TJPARAM_PROGRESSIVE) != 0,
            max_h_samp: sof_max_h_samp(bytes).unwrap_or(1).max(1),
        };
        let seq = HEADER_READS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.header_seq = Some(seq);
        Ok(ParsedHeader { header, bytes, seq })
    }

    /// Decodes `region` of the image whose header `parsed` is, scaled by `num / 8`, to
    /// RGB8 in the internal buffer (see [`TurboDecoder::rgb`]) and returns the region's
    /// `(width, height)`.
    ///
    /// `parsed` must come from this decoder's last [`TurboDecoder::read_header`] (libjpeg
    /// holds that header), and each header decodes once; `region.x` must be a multiple of
    /// the scaled iMCU width (as [`plan_crop`] makes it). On error (including any libjpeg
    /// warning) `rgb()` is empty.
    pub fn decode(
        &mut self,
        parsed: &ParsedHeader<'_>,
        num: u32,
        region: Region,
    ) -> Result<(u32, u32), String> {
        self.len = 0;
        self.width = 0;
        self.height = 0;
        if self.header_seq.take() != Some(parsed.seq) {
            return Err("TurboDecoder::decode: not the header this decoder read last".into());
        }
        let bytes = parsed.bytes;
        if !(1..=8).contains(&num) {
            return Err(format!("unsupported scale {num}/8"));
        }
        // libjpeg-turbo only accepts the reduced fractions of its table (1/2, not 4/8).
        let g = [8u32, 4, 2, 1]
            .into_iter()
            .find(|&g| num.is_multiple_of(g))
            .unwrap_or(1);
        let factor = tj::tjscalingfactor {
            num: (num / g) as c_int,
            denom: (8 / g) as c_int,
        };
        // SAFETY: valid handle, plain struct argument.
        let rc = unsafe { tj::tj3SetScalingFactor(self.handle, factor) };
        self.check(rc)?;
        let full_w = scaled(self.get(tj::TJPARAM_TJPARAM_JPEGWIDTH).max(0) as u32, num);
        let full_h = scaled(self.get(tj::TJPARAM_TJPARAM_JPEGHEIGHT).max(0) as u32, num);
        if region.w == 0
            || region.h == 0
            || region.x.checked_add(region.w).is_none_or(|r| r > full_w)
            || region.y.checked_add(region.h).is_none_or(|b| b > full_h)
        {
            return Err(format!(
                "region {region:?} outside the {full_w}x{full_h} scaled image"
            ));
        }
        let whole = region.x == 0 && region.y == 0 && region.w == full_w && region.h == full_h;
        let crop = if whole {
            tj::tjregion {
                x: 0,
                y: 0,
                w: 0,
                h: 0,
            }
        } else {
            tj::tjregion {
                x: region.x as c_int,
                y: region.y as c_int,
                w: region.w as c_int,
                h: region.h as c_int,
            }
        };
        // SAFETY: valid handle; the header of `bytes` was read last (checked above), and
        // `bytes` has been borrowed ever since, so it is the image libjpeg-turbo decodes.
        let rc = unsafe { tj::tj3SetCroppingRegion(self.handle, crop) };
        self.check(rc)?;
        let pitch = region.w as usize * 3;
        let need = pitch * region.h as usize;
        if self.buf.len() < need {
            self.buf.resize(need, 0);
        }
        // SAFETY: `buf` holds `pitch * region.h` bytes, which is exactly what libjpeg-turbo
        // writes for an RGB decode of the cropping region set above; `bytes` is valid.
        let rc = unsafe {
            tj::tj3Decompress8(
                self.handle,
                bytes.as_ptr(),
                bytes.len() as tj::size_t,
                self.buf.as_mut_ptr(),
                pitch as c_int,
                tj::TJPF_TJPF_RGB,
            )
        };
        self.check(rc)?;
        self.len = need;
        self.width = region.w;
        self.height = region.h;
        Ok((region.w, region.h))
    }

    /// The last decoded region, `width * height * 3` bytes, row-major RGB.
    pub fn rgb(&self) -> &[u8] {
        &self.buf[..self.len]
    }

    /// `(width, height)` of the last decoded region (`(0, 0)` after an error).
    pub fn dimensions(&self) -> (u32, u32) {
        (self.width, self.height)
    }

    /// Bytes currently reserved for pixels.
    pub fn capacity(&self) -> usize {
        self.buf.capacity()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::pixels::Decoder;
    use crate::image::{ImageLimits, probe};
    use crate::testkit::{self, JpegColor, JpegSpec};

    #[test]
    fn header_and_full_decode_match_zune_closely() {
        let bytes = testkit::jpeg(&JpegSpec::rgb(67, 45, 9));
        let mut t = TurboDecoder::new().unwrap();
        let h = t.read_header(&bytes).unwrap();
        assert_eq!((h.width, h.height), (67, 45));
        assert!(h.supports_fast_path());
        let full = Region {
            x: 0,
            y: 0,
            w: 67,
            h: 45,
        };
        assert_eq!(t.decode(&h, 8, full).unwrap(), (67, 45));
        let mut z = Decoder::new();
        z.decode_rgb(&bytes, &ImageLimits::default()).unwrap();
        let diff = t
            .rgb()
            .iter()
            .zip(z.rgb())
            .map(|(a, b)| a.abs_diff(*b))
            .max()
            .unwrap();
        assert!(diff <= 8, "max diff {diff}");
        // A header decodes once; one read before the last is refused.
        assert!(t.decode(&h, 8, full).is_err());
        let again = t.read_header(&bytes).unwrap();
        let other = testkit::jpeg(&JpegSpec::rgb(16, 16, 1));
        let last = t.read_header(&other).unwrap();
        let err = t.decode(&again, 8, full).unwrap_err();
        assert!(err.contains("not the header"), "{err}");
        assert!(t.rgb().is_empty());
        // Refused without touching the last read either (each read decodes once).
        assert!(t.decode(&last, 8, full).is_err());
        // A header read by another decoder (even its first read, as this one's) is
        // refused: this decoder's handle holds another image.
        let (mut a, mut b) = (TurboDecoder::new().unwrap(), TurboDecoder::new().unwrap());
        let _mine = a.read_header(&bytes).unwrap();
        let theirs = b.read_header(&other).unwrap();
        let err = a.decode(&theirs, 8, full).unwrap_err();
        assert!(err.contains("not the header"), "{err}");
    }

    #[test]
    fn sof_sampling_factors_are_read_from_the_frame_header() {
        let all21 = include_bytes!("../../tests/fixtures/jpeg/sampling-2x1-all.jpg");
        assert_eq!(sof_max_h_samp(all21), Some(2));
        let gray = testkit::jpeg(&JpegSpec {
            color: JpegColor::Gray,
            ..JpegSpec::rgb(40, 30, 1)
        });
        assert_eq!(sof_max_h_samp(&gray), Some(1));
        // No frame header before the data ends / a cut segment: unknown.
        assert_eq!(sof_max_h_samp(&all21[..20]), None);
        assert_eq!(sof_max_h_samp(b"\xff\xd8\xff\xc0\x00\x11\x08"), None);
        assert_eq!(sof_max_h_samp(b""), None);
    }

    #[test]
    fn cmyk_is_not_for_the_fast_path() {
        let bytes = testkit::jpeg(&JpegSpec {
            color: JpegColor::Cmyk,
            ..JpegSpec::rgb(40, 30, 1)
        });
        let mut t = TurboDecoder::new().unwrap();
        let h = t.read_header(&bytes).unwrap();
        assert!(!h.supports_fast_path());
        let gray = testkit::jpeg(&JpegSpec {
            color: JpegColor::Gray,
            ..JpegSpec::rgb(40, 30, 1)
        });
        let h = t.read_header(&gray).unwrap();
        assert!(h.supports_fast_path());
        t.decode(
            &h,
            4,
            Region {
                x: 0,
                y: 0,
                w: 20,
                h: 15,
            },
        )
        .unwrap();
        assert!(
            t.rgb()
                .chunks_exact(3)
                .all(|p| p[0] == p[1] && p[1] == p[2])
        );
    }

    #[test]
    fn corrupt_and_truncated_data_are_errors() {
        let bytes = testkit::jpeg(&JpegSpec::rgb(120, 90, 3));
        let info = probe(&bytes, &ImageLimits::default()).unwrap();
        let mut t = TurboDecoder::new().unwrap();
        // Truncated: half the file.
        let cut = &bytes[..bytes.len() / 2];
        if let Ok(h) = t.read_header(cut) {
            let r = Region {
                x: 0,
                y: 0,
                w: info.width,
                h: info.height,
            };
            assert!(t.decode(&h, 8, r).is_err());
            assert!(t.rgb().is_empty());
        }
        // Garbage in the middle of the entropy-coded data.
        let mut bad = bytes.clone();
        let mid = bad.len() / 2;
        for b in &mut bad[mid..mid + 64] {
            *b = 0xFF;
        }
        let h = t.read_header(&bad).unwrap();
        let r = Region {
            x: 0,
            y: 0,
            w: info.width,
            h: info.height,
        };
        assert!(t.decode(&h, 8, r).is_err());
    }

    #[test]
    fn plan_picks_the_smallest_scale_that_keeps_the_output_size() {
        let opts = PlanOptions {
            scales: ALL_SCALES,
            crop: false,
            margin: 0,
        };
        // 1000x800 crop of a 1000x800 image to 224: 2/8 gives 250x200 < 224 tall, so 3/8.
        let p = plan_crop(1000, 800, 16, (0, 0, 800, 1000), 224, 224, &opts);
        assert_eq!(p.num, 3);
        assert_eq!(
            p.region,
            Region {
                x: 0,
                y: 0,
                w: 375,
                h: 300
            }
        );
        let fast = PlanOptions {
            scales: FAST_SCALES,
            ..opts
        };
        assert_eq!(
            plan_crop(1000, 800, 16, (0, 0, 800, 1000), 224, 224, &fast).num,
            4
        );
        // A small crop stays at full resolution.
        let p = plan_crop(500, 375, 16, (10, 20, 150, 200), 224, 224, &fast);
        assert_eq!(p.num, 8);
        assert_eq!(p.view, (10, 20, 150, 200));
        assert_eq!(p.frac, (0.0, 0.0, 200.0, 150.0));
        // Cropping: the region is the box plus margin, left edge on the iMCU grid.
        let c = PlanOptions {
            crop: true,
            margin: 4,
            ..fast
        };
        let p = plan_crop(500, 375, 16, (10, 21, 150, 200), 224, 224, &c);
        assert_eq!(
            p.region,
            Region {
                x: 16,
                y: 6,
                w: 225 - 16,
                h: 164 - 6
            }
        );
        assert_eq!(p.view, (4, 5, 150, 200));
        // Scaled and cropped: a 1000x900 crop at 2/8 of a 2000x1500 image.
        let p = plan_crop(2000, 1500, 16, (101, 301, 900, 1000), 224, 224, &c);
        assert_eq!(p.num, 2);
        // Scaled box: left 75.25, top 25.25, 250 x 225; scaled iMCU width 4.
        assert_eq!((p.region.x, p.region.y), (68, 21));
        assert_eq!(p.view, (4, 7, 226, 251));
        assert_eq!(p.frac, (0.25, 0.25, 250.0, 225.0));
    }
}
