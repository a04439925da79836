//! Block headers and the chain protocol: link (MAPIAllocateMore), win and close (MAPIFreeBuffer).
//!
//! Every block starts with a [`Header`]; the user pointer follows it. Word 0 (`link`) and
//! word 1 (`meta`) mean:
//!
//! | block        | `link`                                   | `meta` kind |
//! |--------------|------------------------------------------|-------------|
//! | open root    | newest linked block's header, or 0       | `ROOT`      |
//! | closed root  | `CLOSED`                                  | `FREE`      |
//! | linked block | next older block's header \| `LINKED_TAG` | `LINKED`    |
//! | free block   | `CLOSED`                                  | `FREE`      |
//!
//! `meta` packs a magic, a generation (bumped at every allocation of the block), the size class
//! and the kind. Protocol (locked instructions per call in brackets):
//!
//! * link [1 CAS per attempt]: the new block's `link` is set to the observed head, then one CAS
//!   (Release) swings the root's `link` from that head to the new block. It only succeeds on an
//!   untagged word, i.e. on an open root: a closed root, a linked block and a free block all
//!   carry a tag, so a racing or stale link can never splice into a chain it does not own.
//! * free [1 CAS + 1 swap]: `win` CASes `meta` from the exact `ROOT` value the caller
//!   validated (generation included) to `FREE`, so of two racing freers exactly one wins even
//!   if the block is reused in between. The winner then `close`s: it swaps `link` to `CLOSED`
//!   (Acquire, pairing with the links' Release CAS), which yields every block linked before the
//!   close; a link that lost the race sees `CLOSED` and gives its block back.
//!
//! The free-list link of a free block lives in its user area (see `page`), never in the header,
//! so the header of a free block keeps refusing links.

use crate::sync::{AtomicU64, AtomicUsize, Ordering};

/// A block header. 16 bytes in normal builds, so user pointers stay 16-aligned.
#[repr(C, align(16))]
pub(crate) struct Header {
    /// The chain word (see the module table).
    link: AtomicUsize,
    /// Magic, generation, class and kind.
    meta: AtomicU64,
}

/// Size of [`Header`] rounded to the alignment: the offset of the user pointer in a block.
pub(crate) const HEADER_SIZE: usize = (std::mem::size_of::<Header>() + 15) & !15;

#[cfg(not(loom))]
const _: () = assert!(HEADER_SIZE == 16);

/// `link` tag of a closed root and of a free block.
pub(crate) const CLOSED: usize = 1;
/// `link` tag of a linked block (its word holds the next block of the chain).
pub(crate) const LINKED_TAG: usize = 2;
const TAGS: usize = CLOSED | LINKED_TAG;

/// What a block is, as its header says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    Root,
    Linked,
    Free,
}

/// The size class recorded for large spans.
pub(crate) const LARGE_CLASS: u8 = u8::MAX;

const MAGIC: u64 = 0x4d41_5049; // "MAPI"

/// A decoded `meta` word.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Meta(u64);

impl Meta {
    fn new(kind: Kind, class: u8, generation: u16) -> Meta {
        let k = match kind {
            Kind::Root => 1,
            Kind::Linked => 2,
            Kind::Free => 3,
        };
        Meta(MAGIC << 32 | (generation as u64) << 16 | (class as u64) << 8 | k)
    }

    /// The kind, or `None` when the magic is wrong (not a header of ours).
    pub(crate) fn kind(self) -> Option<Kind> {
        if self.0 >> 32 != MAGIC {
            return None;
        }
        match self.0 & 0xff {
            1 => Some(Kind::Root),
            2 => Some(Kind::Linked),
            3 => Some(Kind::Free),
            _ => None,
        }
    }

    pub(crate) fn class(self) -> u8 {
        (self.0 >> 8) as u8
    }

    fn generation(self) -> u16 {
        (self.0 >> 16) as u16
    }
}

/// The outcome of trying to link a block to a parent.
pub(crate) enum LinkError {
    /// The parent is closed, linked or free: the caller still owns the block.
    NotAnOpenRoot,
}

impl Header {
    /// A header for a block that has never been handed out.
    pub(crate) fn new_free(class: u8) -> Header {
        Header {
            link: AtomicUsize::new(CLOSED),
            meta: AtomicU64::new(Meta::new(Kind::Free, class, 0).0),
        }
    }

    /// The header of the block whose user pointer is `user`.
    #[inline]
    pub(crate) fn of_user(user: usize) -> *const Header {
        std::ptr::with_exposed_provenance(user - HEADER_SIZE)
    }

    /// The user pointer of this header's block.
    ///
    /// Built from the address, not from `&self`: a pointer derived from a `&Header` may only
    /// touch the header's 16 bytes, while the user area belongs to the mapping, whose
    /// provenance the segment layer exposed when it mapped it.
    #[inline]
    pub(crate) fn user(&self) -> *mut u8 {
        std::ptr::with_exposed_provenance_mut(self as *const Header as usize + HEADER_SIZE)
    }

