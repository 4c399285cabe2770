//! Deterministic synthetic data for tests, the README demo and benchmarks.
//!
//! Everything here is a pure function of its arguments: pixel content comes from a tiny
//! [`SplitMix64`] generator (the crate's one, [`crate::seed`]) and integer arithmetic only (no `rand`, no
//! transcendental floating-point functions), so the same seed gives the same pixels on
//! every machine and every release. Encoded bytes are identical as long as the encoder
//! crates (`jpeg-encoder`, `image`'s PNG encoder) produce identical output.
//!
//! * [`jpeg`], [`png`], [`gray_png`]: single images that look roughly like photos (smooth
//!   gradients, a few shapes, texture and sensor-like noise) or label maps.
//! * [`write_imagenet_demo`]: an ImageNet-1k shaped directory tree (train folders per WNID,
//!   flat val folder, Kaggle's `LOC_val_solution.csv`, a `val_labels.txt`).
//! * [`add_nasty_imagenet_files`]: the broken and unusual files real ImageNet contains (and
//!   worse), with the outcome a validator should report for each.
//! * [`patch_jpeg_dimensions`], [`patch_png_dimensions`]: rewrite the size a header claims.

use std::fmt::Write as _;
use std::fs;
use std::io;
use std::path::Path;

pub use crate::seed::SplitMix64;

/// The top byte of the next draw.
fn byte(rng: &mut SplitMix64) -> u8 {
    (rng.next_u64() >> 56) as u8
}

/// Stateless per-index hash (one SplitMix64 step), for per-pixel noise.
fn mix(seed: u64, index: u64) -> u64 {
    SplitMix64::from_state(seed ^ index.wrapping_mul(0xD1B5_4A32_D192_ED03)).next_u64()
}

/// Seed of the `n`-th derived stream, so that one top-level seed fans out to many images.
pub fn derive_seed(seed: u64, n: u64) -> u64 {
    mix(seed ^ 0x5EED_5EED_5EED_5EED, n)
}

/// Colour model of a synthetic JPEG.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JpegColor {
    /// Three-component YCbCr (the normal case).
    Rgb,
    /// One component.
    Gray,
    /// Four-component Adobe CMYK (stored inverted, as Photoshop does), like the ~22 CMYK
    /// files in ImageNet's train set.
    Cmyk,
}

/// What [`jpeg`] should produce.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct JpegSpec {
    pub width: u32,
    pub height: u32,
    pub seed: u64,
    /// 1..=100 (clamped).
    pub quality: u8,
    pub color: JpegColor,
    pub progressive: bool,
}

impl Default for JpegSpec {
    /// 64x48, seed 0, baseline RGB at quality 90.
    fn default() -> Self {
        JpegSpec::rgb(64, 48, 0)
    }
}

impl JpegSpec {
    /// A baseline RGB JPEG at quality 90.
    pub fn rgb(width: u32, height: u32, seed: u64) -> Self {
        JpegSpec {
            width,
            height,
            seed,
            quality: 90,
            color: JpegColor::Rgb,
            progressive: false,
        }
    }
}

