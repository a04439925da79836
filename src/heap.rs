//! The safe Rust API: [`Heap`], the process-wide [`default_heap`], and the RAII [`Root`].
//!
//! A `Heap` finds the calling thread's cache for it in a thread-local list (one entry per heap
//! the thread has used, most threads have one) and runs the call there. Thread exit drops the
//! thread's caches, which abandons their pages to the heap. If a call comes in after the
//! thread-local list is gone (from another thread-local's destructor), it runs on a temporary
//! cache that is released at once.

use crate::scode::Scode;
use crate::stats::Stats;
use crate::sync::{thread_local, Arc, Ordering};
use crate::thread_cache::{FreeOutcome, LiveRoot, Shared, ThreadCache};
use std::cell::{Cell, RefCell};
use std::marker::PhantomData;
use std::ptr::NonNull;

/// A thread's caches, one per heap it has used.
///
/// Calls never re-enter: engine code never calls back into a `Heap`, so at most one
/// `&mut ThreadCache` exists at a time, whether taken through `LAST` or through `list`.
struct Caches {
    /// Boxed so that `LAST` stays valid while the list grows.
    #[allow(clippy::vec_box)]
    list: RefCell<Vec<Box<ThreadCache>>>,
}

impl Drop for Caches {
    fn drop(&mut self) {
        // The caches are about to go: calls from later thread-local destructors must not
        // find them through `LAST`.
        let _ = LAST.try_with(|last| last.set(NO_CACHE));
    }
}

/// The heap a thread used last and its cache (in `CACHES`): the fast path is one compare.
/// Kept apart from `CACHES` because a constant thread-local without a destructor is read
/// with no registration check.
type LastCache = (*const Shared, *mut ThreadCache);

const NO_CACHE: LastCache = (std::ptr::null(), std::ptr::null_mut());

#[cfg(not(loom))]
thread_local! {
    static CACHES: Caches = const { Caches { list: RefCell::new(Vec::new()) } };
    static LAST: Cell<LastCache> = const { Cell::new(NO_CACHE) };
}

#[cfg(loom)]
thread_local! {
    static CACHES: Caches = Caches { list: RefCell::new(Vec::new()) };
    static LAST: Cell<LastCache> = Cell::new(NO_CACHE);
}

/// An isolated MAPI allocator: its own pages, epoch collector and counters.
///
/// Every method may be called from any thread, on any root, at any time. Memory handed out
/// stays valid until its root is freed or the heap is dropped.
///
/// ```
/// use mapialloc::{FreeOutcome, Heap};
///
/// let heap = Heap::new();
/// let root = heap.allocate_buffer(320)?;
/// let name = heap.allocate_more(24, root.as_ptr())?;
/// assert_eq!(name.as_ptr() as usize % 16, 0);
/// // SAFETY: `root` came from `heap`, and neither block is used after this.
/// assert_eq!(unsafe { heap.free_buffer(root.as_ptr()) }, FreeOutcome::Freed);
/// assert_eq!(heap.stats().live_blocks, 0);
/// # Ok::<(), mapialloc::Scode>(())
/// ```
pub struct Heap {
    shared: Arc<Shared>,
}

impl Default for Heap {
    fn default() -> Self {
        Heap::new()
    }
}

impl std::fmt::Debug for Heap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Heap")
            .field("stats", &self.stats())
            .finish()
    }
}

impl Heap {
    /// Creates an empty heap. It maps nothing until the first allocation. With the
    /// `hardened` feature the heap is hardened (see `Heap::hardened`).
    pub fn new() -> Heap {
        Heap {
            shared: Arc::new(Shared::new(cfg!(feature = "hardened"))),
        }
    }

    /// Feature `hardened`: a heap with (`true`) or without the hardening the feature compiles
    /// in. A hardened heap keeps freed blocks out of use until an epoch has passed (so two
    /// threads racing to free one root have exactly one winner even under reuse pressure),
    /// pins on every call, checks the header after each freed block (a write past a block's
    /// end is counted in [`Stats::corruptions`] and its page never hands out a block again),
    /// zeroes freed blocks, and with `MAPIALLOC_ABORT_ON_MISUSE=1` aborts at the first misuse.
    #[cfg(feature = "hardened")]
    pub fn hardened(enabled: bool) -> Heap {
        Heap {
            shared: Arc::new(Shared::new(enabled)),
        }
    }

    /// The state this heap's threads share.
    pub(crate) fn shared(&self) -> &Shared {
        &self.shared
    }

    /// Runs `f` on this thread's cache for this heap.
    #[inline(always)]
    fn with_cache<R>(&self, f: impl FnOnce(&mut ThreadCache) -> R) -> R {
        if let Ok((shared, cache)) = LAST.try_with(Cell::get) {
            if shared == Arc::as_ptr(&self.shared) {
                // SAFETY: `LAST` names a cache boxed in this thread's `CACHES` list (cleared
                // before the list goes), which only this thread touches, and calls do not
                // re-enter (see `Caches`), so this is the only reference to it.
                return f(unsafe { &mut *cache });
            }
        }
        self.with_cache_slow(f)
    }

