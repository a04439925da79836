//! Property tests: proptest generates programs of allocate / link / free /
//! free-on-another-thread / misuse, runs them on a fresh heap and checks every step against
//! a model that is only bookkeeping: which chains are live, and what each counter should say.
//!
//! Checked after every step: contents (each block holds its own pattern until its chain is
//! freed, verified at the free), no overlap among live blocks, and `live_roots`,
//! `live_blocks` and the misuse counters equal to the model's; `live_bytes` at least the
//! bytes asked for and zero when nothing is live; `remote_frees` no more than the blocks freed
//! by the other thread, and at least those of them up to [`SURELY_SLAB`] bytes (whether a
//! large block's own span counts as remote is the engine's choice).
//!
//! Misuse of a freed root is only defined while its block has not been handed out again, so
//! the model keeps freed roots, and skips misuse on one whose address a live block now has.
//! A freed root whose page has since fallen empty may be answered as foreign rather than as a
//! double free (both are misuse, counted once, nothing freed); the model accepts either and
//! counts the one the engine gave. `spec` pins the strict answer where the page is known live.

use crate::support::{scaled, Chain, Counts};
use mapialloc::{FreeOutcome, Heap, Scode};
use proptest::prelude::*;
use proptest::sample::Index;
use std::collections::BTreeMap;
use std::sync::mpsc;
use std::thread;

/// Blocks up to this size come from slab pages in any class table the DESIGN allows (16-byte
/// granularity at the small end, geometric above), so a free by a thread that owns no page
/// is a remote free.
const SURELY_SLAB: usize = 1024;

#[derive(Clone, Debug)]
enum Op {
    /// Allocate a root of this size.
    Alloc(usize),
    /// Link a block of this size to a live root.
    Link(Index, usize),
    /// Free a live root on this thread.
    Free(Index),
    /// Free a live root on the worker thread, which owns no page.
    FreeOnOtherThread(Index),
    /// Free a freed root again.
    DoubleFree(Index),
    /// Free a live linked block.
    FreeLinked(Index),
    /// Link to a freed root.
    LinkToFreed(Index, usize),
    /// Link to a live linked block.
    LinkToLinked(Index, usize),
    /// Free a pointer into a live root, at this offset modulo its size.
    FreeInterior(Index, usize),
}

/// Mostly small blocks, some medium, a few past the largest size class.
fn size() -> impl Strategy<Value = usize> {
    prop_oneof![
        8 => 0..=256usize,
        3 => 257..=8192usize,
        1 => 8193..=300_000usize,
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => size().prop_map(Op::Alloc),
        6 => (any::<Index>(), size()).prop_map(|(i, n)| Op::Link(i, n)),
        3 => any::<Index>().prop_map(Op::Free),
        2 => any::<Index>().prop_map(Op::FreeOnOtherThread),
        1 => any::<Index>().prop_map(Op::DoubleFree),
        1 => any::<Index>().prop_map(Op::FreeLinked),
        1 => (any::<Index>(), size()).prop_map(|(i, n)| Op::LinkToFreed(i, n)),
        1 => (any::<Index>(), size()).prop_map(|(i, n)| Op::LinkToLinked(i, n)),
        1 => (any::<Index>(), any::<usize>()).prop_map(|(i, n)| Op::FreeInterior(i, n)),
    ]
}

/// A chain sent to the worker thread, and where to send what its free returned.
type Job<'h> = (Chain<'h>, mpsc::Sender<FreeOutcome>);

/// The model: the live chains, the freed roots, and the counters as they should read.
struct Model<'h> {
    heap: &'h Heap,
    live: Vec<Chain<'h>>,
    /// Address of every live block (start -> end of its range), for the overlap check.
    ranges: BTreeMap<usize, usize>,
    freed: Vec<*mut u8>,
    expect: Counts,
    /// Blocks freed by the worker thread: all of them, and those of at most [`SURELY_SLAB`].
    remote_blocks: u64,
    remote_slab_blocks: u64,
    next_tag: u64,
    worker: mpsc::Sender<Job<'h>>,
}

