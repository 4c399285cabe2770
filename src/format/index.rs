//! The Parquet index: one row per sample, in shard order. Its Arrow schema is the
//! contract `schemas/index.arrow.json` pins down.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::builder::{
    BooleanBuilder, Int64Builder, StringBuilder, UInt32Builder, UInt64Builder,
};
use arrow_array::{
    Array, ArrayRef, BooleanArray, Int64Array, RecordBatch, StringArray, UInt32Array, UInt64Array,
};
use arrow_schema::{DataType, Field, Schema, SchemaRef};
use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_reader::{ParquetRecordBatchReader, ParquetRecordBatchReaderBuilder};
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// One sample's row in the index.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct IndexRow {
    /// WebDataset key.
    pub key: String,
    /// Position of the shard in the manifest's shard list.
    pub shard: u32,
    /// Offset of the sample's first tar header.
    pub offset: u64,
    /// Bytes spanned by the sample's members.
    pub length: u64,
    /// Class index, where the dataset has one.
    pub label: Option<i64>,
    /// Image width in pixels.
    pub width: u32,
    /// Image height in pixels.
    pub height: u32,
    /// Image format name (`jpeg`, `png`, ...).
    pub format: String,
    /// Size of the image member.
    pub image_bytes: u64,
    /// Hex sha256 of the image member.
    pub sha256: String,
    /// Where the sample came from (path relative to the input root).
    pub source: String,
    /// Member extensions in stored order, comma-separated.
    pub members: String,
    /// Caption / title / description, where the source has one.
    pub caption: Option<String>,
    /// Segmentation target's source path (ADE20K).
    pub target: Option<String>,
    /// COCO image id.
    pub image_id: Option<i64>,
    /// COCO annotation count.
    pub num_annotations: Option<u32>,
    /// COCO: whether the image has any annotation.
    pub has_annotations: Option<bool>,
    /// Whether the image was re-encoded (`--max-side`).
    pub reencoded: bool,
}

/// The index's Arrow schema.
pub fn schema() -> SchemaRef {
    use DataType::*;
    Arc::new(Schema::new(vec![
        Field::new("key", Utf8, false),
        Field::new("shard", UInt32, false),
        Field::new("offset", UInt64, false),
        Field::new("length", UInt64, false),
        Field::new("label", Int64, true),
        Field::new("width", UInt32, false),
        Field::new("height", UInt32, false),
        Field::new("format", Utf8, false),
        Field::new("image_bytes", UInt64, false),
        Field::new("sha256", Utf8, false),
        Field::new("source", Utf8, false),
        Field::new("members", Utf8, false),
        Field::new("caption", Utf8, true),
        Field::new("target", Utf8, true),
        Field::new("image_id", Int64, true),
        Field::new("num_annotations", UInt32, true),
        Field::new("has_annotations", Boolean, true),
        Field::new("reencoded", Boolean, false),
    ]))
}

/// The schema as the JSON list kept in `schemas/index.arrow.json`
/// (`name`, pyarrow-style `type`, `nullable`).
pub fn schema_json() -> serde_json::Value {
    let fields: Vec<_> = schema()
        .fields()
        .iter()
        .map(|f| {
            let ty = match f.data_type() {
                DataType::Utf8 => "string",
                DataType::UInt32 => "uint32",
                DataType::UInt64 => "uint64",
                DataType::Int64 => "int64",
                DataType::Boolean => "bool",
                other => unreachable!("index schema has no {other:?} column"),
            };
            serde_json::json!({"name": f.name(), "type": ty, "nullable": f.is_nullable()})
        })
        .collect();
    serde_json::Value::Array(fields)
}

/// Rows per record batch / row group when writing.
const BATCH_ROWS: usize = 65_536;

