//! loom models of the engine's protocols, run on the real engine code (built with `--cfg loom`,
//! which shrinks it to 2 size classes, pages of at most 4 blocks and 2 pages a segment, and
//! makes its OS "mappings" loom-tracked allocations so lost blocks show up as leaks).
//!
//! Run them with `loom-tests/run.sh`. Requests past the second class (80 user bytes here) get a
//! large span each: a model uses them where it wants loom's leak check on single blocks.
//! Links of at most 16 bytes are carved from chunks (one chunk holds three).
#![cfg(loom)]

use loom::thread;
use mapialloc::testing::PageStackModel;
use mapialloc::{FreeOutcome, Heap, Scode};
use std::sync::Arc;

/// A request served by the small classes.
const SMALL: usize = 8;
/// A request served by a large span of its own (tracked by loom's leak check).
const LARGE: usize = 100;

fn free(heap: &Heap, ptr: usize) -> FreeOutcome {
    // SAFETY: models only free pointers they got from `heap` (or deliberately bad ones, which
    // the engine must answer without touching memory), and never use freed memory.
    unsafe { heap.free_buffer(ptr as *mut u8) }
}

fn root(heap: &Heap, size: usize) -> usize {
    heap.allocate_buffer(size)
        .expect("allocate_buffer")
        .as_ptr() as usize
}

fn link(heap: &Heap, size: usize, parent: usize) -> Result<usize, Scode> {
    heap.allocate_more(size, parent as *mut u8)
        .map(|p| p.as_ptr() as usize)
}

/// Runs a model with room for the epoch's own atomics (crossbeam-epoch runs under loom too).
fn model(f: impl Fn() + Sync + Send + 'static) {
    let mut builder = loom::model::Builder::new();
    builder.max_branches = 20_000;
    builder.check(f);
}

/// Ends a model: the heap must hold no live block, and everything is handed back (leaks of
/// large spans are then loom's to report).
fn finish(heap: Arc<Heap>) {
    let stats = heap.stats();
    assert_eq!(stats.live_blocks, 0, "live blocks at the end: {stats:?}");
    assert_eq!(stats.live_roots, 0, "live roots at the end: {stats:?}");
    heap.collect();
    heap.release_thread_cache();
    assert_eq!(
        mapialloc::testing::live_chunks(&heap),
        0,
        "a chunk was lost or given back twice"
    );
    assert_eq!(
        mapialloc::testing::pages_with_blocks_out(&heap),
        0,
        "a page miscounted its blocks"
    );
    drop(Arc::try_unwrap(heap).expect("every thread is done with the heap"));
}

/// Ends a model whose remote frees raced the owner's allocations: the roots still live (kept
/// ones and those allocated meanwhile) must be distinct blocks; each is freed once.
fn free_distinct_and_finish(heap: Arc<Heap>, live: impl IntoIterator<Item = usize>) {
    let mut live: Vec<usize> = live.into_iter().collect();
    let allocated = live.len();
    live.sort();
    live.dedup();
    assert_eq!(live.len(), allocated, "a block was handed out twice");
    for r in live {
        assert_eq!(free(&heap, r), FreeOutcome::Freed);
    }
    finish(heap);
}

/// Model 1: two threads free the same root: exactly one frees it; every block returns once.
#[test]
fn two_threads_free_the_same_root() {
    model(|| {
        let heap = Arc::new(Heap::new());
        let r = root(&heap, SMALL);
        link(&heap, LARGE, r).unwrap();
        let other = {
            let heap = heap.clone();
            thread::spawn(move || {
                let outcome = free(&heap, r);
                heap.release_thread_cache();
                outcome
            })
        };
        let mine = free(&heap, r);
        let theirs = other.join().unwrap();
        let mut outcomes = [mine, theirs];
        outcomes.sort_by_key(|o| *o as u8);
        assert_eq!(outcomes, [FreeOutcome::Freed, FreeOutcome::DoubleFree]);
        assert_eq!(heap.stats().double_frees, 1);
        finish(heap);
    });
}

/// Model 2: MAPIAllocateMore races MAPIFreeBuffer on one root: the new block is freed with
/// the chain or returned by the failing call; never leaked (loom's leak check on its span),
/// never freed twice.
#[test]
fn link_races_free() {
    model(|| {
        let heap = Arc::new(Heap::new());
        let r = root(&heap, SMALL);
        let linker = {
            let heap = heap.clone();
            thread::spawn(move || {
                let result = link(&heap, LARGE, r);
                heap.release_thread_cache();
                result
            })
        };
        assert_eq!(free(&heap, r), FreeOutcome::Freed);
        match linker.join().unwrap() {
            Ok(_) => assert_eq!(heap.stats().bad_parents, 0),
            Err(e) => {
                assert_eq!(e, Scode::MAPI_E_INVALID_PARAMETER);
                assert_eq!(heap.stats().bad_parents, 1);
            }
        }
        finish(heap);
    });
}

