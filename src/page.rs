//! Pages (slabs): block carving and the sharded free lists, after mimalloc.
//!
//! A page serves blocks of one size class for one owning thread cache. The owner pops `free`,
//! pushes frees of its own blocks to `local_free`, and when both run dry takes the whole atomic
//! `thread_free` list, which other threads push to, with one swap. Free blocks are linked
//! through their first user word; their headers stay `CLOSED`/`FREE` (see `chain`).
//!
//! Invariant, at any point where the owner is not inside a page call:
//! `used + |free| + |local_free| == reserved <= capacity`, and every block on `thread_free` is
//! counted in `used` (it is only uncounted when the owner drains it). `check_invariant` verifies
//! it in debug builds.
//!
//! Owner-only fields are atomics accessed with `Relaxed` (plain loads and stores on every
//! target we run on) so that ownership can move between threads (abandon, adopt) through the
//! Release/Acquire edges of the stacks in `reclaim`, without `UnsafeCell`.
//!
//! Locked instructions: pop and local push none; a remote batch push one CAS per attempt; a
//! drain one swap.
//!
//! A descriptor spans three cache lines, split by who writes them: the layout, which
//! validators on any thread read and which changes only when the page is carved or changes
//! hands; the owner's lists, written on every pop and local free; and `thread_free`, which
//! other threads CAS. As one 104-byte struct (lines shared with the neighbouring page), every
//! remote free took the line the owner pops from, and every pop the line the next remote
//! validation reads. Split this way, the lab's pipeline went from 36-38 to 26-27 ns/block and
//! churn at 2 threads from 19-22 to 17-18 (three alternations, 2026-11-30); separating
//! `thread_free` alone left the pipeline at 35.

use crate::chain::{Header, Meta, HEADER_SIZE};
use crate::segment::{PAGE_MAX_BLOCKS, PAGE_SIZE};
use crate::size_class::block_size;
use crate::sync::{AtomicPtr, AtomicUsize, Ordering};
use std::ptr;

/// Blocks carved at once when the free lists run dry (touching memory lazily, like a bump):
/// an OS page's worth, but at least 4 blocks and at most 16. With 16 of every class, a thread
/// of the lab's churn (1,000 live roots) kept 575 KiB carved but free across its classes; with
/// about 4 KiB a batch, 492 KiB, and the peak at 16 threads fell by 2 MiB (54-55 -> 52-53) at
/// the same speed (2026-11-30). A single block a batch for the largest classes cost a long
/// chain 5% more instructions (more trips to the page search): hence at least 4.
const CARVE_BYTES: usize = 4096;
const CARVE_MIN_BLOCKS: usize = 4;
const CARVE_MAX_BLOCKS: usize = 16;

/// A page descriptor. Lives in a `SmallSegment` for the heap's whole life.
///
/// `repr(C)`, in the order measured (see the module docs for the split): the owner's lists,
/// `thread_free`, then the layout. That is the order the compiler chose for the measured
/// build; with the layout first instead, churn at 2 threads ran 27 ns/block instead of 18 in
/// 2 of 9 runs (not understood).
#[repr(C, align(64))]
pub(crate) struct Page {
    /// The owner's lists and slot, on a line of their own.
    owned: CacheLine<OwnerFields>,
    /// Blocks freed by other threads, pushed with a CAS and taken whole by the owner; on a
    /// line of its own.
    thread_free: CacheLine<AtomicPtr<Header>>,
    /// First byte of the page's memory.
    area: usize,
    /// Block size of the class being served (0 before first use).
    block_size: AtomicUsize,
    /// `2^32 / block_size + 1`: turns the validator's division into a multiplication.
    block_reciprocal: AtomicUsize,
    /// Blocks carved so far. Release on carve, Acquire in validators.
    reserved: AtomicUsize,
    /// The class, for the owner's bookkeeping.
    class: AtomicUsize,
    /// Id of the owning thread cache; 0 while abandoned or pooled.
    owner: AtomicUsize,
    /// Link in the pool or abandoned stack (see `reclaim`).
    pub(crate) next: AtomicPtr<Page>,
    /// Whether the page's memory is committed (for accounting; owner or stack holder only).
    committed: AtomicUsize,
    /// Hardened builds: a block header in this page was found overwritten, so its free lists
    /// cannot be trusted: the page hands out nothing more and is never reused.
    #[cfg(feature = "hardened")]
    damaged: crate::sync::AtomicBool,
}

