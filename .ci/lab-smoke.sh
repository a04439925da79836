#!/usr/bin/env bash
# Lab smoke test: runs `mapialloc-lab --quick --format json` (with talloc when libtalloc-dev is
# installed, as .ci/run does) and checks the report's structure, not its speed.
set -euo pipefail
cd "$(dirname "$0")/.."

features=()
if [ -e /usr/include/talloc.h ]; then
  features=(--features talloc)
fi
report=$(mktemp)
trap 'rm -f "$report"' EXIT

start=$(date +%s)
cargo run --quiet --release "${features[@]}" --bin mapialloc-lab -- --quick --format json >"$report"
echo "lab --quick ${features[*]}: $(($(date +%s) - start)) s (build included)"

python3 - "$report" "${#features[@]}" <<'PY'
import json, sys

report = json.load(open(sys.argv[1]))
with_talloc = sys.argv[2] != "0"
workloads = ["lone-root", "propset", "rowset", "long-chain", "cross-thread-rowset",
             "shared-root", "pipeline", "churn", "thread-churn"]
strategies = ["engine", "wine", "kopano-glibc", "kopano-mimalloc", "kopano-jemalloc", "arena"]
if with_talloc:
    strategies.append("talloc")

def check(ok, what):
    if not ok:
        sys.exit(f"lab smoke: {what}")

check(set(report) >= {"machine", "results", "skipped"}, f"top-level keys: {sorted(report)}")
for key in ["cpu", "cores", "kernel", "rustc", "lab_version"]:
    check(key in report["machine"], f"machine.{key} missing")

fields = {"workload": str, "strategy": str, "threads": int, "blocks": int, "ns_per_block": float,
          "blocks_per_sec": float, "peak_rss_kib": int, "rss_after_kib": int, "race_safe": bool,
          "rank": int}
rows = report["results"]
for row in rows:
    for key, kind in fields.items():
        check(isinstance(row.get(key), (int, float) if kind is float else kind),
              f"{row.get('workload')}/{row.get('strategy')}: {key} = {row.get(key)!r}")
    check(row["blocks"] > 0 and row["ns_per_block"] > 0 and row["peak_rss_kib"] > 0,
          f"{row['workload']}/{row['strategy']}: empty measurement")

failed = [s for s in report["skipped"] if s["reason"].startswith("failed")]
check(not failed, f"failed jobs: {failed}")
skipped = {(s["workload"], s["strategy"]) for s in report["skipped"]}
check(skipped == {("shared-root", "wine")}, f"unexpected skips: {sorted(skipped)}")

measured = {(r["workload"], r["strategy"]) for r in rows}
for w in workloads:
    for s in strategies:
        check((w, s) in measured or (w, s) in skipped, f"no result for {w} on {s}")
check({r["threads"] for r in rows if r["workload"] == "churn"} == {1, 2, 16}, "churn thread counts")

groups = {}
for r in rows:
    groups.setdefault((r["workload"], r["threads"]), []).append(r)
for (w, t), group in groups.items():
    check(sorted(r["rank"] for r in group) == list(range(1, len(group) + 1)), f"{w}/{t}: ranks")
    engine = [r for r in group if r["strategy"] == "engine"]
    check(len(engine) == 1 and abs(engine[0]["ratio_to_engine"] - 1.0) < 1e-9, f"{w}/{t}: engine ratio")

print(f"lab smoke: ok ({len(rows)} results, {len(report['skipped'])} skipped, talloc {'on' if with_talloc else 'off'})")
PY
