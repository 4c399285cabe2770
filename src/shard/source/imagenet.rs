//! ImageNet-1K as people have it on disk.
//!
//! * train: `root/train/nXXXXXXXX/*.JPEG`;
//! * val: class folders (`root/val/nXXXXXXXX/*`), or flat `root/val/*.JPEG` with labels
//!   from Kaggle's `LOC_val_solution.csv` (`ImageId,PredictionString`, the string starting
//!   with the WNID) or a plain `filename label` list (label = class index or WNID).
//!
//! Class index = position of the WNID in the sorted list of `root/train` folders
//! (torchvision's `ImageFolder` order); the manifest records the list.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::{
    Entry, Item, LoadContext, Metadata, Sample, Source, image_row, load_image_file, sorted_dir,
};
use crate::error::{Error, Result};
use crate::format::manifest::Class;
use crate::format::reject::Reject;
use crate::format::sanitize_key;

/// Which split to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    /// `train/`.
    Train,
    /// `val/`.
    Val,
}

/// How val labels are given (detected when not set).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ValLabels {
    /// `val/<wnid>/...` folders.
    Folders,
    /// A `LOC_val_solution.csv`-style file.
    LocCsv(PathBuf),
    /// A `filename label` list.
    List(PathBuf),
}

/// The ImageNet source.
#[derive(Debug)]
pub struct Imagenet {
    root: PathBuf,
    split: Split,
    wnids: Vec<String>,
    val_labels: Option<ValLabels>,
    follow_symlinks: bool,
    counts: Mutex<BTreeMap<String, u64>>,
}

fn is_wnid(s: &str) -> bool {
    s.len() == 9 && s.starts_with('n') && s[1..].bytes().all(|b| b.is_ascii_digit())
}

impl Imagenet {
    /// Opens `root` (the folder holding `train/` and `val/`). `val_labels` overrides the
    /// val layout detection; `expect_classes` fails early if the class count differs.
    pub fn new(
        root: &Path,
        split: Split,
        val_labels: Option<PathBuf>,
        expect_classes: Option<usize>,
        follow_symlinks: bool,
    ) -> Result<Self> {
        let train = root.join("train");
        let class_dir = if train.is_dir() {
            train
        } else if split == Split::Val && root.join("val").is_dir() {
            root.join("val")
        } else {
            return Err(Error::input(
                root,
                "no `train/` folder with one sub-folder per WNID here; --root must point at \
                 the folder holding train/ and val/",
            ));
        };
        let wnids: Vec<String> = sorted_dir(&class_dir)
            .map_err(|e| Error::io(&class_dir, e))?
            .into_iter()
            .filter(|(n, _)| is_wnid(n) && class_dir.join(n).is_dir())
            .map(|(n, _)| n)
            .collect();
        if wnids.is_empty() {
            return Err(Error::input(
                &class_dir,
                "no WNID folders (nXXXXXXXX) found",
            ));
        }
        if let Some(n) = expect_classes
            && wnids.len() != n
        {
            return Err(Error::input(
                &class_dir,
                format!("found {} class folders, expected {n}", wnids.len()),
            ));
        }
        let val_labels = match split {
            Split::Train => None,
            Split::Val => Some(Self::detect_val(root, val_labels)?),
        };
        Ok(Imagenet {
            root: root.to_owned(),
            split,
            wnids,
            val_labels,
            follow_symlinks,
            counts: Mutex::new(BTreeMap::new()),
        })
    }

    fn detect_val(root: &Path, given: Option<PathBuf>) -> Result<ValLabels> {
        let classify = |p: PathBuf| -> Result<ValLabels> {
            let head = std::fs::read_to_string(&p).map_err(|e| Error::io(&p, e))?;
            let first = head.lines().next().unwrap_or("");
            Ok(if first.starts_with("ImageId") || first.contains(',') {
                ValLabels::LocCsv(p)
            } else {
                ValLabels::List(p)
            })
        };
        if let Some(p) = given {
            return classify(p);
        }
        let val = root.join("val");
        let entries = sorted_dir(&val).map_err(|e| Error::io(&val, e))?;
        if entries
            .iter()
            .any(|(n, _)| is_wnid(n) && val.join(n).is_dir())
        {
            return Ok(ValLabels::Folders);
        }
        // Not the devkit's ILSVRC2012_validation_ground_truth.txt: its lines are bare
        // ILSVRC2012_IDs (devkit order, not the sorted-WNID class indices) without file
        // names, so it cannot be read as a list.
        for cand in ["LOC_val_solution.csv", "val_labels.txt", "val.txt"] {
            let p = root.join(cand);
            if p.is_file() {
                return classify(p);
            }
        }
        let devkit = if root
            .join("ILSVRC2012_validation_ground_truth.txt")
            .is_file()
        {
            " (ILSVRC2012_validation_ground_truth.txt holds devkit ILSVRC2012_IDs without \
             file names, which need meta.mat to map to WNIDs: use LOC_val_solution.csv from \
             Kaggle, or a `file.JPEG WNID` list)"
        } else {
            ""
        };
        Err(Error::input(
            &val,
            format!(
                "flat val folder but no labels: put LOC_val_solution.csv or val.txt next to \
                 it, or pass --val-labels FILE{devkit}"
            ),
        ))
    }

