//! The streaming data source: resolution, rank split, order, resume, damage, pipes.

use std::path::Path;
use std::sync::Arc;

use conmim::stream::{
    DefaultOpener, Event, HttpOpener, Mode, Opener, Remainder, ShardList, SourceOptions, Stream,
    StreamConfig, StreamState,
};

/// Writes `sizes.len()` shards `train-NNNNNN.tar` (shard i holds `sizes[i]` samples
/// keyed `s{i}_{j}`) and a manifest listing them.
fn dataset(dir: &Path, sizes: &[u64]) {
    conmim::testkit::write_sharded(dir, "train", sizes, |i, j| {
        let key = format!("s{i}_{j}");
        let members = vec![
            (
                "jpg".to_owned(),
                format!("pixels of {key}").repeat(20).into_bytes(),
            ),
            ("cls".to_owned(), format!("{}", i + j as usize).into_bytes()),
        ];
        (key, members)
    })
    .unwrap();
}

fn cfg(seed: u64, rank: usize, world: usize) -> StreamConfig {
    StreamConfig {
        seed,
        rank,
        world_size: world,
        shuffle_buffer: 7,
        epochs: Some(1),
        ..Default::default()
    }
}

fn stream(dir: &Path, c: StreamConfig) -> Stream {
    Stream::open(dir.to_str().unwrap(), &SourceOptions::default(), c).unwrap()
}

/// A comparable rendering of events.
fn render(s: &mut Stream, max: usize) -> Vec<String> {
    s.take(max)
        .map(|e| match e {
            Event::Sample(x) => format!(
                "{}#{} {} {} {}",
                x.epoch,
                x.number,
                x.sample.key,
                x.sample.index_in_shard,
                x.sample.members.len()
            ),
            Event::ShardError { url, error } => format!("error {url}: {error}"),
            Event::EpochEnd { epoch, samples } => format!("end {epoch} {samples}"),
        })
        .collect()
}

fn keys(s: &mut Stream) -> Vec<String> {
    std::iter::from_fn(|| s.next_sample())
        .map(|x| x.sample.key)
        .collect()
}

#[test]
fn dataset_dir_matches_brace_pattern() {
    let tmp = tempfile::tempdir().unwrap();
    dataset(tmp.path(), &[3, 4, 5]);
    let opts = SourceOptions::default();
    let from_dir = ShardList::resolve(tmp.path().to_str().unwrap(), &opts).unwrap();
    assert_eq!(from_dir.total_samples(), Some(12));
    let pattern = format!("{}/train-{{000000..000002}}.tar", tmp.path().display());
    let from_pattern = ShardList::resolve(&pattern, &opts).unwrap();
    let urls = |l: &ShardList| l.shards().iter().map(|s| s.url.clone()).collect::<Vec<_>>();
    assert_eq!(urls(&from_dir), urls(&from_pattern));
    assert_eq!(from_pattern.shards()[0].nsamples, None);
    // A list file with a relative pattern and comments.
    let list = tmp.path().join("shards.txt");
    std::fs::write(
        &list,
        "# shards\ntrain-{000000..000001}.tar\n\ntrain-000002.tar\n",
    )
    .unwrap();
    let from_list = ShardList::resolve(list.to_str().unwrap(), &opts).unwrap();
    assert_eq!(urls(&from_list), urls(&from_dir));
    assert_eq!(
        conmim::stream::expand_braces("a{1..2}").unwrap(),
        vec!["a1", "a2"]
    );
}

#[test]
fn epoch_mode_splits_ranks_disjointly() {
    let tmp = tempfile::tempdir().unwrap();
    dataset(tmp.path(), &[4; 7]);
    // Keep: every sample exactly once across ranks.
    let mut all = Vec::new();
    for rank in 0..3 {
        let c = StreamConfig {
            remainder: Remainder::Keep,
            ..cfg(5, rank, 3)
        };
        all.extend(keys(&mut stream(tmp.path(), c)));
    }
    all.sort();
    let mut expect: Vec<String> = (0..7)
        .flat_map(|i| (0..4).map(move |j| format!("s{i}_{j}")))
        .collect();
    expect.sort();
    assert_eq!(all, expect);
    // Keep with fewer shards than ranks (a small validation set on many GPUs): the
    // ranks past the last shard read nothing, and their stream ends cleanly.
    let few = tempfile::tempdir().unwrap();
    dataset(few.path(), &[4; 2]);
    let mut all = Vec::new();
    for rank in 0..3 {
        let c = StreamConfig {
            remainder: Remainder::Keep,
            ..cfg(5, rank, 3)
        };
        let mut s = stream(few.path(), c);
        let k = keys(&mut s);
        assert_eq!(k.len(), if rank < 2 { 4 } else { 0 }, "rank {rank}");
        assert!(s.take_errors().is_empty());
        all.extend(k);
    }
    assert_eq!(all.len(), 8);
    // Drop (default): 2 shards per rank, disjoint, 1 shard left out (rotating).
    let mut per_rank = Vec::new();
    for rank in 0..3 {
        let k = keys(&mut stream(tmp.path(), cfg(5, rank, 3)));
        assert_eq!(k.len(), 8);
        per_rank.extend(k);
    }
    let n = per_rank.len();
    per_rank.sort();
    per_rank.dedup();
    assert_eq!(per_rank.len(), n);
}

#[test]
fn equalized_sample_counts_across_ranks() {
    let tmp = tempfile::tempdir().unwrap();
    dataset(tmp.path(), &[2, 9, 3, 5, 6]);
    let counts: Vec<usize> = (0..2)
        .map(|rank| keys(&mut stream(tmp.path(), cfg(1, rank, 2))).len())
        .collect();
    assert_eq!(counts[0], counts[1]);
}

