//! Chunks: small linked blocks carved from per-root, per-thread slabs.
//!
//! A linked block of at most [`CARVE_MAX`] bytes is not a block of its own: the linking
//! thread carves it from a *chunk*, a small-class block linked into the root's chain like any
//! linked block (one CAS), whose header says `Linked` with the chunk flag. The thread keeps the
//! chunk's bump cursor in its cache (`Carver` in `thread_cache`, one for each of the last 4
//! roots it linked to), so carving writes nothing shared but the tally and needs no locked
//! instruction; a root with 20 strings costs a CAS instead of 20, and its free walks a chunk
//! instead of 20 blocks.
//!
//! Layout of a chunk: `[Header][Prologue][carved blocks...][starts]`. Carved blocks have no
//! header; `starts` has a bit per 16-byte granule, set by the carver where a block starts, so
//! that a free of a carved block is told from a free of a pointer into one (SPEC counts them
//! apart).
//!
//! Who gives a chunk back: the chunk's thread may still be carving from it when another
//! thread frees the root. The `state` word decides, with one swap on each side:
//!
//! * the carving thread *seals* the chunk when it moves on (swap to `SEALED`); if it finds
//!   `FREED`, the root's freer has passed and the carver gives the chunk back itself;
//! * the root's freer swaps each chunk of the closed chain to `FREED`; if it finds `SEALED`,
//!   the carver has let go and the freer gives it back; if it finds `HELD`, the carver will.
//!   A freer that *loads* `SEALED` skips the swap: sealing is final, so no one else will
//!   look at the chunk again (most chunks of a chain are sealed by the time it is freed).
//!
//! Both swaps are RMWs on one word, so exactly one side sees the other's mark. While a chunk
//! is `HELD` its memory cannot be given back, so the carver's reads and writes of it are
//! always to live memory. A carve succeeds when the carver reads `HELD` after bumping its
//! private cursor: the root's freer had then not reached this chunk, so the new block is
//! freed with the chain (the link linearises before the free). A carver that reads `FREED`
//! knows the root was freed and fails over to the slow path, which validates the parent.
//!
//! Counting: the freer counts as freed the tally it read, and packs it into the `FREED` word;
//! a carver that finds `FREED` counts only what it carved beyond that (blocks carved while
//! the free ran), so the heap's counters are exact once no call is in flight, even while a
//! carver still holds a chunk of a freed root.
//!
//! The same root address handed out again is never confused with the old root: the freer
//! marks every chunk a carver still holds `FREED` before it gives the root block back, so a
//! thread that learns of the new root (through any happens-before edge, as for every
//! allocator) reads `FREED`. A sealed chunk is left unmarked: no carver refers to it.

use crate::chain::Header;
use crate::size_class::{usable_size, NUM_CLASSES};
use crate::sync::{AtomicU64, Ordering};

/// The largest request carved from a chunk; larger linked blocks are blocks of their own.
pub(crate) const CARVE_MAX: usize = if cfg!(loom) { 16 } else { 256 };

/// Block size (header included) of the smallest chunk. A root's first chunk from a thread is
/// sized to what that thread's roots typically take; its second is as large, and each one
/// after that doubles, up to [`CHUNK_MAX_BLOCK`].
pub(crate) const CHUNK_FIRST_BLOCK: usize = if cfg!(loom) { 96 } else { 256 };
/// Block size of the largest chunk (the largest small class).
pub(crate) const CHUNK_MAX_BLOCK: usize = if cfg!(loom) { 96 } else { 16 << 10 };

/// `state` tag: the chunk's carving thread still holds it.
const HELD: u64 = 0;
/// `state` tag: the carving thread let go: the root's freer gives it back.
const SEALED: u64 = 1;
/// `state` tag: the root's freer passed: the carving thread gives it back. The rest of the
/// word is the tally the freer counted as freed; the carver counts the remainder.
const FREED: u64 = 2;
const TAG: u64 = 3;

/// The first 16 user bytes of a chunk.
#[repr(C, align(16))]
pub(crate) struct Prologue {
    /// A tag (`HELD`, `SEALED`, `FREED`), and with `FREED` the tally the freer counted, packed
    /// above it (see the module docs).
    state: AtomicU64,
    /// Blocks carved and their bytes, packed; written only by the carving thread, read by the
    /// root's freer and by `live_roots` snapshots.
    tally: AtomicU64,
}

/// Bytes before a chunk's first carved block, from its user pointer.
pub(crate) const PROLOGUE_SIZE: usize = std::mem::size_of::<Prologue>();

/// Blocks carved from a chunk and their bytes, packed as `state` holds them above its tag
/// (blocks in bits 2..32, bytes in 32..64; a chunk is at most 16 KiB), so a carve adds one
/// constant and the carver publishes it with one store.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Tally(u64);