impl<'h> Model<'h> {
    fn tag(&mut self) -> u64 {
        self.next_tag += 1;
        self.next_tag
    }

    /// Records a new live block's range, failing if it overlaps a live one.
    fn add_range(&mut self, r: std::ops::Range<usize>) -> Result<(), TestCaseError> {
        if let Some((&start, &end)) = self.ranges.range(..r.end).next_back() {
            prop_assert!(
                end <= r.start,
                "new block {:#x}..{:#x} overlaps live {start:#x}..{end:#x}",
                r.start,
                r.end
            );
        }
        self.ranges.insert(r.start, r.end);
        Ok(())
    }

    /// Takes the live chain at `k` out of the model, with its blocks' ranges, and records
    /// it as freed (the caller frees it).
    fn take_live(&mut self, k: usize) -> Chain<'h> {
        let chain = self.live.swap_remove(k);
        for block in chain.blocks() {
            self.ranges.remove(&block.range().start);
        }
        self.expect.live_roots -= 1;
        self.expect.live_blocks -= chain.block_count();
        self.freed.push(chain.root().ptr());
        chain
    }

    /// The index of a live chain, if there is one.
    fn live_index(&self, i: &Index) -> Option<usize> {
        (!self.live.is_empty()).then(|| i.index(self.live.len()))
    }

    /// A freed root that misuse is still defined on: its address is no live block's.
    fn freed_root(&self, i: &Index) -> Option<*mut u8> {
        if self.freed.is_empty() {
            return None;
        }
        let p = self.freed[i.index(self.freed.len())];
        (!self.ranges.contains_key(&(p as usize))).then_some(p)
    }

    fn linked_block(&self, i: &Index) -> Option<*mut u8> {
        let all: Vec<_> = self.live.iter().flat_map(Chain::linked).collect();
        (!all.is_empty()).then(|| all[i.index(all.len())].ptr())
    }

    fn run(&mut self, op: &Op) -> Result<(), TestCaseError> {
        let heap = self.heap;
        match op {
            Op::Alloc(len) => {
                let tag = self.tag();
                let chain = Chain::new(heap, *len, tag);
                self.add_range(chain.root().range())?;
                self.expect.live_roots += 1;
                self.expect.live_blocks += 1;
                self.live.push(chain);
            }
            Op::Link(i, len) => {
                if let Some(k) = self.live_index(i) {
                    let tag = self.tag();
                    let range = self.live[k].link(*len, tag).range();
                    self.add_range(range)?;
                    self.expect.live_blocks += 1;
                }
            }
            Op::Free(i) => {
                if let Some(k) = self.live_index(i) {
                    let chain = self.take_live(k);
                    prop_assert_eq!(chain.free(), FreeOutcome::Freed);
                }
            }
            Op::FreeOnOtherThread(i) => {
                if let Some(k) = self.live_index(i) {
                    let chain = self.take_live(k);
                    self.remote_blocks += chain.block_count();
                    // Small linked blocks are carved from chunks, which go back as one block:
                    // only the root surely counts on its own.
                    let slab = chain.root().len() <= SURELY_SLAB;
                    self.remote_slab_blocks += u64::from(slab);
                    let (tx, rx) = mpsc::channel();
                    self.worker.send((chain, tx)).expect("worker alive");
                    prop_assert_eq!(rx.recv().expect("worker panicked"), FreeOutcome::Freed);
                }
            }
            Op::DoubleFree(i) => {
                if let Some(p) = self.freed_root(i) {
                    // SAFETY: `p` was freed and its address is no live block's, so the call
                    // frees nothing (that is what is checked) and no live block is touched.
                    match unsafe { heap.free_buffer(p) } {
                        FreeOutcome::DoubleFree => self.expect.double_frees += 1,
                        FreeOutcome::Foreign => self.expect.foreign_frees += 1,
                        other => {
                            let msg = format!("double free answered {other:?}");
                            return Err(TestCaseError::fail(msg));
                        }
                    }
                }
            }
            Op::FreeLinked(i) => {
                if let Some(p) = self.linked_block(i) {
                    // SAFETY: `p` is a linked block, which `free_buffer` never frees on its own,
                    // so the chain it belongs to stays usable.
                    prop_assert_eq!(unsafe { heap.free_buffer(p) }, FreeOutcome::LinkedBlock);
                    self.expect.linked_frees += 1;
                }
            }
            Op::LinkToFreed(i, len) => {
                if let Some(p) = self.freed_root(i) {
                    prop_assert_eq!(
                        heap.allocate_more(*len, p),
                        Err(Scode::MAPI_E_INVALID_PARAMETER)
                    );
                    self.expect.bad_parents += 1;
                }
            }
            Op::LinkToLinked(i, len) => {
                if let Some(p) = self.linked_block(i) {
                    prop_assert_eq!(
                        heap.allocate_more(*len, p),
                        Err(Scode::MAPI_E_INVALID_PARAMETER)
                    );
                    self.expect.bad_parents += 1;
                }
            }
            Op::FreeInterior(i, off) => {
                let root = self.live_index(i).map(|k| self.live[k].root());
                if let Some(root) = root.filter(|r| r.len() > 1) {
                    let p = root.ptr().wrapping_add(1 + off % (root.len() - 1));
                    // SAFETY: `p` points inside a live root, at no block start, so the call
                    // frees nothing and the root stays usable.
                    prop_assert_eq!(unsafe { heap.free_buffer(p) }, FreeOutcome::Foreign);
                    self.expect.foreign_frees += 1;
                }
            }
        }
        self.check()
    }

    /// The counters against the model.
    fn check(&self) -> Result<(), TestCaseError> {
        let stats = self.heap.stats();
        prop_assert_eq!(Counts::from(stats), self.expect);
        let requested: u64 = self.live.iter().map(Chain::requested_bytes).sum();
        prop_assert!(stats.live_bytes >= requested);
        if self.live.is_empty() {
            prop_assert_eq!(stats.live_bytes, 0);
        }
        prop_assert!(
            (self.remote_slab_blocks..=self.remote_blocks).contains(&stats.remote_frees),
            "remote_frees {} outside {}..={}",
            stats.remote_frees,
            self.remote_slab_blocks,
            self.remote_blocks
        );
        Ok(())
    }
}

