#!/usr/bin/env bash
# A rolling restart without disconnects: three standalone demo backends behind
# a `mode: frames` route with `resume: true` (examples/resume.yaml); 300
# clients hold their sessions for 25 s while each backend in turn is stopped
# and started again. Prints how many sessions ended early (0 is the point).
# Loopback only; ports 8091 and 9211-9213.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked --bin upgate --bin upgate-bench
bin=target/release
ulimit -n 65536 2>/dev/null || true
declare -A backend
pids=()
cleanup() {
  for p in "${pids[@]}" "${backend[@]}"; do kill "$p" 2>/dev/null || true; done
}
trap cleanup EXIT
wait_port() {
  for _ in $(seq 1 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.1
  done
  echo "port $1 never opened" >&2
  return 1
}
start_backend() {
  "$bin/upgate" demo-backend --name "$1" --listen "127.0.0.1:$2" >/dev/null 2>&1 &
  backend[$1]=$!
  wait_port "$2"
}
start_backend one 9211
start_backend two 9212
start_backend three 9213
RUST_LOG=upgate=info "$bin/upgate" --config examples/resume.yaml >/tmp/upgate-rolling.log 2>&1 &
pids+=($!)
wait_port 8091
out=$(mktemp)
"$bin/upgate-bench" load --url ws://127.0.0.1:8091/ --mode hold --conns 300 --duration 25 --warmup 0 >"$out" &
holder=$!
sleep 3
for b in one:9211 two:9212 three:9213; do
  name=${b%%:*}
  port=${b##*:}
  echo "restarting backend $name"
  kill -TERM "${backend[$name]}"
  wait "${backend[$name]}" 2>/dev/null || true
  sleep 1
  start_backend "$name" "$port"
  sleep 3
done
wait "$holder"
cat "$out"
echo "sessions moved: $(grep -c 'session resumed' /tmp/upgate-rolling.log)"
