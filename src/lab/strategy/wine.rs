//! Wine's mapi32 (`dlls/mapi32/util.c`): every block is `malloc(size + 8)` with a one-pointer
//! header; MAPIAllocateMore walks the chain from the root to its tail and links there.
//!
//! Linking is O(chain length), and nothing is synchronised: two threads linking to one root
//! can lose a block, so the strategy is not race-safe. Memory is 8-aligned, as in Wine.

use super::{sys, Strategy};
use crate::Scode;
use std::ptr::{self, NonNull};

/// The header in front of every block: the next block of the chain, NULL at the tail.
type Link = *mut u8;

const HEADER: usize = size_of::<Link>();

/// Wine's MAPI allocator over the C library's malloc.
#[derive(Debug, Default)]
pub struct Wine;

/// `malloc(size + 8)` with a NULL link, returning the user pointer after the header.
fn allocate(size: usize) -> Result<NonNull<u8>, Scode> {
    let total = size
        .checked_add(HEADER)
        .ok_or(Scode::MAPI_E_NOT_ENOUGH_MEMORY)?;
    let block = NonNull::new(sys::malloc(total)).ok_or(Scode::MAPI_E_NOT_ENOUGH_MEMORY)?;
    // SAFETY: the block is fresh, malloc-aligned and at least HEADER bytes long.
    unsafe {
        block.cast::<Link>().write(ptr::null_mut());
        Ok(block.add(HEADER))
    }
}

/// The header of the block whose user pointer is `user`.
///
/// # Safety
///
/// `user` came from [`allocate`] and is live.
unsafe fn header(user: *mut u8) -> *mut Link {
    // SAFETY: the caller's block starts HEADER bytes before its user pointer.
    unsafe { user.sub(HEADER).cast() }
}

impl Strategy for Wine {
    const NAME: &'static str = "wine";
    const RACE_SAFE: bool = false;

    fn new() -> Self {
        Wine
    }

    fn allocate_buffer(&self, size: usize) -> Result<NonNull<u8>, Scode> {
        allocate(size)
    }

    fn allocate_more(&self, size: usize, root: NonNull<u8>) -> Result<NonNull<u8>, Scode> {
        // SAFETY: `root` is a live root, and every link of its chain is a live block of it.
        let tail = unsafe {
            let mut link = header(root.as_ptr());
            while !(*link).is_null() {
                link = header(*link);
            }
            link
        };
        let block = allocate(size)?;
        // SAFETY: `tail` is the (live) last header of the chain; nobody else links concurrently.
        unsafe { *tail = block.as_ptr() };
        Ok(block)
    }

    unsafe fn free_buffer(&self, root: NonNull<u8>) {
        let mut next = root.as_ptr();
        while !next.is_null() {
            // SAFETY: `next` is the root or a block linked to it, all live until freed here;
            // its link is read before the block goes back to malloc.
            unsafe {
                let block = header(next);
                next = *block;
                sys::free(block.cast());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lab::strategy::{sys::live, tests::chain_round_trip};

    #[test]
    fn links_at_the_tail_in_allocation_order() {
        let wine = Wine;
        let root = wine.allocate_buffer(32).unwrap();
        let linked: Vec<_> = (0..4)
            .map(|_| wine.allocate_more(8, root).unwrap().as_ptr())
            .collect();
        let mut chain = Vec::new();
        // SAFETY: the chain is live and only read here.
        unsafe {
            let mut next = *header(root.as_ptr());
            while !next.is_null() {
                chain.push(next);
                next = *header(next);
            }
        }
        assert_eq!(chain, linked);
        // SAFETY: `root` is live and unused afterwards.
        unsafe { wine.free_buffer(root) };
    }

    #[test]
    fn frees_every_block_of_the_chain() {
        let before = live::count();
        chain_round_trip(&Wine, 50);
        assert_eq!(live::count(), before);
    }
}
