//! One test per row of SPEC.md's behaviour table, named after the row, through the Rust API.
//!
//! Two rows live at the C boundary only and are the C library's tests: `lppBuffer == NULL`,
//! and "any failure sets `*lppBuffer` to NULL" (a `Result` has no out pointer to set); the
//! Rust half of the latter, that a failure hands back and keeps nothing, is
//! [`any_failure_hands_back_nothing`]. The racing halves of two rows (a link racing the free
//! of its parent, two threads freeing one root) are in `threads`.
//!
//! Misuse of a freed root is only defined while its block has not been handed out again
//! (SPEC: a double free after reuse cannot be told from a free of the new buffer). The tests
//! below make sure of that by allocating nothing in the freed root's size class between the
//! free and the misuse, and by keeping a neighbour of the same size alive so that the freed
//! root's page does not fall empty and retire (see [`freed_root_with_neighbour`]).

use crate::support::{assert_disjoint, free_all, scaled, Chain, Counts};
use mapialloc::{default_heap, FreeOutcome, Heap, Scode};

/// Sizes the SPEC says must fail: near 0xFFFFFFFF (where adding a 16-byte header wraps in 32
/// bits) and near `usize::MAX` (where it wraps in 64), plus sizes no process can map.
const TOO_BIG: [usize; 10] = [
    u32::MAX as usize - 15,
    u32::MAX as usize - 8,
    u32::MAX as usize - 1,
    u32::MAX as usize,
    1 << 48,
    1 << 62,
    isize::MAX as usize,
    usize::MAX - 15,
    usize::MAX - 1,
    usize::MAX,
];

/// Interior offsets into a root of [`INTERIOR_ROOT_LEN`] bytes: misaligned (1, 8) and
/// 16-aligned (16, 48). None can be a block start, as the block itself spans them.
const INTERIOR_OFFSETS: [usize; 4] = [1, 8, 16, 48];
const INTERIOR_ROOT_LEN: usize = 64;

/// A 16-aligned buffer on the stack: a pointer into it looks like a block start to anything
/// that only checks alignment.
#[repr(align(16))]
struct StackBuf([u8; 64]);

/// Pointers that are not block starts of `heap`, from every source the SPEC names, paired
/// with a description for failure messages. `other` is a root of another heap, `root` a live
/// root of `heap` of [`INTERIOR_ROOT_LEN`] bytes, `stack` and `boxed` memory that no heap
/// made.
fn foreign_pointers(
    root: *mut u8,
    other: *mut u8,
    stack: &mut StackBuf,
    boxed: &mut [u8],
) -> Vec<(String, *mut u8)> {
    let mut ptrs = vec![
        ("a stack address".to_string(), stack.0.as_mut_ptr()),
        (
            "a misaligned stack address".to_string(),
            stack.0.as_mut_ptr().wrapping_add(1),
        ),
        ("a Box".to_string(), boxed.as_mut_ptr()),
        ("a root of another Heap".to_string(), other),
    ];
    for off in INTERIOR_OFFSETS {
        ptrs.push((format!("root + {off}"), root.wrapping_add(off)));
    }
    ptrs
}

/// A live root (the neighbour) and the pointer of a root of the same size freed after it, so
/// the freed root's page still holds a live block and the freed block is not yet reused.
fn freed_root_with_neighbour(heap: &Heap, len: usize) -> (Chain<'_>, *mut u8) {
    let neighbour = Chain::new(heap, len, 1);
    let victim = Chain::with_links(heap, len, [24, 300], 100);
    let ptr = victim.root().ptr();
    assert_eq!(victim.free(), FreeOutcome::Freed);
    (neighbour, ptr)
}

/// Allocates `n` roots of `len` bytes and checks that none shares memory with another (a block
/// freed twice would sit twice on a free list and be handed out twice), then frees them.
fn assert_no_block_handed_out_twice(heap: &Heap, len: usize, n: usize) {
    let chains: Vec<_> = (0..n)
        .map(|i| Chain::new(heap, len, 1_000 + i as u64))
        .collect();
    assert_disjoint(chains.iter().map(Chain::root));
    free_all(chains);
}

