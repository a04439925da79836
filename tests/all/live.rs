//! `Heap::live_roots`: the leak report's view of a heap.

use mapialloc::Heap;
use std::sync::atomic::{AtomicBool, Ordering};

fn free(heap: &Heap, ptr: *mut u8) {
    // SAFETY: the tests free only their own roots, once, and never use them afterwards.
    unsafe { heap.free_buffer(ptr) };
}

#[test]
fn lists_every_live_root_with_its_chain_largest_first() {
    let heap = Heap::new();
    let small = heap.allocate_buffer(40).unwrap();
    let big = heap.allocate_buffer(100_000).unwrap();
    let chained = heap.allocate_buffer(320).unwrap();
    for size in [24, 86, 50_000] {
        heap.allocate_more(size, chained.as_ptr()).unwrap();
    }
    let gone = heap.allocate_buffer(64).unwrap();
    free(&heap, gone.as_ptr());

    let live: Vec<_> = heap.live_roots().collect();
    assert_eq!(live.len(), 3, "{live:?}");
    let find = |p: std::ptr::NonNull<u8>| live.iter().find(|r| r.ptr == p).copied().unwrap();
    assert_eq!(find(small).linked_blocks, 0);
    assert!(find(small).size >= 40);
    assert!(find(big).size >= 100_000);
    assert_eq!(find(chained).linked_blocks, 3);
    assert!(find(chained).chain_bytes >= 320 + 24 + 86 + 50_000);
    assert!(
        live.windows(2)
            .all(|w| w[0].chain_bytes >= w[1].chain_bytes),
        "largest first"
    );

    for root in [small, big, chained] {
        free(&heap, root.as_ptr());
    }
    assert_eq!(heap.live_roots().count(), 0);
}

#[test]
fn enumerating_while_other_threads_allocate_and_free_is_safe() {
    let heap = Heap::new();
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| {
                let mut i = 0usize;
                while !stop.load(Ordering::Relaxed) {
                    let root = heap.allocate_buffer(i % 3000).unwrap();
                    for j in 0..(i % 7) {
                        heap.allocate_more(16 + j * 40, root.as_ptr()).unwrap();
                    }
                    free(&heap, root.as_ptr());
                    i += 1;
                }
            });
        }
        for _ in 0..200 {
            // Every root a snapshot sees is at most the two in flight, each with < 7 links.
            for root in heap.live_roots() {
                assert!(root.linked_blocks < 7, "{root:?}");
            }
        }
        stop.store(true, Ordering::Relaxed);
    });
    assert_eq!(heap.live_roots().count(), 0);
}
