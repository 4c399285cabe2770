//! Layer-wise learning-rate decay, exactly as the official ConMIM/BEiT fine-tuning code
//! (`optim_factory.get_num_layer_for_vit` + `LayerDecayValueAssigner` +
//! `get_parameter_groups`) and the spec:
//!
//! * layer ids run over `0 ..= depth + 1` (`depth + 2` ids; the official
//!   `num_layers = model.get_num_layers()` is the number of blocks, `depth`);
//! * `cls_token`, `mask_token`, `pos_embed` and `patch_embed.*` are layer 0;
//! * `blocks.{i}.*` (the per-block relative position bias tables included) is layer `i + 1`;
//! * everything else (`norm`, `fc_norm`, `head`, and the SHARED `rel_pos_bias.*`, which
//!   the official rule puts on top explicitly) is the top layer `depth + 1`;
//! * the lr scale of layer `l` is `decay^(depth + 1 - l)`: 1 for the head,
//!   `decay^(depth + 1)` for the patch embedding.
//!
//! Weight decay: none for 1-D parameters, names ending in `.bias`, `cls_token` and
//! `pos_embed` ([`no_weight_decay`]), as the spec says. Parameters are grouped by
//! `(layer id, decay / no decay)` (the official group name is `layer_{id}_{decay|no_decay}`).
//!
//! Differences from timm's `param_groups_layer_decay` on a timm `beit_*` model: timm also
//! exempts every `relative_position_bias_table` from weight decay (its
//! `Beit.no_weight_decay`) and would put a shared `rel_pos_bias.*` in layer 0 (its
//! stem matcher); the official ConMIM code (and this module) decays the tables (its
//! `--disable_weight_decay_on_rel_pos_bias` is off by default) and puts a shared table
//! on top. The layer ids and scales of all other parameters agree.

use anyhow::{Result, bail};

use crate::train::optim::no_weight_decay;

/// The top layer id (`norm`, `fc_norm`, `head`): `depth + 1`.
pub fn top_layer(depth: i64) -> usize {
    depth.max(0) as usize + 1
}

/// The official layer id of parameter `name` in a ViT of `depth` blocks (see the
/// module docs). A block index is taken as written: `blocks.{i}` gives `i + 1` even for
/// `i >= depth` ([`param_groups`] rejects such names); a `blocks.` name without a
/// numeric index goes on top.
pub fn layer_id(name: &str, depth: i64) -> usize {
    let top = top_layer(depth);
    if matches!(name, "cls_token" | "mask_token" | "pos_embed") || name.starts_with("patch_embed") {
        0
    } else if name.starts_with("rel_pos_bias") {
        top
    } else if let Some(i) = block_index(name) {
        i + 1
    } else {
        top
    }
}

/// The block index `i` of a `blocks.{i}.*` name.
fn block_index(name: &str) -> Option<usize> {
    name.strip_prefix("blocks.")?
        .split('.')
        .next()?
        .parse()
        .ok()
}

/// The lr multiplier of layer `layer_id`: `decay^(depth + 1 - layer_id)` (1 at the top).
/// Ids above the top get 1 (no decay).
pub fn lr_scale(layer_id: usize, depth: i64, decay: f64) -> f64 {
    let exponent = top_layer(depth).saturating_sub(layer_id);
    decay.powi(exponent as i32)
}

/// One optimiser parameter group.
#[derive(Debug, Clone, PartialEq)]
pub struct ParamGroup {
    pub layer_id: usize,
    /// Multiplier on the scheduled learning rate.
    pub lr_scale: f64,
    /// `weight_decay` for the decayed group, 0 for the other.
    pub weight_decay: f64,
    /// Parameter names, sorted.
    pub names: Vec<String>,
}

impl ParamGroup {
    /// Whether this group is weight-decayed.
    pub fn decays(&self) -> bool {
        self.weight_decay > 0.0
    }

    /// The official group name, `layer_{id}_decay` / `layer_{id}_no_decay`.
    pub fn name(&self) -> String {
        let kind = if self.decays() { "decay" } else { "no_decay" };
        format!("layer_{}_{kind}", self.layer_id)
    }
}