#[test]
fn order_is_seeded_and_changes_per_epoch() {
    let tmp = tempfile::tempdir().unwrap();
    dataset(tmp.path(), &[5; 6]);
    let c = StreamConfig {
        epochs: Some(2),
        ..cfg(9, 0, 1)
    };
    let a = render(&mut stream(tmp.path(), c.clone()), 1000);
    let b = render(&mut stream(tmp.path(), c.clone()), 1000);
    assert_eq!(a, b);
    assert_eq!(a.len(), 62);
    assert_eq!(a[30], "end 0 30");
    let e0: Vec<&str> = a[..30]
        .iter()
        .map(|s| s.split(' ').nth(1).unwrap())
        .collect();
    let e1: Vec<&str> = a[31..61]
        .iter()
        .map(|s| s.split(' ').nth(1).unwrap())
        .collect();
    assert_ne!(e0, e1);
    let mut s0 = e0.clone();
    let mut s1 = e1.clone();
    s0.sort();
    s1.sort();
    assert_eq!(s0, s1);
    // Numbers run 0.. within each epoch.
    assert!(
        a[..30]
            .iter()
            .enumerate()
            .all(|(i, s)| s.starts_with(&format!("0#{i} ")))
    );
    let other = render(
        &mut stream(tmp.path(), StreamConfig { seed: 10, ..c }),
        1000,
    );
    assert_ne!(a, other);
}

#[test]
fn resume_mid_epoch_equals_uninterrupted() {
    let tmp = tempfile::tempdir().unwrap();
    dataset(tmp.path(), &[6, 5, 7, 4]);
    for mode in [Mode::Epoch, Mode::Resampled] {
        let c = StreamConfig {
            mode,
            epochs: Some(3),
            ..cfg(3, 1, 2)
        };
        let full = render(&mut stream(tmp.path(), c.clone()), 10_000);
        for cut in [0usize, 1, 5, 11, 12, 13, 20] {
            let mut s = stream(tmp.path(), c.clone());
            let head = render(&mut s, cut);
            let json = serde_json::to_string(&s.state()).unwrap();
            let state: StreamState = serde_json::from_str(&json).unwrap();
            let mut r = stream(tmp.path(), c.clone());
            r.restore(&state).unwrap();
            let tail = render(&mut r, 10_000);
            assert_eq!([head, tail].concat(), full, "{mode:?} cut {cut}");
        }
        // A state from another config is refused.
        let s = stream(tmp.path(), c.clone());
        let mut other = stream(tmp.path(), StreamConfig { seed: 4, ..c });
        assert!(other.restore(&s.state()).is_err());
    }
}

/// Opens shards with [`DefaultOpener`], noting each URL.
struct CountingOpener(std::sync::Mutex<Vec<String>>);

impl Opener for CountingOpener {
    fn open(&self, url: &str) -> conmim::Result<Box<dyn std::io::Read + Send>> {
        self.0.lock().unwrap().push(url.to_owned());
        DefaultOpener::default().open(url)
    }
}

/// Resuming replays the epoch up to the saved position, but the shards the saved
/// stream had read through (every sample yielded) are not read again: stand-ins of
/// their manifest sample counts take their place, and the output still equals the
/// uninterrupted one. Without counts (no manifest), or after a shard error in the
/// epoch, every shard is read again, as before.
#[test]
fn restore_does_not_read_again_the_shards_read_through() {
    let tmp = tempfile::tempdir().unwrap();
    let sizes: Vec<u64> = (0..12).map(|i| 4 + i % 3).collect();
    dataset(tmp.path(), &sizes);
    let c = StreamConfig {
        epochs: Some(2),
        ..cfg(8, 0, 1)
    };
    let full = render(&mut stream(tmp.path(), c.clone()), 10_000);
    let list = |spec: &str| ShardList::resolve(spec, &SourceOptions::default()).unwrap();
    let dir = tmp.path().to_str().unwrap();
    for cut in [10usize, 30, 50] {
        let mut s = stream(tmp.path(), c.clone());
        let head = render(&mut s, cut);
        let state = s.state();
        assert!(cut < 30 || state.done > 2, "cut {cut}: {state:?}");
        let opener = Arc::new(CountingOpener(Default::default()));
        let mut r = Stream::new(list(dir), c.clone(), opener.clone()).unwrap();
        r.restore(&state).unwrap();
        let tail = render(&mut r, 10_000);
        assert_eq!([head, tail].concat(), full, "cut {cut}");
        // The epoch-0 shards opened again: none of the `done` read through.
        let plan = conmim::stream::epoch_plan(&list(dir), &c, 0).shards;
        let opened = opener.0.lock().unwrap().clone();
        let names = list(dir);
        let url = |p: usize| names.shards()[plan[p]].url.clone();
        let done = state.done as usize;
        let with_counts = opened.len();
        for p in 0..done {
            assert_eq!(
                opened.iter().filter(|u| **u == url(p)).count(),
                1,
                "cut {cut}: shard {p} of the plan is read through, read once (in epoch 1)"
            );
        }
        // Without sample counts (a brace pattern), the replay reads them all.
        let pattern = format!("{dir}/train-{{000000..000011}}.tar");
        let opener = Arc::new(CountingOpener(Default::default()));
        let mut r = Stream::new(list(&pattern), c.clone(), opener.clone()).unwrap();
        let mut s = Stream::new(
            list(&pattern),
            c.clone(),
            Arc::new(DefaultOpener::default()),
        )
        .unwrap();
        let head = render(&mut s, cut);
        assert_eq!(
            s.state().done,
            state.done,
            "the same stream, but for the counts"
        );
        r.restore(&s.state()).unwrap();
        assert!(
            opener.0.lock().unwrap().is_empty(),
            "restore itself reads nothing"
        );
        let tail = render(&mut r, 10_000);
        let again = render(
            &mut Stream::new(
                list(&pattern),
                c.clone(),
                Arc::new(DefaultOpener::default()),
            )
            .unwrap(),
            10_000,
        );
        assert_eq!([head, tail].concat(), again, "cut {cut} (no counts)");
        assert_eq!(
            opener.0.lock().unwrap().len(),
            with_counts + done,
            "cut {cut}"
        );
    }
}

