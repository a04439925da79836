//! The per-thread heap: a current page per size class, the allocation fast path and its cold
//! refill, the free path (chain walk, local or batched remote returns), and thread exit.
//!
//! A `ThreadCache` belongs to one thread and one heap. It owns the pages on its class lists:
//! only it pops, pushes locally, drains and re-initialises them. Other threads touch its pages
//! only through `Page::push_remote`. When the thread exits (or calls `release`), pages with no
//! live block go back to the pool and the rest are abandoned: remote frees keep landing on
//! them, and the next thread that refills (or collects) adopts them.
//!
//! Locked instructions per call on the paths that matter (see `chain`, `chunk` and `page`):
//! * allocate_buffer from the current page: 0.
//! * allocate_more of at most `CARVE_MAX` bytes, carved from the chunk this thread holds for
//!   that root: 0 (and no pin). Starting a chunk: 1 CAS to link it, 1 swap to seal the last.
//! * allocate_more of a larger block: 1 (the link CAS).
//! * free_buffer of a root: 1 (the win-and-close CAS), plus 1 swap per chunk another thread's
//!   carver still holds (a sealed chunk costs a load), plus 1 CAS per run of consecutive
//!   remote blocks of one page in the chain.
//!   Emptying a page adds an epoch pin.
//!
//! Epoch pins, at most one while a call validates and walks: a call on a root in a page this
//! cache owns (the lone root, a provider building its own property set) pins nothing, since
//! no other thread can retire or re-initialise that page. A call on any other page pins before
//! it validates the pointer (see `locate`), as does anything touching a large span, and
//! retiring. A free that retired a page or span then unpins and flushes the epoch until that
//! stops returning memory (`catch_up_epoch`), so the memory is back before the call returns.
//! The page stacks are ABA-safe on their own, so refills never pin.

use crate::chain::{Header, Kind, Meta, NotAnOpenRoot, HEADER_SIZE, LARGE_CLASS};
use crate::chunk::{
    self, carve_size, CarverGets, FreerGets, Tally, CARVE_MAX, CHUNK_FIRST_BLOCK, CHUNK_MAX_BLOCK,
    PROLOGUE_SIZE,
};
use crate::page::{link_blocks, Page};
use crate::reclaim::Reclaim;
use crate::scode::Scode;
use crate::segment::{LargeSpan, Region, Registry, SmallSegment, SEGMENT_SHIFT};
use crate::size_class::{block_size, class_of, class_of_block, usable_size, ALIGN, NUM_CLASSES};
use crate::stats::{Counter, StatsSlot, StatsSlots};
use crate::sync::{Arc, AtomicBool, AtomicUsize, Ordering};
use crossbeam_epoch::{Collector, Guard, LocalHandle};
use std::cell::Cell;
use std::mem::ManuallyDrop;
use std::ptr::{self, NonNull};

/// The largest buffer served: 2 GiB minus 64 KiB, so no size arithmetic can wrap and MAPI's
/// ULONG sizes near 4 GiB fail with `MAPI_E_NOT_ENOUGH_MEMORY`.
pub const MAX_BUFFER_SIZE: usize = (1 << 31) - (1 << 16);

/// Abandoned pages a refill adopts at most, so one refill stays short.
const ADOPT_PER_REFILL: usize = 4;

/// Abandoned pages a free that landed on one adopts at most. A free pays this only then, and
/// it must reach the page it may just have emptied, under the pages stacked above it: threads
/// exiting together stack dozens (up to 34 left over in the lab's churn at 16 threads when
/// such a free adopted 4, 2 MiB committed after everything was freed).
const ADOPT_AFTER_FREE: usize = 64;

/// Epoch flushes `collect` tries at most while deferred returns are pending (each runs a few
/// expired bags). Loom models get a handful: the rest runs at heap teardown.
const COLLECT_ROUNDS: usize = if cfg!(loom) { 3 } else { 10_000 };

/// Epoch flushes a call that retired memory makes at least (while returns are pending): the
/// first seals this thread's bag and advances the epoch, the second advances it again and
/// runs what expired, the third runs what bags of crossbeam's own queued ahead of ours kept
/// back. After these it goes on only while a flush returns memory: when another thread holds
/// the epoch back, no flush can.
const CATCH_UP_MIN_FLUSHES: usize = 3;

/// Thread exit, the last of threads that exited together: rounds of catch-up (a yield, then
/// flushes) it tries while deferred returns are pending. Few: it waits for the other exiting
/// threads to unregister, not for threads inside calls (those catch up themselves).
const EXIT_SETTLE_ROUNDS: usize = 4;

/// Idle pages a heap keeps committed once no thread cache is left on it (see
/// `leave_heap_idle`); while threads use it, the pool keeps up to 32 (`reclaim`).
const IDLE_HEAP_POOL_PAGES: usize = 16;

/// Hardened builds: blocks a cache quarantines before handing them to the epoch at once.
#[cfg(feature = "hardened")]
const QUARANTINE_BATCH: usize = 64;

/// What `free_buffer` did with a pointer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FreeOutcome {
    /// NULL: nothing touched.
    Null,
    /// The root and its whole chain were freed.
    Freed,
    /// The root was already freed, or another thread won the race to free it: nothing freed.
    DoubleFree,
    /// A linked block: nothing freed (it goes with its root).
    LinkedBlock,
    /// Not the start of a block of this heap: nothing touched.
    Foreign,
}

/// The state a heap's threads share.
pub(crate) struct Shared {
    collector: ManuallyDrop<Collector>,
    pub(crate) registry: Registry,
    /// Boxed: the epoch's deferred returns point into it, and must not point into a `Shared`
    /// that `Drop` holds as `&mut` while the collector runs them.
    pub(crate) reclaim: Box<Reclaim>,
    pub(crate) stats: StatsSlots,
    next_cache_id: AtomicUsize,
    /// Thread caches being dropped now (their threads are exiting), and how many ever began
    /// to: the last of threads that exit together catches up once more (see `settle_on_exit`).
    /// Plain std atomics even under loom: they only decide whether to flush again (loom models
    /// skip that), never what is safe to reuse.
    exiting: std::sync::atomic::AtomicUsize,
    exits_begun: std::sync::atomic::AtomicUsize,
    /// Thread caches alive: the last one to go leaves the heap idle (see `leave_heap_idle`).
    /// A std atomic for the same reason as `exiting`.
    attached: std::sync::atomic::AtomicUsize,
    /// Set when the `Heap` handle is dropped: caches of other threads let go at their next chance.
    pub(crate) dropped: AtomicBool,
    /// Hardened builds: whether this heap quarantines, checks and zeroes (see `Heap::hardened`).
    #[cfg(feature = "hardened")]
    hardened: bool,
    /// Hardened builds: abort on the first misuse (`MAPIALLOC_ABORT_ON_MISUSE=1`).
    #[cfg(feature = "hardened")]
    abort_on_misuse: bool,
}

impl Shared {
    pub(crate) fn new(hardened: bool) -> Shared {
        let _ = hardened;
        Shared {
            collector: ManuallyDrop::new(Collector::new()),
            registry: Registry::new(),
            reclaim: Box::new(Reclaim::new()),
            stats: StatsSlots::new(),
            next_cache_id: AtomicUsize::new(1),
            exiting: std::sync::atomic::AtomicUsize::new(0),
            exits_begun: std::sync::atomic::AtomicUsize::new(0),
            attached: std::sync::atomic::AtomicUsize::new(0),
            dropped: AtomicBool::new(false),
            #[cfg(feature = "hardened")]
            hardened,
            #[cfg(feature = "hardened")]
            abort_on_misuse: hardened
                && std::env::var_os("MAPIALLOC_ABORT_ON_MISUSE").is_some_and(|v| v == "1"),
        }
    }
}

