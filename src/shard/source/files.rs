//! A list of image files with optional columns (YFCC15M, CC3M/12M-style lists,
//! anything with one image per row), relative to `--root`.
//!
//! # List formats
//!
//! * **tsv** (`.tsv`, `.txt`): tab-separated, **first line is a header row** naming the
//!   columns; no quoting (a field cannot hold a tab or a newline).
//! * **csv** (`.csv`): RFC 4180 comma-separated with `"` quoting, **first line is a
//!   header row**.
//! * **jsonl** (`.jsonl`, `.ndjson`): one JSON object per line; the columns the
//!   defaults are chosen from are the keys of the first valid object.
//! * **parquet** (`.parquet`, `.pq`): top-level columns of string, integer, float,
//!   boolean or dictionary-of-those type (other types are left out of the `json`
//!   member; uncompressed and snappy files are readable).
//!
//! The list is streamed, never held in memory: a 15M-row list costs one row at a time.
//!
//! # Columns
//!
//! Looked up case-insensitively; when not given, the first present of:
//!
//! | role    | candidates                                   |
//! |---------|----------------------------------------------|
//! | path    | `path`, `filepath`, `file`, `image`, `filename` |
//! | id      | `id`, `key`, `photoid`                       |
//! | label   | `label`, `class`                             |
//! | caption | `caption`, `title`, `description`, `text`    |
//!
//! Instead of a path column a **path template** builds the path from columns:
//! `{col}` is the column's value, `{col[a:b]}` a Python-like slice of its characters
//! (`a`, `b` may be omitted or negative), `{{`/`}}` are literal braces. YFCC:
//! `{id[0:3]}/{id[3:6]}/{id}.jpg`.
//!
//! # Samples
//!
//! Key: the sanitised id if there is an id column, else the sanitised file stem.
//! Members: the image (`jpg`, `png`, ... by content), `cls` (label), `txt` (caption),
//! `json` (`{"caption", "columns": {every column of the row}, "id", "label", "row"}`,
//! compact, keys sorted). Bad rows (no path, empty id, label that is not a
//! non-negative integer, malformed CSV/JSON line, wrong field count) become `bad_row`
//! rejects with source `row:N` (0-based data row); an empty label or caption counts as
//! absent.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Component, Path, PathBuf};

use arrow_array::cast::AsArray;
use arrow_array::types::{
    Float32Type, Float64Type, Int8Type, Int16Type, Int32Type, Int64Type, UInt8Type, UInt16Type,
    UInt32Type, UInt64Type,
};
use arrow_array::{Array, ArrayRef, RecordBatch};
use arrow_schema::DataType;
use parquet::arrow::ProjectionMask;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use serde_json::{Map, Value};

use super::{Entry, Item, LoadContext, Metadata, Sample, Source, image_row, load_image_file};
use crate::error::{Error, Result};
use crate::format::reject::Reject;
use crate::format::sanitize_key;

/// Default path column candidates, in order of preference.
pub const PATH_COLUMNS: &[&str] = &["path", "filepath", "file", "image", "filename"];
/// Default id column candidates.
pub const ID_COLUMNS: &[&str] = &["id", "key", "photoid"];
/// Default label column candidates.
pub const LABEL_COLUMNS: &[&str] = &["label", "class"];
/// Default caption column candidates.
pub const CAPTION_COLUMNS: &[&str] = &["caption", "title", "description", "text"];

/// Rough bytes per row of a text list, for [`Source::size_hint`].
const BYTES_PER_ROW: u64 = 100;
/// Rows per Parquet record batch while enumerating.
const PARQUET_BATCH: usize = 4096;
/// How many leading JSONL lines may be skipped looking for the first valid object.
const JSONL_HEAD_LINES: usize = 1000;

/// The syntax of a list file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListFormat {
    /// Tab-separated with a header row, no quoting.
    Tsv,
    /// Comma-separated with a header row and `"` quoting.
    Csv,
    /// One JSON object per line.
    Jsonl,
    /// Apache Parquet.
    Parquet,
}

impl ListFormat {
    /// The format's name (`tsv`, `csv`, `jsonl`, `parquet`).
    pub fn name(self) -> &'static str {
        match self {
            ListFormat::Tsv => "tsv",
            ListFormat::Csv => "csv",
            ListFormat::Jsonl => "jsonl",
            ListFormat::Parquet => "parquet",
        }
    }

    /// The format a file name implies, if its extension is known.
    pub fn from_path(path: &Path) -> Option<ListFormat> {
        let ext = path.extension()?.to_str()?.to_ascii_lowercase();
        Some(match ext.as_str() {
            "tsv" | "txt" => ListFormat::Tsv,
            "csv" => ListFormat::Csv,
            "jsonl" | "ndjson" => ListFormat::Jsonl,
            "parquet" | "pq" => ListFormat::Parquet,
            _ => return None,
        })
    }
}

impl std::fmt::Display for ListFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for ListFormat {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "tsv" | "txt" => Ok(ListFormat::Tsv),
            "csv" => Ok(ListFormat::Csv),
            "jsonl" | "ndjson" => Ok(ListFormat::Jsonl),
            "parquet" | "pq" => Ok(ListFormat::Parquet),
            _ => Err(format!("`{s}`: expected tsv, csv, jsonl or parquet")),
        }
    }
}

