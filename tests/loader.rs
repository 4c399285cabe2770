//! The multithreaded loader: determinism across thread counts, equality with the
//! single-sample transforms, resume, error policy, damaged and stalled sources,
//! panics, buffer reuse.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;

use conmim::Error;
use conmim::augment::color::color_jitter_no_hue;
use conmim::augment::params::{ColorJitterParams, sample_rng};
use conmim::augment::views::ViewMaker;
use conmim::image::ImageLimits;
use conmim::loader::{
    Batch, CLASSIFY_AUG_DOMAIN, Loader, LoaderConfig, MaskConfig, MaskKind, Task, mask_rng,
};
use conmim::mask::MaskGenerator;
use conmim::seed::rank_seed;
use conmim::stream::{SourceOptions, Stream, StreamConfig};
use conmim::testkit::{self, JpegSpec};

const SIZE: u32 = 32;
const PATCH: u32 = 8;

/// Shards of small JPEGs keyed `s{i}_{j}` with label `i * 10 + j`; `corrupt` keys get
/// garbage bytes instead. Returns key -> image bytes.
fn dataset(dir: &Path, sizes: &[u64], corrupt: &[&str]) -> BTreeMap<String, Vec<u8>> {
    let mut images = BTreeMap::new();
    testkit::write_sharded(dir, "train", sizes, |i, j| {
        let key = format!("s{i}_{j}");
        let seed = (i * 1000) as u64 + j;
        let bytes = if corrupt.contains(&key.as_str()) {
            b"\xff\xd8\xff\xe0 this is not really a jpeg".to_vec()
        } else {
            testkit::jpeg(&JpegSpec::rgb(40 + (j as u32 % 3) * 8, 36, seed))
        };
        images.insert(key.clone(), bytes.clone());
        let members = vec![
            ("jpg".to_owned(), bytes),
            (
                "cls".to_owned(),
                format!("{}", i * 10 + j as usize).into_bytes(),
            ),
        ];
        (key, members)
    })
    .unwrap();
    images
}

fn config(threads: usize, batch: usize, epochs: u64) -> LoaderConfig {
    LoaderConfig {
        stream: StreamConfig {
            seed: 17,
            shuffle_buffer: 5,
            epochs: Some(epochs),
            ..Default::default()
        },
        threads,
        batch_size: batch,
        drop_last: false,
        image_size: SIZE,
        mask: MaskConfig {
            patch_size: PATCH,
            ..MaskConfig::default()
        },
        prefetch: 2,
        stall_timeout_s: 60.0,
        ..Default::default()
    }
}

fn open(dir: &Path, cfg: LoaderConfig) -> Loader {
    Loader::open(dir.to_str().unwrap(), &SourceOptions::default(), cfg).unwrap()
}

/// Everything a batch carries, comparable.
#[derive(Debug, PartialEq, Eq)]
struct Copy {
    epoch: u64,
    index: u64,
    keys: Vec<String>,
    numbers: Vec<u64>,
    labels: Vec<i64>,
    weak: Vec<u8>,
    strong: Vec<u8>,
    mask: Vec<u8>,
}

fn copy(b: &Batch) -> Copy {
    Copy {
        epoch: b.epoch(),
        index: b.index(),
        keys: b.keys().to_vec(),
        numbers: b.numbers().to_vec(),
        labels: b.labels().to_vec(),
        weak: b.weak().to_vec(),
        strong: b.strong().to_vec(),
        mask: b.mask().to_vec(),
    }
}

fn collect(l: Loader) -> Vec<Copy> {
    l.map(|b| copy(&b.unwrap())).collect()
}

#[test]
fn batches_do_not_depend_on_the_thread_count() {
    let dir = tempfile::tempdir().unwrap();
    dataset(dir.path(), &[9, 7, 8], &[]);
    let one = collect(open(dir.path(), config(1, 5, 2)));
    // 24 samples per epoch in batches of 5: 5 batches per epoch (the last short).
    assert_eq!(one.len(), 10);
    assert_eq!(one[4].keys.len(), 4);
    assert_eq!(one[5].epoch, 1);
    assert_eq!(one[5].index, 0);
    for threads in [2, 5] {
        assert_eq!(
            collect(open(dir.path(), config(threads, 5, 2))),
            one,
            "{threads} threads"
        );
    }
    // Epochs differ (order and augmentation).
    assert_ne!(one[0].keys, one[5].keys);
}

