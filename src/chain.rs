//! Block headers and the chain protocol: link (MAPIAllocateMore) and close (MAPIFreeBuffer).
//!
//! Every block starts with a [`Header`]; the user pointer follows it. Word 0 (`link`) and
//! word 1 (`meta`) mean:
//!
//! | block        | `link`                                        | `meta` kind |
//! |--------------|-----------------------------------------------|-------------|
//! | open root    | generation \| newest linked block's header, or 0 | `Root`   |
//! | closed root  | generation \| `CLOSED`                        | `Free`      |
//! | linked block | next older block's header \| `LINKED_TAG`     | `Linked`    |
//! | free block   | generation \| `CLOSED`                        | `Free`      |
//!
//! The generation sits in the top 16 bits of a root's `link` (user addresses of our mappings
//! stay below 2^47, see `segment`) and is bumped every time the block becomes a root again.
//! `meta` packs a magic, the size class and the kind, for validators to classify a pointer.
//!
//! Protocol (locked instructions per call in brackets):
//!
//! * link [1 CAS per attempt]: the new block's `link` is set to the observed head, then one CAS
//!   (Release) swings the root's `link` from that word to the new block, generation kept. It
//!   only succeeds on an untagged word, i.e. on an open root: a closed root, a linked block and
//!   a free block all carry a tag, so a racing or stale link never splices into a chain it does
//!   not own.
//! * free [1 CAS]: `close` CASes `link` from the open word it read to `generation | CLOSED`.
//!   That one CAS both wins the root (of racing freers exactly one succeeds, and a stale freer
//!   whose root was freed and handed out again fails on the generation) and closes the chain:
//!   it returns the head as of the close (Acquire, pairing with the links' Release CAS), so
//!   every link that made it in is freed with the chain, and a link that lost the race sees
//!   `CLOSED` and gives its block back. `meta` then turns `Free` with a plain store.
//!
//! The free-list link of a free block lives in its user area (see `page`), never in the header,
//! so the header of a free block keeps refusing links.

use crate::sync::{AtomicU64, AtomicUsize, Ordering};

/// A block header. 16 bytes in normal builds, so user pointers stay 16-aligned.
#[repr(C, align(16))]
pub(crate) struct Header {
    /// The chain word (see the module table).
    link: AtomicUsize,
    /// Magic, class and kind.
    meta: AtomicU64,
}

/// Size of [`Header`] rounded to the alignment: the offset of the user pointer in a block.
pub(crate) const HEADER_SIZE: usize = (std::mem::size_of::<Header>() + 15) & !15;

#[cfg(not(loom))]
const _: () = assert!(HEADER_SIZE == 16);

/// `link` tag of a closed root and of a free block.
const CLOSED: usize = 1;
/// `link` tag of a linked block (its word holds the next block of the chain).
const LINKED_TAG: usize = 2;
const TAGS: usize = CLOSED | LINKED_TAG;
/// A root's generation lives in the top bits of `link`.
const GENERATION_SHIFT: u32 = 48;
const GENERATION: usize = !0 << GENERATION_SHIFT;
/// The header address in a `link` word.
const ADDRESS: usize = !GENERATION & !TAGS;

/// The highest address (exclusive) a block may have, so a `link` word has room for the
/// generation. The segment layer refuses mappings past it.
#[cfg_attr(any(loom, miri), allow(dead_code))] // only the mmap layer checks it
pub(crate) const ADDRESS_LIMIT: usize = 1 << (GENERATION_SHIFT - 1);

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
/// `meta` flag of a chunk (kind `Linked`).
const CHUNK_FLAG: u64 = 1 << 16;

/// A decoded `meta` word.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Meta(u64);

impl Meta {
    fn new(kind: Kind, class: u8) -> Meta {
        let k = match kind {
            Kind::Root => 1,
            Kind::Linked => 2,
            Kind::Free => 3,
        };
        Meta(MAGIC << 32 | (class as u64) << 8 | k)
    }

