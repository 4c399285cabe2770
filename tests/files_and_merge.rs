//! The `files` source (tsv, csv, jsonl and parquet lists, path templates, rejects,
//! streaming) and `merge` of `--part i/N` runs.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use arrow_array::types::Int32Type;
use arrow_array::{ArrayRef, DictionaryArray, Float64Array, Int64Array, RecordBatch, StringArray};
use arrow_schema::{DataType, Field, Schema};
use conmim::format::index::{IndexRow, read_index};
use conmim::format::manifest::Manifest;
use conmim::format::reject::{Reject, read_rejects};
use conmim::format::tar::{ScannedSample, md5_file, scan_shard};
use conmim::format::{self, sanitize_key};
use conmim::shard::merge::merge;
use conmim::shard::source::files::{Files, FilesSpec, ListFormat};
use conmim::shard::source::{Entry, Source};
use conmim::shard::{self, Part, ShardConfig, Summary};
use conmim::testkit::{JpegSpec, jpeg, png};

// ---------------------------------------------------------------- harness

/// One image written under the root.
#[derive(Debug, Clone)]
struct Img {
    id: String,
    /// Path relative to the root, YFCC layout `{id[0:3]}/{id[3:6]}/{id}.jpg`.
    rel: String,
    caption: String,
    label: i64,
    /// Stored member extension (every 4th is a PNG named `.jpg`).
    ext: &'static str,
}

const YFCC_TEMPLATE: &str = "{id[0:3]}/{id[3:6]}/{id}.jpg";

fn make_images(root: &Path, n: usize) -> Vec<Img> {
    (0..n)
        .map(|i| {
            let id = (12_000_000 + i as u64 * 7_919).to_string();
            let rel = format!("{}/{}/{id}.jpg", &id[0..3], &id[3..6]);
            let (w, h) = (16 + i as u32 % 5, 12 + i as u32 % 3);
            let (bytes, ext) = if i % 4 == 3 {
                (png(w, h, i as u64), "png")
            } else {
                (jpeg(&JpegSpec::rgb(w, h, i as u64)), "jpg")
            };
            let path = root.join(&rel);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, bytes).unwrap();
            Img {
                id,
                rel,
                caption: format!("photo {i}, \"quoted\" and ünïcode"),
                label: (i % 5) as i64,
                ext,
            }
        })
        .collect()
}

fn config(out: &Path, part: Option<Part>) -> ShardConfig {
    let mut c = ShardConfig::new(out, "train");
    c.max_shard_count = 4;
    c.threads = 2;
    c.part = part;
    c
}

/// Everything a dataset directory says about `name`, cross-checked: every shard is
/// scanned and its samples must match the index rows of that shard (key, offset,
/// length, order), sizes and md5 must match the manifest, counts must add up.
struct Dataset {
    manifest: Manifest,
    rows: Vec<IndexRow>,
    rejects: Vec<Reject>,
    samples: BTreeMap<String, ScannedSample>,
}

fn read_dataset(out: &Path, name: &str) -> Dataset {
    let manifest: Manifest = format::read_json(&out.join(format::manifest_name(name))).unwrap();
    let rows = read_index(&out.join(format::index_name(name))).unwrap();
    let rejects = read_rejects(&out.join(format::rejected_name(name))).unwrap();
    let mut samples = BTreeMap::new();
    let mut next_row = 0usize;
    for (i, entry) in manifest.shardlist.iter().enumerate() {
        let path = out.join(&entry.url);
        let (md5, size) = md5_file(&path).unwrap();
        assert_eq!(
            (md5.as_str(), size),
            (entry.md5sum.as_str(), entry.filesize),
            "{}",
            entry.url
        );
        let mut scanned = Vec::new();
        let n = scan_shard(
            &path,
            |s| {
                scanned.push(s);
                Ok(())
            },
            |i| panic!("{i:?}"),
        )
        .unwrap();
        assert_eq!(n, entry.nsamples, "{}", entry.url);
        for s in scanned {
            let row = &rows[next_row];
            next_row += 1;
            assert_eq!(row.shard as usize, i, "row {} in the wrong shard", row.key);
            assert_eq!(
                (&row.key, row.offset, row.length),
                (&s.key, s.offset, s.length)
            );
            let exts: Vec<&str> = s.members.iter().map(|m| m.ext.as_str()).collect();
            assert_eq!(row.members, exts.join(","));
            assert!(samples.insert(s.key.clone(), s).is_none(), "duplicate key");
        }
    }
    assert_eq!(next_row, rows.len(), "index rows without a shard sample");
    let c = &manifest.conmim;
    assert_eq!(c.num_samples, rows.len() as u64);
    assert_eq!(c.num_rejected, rejects.len() as u64);
    assert_eq!(c.num_inputs, c.num_samples + c.num_rejected);
    assert_eq!(c.num_shards, manifest.shardlist.len() as u64);
    let by_reason = rejects.iter().fold(BTreeMap::new(), |mut m, r| {
        *m.entry(r.reason.clone()).or_insert(0u64) += 1;
        m
    });
    assert_eq!(c.rejected_by_reason, by_reason);
    Dataset {
        manifest,
        rows,
        rejects,
        samples,
    }
}

