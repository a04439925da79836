//! Linked blocks of at most 256 bytes are carved from chunks: small blocks that a thread links
//! to a root and then carves from while it keeps linking to that root (larger linked blocks
//! are blocks of their own). These tests pin what the user sees of that: carved blocks answer
//! every SPEC row a linked block answers, chunks grow with a long chain, one thread may link
//! to several roots in turn, chains carved on one thread are freed on another, and a thread
//! carving from a root's chunk may race the free of that root.
//!
//! A hardened heap carves nothing (every linked block has a header of its own, for its
//! checks), so there the same tests run on blocks of their own and expect no chunk.
//!
//! [`live_chunks`] counts chunks linked to roots and not yet given back. A chunk whose root
//! was freed while a thread still carved from it goes back when that thread lets go of it (at
//! its next link to another root, `collect`, `release_thread_cache` or thread exit), so the
//! tests check it for zero only after the carving thread did one of those.

use crate::support::{
    assert_aligned, assert_disjoint, free_all, link_block, scaled, Block, Chain, Counts,
};
use mapialloc::testing::live_chunks;
use mapialloc::{FreeOutcome, Heap, Scode};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::thread;

/// Whether small linked blocks are carved from chunks: not on a hardened heap.
const CARVING: bool = !cfg!(feature = "hardened");

/// Chunks a thread holds at most: one for each of the last 4 roots it carved for.
const HELD_CHUNKS: u64 = if CARVING { 4 } else { 0 };

/// Linked sizes carved from a chunk (the largest is `CARVE_MAX`), then sizes that make blocks
/// of their own.
const CARVED: [usize; 6] = [0, 1, 16, 24, 255, 256];
const OWN: [usize; 2] = [257, 1000];

/// The size of link number `i` in the bulk tests: 0..=300, each once every 301 links, in a
/// scrambled order (37 is prime to 301) so that neighbouring links differ in size. Six links
/// in seven are carved (0..=256), the rest are blocks of their own.
fn link_size(i: usize) -> usize {
    i * 37 % 301
}

/// Tags far enough apart for `b` links under each `a`.
fn tag_of(a: usize, b: usize) -> u64 {
    ((a as u64) << 32) + b as u64
}

/// What a carved block costs in a chunk: its size rounded up to 16, at least 16.
fn carved_bytes(len: usize) -> u64 {
    (len.max(1) as u64).div_ceil(16) * 16
}

/// A chain kept live through a test, so that the counters it checks stay above zero: they
/// subtract with saturation, and a block counted as freed twice, which would hide at zero,
/// shows as a count below this chain's. It has no carved link, so it holds no chunk.
struct Sentinel<'h> {
    chain: Chain<'h>,
    /// What it adds to `live_bytes`.
    bytes: u64,
}