/// Issue 6 (a checkpoint resumed with another world size): `seek_epoch` starts an
/// epoch afresh from any position, the samples a fresh stream yields from that epoch
/// on; with another rank/world split, the ranks still cover the epoch disjointly.
#[test]
fn issue6_seek_epoch_starts_the_epoch_afresh() {
    let tmp = tempfile::tempdir().unwrap();
    dataset(tmp.path(), &[6, 5, 7, 4, 3, 5]);
    let c = |rank, world| StreamConfig {
        epochs: Some(3),
        remainder: Remainder::Keep,
        ..cfg(3, rank, world)
    };
    let full = render(&mut stream(tmp.path(), c(0, 1)), 10_000);
    let start_of_1 = full.iter().position(|l| l == "end 0 30").unwrap() + 1;
    for cut in [0usize, 7, 31, 40] {
        let mut s = stream(tmp.path(), c(0, 1));
        render(&mut s, cut);
        s.seek_epoch(1);
        assert_eq!(s.epoch(), 1);
        assert_eq!(render(&mut s, 10_000), full[start_of_1..], "cut {cut}");
    }
    // Two ranks started at epoch 1 read every sample of it once.
    let mut keys: Vec<String> = (0..2)
        .flat_map(|r| {
            let mut s = stream(
                tmp.path(),
                StreamConfig {
                    epochs: Some(2),
                    ..c(r, 2)
                },
            );
            s.seek_epoch(1);
            render(&mut s, 10_000)
        })
        .filter(|l| l.starts_with("1#"))
        .map(|l| l.split(' ').nth(1).unwrap().to_owned())
        .collect();
    keys.sort();
    let n = keys.len();
    keys.dedup();
    assert_eq!((n, keys.len()), (30, 30));
    // Past the last epoch: nothing.
    let mut s = stream(tmp.path(), c(0, 1));
    s.seek_epoch(3);
    assert!(render(&mut s, 10).is_empty());
}

/// The keys the stream yields in epoch `epoch` from where it is: at most `max`, or up
/// to the epoch's end.
fn epoch_keys(s: &mut Stream, epoch: u64, max: usize) -> Vec<String> {
    let mut out = Vec::new();
    while out.len() < max {
        match s.next() {
            Some(Event::Sample(x)) if x.epoch == epoch => out.push(x.sample.key),
            Some(Event::Sample(x)) => panic!("a sample of epoch {} in epoch {epoch}", x.epoch),
            Some(Event::ShardError { url, error }) => panic!("{url}: {error}"),
            Some(Event::EpochEnd { .. }) | None => break,
        }
    }
    out
}