    fn class_of(&self, wnid: &str) -> Option<i64> {
        self.wnids
            .binary_search_by(|w| w.as_str().cmp(wnid))
            .ok()
            .map(|i| i as i64)
    }

    fn split_dir(&self) -> &'static str {
        match self.split {
            Split::Train => "train",
            Split::Val => "val",
        }
    }

    /// Walks `<split>/<wnid>/` folders.
    fn enumerate_folders(&self, emit: &mut dyn FnMut(Entry) -> Result<()>) -> Result<()> {
        let sd = self.split_dir();
        let dir = self.root.join(sd);
        let entries = sorted_dir(&dir).map_err(|e| Error::io(&dir, e))?;
        let mut ordinal = 0u64;
        for (name, ty) in entries {
            let rel = format!("{sd}/{name}");
            let label = if ty.is_dir() || ty.is_symlink() {
                self.class_of(&name)
            } else {
                None
            };
            let Some(label) = label else {
                emit(Entry::Reject(Reject::new(
                    rel,
                    None,
                    if ty.is_dir() {
                        "unknown_class"
                    } else {
                        "not_in_class_folder"
                    },
                    "not a class folder named after a training WNID",
                )))?;
                continue;
            };
            let files = match sorted_dir(&self.root.join(&rel)) {
                Ok(f) => f,
                Err(e) => {
                    emit(Entry::Reject(Reject::new(
                        rel,
                        None,
                        "unreadable",
                        e.to_string(),
                    )))?;
                    continue;
                }
            };
            for (fname, fty) in files {
                let frel = format!("{rel}/{fname}");
                if fty.is_dir() {
                    emit(Entry::Reject(Reject::new(
                        frel,
                        None,
                        "not_a_file",
                        "nested folder inside a class folder",
                    )))?;
                    continue;
                }
                let mut item = Item::new(ordinal, key_of(&fname), frel);
                item.label = Some(label);
                ordinal += 1;
                emit(Entry::Item(item))?;
            }
        }
        Ok(())
    }

    /// Flat val folder + a label file.
    fn enumerate_flat(
        &self,
        labels: &Path,
        csv: bool,
        emit: &mut dyn FnMut(Entry) -> Result<()>,
    ) -> Result<()> {
        let text = std::fs::read_to_string(labels).map_err(|e| Error::io(labels, e))?;
        let mut by_file: BTreeMap<String, std::result::Result<i64, String>> = BTreeMap::new();
        for (lineno, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || (csv && lineno == 0 && line.starts_with("ImageId")) {
                continue;
            }
            let (name, lab) = if csv {
                match line.split_once(',') {
                    Some((id, pred)) => (
                        id.trim().to_owned(),
                        pred.split_whitespace().next().unwrap_or("").to_owned(),
                    ),
                    None => (line.to_owned(), String::new()),
                }
            } else {
                let mut it = line.split_whitespace();
                (
                    it.next().unwrap_or("").to_owned(),
                    it.next().unwrap_or("").to_owned(),
                )
            };
            let stem = name.split('.').next().unwrap_or(&name).to_owned();
            let label = if is_wnid(&lab) {
                self.class_of(&lab)
                    .ok_or_else(|| format!("line {}: WNID {lab} has no train folder", lineno + 1))
            } else {
                match lab.parse::<i64>() {
                    Ok(i) if (0..self.wnids.len() as i64).contains(&i) => Ok(i),
                    _ => Err(format!("line {}: bad label `{lab}`", lineno + 1)),
                }
            };
            by_file.insert(stem, label);
        }
        let dir = self.root.join("val");
        let mut ordinal = 0u64;
        let mut seen = BTreeSet::new();
        for (fname, ty) in sorted_dir(&dir).map_err(|e| Error::io(&dir, e))? {
            let rel = format!("val/{fname}");
            if ty.is_dir() {
                emit(Entry::Reject(Reject::new(
                    rel,
                    None,
                    "not_a_file",
                    "folder inside a flat val folder",
                )))?;
                continue;
            }
            let stem = fname.split('.').next().unwrap_or(&fname).to_owned();
            match by_file.get(&stem) {
                Some(Ok(label)) => {
                    seen.insert(stem.clone());
                    let mut item = Item::new(ordinal, key_of(&fname), rel);
                    item.label = Some(*label);
                    ordinal += 1;
                    emit(Entry::Item(item))?;
                }
                Some(Err(msg)) => {
                    seen.insert(stem.clone());
                    emit(Entry::Reject(Reject::new(
                        rel,
                        Some(key_of(&fname)),
                        "bad_label",
                        msg.clone(),
                    )))?;
                }
                None => emit(Entry::Reject(Reject::new(
                    rel,
                    Some(key_of(&fname)),
                    "no_label",
                    format!("not listed in {}", labels.display()),
                )))?,
            }
        }
        for stem in by_file.keys().filter(|s| !seen.contains(*s)) {
            emit(Entry::Reject(Reject::new(
                format!("val/{stem}"),
                None,
                "missing_file",
                format!("listed in {} but not in val/", labels.display()),
            )))?;
        }
        Ok(())
    }
}

