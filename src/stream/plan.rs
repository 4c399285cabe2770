//! Which shards a rank reads in an epoch, in which order (see the module docs of
//! [`super`] for the full epoch semantics).

use serde::{Deserialize, Serialize};

use super::url::ShardList;
use crate::error::{Error, Result};
use crate::seed::SplitMix64;

/// Default seed.
pub const DEFAULT_SEED: u64 = 0;
/// Default sample shuffle buffer capacity (samples; 0 = no sample shuffle).
pub const DEFAULT_SHUFFLE_BUFFER: usize = 2048;
/// Largest shuffle buffer accepted by [`StreamConfig::validate`].
pub const MAX_SHUFFLE_BUFFER: usize = 1 << 20;
/// Environment variable holding the global rank (as torchrun sets it).
pub const ENV_RANK: &str = "RANK";
/// Environment variable holding the number of processes (as torchrun sets it).
pub const ENV_WORLD_SIZE: &str = "WORLD_SIZE";

/// Random-stream tags: each use of randomness gets its own SplitMix64 stream.
const TAG_SHARD_SHUFFLE: u64 = 0x5348_4152_4453_4855; // "SHARDSHU"
const TAG_RESAMPLE: u64 = 0x5245_5341_4d50_4c45; // "RESAMPLE"
const TAG_SAMPLE_SHUFFLE: u64 = 0x5341_4d50_4c45_5348; // "SAMPLESH"

/// Stream number for (tag, epoch, rank): part of the determinism contract.
pub fn stream_id(tag: u64, epoch: u64, rank: u64) -> u64 {
    let mut g = SplitMix64::from_state(
        tag ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ rank.wrapping_mul(0xC2B2_AE3D_27D4_EB4F),
    );
    g.next_u64()
}

/// How shards are drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Exact epochs: every epoch is a (seeded) permutation of the shard list split
    /// across ranks by [`Remainder`].
    #[default]
    Epoch,
    /// Infinite sampling with replacement: each rank independently draws
    /// `ceil(num_shards / world_size)` shards per (virtual) epoch.
    Resampled,
}

/// What happens in [`Mode::Epoch`] to the `num_shards % world_size` shards left over
/// when the (shuffled) list does not divide evenly between ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Remainder {
    /// Every rank reads `floor(n / world)` shards; the last `n % world` positions of
    /// the epoch's permutation are skipped this epoch. With `shuffle_shards` the
    /// permutation changes every epoch, so different shards are skipped each time;
    /// without it the same last shards are skipped every epoch (use `Pad` or `Keep`, or
    /// a shard count divisible by the world size). Ranks stay in lock-step.
    #[default]
    Drop,
    /// Every rank reads `ceil(n / world)` shards: the permutation is extended by
    /// wrapping around to its start, so `(world - n % world) % world` shards are read
    /// twice this epoch (PyTorch `DistributedSampler` without `drop_last`).
    Pad,
    /// Every shard is read exactly once; the first `n % world` ranks read one shard
    /// more than the others. Ranks can fall out of lock-step (DDP must cope).
    Keep,
}

/// Everything that decides the sample order of a rank. The defaults are the named
/// consts of this module; `serde(default)` fills missing fields.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StreamConfig {
    /// Seed of every random choice.
    pub seed: u64,
    /// This process's rank, `0..world_size`.
    pub rank: usize,
    /// Number of processes sharing the data.
    pub world_size: usize,
    /// Exact epochs or resampling.
    pub mode: Mode,
    /// How [`Mode::Epoch`] handles shards that do not divide between ranks.
    pub remainder: Remainder,
    /// Shuffle the shard list every epoch (else list order every epoch).
    pub shuffle_shards: bool,
    /// Capacity of the sample shuffle buffer in samples (0 = off).
    pub shuffle_buffer: usize,
    /// In [`Mode::Epoch`], when every shard's sample count is known (a manifest), stop
    /// every rank after the smallest per-rank sample count of the epoch, so all ranks
    /// yield the same number of samples. Ignored otherwise, and with
    /// [`Remainder::Keep`] (which reads everything).
    pub equalize_samples: bool,
    /// Stop after this many epochs (counted from epoch 0); `None` = never.
    pub epochs: Option<u64>,
}

