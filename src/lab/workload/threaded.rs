//! The multithreaded workloads: roots crossing threads, a shared root, a pipeline, larson-like
//! churn and short-lived threads.

use super::shape::{self, chain, free, link, root, SendRoot};
use super::{time_rounds, Sample};
use crate::lab::rng::SplitMix64;
use crate::lab::strategy::Strategy;
use crossbeam_utils::Backoff;
use std::collections::VecDeque;
use std::ptr::NonNull;
use std::sync::atomic::{
    AtomicBool, AtomicPtr,
    Ordering::{AcqRel, Relaxed},
};
use std::sync::{mpsc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

/// Roots in flight between the two threads of `cross-thread-rowset`.
const CROSS_THREAD_QUEUE: usize = 2;
/// How long the freeing thread of `cross-thread-rowset` polls for the next root before it
/// parks. A strategy whose frees outpace its builds leaves that thread idle between roots.
/// Parking at once made every root wait for a thread wake-up (about 25 us on our 2-vCPU KVM
/// machine, several times what the engine takes to build a root), so the workload timed the
/// scheduler: the engine measured 24-27 ns/block, against 5-6 with polling. Strategies whose
/// freeing thread is the busy one rarely wait here, so polling does not move their numbers
/// (README, "Reading the table").
const CROSS_THREAD_POLL: Duration = Duration::from_micros(200);

/// 24 B blocks each thread links to the shared root per round.
pub(super) const SHARED_LINKS_PER_THREAD: u64 = 5_000;
const SHARED_LINK_SIZE: usize = 24;

/// A pipeline root: its size range, its 6 linked blocks and their sizes, and the channel bound.
const PIPELINE_ROOT_SIZES: std::ops::RangeInclusive<usize> = 16..=512;
const PIPELINE_LINKS: usize = 6;
const PIPELINE_LINK_SIZES: std::ops::RangeInclusive<usize> = 16..=128;
const PIPELINE_QUEUE: usize = 256;

/// Live roots per churn thread, their sizes, their linked blocks' count and sizes.
const CHURN_WINDOW: usize = 1_000;
const CHURN_ROOT_SIZES: std::ops::RangeInclusive<usize> = 16..=1024;
const CHURN_LINKS: std::ops::RangeInclusive<usize> = 0..=8;
const CHURN_LINK_SIZES: std::ops::RangeInclusive<usize> = 16..=256;
/// One replaced root in this many is parked in the exchange, to be freed by whichever thread
/// parks a root in its slot next.
const CHURN_HANDOFF_ONE_IN: u64 = 8;
/// Exchange slots per churn thread: roots parked there stay live, so the live set is the
/// windows plus at most this many roots per thread.
const CHURN_EXCHANGE_SLOTS_PER_THREAD: usize = 64;
/// Churn steps between looks at the clock.
const CHURN_STEPS_PER_CHECK: usize = 256;

/// Threads started per `thread-churn` round, roots each allocates, and their sizes.
pub(super) const THREAD_CHURN_THREADS: usize = 1_000;
const THREAD_CHURN_ROOTS: usize = 64;
const THREAD_CHURN_SIZES: std::ops::RangeInclusive<usize> = 16..=256;
/// Short-lived threads alive at once (the main thread frees the oldest's roots meanwhile).
const THREAD_CHURN_IN_FLIGHT: usize = 2;

/// `cross-thread-rowset`: this thread builds roots with 1,100 linked blocks; another frees them.
pub(super) fn cross_thread_rowset<S: Strategy>(s: &S, budget: Duration) -> Sample {
    let mut rng = SplitMix64::new(4);
    hand_off(
        s,
        budget,
        CROSS_THREAD_QUEUE,
        CROSS_THREAD_POLL,
        1 + shape::FLAT_ROWSET_LINKS as u64,
        1,
        || shape::flat_rowset(s, &mut rng),
    )
}

/// `pipeline`: this thread produces roots with 6 linked blocks; a consumer thread frees them.
pub(super) fn pipeline<S: Strategy>(s: &S, budget: Duration) -> Sample {
    let mut rng = SplitMix64::new(5);
    hand_off(
        s,
        budget,
        PIPELINE_QUEUE,
        // Waits at once: polling here slowed the engine (39-44 -> 46-56 ns/block) and
        // kopano-mimalloc (90-94 -> 106-112), jemalloc a little. With 256 roots queued, a
        // parked consumer wakes to a backlog and frees it in one go.
        Duration::ZERO,
        1 + PIPELINE_LINKS as u64,
        64,
        || {
            let size = rng.range(*PIPELINE_ROOT_SIZES.start(), *PIPELINE_ROOT_SIZES.end());
            chain(s, &mut rng, size, PIPELINE_LINKS, PIPELINE_LINK_SIZES)
        },
    )
}

/// Builds roots with `build` on this thread and frees them on another, through a channel of
/// `queue` roots, until `budget` has passed (looking at the clock every `batch` roots). The
/// freeing thread polls an empty channel for up to `poll` (backing off) before it parks.
fn hand_off<S: Strategy>(
    s: &S,
    budget: Duration,
    queue: usize,
    poll: Duration,
    blocks_per_root: u64,
    batch: usize,
    mut build: impl FnMut() -> NonNull<u8>,
) -> Sample {
    let start = Instant::now();
    let (tx, rx) = mpsc::sync_channel::<SendRoot>(queue);
    let mut roots = 0;
    thread::scope(|scope| {
        scope.spawn(move || {
            while let Some(SendRoot(r)) = receive(&rx, poll) {
                free(s, r);
            }
        });
        loop {
            for _ in 0..batch {
                tx.send(SendRoot(build()))
                    .expect("the freeing thread runs until the channel closes");
            }
            roots += batch as u64;
            if start.elapsed() >= budget {
                break;
            }
        }
        drop(tx);
    });
    Sample {
        blocks: roots * blocks_per_root,
        elapsed: start.elapsed(),
    }
}

/// The next message of `rx`: polled (with backoff) for up to `poll`, then waited for. `None`
/// once the sender is gone. With no poll window it just waits, and the clock is read only
/// while the channel is empty: a first version that read the clock and tried `try_recv` for
/// every message cost `pipeline` (7 blocks a root) several ns per block, every strategy.
fn receive<T>(rx: &mpsc::Receiver<T>, poll: Duration) -> Option<T> {
    if poll.is_zero() {
        return rx.recv().ok();
    }
    let backoff = Backoff::new();
    let mut give_up = None;
    loop {
        match rx.try_recv() {
            Ok(message) => return Some(message),
            Err(mpsc::TryRecvError::Disconnected) => return None,
            Err(mpsc::TryRecvError::Empty) => {
                let now = Instant::now();
                if now >= *give_up.get_or_insert(now + poll) {
                    return rx.recv().ok();
                }
                backoff.snooze();
            }
        }
    }
}

/// `shared-root`: per round, `threads` threads each link 5,000 blocks of 24 B to one root,
/// which this thread then frees.
pub(super) fn shared_root<S: Strategy>(s: &S, threads: usize, budget: Duration) -> Sample {
    // Barrier waits order everything: the root is stored before the round's first wait and
    // read after it, and the links are done before the second wait, so Relaxed is enough.
    let barrier = Barrier::new(threads + 1);
    let shared = AtomicPtr::new(std::ptr::null_mut());
    let stop = AtomicBool::new(false);
    thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| loop {
                barrier.wait();
                if stop.load(Relaxed) {
                    return;
                }
                let parent = NonNull::new(shared.load(Relaxed))
                    .expect("a root is published before each round");
                for _ in 0..SHARED_LINKS_PER_THREAD {
                    link(s, SHARED_LINK_SIZE, parent);
                }
                barrier.wait();
            });
        }
        let sample = time_rounds(budget, || {
            let parent = root(s, shape::PROPSET_ROOT);
            shared.store(parent.as_ptr(), Relaxed);
            barrier.wait();
            barrier.wait();
            free(s, parent);
            1 + threads as u64 * SHARED_LINKS_PER_THREAD
        });
        stop.store(true, Relaxed);
        barrier.wait();
        sample
    })
}

