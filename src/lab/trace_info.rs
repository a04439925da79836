//! `mapialloc-lab trace-info <path>`: what a trace recorded with `MAPIALLOC_TRACE` holds:
//! calls by kind and outcome, threads, roots and where they were freed, and histograms of
//! chain lengths and block sizes.

use crate::lab::workload::replay::{Op, Replay};
use crate::trace::{Call, Record, Status};
use std::fmt::Write as _;
use std::path::Path;

/// Reads the trace at `path` and returns its [`summary`].
pub fn summary_of_file(path: &Path) -> Result<String, String> {
    let records = crate::trace::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(format!("trace {}\n{}", path.display(), summary(&records)))
}

/// The human summary of `records` (as [`crate::trace::parse`] returns them).
pub fn summary(records: &[Record]) -> String {
    let mut out = String::new();
    let replay = Replay::new(records);
    let span_ns = records.iter().map(|r| r.time_ns).max().unwrap_or(0)
        - records.iter().map(|r| r.time_ns).min().unwrap_or(0);
    let _ = writeln!(
        out,
        "{} calls on {} threads over {:.3} s",
        records.len(),
        replay.threads.len(),
        span_ns as f64 / 1e9
    );

    let _ = writeln!(out, "\n  {:<20} {:>10} {:>10}", "call", "ok", "failed");
    for (call, name) in [
        (Call::AllocateBuffer, "MAPIAllocateBuffer"),
        (Call::AllocateMore, "MAPIAllocateMore"),
        (Call::FreeBuffer, "MAPIFreeBuffer"),
    ] {
        let of_call = || records.iter().filter(move |r| r.call == call);
        let ok = of_call().filter(|r| r.status == Status::Ok).count();
        let _ = writeln!(out, "  {name:<20} {ok:>10} {:>10}", of_call().count() - ok);
    }
    let mut failures: Vec<(Status, usize)> = Vec::new();
    for record in records.iter().filter(|r| r.status != Status::Ok) {
        match failures.iter_mut().find(|(s, _)| *s == record.status) {
            Some((_, n)) => *n += 1,
            None => failures.push((record.status, 1)),
        }
    }
    failures.sort();
    for (status, n) in failures {
        let _ = writeln!(out, "    failed: {status:?} x {n}");
    }

    // Which thread allocated and which freed each root.
    let mut allocated_on = vec![0; replay.roots()];
    let mut freed_elsewhere = 0;
    for (thread, ops) in replay.threads.iter().enumerate() {
        for op in ops {
            if let Op::Allocate { root, .. } = op {
                allocated_on[*root as usize] = thread;
            }
        }
    }
    for (thread, ops) in replay.threads.iter().enumerate() {
        for op in ops {
            if let Op::Free { root } = op {
                freed_elsewhere += usize::from(allocated_on[*root as usize] != thread);
            }
        }
    }
    let live = replay.freed.iter().filter(|f| !**f).count();
    let _ = writeln!(
        out,
        "\nroots: {} allocated, {live} never freed, {freed_elsewhere} freed on another thread; \
         blocks: {}; threads share a root: {}",
        replay.roots(),
        replay.blocks(),
        if replay.shares_root { "yes" } else { "no" }
    );
    let _ = writeln!(
        out,
        "\n  {:<6} {:>8} {:>8} {:>8}",
        "thread", "calls", "roots", "frees"
    );
    for (thread, ops) in replay.threads.iter().enumerate() {
        let count = |f: fn(&Op) -> bool| ops.iter().filter(|op| f(op)).count();
        let _ = writeln!(
            out,
            "  {:<6} {:>8} {:>8} {:>8}",
            thread + 1,
            ops.len(),
            count(|op| matches!(op, Op::Allocate { .. })),
            count(|op| matches!(op, Op::Free { .. })),
        );
    }

    let _ = writeln!(out, "\nchain length (linked blocks per root)");
    write_histogram(&mut out, replay.links.iter().map(|&l| u64::from(l)));
    let _ = writeln!(out, "\nsize in bytes (roots and linked blocks)");
    let sizes = replay.threads.iter().flatten().filter_map(|op| match op {
        Op::Allocate { size, .. } | Op::Link { size, .. } => Some(u64::from(*size)),
        Op::Free { .. } => None,
    });
    write_histogram(&mut out, sizes);
    out
}

