//! DINO's weighted k-NN on frozen features: `conmim knn` and the pretraining monitor
//! (`conmim pretrain --knn-train-data`), in one process or across the ranks of a
//! torchrun job.
//!
//! Features are the L2-normalised mean of the final-norm patch tokens at the eval
//! transform (of a mean-pooling fine-tuned classifier: the mean through its `fc_norm`,
//! what its head reads; resize 256/224 of the size below 384 px, no crop from 384 px
//! on). For each val feature the `k` most similar train features (cosine) vote for
//! their class with weight `exp(sim / T)`; top-1 / top-5 of the summed votes.
//!
//! Across ranks every rank extracts the features of its own shards (each shard read by
//! exactly one rank, as the evaluation does), so extraction scales with the ranks and the
//! train features are never gathered. The val features (small: ImageNet's 50,000 x 768
//! floats are 150 MB) are gathered to every rank; each rank finds the `k` nearest of its
//! own train features for every val feature; those candidates (`world x val x k`) are
//! gathered and merged by a last top-k. The result equals the one-process k-NN over the
//! same data (up to ties in similarity), and every rank returns it. Gathers are sums into
//! zero buffers in which each rank fills its own rows, so they use the group's
//! all-reduce and are exact.

use std::path::Path;

use anyhow::{Context, Result, bail};
use serde::Serialize;
use tch::{Device, Kind, Tensor};

use super::run::{backbone_of, eval_loader_config};
use crate::loader::Loader;
use crate::stream::{ShardList, SourceOptions};
use crate::train::dist::ProcessGroup;
use crate::train::export::Weights;
use crate::train::run::group_and_device;

/// What `conmim knn` reports.
#[derive(Debug, Clone, Serialize)]
pub struct KnnResult {
    pub k: usize,
    pub temperature: f64,
    pub train_images: u64,
    pub val_images: u64,
    pub classes: i64,
    pub acc1: f64,
    pub acc5: f64,
    /// The processes that shared the work (1 outside torchrun).
    pub ranks: usize,
    /// This process's rank (the CLI prints the result on rank 0 only).
    #[serde(skip)]
    pub rank: usize,
}

/// k-NN defaults (DINO's): k = 20, temperature 0.07.
pub const KNN_K: usize = 20;
pub const KNN_TEMPERATURE: f64 = 0.07;

/// Val rows per similarity matmul: bounds the `[chunk, train rows]` similarity matrix.
const CHUNK: i64 = 256;

