use std::time::{Duration, Instant};

use super::*;
use crate::testkit::{self, JpegColor, JpegSpec};

fn limits() -> ImageLimits {
    ImageLimits::default()
}

fn small_jpeg(color: JpegColor, progressive: bool) -> Vec<u8> {
    testkit::jpeg(&JpegSpec {
        color,
        progressive,
        ..JpegSpec::rgb(67, 45, 9)
    })
}

fn encode_with_image(format: image::ImageFormat, width: u32, height: u32) -> Vec<u8> {
    let rgb = testkit::photo_pixels(width, height, 5);
    let img =
        image::DynamicImage::ImageRgb8(image::RgbImage::from_raw(width, height, rgb).unwrap());
    let mut out = Cursor::new(Vec::new());
    img.write_to(&mut out, format).unwrap();
    out.into_inner()
}

#[test]
fn sniff_each_format() {
    assert_eq!(
        sniff(&small_jpeg(JpegColor::Rgb, false)),
        Some(ImageFormat::Jpeg)
    );
    assert_eq!(sniff(&testkit::png(5, 5, 1)), Some(ImageFormat::Png));
    for (format, expected) in [
        (image::ImageFormat::Gif, ImageFormat::Gif),
        (image::ImageFormat::WebP, ImageFormat::Webp),
        (image::ImageFormat::Bmp, ImageFormat::Bmp),
        (image::ImageFormat::Tiff, ImageFormat::Tiff),
    ] {
        let bytes = encode_with_image(format, 21, 13);
        assert_eq!(sniff(&bytes), Some(expected), "{format:?}");
        // Header dimensions and full decode through the `image` crate.
        let info = probe(&bytes, &limits()).unwrap();
        assert_eq!(
            info,
            ImageInfo {
                format: expected,
                width: 21,
                height: 13
            }
        );
        assert_eq!(decode_check(&bytes, &limits()).unwrap(), info);
    }
    assert_eq!(sniff(b"MM\0*\0\0\0\x08"), Some(ImageFormat::Tiff));
    assert_eq!(sniff(b"GIF87a"), Some(ImageFormat::Gif));
    assert_eq!(sniff(b"BMW is a car brand, not a bitmap"), None);
    assert_eq!(sniff(b"RIFF\0\0\0\0WAVEfmt "), None);
    assert_eq!(sniff(b"RIFF\0\0\0\0WE"), Some(ImageFormat::Webp));
    assert_eq!(sniff(b"RIFF\0\0"), None);
    assert_eq!(sniff(b""), None);
    assert_eq!(sniff(&[0xFF, 0xD8]), None);
}

#[test]
fn format_names_and_extensions() {
    for format in ImageFormat::ALL {
        assert_eq!(ImageFormat::from_ext(format.ext()), Some(format));
        assert_eq!(ImageFormat::from_ext(format.name()), Some(format));
        assert_eq!(
            serde_json::to_string(&format).unwrap(),
            format!("\"{}\"", format.name())
        );
    }
    assert_eq!(ImageFormat::from_ext("JPEG"), Some(ImageFormat::Jpeg));
    assert_eq!(ImageFormat::from_ext(".JpG"), Some(ImageFormat::Jpeg));
    assert_eq!(ImageFormat::from_ext("TIF"), Some(ImageFormat::Tiff));
    assert_eq!(ImageFormat::from_ext("txt"), None);
    assert_eq!(ImageFormat::from_ext(""), None);
    assert_eq!(ImageFormat::Jpeg.ext(), "jpg");
    assert_eq!(ImageFormat::Jpeg.name(), "jpeg");
}

#[test]
fn png_named_jpeg_is_png() {
    // Bytes decide, never names: the only input is bytes, so a PNG is a PNG.
    let bytes = testkit::png(31, 17, 2);
    let info = probe(&bytes, &limits()).unwrap();
    assert_eq!(
        info,
        ImageInfo {
            format: ImageFormat::Png,
            width: 31,
            height: 17
        }
    );
    assert_eq!(decode_check(&bytes, &limits()).unwrap(), info);
}