fn json_member(s: &ScannedSample) -> serde_json::Value {
    serde_json::from_slice(&s.member("json").expect("json member").data).unwrap()
}

/// Checks that the dataset holds exactly `imgs`, with captions, labels and columns.
fn check_samples(ds: &Dataset, imgs: &[Img], caption_col: &str) {
    let keys: BTreeSet<&str> = ds.rows.iter().map(|r| r.key.as_str()).collect();
    let want: BTreeSet<&str> = imgs.iter().map(|i| i.id.as_str()).collect();
    assert_eq!(keys, want);
    for img in imgs {
        let row = ds.rows.iter().find(|r| r.key == img.id).unwrap();
        let s = &ds.samples[&img.id];
        assert_eq!(row.source, img.rel);
        assert_eq!(row.caption.as_deref(), Some(img.caption.as_str()));
        assert_eq!(row.label, Some(img.label));
        assert_eq!(row.members, format!("{},cls,txt,json", img.ext));
        assert_eq!(s.member("txt").unwrap().data, img.caption.as_bytes());
        assert_eq!(
            s.member("cls").unwrap().data,
            img.label.to_string().as_bytes()
        );
        let j = json_member(s);
        assert_eq!(j["caption"], img.caption.as_str());
        assert_eq!(j["label"], img.label);
        assert_eq!(j["id"], img.id.as_str());
        assert!(j["row"].is_u64());
        assert_eq!(j["columns"][caption_col], img.caption.as_str(), "{j}");
        // Compact, sorted keys.
        let text = std::str::from_utf8(&s.member("json").unwrap().data)
            .unwrap()
            .to_owned();
        assert!(text.starts_with("{\"caption\":"), "{text}");
        assert!(!text.contains('\n'));
    }
}

fn run_files(spec: FilesSpec, cfg: &ShardConfig) -> Summary {
    let src = Files::new(spec).unwrap();
    shard::run(&src, cfg).unwrap()
}

fn tsv_list(path: &Path, imgs: &[Img]) {
    let mut t = String::from("path\tid\tcaption\tlabel\n");
    for i in imgs {
        t.push_str(&format!(
            "{}\t{}\t{}\t{}\n",
            i.rel, i.id, i.caption, i.label
        ));
    }
    std::fs::write(path, t).unwrap();
}

// ---------------------------------------------------------------- tests

