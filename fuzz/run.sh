#!/usr/bin/env bash
# Runs every fuzz target (coverage-guided libFuzzer through cargo-fuzz, on the
# stable toolchain: `--sanitizer none` needs no nightly) for a fixed time each.
#   fuzz/run.sh              # each target 20 s (what CI does)
#   fuzz/run.sh 600          # each target 10 minutes
#   fuzz/run.sh 3600 config  # one target for an hour
# Runs start from the committed seeds in fuzz/corpus/TARGET and grow a copy
# in fuzz/target/corpus/TARGET (kept between runs, never committed). A crash
# stops the run with the input in fuzz/artifacts/TARGET/; reproduce it with
#   cargo fuzz run -s none -O TARGET fuzz/artifacts/TARGET/crash-…
set -euo pipefail
cd "$(dirname "$0")"
secs="${1:-20}"
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  targets=(proxy_header client_frames frame_watch inflate upgrade_answer request_head first_head config jwks auth_token tls_stream)
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "== installing cargo-fuzz"
  cargo install cargo-fuzz --locked --version 0.13.2
fi
cargo fuzz build -s none -O
for t in "${targets[@]}"; do
  work="target/corpus/$t"
  mkdir -p "$work"
  cp -n corpus/"$t"/* "$work"/ 2>/dev/null || true
  echo "== fuzz $t for ${secs}s"
  # -rss_limit_mb: a parser must not need more than this for any input.
  log="target/fuzz-$t.log"
  set +e
  cargo fuzz run -s none -O "$t" "$work" -- -max_total_time="$secs" -rss_limit_mb=512 -print_final_stats=1 >"$log" 2>&1
  rc=$?
  set -e
  grep -E "^(#[0-9]+ +DONE|stat::number_of_executed_units)|ERROR|SUMMARY|panicked" "$log" || true
  if [ "$rc" -ne 0 ]; then
    tail -40 "$log" >&2
    echo "fuzz target $t failed; the input is in fuzz/artifacts/$t/" >&2
    exit 1
  fi
done
echo "fuzz: ${#targets[@]} targets, ${secs}s each, no crash"