#[test]
fn allocate_buffer_memory_available() {
    let heap = Heap::new();
    for (i, len) in [1, 7, 16, 17, 100, 1000, 4096, 65_536]
        .into_iter()
        .enumerate()
    {
        let chain = Chain::new(&heap, len, i as u64); // asserts alignment, fills
        assert_eq!(Counts::of(&heap), Counts::live([&chain]));
        assert!(
            heap.stats().live_bytes >= len as u64,
            "live_bytes counts the class capacity, at least the {len} bytes asked for"
        );
        assert_eq!(chain.free(), FreeOutcome::Freed); // verifies the pattern first
        assert_eq!(Counts::of(&heap), Counts::default());
        assert_eq!(heap.stats().live_bytes, 0);
    }
}

#[test]
fn cb_size_zero() {
    let heap = Heap::new();
    let mut a = Chain::new(&heap, 0, 1);
    let b = Chain::new(&heap, 0, 2);
    assert_ne!(
        a.root().ptr(),
        b.root().ptr(),
        "size-0 roots must be unique"
    );
    // Linkable like any other, and linked size-0 blocks are unique too.
    a.link(0, 3);
    a.link(0, 4);
    a.link(16, 5);
    assert_disjoint(a.blocks().chain(b.blocks()));
    assert_eq!(Counts::of(&heap), Counts::live([&a, &b]));
    assert_eq!(a.free(), FreeOutcome::Freed);
    assert_eq!(b.free(), FreeOutcome::Freed);
    assert_eq!(Counts::of(&heap), Counts::default());
}

#[test]
fn cb_size_near_u32_max_or_more_than_the_process_can_get() {
    let heap = Heap::new();
    let mut chain = Chain::with_links(&heap, 32, [32], 1);
    for len in TOO_BIG {
        let root = heap.allocate_buffer(len);
        let more = heap.allocate_more(len, chain.root().ptr());
        for (call, result) in [("allocate_buffer", root), ("allocate_more", more)] {
            if let Ok(p) = result {
                // Give a wrongly granted block back before failing, so the failure is the
                // message below and not an out-of-memory in a later test.
                if call == "allocate_buffer" {
                    // SAFETY: `p` is a root just handed out and never used.
                    unsafe { heap.free_buffer(p.as_ptr()) };
                }
                panic!("{call}({len:#x}) succeeded with {p:p}");
            }
            assert_eq!(
                result,
                Err(Scode::MAPI_E_NOT_ENOUGH_MEMORY),
                "{call}({len:#x})"
            );
        }
    }
    // No failed call allocated, counted or disturbed the chain; the heap still works.
    assert_eq!(Counts::of(&heap), Counts::live([&chain]));
    chain.link(64, 10);
    assert_eq!(chain.free(), FreeOutcome::Freed);
    assert_eq!(Counts::of(&heap), Counts::default());
    assert_eq!(heap.stats().live_bytes, 0);
}

#[test]
fn any_failure_hands_back_nothing() {
    let heap = Heap::new();
    let chain = Chain::with_links(&heap, 40, [40], 1);
    let linked = chain.linked()[0].ptr();
    let before = heap.stats();
    let failures = [
        heap.allocate_buffer(usize::MAX).err(),
        heap.allocate_more(usize::MAX, chain.root().ptr()).err(),
        heap.allocate_more(8, std::ptr::null_mut()).err(),
        heap.allocate_more(8, linked).err(),
    ];
    assert!(
        failures.iter().all(Option::is_some),
        "every call must fail: {failures:?}"
    );
    let after = heap.stats();
    assert_eq!(
        (after.live_roots, after.live_blocks, after.live_bytes),
        (before.live_roots, before.live_blocks, before.live_bytes),
        "a failed call keeps no block"
    );
    assert_eq!(chain.free(), FreeOutcome::Freed);
    assert_eq!(heap.stats().live_blocks, 0);
}