/// Groups parameters `(name, shape)` by `(layer id, decay / no decay)`: ordered by layer
/// id, the decayed group before the other, names sorted within a group (deterministic
/// whatever the input order). Empty groups are left out. With `weight_decay == 0` every
/// parameter of a layer lands in one (no-decay) group.
///
/// Errors on a duplicated name, a `decay` outside (0, 1] or a negative `weight_decay`,
/// and a `blocks.{i}` with `i >= depth`.
pub fn param_groups<I, N, S>(
    names_and_shapes: I,
    depth: i64,
    decay: f64,
    weight_decay: f64,
) -> Result<Vec<ParamGroup>>
where
    I: IntoIterator<Item = (N, S)>,
    N: AsRef<str>,
    S: AsRef<[i64]>,
{
    if !(decay.is_finite() && decay > 0.0 && decay <= 1.0) {
        bail!("layer decay {decay} not in (0, 1]");
    }
    if !(weight_decay.is_finite() && weight_decay >= 0.0) {
        bail!("weight decay {weight_decay} must be finite and >= 0");
    }
    // Key: (layer, 0 = decay / 1 = no decay).
    let mut groups: std::collections::BTreeMap<(usize, u8), Vec<String>> = Default::default();
    let mut seen = std::collections::HashSet::new();
    for (name, shape) in names_and_shapes {
        let name = name.as_ref();
        if !seen.insert(name.to_owned()) {
            bail!("parameter `{name}` given twice");
        }
        if let Some(i) = block_index(name)
            && i as i64 >= depth
        {
            bail!("parameter `{name}`: block index {i} beyond depth {depth}");
        }
        let id = layer_id(name, depth);
        let no_decay = weight_decay == 0.0 || no_weight_decay(name, shape.as_ref());
        groups
            .entry((id, no_decay as u8))
            .or_default()
            .push(name.to_owned());
    }
    Ok(groups
        .into_iter()
        .map(|((id, no_decay), mut names)| {
            names.sort();
            ParamGroup {
                layer_id: id,
                lr_scale: lr_scale(id, depth, decay),
                weight_decay: if no_decay == 1 { 0.0 } else { weight_decay },
                names,
            }
        })
        .collect())
}

