#!/usr/bin/env bash
# Runs the engine's Miri subset: the lib's unit tests of the size classes and the dedicated
# integration binary tests/miri_subset.rs (size classes through the API, page free lists,
# chain link / close / walk, two-thread cases, misuse). Fails on any UB, data race or leak
# Miri reports.
#
# Usage: scripts/miri.sh [extra cargo-miri test args]
# Prints "SKIPPED: <why>" and exits 0 only when nightly Miri cannot be installed.
#
# Cost: the cases share one heap (a heap used to cost Miri about two minutes, before the
# registry's tables were allocated zeroed); the whole run takes a few minutes on 2 cores.
#
# Built without default features: the lab (and its C dependencies mimalloc and jemalloc,
# which Miri cannot interpret) is not part of the engine. Under cfg(miri) the engine's OS
# layer maps with std::alloc instead of mmap (src/segment.rs, `os`), so Miri sees every access
# to segment memory.
set -euo pipefail
cd "$(dirname "$0")/.."

toolchain=${MIRI_TOOLCHAIN:-nightly}
if ! cargo "+$toolchain" miri --version >/dev/null 2>&1 \
    || ! rustup component list --toolchain "$toolchain" --installed 2>/dev/null | grep -q '^rust-src'; then
    if ! rustup component add miri rust-src --toolchain "$toolchain" >&2; then
        echo "SKIPPED: cannot install miri and rust-src for the $toolchain toolchain"
        exit 0
    fi
fi

flags=(
    # Tree Borrows instead of Stacked Borrows: crossbeam-epoch trips a known Stacked Borrows
    # report (retagging through its tagged pointers) that Tree Borrows accepts; the engine's own
    # references are checked by either model.
    -Zmiri-tree-borrows
    # The engine addresses blocks by integer arithmetic on the segment base and turns addresses
    # back into pointers with std::ptr::with_exposed_provenance (src/chain.rs, Header::user and
    # Header::of_user), on the provenance src/segment.rs exposes when it maps. That is the
    # permissive-provenance model by design; this flag says so and silences the int-to-ptr
    # warning instead of leaving it to scroll past.
    -Zmiri-permissive-provenance
)
export MIRIFLAGS="${flags[*]} ${MIRIFLAGS:-}"
echo "miri: $(cargo "+$toolchain" miri --version), MIRIFLAGS=$MIRIFLAGS"

cargo "+$toolchain" miri setup >/dev/null
# The lib's unit tests: only the size-class table (the capi module's tests use the
# process-wide default heap and belong to the C suite).
cargo "+$toolchain" miri test --no-default-features --lib "$@" -- size_class
cargo "+$toolchain" miri test --no-default-features --test miri_subset "$@"
echo "miri: clean"