#[test]
fn tsv_csv_jsonl_and_parquet_lists_become_samples() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    let imgs = make_images(&root, 20);

    // TSV with an explicit path column.
    let tsv = tmp.path().join("list.tsv");
    tsv_list(&tsv, &imgs);
    let out = tmp.path().join("tsv");
    let s = run_files(FilesSpec::new(&tsv, &root), &config(&out, None));
    assert_eq!((s.samples, s.rejected), (20, 0));
    assert!(s.shards >= 5, "max_shard_count 4 must give several shards");
    let ds = read_dataset(&out, "train");
    check_samples(&ds, &imgs, "caption");
    assert_eq!(ds.manifest.conmim.dataset, "files");
    assert!(ds.manifest.conmim.classes.is_none());
    assert_eq!(ds.manifest.conmim.params["source"]["format"], "tsv");
    let j = json_member(&ds.samples[&imgs[0].id]);
    assert_eq!(j["columns"]["path"], imgs[0].rel.as_str());
    assert_eq!(j["columns"]["label"], "0");

    // CSV: quoting, other column names found by the defaults, case-insensitively.
    let csv_path = tmp.path().join("list.csv");
    let mut w = csv::Writer::from_path(&csv_path).unwrap();
    w.write_record(["Key", "Title", "Class", "FileName", "Extra"])
        .unwrap();
    for i in &imgs {
        let label = i.label.to_string();
        w.write_record([i.id.as_str(), &i.caption, &label, &i.rel, "x,y"])
            .unwrap();
    }
    w.flush().unwrap();
    drop(w);
    let out = tmp.path().join("csv");
    run_files(FilesSpec::new(&csv_path, &root), &config(&out, None));
    let ds = read_dataset(&out, "train");
    check_samples(&ds, &imgs, "Title");
    assert_eq!(
        json_member(&ds.samples[&imgs[1].id])["columns"]["Extra"],
        "x,y"
    );

    // JSONL with numeric ids and the YFCC path template; `text` is the caption.
    let jsonl = tmp.path().join("list.jsonl");
    let mut t = String::new();
    for i in &imgs {
        let id: u64 = i.id.parse().unwrap();
        t.push_str(
            &serde_json::json!({"id": id, "text": i.caption, "label": i.label,
                "nsfw": false, "tags": ["a", "b"], "exif": {"iso": 100}})
            .to_string(),
        );
        t.push('\n');
    }
    std::fs::write(&jsonl, t).unwrap();
    let out = tmp.path().join("jsonl");
    let mut spec = FilesSpec::new(&jsonl, &root);
    spec.path_template = Some(YFCC_TEMPLATE.into());
    run_files(spec, &config(&out, None));
    let ds = read_dataset(&out, "train");
    check_samples(&ds, &imgs, "text");
    let j = json_member(&ds.samples[&imgs[2].id]);
    assert_eq!(
        j["columns"]["id"],
        imgs[2].id.parse::<u64>().unwrap(),
        "numbers stay numbers"
    );
    // Booleans, lists and objects are kept as the row had them, and fit the schema.
    assert_eq!(j["columns"]["nsfw"], false);
    assert_eq!(j["columns"]["tags"], serde_json::json!(["a", "b"]));
    assert_eq!(j["columns"]["exif"]["iso"], 100);
    common::python_check(&out, "train");
    assert_eq!(
        ds.manifest.conmim.params["source"]["path_template"],
        YFCC_TEMPLATE
    );

    // Parquet: int64 ids, a float and a dictionary column, several row groups.
    let pq = tmp.path().join("list.parquet");
    let schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Int64, false),
        Field::new("caption", DataType::Utf8, true),
        Field::new("label", DataType::Int64, true),
        Field::new("score", DataType::Float64, false),
        Field::new(
            "tag",
            DataType::Dictionary(Box::new(DataType::Int32), Box::new(DataType::Utf8)),
            false,
        ),
    ]));
    let cols: Vec<ArrayRef> = vec![
        Arc::new(Int64Array::from_iter_values(
            imgs.iter().map(|i| i.id.parse::<i64>().unwrap()),
        )),
        Arc::new(StringArray::from_iter_values(
            imgs.iter().map(|i| i.caption.as_str()),
        )),
        Arc::new(Int64Array::from_iter_values(imgs.iter().map(|i| i.label))),
        Arc::new(Float64Array::from_iter_values(
            (0..imgs.len()).map(|k| k as f64 * 0.5),
        )),
        Arc::new(
            (0..imgs.len())
                .map(|k| if k % 2 == 0 { "even" } else { "odd" })
                .collect::<DictionaryArray<Int32Type>>(),
        ),
    ];
    let batch = RecordBatch::try_new(schema.clone(), cols).unwrap();
    let props = parquet::file::properties::WriterProperties::builder()
        .set_max_row_group_row_count(Some(7))
        .build();
    let mut w =
        parquet::arrow::ArrowWriter::try_new(File::create(&pq).unwrap(), schema, Some(props))
            .unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
    let mut spec = FilesSpec::new(&pq, &root);
    spec.path_template = Some(YFCC_TEMPLATE.into());
    let src = Files::new(spec.clone()).unwrap();
    assert_eq!(src.size_hint().unwrap(), 20, "parquet hint = row count");
    let out = tmp.path().join("parquet");
    run_files(spec, &config(&out, None));
    let ds = read_dataset(&out, "train");
    check_samples(&ds, &imgs, "caption");
    let j = json_member(&ds.samples[&imgs[3].id]);
    assert_eq!(j["columns"]["score"], 1.5);
    assert_eq!(j["columns"]["tag"], "odd");
    assert_eq!(j["row"], 3);
}

