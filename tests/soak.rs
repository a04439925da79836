//! A bounded soak: 16 threads mix every call on one heap for a while, with cross-thread frees,
//! links to other threads' roots, racing double frees, foreign frees and frees of linked
//! blocks. Afterwards nothing is live and the heap's committed memory is back under a bound.
//!
//! Duration: `MAPIALLOC_SOAK_SECS` seconds (default 20, at most 60). `scripts/tsan.sh` sets a
//! few seconds; under Miri the workers stop after a few dozen operations instead (Miri's clock
//! is virtual and every step is interpreted).
//!
//! How the threads talk: every worker has an inbox (a std channel; only the engine has to be
//! lock-free, not its test). A chain sent there becomes the receiver's, which links more
//! blocks to it and frees it. A "duel" sent to two workers at once makes them race to free one
//! root, one of them linking to it first. Every block is filled with a pattern naming it when
//! allocated and checked before it is freed, so a block handed out twice, or written by a
//! stray free-list link, fails the test.
//!
//! Duels and reuse: a second free of a root whose address has been handed out again frees the
//! new root (SPEC: undefined, as in MAPI). So the root of a duel must not be reused before both
//! racers have returned. Its block belongs to a page of the duel's creator, and only the
//! creator allocates from that page, so the creator waits for both racers before it allocates
//! again. While it waits it still frees what arrives in its inbox (frees never reuse a
//! block), so two workers waiting on each other's duels cannot deadlock.

use mapialloc::{FreeOutcome, Heap, Scode, Stats};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

/// Worker threads.
const WORKERS: usize = if cfg!(miri) { 4 } else { 16 };

/// Operations per worker under Miri, where the soak is bounded by work, not time.
const MIRI_OPS: u64 = 40;

/// The largest request a slab page serves (a 16 KiB block minus its 16-byte header).
const MAX_SMALL: usize = 16 * 1024 - 16;

/// How long a duel's creator waits for its two racers (milliseconds, normally). A racer that
/// panicked would leave its duel unfinished and every other worker waiting, so the run fails
/// instead of hanging.
const DUEL_PATIENCE: Duration = Duration::from_secs(120);

/// Chains a worker holds at most; past it, it frees or gives some away.
const HELD: usize = 64;

/// Idle memory a heap keeps after freeing everything and collecting, per the engine's design:
/// the page pool keeps up to 32 idle 64 KiB pages committed (src/reclaim.rs,
/// `POOL_COMMITTED_PAGES`) and decommits the rest. Its count of committed pool pages is checked
/// and then bumped without a CAS, so each thread returning pages at the same moment can
/// overshoot it by one page: at most one per worker plus the main thread. Every other page is
/// either in use (nothing is, by now) or decommitted, and large spans are unmapped.
const COMMITTED_BOUND: u64 = (32 + WORKERS as u64 + 1) * 64 * 1024;

fn soak_duration() -> Duration {
    let secs = std::env::var("MAPIALLOC_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .unwrap_or(20);
    Duration::from_secs(secs.min(60))
}

/// A small xorshift generator: deterministic per worker, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// A request size: mostly small, some mid-sized, a few from the largest classes and
    /// past them (large spans).
    fn size(&mut self) -> usize {
        match self.below(100) {
            0..=59 => self.below(128) as usize,
            60..=89 => 128 + self.below(2048) as usize,
            90..=97 => 2048 + self.below(MAX_SMALL as u64 - 2048) as usize,
            _ => MAX_SMALL + 1 + self.below(48 * 1024) as usize,
        }
    }
}

/// A block handed out by the heap and the tag its pattern is made from.
#[derive(Debug)]
struct Block {
    ptr: *mut u8,
    len: usize,
    tag: u64,
}

impl Block {
    /// Takes a block just handed out and fills it with its tag's pattern: the tag in every
    /// aligned word, the tail bytes from the tag's bytes.
    fn new(ptr: std::ptr::NonNull<u8>, len: usize, tag: u64) -> Block {
        let block = Block {
            ptr: ptr.as_ptr(),
            len,
            tag,
        };
        assert_eq!(block.ptr as usize % 16, 0, "misaligned block");
        for (i, chunk) in block.bytes_mut().chunks_mut(8).enumerate() {
            let word = tag ^ i as u64;
            chunk.copy_from_slice(&word.to_le_bytes()[..chunk.len()]);
        }
        block
    }

