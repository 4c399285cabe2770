//! A picture of what the model is fed: one row per sample with its weak (student) view,
//! its strong (teacher) view and the weak view with the masked patches greyed out.
//!
//! # Layout
//! With `n` samples, views of `size` x `size` pixels and a gap of [`GAP`] pixels:
//!
//! ```text
//!  gap | weak | gap | strong | gap | masked | gap        width  = 3 * size + 4 * GAP
//!  ────────────────────────────────────────────          height = n * size + (n + 1) * GAP
//!  row i starts at y = GAP + i * (size + GAP); tile j (0 weak, 1 strong, 2 masked)
//!  starts at x = GAP + j * (size + GAP)  (see GridLayout::tile_origin)
//! ```
//!
//! Gaps are [`BACKGROUND`]. The masked tile equals the weak view on visible patches;
//! every masked patch is blended 3:1 towards mid-grey ([`masked_tile`]) and, for patches
//! of at least 2 pixels, its top row and left column are drawn in [`GRID_LINE`], so the
//! masked region shows its patch grid while visible patches stay untouched.
//!
//! The picture is written as an RGB8 PNG, atomically (a `.partial` file, then a rename).
//! Not a hot path: it allocates freely.

use std::path::Path;

use image::ImageEncoder;

use crate::error::{Error, Result};

/// Gap between tiles and around the picture, in pixels.
pub const GAP: u32 = 4;
/// Colour of the gaps.
pub const BACKGROUND: [u8; 3] = [255, 255, 255];
/// Grey that masked patches are blended towards.
pub const MASK_GREY: u8 = 128;
/// Colour of the patch-grid lines inside masked patches.
pub const GRID_LINE: [u8; 3] = [40, 40, 40];
/// Largest width or height of a preview picture.
pub const MAX_SIDE: u32 = 1 << 16;

/// One row of the picture: a sample's two views and its mask.
#[derive(Debug, Clone, Copy)]
pub struct PreviewRow<'a> {
    /// The sample's key (for error messages; not drawn).
    pub key: &'a str,
    /// The student view: `size * size * 3` bytes, RGB, row-major.
    pub weak: &'a [u8],
    /// The teacher view, same shape.
    pub strong: &'a [u8],
    /// `(size / patch)^2` entries, row-major over the patch grid, non-zero = masked.
    pub mask: &'a [u8],
}

/// The three tiles of a row, left to right.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tile {
    /// The weak (student) view.
    Weak = 0,
    /// The strong (teacher) view.
    Strong = 1,
    /// The weak view with the masked patches greyed out.
    Masked = 2,
}

/// Geometry of a preview picture (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GridLayout {
    /// Samples (rows).
    pub rows: u32,
    /// View side in pixels.
    pub size: u32,
    /// Patch side in pixels (`size` is a multiple).
    pub patch: u32,
    /// Gap in pixels ([`GAP`]).
    pub gap: u32,
}

impl GridLayout {
    /// The layout of `rows` samples with `size` x `size` views cut into `patch` x
    /// `patch` patches. Needs `rows >= 1`, `size` a positive multiple of `patch`, and
    /// a picture no larger than [`MAX_SIDE`] on either side.
    pub fn new(rows: usize, size: u32, patch: u32) -> Result<Self> {
        if rows == 0 {
            return Err(Error::Config("preview: no samples to show".into()));
        }
        if size == 0 || patch == 0 || !size.is_multiple_of(patch) {
            return Err(Error::Config(format!(
                "preview: view size {size} is not a positive multiple of the patch size {patch}"
            )));
        }
        let gap = u64::from(GAP);
        let s = u64::from(size);
        let width = 3 * s + 4 * gap;
        let height = (rows as u64)
            .checked_mul(s + gap)
            .and_then(|h| h.checked_add(gap));
        match height {
            Some(h) if h <= u64::from(MAX_SIDE) && width <= u64::from(MAX_SIDE) => {}
            _ => {
                return Err(Error::Config(format!(
                    "preview: {rows} rows of {size}-pixel views exceed the {MAX_SIDE}-pixel limit"
                )));
            }
        }
        Ok(GridLayout {
            rows: rows as u32,
            size,
            patch,
            gap: GAP,
        })
    }

