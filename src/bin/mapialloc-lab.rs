//! `mapialloc-lab`: runs the provider workloads on every allocator strategy and prints who
//! wins, by how much, at what memory. `cargo run --release --bin mapialloc-lab`.

use clap::{Parser, Subcommand, ValueEnum};
use mapialloc::lab::chart;
use mapialloc::lab::measure::{self, CHILD_COMMAND};
use mapialloc::lab::report::{Report, TABLE_LEGEND};
use mapialloc::lab::run::{self, Settings};
use mapialloc::lab::strategy::StrategyKind;
use mapialloc::lab::trace_info;
use mapialloc::lab::workload::{Workload, WorkloadKind};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

/// Benchmarks MAPI allocator strategies on provider-shaped workloads.
///
/// Each (workload, strategy, threads) runs in a child process of its own, 3 timed
/// repetitions; the table ranks strategies per workload by median ns per block, with the
/// ratio to the engine and the process's peak and final RSS.
#[derive(Debug, Parser)]
#[command(
    version,
    after_help = "The talloc strategy needs libtalloc-dev and `--features talloc`.\nCompare ratios within one run: absolute times move with the machine and its load."
)]
struct Cli {
    /// Short repetitions (10 ms, no warm-up): a smoke test in seconds, noisier numbers.
    #[arg(long)]
    quick: bool,

    /// Output format (to stdout; progress goes to stderr).
    #[arg(long, value_enum, default_value_t = Format::Table)]
    format: Format,

    /// Also write one SVG chart per workload into this directory.
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,

    /// Workloads to run (default: all).
    #[arg(long, value_enum, value_delimiter = ',', value_name = "LIST")]
    workloads: Vec<WorkloadKind>,

    /// Strategies to run (default: all built in).
    #[arg(long, value_enum, value_delimiter = ',', value_name = "LIST")]
    strategies: Vec<StrategyKind>,

    /// Thread counts for shared-root and churn (default: 2 for shared-root, 1,2,16 for churn).
    #[arg(long, value_delimiter = ',', value_name = "N", value_parser = clap::value_parser!(u16).range(1..=256))]
    threads: Vec<u16>,

    /// Timed repetitions per job.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..))]
    reps: u16,

    /// Print the workloads and strategies, then exit.
    #[arg(long)]
    list: bool,

    /// Replay this trace (from MAPIALLOC_TRACE) on every strategy, as the workload
    /// `replay:<file stem>`; repeatable. Built-in workloads then run only when --workloads
    /// names them.
    #[arg(long, value_name = "TRACE")]
    replay: Vec<PathBuf>,

    #[command(subcommand)]
    child: Option<Child>,
}

/// How the report is printed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Format {
    /// Per workload, strategies ranked, for people.
    Table,
    /// `{"machine": {...}, "results": [...], "skipped": [...]}`.
    Json,
    /// One line per result, with a header.
    Csv,
}

/// Subcommands: a trace summary, and the child side of a measurement (the lab re-executes
/// itself to measure each job in a process of its own).
#[derive(Debug, Subcommand)]
enum Child {
    /// Summarises a trace written by MAPIALLOC_TRACE: calls by kind, threads, chain lengths
    /// and sizes.
    TraceInfo {
        /// The trace file.
        path: PathBuf,
    },
    /// Runs one job (given as JSON) and prints its measurements as JSON.
    #[command(name = CHILD_COMMAND, hide = true)]
    RunJob {
        /// The job, as JSON.
        job: String,
    },
}