#[test]
fn allocate_more_on_a_root() {
    let heap = Heap::new();
    let mut chain = Chain::new(&heap, 100, 0);
    // Every link is aligned (checked in `link`) and keeps its contents; a long chain works
    // the same (the SPEC's O(1) per link is a cost, measured by the benches, not here).
    let n = scaled(10_000, 100);
    for i in 0..n {
        chain.link(i % 700, 1 + i as u64);
    }
    assert_disjoint(chain.blocks());
    assert_eq!(Counts::of(&heap), Counts::live([&chain]));
    assert!(heap.stats().live_bytes >= chain.requested_bytes());
    assert_eq!(chain.free(), FreeOutcome::Freed);
    assert_eq!(Counts::of(&heap), Counts::default());
}

#[test]
fn allocate_more_parent_null() {
    let heap = Heap::new();
    assert_eq!(
        heap.allocate_more(16, std::ptr::null_mut()),
        Err(Scode::MAPI_E_INVALID_PARAMETER)
    );
    assert_eq!(
        Counts::of(&heap),
        Counts {
            bad_parents: 1,
            ..Counts::default()
        }
    );
}

#[test]
fn allocate_more_parent_is_a_linked_block() {
    let heap = Heap::new();
    let chain = Chain::with_links(&heap, 64, [64, 64], 1);
    for linked in chain.linked() {
        assert_eq!(
            heap.allocate_more(64, linked.ptr()),
            Err(Scode::MAPI_E_INVALID_PARAMETER)
        );
    }
    // No corruption: every block keeps its pattern (checked by `free`) and the chain
    // still frees as the three blocks it is.
    let live = Counts::live([&chain]);
    assert_eq!(
        Counts::of(&heap),
        Counts {
            bad_parents: 2,
            ..live
        }
    );
    assert_eq!(chain.free(), FreeOutcome::Freed);
    assert_eq!(
        Counts::of(&heap),
        Counts {
            bad_parents: 2,
            ..Counts::default()
        }
    );
}

#[test]
fn allocate_more_parent_already_freed() {
    let heap = Heap::new();
    let (neighbour, freed) = freed_root_with_neighbour(&heap, 48);
    // Link sizes in other classes than the freed root's, so that even an engine that takes
    // the new block before checking the parent cannot be handed the freed root's block.
    for len in [0, 1000] {
        assert_eq!(
            heap.allocate_more(len, freed),
            Err(Scode::MAPI_E_INVALID_PARAMETER)
        );
    }
    let live = Counts::live([&neighbour]);
    assert_eq!(
        Counts::of(&heap),
        Counts {
            bad_parents: 2,
            ..live
        }
    );
    assert_eq!(neighbour.free(), FreeOutcome::Freed);
}

#[test]
fn allocate_more_parent_not_from_this_allocator() {
    let heap = Heap::new();
    let other_heap = Heap::new();
    let root = Chain::with_links(&heap, INTERIOR_ROOT_LEN, [32], 1);
    let other = Chain::new(&other_heap, 64, 2);
    let mut stack = StackBuf([7; 64]);
    let mut boxed = vec![9u8; 64].into_boxed_slice();
    let foreign = foreign_pointers(
        root.root().ptr(),
        other.root().ptr(),
        &mut stack,
        &mut boxed,
    );
    for (what, p) in &foreign {
        assert_eq!(
            heap.allocate_more(16, *p),
            Err(Scode::MAPI_E_INVALID_PARAMETER),
            "parent is {what}"
        );
    }
    // Nothing was touched: not the memory the pointers point into, not either heap's blocks.
    assert!(stack.0.iter().all(|&b| b == 7) && boxed.iter().all(|&b| b == 9));
    let n = foreign.len() as u64;
    assert_eq!(
        Counts::of(&heap),
        Counts {
            bad_parents: n,
            ..Counts::live([&root])
        }
    );
    assert_eq!(Counts::of(&other_heap), Counts::live([&other]));
    assert_eq!(root.free(), FreeOutcome::Freed);
    assert_eq!(other.free(), FreeOutcome::Freed);
}

