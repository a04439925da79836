//! Memory from the OS: aligned segments of pages, large spans, and the registry that tells our
//! memory from anyone else's.
//!
//! A small segment is `SEGMENT_SIZE` bytes aligned to `SEGMENT_SIZE`, cut into
//! `PAGES_PER_SEGMENT` pages; its descriptors (`SmallSegment`) live outside it, on the Rust heap,
//! and stay until the heap is dropped, so a stale or foreign pointer that the registry maps to a
//! small segment can always be read through. Idle pages are decommitted (`MADV_DONTNEED`), not
//! unmapped: RSS goes back to the OS and the address range stays ours.
//!
//! A large span serves one block past the largest class. It is aligned to `SEGMENT_SIZE` too, so
//! its first unit keys the registry. It is unmapped when its block is freed: the registry entry is
//! cleared first and the unmapping is deferred through the heap's epoch, so a validator that
//! found the entry while pinned can still read the header.
//!
//! Registry invariant: an entry maps a `SEGMENT_SIZE` unit to the descriptor of the segment or
//! span starting there; entries are published (Release) after the descriptor is complete and
//! cleared before the descriptor is retired.

use crate::page::Page;
#[cfg(not(loom))]
use crate::sync::AtomicPtr;
use crate::sync::{AtomicUsize, Ordering};
#[cfg(not(loom))]
use std::ptr;

#[cfg(not(loom))]
mod geometry {
    pub(crate) const SEGMENT_SHIFT: usize = 22; // 4 MiB
    pub(crate) const PAGE_SHIFT: usize = 16; // 64 KiB
    pub(crate) const PAGE_MAX_BLOCKS: usize = usize::MAX;
}

#[cfg(loom)]
mod geometry {
    //! Loom's tiny configuration: pages of at most 4 blocks, 2 pages a segment.
    pub(crate) const SEGMENT_SHIFT: usize = 13;
    pub(crate) const PAGE_SHIFT: usize = 12;
    pub(crate) const PAGE_MAX_BLOCKS: usize = 4;
}

pub(crate) use geometry::{PAGE_MAX_BLOCKS, PAGE_SHIFT, SEGMENT_SHIFT};
pub(crate) const SEGMENT_SIZE: usize = 1 << SEGMENT_SHIFT;
pub(crate) const PAGE_SIZE: usize = 1 << PAGE_SHIFT;
pub(crate) const PAGES_PER_SEGMENT: usize = SEGMENT_SIZE / PAGE_SIZE;

/// The OS layer: the only place that maps, unmaps and decommits.
pub(crate) mod os {
    use super::SEGMENT_SIZE;
    use crate::sync::{AtomicUsize, Ordering};

    /// Test hook for OOM injection: when non-zero, the mapping that brings the count to zero fails.
    static FAIL_AFTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

    /// Makes the `n`th next mapping (1-based) fail; 0 switches the hook off. (SeqCst: a test
    /// hook, off every fast path, so the simplest reasoning wins.)
    pub(crate) fn fail_nth_mapping(n: usize) {
        FAIL_AFTER.store(n, std::sync::atomic::Ordering::SeqCst);
    }

    fn injected_failure() -> bool {
        use std::sync::atomic::Ordering::SeqCst;
        FAIL_AFTER.fetch_update(SeqCst, SeqCst, |n| if n == 0 { None } else { Some(n - 1) })
            == Ok(1)
    }

    /// The system page size.
    pub(crate) fn os_page_size() -> usize {
        static SIZE: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
        // SAFETY: sysconf has no preconditions.
        *SIZE.get_or_init(|| unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize)
    }

