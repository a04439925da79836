//! Measurement: each (workload, strategy, threads) job runs in a child process of its own —
//! the lab re-executes itself with [`CHILD_COMMAND`] — so the memory figures are that job's
//! alone: peak RSS from `getrusage(RUSAGE_SELF).ru_maxrss`, and RSS after everything was
//! freed from `/proc/self/statm`.

use crate::lab::strategy::{Strategy, StrategyKind, Visit};
use crate::lab::workload::replay::Replay;
use crate::lab::workload::{self, Sample, Workload};
use serde::{Deserialize, Serialize};
use std::process::{Command, Stdio};
use std::time::Duration;

/// The hidden subcommand that runs one job in a child process. Its one argument is the
/// [`Job`] as JSON; it prints a [`JobOutput`] as JSON on stdout.
pub const CHILD_COMMAND: &str = "__run-job";

/// One measured job, as the parent hands it to a child.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job {
    /// The workload to run.
    pub workload: Workload,
    /// The strategy to run it on.
    pub strategy: StrategyKind,
    /// Threads, for workloads that take a count (recorded for the others).
    pub threads: usize,
    /// Timed repetitions (the report shows their median, min and max).
    pub reps: usize,
    /// Untimed repetitions first, so that every strategy starts with warm caches and pages.
    pub warmups: usize,
    /// Wall-time budget of each repetition, in milliseconds.
    pub rep_ms: u64,
}

/// What a child reports for its job.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobOutput {
    /// One sample per timed repetition.
    pub samples: Vec<RepSample>,
    /// RSS before the first repetition, in KiB (the lab binary itself).
    pub rss_before_kib: u64,
    /// Peak RSS of the child, in KiB.
    pub peak_rss_kib: u64,
    /// RSS once every repetition has freed everything, in KiB.
    pub rss_after_kib: u64,
}

/// One timed repetition.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct RepSample {
    /// Blocks allocated (roots plus linked blocks).
    pub blocks: u64,
    /// Wall time in nanoseconds.
    pub nanos: u64,
}

impl RepSample {
    /// Wall nanoseconds per block.
    pub fn ns_per_block(&self) -> f64 {
        self.nanos as f64 / self.blocks.max(1) as f64
    }
}

impl From<Sample> for RepSample {
    fn from(sample: Sample) -> Self {
        RepSample {
            blocks: sample.blocks,
            nanos: sample.elapsed.as_nanos() as u64,
        }
    }
}

/// Runs `job` in a child process (this executable with [`CHILD_COMMAND`]) and reads its report.
pub fn run_in_child(job: &Job) -> Result<JobOutput, String> {
    let exe =
        std::env::current_exe().map_err(|e| format!("cannot find the lab's executable: {e}"))?;
    let spec = serde_json::to_string(job).expect("a job serialises");
    let output = Command::new(exe)
        .arg(CHILD_COMMAND)
        .arg(spec)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot start the child: {e}"))?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        return Err(format!(
            "child failed ({}): {}",
            output.status,
            stderr.trim()
        ));
    }
    serde_json::from_slice(&output.stdout).map_err(|e| format!("child's report unreadable: {e}"))
}

/// The child's side: parses the job given on the command line, runs it, and returns the
/// report to print as JSON.
pub fn child_main(spec: &str) -> Result<String, String> {
    let job: Job = serde_json::from_str(spec).map_err(|e| format!("bad job {spec:?}: {e}"))?;
    let output = run_here(&job)?;
    Ok(serde_json::to_string(&output).expect("a report serialises"))
}

/// Runs `job` in this process. Only meaningful for RSS in a fresh process (the child).
pub fn run_here(job: &Job) -> Result<JobOutput, String> {
    job.strategy.visit(RunJob(job))
}

/// [`Visit`]or running a job with the strategy's type.
struct RunJob<'a>(&'a Job);

