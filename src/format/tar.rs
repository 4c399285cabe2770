//! Tar shards: a writer that records where every sample lands, and a scanner that
//! groups members back into samples with their offsets.
//!
//! Members are written as plain ustar entries with fixed metadata (mode 0444, uid/gid
//! 0, mtime 0, no user names) so that equal inputs give byte-identical shards.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use md5::{Digest, Md5};

use crate::error::{Error, Result};

/// Size of a tar block.
pub const BLOCK: u64 = 512;
/// The most a member's buffer takes before its bytes arrive (it grows with them): a
/// header's size field alone never decides an allocation.
pub const PREALLOC_MAX: u64 = 1 << 20;
/// The two zero blocks that end an archive.
pub const END_OF_ARCHIVE: u64 = 2 * BLOCK;

/// Bytes a member with `data_len` bytes of data occupies (header plus padded data),
/// for names that fit the ustar name field.
pub fn member_span(data_len: u64) -> u64 {
    BLOCK + data_len.div_ceil(BLOCK) * BLOCK
}

/// A writer that counts and hashes bytes on the way to the file.
struct Sink {
    inner: BufWriter<File>,
    pos: u64,
    md5: Md5,
}

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.md5.update(&buf[..n]);
        self.pos += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Where a sample landed inside its shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    /// Offset of the sample's first tar header.
    pub offset: u64,
    /// Bytes spanned by all of its members (headers and padding included).
    pub length: u64,
}

/// What a finished shard is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardFile {
    /// Final path.
    pub path: PathBuf,
    /// Samples written.
    pub nsamples: u64,
    /// Size in bytes.
    pub filesize: u64,
    /// Hex md5 of the whole file.
    pub md5sum: String,
}

/// Writes one shard to `<path>.partial`, hashing (md5) as it goes;
/// [`ShardWriter::finish`] fsyncs and renames it into place, so an interrupted shard
/// never appears under its final name. [`ShardWriter::close`] + [`ClosedShard::publish`]
/// split the two so a caller can record the shard in between.
pub struct ShardWriter {
    path: PathBuf,
    tmp: PathBuf,
    builder: tar::Builder<Sink>,
    nsamples: u64,
}

/// A shard whose bytes are all written to its temporary file, not yet renamed.
#[derive(Debug)]
pub struct ClosedShard {
    path: PathBuf,
    tmp: PathBuf,
    nsamples: u64,
    filesize: u64,
    md5sum: String,
    /// Closed with fsync: the rename is made durable too.
    synced: bool,
}

impl ShardWriter {
    /// Starts a shard that will be named `path` once finished.
    pub fn create(path: &Path) -> Result<Self> {
        let tmp = super::tmp_path(path);
        let file = File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        let sink = Sink {
            inner: BufWriter::with_capacity(1 << 20, file),
            pos: 0,
            md5: Md5::new(),
        };
        Ok(ShardWriter {
            path: path.to_owned(),
            tmp,
            builder: tar::Builder::new(sink),
            nsamples: 0,
        })
    }

    /// Bytes written so far.
    pub fn position(&self) -> u64 {
        self.builder.get_ref().pos
    }

    /// Samples written so far.
    pub fn nsamples(&self) -> u64 {
        self.nsamples
    }

    /// Appends one sample: members `{key}.{ext}` in the given order.
    pub fn append(&mut self, key: &str, members: &[(String, Vec<u8>)]) -> Result<Placement> {
        let offset = self.position();
        for (ext, data) in members {
            let mut header = tar::Header::new_ustar();
            header.set_size(data.len() as u64);
            header.set_mode(0o444);
            header.set_uid(0);
            header.set_gid(0);
            header.set_mtime(0);
            header.set_entry_type(tar::EntryType::Regular);
            let name = format!("{key}.{ext}");
            self.builder
                .append_data(&mut header, &name, data.as_slice())
                .map_err(|e| Error::io(&self.tmp, e))?;
        }
        self.nsamples += 1;
        Ok(Placement {
            offset,
            length: self.position() - offset,
        })
    }