/// A root still allocated, as [`crate::Heap::live_roots`] saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LiveRoot {
    /// The root's pointer, as `MAPIAllocateBuffer` returned it.
    pub ptr: NonNull<u8>,
    /// Usable bytes of the root block (its size class's capacity, at least the size asked).
    pub size: usize,
    /// Blocks linked to it (not counting the root).
    pub linked_blocks: usize,
    /// Usable bytes of the root and its linked blocks.
    pub chain_bytes: usize,
    /// The thread cache that owns the root's page: the allocating thread's, unless that
    /// thread exited and another adopted the page. 0 while the page is abandoned.
    pub owner: usize,
}

/// Linked blocks `live_roots` follows at most per root.
const PEEK_LIMIT: usize = 1 << 24;

impl Shared {
    /// Every root live now, largest chains first. Locks nothing and stops no thread: it reads
    /// headers while others allocate and free, so it is a snapshot (a root freed meanwhile may
    /// or may not be listed). `guard` keeps large spans readable.
    pub(crate) fn live_roots(&self, _guard: &Guard) -> Vec<LiveRoot> {
        let size_of = |block: &Header| -> usize {
            let class = block.meta().class();
            if class == LARGE_CLASS {
                match self.registry.lookup(block as *const Header as usize) {
                    // SAFETY: registered while the caller is pinned.
                    Some(Region::Large(span)) => unsafe { (*span).len - HEADER_SIZE },
                    _ => 0,
                }
            } else {
                usable_size(class as usize)
            }
        };
        let mut roots = Vec::new();
        let mut visit = |header: &Header, owner: usize| {
            if header.meta().kind() == Some(Kind::Root) {
                let size = size_of(header);
                let (linked_blocks, linked_bytes) = header.peek_chain(PEEK_LIMIT, |block| {
                    if block.meta().is_chunk() {
                        let tally = chunk::prologue(block).peek();
                        (tally.blocks() as usize, tally.bytes() as usize)
                    } else {
                        (1, size_of(block))
                    }
                });
                roots.push(LiveRoot {
                    ptr: user_ptr(header),
                    size,
                    linked_blocks,
                    chain_bytes: size + linked_bytes,
                    owner,
                });
            }
        };
        self.registry.for_each(|region| match region {
            Region::Small(segment) => {
                for page in segment.pages() {
                    for header in page.carved_blocks() {
                        visit(header, page.owner());
                    }
                }
            }
            Region::Large(span) => {
                // SAFETY: registered while the caller is pinned; the span starts with a header.
                let header: &Header = unsafe { &*std::ptr::with_exposed_provenance((*span).base) };
                visit(header, 0);
            }
        });
        roots.sort_by_key(|r| std::cmp::Reverse(r.chain_bytes));
        roots
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        // The collector goes first: dropping it runs the deferred pool pushes and span unmaps,
        // which still need the pages and the registry.
        // SAFETY: dropped once, here, and never used afterwards.
        unsafe { ManuallyDrop::drop(&mut self.collector) };
        self.registry.teardown();
    }
}

/// Where a block lives: a page of a small segment, or a large span of its own.
#[derive(Clone, Copy)]
enum Home {
    Page(&'static Page),
    Span(*const LargeSpan),
}

/// A block `locate` found: its header, its `meta` as read, where it lives, and whether its
/// page is this cache's own.
struct Located {
    header: &'static Header,
    meta: Meta,
    home: Home,
    owned: bool,
}

/// Blocks of one page waiting to be pushed to its `thread_free` with one CAS.
struct RemoteBatch<'a> {
    page: Option<&'a Page>,
    first: *const Header,
    last: *const Header,
    count: u64,
    /// Whether a flushed page had no owner (its thread exited).
    hit_abandoned: bool,
}

/// The chunk a thread carves linked blocks from, and the root it belongs to. The bump cursor
/// lives here, not in the chunk, so carving writes nothing another thread reads but the tally.
struct Carver {
    /// User pointer of the chunk's root; 0 when there is no chunk.
    root: usize,
    /// The chunk's header (null when there is none).
    chunk: *const Header,
    /// Start of the chunk's payload, next free byte, and end (where the start bitmap is).
    payload: usize,
    top: usize,
    end: usize,
    tally: Tally,
    /// Bytes carved for `root` from chunks before this one.
    earlier_bytes: usize,
    /// Size class of the next chunk for the same root (chunks grow with the chain).
    next_class: usize,
}

impl Carver {
    const EMPTY: Carver = Carver {
        root: 0,
        chunk: ptr::null(),
        payload: 0,
        top: 0,
        end: 0,
        tally: Tally::ZERO,
        earlier_bytes: 0,
        next_class: CHUNK_FIRST_CLASS,
    };

    /// Bytes carved for `root` so far, in every chunk of this thread.
    fn root_bytes(&self) -> usize {
        self.earlier_bytes + self.tally.bytes() as usize
    }
}

/// Entries of a thread's segment cache. One entry missed 17% of lookups in the lab's churn
/// at 2 threads and 55% at 16, and made churn at 2 threads 7% slower than no cache; eight
/// miss none and 17%, and cost nothing there. 32 entries ran churn at 16 threads 23.5
/// against 23.9 ns/block (16 alternated jobs, 2026-11-30), within the noise: not taken.
const SEGMENTS_SEEN: usize = 8;

/// A page that ran dry is refilled first if it got back at least this share of the blocks
/// carved from it (see `alloc_small_slow`; a quarter measured no better).
const REFILL_SHARE: usize = 8;

/// Roots a thread keeps a chunk for at once.
const CARVERS: usize = if cfg!(loom) { 2 } else { 4 };

/// Size classes of the smallest chunk, of the largest first chunk (long chains grow theirs
/// from there), and of the largest chunk.
const CHUNK_FIRST_CLASS: usize = class_of_block(CHUNK_FIRST_BLOCK);
const FIRST_CHUNK_MAX_CLASS: usize = class_of_block(if CHUNK_MAX_BLOCK < 4 << 10 {
    CHUNK_MAX_BLOCK
} else {
    4 << 10
});
const CHUNK_MAX_CLASS: usize = class_of_block(CHUNK_MAX_BLOCK);
// The largest chunk holds the largest carved block, so growing a chunk to fit one ends.
const _: () = assert!(chunk::layout_of_class(CHUNK_MAX_CLASS).capacity() >= CARVE_MAX);

/// The class of a chunk twice as large as one of class `class` (at most the largest), by
/// class: worked out at compile time, like the chunk layouts, so a chunk start indexes.
const CHUNK_DOUBLED: [u8; NUM_CLASSES] = {
    let mut doubled = [0; NUM_CLASSES];
    let mut class = 0;
    while class < NUM_CLASSES {
        let twice = block_size(class) * 2;
        doubled[class] = if twice >= CHUNK_MAX_BLOCK {
            CHUNK_MAX_CLASS
        } else {
            class_of_block(twice)
        } as u8;
        class += 1;
    }
    doubled
};