/// Issue 6 (a checkpoint resumed with another world size): `Stream::rejoin` goes on
/// with the shards of the saved epoch that no saved rank had read through, split over
/// the new ranks. Nothing of the epoch is skipped, the new ranks read disjoint shards,
/// and what is read twice is bounded by the saved ranks' unfinished shards (their
/// shuffle buffers and the shard each was in), not the epoch: starting the epoch afresh
/// read up to all of it again. The rejoined epoch resumes exactly in its turn (its left-out
/// shards are in the saved state), and a second change of world size within it still
/// skips nothing.
#[test]
fn issue6_rejoin_goes_on_with_the_unfinished_shards() {
    let tmp = tempfile::tempdir().unwrap();
    let sizes: Vec<u64> = (0..40).map(|i| 5 + (i * 7) % 5).collect();
    dataset(tmp.path(), &sizes);
    let all: usize = sizes.iter().sum::<u64>() as usize;
    let c = |rank, world| StreamConfig {
        epochs: Some(3),
        remainder: Remainder::Keep,
        ..cfg(5, rank, world)
    };
    let (buffer, largest) = (7usize, *sizes.iter().max().unwrap() as usize);
    let open_at = |world: usize, cut: usize, epoch: u64| -> (Vec<String>, Vec<StreamState>) {
        let mut keys = Vec::new();
        let mut states = Vec::new();
        for r in 0..world {
            let mut s = stream(tmp.path(), c(r, world));
            if epoch > 0 {
                s.seek_epoch(epoch);
            }
            keys.extend(epoch_keys(&mut s, epoch, cut));
            states.push(s.state());
        }
        (keys, states)
    };
    for (old_w, new_w) in [(2usize, 1usize), (1, 2), (2, 3), (4, 2)] {
        for cut in [0usize, 3, 12, 40, 90] {
            if cut * old_w >= all {
                continue; // the epoch read through: tested below
            }
            let (before, saved) = open_at(old_w, cut, 1);
            let mut after = Vec::new();
            let mut per_rank = Vec::new();
            for r in 0..new_w {
                let mut s = stream(tmp.path(), c(r, new_w));
                let j = s.rejoin(&saved).unwrap();
                assert_eq!((j.epoch, j.saved_world, j.next_epoch), (1, old_w, false));
                let k = epoch_keys(&mut s, 1, usize::MAX);
                per_rank.push(k.clone());
                after.extend(k);
            }
            let what = format!("{old_w} -> {new_w} ranks, cut {cut}");
            let mut union: Vec<&String> = before.iter().chain(&after).collect();
            union.sort();
            union.dedup();
            assert_eq!(union.len(), all, "nothing skipped: {what}");
            // A shuffle buffer of B keeps some samples of earlier shards for about
            // B ln B further samples, and a shard counts as read through only once
            // its last sample is out: what is read twice is of that order per saved
            // rank, whatever the cut.
            let twice = before.len() + after.len() - all;
            assert!(
                twice <= old_w * (6 * buffer + largest),
                "{twice} samples read twice: {what}"
            );
            if cut >= 40 {
                assert!(twice * 2 < before.len(), "{twice} read twice: {what}");
            }
            // The new ranks read disjoint shards.
            let mut a = after.clone();
            a.sort();
            a.dedup();
            assert_eq!(a.len(), after.len(), "{what}");
            assert!(per_rank.iter().all(|k| !k.is_empty()), "{what}");
        }
    }
    // The rejoined epoch resumes exactly from a state saved in it (JSON round trip)...
    let (_, saved) = open_at(2, 20, 1);
    let mut s = stream(tmp.path(), c(0, 1));
    s.rejoin(&saved).unwrap();
    let mut s2 = stream(tmp.path(), c(0, 1));
    s2.rejoin(&saved).unwrap();
    let whole = render(&mut s2, 10_000);
    let head = render(&mut s, 9);
    let state: StreamState =
        serde_json::from_str(&serde_json::to_string(&s.state()).unwrap()).unwrap();
    assert!(state.excluded.is_some());
    let mut r = stream(tmp.path(), c(0, 1));
    r.restore(&state).unwrap();
    assert_eq!([head, render(&mut r, 10_000)].concat(), whole);
    // ... and past its end the epochs are the usual ones.
    let fresh = render(&mut stream(tmp.path(), c(0, 1)), 10_000);
    let tail = |v: &[String]| v[v.iter().position(|l| l.starts_with("2#")).unwrap()..].to_vec();
    assert_eq!(tail(&whole), tail(&fresh));
    // A second change of world size within the rejoined epoch: 2 -> 3 -> 1 ranks.
    let (before, saved) = open_at(2, 15, 1);
    let mut mid = Vec::new();
    let mut saved3 = Vec::new();
    for r in 0..3 {
        let mut s = stream(tmp.path(), c(r, 3));
        s.rejoin(&saved).unwrap();
        mid.extend(epoch_keys(&mut s, 1, 6));
        saved3.push(s.state());
    }
    let mut s = stream(tmp.path(), c(0, 1));
    let j = s.rejoin(&saved3).unwrap();
    assert!(j.shards_done > 0, "{j:?}");
    let rest = epoch_keys(&mut s, 1, usize::MAX);
    let mut union: Vec<&String> = before.iter().chain(&mid).chain(&rest).collect();
    union.sort();
    union.dedup();
    assert_eq!(union.len(), all, "nothing skipped after two changes");
    // Saved one sample before the end of the epoch: fewer shards are left than the 40
    // new ranks, so they start the next epoch.
    let saved: Vec<StreamState> = (0..2)
        .map(|r| {
            let n = epoch_keys(&mut stream(tmp.path(), c(r, 2)), 0, usize::MAX).len();
            let mut s = stream(tmp.path(), c(r, 2));
            epoch_keys(&mut s, 0, n - 1);
            s.state()
        })
        .collect();
    let mut s = stream(tmp.path(), c(5, 40));
    let j = s.rejoin(&saved).unwrap();
    assert_eq!((j.epoch, j.next_epoch), (1, true), "{j:?}");
    assert!(j.shards_left > 0 && j.shards_left < 40, "{j:?}");
    assert!(
        j.describe(40).contains("goes on with epoch 1"),
        "{}",
        j.describe(40)
    );
    let mut fresh = stream(tmp.path(), c(5, 40));
    fresh.seek_epoch(1);
    assert_eq!(
        epoch_keys(&mut s, 1, usize::MAX),
        epoch_keys(&mut fresh, 1, usize::MAX)
    );
    // Positions saved with other settings are refused, naming the rank.
    let mut s = stream(tmp.path(), StreamConfig { seed: 9, ..c(0, 1) });
    let e = s.rejoin(&saved).unwrap_err().to_string();
    assert!(
        e.contains("rank 0 of 2") && e.contains("another shard list"),
        "{e}"
    );
}

/// Issue 6: with the default epoch rules (dropped remainder, equalised sample counts),
/// the new ranks of a rejoined epoch still yield the same number of samples each (so
/// their batches stay in step), and nothing the saved run would have read is skipped.
#[test]
fn issue6_rejoin_keeps_the_ranks_equal() {
    let tmp = tempfile::tempdir().unwrap();
    let sizes: Vec<u64> = (0..13).map(|i| 4 + (i * 3) % 6).collect();
    dataset(tmp.path(), &sizes);
    let c = |rank, world| StreamConfig {
        epochs: Some(2),
        ..cfg(2, rank, world)
    };
    for (old_w, new_w, cut) in [(2usize, 3usize, 17usize), (3, 2, 9), (2, 4, 4)] {
        let mut saved = Vec::new();
        let mut before = Vec::new();
        let mut would = Vec::new();
        for r in 0..old_w {
            let mut s = stream(tmp.path(), c(r, old_w));
            before.extend(epoch_keys(&mut s, 0, cut));
            saved.push(s.state());
            let mut whole = stream(tmp.path(), c(r, old_w));
            would.extend(epoch_keys(&mut whole, 0, usize::MAX));
        }
        let mut counts = Vec::new();
        let mut after = Vec::new();
        for r in 0..new_w {
            let mut s = stream(tmp.path(), c(r, new_w));
            let j = s.rejoin(&saved).unwrap();
            // The log line counts the shards the new split leaves out as its remainder.
            let k = j.shards_left % new_w;
            assert_eq!(j.remainder_left_out, k, "{j:?}");
            let line = j.describe(new_w);
            let said = format!("{k} of them, which do not divide among the ranks, are left out");
            assert_eq!(line.contains(&said), k > 0, "{line}");
            assert_eq!(line.contains("nothing is skipped"), k == 0, "{line}");
            let k = epoch_keys(&mut s, 0, usize::MAX);
            counts.push(k.len());
            after.extend(k);
        }
        let what = format!("{old_w} -> {new_w} ranks, cut {cut}");
        assert!(
            counts.iter().all(|&n| n == counts[0] && n > 0),
            "{counts:?}: {what}"
        );
        // What the old run would have read is read, but for what the new split's own
        // remainder and equalising leave out.
        let seen: std::collections::HashSet<&String> = before.iter().chain(&after).collect();
        let missed = would.iter().filter(|k| !seen.contains(k)).count();
        // At most the new split's dropped remainder (fewer than `new_w` shards) and
        // what equalising trims (under a shard per rank).
        let largest = *sizes.iter().max().unwrap() as usize;
        assert!(missed < 2 * new_w * largest, "{missed} missed: {what}");
    }
}

