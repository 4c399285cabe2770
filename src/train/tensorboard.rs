//! A small TensorBoard event-file writer for scalar summaries (no TensorFlow, no
//! protobuf crate): `tfevents` files as TensorBoard reads them.
//!
//! * Framing (TFRecord): per record `u64` length (little-endian), masked CRC-32C of the
//!   8 length bytes, the data, masked CRC-32C of the data; mask =
//!   `((crc >> 15) | (crc << 17)) + 0xa282ead8` (wrapping).
//! * Data: a hand-encoded `tensorflow.Event` protobuf. The first event holds
//!   `file_version = "brain.Event:2"`; then [`EventWriter::session_start`] writes a
//!   `SessionLog { status: START }` at the step the run starts from, and
//!   [`EventWriter::add_scalars`] one event per step whose `Summary` holds one
//!   `Value { tag, simple_value }` per scalar.
//!
//! The `SessionLog START` is what TensorFlow writes when a run restarts: TensorBoard
//! then drops the points of older files at or after that step, so a resumed run (a new
//! event file in the same directory) reads like one run. Readers that ignore it show
//! the overlapping steps twice, which is harmless.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};

/// The file version TensorBoard expects in the first event.
pub const FILE_VERSION: &str = "brain.Event:2";

/// `SessionLog.SessionStatus.START`.
const SESSION_START: u64 = 1;