/// Size class of a root's first chunk for a thread whose roots take `typical` carved bytes:
/// the class that holds a little more than that (classes, not powers of two, so the slack
/// stays small), between the smallest chunk and the largest first chunk.
fn first_chunk_class(typical: usize) -> usize {
    // The prologue and the start bitmap (at most 64 bytes up to 4 KiB) come on top.
    let want = typical + typical / 8 + PROLOGUE_SIZE + 64;
    class_of(want).map_or(FIRST_CHUNK_MAX_CLASS, |class| {
        class.clamp(CHUNK_FIRST_CLASS, FIRST_CHUNK_MAX_CLASS)
    })
}

/// One thread's cache for one heap.
pub(crate) struct ThreadCache {
    id: usize,
    current: [Option<NonNull<Page>>; NUM_CLASSES],
    pages: [Vec<NonNull<Page>>; NUM_CLASSES],
    stats: NonNull<StatsSlot>,
    /// The chunks this thread carves small linked blocks from (see `chunk`), one per root it
    /// linked to lately, the one linked to last in front (the only slot the fast path looks
    /// at): a provider filling two property sets in turn keeps a chunk for each. A link to
    /// another slot's root swaps that slot to the front.
    carvers: [Carver; CARVERS],
    /// The slot (never 0) that a new root's chunk empties next: its chunk is let go and the
    /// front carver moves there. Slots take turns (rather than all shifting down, a memmove of
    /// the four carvers on every chunk start), so the one let go is the one that left the
    /// front longest ago (swaps aside).
    next_victim: usize,
    /// Carved bytes a root took from this thread, on average (recent roots weigh most).
    typical_root_bytes: usize,
    /// Small segments this thread looked up lately, direct-mapped by key (`addr >>
    /// SEGMENT_SHIFT`; `usize::MAX` for an empty entry): a free or link in one of them skips
    /// the registry's three dependent loads. Sound because a small segment stays registered
    /// until teardown.
    segments_seen: [Cell<(usize, *const SmallSegment)>; SEGMENTS_SEEN],
    /// This call retired a page or span through the epoch: let the epoch catch up before
    /// returning, so the memory goes back now, not at some later call (maybe never).
    retired: bool,
    /// Hardened builds: freed blocks waiting for a grace period before reuse.
    #[cfg(feature = "hardened")]
    quarantine: Vec<(&'static Page, *const Header)>,
    // Drop order: the epoch handle before the `Shared` it belongs to.
    handle: LocalHandle,
    shared: Arc<Shared>,
}

impl ThreadCache {
    pub(crate) fn new(shared: Arc<Shared>) -> ThreadCache {
        let cache = ThreadCache {
            id: shared.next_cache_id.fetch_add(1, Ordering::Relaxed),
            current: [None; NUM_CLASSES],
            pages: std::array::from_fn(|_| Vec::new()),
            stats: NonNull::from(shared.stats.claim()),
            carvers: [Carver::EMPTY; CARVERS],
            next_victim: 1,
            typical_root_bytes: 0,
            segments_seen: std::array::from_fn(|_| Cell::new((usize::MAX, ptr::null()))),
            retired: false,
            #[cfg(feature = "hardened")]
            quarantine: Vec::with_capacity(QUARANTINE_BATCH),
            handle: shared.collector.register(),
            shared,
        };
        // Relaxed: only decides whether the last cache to go tidies up (see `Drop`).
        cache
            .shared
            .attached
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        cache
    }

    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    #[inline]
    fn count(&self, counter: Counter, n: u64) {
        // SAFETY: the slot was claimed by this cache and lives as long as `shared`.
        unsafe { self.stats.as_ref() }.add(counter, n);
    }

    // ----- allocation -----

    /// Allocates a root of `size` bytes.
    #[inline]
    pub(crate) fn allocate_buffer(&mut self, size: usize) -> Result<NonNull<u8>, Scode> {
        let (block, class, usable) = self.alloc_block(size)?;
        block.start_root(class);
        self.count(Counter::RootsAllocated, 1);
        self.count(Counter::BytesAllocated, usable as u64);
        Ok(user_ptr(block))
    }

    /// Allocates `size` bytes linked to the root `parent`.
    #[inline]
    pub(crate) fn allocate_more(
        &mut self,
        size: usize,
        parent: *mut u8,
    ) -> Result<NonNull<u8>, Scode> {
        match self.carve(size, parent as usize) {
            Some(block) => Ok(block),
            None => self.allocate_more_slow(size, parent),
        }
    }

    /// The fast path of `allocate_more`: the most recent chunk belongs to `parent`, has room,
    /// and the root's freer has not passed it (see `chunk` for why that makes the carve safe).
    #[inline(always)]
    fn carve(&mut self, size: usize, parent: usize) -> Option<NonNull<u8>> {
        let carver = &mut self.carvers[0];
        if parent != carver.root || size > CARVE_MAX {
            return None;
        }
        let need = carve_size(size);
        if carver.end - carver.top < need {
            return None;
        }
        // SAFETY: `chunk` is set whenever `root` is, and a held chunk is live.
        let prologue = chunk::prologue(unsafe { &*carver.chunk });
        if prologue.freed() {
            return None;
        }
        let block = carver.top;
        chunk::mark_start(carver.payload, carver.end, block);
        carver.top += need;
        carver.tally.add(need);
        prologue.record(carver.tally);
        self.count(Counter::LinkedAllocated, 1);
        self.count(Counter::BytesAllocated, need as u64);
        // SAFETY: a carved block lies inside a mapped chunk, so it is not null.
        Some(unsafe { NonNull::new_unchecked(ptr::with_exposed_provenance_mut(block)) })
    }

    /// `allocate_more` when the carver cannot serve it: validates the parent, then carves from
    /// a new chunk, or links a block of its own for a large request (or a hardened heap).
    #[cold]
    #[inline(never)]
    fn allocate_more_slow(&mut self, size: usize, parent: *mut u8) -> Result<NonNull<u8>, Scode> {
        let result = self.link_slow(size, parent);
        // Letting go of a chunk, or giving back a block whose parent was freed, can empty a
        // page.
        if self.retired {
            self.catch_up_epoch(None);
        }
        result
    }

    /// `allocate_more_slow` without the epoch catch-up.
    fn link_slow(&mut self, size: usize, parent: *mut u8) -> Result<NonNull<u8>, Scode> {
        // A chunk of an older slot: swap it to the front and carve there.
        if let Some(slot) = (1..CARVERS).find(|&i| self.carvers[i].root == parent as usize) {
            self.carvers.swap(0, slot);
            if let Some(block) = self.carve(size, parent as usize) {
                return Ok(block);
            }
        }
        let mut guard = None;
        let root = match self.locate(parent as usize, &mut guard) {
            Some(found) if found.meta.kind() == Some(Kind::Root) => found.header,
            _ => {
                if parent as usize == self.carvers[0].root {
                    self.release_slot(0, &mut guard);
                }
                return Err(self.bad_parent());
            }
        };
        if size <= CARVE_MAX && !self.hardened() {
            return self.carve_from_new_chunk(size, parent as usize, root, &mut guard);
        }
        let (block, class, usable) = self.alloc_block(size)?;
        block.start_linked(class);
        match root.link(block) {
            Ok(()) => {
                self.count(Counter::LinkedAllocated, 1);
                self.count(Counter::BytesAllocated, usable as u64);
                Ok(user_ptr(block))
            }
            Err(NotAnOpenRoot) => {
                // The parent was freed (or its block reused as a linked one) since we checked
                // it: the block was never published, so it simply goes back.
                block.finish(class);
                self.give_back_one(block, class, &mut guard);
                Err(self.bad_parent())
            }
        }
    }