/// The fields only a page's owner touches: its lists and count, written on every pop and
/// local free, and its slot in the owner's class list.
struct OwnerFields {
    /// Blocks ready to hand out.
    free: AtomicPtr<Header>,
    /// Blocks the owner freed since the last refill.
    local_free: AtomicPtr<Header>,
    /// Blocks handed out and not yet back on `free`/`local_free`.
    used: AtomicUsize,
    /// The page's index in its owner's class list.
    slot: AtomicUsize,
}

// The layout line holds exactly the fields after `thread_free` (hardened builds add a flag).
#[cfg(not(any(loom, feature = "hardened")))]
const _: () =
    assert!(std::mem::size_of::<Page>() == 3 * 64 && std::mem::offset_of!(Page, area) == 2 * 64);

/// A value alone on a 64-byte cache line. Not `crossbeam_utils::CachePadded`, which pads to
/// 128 bytes on x86-64 (for the adjacent-line prefetcher): with it, the lab's pipeline ran
/// 1-2 ns/block faster but thread-churn 40% slower (800-820 against 567-578 ns/block, not
/// understood), and a segment's 64 descriptors took 24 KiB instead of 12 (6.5 unsplit).
#[repr(align(64))]
struct CacheLine<T>(T);

impl<T> std::ops::Deref for CacheLine<T> {
    type Target = T;

    #[inline]
    fn deref(&self) -> &T {
        &self.0
    }
}

/// Reads the free-list link stored in a free block's first user word.
///
/// # Safety
/// `block` is a free block owned by the caller (on one of its lists).
#[inline]
unsafe fn next_of(block: *const Header) -> *mut Header {
    // SAFETY: free blocks hold their link in their first user word (always >= 16 bytes), and
    // the caller owns the block, so nothing else writes it.
    unsafe { ((*block).user() as *const *mut Header).read() }
}

/// Writes the free-list link of a free block.
///
/// # Safety
/// `block` is a free block owned by the caller.
#[inline]
unsafe fn set_next(block: *const Header, next: *mut Header) {
    // SAFETY: as in `next_of`.
    unsafe { ((*block).user() as *mut *mut Header).write(next) };
}

/// `thread_free` keeps the list's length above the address bits (block addresses are below
/// 2^47, see `chain::ADDRESS_LIMIT`; a page has far fewer than 2^16 blocks), so that a drain
/// knows the count without walking blocks another core wrote last.
const COUNT_SHIFT: u32 = 48;

/// The head and the length of a `thread_free` word.
#[inline]
fn unpack_thread_free(word: *mut Header) -> (*mut Header, usize) {
    (
        word.map_addr(|addr| addr & ((1 << COUNT_SHIFT) - 1)),
        word.addr() >> COUNT_SHIFT,
    )
}

/// A `thread_free` word for the list starting at `head` with `count` blocks.
#[inline]
fn pack_thread_free(head: *mut Header, count: usize) -> *mut Header {
    head.map_addr(|addr| {
        debug_assert_eq!(addr >> COUNT_SHIFT, 0, "block address above 2^48");
        addr | count << COUNT_SHIFT
    })
}

/// Debug checks: the length of a list of free blocks.
///
/// # Safety
/// The caller owns the list (every block on it, linked through `next_of`, ending in null).
unsafe fn list_len(mut block: *mut Header) -> usize {
    let mut n = 0;
    while !block.is_null() {
        n += 1;
        // SAFETY: the caller owns the list.
        block = unsafe { next_of(block) };
    }
    n
}

impl Page {
    pub(crate) fn new(area: usize) -> Page {
        Page {
            owned: CacheLine(OwnerFields {
                free: AtomicPtr::new(ptr::null_mut()),
                local_free: AtomicPtr::new(ptr::null_mut()),
                used: AtomicUsize::new(0),
                slot: AtomicUsize::new(0),
            }),
            thread_free: CacheLine(AtomicPtr::new(ptr::null_mut())),
            area,
            block_size: AtomicUsize::new(0),
            block_reciprocal: AtomicUsize::new(0),
            reserved: AtomicUsize::new(0),
            class: AtomicUsize::new(0),
            owner: AtomicUsize::new(0),
            next: AtomicPtr::new(ptr::null_mut()),
            committed: AtomicUsize::new(0),
            #[cfg(feature = "hardened")]
            damaged: crate::sync::AtomicBool::new(false),
        }
    }