#[test]
fn free_buffer_null() {
    let heap = Heap::new();
    let chain = Chain::new(&heap, 16, 1);
    let before = heap.stats();
    // SAFETY: NULL names no block, so no block can be used after the call.
    let outcome = unsafe { heap.free_buffer(std::ptr::null_mut()) };
    assert_eq!(outcome, FreeOutcome::Null);
    assert_eq!(heap.stats(), before, "free(NULL) counts nothing");
    assert_eq!(chain.free(), FreeOutcome::Freed);
}

#[test]
fn free_buffer_root_frees_the_whole_chain() {
    let heap = Heap::new();
    let keep = Chain::with_links(&heap, 200, [10, 20], 1);
    let chain = Chain::with_links(&heap, 100, [0, 16, 100, 5000, 70_000], 10);
    assert_eq!(Counts::of(&heap), Counts::live([&keep, &chain]));
    assert_eq!(chain.free(), FreeOutcome::Freed);
    // Only that chain went; the other one is intact (checked by its `free`).
    assert_eq!(Counts::of(&heap), Counts::live([&keep]));
    let bytes = heap.stats().live_bytes;
    assert!(
        bytes >= keep.requested_bytes(),
        "live_bytes {bytes} lost the kept chain"
    );
    assert_eq!(keep.free(), FreeOutcome::Freed);
    assert_eq!(Counts::of(&heap), Counts::default());
    assert_eq!(heap.stats().live_bytes, 0);
}

#[test]
fn free_buffer_linked_block() {
    let heap = Heap::new();
    let chain = Chain::with_links(&heap, 64, [64, 0, 3000], 1);
    for linked in chain.linked() {
        // SAFETY: `linked` is a linked block, which `free_buffer` never frees on its own, so
        // the chain stays usable.
        let outcome = unsafe { heap.free_buffer(linked.ptr()) };
        assert_eq!(outcome, FreeOutcome::LinkedBlock);
    }
    assert_eq!(
        Counts::of(&heap),
        Counts {
            linked_frees: 3,
            ..Counts::live([&chain])
        }
    );
    assert_eq!(chain.free(), FreeOutcome::Freed); // all four blocks still hold their patterns
    assert_eq!(
        Counts::of(&heap),
        Counts {
            linked_frees: 3,
            ..Counts::default()
        }
    );
}

#[test]
fn double_free_not_yet_reused() {
    let heap = Heap::new();
    let (neighbour, freed) = freed_root_with_neighbour(&heap, 96);
    for _ in 0..2 {
        // SAFETY: `freed` was freed and not handed out again (nothing was allocated since),
        // so the call frees nothing and no live block is touched.
        let outcome = unsafe { heap.free_buffer(freed) };
        assert_eq!(outcome, FreeOutcome::DoubleFree);
    }
    let live = Counts::live([&neighbour]);
    assert_eq!(
        Counts::of(&heap),
        Counts {
            double_frees: 2,
            ..live
        }
    );
    // Nothing was freed twice: the freed block (and its links) come back at most once.
    assert_no_block_handed_out_twice(&heap, 96, scaled(256, 16));
    assert_no_block_handed_out_twice(&heap, 24, scaled(256, 16));
    assert_no_block_handed_out_twice(&heap, 300, scaled(256, 16));
    assert_eq!(neighbour.free(), FreeOutcome::Freed);
    assert_eq!(
        Counts::of(&heap),
        Counts {
            double_frees: 2,
            ..Counts::default()
        }
    );
}

