//! The report: one row per (workload, strategy, threads), ranked within each workload and
//! thread count by nanoseconds per block, with the ratio to the engine; as a table, JSON or CSV.

use crate::lab::machine::Machine;
use crate::lab::measure::{Job, JobOutput};
use crate::lab::strategy::StrategyKind;
use crate::lab::workload::{serialize_name, Workload};
use serde::Serialize;
use std::fmt::Write as _;

/// Everything a lab run found.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// Where it ran.
    pub machine: Machine,
    /// Measured jobs, grouped by workload and thread count, best first.
    pub results: Vec<ResultRow>,
    /// Jobs not measured, and why (a strategy that is not race-safe on a shared root, or a
    /// job that failed).
    pub skipped: Vec<Skip>,
}

/// One measured (workload, strategy, threads).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ResultRow {
    /// The workload (by its name in JSON and CSV).
    #[serde(serialize_with = "serialize_name")]
    pub workload: Workload,
    /// The strategy.
    pub strategy: StrategyKind,
    /// Threads the workload ran with.
    pub threads: usize,
    /// Blocks (roots plus linked) allocated and freed in the median repetition.
    pub blocks: u64,
    /// Median wall nanoseconds per block over the repetitions.
    pub ns_per_block: f64,
    /// Fastest repetition.
    pub ns_per_block_min: f64,
    /// Slowest repetition.
    pub ns_per_block_max: f64,
    /// Blocks per second at the median.
    pub blocks_per_sec: f64,
    /// Peak RSS of the job's process, KiB.
    pub peak_rss_kib: u64,
    /// RSS of the job's process after everything was freed, KiB.
    pub rss_after_kib: u64,
    /// RSS of the job's process before the first repetition, KiB (the lab's own baseline).
    pub rss_before_kib: u64,
    /// Whether the strategy is safe when threads share a root.
    pub race_safe: bool,
    /// Timed repetitions.
    pub reps: usize,
    /// Wall-time budget of each repetition, ms.
    pub rep_ms: u64,
    /// 1 for the fastest in its workload and thread count.
    pub rank: usize,
    /// `ns_per_block` divided by the engine's in the same workload and thread count (below 1:
    /// faster than the engine); absent when the engine was not run.
    pub ratio_to_engine: Option<f64>,
}

/// A job the lab did not measure.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Skip {
    /// The workload (by its name in JSON and CSV).
    #[serde(serialize_with = "serialize_name")]
    pub workload: Workload,
    /// The strategy.
    pub strategy: StrategyKind,
    /// Threads.
    pub threads: usize,
    /// Why.
    pub reason: String,
}

impl ResultRow {
    /// Summarises a child's output for `job` (unranked until [`rank`] runs).
    pub fn new(job: &Job, output: &JobOutput) -> ResultRow {
        let mut ns: Vec<f64> = output.samples.iter().map(|s| s.ns_per_block()).collect();
        ns.sort_by(f64::total_cmp);
        let mut blocks: Vec<u64> = output.samples.iter().map(|s| s.blocks).collect();
        blocks.sort_unstable();
        let ns_per_block = median(&ns);
        ResultRow {
            workload: job.workload.clone(),
            strategy: job.strategy,
            threads: job.threads,
            blocks: blocks.get(blocks.len() / 2).copied().unwrap_or(0),
            ns_per_block,
            ns_per_block_min: ns.first().copied().unwrap_or(f64::NAN),
            ns_per_block_max: ns.last().copied().unwrap_or(f64::NAN),
            blocks_per_sec: 1e9 / ns_per_block,
            peak_rss_kib: output.peak_rss_kib,
            rss_after_kib: output.rss_after_kib,
            rss_before_kib: output.rss_before_kib,
            race_safe: job.strategy.race_safe(),
            reps: output.samples.len(),
            rep_ms: job.rep_ms,
            rank: 0,
            ratio_to_engine: None,
        }
    }
}