    /// Prepares a free page (owned by the caller) to serve `class` for cache `owner`.
    pub(crate) fn init(&self, class: usize, owner: usize) {
        debug_assert!(self.thread_free.load(Ordering::Relaxed).is_null());
        self.reserved.store(0, Ordering::Relaxed);
        self.block_reciprocal
            .store((1 << 32) / block_size(class) + 1, Ordering::Relaxed);
        // Release: a validator that sees the new block size (Acquire) also sees `reserved` and
        // the reciprocal that go with it.
        self.block_size.store(block_size(class), Ordering::Release);
        self.class.store(class, Ordering::Relaxed);
        self.owned.free.store(ptr::null_mut(), Ordering::Relaxed);
        self.owned
            .local_free
            .store(ptr::null_mut(), Ordering::Relaxed);
        self.owned.used.store(0, Ordering::Relaxed);
        self.owner.store(owner, Ordering::Relaxed);
    }

    #[inline]
    pub(crate) fn class(&self) -> usize {
        self.class.load(Ordering::Relaxed)
    }

    #[inline]
    pub(crate) fn owner(&self) -> usize {
        self.owner.load(Ordering::Relaxed)
    }

    #[inline]
    pub(crate) fn set_owner(&self, owner: usize) {
        self.owner.store(owner, Ordering::Relaxed);
    }

    #[inline]
    pub(crate) fn slot(&self) -> usize {
        self.owned.slot.load(Ordering::Relaxed)
    }

    #[inline]
    pub(crate) fn set_slot(&self, slot: usize) {
        self.owned.slot.store(slot, Ordering::Relaxed);
    }

    #[inline]
    pub(crate) fn used(&self) -> usize {
        self.owned.used.load(Ordering::Relaxed)
    }

    pub(crate) fn area(&self) -> *mut u8 {
        self.area as *mut u8
    }

    /// Marks the memory committed; returns whether it was not before.
    pub(crate) fn mark_committed(&self, committed: bool) -> bool {
        self.committed.swap(committed as usize, Ordering::Relaxed) != committed as usize
    }

    pub(crate) fn is_committed(&self) -> bool {
        self.committed.load(Ordering::Relaxed) != 0
    }

    #[allow(clippy::unnecessary_min_or_max)] // PAGE_MAX_BLOCKS only bites in loom's config
    fn capacity(&self) -> usize {
        (PAGE_SIZE / self.block_size.load(Ordering::Relaxed)).min(PAGE_MAX_BLOCKS)
    }

    /// The header of the block whose user pointer is `user`, and its `meta`, if `user` is
    /// exactly the user pointer of a block carved in this page.
    ///
    /// Any thread may ask. A thread that does not own the page must be pinned: then the page
    /// cannot be retired and re-initialised for another class between this check and the
    /// caller's CAS on the header unless it was already retired before the pin, and in that
    /// case the layout re-check in `block_containing` catches a re-initialisation that raced
    /// this read.
    #[inline]
    pub(crate) fn block_at(&self, user: usize) -> Option<(&Header, Meta)> {
        let (header, meta) = self.block_containing(user)?;
        // Interior pointers are refused: only the block's own user pointer names it.
        (header.user() as usize == user).then_some((header, meta))
    }

    /// The index of the block at byte `offset` of the page, for an offset below `PAGE_SIZE`
    /// (larger ones give garbage, which the callers' bound checks refuse). Relaxed: the
    /// reciprocal is read with the block size it belongs to (see the callers).
    #[inline]
    fn index_of(&self, offset: usize) -> usize {
        // offset < PAGE_SIZE <= 2^16 and size < 2^16, so the reciprocal gives the exact
        // quotient.
        offset.wrapping_mul(self.block_reciprocal.load(Ordering::Relaxed)) >> 32
    }