    /// Maps `len` bytes (a multiple of the OS page) aligned to `SEGMENT_SIZE`, zero-filled.
    #[cfg(not(any(loom, miri)))]
    pub(crate) fn map_aligned(len: usize) -> Option<*mut u8> {
        if injected_failure() {
            return None;
        }
        let over = len.checked_add(SEGMENT_SIZE)?;
        // SAFETY: an anonymous private mapping at an address of the kernel's choice touches no
        // existing memory.
        let raw = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                over,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if raw == libc::MAP_FAILED {
            return None;
        }
        if raw as usize + over > crate::chain::ADDRESS_LIMIT {
            // Past 2^47 (5-level paging): a root's `link` word needs the top bits.
            // SAFETY: the mapping was just made and nothing else knows of it.
            unsafe { libc::munmap(raw, over) };
            return None;
        }
        let start = raw as usize;
        let aligned = (start + SEGMENT_SIZE - 1) & !(SEGMENT_SIZE - 1);
        let head = aligned - start;
        let tail = over - head - len;
        // SAFETY: both trimmed ranges lie inside the mapping just made and outside
        // [aligned, aligned + len), which is what we keep.
        unsafe {
            if head > 0 {
                libc::munmap(raw, head);
            }
            if tail > 0 {
                libc::munmap((aligned + len) as *mut libc::c_void, tail);
            }
        }
        Some(aligned as *mut u8)
    }

    /// Unmaps a range from `map_aligned`.
    ///
    /// # Safety
    /// `[base, base + len)` was returned by `map_aligned(len)` and nothing reads it any more.
    #[cfg(not(any(loom, miri)))]
    pub(crate) unsafe fn unmap(base: *mut u8, len: usize) {
        // SAFETY: the caller owns the whole mapping.
        unsafe { libc::munmap(base.cast(), len) };
    }

    /// Gives a range's physical memory back; it reads as zeros afterwards.
    ///
    /// # Safety
    /// The range lies in one of our mappings and holds no live data.
    #[cfg(not(any(loom, miri)))]
    pub(crate) unsafe fn decommit(base: *mut u8, len: usize) {
        // SAFETY: the caller guarantees the range is ours and dead; DONTNEED keeps it mapped.
        unsafe { libc::madvise(base.cast(), len, libc::MADV_DONTNEED) };
    }

    /// Under loom and Miri, "mappings" are allocations: loom tracks them, so a segment or span
    /// that is never given back is reported as a leak and one given back twice as a double
    /// free; Miri checks every access to them.
    #[cfg(any(loom, miri))]
    pub(crate) fn map_aligned(len: usize) -> Option<*mut u8> {
        if injected_failure() {
            return None;
        }
        let layout = std::alloc::Layout::from_size_align(len, SEGMENT_SIZE).ok()?;
        #[cfg(loom)]
        use loom::alloc::alloc_zeroed;
        #[cfg(not(loom))]
        use std::alloc::alloc_zeroed;
        // SAFETY: `len` is non-zero.
        let p = unsafe { alloc_zeroed(layout) };
        (!p.is_null()).then_some(p)
    }

    /// # Safety
    /// As the mmap-based `unmap`.
    #[cfg(any(loom, miri))]
    pub(crate) unsafe fn unmap(base: *mut u8, len: usize) {
        let layout = std::alloc::Layout::from_size_align(len, SEGMENT_SIZE).expect("mapped layout");
        #[cfg(loom)]
        use loom::alloc::dealloc;
        #[cfg(not(loom))]
        use std::alloc::dealloc;
        // SAFETY: allocated by `map_aligned` with this layout.
        unsafe { dealloc(base, layout) };
    }

    /// # Safety
    /// As the mmap-based `decommit`. (A no-op under loom and Miri.)
    #[cfg(any(loom, miri))]
    pub(crate) unsafe fn decommit(_base: *mut u8, _len: usize) {}

    /// Bytes committed, as the heap accounts them (pages in use or cached, large spans).
    pub(crate) struct Committed(AtomicUsize);

    impl Committed {
        pub(crate) fn new() -> Committed {
            Committed(AtomicUsize::new(0))
        }
        #[inline]
        pub(crate) fn add(&self, n: usize) {
            self.0.fetch_add(n, Ordering::Relaxed);
        }
        #[inline]
        pub(crate) fn sub(&self, n: usize) {
            self.0.fetch_sub(n, Ordering::Relaxed);
        }
        #[inline]
        pub(crate) fn get(&self) -> usize {
            self.0.load(Ordering::Relaxed)
        }
    }
}

pub(crate) use os::fail_nth_mapping;

/// Descriptors of one small segment.
pub(crate) struct SmallSegment {
    base: usize,
    pages: [Page; PAGES_PER_SEGMENT],
}

