//! MAPI is free-threaded (SPEC): any thread may allocate, link to or free any root, and the
//! calls may race on one root. These tests run the cross-thread paths: frees on a thread that
//! does not own the pages, many threads linking to one root, frees racing each other or a
//! link (small and large roots, and with the parent's page recycled mid-link), threads that
//! come and go, and pages changing owner while remote frees land on them.

use crate::support::{
    assert_disjoint, free_all, link_block, scaled, varied_size, Block, Chain, Counts,
};
use mapialloc::{FreeOutcome, Heap, Root, Scode};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Barrier};
use std::thread;

/// A chain of varied shape for bulk tests: root size and link count cycle with `i`, so that
/// some roots are alone (half of real roots are) and some carry a few links.
fn varied_chain(heap: &Heap, i: usize, tag: u64) -> Chain<'_> {
    let links = (0..i % 4).map(|k| varied_size(i + k + 1));
    Chain::with_links(heap, varied_size(i), links, tag)
}

/// Tags leave room for the links of [`varied_chain`] (at most 3) between chains.
fn tag_of(thread: usize, i: usize) -> u64 {
    ((thread as u64) << 32) + 4 * i as u64
}

#[test]
fn chains_built_on_one_thread_freed_on_another() {
    let heap = Heap::new();
    let n = scaled(2_000, 20);
    let (tx, rx) = mpsc::channel::<Chain<'_>>();
    let done = Barrier::new(2);
    let blocks = thread::scope(|s| {
        // The producer stays alive until the consumer is done, so its pages have a live
        // owner and every free below goes through their thread-free lists.
        s.spawn(|| {
            for i in 0..n {
                tx.send(varied_chain(&heap, i, tag_of(0, i)))
                    .expect("consumer alive");
            }
            drop(tx);
            done.wait();
        });
        let consumer = s.spawn(|| {
            let mut blocks = 0;
            for chain in rx {
                blocks += chain.block_count();
                assert_eq!(chain.free(), FreeOutcome::Freed); // verifies contents first
            }
            done.wait();
            blocks
        });
        consumer.join().expect("consumer panicked")
    });
    assert_eq!(Counts::of(&heap), Counts::default());
    let remote = heap.stats().remote_frees;
    assert!(
        (n as u64..=blocks).contains(&remote),
        "remote_frees {remote}: every root ({n}) was freed remotely, {blocks} blocks in all"
    );
}

#[test]
fn four_threads_link_to_one_root() {
    let heap = Heap::new();
    let mut chain = Chain::new(&heap, 128, 0);
    let per_thread = scaled(2_000, 20);
    let start = Barrier::new(4);
    let root = chain.root().ptr() as usize; // raw pointers are not Send; the address is
    let linked: Vec<Vec<Block>> = thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|t| {
                let (heap, start) = (&heap, &start);
                s.spawn(move || {
                    start.wait();
                    let link = |i| {
                        // SAFETY: the block is returned to the main thread, which adopts it
                        // into the root's chain before freeing it.
                        unsafe { link_block(heap, root as *mut u8, i % 300, tag_of(t + 1, i)) }
                    };
                    (0..per_thread).map(link).collect()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("linker panicked"))
            .collect()
    });
    chain.adopt(linked.into_iter().flatten());
    assert_disjoint(chain.blocks());
    assert_eq!(Counts::of(&heap), Counts::live([&chain]));
    assert_eq!(chain.block_count(), 1 + 4 * per_thread as u64);
    assert_eq!(chain.free(), FreeOutcome::Freed); // every block intact, all freed at once
    assert_eq!(Counts::of(&heap), Counts::default());
}

/// Links `len`-byte blocks to `root` until the heap refuses, which it must with
/// MAPI_E_INVALID_PARAMETER once another thread has freed the root.
fn link_until_refused(heap: &Heap, root: *mut u8, len: usize) {
    let mut linked = 0u64;
    let err = loop {
        match heap.allocate_more(len, root) {
            Ok(_) if linked % 256 == 255 => thread::yield_now(),
            Ok(_) => {}
            Err(e) => break e,
        }
        linked += 1;
    };
    assert_eq!(err, Scode::MAPI_E_INVALID_PARAMETER, "after {linked} links");
}

