#!/usr/bin/env bash
# Runs every fuzz target for SECONDS each (default 30) under libFuzzer, from the committed seeds
# and the corpus earlier runs grew (fuzz/target/corpus, not committed). A crash, a panic, a
# failed assertion or an out-of-memory stops the run and leaves the input in
# fuzz/artifacts/<target>/; `cargo fuzz run <target> <that file>` replays it.
set -euo pipefail
cd "$(dirname "$0")"
seconds=${1:-30}
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked --version 0.13.2
# cargo fuzz passes the compiler flags of coverage instrumentation, which only a nightly
# compiler accepts: the machine's stable one is told to accept them.
export RUSTC_BOOTSTRAP=1
targets=$(cargo fuzz list)
[ -n "$targets" ] || { echo "cargo fuzz lists no target"; exit 1; }
for target in $targets; do
  corpus=target/corpus/$target
  mkdir -p "$corpus"
  echo "== fuzz $target: ${seconds}s"
  log=target/$target.log
  if ! cargo fuzz run --sanitizer none "$target" "$corpus" "seeds/$target" -- \
      -max_total_time="$seconds" -rss_limit_mb=2048 -max_len=65536 -print_final_stats=1 >"$log" 2>&1; then
    tail -60 "$log"
    echo "fuzz $target failed: the input is under fuzz/artifacts/$target/"
    exit 1
  fi
  grep -E "^stat::(number_of_executed_units|peak_rss_mb)|^Done" "$log" || true
done