    /// Ends the archive and closes the temporary file (fsynced if `fsync`).
    pub fn close(self, fsync: bool) -> Result<ClosedShard> {
        let Sink { inner, pos, md5 } = self
            .builder
            .into_inner()
            .map_err(|e| Error::io(&self.tmp, e))?;
        let file = inner
            .into_inner()
            .map_err(|e| Error::io(&self.tmp, e.into_error()))?;
        if fsync {
            file.sync_all().map_err(|e| Error::io(&self.tmp, e))?;
        }
        Ok(ClosedShard {
            path: self.path,
            tmp: self.tmp,
            nsamples: self.nsamples,
            filesize: pos,
            md5sum: hex::encode(md5.finalize()),
            synced: fsync,
        })
    }

    /// Ends the archive, fsyncs and renames the shard into place.
    pub fn finish(self) -> Result<ShardFile> {
        self.close(true)?.publish()
    }
}

impl ClosedShard {
    /// Size of the file in bytes.
    pub fn filesize(&self) -> u64 {
        self.filesize
    }

    /// Hex md5 of the file.
    pub fn md5sum(&self) -> &str {
        &self.md5sum
    }

    /// Renames the closed file into place (and, when it was closed with fsync, syncs
    /// the directory so that the rename survives power loss too).
    pub fn publish(self) -> Result<ShardFile> {
        std::fs::rename(&self.tmp, &self.path).map_err(|e| Error::io(&self.path, e))?;
        if self.synced {
            super::sync_parent_dir(&self.path);
        }
        Ok(ShardFile {
            path: self.path,
            nsamples: self.nsamples,
            filesize: self.filesize,
            md5sum: self.md5sum,
        })
    }
}

/// One member of a sample read back from a shard.
#[derive(Debug, Clone)]
pub struct Member {
    /// Lowercased extension (`jpg`, `cls`, `seg.png`, ...).
    pub ext: String,
    /// Offset of the member's header.
    pub header_offset: u64,
    /// The member's bytes.
    pub data: Vec<u8>,
}

/// A sample read back from a shard.
#[derive(Debug, Clone)]
pub struct ScannedSample {
    /// WebDataset key (member name up to the first dot of the basename).
    pub key: String,
    /// Offset of the first member's header.
    pub offset: u64,
    /// Bytes spanned by the members.
    pub length: u64,
    /// Members in stored order.
    pub members: Vec<Member>,
}

impl ScannedSample {
    /// The member with extension `ext`, if any.
    pub fn member(&self, ext: &str) -> Option<&Member> {
        self.members.iter().find(|m| m.ext == ext)
    }
}

/// Problems found while scanning that do not stop the scan.
#[derive(Debug, Clone)]
pub struct ScanIssue {
    /// Member name.
    pub name: String,
    /// What is wrong.
    pub message: String,
}