/// Model 3: two threads link to one root, then one frees: all blocks freed exactly once.
#[test]
fn two_links_then_free() {
    model(|| {
        let heap = Arc::new(Heap::new());
        let r = root(&heap, SMALL);
        let linkers: Vec<_> = (0..2)
            .map(|_| {
                let heap = heap.clone();
                thread::spawn(move || {
                    let block = link(&heap, LARGE, r).unwrap();
                    heap.release_thread_cache();
                    block
                })
            })
            .collect();
        let blocks: Vec<usize> = linkers.into_iter().map(|t| t.join().unwrap()).collect();
        assert_ne!(blocks[0], blocks[1]);
        assert_eq!(heap.stats().live_blocks, 3);
        assert_eq!(free(&heap, r), FreeOutcome::Freed);
        finish(heap);
    });
}

/// Model 4: remote frees land on a page while its owner allocates and drains `thread_free`:
/// no block lost or handed out twice.
#[test]
fn remote_frees_while_owner_allocates() {
    model(|| {
        let heap = Arc::new(Heap::new());
        // Three of the page's four blocks.
        let first: Vec<usize> = (0..3).map(|_| root(&heap, SMALL)).collect();
        let remote = {
            let heap = heap.clone();
            let gone = first[..2].to_vec();
            thread::spawn(move || {
                for r in gone {
                    assert_eq!(free(&heap, r), FreeOutcome::Freed);
                }
                heap.release_thread_cache();
            })
        };
        // The fourth block, then a refill that may drain the remote frees.
        let more: Vec<usize> = (0..2).map(|_| root(&heap, SMALL)).collect();
        remote.join().unwrap();
        free_distinct_and_finish(heap, [first[2]].into_iter().chain(more));
    });
}

/// Model 5: a page empties and is retired through the epoch while a racing free still reads a
/// header in it.
#[test]
fn page_retired_while_a_racing_free_reads_it() {
    model(|| {
        let heap = Arc::new(Heap::new());
        // Fill a page (4 blocks) so the next root opens a second one and the first page is no
        // longer current: emptying it retires it.
        let page: Vec<usize> = (0..4).map(|_| root(&heap, SMALL)).collect();
        let keep = root(&heap, SMALL);
        let racer = {
            let heap = heap.clone();
            let stale = page[0];
            thread::spawn(move || {
                let outcome = free(&heap, stale);
                heap.release_thread_cache();
                outcome
            })
        };
        let mine: Vec<FreeOutcome> = page.iter().map(|&r| free(&heap, r)).collect();
        heap.collect(); // lets the retired page reach the pool
        let theirs = racer.join().unwrap();
        let freed = mine
            .iter()
            .chain([&theirs])
            .filter(|o| **o == FreeOutcome::Freed)
            .count();
        assert_eq!(freed, 4, "page[0] freed exactly once: {mine:?} {theirs:?}");
        assert_eq!(free(&heap, keep), FreeOutcome::Freed);
        finish(heap);
    });
}

/// Model 6: a thread exits (abandoning its page with a live block) while a remote free lands
/// on that page; another thread adopts the page.
#[test]
fn abandoned_page_gets_a_remote_free_and_is_adopted() {
    model(|| {
        let heap = Arc::new(Heap::new());
        let (a, b) = {
            let heap = heap.clone();
            thread::spawn(move || {
                let roots = (root(&heap, SMALL), root(&heap, SMALL));
                heap.release_thread_cache(); // thread exit: the page is abandoned
                roots
            })
            .join()
            .unwrap()
        };
        let remote = {
            let heap = heap.clone();
            thread::spawn(move || {
                assert_eq!(free(&heap, a), FreeOutcome::Freed);
                heap.release_thread_cache();
            })
        };
        heap.collect(); // adopts abandoned pages
        let c = root(&heap, SMALL);
        remote.join().unwrap();
        assert_ne!(c, b, "a live block was handed out again");
        assert_eq!(free(&heap, b), FreeOutcome::Freed);
        assert_eq!(free(&heap, c), FreeOutcome::Freed);
        finish(heap);
    });
}

/// Model 7: a large span goes back to the OS while a stale pointer to it is being validated
/// (and a foreign pointer is checked at the same time).
#[test]
fn span_released_while_a_stale_pointer_is_validated() {
    model(|| {
        let heap = Arc::new(Heap::new());
        let big = root(&heap, LARGE);
        let stale = {
            let heap = heap.clone();
            thread::spawn(move || {
                let local = 0u64;
                assert_eq!(
                    free(&heap, &local as *const u64 as usize),
                    FreeOutcome::Foreign
                );
                let linked = link(&heap, SMALL, big);
                let outcome = free(&heap, big);
                heap.release_thread_cache();
                (linked, outcome)
            })
        };
        let mine = free(&heap, big);
        heap.collect(); // runs the deferred unmapping when the epoch allows
        let (linked, theirs) = stale.join().unwrap();
        assert!(linked.is_ok() || linked == Err(Scode::MAPI_E_INVALID_PARAMETER));
        let freed = [mine, theirs]
            .iter()
            .filter(|o| **o == FreeOutcome::Freed)
            .count();
        assert_eq!(freed, 1, "{mine:?} {theirs:?}");
        finish(heap);
    });
}