/// The CRC-32C of `data`, masked as TFRecord stores it.
pub fn masked_crc32c(data: &[u8]) -> u32 {
    let crc = crc32c::crc32c(data);
    // `(crc >> 15) | (crc << 17)` on a u32 is a rotation.
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// Appends one TFRecord (length, its CRC, data, its CRC) to `out`.
pub fn frame_record(data: &[u8], out: &mut Vec<u8>) {
    let len = (data.len() as u64).to_le_bytes();
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc32c(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc32c(data).to_le_bytes());
}

// --- protobuf encoding (the few wire types the Event message needs) ---

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Field key: `(field << 3) | wire type` (0 varint, 1 fixed64, 2 length-delimited,
/// 5 fixed32).
fn put_key(out: &mut Vec<u8>, field: u32, wire: u8) {
    put_varint(out, (u64::from(field) << 3) | u64::from(wire));
}

fn put_bytes(out: &mut Vec<u8>, field: u32, data: &[u8]) {
    put_key(out, field, 2);
    put_varint(out, data.len() as u64);
    out.extend_from_slice(data);
}

/// `Event { wall_time: 1 (double), step: 2 (int64) }` followed by the caller's payload
/// field.
fn event_head(wall_time: f64, step: u64) -> Vec<u8> {
    let mut e = Vec::with_capacity(64);
    put_key(&mut e, 1, 1);
    e.extend_from_slice(&wall_time.to_le_bytes());
    if step != 0 {
        put_key(&mut e, 2, 0);
        put_varint(&mut e, step);
    }
    e
}

/// `Summary { value: 1 (repeated Value { tag: 1 (string), simple_value: 2 (float) }) }`.
fn summary(values: &[(&str, f64)]) -> Vec<u8> {
    let mut s = Vec::with_capacity(values.len() * 32);
    for (tag, v) in values {
        let mut val = Vec::with_capacity(tag.len() + 8);
        put_bytes(&mut val, 1, tag.as_bytes());
        put_key(&mut val, 2, 5);
        val.extend_from_slice(&(*v as f32).to_le_bytes());
        put_bytes(&mut s, 1, &val);
    }
    s
}

/// The encoded `Event` of scalars at `step` (`summary` is field 5).
pub fn scalars_event(wall_time: f64, step: u64, values: &[(&str, f64)]) -> Vec<u8> {
    let mut e = event_head(wall_time, step);
    put_bytes(&mut e, 5, &summary(values));
    e
}

/// The encoded `Event { wall_time, step, session_log: 7 { status: 1 (START) } }`.
pub fn session_start_event(wall_time: f64, step: u64) -> Vec<u8> {
    let mut e = event_head(wall_time, step);
    let mut log = Vec::new();
    put_key(&mut log, 1, 0);
    put_varint(&mut log, SESSION_START);
    put_bytes(&mut e, 7, &log);
    e
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// This machine's name for the file name (only `[A-Za-z0-9._-]`).
fn hostname() -> String {
    let raw = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_default();
    let h: String = raw
        .trim()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        .collect();
    if h.is_empty() { "localhost".into() } else { h }
}

/// Writes one event file.
pub struct EventWriter {
    path: PathBuf,
    file: BufWriter<File>,
    buf: Vec<u8>,
}

impl EventWriter {
    /// Creates `dir` and a new `dir/events.out.tfevents.<secs>.<host>` in it (with a
    /// `.N` suffix when that name exists already), and writes the file-version event.
    pub fn create(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let wall = now();
        let base = format!("events.out.tfevents.{}.{}", wall as u64, hostname());
        let mut n = 0u32;
        let (path, file) = loop {
            let name = if n == 0 {
                base.clone()
            } else {
                format!("{base}.{n}")
            };
            let path = dir.join(name);
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
            {
                Ok(f) => break (path, f),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && n < 1000 => n += 1,
                Err(e) => return Err(e).with_context(|| format!("creating {}", path.display())),
            }
        };
        let mut w = EventWriter {
            path,
            file: BufWriter::new(file),
            buf: Vec::new(),
        };
        let mut e = event_head(wall, 0);
        put_bytes(&mut e, 3, FILE_VERSION.as_bytes());
        w.write_event(&e)?;
        Ok(w)
    }

    /// The file being written.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn write_event(&mut self, event: &[u8]) -> Result<()> {
        self.buf.clear();
        frame_record(event, &mut self.buf);
        self.file
            .write_all(&self.buf)
            .with_context(|| format!("writing {}", self.path.display()))
    }

    /// A `SessionLog START` at `step` (see [`session_start_event`]): the run (re)starts
    /// there; TensorBoard drops older files' points at steps >= `step`.
    pub fn session_start(&mut self, step: u64) -> Result<()> {
        let e = session_start_event(now(), step);
        self.write_event(&e)
    }

    /// One event at `step` with these `(tag, value)` scalars (stored as f32).
    pub fn add_scalars(&mut self, step: u64, values: &[(&str, f64)]) -> Result<()> {
        let e = scalars_event(now(), step, values);
        self.write_event(&e)
    }

    /// One scalar at `step`.
    pub fn add_scalar(&mut self, tag: &str, value: f64, step: u64) -> Result<()> {
        self.add_scalars(step, &[(tag, value)])
    }

    /// Hands the buffered events to the OS.
    pub fn flush(&mut self) -> Result<()> {
        self.file
            .flush()
            .with_context(|| format!("writing {}", self.path.display()))
    }
}

/// A reader for the tests: the records, the CRCs checked, and the fields the writer
/// writes.
#[cfg(test)]
pub(crate) mod read {
    use super::masked_crc32c;

    /// One decoded `Event`.
    #[derive(Debug, Clone, Default, PartialEq)]
    pub struct Event {
        pub wall_time: f64,
        pub step: u64,
        pub file_version: Option<String>,
        /// `(tag, simple_value)`.
        pub scalars: Vec<(String, f32)>,
        pub session_status: Option<u64>,
    }

    fn varint(b: &[u8], i: &mut usize) -> u64 {
        let (mut v, mut shift) = (0u64, 0);
        loop {
            let byte = b[*i];
            *i += 1;
            v |= u64::from(byte & 0x7f) << shift;
            if byte < 0x80 {
                return v;
            }
            shift += 7;
        }
    }

    /// `(field, wire, payload)` of each field of a message (fixed64/32 payloads as
    /// their bytes, varints as their value's LE bytes).
    fn fields(b: &[u8]) -> Vec<(u64, u8, Vec<u8>)> {
        let mut out = Vec::new();
        let mut i = 0;
        while i < b.len() {
            let key = varint(b, &mut i);
            let (field, wire) = (key >> 3, (key & 7) as u8);
            let payload = match wire {
                0 => varint(b, &mut i).to_le_bytes().to_vec(),
                1 => {
                    i += 8;
                    b[i - 8..i].to_vec()
                }
                2 => {
                    let n = varint(b, &mut i) as usize;
                    i += n;
                    b[i - n..i].to_vec()
                }
                5 => {
                    i += 4;
                    b[i - 4..i].to_vec()
                }
                w => panic!("unexpected wire type {w}"),
            };
            out.push((field, wire, payload));
        }
        out
    }

    fn u64_of(p: &[u8]) -> u64 {
        u64::from_le_bytes(p.try_into().unwrap())
    }

    pub fn event(b: &[u8]) -> Event {
        let mut e = Event::default();
        for (f, w, p) in fields(b) {
            match (f, w) {
                (1, 1) => e.wall_time = f64::from_le_bytes(p[..].try_into().unwrap()),
                (2, 0) => e.step = u64_of(&p),
                (3, 2) => e.file_version = Some(String::from_utf8(p).unwrap()),
                (5, 2) => {
                    for (vf, vw, v) in fields(&p) {
                        assert_eq!((vf, vw), (1, 2), "Summary.value");
                        let (mut tag, mut val) = (None, None);
                        for (g, gw, q) in fields(&v) {
                            match (g, gw) {
                                (1, 2) => tag = Some(String::from_utf8(q).unwrap()),
                                (2, 5) => val = Some(f32::from_le_bytes(q[..].try_into().unwrap())),
                                other => panic!("unexpected Value field {other:?}"),
                            }
                        }
                        e.scalars.push((tag.unwrap(), val.unwrap()));
                    }
                }
                (7, 2) => {
                    for (g, gw, q) in fields(&p) {
                        if (g, gw) == (1, 0) {
                            e.session_status = Some(u64_of(&q));
                        }
                    }
                }
                other => panic!("unexpected Event field {other:?}"),
            }
        }
        e
    }

    /// The records of a TFRecord file, every CRC checked (panics on a mismatch).
    pub fn records(bytes: &[u8]) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let mut i = 0;
        while i < bytes.len() {
            let len_bytes = &bytes[i..i + 8];
            let len = u64::from_le_bytes(len_bytes.try_into().unwrap()) as usize;
            let crc = u32::from_le_bytes(bytes[i + 8..i + 12].try_into().unwrap());
            assert_eq!(
                crc,
                masked_crc32c(len_bytes),
                "length CRC of the record at {i}"
            );
            let data = &bytes[i + 12..i + 12 + len];
            let crc = u32::from_le_bytes(bytes[i + 12 + len..i + 16 + len].try_into().unwrap());
            assert_eq!(crc, masked_crc32c(data), "data CRC of the record at {i}");
            out.push(data.to_vec());
            i += 16 + len;
        }
        out
    }

    /// The events of the file at `path`.
    pub fn events(path: &std::path::Path) -> Vec<Event> {
        records(&std::fs::read(path).unwrap())
            .iter()
            .map(|r| event(r))
            .collect()
    }

    /// The `events.out.tfevents.*` files in `dir`, by name.
    pub fn event_files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
        let mut v: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("events.out.tfevents."))
            })
            .collect();
        v.sort();
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_and_framing_match_tensorflow() {
        assert_eq!(crc32c::crc32c(b"123456789"), 0xe306_9283);
        // A record as TensorFlow frames it: the length's and the data's masked CRCs.
        let mut out = Vec::new();
        frame_record(b"abc", &mut out);
        assert_eq!(out.len(), 8 + 4 + 3 + 4);
        assert_eq!(&out[..8], &3u64.to_le_bytes());
        let crc = crc32c::crc32c(&3u64.to_le_bytes());
        // The mask as TensorFlow writes it, in 64 bits and truncated.
        let c = u64::from(crc);
        let masked = (((c >> 15) | (c << 17)) as u32).wrapping_add(0xa282_ead8);
        assert_eq!(&out[8..12], &masked.to_le_bytes());
        assert_eq!(&out[12..15], b"abc");
        assert_eq!(read::records(&out), vec![b"abc".to_vec()]);
        // Protobuf varints.
        let mut v = Vec::new();
        put_varint(&mut v, 300);
        assert_eq!(v, [0xac, 0x02]);
        // Event { wall_time: 1.0, step: 5, summary { value { tag: "a", simple_value: 2.0 } } }
        let e = scalars_event(1.0, 5, &[("a", 2.0)]);
        let mut want = vec![0x09];
        want.extend_from_slice(&1.0f64.to_le_bytes());
        want.extend_from_slice(&[0x10, 5, 0x2a, 10, 0x0a, 8, 0x0a, 1, b'a', 0x15]);
        want.extend_from_slice(&2.0f32.to_le_bytes());
        assert_eq!(e, want);
        // Event { wall_time: 1.0, step: 4, session_log { status: START } }
        let mut want = vec![0x09];
        want.extend_from_slice(&1.0f64.to_le_bytes());
        want.extend_from_slice(&[0x10, 4, 0x3a, 2, 0x08, 1]);
        assert_eq!(session_start_event(1.0, 4), want);
    }

    #[test]
    fn writes_scalars_that_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let tb = dir.path().join("tb");
        let mut w = EventWriter::create(&tb).unwrap();
        w.session_start(0).unwrap();
        for step in 1..=3u64 {
            w.add_scalars(
                step,
                &[
                    ("train/loss", 1.0 / step as f64),
                    ("train/lr", 1e-4 * step as f64),
                ],
            )
            .unwrap();
        }
        w.add_scalar("train/gpu_mem_bytes", 3.0e9, 3).unwrap();
        w.flush().unwrap();
        // A second writer in the same second gets its own file.
        let mut w2 = EventWriter::create(&tb).unwrap();
        w2.session_start(2).unwrap();
        w2.flush().unwrap();
        assert_ne!(w.path(), w2.path());
        let name = w.path().file_name().unwrap().to_str().unwrap().to_owned();
        assert!(name.starts_with("events.out.tfevents."), "{name}");
        assert_eq!(read::event_files(&tb).len(), 2);

        let ev = read::events(w.path());
        assert_eq!(ev.len(), 6);
        assert_eq!(ev[0].file_version.as_deref(), Some(FILE_VERSION));
        assert!(ev[0].wall_time > 1.6e9);
        assert_eq!((ev[1].step, ev[1].session_status), (0, Some(1)));
        for (i, e) in ev[2..5].iter().enumerate() {
            let step = i as u64 + 1;
            assert_eq!(e.step, step);
            assert_eq!(
                e.scalars,
                vec![
                    ("train/loss".to_owned(), (1.0 / step as f64) as f32),
                    ("train/lr".to_owned(), (1e-4 * step as f64) as f32),
                ]
            );
            assert!(e.wall_time >= ev[0].wall_time);
        }
        assert_eq!(
            ev[5].scalars,
            vec![("train/gpu_mem_bytes".to_owned(), 3.0e9f32)]
        );
        let ev2 = read::events(w2.path());
        assert_eq!((ev2[1].step, ev2[1].session_status), (2, Some(1)));

        // TensorBoard itself, where the Python environment has it (optional).
        let Ok(py) = std::env::var("CONMIM_PYTHON") else {
            eprintln!("NOTICE: CONMIM_PYTHON unset; TensorBoard check skipped");
            return;
        };
        let has_tb = std::process::Command::new(&py)
            .args(["-c", "import tensorboard"])
            .output()
            .is_ok_and(|o| o.status.success());
        if !has_tb {
            eprintln!("NOTICE: no `tensorboard` in {py}; TensorBoard check skipped");
            return;
        }
        let script = "import sys\n\
            from tensorboard.backend.event_processing.event_accumulator import EventAccumulator\n\
            ea = EventAccumulator(sys.argv[1]); ea.Reload()\n\
            print(sorted(ea.Tags()['scalars']))\n\
            print([(s.step, round(s.value, 6)) for s in ea.Scalars('train/loss')])\n";
        let o = std::process::Command::new(&py)
            .args(["-c", script, w.path().to_str().unwrap()])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let text = String::from_utf8(o.stdout).unwrap();
        assert_eq!(
            text,
            "['train/gpu_mem_bytes', 'train/loss', 'train/lr']\n\
             [(1, 1.0), (2, 0.5), (3, 0.333333)]\n",
        );
    }
}