#[test]
fn unsafe_missing_and_bad_rows_are_rejected() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    let imgs = make_images(&root, 5);
    let outside = tmp.path().join("outside.jpg");
    std::fs::write(&outside, jpeg(&JpegSpec::rgb(20, 20, 99))).unwrap();
    std::fs::write(root.join("broken.jpg"), b"not an image at all").unwrap();
    let inside = jpeg(&JpegSpec::rgb(24, 24, 98));
    std::fs::create_dir_all(root.join("ok")).unwrap();
    std::fs::write(root.join("ok/outside.jpg"), &inside).unwrap();

    let mut t = String::from("path\tcaption\tlabel\n");
    for i in &imgs {
        t.push_str(&format!("{}\t{}\t{}\n", i.rel, i.caption, i.label));
    }
    t.push_str("../outside.jpg\tescape\t1\n");
    t.push_str(&format!("{}\tabsolute\t1\n", outside.display()));
    // Same stem (key) as the refused rows: must still become a sample.
    t.push_str("ok/outside.jpg\tinside\t2\n");
    t.push_str("nope/missing.jpg\tgone\t1\n");
    t.push_str(&format!("{}\tbad label\tcat\n", imgs[0].rel));
    t.push_str(&format!("{}\tnegative\t-3\n", imgs[1].rel));
    t.push_str("\tno path\t1\n");
    t.push_str("too\tfew\n");
    t.push_str("broken.jpg\tbroken\t1\n");
    // Two inputs of one key: a missing file does not take the key from a good one
    // (issue 2: nothing valid is lost), while two good ones are a duplicate.
    t.push_str("gone/twin.jpg\tmissing twin\t1\n");
    t.push_str("ok/twin.jpg\tgood twin\t2\n");
    t.push_str("ok/dup.jpg\tfirst good\t1\n");
    t.push_str("ok2/dup.jpg\tsecond good\t1\n");
    std::fs::write(root.join("ok/twin.jpg"), jpeg(&JpegSpec::rgb(20, 22, 97))).unwrap();
    std::fs::write(root.join("ok/dup.jpg"), jpeg(&JpegSpec::rgb(20, 22, 96))).unwrap();
    std::fs::create_dir_all(root.join("ok2")).unwrap();
    std::fs::write(root.join("ok2/dup.jpg"), jpeg(&JpegSpec::rgb(20, 22, 95))).unwrap();
    let list = tmp.path().join("list.tsv");
    std::fs::write(&list, t).unwrap();

    let out = tmp.path().join("out");
    let s = run_files(FilesSpec::new(&list, &root), &config(&out, None));
    assert_eq!(s.inputs, 18);
    assert_eq!(s.samples, 8);
    assert_eq!(s.rejected, 10);
    assert!(s.check_rejects(0.01).is_err());
    let ds = read_dataset(&out, "train");
    assert_eq!(ds.manifest.conmim.num_inputs, 18);
    let count = |reason: &str| ds.rejects.iter().filter(|r| r.reason == reason).count();
    assert_eq!(count("unsafe_path"), 2, "{:#?}", ds.rejects);
    assert_eq!(count("missing_file"), 2);
    let twin = ds
        .rows
        .iter()
        .find(|r| r.key == "twin")
        .expect("the good twin is a sample");
    assert_eq!(twin.source, "ok/twin.jpg");
    let dup: Vec<_> = ds
        .rejects
        .iter()
        .filter(|r| r.reason == "duplicate_key")
        .collect();
    assert_eq!(dup.len(), 1, "{dup:#?}");
    assert_eq!(dup[0].source, "ok2/dup.jpg");
    assert!(dup[0].detail.contains("ok/dup.jpg"), "{}", dup[0].detail);
    assert_eq!(count("bad_row"), 4);
    let image_reject = ds
        .rejects
        .iter()
        .find(|r| r.source == "broken.jpg")
        .expect("broken image rejected");
    assert!(!["bad_row", "unsafe_path", "missing_file"].contains(&image_reject.reason.as_str()));
    // bad_row rejects name the row and the list.
    let bad: BTreeSet<&str> = ds
        .rejects
        .iter()
        .filter(|r| r.reason == "bad_row")
        .map(|r| r.source.as_str())
        .collect();
    assert_eq!(bad, BTreeSet::from(["row:9", "row:10", "row:11", "row:12"]));
    let cat = ds.rejects.iter().find(|r| r.source == "row:9").unwrap();
    assert!(
        cat.detail.contains("list.tsv") && cat.detail.contains("`cat`"),
        "{}",
        cat.detail
    );
    // Nothing outside the root was read.
    for r in &ds.rows {
        assert!(
            !r.source.starts_with("..") && !r.source.starts_with('/'),
            "{r:?}"
        );
        assert_ne!(r.caption.as_deref(), Some("escape"));
        assert_ne!(r.caption.as_deref(), Some("absolute"));
    }
    let kept = ds
        .rows
        .iter()
        .find(|r| r.key == "outside")
        .expect("inside file kept");
    assert_eq!(kept.source, "ok/outside.jpg");
    assert_eq!(ds.samples["outside"].member("jpg").unwrap().data, inside);
}

