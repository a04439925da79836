//! What `MAPIALLOC_TRACE` costs per MAPI call: `cargo bench --bench trace_overhead`.
//!
//! The variable is read once per process, so the bench re-executes itself: children time
//! the same calls through the C exports untraced and traced (into a file in the temporary
//! directory), seven runs each, and the parent prints the fastest of each (the least
//! disturbed by other load on the machine) and the medians. Two shapes: a lone root
//! (allocate, free) and a property set (a root, 20 linked strings, one free).

use mapialloc::capi::{MAPIAllocateBuffer, MAPIAllocateMore, MAPIFreeBuffer, LPVOID, S_OK};
use std::process::Command;
use std::time::Instant;

/// Set in a child to the shape it times.
const CHILD: &str = "MAPIALLOC_TRACE_OVERHEAD_CHILD";
const RUNS: usize = 7;
/// Calls each child makes per shape (about 20 MB of trace).
const CALLS: u64 = 1_000_000;

fn allocate(size: u32) -> LPVOID {
    let mut p: LPVOID = std::ptr::null_mut();
    // SAFETY: `p` is a valid out pointer.
    assert_eq!(unsafe { MAPIAllocateBuffer(size, &mut p) }, S_OK);
    p
}

/// Times `CALLS` calls of `shape` in this process; returns ns per call.
fn time_calls(shape: &str) -> f64 {
    let (calls_per_round, round): (u64, fn()) = match shape {
        "lone-root" => (2, || {
            // SAFETY: a live root, unused after the free.
            unsafe { MAPIFreeBuffer(allocate(64)) };
        }),
        _ => (22, || {
            let root = allocate(320);
            for i in 0..20 {
                let mut p: LPVOID = std::ptr::null_mut();
                // SAFETY: `p` is a valid out pointer; `root` is live.
                assert_eq!(unsafe { MAPIAllocateMore(24 + i, root, &mut p) }, S_OK);
            }
            // SAFETY: a live root, unused after the free.
            unsafe { MAPIFreeBuffer(root) };
        }),
    };
    let rounds = CALLS / calls_per_round;
    (0..rounds / 10).for_each(|_| round()); // warm-up
    let start = Instant::now();
    (0..rounds).for_each(|_| round());
    start.elapsed().as_nanos() as f64 / (rounds * calls_per_round) as f64
}

/// Fastest and median ns per call of `RUNS` children timing `shape`, traced into `trace`
/// or not.
fn children(shape: &str, trace: Option<&std::path::Path>) -> (f64, f64) {
    let exe = std::env::current_exe().expect("this bench's executable");
    let mut runs: Vec<f64> = (0..RUNS)
        .map(|_| {
            let mut cmd = Command::new(&exe);
            cmd.env(CHILD, shape).env_remove("MAPIALLOC_TRACE");
            if let Some(trace) = trace {
                cmd.env("MAPIALLOC_TRACE", trace);
            }
            let out = cmd.output().expect("run a child");
            assert!(out.status.success(), "child failed: {out:?}");
            String::from_utf8_lossy(&out.stdout)
                .trim()
                .parse()
                .expect("a child prints ns per call")
        })
        .collect();
    runs.sort_by(f64::total_cmp);
    (runs[0], runs[RUNS / 2])
}

fn main() {
    if let Ok(shape) = std::env::var(CHILD) {
        println!("{}", time_calls(&shape));
        return;
    }
    let trace = std::env::temp_dir().join(format!("trace-overhead-{}.mtrace", std::process::id()));
    println!("ns per MAPI call, {RUNS} processes of {CALLS} calls each: fastest (median)");
    println!(
        "{:<12} {:>16} {:>16} {:>16}",
        "shape", "untraced", "traced", "overhead"
    );
    for shape in ["lone-root", "propset"] {
        let (off, off_median) = children(shape, None);
        let (on, on_median) = children(shape, Some(&trace));
        let cell = |best: f64, median: f64| format!("{best:.1} ({median:.1})");
        println!(
            "{shape:<12} {:>16} {:>16} {:>16}",
            cell(off, off_median),
            cell(on, on_median),
            format!("{:+.1} ({:+.1})", on - off, on_median - off_median)
        );
    }
    let _ = std::fs::remove_file(&trace);
}