/// What the user asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FilesSpec {
    /// The list file.
    pub list: PathBuf,
    /// Folder the listed paths are relative to.
    pub root: PathBuf,
    /// List syntax; from the extension when `None`.
    pub format: Option<ListFormat>,
    /// Column holding the relative path.
    pub path_col: Option<String>,
    /// Template building the relative path from columns (instead of `path_col`).
    pub path_template: Option<String>,
    /// Column holding the sample id (the key).
    pub id_col: Option<String>,
    /// Column holding the integer class label.
    pub label_col: Option<String>,
    /// Column holding the caption.
    pub caption_col: Option<String>,
    /// Allow symlinks that leave the root.
    pub follow_symlinks: bool,
}

impl FilesSpec {
    /// A spec with defaults for everything but the list and root.
    pub fn new(list: impl Into<PathBuf>, root: impl Into<PathBuf>) -> Self {
        FilesSpec {
            list: list.into(),
            root: root.into(),
            format: None,
            path_col: None,
            path_template: None,
            id_col: None,
            label_col: None,
            caption_col: None,
            follow_symlinks: false,
        }
    }
}

/// One piece of a path template.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seg {
    Lit(String),
    Col {
        /// The column's actual name in the list.
        name: String,
        slice: Option<(Option<i64>, Option<i64>)>,
    },
}

/// A parsed `--path-template`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathTemplate {
    segs: Vec<Seg>,
}

impl PathTemplate {
    /// Parses `text`; column names are kept as written.
    pub fn parse(text: &str) -> std::result::Result<PathTemplate, String> {
        let mut segs = Vec::new();
        let mut lit = String::new();
        let mut chars = text.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '{' if chars.peek() == Some(&'{') => {
                    chars.next();
                    lit.push('{');
                }
                '}' if chars.peek() == Some(&'}') => {
                    chars.next();
                    lit.push('}');
                }
                '}' => return Err("unmatched `}` (write `}}` for a literal brace)".into()),
                '{' => {
                    let mut inner = String::new();
                    let mut closed = false;
                    for c in chars.by_ref() {
                        if c == '}' {
                            closed = true;
                            break;
                        }
                        inner.push(c);
                    }
                    if !closed {
                        return Err(format!("`{{{inner}` is not closed with `}}`"));
                    }
                    if !lit.is_empty() {
                        segs.push(Seg::Lit(std::mem::take(&mut lit)));
                    }
                    segs.push(parse_field(&inner)?);
                }
                c => lit.push(c),
            }
        }
        if !lit.is_empty() {
            segs.push(Seg::Lit(lit));
        }
        if !segs.iter().any(|s| matches!(s, Seg::Col { .. })) {
            return Err("uses no column; write e.g. `{id}.jpg`".into());
        }
        Ok(PathTemplate { segs })
    }

    /// Column names the template uses, as written.
    pub fn columns(&self) -> Vec<&str> {
        self.segs
            .iter()
            .filter_map(|s| match s {
                Seg::Col { name, .. } => Some(name.as_str()),
                Seg::Lit(_) => None,
            })
            .collect()
    }

    /// Renders the template; `value(col)` gives a column's text (`Err` names the problem).
    pub fn render(
        &self,
        mut value: impl FnMut(&str) -> std::result::Result<String, String>,
    ) -> std::result::Result<String, String> {
        let mut out = String::new();
        for s in &self.segs {
            match s {
                Seg::Lit(l) => out.push_str(l),
                Seg::Col { name, slice } => {
                    let v = value(name)?;
                    match slice {
                        None => out.push_str(&v),
                        Some((a, b)) => out.extend(slice_chars(&v, *a, *b)),
                    }
                }
            }
        }
        Ok(out)
    }
}

fn parse_field(inner: &str) -> std::result::Result<Seg, String> {
    let bad = || format!("`{{{inner}}}`: expected `{{column}}` or `{{column[a:b]}}`");
    let (name, slice) = match inner.find('[') {
        None => (inner, None),
        Some(i) => {
            let rest = &inner[i + 1..];
            let body = rest.strip_suffix(']').ok_or_else(bad)?;
            let (a, b) = body.split_once(':').ok_or_else(|| {
                format!("`{{{inner}}}`: only slices `[a:b]` are supported (a, b may be omitted)")
            })?;
            let num = |s: &str| -> std::result::Result<Option<i64>, String> {
                let s = s.trim();
                if s.is_empty() {
                    Ok(None)
                } else {
                    s.parse::<i64>()
                        .map(Some)
                        .map_err(|_| format!("`{{{inner}}}`: `{s}` is not an integer"))
                }
            };
            if b.contains(':') {
                return Err(format!("`{{{inner}}}`: slice steps are not supported"));
            }
            (&inner[..i], Some((num(a)?, num(b)?)))
        }
    };
    let name = name.trim();
    if name.is_empty() || name.contains(['{', '[', ']']) {
        return Err(bad());
    }
    Ok(Seg::Col {
        name: name.to_owned(),
        slice,
    })
}

/// Python's `s[a:b]` over characters.
fn slice_chars(s: &str, a: Option<i64>, b: Option<i64>) -> impl Iterator<Item = char> + '_ {
    let len = s.chars().count() as i64;
    let norm = |i: i64| if i < 0 { (i + len).max(0) } else { i.min(len) };
    let start = a.map_or(0, norm);
    let end = b.map_or(len, norm);
    s.chars()
        .skip(start as usize)
        .take((end - start).max(0) as usize)
}

/// The `files` source.
#[derive(Debug)]
pub struct Files {
    list: PathBuf,
    root: PathBuf,
    format: ListFormat,
    list_bytes: u64,
    parquet_rows: Option<u64>,
    /// Actual column names of each role.
    path_col: Option<String>,
    id_col: Option<String>,
    label_col: Option<String>,
    caption_col: Option<String>,
    template: Option<(String, PathTemplate)>,
    /// Parquet columns of types that cannot be shown as JSON scalars.
    skipped_cols: Vec<String>,
    follow_symlinks: bool,
}