/// Photo-like RGB8 pixels (row-major, `width * height * 3` bytes).
///
/// Smooth corner-to-corner gradient, a few blended ellipses and rectangles, coarse texture
/// and fine per-pixel noise; the mix is tuned so that a 500x375 quality-90 JPEG comes out
/// near ImageNet's ~110 KB average.
pub fn photo_pixels(width: u32, height: u32, seed: u64) -> Vec<u8> {
    let (w, h) = (width as usize, height as usize);
    let mut rng = SplitMix64::from_state(seed);
    let mut px = vec![0u8; w * h * 3];
    if w == 0 || h == 0 {
        return px;
    }

    // 1. Bilinear gradient between four random corner colours (fixed point, 16.16).
    let corners: [[i64; 3]; 4] =
        std::array::from_fn(|_| std::array::from_fn(|_| byte(&mut rng) as i64));
    let (wd, hd) = ((w.max(2) - 1) as i64, (h.max(2) - 1) as i64);
    for y in 0..h {
        let fy = (y as i64) * 65536 / hd;
        for x in 0..w {
            let fx = (x as i64) * 65536 / wd;
            let o = (y * w + x) * 3;
            for c in 0..3 {
                let top = corners[0][c] * (65536 - fx) + corners[1][c] * fx;
                let bottom = corners[2][c] * (65536 - fx) + corners[3][c] * fx;
                let v = (top * (65536 - fy) + bottom * fy) >> 32;
                px[o + c] = v.clamp(0, 255) as u8;
            }
        }
    }

    // 2. A few shapes, alpha-blended, rasterised within their bounding boxes only.
    let shapes = rng.range(3, 7);
    let min_dim = w.min(h) as i64;
    for _ in 0..shapes {
        let cx = rng.below(w as u64) as i64;
        let cy = rng.below(h as u64) as i64;
        let rx = rng.range(1, (w as u64 / 3).max(1)) as i64 + min_dim / 16;
        let ry = rng.range(1, (h as u64 / 3).max(1)) as i64 + min_dim / 16;
        let color: [i64; 3] = std::array::from_fn(|_| byte(&mut rng) as i64);
        let alpha = rng.range(96, 224) as i64; // out of 256
        let ellipse = rng.below(2) == 0;
        let x0 = (cx - rx).max(0) as usize;
        let x1 = ((cx + rx) as usize).min(w - 1);
        let y0 = (cy - ry).max(0) as usize;
        let y1 = ((cy + ry) as usize).min(h - 1);
        for y in y0..=y1 {
            let dy = y as i64 - cy;
            for x in x0..=x1 {
                let dx = x as i64 - cx;
                if ellipse && dx * dx * ry * ry + dy * dy * rx * rx > rx * rx * ry * ry {
                    continue;
                }
                // Shade the shape along y so it is not perfectly flat.
                let shade = (dy * 24) / ry.max(1);
                let o = (y * w + x) * 3;
                for c in 0..3 {
                    let src = (color[c] - shade).clamp(0, 255);
                    let dst = px[o + c] as i64;
                    px[o + c] = ((src * alpha + dst * (256 - alpha)) >> 8) as u8;
                }
            }
        }
    }

    // 3. Coarse texture (value noise on an 8-pixel grid, bilinear) + fine noise.
    const CELL: usize = 8;
    let gw = w / CELL + 2;
    let gh = h / CELL + 2;
    let tex_seed = rng.next_u64();
    let grid: Vec<i64> = (0..gw * gh)
        .map(|i| (mix(tex_seed, i as u64) % 41) as i64 - 20)
        .collect();
    let noise_seed = rng.next_u64();
    // Sensor-like noise amplitude varies per image, and so do the file sizes.
    let amp = rng.range(9, 16) as i64;
    for y in 0..h {
        let (gy, ty) = (y / CELL, (y % CELL) as i64);
        for x in 0..w {
            let (gx, tx) = (x / CELL, (x % CELL) as i64);
            let g = |xx: usize, yy: usize| grid[yy * gw + xx];
            let top = g(gx, gy) * (CELL as i64 - tx) + g(gx + 1, gy) * tx;
            let bottom = g(gx, gy + 1) * (CELL as i64 - tx) + g(gx + 1, gy + 1) * tx;
            let texture = (top * (CELL as i64 - ty) + bottom * ty) / (CELL * CELL) as i64;
            let n = mix(noise_seed, (y * w + x) as u64);
            let o = (y * w + x) * 3;
            for c in 0..3 {
                let fine = ((n >> (c * 8)) & 0xFF) as i64 * (2 * amp + 1) / 256 - amp;
                let v = px[o + c] as i64 + texture + fine;
                px[o + c] = v.clamp(0, 255) as u8;
            }
        }
    }
    px
}

/// BT.601 luma of RGB8 pixels.
fn to_gray(rgb: &[u8]) -> Vec<u8> {
    rgb.chunks_exact(3)
        .map(|p| ((77 * p[0] as u32 + 150 * p[1] as u32 + 29 * p[2] as u32 + 128) >> 8) as u8)
        .collect()
}

/// RGB8 -> CMYK ink amounts (0 = no ink). `jpeg-encoder` stores them inverted, Adobe
/// style, and decoders compute `R = (255 - C) * (255 - K) / 255`.
fn to_cmyk(rgb: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(rgb.len() / 3 * 4);
    for p in rgb.chunks_exact(3) {
        let max = p[0].max(p[1]).max(p[2]);
        if max == 0 {
            out.extend_from_slice(&[0, 0, 0, 255]);
            continue;
        }
        let max32 = u32::from(max);
        for &c in p {
            out.push(255 - ((u32::from(c) * 255 + max32 / 2) / max32).min(255) as u8);
        }
        out.push(255 - max);
    }
    out
}