    /// `with_cache` when this heap is not the one used last.
    #[cold]
    #[inline(never)]
    fn with_cache_slow<R>(&self, f: impl FnOnce(&mut ThreadCache) -> R) -> R {
        let mut f = Some(f);
        let run = |caches: &Caches| {
            let cache = self.find_cache(caches);
            // SAFETY: as in `with_cache`.
            (f.take().expect("called once"))(unsafe { &mut *cache.as_ptr() })
        };
        match CACHES.try_with(run) {
            Ok(r) => r,
            // The thread-local is being torn down: use a cache for this call only.
            Err(_) => (f.take().expect("not run yet"))(&mut ThreadCache::new(self.shared.clone())),
        }
    }

    /// The calling thread's cache for this heap, made on first use; it becomes `LAST`.
    fn find_cache(&self, caches: &Caches) -> NonNull<ThreadCache> {
        let mut list = caches.list.borrow_mut();
        let index = match list
            .iter()
            .position(|c| Arc::ptr_eq(c.shared(), &self.shared))
        {
            Some(i) => i,
            None => {
                // Caches of heaps dropped elsewhere let go here, on this thread's next miss.
                list.retain(|c| !c.shared().dropped.load(Ordering::Relaxed));
                list.push(Box::new(ThreadCache::new(self.shared.clone())));
                list.len() - 1
            }
        };
        let cache = NonNull::from(&mut *list[index]);
        LAST.with(|last| last.set((Arc::as_ptr(&self.shared), cache.as_ptr())));
        cache
    }

    /// `MAPIAllocateBuffer`: a new root of `size` bytes (uninitialised), 16-byte aligned.
    ///
    /// `size == 0` gives a unique pointer that can be freed and linked to like any other.
    ///
    /// # Errors
    /// `MAPI_E_NOT_ENOUGH_MEMORY` when `size` exceeds [`MAX_BUFFER_SIZE`](crate::MAX_BUFFER_SIZE)
    /// or the OS refuses memory.
    #[inline]
    pub fn allocate_buffer(&self, size: usize) -> Result<NonNull<u8>, Scode> {
        self.with_cache(|c| c.allocate_buffer(size))
    }

    /// `MAPIAllocateMore`: `size` bytes (uninitialised, 16-byte aligned) linked to the root
    /// `parent`, freed when `parent` is freed. O(1) whatever the chain's length, and any number
    /// of threads may link to one root at once.
    ///
    /// # Errors
    /// `MAPI_E_INVALID_PARAMETER` (counted in [`Stats::bad_parents`]) when `parent` is NULL,
    /// not a block of this heap, a linked block, or a root already freed; if the root is freed
    /// while this call runs, the new block is either freed with the chain or given back and the
    /// call fails. `MAPI_E_NOT_ENOUGH_MEMORY` as for [`allocate_buffer`](Heap::allocate_buffer).
    #[inline]
    pub fn allocate_more(&self, size: usize, parent: *mut u8) -> Result<NonNull<u8>, Scode> {
        self.with_cache(|c| c.allocate_more(size, parent))
    }

    /// `MAPIFreeBuffer`: frees the root `ptr` and every block linked to it, without taking a
    /// lock. NULL, linked blocks, double frees and pointers that are not block starts of this
    /// heap free nothing; all but NULL are counted in [`Stats`].
    ///
    /// # Safety
    /// No block of the chain is used after the call. A pointer freed before whose address has
    /// been handed out again cannot be told from the new block: freeing it frees the new one.
    #[inline]
    pub unsafe fn free_buffer(&self, ptr: *mut u8) -> FreeOutcome {
        self.with_cache(|c| c.free_buffer(ptr))
    }

    /// The roots live now, largest chains first: a snapshot taken without locking or stopping
    /// any thread (roots freed or allocated meanwhile may or may not appear), for leak reports
    /// and tools.
    ///
    /// ```
    /// let heap = mapialloc::Heap::new();
    /// let root = heap.allocate_buffer(100)?;
    /// heap.allocate_more(1000, root.as_ptr())?;
    /// let live: Vec<_> = heap.live_roots().collect();
    /// assert_eq!(live.len(), 1);
    /// assert_eq!((live[0].ptr, live[0].linked_blocks), (root, 1));
    /// # Ok::<(), mapialloc::Scode>(())
    /// ```
    pub fn live_roots(&self) -> impl Iterator<Item = LiveRoot> {
        self.with_cache(|c| c.live_roots()).into_iter()
    }

    /// The heap's counters, summed over its threads.
    pub fn stats(&self) -> Stats {
        self.shared
            .stats
            .snapshot(self.shared.reclaim.committed.get())
    }

