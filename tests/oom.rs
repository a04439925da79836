//! OOM injection: every OS mapping a workload makes is made to fail in turn, and each failure
//! must be a clean `MAPI_E_NOT_ENOUGH_MEMORY`.
//!
//! The hook (`mapialloc::testing::fail_nth_mapping`) is process-wide, so this file is its own
//! test binary with a single `#[test]`: nothing else in the process maps while it is armed.
//!
//! For n = 1, 2, ... the workload runs on a fresh `Heap` with the nth mapping set to fail, until
//! a run makes fewer than n mappings (no failure: every failure point has been walked). Each run
//! checks that
//! - exactly one call fails (the hook fails one mapping; the next call maps again), with
//!   `MAPI_E_NOT_ENOUGH_MEMORY` and nothing handed out;
//! - nothing leaks: the live counts match the calls that succeeded, the blocks handed out keep
//!   their contents, and after freeing everything the live counts are zero and the committed
//!   bytes are back under the idle-pool bound;
//! - the heap works normally afterwards: roots, links, large blocks and fresh segments.
//!
//! Then the C API over the default heap: a failing `MAPIAllocateBuffer` and `MAPIAllocateMore`
//! store NULL through their out pointer.

use mapialloc::capi::{
    MAPIAllocateBuffer, MAPIAllocateMore, MAPIFreeBuffer, LPVOID, MAPI_E_NOT_ENOUGH_MEMORY, S_OK,
};
use mapialloc::testing::fail_nth_mapping;
use mapialloc::{default_heap, FreeOutcome, Heap, Scode, Stats};
use std::ptr::{self, NonNull};

/// The largest request a slab page serves; past it a block gets a span (a mapping) of its own.
const MAX_SMALL: usize = 16 * 1024 - 16;

/// Pages are 64 KiB and the idle pool keeps at most 32 of them committed (src/reclaim.rs,
/// `POOL_COMMITTED_PAGES`): a heap that has freed everything and collected, on one thread,
/// holds no more than this.
const IDLE_BOUND: u64 = 32 * 64 * 1024;

/// Workload steps: each allocates a root and links a block. Largest-class blocks fill four to a
/// 64 KiB page, so 400 steps use about 150 pages: three 4 MiB segments (64 pages each); a tail
/// of 256 largest-class roots (see `workload`) takes a fourth.
const STEPS: usize = 400;

/// What a call asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Call {
    /// `allocate_buffer` served from a slab page (a failure means a new segment failed).
    SmallRoot,
    /// `allocate_buffer` past the largest class (a large span).
    LargeRoot,
    /// `allocate_more` served from a slab page.
    SmallLink,
    /// `allocate_more` past the largest class.
    LargeLink,
}

/// A block handed out, with the byte it is filled with.
struct Block {
    ptr: NonNull<u8>,
    len: usize,
    fill: u8,
}

impl Block {
    fn new(ptr: NonNull<u8>, len: usize, fill: u8) -> Block {
        assert_eq!(ptr.as_ptr() as usize % 16, 0, "misaligned block");
        // SAFETY: the block was just handed out for `len` bytes and is ours.
        unsafe { ptr.as_ptr().write_bytes(fill, len) };
        Block { ptr, len, fill }
    }

    #[track_caller]
    fn verify(&self) {
        // SAFETY: the block is live (its root is not freed) and `len` bytes long.
        let bytes = unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) };
        assert!(
            bytes == vec![self.fill; self.len].as_slice(),
            "block {:p} of {} bytes lost its contents",
            self.ptr,
            self.len
        );
    }
}

/// A live root and the blocks linked to it.
struct Chain {
    root: Block,
    linked: Vec<Block>,
}

/// What a run did: the chains it holds and the calls that failed.
struct Run {
    chains: Vec<Chain>,
    failures: Vec<(Call, usize)>,
}

impl Run {
    fn blocks(&self) -> u64 {
        self.chains.iter().map(|c| 1 + c.linked.len() as u64).sum()
    }

    fn verify(&self) {
        for c in &self.chains {
            c.root.verify();
            c.linked.iter().for_each(Block::verify);
        }
    }
}

/// The size of step `i`'s root or link: mostly largest-class blocks (to need new pages and
/// segments), a large span every seventh, small blocks between.
fn size_of(i: usize, link: bool) -> usize {
    match (i + 3 * link as usize) % 7 {
        0 => MAX_SMALL + 1 + (i % 5) * 4096,
        1 | 3 | 5 => MAX_SMALL,
        _ => i % 700,
    }
}