    #[allow(clippy::mut_from_ref)] // a `Block` is the only handle on its memory
    fn bytes_mut(&self) -> &mut [u8] {
        // SAFETY: the block is live (its root is not freed), `len` bytes long, and only the
        // worker holding its chain touches it.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }

    #[track_caller]
    fn verify(&self) {
        for (i, chunk) in self.bytes_mut().chunks(8).enumerate() {
            let word = self.tag ^ i as u64;
            assert!(
                chunk == &word.to_le_bytes()[..chunk.len()],
                "block {:p} ({} bytes, tag {:#x}) clobbered in word {i}",
                self.ptr,
                self.len,
                self.tag
            );
        }
    }
}

/// A root and its linked blocks, owned by whoever holds this value.
#[derive(Debug)]
struct Chain {
    root: Block,
    linked: Vec<Block>,
}

// SAFETY: a chain is addresses and lengths. MAPI memory is free-threaded (SPEC: any thread may
// use, link to or free any root); the memory moves with the value, so one thread uses it at a
// time.
unsafe impl Send for Chain {}

impl Chain {
    fn verify(&self) {
        self.root.verify();
        self.linked.iter().for_each(Block::verify);
    }
}

/// Two workers race to free `root`; the first of them links to it first (racing the other's
/// free). The creator waits for `done == 2` before allocating again (see the module docs).
struct Duel {
    root: *mut u8,
    freed: AtomicU32,
    done: AtomicU32,
}

// SAFETY: `root` is only passed to the heap (free and link), which takes any pointer from any
// thread; the racers never read or write the block.
unsafe impl Send for Duel {}
// SAFETY: as above; the counters are atomics.
unsafe impl Sync for Duel {}

enum Msg {
    /// A chain handed over: the receiver owns it now.
    Chain(Chain),
    /// Race to free a root (`true`: link to it first).
    Duel(Arc<Duel>, bool),
}

/// What one worker did, summed by the main thread and checked against the heap's counters.
#[derive(Default, Debug)]
struct Tally {
    ops: u64,
    double_frees: u64,
    linked_frees: u64,
    foreign_frees: u64,
    bad_parents: u64,
    duels: u64,
}

struct Worker<'h> {
    heap: &'h Heap,
    id: usize,
    rng: Rng,
    held: Vec<Chain>,
    inboxes: Vec<Sender<Msg>>,
    tally: Tally,
    next_tag: u64,
}

