//! Reclamation: the page pool, the abandoned-page stack, and retiring pages and large spans
//! through crossbeam-epoch.
//!
//! Both stacks are Treiber stacks of page descriptors linked through `Page::next`, with a
//! 16-bit tag in the head word that every pop bumps, so a page popped and pushed back while a
//! racing pop still holds it as the head makes that pop's CAS fail (no ABA). Descriptors are
//! never freed while the heap lives, so reading a stale head's `next` is always safe.
//!
//! The epoch is the grace period: a page that falls empty goes back to the pool only once
//! every thread that was inside a call when it emptied has left it, so it is never
//! re-initialised for another class under a thread still reading its descriptor; a large span
//! leaves the registry at once and is unmapped the same way (see `segment`). Pages of exited
//! threads go onto the abandoned stack at once: they still hold live blocks, nothing reuses
//! them until a thread adopts them.
//!
//! Free pages wait in two stacks: `pool`, committed, at most `POOL_COMMITTED_PAGES` of them,
//! and `cold`, decommitted (or never touched). A page retired past the bound is decommitted
//! on the way in, so a heap that has freed everything holds at most that much idle memory;
//! refills take committed pages first.

use crate::page::Page;
use crate::segment::{os, LargeSpan, PAGE_SIZE};
use crate::sync::{AtomicUsize, Ordering};
use crossbeam_epoch::Guard;

/// Idle pages the pool keeps committed (2 MiB in normal builds): enough that a thread that
/// frees a long chain and builds the next, or short-lived threads that come and go, reuse
/// committed pages instead of decommitting and faulting them in again each time (the lab:
/// long-chain 29.7 -> 11.9 ns/block, thread-churn 2,540 -> 934 ns/block against 16 pages;
/// again on 2026-11-30, long-chain 8.3 ns/block against 21.3 with 16 pages and 33.6 with 8).
/// It also bounds what a heap keeps committed once everything is freed: in the same runs
/// churn at 16 threads ended 2.6 MiB above its start with 32 pages, 2.0 with 16 (README,
/// "Where it stands on speed", has where the rest is).
const POOL_COMMITTED_PAGES: usize = 32;

/// The pop count kept in a stack head's top bits (descriptor addresses stay below 2^48).
const TAG_SHIFT: u32 = 48;
const ADDRESS: usize = (1 << TAG_SHIFT) - 1;

/// A lock-free stack of pages (see the module docs for why it is ABA-free).
pub(crate) struct PageStack {
    /// Tag (top 16 bits) and the top page's address.
    head: AtomicUsize,
}

impl PageStack {
    pub(crate) fn new() -> PageStack {
        PageStack {
            head: AtomicUsize::new(0),
        }
    }

    /// Pushes a page that the caller owns.
    pub(crate) fn push(&self, page: &Page) {
        let address = page as *const Page as usize;
        debug_assert_eq!(address & !ADDRESS, 0);
        let mut head = self.head.load(Ordering::Relaxed);
        loop {
            page.next.store(
                std::ptr::with_exposed_provenance_mut(head & ADDRESS),
                Ordering::Relaxed,
            );
            // Release: pairs with the Acquire in `pop`, handing over the page's fields.
            match self.head.compare_exchange_weak(
                head,
                head & !ADDRESS | address,
                Ordering::Release,
                Ordering::Relaxed,
            ) {
                Ok(_) => return,
                Err(seen) => head = seen,
            }
        }
    }

    /// Whether the stack looks empty (a hint: it may change at once).
    pub(crate) fn is_empty(&self) -> bool {
        self.head.load(Ordering::Relaxed) & ADDRESS == 0
    }

    /// Pops a page; the caller owns it from then on.
    pub(crate) fn pop(&self) -> Option<&Page> {
        // Acquire: pairs with the Release CAS in `push`, so `next` of the head is the pushed one.
        let mut head = self.head.load(Ordering::Acquire);
        loop {
            let top: *const Page = std::ptr::with_exposed_provenance(head & ADDRESS);
            if top.is_null() {
                return None;
            }
            // SAFETY: page descriptors live as long as the heap. If `top` was popped and
            // pushed again meanwhile, the tag changed and the CAS below fails.
            let next = unsafe { (*top).next.load(Ordering::Relaxed) } as usize;
            #[cfg(not(mapialloc_fault = "page_stack_tag"))]
            let popped = (head & !ADDRESS).wrapping_add(1 << TAG_SHIFT) | next;
            // Deliberate fault for `loom-tests/run.sh --fault page_stack_tag`: no tag bump, so
            // a pop that read a stale head can succeed (ABA).
            #[cfg(mapialloc_fault = "page_stack_tag")]
            let popped = head & !ADDRESS | next;
            // Acquire: pairs with the Release CAS in `push`.
            match self.head.compare_exchange_weak(
                head,
                popped,
                Ordering::Acquire,
                Ordering::Acquire,
            ) {
                // SAFETY: as above; the page is ours now.
                Ok(_) => return Some(unsafe { &*top }),
                Err(seen) => head = seen,
            }
        }
    }
}

/// The heap-wide reclamation state.
pub(crate) struct Reclaim {
    /// Free committed pages, any class: refills take these first.
    pool: PageStack,
    /// Free pages with no memory behind them (decommitted, or never touched), any class.
    /// Kept apart so that a refill never faults a page in while committed ones sit idle: in
    /// one stack, pages decommitted past the bound landed on top of the committed ones, and a
    /// long chain built and freed in a loop faulted in most of its pages every round.
    cold: PageStack,
    /// Pages of exited threads that still hold live blocks.
    pub(crate) abandoned: PageStack,
    /// Pages in `pool` (an estimate; only bounds idle memory).
    pool_pages: AtomicUsize,
    /// Bytes committed from the OS.
    pub(crate) committed: os::Committed,
    /// Deferred returns not run yet, so `collect` knows when to stop advancing the epoch.
    pending: AtomicUsize,
}