/// Finds `want` among `names`, case-insensitively (exact match preferred).
fn find_col<'a>(names: &'a [String], want: &str) -> Option<&'a str> {
    names
        .iter()
        .find(|n| n.as_str() == want)
        .or_else(|| {
            names
                .iter()
                .find(|n| n.trim().eq_ignore_ascii_case(want.trim()))
        })
        .or_else(|| {
            let w = want.trim().to_lowercase();
            names.iter().find(|n| n.trim().to_lowercase() == w)
        })
        .map(|s| s.as_str())
}

fn scalar_type(dt: &DataType) -> bool {
    use DataType::*;
    match dt {
        Utf8 | LargeUtf8 | Utf8View | Boolean | Null => true,
        Int8 | Int16 | Int32 | Int64 | UInt8 | UInt16 | UInt32 | UInt64 => true,
        Float32 | Float64 => true,
        Dictionary(_, v) => scalar_type(v) && !matches!(**v, Dictionary(..)),
        _ => false,
    }
}

impl Files {
    /// Opens the list, reads its header and resolves columns and template.
    pub fn new(spec: FilesSpec) -> Result<Files> {
        let list = spec.list.clone();
        let meta = std::fs::metadata(&list).map_err(|e| Error::io(&list, e))?;
        if !meta.is_file() {
            return Err(Error::input(
                &list,
                "--list must be a file (tsv, csv, jsonl or parquet)",
            ));
        }
        if !spec.root.is_dir() {
            return Err(Error::input(
                &spec.root,
                "--root is not a directory; it must be the folder the listed paths are relative to",
            ));
        }
        let format = match spec.format {
            Some(f) => f,
            None => ListFormat::from_path(&list).ok_or_else(|| {
                Error::input(
                    &list,
                    "cannot tell the list format from the extension (.tsv/.txt, .csv, .jsonl/.ndjson, \
                     .parquet); pass --format tsv|csv|jsonl|parquet (compressed lists must be \
                     decompressed first)",
                )
            })?,
        };
        let mut parquet_rows = None;
        let mut skipped_cols = Vec::new();
        let names: Vec<String> = match format {
            ListFormat::Tsv | ListFormat::Csv => read_header(&list, format)?,
            ListFormat::Jsonl => jsonl_head_keys(&list)?,
            ListFormat::Parquet => {
                let (names, rows, skipped) = parquet_head(&list)?;
                parquet_rows = Some(rows);
                skipped_cols = skipped;
                names
            }
        };
        let shown = || {
            let mut s = names
                .iter()
                .take(30)
                .cloned()
                .collect::<Vec<_>>()
                .join(", ");
            if names.len() > 30 {
                s.push_str(", ...");
            }
            s
        };
        let resolve =
            |given: &Option<String>, defaults: &[&str], flag: &str| -> Result<Option<String>> {
                match given {
                    Some(g) => match find_col(&names, g) {
                        Some(n) if skipped_cols.iter().any(|s| s == n) => Err(Error::input(
                            &list,
                            format!("{flag} `{g}`: column type cannot be read as text or number"),
                        )),
                        Some(n) => Ok(Some(n.to_owned())),
                        None => Err(Error::input(
                            &list,
                            format!(
                                "{flag} `{g}`: no such column (columns: {}){}",
                                shown(),
                                header_hint(format)
                            ),
                        )),
                    },
                    None => Ok(defaults
                        .iter()
                        .filter_map(|d| find_col(&names, d))
                        .find(|n| !skipped_cols.iter().any(|s| s == n))
                        .map(str::to_owned)),
                }
            };
        let id_col = resolve(&spec.id_col, ID_COLUMNS, "--id-col")?;
        let label_col = resolve(&spec.label_col, LABEL_COLUMNS, "--label-col")?;
        let caption_col = resolve(&spec.caption_col, CAPTION_COLUMNS, "--caption-col")?;
        let (path_col, template) = match (&spec.path_template, &spec.path_col) {
            (Some(_), Some(_)) => {
                return Err(Error::Config(
                    "give either --path-col or --path-template, not both".into(),
                ));
            }
            (Some(t), None) => {
                let parsed = PathTemplate::parse(t)
                    .map_err(|m| Error::Config(format!("--path-template `{t}`: {m}")))?;
                let mut segs = parsed.segs.clone();
                for s in segs.iter_mut() {
                    if let Seg::Col { name, .. } = s {
                        match find_col(&names, name) {
                            Some(n) if !skipped_cols.iter().any(|s| s == n) => *name = n.to_owned(),
                            _ => {
                                return Err(Error::Config(format!(
                                    "--path-template `{t}`: {} has no usable column `{name}` \
                                     (columns: {}){}",
                                    list.display(),
                                    shown(),
                                    header_hint(format)
                                )));
                            }
                        }
                    }
                }
                (None, Some((t.clone(), PathTemplate { segs })))
            }
            (None, given) => {
                let p = resolve(given, PATH_COLUMNS, "--path-col")?;
                if p.is_none() {
                    return Err(Error::input(
                        &list,
                        format!(
                            "no path column: looked for {} (columns: {}); pass --path-col NAME \
                             or --path-template '{{id}}.jpg'{}",
                            PATH_COLUMNS.join(", "),
                            shown(),
                            header_hint(format)
                        ),
                    ));
                }
                (p, None)
            }
        };
        Ok(Files {
            list,
            root: spec.root,
            format,
            list_bytes: meta.len(),
            parquet_rows,
            path_col,
            id_col,
            label_col,
            caption_col,
            template,
            skipped_cols,
            follow_symlinks: spec.follow_symlinks,
        })
    }