/// Checks sample `i` of `b` against the single-sample transforms drawn with `seed`
/// (weak and strong views, mask; `what` names it in a failure); returns its mask and
/// the number of masked patches.
fn check_single_sample(
    b: &Batch,
    i: usize,
    images: &BTreeMap<String, Vec<u8>>,
    vm: &mut ViewMaker,
    masker: &dyn MaskGenerator,
    seed: u64,
    what: &str,
) -> (Vec<u8>, usize) {
    let n = (SIZE * SIZE * 3) as usize;
    let (key, number) = (&b.keys()[i], b.numbers()[i]);
    let (mut weak, mut strong) = (vec![0u8; n], vec![0u8; n]);
    vm.conmim_pair(
        &images[key],
        &ImageLimits::default(),
        seed,
        b.epoch(),
        number,
        SIZE,
        &mut weak,
        &mut strong,
    )
    .unwrap();
    assert_eq!(&b.weak()[i * n..(i + 1) * n], &weak[..], "{what}");
    assert_eq!(&b.strong()[i * n..(i + 1) * n], &strong[..], "{what}");
    let mut mask = vec![0u8; b.mask_len()];
    let masked = masker.generate(&mut mask_rng(seed, b.epoch(), number), &mut mask);
    let m = b.mask_len();
    assert_eq!(&b.mask()[i * m..(i + 1) * m], &mask[..], "{what}");
    (mask, masked)
}

#[test]
fn each_sample_equals_the_single_sample_transforms() {
    let dir = tempfile::tempdir().unwrap();
    let images = dataset(dir.path(), &[6, 6], &[]);
    let cfg = config(3, 4, 1);
    let masker = cfg.mask.build(SIZE).unwrap();
    let mut vm = ViewMaker::new();
    let mut seen = 0;
    for b in open(dir.path(), cfg.clone()) {
        let b = b.unwrap();
        assert_eq!(b.mask_len(), 16);
        for i in 0..b.len() {
            let key = &b.keys()[i];
            let (_, masked) = check_single_sample(&b, i, &images, &mut vm, &*masker, 17, key);
            assert_eq!(masked, 12, "75% of 16 patches");
            let (s, j) = key[1..].split_once('_').unwrap();
            let label = s.parse::<i64>().unwrap() * 10 + j.parse::<i64>().unwrap();
            assert_eq!(b.labels()[i], label);
            seen += 1;
        }
    }
    assert_eq!(seen, 12);
}

/// Ranks draw their own crops, flips, colour ops and masks: sample `n` of rank 1 is
/// not augmented like sample `n` of rank 0 (numbers count within a rank's output), and
/// rank 0 draws exactly what a single process draws.
#[test]
fn issue6_each_rank_draws_its_own_views_and_masks() {
    let dir = tempfile::tempdir().unwrap();
    let images = dataset(dir.path(), &[6, 6, 6, 6], &[]);
    assert_eq!(
        rank_seed(17, 0),
        17,
        "rank 0 keeps the single-process draws"
    );
    let mut vm = ViewMaker::new();
    // rank -> number -> mask.
    let mut per_rank: Vec<BTreeMap<u64, Vec<u8>>> = Vec::new();
    for rank in 0..2 {
        let mut cfg = config(2, 4, 1);
        cfg.stream.rank = rank;
        cfg.stream.world_size = 2;
        let masker = cfg.mask.build(SIZE).unwrap();
        let seed = rank_seed(17, rank);
        let mut masks = BTreeMap::new();
        for b in open(dir.path(), cfg) {
            let b = b.unwrap();
            for i in 0..b.len() {
                let what = format!("rank {rank} {}", b.keys()[i]);
                let (mask, _) = check_single_sample(&b, i, &images, &mut vm, &*masker, seed, &what);
                masks.insert(b.numbers()[i], mask);
            }
        }
        assert_eq!(masks.len(), 12, "rank {rank}: 2 shards of 6");
        per_rank.push(masks);
    }
    let same = per_rank[0]
        .iter()
        .filter(|(number, m)| per_rank[1].get(number) == Some(m))
        .count();
    // 16 patches, 12 masked: C(16, 12) = 1820 masks, so two ranks agree by chance on
    // about 12 / 1820 of their samples; with one shared draw they would agree on all.
    assert!(
        same <= 2,
        "{same} of 12 samples have the same mask on both ranks"
    );
}