/// L2-normalised features (the mean of the final-norm patch tokens; of a mean-pooling
/// classifier, the mean of the last block's patch tokens through its `fc_norm`, what its
/// head reads) and labels of the
/// samples of `data` this rank reads (all of them without `pg`; with it, the shards of
/// this rank), each read exactly once at the eval transform. A rank may get no shard:
/// then `[0, dim]` features. Every sample must have a label.
pub fn features(
    vit: &crate::train::vit::VisionTransformer,
    device: Device,
    data: &str,
    opts: &SourceOptions,
    batch: usize,
    threads: usize,
    pg: Option<&ProcessGroup>,
) -> Result<(Tensor, Tensor)> {
    let cfg = vit.config();
    // DINO's Resize(256) + CenterCrop(224), scaled; from 384 px on no crop (as the
    // fine-tuning evaluation there).
    let resize = if cfg.image_size >= 384 {
        cfg.image_size as u32
    } else {
        (cfg.image_size as f64 * 256.0 / 224.0).round() as u32
    };
    let mut lc = eval_loader_config(cfg.image_size as u32, resize, batch, threads);
    if let Some(pg) = pg {
        lc.stream.rank = pg.rank;
        lc.stream.world_size = pg.world_size;
    }
    let expected = ShardList::resolve(data, opts)
        .with_context(|| format!("opening {data}"))?
        .total_samples();
    let loader = Loader::open(data, opts, lc).with_context(|| format!("opening {data}"))?;
    let amp = device.is_cuda();
    let (mut feats, mut labels) = (Vec::new(), Vec::new());
    tch::no_grad(|| -> Result<()> {
        for b in loader {
            let b = b.with_context(|| format!("reading {data}"))?;
            if let Some(i) = b.labels().iter().position(|&l| l < 0) {
                bail!(
                    "{data}: sample `{}` has no usable label ({})",
                    b.keys()[i],
                    b.labels()[i]
                );
            }
            let s = b.image_size() as i64;
            let host = Tensor::from_slice(b.weak()).view([b.len() as i64, s, s, 3]);
            let x = crate::train::cuda::upload(&host, device)?;
            let x = crate::train::input::normalize_nhwc(
                &x,
                crate::train::input::IMAGENET_MEAN,
                crate::train::input::IMAGENET_STD,
            )?;
            let f =
                crate::train::cuda::autocast_bf16(amp, || vit.forward_features(&x, None, false))??;
            let f = vit.mean_patch_features(&f.to_kind(Kind::Float));
            feats.push(
                &f / f
                    .norm_scalaropt_dim(2, [1i64].as_slice(), true)
                    .clamp_min(1e-12),
            );
            labels.push(Tensor::from_slice(b.labels()).to_device(device));
        }
        Ok(())
    })?;
    let (f, l) = if feats.is_empty() {
        (
            Tensor::zeros([0, cfg.embed_dim], (Kind::Float, device)),
            Tensor::zeros([0], (Kind::Int64, device)),
        )
    } else {
        (Tensor::cat(&feats, 0), Tensor::cat(&labels, 0))
    };
    let mut n = f.size()[0] as u64;
    if let Some(pg) = pg {
        let t = Tensor::from_slice(&[n as i64]);
        pg.all_reduce_sum(&t)
            .with_context(|| format!("counting {data}'s samples over the ranks"))?;
        n = t.int64_value(&[0]) as u64;
    }
    if n == 0 {
        bail!("{data}: no samples");
    }
    if let Some(e) = expected
        && e != n
    {
        bail!("{data}: read {n} samples, the manifest lists {e}");
    }
    Ok((f, l))
}

/// [`features`] of a train and a val dataset, and the class count (largest label + 1
/// over both, over every rank): `(train, train labels, val, val labels, classes)`.
pub fn train_val_features(
    vit: &crate::train::vit::VisionTransformer,
    device: Device,
    train: (&str, &SourceOptions),
    val: (&str, &SourceOptions),
    batch: usize,
    threads: usize,
    pg: Option<&ProcessGroup>,
) -> Result<(Tensor, Tensor, Tensor, Tensor, i64)> {
    let (tf, tl) = features(vit, device, train.0, train.1, batch, threads, pg)?;
    let (vf, vl) = features(vit, device, val.0, val.1, batch, threads, pg)?;
    let top = |l: &Tensor| {
        if l.numel() == 0 {
            -1
        } else {
            l.max().int64_value(&[])
        }
    };
    let own = top(&tl).max(top(&vl));
    let classes = match pg {
        None => own + 1,
        Some(pg) => {
            let all = own_slot(pg, &[own + 1])?;
            pg.all_reduce_sum(&all)
                .context("the class count over the ranks")?;
            Vec::<i64>::try_from(&all)?.into_iter().max().unwrap_or(0)
        }
    };
    Ok((tf, tl, vf, vl, classes))
}

/// A host `[world * values.len()]` i64 tensor of zeros with `values` in this rank's slot
/// (summed over the ranks, it holds every rank's values in rank order).
fn own_slot(pg: &ProcessGroup, values: &[i64]) -> Result<Tensor> {
    let mut v = vec![0i64; pg.world_size * values.len()];
    v[pg.rank * values.len()..(pg.rank + 1) * values.len()].copy_from_slice(values);
    Ok(Tensor::from_slice(&v))
}

/// Every rank's rows of `t` (`[rows, ...]`, any row count, none included), in rank
/// order, on every rank. A collective.
pub fn gather_rows(pg: &ProcessGroup, t: &Tensor) -> Result<Tensor> {
    let counts = own_slot(pg, &[t.size()[0]])?;
    pg.all_reduce_sum(&counts)
        .context("gathering the row counts")?;
    gather_rows_of(pg, t, &Vec::<i64>::try_from(&counts)?)
}