impl Visit for RunJob<'_> {
    type Output = Result<JobOutput, String>;

    fn visit<S: Strategy>(self) -> Self::Output {
        let job = self.0;
        // A trace is read before the clock starts, once for every repetition.
        let replay = match &job.workload {
            Workload::Builtin(_) => None,
            Workload::Replay { replay } => Some(Replay::load(replay)?),
        };
        let shares_root = match (&job.workload, &replay) {
            (Workload::Builtin(kind), _) => kind.shares_root(),
            (_, Some(replay)) => replay.shares_root,
            (Workload::Replay { .. }, None) => unreachable!("a replay was loaded above"),
        };
        if shares_root && !S::RACE_SAFE {
            return Err(format!(
                "{} is not race-safe: it cannot run {}",
                S::NAME,
                job.workload
            ));
        }
        let strategy = S::new();
        let budget = Duration::from_millis(job.rep_ms);
        let run_once = || -> Sample {
            match (&job.workload, &replay) {
                (Workload::Builtin(kind), _) => {
                    workload::run(*kind, &strategy, job.threads, budget)
                }
                (_, Some(replay)) => replay.run(&strategy, budget),
                (Workload::Replay { .. }, None) => unreachable!("a replay was loaded above"),
            }
        };
        let rss_before_kib = rss_now_kib();
        for _ in 0..job.warmups {
            run_once();
        }
        let samples = (0..job.reps.max(1)).map(|_| run_once().into()).collect();
        if let Some(live) = strategy.live_blocks().filter(|&live| live != 0) {
            return Err(format!(
                "{} on {}: {live} blocks still live after the run",
                S::NAME,
                job.workload
            ));
        }
        Ok(JobOutput {
            samples,
            rss_before_kib,
            peak_rss_kib: peak_rss_kib(),
            rss_after_kib: rss_now_kib(),
        })
    }
}

/// Peak resident set size of this process, in KiB (`ru_maxrss` is in KiB on Linux).
pub fn peak_rss_kib() -> u64 {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage writes a whole rusage into the pointer it is given, which is valid.
    let status = unsafe { libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr()) };
    if status != 0 {
        return 0;
    }
    // SAFETY: getrusage succeeded, so it initialised `usage` (it was zeroed anyway).
    let usage = unsafe { usage.assume_init() };
    usage.ru_maxrss.max(0) as u64
}

/// Current resident set size of this process, in KiB (`/proc/self/statm`), 0 where unknown.
pub fn rss_now_kib() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let resident_pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let page_size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(0) as u64;
    resident_pages * page_size / 1024
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lab::workload::WorkloadKind;

    fn job() -> Job {
        Job {
            workload: WorkloadKind::Propset.into(),
            strategy: StrategyKind::KopanoGlibc,
            threads: 1,
            reps: 3,
            warmups: 0,
            rep_ms: 0,
        }
    }

    #[test]
    fn a_job_round_trips_through_its_command_line_form() {
        let spec = serde_json::to_string(&job()).unwrap();
        assert!(spec.contains(r#""strategy":"kopano-glibc""#), "{spec}");
        assert_eq!(serde_json::from_str::<Job>(&spec).unwrap(), job());
    }

    #[test]
    fn the_child_side_reports_one_sample_per_rep() {
        let report: JobOutput =
            serde_json::from_str(&child_main(&serde_json::to_string(&job()).unwrap()).unwrap())
                .unwrap();
        assert_eq!(report.samples.len(), 3);
        assert!(report.samples.iter().all(|s| s.blocks > 0));
        assert!(report.peak_rss_kib > 0 && report.rss_after_kib > 0);
    }

    #[test]
    fn a_shared_root_job_is_refused_to_a_strategy_that_is_not_race_safe() {
        let job = Job {
            workload: WorkloadKind::SharedRoot.into(),
            strategy: StrategyKind::Wine,
            ..job()
        };
        assert!(run_here(&job).unwrap_err().contains("not race-safe"));
    }

    #[test]
    fn a_replay_job_runs_and_round_trips() {
        let path = std::env::temp_dir().join(format!("job-{}.mtrace", std::process::id()));
        let records = crate::lab::workload::replay::tests::sample_trace();
        std::fs::write(&path, crate::trace::encode(&records)).unwrap();
        let job = Job {
            workload: Workload::Replay {
                replay: path.clone(),
            },
            strategy: StrategyKind::Engine,
            ..job()
        };
        let spec = serde_json::to_string(&job).unwrap();
        assert_eq!(serde_json::from_str::<Job>(&spec).unwrap(), job);
        let output = run_here(&job);
        std::fs::remove_file(&path).unwrap();
        let output = output.unwrap();
        assert_eq!(output.samples.len(), 3);
        assert!(output
            .samples
            .iter()
            .all(|s| s.blocks % 7 == 0 && s.blocks > 0));
    }

    #[test]
    fn rss_readings_are_plausible() {
        let now = rss_now_kib();
        assert!(now > 0);
        assert!(peak_rss_kib() >= now / 2);
    }
}
