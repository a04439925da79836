//! The RAII wrapper [`Root`]: dropping it frees the chain, its memory comes zeroed, its
//! linked memory is usable until the drop, it may be dropped on another thread, and threads
//! may link to it at once.

use crate::support::{fill_pattern, scaled, verify_pattern, Counts};
use mapialloc::{Heap, Root, Scode};
use std::thread;

/// A `Root` carries its chain to whichever thread ends up freeing it (SPEC: transport
/// providers allocate on one thread and free on another), and threads may share one to link
/// to it at once (SPEC: MAPI is free-threaded).
const _: () = {
    const fn send_sync<T: Send + Sync>() {}
    send_sync::<Root<'static>>();
};

/// Leaves blocks of these sizes freed but dirty (full of 0xAA) in `heap`, so that a later
/// allocation of the same sizes is likely to get that memory back and would show garbage if
/// it were not zeroed.
fn dirty(heap: &Heap, sizes: &[usize]) {
    let mut root = Root::new(heap, sizes[0]).expect("root");
    root.as_mut_slice().fill(0xAA);
    for &len in &sizes[1..] {
        root.alloc_more(len).expect("linked").fill(0xAA);
    }
}

#[test]
fn drop_frees_the_chain() {
    let heap = Heap::new();
    {
        let root = Root::new(&heap, 100).expect("root");
        for len in [0, 1, 50, 5000, 200_000] {
            root.alloc_more(len).expect("linked");
        }
        assert_eq!(
            Counts::of(&heap),
            Counts {
                live_roots: 1,
                live_blocks: 6,
                ..Counts::default()
            }
        );
    }
    assert_eq!(Counts::of(&heap), Counts::default());
    assert_eq!(heap.stats().live_bytes, 0);
}

#[test]
fn memory_is_zeroed() {
    let heap = Heap::new();
    let sizes = [48, 48, 100, 3000, 100_000];
    dirty(&heap, &sizes);
    let mut root = Root::new(&heap, sizes[0]).expect("root");
    assert!(
        root.as_mut_slice().iter().all(|&b| b == 0),
        "root not zeroed"
    );
    for &len in &sizes[1..] {
        let linked = root.alloc_more(len).expect("linked");
        assert_eq!(linked.len(), len);
        assert!(
            linked.iter().all(|&b| b == 0),
            "linked block of {len} not zeroed"
        );
    }
}

#[test]
fn linked_memory_is_usable_until_the_root_drops() {
    let heap = Heap::new();
    let mut root = Root::new(&heap, 64).expect("root");
    assert_eq!(root.len(), 64);
    assert!(!root.is_empty());
    fill_pattern(root.as_mut_slice(), 0);
    // Every linked slice is written while the others are held, then all are checked: they
    // are distinct memory, and distinct from the root.
    let mut linked: Vec<&mut [u8]> = (1..=50)
        .map(|i| root.alloc_more(i * 7).expect("linked"))
        .collect();
    for (i, slice) in linked.iter_mut().enumerate() {
        assert_eq!(slice.as_ptr() as usize % 16, 0);
        fill_pattern(slice, 1 + i as u64);
    }
    for (i, slice) in linked.iter().enumerate() {
        verify_pattern(slice, 1 + i as u64);
    }
    verify_pattern(root.as_mut_slice(), 0);
    assert_eq!(heap.stats().live_blocks, 51);
}

#[test]
fn size_zero_root() {
    let heap = Heap::new();
    let mut a = Root::new(&heap, 0).expect("root");
    let b = Root::new(&heap, 0).expect("root");
    assert!(a.is_empty() && a.as_mut_slice().is_empty());
    assert_eq!(a.len(), 0);
    assert!(!a.as_ptr().is_null() && a.as_ptr() as usize % 16 == 0);
    assert_ne!(a.as_ptr(), b.as_ptr());
    assert!(a.alloc_more(0).expect("linked").is_empty());
    drop((a, b));
    assert_eq!(Counts::of(&heap), Counts::default());
}

#[test]
fn errors_are_scodes_and_leave_the_root_usable() {
    let heap = Heap::new();
    assert_eq!(
        Root::new(&heap, usize::MAX).err(),
        Some(Scode::MAPI_E_NOT_ENOUGH_MEMORY)
    );
    let root = Root::new(&heap, 16).expect("root");
    assert_eq!(
        root.alloc_more(u32::MAX as usize).err(),
        Some(Scode::MAPI_E_NOT_ENOUGH_MEMORY)
    );
    assert_eq!(root.alloc_more(32).expect("linked").len(), 32);
    assert_eq!(
        Counts::of(&heap),
        Counts {
            live_roots: 1,
            live_blocks: 2,
            ..Counts::default()
        }
    );
    drop(root);
    assert_eq!(Counts::of(&heap), Counts::default());
}

#[test]
fn dropped_on_another_thread() {
    let heap = Heap::new();
    let mut root = Root::new(&heap, 256).expect("root");
    fill_pattern(root.as_mut_slice(), 7);
    for len in [16, 64, 1024] {
        fill_pattern(root.alloc_more(len).expect("linked"), len as u64);
    }
    thread::scope(|s| {
        s.spawn(move || {
            verify_pattern(root.as_mut_slice(), 7);
            drop(root);
        });
    });
    assert_eq!(Counts::of(&heap), Counts::default());
    assert_eq!(heap.stats().live_bytes, 0);
}

#[test]
fn threads_link_to_a_shared_root_at_once() {
    let heap = Heap::new();
    let per_thread = scaled(500, 10);
    let root = Root::new(&heap, 32).expect("root");
    // Each thread keeps its slices (borrowing the shared root) until all are written, then
    // checks none was overwritten by another thread's.
    thread::scope(|s| {
        for t in 0..4u64 {
            let root = &root;
            s.spawn(move || {
                let mut mine: Vec<&mut [u8]> = (0..per_thread)
                    .map(|i| root.alloc_more(i % 200).expect("linked"))
                    .collect();
                for (i, slice) in mine.iter_mut().enumerate() {
                    fill_pattern(slice, (t << 32) + i as u64);
                }
                for (i, slice) in mine.iter().enumerate() {
                    verify_pattern(slice, (t << 32) + i as u64);
                }
            });
        }
    });
    assert_eq!(heap.stats().live_blocks, 1 + 4 * per_thread as u64);
    drop(root);
    assert_eq!(Counts::of(&heap), Counts::default());
}
