#!/usr/bin/env bash
# Runs the multi-threaded tests under ThreadSanitizer: the threads module of tests/all, the
# two-thread cases of tests/miri_subset.rs, and the soak (tests/soak.rs) for a few seconds.
# Fails on any data race TSan reports.
#
# Usage: scripts/tsan.sh
# Environment: MAPIALLOC_SOAK_SECS   soak duration under TSan (default 5; TSan slows every
#                                    memory access, so a short soak covers a lot already)
# Prints "SKIPPED: <why>" and exits 0 only when the nightly toolchain or its rust-src component
# (needed by -Zbuild-std) cannot be installed.
#
# Flags, each for a reason:
# - -Zsanitizer=thread: the sanitizer itself.
# - -Zbuild-std: std must be instrumented too, or every synchronisation inside it (thread
#   spawn and join, channels, Arc) is invisible to TSan and shows up as false races.
# - --cfg crossbeam_sanitize: crossbeam-epoch's own switch for sanitizer runs (what its CI
#   uses): smaller bags and collection on every pin, so deferred page returns actually run,
#   and race, during the short runs here.
# - --no-default-features: the lab (and its C allocators, which TSan would not see into) is
#   not part of the engine.
# Suppressions: scripts/tsan-suppressions.txt, each entry with its reason. TSan does not
# model standalone fences, and crossbeam-epoch orders a pinned reader before the reclaimer
# with fence(Acquire) (checked in crossbeam-epoch 0.9.18, Global::try_advance), so memory
# reclaimed through the epoch is reported as racing. The entries cover crossbeam-epoch's own
# nodes and one test in tests/all built around that very reuse; everything else stays checked.
set -euo pipefail
cd "$(dirname "$0")/.."

toolchain=${TSAN_TOOLCHAIN:-nightly}
target=x86_64-unknown-linux-gnu
if ! rustup run "$toolchain" rustc --version >/dev/null 2>&1 \
    || ! rustup component list --toolchain "$toolchain" --installed 2>/dev/null | grep -q '^rust-src'; then
    if ! rustup toolchain install "$toolchain" --profile minimal --component rust-src >&2 \
        && ! rustup component add rust-src --toolchain "$toolchain" >&2; then
        echo "SKIPPED: cannot install the $toolchain toolchain with rust-src (needed by -Zbuild-std)"
        exit 0
    fi
fi
if [ "$(uname -sm)" != "Linux x86_64" ]; then
    echo "SKIPPED: ThreadSanitizer runs here on x86_64 Linux only (this is $(uname -sm))"
    exit 0
fi

export RUSTFLAGS="-Zsanitizer=thread --cfg crossbeam_sanitize"
export RUSTDOCFLAGS="$RUSTFLAGS"
# halt_on_error: the first race fails the run with its report, not a summary at exit.
export TSAN_OPTIONS="halt_on_error=1 second_deadlock_stack=1 suppressions=$PWD/scripts/tsan-suppressions.txt ${TSAN_OPTIONS:-}"
export MAPIALLOC_SOAK_SECS=${MAPIALLOC_SOAK_SECS:-5}
cargo_tsan=(cargo "+$toolchain" test -Zbuild-std --target "$target" --no-default-features
    --target-dir target/tsan)
echo "tsan: $(rustup run "$toolchain" rustc --version), RUSTFLAGS=$RUSTFLAGS"

"${cargo_tsan[@]}" --test all -- threads:: chunks::
"${cargo_tsan[@]}" --test miri_subset -- two_threads thread_freed remote_frees
"${cargo_tsan[@]}" --test soak -- --nocapture
echo "tsan: clean"
