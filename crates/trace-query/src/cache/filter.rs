//! The membership filter of known lots: a Bloom filter on a Redis bitmap, so floods of requests
//! for lots that do not exist are answered without reaching PostgreSQL.
//!
//! - `k` bit positions per lot by double hashing (SHA-256 of the lot name: stable across
//!   processes and versions); a lot is "maybe known" when all its bits are set, "certainly
//!   unknown" when one is not. Bits are only ever set (a lot never stops being known), so there
//!   are no false "unknown"s as long as every known lot's bits were written.
//! - Bit 0 is a sentinel, set once the filter was (re)built from the read model. Redis restarted
//!   empty (or the filter key lost) reads as "not ready" and the filter is bypassed until it is
//!   rebuilt — never as "every lot unknown".
//! - Reads are one `BITFIELD … GET u1 …` round trip; writes one `BITFIELD … SET u1 … 1`; a
//!   rebuild ORs a bitmap computed from the read model into the key (`BITOP OR`), so lots added
//!   concurrently by the projection are never lost.

use sha2::{Digest, Sha256};

/// Size and hash count of the filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BloomParams {
    /// Bits of the bitmap, the sentinel bit 0 included.
    pub bits: u64,
    pub hashes: u32,
}

/// Redis strings are at most 512 MiB.
const MAX_BITS: u64 = 512 * 1024 * 1024 * 8 - 1;

impl BloomParams {
    /// Optimal size for `capacity` items at false-positive rate `p`:
    /// `m = −n·ln p / (ln 2)²`, `k = (m / n)·ln 2`.
    pub fn for_capacity(capacity: u64, p: f64) -> Self {
        let n = capacity.max(1) as f64;
        let p = if p.is_finite() && p > 0.0 && p < 1.0 {
            p
        } else {
            0.01
        };
        let ln2 = std::f64::consts::LN_2;
        let m = (-n * p.ln() / (ln2 * ln2))
            .ceil()
            .clamp(64.0, MAX_BITS as f64) as u64;
        let k = ((m as f64 / n) * ln2).round().clamp(1.0, 16.0) as u32;
        Self {
            bits: m + 1,
            hashes: k,
        }
    }

    /// The bit offsets of `lot` (never 0, the sentinel).
    pub fn positions(&self, lot: &str) -> Vec<u64> {
        let digest = Sha256::digest(lot.as_bytes());
        let word = |i: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&digest[i * 8..i * 8 + 8]);
            u64::from_le_bytes(b)
        };
        let (h1, h2) = (word(0), word(1) | 1);
        let m = self.bits - 1;
        (0..u64::from(self.hashes))
            .map(|i| h1.wrapping_add(i.wrapping_mul(h2)) % m + 1)
            .collect()
    }

    /// Bytes of a Redis bitmap of this size (bit `o` is the `7 - o % 8`th bit of byte `o / 8`).
    pub fn empty_bitmap(&self) -> Vec<u8> {
        vec![0; self.bits.div_ceil(8) as usize]
    }
}

/// Sets `offset` in a bitmap laid out as Redis does.
pub fn set_bit(bitmap: &mut [u8], offset: u64) {
    if let Some(b) = bitmap.get_mut((offset / 8) as usize) {
        *b |= 0x80 >> (offset % 8);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizing_follows_the_textbook_formulas() {
        let p = BloomParams::for_capacity(1_000_000, 0.01);
        // ~9.59 bits per item, 7 hashes.
        assert!((9_500_000..9_700_000).contains(&p.bits), "{p:?}");
        assert_eq!(p.hashes, 7);
        let tiny = BloomParams::for_capacity(0, 2.0);
        assert!(tiny.bits >= 65 && tiny.hashes >= 1);
    }

    #[test]
    fn positions_are_stable_distinct_and_never_the_sentinel() {
        let p = BloomParams::for_capacity(1000, 0.01);
        let a = p.positions("STEEL-L1");
        assert_eq!(a, p.positions("STEEL-L1"));
        assert_eq!(a.len(), p.hashes as usize);
        assert!(a.iter().all(|&o| o >= 1 && o < p.bits));
        assert_ne!(a, p.positions("STEEL-L2"));
    }

    #[test]
    fn false_positive_rate_is_near_the_target() {
        let p = BloomParams::for_capacity(10_000, 0.01);
        let mut bitmap = p.empty_bitmap();
        for i in 0..10_000 {
            for o in p.positions(&format!("LOT-{i}")) {
                set_bit(&mut bitmap, o);
            }
        }
        let get = |o: u64| bitmap[(o / 8) as usize] & (0x80 >> (o % 8)) != 0;
        for i in 0..10_000 {
            assert!(p.positions(&format!("LOT-{i}")).into_iter().all(get));
        }
        let fp = (0..10_000)
            .filter(|i| p.positions(&format!("UNKNOWN-{i}")).into_iter().all(get))
            .count();
        assert!(fp < 200, "{fp} false positives in 10000");
    }
}
