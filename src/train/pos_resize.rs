//! Position terms resampled to another patch grid, so that a backbone pretrained at one
//! resolution fine-tunes at another (the paper's 384-px results start from 224-px
//! pretraining: 14 x 14 patches become 24 x 24).
//!
//! * [`resize_rel_pos_bias_table`]: a BEiT relative position bias table
//!   `[(2g-1)^2 + 3, H]`. The offsets of the old table are placed on BEiT's geometric
//!   progression (the official BEiT/ConMIM fine-tuning code: spacing grows from the
//!   centre so that the old extremes reach the new ones, small offsets stay near 1
//!   apart) and read at the new integer offsets by linear interpolation, as timm's
//!   `resize_rel_pos_bias_table` does by default (`tests` compare against it). The
//!   official code interpolates the same points with SciPy's `interp2d(kind='cubic')`,
//!   removed in SciPy 1.14; timm reports comparable accuracy with the linear form. The
//!   three CLS rows are kept as they are.
//! * [`resample_pos_embed`]: an absolute position embedding `[1, 1 + g^2, D]` (timm
//!   style): the patch grid resampled bicubically (`align_corners=False`, no
//!   antialiasing) as the official BEiT/DeiT/MAE `interpolate_pos_embed`; the CLS entry is
//!   kept.
//!
//! Grids are square; the source grid is read off the tensor's shape.

use tch::{Kind, TchError, Tensor};

type Result<T> = std::result::Result<T, TchError>;

/// The rows BEiT's table has for a `g x g` grid besides the `(2g-1)^2` offsets:
/// cls->token, token->cls, cls->cls.
const CLS_ROWS: i64 = 3;

fn isqrt(n: i64) -> Option<i64> {
    if n < 0 {
        return None;
    }
    let r = (n as f64).sqrt().round() as i64;
    (r * r == n).then_some(r)
}

/// The patch grid side `g` of a BEiT relative position bias table of `rows` rows
/// (`(2g-1)^2 + 3`), or `None` when no grid has that many.
pub fn rel_pos_table_grid(rows: i64) -> Option<i64> {
    let side = isqrt(rows - CLS_ROWS)?;
    (side >= 1 && side % 2 == 1).then_some((side + 1) / 2)
}

/// The patch grid side `g` of an absolute position embedding of `tokens` tokens
/// (`1 + g^2`, CLS first), or `None`.
pub fn pos_embed_grid(tokens: i64) -> Option<i64> {
    isqrt(tokens - 1).filter(|&g| g >= 1)
}

/// BEiT's positions for the `src` offsets `-(src/2)..=src/2` of a table that is to
/// cover `dst` offsets: `0, ±1, ±(1+q), ±(1+q+q^2), ...` with `q` found by bisection
/// in `[1.01, 1.5]` so that the outermost reaches about `dst/2` (timm's `_calc`, with
/// the same float64 arithmetic).
fn geometric_positions(src: i64, dst: i64) -> Vec<f64> {
    let half = src / 2;
    let target = (dst / 2) as f64;
    let (mut left, mut right) = (1.01f64, 1.5f64);
    let mut q = 0.0;
    while right - left > 1e-6 {
        q = (left + right) / 2.0;
        let gp = (1.0 - q.powf(half as f64)) / (1.0 - q);
        if gp > target {
            right = q;
        } else {
            left = q;
        }
    }
    let mut dis = Vec::with_capacity(half as usize);
    let mut cur = 1.0f64;
    for i in 0..half {
        dis.push(cur);
        cur += q.powf((i + 1) as f64);
    }
    let mut out: Vec<f64> = dis.iter().rev().map(|d| -d).collect();
    out.push(0.0);
    out.extend(&dis);
    out
}

/// Linear interpolation weights of `x` between the sorted `points` (timm's
/// `RegularGridInterpolator`, float32): `(left, right, weight of left, weight of right,
/// denominator)`; outside the points the nearest end is taken.
fn linear_weights(points: &[f32], x: f32) -> (usize, usize, f32, f32, f32) {
    // torch.bucketize(right=False): the first index whose point is >= x.
    let n = points.len();
    let right = points.partition_point(|&p| p < x).min(n - 1);
    let left = right.saturating_sub(1);
    let mut dist_left = (x - points[left]).max(0.0);
    let mut dist_right = (points[right] - x).max(0.0);
    if dist_left == 0.0 && dist_right == 0.0 {
        (dist_left, dist_right) = (1.0, 1.0);
    }
    // The left point weighs by the distance to the right one, and vice versa.
    (left, right, dist_right, dist_left, dist_left + dist_right)
}