/// Runs one program on a fresh heap, with a worker thread for the remote frees, then frees
/// whatever is still live and checks the heap is empty.
fn run_program(ops: &[Op]) -> Result<(), TestCaseError> {
    let heap = Heap::new();
    let (jobs, inbox) = mpsc::channel::<Job<'_>>();
    thread::scope(|s| {
        s.spawn(move || {
            for (chain, reply) in inbox {
                let _ = reply.send(chain.free()); // verifies contents first
            }
        });
        let mut model = Model {
            heap: &heap,
            live: Vec::new(),
            ranges: BTreeMap::new(),
            freed: Vec::new(),
            expect: Counts::default(),
            remote_blocks: 0,
            remote_slab_blocks: 0,
            next_tag: 0,
            worker: jobs,
        };
        for op in ops {
            model.run(op)?;
        }
        while !model.live.is_empty() {
            let chain = model.take_live(model.live.len() - 1);
            prop_assert_eq!(chain.free(), FreeOutcome::Freed);
        }
        model.check()?;
        prop_assert_eq!(model.expect.live_blocks, 0);
        Ok(())
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(scaled(96, 2) as u32))]

    #[test]
    fn programs_match_the_model(ops in prop::collection::vec(op(), 1..80)) {
        run_program(&ops)?;
    }
}