/// Races one thread linking 32-byte blocks to each root of `chains` (until refused) against
/// another freeing it, root by root, then checks that nothing leaked: each link either landed
/// before the free closed the chain (and was freed with it) or was refused and gave its block
/// back, so afterwards the heap holds no block at all.
///
/// The roots must not be of the 32-byte class, and nothing else allocates roots during the
/// race, so the linker never meets a root's address handed out again (which would make its
/// link legitimately succeed).
fn race_links_against_frees(heap: &Heap, chains: Vec<Chain<'_>>) {
    let rounds = chains.len() as u64;
    let barrier = Barrier::new(2);
    let roots: Vec<usize> = chains.iter().map(|c| c.root().ptr() as usize).collect();
    thread::scope(|s| {
        s.spawn(|| {
            for chain in chains {
                barrier.wait();
                // No `Chain::free`: the racing links are not in the `Chain`, so it cannot
                // verify them; the chain's own blocks are what this thread can check.
                chain.verify();
                let root = chain.root().ptr();
                std::mem::forget(chain);
                // SAFETY: `root` is a live root of `heap` that only this thread frees; the
                // linker only links to it (a racing link is the case under test).
                assert_eq!(unsafe { heap.free_buffer(root) }, FreeOutcome::Freed);
            }
        });
        s.spawn(|| {
            for &root in &roots {
                barrier.wait();
                link_until_refused(heap, root as *mut u8, 32);
            }
        });
    });
    // Each linker loop ended on exactly one refused link.
    let c = Counts::of(heap);
    assert_eq!(
        c,
        Counts {
            bad_parents: c.bad_parents,
            ..Counts::default()
        },
        "blocks leaked"
    );
    assert_eq!(c.bad_parents, rounds);
    assert_eq!(heap.stats().live_bytes, 0);
}

/// SPEC row "`lpObject` freed while this call runs", small roots.
#[test]
fn link_racing_the_free_of_its_parent_never_leaks() {
    let heap = Heap::new();
    let rounds = scaled(200, 4);
    let chains = (0..rounds)
        .map(|i| Chain::new(&heap, 256, i as u64))
        .collect();
    race_links_against_frees(&heap, chains);
}

/// The same with large roots (own spans, unmapped once freed) that already carry links.
#[test]
fn link_racing_the_free_of_a_large_parent_never_leaks() {
    let heap = Heap::new();
    let rounds = scaled(50, 2);
    let chains = (0..rounds)
        .map(|i| Chain::with_links(&heap, 100 << 10, [64, 200_000], tag_of(0, i)))
        .collect();
    race_links_against_frees(&heap, chains);
}

