//! `conmim preview` and the `preview` module: the documented layout, tiles equal to the
//! loader's views and masks, skipped samples, clean failures.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use conmim::augment::views::ViewMaker;
use conmim::loader::{Loader, LoaderConfig, MaskConfig, MaskKind, image_member, mask_rng};
use conmim::preview::{self, BACKGROUND, GAP, GridLayout, PreviewRow, Tile};
use conmim::stream::{SourceOptions, Stream, StreamConfig};
use conmim::testkit::{self, JpegSpec};

const SIZE: u32 = 224;
const PATCH: u32 = 16;
const VIEW: usize = (SIZE * SIZE * 3) as usize;
const GRID: usize = (SIZE / PATCH) as usize;

/// Shards of small images keyed `s{i}_{j}` (label `i * 10 + j`); `s{i}_1` is a PNG,
/// the others JPEGs; `corrupt` keys get garbage JPEG bytes.
fn dataset(dir: &Path, sizes: &[u64], corrupt: &[&str]) {
    testkit::write_sharded(dir, "train", sizes, |i, j| {
        let key = format!("s{i}_{j}");
        let seed = (i * 1000) as u64 + j;
        let (ext, bytes) = if corrupt.contains(&key.as_str()) {
            ("jpg", b"\xff\xd8\xff\xe0 not really a jpeg".to_vec())
        } else if j == 1 {
            ("png", testkit::png(50, 40, seed))
        } else {
            (
                "jpg",
                testkit::jpeg(&JpegSpec::rgb(40 + (j as u32 % 3) * 12, 36, seed)),
            )
        };
        let members = vec![
            (ext.to_owned(), bytes),
            (
                "cls".to_owned(),
                format!("{}", i * 10 + j as usize).into_bytes(),
            ),
        ];
        (key, members)
    })
    .unwrap();
}

fn conmim(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_conmim"))
        .args(args)
        .output()
        .expect("running conmim")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn run_ok(args: &[&str]) -> (String, String) {
    let out = conmim(args);
    let (so, se) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "conmim {args:?} failed:\n{so}\n{se}");
    (so, se)
}

/// The keys of the `row` lines, in order.
fn row_keys(stdout: &str) -> Vec<String> {
    stdout
        .lines()
        .filter(|l| l.starts_with("row "))
        .map(|l| l.split_whitespace().nth(3).unwrap().to_owned())
        .collect()
}

fn read_png(path: &Path) -> image::RgbImage {
    image::open(path)
        .expect("reading the preview PNG")
        .to_rgb8()
}

fn tile(img: &image::RgbImage, layout: &GridLayout, row: u32, t: Tile) -> Vec<u8> {
    let (x0, y0) = layout.tile_origin(row, t);
    let mut out = Vec::with_capacity(VIEW);
    for y in 0..SIZE {
        for x in 0..SIZE {
            out.extend_from_slice(&img.get_pixel(x0 + x, y0 + y).0);
        }
    }
    out
}

/// Per patch (row-major): does `a` differ from `b` anywhere in it?
fn patch_differs(a: &[u8], b: &[u8]) -> Vec<bool> {
    let mut out = vec![false; GRID * GRID];
    for y in 0..SIZE as usize {
        for x in 0..SIZE as usize {
            let i = (y * SIZE as usize + x) * 3;
            if a[i..i + 3] != b[i..i + 3] {
                out[(y / PATCH as usize) * GRID + x / PATCH as usize] = true;
            }
        }
    }
    out
}

/// Checks row `row` of `img` against the expected views and mask.
fn check_row(
    img: &image::RgbImage,
    layout: &GridLayout,
    row: u32,
    weak: &[u8],
    strong: &[u8],
    mask: &[u8],
) {
    let got_weak = tile(img, layout, row, Tile::Weak);
    assert!(
        got_weak == weak,
        "row {row}: weak tile differs from the weak view"
    );
    assert!(
        tile(img, layout, row, Tile::Strong) == strong,
        "row {row}: strong tile differs from the strong view"
    );
    let masked = tile(img, layout, row, Tile::Masked);
    let differs = patch_differs(&masked, weak);
    let masked_patches: Vec<bool> = mask.iter().map(|&m| m != 0).collect();
    assert_eq!(
        differs, masked_patches,
        "row {row}: the masked tile must differ from the weak tile exactly on masked patches"
    );
    let mut want = vec![0u8; VIEW];
    preview::masked_tile(weak, mask, SIZE, PATCH, &mut want).unwrap();
    assert!(
        masked == want,
        "row {row}: masked tile is not masked_tile(weak, mask)"
    );
}

