//! Epoch reclamation: the page pool, the abandoned-page stack, and retiring large spans.
//!
//! Both stacks are Treiber stacks of page descriptors linked through `Page::next`. A pop runs
//! pinned, and every push of a page that has ever been popped is deferred through the heap's
//! crossbeam-epoch collector. So while a popper holds a head it read, that page cannot come
//! back onto any stack: no ABA, no tag bits. The same grace period is what keeps a freed page
//! from being re-initialised for another class while a thread that read its descriptor before
//! the release is still inside its call.
//!
//! Pages pushed to the pool past `POOL_COMMITTED_PAGES` are decommitted on the way in, so a
//! heap that has freed everything holds at most that much idle memory. Large spans leave the
//! registry at once and are unmapped after a grace period (see `segment`).

use crate::page::Page;
use crate::segment::{os, LargeSpan, PAGE_SIZE};
use crate::sync::{AtomicPtr, AtomicUsize, Ordering};
use crossbeam_epoch::Guard;
use std::ptr;

/// Idle pages the pool keeps committed (1 MiB in normal builds).
const POOL_COMMITTED_PAGES: usize = 16;

/// A lock-free stack of pages (see the module docs for why it is ABA-free).
pub(crate) struct PageStack {
    head: AtomicPtr<Page>,
}

impl PageStack {
    pub(crate) fn new() -> PageStack {
        PageStack {
            head: AtomicPtr::new(ptr::null_mut()),
        }
    }

    /// Pushes now. Only for pages that no thread can be holding as a popped head: pages of a
    /// segment that was just mapped, and deferred pushes whose grace period has passed.
    pub(crate) fn push_now(&self, page: &Page) {
        let mut head = self.head.load(Ordering::Relaxed);
        loop {
            page.next.store(head, Ordering::Relaxed);
            // Release: pairs with the Acquire in `pop`, handing over the page's fields.
            match self.head.compare_exchange_weak(
                head,
                page as *const Page as *mut Page,
                Ordering::Release,
                Ordering::Relaxed,
            ) {
                Ok(_) => return,
                Err(seen) => head = seen,
            }
        }
    }

    /// Pops a page; the guard proves the caller is pinned (see the module docs).
    pub(crate) fn pop<'a>(&'a self, _guard: &Guard) -> Option<&'a Page> {
        let mut head = self.head.load(Ordering::Acquire);
        loop {
            if head.is_null() {
                return None;
            }
            // SAFETY: page descriptors live as long as the heap; pinned, `head` cannot be
            // pushed again before our CAS (pushes of popped pages are deferred).
            let next = unsafe { (*head).next.load(Ordering::Relaxed) };
            // Acquire: pairs with the Release CAS in `push_now`.
            match self
                .head
                .compare_exchange_weak(head, next, Ordering::Acquire, Ordering::Acquire)
            {
                // SAFETY: as above; the page is ours now.
                Ok(_) => return Some(unsafe { &*head }),
                Err(seen) => head = seen,
            }
        }
    }
}

/// The heap-wide reclamation state.
pub(crate) struct Reclaim {
    /// Free pages, any class.
    pub(crate) pool: PageStack,
    /// Pages of exited threads that still hold live blocks.
    pub(crate) abandoned: PageStack,
    /// Committed pages in the pool (an estimate; only bounds idle memory).
    pool_committed: AtomicUsize,
    /// Bytes committed from the OS.
    pub(crate) committed: os::Committed,
    /// Deferred returns not run yet, so `collect` knows when to stop advancing the epoch.
    pending: AtomicUsize,
}

impl Reclaim {
    pub(crate) fn new() -> Reclaim {
        Reclaim {
            pool: PageStack::new(),
            abandoned: PageStack::new(),
            pool_committed: AtomicUsize::new(0),
            committed: os::Committed::new(),
            pending: AtomicUsize::new(0),
        }
    }

    /// Takes a free page from the pool, committing it (in the accounts) if needed.
    pub(crate) fn take_page(&self, guard: &Guard) -> Option<&Page> {
        let page = self.pool.pop(guard)?;
        if page.mark_committed(true) {
            self.committed.add(PAGE_SIZE);
        } else {
            self.pool_committed.fetch_sub(1, Ordering::Relaxed);
        }
        Some(page)
    }

    /// Returns an empty page (no owner, no blocks out) to the pool after a grace period.
    pub(crate) fn retire_page(&self, page: &Page, guard: &Guard) {
        page.set_owner(0);
        let this = self as *const Reclaim;
        let page = page as *const Page;
        self.pending.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the heap's collector runs (or, at teardown, drops) its deferred functions
        // before the heap's pages and this `Reclaim` are freed, so both pointers outlive it.
        unsafe { guard.defer_unchecked(move || (*this).pool_push(&*page)) };
        guard.flush();
    }

    /// Puts a page of a thread that exited on the abandoned stack after a grace period.
    pub(crate) fn abandon_page(&self, page: &Page, guard: &Guard) {
        page.set_owner(0);
        let this = self as *const Reclaim;
        let page = page as *const Page;
        self.pending.fetch_add(1, Ordering::Relaxed);
        // SAFETY: as in `retire_page`.
        unsafe {
            guard.defer_unchecked(move || {
                (*this).abandoned.push_now(&*page);
                (*this).pending.fetch_sub(1, Ordering::Relaxed);
            })
        };
    }

    /// Whether deferred returns are still waiting for their grace period.
    pub(crate) fn has_pending(&self) -> bool {
        self.pending.load(Ordering::Relaxed) != 0
    }

    fn pool_push(&self, page: &Page) {
        self.pending.fetch_sub(1, Ordering::Relaxed);
        if self.pool_committed.load(Ordering::Relaxed) >= POOL_COMMITTED_PAGES {
            if page.mark_committed(false) {
                // SAFETY: the page is empty and in no one's hands: its memory holds no data.
                unsafe { os::decommit(page.area(), PAGE_SIZE) };
                self.committed.sub(PAGE_SIZE);
            }
        } else if page.is_committed() {
            self.pool_committed.fetch_add(1, Ordering::Relaxed);
        }
        self.pool.push_now(page);
    }

    /// Unmaps a large span (already out of the registry) after a grace period.
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
        guard.flush();
    }
}
