//! Runs one engine fast path in a loop, for instruction counts under callgrind:
//!
//! ```sh
//! cargo build --release --example fast_paths
//! valgrind --tool=callgrind target/release/examples/fast_paths propset 100000
//! ```
//!
//! Shapes: `lone-root` (a 64 B root allocated and freed), `propset` (a 320 B root with 20
//! linked strings of 24-86 B, freed), `link` (links of 24-86 B to one root, 1,000 at a time),
//! `window` (roots of 16-1,024 B with 1-8 links of 16-256 B, each freed 16 roots later, as
//! the lab's churn does: every root starts a chunk and the thread lets go of an older one).
//! Divide the instructions callgrind reports by the printed block count (warm-up included)
//! to get instructions per block.

use mapialloc::lab::rng::SplitMix64;
use mapialloc::Heap;
use std::hint::black_box;

fn main() {
    let mut args = std::env::args().skip(1);
    let shape = args.next().unwrap_or_else(|| "propset".into());
    let rounds: u64 = args
        .next()
        .map_or(100_000, |n| n.parse().expect("a round count"));
    let heap = Heap::new();
    if shape == "window" {
        return window(&heap, rounds);
    }
    // Links per round; `None` for a lone root.
    let links = match shape.as_str() {
        "lone-root" => None,
        "propset" => Some(20),
        "link" => Some(1_000),
        other => panic!("unknown shape {other}: lone-root, propset, link or window"),
    };
    let mut size = 24;
    let mut blocks = 0u64;
    for _ in 0..rounds {
        let root = match links {
            None => heap.allocate_buffer(64).expect("memory"),
            Some(links) => {
                let root = heap.allocate_buffer(320).expect("memory");
                for _ in 0..links {
                    size = 24 + (size * 7 + 13) % 63; // 24-86 B, varied
                    black_box(heap.allocate_more(size, root.as_ptr()).expect("memory"));
                }
                root
            }
        };
        // SAFETY: `root` is live and neither it nor its chain is used afterwards.
        unsafe { heap.free_buffer(black_box(root.as_ptr())) };
        blocks += 1 + links.unwrap_or(0);
    }
    println!("{shape}: {blocks} blocks");
    assert_eq!(heap.stats().live_blocks, 0);
}

/// The `window` shape: `rounds` roots, each freed once 16 newer ones were built.
fn window(heap: &Heap, rounds: u64) {
    const WINDOW: usize = 16;
    let mut live = std::collections::VecDeque::with_capacity(WINDOW + 1);
    // The lab's generator, as its churn workload draws its sizes.
    let mut rng = SplitMix64::new(1);
    let mut blocks = 0u64;
    for _ in 0..rounds {
        let root = heap.allocate_buffer(rng.range(16, 1_024)).expect("memory");
        let links = rng.range(1, 8);
        for _ in 0..links {
            let size = rng.range(16, 256);
            black_box(heap.allocate_more(size, root.as_ptr()).expect("memory"));
        }
        blocks += 1 + links as u64;
        live.push_back(root);
        if live.len() > WINDOW {
            let old = live.pop_front().expect("a root");
            // SAFETY: `old` is live and neither it nor its chain is used afterwards.
            unsafe { heap.free_buffer(black_box(old.as_ptr())) };
        }
    }
    for root in live {
        // SAFETY: as above.
        unsafe { heap.free_buffer(root.as_ptr()) };
    }
    println!("window: {blocks} blocks");
    assert_eq!(heap.stats().live_blocks, 0);
}
