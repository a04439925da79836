//! `replay:<file stem>`: a recorded trace ([`crate::trace`]) replayed on a strategy with its
//! original thread structure.
//!
//! Each traced thread becomes a replay thread running that thread's calls in order, as fast
//! as it can (the trace's timing is not reproduced). Calls that failed in the trace (bad
//! parents, double frees, out of memory) are not replayed: a strategy need not survive
//! misuse. Roots are told apart by address *and* time: records are put in time order (see
//! the trace's module docs for why that order is the order of effects), and an address
//! names the latest root allocated at it.
//!
//! Roots cross threads through a slot per root: the allocating thread stores the new root
//! (Release), and a thread that links to or frees it waits until the slot is filled
//! (Acquire). A free also waits until every link the trace made to the root before the free
//! is done, so no strategy sees a link race its free. Every wait is for a call earlier in
//! the time order, so the replay cannot deadlock. Roots the trace never freed are freed at
//! the end of each round, so that every strategy ends empty.

use super::shape::{free, link, root};
use super::{time_rounds, Sample};
use crate::lab::strategy::Strategy;
use crate::trace::{Call, Record, Status};
use std::collections::HashMap;
use std::path::Path;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicPtr, AtomicU32, Ordering};
use std::thread;
use std::time::Duration;

/// One replayed call; roots are numbered in allocation order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// `MAPIAllocateBuffer(size)`, making root `root`.
    Allocate {
        /// The root's number.
        root: u32,
        /// Bytes.
        size: u32,
    },
    /// `MAPIAllocateMore(size, root)`.
    Link {
        /// The root's number.
        root: u32,
        /// Bytes.
        size: u32,
    },
    /// `MAPIFreeBuffer(root)`.
    Free {
        /// The root's number.
        root: u32,
    },
}

/// A trace turned into per-thread call lists.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Replay {
    /// Per traced thread (in order of first call), its calls in order.
    pub threads: Vec<Vec<Op>>,
    /// Linked blocks of each root, by root number.
    pub links: Vec<u32>,
    /// Whether each root was freed in the trace, by root number.
    pub freed: Vec<bool>,
    /// True when some root got linked blocks from more than one thread (strategies that are
    /// not race-safe cannot replay it).
    pub shares_root: bool,
    /// Calls not replayed because they failed in the trace.
    pub failed_calls: u64,
}

impl Replay {
    /// Reads the trace at `path` and builds its replay.
    pub fn load(path: &Path) -> Result<Replay, String> {
        let records = crate::trace::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(Replay::new(&records))
    }

    /// Builds the replay of `records` (in file order, as [`crate::trace::parse`] returns them).
    pub fn new(records: &[Record]) -> Replay {
        let mut in_time_order: Vec<&Record> = records.iter().collect();
        // Stable: a thread's records keep their order when two have the same time.
        in_time_order.sort_by_key(|r| r.time_ns);
        let mut replay = Replay {
            threads: Vec::new(),
            links: Vec::new(),
            freed: Vec::new(),
            shares_root: false,
            failed_calls: 0,
        };
        let mut thread_index: HashMap<u32, usize> = HashMap::new();
        let mut live: HashMap<u64, u32> = HashMap::new();
        let mut linker: Vec<Option<usize>> = Vec::new();
        for record in in_time_order {
            let next = thread_index.len();
            let thread = *thread_index.entry(record.thread).or_insert(next);
            if thread == replay.threads.len() {
                replay.threads.push(Vec::new());
            }
            let target = live.get(&record.pointer).copied();
            let op = match (record.call, record.status, target) {
                (Call::AllocateBuffer, Status::Ok, _) => {
                    let root = replay.links.len() as u32;
                    replay.links.push(0);
                    replay.freed.push(false);
                    linker.push(None);
                    live.insert(record.pointer, root);
                    Op::Allocate {
                        root,
                        size: record.size,
                    }
                }
                (Call::AllocateMore, Status::Ok, Some(root)) => {
                    replay.links[root as usize] += 1;
                    let first = linker[root as usize].get_or_insert(thread);
                    replay.shares_root |= *first != thread;
                    Op::Link {
                        root,
                        size: record.size,
                    }
                }
                (Call::FreeBuffer, Status::Ok, Some(root)) => {
                    live.remove(&record.pointer);
                    replay.freed[root as usize] = true;
                    Op::Free { root }
                }
                _ => {
                    replay.failed_calls += 1;
                    continue;
                }
            };
            replay.threads[thread].push(op);
        }
        replay
    }

    /// Roots the trace allocated.
    pub fn roots(&self) -> usize {
        self.links.len()
    }

    /// Blocks one round allocates: roots plus linked blocks.
    pub fn blocks(&self) -> u64 {
        self.roots() as u64 + self.links.iter().map(|&l| u64::from(l)).sum::<u64>()
    }

    /// Replays the trace on `strategy` until `budget` has passed (at least once).
    pub fn run<S: Strategy>(&self, strategy: &S, budget: Duration) -> Sample {
        time_rounds(budget, || self.round(strategy))
    }