    /// Turns one parsed row into an item or a `bad_row` reject.
    fn row_entry(&self, n: u64, line: u64, columns: Map<String, Value>) -> Entry {
        match self.row_item(&columns) {
            Ok((key, path, ..)) if !lexically_safe(&path) => {
                // Refused before planning, so it cannot claim a key that a valid row
                // needs (symlink escapes are caught at load time).
                Entry::Reject(Reject::new(
                    path.clone(),
                    Some(key),
                    "unsafe_path",
                    format!(
                        "{}: row {n} (line {line}): path `{path}` is absolute or leaves the root",
                        self.list.display()
                    ),
                ))
            }
            Ok((key, path, label, caption, id)) => {
                let mut item = Item::new(n, key, path);
                item.label = label;
                item.caption = caption;
                // Keys inserted in sorted order: the same bytes whether or not
                // serde_json's `preserve_order` is on.
                let mut extra = Map::new();
                extra.insert("columns".into(), Value::Object(columns));
                extra.insert("id".into(), id.map_or(Value::Null, Value::String));
                extra.insert("row".into(), Value::from(n));
                item.extra = Some(Value::Object(extra));
                Entry::Item(item)
            }
            Err((key, msg)) => Entry::Reject(self.bad_row(n, line, key, &msg)),
        }
    }

    fn bad_row(&self, n: u64, line: u64, key: Option<String>, msg: &str) -> Reject {
        Reject::new(
            format!("row:{n}"),
            key,
            "bad_row",
            format!("{}: row {n} (line {line}): {msg}", self.list.display()),
        )
    }

    #[allow(clippy::type_complexity)]
    fn row_item(
        &self,
        cols: &Map<String, Value>,
    ) -> std::result::Result<
        (String, String, Option<i64>, Option<String>, Option<String>),
        (Option<String>, String),
    > {
        let get = |name: &str| -> Option<&Value> {
            cols.get(name).or_else(|| {
                cols.iter()
                    .find(|(k, _)| k.eq_ignore_ascii_case(name))
                    .map(|(_, v)| v)
            })
        };
        let id = match &self.id_col {
            None => None,
            Some(c) => match get(c).and_then(owned_text) {
                Some(s) if !s.trim().is_empty() => Some(s.trim().to_owned()),
                _ => return Err((None, format!("id column `{c}` is empty"))),
            },
        };
        let id_key = id.as_deref().map(sanitize_key);
        let path = match &self.template {
            Some((text, t)) => t
                .render(|name| match get(name).and_then(owned_text) {
                    Some(s) if !s.trim().is_empty() => Ok(s.trim().to_owned()),
                    _ => Err(format!(
                        "column `{name}` (used by --path-template `{text}`) is empty"
                    )),
                })
                .map_err(|m| (id_key.clone(), m))?,
            None => {
                let c = self.path_col.as_deref().unwrap_or("path");
                match get(c) {
                    None | Some(Value::Null) => {
                        return Err((id_key, format!("path column `{c}` is empty")));
                    }
                    Some(v) => match owned_text(v) {
                        Some(s) if !s.trim().is_empty() => s.trim().to_owned(),
                        Some(_) => return Err((id_key, format!("path column `{c}` is empty"))),
                        None => return Err((id_key, format!("path column `{c}` is not text"))),
                    },
                }
            }
        };
        let key = match id_key {
            Some(k) => k,
            None => sanitize_key(
                Path::new(&path)
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default()
                    .as_str(),
            ),
        };
        let label = match &self.label_col {
            None => None,
            Some(c) => match get(c) {
                None | Some(Value::Null) => None,
                Some(v) => match label_of(v) {
                    Ok(l) => l,
                    Err(shown) => {
                        return Err((
                            Some(key),
                            format!(
                                "label `{shown}` in column `{c}` is not a non-negative integer"
                            ),
                        ));
                    }
                },
            },
        };
        let caption = match &self.caption_col {
            None => None,
            Some(c) => get(c).and_then(owned_text).filter(|s| !s.trim().is_empty()),
        };
        Ok((key, path, label, caption, id))
    }

    fn enumerate_text(&self, emit: &mut dyn FnMut(Entry) -> Result<()>) -> Result<()> {
        let file = File::open(&self.list).map_err(|e| Error::io(&self.list, e))?;
        let mut rdr = text_reader(self.format, file);
        let mut header = csv::ByteRecord::new();
        rdr.read_byte_record(&mut header)
            .map_err(|e| csv_err(&self.list, e))?;
        let names = header_names(&header);
        // Insert columns in sorted name order (first of duplicate names wins).
        let mut order: Vec<usize> = (0..names.len()).collect();
        order.sort_by(|&a, &b| names[a].cmp(&names[b]).then(a.cmp(&b)));
        let mut rec = csv::ByteRecord::new();
        let mut n = 0u64;
        loop {
            let more = rdr
                .read_byte_record(&mut rec)
                .map_err(|e| csv_err(&self.list, e))?;
            if !more {
                break;
            }
            let line = rec.position().map_or(0, |p| p.line());
            let entry = if rec.len() != names.len() {
                Entry::Reject(self.bad_row(
                    n,
                    line,
                    None,
                    &format!(
                        "{} fields, the header has {}{}",
                        rec.len(),
                        names.len(),
                        if self.format == ListFormat::Tsv {
                            " (a tab or line break inside a field?)"
                        } else {
                            ""
                        }
                    ),
                ))
            } else {
                let mut cols = Map::new();
                let mut bad = None;
                for &i in &order {
                    match std::str::from_utf8(&rec[i]) {
                        Ok(s) => {
                            cols.entry(names[i].clone())
                                .or_insert_with(|| Value::String(s.to_owned()));
                        }
                        Err(_) => {
                            bad = Some(format!("column `{}` is not valid UTF-8", names[i]));
                            break;
                        }
                    }
                }
                match bad {
                    Some(msg) => Entry::Reject(self.bad_row(n, line, None, &msg)),
                    None => self.row_entry(n, line, cols),
                }
            };
            emit(entry)?;
            n += 1;
        }
        Ok(())
    }

