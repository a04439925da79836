//! Allocator strategies: one trait for MAPI's three calls, and the strategies the lab compares.
//!
//! Every strategy hands out raw pointers exactly as MAPI does: a root from
//! [`Strategy::allocate_buffer`], blocks linked to it from [`Strategy::allocate_more`], and
//! [`Strategy::free_buffer`] releasing the root with everything linked to it. The lab is
//! generic over the trait ([`StrategyKind::visit`] picks the type from a name), so each
//! strategy's calls are inlined into the workload loops exactly like the engine's.
//!
//! Adding a strategy: write a type implementing [`Strategy`] in a new module here, add a
//! variant to [`StrategyKind`] (its kebab-case name is the command-line name) and one arm to
//! [`StrategyKind::visit`]. The workloads, the report and the benches pick it up from there.

mod arena;
mod engine;
mod kopano;
mod sys;
#[cfg(feature = "talloc")]
mod talloc;
mod wine;

pub use arena::Arena;
pub use engine::Engine;
#[cfg(feature = "hardened")]
pub use engine::EngineHardened;
pub use kopano::{Kopano, KopanoGlibc, KopanoJemalloc, KopanoMimalloc, Malloc, Underlying};
#[cfg(feature = "talloc")]
pub use talloc::Talloc;
pub use wine::Wine;

use crate::Scode;
use serde::{Deserialize, Serialize};
use std::ptr::NonNull;

/// MAPI's memory calls as one allocator strategy.
///
/// Implementations are `Send + Sync`: workloads share one instance between threads and move
/// roots from thread to thread (allocated on one, freed on another). Whether two threads may
/// call [`allocate_more`](Strategy::allocate_more) on the *same* root at once is
/// [`RACE_SAFE`](Strategy::RACE_SAFE); the lab skips workloads that need it on strategies that
/// are not.
pub trait Strategy: Send + Sync + 'static {
    /// The name on the command line and in the report (kebab-case, fixed).
    const NAME: &'static str;
    /// True when threads may link blocks to one root concurrently.
    const RACE_SAFE: bool;

    /// A fresh instance (the lab makes one per measured child process).
    fn new() -> Self;

    /// `MAPIAllocateBuffer`: a new root of `size` bytes.
    fn allocate_buffer(&self, size: usize) -> Result<NonNull<u8>, Scode>;

    /// `MAPIAllocateMore`: a block of `size` bytes, freed together with `root`.
    ///
    /// `root` must be a live root of this strategy; strategies may not check it (Wine and
    /// Kopano do not), so the workloads never pass anything else.
    fn allocate_more(&self, size: usize, root: NonNull<u8>) -> Result<NonNull<u8>, Scode>;

    /// `MAPIFreeBuffer`: frees `root` and every block linked to it.
    ///
    /// # Safety
    ///
    /// - `root` came from [`allocate_buffer`](Strategy::allocate_buffer) on this instance and
    ///   has not been freed yet.
    /// - No other thread uses `root` or a block linked to it during or after the call.
    unsafe fn free_buffer(&self, root: NonNull<u8>);

    /// Blocks allocated and not yet freed, for strategies that count them (the engine does).
    /// The lab checks it is zero after each run, so a leaking workload cannot go unnoticed.
    fn live_blocks(&self) -> Option<u64> {
        None
    }
}

/// The strategies the lab knows, by their command-line names.
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
pub enum StrategyKind {
    /// mapialloc itself (a fresh [`crate::Heap`] per measured process).
    Engine,
    /// mapialloc with its hardening on (feature `hardened`).
    #[cfg(feature = "hardened")]
    EngineHardened,
    /// Wine's mapi32: malloc, one-pointer header, MAPIAllocateMore walks to the chain's tail.
    Wine,
    /// Kopano's mapi4linux over glibc malloc: per-root mutex, intrusive child list.
    KopanoGlibc,
    /// Kopano's scheme over mimalloc.
    KopanoMimalloc,
    /// Kopano's scheme over jemalloc.
    KopanoJemalloc,
    /// A bumpalo arena per root behind a per-root mutex.
    Arena,
    /// Samba's talloc over FFI, behind a global mutex (feature `talloc`).
    #[cfg(feature = "talloc")]
    Talloc,
}