    /// Gives idle memory back: adopts pages of exited threads, returns the calling thread's
    /// empty pages to the pool (decommitting past a small bound) and lets the epoch advance
    /// so that deferred returns run. Other threads' caches are left alone.
    pub fn collect(&self) {
        self.with_cache(|c| c.collect());
    }

    /// What thread exit does, now: the calling thread's cache for this heap lets go of its
    /// pages (empty ones to the pool, the others abandoned for another thread to adopt).
    /// When no other thread holds a cache of the heap any more (each has exited or called
    /// this), the idle pool also shrinks from up to 2 MiB to 1 MiB: no thread may come to
    /// reuse it.
    pub fn release_thread_cache(&self) {
        let _ = CACHES.try_with(|caches| {
            LAST.with(|last| last.set(NO_CACHE));
            let released: Vec<Box<ThreadCache>> = {
                let mut list = caches.list.borrow_mut();
                let (mine, others) = std::mem::take(&mut *list)
                    .into_iter()
                    .partition(|c| Arc::ptr_eq(c.shared(), &self.shared));
                *list = others;
                mine
            };
            // Dropped outside the borrow: dropping a cache touches only the heap.
            drop(released);
        });
    }
}

impl Drop for Heap {
    fn drop(&mut self) {
        self.shared.dropped.store(true, Ordering::Relaxed);
        self.release_thread_cache();
    }
}

/// The process-wide heap that the C exports serve.
#[cfg(not(loom))]
pub fn default_heap() -> &'static Heap {
    static DEFAULT: std::sync::OnceLock<Heap> = std::sync::OnceLock::new();
    DEFAULT.get_or_init(Heap::new)
}

/// A root that frees its chain when dropped: the safe API for Rust providers.
///
/// Linked memory borrows the root, so it cannot outlive it. A `Root` may be sent to another
/// thread and dropped there, and shared between threads that link to it at once.
///
/// ```
/// use mapialloc::{Heap, Root};
///
/// let heap = Heap::new();
/// let mut props = Root::new(&heap, 320)?;
/// let name = props.alloc_more(24)?;
/// name[..5].copy_from_slice(b"Alice");
/// props.as_mut_slice()[0] = 1;
/// drop(props); // frees the array and the string in one call
/// assert_eq!(heap.stats().live_blocks, 0);
/// # Ok::<(), mapialloc::Scode>(())
/// ```
pub struct Root<'h> {
    heap: &'h Heap,
    ptr: NonNull<u8>,
    len: usize,
    _owns: PhantomData<[u8]>,
}

// SAFETY: a root may be freed and linked to from any thread; the bytes it owns are plain data.
unsafe impl Send for Root<'_> {}
// SAFETY: `&Root` only links (thread-safe in the engine) or reads the pointer and length.
unsafe impl Sync for Root<'_> {}

impl<'h> Root<'h> {
    /// Allocates a zeroed root of `len` bytes on `heap`.
    ///
    /// # Errors
    /// As [`Heap::allocate_buffer`].
    pub fn new(heap: &'h Heap, len: usize) -> Result<Root<'h>, Scode> {
        let ptr = heap.allocate_buffer(len)?;
        // SAFETY: the block is ours and at least `len` bytes long.
        unsafe { ptr.as_ptr().write_bytes(0, len) };
        Ok(Root {
            heap,
            ptr,
            len,
            _owns: PhantomData,
        })
    }

    /// Allocates `len` zeroed bytes linked to this root, living as long as it.
    ///
    /// # Errors
    /// As [`Heap::allocate_more`].
    #[allow(clippy::mut_from_ref)] // each call returns fresh memory, like bumpalo's `alloc`
    pub fn alloc_more(&self, len: usize) -> Result<&mut [u8], Scode> {
        let ptr = self.heap.allocate_more(len, self.ptr.as_ptr())?;
        // SAFETY: the block is new, ours, `len` bytes long and freed only with `self`, which
        // the returned borrow cannot outlive.
        unsafe {
            ptr.as_ptr().write_bytes(0, len);
            Ok(std::slice::from_raw_parts_mut(ptr.as_ptr(), len))
        }
    }

    /// The root's own bytes.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: the root block is ours, `len` bytes long and initialised (zeroed in `new`).
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    /// The root's pointer, as MAPI calls see it.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// The root's own length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the root's own length is zero.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Gives up ownership: the chain is no longer freed on drop (free it with
    /// [`Heap::free_buffer`]).
    pub fn into_raw(self) -> NonNull<u8> {
        let ptr = self.ptr;
        std::mem::forget(self);
        ptr
    }
}

impl Drop for Root<'_> {
    fn drop(&mut self) {
        // SAFETY: we own the root; borrows of its linked memory ended before the drop.
        unsafe { self.heap.free_buffer(self.ptr.as_ptr()) };
    }
}
