//! Patch-mask generators for ConMIM pretraining (spec section "Masking").
//!
//! A mask is a row-major `u8` slice over the patch grid (`1` = masked, `0` = visible),
//! written into a caller-owned buffer: generators are pure functions of their
//! configuration and the [`SplitMix64`] state, keep no per-call state and allocate
//! nothing, so one generator can be shared by all loader workers (`Send + Sync`) and a
//! seed reproduces the same masks on any machine.
//!
//! Three generators, all generic in image and patch size (through [`MaskGrid`]):
//!
//! * [`RandomPatchMask`] — MAE-style random masking at patch granularity (ConMIM ViT-S:
//!   75% of the 14x14 = 196 patches, i.e. 147).
//! * [`RandomCellMask`] — random masking of square cells of `cell x cell` patches
//!   (ConMIM ViT-B/L, "random with mask-patch size 32": 37 of the 7x7 cells of 2x2
//!   patches, i.e. 148 of 196 patches).
//! * [`BlockMask`] — BEiT's block-wise masking (75 patches; each block's target area is
//!   drawn from at least 16 patches, `min_num_patches`, though rounding and the last
//!   blocks can place smaller rectangles, as BEiT's; aspect ratio in `[0.3, 1/0.3]`).
//!
//! Random draws: integers come from [`SplitMix64::below`] / [`SplitMix64::range`],
//! uniform floats in `[0, 1)` from the top 53 bits of [`SplitMix64::next_u64`].

use crate::seed::SplitMix64;
use crate::{Error, Result};

/// Patch-grid geometry: image side / patch size (e.g. 224/16 -> 14x14).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MaskGrid {
    /// Patch rows (image height / patch size).
    pub rows: usize,
    /// Patch columns (image width / patch size).
    pub cols: usize,
}

impl MaskGrid {
    /// A `rows x cols` grid; both must be positive.
    pub fn new(rows: usize, cols: usize) -> Result<Self> {
        if rows == 0 || cols == 0 {
            return Err(Error::Config(format!(
                "mask grid must be non-empty, got {rows}x{cols}"
            )));
        }
        rows.checked_mul(cols)
            .ok_or_else(|| Error::Config(format!("mask grid {rows}x{cols} overflows usize")))?;
        Ok(MaskGrid { rows, cols })
    }

    /// The grid of a square image of side `image_size` cut into `patch_size` patches
    /// (224/16 -> 14x14, 384/16 -> 24x24). The side must be a positive multiple of the
    /// patch size, as a ViT patch embedding requires.
    pub fn square(image_size: usize, patch_size: usize) -> Result<Self> {
        Self::from_image(image_size, image_size, patch_size)
    }

    /// The grid of a `height x width` image cut into `patch_size` patches; both sides
    /// must be positive multiples of `patch_size`.
    pub fn from_image(height: usize, width: usize, patch_size: usize) -> Result<Self> {
        if patch_size == 0 {
            return Err(Error::Config("mask patch size must be positive".into()));
        }
        if !height.is_multiple_of(patch_size) || !width.is_multiple_of(patch_size) {
            return Err(Error::Config(format!(
                "image {height}x{width} is not divisible by patch size {patch_size}"
            )));
        }
        Self::new(height / patch_size, width / patch_size)
    }

    /// Number of patches (`rows * cols`), i.e. the length of a mask buffer.
    pub fn num_patches(&self) -> usize {
        self.rows * self.cols
    }
}

/// A patch-mask generator.
pub trait MaskGenerator: Send + Sync {
    /// Fills `out` (len `rows*cols`, row-major, 1 = masked) using `rng`; returns the
    /// masked count. Every element of `out` is overwritten.
    ///
    /// # Panics
    /// If `out.len() != self.grid().num_patches()`.
    fn generate(&self, rng: &mut SplitMix64, out: &mut [u8]) -> usize;

    /// The patch grid this generator masks.
    fn grid(&self) -> MaskGrid;
}

