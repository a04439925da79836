//! Provider-shaped workloads: what a MAPI provider does with its memory, timed.
//!
//! Each workload repeats a *round* (a fixed piece of provider work, such as building and
//! freeing 100 property sets) until its time budget is spent, and counts the blocks (roots
//! plus linked blocks) it allocated. Time boxing, rather than a fixed amount of work, keeps
//! the whole lab within its time limit even where a strategy is quadratic (Wine on
//! `long-chain`): every strategy does at least one round. All sizes come from
//! [`SplitMix64`](crate::lab::rng::SplitMix64) with fixed seeds, so every strategy sees the
//! same sequence of requests.

pub mod replay;
pub mod shape;
mod single;
mod threaded;

use crate::lab::strategy::Strategy;
use serde::{Deserialize, Serialize, Serializer};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// What a job measures: a built-in provider shape, or a recorded trace replayed.
///
/// A job carries it to its child process as JSON (`"propset"`, or `{"replay": "path"}`); the
/// report shows its [name](Workload::name).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Workload {
    /// A built-in shape.
    Builtin(WorkloadKind),
    /// `replay:<file stem>`: the trace at this path replayed with its threads
    /// ([`replay`]).
    Replay {
        /// The trace file.
        replay: PathBuf,
    },
}

impl Workload {
    /// The report name: the built-in name, or `replay:<file stem>`.
    pub fn name(&self) -> String {
        match self {
            Workload::Builtin(kind) => kind.name().to_owned(),
            Workload::Replay { replay } => {
                let stem = replay.file_stem().unwrap_or(replay.as_os_str());
                format!("replay:{}", stem.to_string_lossy())
            }
        }
    }

    /// One line saying what the workload does, for the report.
    pub fn description(&self) -> String {
        match self {
            Workload::Builtin(kind) => kind.description().to_owned(),
            Workload::Replay { replay } => {
                format!("the trace {} replayed with its threads", replay.display())
            }
        }
    }
}

impl From<WorkloadKind> for Workload {
    fn from(kind: WorkloadKind) -> Workload {
        Workload::Builtin(kind)
    }
}

impl std::fmt::Display for Workload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name())
    }
}

/// Serialises a workload as its report name (`serialize_with` in the report's rows).
pub fn serialize_name<S: Serializer>(workload: &Workload, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(workload)
}

/// The workloads, by their command-line names.
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    clap::ValueEnum,
    Serialize,
    Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum WorkloadKind {
    /// A 64 B root allocated and freed at once (half of all roots never get a child).
    LoneRoot,
    /// A 320 B SPropValue-array root with 20 linked strings of 24-86 B, then freed.
    Propset,
    /// 100 rows, each its own root (320 B array + 10 linked strings), freed row by row.
    Rowset,
    /// One root with 10,000 linked blocks of 16-300 B, then freed.
    LongChain,
    /// One root with 1,100 linked blocks built on thread A, freed on thread B.
    CrossThreadRowset,
    /// T threads each link 24 B blocks to one root; then it is freed.
    SharedRoot,
    /// A producer builds roots with 6 linked blocks, a consumer frees them, over a bounded channel.
    Pipeline,
    /// Larson-like: each thread replaces random roots of a live window; one old root in eight
    /// goes into a shared exchange, and the thread frees the root parked there before (most
    /// often another thread's).
    Churn,
    /// 1,000 short-lived threads each allocate 64 roots that the main thread frees.
    ThreadChurn,
}

impl WorkloadKind {
    /// Every workload, in report order.
    pub fn all() -> &'static [WorkloadKind] {
        <Self as clap::ValueEnum>::value_variants()
    }

    /// The command-line and report name.
    pub fn name(self) -> &'static str {
        match self {
            WorkloadKind::LoneRoot => "lone-root",
            WorkloadKind::Propset => "propset",
            WorkloadKind::Rowset => "rowset",
            WorkloadKind::LongChain => "long-chain",
            WorkloadKind::CrossThreadRowset => "cross-thread-rowset",
            WorkloadKind::SharedRoot => "shared-root",
            WorkloadKind::Pipeline => "pipeline",
            WorkloadKind::Churn => "churn",
            WorkloadKind::ThreadChurn => "thread-churn",
        }
    }

    /// One line saying what the workload does, for the report.
    pub fn description(self) -> &'static str {
        match self {
            WorkloadKind::LoneRoot => "a 64 B root allocated and freed at once",
            WorkloadKind::Propset => "320 B root + 20 linked strings of 24-86 B, then freed",
            WorkloadKind::Rowset => "100 rows (320 B root + 10 strings each), freed row by row",
            WorkloadKind::LongChain => "one root with 10,000 linked blocks of 16-300 B, then freed",
            WorkloadKind::CrossThreadRowset => {
                "root + 1,100 linked blocks built on thread A, freed on thread B"
            }
            WorkloadKind::SharedRoot => "T threads link 24 B blocks to one root, then it is freed",
            WorkloadKind::Pipeline => {
                "producer builds roots with 6 linked blocks, consumer frees them"
            }
            WorkloadKind::Churn => {
                "larson-like window of live roots (16-1024 B, 0-8 linked) per thread"
            }
            WorkloadKind::ThreadChurn => {
                "1,000 short-lived threads allocate 64 roots each; main frees them"
            }
        }
    }

    /// The thread counts measured by default. Only [`takes_thread_count`](Self::takes_thread_count)
    /// workloads accept others; the rest have a fixed shape.
    pub fn default_threads(self) -> &'static [usize] {
        match self {
            WorkloadKind::SharedRoot => &[2],
            // 16 oversubscribes a 2-core machine on purpose.
            WorkloadKind::Churn => &[1, 2, 16],
            WorkloadKind::CrossThreadRowset | WorkloadKind::Pipeline => &[2],
            WorkloadKind::ThreadChurn => &[threaded::THREAD_CHURN_THREADS],
            WorkloadKind::LoneRoot
            | WorkloadKind::Propset
            | WorkloadKind::Rowset
            | WorkloadKind::LongChain => &[1],
        }
    }

    /// True when `--threads` sets the workload's thread count.
    pub fn takes_thread_count(self) -> bool {
        matches!(self, WorkloadKind::SharedRoot | WorkloadKind::Churn)
    }

    /// True when threads link to one root concurrently, which strategies that are not
    /// race-safe cannot run.
    pub fn shares_root(self) -> bool {
        self == WorkloadKind::SharedRoot
    }
}