/// Allocates `STEPS` roots, linking a block to one of the live roots after each. Every failure
/// must be `MAPI_E_NOT_ENOUGH_MEMORY`, and a failed link must leave its parent's chain as it was.
fn workload(heap: &Heap) -> Run {
    let mut run = Run {
        chains: Vec::new(),
        failures: Vec::new(),
    };
    for i in 0..STEPS {
        let size = size_of(i, false);
        let kind = if size > MAX_SMALL {
            Call::LargeRoot
        } else {
            Call::SmallRoot
        };
        match heap.allocate_buffer(size) {
            Ok(p) => run.chains.push(Chain {
                root: Block::new(p, size, i as u8),
                linked: Vec::new(),
            }),
            Err(e) => {
                assert_eq!(e, Scode::MAPI_E_NOT_ENOUGH_MEMORY, "step {i}: {kind:?}");
                run.failures.push((kind, i));
            }
        }

        let Some(parent) = (!run.chains.is_empty()).then(|| (i * 7919) % run.chains.len()) else {
            continue;
        };
        let size = size_of(i, true);
        let kind = if size > MAX_SMALL {
            Call::LargeLink
        } else {
            Call::SmallLink
        };
        let chain = &mut run.chains[parent];
        match heap.allocate_more(size, chain.root.ptr.as_ptr()) {
            Ok(p) => chain.linked.push(Block::new(p, size, !(i as u8))),
            Err(e) => {
                assert_eq!(e, Scode::MAPI_E_NOT_ENOUGH_MEMORY, "step {i}: {kind:?}");
                run.failures.push((kind, i));
            }
        }
    }
    // A segment's worth of largest-class roots alone (64 pages of four), so that small roots,
    // not only the links carved between them, meet a segment mapping.
    for i in 0..256 {
        match heap.allocate_buffer(MAX_SMALL) {
            Ok(p) => run.chains.push(Chain {
                root: Block::new(p, MAX_SMALL, 0x55 ^ i as u8),
                linked: Vec::new(),
            }),
            Err(e) => {
                assert_eq!(e, Scode::MAPI_E_NOT_ENOUGH_MEMORY, "tail {i}: SmallRoot");
                run.failures.push((Call::SmallRoot, STEPS + i));
            }
        }
    }
    run
}

/// Asserts that the heap's live counts are exactly the run's blocks.
#[track_caller]
fn assert_live(stats: Stats, run: &Run) {
    assert_eq!(stats.live_roots, run.chains.len() as u64, "{stats:?}");
    assert_eq!(stats.live_blocks, run.blocks(), "{stats:?}");
    assert_eq!(
        stats.bad_parents, 0,
        "a failure was answered as a bad parent"
    );
}

/// The heap serves every kind of call again: a root of each kind, links of each kind, and
/// enough largest-class blocks to need a fresh segment.
fn works_normally(heap: &Heap, run: &mut Run) {
    for (i, size) in [0, 100, MAX_SMALL, MAX_SMALL + 1, 100_000]
        .into_iter()
        .enumerate()
    {
        let p = heap.allocate_buffer(size).expect("root after the failure");
        let mut chain = Chain {
            root: Block::new(p, size, 0xa0 + i as u8),
            linked: Vec::new(),
        };
        for (j, len) in [24, MAX_SMALL, 70_000].into_iter().enumerate() {
            let p = heap
                .allocate_more(len, chain.root.ptr.as_ptr())
                .expect("link after the failure");
            chain.linked.push(Block::new(p, len, 0xb0 + j as u8));
        }
        run.chains.push(chain);
    }
    // 64 pages of four: a whole segment's worth, so at least one more segment is mapped.
    for i in 0..256 {
        let p = heap
            .allocate_buffer(MAX_SMALL)
            .expect("page after the failure");
        run.chains.push(Chain {
            root: Block::new(p, MAX_SMALL, 0xc0 ^ i as u8),
            linked: Vec::new(),
        });
    }
}

/// Frees every chain (checking its contents first); afterwards nothing is live and, once
/// collected, the heap holds no more than its idle pool.
fn free_all(heap: &Heap, run: Run) {
    run.verify();
    for c in run.chains {
        // SAFETY: the chain is ours and no block of it is used after this.
        let outcome = unsafe { heap.free_buffer(c.root.ptr.as_ptr()) };
        assert_eq!(outcome, FreeOutcome::Freed);
    }
    let stats = heap.stats();
    assert_eq!(
        (stats.live_roots, stats.live_blocks, stats.live_bytes),
        (0, 0, 0),
        "leak: {stats:?}"
    );
    heap.collect();
    let committed = heap.stats().os_committed_bytes;
    assert!(
        committed <= IDLE_BOUND,
        "{committed} bytes still committed after freeing everything"
    );
}

