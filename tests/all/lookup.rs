//! Finding a pointer's block: each thread remembers the segments (4 MiB each) it looked up
//! lately, in a small direct-mapped cache, so a free or link in one of them skips the
//! registry. Roots spread over more segments than that cache holds, visited in an order that
//! keeps evicting its entries, must be linked to, freed, and refused when freed twice or
//! pointed into, exactly as roots in one segment are.

use crate::support::{scaled, Counts};
use mapialloc::{FreeOutcome, Heap, Scode};

/// Roots of this size come from 64 KiB pages holding four each, so [`ROOTS`] of them span
/// about 12 segments, half again what the cache holds (only their headers are touched).
const ROOT_LEN: usize = 16_000;
const ROOTS: usize = scaled(3_000, 40);

/// The step between roots visited in turn: prime, so it visits every root once.
const STRIDE: usize = 997;

/// Visits `0..n` in steps of [`STRIDE`], which jump across segments at every step.
fn scattered(n: usize) -> impl Iterator<Item = usize> {
    (0..n).map(move |i| i * STRIDE % n)
}

#[test]
fn roots_over_many_segments_are_found_and_misuse_refused() {
    assert_ne!(ROOTS % STRIDE, 0, "the stride must visit every root");
    let heap = Heap::new();
    let roots: Vec<*mut u8> = (0..ROOTS)
        .map(|_| heap.allocate_buffer(ROOT_LEN).expect("memory").as_ptr())
        .collect();
    // Links: every one validates its parent through the lookup.
    for i in scattered(ROOTS) {
        let linked = heap.allocate_more(300, roots[i]).expect("memory");
        // SAFETY: a fresh linked block of 300 bytes.
        unsafe { linked.as_ptr().write_bytes(i as u8, 300) };
    }
    // A pointer into a live root is neither a block start nor freed: refused as foreign, and
    // the root stays intact (its link is still counted below).
    for i in scattered(ROOTS).take(64) {
        // SAFETY: refused without touching the block.
        let outcome = unsafe { heap.free_buffer(roots[i].wrapping_add(16)) };
        assert_eq!(outcome, FreeOutcome::Foreign, "root {i} + 16");
        assert_eq!(
            heap.allocate_more(8, roots[i].wrapping_add(32)),
            Err(Scode::MAPI_E_INVALID_PARAMETER),
            "a link into root {i}"
        );
    }
    assert_eq!(
        Counts::of(&heap).live_blocks,
        2 * ROOTS as u64,
        "every root and its one link"
    );
    // Free every other root, scattered; each page keeps a live neighbour, so the freed blocks
    // stay freed (nothing of their size is allocated meanwhile) and a second free of each is
    // a double free, found through whichever cache entry now maps its segment.
    let freed: Vec<usize> = scattered(ROOTS).filter(|i| i % 2 == 0).collect();
    for &i in &freed {
        // SAFETY: a live root, not used after.
        assert_eq!(unsafe { heap.free_buffer(roots[i]) }, FreeOutcome::Freed);
    }
    for &i in freed.iter().rev() {
        // SAFETY: a root freed above: refused.
        let outcome = unsafe { heap.free_buffer(roots[i]) };
        assert_eq!(outcome, FreeOutcome::DoubleFree, "root {i} freed twice");
    }
    for i in scattered(ROOTS).filter(|i| i % 2 == 1) {
        // SAFETY: a live root, not used after.
        assert_eq!(unsafe { heap.free_buffer(roots[i]) }, FreeOutcome::Freed);
    }
    let stats = heap.stats();
    assert_eq!((stats.live_blocks, stats.live_bytes), (0, 0));
    assert_eq!(stats.double_frees, freed.len() as u64);
    assert_eq!((stats.foreign_frees, stats.bad_parents), (64, 64));
}
