//! A churn-shaped MAPI program over the C exports, for recording `traces/churn.mtrace`:
//!
//! ```sh
//! MAPIALLOC_TRACE=traces/churn.mtrace cargo run --example record_churn
//! ```
//!
//! Three threads each keep a window of 64 live roots (16-1024 B, 0-8 linked blocks of
//! 16-256 B) and replace random ones; one replaced root in eight goes to the next thread,
//! which frees it. Every thread also links to one root shared by all, freed at the end.
//! Sizes come from a fixed-seed generator, so every run makes the same calls.

use mapialloc::capi::{MAPIAllocateBuffer, MAPIAllocateMore, MAPIFreeBuffer, LPVOID, S_OK};
use std::sync::mpsc;
use std::thread;

const THREADS: usize = 3;
const WINDOW: usize = 64;
const STEPS: usize = 400;

/// A root handed to another thread, which frees it.
struct Handed(LPVOID);
// SAFETY: MAPI roots may be freed from any thread; the receiver is the only user.
unsafe impl Send for Handed {}

/// xorshift64: deterministic sizes and choices.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

fn allocate(size: u64) -> LPVOID {
    let mut p: LPVOID = std::ptr::null_mut();
    // SAFETY: `p` is a valid out pointer.
    assert_eq!(unsafe { MAPIAllocateBuffer(size as u32, &mut p) }, S_OK);
    p
}

fn link(size: u64, root: LPVOID) {
    let mut p: LPVOID = std::ptr::null_mut();
    // SAFETY: `p` is a valid out pointer; `root` is a live root.
    assert_eq!(unsafe { MAPIAllocateMore(size as u32, root, &mut p) }, S_OK);
}

fn free(root: LPVOID) {
    // SAFETY: `root` is a live root that nobody uses after this.
    unsafe { MAPIFreeBuffer(root) };
}

/// A root with its linked blocks.
fn chain(rng: &mut Rng) -> LPVOID {
    let root = allocate(16 + rng.below(1009));
    for _ in 0..rng.below(9) {
        link(16 + rng.below(241), root);
    }
    root
}

fn main() {
    // An address, so that every thread may hold it: threads only pass it as `lpObject`,
    // which MAPI allows from any number of threads at once.
    let shared = allocate(320) as usize;
    let (senders, receivers): (Vec<_>, Vec<_>) =
        (0..THREADS).map(|_| mpsc::channel::<Handed>()).unzip();
    thread::scope(|scope| {
        for (t, inbox) in receivers.into_iter().enumerate() {
            let next = senders[(t + 1) % THREADS].clone();
            scope.spawn(move || {
                let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ (t as u64 + 1));
                let mut window: Vec<LPVOID> = (0..WINDOW).map(|_| chain(&mut rng)).collect();
                for step in 0..STEPS {
                    let slot = rng.below(WINDOW as u64) as usize;
                    let old = std::mem::replace(&mut window[slot], chain(&mut rng));
                    if rng.below(8) == 0 {
                        next.send(Handed(old)).expect("the next thread is alive");
                    } else {
                        free(old);
                    }
                    if step % 50 == 0 {
                        link(24, shared as LPVOID);
                    }
                    while let Ok(Handed(root)) = inbox.try_recv() {
                        free(root);
                    }
                }
                window.into_iter().for_each(free);
                drop(next);
                // Roots still on their way: the senders finish their loops first.
                for Handed(root) in inbox {
                    free(root);
                }
            });
        }
        drop(senders);
    });
    free(shared as LPVOID);
    println!("done: {THREADS} threads, {STEPS} steps each");
}