    fn enumerate_jsonl(&self, emit: &mut dyn FnMut(Entry) -> Result<()>) -> Result<()> {
        let file = File::open(&self.list).map_err(|e| Error::io(&self.list, e))?;
        let mut rdr = BufReader::with_capacity(1 << 20, file);
        let mut buf = Vec::new();
        let mut n = 0u64;
        let mut line = 0u64;
        loop {
            buf.clear();
            let got = rdr
                .read_until(b'\n', &mut buf)
                .map_err(|e| Error::io(&self.list, e))?;
            if got == 0 {
                break;
            }
            line += 1;
            let text = trim_line(&buf, line == 1);
            if text.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let entry = match serde_json::from_slice::<Value>(text) {
                Ok(Value::Object(obj)) => self.row_entry(n, line, sorted_map(obj)),
                Ok(other) => Entry::Reject(self.bad_row(
                    n,
                    line,
                    None,
                    &format!("expected a JSON object, found {}", json_kind(&other)),
                )),
                Err(e) => Entry::Reject(self.bad_row(n, line, None, &format!("bad JSON: {e}"))),
            };
            emit(entry)?;
            n += 1;
        }
        Ok(())
    }

    fn enumerate_parquet(&self, emit: &mut dyn FnMut(Entry) -> Result<()>) -> Result<()> {
        let perr = |e: &dyn std::fmt::Display| Error::input(&self.list, parquet_msg(e));
        let file = File::open(&self.list).map_err(|e| Error::io(&self.list, e))?;
        let builder = ParquetRecordBatchReaderBuilder::try_new(file).map_err(|e| perr(&e))?;
        let keep: Vec<usize> = builder
            .schema()
            .fields()
            .iter()
            .enumerate()
            .filter(|(_, f)| scalar_type(f.data_type()))
            .map(|(i, _)| i)
            .collect();
        let mask = ProjectionMask::roots(builder.parquet_schema(), keep);
        let reader = builder
            .with_projection(mask)
            .with_batch_size(PARQUET_BATCH)
            .build()
            .map_err(|e| perr(&e))?;
        let mut n = 0u64;
        for batch in reader {
            let batch = batch.map_err(|e| perr(&e))?;
            let cols = BatchColumns::new(&batch);
            for i in 0..batch.num_rows() {
                let row = cols.row(i);
                // Parquet has no lines; report the 1-based row as the line.
                emit(self.row_entry(n, n + 1, row))?;
                n += 1;
            }
        }
        Ok(())
    }
}

/// Whether `rel` is relative and stays below the root by its components alone.
fn lexically_safe(rel: &str) -> bool {
    Path::new(rel)
        .components()
        .all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
}

fn header_hint(format: ListFormat) -> &'static str {
    match format {
        ListFormat::Tsv | ListFormat::Csv => {
            "; tsv/csv lists need a header row naming the columns as their first line"
        }
        _ => "",
    }
}

/// A csv reader configured for `format` (headers handled by the caller).
fn text_reader(format: ListFormat, file: File) -> csv::Reader<File> {
    let mut b = csv::ReaderBuilder::new();
    b.has_headers(false).flexible(true).buffer_capacity(1 << 20);
    if format == ListFormat::Tsv {
        b.delimiter(b'\t').quoting(false);
    }
    b.from_reader(file)
}

fn csv_err(list: &Path, e: csv::Error) -> Error {
    match e.into_kind() {
        csv::ErrorKind::Io(io) => Error::io(list, io),
        other => Error::input(list, format!("{other:?}")),
    }
}

/// Header names, with a UTF-8 byte-order mark stripped and names trimmed.
fn header_names(rec: &csv::ByteRecord) -> Vec<String> {
    rec.iter()
        .enumerate()
        .map(|(i, f)| {
            let f = if i == 0 {
                f.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(f)
            } else {
                f
            };
            String::from_utf8_lossy(f).trim().to_owned()
        })
        .collect()
}

fn read_header(list: &Path, format: ListFormat) -> Result<Vec<String>> {
    let file = File::open(list).map_err(|e| Error::io(list, e))?;
    let mut rdr = text_reader(format, file);
    let mut header = csv::ByteRecord::new();
    let got = rdr
        .read_byte_record(&mut header)
        .map_err(|e| csv_err(list, e))?;
    if !got {
        return Err(Error::input(
            list,
            format!("empty list; a {format} list starts with a header row naming its columns"),
        ));
    }
    let names = header_names(&header);
    if names.iter().all(|n| n.is_empty()) {
        return Err(Error::input(
            list,
            format!("the first line must be a header row naming the {format} columns"),
        ));
    }
    Ok(names)
}

/// Strips the line terminator (and a BOM on the first line).
fn trim_line(buf: &[u8], first: bool) -> &[u8] {
    let mut t = buf;
    if first {
        t = t.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(t);
    }
    while let [rest @ .., b'\n' | b'\r'] = t {
        t = rest;
    }
    t
}

