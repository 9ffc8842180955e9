#!/usr/bin/env bash
# Makes docs/dashboard.png: runs `upgate demo`, drives about two minutes of
# traffic through it (echo sessions, a burst of handshakes, 200 clients on two
# ticker channels, refused requests on /private, a reload), then has headless
# Chromium take a screenshot of the admin dashboard. Loopback only, bounded.
#   bench/dashboard-screenshot.sh [OUT.png]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-docs/dashboard.png}
cargo build --release --locked --bin upgate --bin upgate-bench
bin=target/release
ulimit -n 65536 2>/dev/null || true
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT
log=$(mktemp)
"$bin/upgate" demo >"$log" 2>&1 &
pids+=($!)
for _ in $(seq 1 100); do
  curl -fsS http://127.0.0.1:9901/healthz >/dev/null 2>&1 && break
  sleep 0.1
done
load() { "$bin/upgate-bench" load --warmup 0 "$@" >/dev/null 2>&1 || true; }
# Two fan-out channels with 150 and 50 clients for the whole run.
load --url 'ws://127.0.0.1:8080/ticker?pair=EURUSD' --mode hold --conns 150 --duration 110 &
pids+=($!)
load --url 'ws://127.0.0.1:8080/ticker?pair=GBPUSD' --mode hold --conns 50 --duration 80 &
pids+=($!)
sleep 10
load --url ws://127.0.0.1:8080/chat --conns 8 --window 1 --duration 30
sleep 5
load --url ws://127.0.0.1:8080/chat --mode handshakes --conns 4 --duration 10
for _ in $(seq 1 40); do
  curl -s -o /dev/null -H 'Connection: Upgrade' -H 'Upgrade: websocket' \
    -H 'Sec-WebSocket-Version: 13' -H 'Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==' \
    http://127.0.0.1:8080/private || true
  sleep 0.1
done
curl -s -X POST http://127.0.0.1:9901/reload >/dev/null || true
load --url ws://127.0.0.1:8080/chat --size 4096 --conns 4 --window 4 --duration 20
sleep 15
profile=$(mktemp -d)
chromium --headless --no-sandbox --disable-gpu --disable-dev-shm-usage --no-first-run \
  --hide-scrollbars --user-data-dir="$profile" --virtual-time-budget=3000 \
  --window-size=1400,2350 --screenshot="$out" http://127.0.0.1:9901/ 2>/dev/null
rm -rf "$profile" "$log"
echo "wrote $out"