/// The median of sorted values (the mean of the middle two for an even count).
fn median(sorted: &[f64]) -> f64 {
    match sorted.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

/// Orders rows by workload, thread count and speed, and fills in `rank` and `ratio_to_engine`.
pub fn rank(rows: &mut [ResultRow]) {
    rows.sort_by(|a, b| {
        (&a.workload, a.threads)
            .cmp(&(&b.workload, b.threads))
            .then(a.ns_per_block.total_cmp(&b.ns_per_block))
    });
    for group in rows.chunk_by_mut(|a, b| (&a.workload, a.threads) == (&b.workload, b.threads)) {
        let engine = group
            .iter()
            .find(|r| r.strategy == StrategyKind::Engine)
            .map(|r| r.ns_per_block);
        for (i, row) in group.iter_mut().enumerate() {
            row.rank = i + 1;
            row.ratio_to_engine = engine.map(|engine| row.ns_per_block / engine);
        }
    }
}

/// The prefix of a [`Skip`] reason for a job that ran and failed.
pub const FAILED: &str = "failed: ";

impl Report {
    /// Jobs that ran and failed (as opposed to being skipped by design).
    pub fn failures(&self) -> impl Iterator<Item = &Skip> {
        self.skipped.iter().filter(|s| s.reason.starts_with(FAILED))
    }

    /// The report as pretty JSON: `{"machine": {...}, "results": [...], "skipped": [...]}`.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("a report serialises")
    }

    /// The results as CSV with a header line (skipped jobs are not rows).
    pub fn to_csv(&self) -> String {
        let mut writer = csv::Writer::from_writer(Vec::new());
        for row in &self.results {
            writer.serialize(row).expect("rows serialise to memory");
        }
        String::from_utf8(writer.into_inner().expect("flushing to memory")).expect("CSV is UTF-8")
    }

    /// The human table: per workload and thread count, strategies best first.
    pub fn to_table(&self) -> String {
        let mut out = String::new();
        let mut workloads: Vec<(&Workload, usize)> = self
            .results
            .iter()
            .map(|r| (&r.workload, r.threads))
            .collect();
        workloads.extend(self.skipped.iter().map(|s| (&s.workload, s.threads)));
        workloads.sort();
        workloads.dedup();
        for (workload, threads) in workloads {
            let thread_word = if threads == 1 { "thread" } else { "threads" };
            let _ = writeln!(
                out,
                "\n{workload} ({threads} {thread_word}): {}",
                workload.description()
            );
            let _ = writeln!(
                out,
                "  {:>2}  {:<16} {:>9} {:>17} {:>10} {:>10} {:>10} {:>10}",
                "#",
                "strategy",
                "ns/block",
                "min..max",
                "Mblocks/s",
                "peak MiB",
                "after MiB",
                "vs engine"
            );
            for row in self
                .results
                .iter()
                .filter(|r| (&r.workload, r.threads) == (workload, threads))
            {
                let ratio = row
                    .ratio_to_engine
                    .map_or_else(|| "-".to_owned(), |r| format!("{r:.2}x"));
                let _ = writeln!(
                    out,
                    "  {:>2}  {:<16} {:>9.1} {:>17} {:>10.1} {:>10.1} {:>10.1} {:>10}",
                    row.rank,
                    row.strategy.name(),
                    row.ns_per_block,
                    format!("{:.1}..{:.1}", row.ns_per_block_min, row.ns_per_block_max),
                    row.blocks_per_sec / 1e6,
                    row.peak_rss_kib as f64 / 1024.0,
                    row.rss_after_kib as f64 / 1024.0,
                    ratio
                );
            }
            for skip in self
                .skipped
                .iter()
                .filter(|s| (&s.workload, s.threads) == (workload, threads))
            {
                let _ = writeln!(
                    out,
                    "   -  {:<16} skipped: {}",
                    skip.strategy.name(),
                    skip.reason
                );
            }
        }
        out
    }
}