impl Tally {
    /// No block.
    pub(crate) const ZERO: Tally = Tally(0);

    /// Counts one more block of `bytes`.
    #[inline]
    pub(crate) fn add(&mut self, bytes: usize) {
        self.0 += (bytes as u64) << 32 | 1 << 2;
    }

    #[inline]
    pub(crate) fn blocks(self) -> u64 {
        (self.0 as u32 >> 2) as u64
    }

    #[inline]
    pub(crate) fn bytes(self) -> u64 {
        self.0 >> 32
    }

    #[inline]
    fn pack(self) -> u64 {
        self.0
    }

    #[inline]
    fn unpack(word: u64) -> Tally {
        Tally(word & !TAG)
    }

    /// What this (later) tally has beyond `earlier`.
    #[inline]
    pub(crate) fn minus(self, earlier: Tally) -> Tally {
        Tally(self.0 - earlier.0)
    }
}

/// What the root's freer does with a chunk of its chain.
pub(crate) enum FreerGets {
    /// The carver had let go: give the chunk back; it held these blocks.
    GiveBack(Tally),
    /// The carver still holds it and will give it back; count these blocks as freed (the
    /// carver counts any it carved while the free ran).
    LeaveToCarver(Tally),
}

/// What the carver does with a chunk it lets go of.
pub(crate) enum CarverGets {
    /// The root is still open (or its freer has not reached the chunk): the freer will give
    /// the chunk back.
    Nothing,
    /// The freer passed: give the chunk back, and count these blocks (the ones the freer did
    /// not count) as freed.
    GiveBack(Tally),
}

/// Where a chunk of `usable` user bytes keeps its parts, as offsets from its user pointer:
/// carved blocks go in `payload..starts`, the start bitmap follows.
#[derive(Clone, Copy)]
pub(crate) struct Layout {
    pub(crate) payload: usize,
    pub(crate) starts: usize,
}

impl Layout {
    /// Bytes the chunk holds for carved blocks.
    #[inline]
    pub(crate) const fn capacity(&self) -> usize {
        self.starts - self.payload
    }
}

/// The layout of a chunk of `usable` user bytes, for building `LAYOUTS` (callers read that,
/// by class).
const fn layout(usable: usize) -> Layout {
    let granules = (usable - PROLOGUE_SIZE) / GRANULE;
    let bitmap = (granules.div_ceil(64) * 8 + 15) & !15;
    Layout {
        payload: PROLOGUE_SIZE,
        starts: usable - bitmap,
    }
}

/// Chunk layouts by size class, worked out at compile time: a chunk start indexes this
/// instead of dividing.
const LAYOUTS: [Layout; NUM_CLASSES] = {
    let mut layouts = [Layout {
        payload: 0,
        starts: 0,
    }; NUM_CLASSES];
    let mut class = 0;
    while class < NUM_CLASSES {
        layouts[class] = layout(usable_size(class));
        class += 1;
    }
    layouts
};

/// The layout of a chunk that is a block of `class`.
#[inline]
pub(crate) const fn layout_of_class(class: usize) -> Layout {
    LAYOUTS[class]
}

/// Carved blocks start at multiples of this from the payload.
const GRANULE: usize = 16;

/// The start bitmap's word and bit for the block at `block`, in a chunk whose payload starts
/// at `payload` and whose bitmap starts at `starts` (addresses).
#[inline]
fn start_bit(payload: usize, starts: usize, block: usize) -> (&'static AtomicU64, u64) {
    let granule = (block - payload) / GRANULE;
    // SAFETY: the bitmap lies inside the chunk's mapped memory, 16-aligned, and its words
    // are only accessed as atomics.
    let word =
        unsafe { &*std::ptr::with_exposed_provenance::<AtomicU64>(starts + granule / 64 * 8) };
    (word, 1 << (granule % 64))
}

/// Carver: records that a block starts at `block` (plain load and store: only the carver
/// writes the bitmap while it holds the chunk).
#[inline]
pub(crate) fn mark_start(payload: usize, starts: usize, block: usize) {
    let (word, bit) = start_bit(payload, starts, block);
    word.store(word.load(Ordering::Relaxed) | bit, Ordering::Relaxed);
}

/// Clears the start bitmap (`starts..end`) of a chunk the caller owns and has not published.
pub(crate) fn clear_starts(starts: usize, end: usize) {
    // A plain loop: `step_by` cost about 20 instructions per chunk started.
    let mut word = starts;
    while word < end {
        // SAFETY: the bitmap lies inside the chunk's mapped memory, 8-aligned, and the chunk
        // is ours alone until it is published. (Written as new atomics, not stored to: under
        // loom an atomic is an object that must be created.)
        unsafe {
            std::ptr::with_exposed_provenance_mut::<AtomicU64>(word).write(AtomicU64::new(0))
        };
        word += 8;
    }
}