/// Issue 6 (resume after a failure): a run whose data was staged to another directory
/// (a per-job scratch copy, another mount point) resumes where it was; a different
/// shard list still does not.
#[test]
fn issue6_state_resumes_from_a_moved_dataset() {
    let tmp = tempfile::tempdir().unwrap();
    let (old, new, other) = (
        tmp.path().join("job1/in1k"),
        tmp.path().join("scratch/job2/copy"),
        tmp.path().join("other"),
    );
    for d in [&old, &new] {
        std::fs::create_dir_all(d).unwrap();
        dataset(d, &[6, 5, 7, 4]);
    }
    std::fs::create_dir_all(&other).unwrap();
    dataset(&other, &[6, 5, 7, 3]);
    let c = StreamConfig {
        epochs: Some(2),
        ..cfg(5, 1, 2)
    };
    let full = render(&mut stream(&old, c.clone()), 10_000);
    let mut s = stream(&old, c.clone());
    let head = render(&mut s, 9);
    let mut moved = stream(&new, c.clone());
    moved.restore(&s.state()).unwrap();
    let tail = render(&mut moved, 10_000);
    assert_eq!([head, tail].concat(), full);
    let e = stream(&other, c)
        .restore(&s.state())
        .unwrap_err()
        .to_string();
    assert!(e.contains("another shard list"), "{e}");
}

#[test]
fn truncated_shard_yields_prefix_then_continues() {
    let tmp = tempfile::tempdir().unwrap();
    dataset(tmp.path(), &[4, 4, 4]);
    let bad = tmp.path().join("train-000001.tar");
    let len = std::fs::metadata(&bad).unwrap().len();
    // Each sample: 2 members of < 512 bytes = 2048 bytes; cut inside sample 2.
    assert!(len > 3 * 2048);
    let f = std::fs::OpenOptions::new().write(true).open(&bad).unwrap();
    f.set_len(2 * 2048 + 700).unwrap();
    let c = StreamConfig {
        shuffle_shards: false,
        shuffle_buffer: 0,
        equalize_samples: false,
        ..cfg(0, 0, 1)
    };
    let events = render(&mut stream(tmp.path(), c.clone()), 1000);
    let ks: Vec<&str> = events
        .iter()
        .filter(|e| !e.starts_with("error") && !e.starts_with("end"))
        .map(|e| e.split(' ').nth(1).unwrap())
        .collect();
    assert_eq!(
        ks,
        [
            "s0_0", "s0_1", "s0_2", "s0_3", "s1_0", "s1_1", "s2_0", "s2_1", "s2_2", "s2_3"
        ]
    );
    assert!(events[6].starts_with("error") && events[6].contains("train-000001.tar"));
    assert_eq!(events.last().unwrap(), "end 0 10");
    // Resumed at any point, the damage included, the output is the uninterrupted one
    // (the replay after a shard error reads every shard again: the damaged one yielded
    // fewer samples than its manifest count, so a count cannot stand in for it).
    for cut in 0..events.len() {
        let mut s = stream(tmp.path(), c.clone());
        let head = render(&mut s, cut);
        let mut r = stream(tmp.path(), c.clone());
        r.restore(&s.state()).unwrap();
        assert_eq!([head, render(&mut r, 1000)].concat(), events, "cut {cut}");
    }
    // A missing shard is reported too, and the stream goes on.
    std::fs::remove_file(&bad).unwrap();
    let mut s = stream(tmp.path(), c);
    assert_eq!(keys(&mut s).len(), 8);
    let errors = s.take_errors();
    assert_eq!(errors.len(), 1);
    assert!(errors[0].0.ends_with("train-000001.tar"));
}

#[test]
fn all_shards_failing_ends_the_stream() {
    let list = ShardList::from_urls(vec!["/nonexistent/a.tar".into()], false).unwrap();
    let c = StreamConfig {
        mode: Mode::Resampled,
        epochs: None,
        ..Default::default()
    };
    let s = Stream::new(list, c, Arc::new(DefaultOpener::default())).unwrap();
    let events: Vec<Event> = s.collect();
    assert_eq!(events.len(), 2);
    assert!(matches!(events[0], Event::ShardError { .. }));
}

