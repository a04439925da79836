//! Helpers shared by the test modules: byte patterns, owned blocks and chains, counter snapshots.
//!
//! The central type is [`Chain`]: a root and its linked blocks, each filled with its own byte
//! pattern when allocated. A `Chain` value owns its blocks (it is only made by allocating, and
//! is neither `Clone` nor `Copy`), so checking its contents and freeing it are safe methods;
//! tests that misuse the allocator on purpose keep a raw pointer and call
//! [`Heap::free_buffer`] themselves, with a `SAFETY` comment saying why that call is allowed.

use mapialloc::{FreeOutcome, Heap, Stats};
use std::ptr::NonNull;

/// Every block, of every size, root or linked, is aligned to this (SPEC: max_align_t).
pub const ALIGN: usize = 16;

/// `n` normally, `miri_n` under Miri, where each iteration costs about a thousand times more.
pub const fn scaled(n: usize, miri_n: usize) -> usize {
    if cfg!(miri) {
        miri_n
    } else {
        n
    }
}

/// Asserts the SPEC alignment of a pointer handed out by the allocator.
#[track_caller]
pub fn assert_aligned(p: *const u8) {
    assert!(!p.is_null(), "the allocator handed out NULL");
    assert_eq!(p as usize % ALIGN, 0, "{p:p} is not {ALIGN}-byte aligned");
}

/// The 8-byte word that `tag`'s pattern is built from.
///
/// A multiplicative hash spreads the tag over all eight bytes, so two tags give words that
/// differ in some byte and a block overwritten with another block's pattern fails
/// [`verify_pattern`]. Adding 1 first keeps tag 0 away from the all-zero word, which is what
/// freshly mapped (or wrongly zeroed) memory holds.
fn pattern_word(tag: u64) -> u64 {
    tag.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// Word `k` of `tag`'s pattern: the base word with every byte xored by `k`, so that a block
/// shifted within itself (or two blocks swapped halves) is caught too.
fn pattern_at(word: u64, k: usize) -> [u8; 8] {
    (word ^ (k as u8 as u64).wrapping_mul(0x0101_0101_0101_0101)).to_le_bytes()
}

/// Fills `bytes` with `tag`'s pattern. Works a word at a time: the large blocks in these
/// tests are tens of MiB and the tests run in debug builds.
pub fn fill_pattern(bytes: &mut [u8], tag: u64) {
    let word = pattern_word(tag);
    for (k, chunk) in bytes.chunks_mut(8).enumerate() {
        chunk.copy_from_slice(&pattern_at(word, k)[..chunk.len()]);
    }
}

/// Checks that `bytes` still hold `tag`'s pattern, naming the first byte that does not.
#[track_caller]
pub fn verify_pattern(bytes: &[u8], tag: u64) {
    let word = pattern_word(tag);
    for (k, chunk) in bytes.chunks(8).enumerate() {
        let want = &pattern_at(word, k)[..chunk.len()];
        if chunk != want {
            let i = chunk
                .iter()
                .zip(want)
                .position(|(a, b)| a != b)
                .unwrap_or(0);
            panic!(
                "block {:p} (tag {tag}, {} bytes) clobbered at offset {}: {:#04x} instead of {:#04x}",
                bytes.as_ptr(),
                bytes.len(),
                k * 8 + i,
                chunk[i],
                want[i]
            );
        }
    }
}

/// One block handed out by a heap, owned by the [`Chain`] it belongs to.
#[derive(Debug)]
pub struct Block {
    ptr: NonNull<u8>,
    len: usize,
    tag: u64,
}

// SAFETY: a `Block` is an address and a length. The memory it names belongs to the `Chain`
// that holds it, and moves with it; MAPI memory is free-threaded (SPEC: any thread may use,
// link to or free any root), so using or freeing it from another thread is allowed.
unsafe impl Send for Block {}

impl Block {
    /// Takes a block just returned by the allocator for `len` bytes: checks its alignment and
    /// fills it with `tag`'s pattern.
    fn fresh(ptr: NonNull<u8>, len: usize, tag: u64) -> Block {
        assert_aligned(ptr.as_ptr());
        let mut block = Block { ptr, len, tag };
        fill_pattern(block.bytes_mut(), tag);
        block
    }

    /// The user pointer.
    pub fn ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// The size that was asked for.
    pub fn len(&self) -> usize {
        self.len
    }

    /// The address range the block occupies, as far as the tests can tell: a size-0 block
    /// counts as one byte, so that two size-0 blocks at the same address overlap.
    pub fn range(&self) -> std::ops::Range<usize> {
        let start = self.ptr.as_ptr() as usize;
        start..start + self.len.max(1)
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: the block is live (its chain owns it and has not been freed, since freeing
        // consumes the chain) and was handed out for `len` bytes.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `bytes`; `&mut self` makes this the only view of the block.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    /// Panics unless the block still holds its pattern.
    #[track_caller]
    pub fn verify(&self) {
        verify_pattern(self.bytes(), self.tag);
    }
}

/// A root and the blocks linked to it, in the heap that made them.
#[derive(Debug)]
pub struct Chain<'h> {
    heap: &'h Heap,
    root: Block,
    linked: Vec<Block>,
}

impl<'h> Chain<'h> {
    /// Allocates a root of `len` bytes tagged `tag`; panics if the heap refuses.
    #[track_caller]
    pub fn new(heap: &'h Heap, len: usize, tag: u64) -> Chain<'h> {
        let ptr = heap
            .allocate_buffer(len)
            .unwrap_or_else(|e| panic!("allocate_buffer({len}) failed: {e}"));
        Chain {
            heap,
            root: Block::fresh(ptr, len, tag),
            linked: Vec::new(),
        }
    }

    /// A root of `root_len` bytes with one linked block per entry of `link_lens`. Tags are
    /// `tag`, `tag + 1`, ... in allocation order, so give chains tags far enough apart.
    #[track_caller]
    pub fn with_links(
        heap: &'h Heap,
        root_len: usize,
        link_lens: impl IntoIterator<Item = usize>,
        tag: u64,
    ) -> Chain<'h> {
        let mut chain = Chain::new(heap, root_len, tag);
        for (i, len) in link_lens.into_iter().enumerate() {
            chain.link(len, tag + 1 + i as u64);
        }
        chain
    }

    /// Links a block of `len` bytes tagged `tag` to the root; panics if the heap refuses.
    #[track_caller]
    pub fn link(&mut self, len: usize, tag: u64) -> &Block {
        // SAFETY: the block goes straight into this chain.
        let block = unsafe { link_block(self.heap, self.root.ptr(), len, tag) };
        self.linked.push(block);
        self.linked.last().expect("just pushed")
    }

    /// Adopts blocks that other threads linked to this root with [`link_block`].
    pub fn adopt(&mut self, blocks: impl IntoIterator<Item = Block>) {
        self.linked.extend(blocks);
    }

    pub fn root(&self) -> &Block {
        &self.root
    }

    pub fn linked(&self) -> &[Block] {
        &self.linked
    }

    /// The root followed by every linked block.
    pub fn blocks(&self) -> impl Iterator<Item = &Block> {
        std::iter::once(&self.root).chain(&self.linked)
    }

    /// Number of blocks, root included: what `live_blocks` counts for this chain.
    pub fn block_count(&self) -> u64 {
        1 + self.linked.len() as u64
    }

    /// Sum of the sizes asked for: a lower bound on what `live_bytes` counts for this chain.
    pub fn requested_bytes(&self) -> u64 {
        self.blocks().map(|b| b.len() as u64).sum()
    }

    /// Panics unless every block still holds its pattern.
    #[track_caller]
    pub fn verify(&self) {
        self.blocks().for_each(Block::verify);
    }

    /// Checks every block, then frees the root (and with it the chain). Returns what
    /// `free_buffer` said, which callers assert on: it is `Freed` unless a test raced it.
    #[track_caller]
    pub fn free(self) -> FreeOutcome {
        self.verify();
        // SAFETY: `self` owns a live root of `self.heap` and is consumed here, so no block of
        // the chain is used after the call.
        unsafe { self.heap.free_buffer(self.root.ptr()) }
    }
}

/// Links a block of `len` bytes tagged `tag` to `root` and fills it: the building block of
/// [`Chain::link`], public for threads that link to a root another thread owns.
///
/// # Safety
/// The block belongs to `root`'s chain and must be handed to that [`Chain`] (with
/// [`Chain::adopt`]) before the chain is freed, or dropped unused: a `Block` that outlived
/// its chain would let [`Block::verify`] read freed memory.
#[track_caller]
pub unsafe fn link_block(heap: &Heap, root: *mut u8, len: usize, tag: u64) -> Block {
    let ptr = heap
        .allocate_more(len, root)
        .unwrap_or_else(|e| panic!("allocate_more({len}, {root:p}) failed: {e}"));
    Block::fresh(ptr, len, tag)
}

/// Panics if two of `blocks` overlap (or two size-0 blocks share an address).
#[track_caller]
pub fn assert_disjoint<'a>(blocks: impl IntoIterator<Item = &'a Block>) {
    let mut ranges: Vec<_> = blocks.into_iter().map(Block::range).collect();
    ranges.sort_by_key(|r| r.start);
    for pair in ranges.windows(2) {
        assert!(
            pair[0].end <= pair[1].start,
            "live blocks overlap: {:#x}..{:#x} and {:#x}..{:#x}",
            pair[0].start,
            pair[0].end,
            pair[1].start,
            pair[1].end
        );
    }
}

/// The counters the SPEC pins exactly (live counts and one counter per misuse kind), so a test
/// can state them all in one `assert_eq!` with `..Counts::default()` for the zeros.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub live_roots: u64,
    pub live_blocks: u64,
    pub double_frees: u64,
    pub linked_frees: u64,
    pub foreign_frees: u64,
    pub bad_parents: u64,
}

