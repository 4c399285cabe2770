//! Test data for the trainer: small JPEG shards in a directory, and a micro
//! pretraining config (32 px, patch 8, 2 blocks) that runs in milliseconds per step.

use std::collections::BTreeMap;
use std::path::Path;

use crate::format::manifest::{DatasetInfo, Manifest, ShardEntry};
use crate::format::tar::ShardWriter;
use crate::testkit::{self, JpegSpec};

use super::head::HeadConfig;
use super::pretrain_config::PretrainConfig;
use super::testing::micro;
use super::vit::Variant;

/// Shards of small JPEGs (`sizes[i]` samples in shard `i`) plus the manifest.
pub fn dataset(dir: &Path, sizes: &[u64]) {
    let mut list = Vec::new();
    for (i, &n) in sizes.iter().enumerate() {
        let name = crate::format::shard_name("train", i);
        let mut w = ShardWriter::create(&dir.join(&name)).unwrap();
        for j in 0..n {
            let key = format!("s{i}_{j}");
            let bytes = testkit::jpeg(&JpegSpec::rgb(
                40 + (j as u32 % 3) * 8,
                36,
                (i * 1000) as u64 + j,
            ));
            let members = vec![
                ("jpg".to_owned(), bytes),
                (
                    "cls".to_owned(),
                    format!("{}", i * 10 + j as usize).into_bytes(),
                ),
            ];
            w.append(&key, &members).unwrap();
        }
        let f = w.finish().unwrap();
        list.push(ShardEntry {
            url: name,
            nsamples: n,
            filesize: f.filesize,
            md5sum: f.md5sum,
        });
    }
    let info = DatasetInfo {
        schema_version: crate::format::SCHEMA_VERSION,
        tool: "test".into(),
        dataset: "files".into(),
        split: "train".into(),
        num_samples: sizes.iter().sum(),
        num_rejected: 0,
        num_inputs: sizes.iter().sum(),
        num_shards: sizes.len() as u64,
        total_bytes: 0,
        rejected_by_reason: BTreeMap::new(),
        classes: None,
        wnids: None,
        categories: None,
        params: serde_json::Value::Null,
    };
    let m = Manifest::new("train", list, info);
    crate::format::atomic_write_json(&dir.join(crate::format::manifest_name("train")), &m).unwrap();
}

/// The `tiny` preset shrunk to the micro model (32 px, patch 8, 32 dim, 2 blocks) with a
/// small head, batch `batch`, `steps` total steps, 2 loader threads.
pub fn micro_config(batch: usize, steps: u64) -> PretrainConfig {
    let model = micro(Variant::Beit);
    PretrainConfig {
        head: HeadConfig {
            hidden_dim: 64,
            out_dim: 24,
            ..HeadConfig::conmim(model.embed_dim)
        },
        model,
        batch_size: batch,
        total_steps: steps,
        data_threads: 2,
        shuffle_buffer: 4,
        seed: 5,
        ..PretrainConfig::preset("tiny").unwrap()
    }
}