#[test]
fn pipe_is_refused_by_default_and_works_when_allowed() {
    let tmp = tempfile::tempdir().unwrap();
    dataset(tmp.path(), &[3]);
    let shard = tmp.path().join("train-000000.tar");
    let spec = format!("pipe:cat {}", shard.display());
    let err = ShardList::resolve(&spec, &SourceOptions::default()).unwrap_err();
    assert!(matches!(err, conmim::Error::Config(_)), "{err}");
    // A list file cannot smuggle a command in either.
    let list = tmp.path().join("list.txt");
    std::fs::write(&list, format!("{spec}\n")).unwrap();
    assert!(ShardList::resolve(list.to_str().unwrap(), &SourceOptions::default()).is_err());
    // Nor can a list built elsewhere, at opening time.
    let l = ShardList::from_specs(vec![conmim::stream::ShardSpec {
        url: spec.clone(),
        nsamples: None,
    }]);
    let mut s = Stream::new(l, cfg(0, 0, 1), Arc::new(DefaultOpener::default())).unwrap();
    assert!(matches!(
        s.next(),
        Some(Event::ShardError {
            error: conmim::Error::Config(_),
            ..
        })
    ));

    let opts = SourceOptions {
        allow_pipe: true,
        ..Default::default()
    };
    let mut s = Stream::open(&spec, &opts, cfg(0, 0, 1)).unwrap();
    let mut k = keys(&mut s);
    k.sort();
    assert_eq!(k, ["s0_0", "s0_1", "s0_2"]);
    assert!(s.take_errors().is_empty());
    // A failing command is reported.
    let mut s = Stream::open("pipe:exit 3", &opts, cfg(0, 0, 1)).unwrap();
    assert!(keys(&mut s).is_empty());
    assert_eq!(s.take_errors().len(), 1);
}

#[test]
fn config_validation_and_serde() {
    assert!(
        StreamConfig {
            rank: 2,
            world_size: 2,
            ..Default::default()
        }
        .validate()
        .is_err()
    );
    assert!(
        StreamConfig {
            world_size: 0,
            ..Default::default()
        }
        .validate()
        .is_err()
    );
    let c: StreamConfig = serde_json::from_str(r#"{"seed": 5, "mode": "resampled"}"#).unwrap();
    assert_eq!(c.mode, Mode::Resampled);
    assert_eq!(c.shuffle_buffer, conmim::stream::DEFAULT_SHUFFLE_BUFFER);
    let list = ShardList::from_urls(vec!["a.tar".into()], false).unwrap();
    assert!(cfg(0, 0, 2).validate_for(&list).is_err());
    assert!(
        StreamConfig {
            remainder: Remainder::Pad,
            ..cfg(0, 1, 2)
        }
        .validate_for(&list)
        .is_ok()
    );
    assert_eq!(
        conmim::stream::parse_dist_env(Some("1"), Some("4")).unwrap(),
        Some((1, 4))
    );
}

/// A tiny HTTP/1.1 server on 127.0.0.1 serving the files of `root`: `/ok/NAME` the
/// file, `/flaky/NAME` the file after two `503`s, `/stall-head/NAME` nothing at all
/// (for 5 s), `/stall-body/NAME` the headers and the first 5000 bytes of the file,
/// then nothing (for 5 s); `/drop-body/NAME` the first 5000 bytes then a closed
/// connection, and on a request with `Range: bytes=N-` a `206` with the rest;
/// `/drop-norange/NAME` the same, but ranges are ignored (a `200` with the whole file);
/// anything else `404`. One request per connection (`Connection: close`), each on its
/// own thread. Returns the base URL and the request log (a ranged request is logged
/// as `PATH @N`).
fn serve(root: &Path) -> (String, Arc<std::sync::Mutex<Vec<String>>>) {
    use std::io::{BufRead, BufReader, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let log = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let (root, seen) = (root.to_owned(), log.clone());
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let (root, seen) = (root.clone(), seen.clone());
            std::thread::spawn(move || {
                let mut r = BufReader::new(conn.try_clone().unwrap());
                let mut line = String::new();
                if r.read_line(&mut line).is_err() {
                    return;
                }
                let path = line.split_whitespace().nth(1).unwrap_or("").to_owned();
                let mut range: Option<usize> = None;
                loop {
                    let mut h = String::new();
                    if r.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                        break;
                    }
                    if let Some(v) = h.to_ascii_lowercase().strip_prefix("range: bytes=") {
                        range = v.trim().trim_end_matches('-').parse().ok();
                    }
                }
                let n = {
                    let mut seen = seen.lock().unwrap();
                    seen.push(match range {
                        Some(at) => format!("{path} @{at}"),
                        None => path.clone(),
                    });
                    seen.iter().filter(|p| p.starts_with(&path)).count()
                };
                let file = |name: &str| std::fs::read(root.join(name)).ok();
                let stall = || std::thread::sleep(std::time::Duration::from_secs(5));
                let (status, body) = match path.split_once('/').map(|x| x.1) {
                    Some(p) if p.starts_with("drop-body/") || p.starts_with("drop-norange/") => {
                        let name = p.split_once('/').unwrap().1;
                        let b = file(name).unwrap();
                        let honour = p.starts_with("drop-body/");
                        let head = match range {
                            Some(at) if honour => format!(
                                "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes {at}-{}/{}\r\n\
                                 Content-Length: {}\r\nConnection: close\r\n\r\n",
                                b.len() - 1,
                                b.len(),
                                b.len() - at
                            ),
                            _ => format!(
                                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                                b.len()
                            ),
                        };
                        let _ = conn.write_all(head.as_bytes());
                        match range {
                            Some(at) if honour => drop(conn.write_all(&b[at..])),
                            // The first request of each: 5000 bytes, then the connection drops.
                            _ if n == 1 => drop(conn.write_all(&b[..5000])),
                            _ => drop(conn.write_all(&b)),
                        }
                        return;
                    }
                    Some(p) if p.starts_with("stall-head/") => {
                        stall();
                        return;
                    }
                    Some(p) if p.starts_with("stall-body/") => {
                        let b = file(&p[11..]).unwrap();
                        let head = format!(
                            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                            b.len()
                        );
                        let _ = conn.write_all(head.as_bytes());
                        let _ = conn.write_all(&b[..5000]);
                        let _ = conn.flush();
                        stall();
                        return;
                    }
                    Some(p) if p.starts_with("ok/") => match file(&p[3..]) {
                        Some(b) => ("200 OK", b),
                        None => ("404 Not Found", Vec::new()),
                    },
                    Some(p) if p.starts_with("flaky/") && n <= 2 => {
                        ("503 Service Unavailable", b"busy".to_vec())
                    }
                    Some(p) if p.starts_with("flaky/") => match file(&p[6..]) {
                        Some(b) => ("200 OK", b),
                        None => ("404 Not Found", Vec::new()),
                    },
                    _ => ("404 Not Found", b"no such shard".to_vec()),
                };
                let head = format!(
                    "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = conn.write_all(head.as_bytes());
                let _ = conn.write_all(&body);
            });
        }
    });
    (base, log)
}