    /// `block_at` for the page's owner. Only the owner changes the layout (`init`, `carve`),
    /// so it reads the layout once, without the re-check that other threads need.
    #[inline]
    pub(crate) fn block_at_owned(&self, user: usize) -> Option<(&Header, Meta)> {
        // A pointer below the page wraps to a large offset and fails the bound as well.
        let offset = user.wrapping_sub(self.area);
        if offset >= PAGE_SIZE {
            return None;
        }
        // Relaxed, here and below: this thread wrote the layout itself (no other thread does).
        let index = self.index_of(offset);
        if index >= self.reserved.load(Ordering::Relaxed) {
            return None;
        }
        let header = self.area + index * self.block_size.load(Ordering::Relaxed);
        // Interior pointers are refused, as in `block_at`.
        if header + HEADER_SIZE != user {
            return None;
        }
        // SAFETY: block `index` was carved (by this thread), so its header was written, and
        // the page's memory stays mapped while the heap lives.
        let header: &Header = unsafe { &*std::ptr::with_exposed_provenance(header) };
        Some((header, header.meta()))
    }

    /// The header and `meta` of the carved block that contains `user` (anywhere in it). Any
    /// thread may ask (see `block_at` for when it must be pinned); what it reads of a page it
    /// does not own is a snapshot.
    #[inline]
    pub(crate) fn block_containing(&self, user: usize) -> Option<(&Header, Meta)> {
        // Acquire: pairs with the Release in `init`/`carve`, so the size and count agree with
        // the headers they describe.
        let size = self.block_size.load(Ordering::Acquire);
        let offset = user.checked_sub(self.area)?;
        let index = self.index_of(offset);
        // Acquire (`reserved`): pairs with the Release store in `carve`: headers below it exist.
        if size == 0 || offset >= PAGE_SIZE || index >= self.reserved.load(Ordering::Acquire) {
            return None;
        }
        // SAFETY: block `index` was carved, so its header was written, and the page's memory
        // stays mapped while the heap lives.
        let header: &Header =
            unsafe { &*std::ptr::with_exposed_provenance(self.area + index * size) };
        let meta = header.meta();
        // Like a seqlock reader: the Acquire load of `meta` keeps this load after it, so an
        // unchanged size means the header read belongs to the layout checked above.
        if self.block_size.load(Ordering::Relaxed) != size {
            return None;
        }
        Some((header, meta))
    }

    /// Every carved block's header, for enumeration by any thread (headers are atomics; the
    /// caller treats what it reads as a snapshot).
    pub(crate) fn carved_blocks(&self) -> impl Iterator<Item = &Header> {
        // Acquire, both: pair with the Release stores in `init` and `carve`, as in `block_at`.
        let size = self.block_size.load(Ordering::Acquire);
        let carved = if size == 0 {
            0
        } else {
            self.reserved.load(Ordering::Acquire)
        };
        (0..carved).map(move |i| {
            // SAFETY: block `i` was carved, so its header was written, and the page's memory
            // stays mapped while the heap lives.
            unsafe { &*std::ptr::with_exposed_provenance::<Header>(self.area + i * size) }
        })
    }

    /// Owner: pops a free block.
    #[inline]
    pub(crate) fn pop(&self) -> Option<&Header> {
        #[cfg(feature = "hardened")]
        if self.is_damaged() {
            return None;
        }
        let block = self.owned.free.load(Ordering::Relaxed);
        if block.is_null() {
            return None;
        }
        // SAFETY: `block` is on the owner's `free` list.
        self.owned
            .free
            .store(unsafe { next_of(block) }, Ordering::Relaxed);
        self.owned.used.store(
            self.owned.used.load(Ordering::Relaxed) + 1,
            Ordering::Relaxed,
        );
        // SAFETY: blocks on the free list are carved blocks of this page.
        Some(unsafe { &*block })
    }

    /// Owner: refills `free` from `local_free`, `thread_free`, or fresh memory, in that order.
    /// Returns whether `free` has a block now.
    #[cold]
    pub(crate) fn refill(&self) -> bool {
        self.refill_freed() || self.refill_fresh()
    }