#[test]
fn resumed_loader_continues_exactly() {
    let dir = tempfile::tempdir().unwrap();
    dataset(dir.path(), &[9, 7, 8, 5], &["s1_3"]);
    let full = collect(open(dir.path(), config(2, 4, 2)));
    for cut in [1usize, 3, 7, 8] {
        let mut l = open(dir.path(), config(2, 4, 2));
        let mut state = None;
        for _ in 0..cut {
            state = Some(l.next().unwrap().unwrap().state());
        }
        drop(l);
        let state = state.unwrap();
        // The state survives JSON.
        let state: conmim::loader::LoaderState =
            serde_json::from_str(&serde_json::to_string(&state).unwrap()).unwrap();
        let cfg = config(3, 4, 2);
        let stream = Stream::open(
            dir.path().to_str().unwrap(),
            &SourceOptions::default(),
            cfg.stream.clone(),
        )
        .unwrap();
        let rest = collect(Loader::with_state(stream, cfg, &state).unwrap());
        assert_eq!(rest, full[cut..], "resumed after batch {cut}");
    }
}

/// A loader state does not resume a loader whose settings would shape other batches
/// (it would continue "exactly" into different output); a state saved before the
/// settings were recorded still resumes.
#[test]
fn issue3_resuming_with_other_loader_settings_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    dataset(dir.path(), &[9, 7], &[]);
    let mut l = open(dir.path(), config(2, 4, 2));
    let state = l.next().unwrap().unwrap().state();
    drop(l);
    let resume = |cfg: LoaderConfig, state: &conmim::loader::LoaderState| {
        let stream = Stream::open(
            dir.path().to_str().unwrap(),
            &SourceOptions::default(),
            cfg.stream.clone(),
        )
        .unwrap();
        Loader::with_state(stream, cfg, state)
    };
    type Change = fn(&mut LoaderConfig);
    let changes: [(&str, Change); 4] = [
        ("batch size", |c| c.batch_size = 3),
        ("image size", |c| c.image_size = 48),
        ("mask", |c| c.mask.ratio = 0.5),
        ("task", |c| c.task = Task::ClassifyTrain),
    ];
    for (what, change) in changes {
        let mut cfg = config(2, 4, 2);
        change(&mut cfg);
        let err = resume(cfg, &state)
            .err()
            .unwrap_or_else(|| panic!("{what}: resumed"));
        assert!(
            err.to_string().contains("other loader settings"),
            "{what}: {err}"
        );
    }
    // Thread count and prefetch do not change the batches: allowed.
    let mut cfg = config(3, 4, 2);
    cfg.prefetch = 4;
    assert!(resume(cfg, &state).is_ok());
    // A state from before the field existed (no `settings` key) resumes unchecked.
    let mut json: serde_json::Value = serde_json::to_value(state).unwrap();
    json.as_object_mut().unwrap().remove("settings").unwrap();
    let old: conmim::loader::LoaderState = serde_json::from_value(json).unwrap();
    assert_eq!(old.settings, 0);
    let mut cfg = config(2, 4, 2);
    cfg.batch_size = 3;
    assert!(resume(cfg, &old).is_ok());
}