fn out_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(name)
}

#[test]
fn binary_writes_the_documented_grid_and_skips_bad_samples() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    std::fs::create_dir(&data).unwrap();
    dataset(&data, &[5, 4], &["s0_2"]);
    let out = out_path(tmp.path(), "p.png");
    // -n above the dataset: every usable sample of epoch 0 is shown.
    let (so, se) = run_ok(&[
        "preview",
        "--data",
        data.to_str().unwrap(),
        "-n",
        "20",
        "--seed",
        "3",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(
        se.contains("skip") && se.contains("train-000000.tar") && se.contains("s0_2"),
        "the corrupt sample is reported with shard and key:\n{se}"
    );
    assert!(so.contains("8 samples shown, 1 skipped"), "summary:\n{so}");
    let layout = GridLayout::new(8, SIZE, PATCH).unwrap();
    assert_eq!(
        (layout.width(), layout.height()),
        (3 * SIZE + 4 * GAP, 8 * SIZE + 9 * GAP)
    );
    assert!(so.contains(&format!("{}x{} px", layout.width(), layout.height())));
    let img = read_png(&out);
    assert_eq!(img.dimensions(), (layout.width(), layout.height()));
    // Gaps are background: corners, between tiles, between rows.
    for (x, y) in [
        (0, 0),
        (layout.width() - 1, layout.height() - 1),
        (GAP + SIZE + 1, GAP + 10),
        (GAP + 10, GAP + SIZE + 1),
    ] {
        assert_eq!(img.get_pixel(x, y).0, BACKGROUND, "gap pixel ({x}, {y})");
    }
    // No temporary left behind.
    let names: Vec<String> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(!names.iter().any(|n| n.contains("partial")), "{names:?}");

    // Recompute every row from the stream, as the training loader does.
    let cfg = StreamConfig {
        seed: 3,
        epochs: Some(1),
        ..StreamConfig::default()
    };
    let mut stream = Stream::open(data.to_str().unwrap(), &SourceOptions::default(), cfg).unwrap();
    let masker = MaskConfig::default().build(SIZE).unwrap();
    let mut maker = ViewMaker::new();
    let limits = LoaderConfig::default().limits;
    let mut row = 0u32;
    let mut keys = Vec::new();
    while let Some(s) = stream.next_sample() {
        let (mut weak, mut strong) = (vec![0u8; VIEW], vec![0u8; VIEW]);
        let bytes = image_member(&s.sample).unwrap();
        if maker
            .conmim_pair(bytes, &limits, 3, 0, s.number, SIZE, &mut weak, &mut strong)
            .is_err()
        {
            assert_eq!(s.sample.key, "s0_2");
            continue;
        }
        let mut mask = vec![0u8; GRID * GRID];
        assert_eq!(
            masker.generate(&mut mask_rng(3, 0, s.number), &mut mask),
            147
        );
        check_row(&img, &layout, row, &weak, &strong, &mask);
        keys.push(s.sample.key.clone());
        row += 1;
    }
    assert_eq!(row, 8);
    assert_eq!(row_keys(&so), keys);
}

#[test]
fn binary_equals_the_loader_for_epoch_seed_and_mask() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    std::fs::create_dir(&data).unwrap();
    dataset(&data, &[4, 4, 3], &[]);
    let out = out_path(tmp.path(), "cell.png");
    let (so, _) = run_ok(&[
        "preview",
        "--data",
        data.to_str().unwrap(),
        "-n",
        "5",
        "--seed",
        "11",
        "--epoch",
        "1",
        "--mask",
        "cell",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(so.contains("5 samples shown, 0 skipped"), "{so}");
    let layout = GridLayout::new(5, SIZE, PATCH).unwrap();
    let img = read_png(&out);
    assert_eq!(img.dimensions(), (layout.width(), layout.height()));

    let cfg = LoaderConfig {
        stream: StreamConfig {
            seed: 11,
            epochs: Some(2),
            ..StreamConfig::default()
        },
        threads: 2,
        batch_size: 5,
        drop_last: false,
        image_size: SIZE,
        mask: MaskConfig::for_kind(MaskKind::Cell),
        ..LoaderConfig::default()
    };
    let loader = Loader::open(data.to_str().unwrap(), &SourceOptions::default(), cfg).unwrap();
    let batch = loader
        .map(|b| b.unwrap())
        .find(|b| b.epoch() == 1)
        .expect("a batch of epoch 1");
    assert_eq!(batch.len(), 5);
    assert_eq!(row_keys(&so), batch.keys().to_vec());
    let ml = batch.mask_len();
    for r in 0..5usize {
        let mask = &batch.mask()[r * ml..(r + 1) * ml];
        assert_eq!(mask.iter().filter(|&&m| m != 0).count(), 148);
        check_row(
            &img,
            &layout,
            r as u32,
            &batch.weak()[r * VIEW..(r + 1) * VIEW],
            &batch.strong()[r * VIEW..(r + 1) * VIEW],
            mask,
        );
    }
}

#[test]
fn binary_fails_cleanly() {
    let tmp = tempfile::tempdir().unwrap();
    let out = out_path(tmp.path(), "never.png");
    let missing = tmp.path().join("missing");
    for args in [
        vec!["preview", "--data", missing.to_str().unwrap()],
        vec!["preview", "--data", "pipe:cat /dev/null"],
        vec!["preview", "--data", missing.to_str().unwrap(), "-n", "0"],
        vec![
            "preview",
            "--data",
            missing.to_str().unwrap(),
            "--size",
            "100",
        ],
    ] {
        let mut a = args.clone();
        a.extend(["--out", out.to_str().unwrap()]);
        let o = conmim(&a);
        assert!(!o.status.success(), "{a:?} should fail");
        assert!(!text(&o.stderr).is_empty(), "{a:?} says why");
    }
    // A dataset whose only sample is corrupt: nothing to show, an error, no file.
    let data = tmp.path().join("data");
    std::fs::create_dir(&data).unwrap();
    dataset(&data, &[1], &["s0_0"]);
    let o = conmim(&[
        "preview",
        "--data",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    assert!(text(&o.stderr).contains("1 skipped"), "{}", text(&o.stderr));
    assert!(!out.exists());
}

#[test]
fn compose_places_tiles_and_checks_buffers() {
    let n = 3usize;
    let views: Vec<(Vec<u8>, Vec<u8>, Vec<u8>)> = (0..n)
        .map(|i| {
            let weak = testkit::photo_pixels(SIZE, SIZE, i as u64);
            let strong: Vec<u8> = weak.iter().map(|&p| 255 - p).collect();
            let mask: Vec<u8> = (0..GRID * GRID)
                .map(|p| u8::from((p + i) % 3 == 0))
                .collect();
            (weak, strong, mask)
        })
        .collect();
    let rows: Vec<PreviewRow<'_>> = views
        .iter()
        .enumerate()
        .map(|(i, (w, s, m))| PreviewRow {
            key: ["a", "b", "c"][i],
            weak: w,
            strong: s,
            mask: m,
        })
        .collect();
    let img = preview::compose(&rows, SIZE, PATCH).unwrap();
    assert_eq!(
        (img.width(), img.height()),
        (3 * SIZE + 4 * GAP, 3 * SIZE + 4 * GAP)
    );
    for (i, (w, s, m)) in views.iter().enumerate() {
        let r = i as u32;
        assert!(img.tile(r, Tile::Weak) == *w);
        assert!(img.tile(r, Tile::Strong) == *s);
        let differs = patch_differs(&img.tile(r, Tile::Masked), w);
        assert_eq!(differs, m.iter().map(|&x| x != 0).collect::<Vec<_>>());
    }
    // The PNG round-trips.
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("grid.png");
    let layout = preview::write_preview(&path, &rows, SIZE, PATCH).unwrap();
    assert_eq!(layout, img.layout);
    let back = read_png(&path);
    assert_eq!(back.dimensions(), (img.width(), img.height()));
    assert!(back.as_raw() == &img.rgb);

    // Wrong buffer sizes and empty input are errors naming the sample.
    let short = vec![0u8; VIEW - 3];
    let bad = [PreviewRow {
        key: "short-one",
        weak: &short,
        ..rows[0]
    }];
    let e = preview::compose(&bad, SIZE, PATCH).unwrap_err().to_string();
    assert!(e.contains("short-one"), "{e}");
    let bad_mask = [PreviewRow {
        mask: &views[0].2[1..],
        ..rows[0]
    }];
    assert!(preview::compose(&bad_mask, SIZE, PATCH).is_err());
    assert!(preview::compose(&[], SIZE, PATCH).is_err());
    assert!(preview::compose(&rows, SIZE, 15).is_err());
}
