#!/usr/bin/env bash
# Runs every loom model of the engine; exits non-zero if any fails.
#   loom-tests/run.sh           the models, on the real protocol
#   loom-tests/run.sh --fault   the models with each deliberate protocol fault; each must be caught
#   loom-tests/run.sh --fault NAME   one fault (open_close, chunk_handoff, page_stack_tag)
set -euo pipefail
cd "$(dirname "$0")"
self="$PWD/$(basename "$0")" # for the per-fault runs below, from here

fault=""
only="" # a fault that only some models exercise runs just those (name contains $only)
if [ "${1:-}" = "--fault" ]; then
  if [ -z "${2:-}" ]; then
    # Every planted fault in turn; each must be caught.
    for f in open_close chunk_handoff page_stack_tag; do "$self" --fault "$f" || exit 1; done
    exit 0
  fi
  fault="$2"
  case "$fault" in
    open_close)
      echo "loom: fault injected: MAPIFreeBuffer reads the chain head and closes it with a plain store"
      echo "      (mapialloc_fault=\"$fault\"); a link landing in between must be caught as a leak." ;;
    chunk_handoff)
      echo "loom: fault injected: a root's freer gives back every chunk, even one its carver still holds"
      echo "      (mapialloc_fault=\"$fault\"); the chunk handed back twice must be caught." ;;
    page_stack_tag)
      echo "loom: fault injected: a page stack's pop does not bump the head's tag"
      echo "      (mapialloc_fault=\"$fault\"); a page popped twice (ABA) must be caught."
      only="page_stack" ;;
    *) echo "loom: unknown fault $fault" >&2; exit 2 ;;
  esac
fi

export LOOM_MAX_PREEMPTIONS="${LOOM_MAX_PREEMPTIONS:-2}"
flags="--cfg loom --cfg crossbeam_loom --cfg crossbeam_sanitize"
[ -n "$fault" ] && flags="$flags --cfg mapialloc_fault=\"$fault\""
export RUSTFLAGS="$flags"
target="target/${fault:-clean}"

cargo build --release --tests --target-dir "$target" -q
status=0
for model in $(cargo test --release --target-dir "$target" -q -- --list 2>/dev/null | sed -n 's/: test$//p'); do
  if [ -n "$only" ] && [[ "$model" != *"$only"* ]]; then continue; fi
  start=$(date +%s%N)
  if cargo test --release --target-dir "$target" -q -- --exact "$model" >"$target/$model.log" 2>&1; then
    result=ok
  else
    result=FAILED
    status=1
  fi
  ms=$(( ($(date +%s%N) - start) / 1000000 ))
  printf 'loom: %-36s %-7s %5d.%03ds (LOOM_MAX_PREEMPTIONS=%s)\n' "$model" "$result" \
    $((ms / 1000)) $((ms % 1000)) "$LOOM_MAX_PREEMPTIONS"
  if [ "$result" = FAILED ] && [ -z "$fault" ]; then tail -n 30 "$target/$model.log"; fi
done

if [ -n "$fault" ]; then
  if [ "$status" -eq 0 ]; then
    echo "loom --fault: no model caught the fault \"$fault\": the models are too weak" >&2
    exit 1
  fi
  echo "loom --fault: the fault \"$fault\" was caught, as it must be"
  exit 0
fi
exit "$status"