#[test]
fn corrupt_samples_are_skipped_counted_and_named() {
    let dir = tempfile::tempdir().unwrap();
    dataset(dir.path(), &[6, 6], &["s0_2", "s1_5"]);
    let mut l = open(dir.path(), config(2, 4, 1));
    let keys: Vec<String> = l
        .by_ref()
        .flat_map(|b| b.unwrap().keys().to_vec())
        .collect();
    assert_eq!(keys.len(), 10);
    assert!(!keys.contains(&"s0_2".to_owned()));
    let errors = l.errors();
    assert_eq!(errors.sample_errors, 2);
    let mut named: Vec<&str> = errors.samples.iter().map(|e| e.key.as_str()).collect();
    named.sort();
    assert_eq!(named, ["s0_2", "s1_5"]);
    assert!(errors.samples[0].shard.ends_with(".tar"));
    assert!(!errors.samples[0].message.is_empty());

    // With a budget of one error the stream ends at the second, naming it.
    let mut cfg = config(2, 4, 1);
    cfg.max_errors = Some(1);
    let results: Vec<_> = open(dir.path(), cfg).collect();
    let err = results.last().unwrap().as_ref().unwrap_err();
    match err {
        Error::TooManyErrors {
            errors, limit, key, ..
        } => {
            assert_eq!((*errors, *limit), (2, 1));
            assert!(key == "s0_2" || key == "s1_5");
        }
        other => panic!("unexpected {other}"),
    }
}

#[test]
fn truncated_shard_yields_what_precedes_the_damage() {
    let dir = tempfile::tempdir().unwrap();
    dataset(dir.path(), &[8, 8], &[]);
    let path = dir.path().join(conmim::format::shard_name("train", 1));
    let len = std::fs::metadata(&path).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.set_len(len / 2).unwrap();
    let mut cfg = config(2, 3, 1);
    cfg.stream.equalize_samples = false;
    let mut l = open(dir.path(), cfg);
    let keys: Vec<String> = l
        .by_ref()
        .flat_map(|b| b.unwrap().keys().to_vec())
        .collect();
    let from_damaged = keys.iter().filter(|k| k.starts_with("s1_")).count();
    assert!(keys.iter().filter(|k| k.starts_with("s0_")).count() == 8);
    assert!(
        from_damaged > 0 && from_damaged < 8,
        "{from_damaged} samples of the damaged shard"
    );
    let errors = l.errors();
    assert_eq!(errors.shard_errors, 1);
    assert!(errors.shards[0].shard.ends_with("train-000001.tar"));
}

#[test]
fn drop_last_drops_only_the_short_batch() {
    let dir = tempfile::tempdir().unwrap();
    dataset(dir.path(), &[7, 6], &[]);
    let mut cfg = config(2, 4, 2);
    cfg.drop_last = true;
    let mut l = open(dir.path(), cfg);
    let batches: Vec<Copy> = l.by_ref().map(|b| copy(&b.unwrap())).collect();
    assert_eq!(batches.len(), 6);
    assert!(batches.iter().all(|b| b.keys.len() == 4));
    assert_eq!(l.stats().dropped, 2);
    assert_eq!(l.stats().samples, 24);
}

/// Issue 4: a dataset smaller than one batch used to hang a `drop_last` loader with
/// endless epochs (every epoch dropped); it now ends with a clear error.
#[test]
fn issue4_epoch_smaller_than_a_batch_is_an_error_not_a_hang() {
    let dir = tempfile::tempdir().unwrap();
    dataset(dir.path(), &[3, 2], &[]);
    let mut cfg = config(2, 8, 1);
    cfg.stream.epochs = None; // endless, as pretraining
    cfg.drop_last = true;
    let mut l = open(dir.path(), cfg);
    match l.next() {
        Some(Err(e)) => {
            let msg = e.to_string();
            assert!(
                msg.contains("gave 5 good samples") && msg.contains("batch of 8"),
                "{msg}"
            );
        }
        other => panic!(
            "expected the epoch error, got {:?}",
            other.map(|r| r.is_ok())
        ),
    }
    assert!(l.next().is_none());
}