impl Default for StreamConfig {
    fn default() -> Self {
        StreamConfig {
            seed: DEFAULT_SEED,
            rank: 0,
            world_size: 1,
            mode: Mode::Epoch,
            remainder: Remainder::Drop,
            shuffle_shards: true,
            shuffle_buffer: DEFAULT_SHUFFLE_BUFFER,
            equalize_samples: true,
            epochs: None,
        }
    }
}

impl StreamConfig {
    /// Checks the values on their own.
    pub fn validate(&self) -> Result<()> {
        if self.world_size == 0 {
            return Err(Error::Config(
                "stream: world_size must be at least 1".into(),
            ));
        }
        if self.rank >= self.world_size {
            return Err(Error::Config(format!(
                "stream: rank {} is not below world_size {}",
                self.rank, self.world_size
            )));
        }
        if self.shuffle_buffer > MAX_SHUFFLE_BUFFER {
            return Err(Error::Config(format!(
                "stream: shuffle_buffer {} exceeds {MAX_SHUFFLE_BUFFER}",
                self.shuffle_buffer
            )));
        }
        Ok(())
    }

    /// Checks the values against a shard list: with [`Remainder::Drop`] every rank must
    /// get a shard. [`Remainder::Keep`] (evaluation: every shard read once) lets ranks
    /// past the last shard read nothing: a small validation set on many GPUs.
    pub fn validate_for(&self, list: &ShardList) -> Result<()> {
        self.validate()?;
        let n = list.len();
        if n == 0 {
            return Err(Error::Config("stream: the shard list is empty".into()));
        }
        if self.mode == Mode::Epoch && self.remainder == Remainder::Drop && n < self.world_size {
            return Err(Error::Config(format!(
                "stream: {n} shards cannot feed {} ranks (use remainder = pad or resampled mode)",
                self.world_size
            )));
        }
        Ok(())
    }

    /// `self` with rank and world size taken from `RANK` / `WORLD_SIZE` when both are
    /// set (`LOCAL_RANK` is ignored: shards are split by global rank).
    pub fn with_env_distribution(mut self) -> Result<Self> {
        let rank = std::env::var(ENV_RANK).ok();
        let world = std::env::var(ENV_WORLD_SIZE).ok();
        if let Some((r, w)) = parse_dist_env(rank.as_deref(), world.as_deref())? {
            self.rank = r;
            self.world_size = w;
        }
        Ok(self)
    }

    /// A default config with the distribution from the environment.
    pub fn from_env() -> Result<Self> {
        StreamConfig::default().with_env_distribution()
    }

    /// Random generator of the sample shuffle buffer for `epoch` on this rank.
    pub fn sample_rng(&self, epoch: u64) -> SplitMix64 {
        SplitMix64::new(
            self.seed,
            stream_id(TAG_SAMPLE_SHUFFLE, epoch, self.rank as u64),
        )
    }
}

/// Parses `RANK` and `WORLD_SIZE` values: both absent = `None` (single process); one
/// without the other, a non-number, `WORLD_SIZE = 0` or `RANK >= WORLD_SIZE` is an
/// error.
pub fn parse_dist_env(rank: Option<&str>, world: Option<&str>) -> Result<Option<(usize, usize)>> {
    let num = |name: &str, v: &str| {
        v.trim()
            .parse::<usize>()
            .map_err(|_| Error::Config(format!("{name}=`{v}` is not a non-negative integer")))
    };
    match (rank, world) {
        (None, None) => Ok(None),
        (Some(_), None) | (None, Some(_)) => Err(Error::Config(format!(
            "{ENV_RANK} and {ENV_WORLD_SIZE} must be set together"
        ))),
        (Some(r), Some(w)) => {
            let (r, w) = (num(ENV_RANK, r)?, num(ENV_WORLD_SIZE, w)?);
            if w == 0 || r >= w {
                return Err(Error::Config(format!(
                    "{ENV_RANK}={r} must be below {ENV_WORLD_SIZE}={w} (and {ENV_WORLD_SIZE} > 0)"
                )));
            }
            Ok(Some((r, w)))
        }
    }
}

