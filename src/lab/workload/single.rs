//! The single-threaded workloads: lone roots, property sets, row sets and long chains.

use super::shape::{self, chain, free, root, row};
use super::{time_rounds, Sample};
use crate::lab::rng::SplitMix64;
use crate::lab::strategy::Strategy;
use std::time::Duration;

/// Lone roots per round (one root takes a few nanoseconds: rounds batch them so that
/// reading the clock stays out of the measurement).
pub(super) const LONE_ROOTS_PER_ROUND: u64 = 1_000;
/// Size of a lone root.
const LONE_ROOT_SIZE: usize = 64;
/// Property sets per round.
pub(super) const PROPSETS_PER_ROUND: u64 = 100;
/// Rows in a row set.
const ROWS: usize = 100;
/// Linked blocks of a long chain, and their sizes.
const LONG_CHAIN_LINKS: usize = 10_000;
const LONG_CHAIN_SIZES: std::ops::RangeInclusive<usize> = 16..=300;
/// Size of the long chain's root.
const LONG_CHAIN_ROOT: usize = 64;

/// `lone-root`: allocate a 64 B root and free it at once.
pub(super) fn lone_root<S: Strategy>(s: &S, budget: Duration) -> Sample {
    time_rounds(budget, || {
        for _ in 0..LONE_ROOTS_PER_ROUND {
            free(s, root(s, LONE_ROOT_SIZE));
        }
        LONE_ROOTS_PER_ROUND
    })
}

/// `propset`: a 320 B root and 20 linked strings, then freed.
pub(super) fn propset<S: Strategy>(s: &S, budget: Duration) -> Sample {
    let mut rng = SplitMix64::new(1);
    time_rounds(budget, || {
        for _ in 0..PROPSETS_PER_ROUND {
            free(s, shape::propset(s, &mut rng));
        }
        PROPSETS_PER_ROUND * (1 + shape::PROPSET_STRINGS as u64)
    })
}

/// `rowset`: 100 rows, each its own root with 10 strings, then freed row by row.
pub(super) fn rowset<S: Strategy>(s: &S, budget: Duration) -> Sample {
    let mut rng = SplitMix64::new(2);
    let mut rows = Vec::with_capacity(ROWS);
    time_rounds(budget, || {
        rows.extend((0..ROWS).map(|_| row(s, &mut rng)));
        for r in rows.drain(..) {
            free(s, r);
        }
        (ROWS * (1 + shape::ROW_STRINGS)) as u64
    })
}

/// `long-chain`: one root with 10,000 linked blocks, then freed.
pub(super) fn long_chain<S: Strategy>(s: &S, budget: Duration) -> Sample {
    let mut rng = SplitMix64::new(3);
    time_rounds(budget, || {
        free(
            s,
            chain(
                s,
                &mut rng,
                LONG_CHAIN_ROOT,
                LONG_CHAIN_LINKS,
                LONG_CHAIN_SIZES,
            ),
        );
        1 + LONG_CHAIN_LINKS as u64
    })
}
