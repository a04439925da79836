//! mapialloc: a lock-free allocator engine for MAPI's memory API.
//! (Crate docs are being written with the engine.)
#![deny(unsafe_op_in_unsafe_fn)]

pub mod capi;
mod heap;
#[cfg(feature = "lab")]
pub mod lab;
mod scode;
mod stats;

pub use heap::{default_heap, FreeOutcome, Heap, Root};
pub use scode::Scode;
pub use stats::Stats;