/// [`gather_rows`] when every rank's row count (`rows[r]`) is known.
fn gather_rows_of(pg: &ProcessGroup, t: &Tensor, rows: &[i64]) -> Result<Tensor> {
    let mut size = t.size();
    size[0] = rows.iter().sum();
    let all = Tensor::zeros(size.as_slice(), (t.kind(), t.device()));
    let off: i64 = rows[..pg.rank].iter().sum();
    all.narrow(0, off, t.size()[0]).f_copy_(t)?;
    pg.all_reduce_sum(&all)?;
    Ok(all)
}

/// Top-1 and top-5 hits (counts) of one chunk of val rows from their `k` neighbours'
/// similarities `top` and classes `cls` (both `[rows, k]`, sorted by similarity).
fn votes(
    top: &Tensor,
    cls: &Tensor,
    labels: &Tensor,
    classes: i64,
    temperature: f64,
) -> (f64, f64) {
    let rows = top.size()[0];
    let w = (top / temperature).exp();
    let votes = Tensor::zeros([rows, classes], (Kind::Float, top.device())).scatter_add(1, cls, &w);
    let (_, pred) = votes.topk(classes.min(5), 1, true, true);
    let hit = pred.eq_tensor(&labels.unsqueeze(1));
    (
        hit.narrow(1, 0, 1).sum(Kind::Double).double_value(&[]),
        hit.sum(Kind::Double).double_value(&[]),
    )
}

/// k = 0 votes for nothing, and a temperature of 0 or below turns the weights into
/// inf / NaN: either gave a meaningless accuracy.
fn check_settings(k: usize, temperature: f64) -> Result<()> {
    if k == 0 {
        bail!("k-NN needs k >= 1 neighbours (got 0)");
    }
    if !(temperature > 0.0 && temperature.is_finite()) {
        bail!("k-NN needs a positive, finite temperature (got {temperature})");
    }
    Ok(())
}

/// DINO's weighted k-NN classifier (see the module docs): top-1 / top-5 (in %) of `val`
/// against `train`. With `pg`, each rank passes its own part of both sets (any sizes, an
/// empty part included) and every rank gets the accuracy over all of them. A
/// collective with `pg`.
#[allow(clippy::too_many_arguments)]
pub fn knn_classify(
    train: &Tensor,
    train_labels: &Tensor,
    val: &Tensor,
    val_labels: &Tensor,
    classes: i64,
    k: usize,
    temperature: f64,
    pg: Option<&ProcessGroup>,
) -> Result<(f64, f64)> {
    check_settings(k, temperature)?;
    let Some(pg) = pg else {
        return knn_local(
            train,
            train_labels,
            val,
            val_labels,
            classes,
            k,
            temperature,
        );
    };
    tch::no_grad(|| {
        let (world, rank) = (pg.world_size, pg.rank);
        let (nt, nv) = (train.size()[0], val.size()[0]);
        let counts = own_slot(pg, &[nt, nv])?;
        pg.all_reduce_sum(&counts)
            .context("k-NN: the feature counts over the ranks")?;
        let counts = Vec::<i64>::try_from(&counts)?;
        let train_n: Vec<i64> = counts.chunks(2).map(|c| c[0]).collect();
        let val_n: Vec<i64> = counts.chunks(2).map(|c| c[1]).collect();
        let n_val: i64 = val_n.iter().sum();
        if n_val == 0 || train_n.iter().sum::<i64>() == 0 {
            bail!(
                "k-NN needs train and val samples (got {train_n:?} train, {val_n:?} val per rank)"
            );
        }
        let k = (k as i64).min(train_n.iter().sum());
        let k_of = |r: usize| k.min(train_n[r]);
        let dev = val.device();
        // Every rank's val features and labels, in rank order.
        let all_val =
            gather_rows_of(pg, val, &val_n).context("k-NN: gathering the val features")?;
        let all_labels =
            gather_rows_of(pg, val_labels, &val_n).context("k-NN: gathering the val labels")?;
        // This rank's k nearest train features of each val feature, in its slot.
        let sims = Tensor::zeros([world as i64, n_val, k], (Kind::Float, dev));
        let cls = Tensor::zeros([world as i64, n_val, k], (Kind::Int64, dev));
        let kr = k_of(rank);
        if kr > 0 {
            let mut i = 0;
            while i < n_val {
                let len = CHUNK.min(n_val - i);
                let sim = all_val.narrow(0, i, len).matmul(&train.tr());
                let (top, idx) = sim.topk(kr, 1, true, true);
                let c = train_labels.index_select(0, &idx.view(-1)).view([len, kr]);
                let at = |t: &Tensor| t.get(rank as i64).narrow(0, i, len).narrow(1, 0, kr);
                at(&sims).f_copy_(&top)?;
                at(&cls).f_copy_(&c)?;
                i += len;
            }
        }
        pg.all_reduce_sum(&sims)
            .context("k-NN: gathering the neighbours")?;
        pg.all_reduce_sum(&cls)
            .context("k-NN: gathering the neighbours' classes")?;
        // Merge: the k best of every rank's candidates.
        let take = |t: &Tensor| {
            Tensor::cat(
                &(0..world)
                    .map(|r| t.get(r as i64).narrow(1, 0, k_of(r)))
                    .collect::<Vec<_>>(),
                1,
            )
        };
        let (sims, cls) = (take(&sims), take(&cls));
        Ok(accuracy(&all_labels, classes, temperature, |i, len| {
            let (top, idx) = sims.narrow(0, i, len).topk(k, 1, true, true);
            let c = cls.narrow(0, i, len).gather(1, &idx, false);
            (top, c)
        }))
    })
}

