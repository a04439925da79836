//! Counters: one slot per thread cache, written only by its thread, summed on read.
//!
//! The fast paths update their own slot with a Relaxed load and store (no locked instruction);
//! `Stats` sums every slot. Slots are never freed while the heap lives: a thread that exits
//! releases its slot (Release) and the next thread cache claims it (Acquire) and keeps
//! counting from where it stood, so no count is lost and none is folded anywhere.

use crate::sync::{AtomicBool, AtomicPtr, AtomicU64, Ordering};
use std::ptr;

/// A snapshot of a heap's counters, summed over threads when read.
///
/// Live counts are exact when no call is in flight; while calls race they are a snapshot of
/// counters read one after another.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Roots allocated and not yet freed.
    pub live_roots: u64,
    /// Blocks allocated and not yet freed: roots plus linked blocks.
    pub live_blocks: u64,
    /// Usable bytes of the live blocks (a block's size-class capacity, or for a linked block
    /// carved from a chunk its size rounded up to 16; not the size asked for).
    pub live_bytes: u64,
    /// Bytes the heap holds committed from the OS (pages in use or cached, large spans).
    pub os_committed_bytes: u64,
    /// Blocks returned by a thread that did not own their page (a chunk of carved linked
    /// blocks counts once).
    pub remote_frees: u64,
    /// `free_buffer` on a root that was already freed (or lost a race to free it).
    pub double_frees: u64,
    /// `free_buffer` on a linked block (never freed on its own).
    pub linked_frees: u64,
    /// `free_buffer` on a pointer that is not a block start of this heap.
    pub foreign_frees: u64,
    /// `allocate_more` whose parent is NULL, freed, linked, or foreign.
    pub bad_parents: u64,
    /// Block headers found overwritten (a write past the end of the block before them).
    /// Only the `hardened` feature checks; otherwise 0.
    pub corruptions: u64,
}

/// What a counter counts.
#[derive(Clone, Copy)]
pub(crate) enum Counter {
    RootsAllocated,
    RootsFreed,
    /// Linked blocks (roots count in `Roots*` only, so a lone root updates fewer counters).
    LinkedAllocated,
    LinkedFreed,
    BytesAllocated,
    BytesFreed,
    RemoteFrees,
    DoubleFrees,
    LinkedFrees,
    ForeignFrees,
    BadParents,
    Corruptions,
    /// Chunks linked to a root, and chunks given back (internal: for `testing::live_chunks`).
    ChunksTaken,
    ChunksReturned,
}

const COUNTERS: usize = Counter::ChunksReturned as usize + 1;

/// One thread's counters.
pub(crate) struct StatsSlot {
    counts: [AtomicU64; COUNTERS],
    in_use: AtomicBool,
    next: AtomicPtr<StatsSlot>,
}

impl StatsSlot {
    /// Adds `n` to a counter. Only the slot's owner calls this.
    #[inline]
    pub(crate) fn add(&self, counter: Counter, n: u64) {
        let c = &self.counts[counter as usize];
        c.store(c.load(Ordering::Relaxed).wrapping_add(n), Ordering::Relaxed);
    }
}

/// The heap's list of slots.
pub(crate) struct StatsSlots {
    head: AtomicPtr<StatsSlot>,
}

impl StatsSlots {
    pub(crate) fn new() -> StatsSlots {
        StatsSlots {
            head: AtomicPtr::new(ptr::null_mut()),
        }
    }

    fn iter(&self) -> impl Iterator<Item = &StatsSlot> {
        // Acquire: pairs with the Release CAS in `claim` that published each slot.
        let mut cur = self.head.load(Ordering::Acquire);
        std::iter::from_fn(move || {
            // SAFETY: slots are published complete and live until the heap drops.
            let slot = unsafe { cur.as_ref()? };
            // Acquire: pairs with the Release CAS in `claim`, as for the head.
            cur = slot.next.load(Ordering::Acquire);
            Some(slot)
        })
    }

    /// Claims a free slot, or adds one.
    pub(crate) fn claim(&self) -> &StatsSlot {
        for slot in self.iter() {
            // Acquire: pairs with the Release in `release`, so we continue the old counts.
            if !slot.in_use.load(Ordering::Relaxed)
                && slot
                    .in_use
                    .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
                    .is_ok()
            {
                return slot;
            }
        }
        let slot = Box::into_raw(Box::new(StatsSlot {
            counts: std::array::from_fn(|_| AtomicU64::new(0)),
            in_use: AtomicBool::new(true),
            next: AtomicPtr::new(ptr::null_mut()),
        }));
        let mut head = self.head.load(Ordering::Relaxed);
        loop {
            // SAFETY: `slot` is not published yet; we own it.
            unsafe { (*slot).next.store(head, Ordering::Relaxed) };
            // Release: publishes the slot to `iter`.
            match self
                .head
                .compare_exchange_weak(head, slot, Ordering::Release, Ordering::Relaxed)
            {
                // SAFETY: published slots live until the heap drops.
                Ok(_) => return unsafe { &*slot },
                Err(seen) => head = seen,
            }
        }
    }

    /// Gives a slot back (its thread is done with it).
    pub(crate) fn release(&self, slot: &StatsSlot) {
        // Release: pairs with the Acquire CAS in `claim`.
        slot.in_use.store(false, Ordering::Release);
    }

    /// Chunks linked to roots and not yet given back.
    pub(crate) fn live_chunks(&self) -> u64 {
        let sum = |c: Counter| {
            self.iter().fold(0u64, |n, slot| {
                n.wrapping_add(slot.counts[c as usize].load(Ordering::Relaxed))
            })
        };
        sum(Counter::ChunksTaken).wrapping_sub(sum(Counter::ChunksReturned))
    }

    /// Sums the slots. `committed` comes from the OS layer.
    pub(crate) fn snapshot(&self, committed: usize) -> Stats {
        let mut sums = [0u64; COUNTERS];
        for slot in self.iter() {
            for (i, sum) in sums.iter_mut().enumerate() {
                *sum = sum.wrapping_add(slot.counts[i].load(Ordering::Relaxed));
            }
        }
        let live = |a: Counter, f: Counter| sums[a as usize].saturating_sub(sums[f as usize]);
        Stats {
            live_roots: live(Counter::RootsAllocated, Counter::RootsFreed),
            live_blocks: live(Counter::RootsAllocated, Counter::RootsFreed)
                + live(Counter::LinkedAllocated, Counter::LinkedFreed),
            live_bytes: live(Counter::BytesAllocated, Counter::BytesFreed),
            os_committed_bytes: committed as u64,
            remote_frees: sums[Counter::RemoteFrees as usize],
            double_frees: sums[Counter::DoubleFrees as usize],
            linked_frees: sums[Counter::LinkedFrees as usize],
            foreign_frees: sums[Counter::ForeignFrees as usize],
            bad_parents: sums[Counter::BadParents as usize],
            corruptions: sums[Counter::Corruptions as usize],
        }
    }
}

impl Drop for StatsSlots {
    fn drop(&mut self) {
        let mut cur = self.head.load(Ordering::Relaxed);
        while !cur.is_null() {
            // SAFETY: the heap is being dropped; the list owns its slots.
            let slot = unsafe { Box::from_raw(cur) };
            cur = slot.next.load(Ordering::Relaxed);
        }
    }
}