    /// The `meta` of a chunk (a linked block that linked blocks are carved from, see `chunk`).
    fn chunk(class: u8) -> Meta {
        Meta(Meta::new(Kind::Linked, class).0 | CHUNK_FLAG)
    }

    /// Whether this is a chunk's `meta`.
    #[inline]
    pub(crate) fn is_chunk(self) -> bool {
        self.0 & CHUNK_FLAG != 0
    }

    /// The kind, or `None` when the magic is wrong (not a header of ours).
    #[inline]
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

    #[inline]
    pub(crate) fn class(self) -> u8 {
        (self.0 >> 8) as u8
    }
}

/// A link failed: the parent is closed, linked or free. The caller still owns the block.
pub(crate) struct NotAnOpenRoot;

impl Header {
    /// A header for a block that has never been handed out.
    pub(crate) fn new_free(class: u8) -> Header {
        Header {
            link: AtomicUsize::new(CLOSED),
            meta: AtomicU64::new(Meta::new(Kind::Free, class).0),
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

    /// Reads `meta` (Acquire: pairs with the Release stores in `start_root`/`start_linked`, so
    /// a validator that sees a kind also sees the `link` word written with it).
    #[inline]
    pub(crate) fn meta(&self) -> Meta {
        Meta(self.meta.load(Ordering::Acquire))
    }

    /// Makes this (owned, free) block an open root of `class`, with a new generation.
    #[inline]
    pub(crate) fn start_root(&self, class: u8) {
        let generation =
            (self.link.load(Ordering::Relaxed) & GENERATION).wrapping_add(1 << GENERATION_SHIFT);
        self.link.store(generation, Ordering::Relaxed);
        // Release: pairs with the Acquire load in `meta()` by validators on other threads.
        self.meta
            .store(Meta::new(Kind::Root, class).0, Ordering::Release);
    }

    /// Marks this (owned, free) block as a linked block of `class`, not yet in any chain.
    #[inline]
    pub(crate) fn start_linked(&self, class: u8) {
        self.link.store(LINKED_TAG, Ordering::Relaxed);
        // Release: pairs with the Acquire load in `meta()` by validators on other threads.
        self.meta
            .store(Meta::new(Kind::Linked, class).0, Ordering::Release);
    }

    /// Marks this (owned, free) block as a chunk of `class`, not yet in any chain. The caller
    /// starts its prologue (see `chunk`) before publishing it with `link`.
    #[inline]
    pub(crate) fn start_chunk(&self, class: u8) {
        self.link.store(LINKED_TAG, Ordering::Relaxed);
        // Release: pairs with the Acquire load in `meta()` by validators on other threads.
        self.meta.store(Meta::chunk(class).0, Ordering::Release);
    }

    /// Marks a linked block of `class` that its owner is giving back as free: links to it
    /// fail and frees of it are double frees from now on. (A root is marked by `close`.)
    #[inline]
    pub(crate) fn finish(&self, class: u8) {
        self.link.store(CLOSED, Ordering::Relaxed);
        self.meta
            .store(Meta::new(Kind::Free, class).0, Ordering::Relaxed);
    }

    /// Links `block` (owned by the caller, started with `start_linked`) to this root with one
    /// CAS. On error the caller still owns `block` and must give it back.
    pub(crate) fn link(&self, block: &Header) -> Result<(), NotAnOpenRoot> {
        let mut word = self.link.load(Ordering::Relaxed);
        loop {
            if word & TAGS != 0 {
                return Err(NotAnOpenRoot);
            }
            block
                .link
                .store(word & ADDRESS | LINKED_TAG, Ordering::Relaxed);
            let linked = word & GENERATION | block as *const Header as usize;
            // Release: publishes `block`'s header to the Acquire CAS in `close()`; each later
            // link CAS is an RMW, so the release sequence carries every older block along.
            match self.link.compare_exchange_weak(
                word,
                linked,
                Ordering::Release,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Ok(()),
                Err(seen) => word = seen,
            }
        }
    }

    /// Wins and closes a root (whose `meta` read `seen`) in one CAS (see the module docs). Returns its chain, newest block
    /// first, to the one caller that wins; `None` to a double free (already closed, or freed
    /// and handed out again since this caller first read it).
    #[inline]
    pub(crate) fn close(&self, seen: Meta) -> Option<Chain> {
        let mut word = self.link.load(Ordering::Relaxed);
        let generation = word & GENERATION;
        // Until the CAS lands, a word with a tag (closed) or another generation (freed and
        // handed out again) means that someone else won.
        while word & TAGS == 0 {
            #[cfg(not(mapialloc_fault = "open_close"))]
            // Acquire: pairs with the Release CAS in `link()`, making every linked header
            // visible to the walk.
            let closed = self.link.compare_exchange_weak(
                word,
                generation | CLOSED,
                Ordering::Acquire,
                Ordering::Relaxed,
            );
            // Deliberate fault for `loom-tests/run.sh --fault`: close with a plain store after
            // the read, so a link landing in between is lost.
            #[cfg(mapialloc_fault = "open_close")]
            let closed = {
                self.link.load(Ordering::Acquire);
                self.link.store(generation | CLOSED, Ordering::Relaxed);
                Ok::<usize, usize>(word)
            };
            match closed {
                Ok(_) => {
                    // Release: a validator that reads `Free` (Acquire) sees the root closed.
                    self.meta
                        .store(Meta::new(Kind::Free, seen.class()).0, Ordering::Release);
                    return Some(Chain {
                        next: word & ADDRESS,
                    });
                }
                Err(now) if now & GENERATION == generation => word = now,
                Err(_) => return None,
            }
        }
        None
    }
}

impl Header {
    /// Counts the blocks linked to this root and sums their usable sizes (`tally` maps a
    /// linked header to the blocks and bytes it holds: a chunk holds many), without closing
    /// anything. Other threads may be linking
    /// or freeing meanwhile: the walk stops at anything that is not a linked block, and after
    /// `limit` blocks, so it is a snapshot, not an exact count. The caller must be pinned.
    pub(crate) fn peek_chain(
        &self,
        limit: usize,
        mut tally: impl FnMut(&Header) -> (usize, usize),
    ) -> (usize, usize) {
        // Acquire: pairs with the links' Release CAS, so the headers walked are published.
        let word = self.link.load(Ordering::Acquire);
        if word & TAGS != 0 {
            return (0, 0);
        }
        let (mut blocks, mut bytes, mut next) = (0, 0, word & ADDRESS);
        while next != 0 && blocks < limit {
            // SAFETY: `next` was a linked block of a live root when read; block memory stays
            // mapped while the caller is pinned (small segments always, large spans by the
            // epoch), and headers are atomics.
            let block: &Header = unsafe { &*std::ptr::with_exposed_provenance(next) };
            // Acquire: as above, for the next link (published by an older link's CAS).
            let link = block.link.load(Ordering::Acquire);
            if link & TAGS != LINKED_TAG || block.meta().kind() != Some(Kind::Linked) {
                break;
            }
            let (b, n) = tally(block);
            blocks += b;
            bytes += n;
            next = link & ADDRESS;
        }
        (blocks, bytes)
    }
}

/// The blocks of a closed chain. Yields each header once; read the next link before the
/// current block is given back, which `next()` does.
pub(crate) struct Chain {
    next: usize,
}

impl Chain {
    /// Whether the closed root had no linked block.
    #[inline]
    pub(crate) fn is_empty(&self) -> bool {
        self.next == 0
    }
}

impl Iterator for Chain {
    type Item = *const Header;

    #[inline]
    fn next(&mut self) -> Option<*const Header> {
        if self.next == 0 {
            return None;
        }
        let block: *const Header = std::ptr::with_exposed_provenance(self.next);
        // SAFETY: `block` was linked into a chain this thread closed, so it is a live linked
        // block whose header was published by the link CAS (made visible by `close`'s Acquire).
        let word = unsafe { (*block).link.load(Ordering::Relaxed) };
        debug_assert_eq!(word & TAGS, LINKED_TAG, "chain corrupted");
        self.next = word & ADDRESS;
        Some(block)
    }
}