#[test]
fn jpeg_variants_probe_and_decode() {
    for (color, progressive) in [
        (JpegColor::Rgb, false),
        (JpegColor::Gray, false),
        (JpegColor::Cmyk, false),
        (JpegColor::Rgb, true),
        (JpegColor::Gray, true),
        (JpegColor::Cmyk, true),
    ] {
        let bytes = small_jpeg(color, progressive);
        let expected = ImageInfo {
            format: ImageFormat::Jpeg,
            width: 67,
            height: 45,
        };
        assert_eq!(
            probe(&bytes, &limits()).unwrap(),
            expected,
            "{color:?} {progressive}"
        );
        assert_eq!(
            decode_check(&bytes, &limits()).unwrap(),
            expected,
            "{color:?} {progressive}"
        );
    }
}

#[test]
fn cmyk_and_gray_decode_to_sensible_pixels() {
    let info = ImageInfo {
        format: ImageFormat::Jpeg,
        width: 67,
        height: 45,
    };
    let gray = decode_jpeg(&small_jpeg(JpegColor::Gray, false), &info).unwrap();
    assert!(gray.gray);
    assert_eq!(gray.pixels.len(), 67 * 45);
    let rgb = decode_jpeg(&small_jpeg(JpegColor::Rgb, false), &info).unwrap();
    let cmyk = decode_jpeg(&small_jpeg(JpegColor::Cmyk, false), &info).unwrap();
    assert!(!cmyk.gray);
    assert_eq!(cmyk.pixels.len(), 67 * 45 * 3);
    // Same content: the CMYK file must decode close to the RGB one (not inverted).
    let diff: u64 = rgb
        .pixels
        .iter()
        .zip(&cmyk.pixels)
        .map(|(&a, &b)| u64::from(a.abs_diff(b)))
        .sum();
    let mean = diff as f64 / rgb.pixels.len() as f64;
    assert!(
        mean < 20.0,
        "mean abs diff between RGB and CMYK decode: {mean}"
    );
}

#[test]
fn truncated_jpeg() {
    for progressive in [false, true] {
        let mut bytes = testkit::jpeg(&JpegSpec {
            progressive,
            ..JpegSpec::rgb(96, 96, 3)
        });
        bytes.truncate(bytes.len() / 2);
        let p = probe(&bytes, &limits()).unwrap_err();
        assert_eq!(p.code(), "truncated", "{p}");
        assert!(decode_check(&bytes, &limits()).is_err());
        assert_eq!(
            decode_check(&bytes, &limits()).unwrap_err().code(),
            "truncated"
        );
    }
}

#[test]
fn truncation_detected_by_decoder_alone() {
    // Without the probe's EOI check: zune-jpeg (lenient by default, it pads with grey) must
    // still report the missing data in strict mode, at every cut point.
    let full = testkit::jpeg(&JpegSpec::rgb(64, 64, 8));
    let info = ImageInfo {
        format: ImageFormat::Jpeg,
        width: 64,
        height: 64,
    };
    let header = jpeg_header(&full).unwrap();
    let scan = full.len() - header.scan_start;
    for fraction in [1, 3, 5, 7, 9] {
        let cut = header.scan_start + scan * fraction / 10;
        let err = decode_jpeg(&full[..cut], &info)
            .err()
            .expect("truncated JPEG accepted");
        assert_eq!(
            err.code(),
            "truncated",
            "cut at {cut}/{}: {err}",
            full.len()
        );
    }
    // Header cut short.
    assert_eq!(
        probe(&full[..40], &limits()).unwrap_err().code(),
        "truncated"
    );
}

#[test]
fn trailing_garbage_accepted() {
    let mut bytes = small_jpeg(JpegColor::Rgb, false);
    bytes.extend(std::iter::repeat_n(0u8, 1000));
    bytes.extend_from_slice(b"trailing junk");
    assert!(decode_check(&bytes, &limits()).is_ok());
    // Too much trailing data: the EOI is no longer near the end.
    bytes.extend(std::iter::repeat_n(0u8, 5000));
    assert_eq!(probe(&bytes, &limits()).unwrap_err().code(), "truncated");

    let mut png = testkit::png(20, 20, 3);
    png.extend_from_slice(&[0; 100]);
    assert!(decode_check(&png, &limits()).is_ok());
}

