#!/usr/bin/env bash
# Where a proxy's CPU per WebSocket handshake goes, beside the floors: the
# benchmark's handshake load (32 in flight, connect, upgrade, one echo,
# close) through each target pinned to core 0, load generator and echo
# backend on core 1, targets interleaved round by round. Per handshake:
#   - each core's busy time (/proc/stat) and the proxy's user and system
#     time (/proc/PID/stat), the rate over direct's in the same round;
#   - the proxy's system calls, counted by perf's syscall tracepoints (per
#     backend connect: one per handshake);
#   - with --perf, core 0 sampled (perf record -g, cpu-clock) and its time
#     split by system call and user space (sampling slows every target).
# Medians over rounds at the end. Loopback only; every load is 4 s (6 s
# with --perf).
#   bench/handshake-profile.sh                         # 5 rounds: direct floor epoll upgate
#   bench/handshake-profile.sh --rounds 3 --perf floor upgate
#   UPGATE_BASE=/tmp/base bench/handshake-profile.sh upgate base   # another build as `base`
#   bench/handshake-profile.sh --rounds 8 upgate upgate-noka       # TCP keepalive off
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=5
with_perf=0
targets=()
while [ $# -gt 0 ]; do
  case $1 in
    --rounds) rounds=$2; shift 2 ;;
    --perf) with_perf=1; shift ;;
    direct | floor | floor-ka | epoll | epoll-ka | upgate | upgate-noka | base) targets+=("$1"); shift ;;
    *) echo "usage: $0 [--rounds N] [--perf] [direct|floor|floor-ka|epoll|epoll-ka|upgate|upgate-noka|base]..." >&2; exit 2 ;;
  esac
done
[ ${#targets[@]} -gt 0 ] || targets=(direct floor epoll upgate)
command -v perf >/dev/null 2>&1 || {
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq linux-perf >/dev/null
}
command -v python3 >/dev/null 2>&1 || {
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3 >/dev/null
}
cargo build --release --locked --bin upgate --bin upgate-bench --bin upgate-bench-backend
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
bin=target/release
# shellcheck source=bench/lib.sh
. bench/lib.sh

proxy_port=18960
backend_port=18961
# floor-ka and epoll-ka: TCP keepalive as upgate's default server.tcp_keepalive (120 s).
ka_secs=120
printf 'listen:\n  - addr: 127.0.0.1:%s\npools:\n  echo: { backends: [ws://127.0.0.1:%s] }\nroutes:\n  - { name: echo, pool: echo }\n' \
  "$proxy_port" "$backend_port" >"$work/up.yaml"
# The same with TCP keepalive off (`upgate-noka`): what the four setsockopt cost.
printf 'server: { tcp_keepalive: 0s }\n' | cat - "$work/up.yaml" >"$work/noka.yaml"
syscalls=(accept4 socket connect setsockopt getsockopt sendto recvfrom read write epoll_wait epoll_ctl close shutdown futex madvise)
events=()
for s in "${syscalls[@]}"; do events+=(-e "syscalls:sys_enter_$s"); done

dur=4
[ "$with_perf" = 1 ] && dur=6
busy() { awk '/^cpu[01] /{printf "%s ", $2+$3+$4+$7+$8}' /proc/stat; }
proc_times() { [ -n "$1" ] && awk '{print $14, $15}' "/proc/$1/stat" || echo "0 0"; }

: >"$work/rows"
for round in $(seq 1 "$rounds"); do
  for t in "${targets[@]}"; do
    taskset -c 1 "$bin/upgate-bench-backend" --listen "127.0.0.1:$backend_port" >/dev/null 2>&1 &
    bp=$!
    pids+=("$bp")
    pp=
    port=$proxy_port
    case $t in
      direct) port=$backend_port ;;
      floor) taskset -c 0 "$bin/upgate-bench-backend" --relay "127.0.0.1:$proxy_port=127.0.0.1:$backend_port" >/dev/null 2>&1 & pp=$! ;;
      floor-ka) taskset -c 0 "$bin/upgate-bench-backend" --relay "127.0.0.1:$proxy_port=127.0.0.1:$backend_port" --keepalive "$ka_secs" >/dev/null 2>&1 & pp=$! ;;
      epoll-ka) taskset -c 0 "$bin/upgate-bench-backend" --epoll-relay "127.0.0.1:$proxy_port=127.0.0.1:$backend_port" --keepalive "$ka_secs" >/dev/null 2>&1 & pp=$! ;;
      epoll) taskset -c 0 "$bin/upgate-bench-backend" --epoll-relay "127.0.0.1:$proxy_port=127.0.0.1:$backend_port" >/dev/null 2>&1 & pp=$! ;;
      upgate) RUST_LOG=warn taskset -c 0 "$bin/upgate" --config "$work/up.yaml" --threads 1 >/dev/null 2>&1 & pp=$! ;;
      upgate-noka) RUST_LOG=warn taskset -c 0 "$bin/upgate" --config "$work/noka.yaml" --threads 1 >/dev/null 2>&1 & pp=$! ;;
      base) RUST_LOG=warn taskset -c 0 "${UPGATE_BASE:?set UPGATE_BASE to a directory holding upgate}/upgate" --config "$work/up.yaml" --threads 1 >/dev/null 2>&1 & pp=$! ;;
    esac
    [ -n "$pp" ] && pids+=("$pp")
    wait_port "$backend_port"
    wait_port "$port"
    url="ws://127.0.0.1:$port/"
    taskset -c 1 "$bin/upgate-bench" load --url "$url" --mode handshakes --conns 32 --window 1 --duration 1 --warmup 0 >/dev/null
    b0=$(busy)
    p0=$(proc_times "$pp")
    taskset -c 1 "$bin/upgate-bench" load --url "$url" --mode handshakes --conns 32 --window 1 --duration "$dur" --warmup 0 >"$work/load" &
    lp=$!
    sc=
    if [ -n "$pp" ]; then
      sleep 0.5
      perf stat "${events[@]}" -p "$pp" -x, -o "$work/sc" -- sleep 3 2>/dev/null
      sc=$work/sc
      if [ "$with_perf" = 1 ]; then
        perf record -q -C 0 -g -e cpu-clock -F 4999 -o "$work/perf.data" -- sleep 1.5 >/dev/null 2>&1
        perf report -i "$work/perf.data" --children --sort sym --stdio 2>/dev/null >"$work/perf.txt" || true
      fi
    fi
    wait "$lp"
    b1=$(busy)
    p1=$(proc_times "$pp")
    python3 - "$round" "$t" "$work/load" "$dur" "$b0" "$b1" "$p0" "$p1" "$sc" "$([ "$with_perf" = 1 ] && [ -n "$pp" ] && echo "$work/perf.txt")" >>"$work/rows" <<'PY'