/// A synthetic JPEG through `jpeg-encoder`.
///
/// # Panics
/// If a side is 0 or above 65535 (JPEG cannot represent it).
pub fn jpeg(spec: &JpegSpec) -> Vec<u8> {
    assert!(
        (1..=u32::from(u16::MAX)).contains(&spec.width)
            && (1..=u32::from(u16::MAX)).contains(&spec.height),
        "testkit::jpeg: {}x{} cannot be a JPEG",
        spec.width,
        spec.height
    );
    let rgb = photo_pixels(spec.width, spec.height, spec.seed);
    let (data, color_type) = match spec.color {
        JpegColor::Rgb => (rgb, jpeg_encoder::ColorType::Rgb),
        JpegColor::Gray => (to_gray(&rgb), jpeg_encoder::ColorType::Luma),
        JpegColor::Cmyk => (to_cmyk(&rgb), jpeg_encoder::ColorType::Cmyk),
    };
    let mut out = Vec::new();
    let mut encoder = jpeg_encoder::Encoder::new(&mut out, spec.quality.clamp(1, 100));
    encoder.set_progressive(spec.progressive);
    encoder
        .encode(&data, spec.width as u16, spec.height as u16, color_type)
        .expect("jpeg-encoder failed on a well-formed buffer");
    out
}

fn encode_png(width: u32, height: u32, data: &[u8], color: image::ExtendedColorType) -> Vec<u8> {
    use image::ImageEncoder;
    let mut out = Vec::new();
    image::codecs::png::PngEncoder::new(&mut out)
        .write_image(data, width, height, color)
        .expect("PNG encoder failed on a well-formed buffer");
    out
}

/// A synthetic RGB8 PNG (same content generator as [`jpeg`]).
///
/// # Panics
/// If a side is 0.
pub fn png(width: u32, height: u32, seed: u64) -> Vec<u8> {
    assert!(width > 0 && height > 0, "testkit::png: zero side");
    let rgb = photo_pixels(width, height, seed);
    encode_png(width, height, &rgb, image::ExtendedColorType::Rgb8)
}

/// A synthetic L8 PNG shaped like a segmentation label map: a few piecewise-constant
/// (Voronoi) regions with values in `0..=150` (ADE20K: 0 = "other", 1..=150 classes).
///
/// # Panics
/// If a side is 0.
pub fn gray_png(width: u32, height: u32, seed: u64) -> Vec<u8> {
    assert!(width > 0 && height > 0, "testkit::gray_png: zero side");
    let mut rng = SplitMix64::from_state(seed);
    let regions = rng.range(3, 9) as usize;
    let sites: Vec<(i64, i64, u8)> = (0..regions)
        .map(|_| {
            (
                rng.below(u64::from(width)) as i64,
                rng.below(u64::from(height)) as i64,
                rng.range(0, 150) as u8,
            )
        })
        .collect();
    let mut data = Vec::with_capacity(width as usize * height as usize);
    for y in 0..i64::from(height) {
        for x in 0..i64::from(width) {
            let label = sites
                .iter()
                .min_by_key(|&&(sx, sy, _)| (sx - x) * (sx - x) + (sy - y) * (sy - y))
                .map_or(0, |s| s.2);
            data.push(label);
        }
    }
    encode_png(width, height, &data, image::ExtendedColorType::L8)
}

/// Rewrites the height/width of the first SOFn segment of a JPEG so the header claims
/// `width x height` (the scan data is left alone). Returns `false` if no SOF was found.
pub fn patch_jpeg_dimensions(bytes: &mut [u8], width: u16, height: u16) -> bool {
    let mut i = 2; // after SOI
    while i + 4 <= bytes.len() {
        if bytes[i] != 0xFF {
            return false;
        }
        let marker = bytes[i + 1];
        if marker == 0xFF {
            i += 1; // fill byte
            continue;
        }
        let len = usize::from(u16::from_be_bytes([bytes[i + 2], bytes[i + 3]]));
        let is_sof = matches!(marker, 0xC0..=0xCF) && !matches!(marker, 0xC4 | 0xC8 | 0xCC);
        if is_sof {
            if i + 9 > bytes.len() {
                return false;
            }
            bytes[i + 5..i + 7].copy_from_slice(&height.to_be_bytes());
            bytes[i + 7..i + 9].copy_from_slice(&width.to_be_bytes());
            return true;
        }
        if marker == 0xDA {
            return false; // SOS before any SOF
        }
        i += 2 + len;
    }
    false
}

