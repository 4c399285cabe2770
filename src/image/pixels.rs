//! Decoding to interleaved RGB8 into a reusable buffer.
//!
//! JPEG goes through `zune-jpeg` with output colour space RGB (grayscale and CMYK/YCCK
//! files come out as RGB) straight into the [`Decoder`]'s buffer with `decode_into`, so a
//! worker decoding images of at most the size it has seen allocates no output buffer
//! (zune still allocates its own per-image working state). Other formats go through the
//! `image` crate and are converted to RGB8 (alpha dropped), then copied into the buffer;
//! that path allocates per image.
//!
//! Error handling matches [`decode_check`](super::decode_check): [`probe`]
//! first (limits hold before any pixel allocation), JPEG in strict mode with a lenient
//! retry for non-truncation errors.

use zune_jpeg::JpegDecoder;
use zune_jpeg::zune_core::bytestream::ZCursor;
use zune_jpeg::zune_core::colorspace::ColorSpace;

use super::{
    ImageFormat, ImageLimits, ImageProblem, decode_generic, is_jpeg_truncation, jpeg_options,
    jpeg_problem, probe,
};

/// Reusable RGB8 decoder (one per worker thread).
#[derive(Debug, Default)]
pub struct Decoder {
    /// Grows to the largest image seen; never shrinks. Only `..len` is valid.
    buf: Vec<u8>,
    len: usize,
    width: u32,
    height: u32,
}

impl Decoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Decodes `bytes` to RGB8 in the internal buffer (see [`Decoder::rgb`]) and returns
    /// `(width, height)`. On error the previous contents are invalid (`rgb()` is empty).
    pub fn decode_rgb(
        &mut self,
        bytes: &[u8],
        limits: &ImageLimits,
    ) -> Result<(u32, u32), ImageProblem> {
        self.len = 0;
        self.width = 0;
        self.height = 0;
        let info = probe(bytes, limits)?;
        let need = info.pixels() as usize * 3;
        match info.format {
            ImageFormat::Jpeg => self.decode_jpeg(bytes, need)?,
            other => {
                let img = decode_generic(bytes, other, &info)?;
                let rgb = img.into_rgb8();
                let raw = rgb.as_raw();
                if raw.len() != need {
                    return Err(ImageProblem::Decode(format!(
                        "decoder returned {} bytes, expected {need}",
                        raw.len()
                    )));
                }
                self.grow(need);
                self.buf[..need].copy_from_slice(raw);
            }
        }
        self.len = need;
        self.width = info.width;
        self.height = info.height;
        Ok((info.width, info.height))
    }

    fn grow(&mut self, need: usize) {
        if self.buf.len() < need {
            self.buf.resize(need, 0);
        }
    }

    fn decode_jpeg(&mut self, bytes: &[u8], need: usize) -> Result<(), ImageProblem> {
        let options = jpeg_options().jpeg_set_out_colorspace(ColorSpace::RGB);
        let mut decoder =
            JpegDecoder::new_with_options(ZCursor::new(bytes), options.set_strict_mode(true));
        decoder
            .decode_headers()
            .map_err(|e| jpeg_problem(e, true))?;
        let size = decoder
            .output_buffer_size()
            .ok_or_else(|| ImageProblem::BadHeader("JPEG output size overflows".into()))?;
        if size != need {
            return Err(ImageProblem::Decode(format!(
                "decoder wants {size} bytes, expected {need}"
            )));
        }
        self.grow(need);
        let out = &mut self.buf[..need];
        match decoder.decode_into(out) {
            Ok(()) => Ok(()),
            Err(strict) if is_jpeg_truncation(&strict) => {
                Err(ImageProblem::Truncated(strict.to_string()))
            }
            // Non-conformance strict mode rejects but libjpeg/PIL accept with a warning.
            Err(_) => JpegDecoder::new_with_options(ZCursor::new(bytes), options)
                .decode_into(out)
                .map_err(|e| jpeg_problem(e, false)),
        }
    }

    /// The last decoded image, `width * height * 3` bytes, row-major RGB.
    pub fn rgb(&self) -> &[u8] {
        &self.buf[..self.len]
    }

    /// `(width, height)` of the last decoded image (`(0, 0)` after an error).
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
    use crate::testkit::{self, JpegColor, JpegSpec};

    #[test]
    fn every_kind_decodes_to_rgb_of_the_right_size() {
        let mut d = Decoder::new();
        let limits = ImageLimits::default();
        for color in [JpegColor::Rgb, JpegColor::Gray, JpegColor::Cmyk] {
            for progressive in [false, true] {
                let bytes = testkit::jpeg(&JpegSpec {
                    color,
                    progressive,
                    ..JpegSpec::rgb(67, 45, 9)
                });
                assert_eq!(d.decode_rgb(&bytes, &limits).unwrap(), (67, 45));
                assert_eq!(d.rgb().len(), 67 * 45 * 3, "{color:?} {progressive}");
                if color == JpegColor::Gray {
                    assert!(
                        d.rgb()
                            .chunks_exact(3)
                            .all(|p| p[0] == p[1] && p[1] == p[2])
                    );
                }
            }
        }
        let png = testkit::png(31, 17, 2);
        assert_eq!(d.decode_rgb(&png, &limits).unwrap(), (31, 17));
        assert_eq!(d.rgb().len(), 31 * 17 * 3);
        let gray = testkit::gray_png(12, 8, 1);
        assert_eq!(d.decode_rgb(&gray, &limits).unwrap(), (12, 8));
        assert_eq!(d.rgb().len(), 12 * 8 * 3);
    }

    #[test]
    fn jpeg_matches_decode_path_of_mod_and_reuses_buffer() {
        let bytes = testkit::jpeg(&JpegSpec::rgb(64, 48, 4));
        let info = probe(&bytes, &ImageLimits::default()).unwrap();
        let reference = super::super::decode_jpeg(&bytes, &info).unwrap();
        let mut d = Decoder::new();
        d.decode_rgb(&bytes, &ImageLimits::default()).unwrap();
        assert_eq!(d.rgb(), &reference.pixels[..]);
        let (ptr, cap) = (d.rgb().as_ptr(), d.capacity());
        let other = testkit::jpeg(&JpegSpec::rgb(64, 48, 5));
        for b in [&bytes, &other, &bytes] {
            d.decode_rgb(b, &ImageLimits::default()).unwrap();
            assert_eq!((d.rgb().as_ptr(), d.capacity()), (ptr, cap));
        }
    }

    #[test]
    fn errors_clear_the_buffer_view() {
        let mut d = Decoder::new();
        let bytes = testkit::jpeg(&JpegSpec::rgb(20, 20, 1));
        d.decode_rgb(&bytes, &ImageLimits::default()).unwrap();
        let tight = ImageLimits {
            max_pixels: 100,
            ..ImageLimits::default()
        };
        assert!(matches!(
            d.decode_rgb(&bytes, &tight),
            Err(ImageProblem::TooLarge { .. })
        ));
        assert!(d.rgb().is_empty());
        assert!(
            d.decode_rgb(&bytes[..bytes.len() / 2], &ImageLimits::default())
                .is_err()
        );
    }
}