#[test]
fn exif_thumbnail_eoi_does_not_hide_truncation() {
    // An APP1 segment carrying an embedded JPEG (with its own FF D9) before the real scan.
    let thumb = testkit::jpeg(&JpegSpec::rgb(8, 8, 1));
    let main = testkit::jpeg(&JpegSpec::rgb(40, 40, 2));
    let mut bytes = vec![0xFF, 0xD8, 0xFF, 0xE1];
    bytes.extend_from_slice(&((thumb.len() + 2 + 6) as u16).to_be_bytes());
    bytes.extend_from_slice(b"Exif\0\0");
    bytes.extend_from_slice(&thumb);
    bytes.extend_from_slice(&main[2..]);
    assert!(decode_check(&bytes, &limits()).is_ok());
    let cut = &bytes[..bytes.len() - 200];
    assert_eq!(probe(cut, &limits()).unwrap_err().code(), "truncated");
}

#[test]
fn truncated_png() {
    let bytes = testkit::png(64, 64, 4);
    let half = &bytes[..bytes.len() / 2];
    assert_eq!(probe(half, &limits()).unwrap_err().code(), "truncated");
    assert_eq!(
        decode_check(half, &limits()).unwrap_err().code(),
        "truncated"
    );
    assert_eq!(
        probe(&bytes[..20], &limits()).unwrap_err().code(),
        "truncated"
    );
}

#[test]
fn empty_and_not_an_image() {
    assert_eq!(probe(&[], &limits()), Err(ImageProblem::Empty));
    assert_eq!(decode_check(&[], &limits()), Err(ImageProblem::Empty));
    let text = b"Lorem ipsum dolor sit amet, consectetur adipiscing elit.\n";
    assert_eq!(probe(text, &limits()), Err(ImageProblem::NotAnImage));
    assert_eq!(decode_check(text, &limits()), Err(ImageProblem::NotAnImage));
    assert_eq!(ImageProblem::Empty.code(), "empty");
    assert_eq!(ImageProblem::NotAnImage.code(), "not_image");
}

#[test]
fn garbage_after_magic_is_bad_header() {
    let mut bytes = vec![0xFF, 0xD8, 0xFF, 0xC0, 0x00, 0x01];
    bytes.extend_from_slice(&[0x55; 64]);
    assert_eq!(probe(&bytes, &limits()).unwrap_err().code(), "bad_header");
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    png.extend_from_slice(&[0x55; 64]);
    assert_eq!(probe(&png, &limits()).unwrap_err().code(), "bad_header");
}

#[test]
fn zero_dimension_is_bad_header() {
    let mut bytes = small_jpeg(JpegColor::Rgb, false);
    assert!(testkit::patch_jpeg_dimensions(&mut bytes, 0, 45));
    assert_eq!(probe(&bytes, &limits()).unwrap_err().code(), "bad_header");
    let mut png = testkit::png(9, 9, 1);
    assert!(testkit::patch_png_dimensions(&mut png, 9, 0));
    assert_eq!(probe(&png, &limits()).unwrap_err().code(), "bad_header");
}

#[test]
fn huge_header_rejected_without_allocating() {
    let mut jpeg = small_jpeg(JpegColor::Rgb, false);
    assert!(testkit::patch_jpeg_dimensions(&mut jpeg, 60_000, 60_000));
    let mut png = testkit::png(16, 16, 1);
    assert!(testkit::patch_png_dimensions(&mut png, 60_000, 60_000));
    let mut png_wide = testkit::png(16, 16, 1);
    assert!(testkit::patch_png_dimensions(
        &mut png_wide,
        100_000,
        100_000
    ));

    let start = Instant::now();
    for bytes in [&jpeg, &png, &png_wide] {
        for result in [probe(bytes, &limits()), decode_check(bytes, &limits())] {
            match result {
                Err(ImageProblem::TooLarge { width, height }) => {
                    assert!(width >= 60_000 && height >= 60_000);
                }
                other => panic!("expected TooLarge, got {other:?}"),
            }
        }
        let r = reencode(bytes, &limits(), 256, 90);
        assert_eq!(r.unwrap_err().code(), "too_large");
    }
    // Decoding 60000x60000 would need 10 GB and many seconds.
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );

    let msg = probe(&jpeg, &limits()).unwrap_err().to_string();
    assert!(msg.contains("60000x60000"), "{msg}");
}