impl Worker<'_> {
    fn tag(&mut self) -> u64 {
        self.next_tag += 1;
        (self.id as u64) << 48 | self.next_tag
    }

    /// Allocates a root of a random size (`small`: from a slab page, never a large span) and
    /// links 0 to 47 blocks to it.
    fn alloc_chain(&mut self, small: bool) -> Chain {
        let size = if small {
            self.rng.below(1024) as usize
        } else {
            self.rng.size()
        };
        let tag = self.tag();
        let p = self.heap.allocate_buffer(size).expect("allocate_buffer");
        let mut chain = Chain {
            root: Block::new(p, size, tag),
            linked: Vec::new(),
        };
        // About half the roots get no linked block (SPEC's usage facts).
        let links = match self.rng.below(10) {
            0..=4 => 0,
            5..=8 => 1 + self.rng.below(4),
            _ => 8 + self.rng.below(40),
        };
        for _ in 0..links {
            self.link(&mut chain);
        }
        chain
    }

    fn link(&mut self, chain: &mut Chain) {
        let size = if self.rng.below(50) == 0 {
            self.rng.size()
        } else {
            self.rng.below(256) as usize
        };
        let tag = self.tag();
        let p = self
            .heap
            .allocate_more(size, chain.root.ptr)
            .expect("allocate_more to a live root");
        chain.linked.push(Block::new(p, size, tag));
    }

    fn free(&mut self, chain: Chain) {
        chain.verify();
        // SAFETY: we own the chain (consumed here) and no block of it is used afterwards.
        let outcome = unsafe { self.heap.free_buffer(chain.root.ptr) };
        assert_eq!(outcome, FreeOutcome::Freed);
    }

    /// Handles one message. With `may_allocate` false (while this worker waits for its own
    /// duel) it only frees: an allocation could hand out the duel's root again.
    fn handle(&mut self, msg: Msg, may_allocate: bool) {
        match msg {
            Msg::Chain(mut chain) => {
                chain.verify();
                // Link to another thread's root before freeing it: the chain then spans
                // pages of several threads.
                if may_allocate && self.rng.below(2) == 0 {
                    self.link(&mut chain);
                }
                self.free(chain);
            }
            Msg::Duel(duel, link_first) => {
                // The linking racer's block is never touched: the other racer may free it
                // with the chain at any moment.
                if link_first && may_allocate {
                    // Races the other racer's free: either linked before the close (and freed
                    // with the chain) or refused.
                    match self
                        .heap
                        .allocate_more(self.rng.below(64) as usize, duel.root)
                    {
                        Ok(_) => {}
                        Err(e) => {
                            assert_eq!(e, Scode::MAPI_E_INVALID_PARAMETER);
                            self.tally.bad_parents += 1;
                        }
                    }
                }
                // SAFETY: the duel's root is live until one of the two racers frees it, and its
                // address is not reused before both have returned (module docs); neither racer
                // touches the chain.
                match unsafe { self.heap.free_buffer(duel.root) } {
                    FreeOutcome::Freed => {
                        duel.freed.fetch_add(1, Ordering::Relaxed);
                    }
                    FreeOutcome::DoubleFree => self.tally.double_frees += 1,
                    other => panic!("a racing free returned {other:?}"),
                }
                // Release: pairs with the creator's Acquire load before it allocates again.
                duel.done.fetch_add(1, Ordering::Release);
            }
        }
    }

    fn step(&mut self, inbox: &Receiver<Msg>) {
        self.tally.ops += 1;
        while let Ok(msg) = inbox.try_recv() {
            self.handle(msg, true);
        }
        match self.rng.below(100) {
            // Allocate a chain, and keep it.
            0..=39 => {
                let chain = self.alloc_chain(false);
                self.held.push(chain);
            }
            // Free one of ours.
            40..=59 if !self.held.is_empty() => {
                let i = self.rng.below(self.held.len() as u64) as usize;
                let chain = self.held.swap_remove(i);
                self.free(chain);
            }
            // Link more to one we hold.
            60..=69 => {
                if let Some(i) =
                    (!self.held.is_empty()).then(|| self.rng.below(self.held.len() as u64) as usize)
                {
                    let mut chain = self.held.swap_remove(i);
                    self.link(&mut chain);
                    self.held.push(chain);
                }
            }
            // Hand one to another thread, which frees it.
            70..=84 => {
                if let Some(chain) = self.held.pop() {
                    let to = self.other();
                    // A worker that has finished still drains its inbox, so this cannot fail.
                    self.inboxes[to].send(Msg::Chain(chain)).expect("inbox");
                }
            }
            // Two threads race to free one of our roots.
            85..=89 => self.duel(inbox),
            // Misuse: a linked block, a foreign pointer, a double free.
            90..=96 => self.misuse(),
            // Give idle memory back, or let go of our pages as thread exit does.
            97 => self.heap.collect(),
            98 => self.heap.release_thread_cache(),
            _ => {}
        }
        while self.held.len() > HELD {
            let chain = self.held.swap_remove(0);
            self.free(chain);
        }
    }

    /// A worker other than this one.
    fn other(&mut self) -> usize {
        (self.id + 1 + self.rng.below(WORKERS as u64 - 1) as usize) % WORKERS
    }

    /// Creates a duel over a new root of ours (from a slab page of ours: a large span's address
    /// could come back from the OS for another thread's span before the loser's free) and waits
    /// for both racers.
    fn duel(&mut self, inbox: &Receiver<Msg>) {
        let chain = self.alloc_chain(true);
        chain.verify();
        let duel = Arc::new(Duel {
            root: chain.root.ptr,
            freed: AtomicU32::new(0),
            done: AtomicU32::new(0),
        });
        // The racers free the chain; its memory is theirs from here.
        drop(chain);
        let a = self.other();
        let b = loop {
            let b = self.other();
            if b != a {
                break b;
            }
        };
        let link_first = self.rng.below(2) == 0;
        self.inboxes[a]
            .send(Msg::Duel(Arc::clone(&duel), link_first))
            .expect("inbox");
        self.inboxes[b]
            .send(Msg::Duel(Arc::clone(&duel), false))
            .expect("inbox");
        let waiting_since = Instant::now();
        // Acquire: pairs with each racer's Release increment.
        while duel.done.load(Ordering::Acquire) < 2 {
            assert!(
                waiting_since.elapsed() < DUEL_PATIENCE,
                "a duel not finished after {DUEL_PATIENCE:?}: a racer died (see its panic)"
            );
            // Frees only while we wait: the duel's root must not be reused (module docs).
            match inbox.recv_timeout(Duration::from_millis(1)) {
                Ok(msg) => self.handle(msg, false),
                Err(_) => thread::yield_now(),
            }
        }
        assert_eq!(
            duel.freed.load(Ordering::Relaxed),
            1,
            "not exactly one racer freed the root"
        );
        self.tally.duels += 1;
    }

    fn misuse(&mut self) {
        match self.rng.below(4) {
            0 => {
                let Some(c) = self.held.iter().find(|c| !c.linked.is_empty()) else {
                    return;
                };
                let p = c.linked[0].ptr;
                // SAFETY: a linked block is never freed on its own: nothing is freed.
                let outcome = unsafe { self.heap.free_buffer(p) };
                assert_eq!(outcome, FreeOutcome::LinkedBlock);
                self.tally.linked_frees += 1;
                // Nor linked to.
                let link = self.heap.allocate_more(8, p);
                assert_eq!(link, Err(Scode::MAPI_E_INVALID_PARAMETER));
                self.tally.bad_parents += 1;
            }
            1 => {
                let mut on_stack = [0u64; 4];
                let boxed = Box::new([0u128; 2]);
                let inside = self.held.last().map(|c| c.root.ptr.wrapping_add(16));
                let pointers = [
                    on_stack.as_mut_ptr().cast::<u8>(),
                    Box::into_raw(boxed).cast::<u8>(),
                ];
                for p in pointers.into_iter().chain(inside) {
                    // SAFETY: none of these is a block start of the heap: nothing is touched.
                    let outcome = unsafe { self.heap.free_buffer(p) };
                    assert_eq!(outcome, FreeOutcome::Foreign, "{p:p}");
                    self.tally.foreign_frees += 1;
                }
                // SAFETY: made by `Box::into_raw` above and not freed by the heap.
                drop(unsafe { Box::from_raw(pointers[1].cast::<[u128; 2]>()) });
            }
            _ => {
                // A double free in one thread: a new root (from our current page, so no
                // other thread can hand its address out again, and the page stays ours
                // while it is current), freed twice with no allocation between.
                let chain = self.alloc_chain(true);
                let root = chain.root.ptr;
                self.free(chain);
                // SAFETY: a double free of a root whose address nobody can have reused (above).
                let outcome = unsafe { self.heap.free_buffer(root) };
                assert_eq!(outcome, FreeOutcome::DoubleFree);
                self.tally.double_frees += 1;
            }
        }
    }
}

