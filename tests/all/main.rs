//! Integration tests of the `mapialloc` engine through its Rust API, in one binary
//! (DESIGN.md: one test binary, `tests/all/main.rs` plus modules, so the crate is linked once).
//!
//! - [`spec`]: one test per row of the behaviour table in SPEC.md, named after the row.
//! - [`layout`]: alignment and non-overlap over every size 0..5000, and large blocks.
//! - [`threads`]: chains freed on another thread, concurrent links, racing frees, and 1,000
//!   short-lived threads with bounded memory.
//! - [`props`]: proptest programs of allocate / link / free / misuse checked against a model.
//! - [`memory`]: freeing everything gives the memory back to the OS.
//! - [`root`]: the RAII wrapper [`mapialloc::Root`].
//! - [`live`]: [`mapialloc::Heap::live_roots`], the leak report's snapshot.
//! - [`lookup`]: roots spread over more segments than a thread's segment cache holds.
//! - [`chunks`]: small linked blocks carved from per-root chunks: their SPEC rows, growth,
//!   roots linked in turn, frees on another thread, and a carver racing its root's free.
//!
//! Every test makes its own `Heap::new()`: the tests run in parallel in this one process, and
//! a fresh heap keeps each test's counters (and committed bytes) its own. Tests assert
//! behaviour, never timing; under Miri they run fewer iterations (see [`support::scaled`]).

mod chunks;
mod layout;
mod live;
mod lookup;
mod memory;
mod props;
mod root;
mod spec;
mod support;
mod threads;

/// `Heap` is shared by reference between threads in nearly every module here.
const _: () = {
    const fn send_sync<T: Send + Sync>() {}
    send_sync::<mapialloc::Heap>();
};