/// `churn`: larson-like. Each thread replaces random roots of its live window; one replaced
/// root in [`CHURN_HANDOFF_ONE_IN`] is parked in a shared [`Exchange`] and the root parked
/// in that slot before is freed instead, by this thread, so most such frees are of roots
/// another thread allocated.
pub(super) fn churn<S: Strategy>(s: &S, threads: usize, budget: Duration) -> Sample {
    let exchange = Exchange::new(if threads > 1 {
        threads * CHURN_EXCHANGE_SLOTS_PER_THREAD
    } else {
        0
    });
    let barrier = Barrier::new(threads + 1);
    let (blocks, start) = thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|me| {
                let worker = ChurnWorker {
                    exchange: &exchange,
                    rng: SplitMix64::new(100 + me as u64),
                };
                let barrier = &barrier;
                scope.spawn(move || worker.run(s, barrier, budget))
            })
            .collect();
        barrier.wait();
        let start = Instant::now();
        let blocks = workers
            .into_iter()
            .map(|worker| worker.join().expect("churn thread panicked"))
            .sum();
        (blocks, start)
    });
    // The roots still parked when the workers stopped.
    for r in exchange.drain() {
        free(s, r);
    }
    Sample {
        blocks,
        elapsed: start.elapsed(),
    }
}

