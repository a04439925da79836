//! Kopano's mapi4linux (`m4lcommon`): a root carries a header with a mutex and a list of its
//! children; MAPIAllocateMore allocates the child, then pushes it at the head under the
//! root's mutex; MAPIFreeBuffer walks the children without locking and frees them, then the root.
//!
//! Kopano keeps the children in a `std::list` beside the root; here the list is intrusive (a
//! 16-byte header on each child), which saves Kopano an allocation per link: the comparison
//! is with the scheme at its best. The scheme is generic over the allocator underneath, so
//! `kopano-glibc`, `kopano-mimalloc` and `kopano-jemalloc` are one implementation.

use super::{sys, Strategy};
use crate::Scode;
use std::alloc::{GlobalAlloc, Layout};
use std::ptr::{self, NonNull};
use std::sync::{Mutex, PoisonError};

/// In front of a root: the head of its child list under the root's mutex, and the block's
/// size (jemalloc's sized deallocation needs it).
#[repr(C, align(16))]
struct RootHeader {
    children: Mutex<*mut ChildHeader>,
    size: usize,
}

/// In front of a linked block: the next child, and the block's size.
#[repr(C, align(16))]
struct ChildHeader {
    next: *mut ChildHeader,
    size: usize,
}

/// Alignment of every block, the engine's (max_align_t).
const ALIGN: usize = 16;

/// An allocator Kopano's scheme runs over, and the strategy name that results.
pub trait Underlying: GlobalAlloc + Send + Sync + 'static {
    /// The strategy's name, `kopano-<allocator>`.
    const STRATEGY: &'static str;
    /// The allocator value (the ones used are stateless unit structs).
    const INSTANCE: Self;
}

/// The C library's malloc and free as a [`GlobalAlloc`] (glibc on the lab's machines).
#[derive(Clone, Copy, Debug, Default)]
pub struct Malloc;

// SAFETY: malloc returns blocks of at least `size` bytes aligned to 16 (glibc on 64-bit),
// which covers every layout the lab asks for (asserted in debug builds); free takes them back.
unsafe impl GlobalAlloc for Malloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        debug_assert!(
            layout.align() <= ALIGN,
            "malloc cannot align to {}",
            layout.align()
        );
        sys::malloc(layout.size())
    }

    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        // SAFETY: the GlobalAlloc contract: `ptr` came from `alloc` above and is not used again.
        unsafe { sys::free(ptr) }
    }
}

impl Underlying for Malloc {
    const STRATEGY: &'static str = "kopano-glibc";
    const INSTANCE: Self = Malloc;
}

impl Underlying for mimalloc::MiMalloc {
    const STRATEGY: &'static str = "kopano-mimalloc";
    const INSTANCE: Self = mimalloc::MiMalloc;
}

impl Underlying for tikv_jemallocator::Jemalloc {
    const STRATEGY: &'static str = "kopano-jemalloc";
    const INSTANCE: Self = tikv_jemallocator::Jemalloc;
}

/// Kopano's scheme over glibc malloc.
pub type KopanoGlibc = Kopano<Malloc>;
/// Kopano's scheme over mimalloc.
pub type KopanoMimalloc = Kopano<mimalloc::MiMalloc>;
/// Kopano's scheme over jemalloc.
pub type KopanoJemalloc = Kopano<tikv_jemallocator::Jemalloc>;

/// Kopano's MAPI allocator over the allocator `A`.
#[derive(Debug)]
pub struct Kopano<A> {
    alloc: A,
}

impl<A: Underlying> Kopano<A> {
    /// `A.alloc` of a header `H` followed by `size` bytes; returns the header.
    fn allocate<H>(&self, size: usize) -> Result<NonNull<H>, Scode> {
        let total = size_of::<H>()
            .checked_add(size)
            .ok_or(Scode::MAPI_E_NOT_ENOUGH_MEMORY)?;
        let layout =
            Layout::from_size_align(total, ALIGN).map_err(|_| Scode::MAPI_E_NOT_ENOUGH_MEMORY)?;
        // SAFETY: the layout is never zero-sized (the header is 16 bytes).
        let block = unsafe { self.alloc.alloc(layout) };
        NonNull::new(block.cast()).ok_or(Scode::MAPI_E_NOT_ENOUGH_MEMORY)
    }

    /// Gives a block back to `A`.
    ///
    /// # Safety
    ///
    /// `header` came from [`allocate`](Self::allocate) with the same `H` and `size`, and is not used again.
    unsafe fn deallocate<H>(&self, header: NonNull<H>, size: usize) {
        let layout = Layout::from_size_align(size_of::<H>() + size, ALIGN)
            .expect("allocated with this layout");
        // SAFETY: the caller's block was allocated by `self.alloc` with this layout.
        unsafe { self.alloc.dealloc(header.as_ptr().cast(), layout) }
    }
}