/// What one rank reads in one epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EpochPlan {
    /// The epoch.
    pub epoch: u64,
    /// Positions in the shard list, in reading order.
    pub shards: Vec<usize>,
    /// Samples to read at most (sample equalisation), `None` = all.
    pub sample_limit: Option<u64>,
}

/// The epoch's permutation of `0..n` (identity when `shuffle` is off).
pub fn shard_order(n: usize, seed: u64, epoch: u64, shuffle: bool) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    if shuffle {
        SplitMix64::new(seed, stream_id(TAG_SHARD_SHUFFLE, epoch, 0)).shuffle(&mut order);
    }
    order
}

fn rank_shards(order: &[usize], cfg: &StreamConfig, rank: usize) -> Vec<usize> {
    let (n, w) = (order.len(), cfg.world_size);
    if n == 0 {
        return Vec::new();
    }
    match cfg.remainder {
        Remainder::Drop => (0..n / w).map(|k| order[rank + k * w]).collect(),
        Remainder::Pad => (0..n.div_ceil(w))
            .map(|k| order[(rank + k * w) % n])
            .collect(),
        Remainder::Keep => (rank..n).step_by(w).map(|i| order[i]).collect(),
    }
}

/// The plan of `cfg.rank` for `epoch` (`cfg.validate_for(list)` must hold).
pub fn epoch_plan(list: &ShardList, cfg: &StreamConfig, epoch: u64) -> EpochPlan {
    epoch_plan_excluding(list, cfg, epoch, &[])
}

