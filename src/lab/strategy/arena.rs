//! An arena per root: the root is the first allocation of a fresh bumpalo [`Bump`], linked
//! blocks are bump-allocated from it under a per-root mutex, and freeing the root drops the
//! arena, chunks and all.
//!
//! The arena lives inside its own first chunk, just before the root's memory, so a root with
//! no linked blocks costs one chunk allocation (bumpalo's first chunk, about 512 bytes).

use super::Strategy;
use crate::Scode;
use bumpalo::Bump;
use std::alloc::Layout;
use std::ptr::NonNull;
use std::sync::{Mutex, PoisonError};

/// Sits in front of a root, in the arena's own memory.
struct Header {
    arena: Mutex<Bump>,
}

/// Alignment of every block, the engine's (max_align_t).
const ALIGN: usize = 16;

/// The header's size rounded up so that the root stays 16-aligned.
const HEADER: usize = size_of::<Header>().next_multiple_of(ALIGN);

/// A bumpalo arena per root.
#[derive(Debug, Default)]
pub struct Arena;

/// The header in front of the root `root`.
///
/// # Safety
///
/// `root` came from [`Arena::allocate_buffer`] and is live.
unsafe fn header(root: NonNull<u8>) -> NonNull<Header> {
    // SAFETY: the root sits HEADER bytes after its header in the same chunk.
    unsafe { root.sub(HEADER).cast() }
}

fn layout(size: usize) -> Result<Layout, Scode> {
    Layout::from_size_align(size, ALIGN).map_err(|_| Scode::MAPI_E_NOT_ENOUGH_MEMORY)
}

impl Strategy for Arena {
    const NAME: &'static str = "arena";
    const RACE_SAFE: bool = true;

    fn new() -> Self {
        Arena
    }

    fn allocate_buffer(&self, size: usize) -> Result<NonNull<u8>, Scode> {
        let arena = Bump::new();
        let total = size
            .checked_add(HEADER)
            .ok_or(Scode::MAPI_E_NOT_ENOUGH_MEMORY)?;
        let block = arena
            .try_alloc_layout(layout(total)?)
            .map_err(|_| Scode::MAPI_E_NOT_ENOUGH_MEMORY)?;
        // SAFETY: `block` is fresh, 16-aligned and HEADER + size bytes long. Moving the Bump
        // into memory it owns is fine: its chunks are on the heap and do not move with it.
        unsafe {
            block.cast::<Header>().write(Header {
                arena: Mutex::new(arena),
            });
            Ok(block.add(HEADER))
        }
    }

    fn allocate_more(&self, size: usize, root: NonNull<u8>) -> Result<NonNull<u8>, Scode> {
        // SAFETY: `root` is live (the trait's contract), so its header and arena are too.
        let header = unsafe { header(root).as_ref() };
        let arena = header.arena.lock().unwrap_or_else(PoisonError::into_inner);
        arena
            .try_alloc_layout(layout(size)?)
            .map_err(|_| Scode::MAPI_E_NOT_ENOUGH_MEMORY)
    }

    unsafe fn free_buffer(&self, root: NonNull<u8>) {
        // SAFETY: `root` is live and nobody else uses it (the caller's contract). The header
        // is moved out of the chunk before the arena is dropped, so dropping it does not read
        // the memory it frees.
        let header = unsafe { header(root).read() };
        drop(
            header
                .arena
                .into_inner()
                .unwrap_or_else(PoisonError::into_inner),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_is_16_aligned_and_first_in_its_arena() {
        let root = Arena.allocate_buffer(40).unwrap();
        assert_eq!(root.as_ptr() as usize % ALIGN, 0);
        // SAFETY: `root` is live; the arena is only inspected.
        let allocated = unsafe {
            header(root)
                .as_ref()
                .arena
                .lock()
                .unwrap()
                .allocated_bytes()
        };
        assert!(allocated >= HEADER + 40);
        // SAFETY: `root` is live and unused afterwards.
        unsafe { Arena.free_buffer(root) };
    }

    #[test]
    fn linked_blocks_come_from_the_roots_arena() {
        let root = Arena.allocate_buffer(16).unwrap();
        for _ in 0..100 {
            Arena.allocate_more(100, root).unwrap();
        }
        // SAFETY: as above.
        let allocated = unsafe {
            header(root)
                .as_ref()
                .arena
                .lock()
                .unwrap()
                .allocated_bytes()
        };
        assert!(allocated >= HEADER + 16 + 100 * 100);
        // SAFETY: `root` is live and unused afterwards.
        unsafe { Arena.free_buffer(root) };
    }
}