/// The header in front of the user pointer `user`.
///
/// # Safety
///
/// `user` is the user pointer of a live block that has a header `H`.
unsafe fn header<H>(user: NonNull<u8>) -> NonNull<H> {
    // SAFETY: the caller's block starts size_of::<H>() bytes before its user pointer.
    unsafe { user.sub(size_of::<H>()).cast() }
}

/// The user pointer after the header `header`.
///
/// # Safety
///
/// `header` heads a block allocated with room for the header and its user bytes.
unsafe fn user<H>(header: NonNull<H>) -> NonNull<u8> {
    // SAFETY: the block extends past its header.
    unsafe { header.cast::<u8>().add(size_of::<H>()) }
}

impl<A: Underlying> Strategy for Kopano<A> {
    const NAME: &'static str = A::STRATEGY;
    const RACE_SAFE: bool = true;

    fn new() -> Self {
        Kopano { alloc: A::INSTANCE }
    }

    fn allocate_buffer(&self, size: usize) -> Result<NonNull<u8>, Scode> {
        let root = self.allocate::<RootHeader>(size)?;
        let header = RootHeader {
            children: Mutex::new(ptr::null_mut()),
            size,
        };
        // SAFETY: `root` is fresh and has room for the header and `size` bytes.
        unsafe {
            root.write(header);
            Ok(user(root))
        }
    }

    fn allocate_more(&self, size: usize, root: NonNull<u8>) -> Result<NonNull<u8>, Scode> {
        let child = self.allocate::<ChildHeader>(size)?;
        // SAFETY: `root` is a live root (the trait's contract), so its header is initialised
        // and stays alive while we link; `child` is fresh, and owned by the list once pushed.
        unsafe {
            let root = header::<RootHeader>(root).as_ref();
            let mut head = root.children.lock().unwrap_or_else(PoisonError::into_inner);
            child.write(ChildHeader { next: *head, size });
            *head = child.as_ptr();
            Ok(user(child))
        }
    }

    unsafe fn free_buffer(&self, root: NonNull<u8>) {
        // SAFETY: `root` is a live root that nobody else uses any more (the caller's
        // contract), so its header is moved out and its list taken without locking, as Kopano
        // walks it; each child's link and size are read before the child goes back to the
        // allocator.
        unsafe {
            let root = header::<RootHeader>(root);
            let RootHeader { children, size } = root.read();
            let mut next = children
                .into_inner()
                .unwrap_or_else(PoisonError::into_inner);
            while let Some(child) = NonNull::new(next) {
                let ChildHeader {
                    next: following,
                    size,
                } = child.read();
                self.deallocate(child, size);
                next = following;
            }
            self.deallocate(root, size);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lab::strategy::{sys::live, tests::chain_round_trip};

    #[test]
    fn headers_keep_user_memory_16_aligned() {
        assert_eq!(size_of::<RootHeader>() % ALIGN, 0);
        assert_eq!(size_of::<ChildHeader>(), ALIGN);
        let kopano = KopanoGlibc::new();
        let root = kopano.allocate_buffer(5).unwrap();
        let child = kopano.allocate_more(3, root).unwrap();
        assert_eq!(root.as_ptr() as usize % ALIGN, 0);
        assert_eq!(child.as_ptr() as usize % ALIGN, 0);
        // SAFETY: `root` is live and unused afterwards.
        unsafe { kopano.free_buffer(root) };
    }

    #[test]
    fn pushes_children_at_the_head() {
        let kopano = KopanoGlibc::new();
        let root = kopano.allocate_buffer(8).unwrap();
        let first = kopano.allocate_more(8, root).unwrap();
        let second = kopano.allocate_more(8, root).unwrap();
        // SAFETY: the root and its children are live and only read here.
        unsafe {
            let head = *header::<RootHeader>(root).as_ref().children.lock().unwrap();
            assert_eq!(head, header::<ChildHeader>(second).as_ptr());
            assert_eq!((*head).next, header::<ChildHeader>(first).as_ptr());
            kopano.free_buffer(root);
        }
    }

    #[test]
    fn glibc_variant_frees_every_block() {
        let before = live::count();
        chain_round_trip(&KopanoGlibc::new(), 50);
        assert_eq!(live::count(), before);
    }

    #[test]
    fn concurrent_links_to_one_root_are_all_kept() {
        let kopano = KopanoMimalloc::new();
        let root = kopano.allocate_buffer(8).unwrap();
        let root_addr = root.as_ptr() as usize;
        std::thread::scope(|scope| {
            for _ in 0..2 {
                scope.spawn(|| {
                    let root = NonNull::new(root_addr as *mut u8).unwrap();
                    for _ in 0..1000 {
                        kopano.allocate_more(24, root).unwrap();
                    }
                });
            }
        });
        let mut count = 0;
        // SAFETY: the linking threads have joined; the chain is only read, then freed.
        unsafe {
            let mut next = *header::<RootHeader>(root).as_ref().children.lock().unwrap();
            while !next.is_null() {
                count += 1;
                next = (*next).next;
            }
            kopano.free_buffer(root);
        }
        assert_eq!(count, 2000);
    }
}