/// CRC-32 (IEEE), as PNG chunks use.
fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// Rewrites the IHDR width/height of a PNG (and fixes the chunk CRC so decoders still
/// accept the header). Returns `false` if the bytes do not start with a PNG IHDR.
pub fn patch_png_dimensions(bytes: &mut [u8], width: u32, height: u32) -> bool {
    if bytes.len() < 33 || !bytes.starts_with(b"\x89PNG\r\n\x1a\n") || &bytes[12..16] != b"IHDR" {
        return false;
    }
    bytes[16..20].copy_from_slice(&width.to_be_bytes());
    bytes[20..24].copy_from_slice(&height.to_be_bytes());
    let crc = crc32(&bytes[12..29]);
    bytes[29..33].copy_from_slice(&crc.to_be_bytes());
    true
}

/// Shape of an ImageNet-like demo tree written by [`write_imagenet_demo`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ImagenetDemo {
    pub classes: usize,
    pub train_per_class: usize,
    pub val_per_class: usize,
    pub seed: u64,
    /// Shortest side of any image.
    pub min_side: u32,
    /// Longest side of any image.
    pub max_side: u32,
}

impl Default for ImagenetDemo {
    /// 10 classes, 20 train + 5 val images each, sides 64..=256.
    fn default() -> Self {
        ImagenetDemo {
            classes: 10,
            train_per_class: 20,
            val_per_class: 5,
            seed: 0,
            min_side: 64,
            max_side: 256,
        }
    }
}

/// What [`write_imagenet_demo`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImagenetDemoSummary {
    /// Class WNIDs in class-index order (which is also sorted order).
    pub wnids: Vec<String>,
    /// Number of train images.
    pub train: usize,
    /// Number of val images.
    pub val: usize,
}

/// Deterministic WNID-like class names: `n01440764` first (as in ImageNet-1k), then
/// strictly increasing 8-digit numbers, so sorted order is class order. Independent of
/// the demo seed.
///
/// # Panics
/// If `classes` is so large that 8 digits cannot hold them (> 98 million).
pub fn demo_wnids(classes: usize) -> Vec<String> {
    assert!(classes <= 98_000_000, "too many classes for 8-digit WNIDs");
    let mut rng = SplitMix64::from_state(0x1A6E_4E75);
    let max_step = (98_000_000 / classes.max(1)).clamp(1, 50_000) as u64;
    let mut id = 1_440_764u64;
    let mut out = Vec::with_capacity(classes);
    for i in 0..classes {
        if i > 0 {
            id += rng.range(1, max_step);
        }
        out.push(format!("n{id:08}"));
    }
    out
}

/// Picks a size with the longer and shorter side in `min_side..=max_side` and a
/// photo-like aspect ratio (landscape, portrait or square).
fn demo_size(rng: &mut SplitMix64, min_side: u32, max_side: u32) -> (u32, u32) {
    let (lo, hi) = (min_side.max(1), max_side.max(min_side.max(1)));
    let long = rng.range(u64::from(lo), u64::from(hi)) as u32;
    // Aspect ratios as (num, den) with num >= den: 1, 5/4, 4/3, 3/2, 16/9, 2.
    const ASPECTS: [(u64, u64); 6] = [(1, 1), (5, 4), (4, 3), (3, 2), (16, 9), (2, 1)];
    let (num, den) = ASPECTS[rng.below(ASPECTS.len() as u64) as usize];
    let short = ((u64::from(long) * den + num / 2) / num).max(u64::from(lo)) as u32;
    let short = short.min(long);
    if rng.below(4) == 0 {
        (short, long) // portrait
    } else {
        (long, short)
    }
}