/// Uniform `f64` in `[0, 1)` from the top 53 bits of the next draw.
fn unit_f64(rng: &mut SplitMix64) -> f64 {
    (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64
}

/// Python's `random.uniform(a, b)`: `a + (b - a) * u`, `u` in `[0, 1)`.
fn uniform(rng: &mut SplitMix64, a: f64, b: f64) -> f64 {
    a + (b - a) * unit_f64(rng)
}

fn check_len(grid: MaskGrid, out: &[u8]) {
    assert_eq!(
        out.len(),
        grid.num_patches(),
        "mask buffer has {} entries, grid {}x{} needs {}",
        out.len(),
        grid.rows,
        grid.cols,
        grid.num_patches()
    );
}

fn check_ratio(ratio: f64) -> Result<()> {
    if !(0.0..=1.0).contains(&ratio) {
        return Err(Error::Config(format!(
            "mask ratio must be in [0, 1], got {ratio}"
        )));
    }
    Ok(())
}

/// Selection sampling (Knuth, TAOCP vol. 2, Algorithm S): visits `0..n` in order and
/// calls `select(i, chosen)` for each index, choosing exactly `k` of them uniformly
/// at random among all `k`-subsets, with O(1) memory. Index `i` is chosen with
/// probability `(k - chosen so far) / (n - i)`, drawn exactly as an integer comparison.
fn selection_sample(rng: &mut SplitMix64, n: usize, k: usize, mut select: impl FnMut(usize, bool)) {
    debug_assert!(k <= n);
    let mut need = k;
    for i in 0..n {
        let remaining = n - i;
        let take = if need == 0 {
            false
        } else if need == remaining {
            true
        } else {
            (rng.below(remaining as u64) as usize) < need
        };
        if take {
            need -= 1;
        }
        select(i, take);
    }
}

/// MAE-style random masking at patch granularity: exactly [`Self::num_masked`]
/// patches, chosen uniformly at random without replacement.
///
/// Rounding follows MAE (`len_keep = int(N * (1 - mask_ratio))`): the number of
/// *visible* patches is `floor(N * (1 - ratio))` and every other patch is masked, so
/// 14x14 at 0.75 masks `196 - floor(49.0) = 147` patches (the spec's "random 75% of
/// the 196 patches").
///
/// Sampling is Knuth's selection sampling (Algorithm S): one pass over the patches,
/// O(1) extra memory, exactly uniform over all subsets of that size.
#[derive(Debug, Clone, PartialEq)]
pub struct RandomPatchMask {
    grid: MaskGrid,
    ratio: f64,
    num_masked: usize,
}

impl RandomPatchMask {
    /// Masks `N - floor(N * (1 - ratio))` of the `N` patches of `grid`; `ratio` in
    /// `[0, 1]`.
    pub fn new(grid: MaskGrid, ratio: f64) -> Result<Self> {
        let grid = MaskGrid::new(grid.rows, grid.cols)?;
        check_ratio(ratio)?;
        let n = grid.num_patches();
        let keep = ((n as f64) * (1.0 - ratio)).floor() as usize;
        let num_masked = n - keep.min(n);
        Ok(RandomPatchMask {
            grid,
            ratio,
            num_masked,
        })
    }

    /// ConMIM ViT-S/16 preset: 14x14 patches, 75% masked (147 of 196).
    pub fn conmim_vit_s() -> Self {
        Self::new(MaskGrid { rows: 14, cols: 14 }, 0.75).expect("valid preset")
    }

    /// The configured mask ratio.
    pub fn ratio(&self) -> f64 {
        self.ratio
    }

    /// Patches masked by every call to [`MaskGenerator::generate`].
    pub fn num_masked(&self) -> usize {
        self.num_masked
    }
}

impl MaskGenerator for RandomPatchMask {
    fn generate(&self, rng: &mut SplitMix64, out: &mut [u8]) -> usize {
        check_len(self.grid, out);
        selection_sample(rng, out.len(), self.num_masked, |i, take| {
            out[i] = u8::from(take);
        });
        self.num_masked
    }

    fn grid(&self) -> MaskGrid {
        self.grid
    }
}

/// Random masking of square cells of `cell x cell` patches (ConMIM's "random with
/// mask-patch size 32" for ViT-B/L: 32-px cells of 2x2 16-px patches).
///
/// The patch grid is tiled by cells aligned at the top-left corner; a grid not
/// divisible by `cell` ends in partial edge cells, which count as cells (they are
/// masked whole like the others and hold fewer patches). With `C` cells,
/// `ceil(C * ratio)` cells are chosen uniformly at random without replacement
/// (selection sampling, as in [`RandomPatchMask`]) and all their patches masked:
/// 14x14 patches, cell 2, 0.75 -> 7x7 cells, `ceil(36.75) = 37` cells, 148 patches.
/// The masked patch count is fixed for divisible grids and may vary by draw otherwise.
#[derive(Debug, Clone, PartialEq)]
pub struct RandomCellMask {
    grid: MaskGrid,
    cell: usize,
    ratio: f64,
    cell_rows: usize,
    cell_cols: usize,
    num_masked_cells: usize,
}

impl RandomCellMask {
    /// Masks `ceil(C * ratio)` of the `C` cells of `cell x cell` patches; `cell >= 1`,
    /// `ratio` in `[0, 1]`. (The product is reduced by 1e-9 before `ceil`, so a ratio
    /// that is an exact fraction of `C` in decimal is not bumped up by float error.)
    pub fn new(grid: MaskGrid, cell: usize, ratio: f64) -> Result<Self> {
        let grid = MaskGrid::new(grid.rows, grid.cols)?;
        check_ratio(ratio)?;
        if cell == 0 {
            return Err(Error::Config("mask cell size must be positive".into()));
        }
        let cell_rows = grid.rows.div_ceil(cell);
        let cell_cols = grid.cols.div_ceil(cell);
        let cells = cell_rows * cell_cols;
        let num_masked_cells = ((cells as f64) * ratio - 1e-9).ceil().max(0.0) as usize;
        Ok(RandomCellMask {
            grid,
            cell,
            ratio,
            cell_rows,
            cell_cols,
            num_masked_cells: num_masked_cells.min(cells),
        })
    }

    /// ConMIM ViT-B/16 (and L/16) preset: 14x14 patches, 2x2-patch cells, 75% of the
    /// 49 cells masked (37 cells = 148 of 196 patches).
    pub fn conmim_vit_b() -> Self {
        Self::new(MaskGrid { rows: 14, cols: 14 }, 2, 0.75).expect("valid preset")
    }

    /// Cell side in patches.
    pub fn cell(&self) -> usize {
        self.cell
    }

    /// The configured mask ratio (of cells).
    pub fn ratio(&self) -> f64 {
        self.ratio
    }

    /// The cell grid (`ceil(rows / cell) x ceil(cols / cell)`).
    pub fn cell_grid(&self) -> MaskGrid {
        MaskGrid {
            rows: self.cell_rows,
            cols: self.cell_cols,
        }
    }

    /// Cells masked by every call to [`MaskGenerator::generate`].
    pub fn num_masked_cells(&self) -> usize {
        self.num_masked_cells
    }
}

impl MaskGenerator for RandomCellMask {
    fn generate(&self, rng: &mut SplitMix64, out: &mut [u8]) -> usize {
        check_len(self.grid, out);
        let (rows, cols, cell) = (self.grid.rows, self.grid.cols, self.cell);
        let cell_cols = self.cell_cols;
        let mut masked = 0;
        selection_sample(
            rng,
            self.cell_rows * cell_cols,
            self.num_masked_cells,
            |c, take| {
                let r0 = (c / cell_cols) * cell;
                let c0 = (c % cell_cols) * cell;
                let (r1, c1) = ((r0 + cell).min(rows), (c0 + cell).min(cols));
                for r in r0..r1 {
                    out[r * cols + c0..r * cols + c1].fill(u8::from(take));
                }
                if take {
                    masked += (r1 - r0) * (c1 - c0);
                }
            },
        );
        masked
    }

    fn grid(&self) -> MaskGrid {
        self.grid
    }
}

/// One rectangle placed by [`BlockMask`] (used by tests to check the block shapes).
#[derive(Debug, Clone, Copy, PartialEq)]
struct Block {
    top: usize,
    left: usize,
    h: usize,
    w: usize,
    /// The sampled aspect ratio before rounding to whole patches.
    aspect: f64,
}

/// BEiT's block-wise masking (`MaskingGenerator` in BEiT's `masking_generator.py`),
/// ported draw for draw (with [`SplitMix64`] in place of Python's `random`).
///
/// A call starts from an all-visible mask and repeats *block rounds* while fewer than
/// `num_masking_patches` patches are masked:
///
/// 1. `max_mask_patches = min(num_masking_patches - masked, max_num_patches)`.
/// 2. Up to 10 attempts:
///    * `target_area ~ U(min_num_patches, max_mask_patches)` (Python `uniform`, so the
///      bounds may be in either order near the end);
///    * `aspect = exp(U(ln min_aspect, ln max_aspect))` (log-uniform);
///    * `h = round(sqrt(target_area * aspect))`, `w = round(sqrt(target_area / aspect))`
///      (Python's `round`: halves to even);
///    * if `w < cols` and `h < rows` (strictly, as in BEiT): `top ~ U{0..=rows-h}`,
///      `left ~ U{0..=cols-w}`; if the rectangle adds between 1 and `max_mask_patches`
///      new patches (so the target is never overshot), mask it;
///    * stop attempting once this round masked something.
/// 3. If a round masked nothing, give up (the mask may then fall short of the target).
///
/// So the result has at most `num_masking_patches` masked patches, made of overlapping
/// rectangles. BEiT v1 often stops short: with the preset, about two thirds of the masks
/// reach exactly 75 and the mean is about 74.5 (measured both with BEiT's Python code
/// and with this port); [`BlockMask::with_exact_count`] adds BEiT v2's random top-up.
#[derive(Debug, Clone, PartialEq)]
pub struct BlockMask {
    grid: MaskGrid,
    num_masking_patches: usize,
    min_num_patches: usize,
    max_num_patches: usize,
    min_aspect: f64,
    max_aspect: f64,
    log_aspect: (f64, f64),
    exact_count: bool,
}

impl BlockMask {
    /// Number of rectangle attempts per block round (BEiT: 10).
    pub const ATTEMPTS: usize = 10;

    /// BEiT's constructor: `max_num_patches` defaults to `num_masking_patches`,
    /// `max_aspect` to `1 / min_aspect`. Requires `num_masking_patches <= rows*cols`,
    /// `min_num_patches >= 1`, `max_num_patches >= 1` and
    /// `0 < min_aspect <= max_aspect` (finite).
    pub fn new(
        grid: MaskGrid,
        num_masking_patches: usize,
        min_num_patches: usize,
        max_num_patches: Option<usize>,
        min_aspect: f64,
        max_aspect: Option<f64>,
    ) -> Result<Self> {
        let grid = MaskGrid::new(grid.rows, grid.cols)?;
        if num_masking_patches > grid.num_patches() {
            return Err(Error::Config(format!(
                "block mask: {num_masking_patches} masked patches exceed the {} of a {}x{} grid",
                grid.num_patches(),
                grid.rows,
                grid.cols
            )));
        }
        if min_num_patches == 0 {
            return Err(Error::Config(
                "block mask: min_num_patches must be positive".into(),
            ));
        }
        let max_num_patches = max_num_patches.unwrap_or(num_masking_patches);
        if max_num_patches == 0 && num_masking_patches > 0 {
            return Err(Error::Config(
                "block mask: max_num_patches must be positive".into(),
            ));
        }
        if !(min_aspect.is_finite() && min_aspect > 0.0) {
            return Err(Error::Config(format!(
                "block mask: min_aspect must be positive and finite, got {min_aspect}"
            )));
        }
        let max_aspect = max_aspect.unwrap_or(1.0 / min_aspect);
        if !(max_aspect.is_finite() && max_aspect >= min_aspect) {
            return Err(Error::Config(format!(
                "block mask: max_aspect must be finite and >= min_aspect {min_aspect}, got {max_aspect}"
            )));
        }
        Ok(BlockMask {
            grid,
            num_masking_patches,
            min_num_patches,
            max_num_patches,
            min_aspect,
            max_aspect,
            log_aspect: (min_aspect.ln(), max_aspect.ln()),
            exact_count: false,
        })
    }

    /// BEiT preset: 14x14 patches, 75 masked, block target areas of >= 16 patches
    /// (`min_num_patches`), aspect ratio in `[0.3, 1/0.3]`.
    pub fn beit() -> Self {
        Self::new(MaskGrid { rows: 14, cols: 14 }, 75, 16, None, 0.3, None).expect("valid preset")
    }

    /// BEiT v2's top-up (off by default, as in BEiT v1 and the presets): when the block
    /// rounds stop short of `num_masking_patches`, mask further patches chosen uniformly
    /// at random among the visible ones, so every mask has exactly the target count.
    pub fn with_exact_count(mut self, exact: bool) -> Self {
        self.exact_count = exact;
        self
    }

    /// Whether masks are topped up to exactly the target (see [`Self::with_exact_count`]).
    pub fn exact_count(&self) -> bool {
        self.exact_count
    }

    /// Target number of masked patches.
    pub fn num_masking_patches(&self) -> usize {
        self.num_masking_patches
    }

    /// Lower bound of a block's sampled target area.
    pub fn min_num_patches(&self) -> usize {
        self.min_num_patches
    }

    /// Upper bound of the patches one block may add.
    pub fn max_num_patches(&self) -> usize {
        self.max_num_patches
    }

    /// Aspect-ratio bounds `(min, max)` (height / width).
    pub fn aspect_range(&self) -> (f64, f64) {
        (self.min_aspect, self.max_aspect)
    }

    /// One block round (BEiT's `_mask`): returns the number of newly masked patches.
    fn place_block(
        &self,
        rng: &mut SplitMix64,
        out: &mut [u8],
        max_mask_patches: usize,
        on_block: &mut impl FnMut(Block),
    ) -> usize {
        let (rows, cols) = (self.grid.rows, self.grid.cols);
        let mut delta = 0;
        for _ in 0..Self::ATTEMPTS {
            let target_area = uniform(rng, self.min_num_patches as f64, max_mask_patches as f64);
            let aspect = uniform(rng, self.log_aspect.0, self.log_aspect.1).exp();
            let h = (target_area * aspect).sqrt().round_ties_even() as usize;
            let w = (target_area / aspect).sqrt().round_ties_even() as usize;
            if w < cols && h < rows {
                let top = rng.range(0, (rows - h) as u64) as usize;
                let left = rng.range(0, (cols - w) as u64) as usize;
                let already: usize = (top..top + h)
                    .map(|r| {
                        out[r * cols + left..r * cols + left + w]
                            .iter()
                            .map(|&m| usize::from(m))
                            .sum::<usize>()
                    })
                    .sum();
                let fresh = h * w - already;
                if 0 < fresh && fresh <= max_mask_patches {
                    for r in top..top + h {
                        out[r * cols + left..r * cols + left + w].fill(1);
                    }
                    delta += fresh;
                    on_block(Block {
                        top,
                        left,
                        h,
                        w,
                        aspect,
                    });
                }
                if delta > 0 {
                    break;
                }
            }
        }
        delta
    }

    /// [`MaskGenerator::generate`] reporting every placed block to `on_block`.
    fn generate_with(
        &self,
        rng: &mut SplitMix64,
        out: &mut [u8],
        mut on_block: impl FnMut(Block),
    ) -> usize {
        check_len(self.grid, out);
        out.fill(0);
        let mut count = 0;
        while count < self.num_masking_patches {
            let max_mask_patches = (self.num_masking_patches - count).min(self.max_num_patches);
            let delta = self.place_block(rng, out, max_mask_patches, &mut on_block);
            if delta == 0 {
                break;
            }
            count += delta;
        }
        if self.exact_count && count < self.num_masking_patches {
            // Selection sampling over the visible patches only.
            let mut visible = out.len() - count;
            let mut need = self.num_masking_patches - count;
            for m in out.iter_mut().filter(|m| **m == 0) {
                if need == visible || (need > 0 && (rng.below(visible as u64) as usize) < need) {
                    *m = 1;
                    need -= 1;
                }
                visible -= 1;
            }
            count = self.num_masking_patches;
        }
        count
    }
}

impl MaskGenerator for BlockMask {
    fn generate(&self, rng: &mut SplitMix64, out: &mut [u8]) -> usize {
        self.generate_with(rng, out, |_| {})
    }

    fn grid(&self) -> MaskGrid {
        self.grid
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grid(rows: usize, cols: usize) -> MaskGrid {
        MaskGrid::new(rows, cols).unwrap()
    }

    fn ones(mask: &[u8]) -> usize {
        mask.iter().map(|&m| usize::from(m)).sum()
    }

    /// Draws `draws` masks, checks each is 0/1 with the returned count, and returns
    /// the per-position masked frequency.
    fn frequencies(g: &dyn MaskGenerator, seed: u64, draws: usize) -> Vec<f64> {
        let n = g.grid().num_patches();
        let mut rng = SplitMix64::new(seed, 0);
        let mut out = vec![7u8; n];
        let mut hits = vec![0usize; n];
        for _ in 0..draws {
            let k = g.generate(&mut rng, &mut out);
            assert!(out.iter().all(|&m| m <= 1));
            assert_eq!(ones(&out), k);
            for (h, &m) in hits.iter_mut().zip(&out) {
                *h += usize::from(m);
            }
        }
        hits.iter().map(|&h| h as f64 / draws as f64).collect()
    }

    fn assert_deterministic(g: &dyn MaskGenerator) {
        let n = g.grid().num_patches();
        let draw = |seed: u64| {
            let mut rng = SplitMix64::new(seed, 3);
            let mut masks = vec![0u8; 4 * n];
            for chunk in masks.chunks_mut(n) {
                g.generate(&mut rng, chunk);
            }
            masks
        };
        assert_eq!(draw(11), draw(11));
        assert_ne!(draw(11), draw(12));
        // Successive masks from one stream differ too.
        let m = draw(11);
        assert_ne!(m[..n], m[n..2 * n]);
    }

    #[test]
    fn grid_geometry_and_validation() {
        assert_eq!(MaskGrid::square(224, 16).unwrap(), grid(14, 14));
        assert_eq!(MaskGrid::square(384, 16).unwrap(), grid(24, 24));
        assert_eq!(MaskGrid::from_image(224, 448, 32).unwrap(), grid(7, 14));
        assert_eq!(grid(14, 14).num_patches(), 196);
        assert!(matches!(MaskGrid::square(225, 16), Err(Error::Config(_))));
        assert!(matches!(MaskGrid::square(224, 0), Err(Error::Config(_))));
        assert!(matches!(MaskGrid::square(0, 16), Err(Error::Config(_))));
        assert!(matches!(MaskGrid::new(3, 0), Err(Error::Config(_))));
    }

    #[test]
    fn constructors_validate() {
        let g = grid(14, 14);
        let bad = MaskGrid { rows: 0, cols: 14 };
        assert!(matches!(
            RandomPatchMask::new(g, 1.5),
            Err(Error::Config(_))
        ));
        assert!(matches!(
            RandomPatchMask::new(g, -0.1),
            Err(Error::Config(_))
        ));
        assert!(matches!(
            RandomPatchMask::new(g, f64::NAN),
            Err(Error::Config(_))
        ));
        assert!(matches!(
            RandomPatchMask::new(bad, 0.5),
            Err(Error::Config(_))
        ));
        assert!(matches!(
            RandomCellMask::new(g, 0, 0.5),
            Err(Error::Config(_))
        ));
        assert!(matches!(
            RandomCellMask::new(g, 2, 2.0),
            Err(Error::Config(_))
        ));
        assert!(matches!(
            RandomCellMask::new(bad, 2, 0.5),
            Err(Error::Config(_))
        ));
        assert!(matches!(
            BlockMask::new(g, 197, 16, None, 0.3, None),
            Err(Error::Config(_))
        ));
        assert!(matches!(
            BlockMask::new(g, 75, 0, None, 0.3, None),
            Err(Error::Config(_))
        ));
        assert!(matches!(
            BlockMask::new(g, 75, 16, Some(0), 0.3, None),
            Err(Error::Config(_))
        ));
        assert!(matches!(
            BlockMask::new(g, 75, 16, None, 0.0, None),
            Err(Error::Config(_))
        ));
        assert!(matches!(
            BlockMask::new(g, 75, 16, None, 2.0, Some(1.0)),
            Err(Error::Config(_))
        ));
        assert!(matches!(
            BlockMask::new(g, 75, 16, None, 0.3, Some(f64::INFINITY)),
            Err(Error::Config(_))
        ));
        let b = BlockMask::beit();
        assert_eq!(b.max_num_patches(), 75);
        let (lo, hi) = b.aspect_range();
        assert_eq!(lo, 0.3);
        assert!((hi - 1.0 / 0.3).abs() < 1e-12);
    }

    #[test]
    fn unit_f64_is_in_unit_interval() {
        let mut rng = SplitMix64::new(5, 5);
        let mut sum = 0.0;
        for _ in 0..10_000 {
            let u = unit_f64(&mut rng);
            assert!((0.0..1.0).contains(&u));
            sum += u;
        }
        assert!((sum / 10_000.0 - 0.5).abs() < 0.02);
    }

    #[test]
    fn random_patch_counts_follow_mae_rounding() {
        let g = RandomPatchMask::conmim_vit_s();
        assert_eq!(g.grid(), grid(14, 14));
        assert_eq!(g.num_masked(), 147);
        // MAE: keep int(196 * 0.4) = 78 -> 118 masked; int(196 * 0.1) = 19 -> 177.
        assert_eq!(
            RandomPatchMask::new(grid(14, 14), 0.6)
                .unwrap()
                .num_masked(),
            118
        );
        assert_eq!(
            RandomPatchMask::new(grid(14, 14), 0.9)
                .unwrap()
                .num_masked(),
            177
        );
        assert_eq!(
            RandomPatchMask::new(grid(14, 14), 0.0)
                .unwrap()
                .num_masked(),
            0
        );
        assert_eq!(
            RandomPatchMask::new(grid(14, 14), 1.0)
                .unwrap()
                .num_masked(),
            196
        );
        let mut rng = SplitMix64::new(1, 0);
        let mut out = [9u8; 196];
        for _ in 0..200 {
            assert_eq!(g.generate(&mut rng, &mut out), 147);
            assert_eq!(ones(&out), 147);
            assert!(out.iter().all(|&m| m <= 1));
        }
        let all = RandomPatchMask::new(grid(14, 14), 1.0).unwrap();
        assert_eq!(all.generate(&mut rng, &mut out), 196);
        assert!(out.iter().all(|&m| m == 1));
    }

    #[test]
    fn random_patch_generic_sizes() {
        // 384/16 = 24x24 = 576 patches: keep 144, mask 432.
        let g = RandomPatchMask::new(MaskGrid::square(384, 16).unwrap(), 0.75).unwrap();
        assert_eq!(g.num_masked(), 432);
        let mut rng = SplitMix64::new(2, 0);
        let mut out = vec![0u8; 576];
        assert_eq!(g.generate(&mut rng, &mut out), 432);
        assert_eq!(ones(&out), 432);
        // 32x32 and a non-square grid.
        for (r, c, want) in [(32, 32, 768), (7, 13, 91 - 22)] {
            let g = RandomPatchMask::new(grid(r, c), 0.75).unwrap();
            let mut out = vec![0u8; r * c];
            assert_eq!(g.generate(&mut rng, &mut out), want);
            assert_eq!(ones(&out), want);
        }
    }

    #[test]
    fn random_patch_is_deterministic_and_uniform() {
        let g = RandomPatchMask::conmim_vit_s();
        assert_deterministic(&g);
        let freq = frequencies(&g, 42, 4000);
        let expect = 147.0 / 196.0;
        for (i, f) in freq.iter().enumerate() {
            assert!((f - expect).abs() < 0.04, "patch {i}: masked {f}");
        }
    }

    #[test]
    #[should_panic(expected = "mask buffer")]
    fn wrong_buffer_length_panics() {
        let mut out = [0u8; 195];
        RandomPatchMask::conmim_vit_s().generate(&mut SplitMix64::new(0, 0), &mut out);
    }

    /// Checks that every cell is either fully masked or fully visible and returns the
    /// number of masked cells.
    fn masked_cells(out: &[u8], rows: usize, cols: usize, cell: usize) -> usize {
        let mut count = 0;
        for cr in 0..rows.div_ceil(cell) {
            for cc in 0..cols.div_ceil(cell) {
                let r0 = cr * cell;
                let c0 = cc * cell;
                let first = out[r0 * cols + c0];
                for r in r0..(r0 + cell).min(rows) {
                    for c in c0..(c0 + cell).min(cols) {
                        assert_eq!(out[r * cols + c], first, "cell ({cr},{cc}) is split");
                    }
                }
                count += usize::from(first);
            }
        }
        count
    }

    #[test]
    fn cell_mask_preset_masks_37_aligned_cells() {
        let g = RandomCellMask::conmim_vit_b();
        assert_eq!(g.cell_grid(), grid(7, 7));
        assert_eq!(g.num_masked_cells(), 37);
        let mut rng = SplitMix64::new(3, 0);
        let mut out = [9u8; 196];
        for _ in 0..200 {
            assert_eq!(g.generate(&mut rng, &mut out), 148);
            assert_eq!(ones(&out), 148);
            assert_eq!(masked_cells(&out, 14, 14, 2), 37);
        }
    }

    #[test]
    fn cell_mask_ceil_rounding() {
        let g14 = grid(14, 14);
        assert_eq!(
            RandomCellMask::new(g14, 2, 0.6).unwrap().num_masked_cells(),
            30
        ); // 29.4
        assert_eq!(
            RandomCellMask::new(g14, 2, 0.0).unwrap().num_masked_cells(),
            0
        );
        assert_eq!(
            RandomCellMask::new(g14, 2, 1.0).unwrap().num_masked_cells(),
            49
        );
        // 10 cells * 0.3 = 3.0000000000000004 in f64: still 3, not 4.
        assert_eq!(
            RandomCellMask::new(grid(2, 20), 2, 0.3)
                .unwrap()
                .num_masked_cells(),
            3
        );
        // cell 1 is patch-level masking with ceil rounding.
        let g = RandomCellMask::new(g14, 1, 0.75).unwrap();
        assert_eq!(g.num_masked_cells(), 147);
        let mut out = [0u8; 196];
        assert_eq!(g.generate(&mut SplitMix64::new(0, 0), &mut out), 147);
    }

    #[test]
    fn cell_mask_generic_and_non_divisible_grids() {
        let mut rng = SplitMix64::new(4, 0);
        // 384/16 = 24x24, cell 2 -> 12x12 = 144 cells, 108 masked = 432 patches.
        let g = RandomCellMask::new(MaskGrid::square(384, 16).unwrap(), 2, 0.75).unwrap();
        let mut out = vec![0u8; 576];
        assert_eq!(g.generate(&mut rng, &mut out), 432);
        assert_eq!(masked_cells(&out, 24, 24, 2), 108);
        // 32x32, cell 4 -> 8x8 = 64 cells, 48 masked = 768 patches.
        let g = RandomCellMask::new(grid(32, 32), 4, 0.75).unwrap();
        let mut out = vec![0u8; 1024];
        assert_eq!(g.generate(&mut rng, &mut out), 768);
        assert_eq!(masked_cells(&out, 32, 32, 4), 48);
        // 15x13, cell 2 -> 8x7 = 56 cells (partial edge cells), 42 masked.
        let g = RandomCellMask::new(grid(15, 13), 2, 0.75).unwrap();
        assert_eq!(g.cell_grid(), grid(8, 7));
        assert_eq!(g.num_masked_cells(), 42);
        let mut out = vec![0u8; 195];
        let mut counts = std::collections::BTreeSet::new();
        for _ in 0..200 {
            let k = g.generate(&mut rng, &mut out);
            assert_eq!(ones(&out), k);
            assert_eq!(masked_cells(&out, 15, 13, 2), 42);
            // Between 42 cells of the smallest and of the full size.
            assert!((42..=168).contains(&k));
            counts.insert(k);
        }
        assert!(counts.len() > 1, "edge cells should vary the patch count");
        // Edge cells are chosen like any other.
        let freq = frequencies(&g, 9, 3000);
        let expect = 42.0 / 56.0;
        for (i, f) in freq.iter().enumerate() {
            assert!((f - expect).abs() < 0.05, "patch {i}: masked {f}");
        }
    }

    #[test]
    fn cell_mask_is_deterministic_and_uniform() {
        let g = RandomCellMask::conmim_vit_b();
        assert_deterministic(&g);
        let freq = frequencies(&g, 43, 4000);
        let expect = 37.0 / 49.0;
        for (i, f) in freq.iter().enumerate() {
            assert!((f - expect).abs() < 0.04, "patch {i}: masked {f}");
        }
    }

    #[test]
    fn block_mask_preset_reaches_75_nearly_always() {
        let g = BlockMask::beit();
        let mut rng = SplitMix64::new(5, 0);
        let mut out = [9u8; 196];
        let draws = 2000;
        let mut exact = 0;
        let mut total = 0;
        let mut min = usize::MAX;
        for _ in 0..draws {
            let k = g.generate(&mut rng, &mut out);
            assert_eq!(ones(&out), k);
            assert!(out.iter().all(|&m| m <= 1));
            assert!((16..=75).contains(&k), "masked {k}");
            exact += usize::from(k == 75);
            total += k;
            min = min.min(k);
        }
        // BEiT v1 itself (its Python code, 4000 draws): 67% of masks reach 75, mean
        // 74.49, minimum 65. The same statistics here within noise.
        assert!(
            exact * 100 >= draws * 60,
            "only {exact} of {draws} masks reach 75"
        );
        let mean = total as f64 / draws as f64;
        assert!((74.2..=74.8).contains(&mean), "mean masked {mean}");
        assert!(min >= 55, "min masked {min}");

        // With the BEiT v2 top-up every mask has exactly 75, and the block draws are
        // unchanged (the top-up only adds patches after them).
        let exact_g = BlockMask::beit().with_exact_count(true);
        let mut a = [0u8; 196];
        let mut b = [0u8; 196];
        for seed in 0..500 {
            let k = g.generate(&mut SplitMix64::new(seed, 1), &mut a);
            assert_eq!(exact_g.generate(&mut SplitMix64::new(seed, 1), &mut b), 75);
            assert_eq!(ones(&b), 75);
            assert!(a.iter().zip(&b).all(|(&x, &y)| x <= y));
            if k == 75 {
                assert_eq!(a, b);
            }
        }
    }

    #[test]
    fn block_mask_blocks_respect_bounds() {
        let g = BlockMask::beit();
        let (lo, hi) = g.aspect_range();
        let mut rng = SplitMix64::new(6, 0);
        let mut out = [0u8; 196];
        let (mut blocks, mut tall, mut wide) = (0usize, 0usize, 0usize);
        let mut log_sum = 0.0;
        for _ in 0..1000 {
            let k = g.generate_with(&mut rng, &mut out, |b: Block| {
                blocks += 1;
                assert!((lo..=hi).contains(&b.aspect), "aspect {}", b.aspect);
                assert!(b.h >= 1 && b.w >= 1 && b.h < 14 && b.w < 14);
                assert!(b.top + b.h <= 14 && b.left + b.w <= 14);
                // The rounded shape stays consistent with the sampled aspect bounds.
                let (h, w) = (b.h as f64, b.w as f64);
                assert!((h - 0.5) / (w + 0.5) <= hi && (h + 0.5) / (w - 0.5).max(0.5) >= lo);
                assert!(b.h * b.w <= 75);
                tall += usize::from(b.h > b.w);
                wide += usize::from(b.w > b.h);
                log_sum += b.aspect.ln();
            });
            // The union of the reported blocks is the mask.
            assert_eq!(ones(&out), k);
        }
        assert!(blocks >= 1000);
        // Log-uniform aspect: symmetric around 1.
        assert!(
            (log_sum / blocks as f64).abs() < 0.1,
            "mean log aspect {}",
            log_sum / blocks as f64
        );
        let ratio = tall as f64 / wide as f64;
        assert!((0.8..1.25).contains(&ratio), "tall {tall} vs wide {wide}");
    }

    #[test]
    fn block_mask_deterministic_and_covers_grid() {
        let g = BlockMask::beit();
        assert_deterministic(&g);
        // Every position gets masked sometimes, the centre far more often than corners
        // (BEiT v1 in Python, 4000 draws: corner ~0.035, busiest ~0.72).
        let freq = frequencies(&g, 44, 3000);
        assert!(freq.iter().all(|&f| f > 0.01 && f < 0.8), "{freq:?}");
        assert!(freq[0] < 0.1 && freq[7 * 14 + 7] > 0.5);
        let mean = freq.iter().sum::<f64>() / freq.len() as f64;
        assert!((mean * 196.0 - 74.5).abs() < 1.0);
    }

    #[test]
    fn block_mask_generic_sizes() {
        let mut rng = SplitMix64::new(7, 0);
        // 384/16 = 24x24 with a proportional target (172 of 576 ~ 30%).
        let g =
            BlockMask::new(MaskGrid::square(384, 16).unwrap(), 172, 16, None, 0.3, None).unwrap();
        let mut out = vec![0u8; 576];
        let mut sum = 0;
        for _ in 0..200 {
            let k = g.generate(&mut rng, &mut out);
            assert_eq!(ones(&out), k);
            assert!(k <= 172);
            sum += k;
        }
        assert!(sum as f64 / 200.0 > 165.0);
        // A non-square grid with capped block size: no block adds more than 20.
        let g = BlockMask::new(grid(8, 20), 60, 4, Some(20), 0.5, Some(3.0)).unwrap();
        let mut out = vec![0u8; 160];
        for _ in 0..200 {
            let k = g.generate_with(&mut rng, &mut out, |b| {
                assert!(b.h < 8 && b.w < 20);
                assert!((0.5..=3.0).contains(&b.aspect));
            });
            assert!(k <= 60);
            assert_eq!(ones(&out), k);
        }
        // Target 0 masks nothing; the buffer is still cleared.
        let g = BlockMask::new(grid(4, 4), 0, 1, None, 0.3, None).unwrap();
        let mut out = [1u8; 16];
        assert_eq!(g.generate(&mut rng, &mut out), 0);
        assert!(out.iter().all(|&m| m == 0));
    }

    #[test]
    fn generators_are_object_safe_and_shareable() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<RandomPatchMask>();
        assert_send_sync::<RandomCellMask>();
        assert_send_sync::<BlockMask>();
        let gens: Vec<Box<dyn MaskGenerator>> = vec![
            Box::new(RandomPatchMask::conmim_vit_s()),
            Box::new(RandomCellMask::conmim_vit_b()),
            Box::new(BlockMask::beit()),
        ];
        let mut out = [0u8; 196];
        let mut rng = SplitMix64::new(8, 0);
        let counts: Vec<usize> = gens
            .iter()
            .map(|g| g.generate(&mut rng, &mut out))
            .collect();
        assert_eq!(counts[0], 147);
        assert_eq!(counts[1], 148);
        assert!(counts[2] <= 75);
    }
}