impl Counts {
    pub fn of(heap: &Heap) -> Counts {
        Counts::from(heap.stats())
    }

    /// The counts of `chains` as live blocks, and no misuse.
    pub fn live<'a, 'h: 'a>(chains: impl IntoIterator<Item = &'a Chain<'h>>) -> Counts {
        chains.into_iter().fold(Counts::default(), |mut c, chain| {
            c.live_roots += 1;
            c.live_blocks += chain.block_count();
            c
        })
    }
}

impl From<Stats> for Counts {
    fn from(s: Stats) -> Counts {
        Counts {
            live_roots: s.live_roots,
            live_blocks: s.live_blocks,
            double_frees: s.double_frees,
            linked_frees: s.linked_frees,
            foreign_frees: s.foreign_frees,
            bad_parents: s.bad_parents,
        }
    }
}

/// A root size for test number `i`: cycles through sizes that land in different classes,
/// from size 0 to a few KiB, so that bulk tests touch many classes without randomness.
pub fn varied_size(i: usize) -> usize {
    const SIZES: [usize; 12] = [0, 1, 8, 16, 24, 40, 64, 100, 256, 500, 1000, 3000];
    SIZES[i % SIZES.len()]
}

/// Frees every chain in `chains` and asserts each free did it.
#[track_caller]
pub fn free_all<'h>(chains: impl IntoIterator<Item = Chain<'h>>) {
    for chain in chains {
        assert_eq!(chain.free(), FreeOutcome::Freed);
    }
}