    /// Picture width: `3 * size + 4 * gap`.
    pub fn width(&self) -> u32 {
        3 * self.size + 4 * self.gap
    }

    /// Picture height: `rows * size + (rows + 1) * gap`.
    pub fn height(&self) -> u32 {
        self.rows * self.size + (self.rows + 1) * self.gap
    }

    /// Patches per side (`size / patch`).
    pub fn grid_side(&self) -> u32 {
        self.size / self.patch
    }

    /// Top-left pixel `(x, y)` of `tile` in `row`.
    pub fn tile_origin(&self, row: u32, tile: Tile) -> (u32, u32) {
        let step = self.size + self.gap;
        (self.gap + tile as u32 * step, self.gap + row * step)
    }
}

/// An RGB8 picture.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreviewImage {
    /// Its geometry.
    pub layout: GridLayout,
    /// `width * height * 3` bytes, row-major.
    pub rgb: Vec<u8>,
}

impl PreviewImage {
    /// Width in pixels.
    pub fn width(&self) -> u32 {
        self.layout.width()
    }

    /// Height in pixels.
    pub fn height(&self) -> u32 {
        self.layout.height()
    }

    /// The pixel at `(x, y)`.
    pub fn pixel(&self, x: u32, y: u32) -> [u8; 3] {
        let i = (y as usize * self.width() as usize + x as usize) * 3;
        [self.rgb[i], self.rgb[i + 1], self.rgb[i + 2]]
    }

    /// A copy of one tile (`size * size * 3` bytes).
    pub fn tile(&self, row: u32, tile: Tile) -> Vec<u8> {
        let (x0, y0) = self.layout.tile_origin(row, tile);
        let (side, width) = (self.layout.size as usize, self.width() as usize);
        let mut out = Vec::with_capacity(side * side * 3);
        for y in 0..side {
            let start = ((y0 as usize + y) * width + x0 as usize) * 3;
            out.extend_from_slice(&self.rgb[start..start + side * 3]);
        }
        out
    }

    /// The picture as PNG bytes.
    pub fn encode_png(&self) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        image::codecs::png::PngEncoder::new(&mut out)
            .write_image(
                &self.rgb,
                self.width(),
                self.height(),
                image::ExtendedColorType::Rgb8,
            )
            .map_err(|e| Error::Config(format!("preview: PNG encoding failed: {e}")))?;
        Ok(out)
    }

    /// Writes the PNG to `path` atomically (see [`crate::format::atomic_write`]).
    pub fn write_png(&self, path: &Path) -> Result<()> {
        crate::format::atomic_write(path, &self.encode_png()?)
    }
}

fn check_len(key: &str, what: &str, len: usize, need: usize) -> Result<()> {
    if len != need {
        return Err(Error::Config(format!(
            "preview: sample {key}: {what} has {len} bytes, expected {need}"
        )));
    }
    Ok(())
}

/// Writes the masked tile of `weak` into `out` (both `size * size * 3` bytes): visible
/// patches are copied; in a masked patch every pixel becomes
/// `(p + 3 * MASK_GREY) / 4` per channel, except that for `patch >= 2` the patch's top
/// row and left column are [`GRID_LINE`]. `mask` has `(size / patch)^2` entries,
/// row-major, non-zero = masked; `size` must be a positive multiple of `patch`.
pub fn masked_tile(weak: &[u8], mask: &[u8], size: u32, patch: u32, out: &mut [u8]) -> Result<()> {
    let layout = GridLayout::new(1, size, patch)?;
    let (side, p, g) = (size as usize, patch as usize, layout.grid_side() as usize);
    check_len("-", "weak view", weak.len(), side * side * 3)?;
    check_len("-", "output tile", out.len(), side * side * 3)?;
    check_len("-", "mask", mask.len(), g * g)?;
    for y in 0..side {
        for x in 0..side {
            let i = (y * side + x) * 3;
            let px = &weak[i..i + 3];
            let dst = &mut out[i..i + 3];
            if mask[(y / p) * g + x / p] == 0 {
                dst.copy_from_slice(px);
            } else if p >= 2 && (y % p == 0 || x % p == 0) {
                dst.copy_from_slice(&GRID_LINE);
            } else {
                for (d, &s) in dst.iter_mut().zip(px) {
                    *d = ((u16::from(s) + 3 * u16::from(MASK_GREY)) / 4) as u8;
                }
            }
        }
    }
    Ok(())
}