impl Reclaim {
    pub(crate) fn new() -> Reclaim {
        Reclaim {
            pool: PageStack::new(),
            cold: PageStack::new(),
            abandoned: PageStack::new(),
            pool_pages: AtomicUsize::new(0),
            committed: os::Committed::new(),
            pending: AtomicUsize::new(0),
        }
    }

    /// Takes a free page, a committed one if there is any, committing it (in the accounts)
    /// otherwise.
    pub(crate) fn take_page(&self) -> Option<&Page> {
        if let Some(page) = self.pop_pooled() {
            return Some(page);
        }
        let page = self.cold.pop()?;
        if page.mark_committed(true) {
            self.committed.add(PAGE_SIZE);
        }
        Some(page)
    }

    /// Adds a page of a new segment, never touched, to the free pages. Fresh pages were never
    /// popped, so they need no grace period.
    pub(crate) fn add_fresh_page(&self, page: &Page) {
        debug_assert!(!page.is_committed());
        self.cold.push(page);
    }

    /// Returns an empty page (no owner, no blocks out) to the pool after a grace period.
    ///
    /// The return waits in the caller's epoch bag: the caller flushes once per call, not per
    /// page (`ThreadCache::catch_up_epoch`), since each flush seals a bag of 64 slots.
    pub(crate) fn retire_page(&self, page: &Page, guard: &Guard) {
        page.set_owner(0);
        let this = self as *const Reclaim;
        let page = page as *const Page;
        self.pending.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the heap's collector runs (or, at teardown, drops) its deferred functions
        // before the heap's pages and this `Reclaim` are freed, so both pointers outlive it.
        unsafe { guard.defer_unchecked(move || (*this).pool_push(&*page)) };
    }

    /// Puts a page of a thread that exited, with live blocks, on the abandoned stack.
    pub(crate) fn abandon_page(&self, page: &Page) {
        page.set_owner(0);
        self.abandoned.push(page);
    }

    /// Hardened builds: gives quarantined blocks back to their pages after a grace period,
    /// so no block is handed out again while a call that may still hold it is running.
    #[cfg(feature = "hardened")]
    pub(crate) fn release_quarantine(
        &self,
        blocks: Vec<(&'static Page, *const crate::chain::Header)>,
        guard: &Guard,
    ) {
        self.pending.fetch_add(1, Ordering::Relaxed);
        let this = self as *const Reclaim;
        // SAFETY: the blocks are owned by the closure (freed and not on any list); pages and
        // this `Reclaim` outlive the collector's deferred functions (see `retire_page`).
        unsafe {
            guard.defer_unchecked(move || {
                for (page, block) in blocks {
                    // SAFETY: as above; each block belongs to its page.
                    page.push_remote(block, block, 1);
                }
                (*this).pending.fetch_sub(1, Ordering::Relaxed);
            })
        };
        guard.flush();
    }

    /// Deferred returns still waiting for their grace period.
    pub(crate) fn pending(&self) -> usize {
        self.pending.load(Ordering::Relaxed)
    }

    fn pool_push(&self, page: &Page) {
        self.pending.fetch_sub(1, Ordering::Relaxed);
        // A retired page was in use, so it is committed.
        if self.pool_pages.load(Ordering::Relaxed) >= POOL_COMMITTED_PAGES {
            self.push_cold(page);
        } else {
            debug_assert!(page.is_committed());
            self.pool_pages.fetch_add(1, Ordering::Relaxed);
            self.pool.push(page);
        }
    }

    /// Decommits pooled pages until at most `keep` are left: a heap that no thread uses keeps
    /// no idle memory for a thread that may never come (see `ThreadCache::leave_heap_idle`).
    pub(crate) fn trim_pool(&self, keep: usize) {
        while self.pool_pages.load(Ordering::Relaxed) > keep {
            let Some(page) = self.pop_pooled() else {
                break;
            };
            self.push_cold(page);
        }
    }

    /// Pops a committed page off the pool, keeping its count.
    fn pop_pooled(&self) -> Option<&Page> {
        let page = self.pool.pop()?;
        self.pool_pages.fetch_sub(1, Ordering::Relaxed);
        Some(page)
    }

    /// Decommits an empty page that no one holds and puts it on the cold stack.
    fn push_cold(&self, page: &Page) {
        if page.mark_committed(false) {
            // SAFETY: the page is empty and in no one's hands: its memory holds no data.
            unsafe { os::decommit(page.area(), PAGE_SIZE) };
            self.committed.sub(PAGE_SIZE);
        }
        self.cold.push(page);
    }

    /// Unmaps a large span (already out of the registry) after a grace period; the caller
    /// flushes, as for `retire_page`.
    pub(crate) fn retire_span(&self, span: Box<LargeSpan>, guard: &Guard) {
        self.committed.sub(span.len);
        self.pending.fetch_add(1, Ordering::Relaxed);
        let this = self as *const Reclaim;
        // SAFETY: the closure owns the span; dropping it later on any thread just unmaps. The
        // `Reclaim` outlives the collector's deferred functions (as in `retire_page`).
        unsafe {
            guard.defer_unchecked(move || {
                drop(span);
                (*this).pending.fetch_sub(1, Ordering::Relaxed);
            })
        };
    }
}