impl<'h> Sentinel<'h> {
    fn new(heap: &'h Heap) -> Sentinel<'h> {
        let before = heap.stats().live_bytes;
        let chain = Chain::with_links(heap, 100, [300, 1000], tag_of(u32::MAX as usize, 0));
        let bytes = heap.stats().live_bytes - before;
        Sentinel { chain, bytes }
    }

    /// `counts` plus this chain.
    fn with(&self, counts: Counts) -> Counts {
        Counts {
            live_roots: counts.live_roots + 1,
            live_blocks: counts.live_blocks + self.chain.block_count(),
            ..counts
        }
    }

    /// Asserts that `heap` holds nothing but this chain, with `misuse` counted, then frees it
    /// and asserts that `heap` holds nothing at all, and once this thread's carvers let go
    /// (`collect`), no chunk either.
    #[track_caller]
    fn free_last(self, heap: &Heap, misuse: Counts) {
        assert_eq!(Counts::of(heap), self.with(misuse));
        assert_eq!(heap.stats().live_bytes, self.bytes);
        assert_eq!(self.chain.free(), FreeOutcome::Freed);
        assert_eq!(Counts::of(heap), misuse);
        assert_eq!(heap.stats().live_bytes, 0);
        heap.collect();
        assert_eq!(live_chunks(heap), 0);
    }
}

/// Panics if two of `ranges` overlap.
#[track_caller]
fn assert_ranges_disjoint(mut ranges: Vec<Range<usize>>) {
    ranges.sort_by_key(|r| r.start);
    for pair in ranges.windows(2) {
        assert!(
            pair[0].end <= pair[1].start,
            "blocks of one root overlap: {:#x?} and {:#x?}",
            pair[0],
            pair[1]
        );
    }
}

/// SPEC rows "MAPIFreeBuffer(linked block)", "pointer not from this allocator" (not at a
/// block start) and "`lpObject` is a linked block", for carved blocks of the sizes in
/// `CARVED` and for linked blocks of their own: each misuse is answered and counted, nothing
/// is freed, given back or written, and the root goes on taking links.
#[test]
fn carved_blocks_answer_the_spec_rows_of_linked_blocks() {
    let heap = Heap::new();
    let sentinel = Sentinel::new(&heap);
    // Each size three times, carved and own sizes interleaved: carved blocks at the start,
    // in the middle and at the end of a chunk, and chunks that grow past the first.
    let sizes: Vec<usize> = (0..3).flat_map(|_| CARVED.into_iter().chain(OWN)).collect();
    let mut chain = Chain::with_links(&heap, 64, sizes, 1);
    let chunks = live_chunks(&heap);
    assert_eq!(
        chunks > 0,
        CARVING,
        "{chunks} chunks for {} small links",
        3 * CARVED.len()
    );
    let live_bytes = heap.stats().live_bytes;
    let mut expect = sentinel.with(Counts::live([&chain]));
    for block in chain.linked() {
        let (p, len) = (block.ptr(), block.len());
        // SAFETY: a linked block of a live root, which `free_buffer` never frees on its own:
        // the chain stays usable.
        let outcome = unsafe { heap.free_buffer(p) };
        assert_eq!(
            outcome,
            FreeOutcome::LinkedBlock,
            "free of a {len}-byte link"
        );
        expect.linked_frees += 1;
        let mut interior = vec![8]; // misaligned: no block starts there
        if len >= 32 {
            interior.push(16); // aligned, inside the block: no block starts there either
        }
        for off in interior {
            // SAFETY: `p + off` lies inside a live linked block and is not a block start, so
            // the call frees nothing.
            let outcome = unsafe { heap.free_buffer(p.wrapping_add(off)) };
            assert_eq!(
                outcome,
                FreeOutcome::Foreign,
                "free of {len}-byte link + {off}"
            );
            expect.foreign_frees += 1;
        }
        for more in [16, 1000] {
            assert_eq!(
                heap.allocate_more(more, p),
                Err(Scode::MAPI_E_INVALID_PARAMETER),
                "allocate_more({more}) with a {len}-byte link as parent"
            );
            expect.bad_parents += 1;
        }
        assert_eq!(
            Counts::of(&heap),
            expect,
            "after the misuses of a {len}-byte link"
        );
    }
    // Nothing was freed, written or given back.
    assert_eq!(heap.stats().live_bytes, live_bytes);
    assert_eq!(live_chunks(&heap), chunks);
    chain.verify();
    // The root still takes links, carved and own, none on top of an earlier block.
    chain.link(16, 1_000);
    chain.link(1000, 1_001);
    assert_disjoint(chain.blocks());
    let misuse = Counts {
        linked_frees: expect.linked_frees,
        foreign_frees: expect.foreign_frees,
        bad_parents: expect.bad_parents,
        ..Counts::default()
    };
    assert_eq!(
        Counts::of(&heap),
        sentinel.with(Counts {
            live_roots: 1,
            live_blocks: chain.block_count(),
            ..misuse
        })
    );
    assert_eq!(chain.free(), FreeOutcome::Freed); // every block still holds its pattern
    sentinel.free_last(&heap, misuse);
}

/// A chunk's own user pointer (its prologue, just before its first carved block) is no
/// block a caller was given: freeing it is a foreign free, linking to it a bad parent. (A
/// root freed twice after its page came to serve chunks meets this: it must not be answered
/// as a linked block.) Without carving the same address is a block's header: foreign too.
#[test]
fn a_chunks_own_address_is_no_block() {
    let heap = Heap::new();
    let sentinel = Sentinel::new(&heap);
    let chain = Chain::with_links(&heap, 64, [24], 1);
    let first = chain.linked()[0].ptr();
    let prologue = first.wrapping_sub(16);
    // SAFETY: `prologue` is no block start (the chunk's prologue, or a block header), so the
    // call frees nothing.
    assert_eq!(unsafe { heap.free_buffer(prologue) }, FreeOutcome::Foreign);
    assert_eq!(
        heap.allocate_more(16, prologue),
        Err(Scode::MAPI_E_INVALID_PARAMETER)
    );
    let misuse = Counts {
        foreign_frees: 1,
        bad_parents: 1,
        ..Counts::default()
    };
    assert_eq!(chain.free(), FreeOutcome::Freed);
    sentinel.free_last(&heap, misuse);
}

/// "Chains of 1,000-10,000 blocks occur" (SPEC): 10,000 links to one root, sizes 0..=300.
/// Every block is aligned and disjoint from the others and keeps its pattern until the free,
/// `live_roots` counts every carved block, and the chunks grow: they hold thousands of bytes
/// each, not a few links (a chain of 512-byte chunks would need 2,500 of them here).
#[test]
fn chunks_grow_with_a_long_chain() {
    let heap = Heap::new();
    let n = scaled(10_000, 300);
    let sentinel = Sentinel::new(&heap);
    let mut chain = Chain::new(&heap, 100, 0);
    for i in 0..n {
        chain.link(link_size(i), 1 + i as u64); // checks the alignment
    }
    assert_disjoint(chain.blocks());
    chain.verify();
    assert_eq!(Counts::of(&heap), sentinel.with(Counts::live([&chain])));
    let live = heap
        .live_roots()
        .find(|r| r.ptr.as_ptr() == chain.root().ptr())
        .expect("live_roots lists the root");
    assert_eq!(live.linked_blocks, n);
    assert!(live.chain_bytes as u64 >= chain.requested_bytes());
    // A bound with a wide margin over what chunks growing to 16 KiB take (77 here): on
    // average at least 4 KiB of carved blocks per chunk, past the first few.
    let carved: u64 = chain
        .linked()
        .iter()
        .filter(|b| b.len() <= 256)
        .map(|b| carved_bytes(b.len()))
        .sum();
    let chunks = live_chunks(&heap);
    let bound = if CARVING {
        1..=8 + carved / 4096
    } else {
        0..=0
    };
    assert!(
        bound.contains(&chunks),
        "{chunks} chunks for {carved} bytes of carved blocks"
    );
    assert_eq!(chain.free(), FreeOutcome::Freed);
    sentinel.free_last(&heap, Counts::default());
}

/// A provider filling four property sets in turn (as many roots as a thread keeps chunks
/// for) carves each set's strings from chunks of its own, which grow with the chain:
/// switching roots never lets go of a chunk that still has room (that would take a chunk per
/// link here, 800).
#[test]
fn four_roots_linked_in_turn_keep_their_chunks() {
    let heap = Heap::new();
    let links = scaled(200, 20);
    let mut roots: Vec<Chain<'_>> = (0..4)
        .map(|r| Chain::new(&heap, 64, tag_of(r, 0)))
        .collect();
    for i in 0..links {
        for (r, chain) in roots.iter_mut().enumerate() {
            chain.link(24, tag_of(r, i + 1));
        }
    }
    roots.iter().for_each(Chain::verify);
    assert_disjoint(roots.iter().flat_map(Chain::blocks));
    // 6.4 KB carved per root: chunks of 256, 256, 512, 1,024, 2,048 and 4,096 bytes.
    let chunks = live_chunks(&heap);
    let bound = if CARVING { 4..=4 * 8 } else { 0..=0 };
    assert!(
        bound.contains(&chunks),
        "{chunks} chunks for 4 roots of {links} links each, linked in turn"
    );
    free_all(roots);
    assert_eq!(live_chunks(&heap), 0);
}

/// One thread links to three roots in turn, so its carver changes roots at every call; one
/// root is freed in the middle, a fourth (of the same size, so often at the same address)
/// takes its turn, and the rest are freed in mixed order. No block lands on another, every
/// root's chain is what was linked to it, and freeing a root frees exactly its chain.
#[test]
fn one_thread_linking_to_roots_in_turn() {
    let heap = Heap::new();
    let n = scaled(3_000, 60);
    let sentinel = Sentinel::new(&heap);
    // (root number, chain); a link's tag is its root number and its index in the chain.
    let mut roots: Vec<(usize, Chain<'_>)> = (0..3)
        .map(|r| (r, Chain::new(&heap, 48 + 100 * r, tag_of(r, 0))))
        .collect();
    let mut links = 0;
    let mut link_in_turn = |roots: &mut Vec<(usize, Chain<'_>)>, count: usize| {
        for _ in 0..count {
            let k = links % roots.len();
            let (r, chain) = &mut roots[k];
            let tag = tag_of(*r, chain.linked().len() + 1);
            chain.link(link_size(links), tag);
            links += 1;
        }
        (links - 1) % roots.len() // the root linked to last
    };
    let check = |heap: &Heap, roots: &[(usize, Chain<'_>)]| {
        let chains = || roots.iter().map(|(_, c)| c);
        chains().for_each(Chain::verify);
        assert_disjoint(chains().flat_map(Chain::blocks));
        assert_eq!(Counts::of(heap), sentinel.with(Counts::live(chains())));
        let live: Vec<_> = heap.live_roots().collect();
        assert_eq!(live.len(), roots.len() + 1);
        for live in live {
            let chain = chains()
                .chain([&sentinel.chain])
                .find(|c| c.root().ptr() == live.ptr.as_ptr())
                .expect("live_roots lists only our roots");
            assert_eq!(live.linked_blocks, chain.linked().len());
        }
    };
    link_in_turn(&mut roots, n);
    check(&heap, &roots);

    // The middle root goes; a fourth of its size takes its place in the rotation.
    assert_eq!(roots.remove(1).1.free(), FreeOutcome::Freed);
    check(&heap, &roots);
    roots.push((3, Chain::new(&heap, 148, tag_of(3, 0))));
    let last = link_in_turn(&mut roots, n);
    check(&heap, &roots);

    // Mixed order: the root linked to last (whose chunk the carver holds), then the others
    // from the newest.
    let (_, chain) = roots.remove(last);
    assert_eq!(chain.free(), FreeOutcome::Freed);
    check(&heap, &roots);
    while let Some((_, chain)) = roots.pop() {
        assert_eq!(chain.free(), FreeOutcome::Freed);
        check(&heap, &roots);
    }
    sentinel.free_last(&heap, Counts::default());
}

/// Transport providers allocate on one thread and free on another (SPEC): thread A builds
/// roots with many small links and hands each to thread B, which frees it while A carves for
/// the next roots. So B's free meets chunks A has let go of (B gives them back) and chunks A
/// still carves from (A gives them back when it lets go). At the end the last root's chunk is
/// the one A still holds, freed by B: it goes back exactly when A releases its cache.
#[test]
fn chains_carved_on_one_thread_freed_on_another() {
    let heap = Heap::new();
    let n = scaled(2_000, 10);
    let sentinel = Sentinel::new(&heap);
    let base = sentinel.with(Counts::default());
    let (chains_tx, chains_rx) = mpsc::channel::<Chain<'_>>();
    let (all_freed_tx, all_freed_rx) = mpsc::channel::<()>();
    thread::scope(|s| {
        let heap = &heap;
        s.spawn(move || {
            for i in 0..n {
                // 8 to 47 links, then a carved one, so A ends holding the last root's chunk.
                let links = (0..8 + i % 40).map(|k| link_size(7 * i + k));
                let links: Vec<usize> = links.chain([16]).collect();
                let chain = Chain::with_links(heap, 32 + i % 200, links, tag_of(i, 0));
                chains_tx.send(chain).expect("freer alive");
            }
            drop(chains_tx);
            all_freed_rx.recv().expect("freer panicked");
            assert_eq!(Counts::of(heap), base);
            assert_eq!(
                live_chunks(heap),
                HELD_CHUNKS,
                "every chunk but the ones this thread still carves from is back"
            );
            heap.release_thread_cache();
            assert_eq!(live_chunks(heap), 0);
        });
        s.spawn(move || {
            for chain in chains_rx {
                assert_eq!(chain.free(), FreeOutcome::Freed); // verifies the patterns first
            }
            all_freed_tx.send(()).expect("builder alive");
            heap.release_thread_cache();
        });
    });
    heap.collect();
    assert_eq!(live_chunks(&heap), 0);
    sentinel.free_last(&heap, Counts::default());
}

/// Where thread F is with the root it handed to thread L, in
/// [`carver_racing_the_free_of_its_root`]: the root is live, F is about to free it, or F's
/// free has returned.
const LIVE: u8 = 0;
const FREEING: u8 = 1;
const FREED: u8 = 2;

/// Sets its flag if the thread holding it panics, so that the other thread stops waiting for
/// it (and the test fails instead of hanging).
struct PanicFlag<'a>(&'a AtomicBool);

impl Drop for PanicFlag<'_> {
    fn drop(&mut self) {
        if thread::panicking() {
            self.0.store(true, Ordering::Relaxed);
        }
    }
}

/// How L's racing links to one root went.
struct Raced {
    /// Ranges of the blocks linked while racing the free (never written: the free may have
    /// passed by the time the call returns).
    ok: Vec<Range<usize>>,
    /// Calls answered MAPI_E_INVALID_PARAMETER (the loop stops at the first).
    refused: u64,
}

/// SPEC row "`lpObject` freed while this call runs", with a thread carving from the root's
/// chunk. Each round thread F allocates a root R and hands it to thread L. L links and fills
/// a few blocks (R is surely live: F frees it only once it has them) and hands them over.
/// Then in two rounds of three L links a few more blocks and waits for F to start its free,
/// then links as fast as it can until it is refused; F frees R once L has made a few of
/// those calls (0 to 3, varying by round), so the free lands among them. In the third round L
/// stops, still holding R's chunk, which F's free then leaves to L. Two roots in three come
/// at the address of the root before (F keeps other roots of the size live so that a freed
/// block comes back at once), so L often meets an address whose chunk it still holds, or on
/// which it was refused, as a new root.
///
/// Asserted: every call answers Ok or MAPI_E_INVALID_PARAMETER, and a call that started
/// after F's free returned answers the latter; every block is 16-aligned and no two blocks of
/// a root overlap; blocks filled while R was live keep their pattern until F frees R; each
/// racing round ends on exactly one refusal, counted in `bad_parents`; and no block or chunk
/// is left once both threads have released their caches.
#[test]
fn carver_racing_the_free_of_its_root() {
    let heap = Heap::new();
    let rounds = scaled(600, 6);
    let sentinel = Sentinel::new(&heap);
    let base = sentinel.with(Counts::default());
    let racing = |round: usize| round % 3 != 2;
    // Root sizes in two classes: rounds 0..4 of every six use the first, 4..6 the second, so
    // a round after a stopped one (2 and 5 mod 6) has the same class (and address) or not.
    let root_len = |round: usize| if round % 6 < 4 { 64 } else { 200 };
    // Where F is with the current root: set to LIVE before the root is handed over.
    let phase = AtomicU8::new(LIVE);
    // Set by L once it has made this round's links before the free and is waiting for it.
    let ready = AtomicBool::new(false);
    // L's calls since it saw FREEING: F frees once L is calling.
    let calls_freeing = AtomicUsize::new(0);
    let panicked = AtomicBool::new(false);
    let (root_tx, root_rx) = mpsc::channel::<(usize, usize)>();
    let (filled_tx, filled_rx) = mpsc::channel::<Vec<Block>>();
    let (raced_tx, raced_rx) = mpsc::channel::<Raced>();
    let (fillers, refused) = thread::scope(|s| {
        let (heap, phase, panicked) = (&heap, &phase, &panicked);
        let (ready, calls_freeing) = (&ready, &calls_freeing);
        // L: the carver.
        s.spawn(move || {
            let _flag = PanicFlag(panicked);
            for (root, round) in root_rx {
                let root = root as *mut u8;
                let filled: Vec<Block> = (0..1 + round % 30)
                    .map(|k| {
                        let (len, tag) = (link_size(round + 11 * k), tag_of(round, k + 1));
                        // SAFETY: the block goes to F, which adopts it into R's chain before
                        // freeing R; this thread does not touch it again.
                        unsafe { link_block(heap, root, len, tag) }
                    })
                    .collect();
                filled_tx.send(filled).expect("freer alive");
                let mut raced = Raced {
                    ok: Vec::new(),
                    refused: 0,
                };
                // Racing links before F's free may start: the carve position varies.
                let before_free = round % 50;
                let mut waited = 0u32;
                while racing(round) {
                    let seen = phase.load(Ordering::Acquire);
                    if seen == LIVE && raced.ok.len() >= before_free {
                        ready.store(true, Ordering::Relaxed);
                        if panicked.load(Ordering::Relaxed) {
                            return;
                        }
                        waited += 1;
                        if waited % 1024 == 0 {
                            thread::yield_now();
                        }
                        std::hint::spin_loop();
                        continue;
                    }
                    let len = link_size(round + raced.ok.len());
                    let result = heap.allocate_more(len, root);
                    if seen == FREEING {
                        // Let F run if the two share a CPU: it has a root to free.
                        if calls_freeing.fetch_add(1, Ordering::Relaxed) % 32 == 31 {
                            thread::yield_now();
                        }
                    }
                    match result {
                        Ok(p) => {
                            assert_ne!(seen, FREED, "round {round}: Ok from a freed root");
                            assert_aligned(p.as_ptr());
                            let start = p.as_ptr() as usize;
                            raced.ok.push(start..start + len.max(1));
                        }
                        Err(e) => {
                            assert_eq!(e, Scode::MAPI_E_INVALID_PARAMETER, "round {round}");
                            raced.refused += 1;
                            break;
                        }
                    }
                }
                raced_tx.send(raced).expect("freer alive");
            }
            heap.release_thread_cache();
        });
        // F: allocates, checks and frees the roots.
        let freer = s.spawn(move || {
            let _flag = PanicFlag(panicked);
            let mut refused = 0;
            // Roots of these sizes come only from here. A new root that is not at the last
            // freed address of its size is kept live (and another allocated), so that after
            // the first rounds the freed block comes back at once.
            let mut fillers = Vec::new();
            let mut last_freed = [0usize; 2];
            let mut tag = tag_of(rounds, 0);
            let mut new_root = |len| {
                tag += 1;
                Chain::new(heap, len, tag)
            };
            for round in 0..rounds {
                let len = root_len(round);
                let class = usize::from(len != 64);
                let mut chain = new_root(len);
                while last_freed[class] != 0
                    && chain.root().ptr() as usize != last_freed[class]
                    && fillers.len() < 64
                {
                    fillers.push(std::mem::replace(&mut chain, new_root(len)));
                }
                let root = chain.root().ptr();
                last_freed[class] = root as usize;
                phase.store(LIVE, Ordering::Relaxed); // published by the send
                ready.store(false, Ordering::Relaxed);
                calls_freeing.store(0, Ordering::Relaxed);
                root_tx.send((root as usize, round)).expect("linker alive");
                chain.adopt(filled_rx.recv().expect("linker panicked"));
                chain.verify(); // before L races, so the free lands quickly once started
                let ranges: Vec<Range<usize>> = chain.blocks().map(Block::range).collect();
                let carved = chain.linked().iter().any(|b| b.len() <= 256);
                // The racing links are not in the chain (nobody writes them): it is freed
                // by pointer.
                std::mem::forget(chain);
                while racing(round) && !ready.load(Ordering::Relaxed) {
                    assert!(!panicked.load(Ordering::Relaxed), "linker panicked");
                    thread::yield_now();
                }
                phase.store(FREEING, Ordering::Relaxed);
                // The free lands while L is calling, after a number of its calls that varies.
                let after = round % 4;
                while racing(round) && calls_freeing.load(Ordering::Relaxed) < after {
                    assert!(!panicked.load(Ordering::Relaxed), "linker panicked");
                    thread::yield_now();
                }
                // SAFETY: `root` is a live root of `heap` that only this thread frees; the
                // blocks L filled were checked above and are not used again.
                assert_eq!(unsafe { heap.free_buffer(root) }, FreeOutcome::Freed);
                phase.store(FREED, Ordering::Release);
                let raced = raced_rx.recv().expect("linker panicked");
                assert_eq!(raced.refused, u64::from(racing(round)), "round {round}");
                refused += raced.refused;
                // L may still hold a chunk with blocks it carved while the free ran, which
                // it counts as freed when it lets go: until then they count as live.
                let c = Counts::of(heap);
                let live = base.live_blocks + fillers.len() as u64;
                let pending = live..=live + raced.ok.len() as u64;
                assert_eq!(c.live_roots, base.live_roots + fillers.len() as u64);
                assert!(pending.contains(&c.live_blocks), "round {round}: {c:?}");
                assert_eq!(c.bad_parents, refused);
                // L is between calls, and the only thread that carves: every chunk is back
                // but the one it holds, if any. After a stopped round in which it carved,
                // that is R's chunk, which F's free left to it. (After a racing round, L let
                // go of its chunk when refused, unless that call was for a block of its own.)
                let chunks = live_chunks(heap);
                if !racing(round) && carved {
                    let held = u64::from(CARVING)..=HELD_CHUNKS;
                    assert!(held.contains(&chunks), "round {round}: R's chunk: {chunks}");
                } else {
                    // (Not `<=`: with `hardened`, HELD_CHUNKS is 0 and clippy calls that absurd.)
                    let at_most_held = HELD_CHUNKS.checked_sub(chunks).is_some();
                    assert!(at_most_held, "round {round}: {chunks} chunks live");
                }
                assert_ranges_disjoint(ranges.into_iter().chain(raced.ok).collect());
            }
            drop(root_tx);
            heap.release_thread_cache();
            (fillers, refused)
        });
        freer.join().expect("freer panicked")
    });
    heap.collect();
    assert_eq!(live_chunks(&heap), 0);
    let misuse = Counts {
        bad_parents: refused,
        ..Counts::default()
    };
    assert_eq!(
        Counts::of(&heap),
        sentinel.with(Counts {
            bad_parents: refused,
            ..Counts::live(&fillers)
        })
    );
    free_all(fillers);
    sentinel.free_last(&heap, misuse);
}