/// Something generic over a strategy type, run by [`StrategyKind::visit`].
pub trait Visit {
    /// What the visit returns.
    type Output;
    /// Runs with `S` as the strategy type.
    fn visit<S: Strategy>(self) -> Self::Output;
}

impl StrategyKind {
    /// Every strategy built into this binary, in report order.
    pub fn all() -> &'static [StrategyKind] {
        <Self as clap::ValueEnum>::value_variants()
    }

    /// The command-line and report name (the same as the strategy's [`Strategy::NAME`]).
    pub fn name(self) -> &'static str {
        self.visit(Name)
    }

    /// Whether the strategy is safe when threads share a root ([`Strategy::RACE_SAFE`]).
    pub fn race_safe(self) -> bool {
        self.visit(RaceSafe)
    }

    /// Runs `v` with this strategy's type: the one place that maps names to types.
    pub fn visit<V: Visit>(self, v: V) -> V::Output {
        match self {
            StrategyKind::Engine => v.visit::<Engine>(),
            #[cfg(feature = "hardened")]
            StrategyKind::EngineHardened => v.visit::<EngineHardened>(),
            StrategyKind::Wine => v.visit::<Wine>(),
            StrategyKind::KopanoGlibc => v.visit::<KopanoGlibc>(),
            StrategyKind::KopanoMimalloc => v.visit::<KopanoMimalloc>(),
            StrategyKind::KopanoJemalloc => v.visit::<KopanoJemalloc>(),
            StrategyKind::Arena => v.visit::<Arena>(),
            #[cfg(feature = "talloc")]
            StrategyKind::Talloc => v.visit::<Talloc>(),
        }
    }
}

impl std::fmt::Display for StrategyKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// [`Visit`]or reading [`Strategy::NAME`].
struct Name;

impl Visit for Name {
    type Output = &'static str;
    fn visit<S: Strategy>(self) -> &'static str {
        S::NAME
    }
}

/// [`Visit`]or reading [`Strategy::RACE_SAFE`].
struct RaceSafe;

impl Visit for RaceSafe {
    type Output = bool;
    fn visit<S: Strategy>(self) -> bool {
        S::RACE_SAFE
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use clap::ValueEnum;

    /// Allocates a root with `links` linked blocks of assorted sizes, writes a distinct byte
    /// pattern over every block, checks none was overwritten by another, then frees the root.
    pub(crate) fn chain_round_trip<S: Strategy>(s: &S, links: usize) {
        let root_size = 320;
        let root = s.allocate_buffer(root_size).expect("root");
        let mut blocks = vec![(root, root_size)];
        for i in 0..links {
            let size = 16 + (i * 37) % 300;
            let block = s.allocate_more(size, root).expect("linked block");
            blocks.push((block, size));
        }
        for (i, &(p, size)) in blocks.iter().enumerate() {
            // SAFETY: each block is live and `size` bytes long.
            unsafe { p.as_ptr().write_bytes(i as u8, size) };
        }
        for (i, &(p, size)) in blocks.iter().enumerate() {
            // SAFETY: as above; the blocks are only read here.
            let bytes = unsafe { std::slice::from_raw_parts(p.as_ptr(), size) };
            assert!(
                bytes.iter().all(|&b| b == i as u8),
                "block {i} of {} overlaps another",
                S::NAME
            );
        }
        // SAFETY: `root` is live, from `s`, and nothing uses its blocks after this.
        unsafe { s.free_buffer(root) };
    }

    #[test]
    fn names_match_the_command_line_names() {
        for kind in StrategyKind::all() {
            let value = kind.to_possible_value().expect("every variant is visible");
            assert_eq!(kind.name(), value.get_name());
        }
    }

    #[test]
    fn only_wine_is_unsafe_on_a_shared_root() {
        for kind in StrategyKind::all() {
            assert_eq!(kind.race_safe(), *kind != StrategyKind::Wine, "{kind}");
        }
    }

    struct RoundTrip;

    impl Visit for RoundTrip {
        type Output = ();
        fn visit<S: Strategy>(self) {
            let s = S::new();
            for links in [0, 1, 5, 300] {
                chain_round_trip(&s, links);
            }
            assert_eq!(s.live_blocks().unwrap_or(0), 0, "{} leaked", S::NAME);
        }
    }

    #[test]
    fn every_strategy_links_and_frees_without_overlap() {
        for kind in StrategyKind::all() {
            kind.visit(RoundTrip);
        }
    }
}