/// Top-1 / top-5 (%) of the val rows with `labels`, from `neighbours(i, len)`: the
/// similarities and classes (`[len, k]`, sorted by similarity) of the neighbours of val
/// rows `i..i + len`, asked for in chunks of [`CHUNK`].
fn accuracy(
    labels: &Tensor,
    classes: i64,
    temperature: f64,
    mut neighbours: impl FnMut(i64, i64) -> (Tensor, Tensor),
) -> (f64, f64) {
    let n = labels.size()[0];
    let (mut c1, mut c5) = (0f64, 0f64);
    let mut i = 0;
    while i < n {
        let len = CHUNK.min(n - i);
        let (top, cls) = neighbours(i, len);
        let (h1, h5) = votes(&top, &cls, &labels.narrow(0, i, len), classes, temperature);
        c1 += h1;
        c5 += h5;
        i += len;
    }
    (100.0 * c1 / n as f64, 100.0 * c5 / n as f64)
}

/// [`knn_classify`] in one process.
fn knn_local(
    train: &Tensor,
    train_labels: &Tensor,
    val: &Tensor,
    val_labels: &Tensor,
    classes: i64,
    k: usize,
    temperature: f64,
) -> Result<(f64, f64)> {
    let n_val = val.size()[0];
    if n_val == 0 || train.size()[0] == 0 {
        bail!("k-NN needs train and val samples");
    }
    let k = (k as i64).min(train.size()[0]);
    Ok(tch::no_grad(|| {
        accuracy(val_labels, classes, temperature, |i, len| {
            let sim = val.narrow(0, i, len).matmul(&train.tr());
            let (top, idx) = sim.topk(k, 1, true, true);
            let c = train_labels.index_select(0, &idx.view(-1)).view([len, k]);
            (top, c)
        })
    }))
}

/// The k-NN accuracy of `vit`'s features: train and val features (each rank its own
/// shards with `pg`), then [`knn_classify`]. `(acc1, acc5, train images, val images,
/// classes)`. A collective with `pg`.
#[allow(clippy::too_many_arguments)]
pub fn knn_of(
    vit: &crate::train::vit::VisionTransformer,
    device: Device,
    train: (&str, &SourceOptions),
    val: (&str, &SourceOptions),
    k: usize,
    temperature: f64,
    batch: usize,
    threads: usize,
    pg: Option<&ProcessGroup>,
) -> Result<(f64, f64, u64, u64, i64)> {
    let (tf, tl, vf, vl, classes) =
        train_val_features(vit, device, train, val, batch, threads, pg)?;
    let (acc1, acc5) = knn_classify(&tf, &tl, &vf, &vl, classes, k, temperature, pg)?;
    let mut n = [tf.size()[0], vf.size()[0]];
    if let Some(pg) = pg {
        let t = Tensor::from_slice(&n);
        pg.all_reduce_sum(&t)?;
        n = [t.int64_value(&[0]), t.int64_value(&[1])];
    }
    Ok((acc1, acc5, n[0] as u64, n[1] as u64, classes))
}