fn jsonl_head_keys(list: &Path) -> Result<Vec<String>> {
    let file = File::open(list).map_err(|e| Error::io(list, e))?;
    let mut rdr = BufReader::new(file);
    let mut buf = Vec::new();
    let mut line = 0usize;
    let mut last_err = String::from("the file is empty");
    while line < JSONL_HEAD_LINES {
        buf.clear();
        if rdr
            .read_until(b'\n', &mut buf)
            .map_err(|e| Error::io(list, e))?
            == 0
        {
            break;
        }
        line += 1;
        let text = trim_line(&buf, line == 1);
        if text.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        match serde_json::from_slice::<Value>(text) {
            Ok(Value::Object(obj)) => return Ok(obj.keys().cloned().collect()),
            Ok(other) => last_err = format!("line {line} is a JSON {}", json_kind(&other)),
            Err(e) => last_err = format!("line {line}: {e}"),
        }
    }
    Err(Error::input(
        list,
        format!(
            "no JSON object in the first {JSONL_HEAD_LINES} lines ({last_err}); a jsonl list \
             has one object per line, e.g. {{\"path\": \"a/1.jpg\", \"caption\": \"...\"}}"
        ),
    ))
}

fn parquet_msg(e: &dyn std::fmt::Display) -> String {
    format!(
        "cannot read as Parquet: {e} (this build reads uncompressed and snappy-compressed \
         files; rewrite others with compression='snappy')"
    )
}

/// Column names (readable ones), row count and unreadable-type columns; reads one
/// row so an unsupported compression fails here rather than mid-run.
fn parquet_head(list: &Path) -> Result<(Vec<String>, u64, Vec<String>)> {
    let perr = |e: &dyn std::fmt::Display| Error::input(list, parquet_msg(e));
    let file = File::open(list).map_err(|e| Error::io(list, e))?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(file).map_err(|e| perr(&e))?;
    let rows = builder.metadata().file_metadata().num_rows().max(0) as u64;
    let mut names = Vec::new();
    let mut skipped = Vec::new();
    let mut keep = Vec::new();
    for (i, f) in builder.schema().fields().iter().enumerate() {
        names.push(f.name().clone());
        if scalar_type(f.data_type()) {
            keep.push(i);
        } else {
            skipped.push(f.name().clone());
        }
    }
    let mask = ProjectionMask::roots(builder.parquet_schema(), keep);
    let mut reader = builder
        .with_projection(mask)
        .with_batch_size(1)
        .build()
        .map_err(|e| perr(&e))?;
    if let Some(b) = reader.next() {
        b.map_err(|e| perr(&e))?;
    }
    Ok((names, rows, skipped))
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// Rebuilds `m` with keys inserted in sorted order.
fn sorted_map(m: Map<String, Value>) -> Map<String, Value> {
    let mut v: Vec<(String, Value)> = m.into_iter().collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v.into_iter().collect()
}

/// The text of a scalar cell: strings as they are, numbers and booleans printed.
fn owned_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// A label cell: `Ok(None)` when empty, `Err(shown)` when not a non-negative integer.
fn label_of(v: &Value) -> std::result::Result<Option<i64>, String> {
    match v {
        Value::Null => Ok(None),
        Value::String(s) if s.trim().is_empty() => Ok(None),
        Value::String(s) => match s.trim().parse::<i64>() {
            Ok(l) if l >= 0 => Ok(Some(l)),
            _ => Err(s.clone()),
        },
        Value::Number(n) => {
            if let Some(l) = n.as_i64() {
                return if l >= 0 {
                    Ok(Some(l))
                } else {
                    Err(n.to_string())
                };
            }
            match n.as_f64() {
                Some(f) if f >= 0.0 && f.fract() == 0.0 && f < 9.0e15 => Ok(Some(f as i64)),
                _ => Err(n.to_string()),
            }
        }
        other => Err(other.to_string()),
    }
}

/// Per-batch column accessors (dictionary keys resolved once per batch).
struct BatchColumns {
    cols: Vec<(String, Access)>,
}

enum Access {
    Plain(ArrayRef),
    Dict {
        array: ArrayRef,
        keys: Vec<usize>,
        values: ArrayRef,
    },
}

impl BatchColumns {
    fn new(batch: &RecordBatch) -> Self {
        let schema = batch.schema();
        let mut cols: Vec<(String, Access)> = schema
            .fields()
            .iter()
            .zip(batch.columns())
            .filter(|(f, _)| scalar_type(f.data_type()))
            .map(|(f, a)| {
                let access = if matches!(a.data_type(), DataType::Dictionary(..)) {
                    let d = a.as_any_dictionary();
                    Access::Dict {
                        array: a.clone(),
                        keys: d.normalized_keys(),
                        values: d.values().clone(),
                    }
                } else {
                    Access::Plain(a.clone())
                };
                (f.name().clone(), access)
            })
            .collect();
        cols.sort_by(|a, b| a.0.cmp(&b.0));
        BatchColumns { cols }
    }

    fn row(&self, i: usize) -> Map<String, Value> {
        let mut m = Map::new();
        for (name, access) in &self.cols {
            if m.contains_key(name) {
                continue;
            }
            let v = match access {
                Access::Plain(a) => cell(a.as_ref(), i),
                Access::Dict {
                    array,
                    keys,
                    values,
                } => {
                    if array.is_null(i) {
                        Value::Null
                    } else {
                        cell(values.as_ref(), keys[i])
                    }
                }
            };
            m.insert(name.clone(), v);
        }
        m
    }
}

fn float(f: f64) -> Value {
    serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)
}

