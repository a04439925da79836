//! The subset of the engine that `scripts/miri.sh` runs under Miri: small enough to finish in a
//! few minutes interpreted, wide enough to reach every block of unsafe code on its common
//! paths: size classes through the API, page free lists (carving, `local_free`, the atomic
//! `thread_free` and its drain, pages and segments filling up), chain link / close / walk,
//! two-thread cases (a chain freed on another thread, two threads racing to free one root,
//! remote frees while the owner allocates) and misuse (double free, linked free, foreign
//! pointers).
//!
//! The cases also run natively with `cargo test --test miri_subset`, with more iterations
//! ([`scaled`]), each as its own test on its own `Heap`; under Miri they run as one test on
//! one heap (see [`Fixture`]).
//!
//! Blocks are filled with `write_bytes` and checked by slice comparison: both are single
//! memset / memcmp operations for Miri, where a byte loop would cost a step per byte.

use mapialloc::{FreeOutcome, Heap, Scode, Stats, MAX_BUFFER_SIZE};
use std::ptr::NonNull;
use std::sync::mpsc;
use std::sync::Barrier;
use std::thread;

/// `n` natively, `miri_n` under Miri, where every step is interpreted.
const fn scaled(n: usize, miri_n: usize) -> usize {
    if cfg!(miri) {
        miri_n
    } else {
        n
    }
}

/// The largest request a slab page serves; one byte more is a large span (DESIGN: the largest
/// class is a 16 KiB block, 16 bytes of which are the header).
const MAX_SMALL: usize = 16 * 1024 - 16;

/// A block handed out by the heap, with the byte it is filled with.
///
/// Raw pointers are not `Send`; MAPI memory is free-threaded (SPEC: any thread may use, link to
/// or free any root), which is what the two-thread tests exercise.
#[derive(Clone, Copy, Debug)]
struct Block {
    ptr: NonNull<u8>,
    len: usize,
    fill: u8,
}

// SAFETY: see the type's docs: a `Block` is an address and a length, and the memory it names
// may be used and freed from any thread.
unsafe impl Send for Block {}

impl Block {
    /// Takes a fresh block of `len` bytes: checks its alignment and fills it.
    fn new(ptr: NonNull<u8>, len: usize, fill: u8) -> Block {
        assert_eq!(
            ptr.as_ptr() as usize % 16,
            0,
            "{ptr:p} is not 16-byte aligned"
        );
        // SAFETY: the block was just handed out for `len` bytes and nothing else uses it.
        unsafe { ptr.as_ptr().write_bytes(fill, len) };
        Block { ptr, len, fill }
    }

    /// Panics unless the block still holds its fill byte everywhere.
    #[track_caller]
    fn verify(&self) {
        // SAFETY: the block is live (its root has not been freed) and `len` bytes long; the
        // tests never write a block from two threads at once.
        let bytes = unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) };
        assert!(
            bytes == vec![self.fill; self.len].as_slice(),
            "block {:p} ({} bytes) lost its fill {:#04x}",
            self.ptr,
            self.len,
            self.fill
        );
    }

    fn addr(&self) -> usize {
        self.ptr.as_ptr() as usize
    }
}

/// A root and its linked blocks.
#[derive(Debug)]
struct Chain {
    root: Block,
    linked: Vec<Block>,
}

impl Chain {
    /// Allocates a root of `size` bytes and links a block of each of `links` to it.
    fn new(heap: &Heap, size: usize, links: &[usize], fill: u8) -> Chain {
        let root = Block::new(heap.allocate_buffer(size).expect("root"), size, fill);
        let mut chain = Chain {
            root,
            linked: Vec::new(),
        };
        for (i, &len) in links.iter().enumerate() {
            chain.link(heap, len, fill.wrapping_add(1 + i as u8));
        }
        chain
    }

    fn link(&mut self, heap: &Heap, len: usize, fill: u8) {
        let p = heap
            .allocate_more(len, self.root.ptr.as_ptr())
            .expect("link");
        self.linked.push(Block::new(p, len, fill));
    }

    fn verify(&self) {
        self.root.verify();
        self.linked.iter().for_each(Block::verify);
    }