import json, re, sys
rnd, t, load, dur, b0, b1, p0, p1, sc, pt = sys.argv[1:11]
txt = open(load).read()
n = int(re.search(r"count (\d+)", txt)[1])
rate = n / float(dur)
tick = 1e6 / 100  # USER_HZ
row = {"round": int(rnd), "target": t, "rate": rate}
b0, b1 = [int(x) for x in b0.split()], [int(x) for x in b1.split()]
row["core0"], row["core1"] = [(b1[i] - b0[i]) * tick / n for i in (0, 1)]
p0, p1 = [int(x) for x in p0.split()], [int(x) for x in p1.split()]
row["usr"], row["sys"] = [(p1[i] - p0[i]) * tick / n for i in (0, 1)]
if sc:
    counts = {}
    for l in open(sc):
        f = l.strip().split(",")
        if len(f) > 2 and f[0].replace(".", "").isdigit():
            counts[f[2].split("sys_enter_")[1]] = float(f[0])
    # Every handshake opens exactly one backend connection: per connect is
    # per handshake, counted over the same window as the calls.
    per = counts.get("connect") or rate * 3.0
    row["calls"] = {k: v / per for k, v in counts.items()}
if pt:
    out = open(pt).read()
    total = float(re.search(r"Event count \(approx.\): (\d+)", out)[1]) / 1e3  # µs
    split = {}
    for l in out.splitlines():
        m = re.match(r"\s+([\d.]+)%\s+([\d.]+)%\s+\[(.)\]\s+(\S+)", l)
        if not m:
            continue
        if m[4].startswith("__x64_sys_"):
            split[m[4][10:]] = float(m[1])
        if m[3] == ".":
            split["user"] = split.get("user", 0.0) + float(m[2])
    # Percentages of core 0's samples over the 1.5 s window, as µs per handshake.
    row["perf"] = {k: v / 100 * total / (rate * 1.5) for k, v in split.items()}