/// An opener with tiny backoff, for tests.
fn fast_http() -> HttpOpener {
    HttpOpener {
        backoff: std::time::Duration::from_millis(5),
        ..HttpOpener::default()
    }
}

fn count(log: &std::sync::Mutex<Vec<String>>, path: &str) -> usize {
    log.lock().unwrap().iter().filter(|p| *p == path).count()
}

#[test]
fn http_shards_stream_like_local_files() {
    let tmp = tempfile::tempdir().unwrap();
    dataset(tmp.path(), &[4, 3, 5]);
    let (base, log) = serve(tmp.path());
    let names: Vec<String> = (0..3)
        .map(|i| conmim::format::shard_name("train", i))
        .collect();
    let urls = names.iter().map(|n| format!("{base}/ok/{n}")).collect();
    let paths = names
        .iter()
        .map(|n| tmp.path().join(n).to_str().unwrap().to_owned())
        .collect();
    let opener = Arc::new(DefaultOpener {
        http: fast_http(),
        ..DefaultOpener::default()
    });
    let c = cfg(3, 0, 1);
    let over_http = ShardList::from_urls(urls, false).unwrap();
    let mut s = Stream::new(over_http, c.clone(), opener.clone()).unwrap();
    let got: Vec<_> = std::iter::from_fn(|| s.next_sample()).collect();
    assert!(s.take_errors().is_empty());
    let on_disk = ShardList::from_urls(paths, false).unwrap();
    let mut s = Stream::new(on_disk, c, opener).unwrap();
    let want: Vec<_> = std::iter::from_fn(|| s.next_sample()).collect();
    assert_eq!(got.len(), 12);
    assert_eq!(got.len(), want.len());
    for (g, w) in got.iter().zip(&want) {
        assert_eq!((g.epoch, g.number), (w.epoch, w.number));
        assert_eq!(g.sample.key, w.sample.key);
        assert_eq!(g.sample.members, w.sample.members);
        assert_eq!(g.sample.index_in_shard, w.sample.index_in_shard);
        assert!(g.sample.shard.starts_with(&base), "{}", g.sample.shard);
    }
    assert_eq!(log.lock().unwrap().len(), 3);
}

#[test]
fn http_retries_server_errors_then_streams() {
    let tmp = tempfile::tempdir().unwrap();
    dataset(tmp.path(), &[3]);
    let (base, log) = serve(tmp.path());
    let name = conmim::format::shard_name("train", 0);
    let url = format!("{base}/flaky/{name}");
    let mut r = fast_http().open(&url).unwrap();
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(&mut r, &mut bytes).unwrap();
    assert_eq!(bytes, std::fs::read(tmp.path().join(&name)).unwrap());
    assert_eq!(count(&log, &format!("/flaky/{name}")), 3);

    // With fewer retries than failures, the error names the URL and the status.
    let url = format!("{base}/flaky/again-{name}");
    let o = HttpOpener {
        retries: 1,
        ..fast_http()
    };
    let err = o.open(&url).err().unwrap().to_string();
    assert!(err.contains(&url) && err.contains("503"), "{err}");
    assert_eq!(count(&log, &format!("/flaky/again-{name}")), 2);
}

#[test]
fn http_not_found_fails_at_once_naming_the_url() {
    let tmp = tempfile::tempdir().unwrap();
    let (base, log) = serve(tmp.path());
    let url = format!("{base}/missing.tar");
    let err = fast_http().open(&url).err().unwrap().to_string();
    assert!(err.contains(&url) && err.contains("404"), "{err}");
    assert_eq!(count(&log, "/missing.tar"), 1);
    // Through a stream: one shard error, then the stream ends.
    let list = ShardList::from_urls(vec![url.clone()], false).unwrap();
    let s = Stream::new(list, cfg(0, 0, 1), Arc::new(DefaultOpener::default())).unwrap();
    let events: Vec<Event> = s.collect();
    assert!(
        matches!(&events[0], Event::ShardError { url: u, .. } if *u == url),
        "{events:?}"
    );
    assert_eq!(count(&log, "/missing.tar"), 2);
}

#[test]
fn http_connection_refused_is_retried_then_reported() {
    // Bind then drop: nothing listens on the port any more.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}/x.tar");
    let o = HttpOpener {
        retries: 2,
        backoff: std::time::Duration::from_millis(20),
        ..HttpOpener::default()
    };
    let t = std::time::Instant::now();
    let err = o.open(&url).err().unwrap().to_string();
    assert!(err.contains(&url) && err.contains("2 retries"), "{err}");
    assert!(t.elapsed() >= std::time::Duration::from_millis(60));
}

