//! Counters (placeholder until the engine lands).

/// A snapshot of a heap's counters, summed over threads when read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Roots allocated and not yet freed.
    pub live_roots: u64,
    /// Blocks allocated and not yet freed: roots plus linked blocks.
    pub live_blocks: u64,
    /// Usable bytes of the live blocks (each block's size-class capacity, not the size asked for).
    pub live_bytes: u64,
    /// Bytes the heap holds committed from the OS (pages in use or cached, large spans).
    pub os_committed_bytes: u64,
    /// Blocks returned by a thread that did not own their page.
    pub remote_frees: u64,
    /// `free_buffer` on a root that was already freed (or lost a race to free it).
    pub double_frees: u64,
    /// `free_buffer` on a linked block (never freed on its own).
    pub linked_frees: u64,
    /// `free_buffer` on a pointer that is not a block start of this heap.
    pub foreign_frees: u64,
    /// `allocate_more` whose parent is NULL, freed, linked, or foreign.
    pub bad_parents: u64,
}
