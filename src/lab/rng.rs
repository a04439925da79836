//! A tiny deterministic random number generator (SplitMix64), so that every strategy sees
//! the same sequence of sizes and choices for a given seed.

/// SplitMix64 (Steele, Lea and Flood): one add, two multiply-xorshifts per number.
///
/// Not cryptographic and not meant to be: workloads only need cheap, reproducible sizes.
#[derive(Clone, Debug)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    /// A generator whose sequence is fixed by `seed`.
    pub fn new(seed: u64) -> Self {
        SplitMix64 { state: seed }
    }

    /// The next 64 random bits.
    #[inline]
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `lo..=hi` (slightly biased for huge ranges, which workloads never use).
    #[inline]
    pub fn range(&mut self, lo: usize, hi: usize) -> usize {
        debug_assert!(lo <= hi, "empty range {lo}..={hi}");
        lo + (self.next_u64() % (hi - lo + 1) as u64) as usize
    }

    /// True with probability `1 / n`.
    #[inline]
    pub fn one_in(&mut self, n: u64) -> bool {
        self.next_u64() % n == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_sequence() {
        let mut a = SplitMix64::new(7);
        let mut b = SplitMix64::new(7);
        for _ in 0..100 {
            assert_eq!(a.next_u64(), b.next_u64());
        }
    }

    #[test]
    fn range_stays_inside_its_bounds_and_reaches_them() {
        let mut rng = SplitMix64::new(1);
        let drawn: Vec<usize> = (0..10_000).map(|_| rng.range(24, 86)).collect();
        assert!(drawn.iter().all(|&n| (24..=86).contains(&n)));
        assert!(drawn.contains(&24) && drawn.contains(&86));
    }
}
