//! The sample shuffle buffer.
//!
//! A fixed-capacity reservoir (the WebDataset `shuffle` scheme): while it has room an
//! incoming item is stored and nothing comes out; once it is full each incoming item
//! replaces a uniformly chosen stored one, which comes out; at the end of the input
//! [`ShuffleBuffer::drain`] takes the rest out in random order. Every choice is drawn
//! from one [`SplitMix64`], so the output is a pure function of (input order, seed).
//!
//! The contents are never serialised: the stream resumes by replaying its input from
//! the start of the epoch (see [`super::StreamState`]), which rebuilds the buffer
//! exactly because its decisions depend only on how many items arrived.

use crate::seed::SplitMix64;

/// A seeded, fixed-capacity shuffle buffer. Capacity 0 passes items straight through.
#[derive(Debug, Clone)]
pub struct ShuffleBuffer<T> {
    capacity: usize,
    items: Vec<T>,
    rng: SplitMix64,
}

impl<T> ShuffleBuffer<T> {
    /// An empty buffer holding up to `capacity` items, choosing with `rng`.
    pub fn new(capacity: usize, rng: SplitMix64) -> Self {
        ShuffleBuffer {
            capacity,
            items: Vec::with_capacity(capacity.min(1 << 16)),
            rng,
        }
    }

    /// Maximum number of stored items.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Items stored now.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Whether nothing is stored.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Offers `item`; returns the item that comes out, if any.
    pub fn push(&mut self, item: T) -> Option<T> {
        if self.capacity == 0 {
            return Some(item);
        }
        if self.items.len() < self.capacity {
            self.items.push(item);
            return None;
        }
        let j = self.rng.below(self.items.len() as u64) as usize;
        Some(std::mem::replace(&mut self.items[j], item))
    }

    /// Takes out one stored item, chosen at random (end of input).
    pub fn drain(&mut self) -> Option<T> {
        if self.items.is_empty() {
            return None;
        }
        let j = self.rng.below(self.items.len() as u64) as usize;
        Some(self.items.swap_remove(j))
    }

    /// Empties the buffer and starts choosing with `rng`.
    pub fn reset(&mut self, rng: SplitMix64) {
        self.items.clear();
        self.rng = rng;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(cap: usize, seed: u64, n: u32) -> Vec<u32> {
        let mut b = ShuffleBuffer::new(cap, SplitMix64::new(seed, 0));
        let mut out: Vec<u32> = (0..n).filter_map(|i| b.push(i)).collect();
        while let Some(x) = b.drain() {
            out.push(x);
        }
        out
    }

    #[test]
    fn permutes_deterministically() {
        let a = run(16, 1, 200);
        assert_eq!(a, run(16, 1, 200));
        assert_ne!(a, run(16, 2, 200));
        assert_ne!(a, (0..200).collect::<Vec<_>>());
        let mut s = a.clone();
        s.sort();
        assert_eq!(s, (0..200).collect::<Vec<_>>());
        assert_eq!(run(0, 1, 50), (0..50).collect::<Vec<_>>());
        assert_eq!(run(1, 1, 50), (0..50).collect::<Vec<_>>());
    }
}