/// Composes the picture of `rows` (see the module docs for the layout). Every row's
/// views must hold `size * size * 3` bytes and its mask `(size / patch)^2` entries.
pub fn compose(rows: &[PreviewRow<'_>], size: u32, patch: u32) -> Result<PreviewImage> {
    let layout = GridLayout::new(rows.len(), size, patch)?;
    let side = size as usize;
    let view_len = side * side * 3;
    let grid = layout.grid_side() as usize;
    for r in rows {
        check_len(r.key, "weak view", r.weak.len(), view_len)?;
        check_len(r.key, "strong view", r.strong.len(), view_len)?;
        check_len(r.key, "mask", r.mask.len(), grid * grid)?;
    }
    let width = layout.width() as usize;
    let mut rgb = BACKGROUND.repeat(width * layout.height() as usize);
    let mut masked = vec![0u8; view_len];
    for (i, r) in rows.iter().enumerate() {
        masked_tile(r.weak, r.mask, size, patch, &mut masked)?;
        for (tile, pixels) in [
            (Tile::Weak, r.weak),
            (Tile::Strong, r.strong),
            (Tile::Masked, masked.as_slice()),
        ] {
            let (x0, y0) = layout.tile_origin(i as u32, tile);
            for y in 0..side {
                let dst = ((y0 as usize + y) * width + x0 as usize) * 3;
                rgb[dst..dst + side * 3].copy_from_slice(&pixels[y * side * 3..(y + 1) * side * 3]);
            }
        }
    }
    Ok(PreviewImage { layout, rgb })
}

/// [`compose`] then [`PreviewImage::write_png`] to `path`; returns the layout.
pub fn write_preview(
    path: &Path,
    rows: &[PreviewRow<'_>],
    size: u32,
    patch: u32,
) -> Result<GridLayout> {
    let img = compose(rows, size, patch)?;
    img.write_png(path)?;
    Ok(img.layout)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_numbers() {
        let l = GridLayout::new(16, 224, 16).unwrap();
        assert_eq!(
            (l.width(), l.height()),
            (3 * 224 + 4 * 4, 16 * 224 + 17 * 4)
        );
        assert_eq!(l.tile_origin(0, Tile::Weak), (4, 4));
        assert_eq!(l.tile_origin(1, Tile::Masked), (4 + 2 * 228, 4 + 228));
        assert!(GridLayout::new(0, 224, 16).is_err());
        assert!(GridLayout::new(1, 224, 15).is_err());
        assert!(GridLayout::new(1_000_000, 224, 16).is_err());
    }

    #[test]
    fn masked_tile_touches_only_masked_patches() {
        let (size, patch) = (8u32, 4u32);
        let weak: Vec<u8> = (0..8 * 8 * 3).map(|i| (i * 7 % 256) as u8).collect();
        let mask = [0u8, 1, 1, 0];
        let mut out = vec![0u8; weak.len()];
        masked_tile(&weak, &mask, size, patch, &mut out).unwrap();
        for y in 0..8usize {
            for x in 0..8usize {
                let i = (y * 8 + x) * 3;
                let m = mask[(y / 4) * 2 + x / 4] != 0;
                if !m {
                    assert_eq!(out[i..i + 3], weak[i..i + 3]);
                } else if y % 4 == 0 || x % 4 == 0 {
                    assert_eq!(out[i..i + 3], GRID_LINE);
                } else {
                    let want = ((u16::from(weak[i]) + 384) / 4) as u8;
                    assert_eq!(out[i], want);
                }
            }
        }
        assert!(masked_tile(&weak, &[0u8; 3], size, patch, &mut out).is_err());
    }
}