    /// Lets go of the current chunk and links a new one to `root` (whose user pointer is
    /// `parent`), then carves `size` bytes from it.
    fn carve_from_new_chunk(
        &mut self,
        size: usize,
        parent: usize,
        root: &Header,
        guard: &mut Option<Guard>,
    ) -> Result<NonNull<u8>, Scode> {
        let need = carve_size(size);
        // Chunks grow while one thread keeps linking to one root, so long chains take few;
        // a root's first chunk fits what this thread's roots typically take, so a property
        // set takes one chunk once the thread has built a few. After the swap in `link_slow`,
        // a chunk of `parent` can only be in the front slot (full, or its root freed and the
        // address handed out again).
        let (mut class, earlier_bytes) = if parent == self.carvers[0].root {
            let front = &self.carvers[0];
            let grown = (front.next_class, front.root_bytes());
            self.release_slot(0, guard);
            grown
        } else {
            // A new root: the front moves to the victim's slot, whose chunk is let go.
            let victim = self.next_victim;
            self.next_victim = if victim == CARVERS - 1 { 1 } else { victim + 1 };
            let old = &self.carvers[victim];
            let (chunk, tally) = (old.chunk, old.tally);
            if old.root != 0 {
                self.learn_root_bytes(old.root_bytes());
            }
            self.carvers[victim] = std::mem::replace(&mut self.carvers[0], Carver::EMPTY);
            self.release(chunk, tally, guard);
            (first_chunk_class(self.typical_root_bytes), 0)
        };
        let mut layout = chunk::layout_of_class(class);
        while layout.capacity() < need {
            class = CHUNK_DOUBLED[class] as usize;
            layout = chunk::layout_of_class(class);
        }
        let chunk = match self.pop_current(class) {
            Some(block) => block,
            None => self.alloc_small_slow(class)?,
        };
        chunk.start_chunk(class as u8);
        chunk::Prologue::start(chunk);
        let prologue = chunk::prologue(chunk);
        let base = chunk.user() as usize;
        let (payload, end) = (base + layout.payload, base + layout.starts);
        chunk::clear_starts(end, base + usable_size(class));
        chunk::mark_start(payload, end, payload);
        if root.link(chunk).is_err() {
            chunk.finish(class as u8);
            self.give_back_one(chunk, class as u8, guard);
            return Err(self.bad_parent());
        }
        self.count(Counter::ChunksTaken, 1);
        let mut tally = Tally::ZERO;
        tally.add(need);
        prologue.record(tally);
        self.carvers[0] = Carver {
            root: parent,
            chunk,
            payload,
            top: payload + need,
            end,
            tally,
            earlier_bytes,
            // A root that outgrows its first chunk gets a second of the same size, and only
            // then doubling ones: doubling at once left most second chunks half empty under
            // churn (roots of 0-8 links), while long chains still take O(log n) chunks.
            next_class: if earlier_bytes == 0 {
                class
            } else {
                CHUNK_DOUBLED[class] as usize
            },
        };
        self.count(Counter::LinkedAllocated, 1);
        self.count(Counter::BytesAllocated, need as u64);
        // SAFETY: inside a mapped chunk, so not null.
        Ok(unsafe { NonNull::new_unchecked(ptr::with_exposed_provenance_mut(payload)) })
    }

    /// Folds the carved bytes of a root this thread is done with into its typical size.
    fn learn_root_bytes(&mut self, bytes: usize) {
        self.typical_root_bytes = (self.typical_root_bytes * 3 + bytes) / 4;
    }

    /// Lets go of every chunk this thread carves from.
    fn release_carvers(&mut self, guard: &mut Option<Guard>) {
        for slot in 0..CARVERS {
            self.release_slot(slot, guard);
        }
    }

    /// Lets go of the chunk in `slot`, which is left empty: seals it, or gives it back if its
    /// root's freer has already passed it.
    fn release_slot(&mut self, slot: usize, guard: &mut Option<Guard>) {
        let carver = std::mem::replace(&mut self.carvers[slot], Carver::EMPTY);
        self.release(carver.chunk, carver.tally, guard);
    }

    /// Lets go of `chunk` (if not null), taken out of its slot with its final `tally`: seals
    /// it, or gives it back if its root's freer has already passed it.
    fn release(&mut self, chunk: *const Header, tally: Tally, guard: &mut Option<Guard>) {
        if chunk.is_null() {
            return;
        }
        // SAFETY: the chunk was held by us, so it is live.
        let chunk = unsafe { &*chunk };
        if let CarverGets::GiveBack(tally) = chunk::prologue(chunk).seal(tally) {
            self.give_back_chunk(chunk, tally, guard);
        }
    }

    /// Gives back a chunk whose root was freed, counting the blocks carved from it as freed.
    fn give_back_chunk(&mut self, chunk: &Header, tally: Tally, guard: &mut Option<Guard>) {
        let class = chunk.meta().class();
        chunk.finish(class);
        self.give_back_one(chunk, class, guard);
        self.count(Counter::ChunksReturned, 1);
        self.count(Counter::LinkedFreed, tally.blocks());
        self.count(Counter::BytesFreed, tally.bytes());
    }

    /// Gives one owned, finished block back outside a chain walk.
    fn give_back_one(&mut self, block: &Header, class: u8, guard: &mut Option<Guard>) {
        let mut batch = RemoteBatch::new();
        self.give_back(block, class, self.home_of(block), &mut batch, guard);
        self.flush_batch(&mut batch);
    }

    fn bad_parent(&self) -> Scode {
        self.on_misuse("MAPIAllocateMore on a parent that is not a live root");
        self.count(Counter::BadParents, 1);
        Scode::MAPI_E_INVALID_PARAMETER
    }

    /// A block for `size` bytes (not yet started), its class byte and usable size.
    #[inline(always)]
    fn alloc_block(&mut self, size: usize) -> Result<(&'static Header, u8, usize), Scode> {
        let Some(class) = class_of(size) else {
            return self.alloc_large(size);
        };
        // Written out, not through `pop_current`: the same instructions in that shape laid
        // the lone root's loop out so that it ran 2-5% slower in the lab.
        let block = match self.current[class] {
            // SAFETY: pages on our lists are descriptors of live segments.
            Some(page) => match unsafe { page.as_ref() }.pop() {
                Some(block) => extend(block),
                None => self.alloc_small_slow(class)?,
            },
            None => self.alloc_small_slow(class)?,
        };
        Ok((block, class as u8, usable_size(class)))
    }

    /// A block (not yet started) from the current page of small class `class`, if it has one
    /// at hand.
    #[inline(always)]
    fn pop_current(&mut self, class: usize) -> Option<&'static Header> {
        // SAFETY: pages on our lists are descriptors of live segments.
        let page = unsafe { self.current[class]?.as_ref() };
        page.pop().map(extend)
    }

