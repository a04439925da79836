//! Freeing everything gives the memory back (DESIGN: a heap that has freed everything shrinks
//! to a small bound).
//!
//! The measure is the heap's own `os_committed_bytes`, which a fresh `Heap` keeps apart from
//! everything else in this process. RSS is measured too, but in a child process running that
//! one test alone: in this process the other tests allocate and free in parallel, which would
//! make any RSS bound either loose or flaky.

use crate::support::{scaled, varied_size, Chain, Counts};
use mapialloc::{FreeOutcome, Heap};
use std::thread;

/// Bytes the tests allocate before freeing everything.
const TOTAL: u64 = scaled(64 << 20, 1 << 20) as u64;

/// What may stay committed after freeing everything and `collect()`: the engine may keep its
/// idle pool (up to 32 pages of 64 KiB, src/reclaim.rs) and a few pages more, not a
/// noticeable share of the 64 MiB it handed out.
const SLACK: u64 = 3 << 20;

/// Allocates chains in every shape the tests care about until [`TOTAL`] bytes have been asked
/// for: thousands of small roots, alone or with a few small links (about half the bytes), and
/// every 256th chain a large root with a large link (the other half).
fn allocate_total(heap: &Heap) -> Vec<Chain<'_>> {
    const SMALL_LINKS: [usize; 4] = [16, 200, 1500, 4000];
    const LARGE: [usize; 2] = [150_000, 1 << 20];
    let mut chains = Vec::new();
    let mut requested = 0;
    let mut i = 0;
    while requested < TOTAL {
        let tag = 8 * i as u64;
        let chain = if i % 256 == 255 {
            Chain::with_links(heap, LARGE[i / 256 % 2], [300_000], tag)
        } else {
            let links = (0..i % 4).map(|k| SMALL_LINKS[(i + k) % SMALL_LINKS.len()]);
            Chain::with_links(heap, varied_size(i), links, tag)
        };
        requested += chain.requested_bytes();
        chains.push(chain);
        i += 1;
    }
    chains
}

/// Frees `chains` from both ends towards the middle, so pages empty in no tidy order.
fn free_unordered(mut chains: Vec<Chain<'_>>) {
    while !chains.is_empty() {
        let chain = if chains.len() % 2 == 0 {
            chains.pop()
        } else {
            Some(chains.swap_remove(0))
        };
        assert_eq!(chain.map(Chain::free), Some(FreeOutcome::Freed));
    }
}

/// Asserts that after `collect()` the heap is empty and back within [`SLACK`] of `base`.
#[track_caller]
fn assert_given_back(heap: &Heap, base: u64, peak: u64) {
    heap.collect();
    assert_eq!(Counts::of(heap), Counts::default());
    let idle = heap.stats().os_committed_bytes;
    assert!(
        idle <= base + SLACK,
        "{idle} bytes committed after freeing everything: started at {base}, peaked at {peak}"
    );
}

#[test]
fn free_everything_gives_committed_bytes_back() {
    let heap = Heap::new();
    let base = heap.stats().os_committed_bytes;
    let chains = allocate_total(&heap);
    let peak = heap.stats().os_committed_bytes;
    assert!(
        peak >= base + TOTAL,
        "{peak} bytes committed for {TOTAL} bytes of live blocks"
    );
    free_unordered(chains);
    assert_given_back(&heap, base, peak);
}

/// The same, with the blocks allocated by a thread that has exited since, so the frees land
/// on abandoned pages and only `collect()` on this thread can give them back.
#[test]
fn free_everything_allocated_by_an_exited_thread() {
    let heap = Heap::new();
    let base = heap.stats().os_committed_bytes;
    let chains = thread::scope(|s| {
        s.spawn(|| allocate_total(&heap))
            .join()
            .expect("allocating thread panicked")
    });
    let peak = heap.stats().os_committed_bytes;
    free_unordered(chains);
    assert_given_back(&heap, base, peak);
}

/// Resident memory, from `/proc/self/status`.
fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .expect("VmRSS line");
    let kib: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .expect("VmRSS value");
    kib << 10
}

/// Set in the child process that runs [`rss_drops_after_free_everything`] alone.
const CHILD_ENV: &str = "MAPIALLOC_TEST_RSS_CHILD";

/// RSS, measured where nothing else runs: the test re-runs itself as a child process with
/// only this test selected, and the child does the measuring. The chains are written in full
/// (patterns), so every page is resident at the peak. Bound: RSS after freeing everything is
/// less than an eighth of the 64 MiB above where it started; a heap that kept the memory
/// would be a full 64 MiB above.
#[test]
#[cfg_attr(miri, ignore = "Miri cannot spawn processes or read /proc")]
fn rss_drops_after_free_everything() {
    if std::env::var_os(CHILD_ENV).is_none() {
        let exe = std::env::current_exe().expect("test binary path");
        let out = std::process::Command::new(exe)
            .args(["memory::rss_drops_after_free_everything", "--exact"])
            .args(["--test-threads=1", "--nocapture"])
            .env(CHILD_ENV, "1")
            .output()
            .expect("run the child test");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.contains("1 passed"),
            "child test failed:\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        return;
    }
    let heap = Heap::new();
    let base = rss_bytes();
    let chains = allocate_total(&heap);
    let peak = rss_bytes();
    assert!(
        peak >= base + TOTAL * 3 / 4,
        "blocks written but RSS only {base} -> {peak}"
    );
    free_unordered(chains);
    heap.collect();
    let after = rss_bytes();
    println!("rss: base {base}, peak {peak}, after free + collect {after}");
    assert!(
        after < base + TOTAL / 8,
        "RSS {after} after freeing everything: started at {base}, peaked at {peak}"
    );
}