fn io_other(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

/// Writes an ImageNet-shaped tree under `root` (directories are created):
///
/// * `train/<wnid>/<wnid>_<n>.JPEG`: `train_per_class` images per class; `<n>` are
///   increasing numbers with gaps and varying digit counts (like `n01440764_10026.JPEG`),
///   so lexicographic and numeric order differ.
/// * `val/ILSVRC2012_val_<8 digits>.JPEG`: `classes * val_per_class` images, numbered from
///   1, classes shuffled over the numbers.
/// * `LOC_val_solution.csv`: Kaggle's format, header `ImageId,PredictionString`, rows like
///   `ILSVRC2012_val_00000001,n01440764 10 20 100 200 ` (one to three boxes of the same
///   wnid, trailing space), rows in shuffled order as in Kaggle's file.
/// * `val_labels.txt`: `ILSVRC2012_val_00000001.JPEG 0` lines (class index), sorted.
///
/// Images are RGB JPEGs of quality 75..=95 with sides in `min_side..=max_side` and varied
/// aspect ratios.
pub fn write_imagenet_demo(root: &Path, spec: &ImagenetDemo) -> io::Result<ImagenetDemoSummary> {
    if spec.min_side == 0 || spec.min_side > spec.max_side || spec.max_side > u32::from(u16::MAX) {
        return Err(io_other(format!(
            "bad demo sides: min_side {} max_side {}",
            spec.min_side, spec.max_side
        )));
    }
    let wnids = demo_wnids(spec.classes);
    let mut rng = SplitMix64::from_state(spec.seed);
    let mut image_index = 0u64;
    let mut next_image = |rng: &mut SplitMix64| -> Vec<u8> {
        let (width, height) = demo_size(rng, spec.min_side, spec.max_side);
        let quality = rng.range(75, 95) as u8;
        image_index += 1;
        jpeg(&JpegSpec {
            width,
            height,
            seed: derive_seed(spec.seed, image_index),
            quality,
            color: JpegColor::Rgb,
            progressive: false,
        })
    };

    let train_dir = root.join("train");
    for wnid in &wnids {
        let class_dir = train_dir.join(wnid);
        fs::create_dir_all(&class_dir)?;
        let mut n = rng.range(1, 60);
        for _ in 0..spec.train_per_class {
            let bytes = next_image(&mut rng);
            fs::write(class_dir.join(format!("{wnid}_{n}.JPEG")), bytes)?;
            n += rng.range(1, 3000);
        }
    }
    if spec.train_per_class == 0 {
        fs::create_dir_all(&train_dir)?;
    }

    let val_dir = root.join("val");
    fs::create_dir_all(&val_dir)?;
    let total_val = spec.classes * spec.val_per_class;
    let mut labels: Vec<usize> = (0..total_val)
        .map(|i| i / spec.val_per_class.max(1))
        .collect();
    for i in (1..labels.len()).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        labels.swap(i, j);
    }
    let mut label_lines = String::new();
    let mut csv_rows = Vec::with_capacity(total_val);
    for (i, &label) in labels.iter().enumerate() {
        let id = format!("ILSVRC2012_val_{:08}", i + 1);
        let (width, height) = demo_size(&mut rng, spec.min_side, spec.max_side);
        let quality = rng.range(75, 95) as u8;
        image_index += 1;
        let bytes = jpeg(&JpegSpec {
            width,
            height,
            seed: derive_seed(spec.seed, image_index),
            quality,
            color: JpegColor::Rgb,
            progressive: false,
        });
        fs::write(val_dir.join(format!("{id}.JPEG")), bytes)?;
        writeln!(label_lines, "{id}.JPEG {label}").expect("writing to a String");

        let mut prediction = String::new();
        for _ in 0..rng.range(1, 3) {
            let x0 = rng.below(u64::from(width));
            let y0 = rng.below(u64::from(height));
            let x1 = rng.range(x0, u64::from(width) - 1);
            let y1 = rng.range(y0, u64::from(height) - 1);
            write!(prediction, "{} {x0} {y0} {x1} {y1} ", wnids[label])
                .expect("writing to a String");
        }
        csv_rows.push(format!("{id},{prediction}\n"));
    }
    for i in (1..csv_rows.len()).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        csv_rows.swap(i, j);
    }
    let mut csv = String::from("ImageId,PredictionString\n");
    csv_rows.iter().for_each(|row| csv.push_str(row));
    fs::write(root.join("LOC_val_solution.csv"), csv)?;
    fs::write(root.join("val_labels.txt"), label_lines)?;

    Ok(ImagenetDemoSummary {
        wnids,
        train: spec.classes * spec.train_per_class,
        val: total_val,
    })
}

