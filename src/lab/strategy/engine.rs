//! mapialloc itself, through its safe Rust API.
//!
//! Each instance owns a fresh [`Heap`] rather than borrowing [`crate::default_heap`]: the
//! lab makes one instance per measured child process, so the heap's counters
//! ([`Heap::stats`]) are this run's alone and the lab can check that the run freed every
//! block. The work itself is the same: the default heap is a `Heap` too.

use super::Strategy;
use crate::{FreeOutcome, Heap, Scode};
use std::ptr::NonNull;

/// The mapialloc engine; `Engine<true>` is [`EngineHardened`].
#[derive(Default)]
pub struct Engine<const HARDENED: bool = false> {
    heap: Heap,
}

/// mapialloc with its hardening on (feature `hardened`): what quarantine, the header check
/// and zero-on-free cost.
#[cfg(feature = "hardened")]
pub type EngineHardened = Engine<true>;

impl<const HARDENED: bool> Strategy for Engine<HARDENED> {
    const NAME: &'static str = if HARDENED {
        "engine-hardened"
    } else {
        "engine"
    };
    const RACE_SAFE: bool = true;

    fn new() -> Self {
        #[cfg(feature = "hardened")]
        let heap = Heap::hardened(HARDENED);
        #[cfg(not(feature = "hardened"))]
        let heap = Heap::new();
        Engine { heap }
    }

    #[inline]
    fn allocate_buffer(&self, size: usize) -> Result<NonNull<u8>, Scode> {
        self.heap.allocate_buffer(size)
    }

    #[inline]
    fn allocate_more(&self, size: usize, root: NonNull<u8>) -> Result<NonNull<u8>, Scode> {
        self.heap.allocate_more(size, root.as_ptr())
    }

    #[inline]
    unsafe fn free_buffer(&self, root: NonNull<u8>) {
        // SAFETY: the trait's contract: `root` is a live root of this heap, unused hereafter.
        let outcome = unsafe { self.heap.free_buffer(root.as_ptr()) };
        debug_assert_eq!(outcome, FreeOutcome::Freed);
    }

    fn live_blocks(&self) -> Option<u64> {
        Some(self.heap.stats().live_blocks)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lab::strategy::tests::chain_round_trip;

    #[test]
    fn counts_no_live_blocks_after_a_chain_is_freed() {
        let engine = <Engine>::new();
        chain_round_trip(&engine, 100);
        assert_eq!(engine.live_blocks(), Some(0));
    }
}