    /// One replay of the whole trace; returns the blocks allocated.
    fn round<S: Strategy>(&self, s: &S) -> u64 {
        let slots: Vec<AtomicPtr<u8>> = (0..self.roots())
            .map(|_| AtomicPtr::new(std::ptr::null_mut()))
            .collect();
        let links_done: Vec<AtomicU32> = (0..self.roots()).map(|_| AtomicU32::new(0)).collect();
        // Acquire: pairs with the Release store of the allocating thread.
        let wait_for_root = |r: u32| loop {
            if let Some(p) = NonNull::new(slots[r as usize].load(Ordering::Acquire)) {
                return p;
            }
            thread::yield_now();
        };
        thread::scope(|scope| {
            for ops in &self.threads {
                let (slots, links_done, wait_for_root) = (&slots, &links_done, &wait_for_root);
                scope.spawn(move || {
                    for &op in ops {
                        match op {
                            Op::Allocate { root: r, size } => {
                                let p = root(s, size as usize);
                                // Release: pairs with the Acquire load in `wait_for_root`.
                                slots[r as usize].store(p.as_ptr(), Ordering::Release);
                            }
                            Op::Link { root: r, size } => {
                                link(s, size as usize, wait_for_root(r));
                                // Release: pairs with the Acquire load of the freeing thread.
                                links_done[r as usize].fetch_add(1, Ordering::Release);
                            }
                            Op::Free { root: r } => {
                                let p = wait_for_root(r);
                                // Acquire: pairs with the linking threads' Release increments,
                                // so their links happen before the free.
                                while links_done[r as usize].load(Ordering::Acquire)
                                    < self.links[r as usize]
                                {
                                    thread::yield_now();
                                }
                                free(s, p);
                            }
                        }
                    }
                });
            }
        });
        // Every replay thread has joined: the roots the trace left live are this thread's.
        for (slot, _) in slots.iter().zip(&self.freed).filter(|(_, &freed)| !freed) {
            if let Some(p) = NonNull::new(slot.load(Ordering::Relaxed)) {
                free(s, p);
            }
        }
        self.blocks()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::lab::strategy::{StrategyKind, Visit};

    fn rec(thread: u32, call: Call, status: Status, time_ns: u64, pointer: u64) -> Record {
        let size = (time_ns * 8) as u32;
        Record {
            thread,
            call,
            status,
            size,
            time_ns,
            pointer,
        }
    }

    /// A small two-thread trace: thread 1 builds roots, thread 2 frees them (and links to
    /// one); an address is reused after its free; one root leaks; a bad link and a double
    /// free fail. Times are ns.
    pub(crate) fn sample_trace() -> Vec<Record> {
        use Call::{AllocateBuffer as Buffer, AllocateMore as More, FreeBuffer as Free};
        use Status::{DoubleFree, InvalidParameter, Ok as Done};
        vec![
            rec(1, Buffer, Done, 10, 0xA0),
            rec(1, More, Done, 11, 0xA0),
            rec(1, More, Done, 12, 0xA0),
            rec(1, Buffer, Done, 13, 0xB0), // never freed
            rec(1, More, InvalidParameter, 14, 0xDEAD),
            rec(1, More, Done, 20, 0xA0),
            rec(1, Buffer, Done, 40, 0xA0), // reuses 0xA0 after its free at 30
            rec(2, Free, Done, 30, 0xA0),
            rec(2, Free, DoubleFree, 31, 0xA0),
            rec(2, More, Done, 50, 0xA0), // the second root at 0xA0
            rec(2, Free, Done, 60, 0xA0),
        ]
    }

    #[test]
    fn roots_are_told_apart_by_address_and_time() {
        let replay = Replay::new(&sample_trace());
        assert_eq!(replay.roots(), 3);
        assert_eq!(replay.links, [3, 0, 1]);
        assert_eq!(replay.freed, [true, false, true]);
        assert_eq!(replay.blocks(), 3 + 4);
        assert_eq!(replay.failed_calls, 2);
        assert!(!replay.shares_root);
        assert_eq!(
            replay.threads[1],
            [
                Op::Free { root: 0 },
                Op::Link { root: 2, size: 400 },
                Op::Free { root: 2 },
            ]
        );
    }

    #[test]
    fn links_from_two_threads_to_one_root_share_it() {
        let records = [
            rec(1, Call::AllocateBuffer, Status::Ok, 1, 0xA0),
            rec(1, Call::AllocateMore, Status::Ok, 2, 0xA0),
            rec(2, Call::AllocateMore, Status::Ok, 3, 0xA0),
        ];
        assert!(Replay::new(&records).shares_root);
    }

    /// Replays the sample trace (from its encoded form) on a strategy and checks it counted
    /// every block and left nothing live.
    struct ReplayOnEvery(Replay);

    impl Visit for ReplayOnEvery {
        type Output = ();
        fn visit<S: Strategy>(self) {
            let strategy = S::new();
            for _ in 0..20 {
                let sample = self.0.run(&strategy, Duration::ZERO);
                assert_eq!(sample.blocks, self.0.blocks(), "{}", S::NAME);
            }
            assert_eq!(strategy.live_blocks().unwrap_or(0), 0, "{} leaked", S::NAME);
        }
    }

    #[test]
    fn the_checked_in_traces_replay_on_the_engine() {
        let traces = Path::new(env!("CARGO_MANIFEST_DIR")).join("traces");
        for (name, threads) in [("provider", 2), ("churn", 4)] {
            let replay = Replay::load(&traces.join(name).with_extension("mtrace")).unwrap();
            assert_eq!(replay.threads.len(), threads, "{name}");
            assert_eq!(replay.failed_calls, 0, "{name}");
            StrategyKind::Engine.visit(ReplayOnEvery(replay));
        }
    }

    #[test]
    fn a_trace_replays_on_every_strategy() {
        let records = crate::trace::parse(&crate::trace::encode(&sample_trace())).unwrap();
        let replay = Replay::new(&records);
        for &kind in StrategyKind::all() {
            kind.visit(ReplayOnEvery(replay.clone()));
        }
    }
}