    /// Owner: refills `free` from `local_free` or `thread_free` (blocks freed since it ran
    /// dry), in that order. Returns whether `free` has a block now.
    pub(crate) fn refill_freed(&self) -> bool {
        #[cfg(feature = "hardened")]
        if self.is_damaged() {
            return false;
        }
        debug_assert!(self.owned.free.load(Ordering::Relaxed).is_null());
        // Owner-only list: a load and a store, not a (locked) swap.
        let local = self.owned.local_free.load(Ordering::Relaxed);
        if !local.is_null() {
            self.owned
                .local_free
                .store(ptr::null_mut(), Ordering::Relaxed);
            self.owned.free.store(local, Ordering::Relaxed);
            return true;
        }
        self.drain_thread_free() > 0
    }

    /// Owner: blocks a refill from `local_free` and `thread_free` would bring, with those
    /// already on `free` (a snapshot: other threads may add to `thread_free`).
    pub(crate) fn reusable(&self) -> usize {
        // Relaxed, all three: `reserved` and `used` are the owner's own; the `thread_free`
        // count only weighs the page, and the blocks are taken (if at all) by the Acquire swap
        // in `drain_thread_free`, which pairs with `push_remote`'s Release CAS.
        let (_, remote) = unpack_thread_free(self.thread_free.load(Ordering::Relaxed));
        self.reserved.load(Ordering::Relaxed) - self.owned.used.load(Ordering::Relaxed) + remote
    }

    /// Owner: blocks carved so far (handed out, free, or waiting on a list).
    pub(crate) fn carved(&self) -> usize {
        // Relaxed: only the owner writes `reserved`.
        self.reserved.load(Ordering::Relaxed)
    }

    /// Owner: refills `free` with blocks never used before, if the page has room. Returns
    /// whether `free` has a block now.
    pub(crate) fn refill_fresh(&self) -> bool {
        #[cfg(feature = "hardened")]
        if self.is_damaged() {
            return false;
        }
        debug_assert!(self.owned.free.load(Ordering::Relaxed).is_null());
        self.carve()
    }

    /// Owner: moves `thread_free` to the front of `free`; returns the count.
    pub(crate) fn drain_thread_free(&self) -> usize {
        if self.thread_free.load(Ordering::Relaxed).is_null() {
            return 0;
        }
        // Acquire: pairs with the Release CAS in `push_remote`, so the links are visible.
        let word = self.thread_free.swap(ptr::null_mut(), Ordering::Acquire);
        let (head, count) = unpack_thread_free(word);
        let free = self.owned.free.load(Ordering::Relaxed);
        // A refill drains into an empty `free` (the hot case): the list's last link is
        // already null, so nothing is walked; the cold callers append what `free` had.
        if !free.is_null() {
            let mut tail = head;
            loop {
                // SAFETY: the drained list belongs to the owner now.
                let next = unsafe { next_of(tail) };
                if next.is_null() {
                    break;
                }
                tail = next;
            }
            // SAFETY: as above.
            unsafe { set_next(tail, free) };
        }
        if cfg!(debug_assertions) {
            // SAFETY: `head` (with `free` appended) and `free` are the owner's lists now.
            let drained = unsafe { list_len(head) - list_len(free) };
            debug_assert_eq!(count, drained, "thread_free count");
        }
        self.owned.free.store(head, Ordering::Relaxed);
        self.owned.used.store(
            self.owned.used.load(Ordering::Relaxed) - count,
            Ordering::Relaxed,
        );
        count
    }

    /// Owner: carves a batch of never-used blocks onto `free` (see `CARVE_BYTES`).
    fn carve(&self) -> bool {
        // Relaxed, both: the owner wrote them itself (`block_size` at `init`, `reserved` here);
        // the Release store below is what validators pair with.
        let size = self.block_size.load(Ordering::Relaxed);
        let reserved = self.reserved.load(Ordering::Relaxed);
        let batch = (CARVE_BYTES / size).clamp(CARVE_MIN_BLOCKS, CARVE_MAX_BLOCKS);
        let end = self.capacity().min(reserved + batch);
        if reserved == end {
            return false;
        }
        let class = self.class() as u8;
        let mut next = ptr::null_mut();
        for i in (reserved..end).rev() {
            let block = (self.area + i * size) as *mut Header;
            // SAFETY: block `i` lies inside this page (i < capacity) and has never been handed
            // out, so the owner may initialise it.
            unsafe {
                block.write(Header::new_free(class));
                set_next(block, next);
            }
            next = block;
        }
        // Relaxed: `free` is the owner's list; no other thread reads it.
        self.owned.free.store(next, Ordering::Relaxed);
        // Release: pairs with the Acquire in `block_at`: validators only read written headers.
        self.reserved.store(end, Ordering::Release);
        true
    }

