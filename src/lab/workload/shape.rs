//! The building blocks of the workloads, public so that the criterion benches build exactly
//! the same shapes: property sets, rows, chains, and a `Send` wrapper for roots that move
//! between threads.

use crate::lab::rng::SplitMix64;
use crate::lab::strategy::Strategy;
use std::ops::RangeInclusive;
use std::ptr::NonNull;

/// Size of an SPropValue array root (20 properties of 16 bytes).
pub const PROPSET_ROOT: usize = 320;
/// Linked strings per property set.
pub const PROPSET_STRINGS: usize = 20;
/// Linked strings per row of a row set.
pub const ROW_STRINGS: usize = 10;
/// Linked blocks of a flat row set (one root holding a whole row set), and their sizes.
pub const FLAT_ROWSET_LINKS: usize = 1_100;
/// Sizes of a flat row set's linked blocks.
pub const FLAT_ROWSET_SIZES: RangeInclusive<usize> = 16..=128;
/// Sizes of linked strings and binaries.
pub const STRING_SIZES: RangeInclusive<usize> = 24..=86;

/// A root moving to another thread, which will free it.
#[derive(Debug)]
pub struct SendRoot(pub NonNull<u8>);

// SAFETY: every strategy lets any thread free a root allocated on another (MAPI is
// free-threaded, and the lab's strategies are built for it); a `SendRoot` is only ever used
// by the one thread that holds it.
unsafe impl Send for SendRoot {}

/// Writes the first and last byte of a fresh block, as a provider filling it would, so
/// that every strategy pays for touching its memory (and RSS counts it).
#[inline]
fn touch(block: NonNull<u8>, size: usize) {
    if size > 0 {
        // SAFETY: the block is live and `size` bytes long; volatile keeps the compiler from
        // dropping writes to memory that is freed without being read.
        unsafe {
            block.as_ptr().write_volatile(1);
            block.as_ptr().add(size - 1).write_volatile(1);
        }
    }
}

/// `MAPIAllocateBuffer`, touched; panics when out of memory (a benchmark cannot go on).
#[inline]
pub fn root<S: Strategy>(strategy: &S, size: usize) -> NonNull<u8> {
    let block = strategy
        .allocate_buffer(size)
        .unwrap_or_else(|e| panic!("{}: allocate_buffer({size}): {e}", S::NAME));
    touch(block, size);
    block
}

/// `MAPIAllocateMore`, touched; panics when out of memory.
#[inline]
pub fn link<S: Strategy>(strategy: &S, size: usize, root: NonNull<u8>) -> NonNull<u8> {
    let block = strategy
        .allocate_more(size, root)
        .unwrap_or_else(|e| panic!("{}: allocate_more({size}): {e}", S::NAME));
    touch(block, size);
    block
}

/// `MAPIFreeBuffer` of a root the caller owns.
#[inline]
pub fn free<S: Strategy>(strategy: &S, root: NonNull<u8>) {
    // SAFETY: the workloads free each root they allocated exactly once, from the one thread
    // that holds it, after every link to it is done.
    unsafe { strategy.free_buffer(root) }
}

/// A root of `root_size` bytes with `links` linked blocks of sizes drawn from `sizes`.
/// Returns the root; the blocks it holds are `links + 1`.
#[inline]
pub fn chain<S: Strategy>(
    strategy: &S,
    rng: &mut SplitMix64,
    root_size: usize,
    links: usize,
    sizes: RangeInclusive<usize>,
) -> NonNull<u8> {
    let parent = root(strategy, root_size);
    for _ in 0..links {
        link(strategy, rng.range(*sizes.start(), *sizes.end()), parent);
    }
    parent
}

/// An SPropValue array with its strings: 1 + [`PROPSET_STRINGS`] blocks.
#[inline]
pub fn propset<S: Strategy>(strategy: &S, rng: &mut SplitMix64) -> NonNull<u8> {
    chain(strategy, rng, PROPSET_ROOT, PROPSET_STRINGS, STRING_SIZES)
}

/// One row of a row set: 1 + [`ROW_STRINGS`] blocks.
#[inline]
pub fn row<S: Strategy>(strategy: &S, rng: &mut SplitMix64) -> NonNull<u8> {
    chain(strategy, rng, PROPSET_ROOT, ROW_STRINGS, STRING_SIZES)
}

/// A whole row set under one root, as `cross-thread-rowset` hands between threads:
/// 1 + [`FLAT_ROWSET_LINKS`] blocks.
#[inline]
pub fn flat_rowset<S: Strategy>(strategy: &S, rng: &mut SplitMix64) -> NonNull<u8> {
    chain(
        strategy,
        rng,
        PROPSET_ROOT,
        FLAT_ROWSET_LINKS,
        FLAT_ROWSET_SIZES,
    )
}