impl SmallSegment {
    /// Maps a new segment; its pages start free and decommitted.
    pub(crate) fn map() -> Option<Box<SmallSegment>> {
        // Exposed: blocks are addressed by integer arithmetic on the mapping (see `Header::user`).
        let base = os::map_aligned(SEGMENT_SIZE)?.expose_provenance();
        // `page_of` relies on it.
        debug_assert_eq!(base % SEGMENT_SIZE, 0, "segments are aligned to their size");
        Some(Box::new(SmallSegment {
            base,
            pages: std::array::from_fn(|i| Page::new(base + i * PAGE_SIZE)),
        }))
    }

    pub(crate) fn pages(&self) -> &[Page; PAGES_PER_SEGMENT] {
        &self.pages
    }

    /// The page holding `addr` (which lies in this segment).
    #[inline]
    pub(crate) fn page_of(&self, addr: usize) -> &Page {
        // The segment is aligned to its size, so the page index is bits of the address itself:
        // no load of `base` on the way from a pointer to its page (each load on the free path
        // waits for the one before). The mask spares the bounds check.
        &self.pages[(addr >> PAGE_SHIFT) & (PAGES_PER_SEGMENT - 1)]
    }
}

impl Drop for SmallSegment {
    fn drop(&mut self) {
        // SAFETY: the heap drops a small segment only at teardown, when nothing reads it.
        unsafe { os::unmap(self.base as *mut u8, SEGMENT_SIZE) };
    }
}

/// A span holding one large block: `[base, base + len)`, the header at `base`.
pub(crate) struct LargeSpan {
    pub(crate) base: usize,
    pub(crate) len: usize,
}

impl LargeSpan {
    /// Maps a span for `size` user bytes (header added here; `None` when the OS says no).
    pub(crate) fn map(size: usize) -> Option<Box<LargeSpan>> {
        let page = os::os_page_size();
        let len = size.checked_add(crate::chain::HEADER_SIZE + page - 1)? & !(page - 1);
        let base = os::map_aligned(len)?.expose_provenance();
        Some(Box::new(LargeSpan { base, len }))
    }
}

impl Drop for LargeSpan {
    fn drop(&mut self) {
        // SAFETY: a span is dropped after its block was freed and a grace period passed, or at
        // heap teardown: nothing reads it any more.
        unsafe { os::unmap(self.base as *mut u8, self.len) };
    }
}

/// What the registry knows about an address.
pub(crate) enum Region<'a> {
    Small(&'a SmallSegment),
    /// A large span; only dereference the pointer while pinned.
    Large(*const LargeSpan),
}

const LARGE_BIT: usize = 1;

/// Maps `SEGMENT_SIZE` units to our segment and span descriptors.
pub(crate) struct Registry {
    table: Table,
}

impl Registry {
    pub(crate) fn new() -> Registry {
        Registry {
            table: Table::new(),
        }
    }

    /// Publishes a small segment. Ownership moves to the registry until `teardown`.
    pub(crate) fn insert_small(&self, segment: Box<SmallSegment>) -> &SmallSegment {
        let base = segment.base;
        let raw = Box::into_raw(segment);
        self.table.set(base >> SEGMENT_SHIFT, raw as usize);
        // SAFETY: small segments stay registered (and allocated) until teardown.
        unsafe { &*raw }
    }

    /// Publishes a large span. Ownership moves to the registry until `remove_large`.
    pub(crate) fn insert_large(&self, span: Box<LargeSpan>) -> *const LargeSpan {
        let base = span.base;
        let raw = Box::into_raw(span);
        self.table
            .set(base >> SEGMENT_SHIFT, raw as usize | LARGE_BIT);
        raw
    }

    /// Unpublishes a large span and hands its ownership back; the caller retires it through
    /// the epoch (validators pinned before this call may still read it).
    ///
    /// # Safety
    /// `span` was returned by `insert_large` and not removed yet; exactly one caller removes it.
    pub(crate) unsafe fn remove_large(&self, span: *const LargeSpan) -> Box<LargeSpan> {
        // SAFETY: registered spans are alive; the caller has exclusive right to remove it.
        let base = unsafe { (*span).base };
        self.table.set(base >> SEGMENT_SHIFT, 0);
        // SAFETY: ownership was moved into the registry by `insert_large`.
        unsafe { Box::from_raw(span as *mut LargeSpan) }
    }