#[test]
fn pixel_limit_and_side_limit() {
    let bytes = testkit::jpeg(&JpegSpec::rgb(40, 30, 1));
    let tight = ImageLimits {
        max_pixels: 1199,
        ..limits()
    };
    assert_eq!(
        probe(&bytes, &tight),
        Err(ImageProblem::TooLarge {
            width: 40,
            height: 30
        })
    );
    let exact = ImageLimits {
        max_pixels: 1200,
        max_side: 40,
        min_side: 30,
    };
    assert!(probe(&bytes, &exact).is_ok());
    let side = ImageLimits {
        max_side: 39,
        ..limits()
    };
    assert_eq!(probe(&bytes, &side).unwrap_err().code(), "too_large");
    let min = ImageLimits {
        min_side: 31,
        ..limits()
    };
    assert_eq!(
        decode_check(&bytes, &min),
        Err(ImageProblem::TooSmall {
            width: 40,
            height: 30
        })
    );
}

#[test]
fn tiny_and_thin_images() {
    let one = testkit::jpeg(&JpegSpec::rgb(1, 1, 1));
    let thin = testkit::jpeg(&JpegSpec::rgb(1, 4000, 2));
    let thin_png = testkit::png(4000, 1, 3);
    let min2 = ImageLimits {
        min_side: 2,
        ..limits()
    };
    for (bytes, (w, h)) in [(&one, (1, 1)), (&thin, (1, 4000)), (&thin_png, (4000, 1))] {
        let info = decode_check(bytes, &limits()).unwrap();
        assert_eq!((info.width, info.height), (w, h));
        assert_eq!(probe(bytes, &limits()).unwrap(), info);
        assert_eq!(
            probe(bytes, &min2),
            Err(ImageProblem::TooSmall {
                width: w,
                height: h
            })
        );
        assert_eq!(decode_check(bytes, &min2).unwrap_err().code(), "too_small");
    }
}

#[test]
fn reencode_large_image() {
    let bytes = testkit::jpeg(&JpegSpec::rgb(1000, 500, 6));
    let (out, info) = reencode(&bytes, &limits(), 256, 85).unwrap().unwrap();
    assert_eq!(
        info,
        ImageInfo {
            format: ImageFormat::Jpeg,
            width: 256,
            height: 128
        }
    );
    assert_eq!(decode_check(&out, &limits()).unwrap(), info);
    assert!(out.len() < bytes.len());
    // Content survives: the mean colour stays close.
    let before = image::load_from_memory(&bytes).unwrap().to_rgb8();
    let after = image::load_from_memory(&out).unwrap().to_rgb8();
    let mean = |img: &image::RgbImage| {
        img.pixels().map(|p| u64::from(p.0[0])).sum::<u64>() as f64 / img.pixels().len() as f64
    };
    assert!((mean(&before) - mean(&after)).abs() < 3.0);
}

#[test]
fn reencode_other_formats_and_gray() {
    // Portrait PNG -> JPEG, grayscale stays one channel, CMYK becomes RGB.
    let png = testkit::png(150, 600, 2);
    let (out, info) = reencode(&png, &limits(), 100, 90).unwrap().unwrap();
    assert_eq!((info.width, info.height), (25, 100));
    assert_eq!(sniff(&out), Some(ImageFormat::Jpeg));

    let gray = testkit::jpeg(&JpegSpec {
        color: JpegColor::Gray,
        ..JpegSpec::rgb(300, 200, 3)
    });
    let (out, info) = reencode(&gray, &limits(), 150, 90).unwrap().unwrap();
    assert_eq!((info.width, info.height), (150, 100));
    let decoded = image::load_from_memory(&out).unwrap();
    assert_eq!(decoded.color(), image::ColorType::L8);

    let cmyk = testkit::jpeg(&JpegSpec {
        color: JpegColor::Cmyk,
        progressive: true,
        ..JpegSpec::rgb(300, 200, 3)
    });
    let (out, _) = reencode(&cmyk, &limits(), 150, 90).unwrap().unwrap();
    let decoded = image::load_from_memory(&out).unwrap();
    assert_eq!(decoded.color(), image::ColorType::Rgb8);

    // Very thin: the short side never rounds to zero.
    let thin = testkit::jpeg(&JpegSpec::rgb(1, 3000, 1));
    let (_, info) = reencode(&thin, &limits(), 256, 90).unwrap().unwrap();
    assert_eq!((info.width, info.height), (1, 256));
}

