//! Deterministic randomness. SplitMix64 is tiny, fast and fully specified, so a seed
//! gives the same shuffle today and after any dependency upgrade — which the
//! "same inputs + seed -> byte-identical dataset" contract needs.

/// Domain of the per-rank seed mix (`"RANK"`).
const RANK_DOMAIN: u64 = 0x5241_4e4b;

/// The seed of one rank's random draws: the loader's per-sample crop, flip, colour
/// ops, mask and classification augmentations, and the trainers' drop path and mixup.
/// Rank 0 keeps `seed` itself, so a single process draws what it always drew; the
/// other ranks xor it with a mix of their rank. In the loader, sample numbers count
/// within each rank's output, so without this, sample `n` of every rank would get the
/// same crop, flip and mask: with 8 ranks, a global batch of 2048 would hold only 256
/// distinct masks (the official code seeds every rank with `seed + rank`). The shard
/// and sample shuffles keep the plain seed: every rank must draw the same epoch plan.
pub fn rank_seed(seed: u64, rank: usize) -> u64 {
    if rank == 0 {
        seed
    } else {
        seed ^ SplitMix64::new(RANK_DOMAIN, rank as u64).next_u64()
    }
}

/// SplitMix64 generator (Steele, Lea & Flood 2014; the seeding generator of xoshiro).
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// A generator for a stream identified by `seed` and a `stream` number.
    pub fn new(seed: u64, stream: u64) -> Self {
        let mut g = SplitMix64(seed ^ stream.wrapping_mul(0xD1B5_4A32_D192_ED03));
        g.next_u64();
        g
    }

    /// A generator starting from the raw state `state` (no stream mixing).
    pub fn from_state(state: u64) -> Self {
        SplitMix64(state)
    }

    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform integer in `0..n` (Lemire's multiply-shift with rejection; `n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        debug_assert!(n > 0);
        loop {
            let x = self.next_u64();
            let m = (x as u128) * (n as u128);
            let low = m as u64;
            if low >= n.wrapping_neg() % n {
                return (m >> 64) as u64;
            }
        }
    }

    /// Uniform integer in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        assert!(lo <= hi, "SplitMix64::range: {lo} > {hi}");
        match (hi - lo).checked_add(1) {
            Some(n) => lo + self.below(n),
            None => self.next_u64(),
        }
    }

    /// Fisher–Yates shuffle in place.
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            items.swap(i, j);
        }
    }
}

/// Stable 64-bit hash of a string under a seed (xxh3), used for bucket and part
/// assignment.
pub fn hash_str(seed: u64, s: &str) -> u64 {
    xxhash_rust::xxh3::xxh3_64_with_seed(s.as_bytes(), seed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rank_seeds_are_distinct_and_rank_zero_is_the_seed() {
        for seed in [0, 17, u64::MAX] {
            assert_eq!(rank_seed(seed, 0), seed);
            let seeds: std::collections::HashSet<u64> =
                (0..4096).map(|r| rank_seed(seed, r)).collect();
            assert_eq!(seeds.len(), 4096, "seed {seed}");
        }
    }

    #[test]
    fn splitmix_reference_values() {
        // Reference: SplitMix64 seeded with 0 gives 0xE220A8397B1DCDAF first.
        let mut g = SplitMix64(0);
        assert_eq!(g.next_u64(), 0xE220_A839_7B1D_CDAF);
    }

    #[test]
    fn shuffle_is_a_permutation_and_seeded() {
        let mut a: Vec<u32> = (0..1000).collect();
        let mut b = a.clone();
        SplitMix64::new(7, 1).shuffle(&mut a);
        SplitMix64::new(7, 1).shuffle(&mut b);
        assert_eq!(a, b);
        let mut c = a.clone();
        c.sort();
        assert_eq!(c, (0..1000).collect::<Vec<_>>());
        assert_ne!(a, (0..1000).collect::<Vec<_>>());
        let mut d: Vec<u32> = (0..1000).collect();
        SplitMix64::new(8, 1).shuffle(&mut d);
        assert_ne!(a, d);
    }

    #[test]
    fn below_stays_in_range() {
        let mut g = SplitMix64::new(1, 2);
        for n in [1u64, 2, 3, 7, 1000, u64::MAX] {
            for _ in 0..100 {
                assert!(g.below(n) < n);
            }
        }
    }
}