/// Churn's hand-off between threads: a fixed array of slots, each empty or holding a root
/// that some thread parked there. Parking swaps a root in and returns the previous occupant
/// for the parking thread to free. Unlike a queue per thread, it holds the same number of
/// roots whatever the strategy's speed and however the threads are scheduled, so every
/// strategy's peak memory is measured over the same live set (README, "Reading the table").
struct Exchange {
    slots: Box<[AtomicPtr<u8>]>,
}

impl Exchange {
    fn new(slots: usize) -> Self {
        Exchange {
            slots: (0..slots)
                .map(|_| AtomicPtr::new(std::ptr::null_mut()))
                .collect(),
        }
    }

    fn slots(&self) -> usize {
        self.slots.len()
    }

    /// Parks `root` in `slot`; returns the root parked there before, if any.
    fn park(&self, slot: usize, root: NonNull<u8>) -> Option<NonNull<u8>> {
        // AcqRel: Release publishes the parking thread's writes to `root` (its header and
        // chain) to whoever takes it out; Acquire makes the previous parker's writes to the
        // returned root visible here before this thread frees it.
        NonNull::new(self.slots[slot].swap(root.as_ptr(), AcqRel))
    }

    /// The roots still parked; runs after every parking thread was joined.
    fn drain(self) -> impl Iterator<Item = NonNull<u8>> {
        self.slots
            .into_vec()
            .into_iter()
            .filter_map(|slot| NonNull::new(slot.into_inner()))
    }
}

/// One churn thread: its window's generator and the shared exchange.
struct ChurnWorker<'a> {
    exchange: &'a Exchange,
    rng: SplitMix64,
}