/// Reads a tar shard and calls `f` for each sample (consecutive members sharing a
/// key), in order. Non-regular members and names without an extension are reported
/// through `issue` and skipped. Returns the number of samples.
pub fn scan_shard(
    path: &Path,
    mut f: impl FnMut(ScannedSample) -> Result<()>,
    mut issue: impl FnMut(ScanIssue),
) -> Result<u64> {
    let shard = path.display().to_string();
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let mut archive = tar::Archive::new(BufReader::with_capacity(1 << 20, file));
    let entries = archive.entries().map_err(|e| Error::CorruptShard {
        shard: shard.clone(),
        message: e.to_string(),
    })?;
    let mut current: Option<ScannedSample> = None;
    let mut count = 0u64;
    // Where the next member's first header block starts: the end of the previous
    // member's data. (`raw_header_position` would skip PAX / GNU long-name headers,
    // which belong to the member.)
    let mut next_start = 0u64;
    for entry in entries {
        let mut entry = entry.map_err(|e| Error::CorruptShard {
            shard: shard.clone(),
            message: format!("bad tar structure at byte {next_start}: {e}"),
        })?;
        let header_offset = next_start;
        if entry.header().entry_type().is_gnu_sparse() {
            // tar reports a sparse member's expanded size, not the bytes it takes in the
            // archive, so the offsets after it cannot be computed; WebDataset writers
            // never make one.
            return Err(Error::CorruptShard {
                shard: shard.clone(),
                message: format!(
                    "member {} at byte {header_offset} is a GNU sparse file, which shards \
                     cannot hold (rewrite the tar without --sparse)",
                    entry
                        .path()
                        .map(|p| p.display().to_string())
                        .unwrap_or_default()
                ),
            });
        }
        let size = entry.size();
        let name = entry
            .path()
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default();
        // A size field beyond any member (a crafted or garbled header) is damage to
        // report with the shard, not an allocation or an overflow.
        let end = (size <= crate::stream::MAX_MEMBER_BYTES)
            .then(|| entry.raw_file_position() + size.div_ceil(BLOCK) * BLOCK)
            .ok_or_else(|| Error::CorruptShard {
                shard: shard.clone(),
                message: format!("member {name} claims {size} bytes"),
            })?;
        next_start = end;
        let kind = entry.header().entry_type();
        if !kind.is_file() {
            if !kind.is_dir() {
                issue(ScanIssue {
                    name,
                    message: format!("not a regular file ({kind:?})"),
                });
            }
            continue;
        }
        let Some((key, ext)) = split_owned(&name) else {
            issue(ScanIssue {
                name,
                message: "member name has no extension".into(),
            });
            continue;
        };
        let mut data = Vec::with_capacity(size.min(PREALLOC_MAX) as usize);
        entry
            .read_to_end(&mut data)
            .map_err(|e| Error::CorruptShard {
                shard: shard.clone(),
                message: format!("member {name}: {e}"),
            })?;
        let member = Member {
            ext,
            header_offset,
            data,
        };
        match current.as_mut() {
            Some(s) if s.key == key => {
                s.length = end - s.offset;
                s.members.push(member);
            }
            _ => {
                if let Some(done) = current.take() {
                    count += 1;
                    f(done)?;
                }
                current = Some(ScannedSample {
                    key,
                    offset: header_offset,
                    length: end - header_offset,
                    members: vec![member],
                });
            }
        }
    }
    if let Some(done) = current.take() {
        count += 1;
        f(done)?;
    }
    Ok(count)
}

fn split_owned(name: &str) -> Option<(String, String)> {
    super::split_member_name(name).map(|(k, e)| (k.to_owned(), e))
}