/// An opener that gives up on a silent server after 300 ms.
fn impatient_http(retries: u32) -> HttpOpener {
    HttpOpener {
        retries,
        backoff: std::time::Duration::from_millis(5),
        ..HttpOpener::with_timeouts(
            std::time::Duration::from_secs(2),
            std::time::Duration::from_millis(300),
        )
    }
}

#[test]
fn issue3_http_a_silent_server_times_out_is_retried_then_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let (base, log) = serve(tmp.path());
    let url = format!("{base}/stall-head/x.tar");
    let t = std::time::Instant::now();
    let err = impatient_http(1).open(&url).err().unwrap().to_string();
    assert!(err.contains(&url) && err.contains("1 retries"), "{err}");
    assert!(
        err.to_lowercase().contains("timeout") || err.contains("timed out"),
        "{err}"
    );
    // Two attempts of ~0.3 s each, far below the server's 5 s silence.
    assert!(
        t.elapsed() < std::time::Duration::from_secs(4),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(count(&log, "/stall-head/x.tar"), 2);
}

#[test]
fn issue3_http_a_body_stalling_mid_shard_is_a_damaged_shard_and_the_stream_goes_on() {
    let tmp = tempfile::tempdir().unwrap();
    dataset(tmp.path(), &[8, 3]);
    let (base, _log) = serve(tmp.path());
    let names: Vec<String> = (0..2)
        .map(|i| conmim::format::shard_name("train", i))
        .collect();
    let urls = vec![
        format!("{base}/stall-body/{}", names[0]),
        format!("{base}/ok/{}", names[1]),
    ];
    let opener = Arc::new(DefaultOpener {
        http: impatient_http(0),
        ..DefaultOpener::default()
    });
    let c = StreamConfig {
        shuffle_shards: false,
        shuffle_buffer: 0,
        equalize_samples: false,
        ..cfg(0, 0, 1)
    };
    let list = ShardList::from_urls(urls.clone(), false).unwrap();
    let t = std::time::Instant::now();
    let mut s = Stream::new(list, c, opener).unwrap();
    let got = keys(&mut s);
    assert!(
        t.elapsed() < std::time::Duration::from_secs(4),
        "{:?}",
        t.elapsed()
    );
    // 5000 bytes hold the first two samples (2048 bytes each) of shard 0.
    assert_eq!(got, ["s0_0", "s0_1", "s1_0", "s1_1", "s1_2"]);
    let errors = s.take_errors();
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(errors[0].0, urls[0]);
}

#[test]
fn issue6_a_remote_manifest_resolves_its_shards_next_to_it() {
    let tmp = tempfile::tempdir().unwrap();
    dataset(tmp.path(), &[4, 3, 5]);
    let (base, _log) = serve(tmp.path());
    let opts = SourceOptions::default();
    let local = ShardList::resolve(tmp.path().to_str().unwrap(), &opts).unwrap();
    let manifest = format!("{base}/ok/train.manifest.json");
    for spec in [manifest.clone(), format!("{base}/ok/")] {
        let remote = ShardList::resolve(&spec, &opts).unwrap();
        assert_eq!(remote.len(), 3);
        for (r, l) in remote.shards().iter().zip(local.shards()) {
            let name = Path::new(&l.url).file_name().unwrap().to_str().unwrap();
            assert_eq!(r.url, format!("{base}/ok/{name}"));
            assert_eq!(r.nsamples, l.nsamples);
        }
        assert_eq!(remote.total_samples(), Some(12));
    }
    // Streams like the local dataset, sample counts (and so rank equalising) included.
    let mut over_http = Stream::open(&manifest, &opts, cfg(5, 0, 1)).unwrap();
    let mut on_disk = stream(tmp.path(), cfg(5, 0, 1));
    assert_eq!(keys(&mut over_http), keys(&mut on_disk));
    // A missing remote manifest names its URL.
    let missing = format!("{base}/ok/val.manifest.json");
    let err = ShardList::resolve(&missing, &opts)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains(&missing) && err.contains("404"), "{err}");
}

/// A connection that drops in the middle of a shard is resumed with a range request,
/// and the stream sees the whole shard; a server that ignores ranges (answers `200`)
/// works too (the bytes already read are skipped).
#[test]
fn issue3_http_a_dropped_connection_is_resumed_where_it_stopped() {
    let tmp = tempfile::tempdir().unwrap();
    dataset(tmp.path(), &[8]);
    let (base, log) = serve(tmp.path());
    let name = conmim::format::shard_name("train", 0);
    let want = std::fs::read(tmp.path().join(&name)).unwrap();
    for kind in ["drop-body", "drop-norange"] {
        let path = format!("/{kind}/{name}");
        let mut r = fast_http().open(&format!("{base}{path}")).unwrap();
        let mut got = Vec::new();
        std::io::Read::read_to_end(&mut r, &mut got).unwrap();
        assert!(
            got == want,
            "{kind}: {} of {} bytes, not the file",
            got.len(),
            want.len()
        );
        let requests: Vec<String> = log
            .lock()
            .unwrap()
            .iter()
            .filter(|p| p.starts_with(&path))
            .cloned()
            .collect();
        assert_eq!(requests, [path.clone(), format!("{path} @5000")], "{kind}");
    }
    // Through a stream: all 8 samples, no shard error.
    let url = format!("{base}/drop-body/{name}");
    let list = ShardList::from_urls(vec![url], false).unwrap();
    let opener = Arc::new(DefaultOpener {
        http: fast_http(),
        ..DefaultOpener::default()
    });
    let c = StreamConfig {
        shuffle_buffer: 0,
        ..cfg(0, 0, 1)
    };
    let mut s = Stream::new(list, c, opener).unwrap();
    assert_eq!(keys(&mut s).len(), 8);
    assert!(s.take_errors().is_empty());
}
