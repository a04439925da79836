#!/usr/bin/env bash
# Runs the C test program (tests/c/mapi_test.c: SPEC.md's table and the threaded cases)
# under valgrind memcheck, against the shared and the static library. Fails on any memcheck
# error or any definite or possible leak.
#
# Usage: .ci/c-valgrind.sh            (from anywhere; installs valgrind if it is missing)
# The C build and run are tests/c_abi.rs's; this script only puts valgrind in front of the
# run (MAPIALLOC_C_RUNNER) and tells the program it runs under valgrind, which skips the
# RSS bound and the address-space cap (valgrind owns both). The library is built as
# scripts/install.sh ships it, without the strategy lab (--no-default-features): the lab's
# peers (mimalloc's load-time constructor among them) are not part of the C library.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v valgrind >/dev/null 2>&1; then
    echo "c-valgrind: installing valgrind" >&2
    sudo=""
    if [ "$(id -u)" != 0 ]; then sudo="sudo"; fi
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq valgrind
fi
valgrind --version

export MAPIALLOC_C_RUNNER="valgrind --error-exitcode=99 --leak-check=full \
--errors-for-leak-kinds=definite,possible --show-leak-kinds=definite,possible \
--fair-sched=yes"
export MAPIALLOC_TEST_UNDER_VALGRIND=1
# All 2,000 short-lived threads (about a minute a library under valgrind's serialised
# scheduler); set MAPIALLOC_C_THREADS to run fewer.

cargo test --no-default-features --test c_abi spec_rows_and_threads_from_c -- \
    --nocapture --test-threads=1