#[test]
fn reencode_small_image_is_none() {
    let bytes = testkit::jpeg(&JpegSpec::rgb(200, 100, 6));
    assert_eq!(reencode(&bytes, &limits(), 256, 85).unwrap(), None);
    assert_eq!(reencode(&bytes, &limits(), 200, 85).unwrap(), None);
    assert!(reencode(&bytes, &limits(), 199, 85).unwrap().is_some());
    // Problems are still reported.
    assert_eq!(reencode(&[], &limits(), 256, 85), Err(ImageProblem::Empty));
}

#[test]
fn fit_within_rounds() {
    assert_eq!(fit_within(1000, 500, 256), (256, 128));
    assert_eq!(fit_within(500, 1000, 256), (128, 256));
    assert_eq!(fit_within(4000, 3, 100), (100, 1));
    assert_eq!(fit_within(333, 1000, 100), (33, 100));
    assert_eq!(fit_within(335, 1000, 100), (34, 100));
}

#[test]
fn codes_and_messages() {
    let cases = [
        (ImageProblem::Empty, "empty"),
        (ImageProblem::NotAnImage, "not_image"),
        (ImageProblem::Truncated("x".into()), "truncated"),
        (
            ImageProblem::TooLarge {
                width: 70000,
                height: 2,
            },
            "too_large",
        ),
        (
            ImageProblem::TooSmall {
                width: 1,
                height: 2,
            },
            "too_small",
        ),
        (ImageProblem::BadHeader("x".into()), "bad_header"),
        (ImageProblem::Decode("x".into()), "decode_error"),
        (ImageProblem::Encode("x".into()), "encode_error"),
    ];
    for (problem, code) in &cases {
        assert_eq!(problem.code(), *code);
        assert!(ImageProblem::CODES.contains(code));
        assert!(!problem.to_string().is_empty());
    }
    assert!(cases[3].0.to_string().contains("70000x2"));
    assert!(cases[4].0.to_string().contains("1x2"));
}

#[test]
fn limits_serde_roundtrip() {
    let limits = ImageLimits::default();
    assert_eq!(limits.max_pixels, 178_956_970);
    assert_eq!(limits.max_side, 65_500);
    assert_eq!(limits.min_side, 1);
    let json = serde_json::to_string(&limits).unwrap();
    assert_eq!(serde_json::from_str::<ImageLimits>(&json).unwrap(), limits);
}

#[test]
fn tolerated_nonconformance() {
    // What libjpeg/PIL accept with a "Corrupt JPEG data" warning must pass here too, although
    // zune-jpeg's strict mode rejects the first case.
    let full = testkit::jpeg(&JpegSpec::rgb(64, 64, 8));
    let app0_end = 4 + usize::from(u16::from_be_bytes([full[4], full[5]]));
    let mut extra = full[..app0_end].to_vec();
    extra.extend_from_slice(&[0x00, 0x11, 0x22, 0x33]);
    extra.extend_from_slice(&full[app0_end..]);
    let strict =
        JpegDecoder::new_with_options(ZCursor::new(&extra), jpeg_options().set_strict_mode(true))
            .decode();
    assert!(
        strict.is_err(),
        "strict mode now accepts extra bytes; fallback is moot"
    );
    assert_eq!(decode_check(&extra, &limits()).unwrap().width, 64);

    let mut before_eoi = full[..full.len() - 2].to_vec();
    before_eoi.extend_from_slice(&[0x12; 240]);
    before_eoi.extend_from_slice(&[0xFF, 0xD9]);
    assert_eq!(decode_check(&before_eoi, &limits()).unwrap().height, 64);
}