impl std::fmt::Display for WorkloadKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One timed run of a workload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sample {
    /// Blocks allocated (roots plus linked blocks); all of them were freed again.
    pub blocks: u64,
    /// Wall time from the first allocation to the last free.
    pub elapsed: Duration,
}

/// Runs `kind` on `strategy` with `threads` threads (where the workload takes a count) for
/// about `budget` of wall time, at least one round.
pub fn run<S: Strategy>(
    kind: WorkloadKind,
    strategy: &S,
    threads: usize,
    budget: Duration,
) -> Sample {
    let threads = threads.max(1);
    match kind {
        WorkloadKind::LoneRoot => single::lone_root(strategy, budget),
        WorkloadKind::Propset => single::propset(strategy, budget),
        WorkloadKind::Rowset => single::rowset(strategy, budget),
        WorkloadKind::LongChain => single::long_chain(strategy, budget),
        WorkloadKind::CrossThreadRowset => threaded::cross_thread_rowset(strategy, budget),
        WorkloadKind::SharedRoot => threaded::shared_root(strategy, threads, budget),
        WorkloadKind::Pipeline => threaded::pipeline(strategy, budget),
        WorkloadKind::Churn => threaded::churn(strategy, threads, budget),
        WorkloadKind::ThreadChurn => threaded::thread_churn(strategy, budget),
    }
}

/// Repeats `round` (which returns the blocks it allocated) until `budget` has passed.
fn time_rounds(budget: Duration, mut round: impl FnMut() -> u64) -> Sample {
    let start = Instant::now();
    let mut blocks = 0;
    loop {
        blocks += round();
        let elapsed = start.elapsed();
        if elapsed >= budget {
            return Sample { blocks, elapsed };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lab::strategy::{Engine, Strategy, StrategyKind, Visit};
    use clap::ValueEnum;

    #[test]
    fn names_match_the_command_line_names() {
        for kind in WorkloadKind::all() {
            assert_eq!(kind.name(), kind.to_possible_value().unwrap().get_name());
        }
    }

    #[test]
    fn only_shared_root_needs_a_race_safe_strategy() {
        let sharing: Vec<_> = WorkloadKind::all()
            .iter()
            .filter(|w| w.shares_root())
            .collect();
        assert_eq!(sharing, [&WorkloadKind::SharedRoot]);
    }

    /// Runs every workload for the shortest budget (one round) and checks that it counted
    /// blocks and freed them all (the engine counts its live blocks).
    struct EveryWorkload;

    impl Visit for EveryWorkload {
        type Output = ();
        fn visit<S: Strategy>(self) {
            let strategy = S::new();
            for &kind in WorkloadKind::all() {
                if kind.shares_root() && !S::RACE_SAFE {
                    continue;
                }
                let threads = if kind.takes_thread_count() {
                    3
                } else {
                    kind.default_threads()[0]
                };
                let sample = run(kind, &strategy, threads, Duration::ZERO);
                assert!(sample.blocks > 0, "{kind} on {}", S::NAME);
                assert_eq!(
                    strategy.live_blocks().unwrap_or(0),
                    0,
                    "{kind} on {} leaked",
                    S::NAME
                );
            }
        }
    }

    #[test]
    fn every_workload_frees_what_it_allocates_on_the_engine() {
        StrategyKind::Engine.visit(EveryWorkload);
    }

    #[test]
    fn every_workload_runs_on_peers() {
        StrategyKind::KopanoGlibc.visit(EveryWorkload);
        StrategyKind::Wine.visit(EveryWorkload);
    }

    #[test]
    fn one_round_counts_the_shape_exactly() {
        let engine = <Engine>::new();
        let one_round = |kind| run(kind, &engine, 2, Duration::ZERO).blocks;
        assert_eq!(
            one_round(WorkloadKind::LoneRoot),
            single::LONE_ROOTS_PER_ROUND
        );
        assert_eq!(
            one_round(WorkloadKind::Propset),
            single::PROPSETS_PER_ROUND * 21
        );
        assert_eq!(one_round(WorkloadKind::Rowset), 100 * 11);
        assert_eq!(one_round(WorkloadKind::LongChain), 10_001);
        assert_eq!(
            one_round(WorkloadKind::SharedRoot),
            1 + 2 * threaded::SHARED_LINKS_PER_THREAD
        );
        assert_eq!(one_round(WorkloadKind::ThreadChurn), 1_000 * 64);
    }
}