#[test]
fn every_mapping_failure_is_a_clean_not_enough_memory() {
    // Reference run: how many calls of each kind the workload makes.
    let heap = Heap::new();
    let reference = workload(&heap);
    assert!(reference.failures.is_empty());
    assert_live(heap.stats(), &reference);
    free_all(&heap, reference);
    drop(heap);

    let mut failed_kinds = Vec::new();
    let mut n = 1;
    let points = loop {
        let heap = Heap::new();
        fail_nth_mapping(n);
        let mut run = workload(&heap);
        // Switch the hook off whether or not it fired (a run with fewer than n mappings leaves
        // it armed).
        fail_nth_mapping(0);
        if run.failures.is_empty() {
            // This run made fewer than n mappings: every failure point has been walked.
            free_all(&heap, run);
            break n - 1;
        }
        assert_eq!(
            run.failures.len(),
            1,
            "mapping {n}: one injected failure failed several calls: {:?}",
            run.failures
        );
        failed_kinds.push(run.failures[0].0);
        assert_live(heap.stats(), &run);
        run.verify();
        works_normally(&heap, &mut run);
        assert_live(heap.stats(), &run);
        free_all(&heap, run);
        n += 1;
        assert!(n < 10_000, "the workload never stops mapping");
    };

    // Three segments and about a hundred large spans: the walk covered all of them, and each
    // kind of call failed at least once.
    assert!(points > 60, "only {points} mappings walked");
    failed_kinds.sort();
    failed_kinds.dedup();
    eprintln!("oom: walked {points} failing mappings; kinds of call that failed: {failed_kinds:?}");
    assert_eq!(
        failed_kinds,
        [
            Call::SmallRoot,
            Call::LargeRoot,
            Call::SmallLink,
            Call::LargeLink
        ],
        "not every kind of call met a failing mapping"
    );

    c_api_stores_null_on_failure();
}

/// The C exports, over the default heap (which nothing else in this process uses): each failing
/// allocation returns `MAPI_E_NOT_ENOUGH_MEMORY` and stores NULL through its out pointer.
fn c_api_stores_null_on_failure() {
    let sentinel = || ptr::dangling_mut::<u64>().cast();
    let heap = default_heap();
    let live = |stats: Stats| (stats.live_roots, stats.live_blocks);
    assert_eq!(live(heap.stats()), (0, 0));

    // SAFETY: every out pointer below is a valid local, the root is freed once, and the
    // 100,000-byte write goes to a block just handed out for 100,000 bytes.
    unsafe {
        // The default heap's first small allocation maps its first segment.
        let mut p: LPVOID = sentinel();
        fail_nth_mapping(1);
        assert_eq!(MAPIAllocateBuffer(64, &mut p), MAPI_E_NOT_ENOUGH_MEMORY);
        fail_nth_mapping(0);
        assert!(p.is_null(), "MAPIAllocateBuffer left {p:p} on failure");
        assert_eq!(live(heap.stats()), (0, 0));

        // A large root (a span of its own) fails the same way.
        let mut p: LPVOID = sentinel();
        fail_nth_mapping(1);
        assert_eq!(
            MAPIAllocateBuffer(100_000, &mut p),
            MAPI_E_NOT_ENOUGH_MEMORY
        );
        fail_nth_mapping(0);
        assert!(p.is_null(), "MAPIAllocateBuffer left {p:p} on failure");

        // A link whose span cannot be mapped: NULL out, the root's chain unchanged.
        let mut root: LPVOID = ptr::null_mut();
        assert_eq!(MAPIAllocateBuffer(64, &mut root), S_OK);
        let mut p: LPVOID = sentinel();
        fail_nth_mapping(1);
        assert_eq!(
            MAPIAllocateMore(100_000, root, &mut p),
            MAPI_E_NOT_ENOUGH_MEMORY
        );
        fail_nth_mapping(0);
        assert!(p.is_null(), "MAPIAllocateMore left {p:p} on failure");
        assert_eq!(live(heap.stats()), (1, 1));

        // And with the hook off, the same calls succeed.
        let mut p: LPVOID = ptr::null_mut();
        assert_eq!(MAPIAllocateMore(100_000, root, &mut p), S_OK);
        assert!(!p.is_null());
        p.cast::<u8>().write_bytes(0x5a, 100_000);
        assert_eq!(live(heap.stats()), (1, 2));
        assert_eq!(MAPIFreeBuffer(root), 0);
    }
    let stats = heap.stats();
    assert_eq!(live(stats), (0, 0), "{stats:?}");
    assert_eq!(stats.bad_parents, 0);
}