/// A heap without quarantine, in every build: with `--features hardened` freed blocks wait an
/// epoch before their pages can empty, by design, which is not what these tests are about.
fn plain_heap() -> Heap {
    #[cfg(feature = "hardened")]
    return Heap::hardened(false);
    #[cfg(not(feature = "hardened"))]
    Heap::new()
}

/// Pages of 64 KiB that a heap may keep committed with no `collect()` once a free has
/// retired memory: its idle pool (32, src/reclaim.rs). The thread keeps its current pages on
/// top, empty or not (so that a double free on them is always told; see `spec`).
const IDLE_PAGES: u64 = 32;

/// A free that empties pages hands them to the pool before it returns, when no other thread
/// is inside a call of the heap: no later call (a provider that freed everything may make
/// none) and no `collect()` is needed. The chain's 300-byte links are blocks of their own
/// (not carved), so its free empties about 100 pages in one walk. (A hardened heap keeps
/// freed blocks in quarantine for an epoch, so its pages empty later by design: the test
/// runs on a plain heap in that build too.)
#[test]
#[cfg_attr(miri, ignore = "100 pages of blocks: too slow under Miri")]
fn a_free_gives_emptied_pages_back_before_returning() {
    let heap = plain_heap();
    let base = heap.stats().os_committed_bytes;
    let chain = Chain::with_links(&heap, 64, std::iter::repeat_n(300, 20_000), 0);
    let peak = heap.stats().os_committed_bytes;
    assert!(
        peak >= base + (20_000 * 300),
        "{peak} bytes committed for 6 MB of links"
    );
    assert_eq!(chain.free(), FreeOutcome::Freed);
    let after = heap.stats().os_committed_bytes;
    // The pool, and the current page of the root's class and of the links'.
    assert!(
        after <= base + ((IDLE_PAGES + 2) << 16),
        "{after} bytes committed right after the free: started at {base}, peaked at {peak}"
    );
}

/// A chain of about 2 MB built and freed in a loop keeps reusing the same committed pages: the
/// pages decommitted past the idle pool's bound never come back ahead of committed ones, and
/// each free's returns reach the pool before the next round. (With one stack for both, once
/// the current pages went back with the retired ones, decommitted pages landed on top: within
/// 100 rounds each round faulted in most of its 35 pages while committed ones sat idle below,
/// and committed grew to 60 pages.)
#[test]
#[cfg_attr(miri, ignore = "150 chains of 10,000 links: too slow under Miri")]
fn a_chain_freed_in_a_loop_reuses_committed_pages() {
    let heap = plain_heap();
    let mut committed = Vec::new();
    let mut x: u64 = 1;
    for _ in 0..150 {
        let root = heap.allocate_buffer(64).expect("a root");
        for _ in 0..10_000 {
            x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            let size = 16 + (x >> 33) as usize % 285;
            heap.allocate_more(size, root.as_ptr()).expect("a link");
        }
        committed.push(heap.stats().os_committed_bytes);
        // SAFETY: a live root of this heap, not used again.
        let outcome = unsafe { heap.free_buffer(root.as_ptr()) };
        assert_eq!(outcome, FreeOutcome::Freed);
    }
    let first = committed[0];
    let most = *committed.iter().max().expect("150 rounds");
    assert!(
        most <= first + (4 << 16),
        "committed with the chain built: {first} bytes in round 0, up to {most} later"
    );
}

/// The bytes `heap` has committed now, and how many of them a `collect()` gives back: pages
/// retired or abandoned on the way out that no call has pooled yet.
fn committed_and_left_to_collect(heap: &Heap) -> (u64, u64) {
    let left = heap.stats().os_committed_bytes;
    heap.collect();
    (left, left - heap.stats().os_committed_bytes)
}

