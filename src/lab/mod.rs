//! The strategy lab: MAPI allocator strategies run on provider-shaped workloads.
//!
//! `cargo run --release --bin mapialloc-lab` runs every [workload](workload::WorkloadKind)
//! on every [strategy](strategy::StrategyKind), each job in a child process of its own
//! ([`measure`]), and prints per workload who wins, by how much, at what memory ([`report`]).
//!
//! - [`strategy`]: the [`Strategy`](strategy::Strategy) trait and the engine's peers (Wine,
//!   Kopano over glibc, mimalloc and jemalloc, a bumpalo arena, and talloc with the feature).
//! - [`workload`]: the provider shapes, time-boxed, with deterministic sizes ([`rng`]).
//! - [`measure`]: the child process protocol, wall time and RSS.
//! - [`run`]: which jobs, in sequence, with a progress bar.
//! - [`report`], [`chart`], [`machine`]: table, JSON, CSV and SVG output.
//! - [`workload::replay`] and [`trace_info`]: traces recorded by the C library
//!   (`MAPIALLOC_TRACE`, [`crate::trace`]) replayed as workloads, and summarised.

pub mod chart;
pub mod machine;
pub mod measure;
pub mod report;
pub mod rng;
pub mod run;
pub mod strategy;
pub mod trace_info;
pub mod workload;
