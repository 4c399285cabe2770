//! Test data for the trainer: small JPEG shards in a directory, and a micro
//! pretraining config (32 px, patch 8, 2 blocks) that runs in milliseconds per step.

use std::path::Path;

use crate::testkit::{self, JpegSpec};

use super::head::HeadConfig;
use super::pretrain_config::PretrainConfig;
use super::testing::micro;
use super::vit::Variant;

/// Shards of small JPEGs (`sizes[i]` samples in shard `i`) plus the manifest.
pub fn dataset(dir: &Path, sizes: &[u64]) {
    testkit::write_sharded(dir, "train", sizes, |i, j| {
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
        (key, members)
    })
    .unwrap();
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