    /// The region that `addr` falls in, if it is ours.
    #[inline]
    pub(crate) fn lookup(&self, addr: usize) -> Option<Region<'_>> {
        let entry = self.table.get(addr >> SEGMENT_SHIFT);
        if entry == 0 {
            None
        } else if entry & LARGE_BIT != 0 {
            Some(Region::Large((entry & !LARGE_BIT) as *const LargeSpan))
        } else {
            // SAFETY: small segment descriptors live until teardown (see the module docs).
            Some(Region::Small(unsafe { &*(entry as *const SmallSegment) }))
        }
    }

    /// Calls `f` with every region registered now. Concurrent inserts and removals may or may
    /// not be seen; large spans may only be read while the caller is pinned.
    pub(crate) fn for_each(&self, mut f: impl FnMut(Region<'_>)) {
        self.table.for_each(|entry| {
            if entry & LARGE_BIT != 0 {
                f(Region::Large((entry & !LARGE_BIT) as *const LargeSpan));
            } else {
                // SAFETY: small segment descriptors live until teardown.
                f(Region::Small(unsafe { &*(entry as *const SmallSegment) }));
            }
        });
    }

    /// Drops every segment and span still registered. Runs in the heap's `Drop`, alone.
    pub(crate) fn teardown(&mut self) {
        self.table.drain(|entry| {
            if entry & LARGE_BIT != 0 {
                // Under loom, a large block still live at teardown is left to loom's leak
                // check: the models free everything, so one found here was lost by a chain.
                #[cfg(not(loom))]
                // SAFETY: registered, and teardown is the only reader left.
                drop(unsafe { Box::from_raw((entry & !LARGE_BIT) as *mut LargeSpan) });
            } else {
                // SAFETY: as above.
                drop(unsafe { Box::from_raw(entry as *mut SmallSegment) });
            }
        });
    }
}

/// Two-level table over the 47-bit user address space: 8,192 leaves of 4,096 units, each leaf
/// made on first use with one CAS and kept until teardown.
#[cfg(not(loom))]
struct Table {
    top: Box<[AtomicPtr<Leaf>; TOP_LEN]>,
}

#[cfg(not(loom))]
struct Leaf([AtomicUsize; LEAF_LEN]);

#[cfg(not(loom))]
const LEAF_BITS: usize = 12;
#[cfg(not(loom))]
const LEAF_LEN: usize = 1 << LEAF_BITS;
#[cfg(not(loom))]
const KEY_BITS: usize = 47 - SEGMENT_SHIFT;
#[cfg(not(loom))]
const TOP_LEN: usize = 1 << (KEY_BITS - LEAF_BITS);

/// A boxed `T` whose bytes are all zero: the registry's tables are arrays of atomics, which
/// zero makes null, and a zeroed allocation costs nothing up front (it also keeps Miri from
/// initialising 4,096 atomics one by one).
///
/// # Safety
/// All-zero bytes are a valid `T` (true of arrays of `AtomicUsize` and `AtomicPtr`).
#[cfg(not(loom))]
unsafe fn zeroed<T>() -> Box<T> {
    let layout = std::alloc::Layout::new::<T>();
    // SAFETY: `T` is one of the registry's non-empty tables, so the layout has a size.
    let raw = unsafe { std::alloc::alloc_zeroed(layout) }.cast::<T>();
    if raw.is_null() {
        std::alloc::handle_alloc_error(layout);
    }
    // SAFETY: allocated for `T` by the global allocator, and zero bytes are a valid `T` (the
    // caller's promise).
    unsafe { Box::from_raw(raw) }
}

#[cfg(not(loom))]
impl Table {
    fn new() -> Table {
        // SAFETY: an array of `AtomicPtr`: zero is null.
        let top = unsafe { zeroed() };
        Table { top }
    }