#[test]
fn large_but_allowed_header_probes_without_decoding() {
    // 12000x12000 = 144 M pixels is within the default limits: probe must answer from the
    // header alone (a decode would allocate ~430 MB and take seconds).
    let mut jpeg = small_jpeg(JpegColor::Rgb, false);
    assert!(testkit::patch_jpeg_dimensions(&mut jpeg, 12_000, 12_000));
    let mut png = testkit::png(16, 16, 1);
    assert!(testkit::patch_png_dimensions(&mut png, 12_000, 12_000));
    let start = Instant::now();
    for _ in 0..100 {
        assert_eq!(probe(&jpeg, &limits()).unwrap().width, 12_000);
        assert_eq!(probe(&png, &limits()).unwrap().height, 12_000);
    }
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
}

#[test]
fn other_formats_cut_short_are_rejected() {
    for format in [
        image::ImageFormat::Gif,
        image::ImageFormat::WebP,
        image::ImageFormat::Bmp,
        image::ImageFormat::Tiff,
    ] {
        let bytes = encode_with_image(format, 64, 48);
        for cut in [bytes.len() / 2, 10] {
            let err = decode_check(&bytes[..cut], &limits()).unwrap_err();
            assert_eq!(err.code(), "truncated", "{format:?} cut at {cut}: {err}");
        }
    }
}

#[test]
fn ycck_jpeg_decodes() {
    let (w, h) = (40u16, 24u16);
    let cmyk: Vec<u8> = (0..usize::from(w) * usize::from(h) * 4)
        .map(|i| (i * 7 % 251) as u8)
        .collect();
    let mut bytes = Vec::new();
    jpeg_encoder::Encoder::new(&mut bytes, 90)
        .encode(&cmyk, w, h, jpeg_encoder::ColorType::CmykAsYcck)
        .unwrap();
    let info = decode_check(&bytes, &limits()).unwrap();
    assert_eq!((info.width, info.height), (40, 24));
    let (out, info) = reencode(&bytes, &limits(), 20, 90).unwrap().unwrap();
    assert_eq!((info.width, info.height), (20, 12));
    assert_eq!(decode_check(&out, &limits()).unwrap(), info);
}

/// Offsets of every `SOS` marker of `jpeg` by a plain byte search (not by
/// [`jpeg_scans`]' rules, which are under test): exact for the test encoder's output,
/// which has no metadata and stuffs every 0xFF in its entropy data.
fn sos_offsets(jpeg: &[u8]) -> Vec<usize> {
    jpeg.windows(2)
        .enumerate()
        .filter(|(_, w)| *w == [0xFF, 0xDA])
        .map(|(i, _)| i)
        .collect()
}

#[test]
fn jpeg_scans_counts_progressive_scans_and_skips_sequential_files() {
    assert_eq!(
        jpeg_scans(&small_jpeg(JpegColor::Rgb, false), usize::MAX),
        JpegScans::Sequential
    );
    for color in [JpegColor::Rgb, JpegColor::Gray] {
        let p = small_jpeg(color, true);
        let n = sos_offsets(&p).len();
        assert!(n > 1, "{n}");
        assert_eq!(jpeg_scans(&p, usize::MAX), JpegScans::Progressive(n));
        assert_eq!(jpeg_scans(&p, 2), JpegScans::Progressive(2));
        // Cut inside the last scan: the scans so far.
        let cut = &p[..p.len() - 3];
        assert_eq!(jpeg_scans(cut, usize::MAX), JpegScans::Progressive(n));
    }
    assert_eq!(
        jpeg_scans(&[0xFF, 0xD8, 0xFF, 0xD9], 10),
        JpegScans::Unknown
    );
    assert_eq!(jpeg_scans(&[0xFF, 0xD8, 0xFF], 10), JpegScans::Unknown);
}

/// A progressive JPEG whose last scan is repeated until it has `scans` scans (the pixels
/// are nonsense; the header and the marker structure are valid).
fn many_scans(scans: usize) -> Vec<u8> {
    let p = small_jpeg(JpegColor::Rgb, true);
    let sos = sos_offsets(&p);
    let last = *sos.last().unwrap();
    let eoi = p.len() - 2;
    assert_eq!(&p[eoi..], [0xFF, 0xD9]);
    let mut out = p[..eoi].to_vec();
    for _ in sos.len()..scans {
        out.extend_from_slice(&p[last..eoi]);
    }
    out.extend_from_slice(&[0xFF, 0xD9]);
    out
}