/// Widest bar of a histogram, in characters.
const BAR_WIDTH: usize = 40;

/// Appends a histogram of `values` in power-of-two buckets (0, 1, 2-3, 4-7, ...), one line a
/// non-empty bucket: its range, its count and a bar.
fn write_histogram(out: &mut String, values: impl Iterator<Item = u64>) {
    // Bucket 0 holds 0; bucket k > 0 holds 2^(k-1) ..= 2^k - 1.
    let mut buckets = [0u64; 65];
    for value in values {
        buckets[(u64::BITS - value.leading_zeros()) as usize] += 1;
    }
    let most = buckets.iter().copied().max().unwrap_or(0).max(1);
    for (k, &count) in buckets.iter().enumerate().filter(|(_, &c)| c > 0) {
        let range = match k {
            0 => "0".to_owned(),
            1 => "1".to_owned(),
            k => format!("{}-{}", 1u64 << (k - 1), (1u128 << k) - 1),
        };
        let bar = "#".repeat(((count * BAR_WIDTH as u64).div_ceil(most)) as usize);
        let _ = writeln!(out, "  {range:>13} {count:>9}  {bar}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lab::workload::replay::tests::sample_trace;

    #[test]
    fn summary_of_the_sample_trace() {
        let text = summary(&sample_trace());
        assert!(text.starts_with("11 calls on 2 threads"), "{text}");
        assert!(
            text.contains("MAPIAllocateBuffer            3          0"),
            "{text}"
        );
        assert!(
            text.contains("MAPIAllocateMore              4          1"),
            "{text}"
        );
        assert!(
            text.contains("MAPIFreeBuffer                2          1"),
            "{text}"
        );
        assert!(text.contains("failed: InvalidParameter x 1"), "{text}");
        assert!(text.contains("failed: DoubleFree x 1"), "{text}");
        assert!(
            text.contains(
                "roots: 3 allocated, 1 never freed, 2 freed on another thread; blocks: 7"
            ),
            "{text}"
        );
        // Chain lengths 3, 0 and 1: one root in each of the buckets 0, 1 and 2-3.
        let chains = text.split("chain length").nth(1).unwrap();
        for bucket in [
            "            0         1",
            "            1         1",
            "          2-3         1",
        ] {
            assert!(chains.contains(bucket), "{bucket:?} in {chains}");
        }
    }

    #[test]
    fn summary_of_a_file_and_of_garbage() {
        let path = std::env::temp_dir().join(format!("trace-info-{}.mtrace", std::process::id()));
        std::fs::write(&path, crate::trace::encode(&sample_trace())).unwrap();
        let text = summary_of_file(&path).unwrap();
        std::fs::write(&path, b"garbage").unwrap();
        let error = summary_of_file(&path).unwrap_err();
        std::fs::remove_file(&path).unwrap();
        assert!(text.contains("11 calls on 2 threads"));
        assert!(error.contains("bad magic"), "{error}");
    }

    #[test]
    fn histogram_buckets_are_powers_of_two() {
        let mut out = String::new();
        write_histogram(&mut out, [0, 1, 2, 3, 4, 7, 8, u64::MAX].into_iter());
        let lines: Vec<&str> = out.lines().map(str::trim).collect();
        assert!(
            lines[0].starts_with("0 ") && lines[1].starts_with("1 "),
            "{out}"
        );
        assert!(lines[2].starts_with("2-3         2"), "{out}");
        assert!(lines[3].starts_with("4-7         2"), "{out}");
        assert!(lines
            .last()
            .unwrap()
            .starts_with("9223372036854775808-18446744073709551615"));
    }
}
