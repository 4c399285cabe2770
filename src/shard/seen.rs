//! First-wins duplicate detection for `conmim-shard index`, at about 16 bytes per key.
//!
//! The index decides each row before it writes it, so it needs an online "seen this key
//! before, and where?" over every key of the dataset. A hash map of 128-bit key hashes
//! and shard positions peaked at 1.6 GB for 15 million keys (its spare buckets, and old
//! and new tables side by side while it grows). [`SeenKeys`] keeps one sorted `u128`
//! per key instead (271 MB peak for the same keys): the top 96 bits of the key's
//! xxh3-128 hash, with the shard position of its first occurrence in the low 32 bits.
//! New keys go into a small hash map first, which is merged into the sorted array (in
//! place, from the back) when it reaches a sixteenth of it: the map stays small, and
//! each entry is moved about 16 times in all. A lookup is a binary search (under 1 µs
//! at 15 million keys; hashing a sample's bytes alone takes tens of microseconds).
//!
//! Two different keys share 96 hash bits with a chance of about n² / 2⁹⁷: 1.4e-15 at
//! 15 million keys.

use std::collections::HashMap;

/// The low bits that hold the shard position.
const POS_MASK: u128 = u32::MAX as u128;
/// Keys held in the map before a merge, at least.
const MIN_RECENT: usize = 1 << 16;
/// The map is merged when it holds this fraction of the sorted array.
const RECENT_SHARE: usize = 16;

/// The keys seen so far, each with the shard position where it was first seen.
#[derive(Debug, Default)]
pub(crate) struct SeenKeys {
    /// Sorted entries: hash (top 96 bits) | shard position (low 32 bits).
    merged: Vec<u128>,
    /// Keys since the last merge: hash (low 32 bits zero) -> shard position.
    recent: HashMap<u128, u32>,
}

impl SeenKeys {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// How many distinct keys were recorded.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.merged.len() + self.recent.len()
    }

    /// Records `key` as first seen in shard `pos` and returns `None`; or, when `key`
    /// was seen before, returns the shard position of its first occurrence.
    pub(crate) fn first_or_insert(&mut self, key: &str, pos: u32) -> Option<u32> {
        let h = xxhash_rust::xxh3::xxh3_128(key.as_bytes()) & !POS_MASK;
        if let Some(&first) = self.recent.get(&h) {
            return Some(first);
        }
        // `h` has a zero position, so it sorts before every entry with its hash.
        let i = self.merged.partition_point(|&e| e < h);
        if let Some(&e) = self.merged.get(i)
            && e & !POS_MASK == h
        {
            return Some((e & POS_MASK) as u32);
        }
        self.recent.insert(h, pos);
        if self.recent.len() >= MIN_RECENT.max(self.merged.len() / RECENT_SHARE) {
            self.merge();
        }
        None
    }

    /// Moves the recent keys into the sorted array.
    fn merge(&mut self) {
        let mut new: Vec<u128> = self
            .recent
            .drain()
            .map(|(h, pos)| h | u128::from(pos))
            .collect();
        new.sort_unstable();
        let old = self.merged.len();
        self.merged.reserve_exact(new.len());
        self.merged.resize(old + new.len(), 0);
        // Merge from the back: slots past `i + j` are free, so nothing is overwritten
        // before it is read. The hashes are distinct, so the order is strict.
        let (mut i, mut j) = (old, new.len());
        while j > 0 {
            if i > 0 && self.merged[i - 1] > new[j - 1] {
                self.merged[i + j - 1] = self.merged[i - 1];
                i -= 1;
            } else {
                self.merged[i + j - 1] = new[j - 1];
                j -= 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reference: a plain map of whole keys.
    fn check_against_map(keys: &[String], positions: &[u32]) {
        let mut seen = SeenKeys::new();
        let mut reference: HashMap<&str, u32> = HashMap::new();
        for (k, &pos) in keys.iter().zip(positions) {
            let want = reference.get(k.as_str()).copied();
            assert_eq!(seen.first_or_insert(k, pos), want, "key {k}");
            reference.entry(k).or_insert(pos);
        }
        assert_eq!(seen.len(), reference.len());
    }

    #[test]
    fn first_occurrence_wins_across_many_merges() {
        // 300k keys with repeats at every distance: within the map, across a merge,
        // and long after; positions up to u32::MAX survive the packing.
        let n = 300_000u64;
        let mut keys = Vec::new();
        let mut positions = Vec::new();
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for i in 0..n {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            // About a third of the draws repeat an earlier key.
            let k = if i > 10 && x.is_multiple_of(3) {
                x % i
            } else {
                i
            };
            keys.push(format!("sample{k:09}"));
            positions.push(if i % 7 == 0 {
                u32::MAX - (i as u32)
            } else {
                (i / 100) as u32
            });
        }
        check_against_map(&keys, &positions);
    }

    #[test]
    fn merges_keep_the_array_sorted_and_complete() {
        let mut seen = SeenKeys::new();
        let n = 3 * MIN_RECENT + 5;
        for i in 0..n {
            assert_eq!(seen.first_or_insert(&i.to_string(), i as u32), None);
        }
        assert!(
            seen.merged.len() >= 3 * MIN_RECENT,
            "merged {}",
            seen.merged.len()
        );
        assert!(seen.merged.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(seen.len(), n);
        for i in (0..n).rev() {
            assert_eq!(seen.first_or_insert(&i.to_string(), 0), Some(i as u32));
        }
    }
}