/// The plan of `cfg.rank` for what is left of `epoch` once the shards `excluded` (their
/// positions in the list) have been read: the epoch's permutation less those shards,
/// split over the ranks as [`epoch_plan`] splits the whole of it (remainder and sample
/// equalisation over what is left). For a run resumed with another world size (see
/// [`Stream::rejoin`](super::Stream::rejoin)). [`Mode::Resampled`] excludes nothing.
pub fn epoch_plan_excluding(
    list: &ShardList,
    cfg: &StreamConfig,
    epoch: u64,
    excluded: &[usize],
) -> EpochPlan {
    let n = list.len();
    match cfg.mode {
        Mode::Epoch => {
            let mut order = shard_order(n, cfg.seed, epoch, cfg.shuffle_shards);
            if !excluded.is_empty() {
                let mut gone = vec![false; n];
                for &i in excluded.iter().filter(|&&i| i < n) {
                    gone[i] = true;
                }
                order.retain(|&i| !gone[i]);
            }
            let shards = rank_shards(&order, cfg, cfg.rank);
            let counts: Option<Vec<u64>> = list.shards().iter().map(|s| s.nsamples).collect();
            let sample_limit = match counts {
                Some(counts) if cfg.equalize_samples && cfg.remainder != Remainder::Keep => (0
                    ..cfg.world_size)
                    .map(|r| {
                        rank_shards(&order, cfg, r)
                            .iter()
                            .map(|&i| counts[i])
                            .sum::<u64>()
                    })
                    .min(),
                _ => None,
            };
            EpochPlan {
                epoch,
                shards,
                sample_limit,
            }
        }
        Mode::Resampled => {
            let mut rng =
                SplitMix64::new(cfg.seed, stream_id(TAG_RESAMPLE, epoch, cfg.rank as u64));
            let shards = (0..n.div_ceil(cfg.world_size))
                .map(|_| rng.below(n as u64) as usize)
                .collect();
            EpochPlan {
                epoch,
                shards,
                sample_limit: None,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(n: usize, counts: Option<u64>) -> ShardList {
        ShardList::from_specs(
            (0..n)
                .map(|i| super::super::url::ShardSpec {
                    url: format!("s{i}.tar"),
                    nsamples: counts.map(|c| c + i as u64),
                })
                .collect(),
        )
    }

    fn plans(n: usize, w: usize, rem: Remainder, epoch: u64) -> Vec<Vec<usize>> {
        let l = list(n, None);
        (0..w)
            .map(|rank| {
                let cfg = StreamConfig {
                    rank,
                    world_size: w,
                    remainder: rem,
                    ..Default::default()
                };
                cfg.validate_for(&l).unwrap();
                epoch_plan(&l, &cfg, epoch).shards
            })
            .collect()
    }

    #[test]
    fn remainder_rules() {
        let keep: Vec<usize> = plans(10, 3, Remainder::Keep, 0).concat();
        let mut all = keep.clone();
        all.sort();
        assert_eq!(all, (0..10).collect::<Vec<_>>());
        let drop = plans(10, 3, Remainder::Drop, 0);
        assert!(drop.iter().all(|p| p.len() == 3));
        let mut d = drop.concat();
        d.sort();
        d.dedup();
        assert_eq!(d.len(), 9);
        // Fewer shards than ranks: Keep reads each shard once (the last rank nothing),
        // Drop is refused.
        assert_eq!(plans(2, 3, Remainder::Keep, 0)[2], Vec::<usize>::new());
        let few = StreamConfig {
            world_size: 3,
            ..Default::default()
        };
        let e = few.validate_for(&list(2, None)).unwrap_err().to_string();
        assert!(e.contains("2 shards cannot feed 3 ranks"), "{e}");
        let pad = plans(10, 3, Remainder::Pad, 0);
        assert!(pad.iter().all(|p| p.len() == 4));
        let mut p = pad.concat();
        p.sort();
        p.dedup();
        assert_eq!(p.len(), 10);
        assert_ne!(plans(10, 3, Remainder::Drop, 1), drop);
    }

    #[test]
    fn equalize_takes_the_smallest_rank() {
        let l = list(5, Some(10));
        let limits: Vec<Option<u64>> = (0..2)
            .map(|rank| {
                let cfg = StreamConfig {
                    rank,
                    world_size: 2,
                    ..Default::default()
                };
                epoch_plan(&l, &cfg, 3).sample_limit
            })
            .collect();
        assert_eq!(limits[0], limits[1]);
        assert!(limits[0].unwrap() >= 20);
    }

    /// Resampled mode as documented: `ceil(n / w)` draws per epoch, uniform with
    /// replacement, a pure function of (seed, epoch, rank), independent across ranks.
    #[test]
    fn resampled_plans() {
        let (n, w) = (10, 3);
        let l = list(n, Some(5));
        let plan = |seed: u64, rank: usize, epoch: u64| {
            let cfg = StreamConfig {
                seed,
                rank,
                world_size: w,
                mode: Mode::Resampled,
                ..Default::default()
            };
            cfg.validate_for(&l).unwrap();
            epoch_plan(&l, &cfg, epoch)
        };
        let p = plan(1, 0, 0);
        assert_eq!(p.shards.len(), n.div_ceil(w));
        assert_eq!(
            p.sample_limit, None,
            "no equalising: ranks draw independently"
        );
        assert_eq!(plan(1, 0, 0).shards, p.shards, "deterministic");
        assert_ne!(plan(1, 1, 0).shards, p.shards, "ranks differ");
        assert_ne!(plan(1, 0, 1).shards, p.shards, "epochs differ");
        assert_ne!(plan(2, 0, 0).shards, p.shards, "seeds differ");
        let mut counts = vec![0u32; n];
        let mut repeats = 0;
        for epoch in 0..2000 {
            let s = plan(1, 2, epoch).shards;
            let mut d = s.clone();
            d.sort();
            d.dedup();
            repeats += usize::from(d.len() < s.len());
            for i in s {
                counts[i] += 1;
            }
        }
        // 8,000 draws over 10 shards: 800 each expected (sd ~27).
        assert!(
            counts.iter().all(|&c| (680..=920).contains(&c)),
            "{counts:?}"
        );
        assert!(repeats > 0, "drawn with replacement");
    }

    #[test]
    fn env_parsing() {
        assert_eq!(parse_dist_env(None, None).unwrap(), None);
        assert_eq!(parse_dist_env(Some("3"), Some("8")).unwrap(), Some((3, 8)));
        assert!(parse_dist_env(Some("8"), Some("8")).is_err());
        assert!(parse_dist_env(Some("1"), None).is_err());
        assert!(parse_dist_env(Some("x"), Some("2")).is_err());
        assert!(parse_dist_env(Some("0"), Some("0")).is_err());
    }
}