fn batch(rows: &[IndexRow]) -> Result<RecordBatch> {
    let n = rows.len();
    let mut key = StringBuilder::new();
    let mut shard = UInt32Builder::with_capacity(n);
    let mut offset = UInt64Builder::with_capacity(n);
    let mut length = UInt64Builder::with_capacity(n);
    let mut label = Int64Builder::with_capacity(n);
    let mut width = UInt32Builder::with_capacity(n);
    let mut height = UInt32Builder::with_capacity(n);
    let mut format = StringBuilder::new();
    let mut image_bytes = UInt64Builder::with_capacity(n);
    let mut sha = StringBuilder::new();
    let mut source = StringBuilder::new();
    let mut members = StringBuilder::new();
    let mut caption = StringBuilder::new();
    let mut target = StringBuilder::new();
    let mut image_id = Int64Builder::with_capacity(n);
    let mut num_ann = UInt32Builder::with_capacity(n);
    let mut has_ann = BooleanBuilder::with_capacity(n);
    let mut reenc = BooleanBuilder::with_capacity(n);
    for r in rows {
        key.append_value(&r.key);
        shard.append_value(r.shard);
        offset.append_value(r.offset);
        length.append_value(r.length);
        label.append_option(r.label);
        width.append_value(r.width);
        height.append_value(r.height);
        format.append_value(&r.format);
        image_bytes.append_value(r.image_bytes);
        sha.append_value(&r.sha256);
        source.append_value(&r.source);
        members.append_value(&r.members);
        caption.append_option(r.caption.as_deref());
        target.append_option(r.target.as_deref());
        image_id.append_option(r.image_id);
        num_ann.append_option(r.num_annotations);
        has_ann.append_option(r.has_annotations);
        reenc.append_value(r.reencoded);
    }
    let cols: Vec<ArrayRef> = vec![
        Arc::new(key.finish()),
        Arc::new(shard.finish()),
        Arc::new(offset.finish()),
        Arc::new(length.finish()),
        Arc::new(label.finish()),
        Arc::new(width.finish()),
        Arc::new(height.finish()),
        Arc::new(format.finish()),
        Arc::new(image_bytes.finish()),
        Arc::new(sha.finish()),
        Arc::new(source.finish()),
        Arc::new(members.finish()),
        Arc::new(caption.finish()),
        Arc::new(target.finish()),
        Arc::new(image_id.finish()),
        Arc::new(num_ann.finish()),
        Arc::new(has_ann.finish()),
        Arc::new(reenc.finish()),
    ];
    RecordBatch::try_new(schema(), cols).map_err(|e| Error::Index {
        path: Default::default(),
        message: e.to_string(),
    })
}

/// Streams index rows into a Parquet file that appears atomically on
/// [`IndexWriter::finish`].
pub struct IndexWriter {
    path: std::path::PathBuf,
    tmp: std::path::PathBuf,
    writer: ArrowWriter<File>,
    buf: Vec<IndexRow>,
}

impl IndexWriter {
    /// Starts writing the index that will be named `path`.
    pub fn create(path: &Path) -> Result<Self> {
        let tmp = super::tmp_path(path);
        let file = File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        let props = WriterProperties::builder()
            .set_compression(Compression::SNAPPY)
            .set_max_row_group_row_count(Some(BATCH_ROWS))
            .build();
        let writer =
            ArrowWriter::try_new(file, schema(), Some(props)).map_err(|e| Error::Index {
                path: path.to_owned(),
                message: e.to_string(),
            })?;
        Ok(IndexWriter {
            path: path.to_owned(),
            tmp,
            writer,
            buf: Vec::new(),
        })
    }

    fn err(&self, m: impl ToString) -> Error {
        Error::Index {
            path: self.path.clone(),
            message: m.to_string(),
        }
    }