/// Adds the nasty cases real ImageNet contains (and worse) to an existing demo `train`
/// directory, spread over its class folders (sorted, cycling). Files are named
/// `<wnid>_<9-digit number>.JPEG` so they never collide with demo images.
///
/// Returns `(path relative to root with '/' separators, expected outcome)`, where the
/// outcome is `"ok"` or an [`ImageProblem::code`](crate::image::ImageProblem::code):
///
/// | case                                   | outcome     |
/// |----------------------------------------|-------------|
/// | CMYK JPEG                              | `ok`        |
/// | grayscale JPEG                         | `ok`        |
/// | progressive JPEG                       | `ok`        |
/// | PNG saved as `.JPEG` (stored as png)   | `ok`        |
/// | JPEG cut in half                       | `truncated` |
/// | empty file                             | `empty`     |
/// | text file named `.JPEG`                | `not_image` |
/// | 1x1 JPEG                               | `ok`        |
/// | 1x3000 JPEG                            | `ok`        |
/// | JPEG header claiming 60000x60000       | `too_large` |
pub fn add_nasty_imagenet_files(root: &Path) -> io::Result<Vec<(String, &'static str)>> {
    let train = root.join("train");
    let mut classes: Vec<String> = fs::read_dir(&train)?
        .filter_map(|entry| entry.ok())
        .filter(|entry| entry.file_type().map(|t| t.is_dir()).unwrap_or(false))
        .filter_map(|entry| entry.file_name().to_str().map(str::to_owned))
        .collect();
    classes.sort();
    if classes.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("{}: no class folders to add files to", train.display()),
        ));
    }

    let small = |seed: u64, color: JpegColor, progressive: bool| {
        jpeg(&JpegSpec {
            width: 80,
            height: 60,
            seed,
            quality: 85,
            color,
            progressive,
        })
    };
    let mut truncated = small(104, JpegColor::Rgb, false);
    truncated.truncate(truncated.len() / 2);
    let mut bomb = small(109, JpegColor::Rgb, false);
    assert!(patch_jpeg_dimensions(&mut bomb, 60_000, 60_000));

    let cases: Vec<(Vec<u8>, &'static str)> = vec![
        (small(100, JpegColor::Cmyk, false), "ok"),
        (small(101, JpegColor::Gray, false), "ok"),
        (small(102, JpegColor::Rgb, true), "ok"),
        (png(72, 48, 103), "ok"),
        (truncated, "truncated"),
        (Vec::new(), "empty"),
        (
            b"<html><body>404 Not Found: this photo is no longer available</body></html>\n"
                .to_vec(),
            "not_image",
        ),
        (
            jpeg(&JpegSpec {
                quality: 90,
                ..JpegSpec::rgb(1, 1, 107)
            }),
            "ok",
        ),
        (jpeg(&JpegSpec::rgb(1, 3000, 108)), "ok"),
        (bomb, "too_large"),
    ];

    let mut written = Vec::with_capacity(cases.len());
    for (i, (bytes, outcome)) in cases.into_iter().enumerate() {
        let wnid = &classes[i % classes.len()];
        let name = format!("{wnid}_{:09}.JPEG", 900_000_001 + i);
        fs::write(train.join(wnid).join(&name), bytes)?;
        written.push((format!("train/{wnid}/{name}"), outcome));
    }
    Ok(written)
}

/// A sample for [`write_sharded`]: key and `(extension, bytes)` members.
pub type TestSample = (String, Vec<(String, Vec<u8>)>);

