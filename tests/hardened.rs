//! The `hardened` feature: quarantine, the header check at free, zero-on-free, and
//! abort-on-misuse. Run with `cargo test --features hardened --test hardened`.
#![cfg(feature = "hardened")]

use mapialloc::{FreeOutcome, Heap};
use std::collections::HashSet;

fn free(heap: &Heap, ptr: *mut u8) -> FreeOutcome {
    // SAFETY: the tests free only their own roots and never use freed memory except where a
    // test reads a quarantined block on purpose (still mapped, not handed out).
    unsafe { heap.free_buffer(ptr) }
}

#[test]
fn freed_blocks_stay_out_of_use_until_an_epoch_has_passed() {
    let heap = Heap::hardened(true);
    let freed: HashSet<usize> = (0..32)
        .map(|_| heap.allocate_buffer(64).unwrap().as_ptr() as usize)
        .collect();
    for &p in &freed {
        assert_eq!(free(&heap, p as *mut u8), FreeOutcome::Freed);
    }
    // Without hardening the next allocations would pop exactly these blocks again.
    for _ in 0..32 {
        let p = heap.allocate_buffer(64).unwrap().as_ptr() as usize;
        assert!(
            !freed.contains(&p),
            "a quarantined block was handed out again"
        );
    }
}

#[test]
fn freed_blocks_are_zeroed() {
    let heap = Heap::hardened(true);
    let p = heap.allocate_buffer(200).unwrap().as_ptr();
    // SAFETY: the block is ours and 200 bytes long.
    unsafe { p.write_bytes(0xA5, 200) };
    let _keep = heap.allocate_buffer(200).unwrap(); // keeps the page in use
    assert_eq!(free(&heap, p), FreeOutcome::Freed);
    // SAFETY: the block is quarantined: still mapped, not handed out, not yet linked into a
    // free list; reading it is what an attacker scanning freed memory would do.
    let bytes = unsafe { std::slice::from_raw_parts(p, 200) };
    assert!(bytes.iter().all(|&b| b == 0), "secrets survived the free");
}

#[test]
fn a_write_past_a_block_end_is_detected_and_its_page_retired_from_use() {
    let heap = Heap::hardened(true);
    let a = heap.allocate_buffer(48).unwrap().as_ptr();
    let b = heap.allocate_buffer(48).unwrap().as_ptr();
    // Blocks of one class are carved in address order: b's header follows a's 48 bytes.
    assert_eq!(b as usize - a as usize, 64);
    // SAFETY: deliberately writes 16 bytes past `a`'s end, over `b`'s header, as a buggy
    // provider would; both blocks are ours.
    unsafe { a.write_bytes(0x41, 64) };
    assert_eq!(free(&heap, a), FreeOutcome::Freed);
    assert_eq!(heap.stats().corruptions, 1);
    // The damaged page hands out nothing more: new blocks of the class come from elsewhere.
    let page = a as usize & !0xffff;
    for _ in 0..2000 {
        let p = heap.allocate_buffer(48).unwrap().as_ptr() as usize;
        assert_ne!(
            p & !0xffff,
            page,
            "a block of the damaged page was handed out"
        );
    }
}

#[test]
fn racing_double_frees_have_one_winner_under_reuse_pressure() {
    let heap = Heap::hardened(true);
    for _ in 0..200 {
        let roots: Vec<usize> = (0..64)
            .map(|_| heap.allocate_buffer(32).unwrap().as_ptr() as usize)
            .collect();
        let freed = std::sync::atomic::AtomicUsize::new(0);
        let barrier = std::sync::Barrier::new(2);
        std::thread::scope(|s| {
            for _ in 0..2 {
                s.spawn(|| {
                    barrier.wait();
                    for &r in &roots {
                        if free(&heap, r as *mut u8) == FreeOutcome::Freed {
                            freed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                        // Reuse pressure: allocate and free at once, right behind the race.
                        let p = heap.allocate_buffer(32).unwrap().as_ptr();
                        free(&heap, p);
                    }
                });
            }
        });
        assert_eq!(freed.into_inner(), roots.len());
    }
    assert_eq!(heap.stats().live_blocks, 0);
}

/// Runs in a child process: with MAPIALLOC_ABORT_ON_MISUSE=1 the first double free aborts.
#[test]
fn abort_on_misuse_stops_at_the_first_double_free() {
    if std::env::var_os("MAPIALLOC_ABORT_CHILD").is_some() {
        let heap = Heap::hardened(true);
        let p = heap.allocate_buffer(16).unwrap().as_ptr();
        free(&heap, p);
        free(&heap, p); // aborts here
        std::process::exit(0);
    }
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "abort_on_misuse_stops_at_the_first_double_free",
            "--nocapture",
        ])
        .env("MAPIALLOC_ABORT_CHILD", "1")
        .env("MAPIALLOC_ABORT_ON_MISUSE", "1")
        .output()
        .unwrap();
    assert!(!out.status.success(), "the child did not abort");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("mapialloc: misuse"), "{stderr}");
}