#[test]
fn classification_tasks() {
    let dir = tempfile::tempdir().unwrap();
    let images = dataset(dir.path(), &[5], &[]);
    let n = (SIZE * SIZE * 3) as usize;
    let mut vm = ViewMaker::new();
    for task in [Task::ClassifyTrain, Task::ClassifyEval] {
        let mut cfg = config(2, 5, 1);
        cfg.task = task;
        cfg.eval_resize = 36;
        let batches = collect(open(dir.path(), cfg));
        assert_eq!(batches.len(), 1);
        let b = &batches[0];
        assert!(b.strong.is_empty() && b.mask.is_empty());
        for (i, key) in b.keys.iter().enumerate() {
            let mut out = vec![0u8; n];
            match task {
                Task::ClassifyTrain => {
                    vm.train_view(
                        &images[key],
                        &ImageLimits::default(),
                        17,
                        0,
                        b.numbers[i],
                        SIZE,
                        &mut out,
                    )
                    .unwrap();
                }
                _ => vm
                    .eval_view(&images[key], &ImageLimits::default(), 36, SIZE, &mut out)
                    .unwrap(),
            }
            assert_eq!(&b.weak[i * n..(i + 1) * n], &out[..], "{task:?} {key}");
        }
    }
}

/// A `.cls` that is not an integer (a WordNet id): pretraining takes the image with
/// label -1; a classification task names the sample as failed.
#[test]
fn conmim_ignores_labels_that_are_not_integers() {
    let dir = tempfile::tempdir().unwrap();
    testkit::write_sharded(dir.path(), "train", &[4], |_, j| {
        let jpg = testkit::jpeg(&JpegSpec::rgb(40, 36, j));
        let members = vec![
            ("jpg".to_owned(), jpg),
            ("cls".to_owned(), b"n01440764".to_vec()),
        ];
        (format!("k{j}"), members)
    })
    .unwrap();
    let batches = collect(open(dir.path(), config(2, 4, 1)));
    assert_eq!(batches.len(), 1);
    assert_eq!(batches[0].labels, [-1; 4]);
    let mut cfg = config(2, 4, 1);
    cfg.task = Task::ClassifyEval;
    cfg.eval_resize = 36;
    let mut l = open(dir.path(), cfg);
    assert!(l.next().is_none_or(|b| b.is_err()));
    let failed = l.errors().samples;
    assert!(
        failed.len() == 4 && failed[0].message.contains("is not an integer"),
        "{failed:?}"
    );
}

/// `color_jitter` without RandAugment: timm's `ColorJitter(c, c, c)` after the crop and
/// flip, drawn from the sample's classification stream; with RandAugment it is not
/// applied (timm's `create_transform` drops it).
#[test]
fn classify_train_color_jitter_applies_without_rand_augment_only() {
    let dir = tempfile::tempdir().unwrap();
    let images = dataset(dir.path(), &[6], &[]);
    let n = (SIZE * SIZE * 3) as usize;
    let run = |jitter: f64, rand_augment: &str| {
        let mut cfg = config(2, 6, 1);
        cfg.task = Task::ClassifyTrain;
        cfg.color_jitter = jitter;
        cfg.rand_augment = rand_augment.into();
        collect(open(dir.path(), cfg)).remove(0)
    };
    let (plain, jittered) = (run(0.0, ""), run(0.4, ""));
    assert_eq!(plain.keys, jittered.keys);
    assert_ne!(plain.weak, jittered.weak, "the jitter changed nothing");
    let mut vm = ViewMaker::new();
    for (i, key) in jittered.keys.iter().enumerate() {
        let number = jittered.numbers[i];
        let mut want = vec![0u8; n];
        vm.train_view(
            &images[key],
            &ImageLimits::default(),
            17,
            0,
            number,
            SIZE,
            &mut want,
        )
        .unwrap();
        assert_eq!(
            &plain.weak[i * n..(i + 1) * n],
            &want[..],
            "{key}: crop + flip"
        );
        let mut rng = sample_rng(17 ^ CLASSIFY_AUG_DOMAIN, 0, number);
        let p = ColorJitterParams::sample_no_hue(&mut rng, 0.4);
        color_jitter_no_hue(&mut want, &p);
        assert_eq!(
            &jittered.weak[i * n..(i + 1) * n],
            &want[..],
            "{key}: jitter"
        );
    }
    let policy = "rand-m9-mstd0.5-inc1";
    assert_eq!(
        run(0.4, policy).weak,
        run(0.0, policy).weak,
        "jitter under RandAugment"
    );
    // Not a knob of the other tasks.
    let mut cfg = config(2, 6, 1);
    cfg.color_jitter = 0.4;
    let e = Loader::open(dir.path().to_str().unwrap(), &SourceOptions::default(), cfg)
        .err()
        .expect("color_jitter on a ConMIM loader");
    assert!(e.to_string().contains("classify_train"), "{e}");
}