print(json.dumps(row))
PY
    for p in $pp $bp; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    tail -1 "$work/rows" | python3 -c 'import json,sys; r=json.loads(sys.stdin.read()); print("round %d %-7s %6.0f hs/s  core0 %6.1f  core1 %6.1f µs/hs  proxy usr %5.1f sys %5.1f" % (r["round"], r["target"], r["rate"], r["core0"], r["core1"], r["usr"], r["sys"]))' >&2
  done
done

mkdir -p bench/results
out=bench/results/handshake-profile-$(date -u +%Y-%m-%d-%H-%M)-UTC.md
{
  echo "## Handshake profile, $(date -u '+%Y-%m-%d %H:%M') UTC"
  echo
  echo "\`bench/handshake-profile.sh --rounds $rounds$([ "$with_perf" = 1 ] && echo ' --perf') ${targets[*]}\`: $(nproc) cores, $(uname -sr); each proxy on core 0 with one thread, load generator and echo backend on core 1; 32 handshakes in flight (connect, upgrade, one echo, close)."
} >"$out"
python3 - "$work/rows" <<'PY' | tee -a "$out"
import json, statistics as st, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
targets = list(dict.fromkeys(r["target"] for r in rows))
by = {(r["round"], r["target"]): r for r in rows}
rounds = sorted({r["round"] for r in rows})
def med(xs):
    xs = [x for x in xs if x is not None]
    return (st.median(xs), min(xs), max(xs)) if xs else None
def cell(m, f="%.2f"):
    return "–" if m is None else (f % m[0]) + " (" + (f % m[1]) + "–" + (f % m[2]) + ")"
print("\nPer handshake, median (min–max) over %d rounds; µs unless named:\n" % len(rounds))
proxies = [t for t in targets if t != "direct"]
ref = proxies[0] if proxies else None
print("| target | rate / direct | core 0 busy | core 0 / %s's, round by round | core 1 busy | proxy user | proxy system | system calls |" % ref)
print("|---|---|---|---|---|---|---|---|")
for t in targets:
    rs = [by.get((n, t)) for n in rounds]
    ratio = med([r["rate"] / by[(r["round"], "direct")]["rate"] for r in rs if r and (r["round"], "direct") in by])
    vs = med([r["core0"] / by[(r["round"], ref)]["core0"] for r in rs if r and t != "direct" and (r["round"], ref) in by])
    calls = med([sum(r["calls"].values()) for r in rs if r and "calls" in r])
    print("| %s | %s | %s | %s | %s | %s | %s | %s |" % (
        t, cell(ratio), cell(med([r["core0"] for r in rs if r]), "%.1f"), cell(vs), cell(med([r["core1"] for r in rs if r]), "%.1f"),
        cell(med([r["usr"] for r in rs if r and "calls" in r]), "%.1f"), cell(med([r["sys"] for r in rs if r and "calls" in r]), "%.1f"),
        cell(calls, "%.1f")))
names = sorted({k for r in rows for k in r.get("calls", {})})
if names and proxies:
    print("\nSystem calls per handshake (median over rounds):\n")
    print("| call | " + " | ".join(proxies) + " |")
    print("|---|" + "---|" * len(proxies))
    for k in names:
        vals = [med([by[(n, t)]["calls"].get(k, 0.0) for n in rounds if (n, t) in by]) for t in proxies]
        if any(v and v[0] >= 0.05 for v in vals):
            print("| %s | %s |" % (k, " | ".join("%.2f" % v[0] if v else "–" for v in vals)))
keys = sorted({k for r in rows for k in r.get("perf", {})}, key=lambda k: -max(r.get("perf", {}).get(k, 0) for r in rows))
if keys:
    print("\nCore 0 per handshake under perf (µs, median over rounds; sampling inflates every figure alike):\n")
    print("| | " + " | ".join(proxies) + " |")
    print("|---|" + "---|" * len(proxies))
    for k in keys:
        vals = [med([by[(n, t)]["perf"].get(k, 0.0) for n in rounds if (n, t) in by and "perf" in by[(n, t)]]) for t in proxies]
        if any(v and v[0] >= 0.2 for v in vals):
            print("| %s | %s |" % (k, " | ".join("%.1f" % v[0] if v else "–" for v in vals)))
PY
echo "saved $out" >&2
