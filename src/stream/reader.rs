//! Reading raw samples from one shard, streaming from any [`Read`].
//!
//! [`TarReader`] is a small, allocation-bounded ustar/pax/GNU tar parser that never
//! seeks, so it works the same on a file, a pipe or (later) an HTTP body.
//! [`ShardSamples`] groups its members WebDataset-style (consecutive members sharing
//! a key, see [`crate::format::split_member_name`]) into [`RawSample`]s.
//!
//! Damage: when the archive is cut short or a header is corrupt, the samples that were
//! complete *before* the damage have been yielded, the sample being assembled is
//! dropped unless the damaged member's intact header already names another key (then
//! it is known complete and yielded), one `Err` is yielded and the iterator ends.
//! An archive without its end-of-archive marker counts as truncated, so a shard cut
//! exactly at a sample boundary loses its last (possibly incomplete) sample too.

use std::io::{self, Read};

use crate::error::{Error, Result};
use crate::format::split_member_name;

/// Largest member we accept; a bigger size field means a corrupt header.
pub const MAX_MEMBER_BYTES: u64 = 1 << 32;
/// Largest GNU long name / pax header we accept.
pub const MAX_META_BYTES: u64 = 1 << 20;

const BLOCK: usize = 512;
/// Largest buffer reserved from a member header's claimed size before any byte arrives.
const MAX_PREALLOC: u64 = 64 << 20;

/// One sample as stored in a shard: a key and its members, in stored order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawSample {
    /// WebDataset key (member name up to the first dot of the basename).
    pub key: String,
    /// `(extension, bytes)` in stored order; extensions are lowercased.
    pub members: Vec<(String, Vec<u8>)>,
    /// URL of the shard it came from.
    pub shard: String,
    /// Position of the sample in its shard (0-based).
    pub index_in_shard: u64,
}

impl RawSample {
    /// The bytes of the member with extension `ext`, if any.
    pub fn member(&self, ext: &str) -> Option<&[u8]> {
        self.members
            .iter()
            .find(|(e, _)| e == ext)
            .map(|(_, d)| d.as_slice())
    }
}

/// A regular-file member of a tar archive.
#[derive(Debug, Clone)]
pub struct TarEntry {
    /// Full member name (long names resolved).
    pub name: String,
    /// Offset of the member's first header block (pax / long-name headers included).
    pub offset: u64,
    /// The member's bytes.
    pub data: Vec<u8>,
}

/// Damage found while parsing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TarDamage {
    /// What is wrong, and where.
    pub message: String,
    /// The regular member whose header was read intact but whose data is damaged.
    pub member: Option<String>,
}

/// Streaming tar parser over a [`Read`]. Regular files are returned; directories,
/// links and other special members are skipped; pax `path`/`size` records and GNU
/// long names apply to the next member.
pub struct TarReader<R> {
    r: R,
    pos: u64,
    ended: bool,
}

impl<R: Read> TarReader<R> {
    /// A parser reading from `r` (wrap files in a `BufReader`).
    pub fn new(r: R) -> Self {
        TarReader {
            r,
            pos: 0,
            ended: false,
        }
    }

    /// Bytes consumed so far.
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// The next regular member; `Ok(None)` at the end-of-archive marker; `Err` with a
    /// description of the damage otherwise (truncation, bad checksum, bad size).
    pub fn next_entry(&mut self) -> std::result::Result<Option<TarEntry>, TarDamage> {
        let mut current = None;
        self.next_inner(&mut current).map_err(|message| TarDamage {
            message,
            member: current,
        })
    }