    /// Reads `meta` (Acquire: pairs with the Release store in `start_root`/`start_linked`, so
    /// a validator that sees a kind also sees the header written with it).
    #[inline]
    pub(crate) fn meta(&self) -> Meta {
        Meta(self.meta.load(Ordering::Acquire))
    }

    /// Makes this (owned, free) block an open root of `class` and returns nothing: the caller
    /// publishes the pointer.
    #[inline]
    pub(crate) fn start_root(&self, class: u8) {
        let generation = Meta(self.meta.load(Ordering::Relaxed))
            .generation()
            .wrapping_add(1);
        self.link.store(0, Ordering::Relaxed);
        // Release: pairs with the Acquire load in `meta()` by validators on other threads.
        self.meta.store(
            Meta::new(Kind::Root, class, generation).0,
            Ordering::Release,
        );
    }

    /// Marks this (owned, free) block as a linked block of `class`, not yet in any chain.
    #[inline]
    pub(crate) fn start_linked(&self, class: u8) {
        let generation = Meta(self.meta.load(Ordering::Relaxed))
            .generation()
            .wrapping_add(1);
        self.link.store(LINKED_TAG, Ordering::Relaxed);
        // Release: pairs with the Acquire load in `meta()` by validators on other threads.
        self.meta.store(
            Meta::new(Kind::Linked, class, generation).0,
            Ordering::Release,
        );
    }

    /// Marks a block that its owner is giving back as free: links to it fail from now on.
    #[inline]
    pub(crate) fn finish(&self) {
        let m = Meta(self.meta.load(Ordering::Relaxed));
        self.link.store(CLOSED, Ordering::Relaxed);
        self.meta.store(
            Meta::new(Kind::Free, m.class(), m.generation()).0,
            Ordering::Relaxed,
        );
    }

    /// Links `block` (owned by the caller, started with `start_linked`) to this root with one CAS.
    /// On error the caller still owns `block` and must give it back.
    pub(crate) fn link(&self, block: &Header) -> Result<(), LinkError> {
        let mut head = self.link.load(Ordering::Relaxed);
        loop {
            if head & TAGS != 0 {
                return Err(LinkError::NotAnOpenRoot);
            }
            block.link.store(head | LINKED_TAG, Ordering::Relaxed);
            // Release: publishes `block`'s header to the Acquire swap in `close()`; each later
            // link CAS is an RMW, so the release sequence carries every older block along.
            match self.link.compare_exchange_weak(
                head,
                block as *const Header as usize,
                Ordering::Release,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Ok(()),
                Err(seen) => head = seen,
            }
        }
    }

    /// Tries to win the right to free this root: succeeds for exactly one caller among all
    /// that validated the same `seen` root meta. Losers did a double free.
    #[inline]
    pub(crate) fn win(&self, seen: Meta) -> bool {
        debug_assert_eq!(seen.kind(), Some(Kind::Root));
        let freed = Meta::new(Kind::Free, seen.class(), seen.generation());
        // AcqRel: the winner sees the root as it was started (Acquire); losers that read the
        // FREE kind afterwards see it as freed (Release).
        self.meta
            .compare_exchange(seen.0, freed.0, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
    }

    /// Closes the chain of a root this thread has won and returns its blocks, newest first.
    #[inline]
    pub(crate) fn close(&self) -> Chain {
        // Acquire: pairs with the Release CAS in `link()`, making every linked header visible.
        #[cfg(not(mapialloc_fault = "open_close"))]
        let head = self.link.swap(CLOSED, Ordering::Acquire);
        // Deliberate fault for `loom-tests/run.sh --fault`: read the head, then close with a
        // plain store, so a link landing in between is lost.
        #[cfg(mapialloc_fault = "open_close")]
        let head = {
            let head = self.link.load(Ordering::Acquire);
            self.link.store(CLOSED, Ordering::Relaxed);
            head
        };
        debug_assert_eq!(head & TAGS, 0, "a won root must still be open");
        Chain { next: head }
    }
}

/// The blocks of a closed chain. Yields each header once; read the next link before the
/// current block is given back, which `next()` does.
pub(crate) struct Chain {
    next: usize,
}

impl Iterator for Chain {
    type Item = *const Header;

    #[inline]
    fn next(&mut self) -> Option<*const Header> {
        if self.next == 0 {
            return None;
        }
        let block = self.next as *const Header;
        // SAFETY: `block` was linked into a chain this thread closed, so it is a live linked
        // block whose header was published by the link CAS (made visible by `close`'s Acquire).
        let word = unsafe { (*block).link.load(Ordering::Relaxed) };
        debug_assert_eq!(word & TAGS, LINKED_TAG, "chain corrupted");
        self.next = word & !TAGS;
        Some(block)
    }
}