impl Cli {
    /// The run these arguments ask for.
    fn settings(&self) -> Settings {
        let base = if self.quick {
            Settings::quick()
        } else {
            Settings::full()
        };
        Settings {
            workloads: if self.workloads.is_empty() && !self.replay.is_empty() {
                Vec::new()
            } else if self.workloads.is_empty() {
                base.workloads
            } else {
                self.workloads.clone()
            },
            strategies: if self.strategies.is_empty() {
                base.strategies
            } else {
                self.strategies.clone()
            },
            threads: (!self.threads.is_empty())
                .then(|| self.threads.iter().map(|&t| usize::from(t)).collect()),
            reps: usize::from(self.reps),
            replays: self.replay.clone(),
            ..base
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let subcommand = match &cli.child {
        Some(Child::RunJob { job }) => Some(measure::child_main(job)),
        Some(Child::TraceInfo { path }) => Some(trace_info::summary_of_file(path)),
        None => None,
    };
    if let Some(result) = subcommand {
        return match result {
            Ok(text) => {
                println!("{text}");
                ExitCode::SUCCESS
            }
            Err(error) => {
                eprintln!("{error}");
                ExitCode::FAILURE
            }
        };
    }
    if cli.list {
        print_list();
        return ExitCode::SUCCESS;
    }

    let report = run::run(run::plan(&cli.settings()), std::io::stderr().is_terminal());
    match cli.format {
        Format::Table => println!("{}\n{TABLE_LEGEND}", report.to_table()),
        Format::Json => println!("{}", report.to_json()),
        Format::Csv => print!("{}", report.to_csv()),
    }
    if let Some(dir) = &cli.out {
        if let Err(error) = write_charts(dir, &report) {
            eprintln!("charts: {error}");
            return ExitCode::FAILURE;
        }
    }
    if report.failures().next().is_some() {
        eprintln!("some jobs failed (listed under skipped)");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

fn print_list() {
    println!("workloads:");
    for w in WorkloadKind::all() {
        println!("  {:<20} {}", w.name(), w.description());
    }
    println!("strategies:");
    for s in StrategyKind::all() {
        let note = if s.race_safe() {
            ""
        } else {
            "  (not race-safe: skipped where threads share a root)"
        };
        println!("  {}{note}", s.name());
    }
    if !cfg!(feature = "talloc") {
        println!("  (talloc: install libtalloc-dev and build with --features talloc)");
    }
}

/// One SVG per workload in `dir`.
fn write_charts(dir: &std::path::Path, report: &Report) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut workloads: Vec<&Workload> = report.results.iter().map(|r| &r.workload).collect();
    workloads.dedup();
    for workload in workloads {
        let rows: Vec<_> = report
            .results
            .iter()
            .filter(|r| &r.workload == workload)
            .collect();
        let path = chart::write_svg(dir, workload, &rows)?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("mapialloc-lab").chain(args.iter().copied()))
    }

    #[test]
    fn no_arguments_is_the_full_run_as_a_table() {
        let cli = parse(&[]).unwrap();
        assert_eq!(cli.format, Format::Table);
        assert_eq!(cli.settings(), Settings::full());
    }

    #[test]
    fn filters_and_quick() {
        let cli = parse(&[
            "--quick",
            "--format",
            "json",
            "--workloads",
            "churn,propset",
            "--strategies",
            "engine,wine",
            "--threads",
            "4",
        ])
        .unwrap();
        let settings = cli.settings();
        assert_eq!(cli.format, Format::Json);
        assert_eq!(settings.rep_ms, Settings::quick().rep_ms);
        assert_eq!(
            settings.workloads,
            [WorkloadKind::Churn, WorkloadKind::Propset]
        );
        assert_eq!(
            settings.strategies,
            [StrategyKind::Engine, StrategyKind::Wine]
        );
        assert_eq!(settings.threads, Some(vec![4]));
    }

    #[test]
    fn unknown_names_and_zero_threads_are_refused() {
        assert!(parse(&["--workloads", "nope"]).is_err());
        assert!(parse(&["--strategies", "glibc"]).is_err());
        assert!(parse(&["--threads", "0"]).is_err());
        assert!(parse(&["--reps", "0"]).is_err());
    }

    #[test]
    fn the_child_command_takes_a_job() {
        let cli = parse(&[CHILD_COMMAND, "{}"]).unwrap();
        assert!(matches!(cli.child, Some(Child::RunJob { job }) if job == "{}"));
    }

    #[test]
    fn replay_alone_runs_only_the_traces_and_trace_info_takes_a_path() {
        let settings = parse(&["--replay", "a.mtrace", "--replay", "b.mtrace"])
            .unwrap()
            .settings();
        assert!(settings.workloads.is_empty());
        assert_eq!(
            settings.replays,
            [PathBuf::from("a.mtrace"), "b.mtrace".into()]
        );
        let with = parse(&["--replay", "a.mtrace", "--workloads", "propset"]).unwrap();
        assert_eq!(with.settings().workloads, [WorkloadKind::Propset]);
        let info = parse(&["trace-info", "a.mtrace"]).unwrap();
        assert!(
            matches!(info.child, Some(Child::TraceInfo { path }) if path == Path::new("a.mtrace"))
        );
    }

    #[test]
    fn clap_configuration_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