    fn next_inner(
        &mut self,
        current: &mut Option<String>,
    ) -> std::result::Result<Option<TarEntry>, String> {
        if self.ended {
            return Ok(None);
        }
        let mut long_name: Option<String> = None;
        let mut pax_path: Option<String> = None;
        let mut pax_size: Option<u64> = None;
        let mut first_header: Option<u64> = None;
        loop {
            let start = self.pos;
            let mut h = [0u8; BLOCK];
            let n = read_full(&mut self.r, &mut h).map_err(|e| format!("byte {start}: {e}"))?;
            if n == 0 {
                return Err(format!(
                    "ends at byte {start} without the end-of-archive marker (truncated?)"
                ));
            }
            if n < BLOCK {
                return Err(format!("truncated inside the header at byte {start}"));
            }
            self.pos += BLOCK as u64;
            if h.iter().all(|&b| b == 0) {
                if long_name.is_some() || pax_path.is_some() || pax_size.is_some() {
                    return Err(format!(
                        "end-of-archive marker at byte {start} right after an extended header"
                    ));
                }
                self.ended = true;
                return Ok(None);
            }
            check_checksum(&h).map_err(|m| format!("header at byte {start}: {m}"))?;
            let size = match pax_size.take() {
                Some(s) => s,
                None => parse_size(&h[124..136])
                    .map_err(|m| format!("header at byte {start}: size: {m}"))?,
            };
            let header_name = header_name(&h);
            let typ = h[156];
            // A size near u64::MAX (base-256 or PAX) cannot be padded: damage, not a
            // panic (the limits below would reject it anyway).
            let padded = size
                .div_ceil(BLOCK as u64)
                .checked_mul(BLOCK as u64)
                .ok_or_else(|| format!("header at byte {start}: size {size} is not a tar size"))?;
            match typ {
                b'L' | b'x' | b'g' => {
                    if size > MAX_META_BYTES {
                        return Err(format!(
                            "extended header at byte {start} claims {size} bytes"
                        ));
                    }
                    let data = self.read_data(size, padded, &header_name)?;
                    first_header.get_or_insert(start);
                    match typ {
                        b'L' => long_name = Some(cstr(&data)),
                        b'x' => parse_pax(&data, &mut pax_path, &mut pax_size)
                            .map_err(|m| format!("pax header at byte {start}: {m}"))?,
                        _ => {}
                    }
                }
                b'0' | 0 | b'7' => {
                    if size > MAX_MEMBER_BYTES {
                        return Err(format!(
                            "member {header_name} at byte {start} claims {size} bytes"
                        ));
                    }
                    let name = long_name.or(pax_path).unwrap_or(header_name);
                    *current = Some(name.clone());
                    let data = self.read_data(size, padded, &name)?;
                    return Ok(Some(TarEntry {
                        name,
                        offset: first_header.unwrap_or(start),
                        data,
                    }));
                }
                _ => {
                    // Directory, link, device...: skip its data (normally none).
                    if size > MAX_MEMBER_BYTES {
                        return Err(format!(
                            "member {header_name} at byte {start} claims {size} bytes"
                        ));
                    }
                    self.skip(padded, &header_name)?;
                    long_name = None;
                    pax_path = None;
                    pax_size = None;
                    first_header = None;
                }
            }
        }
    }

    fn read_data(
        &mut self,
        size: u64,
        padded: u64,
        name: &str,
    ) -> std::result::Result<Vec<u8>, String> {
        // Sized up front: growing from empty reallocates and copies the bytes several
        // times (3.6 % of a 2-thread loader's CPU went to those copies). The header's
        // size is not trusted beyond a cap; larger members still grow as they arrive.
        let mut data = Vec::with_capacity(size.min(MAX_PREALLOC) as usize);
        (&mut self.r)
            .take(size)
            .read_to_end(&mut data)
            .map_err(|e| format!("member {name}: {e}"))?;
        self.pos += data.len() as u64;
        if (data.len() as u64) < size {
            return Err(format!(
                "truncated inside member {name} ({} of {size} bytes)",
                data.len()
            ));
        }
        self.skip(padded - size, name)?;
        Ok(data)
    }

    fn skip(&mut self, n: u64, name: &str) -> std::result::Result<(), String> {
        let copied = io::copy(&mut (&mut self.r).take(n), &mut io::sink())
            .map_err(|e| format!("member {name}: {e}"))?;
        self.pos += copied;
        if copied < n {
            return Err(format!("truncated inside member {name}"));
        }
        Ok(())
    }
}

/// Reads until `buf` is full or EOF; returns the bytes read.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