    /// A block of `class` when the current page has none at hand: from another page of ours,
    /// or a page new to this cache.
    ///
    /// Pages are searched in the order this cache took them (first fit), so that the newest
    /// drain and go back to the pool when the thread needs less; but a page that only got a
    /// few blocks back since it ran dry is passed over while a later one has a worthwhile
    /// share of its blocks back ([`REFILL_SHARE`]). Plain first fit took whatever the first
    /// pages had collected, often a block or two, and came back at once: churn at 1 thread
    /// spent 6% of its instructions here (now 2%) and ran 8-12% slower. Next fit (from the
    /// current page on) was 4% faster at 1 thread but spread the thread over all its pages,
    /// so fewer emptied: churn at 16 threads peaked 5-8% higher. Memory never used is taken
    /// only when no page has any block back. One pass that notes the two fallbacks on the way,
    /// instead of a pass for each, ran no faster (churn at 16 threads 24.7 against 24.2
    /// ns/block, 12 alternated jobs, 2026-11-30), so the three passes stay.
    #[cold]
    #[inline(never)]
    fn alloc_small_slow(&mut self, class: usize) -> Result<&'static Header, Scode> {
        let worthwhile =
            |page: &Page| page.reusable() * REFILL_SHARE >= page.carved() && page.refill_freed();
        if let Some(block) = self
            .first_fit(class, worthwhile)
            .or_else(|| self.first_fit(class, Page::refill_freed))
            .or_else(|| self.first_fit(class, Page::refill_fresh))
        {
            return Ok(block);
        }
        let (page, block) = self.fresh_block(class)?;
        self.current[class] = Some(NonNull::from(page));
        Ok(block)
    }

    /// The first of this cache's pages of `class` with a block at hand, or that `refill`
    /// refills; it becomes the current page.
    fn first_fit(
        &mut self,
        class: usize,
        refill: impl Fn(&Page) -> bool,
    ) -> Option<&'static Header> {
        for i in 0..self.pages[class].len() {
            // SAFETY: pages on our lists are descriptors of live segments.
            let page = unsafe { self.pages[class][i].as_ref() };
            if let Some(block) = take(page, &refill) {
                self.current[class] = Some(NonNull::from(page));
                return Some(extend(block));
            }
        }
        None
    }

    /// A block of `class` from a page new to this cache: adopted, from the pool, or from a
    /// new segment.
    fn fresh_block(&mut self, class: usize) -> Result<(&'static Page, &'static Header), Scode> {
        let shared = self.shared.clone();
        let reclaim = &shared.reclaim;
        for _ in 0..ADOPT_PER_REFILL {
            let Some(page) = reclaim.abandoned.pop() else {
                break;
            };
            let page = extend(page);
            page.drain_thread_free();
            if page.used() == 0 {
                // Nothing of its old life is left: serve our class from it.
                page.init(class, self.id);
            } else {
                page.set_owner(self.id);
            }
            self.add_page(page);
            if page.class() == class {
                if let Some(block) = take(page, Page::refill) {
                    return Ok((page, extend(block)));
                }
            }
        }
        let page = match reclaim.take_page() {
            Some(page) => extend(page),
            None => self.map_segment()?,
        };
        page.init(class, self.id);
        self.add_page(page);
        let block = take(page, Page::refill).expect("a fresh page has a free block");
        Ok((page, extend(block)))
    }

    /// Maps a segment, pools all its pages but the first and returns that one.
    fn map_segment(&self) -> Result<&'static Page, Scode> {
        let segment = SmallSegment::map().ok_or(Scode::MAPI_E_NOT_ENOUGH_MEMORY)?;
        let segment = extend(self.shared.registry.insert_small(segment));
        let (first, rest) = segment.pages().split_first().expect("segments have pages");
        for page in rest {
            self.shared.reclaim.add_fresh_page(page);
        }
        if first.mark_committed(true) {
            self.shared.reclaim.committed.add(crate::segment::PAGE_SIZE);
        }
        Ok(first)
    }

    #[cold]
    fn alloc_large(&mut self, size: usize) -> Result<(&'static Header, u8, usize), Scode> {
        if size > MAX_BUFFER_SIZE {
            return Err(Scode::MAPI_E_NOT_ENOUGH_MEMORY);
        }
        let span = LargeSpan::map(size).ok_or(Scode::MAPI_E_NOT_ENOUGH_MEMORY)?;
        let (base, len) = (span.base, span.len);
        let header = base as *mut Header;
        // SAFETY: the span is freshly mapped, page-aligned and at least a header long.
        unsafe { header.write(Header::new_free(LARGE_CLASS)) };
        self.shared.reclaim.committed.add(len);
        self.shared.registry.insert_large(span);
        // SAFETY: written above; the span lives until its block is freed.
        Ok((unsafe { &*header }, LARGE_CLASS, len - HEADER_SIZE))
    }

    fn add_page(&mut self, page: &Page) {
        let list = &mut self.pages[page.class()];
        page.set_slot(list.len());
        list.push(NonNull::from(page));
    }

    fn remove_page(&mut self, page: &Page) {
        let class = page.class();
        let list = &mut self.pages[class];
        let slot = page.slot();
        debug_assert_eq!(list[slot], NonNull::from(page));
        list.swap_remove(slot);
        if let Some(moved) = list.get(slot) {
            // SAFETY: pages on our lists are descriptors of live segments.
            unsafe { moved.as_ref() }.set_slot(slot);
        }
        if self.current[class] == Some(NonNull::from(page)) {
            self.current[class] = None;
        }
    }

    // ----- free -----

    /// Frees the root at `user` and its chain, or answers the misuse per SPEC.
    #[inline]
    pub(crate) fn free_buffer(&mut self, user: *mut u8) -> FreeOutcome {
        if user.is_null() {
            return FreeOutcome::Null;
        }
        let mut guard = None;
        let Some(Located {
            header: root,
            meta,
            home,
            owned,
        }) = self.locate(user as usize, &mut guard)
        else {
            return self.misuse(self.classify_interior(user as usize));
        };
        match meta.kind() {
            Some(Kind::Root) => {}
            // A chunk's own user pointer is its prologue, never handed out: no block starts
            // there (a freed root whose page now serves chunks lands here).
            Some(Kind::Linked) if meta.is_chunk() => return self.misuse(FreeOutcome::Foreign),
            Some(Kind::Linked) => return self.misuse(FreeOutcome::LinkedBlock),
            // `None`: a carved block boundary whose header reads as nothing, i.e. the page
            // was emptied and decommitted after this root was freed.
            Some(Kind::Free) | None => return self.misuse(FreeOutcome::DoubleFree),
        }
        let Some(chain) = root.close(meta) else {
            return self.misuse(FreeOutcome::DoubleFree);
        };
        // Half of all roots never get a child: a lone root on a page of ours goes straight
        // back to the local free list.
        if let (true, true, Home::Page(page)) = (chain.is_empty(), owned, home) {
            if !self.hardened() {
                let class = meta.class() as usize;
                if page.push_local(root) && self.current[class] != Some(NonNull::from(page)) {
                    self.page_emptied(page, &mut guard);
                    self.catch_up_epoch(guard);
                }
                self.count(Counter::RootsFreed, 1);
                self.count(Counter::BytesFreed, usable_size(class) as u64);
                return FreeOutcome::Freed;
            }
        }
        let mut batch = RemoteBatch::new();
        let (mut blocks, mut bytes) = (0, 0);
        for linked in chain {
            // SAFETY: chain blocks are live until we give them back just below (a chunk its
            // carver still holds: until we mark it freed).
            let linked = unsafe { &*linked };
            let meta = linked.meta();
            let class = meta.class();
            if meta.is_chunk() {
                let held = self.carvers.iter().position(|c| ptr::eq(linked, c.chunk));
                let tally = if let Some(slot) = held {
                    // Ours: nobody else touches its state.
                    let carver = std::mem::replace(&mut self.carvers[slot], Carver::EMPTY);
                    self.learn_root_bytes(carver.root_bytes());
                    carver.tally
                } else {
                    match chunk::prologue(linked).free() {
                        FreerGets::GiveBack(tally) => tally,
                        FreerGets::LeaveToCarver(tally) => {
                            blocks += tally.blocks();
                            bytes += tally.bytes() as usize;
                            continue;
                        }
                    }
                };
                linked.finish(class);
                self.give_back(linked, class, self.home_of(linked), &mut batch, &mut guard);
                self.count(Counter::ChunksReturned, 1);
                blocks += tally.blocks();
                bytes += tally.bytes() as usize;
                continue;
            }
            linked.finish(class);
            bytes += self.give_back(linked, class, self.home_of(linked), &mut batch, &mut guard);
            blocks += 1;
        }
        // `close` already marked the root free.
        bytes += self.give_back(root, meta.class(), home, &mut batch, &mut guard);
        self.flush_batch(&mut batch);
        if batch.hit_abandoned {
            drop(guard.take());
            self.reclaim_abandoned();
        }
        if self.retired {
            self.catch_up_epoch(guard);
        }
        self.count(Counter::RootsFreed, 1);
        self.count(Counter::LinkedFreed, blocks);
        self.count(Counter::BytesFreed, bytes as u64);
        FreeOutcome::Freed
    }

    /// Counts a misused free and answers it.
    #[cold]
    fn misuse(&self, outcome: FreeOutcome) -> FreeOutcome {
        self.on_misuse(match outcome {
            FreeOutcome::Foreign => "MAPIFreeBuffer of a pointer that is not a block of this heap",
            FreeOutcome::LinkedBlock => "MAPIFreeBuffer of a linked block",
            _ => "MAPIFreeBuffer of a root already freed",
        });
        let counter = match outcome {
            FreeOutcome::Foreign => Counter::ForeignFrees,
            FreeOutcome::LinkedBlock => Counter::LinkedFrees,
            _ => Counter::DoubleFrees,
        };
        self.count(counter, 1);
        outcome
    }

    /// A pointer that is not a block start: a block carved from a chunk (a linked block, by
    /// containment), or foreign. Called with the guard `locate` took, if it took one.
    #[cold]
    fn classify_interior(&self, user: usize) -> FreeOutcome {
        if let Some(Region::Small(segment)) = self.shared.registry.lookup(user) {
            if let Some((chunk, meta)) = segment.page_of(user).block_containing(user) {
                if meta.kind() == Some(Kind::Linked)
                    && meta.is_chunk()
                    && chunk::is_block_start(chunk, meta.class() as usize, user)
                {
                    return FreeOutcome::LinkedBlock;
                }
            }
        }
        FreeOutcome::Foreign
    }

    /// Where a live block of ours lives.
    #[inline]
    fn home_of(&self, block: &Header) -> Home {
        let addr = block as *const Header as usize;
        match self.region_of(addr) {
            Some(Region::Small(segment)) => Home::Page(extend(segment.page_of(addr))),
            Some(Region::Large(span)) => Home::Span(span),
            None => unreachable!("a live block is always in the registry"),
        }
    }

    /// Gives one owned, finished block of `class` back to its page or span; returns its
    /// usable size.
    #[inline]
    fn give_back<'a>(
        &mut self,
        block: &'a Header,
        class: u8,
        home: Home,
        batch: &mut RemoteBatch<'a>,
        guard: &mut Option<Guard>,
    ) -> usize {
        #[cfg(feature = "hardened")]
        if let (true, Home::Page(page)) = (self.shared.hardened, home) {
            return self.quarantine(page, block, class, guard);
        }
        match home {
            Home::Page(page) if page.owner() == self.id => {
                // The current page stays when it empties (the lone-root case): no call.
                if page.push_local(block)
                    && self.current[class as usize] != Some(NonNull::from(page))
                {
                    self.page_emptied(page, guard);
                }
            }
            Home::Page(page) => batch.add(page, block, self),
            Home::Span(span) => return self.release_span(span, guard),
        }
        usable_size(class as usize)
    }

    /// Whether this cache's heap is hardened.
    #[inline(always)]
    fn hardened(&self) -> bool {
        #[cfg(feature = "hardened")]
        return self.shared.hardened;
        #[cfg(not(feature = "hardened"))]
        false
    }

    /// Hardened builds: zeroes a freed block, checks the header after it, and quarantines it
    /// until an epoch has passed. A block whose neighbour's header was overwritten is kept
    /// out of use with its whole page.
    #[cfg(feature = "hardened")]
    fn quarantine(
        &mut self,
        page: &'static Page,
        block: &Header,
        class: u8,
        guard: &mut Option<Guard>,
    ) -> usize {
        let usable = usable_size(class as usize);
        // SAFETY: the block is ours (being freed) and `usable` bytes long.
        unsafe { block.user().write_bytes(0, usable) };
        if !page.neighbour_intact(block) {
            self.count(Counter::Corruptions, 1);
            page.mark_damaged();
            self.on_misuse("a write past the end of a block");
            return usable;
        }
        if page.owner() != self.id {
            self.count(Counter::RemoteFrees, 1);
        }
        self.quarantine.push((page, block as *const Header));
        if self.quarantine.len() >= QUARANTINE_BATCH {
            self.flush_quarantine(guard);
        }
        usable
    }

    /// Hardened builds: hands the quarantined blocks to the epoch.
    #[cfg(feature = "hardened")]
    fn flush_quarantine(&mut self, guard: &mut Option<Guard>) {
        if self.quarantine.is_empty() {
            return;
        }
        let guard = guard.get_or_insert_with(|| self.pin());
        let blocks = std::mem::replace(&mut self.quarantine, Vec::with_capacity(QUARANTINE_BATCH));
        let abandoned = blocks.iter().any(|(page, _)| page.owner() == 0);
        self.shared.reclaim.release_quarantine(blocks, guard);
        // Earlier batches have reached their pages' `thread_free` by now (or will soon): a
        // thread that only frees must still drain and pool the pages it owns or that were
        // abandoned, or quarantine would hold memory forever.
        if abandoned {
            self.adopt_abandoned(guard);
        }
        self.sweep_pages(guard);
    }

    /// Hardened builds with `MAPIALLOC_ABORT_ON_MISUSE=1`: stop the provider at its first
    /// misuse, for a debugger.
    #[inline]
    fn on_misuse(&self, _what: &str) {
        #[cfg(feature = "hardened")]
        if self.shared.abort_on_misuse {
            eprintln!("mapialloc: misuse: {_what}; aborting (MAPIALLOC_ABORT_ON_MISUSE=1)");
            std::process::abort();
        }
    }

    /// Unmaps a large block's span after a grace period; returns its usable size.
    #[cold]
    fn release_span(&mut self, span: *const LargeSpan, guard: &mut Option<Guard>) -> usize {
        let guard = guard.get_or_insert_with(|| self.pin());
        // SAFETY: the span's block is ours to free, so the span is registered and this thread
        // is the only one that removes it.
        let span = unsafe { self.shared.registry.remove_large(span) };
        let usable = span.len - HEADER_SIZE;
        self.shared.reclaim.retire_span(span, guard);
        self.retired = true;
        usable
    }

    #[inline]
    fn flush_batch(&self, batch: &mut RemoteBatch<'_>) {
        if let Some(page) = batch.page.take() {
            // SAFETY: the batch holds blocks we own, all of `page`, linked first..=last.
            unsafe { page.push_remote(batch.first, batch.last, batch.count) };
            self.count(Counter::RemoteFrees, batch.count);
            batch.hit_abandoned |= page.owner() == 0;
        }
    }

    /// Blocks were freed onto pages whose threads have exited: adopt abandoned pages (up to
    /// [`ADOPT_AFTER_FREE`]) so that they are drained, and pooled once empty, even if no thread
    /// allocates again.
    #[cold]
    fn reclaim_abandoned(&mut self) {
        if self.shared.reclaim.abandoned.is_empty() {
            return;
        }
        let guard = self.handle.pin();
        for _ in 0..ADOPT_AFTER_FREE {
            let Some(page) = self.shared.reclaim.abandoned.pop() else {
                break;
            };
            self.adopt(extend(page), &guard);
        }
    }

    /// Takes an abandoned page (popped from the stack) as ours; pools it if it is empty.
    fn adopt(&mut self, page: &'static Page, guard: &Guard) {
        page.set_owner(self.id);
        self.add_page(page);
        page.drain_thread_free();
        if page.used() == 0 {
            self.remove_page(page);
            self.retire(page, guard);
        }
    }

    /// A page of ours, not the current one of its class, has no block out: back to the pool.
    #[cold]
    fn page_emptied(&mut self, page: &Page, guard: &mut Option<Guard>) {
        self.remove_page(page);
        let guard = guard.get_or_insert_with(|| self.pin());
        self.retire(page, guard);
    }

    /// Retires an empty page of ours through the epoch; the call catches up before it returns.
    fn retire(&mut self, page: &Page, guard: &Guard) {
        self.shared.reclaim.retire_page(page, guard);
        self.retired = true;
    }

    /// After a call retired memory: unpins (`guard`) and flushes the epoch while that returns
    /// something, so that when no other thread is inside a call the retired pages reach the
    /// pool (and are decommitted past its bound) and spans are unmapped before this call
    /// returns. Otherwise they would wait for this heap's next calls, which a provider that
    /// has just freed everything may never make. A thread pinned elsewhere stops it after
    /// [`CATCH_UP_MIN_FLUSHES`]. Retiring only fills this thread's epoch bag; the
    /// first flush here seals it, so a call pays one bag however many pages it retired, and
    /// nothing per block freed.
    ///
    /// The current pages stay, even empty: while a page is its owner's current page no other
    /// thread can carve it for another class, so a root freed twice by its thread (with no
    /// allocation of that class between) is always told as a double free, never taken for a
    /// block another thread got since. (Retiring them here cost that: a double free right
    /// after a free that emptied pages could land on another thread's new block.)
    #[cold]
    #[inline(never)]
    fn catch_up_epoch(&mut self, guard: Option<Guard>) {
        drop(guard);
        self.retired = false;
        // Loom models flush once: `flush` is safe at any point, and the loop multiplies the
        // interleavings past what the models can explore. It decides when memory goes back,
        // not whether that is safe.
        if cfg!(loom) {
            self.handle.pin().flush();
            return;
        }
        self.flush_epoch(CATCH_UP_MIN_FLUSHES);
    }

    /// What the registry knows about `addr`, through `segments_seen`.
    #[inline(always)]
    fn region_of(&self, addr: usize) -> Option<Region<'static>> {
        let key = addr >> SEGMENT_SHIFT;
        let entry = &self.segments_seen[key % SEGMENTS_SEEN];
        let (seen_key, seen) = entry.get();
        if key == seen_key {
            // SAFETY: `seen` was registered as the small segment of `key`, and small segments
            // stay registered and mapped until the heap's teardown, which waits for every
            // cache (each holds the `Shared`).
            return Some(Region::Small(unsafe { &*seen }));
        }
        Some(match self.shared.registry.lookup(addr)? {
            Region::Small(segment) => {
                entry.set((key, segment));
                Region::Small(extend(segment))
            }
            Region::Large(span) => Region::Large(span),
        })
    }

    /// Finds the block whose user pointer is `user` and reads its `meta`, without reading
    /// anything the registry does not vouch for.
    ///
    /// A page this cache owns cannot change layout under it, so checking a block there needs
    /// no pin. Any other page could be retired and re-initialised for another class while we
    /// check and then CAS its header: pinning first (into `guard`) makes that wait for us.
    #[inline(always)]
    fn locate(&self, user: usize, guard: &mut Option<Guard>) -> Option<Located> {
        if user % ALIGN != 0 {
            return None;
        }
        match self.region_of(user)? {
            Region::Small(segment) => {
                let page = extend(segment.page_of(user));
                // Only this thread hands its own pages on, so `owned` cannot change under us.
                let owned = page.owner() == self.id;
                // Hardened heaps pin on every call, so quarantine covers every racing call.
                if (self.hardened() || !owned) && guard.is_none() {
                    *guard = Some(self.pin());
                }
                let (header, meta) = if owned {
                    page.block_at_owned(user)?
                } else {
                    page.block_at(user)?
                };
                Some(Located {
                    header: extend(header),
                    meta,
                    home: Home::Page(page),
                    owned,
                })
            }
            Region::Large(_) => self.locate_large(user, guard),
        }
    }

    /// Pins the epoch; out of line, so the fast paths that do not pin stay small.
    #[cold]
    #[inline(never)]
    fn pin(&self) -> Guard {
        self.handle.pin()
    }

    /// `locate` for a large span: pins (into `guard`) and looks again, since an entry seen
    /// while pinned stays readable until we unpin.
    #[cold]
    fn locate_large(&self, user: usize, guard: &mut Option<Guard>) -> Option<Located> {
        guard.get_or_insert_with(|| self.pin());
        let Region::Large(span) = self.shared.registry.lookup(user)? else {
            return None;
        };
        // SAFETY: registered while we are pinned, so not yet retired.
        let base = unsafe { (*span).base };
        if user != base + HEADER_SIZE {
            return None;
        }
        // SAFETY: the span starts with a header written before it was registered.
        let header = unsafe { &*Header::of_user(user) };
        Some(Located {
            header,
            meta: header.meta(),
            home: Home::Span(span),
            owned: false,
        })
    }

    // ----- maintenance -----

    /// See `Shared::live_roots`; pins for the walk.
    pub(crate) fn live_roots(&self) -> Vec<LiveRoot> {
        self.shared.live_roots(&self.pin())
    }

    /// Adopts every abandoned page, sweeps our pages (pooling the empty ones) and lets the
    /// epoch advance so deferred returns run.
    pub(crate) fn collect(&mut self) {
        self.release_carvers(&mut None);
        #[cfg(feature = "hardened")]
        {
            // Quarantined blocks first, so that the sweep below finds their pages empty.
            self.flush_quarantine(&mut None);
            self.run_deferred();
        }
        let guard = self.handle.pin();
        self.adopt_abandoned(&guard);
        self.sweep_pages(&guard);
        drop(guard);
        self.run_deferred();
    }

    /// Adopts every page on the abandoned stack (pooling the empty ones).
    fn adopt_abandoned(&mut self, guard: &Guard) {
        while let Some(page) = self.shared.reclaim.abandoned.pop() {
            self.adopt(extend(page), guard);
        }
    }

    /// Drains every page of ours and pools the ones with no block out.
    fn sweep_pages(&mut self, guard: &Guard) {
        for class in 0..NUM_CLASSES {
            for i in (0..self.pages[class].len()).rev() {
                // SAFETY: pages on our lists are descriptors of live segments.
                let page = unsafe { self.pages[class][i].as_ref() };
                page.drain_thread_free();
                page.check_invariant();
                if page.used() == 0 {
                    self.remove_page(page);
                    self.shared.reclaim.retire_page(page, guard);
                }
            }
        }
    }

    /// Lets the epoch advance until every deferred return has run, or other threads' pins
    /// hold it back. Each flush advances the epoch at most once and runs a few expired bags.
    fn run_deferred(&self) {
        self.flush_epoch(COLLECT_ROUNDS);
    }

    /// Flushes the epoch while deferred returns are pending, at most [`COLLECT_ROUNDS`] times;
    /// after `min_flushes`, only while each flush returns something.
    fn flush_epoch(&self, min_flushes: usize) {
        let reclaim = &self.shared.reclaim;
        let mut pending = reclaim.pending();
        for flush in 0..COLLECT_ROUNDS {
            if pending == 0 {
                break;
            }
            self.handle.pin().flush();
            let now = reclaim.pending();
            if now >= pending && flush + 1 >= min_flushes {
                break;
            }
            pending = now;
        }
    }

    /// Thread exit, when other threads exited at the same time and this one left last, or when
    /// it is the last cache on the heap (`leave_heap_idle`): catches up again, yielding first
    /// so that they finish unregistering.
    ///
    /// Threads that exit together hold the epoch back for each other: each one's catch-up in
    /// `abandon_all` can find the other pinned (in its own page loop or catch-up) and give up,
    /// and then the pages both retired wait for a call that may never come. In the lab's
    /// `churn` at 2 threads that happened in about 1 run in 25 (4-5 MiB left committed after
    /// everything was freed); see the performance issue's note.
    fn settle_on_exit(&self) {
        if cfg!(loom) {
            return;
        }
        let reclaim = &self.shared.reclaim;
        for _ in 0..EXIT_SETTLE_ROUNDS {
            if reclaim.pending() == 0 {
                break;
            }
            std::thread::yield_now();
            self.flush_epoch(CATCH_UP_MIN_FLUSHES);
        }
    }

    /// Thread exit, when no other thread cache is left on the heap: settles what the exits
    /// left behind, then trims the idle pool to [`IDLE_HEAP_POOL_PAGES`].
    ///
    /// * Returns still pending run first (`settle_on_exit`): threads that exited just before
    ///   may have held the epoch back for each other.
    /// * Abandoned pages that fell empty are pooled (the top [`ADOPT_AFTER_FREE`] are looked
    ///   at): in hardened builds an exiting thread's last quarantine batch can reach its pages
    ///   only after they were abandoned, and no later call may come to adopt them.
    /// * The idle pool is kept for threads that come next; with none attached, the next one
    ///   may never come (a provider whose worker threads finished), so the pool gives its
    ///   pages back. A thread that comes later faults in what it touches, as on a new heap.
    fn leave_heap_idle(&mut self) {
        if cfg!(loom) {
            return;
        }
        self.settle_on_exit();
        // Adopted pages with live blocks go back to the abandoned stack just below.
        self.reclaim_abandoned();
        self.abandon_all();
        self.settle_on_exit();
        self.shared.reclaim.trim_pool(IDLE_HEAP_POOL_PAGES);
    }

    /// Thread exit: empty pages go to the pool, the others are abandoned for adoption.
    fn abandon_all(&mut self) {
        self.release_carvers(&mut None);
        #[cfg(feature = "hardened")]
        {
            self.flush_quarantine(&mut None);
            // Let the last batch's grace period pass now, so that its blocks are back in our
            // pages' `thread_free` before the loop below tells empty pages from live ones;
            // otherwise they would land on pages already abandoned, which stay committed
            // until a later call adopts them.
            self.flush_epoch(CATCH_UP_MIN_FLUSHES);
        }
        let guard = self.handle.pin();
        for class in 0..NUM_CLASSES {
            for page in std::mem::take(&mut self.pages[class]) {
                // SAFETY: pages on our lists are descriptors of live segments.
                let page = unsafe { page.as_ref() };
                page.drain_thread_free();
                page.check_invariant();
                if page.used() == 0 {
                    self.retire(page, &guard);
                } else {
                    self.shared.reclaim.abandon_page(page);
                }
            }
            self.current[class] = None;
        }
        // Catching up only for what this thread retired: a short-lived thread that leaves live
        // blocks behind should not pay for collecting other threads' garbage on its way out.
        if self.retired {
            self.catch_up_epoch(Some(guard));
        } else {
            guard.flush();
        }
    }
}