/// The same SPEC row, with the parent's page recycled while the link is in flight: the root is
/// freed, its page empties and retires, `collect()` lets the epoch run the retirement, and
/// the page is carved again for another size class and handed out. DESIGN: "a racing free or
/// link that still reads a header never touches memory that has been recycled". So a link
/// that read the root's header before the free may neither write into the recycled memory
/// (another block's contents) nor leak its block.
///
/// Each round: two roots of 1000 bytes (the racer is the second, so its address is no block
/// start of the 8000-byte class its page is recycled into: no call starts on a reused
/// address); the linker links to the racer until refused, while this thread frees both
/// roots, collects twice and allocates zeroed 8000-byte [`Root`]s, which take the pooled page.
#[test]
fn link_racing_free_and_page_recycling_never_corrupts_or_leaks() {
    let heap = Heap::new();
    let rounds = scaled(100, 4);
    // The racer's address, handed over; 0 once the linker has taken it and started linking.
    let racer = AtomicUsize::new(0);
    let round_done = Barrier::new(2);
    let mut clobbered = 0;
    thread::scope(|s| {
        s.spawn(|| {
            for _ in 0..rounds {
                // Spin, not a Barrier: the linker must already be linking when the free lands.
                let root = loop {
                    match racer.swap(0, Ordering::Acquire) {
                        0 => std::hint::spin_loop(),
                        root => break root as *mut u8,
                    }
                };
                // A tight loop: the longer the linker spends inside allocate_more, the
                // likelier the free and the page's recycling land in the middle of a call.
                while heap.allocate_more(16, root).is_ok() {}
                round_done.wait();
            }
        });
        for round in 0..rounds {
            let tag = tag_of(round, 0);
            let first = Chain::new(&heap, 1000, tag);
            let second = Chain::new(&heap, 1000, tag + 1);
            second.root().verify();
            let root = second.root().ptr();
            std::mem::forget(second); // freed below by pointer: its racing links are not in it
            racer.store(root as usize, Ordering::Release);
            while racer.load(Ordering::Acquire) != 0 {
                std::hint::spin_loop();
            }
            assert_eq!(first.free(), FreeOutcome::Freed);
            // SAFETY: `root` is a live root that only this thread frees; the linker only
            // links to it (a racing link is the case under test).
            assert_eq!(unsafe { heap.free_buffer(root) }, FreeOutcome::Freed);
            heap.collect();
            heap.collect();
            let mut recycled: Vec<_> = (0..8)
                .map(|_| Root::new(&heap, 8000).expect("root"))
                .collect();
            round_done.wait();
            for root in &mut recycled {
                clobbered += root.as_mut_slice().iter().any(|&b| b != 0) as usize;
            }
            drop(recycled);
            heap.collect();
        }
    });
    assert_eq!(
        clobbered, 0,
        "recycled blocks written by a link to a freed root"
    );
    let bad_parents = rounds as u64;
    assert_eq!(
        Counts::of(&heap),
        Counts {
            bad_parents,
            ..Counts::default()
        }
    );
}

/// Both threads free every root of `roots`, released together by a Barrier; returns what
/// the two frees of each root answered, the `Freed` one first if there is one.
fn free_from_two_threads(heap: &Heap, roots: &[usize]) -> Vec<[FreeOutcome; 2]> {
    let barrier = Barrier::new(2);
    let free_all_roots = || {
        barrier.wait();
        roots
            .iter()
            // SAFETY: a root of `heap`, live or freed by the other thread a moment ago, and not
            // handed out again: nothing allocates during the race. Its blocks are not used
            // afterwards.
            .map(|&r| unsafe { heap.free_buffer(r as *mut u8) })
            .collect::<Vec<_>>()
    };
    let (a, b) = thread::scope(|s| {
        let a = s.spawn(free_all_roots);
        let b = s.spawn(free_all_roots);
        (
            a.join().expect("freer panicked"),
            b.join().expect("freer panicked"),
        )
    });
    a.into_iter()
        .zip(b)
        .map(|(a, b)| {
            let mut pair = [a, b];
            pair.sort_by_key(|o| *o != FreeOutcome::Freed);
            pair
        })
        .collect()
}

/// SPEC row "double free": two threads racing to free one root, exactly one frees it. Then
/// the proof that nothing was freed twice: a block freed twice would sit on a free list
/// twice and be handed out twice, so the freed blocks are all allocated again (several times
/// over) and must come out disjoint.
#[test]
fn two_threads_racing_to_free_the_same_roots() {
    let heap = Heap::new();
    let rounds = scaled(20, 2);
    let per_round = scaled(128, 8);
    let mut freed_blocks = 0;
    for round in 0..rounds {
        // Keepers interleaved with the racers keep every racer's page holding a live block,
        // so the loser's free meets a freed block of a live page: the "not yet reused" case.
        let mut keepers = Vec::new();
        let mut racers = Vec::new();
        for i in 0..per_round {
            keepers.push(Chain::new(&heap, varied_size(i), tag_of(round, 8 * i)));
            racers.push(varied_chain(&heap, i, tag_of(round, 8 * i + 4)));
        }
        racers.iter().for_each(Chain::verify);
        freed_blocks += racers.iter().map(Chain::block_count).sum::<u64>();
        let roots: Vec<usize> = racers.iter().map(|c| c.root().ptr() as usize).collect();
        // Both threads free every root; the chains are forgotten since the race frees them.
        racers.into_iter().for_each(std::mem::forget);
        for (i, pair) in free_from_two_threads(&heap, &roots).into_iter().enumerate() {
            assert_eq!(
                pair,
                [FreeOutcome::Freed, FreeOutcome::DoubleFree],
                "root {i}"
            );
        }
        let double_frees = ((round + 1) * per_round) as u64;
        let live = Counts::live(&keepers);
        assert_eq!(
            Counts::of(&heap),
            Counts {
                double_frees,
                ..live
            }
        );
        free_all(keepers);
    }
    // Every freed block, several times over, in the sizes it was freed in.
    let again: Vec<_> = (0..4 * freed_blocks as usize)
        .map(|i| varied_chain(&heap, i, tag_of(1000, i)))
        .collect();
    assert_disjoint(again.iter().flat_map(Chain::blocks));
    free_all(again);
    let double_frees = (rounds * per_round) as u64;
    assert_eq!(
        Counts::of(&heap),
        Counts {
            double_frees,
            ..Counts::default()
        }
    );
}