/// Issue 6: a run resumed on more ranks near the end of an epoch, where each new
/// rank's share of what is left of it cannot fill one batch. `Loader::rejoined` drops
/// that share and goes on with the next epoch; a plain loader ends with
/// `EpochSmallerThanBatch` (which every `--resume auto` retry met again).
#[test]
fn issue6_a_rejoined_share_smaller_than_a_batch_moves_on_to_the_next_epoch() {
    let dir = tempfile::tempdir().unwrap();
    dataset(dir.path(), &[10; 8], &[]);
    let spec = dir.path().to_str().unwrap();
    // One process, batch 32, 3 epochs of 80: stop after 2 batches of epoch 0.
    let mut one = config(1, 32, 3);
    one.drop_last = true;
    let mut l = open(dir.path(), one.clone());
    let state = (0..2)
        .map(|_| l.next().unwrap().unwrap().state())
        .last()
        .unwrap();
    drop(l);
    assert_eq!(state.stream.epoch, 0);
    for rank in 0..2 {
        let mut cfg = one.clone();
        cfg.batch_size = 16;
        cfg.stream.rank = rank;
        cfg.stream.world_size = 2;
        let rejoin = |cfg: &LoaderConfig| {
            let mut s = Stream::open(spec, &SourceOptions::default(), cfg.stream.clone()).unwrap();
            let r = s.rejoin(std::slice::from_ref(&state.stream)).unwrap();
            (s, r)
        };
        let (stream, r) = rejoin(&cfg);
        // 64 of 80 yielded: a couple of shards are left, one (10 samples) per new rank.
        assert!(!r.next_epoch && (2..=3).contains(&r.shards_left), "{r:?}");
        let batches = collect(Loader::rejoined(stream, cfg.clone()).unwrap());
        // Epochs 1 and 2 whole: 4 shards of 10 per rank, 2 batches of 16 (8 dropped).
        let epochs: Vec<u64> = batches.iter().map(|b| b.epoch).collect();
        assert_eq!(epochs, [1, 1, 2, 2], "rank {rank}");
        let (stream, _) = rejoin(&cfg);
        let e = Loader::new(stream, cfg.clone())
            .unwrap()
            .find_map(|b| b.err())
            .expect("a plain loader fails the short epoch");
        assert!(
            matches!(e, Error::EpochSmallerThanBatch { epoch: 0, .. }),
            "{e}"
        );
    }
}

#[test]
fn batch_buffers_are_reused() {
    let dir = tempfile::tempdir().unwrap();
    dataset(dir.path(), &[10, 10, 10], &[]);
    let mut cfg = config(2, 3, 2);
    cfg.prefetch = 1;
    let mut ptrs = HashSet::new();
    let mut count = 0;
    for b in open(dir.path(), cfg) {
        let b = b.unwrap();
        ptrs.insert(b.weak().as_ptr() as usize);
        count += 1;
    }
    assert_eq!(count, 20);
    assert!(ptrs.len() <= 2, "{} distinct buffers", ptrs.len());
}

