//! Planning and running a lab session: which jobs, how long each, one child process each,
//! in sequence (parallel jobs would disturb each other's timings), with a progress bar.

use crate::lab::machine::Machine;
use crate::lab::measure::{self, Job};
use crate::lab::report::{self, Report, ResultRow, Skip, FAILED};
use crate::lab::strategy::StrategyKind;
use crate::lab::workload::replay::Replay;
use crate::lab::workload::{Workload, WorkloadKind};
use indicatif::{ProgressBar, ProgressStyle};
use std::path::PathBuf;

/// What to run, and how long.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    /// Workloads to run, in report order.
    pub workloads: Vec<WorkloadKind>,
    /// Strategies to run.
    pub strategies: Vec<StrategyKind>,
    /// Thread counts for the workloads that take one (`None`: their defaults).
    pub threads: Option<Vec<usize>>,
    /// Timed repetitions per job.
    pub reps: usize,
    /// Untimed repetitions before them.
    pub warmups: usize,
    /// Wall-time budget of one repetition, ms.
    pub rep_ms: u64,
    /// Traces to replay (`--replay`), each a workload `replay:<file stem>` after the others.
    pub replays: Vec<PathBuf>,
}

impl Settings {
    /// The full run: every workload and strategy, 1 warm-up and 3 timed repetitions of 250 ms
    /// (about 1.5 minutes on a 2-core machine).
    pub fn full() -> Settings {
        Settings {
            workloads: WorkloadKind::all().to_vec(),
            strategies: StrategyKind::all().to_vec(),
            threads: None,
            reps: 3,
            warmups: 1,
            rep_ms: 250,
            replays: Vec::new(),
        }
    }

    /// `--quick`: the same jobs, 3 timed repetitions of 10 ms and no warm-up (a smoke test
    /// in seconds; its numbers are noisier).
    pub fn quick() -> Settings {
        Settings {
            warmups: 0,
            rep_ms: 10,
            ..Settings::full()
        }
    }

    /// The thread counts `workload` runs with under these settings.
    pub fn threads_for(&self, workload: WorkloadKind) -> Vec<usize> {
        match &self.threads {
            Some(threads) if workload.takes_thread_count() => threads.clone(),
            _ => workload.default_threads().to_vec(),
        }
    }
}

/// The jobs to run, and those skipped before running.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    /// Jobs, in report order.
    pub jobs: Vec<Job>,
    /// Jobs that cannot run (a strategy that is not race-safe where threads share a root).
    pub skipped: Vec<Skip>,
}

/// Every (workload, thread count, strategy) the settings select, then every (trace,
/// strategy). A trace that cannot be read fails its jobs (listed as failed under `skipped`).
pub fn plan(settings: &Settings) -> Plan {
    let mut plan = Plan {
        jobs: Vec::new(),
        skipped: Vec::new(),
    };
    for &workload in &settings.workloads {
        for threads in settings.threads_for(workload) {
            plan.add(
                settings,
                workload.into(),
                threads,
                Ok(workload.shares_root()),
            );
        }
    }
    for path in &settings.replays {
        let workload = Workload::Replay {
            replay: path.clone(),
        };
        match Replay::load(path) {
            Ok(replay) => plan.add(
                settings,
                workload,
                replay.threads.len(),
                Ok(replay.shares_root),
            ),
            Err(error) => plan.add(settings, workload, 1, Err(error)),
        }
    }
    plan
}

impl Plan {
    /// Adds `workload` with `threads` on every strategy of `settings`: a job each, or a skip
    /// where the strategy is not race-safe and threads share a root (`shares_root`), or a
    /// failure for every strategy when the workload cannot run (`Err`).
    fn add(
        &mut self,
        settings: &Settings,
        workload: Workload,
        threads: usize,
        shares_root: Result<bool, String>,
    ) {
        for &strategy in &settings.strategies {
            let reason = match &shares_root {
                Err(error) => Some(format!("{FAILED}{error}")),
                Ok(true) if !strategy.race_safe() => {
                    Some("not race-safe: threads share a root".to_owned())
                }
                Ok(_) => None,
            };
            let workload = workload.clone();
            match reason {
                Some(reason) => self.skipped.push(Skip {
                    workload,
                    strategy,
                    threads,
                    reason,
                }),
                None => self.jobs.push(Job {
                    workload,
                    strategy,
                    threads,
                    reps: settings.reps,
                    warmups: settings.warmups,
                    rep_ms: settings.rep_ms,
                }),
            }
        }
    }
}