/// The same race on large roots. A large span is unmapped once freed, so the loser may find
/// its address foreign rather than freed: either answer is misuse, counted once; exactly one
/// free wins, and nothing leaks.
#[test]
fn two_threads_racing_to_free_the_same_large_roots() {
    let heap = Heap::new();
    let n = scaled(64, 2);
    let racers: Vec<_> = (0..n)
        .map(|i| Chain::with_links(&heap, 100 << 10, [64, 200_000], tag_of(0, i)))
        .collect();
    racers.iter().for_each(Chain::verify);
    let roots: Vec<usize> = racers.iter().map(|c| c.root().ptr() as usize).collect();
    racers.into_iter().for_each(std::mem::forget); // the race frees them
    for (i, pair) in free_from_two_threads(&heap, &roots).into_iter().enumerate() {
        assert_eq!(pair[0], FreeOutcome::Freed, "root {i}: {pair:?}");
        assert!(
            matches!(pair[1], FreeOutcome::DoubleFree | FreeOutcome::Foreign),
            "root {i}: {pair:?}"
        );
    }
    let c = Counts::of(&heap);
    assert_eq!(c.double_frees + c.foreign_frees, n as u64);
    let misuse = Counts {
        double_frees: c.double_frees,
        foreign_frees: c.foreign_frees,
        ..Counts::default()
    };
    assert_eq!(c, misuse);
    assert_eq!(heap.stats().live_bytes, 0);
}

/// Page ownership changing hands while blocks come back: short-lived producers allocate
/// chains and exit while a consumer is still freeing them (remote frees onto pages being
/// abandoned), and an adopter allocates and frees all along (adopting those pages on refill,
/// draining their thread-free lists while frees still land). Any block handed out twice, or
/// returned to the wrong list, shows up as a clobbered pattern when its chain is freed, or as
/// a live count that does not return to zero.
#[test]
fn remote_frees_racing_thread_exit_and_adoption() {
    let heap = Heap::new();
    let producers = scaled(200, 4);
    let per_producer = scaled(50, 5);
    let (tx, rx) = mpsc::channel::<Chain<'_>>();
    let stop = AtomicBool::new(false);
    thread::scope(|s| {
        s.spawn(|| {
            for chain in rx {
                assert_eq!(chain.free(), FreeOutcome::Freed);
            }
        });
        s.spawn(|| {
            let mut window = std::collections::VecDeque::new();
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                window.push_back(varied_chain(&heap, i, tag_of(1 << 20, i)));
                if window.len() > 64 {
                    let oldest = window.pop_front().expect("non-empty");
                    assert_eq!(oldest.free(), FreeOutcome::Freed);
                }
                if i % 1000 == 999 {
                    heap.collect();
                }
                i += 1;
            }
            free_all(window);
        });
        for p in 0..producers {
            let tx = tx.clone();
            let heap = &heap;
            s.spawn(move || {
                for i in 0..per_producer {
                    tx.send(varied_chain(heap, i + p, tag_of(p, i)))
                        .expect("consumer alive");
                }
            })
            .join()
            .expect("producer panicked");
        }
        drop(tx);
        stop.store(true, Ordering::Relaxed);
    });
    heap.collect();
    assert_eq!(Counts::of(&heap), Counts::default());
    assert_eq!(heap.stats().live_bytes, 0);
}