/// A root freed twice by its thread, where the first free emptied other pages and handed them
/// to the pool before returning. The root's page, though empty, is still the thread's current
/// page, which no other thread can carve for another class: so even after another thread has
/// taken every page the pool had, the second free is a double free and touches nothing.
/// (When the first free also gave back its empty current pages, the other thread got this
/// page, and the second free freed that thread's root sitting at the same address.)
#[test]
#[cfg_attr(
    miri,
    ignore = "another thread takes 40 pages of roots: too slow under Miri"
)]
fn double_free_after_a_free_that_gave_pages_back() {
    let heap = Heap::new();
    // The root alone on a page of the largest class; its 2,000 links of 300 bytes (blocks of
    // their own, past the carve limit) fill ten pages of theirs, nine of them emptied by the
    // free while another is current.
    let chain = Chain::with_links(&heap, 16 * 1024 - 16, std::iter::repeat_n(300, 2_000), 0);
    let p = chain.root().ptr();
    assert_eq!(chain.free(), FreeOutcome::Freed);
    let (roots, pages) = (40 * 819, 40);
    let taken: Vec<usize> = std::thread::scope(|s| {
        s.spawn(|| {
            // 819 roots of 64 bytes fill a 64 KiB page: this takes 40 pages, past the pool.
            (0..roots)
                .map(|_| heap.allocate_buffer(64).expect("memory").as_ptr() as usize)
                .collect()
        })
        .join()
        .expect("the allocating thread")
    });
    assert!(taken.len() >= pages);
    // SAFETY: `p` was freed, and this thread allocated nothing since: the call must free
    // nothing, whatever the other thread holds.
    let outcome = unsafe { heap.free_buffer(p) };
    assert_eq!(outcome, FreeOutcome::DoubleFree);
    for r in taken {
        // SAFETY: each is a live root of `heap`, freed once.
        let outcome = unsafe { heap.free_buffer(r as *mut u8) };
        assert_eq!(outcome, FreeOutcome::Freed);
    }
    assert_eq!(
        Counts::of(&heap),
        Counts {
            double_frees: 1,
            ..Counts::default()
        }
    );
}

/// The root freed twice was the only block of its page, which may have retired in between.
/// Either answer is misuse, counted once, with nothing freed twice; which counter depends on
/// whether the engine still recognises the page, which the SPEC leaves to it.
#[test]
fn double_free_of_a_page_s_only_block() {
    let heap = Heap::new();
    let chain = Chain::new(&heap, 512, 1);
    let p = chain.root().ptr();
    assert_eq!(chain.free(), FreeOutcome::Freed);
    heap.collect();
    // SAFETY: `p` was freed and nothing was allocated since, so it was not handed out again:
    // the call frees nothing and there is no live block to touch.
    let outcome = unsafe { heap.free_buffer(p) };
    let c = Counts::of(&heap);
    match outcome {
        FreeOutcome::DoubleFree => assert_eq!(
            c,
            Counts {
                double_frees: 1,
                ..Counts::default()
            }
        ),
        FreeOutcome::Foreign => assert_eq!(
            c,
            Counts {
                foreign_frees: 1,
                ..Counts::default()
            }
        ),
        other => panic!("second free of a freed root answered {other:?}"),
    }
    assert_no_block_handed_out_twice(&heap, 512, scaled(256, 16));
}

#[test]
fn free_buffer_pointer_not_from_this_allocator() {
    let heap = Heap::new();
    let other_heap = Heap::new();
    let root = Chain::with_links(&heap, INTERIOR_ROOT_LEN, [INTERIOR_ROOT_LEN], 1);
    let other = Chain::new(&other_heap, 64, 3);
    let mut stack = StackBuf([7; 64]);
    let mut boxed = vec![9u8; 64].into_boxed_slice();
    let mut foreign = foreign_pointers(
        root.root().ptr(),
        other.root().ptr(),
        &mut stack,
        &mut boxed,
    );
    // An interior pointer into a linked block is no block start either.
    foreign.push((
        "linked + 16".to_string(),
        root.linked()[0].ptr().wrapping_add(16),
    ));
    // Nor is a block boundary of the root's own page that the page has not carved yet (the
    // root, this heap's first, is near the start of its 64 KiB page of 80 B blocks): only
    // the carved count tells it from a block.
    foreign.push((
        "an uncarved block of the root's page".to_string(),
        root.root().ptr().wrapping_add(700 * 80),
    ));
    for (what, p) in &foreign {
        // SAFETY: `p` is no block start of `heap`, so the call frees nothing; what `p` points
        // to is not ours, and the SPEC has the engine recognise that before reading it.
        let outcome = unsafe { heap.free_buffer(*p) };
        assert_eq!(outcome, FreeOutcome::Foreign, "freeing {what}");
    }
    assert!(stack.0.iter().all(|&b| b == 7) && boxed.iter().all(|&b| b == 9));
    let n = foreign.len() as u64;
    assert_eq!(
        Counts::of(&heap),
        Counts {
            foreign_frees: n,
            ..Counts::live([&root])
        }
    );
    assert_eq!(Counts::of(&other_heap), Counts::live([&other]));
    assert_eq!(root.free(), FreeOutcome::Freed);
    assert_eq!(other.free(), FreeOutcome::Freed);
}

