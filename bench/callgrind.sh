#!/usr/bin/env bash
# Instructions upgate executes per WebSocket handshake and per 64 B echoed
# message, counted by valgrind's callgrind. Unlike timings on a shared
# machine, the count repeats within a fraction of a percent, so it shows
# small changes on the hot path.
#   bench/callgrind.sh                         # this tree's release build
#   bench/callgrind.sh target/release /tmp/base/release   # side by side
#   bench/callgrind.sh --tls target/release /tmp/base     # over TLS: full
#                        handshakes (no resumption) and 64 B messages
#   bench/callgrind.sh --frames target/release /tmp/base  # a frames route
# Each directory must hold `upgate`; the load generator and echo backend
# come from this tree's release build. Loopback only, bounded in time.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v valgrind >/dev/null 2>&1 || {
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq valgrind >/dev/null
}
cargo build --release --locked --bin upgate --bin upgate-bench --bin upgate-bench-backend
tls=0
route_mode=""
while [ $# -gt 0 ]; do
  case "$1" in
    --tls) tls=1 ;;
    --frames) route_mode=", mode: frames" ;;
    *) break ;;
  esac
  shift
done
dirs=("$@")
[ ${#dirs[@]} -gt 0 ] || dirs=(target/release)
# shellcheck source=bench/lib.sh
. bench/lib.sh

# The total instruction count of the newest dump of `out`.
instructions() {
  local f
  f=$(ls -t "$1".* 2>/dev/null | head -1)
  awk '/^(summary|totals):/ {print $2; exit}' "$f"
}

backend_port=18940
target/release/upgate-bench-backend --listen "127.0.0.1:$backend_port" >"$work/backend.log" 2>&1 &
pids+=($!)
wait_port "$backend_port"

scheme=ws
load_tls=()
if [ "$tls" = 1 ]; then
  # A P-256 certificate, as the benchmark's (openssl is part of the base system).
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
    -subj /CN=localhost -addext subjectAltName=DNS:localhost -addext basicConstraints=critical,CA:FALSE \
    -keyout "$work/key.pem" -out "$work/cert.pem" >/dev/null 2>&1
  scheme=wss
  load_tls=(--ca "$work/cert.pem")
  printf 'Over TLS (full handshakes, no resumption).\n\n'
fi
printf '| build | instructions per handshake | instructions per 64 B message (both ways) |\n|---|---|---|\n'
port=18941
for d in "${dirs[@]}"; do
  cfg="$work/upgate-$port.yaml"
  printf 'listen:\n  - addr: 127.0.0.1:%s\n' "$port" >"$cfg"
  if [ "$tls" = 1 ]; then
    printf '    tls:\n      certs:\n        - { cert: %s, key: %s }\n' "$work/cert.pem" "$work/key.pem" >>"$cfg"
  fi
  printf 'pools:\n  echo: { backends: [ws://127.0.0.1:%s] }\nroutes:\n  - { name: echo, pool: echo%s }\n' \
    "$backend_port" "$route_mode" >>"$cfg"
  out="$work/cg-$port"
  RUST_LOG=warn valgrind --tool=callgrind --callgrind-out-file="$out" \
    "$d/upgate" --config "$cfg" --threads 1 >"$work/upgate-$port.log" 2>&1 &
  vpid=$!
  pids+=("$vpid")
  wait_port "$port"
  url="$scheme://localhost:$port/"
  per=()
  for mode in handshakes throughput; do
    # Warm up (pools, allocator, lazy statics). Then two counted runs, 4 s
    # and 12 s, without the load generator's own warm-up: the difference
    # cancels what every run costs besides its units (connecting, closing).
    target/release/upgate-bench load --url "$url" --mode "$mode" --conns 4 --window 4 --duration 2 "${load_tls[@]}" >/dev/null
    counts=()
    for secs in 4 12; do
      callgrind_control -z "$vpid" >/dev/null 2>&1
      line=$(target/release/upgate-bench load --url "$url" --mode "$mode" --conns 4 --window 4 --duration "$secs" --warmup 0 "${load_tls[@]}")
      callgrind_control -d "$vpid" >/dev/null 2>&1
      counts+=("$(instructions "$out") $(echo "$line" | awk '{print $NF}')")
    done
    per+=("$(echo "${counts[0]} ${counts[1]}" | awk '{ printf "%.0f (%d units)", ($3 - $1) / ($4 - $2), $4 - $2 }')")
  done
  printf '| %s | %s | %s |\n' "$d" "${per[0]}" "${per[1]}"
  kill "$vpid" 2>/dev/null || true
  wait "$vpid" 2>/dev/null || true
  port=$((port + 1))
done