fn cstr(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

fn header_name(h: &[u8; BLOCK]) -> String {
    let name = cstr(&h[..100]);
    if &h[257..262] == b"ustar" {
        let prefix = cstr(&h[345..500]);
        if !prefix.is_empty() {
            return format!("{prefix}/{name}");
        }
    }
    name
}

fn parse_octal(field: &[u8]) -> std::result::Result<u64, String> {
    let s: &[u8] = {
        let end = field.iter().position(|&c| c == 0).unwrap_or(field.len());
        &field[..end]
    };
    let t = std::str::from_utf8(s)
        .map_err(|_| "not ASCII".to_owned())?
        .trim();
    if t.is_empty() {
        return Ok(0);
    }
    u64::from_str_radix(t, 8).map_err(|_| format!("bad octal `{t}`"))
}

fn parse_size(field: &[u8]) -> std::result::Result<u64, String> {
    if field[0] & 0x80 != 0 {
        // GNU base-256: big-endian, high bit of the first byte is the marker.
        let mut v: u64 = (field[0] & 0x7f) as u64;
        for &b in &field[1..] {
            v = v
                .checked_mul(256)
                .and_then(|v| v.checked_add(b as u64))
                .ok_or("base-256 size overflows")?;
        }
        return Ok(v);
    }
    parse_octal(field)
}

fn check_checksum(h: &[u8; BLOCK]) -> std::result::Result<(), String> {
    let stored = parse_octal(&h[148..156]).map_err(|m| format!("checksum: {m}"))?;
    let mut unsigned: u64 = 0;
    let mut signed: i64 = 0;
    for (i, &b) in h.iter().enumerate() {
        let b = if (148..156).contains(&i) { b' ' } else { b };
        unsigned += b as u64;
        signed += b as i8 as i64;
    }
    if stored == unsigned || stored as i64 == signed {
        Ok(())
    } else {
        Err(format!(
            "bad checksum (stored {stored}, computed {unsigned})"
        ))
    }
}

/// Parses pax records `"<len> <key>=<value>\n"`, keeping `path` and `size`.
fn parse_pax(
    data: &[u8],
    path: &mut Option<String>,
    size: &mut Option<u64>,
) -> std::result::Result<(), String> {
    let mut rest = data;
    while !rest.is_empty() && rest[0] != 0 {
        let sp = rest
            .iter()
            .position(|&c| c == b' ')
            .ok_or("record without a length")?;
        let len: usize = std::str::from_utf8(&rest[..sp])
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or("bad record length")?;
        if len <= sp + 1 || len > rest.len() {
            return Err("record length out of range".into());
        }
        let rec = &rest[sp + 1..len];
        let rec = rec.strip_suffix(b"\n").unwrap_or(rec);
        if let Some(eq) = rec.iter().position(|&c| c == b'=') {
            let (k, v) = (&rec[..eq], &rec[eq + 1..]);
            match k {
                b"path" => *path = Some(String::from_utf8_lossy(v).into_owned()),
                b"size" => {
                    *size = Some(
                        std::str::from_utf8(v)
                            .ok()
                            .and_then(|s| s.parse().ok())
                            .ok_or("bad size record")?,
                    )
                }
                _ => {}
            }
        }
        rest = &rest[len..];
    }
    Ok(())
}

/// The samples of one shard, in stored order, from any reader. Yields `Ok` samples,
/// then at most one `Err` ([`Error::CorruptShard`]) after which it ends (see the module
/// docs for what is kept). Members whose name has no extension are skipped and
/// counted in [`ShardSamples::skipped_members`].
pub struct ShardSamples {
    tar: TarReader<Box<dyn Read + Send>>,
    shard: String,
    pending: Option<RawSample>,
    next_index: u64,
    skipped: u64,
    error: Option<Error>,
    done: bool,
    expected: Option<u64>,
}

impl ShardSamples {
    /// Samples of the shard `url`, read from `reader`.
    pub fn new(url: &str, reader: Box<dyn Read + Send>) -> Self {
        ShardSamples {
            tar: TarReader::new(reader),
            shard: url.to_owned(),
            pending: None,
            next_index: 0,
            skipped: 0,
            error: None,
            done: false,
            expected: None,
        }
    }

    /// Expects `n` samples (the manifest's count; `None`: unknown): a shard that ends
    /// cleanly with fewer (a tail of zeros, which reads as the end of the archive, or a
    /// manifest of other shards) reports that as damage after its last sample, instead
    /// of ending short in silence; one that holds more yields `n` and reports the rest
    /// as damage.
    pub fn expecting(mut self, n: Option<u64>) -> Self {
        self.expected = n;
        self
    }

    /// The shard's URL.
    pub fn url(&self) -> &str {
        &self.shard
    }

    /// Members skipped because their name has no extension.
    pub fn skipped_members(&self) -> u64 {
        self.skipped
    }
}

impl Iterator for ShardSamples {
    type Item = Result<RawSample>;

    fn next(&mut self) -> Option<Self::Item> {
        if let Some(err) = self.error.take() {
            self.done = true;
            return Some(Err(err));
        }
        if self.done {
            return None;
        }
        loop {
            match self.tar.next_entry() {
                Ok(Some(entry)) => {
                    let Some((key, ext)) = split_member_name(&entry.name) else {
                        self.skipped += 1;
                        continue;
                    };
                    if let Some(p) = self.pending.as_mut()
                        && p.key == key
                    {
                        p.members.push((ext, entry.data));
                        continue;
                    }
                    if let Some(n) = self.expected.filter(|&n| self.next_index >= n) {
                        // More samples than the manifest lists: the manifest is of other
                        // shards. The listed ones are yielded, the rest is damage (so
                        // the epoch's counts, and a resume's replay, hold).
                        self.done = true;
                        let long = Error::CorruptShard {
                            shard: self.shard.clone(),
                            message: format!(
                                "the archive holds more than the {n} samples the manifest \
                                 lists (a manifest of other shards?); sample `{key}` and \
                                 those after it are left out"
                            ),
                        };
                        return match self.pending.take() {
                            Some(last) => {
                                self.error = Some(long);
                                Some(Ok(last))
                            }
                            None => Some(Err(long)),
                        };
                    }
                    let fresh = RawSample {
                        key: key.to_owned(),
                        members: vec![(ext, entry.data)],
                        shard: self.shard.clone(),
                        index_in_shard: self.next_index,
                    };
                    self.next_index += 1;
                    if let Some(done) = self.pending.replace(fresh) {
                        return Some(Ok(done));
                    }
                }
                Ok(None) => {
                    self.done = true;
                    if let Some(n) = self.expected.filter(|&n| self.next_index < n) {
                        let short = Error::CorruptShard {
                            shard: self.shard.clone(),
                            message: format!(
                                "the archive ends after {} of the {n} samples the manifest \
                                 lists (a zero-filled tail, or a manifest of other shards)",
                                self.next_index
                            ),
                        };
                        return match self.pending.take() {
                            Some(last) => {
                                self.error = Some(short);
                                Some(Ok(last))
                            }
                            None => Some(Err(short)),
                        };
                    }
                    return self.pending.take().map(Ok);
                }
                Err(damage) => {
                    self.done = true;
                    let err = Error::CorruptShard {
                        shard: self.shard.clone(),
                        message: damage.message,
                    };
                    // The pending sample is complete when the damaged member's intact
                    // header already names another key.
                    let next_key = damage
                        .member
                        .as_deref()
                        .and_then(split_member_name)
                        .map(|(k, _)| k.to_owned());
                    match self.pending.take() {
                        Some(p) if next_key.is_some_and(|k| k != p.key) => {
                            self.error = Some(err);
                            self.done = false;
                            return Some(Ok(p));
                        }
                        _ => return Some(Err(err)),
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn archive(members: &[(&str, &[u8])]) -> Vec<u8> {
        let mut b = ::tar::Builder::new(Vec::new());
        for (name, data) in members {
            let mut h = ::tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_entry_type(::tar::EntryType::Regular);
            b.append_data(&mut h, name, *data).unwrap();
        }
        b.into_inner().unwrap()
    }

    fn samples(bytes: Vec<u8>) -> Vec<Result<RawSample>> {
        ShardSamples::new("s", Box::new(io::Cursor::new(bytes))).collect()
    }

    #[test]
    fn groups_members_and_handles_long_names() {
        let long = format!("{}/k2.jpg", "d".repeat(150));
        let bytes = archive(&[
            ("k1.jpg", b"a"),
            ("k1.cls", b"3"),
            (&long, b"bb"),
            ("noext", b"x"),
        ]);
        let got: Vec<RawSample> = samples(bytes).into_iter().map(|r| r.unwrap()).collect();
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].key, "k1");
        assert_eq!(got[0].member("cls"), Some(&b"3"[..]));
        assert_eq!(got[1].key, format!("{}/k2", "d".repeat(150)));
        assert_eq!(got[1].index_in_shard, 1);
    }

    #[test]
    fn truncation_and_garbage_are_reported() {
        let bytes = archive(&[("a.x", &[1; 600]), ("b.x", &[2; 600]), ("c.x", &[3; 10])]);
        for cut in [0usize, 100, 512, 1600, 2200, bytes.len() - 1024] {
            let got = samples(bytes[..cut].to_vec());
            let ok = got.iter().filter(|r| r.is_ok()).count();
            assert!(got.last().unwrap().is_err(), "cut {cut}");
            assert_eq!(ok + 1, got.len());
            assert!(ok <= 2);
        }
        // Cut inside b's data: a is known complete (b's header names another key).
        let got = samples(bytes[..2200].to_vec());
        assert_eq!(got[0].as_ref().unwrap().key, "a");
        assert!(got[1].is_err());
        let mut bad = bytes.clone();
        bad[1536 + 10] ^= 0xff; // inside the second header's name
        let got = samples(bad);
        assert_eq!(got.len(), 1);
        assert!(got[0].is_err());
        assert!(samples(vec![7u8; 4096])[0].is_err());
    }

    /// A shard that ends cleanly short of the manifest's count (its tail zeroed: two
    /// zero blocks read as the end of the archive) yields what it has, then damage; one
    /// that holds more yields the count, then damage.
    #[test]
    fn a_shard_shorter_than_its_manifest_count_is_damage() {
        let bytes = archive(&[("a.x", b"1"), ("b.x", b"2"), ("c.x", b"3")]);
        let mut zeroed = bytes.clone();
        zeroed[2 * 2 * BLOCK..].fill(0); // c's header and data onwards
        let read = |b: Vec<u8>, n: Option<u64>| -> Vec<Result<RawSample>> {
            ShardSamples::new("s", Box::new(io::Cursor::new(b)))
                .expecting(n)
                .collect()
        };
        let got = read(zeroed.clone(), Some(3));
        assert_eq!(got.len(), 3);
        assert_eq!(got[1].as_ref().unwrap().key, "b");
        let e = got[2].as_ref().unwrap_err().to_string();
        assert!(e.contains("after 2 of the 3 samples"), "{e}");
        // Unknown counts, or the right count: a clean end.
        assert!(read(zeroed, None).iter().all(|r| r.is_ok()));
        assert!(read(bytes.clone(), Some(3)).iter().all(|r| r.is_ok()));
        // More than the count: the listed samples, then damage naming the first extra.
        let got = read(bytes.clone(), Some(2));
        assert_eq!(got.len(), 3);
        assert_eq!(got[1].as_ref().unwrap().key, "b");
        let e = got[2].as_ref().unwrap_err().to_string();
        assert!(
            e.contains("more than the 2 samples") && e.contains("`c`"),
            "{e}"
        );
        let got = read(bytes, Some(0));
        assert_eq!(got.len(), 1);
        assert!(got[0].is_err());
    }

    /// A size field of `u64::MAX` (GNU base-256, valid checksum) is damage reported
    /// with the shard, not an arithmetic overflow.
    #[test]
    fn an_absurd_size_is_damage() {
        let mut bytes = archive(&[("a.x", b"1")]);
        let h = &mut bytes[..BLOCK];
        h[124..136].copy_from_slice(&[
            0x80, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        ]);
        h[148..156].fill(b' ');
        let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
        h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
        let got = samples(bytes);
        assert_eq!(got.len(), 1);
        assert!(got[0].is_err(), "{:?}", got[0].as_ref().map(|s| &s.key));
    }
}