/// A BEiT relative position bias table `[(2g-1)^2 + 3, H]` resized to a `dst_grid`
/// patch grid (see the module docs); the same tensor (a shallow clone) when its grid
/// already is `dst_grid`. Computed on the CPU in float32, returned on the table's
/// device in its kind.
pub fn resize_rel_pos_bias_table(table: &Tensor, dst_grid: i64) -> Result<Tensor> {
    let size = table.size();
    let bad = || {
        TchError::Shape(format!(
            "resize_rel_pos_bias_table: expected a [(2g-1)^2 + 3, heads] table, got {size:?}"
        ))
    };
    if size.len() != 2 || dst_grid < 1 {
        return Err(bad());
    }
    let src_grid = rel_pos_table_grid(size[0]).ok_or_else(bad)?;
    if src_grid == dst_grid {
        return Ok(table.shallow_clone());
    }
    let heads = size[1];
    let (s, d) = (2 * src_grid - 1, 2 * dst_grid - 1);
    let (su, du, hu) = (s as usize, d as usize, heads as usize);
    let cpu = table
        .detach()
        .to_device(tch::Device::Cpu)
        .to_kind(Kind::Float)
        .contiguous();
    let src: Vec<f32> = Vec::<f32>::try_from(cpu.view(-1))?;
    // torch.tensor(list of floats) is float32: the positions are rounded to f32 first.
    let points: Vec<f32> = geometric_positions(s, d)
        .into_iter()
        .map(|p| p as f32)
        .collect();
    let half = (d / 2) as f32;
    let weights: Vec<_> = (0..du)
        .map(|i| linear_weights(&points, i as f32 - half))
        .collect();
    let mut out = vec![0f32; (du * du + CLS_ROWS as usize) * hu];
    for (y, &(yl, yr, wyl, wyr, dy)) in weights.iter().enumerate() {
        for (x, &(xl, xr, wxl, wxr, dx)) in weights.iter().enumerate() {
            let at = |py: usize, px: usize, h: usize| src[(py * su + px) * hu + h];
            for h in 0..hu {
                // timm's order: (left, left), (left, right), (right, left), (right, right).
                let mut num = 0f32;
                num += at(yl, xl, h) * (wyl * wxl);
                num += at(yl, xr, h) * (wyl * wxr);
                num += at(yr, xl, h) * (wyr * wxl);
                num += at(yr, xr, h) * (wyr * wxr);
                out[(y * du + x) * hu + h] = num / (dy * dx);
            }
        }
    }
    let cls = su * su * hu;
    out[du * du * hu..].copy_from_slice(&src[cls..]);
    Ok(Tensor::from_slice(&out)
        .view([(du * du) as i64 + CLS_ROWS, heads])
        .to_kind(table.kind())
        .to_device(table.device()))
}