    #[inline]
    fn get(&self, key: usize) -> usize {
        let Some(slot) = self.top.get(key >> LEAF_BITS) else {
            return 0;
        };
        // Acquire: pairs with the Release CAS that published the leaf.
        let leaf = slot.load(Ordering::Acquire);
        if leaf.is_null() {
            return 0;
        }
        // SAFETY: published leaves live until teardown.
        let leaf = unsafe { &*leaf };
        // Acquire: pairs with the Release store in `set`, so the descriptor is complete.
        leaf.0[key & (LEAF_LEN - 1)].load(Ordering::Acquire)
    }

    fn set(&self, key: usize, value: usize) {
        let slot = &self.top[key >> LEAF_BITS];
        // Acquire: pairs with the Release CAS below (another thread's), as in `get`.
        let mut leaf = slot.load(Ordering::Acquire);
        if leaf.is_null() {
            // SAFETY: a `Leaf` is an array of `AtomicUsize`: zero is 0.
            let fresh = Box::into_raw(unsafe { zeroed::<Leaf>() });
            // Release/Acquire: publishes the zeroed leaf / sees a racing thread's leaf.
            leaf = match slot.compare_exchange(
                ptr::null_mut(),
                fresh,
                Ordering::Release,
                Ordering::Acquire,
            ) {
                Ok(_) => fresh,
                Err(theirs) => {
                    // SAFETY: `fresh` lost the race and was never published.
                    drop(unsafe { Box::from_raw(fresh) });
                    theirs
                }
            };
        }
        // SAFETY: published leaves live until teardown.
        let leaf = unsafe { &*leaf };
        // Release: pairs with the Acquire load in `get`.
        leaf.0[key & (LEAF_LEN - 1)].store(value, Ordering::Release);
    }

    fn for_each(&self, mut f: impl FnMut(usize)) {
        for slot in self.top.iter() {
            // Acquire: pairs with the Release CAS that published the leaf.
            let leaf = slot.load(Ordering::Acquire);
            if leaf.is_null() {
                continue;
            }
            // SAFETY: published leaves live until teardown.
            for entry in unsafe { &*leaf }.0.iter() {
                // Acquire: pairs with the Release store in `set`.
                let e = entry.load(Ordering::Acquire);
                if e != 0 {
                    f(e);
                }
            }
        }
    }

    fn drain(&mut self, mut f: impl FnMut(usize)) {
        for slot in self.top.iter() {
            let leaf = slot.swap(ptr::null_mut(), Ordering::Relaxed);
            if leaf.is_null() {
                continue;
            }
            // SAFETY: teardown owns every leaf.
            let leaf = unsafe { Box::from_raw(leaf) };
            for entry in leaf.0.iter() {
                let e = entry.load(Ordering::Relaxed);
                if e != 0 {
                    f(e);
                }
            }
        }
    }
}

/// Loom's registry: a few (key, value) slots scanned linearly, so models create few atomics.
/// Its Acquire loads pair with its Release stores and CAS, as in the real table.
#[cfg(loom)]
struct Table {
    slots: Vec<(AtomicUsize, AtomicUsize)>,
}

#[cfg(loom)]
impl Table {
    fn new() -> Table {
        Table {
            slots: (0..4)
                .map(|_| (AtomicUsize::new(0), AtomicUsize::new(0)))
                .collect(),
        }
    }

    #[inline]
    fn get(&self, key: usize) -> usize {
        for (k, v) in &self.slots {
            if k.load(Ordering::Acquire) == key + 1 {
                return v.load(Ordering::Acquire);
            }
        }
        0
    }

    fn set(&self, key: usize, value: usize) {
        for (k, v) in &self.slots {
            let seen = k.load(Ordering::Acquire);
            if seen == key + 1 {
                v.store(value, Ordering::Release);
                return;
            }
        }
        for (k, v) in &self.slots {
            if k.compare_exchange(0, key + 1, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                v.store(value, Ordering::Release);
                return;
            }
        }
        panic!("loom registry full: models map at most 8 regions");
    }

    fn for_each(&self, mut f: impl FnMut(usize)) {
        for (_, v) in &self.slots {
            let e = v.load(Ordering::Acquire);
            if e != 0 {
                f(e);
            }
        }
    }

    fn drain(&mut self, mut f: impl FnMut(usize)) {
        for (_, v) in &self.slots {
            let e = v.swap(0, Ordering::Relaxed);
            if e != 0 {
                f(e);
            }
        }
    }
}