#[test]
fn progressive_jpeg_with_too_many_scans_is_refused_before_decoding() {
    let ok = many_scans(MAX_JPEG_SCANS);
    assert_eq!(
        jpeg_scans(&ok, usize::MAX),
        JpegScans::Progressive(MAX_JPEG_SCANS)
    );
    probe(&ok, &limits()).unwrap();
    let bomb = many_scans(MAX_JPEG_SCANS + 1);
    for e in [
        probe(&bomb, &limits()).unwrap_err(),
        decode_check(&bomb, &limits()).unwrap_err(),
        super::pixels::Decoder::new()
            .decode_rgb(&bomb, &limits())
            .unwrap_err(),
    ] {
        assert_eq!(e.code(), "bad_header", "{e}");
        assert!(e.to_string().contains("more than 500 scans"), "{e}");
    }
}

/// The loader's marker walk reads the same header as zune's parser (dimensions and the
/// first scan's start) for every kind of file, EXIF / ICC segments and fill bytes
/// included, and `probe_fast` gives the verdicts of `probe`, on good and bad files.
#[test]
fn marker_walk_header_equals_zune_and_probe_fast_equals_probe() {
    let mut files = Vec::new();
    for color in [JpegColor::Rgb, JpegColor::Gray, JpegColor::Cmyk] {
        for progressive in [false, true] {
            files.push(small_jpeg(color, progressive));
        }
    }
    files.push(include_bytes!("../../tests/fixtures/jpeg/sampling-2x1-all.jpg").to_vec());
    // A 20 KB APP1 (EXIF-like, holding FF D8 / FF C0 / FF D9 bytes) and fill bytes
    // before the frame header.
    let base = small_jpeg(JpegColor::Rgb, false);
    let mut app1 = vec![0xFF, 0xE1];
    let body: Vec<u8> = (0..20_000u32)
        .map(|i| [0xFF, 0xD8, 0xC0, 0xD9, b'x'][i as usize % 5])
        .collect();
    app1.extend_from_slice(&((body.len() + 2) as u16).to_be_bytes());
    app1.extend_from_slice(&body);
    app1.extend_from_slice(&[0xFF, 0xFF]);
    let mut exif = base[..2].to_vec();
    exif.extend_from_slice(&app1);
    exif.extend_from_slice(&base[2..]);
    files.push(exif);
    for (n, f) in files.iter().enumerate() {
        let zune = jpeg_header(f).unwrap();
        let walk = jpeg_header_walk(f).unwrap_or_else(|| panic!("file {n}: no header"));
        assert_eq!(
            (walk.width, walk.height, walk.scan_start),
            (zune.width, zune.height, zune.scan_start),
            "file {n}"
        );
        assert_eq!(probe_fast(f, &limits()), probe(f, &limits()), "file {n}");
    }
    // Bad files: the same verdicts.
    let good = &files[0];
    let mut bad: Vec<Vec<u8>> = vec![
        good[..good.len() - 40].to_vec(), // no EOI
        good[..300].to_vec(),             // cut in the first scan
        good[..12].to_vec(),              // cut in the headers
        vec![0xFF, 0xD8, 0xFF],
    ];
    let mut zero = good.clone();
    let sof = (2..zero.len() - 1)
        .find(|&i| zero[i] == 0xFF && zero[i + 1] == 0xC0)
        .unwrap();
    zero[sof + 5..sof + 7].copy_from_slice(&[0, 0]); // height 0
    bad.push(zero);
    for (n, f) in bad.iter().enumerate() {
        let (fast, slow) = (probe_fast(f, &limits()), probe(f, &limits()));
        assert!(slow.is_err(), "bad file {n} passes probe");
        assert_eq!(
            fast.map_err(|e| e.code()),
            slow.map_err(|e| e.code()),
            "bad file {n}"
        );
    }
}