/// The key of an ImageNet file: its name up to the first dot, sanitised.
fn key_of(file_name: &str) -> String {
    sanitize_key(file_name.split('.').next().unwrap_or(file_name))
}

impl Source for Imagenet {
    fn kind(&self) -> &'static str {
        "imagenet"
    }

    fn params(&self) -> serde_json::Value {
        serde_json::json!({
            "root": self.root.display().to_string(),
            "split": self.split_dir(),
            "val_labels": match &self.val_labels {
                None => serde_json::Value::Null,
                Some(ValLabels::Folders) => "folders".into(),
                Some(ValLabels::LocCsv(p)) | Some(ValLabels::List(p)) => p.display().to_string().into(),
            },
            "num_classes": self.wnids.len(),
        })
    }

    fn size_hint(&self) -> Result<u64> {
        Ok(match self.split {
            Split::Train => self.wnids.len() as u64 * 1300,
            Split::Val => self.wnids.len() as u64 * 50,
        })
    }

    fn enumerate(&self, emit: &mut dyn FnMut(Entry) -> Result<()>) -> Result<()> {
        let mut counting = |e: Entry| {
            if let Entry::Item(it) = &e
                && let Some(l) = it.label
            {
                *self
                    .counts
                    .lock()
                    .expect("counts")
                    .entry(self.wnids[l as usize].clone())
                    .or_default() += 1;
            }
            emit(e)
        };
        match &self.val_labels {
            None | Some(ValLabels::Folders) => self.enumerate_folders(&mut counting),
            Some(ValLabels::LocCsv(p)) => self.enumerate_flat(p, true, &mut counting),
            Some(ValLabels::List(p)) => self.enumerate_flat(p, false, &mut counting),
        }
    }

    fn load(&self, item: &Item, ctx: &LoadContext) -> std::result::Result<Sample, Reject> {
        debug_assert_eq!(ctx.follow_symlinks, self.follow_symlinks);
        let img = load_image_file(&self.root, item, ctx)?;
        let label = item.label.unwrap_or_default();
        let mut members = vec![
            (img.info.format.ext().to_owned(), Vec::new()),
            ("cls".to_owned(), label.to_string().into_bytes()),
        ];
        let row = image_row(item, &img, &members);
        members[0].1 = img.bytes;
        Ok(Sample { members, row })
    }

    fn metadata(&self) -> Metadata {
        let counts = self.counts.lock().expect("counts");
        let empty: Vec<&String> = self
            .wnids
            .iter()
            .filter(|w| !counts.contains_key(*w))
            .collect();
        let mut warnings = Vec::new();
        if !empty.is_empty() && !counts.is_empty() {
            let shown: Vec<&str> = empty.iter().take(10).map(|s| s.as_str()).collect();
            warnings.push(format!(
                "{} classes have no {} samples (missing class folders?): {}{}",
                empty.len(),
                self.split_dir(),
                shown.join(" "),
                if empty.len() > 10 { " ..." } else { "" }
            ));
        }
        Metadata {
            classes: Some(
                self.wnids
                    .iter()
                    .enumerate()
                    .map(|(i, w)| Class {
                        index: i as i64,
                        name: w.clone(),
                    })
                    .collect(),
            ),
            wnids: Some(self.wnids.clone()),
            categories: None,
            warnings,
        }
    }
}