#[test]
fn soak_sixteen_threads() {
    let heap = Heap::new();
    let deadline = Instant::now() + soak_duration();
    let (senders, receivers): (Vec<_>, Vec<_>) = (0..WORKERS).map(|_| channel::<Msg>()).unzip();
    let start = Barrier::new(WORKERS);
    let ops_done = AtomicU64::new(0);

    let tallies: Vec<Tally> = thread::scope(|s| {
        let workers: Vec<_> = receivers
            .into_iter()
            .enumerate()
            .map(|(id, inbox)| {
                let inboxes = senders.clone();
                let (heap, start, ops_done) = (&heap, &start, &ops_done);
                s.spawn(move || {
                    let mut w = Worker {
                        heap,
                        id,
                        rng: Rng(0x9E37_79B9_7F4A_7C15 ^ ((id as u64 + 1) * 0x1000_0001)),
                        held: Vec::new(),
                        inboxes,
                        tally: Tally::default(),
                        next_tag: 0,
                    };
                    start.wait();
                    loop {
                        let done = if cfg!(miri) {
                            w.tally.ops >= MIRI_OPS
                        } else {
                            Instant::now() >= deadline
                        };
                        if done {
                            break;
                        }
                        w.step(&inbox);
                    }
                    // Wind down: free what we hold, stop sending, then serve the inbox until
                    // every other worker has stopped sending too.
                    while let Some(chain) = w.held.pop() {
                        w.free(chain);
                    }
                    w.inboxes.clear();
                    for msg in inbox {
                        w.handle(msg, true);
                    }
                    ops_done.fetch_add(w.tally.ops, Ordering::Relaxed);
                    w.tally
                })
            })
            .collect();
        drop(senders);
        workers.into_iter().map(|w| w.join().unwrap()).collect()
    });

    let total = tallies.iter().fold(Tally::default(), |mut t, w| {
        t.ops += w.ops;
        t.double_frees += w.double_frees;
        t.linked_frees += w.linked_frees;
        t.foreign_frees += w.foreign_frees;
        t.bad_parents += w.bad_parents;
        t.duels += w.duels;
        t
    });
    let before_collect = heap.stats();
    // The first collect adopts the pages that exited workers abandoned and returns the empty
    // ones; returns deferred through the epoch may only reach the abandoned stack while it
    // runs, so a second one sweeps those too.
    heap.collect();
    heap.collect();
    let stats = heap.stats();
    eprintln!(
        "soak: {} workers, {} ops, {} duels; before collect {before_collect:?}; after {stats:?}",
        WORKERS, total.ops, total.duels
    );
    assert_eq!(
        (stats.live_roots, stats.live_blocks, stats.live_bytes),
        (0, 0, 0),
        "leak: {stats:?}"
    );
    let expected = Stats {
        double_frees: total.double_frees,
        linked_frees: total.linked_frees,
        foreign_frees: total.foreign_frees,
        bad_parents: total.bad_parents,
        ..stats
    };
    assert_eq!(
        stats, expected,
        "misuse counters disagree with the workers' tallies"
    );
    assert!(total.duels > 0 || cfg!(miri), "no duel ran");
    assert!(
        stats.os_committed_bytes <= COMMITTED_BOUND,
        "{} bytes still committed (bound {COMMITTED_BOUND})",
        stats.os_committed_bytes
    );
}