    /// Verifies the chain, then frees it with one call.
    fn free(self, heap: &Heap) -> FreeOutcome {
        self.verify();
        // SAFETY: the chain is ours (consumed here) and none of its blocks is used afterwards.
        unsafe { heap.free_buffer(self.root.ptr.as_ptr()) }
    }
}

/// Asserts a heap with nothing live.
#[track_caller]
fn assert_empty(stats: Stats) {
    assert_eq!(
        (stats.live_roots, stats.live_blocks, stats.live_bytes),
        (0, 0, 0),
        "something is still live: {stats:?}"
    );
}

/// A heap and its counters at the start of a case.
///
/// Natively every case is its own `#[test]` with its own heap. Under Miri they all run in one
/// `#[test]` on one heap ([`miri::subset`]), because a heap's first mapping builds a
/// 4,096-entry leaf of the segment registry (`Table::set` in src/segment.rs) with
/// `std::array::from_fn`, which Tree Borrows checks in quadratic time: about two minutes per
/// heap. The cases run one after another, so [`Fixture::stats`] gives each its own counts.
struct Fixture<'h> {
    heap: &'h Heap,
    base: Stats,
}

impl<'h> Fixture<'h> {
    fn new(heap: &'h Heap) -> Fixture<'h> {
        let base = heap.stats();
        assert_empty(base);
        Fixture { heap, base }
    }

    /// The heap's counters, the cumulative ones counted from the case's start.
    fn stats(&self) -> Stats {
        let now = self.heap.stats();
        Stats {
            remote_frees: now.remote_frees - self.base.remote_frees,
            double_frees: now.double_frees - self.base.double_frees,
            linked_frees: now.linked_frees - self.base.linked_frees,
            foreign_frees: now.foreign_frees - self.base.foreign_frees,
            bad_parents: now.bad_parents - self.base.bad_parents,
            ..now
        }
    }
}

/// Drops a heap after releasing this thread's cache and collecting, as a provider shutting
/// down would; [`heap_dropped_with_returns_pending`] covers the plain drop.
#[cfg(miri)]
fn drop_heap(heap: Heap) {
    heap.release_thread_cache();
    heap.collect();
    drop(heap);
}

/// The cases, each a `#[test]` natively and all in one `#[test]` under Miri (see [`Fixture`]).
macro_rules! cases {
    ($($case:ident),* $(,)?) => {
        #[cfg(not(miri))]
        mod native {
            $(
                #[test]
                fn $case() {
                    let heap = mapialloc::Heap::new();
                    super::$case(&super::Fixture::new(&heap));
                }
            )*
        }

        #[cfg(miri)]
        mod miri {
            #[test]
            fn subset() {
                let heap = mapialloc::Heap::new();
                $(
                    eprintln!("miri subset: {}", stringify!($case));
                    super::$case(&super::Fixture::new(&heap));
                )*
                super::drop_heap(heap);
            }
        }
    };
}

cases!(
    size_classes_through_the_api,
    page_free_lists_carve_and_reuse,
    pages_and_segments_fill_up_and_come_back,
    chain_link_close_walk,
    chain_built_on_one_thread_freed_on_another,
    two_threads_race_to_free_one_root,
    remote_frees_while_the_owner_allocates,
    misuse_is_answered_without_corruption,
);

// ----- size classes -----

/// Every request size near a class boundary gets an aligned block with at least the bytes
/// asked for, no more than a class step of waste, and frees cleanly; sizes past the largest
/// class get a span of their own; sizes past `MAX_BUFFER_SIZE` fail without wrapping.
fn size_classes_through_the_api(fixture: &Fixture<'_>) {
    let heap = fixture.heap;
    let mut sizes: Vec<usize> = vec![0, 1, 15, 16, 17, 31, 32, 33];
    // Each 16-byte step up to 512, then the geometric classes to 16 KiB: probe both sides of
    // every power of two and a few points between.
    let step = scaled(1, 7);
    sizes.extend(
        (48..=512)
            .step_by(16 * step)
            .flat_map(|s| [s - 1, s, s + 1]),
    );
    for shift in 9..14 {
        for quarter in 1..=4 {
            let s = (1usize << shift) + quarter * (1 << (shift - 2));
            sizes.extend([s - 17, s - 16, s - 15]);
        }
    }
    sizes.extend([MAX_SMALL - 1, MAX_SMALL, MAX_SMALL + 1, 64 * 1024 + 3]);

    for (i, &size) in sizes.iter().enumerate() {
        let before = fixture.stats().live_bytes;
        let block = Block::new(heap.allocate_buffer(size).expect("allocate"), size, i as u8);
        let usable = fixture.stats().live_bytes - before;
        assert!(
            usable as usize >= size,
            "size {size}: only {usable} usable bytes"
        );
        // Small classes waste at most a step (16 bytes, or a quarter of the block past 512
        // bytes; the block is the usable bytes plus the 16-byte header); large spans less
        // than one OS page.
        let waste = usable as usize - size;
        let bound = if size > MAX_SMALL {
            4095
        } else {
            16.max((usable as usize + 16) / 4)
        };
        assert!(
            waste <= bound,
            "size {size}: {usable} usable bytes, waste {waste}"
        );
        block.verify();
        // SAFETY: the block is ours and not used after this.
        let outcome = unsafe { heap.free_buffer(block.ptr.as_ptr()) };
        assert_eq!(outcome, FreeOutcome::Freed);
    }
    for size in [MAX_BUFFER_SIZE + 1, u32::MAX as usize, usize::MAX] {
        assert_eq!(
            heap.allocate_buffer(size),
            Err(Scode::MAPI_E_NOT_ENOUGH_MEMORY),
            "size {size}"
        );
    }
    assert_empty(fixture.stats());
}

// ----- page free lists -----

/// Allocating more blocks of one class than a carve batch, freeing them and allocating again
/// walks `free`, `local_free` and carving; blocks never overlap and keep their contents.
fn page_free_lists_carve_and_reuse(fixture: &Fixture<'_>) {
    let heap = fixture.heap;
    let n = scaled(200, 40);
    let size = 48;
    let mut blocks: Vec<Block> = (0..n)
        .map(|i| Block::new(heap.allocate_buffer(size).unwrap(), size, i as u8))
        .collect();
    let mut addrs: Vec<usize> = blocks.iter().map(Block::addr).collect();
    addrs.sort_unstable();
    assert!(
        addrs.windows(2).all(|w| w[1] - w[0] >= size),
        "blocks overlap"
    );

    // Free every other block (local frees onto `local_free`), then allocate as many again:
    // the freed blocks come back before fresh memory is carved.
    let freed: Vec<usize> = blocks.iter().step_by(2).map(Block::addr).collect();
    let kept: Vec<Block> = blocks.iter().skip(1).step_by(2).copied().collect();
    for b in blocks.iter().step_by(2) {
        b.verify();
        // SAFETY: the block is ours and dropped from `blocks` below.
        let outcome = unsafe { heap.free_buffer(b.ptr.as_ptr()) };
        assert_eq!(outcome, FreeOutcome::Freed);
    }
    blocks = kept;
    let again: Vec<Block> = (0..freed.len())
        .map(|i| Block::new(heap.allocate_buffer(size).unwrap(), size, 0x80 | i as u8))
        .collect();
    assert!(
        again.iter().any(|b| freed.contains(&b.addr())),
        "no freed block was reused"
    );
    blocks.extend(again);
    let mut addrs: Vec<usize> = blocks.iter().map(Block::addr).collect();
    addrs.sort_unstable();
    addrs.dedup();
    assert_eq!(
        addrs.len(),
        blocks.len(),
        "a live block was handed out twice"
    );
    for b in &blocks {
        b.verify();
        // SAFETY: as above.
        let outcome = unsafe { heap.free_buffer(b.ptr.as_ptr()) };
        assert_eq!(outcome, FreeOutcome::Freed);
    }
    assert_empty(fixture.stats());
}

/// The largest class fits four blocks to a 64 KiB page, so a few dozen allocations fill pages
/// (taking fresh ones from the pool) and, natively, more than a whole 4 MiB segment (mapping a
/// second one). Freed, the pages go back to the pool, and a second fill reuses them instead
/// of committing more memory.
fn pages_and_segments_fill_up_and_come_back(fixture: &Fixture<'_>) {
    let heap = fixture.heap;
    // 64 pages of 4 blocks make a segment: 260 blocks need a second one.
    let n = scaled(260, 20);
    let fill = |heap: &Heap| -> Vec<NonNull<u8>> {
        (0..n)
            .map(|i| {
                let p = heap.allocate_buffer(MAX_SMALL).unwrap();
                for end in ends(p) {
                    // SAFETY: both ends lie inside the block, which is ours.
                    unsafe { end.write_bytes(i as u8, 16) };
                }
                p
            })
            .collect()
    };
    let free = |heap: &Heap, blocks: Vec<NonNull<u8>>| {
        for (i, p) in blocks.into_iter().enumerate() {
            for end in ends(p) {
                // SAFETY: as above; the block is still live.
                let bytes = unsafe { std::slice::from_raw_parts(end, 16) };
                assert_eq!(bytes, [i as u8; 16], "block {i} clobbered");
            }
            // SAFETY: the block is ours and not used after this.
            assert_eq!(unsafe { heap.free_buffer(p.as_ptr()) }, FreeOutcome::Freed);
        }
        assert_empty(fixture.stats());
        heap.collect();
    };
    let blocks = fill(heap);
    let full = fixture.stats().os_committed_bytes;
    assert!(full >= (n * MAX_SMALL) as u64, "{full} bytes committed");
    free(heap, blocks);
    assert!(fixture.stats().os_committed_bytes <= full);
    let blocks = fill(heap);
    assert!(
        fixture.stats().os_committed_bytes <= full,
        "the second fill did not reuse the pooled pages"
    );
    free(heap, blocks);
}

/// The two ends of a largest-class block: only they are filled, since a whole 16 KiB fill of
/// every block is too slow for Miri.
fn ends(p: NonNull<u8>) -> [*mut u8; 2] {
    [p.as_ptr(), p.as_ptr().wrapping_add(MAX_SMALL - 16)]
}

// ----- chains -----

/// Links of every kind (small, the largest class, large spans) in one chain, freed in one
/// call; the chain's blocks come back and a closed root refuses links.
fn chain_link_close_walk(fixture: &Fixture<'_>) {
    let heap = fixture.heap;
    let links: Vec<usize> = [0, 8, 24, 100, 511, 513, 4000, MAX_SMALL, MAX_SMALL + 1]
        .into_iter()
        .cycle()
        .take(scaled(100, 18))
        .collect();
    let chain = Chain::new(heap, 320, &links, 1);
    let stats = fixture.stats();
    assert_eq!(stats.live_roots, 1);
    assert_eq!(stats.live_blocks, 1 + links.len() as u64);
    let root = chain.root.ptr.as_ptr();
    let first_link = chain.linked[0].ptr.as_ptr();

    // A linked block is not a parent; a NULL parent is not either.
    assert_eq!(
        heap.allocate_more(16, first_link),
        Err(Scode::MAPI_E_INVALID_PARAMETER)
    );
    assert_eq!(
        heap.allocate_more(16, std::ptr::null_mut()),
        Err(Scode::MAPI_E_INVALID_PARAMETER)
    );
    chain.verify();

    assert_eq!(chain.free(heap), FreeOutcome::Freed);
    assert_empty(fixture.stats());
    // The root is closed: a late link fails, and its block goes back (nothing live).
    assert_eq!(
        heap.allocate_more(16, root),
        Err(Scode::MAPI_E_INVALID_PARAMETER)
    );
    assert_eq!(
        heap.allocate_more(MAX_SMALL + 1, root),
        Err(Scode::MAPI_E_INVALID_PARAMETER)
    );
    let stats = fixture.stats();
    assert_empty(stats);
    assert_eq!(stats.bad_parents, 4);

    // Chains of every length from 0, freed newest first, then oldest first.
    let mut chains: Vec<Chain> = (0..scaled(40, 6))
        .map(|i| Chain::new(heap, i * 8, &vec![i * 4; i], i as u8))
        .collect();
    for c in chains.drain(..).rev() {
        assert_eq!(c.free(heap), FreeOutcome::Freed);
    }
    assert_empty(fixture.stats());
}

// ----- two threads -----

/// Chains built on one thread and freed on another: every block goes back through its page's
/// `thread_free` list, and the owner drains those lists when it allocates again.
fn chain_built_on_one_thread_freed_on_another(fixture: &Fixture<'_>) {
    let heap = fixture.heap;
    let n = scaled(200, 12);
    let chains: Vec<Chain> = (0..n)
        .map(|i| Chain::new(heap, 16 + i % 300, &[i % 64, 200, 3000], i as u8))
        .collect();
    let blocks = chains.iter().map(|c| 1 + c.linked.len()).sum::<usize>() as u64;
    thread::scope(|s| {
        s.spawn(|| {
            for c in chains {
                assert_eq!(c.free(heap), FreeOutcome::Freed);
            }
        });
    });
    let stats = fixture.stats();
    assert_empty(stats);
    // Roots and the 3000-byte blocks go back one by one; the small links were carved from
    // chunks, which go back whole (the last one by its carver, this thread).
    let remote = stats.remote_frees;
    assert!(
        (2 * n as u64..=blocks).contains(&remote),
        "remote frees {remote}"
    );
    // The owner drains the remote frees and serves from them again.
    let again: Vec<Chain> = (0..n)
        .map(|i| Chain::new(heap, 16 + i % 300, &[i % 64], !(i as u8)))
        .collect();
    for c in again {
        assert_eq!(c.free(heap), FreeOutcome::Freed);
    }
    assert_empty(fixture.stats());
}

/// Two threads free the same roots at the same moment: exactly one of each pair frees it
/// (SPEC: "two threads racing to free one root: exactly one frees it"), the other is told it
/// was a double free, and nothing is freed twice.
fn two_threads_race_to_free_one_root(fixture: &Fixture<'_>) {
    let heap = fixture.heap;
    let rounds = scaled(200, 8);
    let barrier = Barrier::new(2);
    for round in 0..rounds {
        // Nobody allocates while a round races, so the root's address cannot be handed out
        // again before the loser's free (which would be the undefined reused-double-free).
        let chain = Chain::new(heap, 64, &[16, 300], round as u8);
        chain.verify();
        // The racers free the chain; only its root pointer goes to them.
        let Chain { root, linked: _ } = chain;
        let outcomes: Vec<FreeOutcome> = thread::scope(|s| {
            let racers: Vec<_> = (0..2)
                .map(|_| {
                    let (heap, barrier) = (heap, &barrier);
                    s.spawn(move || {
                        // The whole `Block` (which is `Send`), not just its pointer field.
                        let root = root;
                        barrier.wait();
                        // SAFETY: both threads free the same live root, which SPEC allows
                        // (racing frees); neither uses the chain afterwards, and no one
                        // allocates until both have returned.
                        unsafe { heap.free_buffer(root.ptr.as_ptr()) }
                    })
                })
                .collect();
            racers.into_iter().map(|r| r.join().unwrap()).collect()
        });
        let mut sorted = outcomes.clone();
        sorted.sort_by_key(|&o| o == FreeOutcome::DoubleFree);
        assert_eq!(
            sorted,
            [FreeOutcome::Freed, FreeOutcome::DoubleFree],
            "round {round}: {outcomes:?}"
        );
    }
    let stats = fixture.stats();
    assert_empty(stats);
    assert_eq!(stats.double_frees, rounds as u64);
}

/// The owner keeps allocating while another thread frees the owner's blocks: remote pushes
/// land on `thread_free` lists while the owner drains them.
fn remote_frees_while_the_owner_allocates(fixture: &Fixture<'_>) {
    let heap = fixture.heap;
    let n = scaled(2000, 60);
    let (tx, rx) = mpsc::sync_channel::<Chain>(8);
    thread::scope(|s| {
        s.spawn(|| {
            for c in rx {
                assert_eq!(c.free(heap), FreeOutcome::Freed);
            }
        });
        for i in 0..n {
            let links: &[usize] = if i % 3 == 0 { &[] } else { &[24, 40] };
            tx.send(Chain::new(heap, 24 + i % 40, links, i as u8))
                .unwrap();
        }
        drop(tx);
    });
    let stats = fixture.stats();
    assert_empty(stats);
    assert!(stats.remote_frees > 0);
}

// ----- misuse -----

/// Double frees, frees of linked blocks and foreign pointers free nothing, touch nothing and
/// are counted; the heap and the chains around them are intact afterwards.
fn misuse_is_answered_without_corruption(fixture: &Fixture<'_>) {
    let heap = fixture.heap;
    let chain = Chain::new(heap, 64, &[32, MAX_SMALL + 100], 7);
    let root = chain.root.ptr.as_ptr();
    let small_link = chain.linked[0].ptr.as_ptr();
    let large_link = chain.linked[1].ptr.as_ptr();
    let large_root = Chain::new(heap, MAX_SMALL + 1, &[], 9);

    // SAFETY: `free_buffer` validates any pointer before touching anything, and none of the
    // frees below frees a live root, so no block is invalidated.
    unsafe {
        assert_eq!(heap.free_buffer(small_link), FreeOutcome::LinkedBlock);
        assert_eq!(heap.free_buffer(large_link), FreeOutcome::LinkedBlock);
        let mut on_stack = [0u128; 4];
        let mut boxed = Box::new([0u128; 4]);
        let foreign: [*mut u8; 7] = [
            on_stack.as_mut_ptr().cast(),
            boxed.as_mut_ptr().cast(),
            root.wrapping_add(1),        // misaligned
            root.wrapping_add(16),       // inside a block, 16-aligned
            large_link.wrapping_add(16), // inside a large span
            large_root.root.ptr.as_ptr().wrapping_add(4096),
            std::ptr::without_provenance_mut(0x10), // no memory at all
        ];
        for p in foreign {
            assert_eq!(heap.free_buffer(p), FreeOutcome::Foreign, "{p:p}");
        }
        assert_eq!(heap.free_buffer(std::ptr::null_mut()), FreeOutcome::Null);
    }
    chain.verify();
    large_root.verify();
    let stats = fixture.stats();
    assert_eq!(stats.live_roots, 2);
    assert_eq!(stats.live_blocks, 4);
    assert_eq!((stats.linked_frees, stats.foreign_frees), (2, 7));

    assert_eq!(chain.free(heap), FreeOutcome::Freed);
    // SAFETY: a double free of a root whose address nobody has allocated since.
    assert_eq!(unsafe { heap.free_buffer(root) }, FreeOutcome::DoubleFree);
    assert_eq!(
        heap.allocate_more(8, root),
        Err(Scode::MAPI_E_INVALID_PARAMETER)
    );
    let large = large_root.root.ptr.as_ptr();
    assert_eq!(large_root.free(heap), FreeOutcome::Freed);
    // A freed large span may already be out of the registry: a second free is a double free
    // or a foreign pointer, never a free.
    // SAFETY: as above; nothing has been allocated since.
    let again = unsafe { heap.free_buffer(large) };
    assert!(
        matches!(again, FreeOutcome::DoubleFree | FreeOutcome::Foreign),
        "{again:?}"
    );
    let stats = fixture.stats();
    assert_empty(stats);
    assert_eq!(stats.double_frees + stats.foreign_frees, 1 + 1 + 7);
    assert_eq!(stats.bad_parents, 1);

    // The heap is fine afterwards, from this thread and another.
    let c = Chain::new(heap, 64, &[32, 32], 3);
    thread::scope(|s| {
        s.spawn(|| assert_eq!(c.free(heap), FreeOutcome::Freed));
    });
    assert_empty(fixture.stats());
}

/// A heap dropped while its deferred returns are still pending (the usual case: nobody
/// collects before dropping). Under Miri this caught an engine bug, since fixed:
/// `Shared::drop` dropped the epoch collector, whose pending deferred functions wrote through
/// a pointer into the very `Shared` that `drop(&mut self)` held, which Tree Borrows reports as
/// UB. `Reclaim` now has its own allocation.
#[test]
fn heap_dropped_with_returns_pending() {
    let heap = Heap::new();
    // Blocks on two pages: freeing them empties the page that is not current, whose return
    // to the pool is deferred through the epoch.
    let blocks: Vec<NonNull<u8>> = (0..8)
        .map(|_| heap.allocate_buffer(MAX_SMALL).unwrap())
        .collect();
    for p in blocks {
        // SAFETY: the block is ours and not used after this.
        assert_eq!(unsafe { heap.free_buffer(p.as_ptr()) }, FreeOutcome::Freed);
    }
    assert_empty(heap.stats());
    drop(heap);
}