/// A source whose reading panics on one input (a decoder bug met on one odd file).
struct PanicsOn<S> {
    inner: S,
    key: String,
}

impl<S: Source> Source for PanicsOn<S> {
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }
    fn params(&self) -> serde_json::Value {
        self.inner.params()
    }
    fn size_hint(&self) -> conmim::Result<u64> {
        self.inner.size_hint()
    }
    fn enumerate(&self, emit: &mut dyn FnMut(Entry) -> conmim::Result<()>) -> conmim::Result<()> {
        self.inner.enumerate(emit)
    }
    fn load(
        &self,
        item: &conmim::shard::source::Item,
        ctx: &conmim::shard::source::LoadContext,
    ) -> Result<conmim::shard::source::Sample, Reject> {
        if item.key == self.key {
            panic!("decoder bug on {}", item.source);
        }
        self.inner.load(item, ctx)
    }
    fn metadata(&self) -> conmim::shard::source::Metadata {
        self.inner.metadata()
    }
}

/// A panic while reading one input rejects that input, naming it, and the run goes on
/// (before, it ended the whole run, and `--resume` met the same file again).
#[test]
fn a_panic_reading_one_input_rejects_it_and_the_run_goes_on() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    let imgs = make_images(&root, 6);
    let list = tmp.path().join("list.tsv");
    tsv_list(&list, &imgs);
    let mut spec = FilesSpec::new(&list, &root);
    spec.id_col = Some("id".into());
    let bad = imgs[2].id.clone();
    let src = PanicsOn {
        inner: Files::new(spec).unwrap(),
        key: bad.clone(),
    };
    let out = tmp.path().join("out");
    let s = shard::run(&src, &config(&out, None)).unwrap();
    assert_eq!((s.samples, s.rejected), (5, 1));
    let ds = read_dataset(&out, "train");
    let r = &ds.rejects[0];
    assert_eq!(
        (r.reason.as_str(), r.key.as_deref()),
        ("decode_error", Some(bad.as_str()))
    );
    assert!(
        r.source == imgs[2].rel && r.detail.contains("panicked"),
        "{r:?}"
    );
}

/// An empty list is an error that writes nothing (it wrote an empty "complete" dataset
/// that then refused the corrected rerun); a part of a multi-machine run may be empty.
#[test]
fn an_empty_input_is_an_error_and_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    std::fs::create_dir_all(&root).unwrap();
    let list = tmp.path().join("empty.tsv");
    tsv_list(&list, &[]);
    let out = tmp.path().join("out");
    let src = Files::new(FilesSpec::new(&list, &root)).unwrap();
    let err = shard::run(&src, &config(&out, None))
        .unwrap_err()
        .to_string();
    assert!(err.contains("no inputs found for files"), "{err}");
    let left: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "nothing written: {left:?}");
    // Once the list is right, the same command runs.
    let imgs = make_images(&root, 3);
    tsv_list(&list, &imgs);
    let src = Files::new(FilesSpec::new(&list, &root)).unwrap();
    assert_eq!(shard::run(&src, &config(&out, None)).unwrap().samples, 3);
    // An empty part is fine.
    let part_out = tmp.path().join("part");
    tsv_list(&list, &[]);
    let src = Files::new(FilesSpec::new(&list, &root)).unwrap();
    let part = Some(Part { index: 0, count: 2 });
    let s = shard::run(&src, &config(&part_out, part)).unwrap();
    assert_eq!((s.inputs, s.samples), (0, 0));
}

