//! Where blocks land: every block 16-byte aligned, no two live blocks sharing a byte, for
//! every size from 0 to 5000 (each class boundary and the sizes either side of it) and for
//! large blocks, as roots and as linked blocks.
//!
//! Overlap is checked twice over: by address ranges ([`assert_disjoint`]), and by contents,
//! since every block is filled with its own pattern after all of them are allocated and
//! checked before any is freed; a block whose memory (or whose header) another block also
//! uses fails one or the other.

use crate::support::{assert_disjoint, free_all, scaled, Chain, Counts};
use mapialloc::{FreeOutcome, Heap};

/// The sizes every test here walks: 0..5000 step 1 (0..64 under Miri).
fn all_small_sizes() -> std::ops::Range<usize> {
    0..scaled(5000, 64)
}

/// Checks a set of live chains: disjoint, intact, counted, then frees them all and checks
/// the heap is empty again.
#[track_caller]
fn check_and_free(heap: &Heap, chains: Vec<Chain<'_>>) {
    assert_disjoint(chains.iter().flat_map(Chain::blocks));
    chains.iter().for_each(Chain::verify);
    assert_eq!(Counts::of(heap), Counts::live(&chains));
    let requested: u64 = chains.iter().map(Chain::requested_bytes).sum();
    let live_bytes = heap.stats().live_bytes;
    assert!(
        live_bytes >= requested,
        "live_bytes {live_bytes} < {requested} requested"
    );
    free_all(chains);
    assert_eq!(Counts::of(heap), Counts::default());
    assert_eq!(heap.stats().live_bytes, 0);
}

#[test]
fn roots_of_every_size_to_5000() {
    let heap = Heap::new();
    let chains = all_small_sizes()
        .map(|len| Chain::new(&heap, len, len as u64))
        .collect();
    check_and_free(&heap, chains);
}

#[test]
fn linked_blocks_of_every_size_to_5000() {
    let heap = Heap::new();
    // Sixteen roots, the sizes dealt round-robin, so chains interleave in the same pages.
    let mut chains: Vec<_> = (0..16u64).map(|i| Chain::new(&heap, 48, i << 32)).collect();
    for len in all_small_sizes() {
        let n = chains.len();
        chains[len % n].link(len, (1 << 40) + len as u64);
    }
    check_and_free(&heap, chains);
}

#[test]
fn large_blocks() {
    let heap = Heap::new();
    let large = [
        65_537,
        100 << 10,
        1 << 20,
        3 << 20,
        scaled(20 << 20, 2 << 20),
    ];
    let mut chains = Vec::new();
    for (i, len) in large.into_iter().enumerate() {
        let tag = 100 * i as u64;
        // Large roots with large and small links, and a small root with a large link.
        chains.push(Chain::with_links(&heap, len, [len, 0, 17, len / 3], tag));
        chains.push(Chain::with_links(&heap, 24, [len], tag + 50));
    }
    check_and_free(&heap, chains);
}

/// Freed blocks are reused (they should be: that is what a slab is for) without landing on a
/// block that is still live, and without disturbing the survivors' contents.
#[test]
fn reuse_after_free_keeps_live_blocks_intact() {
    let heap = Heap::new();
    let sizes = all_small_sizes().step_by(7);
    let mut chains: Vec<_> = sizes
        .clone()
        .map(|len| Chain::with_links(&heap, len, [len / 2], 2 * len as u64))
        .collect();
    // Free every other chain, then allocate the same sizes again into the holes.
    let mut survivors = Vec::new();
    for (i, chain) in chains.drain(..).enumerate() {
        if i % 2 == 0 {
            assert_eq!(chain.free(), FreeOutcome::Freed);
        } else {
            survivors.push(chain);
        }
    }
    let tag0 = 1 << 40;
    survivors
        .extend(sizes.map(|len| Chain::with_links(&heap, len, [len / 2], tag0 + 2 * len as u64)));
    check_and_free(&heap, survivors);
}