/// Runs every job of `plan` in its own child process and ranks the results. A job that
/// fails is listed under `skipped` with the child's error (see [`Report::failures`]).
pub fn run(plan: Plan, show_progress: bool) -> Report {
    let progress = if show_progress {
        ProgressBar::new(plan.jobs.len() as u64)
    } else {
        ProgressBar::hidden()
    };
    progress.set_style(
        ProgressStyle::with_template(
            "{bar:30.cyan/blue} {pos}/{len} {elapsed_precise} (eta {eta}) {msg}",
        )
        .expect("a valid template"),
    );
    let mut results = Vec::new();
    let mut skipped = plan.skipped;
    for job in &plan.jobs {
        progress.set_message(format!(
            "{} on {} ({}t)",
            job.workload, job.strategy, job.threads
        ));
        match measure::run_in_child(job) {
            Ok(output) => results.push(ResultRow::new(job, &output)),
            Err(error) => {
                progress.suspend(|| eprintln!("{} on {}: {error}", job.workload, job.strategy));
                let (workload, strategy, threads) =
                    (job.workload.clone(), job.strategy, job.threads);
                skipped.push(Skip {
                    workload,
                    strategy,
                    threads,
                    reason: format!("{FAILED}{error}"),
                });
            }
        }
        progress.inc(1);
    }
    progress.finish_and_clear();
    report::rank(&mut results);
    Report {
        machine: Machine::detect(),
        results,
        skipped,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_plan_covers_every_workload_and_skips_wine_on_the_shared_root() {
        let plan = plan(&Settings::full());
        for workload in WorkloadKind::all() {
            assert!(plan
                .jobs
                .iter()
                .any(|j| j.workload == (*workload).into() && j.strategy == StrategyKind::Engine));
        }
        assert_eq!(plan.skipped.len(), 1);
        assert_eq!(
            (&plan.skipped[0].workload, plan.skipped[0].strategy),
            (&WorkloadKind::SharedRoot.into(), StrategyKind::Wine)
        );
        let churn: Vec<_> = plan
            .jobs
            .iter()
            .filter(|j| j.workload == WorkloadKind::Churn.into())
            .map(|j| j.threads)
            .collect();
        assert_eq!(churn.len(), 3 * StrategyKind::all().len());
        assert!(churn.contains(&1) && churn.contains(&2) && churn.contains(&16));
    }

    #[test]
    fn threads_apply_only_to_workloads_that_take_a_count() {
        let settings = Settings {
            threads: Some(vec![4]),
            ..Settings::quick()
        };
        assert_eq!(settings.threads_for(WorkloadKind::Churn), [4]);
        assert_eq!(settings.threads_for(WorkloadKind::SharedRoot), [4]);
        assert_eq!(settings.threads_for(WorkloadKind::Propset), [1]);
        assert_eq!(settings.threads_for(WorkloadKind::CrossThreadRowset), [2]);
    }

    #[test]
    fn a_replay_is_one_job_per_strategy_with_the_trace_s_threads() {
        let path = std::env::temp_dir().join(format!("plan-{}.mtrace", std::process::id()));
        let records = crate::lab::workload::replay::tests::sample_trace();
        std::fs::write(&path, crate::trace::encode(&records)).unwrap();
        let missing = path.with_extension("missing");
        let settings = Settings {
            workloads: Vec::new(),
            replays: vec![path.clone(), missing.clone()],
            ..Settings::quick()
        };
        let plan = plan(&settings);
        std::fs::remove_file(&path).unwrap();
        assert_eq!(plan.jobs.len(), StrategyKind::all().len());
        assert!(plan.jobs.iter().all(|j| j.threads == 2
            && j.workload
                == Workload::Replay {
                    replay: path.clone()
                }
            && j.workload.name().starts_with("replay:plan-")));
        assert_eq!(plan.skipped.len(), StrategyKind::all().len());
        assert!(plan
            .skipped
            .iter()
            .all(|s| s.reason.starts_with(FAILED) && s.reason.contains("missing")));
    }

    #[test]
    fn quick_runs_the_same_jobs_shorter() {
        let (full, quick) = (plan(&Settings::full()), plan(&Settings::quick()));
        assert_eq!(full.jobs.len(), quick.jobs.len());
        assert!(quick
            .jobs
            .iter()
            .all(|j| j.rep_ms < Settings::full().rep_ms && j.reps >= 3));
    }
}