/// Whether `user` is where a carved block of `chunk` (a block of `class`) starts: a
/// snapshot, for classifying misused pointers.
pub(crate) fn is_block_start(chunk: &Header, class: usize, user: usize) -> bool {
    let base = chunk.user() as usize;
    let Layout { payload, starts } = layout_of_class(class);
    let (payload, starts) = (base + payload, base + starts);
    if user < payload || user >= starts || (user - payload) % GRANULE != 0 {
        return false;
    }
    let (word, bit) = start_bit(payload, starts, user);
    word.load(Ordering::Relaxed) & bit != 0
}

/// Bytes a request takes in a chunk: rounded up to the alignment, at least one granule so
/// every block is unique.
#[inline]
pub(crate) fn carve_size(size: usize) -> usize {
    (size.max(1) + 15) & !15
}

/// The prologue of the chunk whose header is `chunk`.
#[inline]
pub(crate) fn prologue(chunk: &Header) -> &Prologue {
    // SAFETY: a chunk's user area starts with its prologue (written by `start` before the
    // chunk was published), 16-aligned; the memory stays mapped while the heap lives.
    unsafe { &*(chunk.user() as *const Prologue) }
}

impl Prologue {
    /// Writes a fresh prologue into `chunk`, which the caller owns and has not published.
    pub(crate) fn start(chunk: &Header) {
        let prologue = Prologue {
            state: AtomicU64::new(HELD),
            tally: AtomicU64::new(0),
        };
        // SAFETY: the chunk's user area is at least a prologue long, 16-aligned and ours.
        // (Written, not stored to: under loom an atomic is an object that must be created.)
        unsafe { (chunk.user() as *mut Prologue).write(prologue) };
    }

    /// Carver: whether the root's freer has passed this chunk. (Acquire: pairs with the
    /// freer's swap, so that a carver that sees `FREED` and gives the chunk back does so after
    /// everything the freer did with it.)
    #[inline]
    pub(crate) fn freed(&self) -> bool {
        self.state.load(Ordering::Acquire) & TAG == FREED
    }

    /// Carver: publishes the tally (plain store: only the carver writes it).
    #[inline]
    pub(crate) fn record(&self, tally: Tally) {
        self.tally.store(tally.pack(), Ordering::Relaxed);
    }

    /// Carver: lets go of the chunk, whose final tally is `tally`.
    pub(crate) fn seal(&self, tally: Tally) -> CarverGets {
        self.record(tally);
        // AcqRel: Release publishes the tally to the freer's swap; Acquire pairs with the
        // freer's swap when it came first, as in `freed`.
        let state = self.state.swap(SEALED, Ordering::AcqRel);
        if state & TAG == FREED {
            CarverGets::GiveBack(tally.minus(Tally::unpack(state)))
        } else {
            CarverGets::Nothing
        }
    }

    /// Freer of the root: marks the chunk freed and says who gives it back.
    #[inline]
    pub(crate) fn free(&self) -> FreerGets {
        // A sealed chunk is final: its carver has let go and will never look at it again, so
        // the freer gives it back without marking it (no swap). Acquire pairs with `seal`'s
        // Release, so the tally read after it is the final one.
        if self.state.load(Ordering::Acquire) & TAG == SEALED {
            return FreerGets::GiveBack(Tally::unpack(self.tally.load(Ordering::Relaxed)));
        }
        // What the carver had published before the free reached this chunk (the chain walk
        // is ordered after the root's close, so every carve the link's caller saw finish is
        // in it); carves racing this free are the carver's to count.
        let seen = self.tally.load(Ordering::Relaxed);
        // AcqRel: Acquire pairs with `seal`'s Release (the final tally); Release pairs with
        // the carver's Acquire in `freed`/`seal`.
        let state = self.state.swap(FREED | seen, Ordering::AcqRel);
        // Deliberate fault for `loom-tests/run.sh --fault chunk_handoff`: ignore the carver's
        // hold, so a held chunk is given back twice.
        #[cfg(mapialloc_fault = "chunk_handoff")]
        let state = SEALED;
        if state & TAG == SEALED {
            FreerGets::GiveBack(Tally::unpack(self.tally.load(Ordering::Relaxed)))
        } else {
            FreerGets::LeaveToCarver(Tally::unpack(seen))
        }
    }

    /// A snapshot of the tally, for `live_roots`.
    pub(crate) fn peek(&self) -> Tally {
        Tally::unpack(self.tally.load(Ordering::Relaxed))
    }
}