/// [`param_groups`] over the trainable variables of `vs` (named as in
/// [`crate::train::vit`]).
pub fn param_groups_of(
    vs: &tch::nn::VarStore,
    depth: i64,
    decay: f64,
    weight_decay: f64,
) -> Result<Vec<ParamGroup>> {
    let named = crate::train::optim::trainable_named(vs);
    param_groups(
        named.iter().map(|(n, t)| (n.as_str(), t.size())),
        depth,
        decay,
        weight_decay,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::vit::{Config, VisionTransformer};

    /// The spec's rule, written independently of [`layer_id`]: layer 0 = patch embed,
    /// cls, pos (and mask token); block i -> i+1; the rest (head, norms, shared table)
    /// on top = depth + 1.
    fn spec_layer(name: &str, depth: i64) -> usize {
        let first = name.split('.').next().unwrap();
        match first {
            "cls_token" | "mask_token" | "pos_embed" | "patch_embed" => 0,
            "blocks" => name.split('.').nth(1).unwrap().parse::<usize>().unwrap() + 1,
            _ => depth as usize + 1,
        }
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-9
    }

    #[test]
    fn issue5_layer_decay_matches_spec() {
        // Hand-checked table for a depth-12 model (ViT-B), decay 0.65:
        // scale = 0.65^(13 - layer).
        let depth = 12;
        let d = 0.65;
        let table: [(&str, usize, f64); 14] = [
            ("cls_token", 0, 0.003697205891018715),
            ("pos_embed", 0, 0.003697205891018715),
            ("mask_token", 0, 0.003697205891018715),
            ("patch_embed.proj.weight", 0, 0.003697205891018715),
            ("patch_embed.proj.bias", 0, 0.003697205891018715),
            ("blocks.0.norm1.weight", 1, 0.005688009063105715),
            (
                "blocks.3.attn.relative_position_bias_table",
                4,
                0.02071191283789063,
            ),
            ("blocks.11.mlp.fc2.weight", 12, 0.65),
            ("blocks.11.gamma_2", 12, 0.65),
            ("norm.weight", 13, 1.0),
            ("fc_norm.bias", 13, 1.0),
            ("head.weight", 13, 1.0),
            ("head.bias", 13, 1.0),
            ("rel_pos_bias.relative_position_bias_table", 13, 1.0),
        ];
        for (name, id, scale) in table {
            assert_eq!(layer_id(name, depth), id, "{name}");
            assert_eq!(spec_layer(name, depth), id, "{name}");
            let s = lr_scale(id, depth, d);
            assert!(close(s, scale), "{name}: {s} vs {scale}");
            assert!(close(s, d.powi(depth as i32 + 1 - id as i32)), "{name}");
        }
        // The official assigner's list: decay^(L+1-i) for i in 0..L+2.
        let values: Vec<f64> = (0..14).map(|i| lr_scale(i, depth, d)).collect();
        assert!(close(values[0], 0.65f64.powi(13)) && values[13] == 1.0);
        assert!(values.windows(2).all(|w| w[0] < w[1]));
        // Other sizes: ViT-S decay 0.8 (layer 0: 0.8^13), ViT-L depth 24 decay 0.75.
        assert!(close(lr_scale(0, 12, 0.8), 0.054975581388800036));
        assert!(close(lr_scale(0, 24, 0.75), 0.0007525434581650003));
        assert_eq!(layer_id("blocks.23.attn.qkv.weight", 24), 24);
        assert_eq!(layer_id("head.weight", 24), 25);
        // No decay: every scale is 1.
        assert!((0..14).all(|i| lr_scale(i, depth, 1.0) == 1.0));
    }

    #[test]
    fn groups_of_a_real_model_follow_the_spec() {
        // A depth-2 BEiT-style model with a head: its VarStore names are the timm names.
        let depth = 2;
        let cfg = Config::vit_tiny()
            .with_image_size(32)
            .with_mask_token(false)
            .with_num_classes(10);
        let cfg = Config { depth, ..cfg };
        let vs = tch::nn::VarStore::new(tch::Device::Cpu);
        let _model = VisionTransformer::new(&cfg, vs.root()).unwrap();
        let named = crate::train::optim::trainable_named(&vs);
        assert!(named.iter().any(|(n, _)| n == "head.weight"));
        assert!(named.iter().any(|(n, _)| n == "blocks.1.attn.q_bias"));

        let (decay, wd) = (0.75, 0.05);
        let groups = param_groups_of(&vs, depth, decay, wd).unwrap();

        // Every parameter exactly once, in the group the spec's rule gives it.
        let total: usize = groups.iter().map(|g| g.names.len()).sum();
        assert_eq!(total, named.len());
        for (name, t) in &named {
            let g: Vec<_> = groups.iter().filter(|g| g.names.contains(name)).collect();
            assert_eq!(g.len(), 1, "{name}");
            let g = g[0];
            let id = spec_layer(name, depth);
            assert_eq!(g.layer_id, id, "{name}");
            assert!(
                close(g.lr_scale, decay.powi(depth as i32 + 1 - id as i32)),
                "{name}"
            );
            let shape = t.size();
            let exempt = shape.len() <= 1
                || name.ends_with(".bias")
                || name == "cls_token"
                || name == "pos_embed";
            assert_eq!(g.weight_decay, if exempt { 0.0 } else { wd }, "{name}");
        }

        // Deterministic order: by layer, decay before no-decay, names sorted.
        let keys: Vec<(usize, bool)> = groups.iter().map(|g| (g.layer_id, !g.decays())).collect();
        let mut sorted = keys.clone();
        sorted.sort();
        assert_eq!(keys, sorted);
        assert!(
            groups
                .iter()
                .all(|g| g.names.windows(2).all(|w| w[0] < w[1]))
        );
        let names: Vec<String> = groups.iter().map(ParamGroup::name).collect();
        assert_eq!(
            names,
            [
                "layer_0_decay",
                "layer_0_no_decay",
                "layer_1_decay",
                "layer_1_no_decay",
                "layer_2_decay",
                "layer_2_no_decay",
                "layer_3_decay",
                "layer_3_no_decay",
            ]
        );
        // Spot checks.
        let find = |n: &str| {
            groups
                .iter()
                .find(|g| g.names.iter().any(|x| x == n))
                .unwrap()
        };
        assert_eq!(find("cls_token").name(), "layer_0_no_decay");
        assert_eq!(find("patch_embed.proj.weight").name(), "layer_0_decay");
        assert_eq!(find("blocks.0.attn.qkv.weight").name(), "layer_1_decay");
        assert_eq!(find("blocks.1.gamma_1").name(), "layer_2_no_decay");
        assert_eq!(find("head.weight").name(), "layer_3_decay");
        assert_eq!(find("norm.weight").name(), "layer_3_no_decay");
        // The shared table of vit.rs is 2-D (decayed, as officially) and on top.
        assert_eq!(
            find("rel_pos_bias.relative_position_bias_table").name(),
            "layer_3_decay"
        );

        // Same groups whatever the input order.
        let mut rev: Vec<(String, Vec<i64>)> =
            named.iter().map(|(n, t)| (n.clone(), t.size())).collect();
        rev.reverse();
        assert_eq!(param_groups(rev, depth, decay, wd).unwrap(), groups);
    }

    #[test]
    fn param_groups_rejects_bad_input() {
        let p = |n: &str| (n.to_owned(), vec![4i64, 4]);
        assert!(param_groups([p("head.weight")], 12, 0.0, 0.05).is_err());
        assert!(param_groups([p("head.weight")], 12, 1.5, 0.05).is_err());
        assert!(param_groups([p("head.weight")], 12, 0.65, -0.05).is_err());
        assert!(param_groups([p("head.weight"), p("head.weight")], 12, 0.65, 0.05).is_err());
        assert!(param_groups([p("blocks.12.mlp.fc1.weight")], 12, 0.65, 0.05).is_err());
        // Weight decay 0: one no-decay group per layer.
        let g = param_groups([p("head.weight"), p("head.bias")], 12, 0.65, 0.0).unwrap();
        assert_eq!(g.len(), 1);
        assert_eq!(g[0].name(), "layer_13_no_decay");
    }
}