/// How to read the table, printed under it.
pub const TABLE_LEGEND: &str = "\
ns/block: median wall time per block (roots + linked) over the repetitions, min..max beside it.
vs engine: ns/block over the engine's in the same run (below 1.00x: faster than the engine).
peak / after MiB: the job's own process (peak RSS; RSS once everything was freed), lab included.
Compare ratios within one run; absolute times move with the machine and its other load.";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lab::measure::RepSample;
    use crate::lab::workload::WorkloadKind;

    fn row(strategy: StrategyKind, threads: usize, ns: f64) -> ResultRow {
        let job = Job {
            workload: WorkloadKind::Churn.into(),
            strategy,
            threads,
            reps: 1,
            warmups: 0,
            rep_ms: 1,
        };
        let output = JobOutput {
            samples: vec![RepSample {
                blocks: 1000,
                nanos: (ns * 1000.0) as u64,
            }],
            rss_before_kib: 1,
            peak_rss_kib: 2,
            rss_after_kib: 1,
        };
        ResultRow::new(&job, &output)
    }

    fn report(results: Vec<ResultRow>) -> Report {
        Report {
            machine: Machine::detect(),
            results,
            skipped: Vec::new(),
        }
    }

    #[test]
    fn median_min_max_of_the_repetitions() {
        let job = Job {
            workload: WorkloadKind::Propset.into(),
            strategy: StrategyKind::Wine,
            threads: 1,
            reps: 3,
            warmups: 0,
            rep_ms: 1,
        };
        let samples = [30, 10, 20]
            .map(|nanos| RepSample { blocks: 10, nanos })
            .to_vec();
        let output = JobOutput {
            samples,
            rss_before_kib: 0,
            peak_rss_kib: 0,
            rss_after_kib: 0,
        };
        let row = ResultRow::new(&job, &output);
        assert_eq!(
            (row.ns_per_block, row.ns_per_block_min, row.ns_per_block_max),
            (2.0, 1.0, 3.0)
        );
        assert_eq!(row.blocks_per_sec, 5e8);
        assert!(!row.race_safe);
        assert_eq!(median(&[1.0, 2.0, 3.0, 10.0]), 2.5);
    }

    #[test]
    fn ranks_per_thread_count_with_ratios_to_the_engine() {
        let mut rows = vec![
            row(StrategyKind::Wine, 2, 30.0),
            row(StrategyKind::Engine, 2, 20.0),
            row(StrategyKind::Arena, 2, 10.0),
            row(StrategyKind::Engine, 1, 5.0),
            row(StrategyKind::Arena, 1, 6.0),
        ];
        rank(&mut rows);
        let order: Vec<_> = rows
            .iter()
            .map(|r| (r.threads, r.strategy, r.rank, r.ratio_to_engine))
            .collect();
        assert_eq!(
            order,
            [
                (1, StrategyKind::Engine, 1, Some(1.0)),
                (1, StrategyKind::Arena, 2, Some(1.2)),
                (2, StrategyKind::Arena, 1, Some(0.5)),
                (2, StrategyKind::Engine, 2, Some(1.0)),
                (2, StrategyKind::Wine, 3, Some(1.5)),
            ]
        );
    }

    #[test]
    fn no_ratio_without_the_engine() {
        let mut rows = vec![row(StrategyKind::Wine, 1, 3.0)];
        rank(&mut rows);
        assert_eq!((rows[0].rank, rows[0].ratio_to_engine), (1, None));
    }

    #[test]
    fn json_has_the_documented_shape() {
        let mut rows = vec![row(StrategyKind::Engine, 2, 20.0)];
        rank(&mut rows);
        let mut report = report(rows);
        report.skipped.push(Skip {
            workload: WorkloadKind::SharedRoot.into(),
            strategy: StrategyKind::Wine,
            threads: 2,
            reason: "not race-safe".into(),
        });
        let json: serde_json::Value = serde_json::from_str(&report.to_json()).unwrap();
        for key in ["cpu", "cores", "kernel", "rustc", "lab_version"] {
            assert!(json["machine"].get(key).is_some(), "machine.{key}");
        }
        let result = &json["results"][0];
        for key in [
            "workload",
            "strategy",
            "threads",
            "blocks",
            "ns_per_block",
            "blocks_per_sec",
            "peak_rss_kib",
            "rss_after_kib",
            "race_safe",
            "ns_per_block_min",
            "ns_per_block_max",
            "rank",
            "ratio_to_engine",
        ] {
            assert!(result.get(key).is_some(), "results[].{key}");
        }
        assert_eq!(result["workload"], "churn");
        assert_eq!(result["strategy"], "engine");
        assert_eq!(json["skipped"][0]["strategy"], "wine");
    }

    #[test]
    fn csv_has_a_header_and_one_line_per_row() {
        let mut rows = vec![
            row(StrategyKind::Engine, 1, 5.0),
            row(StrategyKind::KopanoGlibc, 1, 6.0),
        ];
        rank(&mut rows);
        let csv = report(rows).to_csv();
        let lines: Vec<_> = csv.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[0].starts_with("workload,strategy,threads,blocks,ns_per_block,"));
        assert!(lines[2].starts_with("churn,kopano-glibc,1,1000,6.0,"));
    }

    #[test]
    fn table_ranks_and_names_skips() {
        let mut rows = vec![
            row(StrategyKind::Engine, 2, 20.0),
            row(StrategyKind::Arena, 2, 10.0),
        ];
        rank(&mut rows);
        let mut report = report(rows);
        report.skipped.push(Skip {
            workload: WorkloadKind::Churn.into(),
            strategy: StrategyKind::Wine,
            threads: 2,
            reason: "not race-safe".into(),
        });
        let table = report.to_table();
        assert!(
            table.contains(" 1  arena ") && table.contains(" 2  engine "),
            "{table}"
        );
        assert!(table.contains("0.50x") && table.contains("skipped: not race-safe"));
    }
}