impl ChurnWorker<'_> {
    /// Churns until `budget` has passed since the start barrier, frees its window and
    /// returns the blocks it allocated.
    fn run<S: Strategy>(mut self, s: &S, barrier: &Barrier, budget: Duration) -> u64 {
        barrier.wait();
        let deadline = Instant::now() + budget;
        let mut blocks = 0;
        let mut window: Vec<NonNull<u8>> = (0..CHURN_WINDOW)
            .map(|_| self.new_root(s, &mut blocks))
            .collect();
        loop {
            for _ in 0..CHURN_STEPS_PER_CHECK {
                let slot = self.rng.range(0, CHURN_WINDOW - 1);
                let old = std::mem::replace(&mut window[slot], self.new_root(s, &mut blocks));
                self.retire(s, old);
            }
            if Instant::now() >= deadline {
                break;
            }
        }
        for r in window {
            free(s, r);
        }
        blocks
    }

    /// A root of 16-1024 B with 0-8 linked blocks; adds its blocks to `blocks`.
    fn new_root<S: Strategy>(&mut self, s: &S, blocks: &mut u64) -> NonNull<u8> {
        let size = self
            .rng
            .range(*CHURN_ROOT_SIZES.start(), *CHURN_ROOT_SIZES.end());
        let links = self.rng.range(*CHURN_LINKS.start(), *CHURN_LINKS.end());
        *blocks += 1 + links as u64;
        chain(s, &mut self.rng, size, links, CHURN_LINK_SIZES)
    }

    /// Frees `old`, or now and then parks it in the exchange and frees the root parked there
    /// before.
    fn retire<S: Strategy>(&mut self, s: &S, old: NonNull<u8>) {
        let slots = self.exchange.slots();
        let to_free = if slots > 0 && self.rng.one_in(CHURN_HANDOFF_ONE_IN) {
            self.exchange.park(self.rng.range(0, slots - 1), old)
        } else {
            Some(old)
        };
        if let Some(r) = to_free {
            free(s, r);
        }
    }
}

/// `thread-churn`: per round 1,000 threads start one after another, each allocates 64 roots
/// and exits; this thread frees their roots (at most two of them are alive at once).
pub(super) fn thread_churn<S: Strategy>(s: &S, budget: Duration) -> Sample {
    time_rounds(budget, || {
        thread::scope(|scope| {
            let mut in_flight = VecDeque::with_capacity(THREAD_CHURN_IN_FLIGHT + 1);
            let free_roots_of = |handle: thread::ScopedJoinHandle<'_, Vec<SendRoot>>| {
                for SendRoot(r) in handle.join().expect("short-lived thread panicked") {
                    free(s, r);
                }
            };
            for t in 0..THREAD_CHURN_THREADS {
                in_flight.push_back(scope.spawn(move || {
                    let mut rng = SplitMix64::new(t as u64);
                    (0..THREAD_CHURN_ROOTS)
                        .map(|_| {
                            SendRoot(root(
                                s,
                                rng.range(*THREAD_CHURN_SIZES.start(), *THREAD_CHURN_SIZES.end()),
                            ))
                        })
                        .collect::<Vec<_>>()
                }));
                if in_flight.len() > THREAD_CHURN_IN_FLIGHT {
                    free_roots_of(in_flight.pop_front().expect("not empty"));
                }
            }
            in_flight.into_iter().for_each(free_roots_of);
        });
        (THREAD_CHURN_THREADS * THREAD_CHURN_ROOTS) as u64
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exchange_hands_back_the_root_parked_before_and_drains_the_rest() {
        let mut roots = [1u8, 2, 3];
        let [a, b, c] = roots.each_mut().map(NonNull::from);
        let exchange = Exchange::new(2);
        assert_eq!(
            exchange.park(0, a),
            None,
            "an empty slot gives nothing back"
        );
        assert_eq!(exchange.park(1, b), None);
        assert_eq!(
            exchange.park(0, c),
            Some(a),
            "the root parked in slot 0 before"
        );
        let mut left: Vec<_> = exchange.drain().collect();
        left.sort();
        let mut expected = vec![b, c];
        expected.sort();
        assert_eq!(left, expected, "each root parked once comes out once");
    }

    #[test]
    fn receive_polls_then_waits_and_ends_when_the_sender_goes() {
        for poll in [Duration::ZERO, Duration::from_micros(50)] {
            let (tx, rx) = mpsc::sync_channel(2);
            thread::scope(|scope| {
                scope.spawn(move || {
                    tx.send(1).unwrap();
                    // Longer than the poll window: the receiver must have fallen back to
                    // waiting, and still gets the message.
                    thread::sleep(Duration::from_millis(20));
                    tx.send(2).unwrap();
                });
                assert_eq!(receive(&rx, poll), Some(1));
                assert_eq!(receive(&rx, poll), Some(2));
                assert_eq!(receive(&rx, poll), None, "the sender is gone");
            });
        }
    }
}