#[test]
fn enumerate_streams_a_200k_row_list() {
    const N: u64 = 200_000;
    let tmp = tempfile::tempdir().unwrap();
    let list = tmp.path().join("big.tsv");
    {
        use std::io::Write;
        let mut w = std::io::BufWriter::new(File::create(&list).unwrap());
        writeln!(w, "photoid\ttitle\tuid").unwrap();
        for i in 0..N {
            writeln!(w, "{}\tt{i}\tu{}", 100_000_000 + i, i % 97).unwrap();
        }
    }
    let mut spec = FilesSpec::new(&list, tmp.path());
    spec.path_template = Some(YFCC_TEMPLATE.replace("id", "photoid"));
    let src = Files::new(spec).unwrap();
    let hint = src.size_hint().unwrap();
    assert!(hint > N / 10 && hint < N * 10, "hint {hint}");
    let mut next = 0u64;
    src.enumerate(&mut |e| {
        let Entry::Item(it) = e else { panic!("{e:?}") };
        assert_eq!(it.ordinal, next);
        let id = (100_000_000 + next).to_string();
        assert_eq!(it.key, sanitize_key(&id));
        assert_eq!(it.source, format!("{}/{}/{id}.jpg", &id[0..3], &id[3..6]));
        next += 1;
        Ok(())
    })
    .unwrap();
    assert_eq!(next, N);
}

#[test]
fn list_format_names_round_trip() {
    for f in [
        ListFormat::Tsv,
        ListFormat::Csv,
        ListFormat::Jsonl,
        ListFormat::Parquet,
    ] {
        assert_eq!(f.name().parse::<ListFormat>().unwrap(), f);
        assert_eq!(ListFormat::from_path(Path::new(&format!("x.{f}"))), Some(f));
    }
    assert_eq!(
        ListFormat::from_path(Path::new("a.TXT")),
        Some(ListFormat::Tsv)
    );
    assert_eq!(
        ListFormat::from_path(Path::new("a.ndjson")),
        Some(ListFormat::Jsonl)
    );
    assert_eq!(ListFormat::from_path(Path::new("a.tsv.gz")), None);
}

fn tar_names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".tar"))
        .collect();
    v.sort();
    v
}

fn part_files(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("train-part"))
        .collect();
    v.sort();
    v
}