impl Drop for ThreadCache {
    fn drop(&mut self) {
        use std::sync::atomic::Ordering::Relaxed;
        // Relaxed: these only decide whether to flush again, never what is safe to reuse.
        let others_exiting = self.shared.exiting.fetch_add(1, Relaxed) > 0;
        let begun = self.shared.exits_begun.fetch_add(1, Relaxed);
        self.abandon_all();
        let last = self.shared.exiting.fetch_sub(1, Relaxed) == 1;
        let joined_later = self.shared.exits_begun.load(Relaxed) != begun + 1;
        let attached = self.shared.attached.fetch_sub(1, Relaxed) - 1;
        // A heap being dropped is torn down next: nothing to tidy. Relaxed: a flag seen late
        // only tidies a heap about to go.
        if attached == 0 && !self.shared.dropped.load(Ordering::Relaxed) {
            self.leave_heap_idle();
        } else if last && (others_exiting || joined_later) {
            self.settle_on_exit();
        }
        // SAFETY: the slot is ours and lives as long as `shared`.
        self.shared.stats.release(unsafe { self.stats.as_ref() });
    }
}

impl<'a> RemoteBatch<'a> {
    fn new() -> Self {
        RemoteBatch {
            page: None,
            first: ptr::null(),
            last: ptr::null(),
            count: 0,
            hit_abandoned: false,
        }
    }