/// `conmim knn`: k-NN accuracy of a backbone's frozen features. `source`: a
/// pretraining run / checkpoint (teacher by default) or a fine-tuning checkpoint. Under
/// torchrun the ranks share the work (each reads its own shards; `batch` is per rank)
/// and all return the result.
#[allow(clippy::too_many_arguments)]
pub fn knn(
    source: &Path,
    weights: Weights,
    train: (&str, &SourceOptions),
    val: (&str, &SourceOptions),
    k: usize,
    temperature: f64,
    batch: usize,
    threads: usize,
    device: Option<&str>,
) -> Result<KnnResult> {
    // Before the feature passes, which are the long part.
    check_settings(k, temperature)?;
    let (pg, device) = group_and_device(device, None)?;
    if let Some(pg) = &pg {
        // Ranks with another k (the merge of their candidates would not match) or
        // other shards (some read twice, some never) fail at once.
        let identity = crate::train::run::data_identity;
        let settings = serde_json::json!({
            "k": k,
            "temperature": temperature,
            "train_data": identity(train.0, train.1),
            "val_data": identity(val.0, val.1),
        });
        crate::train::run::check_same_settings(pg, "knn", &settings)?;
    }
    let backbone = backbone_of(source, weights, device)?;
    let (acc1, acc5, train_images, val_images, classes) = knn_of(
        &backbone.1,
        device,
        train,
        val,
        k,
        temperature,
        batch,
        threads,
        pg.as_ref(),
    )?;
    Ok(KnnResult {
        k,
        temperature,
        train_images,
        val_images,
        classes,
        acc1,
        acc5,
        ranks: pg.as_ref().map_or(1, |p| p.world_size),
        rank: pg.as_ref().map_or(0, |p| p.rank),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic L2-normalised features, labels in `0..classes`.
    fn set(seed: u64, n: usize, dim: usize, classes: i64) -> (Tensor, Tensor) {
        let v = crate::train::testing::lcg_values(seed, n * dim);
        let f = Tensor::from_slice(&v).view([n as i64, dim as i64]);
        let f = &f / f.norm_scalaropt_dim(2, [1i64].as_slice(), true);
        let l: Vec<i64> = (0..n as i64)
            .map(|i| (i * 7 + seed as i64) % classes)
            .collect();
        (f, Tensor::from_slice(&l))
    }

    /// The k-NN by its definition, one val sample at a time, in f64.
    fn brute_force(
        (tf, tl): &(Tensor, Tensor),
        (vf, vl): &(Tensor, Tensor),
        k: usize,
        t: f64,
    ) -> (f64, f64) {
        let tf = Vec::<Vec<f32>>::try_from(tf).unwrap();
        let vf = Vec::<Vec<f32>>::try_from(vf).unwrap();
        let (tl, vl) = (
            Vec::<i64>::try_from(tl).unwrap(),
            Vec::<i64>::try_from(vl).unwrap(),
        );
        let classes = *tl.iter().chain(&vl).max().unwrap() as usize + 1;
        let (mut c1, mut c5) = (0, 0);
        for (v, &label) in vf.iter().zip(&vl) {
            let mut sims: Vec<(f64, i64)> = tf
                .iter()
                .zip(&tl)
                .map(|(x, &c)| (x.iter().zip(v).map(|(a, b)| (a * b) as f64).sum(), c))
                .collect();
            sims.sort_by(|a, b| b.0.total_cmp(&a.0));
            let mut score = vec![0f64; classes];
            for &(s, c) in sims.iter().take(k) {
                score[c as usize] += (s / t).exp();
            }
            let mut order: Vec<usize> = (0..classes).collect();
            order.sort_by(|&a, &b| score[b].total_cmp(&score[a]));
            c1 += (order[0] as i64 == label) as u32;
            c5 += order[..5.min(classes)].contains(&(label as usize)) as u32;
        }
        let n = vl.len() as f64;
        (100.0 * c1 as f64 / n, 100.0 * c5 as f64 / n)
    }

    /// (k, temperature): default, single neighbour, hot votes, k beyond the train set.
    const CASES: [(usize, f64); 4] = [(20, 0.07), (1, 0.07), (5, 1.0), (1000, 0.07)];

    /// Equal accuracies. With k < 20 fewer than 5 of the 9 classes may get votes, and
    /// the order of the zero-vote classes in the top 5 is arbitrary: top-1 only then.
    fn agree(got: (f64, f64), want: (f64, f64), k: usize) -> bool {
        (got.0 - want.0).abs() < 1e-9 && (k < 20 || (got.1 - want.1).abs() < 1e-9)
    }

    const TRAIN: (u64, usize) = (1, 300);
    const VAL: (u64, usize) = (2, 70);
    const DIM: usize = 16;
    const CLASSES: i64 = 9;

    #[test]
    fn knn_classify_is_dinos_weighted_vote() {
        let train = set(TRAIN.0, TRAIN.1, DIM, CLASSES);
        let val = set(VAL.0, VAL.1, DIM, CLASSES);
        for (k, t) in CASES {
            let got =
                knn_classify(&train.0, &train.1, &val.0, &val.1, CLASSES, k, t, None).unwrap();
            let want = brute_force(&train, &val, k, t);
            assert!(agree(got, want, k), "k {k} T {t}: {got:?} vs {want:?}");
        }
        let empty = Tensor::zeros([0, DIM as i64], (Kind::Float, Device::Cpu));
        let e = knn_classify(&empty, &train.1, &val.0, &val.1, CLASSES, 20, 0.07, None);
        assert!(format!("{:#}", e.unwrap_err()).contains("needs train and val"));
        // Settings without a meaning are refused, not turned into an accuracy.
        for (k, t, what) in [
            (0, 0.07, "k >= 1"),
            (20, 0.0, "temperature"),
            (20, f64::NAN, "temperature"),
        ] {
            let e = knn_classify(&train.0, &train.1, &val.0, &val.1, CLASSES, k, t, None);
            let e = format!("{:#}", e.unwrap_err());
            assert!(e.contains(what), "{e}");
        }
    }

    /// The body of each rank of `issue6_knn_across_ranks_equals_one_process` (no-op
    /// otherwise): rank r takes an uneven part of the sets (rank 2 no train rows, rank 0
    /// no val rows).
    #[test]
    fn knn_rank_child() {
        if std::env::var_os("CONMIM_KNN_CHILD").is_none() {
            return;
        }
        let env = crate::train::dist::DistEnv::from_env().unwrap().unwrap();
        let pg = ProcessGroup::new(
            &env,
            crate::train::dist::Backend::Gloo,
            std::time::Duration::from_secs(60),
        )
        .unwrap();
        let train = set(TRAIN.0, TRAIN.1, DIM, CLASSES);
        let val = set(VAL.0, VAL.1, DIM, CLASSES);
        let part = |(f, l): &(Tensor, Tensor), cuts: [i64; 4]| {
            let (a, b) = (cuts[pg.rank], cuts[pg.rank + 1]);
            (f.narrow(0, a, b - a), l.narrow(0, a, b - a))
        };
        let (tf, tl) = part(&train, [0, 10, 300, 300]);
        let (vf, vl) = part(&val, [0, 0, 50, 70]);
        for (k, t) in CASES {
            let got = knn_classify(&tf, &tl, &vf, &vl, CLASSES, k, t, Some(&pg)).unwrap();
            let want = brute_force(&train, &val, k, t);
            assert!(
                agree(got, want, k),
                "rank {} k {k} T {t}: {got:?} vs {want:?}",
                pg.rank
            );
        }
        println!("KNN_OK rank {}", pg.rank);
    }

    /// Issue 6: the k-NN shared by 3 ranks (Gloo, under torchrun) gives every rank the
    /// accuracy of the k-NN over all the data in one process, however unevenly the
    /// features are spread, a rank without train or val rows included.
    #[test]
    fn issue6_knn_across_ranks_equals_one_process() {
        if !crate::train::testing::gloo_built() {
            return;
        }
        let o = crate::train::testing::torchrun(3, "train::finetune::knn::tests::knn_rank_child")
            .env("CONMIM_KNN_CHILD", "1")
            .output()
            .unwrap();
        let text = crate::train::testing::output_text(&o);
        assert!(o.status.success(), "{text}");
        assert_eq!(text.matches("KNN_OK").count(), 3, "{text}");
    }
}