#[test]
fn block_and_cell_masks() {
    let dir = tempfile::tempdir().unwrap();
    dataset(dir.path(), &[6], &[]);
    for (kind, expect) in [(MaskKind::Cell, 12usize), (MaskKind::Block, 0)] {
        let mut cfg = config(2, 6, 1);
        cfg.image_size = 64;
        cfg.mask = MaskConfig {
            kind,
            patch_size: 16,
            block_patches: 6,
            block_min_patches: 2,
            ..MaskConfig::default()
        };
        let b = collect(open(dir.path(), cfg));
        for m in b[0].mask.chunks(16) {
            let masked = m.iter().filter(|&&x| x == 1).count();
            if expect > 0 {
                assert_eq!(masked, expect, "{kind:?}");
            } else {
                assert!((1..=6).contains(&masked), "{kind:?}: {masked}");
            }
        }
    }
}

#[test]
fn a_stalled_source_ends_the_stream_with_an_error() {
    let mut cfg = config(2, 4, 1);
    cfg.stall_timeout_s = 0.5;
    let opts = SourceOptions {
        allow_pipe: true,
        ..SourceOptions::default()
    };
    let t = std::time::Instant::now();
    let mut l = Loader::open("pipe:sleep 20", &opts, cfg).unwrap();
    let r = l.next().unwrap();
    assert!(matches!(r, Err(Error::Stalled { .. })), "{r:?}");
    assert!(l.next().is_none());
    drop(l);
    assert!(
        t.elapsed().as_secs() < 10,
        "dropping the loader must not wait"
    );
}

/// Local files, each opened after `delay` (a slow mount or link).
struct SlowOpener {
    delay: std::time::Duration,
    /// What it reports as its retry budget (an http opener's: zero for local files).
    budget: std::time::Duration,
}

impl conmim::stream::Opener for SlowOpener {
    fn open(&self, url: &str) -> conmim::Result<Box<dyn std::io::Read + Send>> {
        std::thread::sleep(self.delay);
        conmim::stream::FileOpener.open(url)
    }

    fn retry_budget(&self, _url: &str) -> std::time::Duration {
        self.budget
    }
}

/// Reading that yields nothing yet (filling the shuffle buffer, a resume replaying its
/// epoch) is progress, not a stall: here the first sample needs 8 shard opens of
/// 0.1 s each, longer than the 0.3 s stall timeout.
#[test]
fn reading_before_the_first_sample_is_not_a_stall() {
    let dir = tempfile::tempdir().unwrap();
    dataset(dir.path(), &[1; 12], &[]);
    let urls: Vec<String> = (0..12)
        .map(|i| {
            dir.path()
                .join(format!("train-{i:06}.tar"))
                .display()
                .to_string()
        })
        .collect();
    let mut cfg = config(2, 4, 1);
    cfg.stall_timeout_s = 0.3;
    cfg.stream.shuffle_buffer = 8;
    let open = || {
        let list = conmim::stream::ShardList::from_urls(urls.clone(), false).unwrap();
        let opener = std::sync::Arc::new(SlowOpener {
            delay: std::time::Duration::from_millis(100),
            budget: std::time::Duration::ZERO,
        });
        Stream::new(list, cfg.stream.clone(), opener).unwrap()
    };
    let batches = collect(Loader::new(open(), cfg.clone()).unwrap());
    assert_eq!(batches.iter().map(|b| b.keys.len()).sum::<usize>(), 12);
    // A source that reads nothing at all still stalls.
    let mut never = cfg.clone();
    never.stall_timeout_s = 0.3;
    let opener = std::sync::Arc::new(SlowOpener {
        delay: std::time::Duration::from_secs(30),
        budget: std::time::Duration::ZERO,
    });
    let list = conmim::stream::ShardList::from_urls(urls.clone(), false).unwrap();
    let mut l = Loader::new(
        Stream::new(list, never.stream.clone(), opener).unwrap(),
        never,
    )
    .unwrap();
    assert!(matches!(l.next(), Some(Err(Error::Stalled { .. }))));
    // A source that retries (http: every attempt may wait out its timeouts) is waited
    // for its whole retry budget plus HTTP_STALL_MARGIN, not the stall timeout: a 1 s
    // open is no stall here.
    let opener = std::sync::Arc::new(SlowOpener {
        delay: std::time::Duration::from_secs(1),
        budget: std::time::Duration::from_millis(1),
    });
    let list = conmim::stream::ShardList::from_urls(urls[..4].to_vec(), false).unwrap();
    let mut retrying = cfg.clone();
    retrying.stream.shuffle_buffer = 0;
    let l = Loader::new(
        Stream::new(list, retrying.stream.clone(), opener).unwrap(),
        retrying,
    )
    .unwrap();
    assert_eq!(collect(l).iter().map(|b| b.keys.len()).sum::<usize>(), 4);
}