    /// Owner: gives back one of this page's blocks (its header already `finish`ed). Returns
    /// whether the page is now empty.
    #[inline]
    pub(crate) fn push_local(&self, block: &Header) -> bool {
        // SAFETY: the caller owns the block it is giving back.
        unsafe { set_next(block, self.owned.local_free.load(Ordering::Relaxed)) };
        self.owned
            .local_free
            .store(block as *const Header as *mut Header, Ordering::Relaxed);
        let used = self.owned.used.load(Ordering::Relaxed) - 1;
        self.owned.used.store(used, Ordering::Relaxed);
        used == 0
    }

    /// Any thread: pushes the list `first ..= last` (linked with `link_blocks`) of `count` of
    /// this page's blocks to `thread_free` with one CAS.
    ///
    /// # Safety
    /// The caller owns every block of the list, and they all belong to this page.
    #[inline]
    pub(crate) unsafe fn push_remote(&self, first: *const Header, last: *const Header, count: u64) {
        let mut word = self.thread_free.load(Ordering::Relaxed);
        loop {
            let (head, queued) = unpack_thread_free(word);
            // SAFETY: the caller owns `last`.
            unsafe { set_next(last, head) };
            let new = pack_thread_free(first as *mut Header, queued + count as usize);
            // Release: pairs with the Acquire swap in `drain_thread_free`.
            match self.thread_free.compare_exchange_weak(
                word,
                new,
                Ordering::Release,
                Ordering::Relaxed,
            ) {
                Ok(_) => return,
                Err(seen) => word = seen,
            }
        }
    }

    /// Debug check of the page invariant (owner only; walks the owner's lists).
    pub(crate) fn check_invariant(&self) {
        if !cfg!(debug_assertions) {
            return;
        }
        // SAFETY: the owner's lists hold free blocks it owns.
        let (free, local) = unsafe {
            (
                list_len(self.owned.free.load(Ordering::Relaxed)),
                list_len(self.owned.local_free.load(Ordering::Relaxed)),
            )
        };
        let reserved = self.reserved.load(Ordering::Relaxed);
        debug_assert_eq!(
            self.used() + free + local,
            reserved,
            "page invariant broken: used {} free {free} local {local} owner {}",
            self.used(),
            self.owner()
        );
        debug_assert!(reserved <= self.capacity());
    }
}

/// Hardened builds: the overflow check and the damaged mark.
#[cfg(feature = "hardened")]
impl Page {
    /// Whether the header of the block after `block` (if one was carved) still reads as a
    /// header: a write past the end of `block` lands there first.
    pub(crate) fn neighbour_intact(&self, block: &Header) -> bool {
        let size = self.block_size.load(Ordering::Relaxed);
        let next = block as *const Header as usize + size;
        // Acquire: pairs with the Release store in `carve`: a header below `reserved` exists.
        if (next - self.area) / size >= self.reserved.load(Ordering::Acquire) {
            return true;
        }
        // SAFETY: the next block was carved, so its header lies in this page's memory.
        let header: &Header = unsafe { &*std::ptr::with_exposed_provenance(next) };
        header.meta().kind().is_some()
    }

    pub(crate) fn mark_damaged(&self) {
        self.damaged.store(true, Ordering::Relaxed);
    }

    pub(crate) fn is_damaged(&self) -> bool {
        self.damaged.load(Ordering::Relaxed)
    }
}

/// Links `block` after `prev` in a list being built for `push_remote`.
///
/// # Safety
/// The caller owns both blocks.
#[inline]
pub(crate) unsafe fn link_blocks(prev: *const Header, block: *const Header) {
    // SAFETY: the caller owns `prev`.
    unsafe { set_next(prev, block as *mut Header) };
}