/// `release_thread_cache` is an explicit thread exit for one heap: the thread's pages are
/// abandoned (their live blocks stay valid and freeable from anywhere) and the thread can
/// go on allocating from fresh or adopted pages.
#[test]
fn release_thread_cache_keeps_blocks_valid_and_the_thread_usable() {
    let heap = Heap::new();
    let n = scaled(500, 10);
    let (before, after) = thread::scope(|s| {
        s.spawn(|| {
            let before: Vec<_> = (0..n)
                .map(|i| varied_chain(&heap, i, tag_of(0, i)))
                .collect();
            heap.release_thread_cache();
            let after: Vec<_> = (0..n)
                .map(|i| varied_chain(&heap, i, tag_of(1, i)))
                .collect();
            assert_disjoint(before.iter().chain(&after).flat_map(Chain::blocks));
            (before, after)
        })
        .join()
        .expect("worker panicked")
    });
    assert_eq!(Counts::of(&heap), Counts::live(before.iter().chain(&after)));
    free_all(before);
    free_all(after);
    heap.collect();
    assert_eq!(Counts::of(&heap), Counts::default());
}

/// A pool of 1,000 short-lived threads must not grow memory (DESIGN: thread exit abandons
/// the thread's pages; remote frees keep landing on them; another thread adopts them).
///
/// The threads come in waves of [`WAVE`]: each allocates a batch of chains, hands them to the
/// main thread and exits; the main thread frees them all (into abandoned pages) and calls
/// `collect()`. Wave 1 measures what 10 threads need (`need`: committed bytes with all of
/// its chains live). The bounds, and why:
/// - every wave's peak stays below `3 * need`: a wave asks for exactly what wave 1 asked for,
///   so with abandoned pages adopted or returned memory is flat in the number of threads; the
///   factor 3 leaves room for pages still waiting out an epoch grace period and for the page
///   pool's retention, which a correct engine may keep;
/// - after the last wave and `collect()`, committed bytes are below `need` (nothing is live).
///
/// A leak of a single 64 KiB page per thread would add 64 MiB over 1,000 threads, far past
/// either bound whatever `need` is.
#[test]
fn thousand_short_lived_threads_have_bounded_memory() {
    const WAVE: usize = 10;
    let waves = scaled(100, 2);
    let per_thread = scaled(40, 4);
    let heap = Heap::new();
    // All threads of a wave hold their pages at once (they leave together), so every wave
    // needs the same memory whatever the scheduler does: each thread a page per size class.
    let all_allocated = Barrier::new(WAVE);
    let mut need = 0;
    for wave in 0..waves {
        let chains: Vec<Chain<'_>> = thread::scope(|s| {
            let handles: Vec<_> = (0..WAVE)
                .map(|t| {
                    let (heap, all_allocated) = (&heap, &all_allocated);
                    s.spawn(move || {
                        let thread = wave * WAVE + t;
                        let chains = (0..per_thread)
                            .map(|i| varied_chain(heap, i + t, tag_of(thread, i)))
                            .collect::<Vec<_>>();
                        all_allocated.wait();
                        chains
                    })
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().expect("thread panicked"))
                .collect()
        });
        // Every thread of the wave has exited; its chains are live in abandoned pages.
        assert_eq!(Counts::of(&heap), Counts::live(&chains));
        let peak = heap.stats().os_committed_bytes;
        if wave == 0 {
            assert!(peak > 0, "live blocks but no committed bytes reported");
            need = peak;
        }
        assert!(
            peak <= 3 * need,
            "wave {wave}: {peak} bytes committed, 10 threads need {need}"
        );
        free_all(chains);
        heap.collect();
    }
    assert_eq!(Counts::of(&heap), Counts::default());
    let idle = heap.stats().os_committed_bytes;
    assert!(
        idle <= need,
        "{idle} bytes still committed after freeing all; 10 threads need {need}"
    );
}