/// One scalar cell as JSON (NaN and infinities become null).
fn cell(a: &dyn Array, i: usize) -> Value {
    if a.is_null(i) {
        return Value::Null;
    }
    match a.data_type() {
        DataType::Utf8 => a.as_string::<i32>().value(i).into(),
        DataType::LargeUtf8 => a.as_string::<i64>().value(i).into(),
        DataType::Utf8View => a.as_string_view().value(i).into(),
        DataType::Boolean => a.as_boolean().value(i).into(),
        DataType::Int8 => a.as_primitive::<Int8Type>().value(i).into(),
        DataType::Int16 => a.as_primitive::<Int16Type>().value(i).into(),
        DataType::Int32 => a.as_primitive::<Int32Type>().value(i).into(),
        DataType::Int64 => a.as_primitive::<Int64Type>().value(i).into(),
        DataType::UInt8 => a.as_primitive::<UInt8Type>().value(i).into(),
        DataType::UInt16 => a.as_primitive::<UInt16Type>().value(i).into(),
        DataType::UInt32 => a.as_primitive::<UInt32Type>().value(i).into(),
        DataType::UInt64 => a.as_primitive::<UInt64Type>().value(i).into(),
        DataType::Float32 => float(a.as_primitive::<Float32Type>().value(i) as f64),
        DataType::Float64 => float(a.as_primitive::<Float64Type>().value(i)),
        _ => Value::Null,
    }
}