/// An absolute position embedding `[1, 1 + g^2, D]` (CLS first) resampled to a
/// `dst_grid` patch grid (see the module docs); the same tensor (a shallow clone) when
/// its grid already is `dst_grid`.
pub fn resample_pos_embed(pos: &Tensor, dst_grid: i64) -> Result<Tensor> {
    let size = pos.size();
    let bad = || {
        TchError::Shape(format!(
            "resample_pos_embed: expected a [1, 1 + g^2, dim] embedding, got {size:?}"
        ))
    };
    if size.len() != 3 || size[0] != 1 || dst_grid < 1 {
        return Err(bad());
    }
    let src_grid = pos_embed_grid(size[1]).ok_or_else(bad)?;
    if src_grid == dst_grid {
        return Ok(pos.shallow_clone());
    }
    let dim = size[2];
    let kind = pos.kind();
    let pos = pos.detach().to_kind(Kind::Float);
    let cls = pos.narrow(1, 0, 1);
    let grid = pos
        .narrow(1, 1, src_grid * src_grid)
        .reshape([1, src_grid, src_grid, dim])
        .permute([0, 3, 1, 2]);
    let grid = grid
        .f_upsample_bicubic2d([dst_grid, dst_grid], false, None, None)?
        .permute([0, 2, 3, 1])
        .reshape([1, dst_grid * dst_grid, dim]);
    Ok(Tensor::cat(&[cls, grid], 1).to_kind(kind))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::testing::{lcg_tensor, max_diff, read_npz, write_npz};
    use tch::Device;

    #[test]
    fn grids_are_read_off_shapes() {
        assert_eq!(rel_pos_table_grid(27 * 27 + 3), Some(14));
        assert_eq!(rel_pos_table_grid(47 * 47 + 3), Some(24));
        assert_eq!(rel_pos_table_grid(1 + 3), Some(1));
        assert_eq!(rel_pos_table_grid(26 * 26 + 3), None); // even side
        assert_eq!(rel_pos_table_grid(27 * 27), None);
        assert_eq!(rel_pos_table_grid(0), None);
        assert_eq!(pos_embed_grid(197), Some(14));
        assert_eq!(pos_embed_grid(577), Some(24));
        assert_eq!(pos_embed_grid(196), None);
        assert_eq!(pos_embed_grid(1), None);
    }

    #[test]
    fn geometric_positions_reach_the_new_extremes() {
        // 14 -> 24 patches: 27 offsets spread to cover -23..=23.
        let p = geometric_positions(27, 47);
        assert_eq!(p.len(), 27);
        assert_eq!(p[13], 0.0);
        assert_eq!((p[12], p[14]), (-1.0, 1.0));
        assert!(p.windows(2).all(|w| w[0] < w[1]));
        assert!((p[26] - 23.0).abs() < 1e-3, "{}", p[26]);
        for i in 0..27 {
            assert_eq!(p[i], -p[26 - i]);
        }
    }

    #[test]
    fn same_grid_is_unchanged_and_centre_and_cls_rows_are_kept() {
        let t = lcg_tensor(1, &[27 * 27 + 3, 6], Device::Cpu);
        assert!(resize_rel_pos_bias_table(&t, 14).unwrap().equal(&t));
        let r = resize_rel_pos_bias_table(&t, 24).unwrap();
        assert_eq!(r.size(), [47 * 47 + 3, 6]);
        // Offset (0, 0) and the CLS rows come through exactly.
        assert!(r.get(23 * 47 + 23).equal(&t.get(13 * 27 + 13)));
        assert!(r.narrow(0, 47 * 47, 3).equal(&t.narrow(0, 27 * 27, 3)));
        // Back down to 14: the points are the table's own, so it returns (within f32).
        let back = resize_rel_pos_bias_table(&r, 14).unwrap();
        assert_eq!(back.size(), t.size());

        let p = lcg_tensor(2, &[1, 197, 8], Device::Cpu);
        assert!(resample_pos_embed(&p, 14).unwrap().equal(&p));
        let r = resample_pos_embed(&p, 24).unwrap();
        assert_eq!(r.size(), [1, 577, 8]);
        assert!(r.narrow(1, 0, 1).equal(&p.narrow(1, 0, 1)));
    }

    #[test]
    fn two_by_two_to_three_by_three_replicates_the_edges() {
        // A 3x3 table (grid 2) has positions -1, 0, 1 whatever q is; the 5x5 of grid 3
        // reads -2 and 2 as the nearest ends.
        let vals: Vec<f32> = (0..9).map(|v| v as f32).chain([100., 101., 102.]).collect();
        let t = Tensor::from_slice(&vals).view([12, 1]);
        let r = resize_rel_pos_bias_table(&t, 3).unwrap();
        let got = Vec::<f32>::try_from(r.view(-1)).unwrap();
        #[rustfmt::skip]
        let want = [
            0., 0., 1., 2., 2.,
            0., 0., 1., 2., 2.,
            3., 3., 4., 5., 5.,
            6., 6., 7., 8., 8.,
            6., 6., 7., 8., 8.,
            100., 101., 102.,
        ];
        assert_eq!(got, want);
    }

    #[test]
    fn bad_shapes_are_errors() {
        let t = Tensor::zeros([100, 4], (Kind::Float, Device::Cpu));
        let e = resize_rel_pos_bias_table(&t, 3).unwrap_err().to_string();
        assert!(e.contains("[100, 4]"), "{e}");
        let p = Tensor::zeros([1, 196, 4], (Kind::Float, Device::Cpu));
        assert!(resample_pos_embed(&p, 3).is_err());
        assert!(resample_pos_embed(&p.squeeze(), 3).is_err());
    }

    /// Against timm's `resize_rel_pos_bias_table` (its default, linear form) and
    /// `F.interpolate(bicubic, align_corners=False)`, up (14 -> 24, the paper's 384-px
    /// fine-tuning) and down (14 -> 8). Bit-identical on the development VM (same
    /// float32 operations in the same order); the tolerance allows for other CPUs.
    #[test]
    fn matches_timm_and_torch() {
        let Some(py) = crate::train::testing::python("pos_resize::matches_timm_and_torch") else {
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let table = lcg_tensor(3, &[27 * 27 + 3, 6], Device::Cpu);
        let pos = lcg_tensor(4, &[1, 197, 16], Device::Cpu);
        write_npz(
            &dir.path().join("in.npz"),
            &[
                ("table".into(), table.shallow_clone()),
                ("pos".into(), pos.shallow_clone()),
            ],
        );
        let script = r#"
import sys, numpy as np, torch, torch.nn.functional as F
from timm.layers.pos_embed_rel import resize_rel_pos_bias_table
d = np.load(sys.argv[1] + "/in.npz")
table, pos = torch.from_numpy(d["table"]), torch.from_numpy(d["pos"])
out = {}
for g in (24, 8):
    out[f"table{g}"] = resize_rel_pos_bias_table(table, (g, g), ((2 * g - 1) ** 2 + 3, 6)).numpy()
    grid = pos[:, 1:].reshape(1, 14, 14, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(g, g), mode="bicubic", align_corners=False)
    out[f"pos{g}"] = torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, g * g, -1)], 1).numpy()
np.savez(sys.argv[1] + "/out.npz", **out)
"#;
        let out = std::process::Command::new(py)
            .args(["-c", script, dir.path().to_str().unwrap()])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let want = read_npz(&dir.path().join("out.npz"));
        for g in [24, 8] {
            let t = resize_rel_pos_bias_table(&table, g).unwrap();
            let (d, _) = max_diff(&t, &want[&format!("table{g}")]);
            assert!(d <= 1e-6, "table to grid {g}: max |diff| {d}");
            let p = resample_pos_embed(&pos, g).unwrap();
            let (d, _) = max_diff(&p, &want[&format!("pos{g}")]);
            assert!(d <= 1e-6, "pos_embed to grid {g}: max |diff| {d}");
        }
    }
}
