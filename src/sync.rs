//! The loom shim: every atomic, `Arc` and thread-local of the engine comes from here.
//!
//! Under `cfg(loom)` these are loom's model-checked types (and crossbeam-epoch is built with
//! `crossbeam_loom`, so loom sees its atomics too); otherwise they are `std`'s.

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize};
#[cfg(loom)]
pub(crate) use loom::sync::Arc;
#[cfg(loom)]
pub(crate) use loom::thread_local;

#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize};
#[cfg(not(loom))]
pub(crate) use std::sync::Arc;
#[cfg(not(loom))]
pub(crate) use std::thread_local;

pub(crate) use std::sync::atomic::Ordering;