/// Not a table row but a SPEC decision: blocks past the largest size class get their own
/// span with the same header, so linking, freeing and every misuse answer work the same.
#[test]
fn large_blocks_link_and_free_like_any_other() {
    for len in [100 << 10, 1 << 20, scaled(20 << 20, 2 << 20)] {
        let heap = Heap::new(); // per size, so each size's counters start at zero
        let mut chain = Chain::with_links(&heap, len, [len, 16, 200_000], 1);
        let small_root = Chain::with_links(&heap, 32, [len], 10);
        let large_linked = chain.linked()[0].ptr();
        // SAFETY: a linked block, which `free_buffer` never frees on its own.
        let outcome = unsafe { heap.free_buffer(large_linked) };
        assert_eq!(outcome, FreeOutcome::LinkedBlock);
        assert_eq!(
            heap.allocate_more(8, large_linked),
            Err(Scode::MAPI_E_INVALID_PARAMETER)
        );
        for off in [16, 4096, 64 << 10] {
            // SAFETY: a pointer inside a live root, at no block start: the call frees nothing.
            let outcome = unsafe { heap.free_buffer(chain.root().ptr().wrapping_add(off)) };
            assert_eq!(
                outcome,
                FreeOutcome::Foreign,
                "root + {off} of a {len}-byte root"
            );
        }
        chain.link(len / 2, 20);
        let misuse = Counts {
            linked_frees: 1,
            foreign_frees: 3,
            bad_parents: 1,
            ..Counts::default()
        };
        let live = Counts::live([&chain, &small_root]);
        assert_eq!(
            Counts::of(&heap),
            Counts {
                live_roots: live.live_roots,
                live_blocks: live.live_blocks,
                ..misuse
            }
        );
        assert_eq!(small_root.free(), FreeOutcome::Freed);
        let p = chain.root().ptr();
        assert_eq!(chain.free(), FreeOutcome::Freed);
        assert_eq!(Counts::of(&heap), misuse);
        assert_eq!(heap.stats().live_bytes, 0);
        // A large span may go back to the OS as soon as it is freed, after which its address
        // is as foreign as any; either misuse answer is right, counted once, nothing freed.
        // SAFETY: `p` was freed and nothing was allocated since, so it was not handed out
        // again: the call frees nothing.
        let outcome = unsafe { heap.free_buffer(p) };
        let c = Counts::of(&heap);
        assert!(
            (outcome == FreeOutcome::DoubleFree && c.double_frees == 1 && c.foreign_frees == 3)
                || (outcome == FreeOutcome::Foreign && c.double_frees == 0 && c.foreign_frees == 4),
            "second free of a freed {len}-byte root: {outcome:?}, {c:?}"
        );
    }
}

/// Not a table row: the process-wide heap behind the C exports is one heap, and works.
#[test]
fn default_heap_is_one_process_wide_heap() {
    let heap = default_heap();
    assert!(std::ptr::eq(heap, default_heap()));
    let handle = std::thread::spawn(|| default_heap() as *const Heap as usize);
    let from_thread = handle.join().expect("thread panicked");
    assert_eq!(
        from_thread, heap as *const Heap as usize,
        "one heap for every thread"
    );
    // Other tests in this binary never touch the default heap, but other code in the process
    // might, so only this chain's own effects are asserted.
    let chain = Chain::with_links(heap, 40, [8, 80], 1); // aligned, filled
    assert_eq!(chain.free(), FreeOutcome::Freed);
}