/// Model 8: a thread carves linked blocks from its chunk of a root while another thread frees
/// that root: each carve either lands in the chunk before the free passes it (and is freed
/// with the chain) or fails; the chunk goes back exactly once, by the freer or the carver.
#[test]
fn carving_races_the_free_of_its_root() {
    model(|| {
        let heap = Arc::new(Heap::new());
        let r = root(&heap, SMALL);
        let carver = {
            let heap = heap.clone();
            thread::spawn(move || {
                let results = [link(&heap, SMALL, r), link(&heap, SMALL, r)];
                heap.release_thread_cache(); // lets go of the chunk
                results
            })
        };
        assert_eq!(free(&heap, r), FreeOutcome::Freed);
        let results = carver.join().unwrap();
        if let [Ok(a), Ok(b)] = results {
            assert_ne!(a, b, "one block carved twice");
        }
        let failed = results.iter().filter(|r| r.is_err()).count() as u64;
        assert_eq!(heap.stats().bad_parents, failed);
        finish(heap);
    });
}

/// Model 9: a root is freed while its carver still holds a chunk of it, and the same address
/// comes back as a new root that the carver links to: the carver must see that its chunk's
/// root was freed (not carve into the old chain) and give the old chunk back.
#[test]
fn carver_links_to_a_reused_root_address() {
    model(|| {
        let heap = Arc::new(Heap::new());
        let r = root(&heap, SMALL);
        let (to_carver, carver_inbox) = loom::sync::mpsc::channel();
        let (to_main, main_inbox) = loom::sync::mpsc::channel();
        let carver = {
            let heap = heap.clone();
            thread::spawn(move || {
                link(&heap, SMALL, r).unwrap();
                to_main.send(()).unwrap();
                let again: usize = carver_inbox.recv().unwrap();
                let block = link(&heap, SMALL, again).unwrap();
                heap.release_thread_cache();
                block
            })
        };
        main_inbox.recv().unwrap();
        assert_eq!(free(&heap, r), FreeOutcome::Freed);
        // Allocate until the page hands out `r`'s address again (it has at most 4 blocks).
        let mut others = Vec::new();
        let again = loop {
            let a = root(&heap, SMALL);
            if a == r {
                break a;
            }
            others.push(a);
            assert!(others.len() < 4, "the address never came back");
        };
        to_carver.send(again).unwrap();
        carver.join().unwrap();
        assert_eq!(heap.stats().live_blocks, 2 + others.len() as u64);
        assert_eq!(free(&heap, again), FreeOutcome::Freed);
        for a in others {
            assert_eq!(free(&heap, a), FreeOutcome::Freed);
        }
        finish(heap);
    });
}

/// Model 10: two threads free roots of one page at once while its owner allocates: their
/// pushes race on the page's `thread_free` (which packs the list's length with its head) and
/// the owner's drain, and the page's count of blocks out must stay exact.
#[test]
fn two_threads_free_remotely_to_one_page() {
    model(|| {
        let heap = Arc::new(Heap::new());
        // Three of the page's four blocks; each remote thread frees one.
        let roots: Vec<usize> = (0..3).map(|_| root(&heap, SMALL)).collect();
        let remotes: Vec<_> = roots[..2]
            .iter()
            .map(|&r| {
                let heap = heap.clone();
                thread::spawn(move || {
                    assert_eq!(free(&heap, r), FreeOutcome::Freed);
                    heap.release_thread_cache();
                })
            })
            .collect();
        // The fourth block, then a refill that may drain either remote free or both.
        let more: Vec<usize> = (0..2).map(|_| root(&heap, SMALL)).collect();
        for remote in remotes {
            remote.join().unwrap();
        }
        free_distinct_and_finish(heap, [roots[2]].into_iter().chain(more));
    });
}

/// Model 11: the page stacks' ABA tag (the pool and the abandoned pages are such stacks).
/// Pages 0 and 1 are stacked, 0 on top. One thread pops; meanwhile another pops both and
/// pushes page 0 back, so the first may find page 0 on top again with nothing below it. Each
/// page must end up held once: never popped twice, never lost.
#[test]
fn page_stack_pop_races_pop_pop_push() {
    model(|| {
        let stack = Arc::new(PageStackModel::new(2));
        stack.push(1);
        stack.push(0);
        let racer = {
            let stack = stack.clone();
            thread::spawn(move || stack.pop())
        };
        let first = stack.pop();
        let second = stack.pop();
        if let Some(page) = first {
            stack.push(page);
        }
        let theirs = racer.join().unwrap();
        let mut held: Vec<usize> = theirs.into_iter().chain(second).collect();
        while let Some(page) = stack.pop() {
            held.push(page);
        }
        held.sort();
        assert_eq!(held, [0, 1], "every page held exactly once");
    });
}

// Not modelled: a link or free racing the re-initialisation of its page for another class.
// Under loom every header is a loom object, and a page re-carved for another class creates
// new objects where the racing call may still read, which loom reports as a causality
// violation of the model itself rather than of the protocol. The race is pinned instead by
// `tests/all/threads.rs::link_racing_free_and_page_recycling_never_corrupts_or_leaks`, which
// recycles the page into a class whose blocks do not start where the parent did.