/// Writes a small sharded dataset: `sizes.len()` shards `{split}-NNNNNN.tar`, shard `i`
/// holding `sizes[i]` samples made by `sample(i, j)`, and `{split}.manifest.json`
/// listing them (no index). For tests of the stream, loader and trainer.
pub fn write_sharded(
    dir: &Path,
    split: &str,
    sizes: &[u64],
    mut sample: impl FnMut(usize, u64) -> TestSample,
) -> crate::Result<()> {
    use crate::format::manifest::{DatasetInfo, Manifest, ShardEntry};
    use crate::format::tar::ShardWriter;

    let mut list = Vec::new();
    for (i, &n) in sizes.iter().enumerate() {
        let name = crate::format::shard_name(split, i);
        let mut w = ShardWriter::create(&dir.join(&name))?;
        for j in 0..n {
            let (key, members) = sample(i, j);
            w.append(&key, &members)?;
        }
        let f = w.finish()?;
        list.push(ShardEntry {
            url: name,
            nsamples: n,
            filesize: f.filesize,
            md5sum: f.md5sum,
        });
    }
    let total = sizes.iter().sum();
    let info = DatasetInfo {
        schema_version: crate::format::SCHEMA_VERSION,
        tool: crate::format::manifest::tool_name(),
        dataset: "files".into(),
        split: split.into(),
        num_samples: total,
        num_rejected: 0,
        num_inputs: total,
        num_shards: sizes.len() as u64,
        total_bytes: list.iter().map(|s| s.filesize).sum(),
        rejected_by_reason: Default::default(),
        classes: None,
        wnids: None,
        categories: None,
        params: serde_json::json!({}),
    };
    let m = Manifest::new(split, list, info);
    crate::format::atomic_write_json(&dir.join(crate::format::manifest_name(split)), &m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix_reference_values() {
        // First outputs for seed 1234567 from the reference implementation.
        let mut rng = SplitMix64::from_state(1234567);
        assert_eq!(rng.next_u64(), 6457827717110365317);
        assert_eq!(rng.next_u64(), 3203168211198807973);
    }

    #[test]
    fn same_seed_same_bytes() {
        for color in [JpegColor::Rgb, JpegColor::Gray, JpegColor::Cmyk] {
            let spec = JpegSpec {
                color,
                progressive: color == JpegColor::Gray,
                ..JpegSpec::rgb(64, 48, 7)
            };
            assert_eq!(jpeg(&spec), jpeg(&spec));
            assert_ne!(jpeg(&spec), jpeg(&JpegSpec { seed: 8, ..spec }));
        }
        assert_eq!(png(40, 30, 1), png(40, 30, 1));
        assert_ne!(png(40, 30, 1), png(40, 30, 2));
        assert_eq!(gray_png(40, 30, 1), gray_png(40, 30, 1));
    }

    #[test]
    fn outputs_are_valid_images() {
        let limits = crate::image::ImageLimits::default();
        let info = crate::image::decode_check(&png(33, 17, 3), &limits).unwrap();
        assert_eq!((info.width, info.height), (33, 17));
        let label = gray_png(50, 20, 4);
        let decoded = image::load_from_memory(&label).unwrap();
        assert_eq!(decoded.color(), image::ColorType::L8);
        assert!(decoded.to_luma8().pixels().all(|p| p.0[0] <= 150));
        for color in [JpegColor::Rgb, JpegColor::Gray, JpegColor::Cmyk] {
            let bytes = jpeg(&JpegSpec {
                color,
                ..JpegSpec::rgb(45, 31, 5)
            });
            let info = crate::image::decode_check(&bytes, &limits).unwrap();
            assert_eq!((info.width, info.height), (45, 31));
        }
    }

    #[test]
    fn photo_sized_jpeg() {
        for seed in [0, 7, 42] {
            let len = jpeg(&JpegSpec::rgb(500, 375, seed)).len();
            assert!(
                (60_000..=150_000).contains(&len),
                "500x375 q90 is {len} bytes"
            );
        }
    }

    #[test]
    fn wnids_sorted_and_fixed() {
        let wnids = demo_wnids(1000);
        assert_eq!(wnids[0], "n01440764");
        assert!(wnids.windows(2).all(|w| w[0] < w[1]));
        assert!(wnids.iter().all(|w| w.len() == 9 && w.starts_with('n')));
        assert_eq!(demo_wnids(3), wnids[..3].to_vec());
    }

    #[test]
    fn patch_png_keeps_crc_valid() {
        let mut bytes = png(8, 8, 1);
        assert!(patch_png_dimensions(&mut bytes, 3, 5));
        let decoder = image::codecs::png::PngDecoder::new(std::io::Cursor::new(&bytes)).unwrap();
        assert_eq!(image::ImageDecoder::dimensions(&decoder), (3, 5));
    }

    fn files_under(dir: &Path) -> Vec<std::path::PathBuf> {
        let mut out = Vec::new();
        for entry in fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                out.extend(files_under(&path));
            } else {
                out.push(path);
            }
        }
        out.sort();
        out
    }

    #[test]
    fn imagenet_demo_layout() {
        let dir = tempfile::tempdir().unwrap();
        let spec = ImagenetDemo {
            classes: 3,
            train_per_class: 4,
            val_per_class: 2,
            seed: 11,
            min_side: 32,
            max_side: 96,
        };
        let summary = write_imagenet_demo(dir.path(), &spec).unwrap();
        assert_eq!(summary.wnids, demo_wnids(3));
        assert_eq!((summary.train, summary.val), (12, 6));

        let train = files_under(&dir.path().join("train"));
        assert_eq!(train.len(), 12);
        for wnid in &summary.wnids {
            let class_files = files_under(&dir.path().join("train").join(wnid));
            assert_eq!(class_files.len(), 4);
            for f in class_files {
                let name = f.file_name().unwrap().to_str().unwrap();
                assert!(
                    name.starts_with(&format!("{wnid}_"))
                        && name.rsplit('.').next() == Some("JPEG")
                );
            }
        }
        let val = files_under(&dir.path().join("val"));
        assert_eq!(val.len(), 6);
        assert!(val[0].ends_with("ILSVRC2012_val_00000001.JPEG"));
        assert!(val[5].ends_with("ILSVRC2012_val_00000006.JPEG"));

        let limits = crate::image::ImageLimits::default();
        for f in train.iter().chain(&val) {
            let info = crate::image::decode_check(&fs::read(f).unwrap(), &limits).unwrap();
            assert!((32..=96).contains(&info.width) && (32..=96).contains(&info.height));
        }

        let labels = fs::read_to_string(dir.path().join("val_labels.txt")).unwrap();
        let labels: Vec<(String, usize)> = labels
            .lines()
            .map(|l| {
                let (name, label) = l.split_once(' ').unwrap();
                (name.to_owned(), label.parse().unwrap())
            })
            .collect();
        assert_eq!(labels.len(), 6);
        assert_eq!(labels[0].0, "ILSVRC2012_val_00000001.JPEG");
        for class in 0..3 {
            assert_eq!(labels.iter().filter(|l| l.1 == class).count(), 2);
        }

        let csv = fs::read_to_string(dir.path().join("LOC_val_solution.csv")).unwrap();
        let mut lines = csv.lines();
        assert_eq!(lines.next(), Some("ImageId,PredictionString"));
        let rows: Vec<&str> = lines.collect();
        assert_eq!(rows.len(), 6);
        for row in rows {
            let (id, prediction) = row.split_once(',').unwrap();
            let label = labels
                .iter()
                .find(|l| l.0 == format!("{id}.JPEG"))
                .unwrap()
                .1;
            let first = prediction.split(' ').next().unwrap();
            assert_eq!(first, summary.wnids[label]);
            assert!(prediction.ends_with(' '));
            assert_eq!(prediction.split_whitespace().count() % 5, 0);
        }

        // Same spec, same bytes.
        let again = tempfile::tempdir().unwrap();
        write_imagenet_demo(again.path(), &spec).unwrap();
        let a = files_under(dir.path());
        let b = files_under(again.path());
        assert_eq!(a.len(), b.len());
        for (fa, fb) in a.iter().zip(&b) {
            assert_eq!(fa.strip_prefix(dir.path()), fb.strip_prefix(again.path()));
            assert_eq!(fs::read(fa).unwrap(), fs::read(fb).unwrap());
        }
    }

    #[test]
    fn nasty_files_have_their_outcomes() {
        let dir = tempfile::tempdir().unwrap();
        let spec = ImagenetDemo {
            classes: 4,
            train_per_class: 1,
            val_per_class: 1,
            seed: 3,
            min_side: 32,
            max_side: 64,
        };
        write_imagenet_demo(dir.path(), &spec).unwrap();
        let nasty = add_nasty_imagenet_files(dir.path()).unwrap();
        assert_eq!(nasty.len(), 10);
        let limits = crate::image::ImageLimits::default();
        let mut stored_png = 0;
        for (rel, outcome) in &nasty {
            let bytes = fs::read(dir.path().join(rel)).unwrap();
            assert_eq!(rel.rsplit('.').next(), Some("JPEG"), "{rel}");
            let probed = crate::image::probe(&bytes, &limits);
            let decoded = crate::image::decode_check(&bytes, &limits);
            for result in [&probed, &decoded] {
                match (result, *outcome) {
                    (Ok(info), "ok") => {
                        if info.format == crate::image::ImageFormat::Png {
                            stored_png += 1;
                        }
                    }
                    (Err(problem), code) => assert_eq!(problem.code(), code, "{rel}"),
                    (Ok(_), code) => panic!("{rel}: accepted, expected {code}"),
                }
            }
        }
        assert_eq!(stored_png, 2);
        let all = files_under(&dir.path().join("train"));
        assert_eq!(all.len(), 4 + 10);
    }
}