#[test]
fn a_panicking_worker_ends_the_stream_with_an_error() {
    let dir = tempfile::tempdir().unwrap();
    dataset(dir.path(), &[6, 6], &[]);
    let mut cfg = config(2, 4, 1);
    cfg.fault_panic_key = Some("s1_2".into());
    let results: Vec<_> = open(dir.path(), cfg).collect();
    match results.last().unwrap() {
        Err(Error::ThreadPanicked { thread, message }) => {
            assert!(thread.starts_with("conmim-worker"), "{thread}");
            assert!(message.contains("s1_2"), "{message}");
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn dropping_the_loader_mid_epoch_is_prompt() {
    let dir = tempfile::tempdir().unwrap();
    dataset(dir.path(), &[20, 20], &[]);
    let mut cfg = config(3, 2, 100);
    cfg.prefetch = 1;
    let mut l = open(dir.path(), cfg);
    let first = l.next().unwrap().unwrap();
    let t = std::time::Instant::now();
    // The consumer still holds a batch: the pool is short, workers are blocked.
    drop(l);
    assert_eq!(first.len(), 2);
    drop(first);
    assert!(t.elapsed().as_secs() < 5, "drop took {:?}", t.elapsed());
}

/// A consumer that keeps every batch alive (`collect()` into a `Vec`) holds more than
/// the pool's `prefetch + 1` buffers: the loader must grow the pool, not deadlock.
#[test]
fn issue3_a_consumer_holding_every_batch_does_not_deadlock() {
    let dir = tempfile::tempdir().unwrap();
    dataset(dir.path(), &[10, 10, 10], &[]);
    let mut cfg = config(2, 3, 1);
    cfg.prefetch = 1;
    let (tx, rx) = std::sync::mpsc::channel();
    let path = dir.path().to_owned();
    std::thread::spawn(move || {
        let l = open(&path, cfg);
        let held: Vec<Batch> = l.map(|b| b.unwrap()).collect();
        let ptrs: HashSet<usize> = held.iter().map(|b| b.weak().as_ptr() as usize).collect();
        let _ = tx.send((
            held.len(),
            ptrs.len(),
            held.iter().map(|b| b.len()).sum::<usize>(),
        ));
    });
    let (batches, distinct, samples) = rx
        .recv_timeout(std::time::Duration::from_secs(60))
        .expect("the loader deadlocked while the consumer held its batches");
    assert_eq!((batches, samples), (10, 30));
    assert_eq!(distinct, 10, "every held batch has its own buffers");

    // Holding a few and dropping the rest: the extra buffers are counted, and a loader
    // whose consumer drops its batches grows nothing.
    let mut cfg = config(2, 3, 1);
    cfg.prefetch = 1;
    let mut l = open(dir.path(), cfg.clone());
    let kept: Vec<Batch> = (&mut l).take(4).map(|b| b.unwrap()).collect();
    assert_eq!(kept.len(), 4);
    assert!(l.stats().grown_buffers >= 2, "{:?}", l.stats());
    drop(kept);
    assert_eq!(l.map(|b| b.unwrap().len()).sum::<usize>(), 18);
    let mut l = open(dir.path(), cfg);
    for b in &mut l {
        b.unwrap();
    }
    assert_eq!(l.stats().grown_buffers, 0);
}