#[test]
fn parts_merge_into_the_single_run_dataset() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    let imgs = make_images(&root, 30);
    let list = tmp.path().join("list.tsv");
    tsv_list(&list, &imgs);
    // One bad row, so the rejected lists have something to concatenate.
    let mut text = std::fs::read_to_string(&list).unwrap();
    text.push_str("missing/x.jpg\t999\tgone\t1\n");
    // And one found bad while enumerating (every part enumerates the whole list).
    text.push_str("bad/label.jpg\t998\tbad\tnot-a-number\n");
    std::fs::write(&list, text).unwrap();

    let full_dir = tmp.path().join("full");
    let full = run_files(FilesSpec::new(&list, &root), &config(&full_dir, None));
    assert_eq!((full.samples, full.rejected), (30, 2));
    let full_ds = read_dataset(&full_dir, "train");

    // Parts 0 and 1 share a directory; part 2 ran "elsewhere".
    let shared = tmp.path().join("shared");
    let elsewhere = tmp.path().join("elsewhere");
    let mut part_samples = 0;
    for i in 0..3u32 {
        let dir = if i == 2 { &elsewhere } else { &shared };
        let s = run_files(
            FilesSpec::new(&list, &root),
            &config(dir, Some(Part { index: i, count: 3 })),
        );
        assert_eq!(s.name, format!("train-part{i:03}of003"));
        part_samples += s.samples;
    }
    assert_eq!(part_samples, 30);
    let before = part_files(&shared);

    // Missing part: refused, nothing touched.
    let e = merge(&shared, "train", std::slice::from_ref(&shared), false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("2/3") && e.contains("missing"), "{e}");
    assert_eq!(part_files(&shared), before);

    // A part built with other parameters: refused, naming the parameter.
    let odd = tmp.path().join("odd");
    std::fs::create_dir_all(&odd).unwrap();
    let m2 = elsewhere.join("train-part002of003.manifest.json");
    let mut m: serde_json::Value = format::read_json(&m2).unwrap();
    m["conmim"]["params"]["seed"] = 99.into();
    std::fs::write(odd.join("train-part002of003.manifest.json"), m.to_string()).unwrap();
    let e = merge(&shared, "train", &[shared.clone(), odd.clone()], false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("seed") && e.contains("part 2/3"), "{e}");
    // The same part twice: refused.
    let e = merge(
        &shared,
        "train",
        &[shared.clone(), elsewhere.clone(), odd.clone()],
        false,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("twice"), "{e}");
    assert_eq!(part_files(&shared), before);
    // A part whose rejected list disagrees with its manifest: refused before any shard
    // moves, so the parts stay as they were (and that part can be re-run).
    let list = elsewhere.join("train-part002of003.rejected.jsonl");
    let original = std::fs::read(&list).unwrap();
    let mut tampered = original.clone();
    tampered.extend_from_slice(
        b"{\"source\":\"x\",\"key\":null,\"reason\":\"bad_row\",\"detail\":\"d\"}\n",
    );
    std::fs::write(&list, &tampered).unwrap();
    let e = merge(
        &shared,
        "train",
        &[shared.clone(), elsewhere.clone()],
        false,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("part 2/3's manifest says"), "{e}");
    assert_eq!(part_files(&shared), before);
    assert!(tar_names(&shared).iter().all(|n| n.contains("part")));
    std::fs::write(&list, &original).unwrap();

    // Simulate a merge that crashed after moving the first shard.
    let first_part_shard = shared.join("train-part000of003-000000.tar");
    std::fs::rename(&first_part_shard, shared.join("train-000000.tar")).unwrap();

    let inputs = [shared.clone(), elsewhere.clone()];
    let s = merge(&shared, "train", &inputs, false).unwrap();
    assert_eq!(s.resumed_shards, 1);
    // Each part reports only the enumeration rejects that hash to it.
    assert!(
        !s.warnings.iter().any(|w| w.contains("kept once")),
        "{:?}",
        s.warnings
    );
    assert_eq!((s.samples, s.rejected, s.inputs), (30, 2, 32));

    let ds = read_dataset(&shared, "train");
    let keys: BTreeSet<&String> = ds.samples.keys().collect();
    let full_keys: BTreeSet<&String> = full_ds.samples.keys().collect();
    assert_eq!(keys, full_keys);
    let mut got = ds.rejects.clone();
    let mut want = full_ds.rejects.clone();
    got.sort_by(|a, b| a.source.cmp(&b.source));
    want.sort_by(|a, b| a.source.cmp(&b.source));
    assert_eq!(got, want, "each input rejected exactly once");
    for r in &ds.rows {
        let f = full_ds.rows.iter().find(|x| x.key == r.key).unwrap();
        assert_eq!(
            (&r.sha256, &r.members, &r.caption, r.label),
            (&f.sha256, &f.members, &f.caption, f.label)
        );
    }
    // Contiguous shard files, exactly those of the manifest.
    let names = tar_names(&shared);
    let want: Vec<String> = (0..names.len())
        .map(|k| format::shard_name("train", k))
        .collect();
    assert_eq!(names, want);
    let urls: Vec<&str> = ds
        .manifest
        .shardlist
        .iter()
        .map(|e| e.url.as_str())
        .collect();
    assert_eq!(urls, want.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(s.shards, names.len() as u64);
    // Part files are gone everywhere.
    assert!(part_files(&shared).is_empty(), "{:?}", part_files(&shared));
    assert!(
        part_files(&elsewhere).is_empty(),
        "{:?}",
        part_files(&elsewhere)
    );
    // Manifest metadata.
    let c = &ds.manifest.conmim;
    assert_eq!(c.dataset, "merge");
    assert_eq!(c.params["parts"], 3);
    assert!(c.params.get("part").is_none());
    assert_eq!(c.params["source"], full_ds.manifest.conmim.params["source"]);

    // A finished merge is not redone.
    let e = merge(&shared, "train", &inputs, false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("already exists"), "{e}");
    assert_eq!(tar_names(&shared), want);
}

#[test]
fn merge_without_parts_explains() {
    let tmp = tempfile::tempdir().unwrap();
    let e = merge(tmp.path(), "train", &[tmp.path().to_owned()], false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("no part manifests"), "{e}");
    let e = merge(tmp.path(), "train", &[], false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("at least one"), "{e}");
}
