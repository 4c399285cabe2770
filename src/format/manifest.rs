//! The manifest: the `wids` shard index (`__kind__: wids-shard-index-v1`) that
//! WebDataset's indexed reader understands, plus a `conmim` object with the dataset's
//! metadata. Its presence marks a dataset as complete: it is always written last.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The `wids` kind tag.
pub const WIDS_KIND: &str = "wids-shard-index-v1";

/// One shard in the shard list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardEntry {
    /// Path relative to the manifest's directory.
    pub url: String,
    /// Samples in the shard.
    pub nsamples: u64,
    /// Size in bytes.
    pub filesize: u64,
    /// Hex md5 of the file.
    pub md5sum: String,
}

/// A class of a classification dataset.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Class {
    /// Class index (the `cls` member and index `label`).
    pub index: i64,
    /// Class name (the WNID for ImageNet).
    pub name: String,
}

/// A COCO category.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Category {
    /// COCO category id.
    pub id: i64,
    /// Name.
    pub name: String,
    /// Supercategory.
    #[serde(default)]
    pub supercategory: String,
}

/// Dataset metadata kept beside the shard list.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DatasetInfo {
    /// Format version ([`super::SCHEMA_VERSION`]).
    pub schema_version: u32,
    /// Tool that wrote the dataset.
    pub tool: String,
    /// Which builder made it (`imagenet`, `files`, `index`, `ade20k`, `coco`, `merge`).
    pub dataset: String,
    /// Split name.
    pub split: String,
    /// Samples in the index.
    pub num_samples: u64,
    /// Inputs in the rejected list.
    pub num_rejected: u64,
    /// Inputs seen (samples + rejected).
    pub num_inputs: u64,
    /// Shards.
    pub num_shards: u64,
    /// Total shard bytes.
    pub total_bytes: u64,
    /// Rejects counted by reason code.
    pub rejected_by_reason: BTreeMap<String, u64>,
    /// Class table, for classification datasets.
    pub classes: Option<Vec<Class>>,
    /// ImageNet WNIDs in class-index order.
    pub wnids: Option<Vec<String>>,
    /// COCO categories.
    pub categories: Option<Vec<Category>>,
    /// The parameters the dataset was built with.
    pub params: serde_json::Value,
}

/// The manifest file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Always [`WIDS_KIND`].
    #[serde(rename = "__kind__")]
    pub kind: String,
    /// Always 1.
    pub wids_version: u32,
    /// Dataset name (the split).
    pub name: String,
    /// Shards in order; an index row's `shard` is a position in this list.
    pub shardlist: Vec<ShardEntry>,
    /// Our metadata.
    pub conmim: DatasetInfo,
}

impl Manifest {
    /// A manifest for `shardlist` with `info`.
    pub fn new(name: &str, shardlist: Vec<ShardEntry>, info: DatasetInfo) -> Self {
        Manifest {
            kind: WIDS_KIND.to_owned(),
            wids_version: 1,
            name: name.to_owned(),
            shardlist,
            conmim: info,
        }
    }
}

/// `conmim-shard <version>`, recorded in manifests.
pub fn tool_name() -> String {
    format!("conmim-shard {}", env!("CARGO_PKG_VERSION"))
}