/// Threads that free everything and exit at the same moment give the memory back with no
/// later call on the heap: no `collect()`, nothing on this thread. Each exiting thread can find
/// the other inside its own exit and unable to let the epoch advance; the last one out must
/// still see the retired pages home. (The lab's `churn` at 2 threads left 4-5 MiB committed in
/// about 1 run in 25 before the last thread out caught up again.) In hardened builds a thread's
/// last quarantine batch can reach its pages only after both threads have left (when the other
/// thread's exit holds the epoch back): the last thread out pools those pages too (CI's debug
/// run left them committed in 1 round in 30 before it did).
#[test]
fn threads_exiting_together_leave_no_memory_behind() {
    const THREADS: usize = 2;
    /// Per thread: several times the idle pool, so that most emptied pages must be decommitted.
    const BYTES: u64 = scaled(6 << 20, 256 << 10) as u64;
    const ROUNDS: usize = scaled(30, 2);
    for round in 0..ROUNDS {
        let heap = Heap::new();
        let all_freed = std::sync::Barrier::new(THREADS);
        thread::scope(|s| {
            let threads: Vec<_> = (0..THREADS)
                .map(|t| {
                    let (heap, all_freed) = (&heap, &all_freed);
                    s.spawn(move || {
                        let mut chains = Vec::new();
                        let mut bytes = 0;
                        let mut i = t;
                        while bytes < BYTES {
                            let chain =
                                Chain::with_links(heap, varied_size(i), [200, 40], 8 * i as u64);
                            bytes += chain.requested_bytes();
                            chains.push(chain);
                            i += THREADS;
                        }
                        free_unordered(chains);
                        // Exit together.
                        all_freed.wait();
                    })
                })
                .collect();
            // Joined explicitly: unlike the end of the scope, `join` waits for the thread's
            // thread-locals (its cache) to be dropped.
            for thread in threads {
                thread.join().expect("thread panicked");
            }
        });
        assert_eq!(Counts::of(&heap), Counts::default());
        let (left, pending) = committed_and_left_to_collect(&heap);
        assert!(
            pending == 0 && left <= SLACK,
            "round {round}: {left} bytes still committed after both threads freed everything \
             and exited, {pending} of them given back only by a later collect()"
        );
    }
}

/// Pages of 64 KiB a heap keeps committed once no thread uses it (src/thread_cache.rs).
const IDLE_HEAP_PAGES: u64 = 16;

/// The idle pool is there for threads that use the heap: while one does, it stays full (32
/// pages); when the last one leaves (here by `release_thread_cache`, as at thread exit), the
/// pool keeps only 16 pages, with no later call needed.
#[test]
#[cfg_attr(miri, ignore = "100 pages of blocks: too slow under Miri")]
fn the_last_thread_to_leave_a_heap_trims_its_idle_pool() {
    let heap = plain_heap();
    // This thread stays on the heap while another one fills the pool and exits.
    let anchor = heap.allocate_buffer(64).expect("memory");
    thread::scope(|s| {
        s.spawn(|| {
            let chain = Chain::with_links(&heap, 64, std::iter::repeat_n(300, 20_000), 0);
            assert_eq!(chain.free(), FreeOutcome::Freed);
        })
        .join()
        .expect("thread panicked");
    });
    let kept = heap.stats().os_committed_bytes;
    assert!(
        kept >= IDLE_PAGES << 16,
        "{kept} bytes committed with a thread still on the heap: the pool was not full"
    );
    // SAFETY: `anchor` is a live root, unused hereafter.
    let freed = unsafe { heap.free_buffer(anchor.as_ptr()) };
    assert_eq!(freed, FreeOutcome::Freed);
    heap.release_thread_cache();
    let idle = heap.stats().os_committed_bytes;
    assert!(
        idle <= IDLE_HEAP_PAGES << 16,
        "{idle} bytes committed after the last thread left the heap (was {kept})"
    );
}

/// A free that empties an abandoned page pools it even when pages of another exited thread,
/// still holding live blocks, were abandoned on top of it, and no later call lands on an
/// abandoned page. (Adopting only the top few left such pages committed until a later
/// `collect()`: in the lab's churn at 16 threads, up to 34 pages, 2 MiB.)
#[test]
fn a_free_pools_an_abandoned_page_under_others() {
    let heap = plain_heap();
    thread::scope(|s| {
        let heap = &heap;
        // A root whose links fill one page, from a thread that exits; then a thread that
        // leaves one live block in each of several classes, so its pages lie on top.
        let chain = s
            .spawn(move || Chain::with_links(heap, 64, (0..60).map(|_| 1000), 1000))
            .join()
            .expect("thread panicked");
        let singles = s
            .spawn(move || {
                [2000, 3000, 5000, 7000]
                    .iter()
                    .enumerate()
                    .map(|(i, &len)| Chain::new(heap, len, 2000 + 8 * i as u64))
                    .collect::<Vec<_>>()
            })
            .join()
            .expect("thread panicked");
        // Fill the idle pool (from a thread that exits, so that none of its pages stays its
        // current one), so that the pages pooled below are decommitted: given back.
        s.spawn(move || {
            let filler = Chain::with_links(heap, 64, (0..200).map(|_| 16_000), 0);
            assert_eq!(filler.free(), FreeOutcome::Freed);
        })
        .join()
        .expect("thread panicked");
        assert_eq!(chain.free(), FreeOutcome::Freed);
        for single in singles {
            assert_eq!(single.free(), FreeOutcome::Freed);
        }
    });
    assert_eq!(Counts::of(&heap), Counts::default());
    let (left, pending) = committed_and_left_to_collect(&heap);
    assert_eq!(
        pending, 0,
        "{left} bytes committed after everything was freed, {pending} of them given back \
         only by a later collect()"
    );
}