    /// Appends rows (buffered into row groups of a fixed size, so the file does not
    /// depend on how rows were handed in).
    pub fn write(&mut self, rows: &[IndexRow]) -> Result<()> {
        for r in rows {
            self.buf.push(r.clone());
            if self.buf.len() == BATCH_ROWS {
                self.flush()?;
            }
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let b = batch(&self.buf).map_err(|e| match e {
            Error::Index { message, .. } => Error::Index {
                path: self.path.clone(),
                message,
            },
            other => other,
        })?;
        self.writer.write(&b).map_err(|e| self.err(e))?;
        self.buf.clear();
        Ok(())
    }

    /// Writes the footer, fsyncs and renames into place.
    pub fn finish(mut self) -> Result<()> {
        self.flush()?;
        let file = self.writer.into_inner().map_err(|e| Error::Index {
            path: self.path.clone(),
            message: e.to_string(),
        })?;
        file.sync_all().map_err(|e| Error::io(&self.tmp, e))?;
        drop(file);
        std::fs::rename(&self.tmp, &self.path).map_err(|e| Error::io(&self.path, e))?;
        super::sync_parent_dir(&self.path);
        Ok(())
    }
}

/// Writes a whole index atomically.
pub fn write_index(path: &Path, rows: &[IndexRow]) -> Result<()> {
    let mut w = IndexWriter::create(path)?;
    w.write(rows)?;
    w.finish()
}

fn col<'a, T: 'static>(b: &'a RecordBatch, name: &str, path: &Path) -> Result<&'a T> {
    b.column_by_name(name)
        .and_then(|c| c.as_any().downcast_ref::<T>())
        .ok_or_else(|| Error::Index {
            path: path.to_owned(),
            message: format!("column `{name}` missing or of the wrong type"),
        })
}

fn opt<T>(a: &impl Array, i: usize, v: impl FnOnce() -> T) -> Option<T> {
    if a.is_null(i) { None } else { Some(v()) }
}

/// Rows per batch when streaming an index.
pub const READ_BATCH: usize = 8192;

/// An index read in batches of [`READ_BATCH`] rows, so a large index never has to fit
/// in memory. Stops after the first error.
pub struct IndexBatches {
    path: PathBuf,
    reader: Option<ParquetRecordBatchReader>,
}

impl IndexBatches {
    /// Opens the index at `path`.
    pub fn open(path: &Path) -> Result<Self> {
        let err = |m: String| Error::Index {
            path: path.to_owned(),
            message: m,
        };
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let reader = ParquetRecordBatchReaderBuilder::try_new(file)
            .map_err(|e| err(e.to_string()))?
            .with_batch_size(READ_BATCH)
            .build()
            .map_err(|e| err(e.to_string()))?;
        Ok(IndexBatches {
            path: path.to_owned(),
            reader: Some(reader),
        })
    }

    /// The index file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Iterator for IndexBatches {
    type Item = Result<Vec<IndexRow>>;

    fn next(&mut self) -> Option<Self::Item> {
        let b = self.reader.as_mut()?.next()?;
        let rows = b
            .map_err(|e| Error::Index {
                path: self.path.clone(),
                message: e.to_string(),
            })
            .and_then(|b| batch_rows(&b, &self.path));
        if rows.is_err() {
            self.reader = None;
        }
        Some(rows)
    }
}

/// The rows of one record batch.
fn batch_rows(b: &RecordBatch, path: &Path) -> Result<Vec<IndexRow>> {
    let key = col::<StringArray>(b, "key", path)?;
    let shard = col::<UInt32Array>(b, "shard", path)?;
    let offset = col::<UInt64Array>(b, "offset", path)?;
    let length = col::<UInt64Array>(b, "length", path)?;
    let label = col::<Int64Array>(b, "label", path)?;
    let width = col::<UInt32Array>(b, "width", path)?;
    let height = col::<UInt32Array>(b, "height", path)?;
    let format = col::<StringArray>(b, "format", path)?;
    let image_bytes = col::<UInt64Array>(b, "image_bytes", path)?;
    let sha = col::<StringArray>(b, "sha256", path)?;
    let source = col::<StringArray>(b, "source", path)?;
    let members = col::<StringArray>(b, "members", path)?;
    let caption = col::<StringArray>(b, "caption", path)?;
    let target = col::<StringArray>(b, "target", path)?;
    let image_id = col::<Int64Array>(b, "image_id", path)?;
    let num_ann = col::<UInt32Array>(b, "num_annotations", path)?;
    let has_ann = col::<BooleanArray>(b, "has_annotations", path)?;
    let reenc = col::<BooleanArray>(b, "reencoded", path)?;
    let mut rows = Vec::with_capacity(b.num_rows());
    for i in 0..b.num_rows() {
        // No `..Default::default()`: a new IndexRow field must be handled here.
        rows.push(IndexRow {
            key: key.value(i).to_owned(),
            shard: shard.value(i),
            offset: offset.value(i),
            length: length.value(i),
            label: opt(label, i, || label.value(i)),
            width: width.value(i),
            height: height.value(i),
            format: format.value(i).to_owned(),
            image_bytes: image_bytes.value(i),
            sha256: sha.value(i).to_owned(),
            source: source.value(i).to_owned(),
            members: members.value(i).to_owned(),
            caption: opt(caption, i, || caption.value(i).to_owned()),
            target: opt(target, i, || target.value(i).to_owned()),
            image_id: opt(image_id, i, || image_id.value(i)),
            num_annotations: opt(num_ann, i, || num_ann.value(i)),
            has_annotations: opt(has_ann, i, || has_ann.value(i)),
            reencoded: reenc.value(i),
        });
    }
    Ok(rows)
}

/// Streams an index in batches of rows (see [`IndexBatches`]).
pub fn for_each_batch(path: &Path, mut f: impl FnMut(Vec<IndexRow>) -> Result<()>) -> Result<()> {
    for rows in IndexBatches::open(path)? {
        f(rows?)?;
    }
    Ok(())
}

/// Reads a whole index.
pub fn read_index(path: &Path) -> Result<Vec<IndexRow>> {
    let mut rows = Vec::new();
    for_each_batch(path, |batch| {
        rows.extend(batch);
        Ok(())
    })?;
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.index.parquet");
        let rows = vec![
            IndexRow {
                key: "a".into(),
                label: Some(3),
                caption: Some("cap".into()),
                format: "jpeg".into(),
                ..Default::default()
            },
            IndexRow {
                key: "b".into(),
                shard: 1,
                has_annotations: Some(false),
                reencoded: true,
                ..Default::default()
            },
        ];
        write_index(&p, &rows).unwrap();
        assert_eq!(read_index(&p).unwrap(), rows);
    }

    #[test]
    fn golden_schema_file_matches() {
        let golden: serde_json::Value =
            serde_json::from_str(include_str!("../../schemas/index.arrow.json")).unwrap();
        assert_eq!(
            golden,
            schema_json(),
            "schemas/index.arrow.json is out of date"
        );
    }
}