/// Hex md5 and size of a file, streamed.
pub fn md5_file(path: &Path) -> Result<(String, u64)> {
    let mut file = File::open(path).map_err(|e| Error::io(path, e))?;
    let mut md5 = Md5::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = file.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        md5.update(&buf[..n]);
        total += n as u64;
    }
    Ok((hex::encode(md5.finalize()), total))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A member whose size field claims 1 TiB (GNU base-256, valid checksum) is a
    /// corrupt shard named in the error, not an allocation of 1 TiB.
    #[test]
    fn a_crafted_huge_size_is_a_corrupt_shard() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t-000000.tar");
        let mut w = ShardWriter::create(&path).unwrap();
        w.append("k1", &[("jpg".into(), vec![1; 10])]).unwrap();
        w.finish().unwrap();
        let mut bytes = std::fs::read(&path).unwrap();
        let h = &mut bytes[..512];
        let mut size = [0u8; 12];
        size[0] = 0x80;
        size[4..].copy_from_slice(&(1u64 << 40).to_be_bytes());
        h[124..136].copy_from_slice(&size);
        h[148..156].fill(b' ');
        let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
        h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
        std::fs::write(&path, &bytes).unwrap();
        let e = scan_shard(&path, |_| Ok(()), |_| {})
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("t-000000.tar") && e.contains("1099511627776"),
            "{e}"
        );
    }

    /// A GNU sparse member (as `tar --sparse` makes) is a corrupt shard named in the
    /// error: its expanded size put the following samples' offsets past the file (and
    /// `length` below zero, a panic in debug builds).
    #[test]
    fn a_sparse_member_is_a_corrupt_shard() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s-000000.tar");
        let mut b = tar::Builder::new(Vec::new());
        let add =
            |b: &mut tar::Builder<Vec<u8>>, name: &str, kind, data: &[u8], real: Option<u64>| {
                let mut h = tar::Header::new_gnu();
                h.set_path(name).unwrap();
                h.set_size(data.len() as u64);
                h.set_entry_type(kind);
                h.set_mode(0o644);
                if let Some(real) = real {
                    // One data chunk at the end of a `real`-byte file: a hole before it.
                    let g = h.as_gnu_mut().unwrap();
                    let (off, len) = (real - data.len() as u64, data.len() as u64);
                    g.sparse[0].offset[..11].copy_from_slice(format!("{off:011o}").as_bytes());
                    g.sparse[0].numbytes[..11].copy_from_slice(format!("{len:011o}").as_bytes());
                    g.realsize[..11].copy_from_slice(format!("{real:011o}").as_bytes());
                }
                h.set_cksum();
                b.append(&h, data).unwrap();
            };
        add(&mut b, "k0.jpg", tar::EntryType::Regular, &[1; 100], None);
        add(
            &mut b,
            "hole.bin",
            tar::EntryType::GNUSparse,
            &[2; 512],
            Some(1 << 20),
        );
        add(&mut b, "k1.jpg", tar::EntryType::Regular, &[3; 100], None);
        std::fs::write(&path, b.into_inner().unwrap()).unwrap();
        let e = scan_shard(&path, |_| Ok(()), |_| {})
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("s-000000.tar") && e.contains("hole.bin") && e.contains("sparse"),
            "{e}"
        );
    }

    #[test]
    fn writes_and_scans_back_with_offsets() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t-000000.tar");
        let mut w = ShardWriter::create(&path).unwrap();
        let a = w
            .append(
                "k1",
                &[("jpg".into(), vec![1; 700]), ("cls".into(), b"3".to_vec())],
            )
            .unwrap();
        let b = w.append("k2", &[("png".into(), vec![2; 10])]).unwrap();
        assert_eq!(a.offset, 0);
        assert_eq!(a.length, member_span(700) + member_span(1));
        assert_eq!(b.offset, a.length);
        assert!(!path.exists(), "shard must not appear before finish");
        let done = w.finish().unwrap();
        assert_eq!(done.nsamples, 2);
        assert_eq!(done.filesize, std::fs::metadata(&path).unwrap().len());
        assert_eq!(md5_file(&path).unwrap().0, done.md5sum);
        let mut seen = Vec::new();
        let n = scan_shard(
            &path,
            |s| {
                seen.push(s);
                Ok(())
            },
            |i| panic!("{i:?}"),
        )
        .unwrap();
        assert_eq!(n, 2);
        assert_eq!(seen[0].key, "k1");
        assert_eq!((seen[0].offset, seen[0].length), (a.offset, a.length));
        assert_eq!((seen[1].offset, seen[1].length), (b.offset, b.length));
        assert_eq!(seen[0].member("cls").unwrap().data, b"3");
        assert_eq!(seen[1].member("png").unwrap().data, vec![2; 10]);
    }

    #[test]
    fn identical_input_gives_identical_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let mut sums = Vec::new();
        for i in 0..2 {
            let mut w = ShardWriter::create(&dir.path().join(format!("{i}.tar"))).unwrap();
            w.append("a", &[("txt".into(), b"hello".to_vec())]).unwrap();
            sums.push(w.finish().unwrap().md5sum);
        }
        assert_eq!(sums[0], sums[1]);
    }

    /// Members with PAX or GNU long-name headers: the sample starts at the first of
    /// its header blocks (issue 2: ranged reads must get the whole member).
    #[test]
    fn offsets_include_extension_headers() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("foreign.tar");
        let mut b = tar::Builder::new(File::create(&path).unwrap());
        let long = format!("{}/k1.jpg", "d".repeat(120));
        for (name, data) in [("k0.jpg", &b"abc"[..]), (long.as_str(), &b"xyz"[..])] {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_entry_type(tar::EntryType::Regular);
            b.append_data(&mut h, name, data).unwrap();
        }
        b.into_inner().unwrap();
        let mut seen = Vec::new();
        scan_shard(
            &path,
            |s| {
                seen.push(s);
                Ok(())
            },
            |i| panic!("{i:?}"),
        )
        .unwrap();
        assert_eq!(seen.len(), 2);
        assert_eq!((seen[0].offset, seen[0].length), (0, 1024));
        // GNU long-name entry: header + name block, then the real header + data.
        assert_eq!(seen[1].offset, 1024);
        assert_eq!(seen[1].length, 4 * 512);
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(
            &bytes[1024 + 156],
            &b'L',
            "the sample must start at the long-name header"
        );
    }
}