    /// Adds a block of `page`, flushing the batch first when it holds another page's blocks.
    fn add(&mut self, page: &'a Page, block: &'a Header, cache: &ThreadCache) {
        let block = block as *const Header;
        match self.page {
            Some(p) if ptr::eq(p, page) => {
                // SAFETY: both blocks are ours (being freed) and on the same page.
                unsafe { link_blocks(self.last, block) };
                self.last = block;
                self.count += 1;
            }
            _ => {
                cache.flush_batch(self);
                self.page = Some(page);
                self.first = block;
                self.last = block;
                self.count = 1;
            }
        }
    }
}

/// A free block of `page`: popped, or popped after `refill` refilled it.
#[inline]
fn take(page: &Page, refill: impl Fn(&Page) -> bool) -> Option<&Header> {
    page.pop().or_else(|| refill(page).then(|| page.pop())?)
}

#[inline]
fn user_ptr(block: &Header) -> NonNull<u8> {
    // SAFETY: a header's user pointer is never null.
    unsafe { NonNull::new_unchecked(block.user()) }
}

/// Widens a reference to a page descriptor or header to `'static`.
///
/// Descriptors live until the heap is dropped and every cache holds the heap (`shared`), so a
/// cache never outlives what these references point to; the lifetime only has to outlive the
/// cache's own borrows.
#[inline]
fn extend<T>(r: &T) -> &'static T {
    // SAFETY: see above: the referent outlives every cache that holds the reference.
    unsafe { &*(r as *const T) }
}