impl Source for Files {
    fn kind(&self) -> &'static str {
        "files"
    }

    fn params(&self) -> serde_json::Value {
        serde_json::json!({
            "list": self.list.display().to_string(),
            "list_bytes": self.list_bytes,
            "root": self.root.display().to_string(),
            "format": self.format.name(),
            "columns": {
                "path": self.path_col,
                "id": self.id_col,
                "label": self.label_col,
                "caption": self.caption_col,
            },
            "path_template": self.template.as_ref().map(|(t, _)| t.clone()),
            "skipped_columns": self.skipped_cols,
            "follow_symlinks": self.follow_symlinks,
        })
    }

    fn size_hint(&self) -> Result<u64> {
        Ok(match self.parquet_rows {
            Some(n) => n.max(1),
            None => (self.list_bytes / BYTES_PER_ROW).max(1),
        })
    }

    fn enumerate(&self, emit: &mut dyn FnMut(Entry) -> Result<()>) -> Result<()> {
        match self.format {
            ListFormat::Tsv | ListFormat::Csv => self.enumerate_text(emit),
            ListFormat::Jsonl => self.enumerate_jsonl(emit),
            ListFormat::Parquet => self.enumerate_parquet(emit),
        }
    }

    fn load(&self, item: &Item, ctx: &LoadContext) -> std::result::Result<Sample, Reject> {
        let img = if self.follow_symlinks && !ctx.follow_symlinks {
            let mut c = ctx.clone();
            c.follow_symlinks = true;
            load_image_file(&self.root, item, &c)?
        } else {
            load_image_file(&self.root, item, ctx)?
        };
        let extra = item.extra.as_ref().and_then(Value::as_object);
        let field = |k: &str| extra.and_then(|e| e.get(k)).cloned().unwrap_or(Value::Null);
        let mut meta = Map::new();
        meta.insert(
            "caption".into(),
            item.caption.clone().map_or(Value::Null, Value::String),
        );
        meta.insert("columns".into(), {
            match field("columns") {
                Value::Null => Value::Object(Map::new()),
                v => v,
            }
        });
        meta.insert("id".into(), field("id"));
        meta.insert("label".into(), item.label.map_or(Value::Null, Value::from));
        meta.insert(
            "row".into(),
            match field("row") {
                Value::Null => Value::from(item.ordinal),
                v => v,
            },
        );
        let json = serde_json::to_vec(&Value::Object(meta)).map_err(|e| {
            item.reject(
                "unreadable",
                format!("cannot serialise the json member: {e}"),
            )
        })?;
        let mut members = Vec::with_capacity(4);
        members.push((img.info.format.ext().to_owned(), Vec::new()));
        if let Some(l) = item.label {
            members.push(("cls".to_owned(), l.to_string().into_bytes()));
        }
        if let Some(c) = &item.caption {
            members.push(("txt".to_owned(), c.clone().into_bytes()));
        }
        members.push(("json".to_owned(), json));
        let row = image_row(item, &img, &members);
        members[0].1 = img.bytes;
        Ok(Sample { members, row })
    }

    fn metadata(&self) -> Metadata {
        let mut warnings = Vec::new();
        if !self.skipped_cols.is_empty() {
            warnings.push(format!(
                "{}: columns of types that are neither text nor numbers are left out of the \
                 json member: {}",
                self.list.display(),
                self.skipped_cols.join(", ")
            ));
        }
        Metadata {
            classes: None,
            wnids: None,
            categories: None,
            warnings,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    fn collect(src: &Files) -> Vec<Entry> {
        let mut v = Vec::new();
        src.enumerate(&mut |e| {
            v.push(e);
            Ok(())
        })
        .unwrap();
        v
    }

    #[test]
    fn template_slices_like_python() {
        let t = PathTemplate::parse("{id[0:3]}/{id[3:6]}/{id}.jpg").unwrap();
        assert_eq!(t.columns(), vec!["id", "id", "id"]);
        let r = t.render(|_| Ok("123456789".into())).unwrap();
        assert_eq!(r, "123/456/123456789.jpg");
        let t = PathTemplate::parse("{{x}}/{a[-2:]}{a[:1]}{a[5:9]}{a[3:1]}").unwrap();
        assert_eq!(t.render(|_| Ok("abcd".into())).unwrap(), "{x}/cda");
        for bad in [
            "{id",
            "id}",
            "{}",
            "{id[1]}",
            "{id[a:b]}",
            "{id[0:1:2]}",
            "plain.jpg",
            "{id[0:1}",
        ] {
            assert!(PathTemplate::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn defaults_are_found_case_insensitively() {
        let dir = tempfile::tempdir().unwrap();
        let list = write(
            dir.path(),
            "l.csv",
            "\u{feff}FilePath,Title,PhotoID,Class\na/1.jpg,\"hi, there\",7,3\n",
        );
        let src = Files::new(FilesSpec::new(&list, dir.path())).unwrap();
        let p = src.params();
        assert_eq!(p["columns"]["path"], "FilePath");
        assert_eq!(p["columns"]["caption"], "Title");
        assert_eq!(p["columns"]["id"], "PhotoID");
        assert_eq!(p["columns"]["label"], "Class");
        let e = collect(&src);
        let Entry::Item(it) = &e[0] else {
            panic!("{e:?}")
        };
        assert_eq!((it.key.as_str(), it.source.as_str()), ("7", "a/1.jpg"));
        assert_eq!(it.caption.as_deref(), Some("hi, there"));
        assert_eq!(it.label, Some(3));
        assert_eq!(it.extra.as_ref().unwrap()["columns"]["Title"], "hi, there");
        assert_eq!(it.extra.as_ref().unwrap()["row"], 0);
    }

    #[test]
    fn config_errors_name_the_problem() {
        let dir = tempfile::tempdir().unwrap();
        let list = write(dir.path(), "l.tsv", "id\tcaption\n1\tx\n");
        let err = |spec: FilesSpec| Files::new(spec).unwrap_err().to_string();
        // No path column, no template.
        let e = err(FilesSpec::new(&list, dir.path()));
        assert!(
            e.contains("--path-template") && e.contains("header row"),
            "{e}"
        );
        // Unknown template column; bad syntax.
        let mut s = FilesSpec::new(&list, dir.path());
        s.path_template = Some("{photo}.jpg".into());
        let e = err(s.clone());
        assert!(e.contains("`photo`") && e.contains("id, caption"), "{e}");
        s.path_template = Some("{id[0:x]}.jpg".into());
        assert!(err(s.clone()).contains("not an integer"));
        s.path_template = Some("{ID}.jpg".into());
        assert!(Files::new(s.clone()).is_ok());
        s.label_col = Some("nope".into());
        assert!(err(s.clone()).contains("--label-col `nope`"));
        // Unknown extension, missing list, empty list.
        let odd = write(dir.path(), "l.dat", "path\n");
        assert!(err(FilesSpec::new(&odd, dir.path())).contains("--format"));
        assert!(Files::new(FilesSpec::new(dir.path().join("none.tsv"), dir.path())).is_err());
        let empty = write(dir.path(), "e.tsv", "");
        assert!(err(FilesSpec::new(&empty, dir.path())).contains("header row"));
        let mut s = FilesSpec::new(&odd, dir.path());
        s.format = Some(ListFormat::Tsv);
        assert!(Files::new(s).is_ok());
    }

    #[test]
    fn bad_rows_are_rejected_and_enumeration_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let list = write(
            dir.path(),
            "l.tsv",
            "path\tlabel\tcaption\na.jpg\t1\tok\nb.jpg\tcat\tx\nc.jpg\t-1\tx\n\t2\tx\nd.jpg\t3\ne.jpg\t\t \nf.jpg\t4\tfine\n",
        );
        let src = Files::new(FilesSpec::new(&list, dir.path())).unwrap();
        let e = collect(&src);
        assert_eq!(e.len(), 7);
        let kinds: Vec<String> = e
            .iter()
            .map(|e| match e {
                Entry::Item(i) => format!("item:{}:{}", i.ordinal, i.key),
                Entry::Reject(r) => format!("{}:{}", r.reason, r.source),
            })
            .collect();
        assert_eq!(
            kinds,
            [
                "item:0:a",
                "bad_row:row:1",
                "bad_row:row:2",
                "bad_row:row:3",
                "bad_row:row:4",
                "item:5:e",
                "item:6:f"
            ]
        );
        let Entry::Reject(r) = &e[1] else {
            unreachable!()
        };
        assert!(
            r.detail.contains("l.tsv") && r.detail.contains("`cat`"),
            "{}",
            r.detail
        );
        // Empty label and caption count as absent.
        let Entry::Item(it) = &e[5] else {
            unreachable!()
        };
        assert_eq!((it.label, it.caption.as_deref()), (None, None));
    }

    #[test]
    fn jsonl_rows_keep_their_types_and_bad_lines_are_rows() {
        let dir = tempfile::tempdir().unwrap();
        let list = write(
            dir.path(),
            "l.jsonl",
            "{\"id\": 1200345, \"text\": \"a\", \"label\": 2.0, \"z\": null}\n\n{not json\n[1]\n{\"id\": \"77\", \"label\": 1.5}\n",
        );
        let mut spec = FilesSpec::new(&list, dir.path());
        spec.path_template = Some("{id[0:3]}/{id}.jpg".into());
        let src = Files::new(spec).unwrap();
        let e = collect(&src);
        let Entry::Item(it) = &e[0] else { panic!() };
        assert_eq!(it.source, "120/1200345.jpg");
        assert_eq!(it.label, Some(2));
        assert_eq!(it.extra.as_ref().unwrap()["columns"]["id"], 1200345);
        let reasons: Vec<_> = e[1..]
            .iter()
            .map(|e| match e {
                Entry::Reject(r) => (r.reason.clone(), r.source.clone()),
                Entry::Item(i) => panic!("{i:?}"),
            })
            .collect();
        assert_eq!(
            reasons,
            [
                ("bad_row".to_string(), "row:1".to_string()),
                ("bad_row".into(), "row:2".into()),
                ("bad_row".into(), "row:3".into())
            ]
        );
    }
}
