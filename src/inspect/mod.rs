//! Reading datasets back.
//!
//! * [`verify`] re-reads every shard and checks it, byte for byte, against the manifest
//!   (size, md5, sample count) and the index (keys, offsets, lengths, members, image
//!   hash, size and dimensions, label), optionally decoding every image. It collects
//!   every problem instead of stopping at the first.
//! * [`info`] summarises a dataset from its manifest and index alone: counts, rejects,
//!   formats, the class histogram and image size / byte distributions.

pub mod info;
pub mod verify;

use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

use crate::error::{Error, Result};

/// A progress bar counting bytes (hidden unless `show`).
pub(crate) fn bytes_bar(show: bool, total: u64, what: &str) -> ProgressBar {
    bar(
        show,
        total,
        what,
        "{prefix:>10} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} {bytes_per_sec} \
         ETA {eta} {msg}",
    )
}

/// A progress bar counting index rows (hidden unless `show`).
pub(crate) fn rows_bar(show: bool, total: u64, what: &str) -> ProgressBar {
    bar(
        show,
        total,
        what,
        "{prefix:>10} [{elapsed_precise}] {wide_bar} {human_pos}/{human_len} rows ETA {eta}",
    )
}

fn bar(show: bool, total: u64, what: &str, template: &str) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(total)
        .with_style(ProgressStyle::with_template(template).expect("template"));
    pb.set_prefix(what.to_owned());
    pb.enable_steady_tick(Duration::from_millis(200));
    pb
}

/// A rayon pool with `threads` workers (0 = all cores).
pub(crate) fn thread_pool(threads: usize) -> Result<rayon::ThreadPool> {
    let n = if threads == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        threads
    };
    rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build()
        .map_err(|e| Error::Config(format!("thread pool: {e}")))
}

/// Extensions that mark a sample's image member (the first member with one of these).
pub const IMAGE_EXTS: &[&str] = &["jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff"];

/// Whether a member extension names an image.
pub fn is_image_ext(ext: &str) -> bool {
    IMAGE_EXTS.contains(&ext)
}

/// The label a `cls` member encodes: its trimmed text as an integer, if it is one.
pub fn parse_cls(data: &[u8]) -> Option<i64> {
    std::str::from_utf8(data).ok()?.trim().parse().ok()
}

/// Formats a byte count for people (`1.2 MB`).
pub(crate) fn human_bytes(n: u64) -> String {
    let n = n as f64;
    if n < 1e3 {
        format!("{n} B")
    } else if n < 1e6 {
        format!("{:.1} kB", n / 1e3)
    } else if n < 1e9 {
        format!("{:.1} MB", n / 1e6)
    } else if n < 1e12 {
        format!("{:.2} GB", n / 1e9)
    } else {
        format!("{:.2} TB", n / 1e12)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cls_parses_trimmed_integers_only() {
        assert_eq!(parse_cls(b"3"), Some(3));
        assert_eq!(parse_cls(b" 12\n"), Some(12));
        assert_eq!(parse_cls(b"-1"), Some(-1));
        assert_eq!(parse_cls(b"dog"), None);
        assert_eq!(parse_cls(&[0xff, 0xfe]), None);
    }

    #[test]
    fn image_exts() {
        assert!(is_image_ext("jpg"));
        assert!(is_image_ext("tiff"));
        assert!(!is_image_ext("seg.png"));
        assert!(!is_image_ext("txt"));
    }

    #[test]
    fn bytes_for_people() {
        assert_eq!(human_bytes(12), "12 B");
        assert_eq!(human_bytes(1_500), "1.5 kB");
        assert_eq!(human_bytes(2_000_000), "2.0 MB");
        assert_eq!(human_bytes(3_210_000_000), "3.21 GB");
    }
}
